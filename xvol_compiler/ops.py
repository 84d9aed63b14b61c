"""The X-volution operator: the PSSA transform, the training module and its deploy form.

One implementation for 1-D, 2-D and 3-D convolutions: the number of spatial
dimensions is read from the site's kernel, never hard-coded.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from xvol_compiler.arguments import (
    check_bool,
    check_directions,
    check_extra_branches,
    check_initialized,
    check_shift,
)
from xvol_compiler.fold import (
    BatchNormParams,
    Branch,
    ConvGeometry,
    FoldError,
    bn_as_kernel,
    embedding_offset,
    fold_conv_bn,
    merge_branches,
)
from xvol_compiler.lowering import (
    SpatialLayout,
    check_lowering,
    interleave_factor,
    spatial_layout,
    spatial_weight,
    split_geometries,
    split_weights,
)
from xvol_compiler.report import with_article

__all__ = [
    "EXTRA_BRANCHES",
    "PssaKernelLayout",
    "XVolution",
    "XVolutionDeploy",
    "conv_forward_reason",
    "conv_geometry",
    "conv_module_weights",
    "interleave_groups",
    "interleave_spatial",
    "neighbour_offsets",
    "pssa_kernel",
    "pssa_kernel_layout",
    "pssa_ring_buffer",
    "pssa_transform",
    "site_ring",
]

CONV_TYPES: dict[int, type[nn.Module]] = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
BN_TYPES: dict[int, type[nn.Module]] = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
CONV_FNS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
EXTRA_BRANCHES = ("1x1", "identity", "bn")
Directions = int | Literal["axial", "full"] | None


def neighbour_offsets(ndim: int, directions: Directions = None) -> tuple[tuple[int, ...], ...]:
    """Unit offsets of the neighbourhood: axial (2*ndim) or full (3**ndim - 1).

    ``directions`` is a count (2 in 1-D; 4 or 8 in 2-D; 6 or 26 in 3-D), the
    word ``"axial"`` or ``"full"``, or None for the full neighbourhood.
    """
    if ndim not in (1, 2, 3):
        raise ValueError(f"PSSA supports 1, 2 or 3 spatial dimensions, got {ndim}")
    full, axial = 3**ndim - 1, 2 * ndim
    if directions is None or directions == "full" or directions == full:
        return tuple(o for o in itertools.product((-1, 0, 1), repeat=ndim) if any(o))
    if directions == "axial" or directions == axial:
        return tuple(
            tuple(sign if i == axis else 0 for i in range(ndim)) for axis in range(ndim) for sign in (-1, 1)
        )
    raise ValueError(
        f"directions={directions!r} is not a neighbourhood in {ndim}-D: use {axial} (axial) or {full} (full)"
    )


def _shifts(shift: int | Sequence[int], ndim: int) -> tuple[int, ...]:
    check_shift(shift)
    shifts = (shift,) * ndim if isinstance(shift, int) else tuple(shift)
    if len(shifts) != ndim or any(not isinstance(s, int) or s < 1 for s in shifts):
        raise ValueError(f"shift must be an int >= 1 or {ndim} such ints, got {shift!r}")
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
        raise ValueError(f"channels must be >= 1, got {channels}")
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

    return [[nest(taps, ())] for taps in filters] * channels


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

    state = torch._C._get_tracing_state()
    if state is not None:
        torch._C._set_tracing_state(None)
    try:
        with _disable_current_modes():
            yield
    finally:
        if state is not None:
            torch._C._set_tracing_state(state)


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
    shifts = _shifts(shift, ndim)
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
        return x * CONV_FNS[ndim](x, ring, None, 1, shifts, shifts, channels)
    return x * _neighbour_mean(x, shifts, len(offsets) == 3**ndim - 1)


def _given_kernel(kernel: Tensor, ndim: int, channels: int, x: Tensor) -> Tensor:
    """A caller's ring kernel for ``x``: its shape checked, cast to ``x``'s dtype and device when they differ."""
    expected = (channels, 1, *(3,) * ndim)
    if tuple(kernel.shape) != expected:
        raise ValueError(
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
    shifts = _shifts(shift, ndim)
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
    values = pssa_kernel(ndim, module.directions, False, ring.shape[0], torch.float64)
    scale = module._buffers.get(T_SCALE)
    if scale is not None and scale.device.type != "meta":
        # The INT8 rescale's per-channel s (xvol_compiler.int8): the ring of channel c holds s_c / |D|.
        values = values * scale.detach().to(device=values.device, dtype=torch.float64).reshape(-1, *(1,) * (ndim + 1))
    with torch.no_grad():
        ring.copy_(values)


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


def padded_conv(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: tuple[int, ...],
    padding: tuple[int, ...] | str,
    dilation: tuple[int, ...],
    groups: int,
    padding_mode: str,
) -> Tensor:
    """``F.conv{1,2,3}d`` with a torch padding mode ('zeros', 'reflect', 'replicate', 'circular')."""
    ndim = weight.dim() - 2
    if padding_mode == "zeros":
        return CONV_FNS[ndim](x, weight, bias, stride, padding, dilation, groups)
    geometry = ConvGeometry(weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]), stride,
                            padding, dilation, groups, padding_mode)
    pad: list[int] = []
    for pl, pr in reversed(geometry.pads()):
        pad += [pl, pr]
    return CONV_FNS[ndim](F.pad(x, pad, mode=padding_mode), weight, bias, stride, 0, dilation, groups)


def interleave_spatial(tensors: Sequence[Tensor]) -> Tensor:
    """Interleave along the last spatial axis: ``x_c`` then the ``k_i`` channels of each other tensor
    that belong to channel ``c`` (channels ``c*k_i ... c*k_i + k_i - 1``), position by position.

    ``(N, C, ..., W)`` and ``(N, k_i C, ..., W)`` -> ``(N, C, ..., (1 + sum k_i) W)``; with one
    tensor of ``C`` channels this is ``stack([x, t], -1).flatten(-2)``.
    """
    c = tensors[0].shape[1]
    parts = [t.reshape(t.shape[0], c, t.shape[1] // c, *t.shape[2:]).movedim(2, -1) for t in tensors]
    return torch.cat(parts, dim=-1).flatten(-2)


# Each is one call_function node in an FX trace, so passes can recognise it.
torch.fx.wrap("pssa_transform")
torch.fx.wrap("interleave_groups")
torch.fx.wrap("interleave_spatial")
torch.fx.wrap("padded_conv")


def conv_geometry(conv: nn.Module) -> ConvGeometry:
    """Geometry of an ``nn.Conv1d/2d/3d`` (or an XVolution site)."""
    padding = conv.padding if isinstance(conv.padding, str) else tuple(conv.padding)
    return ConvGeometry(
        in_channels=conv.in_channels,
        out_channels=conv.out_channels,
        kernel_size=tuple(conv.kernel_size),
        stride=tuple(conv.stride),
        padding=padding,
        dilation=tuple(conv.dilation),
        groups=conv.groups,
        padding_mode=conv.padding_mode,
    )


# --------------------------------------------------------------------------- convs with a weight transform

_PLAIN_CONV_FORWARDS = {nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward}
# Instance attributes every ConvNd has: what a conv subclass adds beyond them is its own state.
_CONV_ATTRIBUTES = frozenset(vars(nn.Conv2d(1, 1, 1)))
_CONV_CALLS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3, torch.conv1d: 1, torch.conv2d: 2, torch.conv3d: 3}


def _int_tuple(value: object, ndim: int) -> tuple[int, ...] | str:
    if isinstance(value, str):
        return value
    if isinstance(value, int):
        return (value,) * ndim
    return tuple(int(v) for v in value)  # type: ignore[union-attr]


def conv_forward_reason(conv: nn.Module) -> str:
    """'' when ``conv``'s forward is one convolution of its input, else why it is not.

    A plain ``nn.Conv1d/2d/3d`` qualifies. A subclass that overrides
    ``forward`` qualifies when its forward, traced with torch.fx, is one
    ``F.conv{1,2,3}d`` of the unchanged input with the module's own geometry,
    returned as is, whose weight and bias are computed from the module's
    parameters and constants only (weight standardization: timm's
    ``StdConv2d``/``ScaledStdConv2d``). Such a weight is constant in eval
    mode, so the conv can become a site and fold like a plain one.
    """
    if type(conv).forward in _PLAIN_CONV_FORWARDS:
        return ""
    cls = type(conv).__qualname__
    head = f"custom forward: {cls} overrides forward()"
    try:
        graph = torch.fx.Tracer().trace(conv)
    except Exception as err:  # any tracing failure: the forward cannot be checked
        return f"{head} and does not trace with torch.fx ({type(err).__name__}); a swap would drop that behaviour"
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    if len(inputs) != 1:
        return f"{head} with {len(inputs)} inputs; a swap would drop that behaviour"
    dependent: set[torch.fx.Node] = set()
    for node in graph.nodes:  # topological order: everything the input flows into
        if node in inputs or any(a in dependent for a in node.all_input_nodes):
            dependent.add(node)
    convs = [n for n in dependent if n.op == "call_function" and n.target in _CONV_CALLS]
    output = next(n for n in graph.nodes if n.op == "output")
    if len(convs) != 1:
        return f"{head} and calls {len(convs)} convolutions on its input; a swap would drop that behaviour"
    others = [str(n.target) for n in dependent if n not in (inputs[0], convs[0], output)]
    if others or output.args[0] is not convs[0]:
        what = f" ({', '.join(sorted(others)[:3])})" if others else ""
        return (f"{head} and computes more than a convolution of its input{what}; "
                "a swap would drop that behaviour")
    call = convs[0]
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    args = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}
    args.update(zip(names, call.args, strict=False))
    args.update(call.kwargs)
    if args["input"] is not inputs[0]:
        return f"{head} and transforms its input before the convolution; a swap would drop that behaviour"
    ndim = _CONV_CALLS[call.target]
    g = conv_geometry(conv)
    wanted = (g.stride, g.padding, g.dilation, g.groups)
    try:
        found = (*(_int_tuple(args[k], ndim) for k in ("stride", "padding", "dilation")), int(args["groups"]))
    except (TypeError, ValueError):
        found = ()
    if found != wanted or g.padding_mode != "zeros":
        return f"{head} and convolves with another geometry than its own; a swap would drop that behaviour"
    for node in graph.nodes:
        if node.op == "call_module" or (node.op == "call_method" and str(node.target).endswith("_")):
            return f"{head} and its weight computation calls {node.target} (a module or in-place op)"
    own = (set(vars(conv)) - _CONV_ATTRIBUTES) | (set(conv._parameters) - {"weight", "bias"}) | set(conv._buffers)
    clash = sorted(own & _site_attribute_names())
    if clash:
        return f"{head} and its attribute(s) {', '.join(clash)} clash with the X-volution site's own"
    return ""


@functools.cache
def _site_attribute_names() -> frozenset[str]:
    """Names an X-volution site defines itself (class and instance attributes, global-attention ones too)."""
    site = XVolution(ConvGeometry(1, 1, (1,), (1,), (0,), (1,), 1))
    return frozenset(dir(site)) | frozenset(vars(site)) | {"attn_q", "attn_k", "attn_v", "qk_channels"}


class _Captured(Exception):
    """Raised by :class:`_CaptureConv` to stop a forward at its first convolution."""


class _CaptureConv(TorchFunctionMode):
    """Records the (weight, bias) of the first convolution called, then stops the forward."""

    def __init__(self) -> None:
        super().__init__()
        self.weight: Tensor | None = None
        self.bias: Tensor | None = None

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func in _CONV_CALLS:
            self.weight = args[1] if len(args) > 1 else kwargs["weight"]
            self.bias = args[2] if len(args) > 2 else kwargs.get("bias")
            raise _Captured
        return func(*args, **kwargs)


def _captured_conv_weights(module: nn.Module, what: str) -> tuple[Tensor, Tensor | None]:
    """The (weight, bias) of the first convolution ``module``'s forward calls, computed once from
    float64 copies of its own floating-point parameters and buffers, cast back to the weight's dtype."""
    state = {n: t.detach().double() if t.is_floating_point() else t.detach()
             for n, t in itertools.chain(module.named_parameters(recurse=False), module.named_buffers(recurse=False))}
    extent = (d * (k - 1) + 1 for k, d in zip(module.kernel_size, module.dilation, strict=True))
    probe = torch.zeros(1, module.in_channels, *extent, dtype=torch.float64, device=module.weight.device)
    capture = _CaptureConv()
    with torch.no_grad(), capture:
        try:  # the capture stops the forward at its first convolution
            torch.func.functional_call(module, state, (probe,))
        except _Captured:
            pass
    if capture.weight is None:
        raise FoldError(f"{what}.forward called no convolution")
    dtype = module.weight.dtype
    bias = None if capture.bias is None else capture.bias.to(dtype)
    return capture.weight.to(dtype), bias


def conv_module_weights(conv: nn.Module) -> tuple[Tensor, Tensor | None]:
    """The (weight, bias) an ``nn.Conv1d/2d/3d`` convolves with: its parameters, or for a subclass
    whose forward computes them (``conv_forward_reason(conv) == ""``) what that forward computes."""
    if type(conv).forward in _PLAIN_CONV_FORWARDS:
        return conv.weight, conv.bias
    return _captured_conv_weights(conv, type(conv).__name__)


def bn_params(bn: nn.Module) -> BatchNormParams:
    """Plain-tensor view of an eval BatchNorm; refuses one that would not fold exactly."""
    if bn.training:
        raise FoldError(
            f"{type(bn).__name__} is in training mode (uses batch statistics): call model.eval() before fusing"
        )
    if bn.running_mean is None or bn.running_var is None:
        raise FoldError(f"{type(bn).__name__} has no running statistics (track_running_stats=False)")
    return BatchNormParams(bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)


def _exact_identity_var(eps: float, dtype: torch.dtype) -> float:
    """A running_var with (var + eps) == 1 exactly in ``dtype``, so an eval BN starts as identity."""
    one = torch.tensor(1.0, dtype=dtype)
    var = torch.tensor(1.0 - eps, dtype=dtype)
    for _ in range(64):
        total = var + torch.tensor(eps, dtype=dtype)
        if total == one:
            break
        var = torch.nextafter(var, var + (one - total))
    return float(var)


def _zero_gamma_bn(channels: int, ndim: int) -> nn.Module:
    bn = BN_TYPES[ndim](channels)
    nn.init.zeros_(bn.weight)
    return bn


class XVolution(nn.Module):
    """Training form of an X-volution site (docs/operator.md, sections 1-3).

    ``y = conv(x) + BN_a(Conv_a(T_L(x)))`` (+ optional RepVGG/DBB-style branches).
    The site's own ``weight``/``bias`` stay on this module under the same names,
    so a checkpoint of the original model loads with ``strict=False`` and only
    the new keys missing: ``attn_conv.weight``, ``attn_bn.*`` and, when chosen,
    ``branch_1x1.{0,1}.*``, ``branch_identity.*``, ``conv_bn.*``.

    :meth:`from_conv` keeps the conv's own ``Parameter`` objects (not copies),
    so ``requires_grad`` flags and weights tied to other modules survive. Rule
    for the new parameters (attention conv and BatchNorm, extra branches):
    trainable, unless the conv's weight is frozen (``requires_grad=False``),
    then they are frozen too. Build the optimizer after the site exists: one
    built before holds neither the new parameters nor, for a copied model, the
    copy's.

    A conv subclass whose forward computes its weight from its parameters
    (weight standardization, see :func:`conv_forward_reason`) keeps that
    forward as the conv branch: ``conv_class`` is the subclass, its extra
    parameters and attributes (e.g. ``gain``, ``eps``) move onto the site
    under the same names, and :meth:`conv_weights` evaluates the weight it
    computes (constant in eval mode).

    The PSSA ring kernel is a non-persistent buffer, ``pssa_ring`` (see :func:`pssa_ring_buffer`):
    not in the state_dict, moved by ``.to()``, a buffer input of ``torch.export`` programs.
    """

    _pssa_attention: ClassVar[bool] = True  # False: the attention branch is no PSSA transform (no ring buffer)

    def __init__(
        self,
        geometry: ConvGeometry,
        *,
        bias: bool = True,
        shift: int | Sequence[int] = 1,
        directions: Directions = None,
        directional: bool = False,
        extra_branches: Sequence[str] = (),
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        g = geometry
        ndim = g.ndim
        if ndim not in CONV_TYPES:
            raise ValueError(f"X-volution supports Conv1d/2d/3d sites, got {ndim} spatial dims")
        check_extra_branches(extra_branches, EXTRA_BRANCHES)
        self.in_channels, self.out_channels = g.in_channels, g.out_channels
        self.kernel_size, self.stride, self.dilation = g.kernel_size, g.stride, g.dilation
        self.padding, self.groups, self.padding_mode = g.padding, g.groups, g.padding_mode
        self.shift = _shifts(shift, ndim)
        self.directions = len(neighbour_offsets(ndim, directions))
        self.directional = directional
        if self._pssa_attention:
            pssa_ring_buffer(self, g.in_channels, ndim, self.shift, self.directions, directional, device, dtype)
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(g.out_channels, g.in_channels // g.groups, *g.kernel_size, **factory))
        self.bias = nn.Parameter(torch.zeros(g.out_channels, **factory)) if bias else None
        attn_in = g.in_channels * (self.directions if directional else 1)
        self.attn_conv = CONV_TYPES[ndim](
            attn_in, g.out_channels, g.kernel_size, g.stride, g.padding, g.dilation, g.groups,
            bias=False, padding_mode=g.padding_mode, **factory,
        )
        self.attn_bn = _zero_gamma_bn(g.out_channels, ndim).to(**factory)
        self.extra_branches = tuple(extra_branches)
        self.conv_class: type[nn.Module] | None = None  # a conv subclass whose forward is the conv branch
        if "1x1" in extra_branches:
            self.branch_1x1 = self._make_1x1_branch(g).to(**factory)
        if "identity" in extra_branches:
            if g.in_channels != g.out_channels or any(s != 1 for s in g.stride):
                raise FoldError("an identity branch needs C_in == C_out and stride 1")
            self._check_embeddable(ConvGeometry(
                g.in_channels, g.out_channels, (1,) * ndim, g.stride, (0,) * ndim, (1,) * ndim, g.groups
            ), "identity")
            self.branch_identity = _zero_gamma_bn(g.out_channels, ndim).to(**factory)
        if "bn" in extra_branches:
            bn = BN_TYPES[ndim](g.out_channels).to(**factory)
            bn.running_var.fill_(_exact_identity_var(bn.eps, bn.running_var.dtype))
            self.conv_bn = bn

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # An INT8-rescaled checkpoint holds t_scale (its weights are rescaled too); a plain one does not.
        ring = site_ring(self)
        if prefix + T_SCALE in state_dict and T_SCALE not in self._buffers and ring is not None:
            self.register_buffer(T_SCALE, torch.ones(ring.shape[0], device=ring.device, dtype=ring.dtype))
        elif prefix + T_SCALE not in state_dict and prefix + "conv.weight" in state_dict:
            self._buffers.pop(T_SCALE, None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        refill_ring(self)  # a meta-built model after to_empty(): the checkpoint does not hold the ring

    def _check_embeddable(self, small: ConvGeometry, what: str) -> tuple[int, ...]:
        try:
            return embedding_offset(small, self.geometry)
        except FoldError as err:
            raise FoldError(f"cannot add {with_article(what)} branch to this site: {err}") from err

    def _make_1x1_branch(self, g: ConvGeometry) -> nn.Module:
        ndim = g.ndim
        pads = []
        for axis, (k, d, (pl, pr)) in enumerate(zip(g.kernel_size, g.dilation, g.pads(), strict=True)):
            if k % 2 == 0 or pl != pr:
                raise FoldError(f"cannot add a 1x1 branch: kernel/padding on axis {axis} has no centre tap")
            pads.append(pl - d * (k - 1) // 2)
        small = ConvGeometry(g.in_channels, g.out_channels, (1,) * ndim, g.stride, tuple(pads), (1,) * ndim, g.groups)
        if any(p < 0 for p in pads):
            raise FoldError(f"cannot add a 1x1 branch: padding {g.padding} is smaller than the kernel's half-width")
        self._check_embeddable(small, "1x1")
        conv = CONV_TYPES[ndim](g.in_channels, g.out_channels, 1, g.stride, tuple(pads), 1, g.groups, bias=False)
        return nn.Sequential(conv, _zero_gamma_bn(g.out_channels, ndim))

    @property
    def geometry(self) -> ConvGeometry:
        return conv_geometry(self)

    @property
    def ndim(self) -> int:
        return len(self.kernel_size)

    @classmethod
    def from_conv(
        cls,
        conv: nn.Module,
        *,
        shift: int | Sequence[int] = 1,
        directions: Directions = None,
        directional: bool = False,
        extra_branches: Sequence[str] = (),
    ) -> XVolution:
        """Wrap an existing ``nn.Conv1d/2d/3d``: its weight and bias are kept (the same Parameter objects).

        The new parameters are trainable unless ``conv.weight`` is frozen, then
        frozen too. Deep-copy ``conv`` first for a site that shares nothing.
        """
        if isinstance(conv, nn.Module):
            check_initialized(conv, f"conv ({type(conv).__name__})")
        check_shift(shift)
        check_directions(directions)
        check_bool("directional", directional)
        check_extra_branches(extra_branches, EXTRA_BRANCHES)
        return cls._wrap(conv, shift=shift, directions=directions, directional=directional,
                         extra_branches=extra_branches)

    @classmethod
    def _wrap(cls, conv: nn.Module, **options: object) -> XVolution:
        """A site of this class around ``conv``: same geometry and Parameter objects, training flag kept."""
        if not isinstance(conv, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) or isinstance(conv, XVolution):
            raise TypeError(f"{cls.__name__}.from_conv needs an nn.Conv1d/2d/3d, got {type(conv).__name__}")
        reason = conv_forward_reason(conv)
        if reason:
            raise TypeError(f"{cls.__name__}.from_conv cannot wrap this conv: {reason}")
        p = conv.weight
        site = cls(conv_geometry(conv), bias=conv.bias is not None, device=p.device, dtype=p.dtype, **options)
        with torch.no_grad():
            # Conv_a starts like a fresh conv of the site's geometry; BN_a's zero gamma silences it.
            nn.init.kaiming_uniform_(site.attn_conv.weight, a=5**0.5)
        if not conv.weight.requires_grad:  # a frozen conv gives a frozen site
            for param in site.parameters():
                param.requires_grad_(False)
        site.weight = conv.weight
        site.bias = conv.bias
        site._adopt_conv_class(conv)
        site.train(conv.training)
        return site

    def _adopt_conv_class(self, conv: nn.Module) -> None:
        """Take ``conv``'s own state (extra parameters, buffers, attributes) and its forward as the conv branch."""
        if type(conv).forward in _PLAIN_CONV_FORWARDS:
            return  # a subclass that keeps nn.ConvNd's forward is a plain conv
        # (conv_forward_reason has checked that none of these names clashes with the site's own.)
        for name, value in vars(conv).items():
            if name not in _CONV_ATTRIBUTES:
                setattr(self, name, value)
        for name, param in conv._parameters.items():
            if name not in ("weight", "bias"):
                self.register_parameter(name, param)
        for name, buf in conv._buffers.items():
            self.register_buffer(name, buf, persistent=name not in conv._non_persistent_buffers_set)
        self.conv_class = type(conv)

    def _conv_forward(self, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """nn.ConvNd's helper, for adopted forwards that call it."""
        return padded_conv(input, weight, bias, self.stride, self.padding, self.dilation, self.groups,
                           self.padding_mode)

    def _conv(self, x: Tensor) -> Tensor:
        if self.conv_class is not None:
            return self.conv_class.forward(self, x)  # the adopted conv's own forward, weight transform included
        if self.padding_mode != "zeros":
            return padded_conv(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups,
                               self.padding_mode)
        return CONV_FNS[self.ndim](x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def conv_weights(self) -> tuple[Tensor, Tensor | None]:
        """The (weight, bias) the conv branch convolves with.

        The parameters themselves, or for an adopted ``conv_class`` what its
        forward computes from them: evaluated once from float64 copies of the
        site's floating-point parameters and buffers, then cast back to the
        weight's dtype.
        """
        if self.conv_class is None:
            return self.weight, self.bias
        return _captured_conv_weights(self, self.conv_class.__name__)

    def attention(self, x: Tensor) -> Tensor:
        """The attention branch's input transform: T_L(x) (PSSA)."""
        return pssa_transform(x, self.shift, self.directions, self.directional, kernel=site_ring(self))

    def forward(self, x: Tensor) -> Tensor:
        y = self._conv(x)
        if "bn" in self.extra_branches:
            y = self.conv_bn(y)
        if "1x1" in self.extra_branches:
            y = y + self.branch_1x1(x)
        if "identity" in self.extra_branches:
            y = y + self.branch_identity(x)
        return y + self.attn_bn(self.attn_conv(self.attention(x)))

    def _attention_repr(self) -> str:
        return f"shift={self.shift}, directions={self.directions}, directional={self.directional}"

    def extra_repr(self) -> str:
        g = self.geometry
        return (
            f"{g.in_channels}, {g.out_channels}, kernel_size={g.kernel_size}, stride={g.stride}, "
            f"padding={g.padding}, dilation={g.dilation}, groups={g.groups}, {self._attention_repr()}, "
            f"extra_branches={self.extra_branches}"
            + (f", conv_class={self.conv_class.__name__}" if self.conv_class is not None else "")
        )

    def deploy_weights(self) -> tuple[Tensor, Tensor]:
        """(weight, bias) of the single deploy convolution, from the shared fold functions."""
        if not all(torch.isfinite(p).all() for p in self.parameters()):
            raise FoldError("non-finite values in the site's parameters")
        g = self.geometry
        w, b = self.conv_weights()
        if "bn" in self.extra_branches:
            w, b = fold_conv_bn(w, b, bn_params(self.conv_bn))
        x, t = "x", "T(x)"
        branches = [Branch((x,), (g.in_channels,), g, w, b)]
        if "1x1" in self.extra_branches:
            conv1, bn1 = self.branch_1x1[0], self.branch_1x1[1]
            branches.append(Branch((x,), (g.in_channels,), conv_geometry(conv1),
                                   *fold_conv_bn(conv1.weight, conv1.bias, bn_params(bn1))))
        if "identity" in self.extra_branches:
            ndim = g.ndim
            ident = ConvGeometry(g.in_channels, g.out_channels, (1,) * ndim, g.stride, (0,) * ndim, (1,) * ndim,
                                 g.groups)
            wi, bi = bn_as_kernel(bn_params(self.branch_identity), g.groups, (1,) * ndim, (0,) * ndim, w.dtype)
            branches.append(Branch((x,), (g.in_channels,), ident, wi, bi))
        attn = self.attn_conv
        branches.append(Branch((t,), (attn.in_channels,), conv_geometry(attn),
                               *fold_conv_bn(attn.weight, None, bn_params(self.attn_bn))))
        merged = merge_branches(branches)
        if merged.inputs != (x, t):
            raise FoldError(f"unexpected deploy inputs {merged.inputs}")
        if not (torch.isfinite(merged.weight).all() and torch.isfinite(merged.bias).all()):
            raise FoldError("folded weights are not finite (BN statistics overflowed)")
        return merged.weight, merged.bias

    @torch.no_grad()
    def fuse(self, lowering: str = "channel", *, single_conv: bool = True,
             bn: BatchNormParams | None = None, weights: tuple[Tensor, Tensor] | None = None) -> XVolutionDeploy:
        """The deploy form: one convolution over ``interleave_groups([x, T(x)])`` (``lowering="channel"``),
        over ``interleave_spatial([x, T(x)])`` (``"spatial"``), or, with ``single_conv=False``,
        two convolutions and an add (``"split"``); ``bn``, an eval BatchNorm applied to the site's
        output, folded in. ``weights``: :meth:`deploy_weights` when already computed.
        FoldError says why a lowering is not exact here."""
        w, b = self.deploy_weights() if weights is None else weights
        if bn is not None:
            w, b = fold_conv_bn(w, b, bn)
        deploy = XVolutionDeploy(self.geometry, shift=self.shift, directions=self.directions,
                                 directional=self.directional, lowering=lowering, single_conv=single_conv,
                                 device=w.device, dtype=w.dtype)
        deploy.load_merged(w, b)
        return deploy.eval()


def _merged_branch(geometry: ConvGeometry, factor: int, weight: Tensor, bias: Tensor | None) -> Branch:
    """The channel-interleaved site conv as a two-input branch ``[x, T(x)]``."""
    c = geometry.in_channels
    merged = ConvGeometry(factor * c, geometry.out_channels, geometry.kernel_size, geometry.stride,
                          geometry.padding, geometry.dilation, geometry.groups, geometry.padding_mode)
    return Branch(("x", "T(x)"), (c, (factor - 1) * c), merged, weight, bias)


def lowered_convs(branch: Branch, lowering: str, *, single_conv: bool = True,
                  device: torch.device | None = None, dtype: torch.dtype | None = None,
                  ) -> tuple[list[nn.Module], SpatialLayout | None]:
    """The conv modules of ``lowering`` for a merged two-or-more-input site branch, weights set.

    "channel" and "spatial": one conv (its bias the site's); "split": one conv per input,
    the bias on the first. For "spatial" the layout says how to pad the inputs first
    (``layout.pre_pads``). FoldError when the lowering is not exact or not allowed.
    """
    check_lowering(branch, lowering, single_conv=single_conv)
    g = branch.geometry
    ndim = g.ndim
    dtype = dtype or branch.weight.dtype
    device = device or branch.weight.device

    def conv(geometry: ConvGeometry, weight: Tensor, bias: Tensor | None) -> nn.Module:
        module = CONV_TYPES[ndim](
            geometry.in_channels, geometry.out_channels, geometry.kernel_size, geometry.stride, geometry.padding,
            geometry.dilation, geometry.groups, bias=bias is not None, padding_mode=geometry.padding_mode,
            device=device, dtype=dtype,
        )
        with torch.no_grad():
            module.weight.copy_(weight)
            if bias is not None:
                module.bias.copy_(bias)
        return module.eval()

    bias = branch.bias if branch.bias is not None else torch.zeros(g.out_channels, dtype=branch.weight.dtype)
    if lowering == "channel":
        return [conv(g, branch.weight, bias)], None
    if lowering == "spatial":
        factor = interleave_factor(branch)
        layout = spatial_layout(g, factor, asymmetric_pads=False)
        return [conv(layout.geometry, spatial_weight(branch.weight, g.groups, factor), bias)], layout
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
        return convs[0](interleave_groups(list(inputs), convs[0].groups))
    if lowering == "spatial":
        if layout is not None and layout.pre_pads is not None:
            inputs = [pad_input(t, layout.pre_pads, layout.pre_mode) for t in inputs]
        return convs[0](interleave_spatial(list(inputs)))
    out = convs[0](inputs[0])
    for conv, t in zip(convs[1:], inputs[1:], strict=True):
        out = out + conv(t)
    return out


class XVolutionDeploy(nn.Module):
    """Deploy form of a site over ``[x, T(x)]`` in one of the lowerings of ``xvol_compiler.lowering``.

    ``"channel"``: ``ConvNd((1+k)*C_in, C_out, K, s, p, d, groups=g)(interleave_groups(x, T(x)))``, ``k``
    1 (or |D| for the directional variant); ``"spatial"``: ``ConvNd(C_in, C_out, (..., (1+k) K_w),
    (..., (1+k) s_w), ...)(interleave_spatial(x, T(x)))``; ``"split"`` (``single_conv=False``):
    ``conv(x) + conv_attn(T(x))``. The main conv's weight and bias keep the site's names
    (``weight``, ``bias``) so a checkpoint key still names the site. T(x)'s ring kernel is the
    non-persistent buffer ``pssa_ring`` (no checkpoint key), as in :class:`XVolution`.
    """

    def __init__(
        self,
        geometry: ConvGeometry,
        *,
        shift: int | Sequence[int] = 1,
        directions: Directions = None,
        directional: bool = False,
        lowering: str = "channel",
        single_conv: bool = True,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        g = geometry
        ndim = g.ndim
        self.shift = _shifts(shift, ndim)
        self.directions = len(neighbour_offsets(ndim, directions))
        self.directional = directional
        self.lowering = lowering
        self.single_conv = single_conv
        self.site_geometry = g
        self.factor = 1 + (self.directions if directional else 1)
        pssa_ring_buffer(self, g.in_channels, ndim, self.shift, self.directions, directional, device, dtype)
        w = torch.zeros(g.out_channels, self.factor * g.in_channels // g.groups, *g.kernel_size,
                        device=device, dtype=dtype)
        self._build(w, torch.zeros(g.out_channels, device=device, dtype=dtype))

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # An INT8-rescaled checkpoint holds t_scale (its weights are rescaled too); a plain one does not.
        ring = site_ring(self)
        if prefix + T_SCALE in state_dict and T_SCALE not in self._buffers and ring is not None:
            self.register_buffer(T_SCALE, torch.ones(ring.shape[0], device=ring.device, dtype=ring.dtype))
        elif prefix + T_SCALE not in state_dict and prefix + "conv.weight" in state_dict:
            self._buffers.pop(T_SCALE, None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        refill_ring(self)  # a meta-built model after to_empty(): the checkpoint does not hold the ring

    def _build(self, weight: Tensor, bias: Tensor) -> None:
        branch = _merged_branch(self.site_geometry, self.factor, weight, bias)
        convs, self.layout = lowered_convs(branch, self.lowering, single_conv=self.single_conv)
        self.conv = convs[0]
        if len(convs) > 1:
            self.conv_attn = convs[1]

    @torch.no_grad()
    def load_merged(self, weight: Tensor, bias: Tensor) -> None:
        """Set the lowering's weights from the channel-interleaved merged (weight, bias)."""
        self._build(weight, bias)

    @property
    def weight(self) -> nn.Parameter:
        return self.conv.weight

    @property
    def bias(self) -> nn.Parameter:
        return self.conv.bias

    def extra_repr(self) -> str:
        return f"lowering={self.lowering!r}"

    def forward(self, x: Tensor) -> Tensor:
        t = pssa_transform(x, self.shift, self.directions, self.directional, kernel=site_ring(self))
        convs = [self.conv] + ([self.conv_attn] if self.lowering == "split" else [])
        return run_lowering(self.lowering, convs, self.layout, [x, t])
