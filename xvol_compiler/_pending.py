"""TEMPORARY: the pipeline's passes, taken from the package when they have landed, stand-ins otherwise.

Removed once ``xvol_compiler`` exports ``xvolify``, ``fuse``, ``fuse_onnx`` and ``export_onnx``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

try:
    from xvol_compiler import xvolify
except ImportError:  # pragma: no cover
    from xvol_compiler.passes.xvolify import xvolify
try:
    from xvol_compiler import fuse
except ImportError:  # pragma: no cover
    from xvol_compiler.passes.fuse_fx import fuse

try:
    from xvol_compiler import export_onnx, fuse_onnx
except ImportError:  # pragma: no cover
    from xvol_compiler.fusion_report import FusionReport
    from xvol_compiler.io import atomic_path, check_writable, load_onnx

    def export_onnx(
        model: nn.Module, path: str | os.PathLike[str], example_inputs: Any, *, dynamo: bool = True,
        optimize: bool = True, opset: int | None = None, dynamic_batch: bool = True, external_data: bool = False,
        force: bool = False,
    ) -> Path:
        check_writable(path, force=force)
        args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
        shapes = ({0: torch.export.Dim("batch")},) if dynamic_batch else None
        program = torch.onnx.export(model.eval(), args, dynamo=dynamo, optimize=optimize, opset_version=opset,
                                    dynamic_shapes=shapes, verbose=False)
        with atomic_path(path, force=force) as tmp:
            program.save(str(tmp))
        return Path(path)

    def fuse_onnx(
        model_or_path: Any, *, verify: bool = True, rtol: float = 1e-4, output_path: str | None = None,
        force: bool = False,
    ) -> tuple[Any, FusionReport]:
        import onnx

        proto = load_onnx(model_or_path) if isinstance(model_or_path, (str, os.PathLike)) else model_or_path
        report = FusionReport(source="onnx", notes=["fuse_onnx has not landed yet: graph left unfused"])
        if output_path is not None:
            with atomic_path(output_path, force=force) as tmp:
                onnx.save(proto, str(tmp))
        return proto, report


__all__ = ["export_onnx", "fuse", "fuse_onnx", "xvolify"]
