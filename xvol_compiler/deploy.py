"""The deploy form of an X-volution site, :class:`XVolutionDeploy`: one convolution over
``[x, T(x)]`` in one of the lowerings of :mod:`xvol_compiler.lowering`, and the emission of a
lowering's conv modules (:func:`lowered_convs`) and their eager evaluation (:func:`run_lowering`),
shared with the graph passes."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd

from xvol_compiler import pssa
from xvol_compiler.conv_modules import CONV_TYPES
from xvol_compiler.fold import Branch, ConvGeometry
from xvol_compiler.lowering import (
    SpatialLayout,
    check_lowering,
    interleave_factor,
    spatial_axis,
    spatial_layout,
    spatial_weight,
    split_geometries,
    split_weights,
    stack_layout,
    stack_weight,
)
from xvol_compiler.pssa import (  # by name: fx.wrap below
    interleave_groups,
    interleave_spatial,
    pssa_transform,
    stack_depth,
)

__all__ = ["XVolutionDeploy", "lowered_convs", "merged_branch", "pad_input", "run_lowering"]

# Each is one call_function node in an FX trace of a deploy module, so passes can recognise it.
torch.fx.wrap("pssa_transform")
torch.fx.wrap("interleave_groups")
torch.fx.wrap("interleave_spatial")
torch.fx.wrap("stack_depth")


def merged_branch(geometry: ConvGeometry, factor: int, weight: Tensor, bias: Tensor | None) -> Branch:
    """The channel-interleaved site conv as a two-input branch ``[x, T(x)]``."""
    c = geometry.in_channels
    merged = ConvGeometry(factor * c, geometry.out_channels, geometry.kernel_size, geometry.stride,
                          geometry.padding, geometry.dilation, geometry.groups, geometry.padding_mode)
    return Branch(("x", "T(x)"), (c, (factor - 1) * c), merged, weight, bias)


def lowered_convs(branch: Branch, lowering: str, *, single_conv: bool = True,
                  device: torch.device | None = None, dtype: torch.dtype | None = None,
                  ) -> tuple[list[_ConvNd], SpatialLayout | None]:
    """The conv modules of ``lowering`` for a merged two-or-more-input site branch, weights set.

    "channel", "spatial", "spatial-h" and "stack": one conv (its bias the site's; for "stack" of one
    dimension more than the site); "split": one conv per input, the bias on the first. For the spatial
    lowerings and "stack" the layout says how to pad the inputs first (``layout.pre_pads``). FoldError
    when the lowering is not exact or not allowed.
    """
    check_lowering(branch, lowering, single_conv=single_conv)
    g = branch.geometry
    dtype = dtype or branch.weight.dtype
    device = device or branch.weight.device

    def conv(geometry: ConvGeometry, weight: Tensor, bias: Tensor | None) -> _ConvNd:
        # Typed as a callable: the per-dimension classes declare per-dimension tuple types, a geometry holds tuples.
        conv_type: Callable[..., _ConvNd] = CONV_TYPES[geometry.ndim]
        module = conv_type(
            geometry.in_channels, geometry.out_channels, geometry.kernel_size, geometry.stride, geometry.padding,
            geometry.dilation, geometry.groups, bias=bias is not None, padding_mode=geometry.padding_mode,
            device=device, dtype=dtype,
        )
        with torch.no_grad():
            module.weight.copy_(weight)
            if bias is not None and module.bias is not None:
                module.bias.copy_(bias)
        return module.eval()

    bias = branch.bias if branch.bias is not None else torch.zeros(g.out_channels, dtype=branch.weight.dtype)
    if lowering == "channel":
        return [conv(g, branch.weight, bias)], None
    if lowering == "stack":
        layout = stack_layout(g, interleave_factor(branch), asymmetric_pads=False)
        return [conv(layout.geometry, stack_weight(branch.weight, layout.factor), bias)], layout
    axis = spatial_axis(lowering)
    if axis is not None:
        factor = interleave_factor(branch)
        layout = spatial_layout(g, factor, asymmetric_pads=False, axis=axis)
        return [conv(layout.geometry, spatial_weight(branch.weight, g.groups, factor, axis), bias)], layout
    geometries = split_geometries(branch)
    weights = split_weights(Branch(branch.inputs, branch.channels, g, branch.weight, bias))
    return [conv(geo, w, b) for geo, (w, b) in zip(geometries, weights, strict=True)], None


def pad_input(x: Tensor, pads: Sequence[tuple[int, int]], mode: str) -> Tensor:
    """``x`` padded by per-axis (left, right) amounts in a torch padding mode ('zeros' pads zeros)."""
    flat: list[int] = []
    for left, right in reversed(list(pads)):
        flat += [left, right]
    return F.pad(x, flat, mode="constant" if mode == "zeros" else mode)


def run_lowering(lowering: str, convs: Sequence[nn.Module], layout: SpatialLayout | None,
                 inputs: Sequence[Tensor]) -> Tensor:
    """Evaluate a lowered site on its inputs ``[x, T(x)]`` (eager; the graph passes emit the same ops)."""
    if lowering == "channel":
        return convs[0](interleave_groups(list(inputs), cast(_ConvNd, convs[0]).groups))
    if layout is not None and layout.pre_pads is not None:
        inputs = [pad_input(t, layout.pre_pads, layout.pre_mode) for t in inputs]
    if lowering == "stack":
        return convs[0](stack_depth(list(inputs))).squeeze(2)
    axis = spatial_axis(lowering)
    if axis is not None:
        return convs[0](interleave_spatial(list(inputs), axis))
    out = convs[0](inputs[0])
    for conv, t in zip(convs[1:], inputs[1:], strict=True):
        out = out + conv(t)
    return out


class XVolutionDeploy(nn.Module):
    """Deploy form of a site over ``[x, T(x)]`` in one of the lowerings of ``xvol_compiler.lowering``.

    ``"channel"``: ``ConvNd((1+k)*C_in, C_out, K, s, p, d, groups=g)(interleave_groups(x, T(x)))``, ``k``
    1 (or |D| for the directional variant); ``"spatial"``: ``ConvNd(C_in, C_out, (..., (1+k) K_w),
    (..., (1+k) s_w), ...)(interleave_spatial(x, T(x)))``; ``"spatial-h"``: the same along H,
    ``ConvNd(C_in, C_out, (..., (1+k) K_h, K_w), (..., (1+k) s_h, s_w), ...)(interleave_spatial(x, T(x),
    -2))``; ``"stack"``: ``Conv(N+1)d(C_in, C_out, (1+k, *K), (1, *s), (0, *p), (1, *d),
    groups=g)(stack_depth(x, T(x))).squeeze(2)``; ``"split"`` (``single_conv=False``):
    ``conv(x) + conv_attn(T(x))``. The main conv's weight and bias keep the site's names
    (``weight``, ``bias``) so a checkpoint key still names the site. T(x)'s ring kernel is the
    non-persistent buffer ``pssa_ring`` (no checkpoint key), as in :class:`XVolution`.
    """

    def __init__(
        self,
        geometry: ConvGeometry,
        *,
        shift: int | Sequence[int] = 1,
        directions: pssa.Directions = None,
        directional: bool = False,
        lowering: str = "channel",
        single_conv: bool = True,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        g = self.site_geometry = geometry
        ndim = g.ndim
        self.shift = pssa.shift_tuple(shift, ndim)
        self.directions = len(pssa.neighbour_offsets(ndim, directions))
        self.directional = directional
        self.lowering = lowering
        self.single_conv = single_conv
        self.factor = 1 + (self.directions if directional else 1)
        pssa.pssa_ring_buffer(self, g.in_channels, ndim, self.shift, self.directions, directional, device, dtype)
        w = torch.zeros(g.out_channels, self.factor * g.in_channels // g.groups, *g.kernel_size,
                        device=device, dtype=dtype)
        self._build(w, torch.zeros(g.out_channels, device=device, dtype=dtype))

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        pssa.match_t_scale(self, state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        pssa.refill_ring(self)  # a meta-built model after to_empty(): the checkpoint does not hold the ring

    def _build(self, weight: Tensor, bias: Tensor) -> None:
        branch = merged_branch(self.site_geometry, self.factor, weight, bias)
        convs, self.layout = lowered_convs(branch, self.lowering, single_conv=self.single_conv)
        self.conv = convs[0]
        if len(convs) > 1:
            self.conv_attn = convs[1]

    @torch.no_grad()
    def load_merged(self, weight: Tensor, bias: Tensor) -> None:
        """Set the lowering's weights from the channel-interleaved merged (weight, bias)."""
        self._build(weight, bias)

    @property
    def weight(self) -> Tensor:
        return self.conv.weight

    @property
    def bias(self) -> Tensor | None:
        return self.conv.bias

    def extra_repr(self) -> str:
        return f"lowering={self.lowering!r}"

    def forward(self, x: Tensor) -> Tensor:
        t = pssa_transform(x, self.shift, self.directions, self.directional, kernel=pssa.site_ring(self))
        convs = [self.conv] + ([self.conv_attn] if self.lowering == "split" else [])
        return run_lowering(self.lowering, convs, self.layout, [x, t])
