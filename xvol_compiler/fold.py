"""Pure re-parameterization math on tensors.

Nothing here knows about modules, FX or ONNX: every function takes tensors and
plain geometry values and returns tensors. Folding is done in float64 and the
result is cast back to the dtype of the incoming weight, as torch's
``fuse_conv_bn_weights`` keeps dtype. The FX and ONNX passes both call these
functions; neither has a copy of the math.

Weights use torch's layout for an N-d convolution:
``(C_out, C_in / groups, *kernel)``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import overload

import torch
from torch import Tensor

from xvol_compiler.errors import XvolError

__all__ = [
    "BatchNormParams",
    "Branch",
    "ConvGeometry",
    "FoldError",
    "WeightBias",
    "bn_as_kernel",
    "bn_scale_shift",
    "embed_kernel",
    "embedding_offset",
    "fold_conv_bn",
    "identity_kernel",
    "merge_branches",
    "sum_branches",
]

WeightBias = tuple[Tensor, Tensor]


class FoldError(XvolError, ValueError):
    """A fold that would not be exact; the message says which condition failed."""


@dataclass(frozen=True)
class BatchNormParams:
    """Eval-mode BatchNorm as plain tensors (any of BatchNorm1d/2d/3d/SyncBatchNorm)."""

    running_mean: Tensor
    running_var: Tensor
    weight: Tensor | None
    bias: Tensor | None
    eps: float

    @property
    def num_features(self) -> int:
        return int(self.running_mean.numel())


@dataclass(frozen=True)
class ConvGeometry:
    """What a convolution does to positions, independent of its weights.

    ``padding`` is a per-axis tuple of symmetric pads or the strings
    ``"same"`` / ``"valid"`` exactly as torch accepts them, or a per-axis
    tuple of ``(begin, end)`` pairs for asymmetric zero padding, which ONNX
    ``Conv`` has (explicit ``pads``, ``auto_pad=SAME_*`` with a stride) and a
    torch conv module has not. The fold math only reads :meth:`pads`: folding
    BatchNorm into a conv keeps whatever padding it has, and summing branches
    checks their alignment side by side (:func:`embedding_offset`).
    """

    in_channels: int
    out_channels: int
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...] | tuple[tuple[int, int], ...] | str
    dilation: tuple[int, ...]
    groups: int
    padding_mode: str = "zeros"

    @property
    def ndim(self) -> int:
        return len(self.kernel_size)

    def pads(self) -> tuple[tuple[int, int], ...]:
        """(left, right) zero padding per spatial axis, resolving 'same'/'valid' as torch does."""
        if self.padding == "valid":
            return tuple((0, 0) for _ in self.kernel_size)
        if self.padding == "same":
            out = []
            for k, d in zip(self.kernel_size, self.dilation, strict=True):
                total = d * (k - 1)
                out.append((total // 2, total - total // 2))
            return tuple(out)
        if isinstance(self.padding, str):
            raise FoldError(f"unknown padding {self.padding!r}")
        return tuple((int(p[0]), int(p[1])) if isinstance(p, tuple) else (p, p) for p in self.padding)


@overload
def _f64(t: Tensor) -> Tensor: ...


@overload
def _f64(t: None) -> None: ...


def _f64(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach().to(torch.float64)


def _sum(tensors: Iterable[Tensor]) -> Tensor:
    """``sum(tensors)`` (a new tensor, as ``0 + t`` is), refusing an empty iterable."""
    total = sum(tensors)
    if not isinstance(total, Tensor):
        raise FoldError("nothing to sum")
    return total


def bn_scale_shift(bn: BatchNormParams) -> tuple[Tensor, Tensor]:
    """Per-channel (scale, shift) of an eval BatchNorm, in float64: y = x * scale + shift."""
    mean, var = _f64(bn.running_mean), _f64(bn.running_var)
    if not (torch.isfinite(mean).all() and torch.isfinite(var).all()):
        raise FoldError("BatchNorm running statistics contain non-finite values")
    if (var + bn.eps <= 0).any():
        raise FoldError("BatchNorm running_var + eps is not positive")
    gamma = torch.ones_like(mean) if bn.weight is None else _f64(bn.weight)
    beta = torch.zeros_like(mean) if bn.bias is None else _f64(bn.bias)
    scale = gamma / torch.sqrt(var + bn.eps)
    return scale, beta - mean * scale


def _bias_or_zeros(w: Tensor, b: Tensor | None) -> Tensor:
    return torch.zeros(w.shape[0], dtype=torch.float64, device=w.device) if b is None else _f64(b)


def fold_conv_bn(weight: Tensor, bias: Tensor | None, bn: BatchNormParams) -> WeightBias:
    """conv -> BN as one conv: ``w * gamma/sqrt(var+eps)``, ``beta + (b - mean) * gamma/sqrt(var+eps)``."""
    if bn.num_features != weight.shape[0]:
        raise FoldError(
            f"BatchNorm has {bn.num_features} features but the conv has {weight.shape[0]} outputs"
        )
    scale, shift = bn_scale_shift(bn)
    w = _f64(weight) * scale.reshape(-1, *([1] * (weight.dim() - 1)))
    b = _bias_or_zeros(weight, bias) * scale + shift
    return w.to(weight.dtype), b.to(weight.dtype)


def identity_kernel(
    channels: int, groups: int, kernel_size: Sequence[int], centre: Sequence[int], dtype: torch.dtype
) -> Tensor:
    """Kernel of a grouped conv that copies each channel: a one at ``centre`` of its own tap."""
    if channels % groups:
        raise FoldError(f"{channels} channels do not split into {groups} groups")
    per_group = channels // groups
    w = torch.zeros(channels, per_group, *kernel_size, dtype=dtype)
    idx = torch.arange(channels)
    w[(idx, idx % per_group, *[torch.full_like(idx, c) for c in centre])] = 1
    return w


def bn_as_kernel(
    bn: BatchNormParams, groups: int, kernel_size: Sequence[int], centre: Sequence[int], dtype: torch.dtype
) -> WeightBias:
    """A BN-only (identity) branch as a grouped conv kernel: BN is a per-channel 1x1 conv."""
    ident = identity_kernel(bn.num_features, groups, kernel_size, centre, torch.float64)
    scale, shift = bn_scale_shift(bn)
    w = ident * scale.reshape(-1, *([1] * (ident.dim() - 1)))
    return w.to(dtype), shift.to(dtype)


def embedding_offset(small: ConvGeometry, big: ConvGeometry) -> tuple[int, ...]:
    """Tap offset at which ``small``'s kernel sits inside ``big``'s so both compute the same taps.

    Two branches on the same input can only be summed into one kernel when they
    read aligned positions: same stride and groups, the small kernel's taps on
    the big kernel's dilated grid, and the same output size on every axis.
    """
    if small.ndim != big.ndim:
        raise FoldError("branches have different numbers of spatial dimensions")
    if small.stride != big.stride:
        raise FoldError(f"stride mismatch: {small.stride} vs {big.stride}")
    if small.groups != big.groups:
        raise FoldError(f"groups mismatch: {small.groups} vs {big.groups}")
    if small.padding_mode != big.padding_mode and any(p != (0, 0) for p in small.pads()):
        raise FoldError(f"padding_mode mismatch: {small.padding_mode} vs {big.padding_mode}")
    offsets = []
    for axis, (ks, kb, ds, db, (pls, prs), (plb, prb)) in enumerate(
        zip(small.kernel_size, big.kernel_size, small.dilation, big.dilation, small.pads(), big.pads(), strict=True)
    ):
        if ks > 1 and ds != db:
            raise FoldError(f"dilation mismatch on axis {axis}: {ds} vs {db}")
        shift_left = plb - pls
        if shift_left % db:
            raise FoldError(f"padding misaligned on axis {axis}: taps fall between kernel taps")
        off = shift_left // db
        right_room = (prb - prs) // db if (prb - prs) % db == 0 else -1
        if off < 0 or off + ks > kb or right_room != kb - ks - off:
            raise FoldError(
                f"padding misaligned on axis {axis}: kernel {ks} with pads ({pls},{prs}) "
                f"does not sit inside kernel {kb} with pads ({plb},{prb})"
            )
        offsets.append(off)
    return tuple(offsets)


def embed_kernel(weight: Tensor, kernel_size: Sequence[int], offset: Sequence[int]) -> Tensor:
    """Zero-pad a smaller kernel (e.g. 1x1) into ``kernel_size`` with its first tap at ``offset``."""
    pad: list[int] = []
    for k_small, k_big, off in reversed(list(zip(weight.shape[2:], kernel_size, offset, strict=True))):
        pad += [off, k_big - k_small - off]
    return torch.nn.functional.pad(weight, pad)


def sum_branches(branches: Sequence[tuple[Tensor, Tensor | None]]) -> WeightBias:
    """Branches with the same input and geometry add up kernel by kernel."""
    if not branches:
        raise FoldError("no branches to sum")
    shape = branches[0][0].shape
    for w, _ in branches:
        if w.shape != shape:
            raise FoldError(f"kernel shapes differ: {tuple(w.shape)} vs {tuple(shape)}")
    w_sum = _sum(_f64(w) for w, _ in branches)
    b_sum = _sum(_bias_or_zeros(w_, b_) for w_, b_ in branches)
    dtype = branches[0][0].dtype
    return w_sum.to(dtype), b_sum.to(dtype)


@dataclass(frozen=True)
class Branch:
    """A convolution branch over one or more inputs, interleaved per group in ``inputs`` order.

    ``inputs`` are opaque keys (graph values, or any hashable): the math only
    uses them to tell which branches read the same tensor.
    """

    inputs: tuple[object, ...]
    channels: tuple[int, ...]
    geometry: ConvGeometry
    weight: Tensor
    bias: Tensor | None

    def blocks(self) -> list[Tensor]:
        """The weight split into one block per input (input-channel axis)."""
        g = self.geometry.groups
        for c in self.channels:
            if c % g:
                raise FoldError(f"input with {c} channels does not split into {g} groups")
        return list(torch.split(self.weight, [c // g for c in self.channels], dim=1))


def merge_branches(branches: Sequence[Branch]) -> Branch:
    """Sum of branches as one branch: same-input kernels add (smaller kernels embedded
    where their taps align), different inputs become interleaved input blocks.

    Raises FoldError, naming the condition, when the branches cannot be one
    convolution exactly (stride, groups, dilation, padding alignment, outputs).
    """
    if not branches:
        raise FoldError("no branches to merge")
    out_channels = {b.weight.shape[0] for b in branches}
    if len(out_channels) != 1:
        raise FoldError(f"branches have different output channels: {sorted(out_channels)}")
    big = max(branches, key=lambda b: (math.prod(b.geometry.kernel_size), b.geometry.kernel_size))
    kernel = big.geometry.kernel_size
    per_input: dict[object, list[tuple[Tensor, Tensor | None]]] = {}
    channels: dict[object, int] = {}
    for branch in branches:
        offset = embedding_offset(branch.geometry, big.geometry)
        for key, c, block in zip(branch.inputs, branch.channels, branch.blocks(), strict=True):
            if channels.setdefault(key, c) != c:
                raise FoldError(f"input {key!r} has {c} channels in one branch and {channels[key]} in another")
            per_input.setdefault(key, []).append((embed_kernel(block, kernel, offset), None))
    summed = [sum_branches(blocks) for blocks in per_input.values()]
    weight = torch.cat([w for w, _ in summed], dim=1)
    bias = _sum(_bias_or_zeros(b.weight, b.bias) for b in branches)
    keys = tuple(per_input)
    geometry = ConvGeometry(
        in_channels=sum(channels[k] for k in keys),
        out_channels=big.geometry.out_channels,
        kernel_size=kernel,
        stride=big.geometry.stride,
        padding=big.geometry.padding,
        dilation=big.geometry.dilation,
        groups=big.geometry.groups,
        padding_mode=big.geometry.padding_mode,
    )
    return Branch(keys, tuple(channels[k] for k in keys), geometry, weight, bias.to(weight.dtype))
