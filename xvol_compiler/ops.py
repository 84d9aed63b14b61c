"""Old home of the X-volution operator, kept so ``from xvol_compiler.ops import ...`` keeps working.

The code lives in modules along its seams: :mod:`xvol_compiler.pssa` (the PSSA transform, its ring
kernel, the interleave helpers), :mod:`xvol_compiler.conv_modules` (reading torch conv and
BatchNorm modules, the conv table), :mod:`xvol_compiler.conv_forward` (checking a conv subclass's
forward by tracing), :mod:`xvol_compiler.xvolution` (the training module) and
:mod:`xvol_compiler.deploy` (the deploy module and lowering emission). New code imports from those.
"""

from __future__ import annotations

from xvol_compiler.conv_modules import (
    BN_TYPES,
    CONV_FUNCTIONS,
    CONV_TYPES,
    bn_params,
    conv_geometry,
    conv_module_weights,
    padded_conv,
)
from xvol_compiler.deploy import XVolutionDeploy, lowered_convs, pad_input, run_lowering
from xvol_compiler.pssa import (
    PSSA_RING,
    Directions,
    PssaKernelLayout,
    interleave_groups,
    interleave_spatial,
    neighbour_offsets,
    pssa_kernel,
    pssa_kernel_layout,
    pssa_ring_buffer,
    pssa_transform,
    refill_ring,
    site_ring,
    stack_depth,
)
from xvol_compiler.xvolution import EXTRA_BRANCHES, XVolution, conv_forward_reason

CONV_FNS = CONV_FUNCTIONS  # the old name of the conv-function table

__all__ = [
    "BN_TYPES",
    "CONV_FNS",
    "CONV_TYPES",
    "EXTRA_BRANCHES",
    "PSSA_RING",
    "Directions",
    "PssaKernelLayout",
    "XVolution",
    "XVolutionDeploy",
    "bn_params",
    "conv_forward_reason",
    "conv_geometry",
    "conv_module_weights",
    "interleave_groups",
    "interleave_spatial",
    "lowered_convs",
    "neighbour_offsets",
    "pad_input",
    "padded_conv",
    "pssa_kernel",
    "pssa_kernel_layout",
    "pssa_ring_buffer",
    "pssa_transform",
    "refill_ring",
    "run_lowering",
    "site_ring",
    "stack_depth",
]
