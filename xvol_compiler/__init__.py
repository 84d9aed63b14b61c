"""xvol-compiler: insert X-volution into CNNs for training, fuse it into single convolutions for deployment."""

from typing import TYPE_CHECKING, Any

from xvol_compiler.deploy import XVolutionDeploy
from xvol_compiler.fold import FoldError
from xvol_compiler.fusion_report import FusionReport
from xvol_compiler.global_attention import GlobalAttentionXVolution
from xvol_compiler.pssa import interleave_groups, pssa_transform
from xvol_compiler.report import SiteReport, TableReport, XvolifyReport, render_table
from xvol_compiler.site_analysis import ConvInfo, SiteSelectionError, analyze_model
from xvol_compiler.site_selection import SiteSelection
from xvol_compiler.xvolution import XVolution

# The passes (and through them onnx) load on first use, so `import xvol_compiler` stays light and the
# library layer imports nothing above it at import time.
_LAZY = {
    "FusionError": "xvol_passes.fuse_fx",
    "FusionVerificationError": "xvol_passes.fuse_fx",
    "fuse": "xvol_passes.fuse_fx",
    "fuse_graph": "xvol_passes.fuse_fx",
    "fuse_with_report": "xvol_passes.fuse_fx",
    "OnnxError": "xvol_passes.fuse_onnx",
    "OnnxFileError": "xvol_passes.fuse_onnx",
    "OnnxVerificationError": "xvol_passes.fuse_onnx",
    "OutputError": "xvol_passes.fuse_onnx",
    "OutputExistsError": "xvol_passes.fuse_onnx",
    "export_onnx": "xvol_passes.fuse_onnx",
    "fuse_onnx": "xvol_passes.fuse_onnx",
    "xvolify": "xvol_passes.xvolify",
    "xvolify_with_report": "xvol_passes.xvolify",
}

if TYPE_CHECKING:
    from xvol_passes.fuse_fx import FusionError, FusionVerificationError, fuse, fuse_graph, fuse_with_report
    from xvol_passes.fuse_onnx import (
        OnnxError,
        OnnxFileError,
        OnnxVerificationError,
        OutputError,
        OutputExistsError,
        export_onnx,
        fuse_onnx,
    )
    from xvol_passes.xvolify import xvolify, xvolify_with_report


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'xvol_compiler' has no attribute {name!r}")


__all__ = [
    "ConvInfo",
    "FoldError",
    "FusionError",
    "FusionReport",
    "FusionVerificationError",
    "GlobalAttentionXVolution",
    "OnnxError",
    "OnnxFileError",
    "OnnxVerificationError",
    "OutputError",
    "OutputExistsError",
    "SiteReport",
    "SiteSelection",
    "SiteSelectionError",
    "TableReport",
    "XVolution",
    "XVolutionDeploy",
    "XvolifyReport",
    "analyze_model",
    "export_onnx",
    "fuse",
    "fuse_graph",
    "fuse_onnx",
    "fuse_with_report",
    "interleave_groups",
    "pssa_transform",
    "render_table",
    "xvolify",
    "xvolify_with_report",
]
__version__ = "0.1.0"
