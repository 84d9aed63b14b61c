"""The PSSA transform T_L(x) = x * R_L(x) (docs/operator.md), its constant ring kernel and the
helpers that interleave ``[x, T(x)]`` for the deploy convolution.

Pure tensor math for 1-D, 2-D and 3-D inputs (the number of spatial dimensions is read from the
input, never hard-coded). Imports no graph library: the rule engine reads kernels through it.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xvol_compiler.arguments import check_shift
from xvol_compiler.conv_modules import CONV_FUNCTIONS
from xvol_compiler.errors import InvalidArgumentError

__all__ = [
    "PSSA_RING",
    "Directions",
    "PssaKernelLayout",
    "interleave_groups",
    "interleave_spatial",
    "neighbour_offsets",
    "pssa_kernel",
    "pssa_kernel_layout",
    "pssa_ring_buffer",
    "pssa_transform",
    "refill_ring",
    "shift_tuple",
    "stack_depth",
    "site_ring",
]

Directions = int | Literal["axial", "full"] | None


def neighbour_offsets(ndim: int, directions: Directions = None) -> tuple[tuple[int, ...], ...]:
    """Unit offsets of the neighbourhood: axial (2*ndim) or full (3**ndim - 1).

    ``directions`` is a count (2 in 1-D; 4 or 8 in 2-D; 6 or 26 in 3-D), the
    word ``"axial"`` or ``"full"``, or None for the full neighbourhood.
    """
    if ndim not in (1, 2, 3):
        raise InvalidArgumentError(f"PSSA supports 1, 2 or 3 spatial dimensions, got {ndim}")
    full, axial = 3**ndim - 1, 2 * ndim
    if directions is None or directions == "full" or directions == full:
        return tuple(o for o in itertools.product((-1, 0, 1), repeat=ndim) if any(o))
    if directions == "axial" or directions == axial:
        return tuple(
            tuple(sign if i == axis else 0 for i in range(ndim)) for axis in range(ndim) for sign in (-1, 1)
        )
    raise InvalidArgumentError(
        f"directions={directions!r} is not a neighbourhood in {ndim}-D: use {axial} (axial) or {full} (full)"
    )


def shift_tuple(shift: int | Sequence[int], ndim: int) -> tuple[int, ...]:
    """The per-axis shift L of a site: one int for every axis, or one per axis; each >= 1."""
    check_shift(shift)
    shifts = (shift,) * ndim if isinstance(shift, int) else tuple(shift)
    if len(shifts) != ndim or any(not isinstance(s, int) or s < 1 for s in shifts):
        raise InvalidArgumentError(f"shift must be an int >= 1 or {ndim} such ints, got {shift!r}")
    return shifts


def _shifted_views(x: Tensor, shifts: tuple[int, ...], offsets: Sequence[tuple[int, ...]]) -> list[Tensor]:
    """x moved by offset*shift along each axis, zeros outside: one pad, then slices."""
    spatial = x.shape[2:]
    pad: list[int] = []
    for s in reversed(shifts):
        pad += [s, s]
    xp = F.pad(x, pad)
    views = []
    for off in offsets:
        index = [slice(None), slice(None)]
        for o, s, n in zip(off, shifts, spatial, strict=True):
            start = s + o * s
            index.append(slice(start, start + n))
        views.append(xp[tuple(index)])
    return views


def _neighbour_mean(x: Tensor, shifts: tuple[int, ...], full: bool) -> Tensor:
    """R_L(x) of a 3-D input with a shift > 1: separable dilated box sums (full) or shifted views
    (axial). A dilated ``conv3d`` is several times slower on CPU than these few adds."""
    ndim = x.dim() - 2
    if full:
        # Separable dilated box sum: two adds per axis instead of 3^n - 1 adds.
        box = x
        for axis, s in enumerate(shifts):
            pad = [0, 0] * ndim
            pad[2 * (ndim - 1 - axis)] = s
            pad[2 * (ndim - 1 - axis) + 1] = s
            bp = F.pad(box, pad)
            n = box.shape[2 + axis]
            box = bp.narrow(2 + axis, 0, n) + bp.narrow(2 + axis, s, n) + bp.narrow(2 + axis, 2 * s, n)
        return (box - x) / float(3**ndim - 1)
    views = _shifted_views(x, shifts, neighbour_offsets(ndim, "axial"))
    total = views[0]
    for v in views[1:]:
        total = total + v
    return total / float(len(views))


# Kernels built so far, per (ndim, offsets, directional, channels, dtype, device): a few hundred
# bytes each; building one per call costs about a tenth of the convolution at 480x14x14.
_KERNELS: dict[tuple[object, ...], Tensor] = {}


def pssa_kernel(
    ndim: int,
    directions: Directions = None,
    directional: bool = False,
    channels: int = 1,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """The constant depthwise kernel of the PSSA transform, shape (channels * k, 1, 3, ..., 3).

    Every channel gets the same pattern. Plain (k = 1): the "ring", ``1/|D|`` at
    the taps of the neighbourhood's offsets, 0 elsewhere (the centre included), so
    ``conv(x, ring, padding=L, dilation=L, groups=C)`` is R_L(x). Directional
    (k = |D|): one one-hot filter per offset, in ``neighbour_offsets`` order, so
    output channel ``c * |D| + d`` is x's channel c moved by offset d times L.
    A tap at index ``o + 1`` reads ``x[i + o * L]``.
    """
    offsets = neighbour_offsets(ndim, directions)
    dtype = torch.get_default_dtype() if dtype is None else dtype
    device = torch.device("cpu") if device is None else torch.device(device)
    if channels < 1:
        raise InvalidArgumentError(f"channels must be >= 1, got {channels}")
    if torch.compiler.is_compiling():
        # torch.compile / torch.export trace this call: a literal tensor, which they keep as one constant.
        return torch.tensor(_kernel_values(ndim, offsets, directional, channels), dtype=dtype, device=device)
    return _cached_kernel(ndim, offsets, directional, channels, dtype, device)


def _kernel_values(
    ndim: int, offsets: tuple[tuple[int, ...], ...], directional: bool, channels: int
) -> list[object]:
    """The kernel as nested lists of Python floats: tap ``o + 1`` of filter d holds offset d's weight."""
    if directional:
        filters = [{tuple(o + 1 for o in off): 1.0} for off in offsets]
    else:
        filters = [{tuple(o + 1 for o in off): 1.0 / len(offsets) for off in offsets}]

    def nest(taps: dict[tuple[int, ...], float], prefix: tuple[int, ...]) -> object:
        if len(prefix) == ndim:
            return taps.get(prefix, 0.0)
        return [nest(taps, (*prefix, i)) for i in range(3)]

    kernel: list[object] = [[nest(taps, ())] for taps in filters]
    return kernel * channels


def _cached_kernel(
    ndim: int, offsets: tuple[tuple[int, ...], ...], directional: bool, channels: int, dtype: torch.dtype,
    device: torch.device,
) -> Tensor:
    key = (ndim, offsets, directional, channels, dtype, device)
    kernel = _KERNELS.get(key)
    if kernel is None:
        with _untraced():
            kernel = _build_kernel(ndim, offsets, directional, channels, dtype, device)
        _KERNELS[key] = kernel
    return kernel


@contextlib.contextmanager
def _untraced() -> Iterator[None]:
    """Build a constant outside any running trace (``torch.jit.trace``, ``make_fx``), so the trace
    records it as one constant instead of the ops that built it."""
    from torch.utils._python_dispatch import _disable_current_modes

    # torch._C's stubs declare the getter only; the setter exists at run time.
    set_tracing_state = torch._C._set_tracing_state  # type: ignore[attr-defined]
    state = torch._C._get_tracing_state()
    if state is not None:
        set_tracing_state(None)
    try:
        with _disable_current_modes():
            yield
    finally:
        if state is not None:
            set_tracing_state(state)


def _build_kernel(
    ndim: int, offsets: tuple[tuple[int, ...], ...], directional: bool, channels: int, dtype: torch.dtype,
    device: torch.device,
) -> Tensor:
    # A plain tensor even when first asked for under inference_mode: training reuses it.
    with torch.inference_mode(False) if torch.is_inference_mode_enabled() else contextlib.nullcontext():
        return torch.tensor(_kernel_values(ndim, offsets, directional, channels), dtype=dtype, device=device)


@dataclass(frozen=True)
class PssaKernelLayout:
    """What a constant depthwise kernel computes when it is a ``pssa_kernel`` pattern (up to one scale)."""

    ndim: int
    directions: int  # |D|: 2*ndim (axial) or 3**ndim - 1 (full)
    directional: bool
    scale: float  # the value at every tap (1/|D| for a plain pssa_kernel, 1 for a directional one)


def pssa_kernel_layout(weight: Tensor, groups: int) -> PssaKernelLayout | None:
    """The neighbourhood of a depthwise kernel (``groups`` = input channels, weight
    (groups * k, 1, 3, ..., 3)) when every channel holds the same ``pssa_kernel`` pattern
    (ring for k = 1, one-hot per direction for k = |D|) with one common nonzero value, else None."""
    ndim = weight.dim() - 2
    if ndim not in (1, 2, 3) or groups < 1 or weight.shape[1] != 1 or tuple(weight.shape[2:]) != (3,) * ndim:
        return None
    if weight.shape[0] % groups or not bool(torch.isfinite(weight).all()):
        return None
    k = weight.shape[0] // groups
    for directions in dict.fromkeys(len(neighbour_offsets(ndim, n)) for n in ("axial", "full")):
        for directional in (False, True):
            if k != (directions if directional else 1):
                continue
            mask = pssa_kernel(ndim, directions, directional, groups, torch.float64) != 0
            taps = weight[mask]
            scale = taps.flatten()[0]
            if bool((weight[~mask] == 0).all()) and bool((taps == scale).all()) and float(scale) != 0.0:
                return PssaKernelLayout(ndim, directions, directional, float(scale))
    return None


def _fast_form(ndim: int, shifts: tuple[int, ...], directional: bool) -> bool:
    """Whether the constant-kernel depthwise conv is the faster exact form on this case.

    Measured on CPU (one thread, float32, rough): the ring conv + one multiply is 4-13x
    faster than the pooling formula for the full neighbourhood at shift 1 (1-D, 2-D, 3-D),
    1.2-1.4x faster than the shifted-view sums of the axial set, and 1.0-9x faster than the
    separable sums for shifts > 1 in 1-D and 2-D; a dilated depthwise ``conv3d`` is about 7x
    slower than the separable box sum, and the one-hot channel-multiplier conv of the
    directional variant 3-8x slower than the shifted views it would replace (no depthwise
    fast path with a channel multiplier).
    """
    return not directional and (ndim < 3 or all(s == 1 for s in shifts))


def pssa_transform(
    x: Tensor, shift: int | Sequence[int] = 1, directions: Directions = None, directional: bool = False,
    *, kernel: Tensor | None = None,
) -> Tensor:
    """Pixel-shift self-attention features T_L(x).

    ``T_L(x) = x * R_L(x)`` where ``R_L`` is the mean of the neighbours at
    distance ``shift`` (per axis) in the chosen neighbourhood, zero outside the
    input. With ``directional=True`` one product per direction is kept,
    channel-major (channel ``c * |D| + d``), so that channel groups of ``x``
    stay contiguous groups of the output and grouped convs stay grouped.
    Works for (N, C, L), (N, C, H, W) and (N, C, D, H, W) inputs.

    ``R_L`` is one depthwise convolution with the constant ``pssa_kernel``
    (dilation = padding = L) where that is the faster form (see ``_fast_form``).

    ``kernel``: that constant, held by the caller (a site's ``pssa_ring`` buffer, so that
    exported programs read it as a buffer, see :func:`pssa_ring_buffer`); it must be
    ``pssa_kernel(ndim, directions, False, C)`` (only its shape is checked) and is unused
    where the transform is not computed as a conv. None: the function builds (and caches) it.
    """
    ndim = x.dim() - 2
    offsets = neighbour_offsets(ndim, directions)
    shifts = shift_tuple(shift, ndim)
    if directional:
        views = _shifted_views(x, shifts, offsets)
        prods = torch.stack([x * v for v in views], dim=2)
        return prods.flatten(1, 2)
    if _fast_form(ndim, shifts, directional):
        channels = x.shape[1]
        if kernel is None:
            ring = pssa_kernel(ndim, len(offsets), False, channels, x.dtype, x.device)
        else:
            ring = _given_kernel(kernel, ndim, channels, x)
        return x * CONV_FUNCTIONS[ndim](x, ring, None, 1, shifts, shifts, channels)
    return x * _neighbour_mean(x, shifts, len(offsets) == 3**ndim - 1)


def _given_kernel(kernel: Tensor, ndim: int, channels: int, x: Tensor) -> Tensor:
    """A caller's ring kernel for ``x``: its shape checked, cast to ``x``'s dtype and device when they differ."""
    expected = (channels, 1, *(3,) * ndim)
    if tuple(kernel.shape) != expected:
        raise InvalidArgumentError(
            f"pssa_transform: kernel of shape {tuple(kernel.shape)} for an input of {channels} channels in "
            f"{ndim}-D; the ring kernel has shape {expected} (pssa_kernel(ndim, directions, False, channels))"
        )
    if kernel.dtype != x.dtype or kernel.device != x.device:
        kernel = kernel.to(device=x.device, dtype=x.dtype)
    return kernel


PSSA_RING = "pssa_ring"
# Persistent per-channel buffer of a deploy module rescaled for INT8 (xvol_compiler.int8), registered only then.
T_SCALE = "t_scale"


def pssa_ring_buffer(
    module: nn.Module, channels: int, ndim: int, shift: int | Sequence[int], directions: Directions,
    directional: bool, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
) -> None:
    """Register the PSSA ring kernel as ``module.pssa_ring``, a non-persistent buffer, where the
    transform computes it as a conv (``_fast_form``); elsewhere register nothing.

    Non-persistent: state_dict keys stay as they were (checkpoints load strictly either way);
    ``.to(device/dtype)`` moves it; ``torch.export`` lists it as a buffer input of the program
    instead of a tensor built inside forward, so delegates (ExecuTorch's XNNPACK) see a
    constant-weight conv.
    """
    shifts = shift_tuple(shift, ndim)
    if directional or not _fast_form(ndim, shifts, directional):
        return
    offsets = neighbour_offsets(ndim, directions)
    dtype = torch.get_default_dtype() if dtype is None else dtype
    device = torch.device("cpu") if device is None else torch.device(device)
    if not dtype.is_floating_point:
        return  # (an integer site cannot run the transform anyway; pssa_transform builds what it needs)
    with _untraced():
        kernel = _build_kernel(ndim, offsets, False, channels, dtype, device)
    module.register_buffer(PSSA_RING, kernel, persistent=False)


def refill_ring(module: nn.Module) -> None:
    """Rewrite ``module.pssa_ring``'s values in place (after ``to_empty()``, which leaves buffers
    uninitialised; a state_dict does not restore a non-persistent buffer). No buffer: nothing to do."""
    ring = site_ring(module)
    if ring is None or ring.device.type == "meta":
        return
    ndim = ring.dim() - 2
    directions = cast(int, module.directions)  # the site's or deploy module's neighbourhood size |D|
    values = pssa_kernel(ndim, directions, False, ring.shape[0], torch.float64)
    scale = module._buffers.get(T_SCALE)
    if scale is not None and scale.device.type != "meta":
        # The INT8 rescale's per-channel s (xvol_compiler.int8): the ring of channel c holds s_c / |D|.
        values = values * scale.detach().to(device=values.device, dtype=torch.float64).reshape(-1, *(1,) * (ndim + 1))
    with torch.no_grad():
        ring.copy_(values)


def match_t_scale(module: nn.Module, state_dict: dict[str, Any], prefix: str) -> None:
    """Before a state_dict load: an INT8-rescaled checkpoint holds ``t_scale`` (its weights are rescaled
    too), so the module gets the buffer to load it into; a plain checkpoint of the site drops it."""
    ring = site_ring(module)
    if prefix + T_SCALE in state_dict and T_SCALE not in module._buffers and ring is not None:
        module.register_buffer(T_SCALE, torch.ones(ring.shape[0], device=ring.device, dtype=ring.dtype))
    elif prefix + T_SCALE not in state_dict and prefix + "conv.weight" in state_dict:
        module._buffers.pop(T_SCALE, None)


def site_ring(module: nn.Module) -> Tensor | None:
    """The ``pssa_ring`` buffer of a site or deploy module, None when it holds none."""
    return module._buffers.get(PSSA_RING)


def interleave_groups(tensors: Sequence[Tensor], groups: int) -> Tensor:
    """Concatenate channels group by group: ``[t0_g0, t1_g0, ..., t0_g1, t1_g1, ...]``.

    For groups == 1 this is a plain channel concatenation.
    """
    if groups == 1:
        return torch.cat(list(tensors), dim=1)
    n, spatial = tensors[0].shape[0], tensors[0].shape[2:]
    parts = [t.reshape(n, groups, t.shape[1] // groups, *spatial) for t in tensors]
    return torch.cat(parts, dim=2).reshape(n, -1, *spatial)


def stack_depth(tensors: Sequence[Tensor]) -> Tensor:
    """Stack on a new axis right after the channels: ``x_c`` then the ``k_i`` channels of each other tensor
    that belong to channel ``c`` (channels ``c*k_i ... c*k_i + k_i - 1``).

    ``(N, C, *S)`` and ``(N, k_i C, *S)`` -> ``(N, C, 1 + sum k_i, *S)``; with one tensor of ``C`` channels
    this is ``stack([x, t], 2)``.
    """
    c = tensors[0].shape[1]
    return torch.cat([t.reshape(t.shape[0], c, t.shape[1] // c, *t.shape[2:]) for t in tensors], dim=2)


def interleave_spatial(tensors: Sequence[Tensor], axis: int = -1) -> Tensor:
    """Interleave along spatial axis ``axis`` (negative: -1 the last, W; -2 the one before, H): ``x_c`` then
    the ``k_i`` channels of each other tensor that belong to channel ``c`` (channels ``c*k_i ... c*k_i + k_i
    - 1``), position by position.

    ``(N, C, ..., W)`` and ``(N, k_i C, ..., W)`` -> ``(N, C, ..., (1 + sum k_i) W)`` for ``axis=-1``
    (``(N, C, ..., (1 + sum k_i) H, W)`` for ``axis=-2``); with one tensor of ``C`` channels and
    ``axis=-1`` this is ``stack([x, t], -1).flatten(-2)``.
    """
    if not -(tensors[0].dim() - 2) <= axis < 0:
        raise InvalidArgumentError(f"axis={axis} is not a spatial axis of a {tensors[0].dim()}-D tensor")
    c = tensors[0].shape[1]
    parts = [t.reshape(t.shape[0], c, t.shape[1] // c, *t.shape[2:]).movedim(2, axis) for t in tensors]
    return torch.cat(parts, dim=axis).flatten(axis - 1, axis)
