"""INT8 deploy form of a fused site: an exact rescale of its T(x) half.

A fused site convolves the interleave of ``x`` and ``T(x) = x * R(x)`` (``R``: the depthwise ring
conv of :func:`xvol_compiler.ops.pssa_transform`). With one per-tensor activation scale for that
interleave, ``x`` and ``T(x)`` share a step, and ``T(x)`` grows with the square of the activation
scale: ``x`` keeps few levels. The rescale interleaves ``x`` and ``s * T(x)`` instead and folds
``1/s`` into the weight columns that read ``T(x)``; per channel, ``s_c * T_c(x) = x_c * R'_c(x)``
with the ring kernel of channel ``c`` multiplied by ``s_c``, so no op is added and the form stays
one convolution. ``s`` comes from calibration data, by one of two methods:

- ``"noise"`` (the default): one ``s`` per site, the one that minimizes a model of the quantization noise at
  the conv's output (:func:`quantization_noise`): the activation step ``max(max|x|, s max|T|) / 127`` acts
  on every weight, ``x``'s columns as they are and ``T``'s divided by ``s``; the weight step (per tensor
  or per output channel, as the quantizer will use) grows when ``1/s`` makes ``T``'s columns the largest
  and acts on the activations' power. Equal ranges are not always best: under per-tensor weights,
  dividing ``T``'s columns by a small ``s`` coarsens every weight of the conv.
- ``"ranges"``: ``s_c = max|x_c| / max|T_c(x)|`` (``per_channel=True``) or ``max|x| / max|T(x)|`` (one per
  site), so both halves span the same range. One ``s`` per channel leaves each channel's own ratio in the
  weights, which then span a far wider range: measured harmful (``benchmarks/bench_int8.py``).

The math is in small pure functions on tensors (:func:`t_scale_from_ranges`, :func:`quantization_noise`,
:func:`t_scale_min_noise`, :func:`scale_ring`, :func:`t_column_divisor`, :func:`rescale_t_columns`);
:func:`calibrate_t_scales` and :func:`apply_t_scales` apply it to the ``XVolutionDeploy`` modules of a
fused model (module form). The rescaled form lives in a persistent ``t_scale`` buffer of each deploy module (the ring is
rebuilt from it on ``load_state_dict``), so it survives a checkpoint. The ONNX counterpart is
:mod:`xvol_passes.onnx_rescale`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, cast

import torch
from torch import Tensor, nn

from xvol_compiler.deploy import XVolutionDeploy
from xvol_compiler.errors import XvolError
from xvol_compiler.lowering import LOWERINGS, tap_axis
from xvol_compiler.pssa import T_SCALE, pssa_transform, refill_ring, site_ring

__all__ = [
    "METHODS",
    "WEIGHT_GRANULARITIES",
    "Method",
    "RescaleError",
    "SiteStats",
    "TReader",
    "WeightGranularity",
    "apply_t_scales",
    "calibrate_t_scales",
    "calibrate_site_stats",
    "channel_absmax",
    "deploy_sites",
    "quantization_noise",
    "rescale_deploy",
    "rescale_fused_model",
    "rescale_t_columns",
    "rescale_t_taps",
    "scale_ring",
    "t_column_divisor",
    "t_readers",
    "t_scale_from_ranges",
    "t_scale_min_noise",
    "choose_t_scale",
]

Method = Literal["noise", "ranges"]
METHODS: tuple[Method, ...] = ("noise", "ranges")
WeightGranularity = Literal["per-tensor", "per-channel"]
WEIGHT_GRANULARITIES: tuple[WeightGranularity, ...] = ("per-tensor", "per-channel")
INT8_LEVELS = 127  # symmetric int8: steps from 0 to the range's end


class RescaleError(XvolError, ValueError):
    """The INT8 rescale cannot be applied as asked; the message says why and what to do instead."""


# ----------------------------------------------------------------------------- pure math


def channel_absmax(t: Tensor) -> Tensor:
    """max |t| per channel (axis 1) over batch and spatial axes, in float64."""
    return t.detach().abs().transpose(0, 1).reshape(t.shape[1], -1).amax(dim=1).to(torch.float64)


def t_scale_from_ranges(x_absmax: Tensor, t_absmax: Tensor, *, per_channel: bool = False) -> Tensor:
    """The factor s of ``s * T(x)``: ``max|x_c| / max|T_c|`` per channel, or ``max|x| / max|T|`` for the
    whole site (``per_channel=False``; s then has one value repeated per channel).

    A channel whose T or x is all zero keeps s = 1 (nothing to balance). Ranges of equal length: the ring
    form of T(x) has one channel per channel of x.
    """
    x_absmax, t_absmax = x_absmax.to(torch.float64), t_absmax.to(torch.float64)
    if x_absmax.shape != t_absmax.shape or x_absmax.dim() != 1:
        raise RescaleError(f"x and T(x) ranges of shapes {tuple(x_absmax.shape)} and {tuple(t_absmax.shape)}: "
                           "pass one max|.| per channel for each (channel_absmax)")
    if not (torch.isfinite(x_absmax).all() and torch.isfinite(t_absmax).all()):
        raise RescaleError("non-finite activation ranges: calibrate on finite inputs")
    if not per_channel:
        x_absmax = x_absmax.amax().expand_as(x_absmax)
        t_absmax = t_absmax.amax().expand_as(t_absmax)
    usable = (x_absmax > 0) & (t_absmax > 0)
    return torch.where(usable, x_absmax / torch.where(usable, t_absmax, 1.0), 1.0)


@dataclass(frozen=True)
class SiteStats:
    """What calibration saw at one site: max |.| per channel of x and of T(x), and their mean squares."""

    x_absmax: Tensor  # (C,)
    t_absmax: Tensor  # (C,)
    x_power: float  # mean of x^2 over every element
    t_power: float  # mean of T(x)^2


@dataclass(frozen=True)
class TReader:
    """A conv weight that reads the interleave of x and T(x), and where it reads T: ``reads_t`` has the
    weight's shape and is True on the entries multiplied by a channel of T(x)."""

    weight: Tensor
    reads_t: Tensor


def _step(absmax: Tensor) -> Tensor:
    return absmax / INT8_LEVELS


def quantization_noise(s: Tensor, stats: SiteStats, readers: Sequence[TReader],
                       weights: WeightGranularity) -> Tensor:
    """Modelled output noise power (up to a common factor) of the convs ``readers`` over ``[x, s T]`` with one
    per-tensor activation scale and int8 weights, for each candidate ``s`` (1-D).

    Uniform rounding noise has power step^2 / 12 (the 1/12 is common, dropped). The activation step
    ``max(max|x|, s max|T|) / 127`` reaches the output through every weight: ``|W_x|^2 + |W_T|^2 / s^2``. The
    weight step of each output channel (``per-channel``) or of the whole weight (``per-tensor``),
    ``max(max|W_x|, max|W_T| / s) / 127``, reaches it through the inputs' power: entries reading x times
    ``E[x^2]``, entries reading T times ``s^2 E[T^2]``."""
    s = s.to(torch.float64).reshape(-1, 1)  # (S, 1)
    x_max, t_max = float(stats.x_absmax.max()), float(stats.t_absmax.max())
    act_step = _step(torch.clamp(s * t_max, min=x_max))  # (S, 1)
    total = torch.zeros(s.shape[0], dtype=torch.float64)
    for reader in readers:
        w = reader.weight.detach().to(torch.float64).reshape(reader.weight.shape[0], -1)  # (O, columns * taps)
        on_t = reader.reads_t.reshape(w.shape)
        w_x, w_t = torch.where(on_t, 0.0, w), torch.where(on_t, w, 0.0)
        total += (act_step.squeeze(1) ** 2) * (w_x.square().sum() + w_t.square().sum() / s.squeeze(1) ** 2)
        x_peak, t_peak = w_x.abs().amax(dim=1), w_t.abs().amax(dim=1)  # (O,)
        if weights == "per-tensor":
            x_peak, t_peak = x_peak.amax().expand_as(x_peak), t_peak.amax().expand_as(t_peak)
        w_step = _step(torch.maximum(x_peak, t_peak / s))  # (S, O)
        reach = (~on_t).sum(dim=1) * stats.x_power + on_t.sum(dim=1) * stats.t_power * s ** 2  # (S, O)
        total += (w_step ** 2 * reach).sum(dim=1)
    return total


def t_scale_min_noise(stats: SiteStats, readers: Sequence[TReader], weights: WeightGranularity,
                      candidates: int = 241) -> Tensor:
    """One s for the site (repeated per channel): the minimum of :func:`quantization_noise` over
    ``candidates`` log-spaced values spanning 10^-3 to 10^3 times the range ratio ``max|x| / max|T|``, plus
    that ratio and 1 themselves, so the result is never worse in the model than either. Deterministic."""
    if weights not in WEIGHT_GRANULARITIES:
        raise RescaleError(f"weights={weights!r}: use one of {', '.join(WEIGHT_GRANULARITIES)} (the quantizer's "
                           "weight granularity)")
    ratio = float(t_scale_from_ranges(stats.x_absmax, stats.t_absmax)[0])
    grid = torch.cat([ratio * torch.logspace(-3, 3, candidates, dtype=torch.float64),
                      torch.tensor([ratio, 1.0], dtype=torch.float64)])
    noise = quantization_noise(grid, stats, readers, weights)
    best = grid[int(torch.argmin(noise))]  # argmin takes the first of equal values: deterministic
    return best.expand(stats.x_absmax.numel()).clone()


def choose_t_scale(stats: SiteStats, readers: Sequence[TReader], *, method: Method = "noise",
                   weights: WeightGranularity = "per-channel", per_channel: bool = False) -> Tensor:
    """s for one site by ``method`` (see the module docstring); ``per_channel`` only with ``"ranges"``.
    ``"noise"`` with no reader of x and T together (a split or unfused site: T(x) has a conv and a scale
    of its own, and s changes nothing after quantization): s = 1."""
    if method not in METHODS:
        raise RescaleError(f"method={method!r}: use one of {', '.join(METHODS)}")
    if per_channel and method != "ranges":
        raise RescaleError("one s per channel is a 'ranges' choice: pass method='ranges' with per_channel=True, "
                           "or per_channel=False")
    if method == "ranges":
        return t_scale_from_ranges(stats.x_absmax, stats.t_absmax, per_channel=per_channel)
    shared = [r for r in readers if bool(r.reads_t.any()) and not bool(r.reads_t.all())]
    if not shared:
        return torch.ones(stats.x_absmax.numel(), dtype=torch.float64)
    return t_scale_min_noise(stats, shared, weights)


def _check_scale(s: Tensor, channels: int) -> Tensor:
    if s.dim() != 1 or s.numel() != channels:
        raise RescaleError(f"t_scale has shape {tuple(s.shape)}; the site needs one value per T(x) channel "
                           f"({channels})")
    if not (torch.isfinite(s).all() and (s > 0).all()):
        raise RescaleError("t_scale values must be finite and > 0 (t_scale_from_ranges keeps s = 1 for "
                           "empty channels)")
    return s


def scale_ring(ring: Tensor, s: Tensor) -> Tensor:
    """The depthwise ring kernel (C, 1, 3, ..., 3) with channel c's filter multiplied by ``s[c]``:
    ``conv(x, scale_ring(ring, s))`` is ``s * R(x)``, so ``x * that`` is ``s * T(x)``."""
    s = _check_scale(s, ring.shape[0])
    return ring * s.to(ring.dtype).reshape(-1, *(1,) * (ring.dim() - 1))


def t_column_divisor(s: Tensor, out_channels: int, groups: int, x_channels: int) -> Tensor:
    """Per (output channel, input column) divisor of a grouped conv weight over the channel interleave
    ``interleave_groups([x, T], groups)`` (``x_channels`` = 0: a conv over T alone): 1 on x's columns,
    ``s[c]`` on the column that reads T's channel c. Shape (out_channels, columns per group)."""
    t_channels = s.numel()
    if out_channels % groups or t_channels % groups or x_channels % groups:
        raise RescaleError(f"groups={groups} does not divide the channels ({x_channels} of x, {t_channels} of "
                           f"T(x), {out_channels} out)")
    per_group = torch.cat([torch.ones(groups, x_channels // groups, dtype=s.dtype, device=s.device),
                           s.reshape(groups, t_channels // groups)], dim=1)
    return per_group.repeat_interleave(out_channels // groups, dim=0)


def rescale_t_columns(weight: Tensor, s: Tensor, groups: int, x_channels: int) -> Tensor:
    """``weight`` (O, columns per group, *K) of a conv over ``interleave_groups([x, T], groups)`` (or over
    T alone with ``x_channels=0``) with the columns reading T's channel c divided by ``s[c]``: the same
    conv over ``[x, s * T]``."""
    columns = (x_channels + s.numel()) // groups
    if weight.shape[1] != columns:
        raise RescaleError(f"conv weight of shape {tuple(weight.shape)} reads {weight.shape[1]} columns per "
                           f"group; [x, T] with groups={groups} has {columns}")
    divisor = t_column_divisor(s.to(torch.float64), weight.shape[0], groups, x_channels)
    scaled = weight.to(torch.float64) / divisor.reshape(*divisor.shape, *(1,) * (weight.dim() - 2))
    return scaled.to(weight.dtype)


def rescale_t_taps(weight: Tensor, s: Tensor, groups: int, t_slot: int = 1, factor: int = 2, axis: int = -1) -> Tensor:
    """``weight`` (O, C/g, *K) of a spatial lowering (``interleave_spatial([x, T], axis)``,
    ``lowering.spatial_weight``: ``K[axis]`` is ``factor`` times the site's, tap ``factor * t + j`` of that
    axis reads input ``j``) or of "stack" (``lowering.stack_weight``: the stacked axis has ``factor`` taps)
    with the taps that read T (``j = t_slot``) of channel c divided by ``s[c]``: the same conv over
    ``[x, s * T]``. ``axis``: ``lowering.tap_axis`` (-1 for "spatial", -2 for "spatial-h", the stacked
    axis for "stack")."""
    c_out, c = weight.shape[0], weight.shape[1]
    if (s.numel() != groups * c or c_out % groups or not -(weight.dim() - 2) <= axis < 0
            or weight.shape[axis] % factor):
        raise RescaleError(f"spatial-lowering weight of shape {tuple(weight.shape)} does not read {s.numel()} "
                           f"channels of T(x) in {groups} group(s) with {factor} inputs per tap of axis {axis}")
    per_column = s.to(torch.float64).reshape(groups, c).repeat_interleave(c_out // groups, dim=0)  # (O, C/g)
    mask_shape = [1] * weight.dim()
    mask_shape[axis] = weight.shape[axis]
    reads_t = ((torch.arange(weight.shape[axis], device=weight.device) % factor) == t_slot).reshape(mask_shape)
    columns = per_column.reshape(c_out, c, *(1,) * (weight.dim() - 2))
    divisor = torch.where(reads_t, columns, 1.0)  # (O, C/g, 1, ..., K[axis], ..., 1)
    return (weight.to(torch.float64) / divisor).to(weight.dtype)


# ----------------------------------------------------------------------------- deploy modules


def deploy_sites(model: nn.Module) -> dict[str, XVolutionDeploy]:
    """The fused sites of ``model`` (module form of ``fuse``), by module path."""
    return {name: m for name, m in model.named_modules() if isinstance(m, XVolutionDeploy)}


def _ring_of(name: str, module: XVolutionDeploy) -> Tensor:
    ring = site_ring(module)
    if ring is None:
        raise RescaleError(
            f"site {name!r} computes T(x) without a ring conv (directional, or 3-D with shift > 1): the rescale "
            "folds s into the ring kernel; keep this site unrescaled or fuse it with lowering='split'")
    if module.lowering not in LOWERINGS:
        raise RescaleError(f"site {name!r} uses the {module.lowering!r} lowering, which the rescale does not "
                           "know: fuse with lowering='channel'")
    return ring


def rescale_deploy(module: XVolutionDeploy, s: Tensor, name: str = "site") -> None:
    """Rescale one deploy module in place by ``s`` (one value per channel of x), on top of any earlier
    rescale: its ``t_scale`` buffer becomes ``t_scale * s``, the ring kernel follows, and the weight
    columns that read T(x) are divided by ``s``. Exact: the module computes the same function."""
    ring = _ring_of(name, module)
    s = _check_scale(s.detach().to(device=ring.device, dtype=torch.float64), ring.shape[0])
    old = module._buffers.get(T_SCALE)
    total = s if old is None else old.to(torch.float64) * s
    module.register_buffer(T_SCALE, total.to(ring.dtype))
    refill_ring(module)
    g = module.site_geometry
    weight = cast(Tensor, module.conv.weight if module.lowering != "split" else module.conv_attn.weight)
    with torch.no_grad():
        if module.lowering == "channel":
            weight.copy_(rescale_t_columns(weight, s, g.groups, g.in_channels))
        elif (axis := tap_axis(module.lowering, g.ndim)) is not None:
            weight.copy_(rescale_t_taps(weight, s, g.groups, axis=axis))
        else:  # split: conv_attn reads T(x) alone
            weight.copy_(rescale_t_columns(weight, s, g.groups, 0))


def _batches(batches: Iterable[Tensor | tuple[Tensor, ...]]) -> Iterable[tuple[Tensor, ...]]:
    for b in batches:
        yield b if isinstance(b, tuple) else (b,)


def t_readers(module: XVolutionDeploy) -> list[TReader]:
    """The conv weight of a deploy module that reads x and T(x) together, with where it reads T (none for
    the split lowering: its T(x) has a conv of its own)."""
    if module.lowering == "split":
        return []
    g = module.site_geometry
    weight = cast(Tensor, module.conv.weight).detach()
    twos = torch.full((g.in_channels,), 2.0, dtype=torch.float64)
    ones = torch.ones_like(weight, dtype=torch.float64)
    if module.lowering == "channel":
        marked = rescale_t_columns(ones, twos, g.groups, g.in_channels)
    else:
        marked = rescale_t_taps(ones, twos, g.groups, axis=tap_axis(module.lowering, g.ndim) or -1)
    return [TReader(weight, marked != 1)]


class _StatsRecorder:
    """Running max |.| per channel and sum of squares of x and T(x) at one site."""

    def __init__(self) -> None:
        self.x_absmax: Tensor | None = None
        self.t_absmax: Tensor | None = None
        self.sums = [0.0, 0.0]
        self.count = 0

    def add(self, x: Tensor, t: Tensor) -> None:
        xr, tr = channel_absmax(x), channel_absmax(t)
        self.x_absmax = xr if self.x_absmax is None else torch.maximum(self.x_absmax, xr)
        self.t_absmax = tr if self.t_absmax is None else torch.maximum(self.t_absmax, tr)
        self.sums[0] += float(x.detach().to(torch.float64).square().sum())
        self.sums[1] += float(t.detach().to(torch.float64).square().sum())
        self.count += x.numel()

    def stats(self) -> SiteStats:
        if self.x_absmax is None or self.t_absmax is None:
            raise RescaleError("no calibration batch reached the site")
        return SiteStats(self.x_absmax, self.t_absmax, self.sums[0] / self.count, self.sums[1] / self.count)


@torch.no_grad()
def calibrate_site_stats(model: nn.Module, batches: Iterable[Tensor | tuple[Tensor, ...]]) -> dict[str, SiteStats]:
    """What every fused site of ``model`` sees of x and T(x) (its current form) on ``batches`` (inputs of
    ``model``, one tensor or a tuple per batch). Sites without a ring conv raise :class:`RescaleError`."""
    sites = deploy_sites(model)
    if not sites:
        raise RescaleError("no XVolutionDeploy site in the model: rescale the module form of fuse "
                           "(fuse(model), graph=False), not a GraphModule or an unfused model")
    recorders: dict[str, _StatsRecorder] = {}

    def hook(name: str) -> Callable[[XVolutionDeploy, tuple[Tensor, ...]], None]:
        def record(module: XVolutionDeploy, args: tuple[Tensor, ...]) -> None:
            x = args[0]
            t = pssa_transform(x, module.shift, module.directions, module.directional, kernel=site_ring(module))
            recorders.setdefault(name, _StatsRecorder()).add(x, t)
        return record

    for name, module in sites.items():
        _ring_of(name, module)
    handles = [m.register_forward_pre_hook(hook(n)) for n, m in sites.items()]
    try:
        for args in _batches(batches):
            model(*args)
    finally:
        for h in handles:
            h.remove()
    missing = sorted(set(sites) - set(recorders))
    if missing:
        raise RescaleError(f"calibration never ran site(s) {', '.join(missing)}: pass at least one batch that "
                           "reaches every site")
    return {n: r.stats() for n, r in recorders.items()}


def calibrate_t_scales(model: nn.Module, batches: Iterable[Tensor | tuple[Tensor, ...]], *,
                       method: Method = "noise", weights: WeightGranularity = "per-channel",
                       per_channel: bool = False) -> dict[str, Tensor]:
    """s for every fused site of ``model`` from what it sees on ``batches`` (:func:`calibrate_site_stats`),
    chosen by ``method`` (:func:`choose_t_scale`; ``weights``: the quantizer's weight granularity)."""
    stats = calibrate_site_stats(model, batches)
    sites = deploy_sites(model)
    return {n: choose_t_scale(st, t_readers(sites[n]), method=method, weights=weights, per_channel=per_channel)
            for n, st in stats.items()}


def apply_t_scales(model: nn.Module, scales: Mapping[str, Tensor]) -> None:
    """Rescale the named deploy modules of ``model`` in place (see :func:`rescale_deploy`)."""
    sites = deploy_sites(model)
    unknown = sorted(set(scales) - set(sites))
    if unknown:
        raise RescaleError(f"no fused site named {', '.join(unknown)}; sites: {', '.join(sites) or 'none'}")
    for name, s in scales.items():
        rescale_deploy(sites[name], s, name)


def rescale_fused_model(model: nn.Module, batches: Iterable[Tensor | tuple[Tensor, ...]], *,
                        method: Method = "noise", weights: WeightGranularity = "per-channel",
                        per_channel: bool = False) -> dict[str, Tensor]:
    """Calibrate on ``batches`` and rescale every fused site of ``model`` in place; returns the s applied.
    ``weights``: the weight granularity the quantizer will use (``"per-channel"`` or ``"per-tensor"``)."""
    scales = calibrate_t_scales(model, batches, method=method, weights=weights, per_channel=per_channel)
    apply_t_scales(model, scales)
    return scales
