"""Hypothesis strategies for random convolution sites and helpers that simulate training.

Reusable outside the test suite::

    from tests.strategies import conv_sites, randomize_bn
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from hypothesis import strategies as st
from torch import nn

CONV_TYPES = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


@dataclass(frozen=True)
class SiteSpec:
    """A random conv site and an input it accepts."""

    ndim: int
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...] | str
    dilation: tuple[int, ...]
    groups: int
    bias: bool
    padding_mode: str
    input_size: tuple[int, ...]
    batch: int

    def conv(self, dtype: torch.dtype = torch.float64) -> nn.Module:
        return CONV_TYPES[self.ndim](
            self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
            self.dilation, self.groups, bias=self.bias, padding_mode=self.padding_mode, dtype=dtype,
        )

    def input(self, dtype: torch.dtype = torch.float64, seed: int = 0) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return torch.randn(self.batch, self.in_channels, *self.input_size, generator=g, dtype=dtype)


@st.composite
def conv_sites(draw: st.DrawFn, ndims: tuple[int, ...] = (2,), max_kernel: int = 7) -> SiteSpec:
    """Random legal conv geometry: groups (1, g, depthwise), non-square kernels, stride,
    dilation, int/tuple/'same'/'valid' padding, padding modes, odd and tiny inputs."""
    ndim = draw(st.sampled_from(ndims))
    kmax = max_kernel if ndim < 3 else min(max_kernel, 3)
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    depthwise = draw(st.booleans()) and groups == 1
    if depthwise:
        channels = draw(st.integers(1, 6))
        groups, c_in, c_out = channels, channels, channels * draw(st.sampled_from([1, 2]))
    else:
        c_in = groups * draw(st.integers(1, 3))
        c_out = groups * draw(st.integers(1, 3))
    kernel = tuple(draw(st.integers(1, kmax)) for _ in range(ndim))
    stride = tuple(draw(st.integers(1, 3)) for _ in range(ndim))
    dilation = tuple(draw(st.integers(1, 3)) for _ in range(ndim))
    pad_kind = draw(st.sampled_from(["int", "int", "same", "valid"]))
    if pad_kind == "same" and any(s != 1 for s in stride):
        pad_kind = "int"
    if pad_kind == "int":
        padding: tuple[int, ...] | str = tuple(draw(st.integers(0, 3)) for _ in range(ndim))
    else:
        padding = pad_kind
    pads = padding if isinstance(padding, tuple) else (0,) * ndim
    size = []
    for k, d, p in zip(kernel, dilation, pads, strict=True):
        span = d * (k - 1) + 1
        low = max(1, span - 2 * p) if padding != "same" else 1
        size.append(draw(st.integers(low, low + 6)))
    padding_mode = draw(st.sampled_from(["zeros"] * 4 + ["reflect", "replicate", "circular"]))
    if padding_mode != "zeros":
        # torch's own limits on the non-zero modes: pads smaller than the input.
        if isinstance(padding, str) or any(p >= n for p, n in zip(pads, size, strict=True)):
            padding_mode = "zeros"
    return SiteSpec(
        ndim=ndim, in_channels=c_in, out_channels=c_out, kernel_size=kernel, stride=stride,
        padding=padding, dilation=dilation, groups=groups, bias=draw(st.booleans()),
        padding_mode=padding_mode, input_size=tuple(size), batch=draw(st.integers(1, 2)),
    )


@torch.no_grad()
def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Simulate training: non-trivial BN running stats and affine values, random new conv weights."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) * 2.0 + 0.3)
            if m.weight is not None:
                m.weight.copy_(torch.randn(n, generator=g))
                m.bias.copy_(torch.randn(n, generator=g) * 0.5)
    return model


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """max |a - ref| / max |ref| (with a floor so an all-zero reference does not divide by zero)."""
    a64, r64 = a.detach().to(torch.float64), ref.detach().to(torch.float64)
    return float((a64 - r64).abs().max() / r64.abs().max().clamp_min(1e-12))


def eager64(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The independent reference: a copy of the unfused model run in float64, eval mode, without grad."""
    with torch.no_grad():
        return copy.deepcopy(model).double().eval()(x.double())


def ort_run(model: Any, x: torch.Tensor, threads: int | None = None) -> Any:
    """The first output of an ONNX model (ModelProto, bytes or path) in onnxruntime on one input ``x``."""
    from xvol_compiler.verify import onnx_session

    session = onnx_session(model, threads=threads)
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def cast_copy(value: Any, dtype: torch.dtype) -> Any:
    """A detached copy of ``value`` (a tensor, or tuples / lists / dicts of them) with floating tensors in
    ``dtype``: later in-place ops of the model (timm's ``x += shortcut``) cannot change it."""
    if isinstance(value, torch.Tensor):
        return value.detach().to(dtype, copy=True) if value.is_floating_point() else value.detach().clone()
    if isinstance(value, (tuple, list)):
        return type(value)(cast_copy(v, dtype) for v in value)
    if isinstance(value, dict):
        return {k: cast_copy(v, dtype) for k, v in value.items()}
    return value


def tensors_in(value: Any) -> list[torch.Tensor]:
    """The tensors in an output (a tensor, or tuples / lists / dicts of them), in a fixed order."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in tensors_in(v)]
    if isinstance(value, dict):
        return [t for k in sorted(value) for t in tensors_in(value[k])]
    return []
