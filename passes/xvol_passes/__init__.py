"""The fusion passes of xvol-compiler: xvolify, the module and graph forms of fuse, fuse_onnx, lowering.

Each pass module reads a model or graph and returns the rewritten one with its report; the fold math,
the rules and the verification they share live in the library package ``xvol_compiler``.
"""
