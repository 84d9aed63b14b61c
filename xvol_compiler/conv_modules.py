"""Reading torch convolution and BatchNorm modules: their geometry, the weights they convolve with,
eval BatchNorm statistics, and the one table of conv module types and conv functions per dimension.

Pure reading: nothing here traces (see :mod:`xvol_compiler.conv_forward`) or builds sites.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.modules.conv import _ConvNd
from torch.overrides import TorchFunctionMode

from xvol_compiler.fold import BatchNormParams, ConvGeometry, FoldError

__all__ = [
    "BN_TYPES",
    "CONV_CALLS",
    "CONV_FUNCTIONS",
    "CONV_TYPES",
    "PLAIN_CONV_FORWARDS",
    "bn_params",
    "captured_conv_weights",
    "conv_geometry",
    "conv_module_weights",
    "padded_conv",
]

ConvFunction = Callable[..., Tensor]

# The one table of convolutions per number of spatial dimensions: module types and functions.
# (``torch.conv2d`` is the same object as ``F.conv2d``, so CONV_CALLS recognises both spellings.)
CONV_TYPES: dict[int, type[nn.Conv1d] | type[nn.Conv2d] | type[nn.Conv3d]] = {
    1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d,
}
BN_TYPES: dict[int, type[nn.BatchNorm1d] | type[nn.BatchNorm2d] | type[nn.BatchNorm3d]] = {
    1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d,
}
CONV_FUNCTIONS: dict[int, ConvFunction] = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
CONV_CALLS: dict[ConvFunction, int] = {function: ndim for ndim, function in CONV_FUNCTIONS.items()}

PLAIN_CONV_FORWARDS = frozenset(conv.forward for conv in CONV_TYPES.values())
# Instance attributes every ConvNd has: what a conv subclass adds beyond them is its own state.
CONV_ATTRIBUTES = frozenset(vars(nn.Conv2d(1, 1, 1)))


def padded_conv(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: tuple[int, ...],
    padding: tuple[int, ...] | tuple[tuple[int, int], ...] | str,
    dilation: tuple[int, ...],
    groups: int,
    padding_mode: str,
) -> Tensor:
    """``F.conv{1,2,3}d`` with a torch padding mode ('zeros', 'reflect', 'replicate', 'circular').
    ``padding`` as :attr:`ConvGeometry.padding`; per-axis (begin, end) pairs only with a mode other than 'zeros'."""
    ndim = weight.dim() - 2
    if padding_mode == "zeros":
        return CONV_FUNCTIONS[ndim](x, weight, bias, stride, padding, dilation, groups)
    geometry = ConvGeometry(weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]), stride,
                            padding, dilation, groups, padding_mode)
    pad: list[int] = []
    for pl, pr in reversed(geometry.pads()):
        pad += [pl, pr]
    return CONV_FUNCTIONS[ndim](F.pad(x, pad, mode=padding_mode), weight, bias, stride, 0, dilation, groups)



def conv_geometry(conv: nn.Module) -> ConvGeometry:
    """Geometry of an ``nn.Conv1d/2d/3d`` (or an XVolution site, which holds the same attributes)."""
    conv = cast(_ConvNd, conv)
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
        if func in CONV_CALLS:
            self.weight = args[1] if len(args) > 1 else kwargs["weight"]
            self.bias = args[2] if len(args) > 2 else kwargs.get("bias")
            raise _Captured
        return func(*args, **kwargs)


def captured_conv_weights(module: nn.Module, what: str) -> tuple[Tensor, Tensor | None]:
    """The (weight, bias) of the first convolution ``module``'s forward calls, computed once from
    float64 copies of its own floating-point parameters and buffers, cast back to the weight's dtype."""
    conv = cast(_ConvNd, module)  # a conv or a site: both hold a conv's attributes
    state = {n: t.detach().double() if t.is_floating_point() else t.detach()
             for n, t in itertools.chain(module.named_parameters(recurse=False), module.named_buffers(recurse=False))}
    extent = (d * (k - 1) + 1 for k, d in zip(conv.kernel_size, conv.dilation, strict=True))
    probe = torch.zeros(1, conv.in_channels, *extent, dtype=torch.float64, device=conv.weight.device)
    capture = _CaptureConv()
    with torch.no_grad(), capture:
        try:  # the capture stops the forward at its first convolution
            torch.func.functional_call(module, state, (probe,))
        except _Captured:
            pass
    if capture.weight is None:
        raise FoldError(f"{what}.forward called no convolution")
    dtype = conv.weight.dtype
    bias = None if capture.bias is None else capture.bias.to(dtype)
    return capture.weight.to(dtype), bias


def conv_module_weights(conv: nn.Module) -> tuple[Tensor, Tensor | None]:
    """The (weight, bias) an ``nn.Conv1d/2d/3d`` convolves with: its parameters, or for a subclass
    whose forward computes them (``conv_forward_reason(conv) == ""``) what that forward computes."""
    if type(conv).forward in PLAIN_CONV_FORWARDS:
        plain = cast(_ConvNd, conv)
        return plain.weight, plain.bias
    return captured_conv_weights(conv, type(conv).__name__)


def bn_params(bn: nn.Module) -> BatchNormParams:
    """Plain-tensor view of an eval BatchNorm; refuses one that would not fold exactly."""
    bn = cast(_NormBase, bn)
    if bn.training:
        raise FoldError(
            f"{type(bn).__name__} is in training mode (uses batch statistics): call model.eval() before fusing"
        )
    if bn.running_mean is None or bn.running_var is None:
        raise FoldError(f"{type(bn).__name__} has no running statistics (track_running_stats=False)")
    return BatchNormParams(bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)

