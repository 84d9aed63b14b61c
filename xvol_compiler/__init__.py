"""xvol-compiler: insert X-volution into CNNs for training, fuse it into single convolutions for deployment."""

from xvol_compiler.fold import FoldError
from xvol_compiler.ops import XVolution, XVolutionDeploy, interleave_groups, pssa_transform

__all__ = ["FoldError", "XVolution", "XVolutionDeploy", "interleave_groups", "pssa_transform"]
__version__ = "0.1.0"
