"""Deploy lowerings of a fused X-volution site: pure math on tensors and geometry.

A fused site is one convolution over its inputs ``[x, T(x)]`` interleaved per
channel group (``Branch`` with two inputs, ``T`` having ``k`` channels per
channel of ``x``: ``k = 1``, or ``|D|`` for the directional transform, channel
``c * k + d`` belonging to channel ``c`` of ``x``). That merged weight can run
in four exact forms:

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
``"spatial-h"``
    the same along the H axis (the second-to-last spatial axis): input ``(N,
    C_in, ..., (1+k) H, W)``, kernel ``(..., (1+k) K_h, K_w)``, stride and
    padding of H multiplied by ``1+k``, W unchanged (kernel width, stride and
    padding stay the site's). Not for 1-D sites (no H axis).
``"stack"``
    one conv of one more dimension over ``stack_depth([x, T])``: ``x_c`` and
    its ``k`` channels of ``T`` stacked on a new axis right after the channels
    (shape ``(N, C_in, 1+k, *S)``), kernel ``(1+k, *K)`` whose taps along that
    axis are ``[W_x, W_T1, ..., W_Tk]``, stride 1 and no padding there; the
    output's new axis has size 1 and is dropped. A depthwise site stays
    depthwise, its kernel, stride and padding untouched (nothing doubles). 1-D
    and 2-D sites only: torch and ONNX have no 4-D convolution.
``"split"``
    one conv per input plus an add (two convolutions per site: only when the
    caller allows more than one conv per site).

``spatial_axis`` names the interleaved axis of a spatial lowering (``-1``, ``-2``:
negative indices into the spatial axes); ``spatial_layout`` and ``spatial_weight``
take it. ``tap_axis`` names, for every one-conv lowering but "channel", the axis
of the lowered weight along which the taps reading ``x`` and ``T`` alternate (what
the INT8 rescale divides).

Nothing here imports torch.fx or onnx; both graph passes and ``XVolutionDeploy``
use these functions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, TypeVar

import torch
from torch import Tensor

from xvol_compiler.fold import Branch, ConvGeometry, FoldError

_V = TypeVar("_V")

__all__ = [
    "LOWERINGS",
    "Lowering",
    "LoweringChoice",
    "SPATIAL_LOWERINGS",
    "SpatialLayout",
    "check_lowering",
    "interleave_factor",
    "spatial_axis",
    "spatial_layout",
    "spatial_weight",
    "split_weights",
    "split_geometries",
    "stack_layout",
    "stack_weight",
    "tap_axis",
]

Lowering = Literal["channel", "spatial", "spatial-h", "stack", "split"]
LOWERINGS: tuple[str, ...] = ("channel", "spatial", "spatial-h", "stack", "split")
# Spatial lowerings and the spatial axis each interleaves (a negative index into the spatial axes).
_SPATIAL_AXES: dict[str, int] = {"spatial": -1, "spatial-h": -2}
SPATIAL_LOWERINGS: tuple[str, ...] = tuple(_SPATIAL_AXES)
_AXIS_NAMES = {-1: "the last axis", -2: "the H axis"}


def spatial_axis(lowering: str) -> int | None:
    """The spatial axis a spatial lowering interleaves along (``-1``: W, ``-2``: H), None for the others."""
    return _SPATIAL_AXES.get(lowering)


def tap_axis(lowering: str, ndim: int) -> int | None:
    """The axis (negative, into the weight's kernel axes) of a lowered weight along which taps alternate
    between ``x`` and ``T``: a spatial lowering's interleaved axis, the stacked axis (``-(ndim + 1)``) of
    "stack"; None for "channel" and "split" (their weights read T by input channel)."""
    if lowering == "stack":
        return -(ndim + 1)
    return spatial_axis(lowering)


def _check_axis(ndim: int, axis: int) -> None:
    """FoldError when a site with ``ndim`` spatial axes has no axis ``axis``."""
    if -ndim <= axis < 0:
        return
    if axis == -2 and ndim == 1:
        raise FoldError("a 1-D site has no H axis; use spatial")
    raise FoldError(f"a {ndim}-D site has no spatial axis {axis}")


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
    """Geometry of the spatially interleaved (or stacked) conv.

    ``geometry`` is the conv over ``interleave_spatial([x, T])`` (or, for "stack",
    over ``stack_depth([x, T])``, one axis more) with zero padding, per-axis
    ``(left, right)`` in ``pads`` (one pair per axis of that conv); when
    ``pre_pads`` is set (one pair per spatial axis of the site), every input is
    padded first with ``pre_mode`` by those amounts and the conv pads nothing
    (non-zero padding modes; asymmetric zero padding where the conv cannot pad
    asymmetrically).
    """

    factor: int
    geometry: ConvGeometry
    pads: tuple[tuple[int, int], ...]
    pre_pads: tuple[tuple[int, int], ...] | None
    pre_mode: str


def spatial_layout(geometry: ConvGeometry, factor: int, *, asymmetric_pads: bool, axis: int = -1) -> SpatialLayout:
    """A spatial lowering's geometry for a merged site geometry; FoldError says why it is not exact.

    ``geometry`` is the channel-interleaved conv's (``in_channels = factor * C_in``); ``axis`` the
    interleaved spatial axis (:func:`spatial_axis`: -1 for "spatial", -2 for "spatial-h").
    ``asymmetric_pads``: whether the target conv takes (left, right) pads
    (ONNX Conv does, torch's ConvNd does not: there unequal pads are applied
    to the inputs first).
    """
    g = geometry
    _check_axis(g.ndim, axis)
    _check_factor(g, factor)
    if g.dilation[axis] != 1:
        raise FoldError(
            f"dilation {g.dilation[axis]} on {_AXIS_NAMES.get(axis, f'axis {axis}')}: the interleaved taps "
            "are not a dilated kernel"
        )
    pads, pre, mode = _split_padding(g, asymmetric_pads)
    conv_pads = _scaled(pads, axis, lambda pair: (factor * pair[0], factor * pair[1]))
    spatial = ConvGeometry(
        in_channels=g.in_channels // factor,
        out_channels=g.out_channels,
        kernel_size=_scaled(g.kernel_size, axis, lambda v: factor * v),
        stride=_scaled(g.stride, axis, lambda v: factor * v),
        padding=_padding_argument(conv_pads),
        dilation=g.dilation,
        groups=g.groups,
    )
    return SpatialLayout(factor, spatial, conv_pads, pre, mode)


def stack_weight(weight: Tensor, factor: int) -> Tensor:
    """Channel-interleaved merged weight -> the "stack" lowering's weight.

    ``weight``: ``(C_out, factor * C_in/g, *K)``, per group ``[x block (C_in/g),
    T block ((factor-1) * C_in/g, channel c*k+d)]``. Result: ``(C_out, C_in/g, factor, *K)``,
    tap ``j`` of the new axis = block ``j``.
    """
    c_out, per_group = weight.shape[0], weight.shape[1]
    if per_group % factor:
        raise FoldError(f"weight has {per_group} inputs per group, not a multiple of {factor}")
    c = per_group // factor
    kernel = tuple(weight.shape[2:])
    wx = weight[:, :c]  # (C_out, c, *K)
    wt = weight[:, c:].reshape(c_out, c, factor - 1, *kernel)  # T channel i*k + d of the group
    return torch.cat([wx.unsqueeze(2), wt], dim=2).contiguous()


def spatial_weight(weight: Tensor, groups: int, factor: int, axis: int = -1) -> Tensor:
    """Channel-interleaved merged weight -> a spatial lowering's weight: the stacked weight
    (:func:`stack_weight`) with its new axis merged into ``K[axis]``. Result: ``(C_out, C_in/g, *K)``
    with ``K[axis]`` multiplied by ``factor``, tap ``factor * t + j`` of that axis = block ``j`` at tap ``t``.
    """
    kernel = tuple(weight.shape[2:])
    _check_axis(len(kernel), axis)
    stacked = stack_weight(weight, factor).movedim(2, axis)  # (C_out, c, ..., K[axis], factor, ...)
    return stacked.reshape(*stacked.shape[:2], *_scaled(kernel, axis, lambda v: factor * v)).contiguous()


def stack_layout(geometry: ConvGeometry, factor: int, *, asymmetric_pads: bool) -> SpatialLayout:
    """The "stack" lowering's geometry for a merged site geometry; FoldError says why it is not exact.

    ``layout.geometry`` is the conv of one more dimension over ``stack_depth([x, T])`` (the stacked
    axis first: kernel ``factor``, stride 1, no padding); ``layout.pads`` its per-axis (left, right)
    zero padding, stacked axis included; ``layout.pre_pads`` (the site's spatial axes only) when the
    inputs are padded before stacking (non-zero padding modes, or unequal pads for a conv that cannot
    pad asymmetrically).
    """
    g = geometry
    if g.ndim > 2:
        raise FoldError(f"a {g.ndim}-D site would need a {g.ndim + 1}-D convolution, which torch and ONNX "
                        "do not have; use spatial")
    _check_factor(g, factor)
    pads, pre, mode = _split_padding(g, asymmetric_pads)
    conv_pads = ((0, 0), *pads)
    stacked = ConvGeometry(
        in_channels=g.in_channels // factor,
        out_channels=g.out_channels,
        kernel_size=(factor, *g.kernel_size),
        stride=(1, *g.stride),
        padding=_padding_argument(conv_pads),
        dilation=(1, *g.dilation),
        groups=g.groups,
    )
    return SpatialLayout(factor, stacked, conv_pads, pre, mode)


def _check_factor(g: ConvGeometry, factor: int) -> None:
    if g.in_channels % factor:
        raise FoldError(f"{g.in_channels} input channels do not split by the interleave factor {factor}")


def _split_padding(
    g: ConvGeometry, asymmetric_pads: bool,
) -> tuple[tuple[tuple[int, int], ...], tuple[tuple[int, int], ...] | None, str]:
    """The site's per-axis (left, right) padding split between the inputs and the conv: ``(conv pads,
    pre-pads, pre-pad mode)``. The inputs are padded first (and the conv pads nothing) for a non-zero
    padding mode, or for unequal zero pads where the conv cannot pad asymmetrically; else pre-pads is None."""
    pads = g.pads()
    if g.padding_mode != "zeros" or (not asymmetric_pads and any(left != right for left, right in pads)):
        return tuple((0, 0) for _ in pads), pads, g.padding_mode
    return pads, None, "zeros"


def _padding_argument(conv_pads: tuple[tuple[int, int], ...]) -> tuple[int, ...] | str:
    """A ConvGeometry's ``padding`` for these (left, right) pads: per-axis sizes when symmetric, else
    "valid" (the pads are then the emitter's to write: ONNX pads asymmetrically)."""
    if all(left == right for left, right in conv_pads):
        return tuple(left for left, _ in conv_pads)
    return "valid"


def _scaled(values: tuple[_V, ...], axis: int, scale: Callable[[_V], _V]) -> tuple[_V, ...]:
    """``values`` with the entry at ``axis`` (negative) replaced by ``scale`` of it."""
    index = len(values) + axis
    return (*values[:index], scale(values[index]), *values[index + 1:])


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
    factor = interleave_factor(branch)
    if lowering == "stack":
        stack_layout(branch.geometry, factor, asymmetric_pads=asymmetric_pads)
        return
    axis = spatial_axis(lowering)
    if axis is not None:
        spatial_layout(branch.geometry, factor, asymmetric_pads=asymmetric_pads, axis=axis)
