"""The PSSA transform as one constant-kernel depthwise conv and one multiply: equal to the literal
definition (values and gradients), one constant in every trace, and recognised in both graph passes
in its new and old encodings, while a real conv with a ring-shaped kernel stays a conv."""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import fx, nn

from tests.hyp import examples
from tests.onnx_counts import is_pssa_conv, site_convs
from tests.strategies import eager64 as _eager64
from tests.strategies import ort_run, randomize_bn, rel_err
from xvol_compiler import XVolution, analyze_model, fuse_with_report, pssa_transform, xvolify
from xvol_compiler.measure import count_macs
from xvol_compiler.onnx_io import export_onnx
from xvol_compiler.pssa import neighbour_offsets, pssa_kernel, pssa_kernel_layout
from xvol_compiler.rules import mark_pssa_transforms, node_info, pssa_products, xvolution_base
from xvol_passes.fuse_onnx import fuse_onnx
from xvol_passes.fx_graph import FxAdapter
from xvol_passes.onnx_graph import OnnxGraphAdapter

EXPORTERS = {"torchscript": dict(dynamo=False), "dynamo": dict(dynamo=True, optimize=True),
             "dynamo-noopt": dict(dynamo=True, optimize=False)}
ONNX_TOL = 1e-4


# ----------------------------------------------------------------------------- the literal definition


def literal_offsets(ndim: int, full: bool) -> set[tuple[int, ...]]:
    if full:
        return {o for o in itertools.product((-1, 0, 1), repeat=ndim) if any(o)}
    return {tuple(s if i == a else 0 for i in range(ndim)) for a in range(ndim) for s in (-1, 1)}


def literal_pssa(x: torch.Tensor, shifts: tuple[int, ...], full: bool, directional: bool) -> torch.Tensor:
    """T(x) by index arithmetic: copy d reads x at i + offset_d * L, zero outside; no padding, no slicing."""
    ndim = x.dim() - 2
    offsets = neighbour_offsets(ndim, "full" if full else "axial")  # (the order of the directional channels)
    assert set(offsets) == literal_offsets(ndim, full)
    copies = []
    for off in offsets:
        c = x
        for axis, (o, s) in enumerate(zip(off, shifts, strict=True)):
            n = x.shape[2 + axis]
            index = torch.arange(n) + o * s
            valid = ((index >= 0) & (index < n)).to(x.dtype)
            shape = [1] * x.dim()
            shape[2 + axis] = n
            c = c.index_select(2 + axis, index.clamp(0, n - 1)) * valid.view(shape)
        copies.append(c)
    if directional:
        n, ch = x.shape[:2]
        return torch.stack([x * c for c in copies], dim=2).reshape(n, ch * len(copies), *x.shape[2:])
    return x * (sum(copies) / len(copies))


@st.composite
def transform_cases(draw: st.DrawFn) -> tuple[torch.Tensor, tuple[int, ...] | int, bool, bool]:
    ndim = draw(st.sampled_from([1, 2, 3]))
    size = tuple(draw(st.lists(st.integers(1, 6), min_size=ndim, max_size=ndim)))
    per_axis = draw(st.booleans())
    shift = tuple(draw(st.lists(st.integers(1, 3), min_size=ndim, max_size=ndim))) if per_axis \
        else draw(st.integers(1, 3))
    full, directional = draw(st.booleans()), draw(st.booleans())
    batch, channels = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**16))
    x = torch.randn(batch, channels, *size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return x, shift, full, directional


@settings(max_examples=examples(200), deadline=None)
@given(case=transform_cases())
def test_transform_equals_literal_definition(case) -> None:
    x, shift, full, directional = case
    ndim = x.dim() - 2
    shifts = (shift,) * ndim if isinstance(shift, int) else shift
    got = pssa_transform(x, shift, "full" if full else "axial", directional)
    want = literal_pssa(x, shifts, full, directional)
    assert got.shape == want.shape
    assert float((got - want).abs().max()) <= 1e-12


@pytest.mark.parametrize(
    ("shape", "shift", "directions", "directional"),
    [((1, 2, 5, 4), 1, "full", False), ((2, 2, 4, 5), (1, 2), "axial", False), ((1, 2, 7), 2, "full", False),
     ((1, 1, 3, 2, 4), 1, "full", False), ((1, 1, 4, 3, 3), 2, "full", False), ((1, 2, 4, 4), 1, "full", True),
     ((1, 1, 2, 3, 2), 1, "axial", True)],
    ids=["2d", "2d-per-axis-axial", "1d-shift2", "3d", "3d-shift2", "2d-directional", "3d-directional-axial"],
)
def test_gradients_match_literal_definition(shape, shift, directions, directional) -> None:
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: pssa_transform(t, shift, directions, directional), (x,))
    ndim = len(shape) - 2
    shifts = (shift,) * ndim if isinstance(shift, int) else shift
    g = torch.randn_like(pssa_transform(x, shift, directions, directional))
    (got,) = torch.autograd.grad(pssa_transform(x, shift, directions, directional), x, g)
    (want,) = torch.autograd.grad(literal_pssa(x, shifts, directions == "full", directional), x, g)
    assert float((got - want).abs().max()) <= 1e-12


def test_kernel_patterns_and_layout_check() -> None:
    ring = pssa_kernel(2, "full", False, 3, torch.float64)
    assert ring.shape == (3, 1, 3, 3)
    want = torch.full((3, 3), 1 / 8, dtype=torch.float64)
    want[1, 1] = 0
    assert torch.equal(ring[1, 0], want)
    plus = pssa_kernel(3, "axial", False, 1, torch.float64)[0, 0]
    assert int((plus != 0).sum()) == 6 and float(plus[1, 1, 1]) == 0 and float(plus[0, 1, 1]) == 1 / 6
    onehot = pssa_kernel(2, "full", True, 2, torch.float32)
    assert onehot.shape == (16, 1, 3, 3) and torch.equal(onehot.sum((1, 2, 3)), torch.ones(16))
    for d, off in enumerate(neighbour_offsets(2)):  # filter d of channel 1 taps x[i + off]
        assert float(onehot[8 + d, 0, off[0] + 1, off[1] + 1]) == 1.0
    for ndim, directions, directional in itertools.product((1, 2, 3), ("axial", "full"), (False, True)):
        k = pssa_kernel(ndim, directions, directional, 4, torch.float32)
        layout = pssa_kernel_layout(k, 4)
        assert layout is not None and layout.directional == directional
        assert layout.directions == len(neighbour_offsets(ndim, directions))
        assert pssa_kernel_layout(3 * k, 4) is not None  # one common scale folded in
        bent = k.clone()
        bent[0, 0].view(-1)[3**ndim // 2] = 0.5  # a centre tap
        assert pssa_kernel_layout(bent, 4) is None
        uneven = k.clone()
        uneven[-1] *= 2  # one channel with another value
        assert pssa_kernel_layout(uneven, 4) is None


def test_kernel_is_no_state_and_survives_inference_mode() -> None:
    conv = nn.Conv2d(5, 5, 3, padding=1, groups=5)
    site = XVolution.from_conv(conv)
    keys = set(site.state_dict())
    with torch.inference_mode():  # the first use of this (channels, dtype) builds the cached kernel
        pssa_transform(torch.randn(1, 5, 6, 6, dtype=torch.float64))
    x = torch.randn(1, 5, 6, 6, dtype=torch.float64, requires_grad=True)
    pssa_transform(x).sum().backward()  # an inference tensor could not be saved for backward
    assert x.grad is not None and set(site.state_dict()) == keys
    assert not any("ring" in k or "kernel" in k for k in keys)


def test_one_constant_in_traces() -> None:
    torch.manual_seed(0)
    site = _trained(XVolution.from_conv(nn.Conv2d(3, 3, 3, padding=1, groups=3)))
    x = torch.randn(2, 3, 6, 6)
    gm = fx.symbolic_trace(site)
    assert [n.target for n in gm.graph.nodes if n.op == "call_function"].count(pssa_transform) == 1
    ep = torch.export.export(site, (x,))
    assert len(ep.constants) == 1
    built = {torch.ops.aten.zeros.default, torch.ops.aten.fill_.Scalar, torch.ops.aten.index_put_.default,
             torch.ops.aten.repeat.default}
    assert not any(n.target in built for n in ep.graph.nodes)
    assert rel_err(ep.module()(x), site(x)) <= 1e-6


@pytest.mark.compile
def test_sites_of_several_kernels_compile_fullgraph() -> None:
    """Two kernels (3 and 6 channels, 2-D full and 1-D) in one compiled graph."""
    torch.manual_seed(0)
    model = nn.Sequential(XVolution.from_conv(nn.Conv2d(3, 6, 3, padding=1)),
                          XVolution.from_conv(nn.Conv2d(6, 6, 3, padding=1, groups=6), directions="axial"),
                          nn.Flatten(2), XVolution.from_conv(nn.Conv1d(6, 6, 3, padding=1)))
    model = _trained(model)
    x = torch.randn(2, 3, 6, 6)
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        assert rel_err(compiled(x), model(x)) <= 1e-5


def test_macs_do_not_count_the_transform_conv() -> None:
    site = XVolution.from_conv(nn.Conv2d(8, 8, 3, padding=1, groups=8)).eval()
    x = torch.randn(1, 8, 10, 10)
    depthwise = 8 * 9 * 100
    assert count_macs(site, (x,)) == 2 * depthwise  # the site's conv and Conv_a only
    assert count_macs(site.fuse(), (x,)) == 2 * depthwise  # one conv over 2 * C_in channels


def test_xvolify_report_counts_the_transform_as_elements() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU())
    x = torch.randn(1, 3, 10, 10)
    xm = xvolify(model, sites="all", example_inputs=(x,))
    (site,) = xm.xvol_report.selected
    depthwise = 8 * 9 * 100
    assert (site.macs, site.added_macs, site.transform_elements) == (depthwise, depthwise, 8 * 100)
    pointwise = 3 * 8 * 100
    assert analyze_model(xm, example_inputs=(x,)).total_macs == pointwise + 2 * depthwise  # no ring conv MACs


# ----------------------------------------------------------------------------- spelled-out encodings


class SpelledSite(nn.Module):
    """An X-volution site written out by hand: conv(x) + BN(Conv_a(T(x))), T as the user spells it.

    ``encoding``: "ring" (x * conv(x, ring)), "directional" (one-hot conv, views, product),
    "avgpool" (the decomposition exported before the transform was a conv:
    avg-pool, scale, subtract, divide, multiply)."""

    def __init__(self, channels: int, encoding: str, shift: int = 1) -> None:
        super().__init__()
        self.encoding, self.shift, self.channels = encoding, shift, channels
        directional = encoding == "directional"
        self.register_buffer("ring", pssa_kernel(2, "full", directional, channels, torch.float32).clone())
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, groups=channels)
        self.attn_conv = nn.Conv2d(channels * (8 if directional else 1), channels, 3, padding=1, groups=channels,
                                   bias=False)
        self.attn_bn = nn.BatchNorm2d(channels)

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        c, s = self.channels, self.shift
        if self.encoding == "ring":
            return x * F.conv2d(x, self.ring, None, 1, s, s, c)
        if self.encoding == "directional":
            shifted = F.conv2d(x, self.ring, None, 1, s, s, c)
            return (shifted.unflatten(1, (c, 8)) * x.unsqueeze(2)).flatten(1, 2)
        box = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=True) * 9.0
        return x * ((box - x) / 8.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) + self.attn_bn(self.attn_conv(self.transform(x)))


class RingConvBN(nn.Module):
    """A real conv whose learned kernel happens to be the ring, then BN: no product with its input."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(pssa_kernel(2, "full", False, channels, torch.float32))
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x)))


class RingTimesOther(nn.Module):
    """A ring conv multiplied with another tensor than its input: a gating layer, not a PSSA transform."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.gate = nn.Conv2d(channels, channels, 1)
        self.register_buffer("ring", pssa_kernel(2, "full", False, channels, torch.float32).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gate(x) * F.conv2d(x, self.ring, None, 1, 1, 1, self.ring.shape[0])


def _trained(model: nn.Module) -> nn.Module:
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "conv" in name and p.dim() > 1:
                p.copy_(torch.randn_like(p) / 3)
    return randomize_bn(model, seed=2).eval()


@pytest.mark.parametrize("encoding", ["ring", "directional", "avgpool"])
def test_fx_fuses_spelled_out_sites(encoding: str) -> None:
    model = _trained(SpelledSite(4, encoding))
    x = torch.randn(2, 4, 9, 9)
    fused, report = fuse_with_report(model, example_inputs=(x,), graph=True)  # spelled-out sites: graph form
    assert report.count("x-volution") == 1, str(report)
    assert rel_err(fused(x), _eager64(model, x).float()) <= 1e-5


def test_fx_ring_conv_with_bn_folds_as_a_conv() -> None:
    model = randomize_bn(RingConvBN(4), seed=3).eval()
    x = torch.randn(2, 4, 7, 7)
    fused, report = fuse_with_report(model, example_inputs=(x,), graph=True)  # spelled-out sites: graph form
    assert report.count("conv+bn") == 1, str(report)
    assert rel_err(fused(x), _eager64(model, x).float()) <= 1e-5


def test_fx_conv_with_groups_computed_in_the_graph_is_left_alone() -> None:
    """``groups=x.shape[1]`` traces as a graph value: the conv cannot be read, the pass must not fail."""

    class ComputedGroups(SpelledSite):
        def transform(self, x: torch.Tensor) -> torch.Tensor:
            return x * F.conv2d(x, self.ring, None, 1, 1, 1, x.shape[1])

    model = _trained(ComputedGroups(4, "ring"))
    x = torch.randn(2, 4, 7, 7)
    fused, report = fuse_with_report(model, example_inputs=(x,), graph=True)  # spelled-out sites: graph form
    assert report.count("x-volution") == 0
    assert rel_err(fused(x), _eager64(model, x).float()) <= 1e-5


def test_view_recognises_only_products_with_the_convs_input() -> None:
    x = torch.randn(1, 4, 6, 6)
    gm = fx.symbolic_trace(RingTimesOther(4))
    assert pssa_products(FxAdapter(gm).view()) == {}
    gm = fx.symbolic_trace(RingConvBN(4))
    assert pssa_products(FxAdapter(gm).view()) == {}
    # the product with the conv's input, but the conv's output also read elsewhere: a layer, not T(x)
    class Shared(RingTimesOther):
        def forward(self, t: torch.Tensor) -> torch.Tensor:
            r = F.conv2d(t, self.ring, None, 1, 1, 1, self.ring.shape[0])
            return t * r + r

    assert pssa_products(FxAdapter(fx.symbolic_trace(Shared(4))).view()) == {}
    assert len(pssa_products(FxAdapter(fx.symbolic_trace(SpelledSite(4, "ring"))).view())) == 1
    assert Shared(4)(x).shape == x.shape


@pytest.mark.parametrize("tracer", ["make_fx", "torch.export"])
@pytest.mark.parametrize("encoding", ["ring", "directional"])
def test_aten_graphs_recognise_the_transform(tracer: str, encoding: str) -> None:
    """make_fx / torch.export spell the transform out as aten ops: the ring conv is the transform,
    the site's x is the base of its two branches."""
    from torch.fx.experimental.proxy_tensor import make_fx

    model = _trained(SpelledSite(4, encoding)) if encoding == "directional" else \
        _trained(XVolution.from_conv(nn.Conv2d(4, 4, 3, padding=1, groups=4)))
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        gm = make_fx(model)(x) if tracer == "make_fx" else torch.export.export(model, (x,)).module()
    view = FxAdapter(gm).view()
    products = pssa_products(view)
    assert len(products) == 1
    ring_conv, product = next(iter(products.items()))
    mark_pssa_transforms(view)
    assert node_info(view, ring_conv).kind == node_info(view, product).kind == "pssa"
    convs = [k for k in view.nodes if node_info(view, k).kind == "conv"]
    assert len(convs) == 2  # the site's conv and Conv_a stay convs
    x_node = next(iter(view.predecessors(ring_conv)))
    attention_input = next(k for k in convs if x_node not in view.predecessors(k))
    assert xvolution_base(view, [x_node, next(iter(view.predecessors(attention_input)))]) == (x_node, False)


# ----------------------------------------------------------------------------- ONNX


def _ort(model: onnx.ModelProto, x: torch.Tensor) -> np.ndarray:
    return ort_run(model, x, threads=1)


def _rel(a: np.ndarray, ref: np.ndarray | torch.Tensor) -> float:
    ref = np.asarray(ref, dtype=np.float64)
    return float(np.abs(np.asarray(a, dtype=np.float64) - ref).max() / max(np.abs(ref).max(), 1e-12))


ENCODINGS = {
    "depthwise": lambda: XVolution.from_conv(nn.Conv2d(4, 4, 3, padding=1, groups=4)),
    "grouped-axial-shift12": lambda: XVolution.from_conv(nn.Conv2d(4, 6, 3, padding=1, groups=2), shift=(1, 2),
                                                         directions="axial"),
    "1d": lambda: XVolution.from_conv(nn.Conv1d(4, 4, 3, padding=1)),
    "3d": lambda: XVolution.from_conv(nn.Conv3d(2, 2, 3, padding=1, groups=2)),
    "directional-conv": lambda: SpelledSite(4, "directional", shift=2),
    "old-avgpool": lambda: SpelledSite(4, "avgpool"),
}
# The unoptimised dynamo export of a 3-D site: the adapter reads Conv_a's BatchNorm bias chain as
# shape (2, 2) and refuses the fold; the same happens before the transform became a conv.
_KNOWN = {("3d", "dynamo-noopt"): "3-D BatchNorm bias chain of the unoptimised dynamo export is misread"}


@pytest.mark.parametrize(
    ("encoding", "exporter"),
    [pytest.param(e, x, id=f"{e}-{x}", marks=[pytest.mark.xfail(reason=_KNOWN[e, x])] if (e, x) in _KNOWN else [])
     for e in ENCODINGS for x in EXPORTERS],
)
def test_onnx_fuses_new_and_old_encodings(encoding: str, exporter: str) -> None:
    model = _trained(nn.Sequential(ENCODINGS[encoding]()))
    first = next(m for m in model.modules() if isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d))
    x = torch.randn(2, first.in_channels, *([6] * len(first.kernel_size)))
    unfused = export_onnx(model, None, (x,), **EXPORTERS[exporter])
    fused, report = fuse_onnx(unfused)
    assert report.count("x-volution") == 1, str(report)
    assert site_convs(fused) == 1
    assert _rel(_ort(fused, x), _ort(unfused, x)) <= ONNX_TOL
    assert _rel(_ort(fused, x), _eager64(model, x)) <= ONNX_TOL


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo-noopt"])
def test_onnx_ring_conv_with_bn_folds_as_a_conv(exporter: str) -> None:
    model = randomize_bn(RingConvBN(4), seed=3).eval()
    x = torch.randn(2, 4, 7, 7)
    unfused = export_onnx(model, None, (x,), **EXPORTERS[exporter])
    adapter = OnnxGraphAdapter(unfused)
    assert pssa_products(adapter.view()) == {}
    fused, report = fuse_onnx(unfused)
    nodes = list(fused.graph.node)
    assert [n.op_type for n in nodes].count("BatchNormalization") == 0
    assert not any(is_pssa_conv(n, nodes) for n in nodes if n.op_type == "Conv")
    if exporter == "dynamo-noopt":  # (the TorchScript exporter folds the BN itself)
        assert report.count("conv+bn") == 1, str(report)
    assert _rel(_ort(fused, x), _eager64(model, x)) <= ONNX_TOL


def test_onnx_view_marks_the_transform_conv() -> None:
    model = _trained(nn.Sequential(XVolution.from_conv(nn.Conv2d(4, 4, 3, padding=1, groups=4))))
    x = torch.randn(2, 4, 6, 6)
    unfused = export_onnx(model, None, (x,), **EXPORTERS["dynamo-noopt"])
    view = mark_pssa_transforms(OnnxGraphAdapter(unfused).view())
    kinds = [node_info(view, k).kind for k in view.nodes]
    assert kinds.count("pssa") == 2  # the ring conv and its product
    assert kinds.count("conv") == 2  # the site's conv and Conv_a
