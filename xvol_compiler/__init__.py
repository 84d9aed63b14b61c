"""xvol-compiler: insert X-volution into CNNs for training, fuse it into single convolutions for deployment."""

from xvol_compiler.fold import FoldError
from xvol_compiler.fusion_report import FusionReport
from xvol_compiler.global_attention import GlobalAttentionXVolution
from xvol_compiler.ops import XVolution, XVolutionDeploy, interleave_groups, pssa_transform
from xvol_compiler.passes.fuse_fx import FusionError, FusionVerificationError, fuse, fuse_graph, fuse_with_report
from xvol_compiler.passes.fuse_onnx import (
    OnnxError,
    OnnxFileError,
    OnnxVerificationError,
    OutputError,
    OutputExistsError,
    export_onnx,
    fuse_onnx,
)
from xvol_compiler.passes.xvolify import xvolify, xvolify_with_report
from xvol_compiler.report import SiteReport, TableReport, XvolifyReport, render_table
from xvol_compiler.sites import ConvInfo, SiteSelection, SiteSelectionError, analyze_model

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
