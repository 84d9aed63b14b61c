"""Random CNNs for property tests: a hypothesis strategy over small, valid 2-D conv nets.

``random_cnns()`` draws a :class:`CNNSpec`: an input size and a list of layer
specs, each reading one or more earlier values (value 0 is the input, value
``i + 1`` the output of layer ``i``), so the network is a DAG. Shapes are
tracked while drawing, so every spec is valid by construction, and the model
is built deterministically from the spec (``spec.build(dtype, seed)``): a
failing example shrinks to a short spec, and ``spec.describe()`` (also the
spec's ``repr``) prints the architecture line by line.

Layers: ``Conv2d`` (kernel 1-7, non-square, stride 1-2, dilation 1-2, dense,
grouped or depthwise, bias or not, int / ``'same'`` / ``'valid'`` padding,
rarely a non-zero ``padding_mode``), ``BatchNorm2d``, ReLU/SiLU/GELU, residual
adds (``+``, ``torch.add``, ``+=``; a 1x1 projection conv when shapes differ),
channel concatenation, max/avg pooling, nearest/bilinear upsampling, and
RepVGG-like blocks (KxK conv+BN, optional 1x1 conv+BN, optional BN identity,
summed in random order with random add forms). Values nothing reads are
returned as the model's outputs (a tuple when there are several), so there is
no dead code.

Use outside the test suite::

    from hypothesis import given
    from tests.random_cnn import random_cnns

    @given(random_cnns(max_layers=6, max_channels=8))
    def test_my_pass(spec):
        model, x = spec.build(), spec.input()
        ...

``simulate_training(model, seed)`` gives every BatchNorm and parameter
non-trivial values of sane magnitude, and :func:`expected_fusion` computes,
from the spec alone, how many convolutions and BatchNorms a complete fusion
leaves (see its docstring for the rules).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from hypothesis import strategies as st
from torch import Tensor, nn

__all__ = [
    "ActSpec",
    "AddSpec",
    "BNSpec",
    "CNNSpec",
    "CatSpec",
    "ConvSpec",
    "FusionExpectation",
    "LayerSpec",
    "PoolSpec",
    "RandomCNN",
    "RepSpec",
    "UpSpec",
    "conv_names",
    "expected_fusion",
    "random_cnns",
    "simulate_training",
    "site_candidates",
]

Shape = tuple[int, int, int]  # (C, H, W)
Padding = tuple[int, int] | str


# --------------------------------------------------------------------------- layer specs


@dataclass(frozen=True)
class ConvSpec:
    """One ``nn.Conv2d``: its geometry and the value it reads."""

    src: int
    in_channels: int
    out_channels: int
    kernel: tuple[int, int]
    stride: tuple[int, int] = (1, 1)
    padding: Padding = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    bias: bool = True
    padding_mode: str = "zeros"

    def module(self) -> nn.Conv2d:
        return nn.Conv2d(self.in_channels, self.out_channels, self.kernel, self.stride, self.padding,
                         self.dilation, self.groups, bias=self.bias, padding_mode=self.padding_mode)

    def pads(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """(left, right) padding per axis, 'same'/'valid' resolved as torch resolves them."""
        if self.padding == "valid":
            return ((0, 0), (0, 0))
        if self.padding == "same":
            out = []
            for k, d in zip(self.kernel, self.dilation, strict=True):
                total = d * (k - 1)
                out.append((total // 2, total - total // 2))
            return (out[0], out[1])
        p = self.padding
        return ((p[0], p[0]), (p[1], p[1]))

    def out_shape(self, shape: Shape) -> Shape:
        sizes = []
        for n, k, s, d, (pl, pr) in zip(shape[1:], self.kernel, self.stride, self.dilation, self.pads(), strict=True):
            sizes.append((n + pl + pr - d * (k - 1) - 1) // s + 1)
        return (self.out_channels, sizes[0], sizes[1])

    def text(self) -> str:
        k, s, d = (f"{a}x{b}" for a, b in (self.kernel, self.stride, self.dilation))
        pad = self.padding if isinstance(self.padding, str) else f"{self.padding[0]}x{self.padding[1]}"
        extra = "" if self.padding_mode == "zeros" else f", mode={self.padding_mode}"
        return (f"Conv2d({self.in_channels}->{self.out_channels}, k={k}, s={s}, p={pad}, d={d}, g={self.groups}"
                f"{', bias' if self.bias else ''}{extra})")


@dataclass(frozen=True)
class BNSpec:
    src: int

    def text(self) -> str:
        return "BatchNorm2d"


@dataclass(frozen=True)
class ActSpec:
    src: int
    fn: str  # relu | silu | gelu

    def text(self) -> str:
        return self.fn.upper() if self.fn != "silu" else "SiLU"


@dataclass(frozen=True)
class AddSpec:
    """``a + b`` written as ``form``: ``"+"``, ``"torch.add"`` or ``"+="`` (in place on ``a``)."""

    a: int
    b: int
    form: str

    def text(self) -> str:
        return {"+": "v{a} + v{b}", "torch.add": "torch.add(v{a}, v{b})", "+=": "v{a} += v{b}"}[self.form].format(
            a=self.a, b=self.b)


@dataclass(frozen=True)
class CatSpec:
    srcs: tuple[int, ...]

    def text(self) -> str:
        return "cat(" + ", ".join(f"v{s}" for s in self.srcs) + ")"


@dataclass(frozen=True)
class PoolSpec:
    src: int
    kind: str  # max | avg
    kernel: int
    stride: int
    padding: int

    def module(self) -> nn.Module:
        cls = nn.MaxPool2d if self.kind == "max" else nn.AvgPool2d
        return cls(self.kernel, self.stride, self.padding)

    def out_shape(self, shape: Shape) -> Shape:
        c, h, w = shape
        size = [(n + 2 * self.padding - self.kernel) // self.stride + 1 for n in (h, w)]
        return (c, size[0], size[1])

    def text(self) -> str:
        return f"{self.kind.capitalize()}Pool2d(k={self.kernel}, s={self.stride}, p={self.padding})"


@dataclass(frozen=True)
class UpSpec:
    src: int
    mode: str  # nearest | bilinear

    def text(self) -> str:
        return f"Upsample(x2, {self.mode})"


@dataclass(frozen=True)
class RepSpec:
    """RepVGG-like block on value ``src``: ``kxk`` conv + BN, optional 1x1 conv + BN, optional BN identity,
    summed in ``order`` with one add ``form`` per sum (the accumulator is always a fresh tensor)."""

    src: int
    kxk: ConvSpec
    one: ConvSpec | None
    identity: bool
    order: tuple[str, ...]  # permutation of the present branches among "kxk", "1x1", "id"
    forms: tuple[str, ...]  # len(order) - 1 add forms

    def text(self) -> str:
        parts = [f"kxk={self.kxk.text()}+BN"]
        if self.one is not None:
            parts.append(f"1x1={self.one.text()}+BN")
        if self.identity:
            parts.append("id=BN")
        expr = self.order[0]
        for name, form in zip(self.order[1:], self.forms, strict=True):
            expr = {"+": f"({expr} + {name})", "torch.add": f"torch.add({expr}, {name})",
                    "+=": f"({expr} += {name})"}[form]
        return f"RepBlock({', '.join(parts)}; {expr})"


LayerSpec = ConvSpec | BNSpec | ActSpec | AddSpec | CatSpec | PoolSpec | UpSpec | RepSpec


def _reads(layer: LayerSpec) -> tuple[int, ...]:
    if isinstance(layer, AddSpec):
        return (layer.a, layer.b)
    if isinstance(layer, CatSpec):
        return layer.srcs
    return (layer.src,)


@dataclass(frozen=True, repr=False)
class CNNSpec:
    """A random CNN: input (batch, C, H, W) and its layers; ``shapes[v]`` is value v's (C, H, W)."""

    batch: int
    in_channels: int
    height: int
    width: int
    layers: tuple[LayerSpec, ...]
    shapes: tuple[Shape, ...] = field(default=())

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        return (self.batch, self.in_channels, self.height, self.width)

    def outputs(self) -> tuple[int, ...]:
        """Values nothing reads (the last value among them): the model returns these."""
        read = {v for layer in self.layers for v in _reads(layer)}
        return tuple(v for v in range(1, len(self.layers) + 1) if v not in read)

    def describe(self) -> str:
        lines = [f"RandomCNN: input {'x'.join(map(str, self.input_shape))} = v0"]
        for i, layer in enumerate(self.layers):
            c, h, w = self.shapes[i + 1]
            reads = "" if isinstance(layer, (AddSpec, CatSpec)) else f"(v{layer.src})"
            lines.append(f"  v{i + 1} = l{i}: {layer.text()}{reads}  -> {c}x{h}x{w}")
        lines.append("  outputs: " + ", ".join(f"v{v}" for v in self.outputs()))
        return "\n".join(lines)

    __repr__ = describe

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        """Hypothesis prints falsifying examples with this: the architecture, one layer a line."""
        printer.text(self.describe())

    def build(self, dtype: torch.dtype = torch.float64, seed: int = 0) -> RandomCNN:
        """The model, eval mode, default-initialised under ``seed`` (deterministic)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = RandomCNN(self)
        return model.to(dtype).eval()

    def input(self, dtype: torch.dtype = torch.float64, seed: int = 0, batch: int | None = None) -> Tensor:
        g = torch.Generator().manual_seed(seed)
        shape = (batch or self.batch, self.in_channels, self.height, self.width)
        return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


# --------------------------------------------------------------------------- the model


class RepBlock(nn.Module):
    """RepVGG-style training block: branches summed with ``+``, ``torch.add`` or ``+=`` as the spec says."""

    def __init__(self, spec: RepSpec) -> None:
        super().__init__()
        self.spec = spec
        self.kxk = spec.kxk.module()
        self.kxk_bn = nn.BatchNorm2d(spec.kxk.out_channels)
        if spec.one is not None:
            self.one = spec.one.module()
            self.one_bn = nn.BatchNorm2d(spec.one.out_channels)
        if spec.identity:
            self.id_bn = nn.BatchNorm2d(spec.kxk.out_channels)

    def _branch(self, name: str, x: Tensor) -> Tensor:
        if name == "kxk":
            return self.kxk_bn(self.kxk(x))
        if name == "1x1":
            return self.one_bn(self.one(x))
        return self.id_bn(x)

    def forward(self, x: Tensor) -> Tensor:
        y = self._branch(self.spec.order[0], x)
        for name, form in zip(self.spec.order[1:], self.spec.forms, strict=True):
            t = self._branch(name, x)
            if form == "+":
                y = y + t
            elif form == "torch.add":
                y = torch.add(y, t)
            else:
                y += t
        return y


_ACTS: dict[str, Callable[[], nn.Module]] = {"relu": nn.ReLU, "silu": nn.SiLU, "gelu": nn.GELU}


class RandomCNN(nn.Module):
    """A network built from a :class:`CNNSpec`; layer ``i`` is the attribute ``l{i}`` (if it has a module)."""

    def __init__(self, spec: CNNSpec) -> None:
        super().__init__()
        self.spec = spec
        for i, layer in enumerate(spec.layers):
            module: nn.Module | None = None
            if isinstance(layer, ConvSpec):
                module = layer.module()
            elif isinstance(layer, BNSpec):
                module = nn.BatchNorm2d(spec.shapes[layer.src][0])
            elif isinstance(layer, ActSpec):
                module = _ACTS[layer.fn]()
            elif isinstance(layer, PoolSpec):
                module = layer.module()
            elif isinstance(layer, UpSpec):
                module = nn.Upsample(scale_factor=2, mode=layer.mode)
            elif isinstance(layer, RepSpec):
                module = RepBlock(layer)
            if module is not None:
                self.add_module(f"l{i}", module)

    def describe(self) -> str:
        return self.spec.describe()

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, ...]:
        values = [x]
        for i, layer in enumerate(self.spec.layers):
            if isinstance(layer, AddSpec):
                a, b = values[layer.a], values[layer.b]
                if layer.form == "+":
                    y = a + b
                elif layer.form == "torch.add":
                    y = torch.add(a, b)
                else:
                    y = a
                    y += b
            elif isinstance(layer, CatSpec):
                y = torch.cat([values[s] for s in layer.srcs], 1)
            else:
                y = getattr(self, f"l{i}")(values[layer.src])
            values.append(y)
        outs = self.spec.outputs()
        return values[outs[0]] if len(outs) == 1 else tuple(values[v] for v in outs)


def conv_names(spec: CNNSpec) -> list[str]:
    """Qualified names of every ``nn.Conv2d`` the spec builds, in registration order."""
    names = []
    for i, layer in enumerate(spec.layers):
        if isinstance(layer, ConvSpec):
            names.append(f"l{i}")
        elif isinstance(layer, RepSpec):
            names.append(f"l{i}.kxk")
            if layer.one is not None:
                names.append(f"l{i}.one")
    return names


def conv_specs(spec: CNNSpec) -> dict[str, ConvSpec]:
    out: dict[str, ConvSpec] = {}
    for i, layer in enumerate(spec.layers):
        if isinstance(layer, ConvSpec):
            out[f"l{i}"] = layer
        elif isinstance(layer, RepSpec):
            out[f"l{i}.kxk"] = layer.kxk
            if layer.one is not None:
                out[f"l{i}.one"] = layer.one
    return out


# --------------------------------------------------------------------------- drawing


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@st.composite
def _conv(draw: st.DrawFn, src: int, shape: Shape, max_channels: int, allow_modes: bool = True) -> ConvSpec:
    c, h, w = shape
    style = draw(st.sampled_from(["dense", "dense", "grouped", "depthwise"]))
    if style == "depthwise" and c * 1 <= max_channels:
        mult = draw(st.integers(1, max(1, min(2, max_channels // c))))
        c_out, groups = c * mult, c
    else:
        c_out = draw(st.integers(1, max_channels))
        groups = draw(st.sampled_from(_divisors(math.gcd(c, c_out)))) if style == "grouped" else 1
    kernel = (draw(st.integers(1, 7)), draw(st.integers(1, 7)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    stride = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    kind = draw(st.sampled_from(["int", "int", "same", "valid"]))
    spans = [d * (k - 1) + 1 for k, d in zip(kernel, dilation, strict=True)]
    if kind == "same" and stride != (1, 1):
        kind = "int"
    if kind == "valid" and any(e > n for e, n in zip(spans, (h, w), strict=True)):
        kind = "int"
    padding: Padding
    if kind == "int":
        pads = []
        for e, n in zip(spans, (h, w), strict=True):
            lo = max(0, -(-(e - n) // 2))
            pads.append(draw(st.integers(lo, max(lo, e // 2))))
        padding = (pads[0], pads[1])
    else:
        padding = kind
    mode = "zeros"
    if allow_modes and draw(st.integers(0, 7)) == 0:
        mode = draw(st.sampled_from(["reflect", "replicate", "circular"]))
        ok = isinstance(padding, tuple) and all(p < n for p, n in zip(padding, (h, w), strict=True))
        if not ok:
            mode = "zeros"
    return ConvSpec(src, c, c_out, kernel, stride, padding, dilation, groups, draw(st.booleans()), mode)


@st.composite
def _rep(draw: st.DrawFn, src: int, shape: Shape, max_channels: int) -> RepSpec:
    c = shape[0]
    identity_ok = draw(st.booleans())
    c_out = c if identity_ok else draw(st.integers(1, max_channels))
    stride = (1, 1) if identity_ok else (draw(st.integers(1, 2)),) * 2
    groups = draw(st.sampled_from(_divisors(math.gcd(c, c_out))))
    kernel = (draw(st.sampled_from([3, 3, 5, 1])), draw(st.sampled_from([3, 3, 5, 1])))
    dilation = (draw(st.integers(1, 2)),) * 2
    pad = tuple(d * (k - 1) // 2 for k, d in zip(kernel, dilation, strict=True))
    kxk = ConvSpec(src, c, c_out, kernel, stride, (pad[0], pad[1]), dilation, groups, bias=False)
    one = None
    if draw(st.booleans()):
        one = ConvSpec(src, c, c_out, (1, 1), stride, (0, 0), (1, 1), groups, bias=False)
    identity = identity_ok and draw(st.booleans())
    branches = ["kxk"] + (["1x1"] if one is not None else []) + (["id"] if identity else [])
    order = tuple(draw(st.permutations(branches)))
    forms = tuple(draw(st.sampled_from(["+", "torch.add", "+="])) for _ in order[1:])
    return RepSpec(src, kxk, one, identity, order, forms)


_KINDS = ("conv", "rep", "bn", "act", "add", "conv", "cat", "pool", "up", "rep")


@st.composite
def random_cnns(
    draw: st.DrawFn,
    max_layers: int = 6,
    max_channels: int = 8,
    min_size: int = 3,
    max_size: int = 15,
    max_batch: int = 2,
    kinds: Sequence[str] = _KINDS,
    min_convs: int = 0,
    padding_modes: bool = True,
) -> CNNSpec:
    """A random valid CNN spec (see the module docstring); shrinks towards a short chain of convs.

    ``max_layers`` bounds the drawn steps (a residual add with a projection
    conv is two layers), ``max_channels`` every value's channels,
    ``min_size``/``max_size`` the odd input height and width, ``kinds`` the
    layer kinds drawn from (``"conv", "bn", "act", "rep", "add", "cat",
    "pool", "up"``); ``min_convs`` convs are appended when fewer were drawn;
    ``padding_modes`` lets convs draw (rarely) reflect/replicate/circular padding.
    """
    batch = draw(st.integers(1, max_batch))
    c = draw(st.integers(1, min(4, max_channels)))
    odd = st.integers(min_size // 2, max_size // 2).map(lambda k: 2 * k + 1)
    h, w = draw(odd), draw(odd)
    shapes: list[Shape] = [(c, h, w)]
    layers: list[LayerSpec] = []
    readers: dict[int, int] = {0: 0}
    frozen: set[int] = set()  # left operands of an in-place add: nothing else may read them
    relu_out: set[int] = set()  # ReLU outputs: autograd needs them unmodified, so never the target of +=
    n_steps = draw(st.integers(1, max_layers))

    def add_layer(layer: LayerSpec, shape: Shape) -> int:
        for v in _reads(layer):
            readers[v] += 1
        layers.append(layer)
        shapes.append(shape)
        readers[len(shapes) - 1] = 0
        return len(shapes) - 1

    for _ in range(n_steps):
        avail = [v for v in reversed(range(len(shapes))) if v not in frozen]
        src = avail[draw(st.integers(0, len(avail) - 1))] if draw(st.booleans()) else avail[0]
        shape = shapes[src]
        kind = draw(st.sampled_from(list(kinds)))
        if kind == "conv":
            conv = draw(_conv(src, shape, max_channels, padding_modes))
            add_layer(conv, conv.out_shape(shape))
        elif kind == "bn":
            add_layer(BNSpec(src), shape)
        elif kind == "act":
            v = add_layer(ActSpec(src, draw(st.sampled_from(["relu", "silu", "gelu"]))), shape)
            if isinstance(layers[-1], ActSpec) and layers[-1].fn == "relu":
                relu_out.add(v)
        elif kind == "rep":
            rep = draw(_rep(src, shape, max_channels))
            add_layer(rep, rep.kxk.out_shape(shape))
        elif kind == "add":
            same = [v for v in avail if v != src and shapes[v] == shape]
            if same:
                other = same[draw(st.integers(0, len(same) - 1))]
            else:
                other = _draw_projection(draw, avail, src, shapes, add_layer)
                if other is None:
                    add_layer(BNSpec(src), shape)
                    continue
            a, b = (other, src) if draw(st.booleans()) else (src, other)
            form = draw(st.sampled_from(["+", "torch.add", "+="]))
            if form == "+=" and (a == 0 or readers[a] > 0 or a in relu_out):
                form = "+"
            add_layer(AddSpec(a, b, form), shape)
            if form == "+=":
                frozen.add(a)
        elif kind == "cat":
            same = [v for v in avail if v != src and shapes[v][1:] == shape[1:]
                    and shapes[v][0] + shape[0] <= max_channels]
            if same and draw(st.booleans()):
                other = same[draw(st.integers(0, len(same) - 1))]
            elif 2 * shape[0] <= max_channels:
                other = src
            else:
                add_layer(ActSpec(src, "silu"), shape)
                continue
            srcs = (src, other) if draw(st.booleans()) else (other, src)
            add_layer(CatSpec(srcs), (shapes[srcs[0]][0] + shapes[srcs[1]][0], shape[1], shape[2]))
        elif kind == "pool":
            k = draw(st.integers(2, 3))
            s = draw(st.integers(1, 2))
            p = draw(st.integers(0, k // 2))
            if min(shape[1:]) + 2 * p < k:
                p = k // 2
            if min(shape[1:]) + 2 * p < k:
                add_layer(BNSpec(src), shape)
                continue
            pool = PoolSpec(src, draw(st.sampled_from(["max", "avg"])), k, s, p)
            add_layer(pool, pool.out_shape(shape))
        elif kind == "up":
            if 2 * max(shape[1:]) > max_size:
                add_layer(ActSpec(src, "gelu"), shape)
                continue
            add_layer(UpSpec(src, draw(st.sampled_from(["nearest", "bilinear"]))), (shape[0], 2 * shape[1],
                                                                                       2 * shape[2]))
    while sum(isinstance(layer, (ConvSpec, RepSpec)) for layer in layers) < min_convs:
        src = len(shapes) - 1
        conv = draw(_conv(src, shapes[src], max_channels, padding_modes))
        add_layer(conv, conv.out_shape(shapes[src]))
    return CNNSpec(batch, c, h, w, tuple(layers), tuple(shapes))


def _draw_projection(
    draw: st.DrawFn, avail: list[int], src: int, shapes: list[Shape], add_layer: Callable[[LayerSpec, Shape], int]
) -> int | None:
    """A 1x1 projection conv from some value onto ``src``'s shape (stride 1 or 2 per axis); its value."""
    target = shapes[src]
    options = []
    for v in avail:
        if v == src:
            continue
        strides = []
        for n, m in zip(shapes[v][1:], target[1:], strict=True):
            s = next((s for s in (1, 2) if (n - 1) // s + 1 == m), None)
            strides.append(s)
        if all(s is not None for s in strides):
            options.append((v, (strides[0], strides[1])))
    if not options:
        return None
    v, stride = options[draw(st.integers(0, len(options) - 1))]
    c_in = shapes[v][0]
    groups = draw(st.sampled_from(_divisors(math.gcd(c_in, target[0]))))
    proj = ConvSpec(v, c_in, target[0], (1, 1), stride, (0, 0), (1, 1), groups, draw(st.booleans()))
    return add_layer(proj, target)


# --------------------------------------------------------------------------- training simulation


@torch.no_grad()
def simulate_training(model: nn.Module, seed: int = 0, gain: float = 1.0) -> nn.Module:
    """Random BN statistics/affine values and conv weights of magnitude O(1) per layer.

    Conv weights ~ N(0, gain^2 / fan_in), biases ~ N(0, 0.1^2); BN: mean ~ N(0, 0.3^2),
    var ~ U(0.5, 2), |gamma| ~ U(0.5, 1.5) with a random sign, beta ~ N(0, 0.3^2).
    """
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> Tensor:
        return torch.rand(shape, generator=g, dtype=torch.float64)

    def randn(*shape: int) -> Tensor:
        return torch.randn(shape, generator=g, dtype=torch.float64)

    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(randn(n) * 0.3)
            m.running_var.copy_(rand(n) * 1.5 + 0.5)
            if m.weight is not None:
                sign = torch.where(rand(n) < 0.5, -1.0, 1.0)
                m.weight.copy_(sign * (rand(n) + 0.5))
                m.bias.copy_(randn(n) * 0.3)
        else:
            for name, p in m.named_parameters(recurse=False):
                if p.dim() >= 2:
                    fan_in = p[0].numel()
                    p.copy_(randn(*p.shape) * gain / math.sqrt(fan_in))
                elif name == "bias":
                    p.copy_(randn(*p.shape) * 0.1)
    return model


# --------------------------------------------------------------------------- expected fusion


def _is_spatial(conv: ConvSpec) -> bool:
    return max(conv.kernel) > 1


def _is_patch_embedding(conv: ConvSpec) -> bool:
    no_pad = conv.padding == "valid" or conv.padding == (0, 0)
    return no_pad and conv.kernel == conv.stride and max(conv.stride) > 1


def site_candidates(spec: CNNSpec, policy: Any) -> list[str]:
    """The conv names a site policy selects, computed from the spec (the README's "Selecting sites" and
    ``SiteSelection``).

    ``policy``: ``"all"``, a list of names, ``"re:<pattern>"`` or ``("kernel", k)``/``("even_out", None)``
    tuples as the tests draw them. Policies other than explicit names skip patch embeddings (kernel ==
    stride > 1, no padding), and pointwise convs unless the policy names the kernel size.
    """
    convs = conv_specs(spec)
    if isinstance(policy, list):
        return [n for n in convs if n in policy]
    auto = [n for n, c in convs.items() if _is_spatial(c) and not _is_patch_embedding(c)]
    if policy == "all":
        return auto
    if isinstance(policy, str) and policy.startswith("re:"):
        rx = re.compile(policy[3:])
        return [n for n in auto if rx.search(n)]
    kind, arg = policy
    if kind == "kernel":  # SiteSelection(kernel_sizes={k}): exact kernel, pointwise included
        return [n for n, c in convs.items() if c.kernel == (arg, arg) and not _is_patch_embedding(c)]
    if kind == "even_out":
        return [n for n in auto if convs[n].out_channels % 2 == 0]
    raise ValueError(f"unknown policy {policy!r}")


def _pads_aligned(small: ConvSpec, big: ConvSpec) -> bool:
    """docs/operator.md, section 4: branches share stride, groups, dilation (for kernels > 1) and padding
    alignment, i.e. the small
    kernel sits on the big kernel's tap grid with the same output size for every input size."""
    if small.stride != big.stride or small.groups != big.groups:
        return False
    if small.padding_mode != big.padding_mode and any(p != (0, 0) for p in small.pads()):
        return False
    for axis in range(2):
        ks, kb = small.kernel[axis], big.kernel[axis]
        ds, db = small.dilation[axis], big.dilation[axis]
        (pls, prs), (plb, prb) = small.pads()[axis], big.pads()[axis]
        if ks > 1 and ds != db:
            return False
        left, right = plb - pls, prb - prs
        if left < 0 or right < 0 or left % db or right % db:
            return False
        if left // db + ks + right // db != kb:
            return False
    return True


def extra_branch_ok(conv: ConvSpec, branch: str) -> bool:
    """Whether ``XVolution`` can add ``branch`` ("1x1", "identity", "bn") to a site of this geometry."""
    if branch == "bn":
        return True
    if branch == "identity" and (conv.in_channels != conv.out_channels or conv.stride != (1, 1)):
        return False
    if branch == "1x1":
        pads = []
        for k, d, (pl, pr) in zip(conv.kernel, conv.dilation, conv.pads(), strict=True):
            if k % 2 == 0 or pl != pr:
                return False
            pads.append(pl - d * (k - 1) // 2)
        if any(p < 0 for p in pads):
            return False
        small = ConvSpec(0, conv.in_channels, conv.out_channels, (1, 1), conv.stride, (pads[0], pads[1]),
                         (1, 1), conv.groups, False)
        return _pads_aligned(small, conv)
    small = ConvSpec(0, conv.in_channels, conv.out_channels, (1, 1), (1, 1), (0, 0), (1, 1), conv.groups, False)
    return _pads_aligned(small, conv)


@dataclass
class _Node:
    kind: str  # input | conv | bn | add | pssa | other
    inputs: list[int]
    shape: Shape
    conv: ConvSpec | None = None  # geometry (src unused) for conv nodes


@dataclass(frozen=True)
class FusionExpectation:
    """What a complete fusion of a (xvolified) spec leaves: conv and BatchNorm counts, and the rewrites."""

    convs: int
    batchnorms: int
    sites: int
    rewrites: tuple[str, ...]


def expected_fusion(spec: CNNSpec, sites: Iterable[str] = (), extra_branches: Sequence[str] = ()) -> FusionExpectation:
    """Convs and BatchNorms left after fusing ``spec`` with X-volution at ``sites``, from the spec alone.

    The data-flow graph of the spec is rewritten to a fixpoint with docs/operator.md's
    conditions, independently of the library's rules:

    - conv -> BN, the conv's output read by nothing else: one conv.
    - X-volution site (any extra branches): one conv over ``[x, T(x)]``.
    - ``conv_a + conv_b`` (both outputs read only by the add): one conv when the
      kernels nest with stride, groups, dilation and padding aligned, and either
      both read the same inputs or one input is computed from another without a
      conv or the network input in between (``[x, f(x)]`` interleaved, as
      X-volution's ``[x, T(x)]``), all inputs of the same spatial size.
    - ``conv(x) + BN(x)`` and ``conv(x) + x`` (C_in == C_out, stride 1, centre
      aligned): one conv.

    A model with no BatchNorm and no site is left untouched (``fuse`` has nothing to do).
    """
    sites = set(sites)
    nodes: dict[int, _Node] = {}
    value_node: dict[int, int] = {}
    outputs: list[int] = []
    counter = iter(range(10**9))

    def new(kind: str, inputs: list[int], shape: Shape, conv: ConvSpec | None = None) -> int:
        key = next(counter)
        nodes[key] = _Node(kind, list(inputs), shape, conv)
        return key

    value_node[0] = new("input", [], spec.shapes[0])
    has_bn = False

    def conv_node(name: str, conv: ConvSpec, x: int) -> int:
        out_shape = conv.out_shape(nodes[x].shape)
        if name not in sites:
            return new("conv", [x], out_shape, conv)
        t = new("pssa", [x], nodes[x].shape)
        return new("conv", [x, t], out_shape, conv)  # the site, fused (its branches are aligned by construction)

    for i, layer in enumerate(spec.layers):
        shape = spec.shapes[i + 1]
        if isinstance(layer, ConvSpec):
            key = conv_node(f"l{i}", layer, value_node[layer.src])
        elif isinstance(layer, BNSpec):
            key = new("bn", [value_node[layer.src]], shape)
            has_bn = True
        elif isinstance(layer, AddSpec):
            key = new("add", [value_node[layer.a], value_node[layer.b]], shape)
        elif isinstance(layer, RepSpec):
            has_bn = True
            x = value_node[layer.src]
            terms = {}
            terms["kxk"] = new("bn", [conv_node(f"l{i}.kxk", layer.kxk, x)], shape)
            if layer.one is not None:
                terms["1x1"] = new("bn", [conv_node(f"l{i}.one", layer.one, x)], shape)
            if layer.identity:
                terms["id"] = new("bn", [x], shape)
            key = terms[layer.order[0]]
            for name in layer.order[1:]:
                key = new("add", [key, terms[name]], shape)
        else:
            key = new("other", [value_node[v] for v in _reads(layer)], shape)
        value_node[i + 1] = key
    outputs = [value_node[v] for v in spec.outputs()]

    if not has_bn and not sites:
        convs = sum(1 for n in nodes.values() if n.kind == "conv")
        return FusionExpectation(convs, 0, 0, ())
    rewrites = _rewrite_to_fixpoint(nodes, outputs)
    return FusionExpectation(
        convs=sum(1 for n in nodes.values() if n.kind == "conv"),
        batchnorms=sum(1 for n in nodes.values() if n.kind == "bn"),
        sites=len(sites),
        rewrites=tuple(rewrites),
    )


def _users(nodes: dict[int, _Node], outputs: list[int]) -> dict[int, int]:
    users = dict.fromkeys(nodes, 0)
    for n in nodes.values():
        for i in set(n.inputs):  # distinct consumers, as a graph counts them
            users[i] += 1
    for o in outputs:
        users[o] += 1
    return users


def _derives(nodes: dict[int, _Node], derived: int, base: int) -> bool:
    """``derived`` is computed from ``base`` alone, with no conv and no network input in between."""
    stack, seen, reached = [derived], {derived}, False
    while stack:
        key = stack.pop()
        if nodes[key].kind in ("conv", "input"):
            return False
        for pred in nodes[key].inputs:
            if pred == base:
                reached = True
            elif pred not in seen:
                seen.add(pred)
                stack.append(pred)
    return reached


def _replace(nodes: dict[int, _Node], outputs: list[int], old: int, new_key: int) -> None:
    for n in nodes.values():
        n.inputs = [new_key if i == old else i for i in n.inputs]
    outputs[:] = [new_key if o == old else o for o in outputs]


def _merge_geometry(a: ConvSpec, b: ConvSpec) -> ConvSpec | None:
    big, small = (a, b) if math.prod(a.kernel) >= math.prod(b.kernel) else (b, a)
    if all(s <= bb for s, bb in zip(small.kernel, big.kernel, strict=True)) and _pads_aligned(small, big):
        return big
    if all(s <= bb for s, bb in zip(big.kernel, small.kernel, strict=True)) and _pads_aligned(big, small):
        return small
    return None


def _rewrite_to_fixpoint(nodes: dict[int, _Node], outputs: list[int]) -> list[str]:
    done: list[str] = []
    while True:
        users = _users(nodes, outputs)
        step = _conv_bn(nodes, users) or _conv_sum(nodes, users) or _identity_sum(nodes, users)
        if step is None:
            return done
        kind, old_keys, conv, inputs, out = step
        key = max(nodes) + 1
        nodes[key] = _Node("conv", inputs, nodes[out].shape, conv)
        _replace(nodes, outputs, out, key)
        for k in old_keys:
            del nodes[k]
        done.append(kind)


Step = tuple[str, list[int], ConvSpec, list[int], int]


def _conv_bn(nodes: dict[int, _Node], users: dict[int, int]) -> Step | None:
    for key, n in nodes.items():
        if n.kind == "bn" and nodes[n.inputs[0]].kind == "conv" and users[n.inputs[0]] == 1:
            c = nodes[n.inputs[0]]
            return ("conv+bn", [n.inputs[0], key], c.conv, list(c.inputs), key)  # type: ignore[list-item]
    return None


def _conv_sum(nodes: dict[int, _Node], users: dict[int, int]) -> Step | None:
    for key, n in nodes.items():
        if n.kind != "add" or n.inputs[0] == n.inputs[1]:
            continue
        a, b = (nodes[i] for i in n.inputs)
        if a.kind != "conv" or b.kind != "conv" or any(users[i] != 1 for i in n.inputs):
            continue
        inputs = list(dict.fromkeys(a.inputs + b.inputs))
        if len(inputs) > 1:
            if len({nodes[i].shape[1:] for i in inputs}) != 1:
                continue
            if not any(all(_derives(nodes, o, base) for o in inputs if o != base) for base in inputs):
                continue
        merged = _merge_geometry(a.conv, b.conv)  # type: ignore[arg-type]
        if merged is None:
            continue
        return ("conv-sum", [*n.inputs, key], merged, inputs, key)
    return None


def _identity_sum(nodes: dict[int, _Node], users: dict[int, int]) -> Step | None:
    """conv(x) + BN(x) and conv(x) + x."""
    for key, n in nodes.items():
        if n.kind != "add" or n.inputs[0] == n.inputs[1]:
            continue
        for ci, other in (n.inputs, n.inputs[::-1]):
            c = nodes[ci]
            if c.kind != "conv" or users[ci] != 1:
                continue
            o = nodes[other]
            x = o.inputs[0] if o.kind == "bn" and users[other] == 1 else other
            if x not in c.inputs or nodes[x].shape[0] != c.conv.out_channels:  # type: ignore[union-attr]
                continue
            conv = c.conv
            ident = ConvSpec(0, conv.out_channels, conv.out_channels, (1, 1), (1, 1), (0, 0), (1, 1),  # type: ignore[union-attr]
                             conv.groups, False)  # type: ignore[union-attr]
            if not _pads_aligned(ident, conv):  # type: ignore[arg-type]
                continue
            old = [ci, key] + ([other] if x != other else [])
            return ("identity-sum", old, conv, list(c.inputs), key)  # type: ignore[arg-type]
    return None


def forward_values(model: nn.Module, x: Tensor) -> list[Tensor]:
    """The model's output(s) as a list of tensors."""
    out = model(x)
    return list(out) if isinstance(out, tuple) else [out]


def rel_error(got: Sequence[Tensor], ref: Sequence[Tensor]) -> float:
    """max over outputs of max|got - ref| / max|ref| (floored), in float64."""
    assert len(got) == len(ref)
    worst = 0.0
    for a, r in zip(got, ref, strict=True):
        assert a.shape == r.shape, (a.shape, r.shape)
        a64, r64 = a.detach().to(torch.float64), r.detach().to(torch.float64)
        worst = max(worst, float((a64 - r64).abs().max() / r64.abs().max().clamp_min(1e-12)))
    return worst
