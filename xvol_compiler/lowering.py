"""Deploy lowerings of a fused X-volution site: pure math on tensors and geometry.

A fused site is one convolution over its inputs ``[x, T(x)]`` interleaved per
channel group (``Branch`` with two inputs, ``T`` having ``k`` channels per
channel of ``x``: ``k = 1``, or ``|D|`` for the directional transform, channel
``c * k + d`` belonging to channel ``c`` of ``x``). That merged weight can run
in three exact forms:

``"channel"``
    one conv over ``interleave_groups([x, T])`` (``(1+k) * C_in`` channels); the
    form the rules build.
``"spatial"``
    one conv over ``interleave_spatial([x, T])``: ``x_c`` and its ``k`` channels
    of ``T`` interleaved along the LAST spatial axis (shape ``(N, C_in, ...,
    (1+k) W)``), kernel taps alternating ``[W_x, W_T1, ..., W_Tk]`` along that
    axis, stride and padding of that axis multiplied by ``1+k``. A depthwise site
    stays depthwise with one input channel per group (the layout fast depthwise
    kernels need).
``"split"``
    one conv per input plus an add (two convolutions per site: only when the
    caller allows more than one conv per site).

Nothing here imports torch.fx or onnx; both graph passes and ``XVolutionDeploy``
use these functions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from xvol_compiler.fold import Branch, ConvGeometry, FoldError

__all__ = [
    "LOWERINGS",
    "Lowering",
    "LoweringChoice",
    "SpatialLayout",
    "check_lowering",
    "interleave_factor",
    "spatial_layout",
    "spatial_weight",
    "split_weights",
    "split_geometries",
]

Lowering = Literal["channel", "spatial", "split"]
LOWERINGS: tuple[str, ...] = ("channel", "spatial", "split")


@dataclass(frozen=True)
class LoweringChoice:
    """The lowering a site got, and why (``times_us``: measured candidates, microseconds)."""

    lowering: str
    reason: str
    times_us: tuple[tuple[str, float], ...] = ()


def interleave_factor(branch: Branch) -> int:
    """``1 + k``: how many values of ``[x, T]`` stand at each position of ``x`` (refuses other branches)."""
    if len(branch.inputs) != 2:
        raise FoldError(f"the site reads {len(branch.inputs)} tensors, not [x, T(x)]")
    cx, ct = branch.channels
    if cx <= 0 or ct % cx:
        raise FoldError(f"T(x) has {ct} channels, not a multiple of x's {cx}")
    return 1 + ct // cx


@dataclass(frozen=True)
class SpatialLayout:
    """Geometry of the spatially interleaved conv.

    ``geometry`` is the conv over ``interleave_spatial([x, T])`` (zero padding,
    per-axis ``(left, right)`` in ``pads``); when ``pre_pads`` is set, every input
    is padded first with ``pre_mode`` by those ``(left, right)`` amounts and the
    conv pads nothing (non-zero padding modes; asymmetric zero padding where
    the conv cannot pad asymmetrically).
    """

    factor: int
    geometry: ConvGeometry
    pads: tuple[tuple[int, int], ...]
    pre_pads: tuple[tuple[int, int], ...] | None
    pre_mode: str


def spatial_layout(geometry: ConvGeometry, factor: int, *, asymmetric_pads: bool) -> SpatialLayout:
    """The spatial lowering's geometry for a merged site geometry; FoldError says why it is not exact.

    ``geometry`` is the channel-interleaved conv's (``in_channels = factor * C_in``).
    ``asymmetric_pads``: whether the target conv takes (left, right) pads
    (ONNX Conv does, torch's ConvNd does not: there unequal pads are applied
    to the inputs first).
    """
    g = geometry
    if g.in_channels % factor:
        raise FoldError(f"{g.in_channels} input channels do not split by the interleave factor {factor}")
    if g.dilation[-1] != 1:
        raise FoldError(
            f"dilation {g.dilation[-1]} on the last axis: the interleaved taps are not a dilated kernel"
        )
    pads = g.pads()
    in_channels = g.in_channels // factor
    conv_pads: tuple[tuple[int, int], ...]
    pre: tuple[tuple[int, int], ...] | None = None
    mode = "zeros"
    if g.padding_mode != "zeros":
        pre, mode = pads, g.padding_mode
        conv_pads = tuple((0, 0) for _ in pads)
    elif not asymmetric_pads and any(left != right for left, right in pads):
        pre = pads
        conv_pads = tuple((0, 0) for _ in pads)
    else:
        last = pads[-1]
        conv_pads = (*pads[:-1], (factor * last[0], factor * last[1]))
    symmetric = all(left == right for left, right in conv_pads)
    padding: tuple[int, ...] | str = tuple(left for left, _ in conv_pads) if symmetric else "valid"
    spatial = ConvGeometry(
        in_channels=in_channels,
        out_channels=g.out_channels,
        kernel_size=(*g.kernel_size[:-1], factor * g.kernel_size[-1]),
        stride=(*g.stride[:-1], factor * g.stride[-1]),
        padding=padding,
        dilation=g.dilation,
        groups=g.groups,
    )
    return SpatialLayout(factor, spatial, conv_pads, pre, mode)


def spatial_weight(weight: Tensor, groups: int, factor: int) -> Tensor:
    """Channel-interleaved merged weight -> the spatial lowering's weight.

    ``weight``: ``(C_out, factor * C_in/g, *K)``, per group ``[x block (C_in/g),
    T block ((factor-1) * C_in/g, channel c*k+d)]``. Result: ``(C_out, C_in/g,
    *K[:-1], factor * K[-1])`` with tap ``factor * t + j`` = block ``j`` at tap ``t``.
    """
    c_out, per_group = weight.shape[0], weight.shape[1]
    if per_group % factor:
        raise FoldError(f"weight has {per_group} inputs per group, not a multiple of {factor}")
    c = per_group // factor
    k = factor - 1
    kernel = tuple(weight.shape[2:])
    wx = weight[:, :c]  # (C_out, c, *K)
    wt = weight[:, c:].reshape(c_out, c, k, *kernel)  # T channel i*k + d of the group
    stacked = torch.cat([wx.unsqueeze(2), wt], dim=2)  # (C_out, c, factor, *K)
    stacked = stacked.movedim(2, -1)  # (C_out, c, *K, factor)
    return stacked.reshape(c_out, c, *kernel[:-1], kernel[-1] * factor).contiguous()


def split_geometries(branch: Branch) -> list[ConvGeometry]:
    """One geometry per input of the merged branch: same kernel, stride, padding, groups."""
    g = branch.geometry
    return [
        ConvGeometry(c, g.out_channels, g.kernel_size, g.stride, g.padding, g.dilation, g.groups, g.padding_mode)
        for c in branch.channels
    ]


def split_weights(branch: Branch) -> list[tuple[Tensor, Tensor | None]]:
    """(weight, bias) of one conv per input; the bias goes to the first (the others add nothing)."""
    blocks = branch.blocks()
    return [(w.contiguous(), branch.bias if i == 0 else None) for i, w in enumerate(blocks)]


def check_lowering(branch: Branch, lowering: str, *, single_conv: bool = True, asymmetric_pads: bool = False) -> None:
    """Raise FoldError with the reason ``lowering`` cannot run ``branch`` exactly (or is not allowed)."""
    if lowering not in LOWERINGS:
        raise FoldError(f"unknown lowering {lowering!r}; choose from {', '.join(LOWERINGS)}")
    if lowering == "channel":
        return
    if len(branch.inputs) < 2:
        raise FoldError("a single-input conv has nothing to interleave")
    if lowering == "split":
        if single_conv:
            raise FoldError("the split lowering is two convolutions per site: pass single_conv=False to allow it")
        return
    if lowering == "spatial":
        factor = interleave_factor(branch)
        spatial_layout(branch.geometry, factor, asymmetric_pads=asymmetric_pads)
