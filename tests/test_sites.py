"""Site discovery and selection, checked against strides and MACs computed from the layer geometry.

The random CNNs below are built from a plan whose every layer keeps sizes
exact (odd kernels with padding k // 2, pools and patch convs with kernel ==
stride, inputs divisible by the total stride), so the output stride of each
conv call is the product of the strides before it: the test never looks at
a tensor shape to know what the answer should be.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from tests.hyp import examples
from xvol_compiler.sites import (
    SiteSelection,
    SiteSelectionError,
    analyze_model,
    as_selection,
    nominal_stride,
    select_sites,
)

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
POOL = {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d}


@dataclass
class ConvPlan:
    """What a conv is, and the strides (per axis, cumulative) at which it is called."""

    name: str
    c_in: int
    c_out: int
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    groups: int
    patch: bool = False
    calls: list[tuple[int, ...]] = field(default_factory=list)  # cumulative stride per axis, per call


@dataclass
class NetPlan:
    ndim: int
    size: tuple[int, ...]
    in_channels: int
    layers: list[tuple]  # ("conv", ConvPlan) | ("res", ConvPlan, ConvPlan, ConvPlan | None) | ("pool", s) | ...
    convs: dict[str, ConvPlan]
    head: ConvPlan | None
    head_taps: list[int]
    aux: ConvPlan
    fc_in: int


def _axes(draw: st.DrawFn, ndim: int, values: list[int]) -> tuple[int, ...]:
    if draw(st.integers(0, 4)) == 0:  # sometimes anisotropic
        return tuple(draw(st.sampled_from(values)) for _ in range(ndim))
    return (draw(st.sampled_from(values)),) * ndim


@st.composite
def net_plans(draw: st.DrawFn) -> NetPlan:
    ndim = draw(st.sampled_from([1, 2, 2, 2, 3]))
    c = draw(st.sampled_from([2, 3, 4]))
    in_channels = c
    cum = (1,) * ndim
    layers: list[tuple] = []
    convs: dict[str, ConvPlan] = {}
    taps: list[tuple[int, tuple[int, ...]]] = []  # (channels, cumulative stride) after each layer
    max_total = 24 if ndim < 3 else 8
    odd = [3, 1, 3, 5] if ndim < 3 else [3, 1, 3]

    def conv(name: str, c_in: int, c_out: int, stride: tuple[int, ...], patch: bool = False) -> ConvPlan:
        if patch:
            kernel = stride
            groups = 1
        else:
            kernel = _axes(draw, ndim, odd)
            groups = draw(st.sampled_from([1, 1, math.gcd(c_in, c_out)]))
        plan = ConvPlan(name, c_in, c_out, kernel, stride, groups, patch)
        convs[name] = plan
        return plan

    for i in range(draw(st.integers(1, 7))):
        kind = draw(st.sampled_from(["conv", "conv", "res", "pool", "patch", "twice"]))
        stride = _axes(draw, ndim, [1, 1, 2, 2, 3])
        if any(t * s > max_total for t, s in zip(cum, stride, strict=True)):
            stride = (1,) * ndim
        c_out = draw(st.sampled_from([2, 4, 6]))
        if kind == "pool":
            if all(s == 1 for s in stride):
                stride = (1,) * (ndim - 1) + (2,) if cum[-1] * 2 <= max_total else stride
            layers.append(("pool", stride))
            cum = tuple(t * s for t, s in zip(cum, stride, strict=True))
            taps.append((c, cum))
            continue
        if kind == "patch" and any(s > 1 for s in stride):
            p = conv(f"body.{i}", c, c_out, stride, patch=True)
            cum = tuple(t * s for t, s in zip(cum, stride, strict=True))
            p.calls.append(cum)
            layers.append(("conv", p))
        elif kind == "res":
            a = conv(f"body.{i}.conv1", c, c_out, stride)
            cum = tuple(t * s for t, s in zip(cum, stride, strict=True))
            a.calls.append(cum)
            b = conv(f"body.{i}.conv2", c_out, c_out, (1,) * ndim)
            b.calls.append(cum)
            sc = None
            if c != c_out or any(s > 1 for s in stride):
                sc = ConvPlan(f"body.{i}.shortcut", c, c_out, (1,) * ndim, stride, 1)
                sc.calls.append(cum)
                convs[sc.name] = sc
            layers.append(("res", a, b, sc))
        elif kind == "twice":
            t = conv(f"body.{i}", c, c, (1,) * ndim)
            t.calls += [cum, cum]
            layers.append(("twice", t))
            c_out = c
        else:
            p = conv(f"body.{i}", c, c_out, stride)
            cum = tuple(t * s for t, s in zip(cum, stride, strict=True))
            p.calls.append(cum)
            layers.append(("conv", p))
        c = c_out
        taps.append((c, cum))
    head, head_taps = None, []
    if draw(st.booleans()):  # a shared head conv, called after every layer with matching channels
        head = conv("head", c, 2, (1,) * ndim)
        head_taps = [i for i, (ch, _) in enumerate(taps) if ch == c]
        head.calls += [taps[i][1] for i in head_taps]
    aux = conv("aux", c, 2, (1,) * ndim)  # never called: a training-only head
    scale = draw(st.integers(1, 2))
    size = tuple(t * scale * (1 if t > 4 else 2) for t in cum)
    return NetPlan(ndim, size, in_channels, layers, convs, head, head_taps, aux, c)


class _Res(nn.Module):
    def __init__(self, a: nn.Module, b: nn.Module, sc: nn.Module | None) -> None:
        super().__init__()
        self.conv1, self.conv2 = a, b
        self.shortcut = sc if sc is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv2(torch.relu(self.conv1(x))) + self.shortcut(x))


class _Twice(nn.Module):
    def __init__(self, conv: nn.Module) -> None:
        super().__init__()
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.relu(self.conv(x)))


def _build_conv(p: ConvPlan, ndim: int) -> nn.Module:
    pad = 0 if p.patch else tuple(k // 2 for k in p.kernel)
    return CONV[ndim](p.c_in, p.c_out, p.kernel, p.stride, pad, groups=p.groups)


class RandomCNN(nn.Module):
    def __init__(self, plan: NetPlan) -> None:
        super().__init__()
        nd = plan.ndim
        body: dict[str, nn.Module] = {}
        for i, layer in enumerate(plan.layers):
            if layer[0] == "pool":
                body[str(i)] = POOL[nd](layer[1], layer[1])
            elif layer[0] == "res":
                body[str(i)] = _Res(*(None if p is None else _build_conv(p, nd) for p in layer[1:]))
            elif layer[0] == "twice":
                # a conv called twice: "body.i" is _Twice, the conv is body.i.conv; rename in the plan
                body[str(i)] = _Twice(_build_conv(layer[1], nd))
            else:
                body[str(i)] = _build_conv(layer[1], nd)
        self.body = nn.ModuleDict(body)
        self.head = _build_conv(plan.head, nd) if plan.head is not None else None
        self.head_taps = set(plan.head_taps)
        self.aux = _build_conv(plan.aux, nd)
        self.fc = nn.Linear(plan.fc_in, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        extra = x.new_zeros(())
        for i, block in enumerate(self.body.values()):
            x = block(x)
            if self.head is not None and i in self.head_taps:
                extra = extra + self.head(x).mean()
        return self.fc(x.flatten(2).mean(-1)) + extra


def _rename_twice(plan: NetPlan) -> None:
    for layer in plan.layers:
        if layer[0] == "twice":
            p = layer[1]
            plan.convs.pop(p.name)
            p.name += ".conv"
            plan.convs[p.name] = p


def _expected_stride(plan: NetPlan, cum: tuple[int, ...]) -> tuple[float | tuple[float, ...], float | None]:
    """The documented rule on the exact cumulative strides: each axis to its nearest power of two (log scale)."""

    def pow2(v: int) -> float:
        return float(2.0 ** round(math.log2(v)))

    spatial = tuple(pow2(v) for v in (cum[1:] if plan.ndim == 3 else cum))
    temporal = pow2(cum[0]) if plan.ndim == 3 else None
    os_ = spatial[0] if len(set(spatial)) == 1 else spatial
    return os_, temporal


def _expected_macs(plan: NetPlan, p: ConvPlan) -> int:
    total = 0
    for cum in p.calls:
        out = math.prod(n // t for n, t in zip(plan.size, cum, strict=True))
        total += out * p.c_out * (p.c_in // p.groups) * math.prod(p.kernel)
    return total


def _make(plan: NetPlan) -> tuple[nn.Module, torch.Tensor]:
    _rename_twice(plan)
    torch.manual_seed(0)
    model = RandomCNN(plan).eval()
    return model, torch.randn(1, plan.in_channels, *plan.size)


@settings(max_examples=examples(30))
@given(net_plans())
def test_analysis_matches_geometry(plan: NetPlan) -> None:
    model, x = _make(plan)
    found = analyze_model(model, x)
    assert set(found.convs) == set(plan.convs)
    for name, p in plan.convs.items():
        info = found.convs[name]
        assert info.ran == bool(p.calls), name
        expected = [_expected_stride(plan, cum) for cum in p.calls]
        assert list(info.output_strides) == [e[0] for e in expected], name
        if plan.ndim == 3:
            assert list(info.temporal_strides) == [e[1] for e in expected], name
        else:
            assert info.temporal_strides is None
        assert info.macs == _expected_macs(plan, p), name
        assert info.patch_embedding == p.patch, name
    total = sum(_expected_macs(plan, p) for p in plan.convs.values()) + plan.fc_in * 3
    assert found.total_macs == total


@st.composite
def policies(draw: st.DrawFn, names: list[str], strides: list) -> SiteSelection:
    kw: dict = {}
    if draw(st.integers(0, 1)) == 1:
        present = sorted(set(strides), key=str)
        wanted = {draw(st.sampled_from(present))} if present else set()
        kw["output_strides"] = wanted | draw(st.sets(st.sampled_from([1.0, 2.0, 4.0, 16.0]), max_size=2))
    if draw(st.integers(0, 3)) == 3:
        kw["kernel_sizes"] = draw(st.sets(st.sampled_from([1, 3, 5, (1, 3), (3, 1), (3, 5)]), min_size=1))
    if draw(st.integers(0, 3)) == 3:
        kw["min_kernel"] = 1
    if draw(st.integers(0, 2)) == 2:
        kw["names"] = draw(st.lists(st.sampled_from(names), min_size=1, max_size=4, unique=True))
    if draw(st.integers(0, 4)) == 4:
        kw["regex"] = draw(st.sampled_from([r"conv1$", r"^body\.[0-2]", r"head|aux", r"\.conv"]))
    if draw(st.integers(0, 4)) == 4:
        kw["predicate"] = lambda name, module, info: info.geometry.out_channels % 4 == 0
    kw["include_patch_embeddings"] = draw(st.booleans())
    kw["shared_calls"] = draw(st.sampled_from(["any", "all"]))
    if draw(st.integers(0, 2)) == 2:
        kw["max_sites"] = draw(st.integers(1, 4))
    if draw(st.integers(0, 3)) == 3:
        kw["max_added_mac_fraction"] = draw(st.sampled_from([0.01, 0.1, 0.3, 1.0]))
    return SiteSelection(**kw)


def _expected_selection(plan: NetPlan, sel: SiteSelection, total_macs: int) -> list[str]:
    """The documented policy, written out on the plan (names, geometry, cumulative strides)."""
    cands = []
    for name, p in plan.convs.items():
        named = sel.names is not None and name in sel.names
        strides = [_expected_stride(plan, cum) for cum in p.calls]
        if not p.calls and not named:
            continue
        if p.patch and not named and not sel.include_patch_embeddings:
            continue
        if sel.kernel_sizes is not None:
            if not (p.kernel in sel.kernel_sizes or (len(set(p.kernel)) == 1 and p.kernel[0] in sel.kernel_sizes)):
                continue
        elif max(p.kernel) < sel.min_kernel and not named:
            continue
        if sel.output_strides is not None:
            hits = [s in sel.output_strides for s, _ in strides]
            if not hits or not (any(hits) if sel.shared_calls == "any" else all(hits)):
                continue
        if sel.names is not None and not named:
            continue
        if sel.regex is not None and not sel.regex.search(name):
            continue
        if sel.predicate is not None and p.c_out % 4 != 0:
            continue
        cands.append(name)
    if sel.max_sites is None and sel.max_added_mac_fraction is None:
        return sorted(cands)
    macs = {n: _expected_macs(plan, plan.convs[n]) for n in cands}
    taken, used = [], 0
    limit = (sel.max_added_mac_fraction or math.inf) * total_macs
    for n in sorted(cands, key=lambda n: (-macs[n], n)):
        if sel.max_sites is not None and len(taken) >= sel.max_sites:
            continue
        if used + macs[n] > limit:
            continue
        taken.append(n)
        used += macs[n]
    return sorted(taken)


@settings(max_examples=examples(50))
@given(st.data())
def test_selection_matches_policy(data: st.DataObject) -> None:
    plan = data.draw(net_plans())
    model, x = _make(plan)
    strides = [_expected_stride(plan, cum)[0] for p in plan.convs.values() for cum in p.calls]
    sel = data.draw(policies(sorted(plan.convs), strides))
    found = analyze_model(model, x)
    total = sum(_expected_macs(plan, p) for p in plan.convs.values()) + plan.fc_in * 3
    expected = _expected_selection(plan, sel, total)
    if not expected:
        with pytest.raises(SiteSelectionError, match="no site of RandomCNN matches"):
            select_sites(model, found, sel)
        return
    decisions = select_sites(model, found, sel)
    assert sorted(d.info.name for d in decisions if d.selected) == expected
    for d in decisions:
        assert d.reason, d.info.name  # every verdict says why


@settings(max_examples=examples(10))
@given(net_plans())
def test_fx_and_hook_analysis_agree(plan: NetPlan) -> None:
    model, x = _make(plan)
    fx = analyze_model(model, x, analysis="fx")
    hooks = analyze_model(model, x, analysis="hooks")
    assert fx.path == "fx+hooks" and hooks.path == "hooks"
    assert fx.total_macs == hooks.total_macs
    for name in plan.convs:
        assert fx.convs[name].calls == hooks.convs[name].calls


def test_nominal_stride_rounds_trimmed_ratios() -> None:
    assert nominal_stride(16.0) == 16.0
    assert nominal_stride(3.0) == 4.0  # log2(3) = 1.58
    assert nominal_stride(160 / 8) == 16.0  # inception_v3 at 160 px: integral by coincidence
    assert nominal_stride(224 / 12) == 16.0  # inception_v3 at 224 px: unpadded convs trim borders
    assert nominal_stride(299 / 35) == 8.0
    assert nominal_stride(0.5) == 0.5
    with pytest.raises(ValueError, match="positive"):
        nominal_stride(0.0)


def test_shorthands() -> None:
    assert as_selection("os16").output_strides == {16.0}
    assert as_selection("os8").describe() == "os8"
    assert as_selection("all") == SiteSelection(label="all")
    assert as_selection("re:layer3").regex.pattern == "layer3"
    assert as_selection(re.compile("x")).regex.pattern == "x"
    assert as_selection(["a", "b"]).names == ("a", "b")
    assert as_selection("layer3.0.conv2").names == ("layer3.0.conv2",)
    pred = lambda name, module, info: True  # noqa: E731
    assert as_selection(pred).predicate is pred
    with pytest.raises(TypeError, match="not a selection"):
        as_selection(3)
    with pytest.raises(ValueError, match="max_sites"):
        SiteSelection(max_sites=0)
    with pytest.raises(ValueError, match="conv_types"):
        SiteSelection(conv_types=["Linear"])


def _small_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, 2, 1), nn.ReLU(), nn.Conv2d(4, 8, 3, 2, 1), nn.BatchNorm2d(8),
        nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 3, 2, 1),
    ).eval()


def test_unknown_name_lists_close_matches() -> None:
    model = _small_net()
    found = analyze_model(model, torch.randn(1, 3, 32, 32))
    with pytest.raises(SiteSelectionError, match=r"'55' is not a conv.*close matches: 5") as err:
        select_sites(model, found, ["55"])
    with pytest.raises(SiteSelectionError, match="'3' is a BatchNorm2d, not a Conv1d/2d/3d"):
        select_sites(model, found, ["3"])
    assert "unknown site name" in str(err.value)


def test_empty_selection_says_what_exists() -> None:
    model = _small_net()
    found = analyze_model(model, torch.randn(1, 3, 32, 32))
    with pytest.raises(SiteSelectionError) as err:
        select_sites(model, found, "os16")
    msg = str(err.value)
    assert "output strides present: 2 (1), 4 (1), 8 (1)" in msg
    assert "no candidate at output stride 16" in msg
    assert "1 pointwise" in msg
    assert [d.info.name for d in select_sites(model, found, "os8") if d.selected] == ["5"]


def test_functional_and_custom_convs_are_reported() -> None:
    class WS(nn.Conv2d):  # weight-standardised conv: its forward only computes its weight
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            w = self.weight - self.weight.mean(dim=(1, 2, 3), keepdim=True)
            return F.conv2d(x, w, self.bias, self.stride, self.padding)

    class Scaled(nn.Conv2d):  # its forward does more than a convolution: a swap would drop it
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) * 2.0

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 4, 3, 2, 1)
            self.ws = WS(4, 4, 3, 1, 1)
            self.sc = Scaled(4, 4, 3, 1, 1)
            self.k = nn.Parameter(torch.randn(4, 4, 3, 3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.conv2d(self.sc(self.ws(self.a(x))), self.k, padding=1)

    model = Net().eval()
    found = analyze_model(model, torch.randn(1, 3, 16, 16))
    assert found.path == "fx+hooks"
    assert len(found.functional_convs) == 1 and "output stride 2" in found.functional_convs[0]
    assert found.convs["ws"].calls, "a conv subclass is a leaf: its calls are recorded"
    decisions = {d.info.name: d for d in select_sites(model, found, "all")}
    assert decisions["a"].selected and decisions["ws"].selected and not decisions["sc"].selected
    assert decisions["sc"].reason.startswith("custom forward")
    with pytest.raises(SiteSelectionError, match="custom forward"):
        select_sites(model, found, ["sc"])


def test_analysis_leaves_the_model_as_it_was() -> None:
    model = _small_net().train()
    model[3].eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [m.training for m in model.modules()]
    analyze_model(model, torch.randn(1, 3, 32, 32))
    assert [m.training for m in model.modules()] == flags
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(m._forward_hooks for m in model.modules())
