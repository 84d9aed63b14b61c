"""TEMPORARY: the pipeline's passes, from the package root once it exports them, from their modules until then.

Removed once ``xvol_compiler`` exports ``xvolify``, ``fuse``, ``fuse_onnx`` and ``export_onnx``.
"""

from __future__ import annotations

try:
    from xvol_compiler import xvolify, xvolify_with_report
except ImportError:  # pragma: no cover
    from xvol_compiler.passes.xvolify import xvolify, xvolify_with_report
try:
    from xvol_compiler import fuse
except ImportError:  # pragma: no cover
    from xvol_compiler.passes.fuse_fx import fuse
try:
    from xvol_compiler import export_onnx, fuse_onnx
except ImportError:  # pragma: no cover
    from xvol_compiler.passes.fuse_onnx import export_onnx, fuse_onnx

__all__ = ["export_onnx", "fuse", "fuse_onnx", "xvolify", "xvolify_with_report"]
