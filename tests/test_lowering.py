"""Deploy lowerings of a fused site (channel, spatial, spatial-h, stack, split): exact or refused with a reason, in the
module form (XVolution.fuse), the FX pass and the ONNX pass; selection per backend; exports."""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, note, settings
from hypothesis import strategies as st
from torch import nn

from tests.hyp import examples
from tests.onnx_counts import site_convs
from tests.strategies import SiteSpec, conv_sites, randomize_bn, rel_err
from xvol_compiler import XVolution, XVolutionDeploy, fuse, xvolify
from xvol_compiler.fold import Branch, ConvGeometry, FoldError
from xvol_compiler.lowering import (
    LOWERINGS,
    SPATIAL_LOWERINGS,
    check_lowering,
    interleave_factor,
    spatial_axis,
    spatial_layout,
    spatial_weight,
    stack_layout,
    stack_weight,
)
from xvol_compiler.pssa import interleave_groups, interleave_spatial, neighbour_offsets, stack_depth
from xvol_compiler.verify import onnx_session
from xvol_passes.fuse_fx import fuse_with_report
from xvol_passes.fuse_onnx import fuse_onnx
from xvol_passes.lower import choose_lowering

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")


@st.composite
def sites(draw: st.DrawFn, ndims: tuple[int, ...] = (1, 2, 3)) -> tuple[SiteSpec, dict]:
    """A random conv geometry and X-volution options: shift, neighbourhood, directional."""
    spec = draw(conv_sites(ndims=ndims, max_kernel=5))
    axial = draw(st.booleans())
    directions = len(neighbour_offsets(spec.ndim, "axial" if axial else None))
    options = {"shift": draw(st.integers(1, 2)), "directions": directions, "directional": draw(st.booleans())}
    return spec, options


def _trained_site(spec: SiteSpec, options: dict, seed: int = 0) -> XVolution:
    site = XVolution.from_conv(spec.conv(torch.float64), **options)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        site.attn_conv.weight.copy_(torch.randn(site.attn_conv.weight.shape, generator=g, dtype=torch.float64))
    randomize_bn(site, seed)
    return site.eval()


def _expect_refusal(site: XVolution, lowering: str) -> str:
    """The reason check_lowering gives for the site's merged branch (raises if it accepts it)."""
    w, b = site.deploy_weights()
    factor = 1 + (site.directions if site.directional else 1)
    c = site.in_channels
    g = site.geometry
    merged = ConvGeometry(factor * c, g.out_channels, g.kernel_size, g.stride, g.padding, g.dilation, g.groups,
                          g.padding_mode)
    with pytest.raises(FoldError) as err:
        check_lowering(Branch(("x", "t"), (c, (factor - 1) * c), merged, w, b), lowering, single_conv=False)
    return str(err.value)


# --------------------------------------------------------------------------- the math


def test_spatial_weight_is_the_literal_interleave() -> None:
    """conv(interleave_spatial([x, T]), spatial weight) == conv(interleave_groups([x, T]), weight), by loops."""
    g = torch.Generator().manual_seed(0)
    c, k, groups, c_out = 4, 3, 2, 6
    w = torch.randn(c_out, (1 + k) * c // groups, 2, 3, generator=g, dtype=torch.float64)
    sw = spatial_weight(w, groups, 1 + k)
    assert sw.shape == (c_out, c // groups, 2, 3 * (1 + k))
    for o in range(c_out):
        for i in range(c // groups):
            for t in range(3):
                assert torch.equal(sw[o, i, :, (1 + k) * t], w[o, i, :, t])
                for d in range(k):
                    assert torch.equal(sw[o, i, :, (1 + k) * t + 1 + d], w[o, c // groups + i * k + d, :, t])
    x = torch.randn(2, c, 5, 7, generator=g, dtype=torch.float64)
    t = torch.randn(2, k * c, 5, 7, generator=g, dtype=torch.float64)
    z = interleave_spatial([x, t])
    assert z.shape == (2, c, 5, 7 * (1 + k))
    assert torch.equal(z[:, 1, 2, (1 + k) * 3], x[:, 1, 2, 3])
    assert torch.equal(z[:, 1, 2, (1 + k) * 3 + 2], t[:, 1 * k + 1, 2, 3])
    ref = F.conv2d(interleave_groups([x, t], groups), w, None, (1, 2), (1, 1), 1, groups)
    got = F.conv2d(z, sw, None, (1, 2 * (1 + k)), (1, (1 + k)), 1, groups)
    assert rel_err(got, ref) <= 1e-12


def test_width_dilation_refuses_spatial_with_its_reason() -> None:
    geometry = ConvGeometry(8, 4, (3, 3), (1, 1), (2, 2), (1, 2), 4)
    with pytest.raises(FoldError, match="dilation 2 on the last axis"):
        spatial_layout(geometry, 2, asymmetric_pads=False)
    w = torch.zeros(4, 2, 3, 3)
    branch = Branch(("x", "t"), (4, 4), geometry, w, None)
    assert interleave_factor(branch) == 2
    choice = choose_lowering(branch, lowering="spatial")
    assert choice.lowering == "channel" and "dilation" in choice.reason


def test_spatial_h_weight_is_the_literal_interleave() -> None:
    """The H interleave, by loops: tap ``(1+k) t + j`` of H reads input j, W untouched; 3-D and 2-D."""
    g = torch.Generator().manual_seed(1)
    c, k, groups, c_out = 4, 2, 2, 4
    w = torch.randn(c_out, (1 + k) * c // groups, 2, 3, 2, generator=g, dtype=torch.float64)
    sw = spatial_weight(w, groups, 1 + k, spatial_axis("spatial-h"))
    assert sw.shape == (c_out, c // groups, 2, 3 * (1 + k), 2)
    for o in range(c_out):
        for i in range(c // groups):
            for t in range(3):
                assert torch.equal(sw[o, i, :, (1 + k) * t], w[o, i, :, t])
                for d in range(k):
                    assert torch.equal(sw[o, i, :, (1 + k) * t + 1 + d], w[o, c // groups + i * k + d, :, t])
    x = torch.randn(2, c, 3, 5, 4, generator=g, dtype=torch.float64)
    t = torch.randn(2, k * c, 3, 5, 4, generator=g, dtype=torch.float64)
    z = interleave_spatial([x, t], -2)
    assert z.shape == (2, c, 3, 5 * (1 + k), 4)
    for h in range(5):
        assert torch.equal(z[:, :, :, (1 + k) * h], x[:, :, :, h])
        for d in range(k):
            assert torch.equal(z[:, 1, :, (1 + k) * h + 1 + d], t[:, 1 * k + d, :, h])
    ref = F.conv3d(interleave_groups([x, t], groups), w, None, (1, 2, 1), (1, 1, 0), 1, groups)
    got = F.conv3d(z, sw, None, (1, 2 * (1 + k), 1), (1, 1 + k, 0), 1, groups)
    assert rel_err(got, ref) <= 1e-12
    w2 = w[..., 0]
    x2, t2 = x[:, :, 0], t[:, :, 0]
    ref2 = F.conv2d(interleave_groups([x2, t2], groups), w2, None, (2, 1), (1, 0), 1, groups)
    got2 = F.conv2d(interleave_spatial([x2, t2], -2), spatial_weight(w2, groups, 1 + k, -2), None,
                    (2 * (1 + k), 1), (1 + k, 0), 1, groups)
    assert rel_err(got2, ref2) <= 1e-12


def test_stack_weight_is_the_literal_stack() -> None:
    """conv3d(stack_depth([x, T]), stack weight) == conv2d(interleave_groups([x, T]), weight), by loops: tap j
    of the new axis reads input j, the site's kernel, stride, padding and dilation untouched; 1-D too."""
    g = torch.Generator().manual_seed(2)
    c, k, groups, c_out = 4, 2, 2, 6
    w = torch.randn(c_out, (1 + k) * c // groups, 3, 2, generator=g, dtype=torch.float64)
    sw = stack_weight(w, 1 + k)
    assert sw.shape == (c_out, c // groups, 1 + k, 3, 2)
    for o in range(c_out):
        for i in range(c // groups):
            assert torch.equal(sw[o, i, 0], w[o, i])
            for d in range(k):
                assert torch.equal(sw[o, i, 1 + d], w[o, c // groups + i * k + d])
    x = torch.randn(2, c, 6, 7, generator=g, dtype=torch.float64)
    t = torch.randn(2, k * c, 6, 7, generator=g, dtype=torch.float64)
    z = stack_depth([x, t])
    assert z.shape == (2, c, 1 + k, 6, 7)
    for ch in range(c):
        assert torch.equal(z[:, ch, 0], x[:, ch])
        for d in range(k):
            assert torch.equal(z[:, ch, 1 + d], t[:, ch * k + d])
    ref = F.conv2d(interleave_groups([x, t], groups), w, None, (2, 1), (1, 1), (2, 1), groups)
    got = F.conv3d(z, sw, None, (1, 2, 1), (0, 1, 1), (1, 2, 1), groups)
    assert got.shape[2] == 1 and rel_err(got.squeeze(2), ref) <= 1e-12
    layout = stack_layout(ConvGeometry((1 + k) * c, c_out, (3, 2), (2, 1), (1, 1), (2, 1), groups), 1 + k,
                          asymmetric_pads=False)
    assert (layout.geometry.kernel_size, layout.geometry.stride, layout.geometry.dilation) == (
        (1 + k, 3, 2), (1, 2, 1), (1, 2, 1))
    assert layout.geometry.padding == (0, 1, 1) and layout.pre_pads is None
    w1, x1, t1 = w[..., 0], x[..., 0], t[..., 0]
    ref1 = F.conv1d(interleave_groups([x1, t1], groups), w1, None, 2, 1, 1, groups)
    got1 = F.conv2d(stack_depth([x1, t1]), stack_weight(w1, 1 + k), None, (1, 2), (0, 1), 1, groups)
    assert rel_err(got1.squeeze(2), ref1) <= 1e-12


def test_stack_refusals_say_why() -> None:
    """stack: a 3-D site would need a 4-D conv; asymmetric or non-zero padding is applied to the inputs
    first where the conv cannot do it (torch modules), kept in the conv where it can (ONNX)."""
    three_d = ConvGeometry(8, 4, (3, 3, 3), (1, 1, 1), (1, 1, 1), (1, 1, 1), 4)
    branch = Branch(("x", "t"), (4, 4), three_d, torch.zeros(4, 2, 3, 3, 3), None)
    why = "a 3-D site would need a 4-D convolution, which torch and ONNX do not have; use spatial"
    with pytest.raises(FoldError, match=why):
        check_lowering(branch, "stack")
    choice = choose_lowering(branch, lowering="stack")
    assert choice.lowering == "channel" and choice.reason == f"stack refused: {why}"
    asym = ConvGeometry(8, 4, (3, 3), (1, 1), ((0, 1), (1, 1)), (1, 1), 4)
    torch_layout = stack_layout(asym, 2, asymmetric_pads=False)
    assert torch_layout.pre_pads == ((0, 1), (1, 1)) and torch_layout.geometry.padding == (0, 0, 0)
    onnx_layout = stack_layout(asym, 2, asymmetric_pads=True)
    assert onnx_layout.pre_pads is None and onnx_layout.pads == ((0, 0), (0, 1), (1, 1))
    reflect = ConvGeometry(8, 4, (3, 3), (1, 1), (1, 1), (1, 1), 4, "reflect")
    layout = stack_layout(reflect, 2, asymmetric_pads=True)
    assert layout.pre_pads == ((1, 1), (1, 1)) and layout.pre_mode == "reflect"
    assert layout.geometry.padding_mode == "zeros" and layout.geometry.padding == (0, 0, 0)


def test_spatial_h_refusals_say_why() -> None:
    """spatial-h: a 1-D site has no H axis; a dilated H is not an interleaved kernel (a dilated W is fine)."""
    one_d = ConvGeometry(8, 4, (3,), (1,), (1,), (1,), 4)
    branch = Branch(("x", "t"), (4, 4), one_d, torch.zeros(4, 2, 3), None)
    with pytest.raises(FoldError, match="a 1-D site has no H axis; use spatial"):
        check_lowering(branch, "spatial-h")
    check_lowering(branch, "spatial")
    with pytest.raises(ValueError, match="axis=-2 is not a spatial axis of a 3-D tensor"):
        interleave_spatial([torch.zeros(1, 4, 5), torch.zeros(1, 4, 5)], -2)
    choice = choose_lowering(branch, lowering="spatial-h")
    assert choice.lowering == "channel" and choice.reason == "spatial-h refused: a 1-D site has no H axis; use spatial"
    dilated_h = ConvGeometry(8, 4, (3, 3), (1, 1), (2, 2), (2, 1), 4)
    with pytest.raises(FoldError, match="dilation 2 on the H axis: the interleaved taps are not a dilated kernel"):
        spatial_layout(dilated_h, 2, asymmetric_pads=False, axis=-2)
    choice = choose_lowering(Branch(("x", "t"), (4, 4), dilated_h, torch.zeros(4, 2, 3, 3), None),
                             lowering="spatial-h")
    assert choice.lowering == "channel" and "spatial-h refused: dilation 2 on the H axis" in choice.reason
    dilated_w = ConvGeometry(8, 4, (3, 3), (1, 1), (1, 2), (1, 2), 4)
    layout = spatial_layout(dilated_w, 2, asymmetric_pads=False, axis=-2)
    assert layout.geometry.kernel_size == (6, 3) and layout.geometry.dilation == (1, 2)
    assert choose_lowering(Branch(("x", "t"), (4, 4), dilated_w, torch.zeros(4, 2, 3, 3), None),
                           lowering="spatial-h").lowering == "spatial-h"


def test_split_needs_single_conv_false() -> None:
    model = nn.Sequential(XVolution.from_conv(nn.Conv2d(4, 4, 3, padding=1, groups=4))).eval()
    with pytest.raises(ValueError, match="single_conv=False"):
        fuse(model, example_inputs=torch.randn(1, 4, 8, 8), lowering="split")
    with pytest.raises(ValueError, match="backend"):
        fuse(model, example_inputs=torch.randn(1, 4, 8, 8), backend="tpu")
    with pytest.raises(ValueError, match="lowering"):
        fuse(model, example_inputs=torch.randn(1, 4, 8, 8), lowering="diagonal")


# --------------------------------------------------------------------------- module form and FX pass


@settings(max_examples=examples(50))
@given(case=sites(), seed=st.integers(0, 2**16))
def test_every_lowering_equals_the_unfused_site(case: tuple[SiteSpec, dict], seed: int) -> None:
    """float64: each lowering (module form and FX pass) within 1e-10 of the eval training form, or refused
    with a reason and then exact as "channel"."""
    spec, options = case
    note(f"{spec} {options}")
    site = _trained_site(spec, options, seed)
    x = spec.input(torch.float64, seed)
    with torch.no_grad():
        ref = site(x)
    model = nn.Sequential(site).eval()
    for lowering in LOWERINGS:
        try:
            deploy = site.fuse(lowering, single_conv=False)
        except FoldError:
            reason = _expect_refusal(site, lowering)
            assert reason.strip()
            assert lowering in (*SPATIAL_LOWERINGS, "stack")
        else:
            with torch.no_grad():
                assert rel_err(deploy(x), ref) <= 1e-10, lowering
        fused, report = fuse_with_report(model, example_inputs=x, lowering=lowering, single_conv=False,
                                         rtol=1e-10)
        (outcome,) = [o for o in report.fused if o.kind == "x-volution"]
        note(str(report))
        with torch.no_grad():
            assert rel_err(fused(x), ref) <= 1e-10
        if outcome.lowering != lowering:
            assert outcome.lowering == "channel" and f"{lowering} refused: " in outcome.lowering_reason
            assert outcome.lowering_reason.split("refused: ", 1)[1] == _expect_refusal(site, lowering)
        convs = [m for m in fused.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d))]
        assert len(convs) == (2 if outcome.lowering == "split" else 1)
        if outcome.lowering in (*SPATIAL_LOWERINGS, "stack"):
            assert convs[0].in_channels == spec.in_channels  # x's channels only: T moved to a spatial axis
        if outcome.lowering == "stack":  # one axis more, T's taps on it
            factor = 1 + (options["directions"] if options["directional"] else 1)
            assert convs[0].weight.dim() == spec.ndim + 3 and convs[0].kernel_size[0] == factor
            assert tuple(convs[0].kernel_size[1:]) == tuple(spec.kernel_size)


@pytest.mark.parametrize(("lowering", "kernel", "stride"), [("spatial", (3, 6), (1, 2)),
                                                            ("spatial-h", (6, 3), (2, 1))])
def test_depthwise_spatial_keeps_one_input_channel_per_group(lowering: str, kernel: tuple, stride: tuple) -> None:
    site = _trained_site(SiteSpec(2, 6, 6, (3, 3), (1, 1), (1, 1), (1, 1), 6, True, "zeros", (9, 9), 1), {})
    deploy = site.fuse(lowering)
    assert isinstance(deploy, XVolutionDeploy) and deploy.lowering == lowering
    assert deploy.conv.groups == deploy.conv.in_channels == 6
    assert tuple(deploy.conv.kernel_size) == kernel and tuple(deploy.conv.stride) == stride


@settings(max_examples=examples(20, long=200))
@given(case=sites(ndims=(2,)), seed=st.integers(0, 2**16), backend=st.sampled_from(["eager", "compile"]))
def test_auto_is_exact_and_says_why(case: tuple[SiteSpec, dict], seed: int, backend: str) -> None:
    spec, options = case
    site = _trained_site(spec, options, seed)
    x = spec.input(torch.float64, seed)
    with torch.no_grad():
        ref = site(x)
    fused, report = fuse_with_report(nn.Sequential(site).eval(), example_inputs=x, backend=backend, rtol=1e-10)
    (outcome,) = [o for o in report.fused if o.kind == "x-volution"]
    note(str(report))
    assert outcome.lowering in ("channel", "spatial", "stack")
    if "only exact" not in outcome.lowering_reason:
        assert outcome.lowering_reason.startswith("rule "), outcome.lowering_reason
        depthwise = spec.groups == spec.in_channels
        # lowering_table: depthwise -> spatial; grouped under compile -> stack ([GC]; a 3-D site has no
        # stack form and takes the rule's next, channel); everything else -> channel
        stack = spec.groups > 1 and backend == "compile" and "stack refused" not in outcome.lowering_reason
        assert outcome.lowering == ("spatial" if depthwise else "stack" if stack else "channel")
    with torch.no_grad():
        assert rel_err(fused(x), ref) <= 1e-10


def _depthwise_model() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 4, 3, padding=1))
    x = torch.randn(2, 3, 12, 12)
    xm = xvolify(model, sites=["3", "6"], example_inputs=x, directional=False)
    randomize_bn(xm, 1)
    for m in xm.modules():
        if isinstance(m, XVolution):
            nn.init.normal_(m.attn_conv.weight)
    return xm.eval(), x


@pytest.mark.parametrize("lowering", ["spatial", "spatial-h", "stack", "split"])
def test_fused_lowering_compiles_and_exports(lowering: str) -> None:
    """torch.compile(fullgraph=True), torch.export and both torch.onnx exporters take the lowered FX model."""
    xm, x = _depthwise_model()
    with torch.no_grad():
        ref = xm(x)
    fused = fuse(xm, example_inputs=x, lowering=lowering, single_conv=False)
    assert set(fused.xvol_fusion_report.lowerings().values()) == {lowering}
    torch._dynamo.reset()
    with torch.no_grad():
        assert rel_err(torch.compile(fused, fullgraph=True)(x), ref) <= 1e-5
        assert rel_err(torch.export.export(fused, (x,)).module()(x), ref) <= 1e-5
    for dynamo in (False, True):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if dynamo:
                proto = torch.onnx.export(fused, (x,), dynamo=True, verbose=False).model_proto
            else:
                buf = io.BytesIO()
                torch.onnx.export(fused, (x,), buf, dynamo=False)
                proto = onnx.load_from_string(buf.getvalue())
        sess = onnx_session(proto)
        got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
        assert rel_err(torch.from_numpy(got), ref) <= 1e-5


def test_fused_state_dict_reloads_with_the_recorded_lowerings() -> None:
    xm, x = _depthwise_model()
    fused = fuse(xm, example_inputs=x, lowering="spatial")
    lowerings = fused.xvol_fusion_report.lowerings()
    assert set(lowerings.values()) == {"spatial"}
    fresh = fuse(_depthwise_model()[0], example_inputs=x, verify=False, lowering=lowerings)
    fresh.load_state_dict(fused.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh(x), fused(x))


# --------------------------------------------------------------------------- ONNX pass


def _export_site(model: nn.Module, x: torch.Tensor, opset: int) -> onnx.ModelProto:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), buf, dynamo=False, opset_version=17, input_names=["x"],
                          dynamic_axes={"x": {0: "batch"}})
    proto = onnx.load_from_string(buf.getvalue())
    if opset != 17:
        proto = onnx.version_converter.convert_version(proto, opset)
    return proto


def _ort_run(proto: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = onnx_session(proto, threads=1)
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


@settings(max_examples=examples(25, long=1000))
@given(case=sites(), seed=st.integers(0, 2**16), opset=st.sampled_from([17, 21]))
def test_onnx_pass_reproduces_each_lowering(case: tuple[SiteSpec, dict], seed: int, opset: int) -> None:
    """Every lowering written by fuse_onnx passes the full checker at opsets 17 and 21 and runs in
    onnxruntime within 1e-4 of the float64 unfused site, at another batch size than exported."""
    spec, options = case
    # TorchScript writes padding='same' with dilation as auto_pad=SAME_*, which onnxruntime refuses to run.
    assume(not (spec.padding == "same" and any(d > 1 for d in spec.dilation)))
    if spec.padding_mode == "circular":
        # (Converted to opset 21 the exporter's Slice/Concat circular pad no longer fuses in any lowering.)
        opset = 17
    note(f"{spec} {options} opset {opset}")
    site = _trained_site(spec, options, seed)
    model = nn.Sequential(site).eval()
    x = spec.input(torch.float64, seed)
    proto = _export_site(model.float(), x.float(), opset)
    x3 = torch.cat([x, x.flip(0), -x])  # another batch size: the graph's batch is dynamic
    with torch.no_grad():
        ref = model.double()(x3)
    for lowering in LOWERINGS:
        fused, report = fuse_onnx(proto, lowering=lowering, single_conv=False, example_inputs=[x.float().numpy()])
        onnx.checker.check_model(fused, full_check=True)
        assert fused.opset_import[0].version == opset
        (outcome,) = [o for o in report.fused if o.kind == "x-volution"]
        note(str(report))
        if outcome.lowering != lowering:
            assert outcome.lowering == "channel" and f"{lowering} refused: " in outcome.lowering_reason
        got = torch.from_numpy(_ort_run(fused, x3.float().numpy()))
        assert rel_err(got, ref) <= 1e-4, lowering
        convs = site_convs(fused)  # (the PSSA transform's constant-kernel conv aside)
        assert convs == (2 if outcome.lowering == "split" else 1)


def _export_dynamic(model: nn.Module, x: torch.Tensor, axes: dict[int, str]) -> onnx.ModelProto:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), buf, dynamo=False, opset_version=17, input_names=["x"],
                          dynamic_axes={"x": axes})
    return onnx.load_from_string(buf.getvalue())


@pytest.mark.parametrize("directional", [False, True])
def test_onnx_spatial_h_with_dynamic_sizes(directional: bool) -> None:
    """The Reshape merging the interleave into H writes W (or, W dynamic, the merged H): spatial-h is written
    while H or W is static and runs at other sizes of the dynamic one; with both dynamic it is refused with
    the reason, the site kept "channel" (exact)."""
    options = {"directional": True, "directions": 4} if directional else {}
    spec = SiteSpec(2, 3, 3, (3, 3), (1, 1), (1, 1), (1, 1), 3, True, "zeros", (6, 7), 2)
    model = nn.Sequential(_trained_site(spec, options, 4)).eval().float()
    x = spec.input(torch.float32, 4)
    for axes, other in (({0: "n", 2: "h"}, (5, 9, 7)), ({0: "n", 3: "w"}, (1, 6, 10)),
                        ({0: "n", 2: "h", 3: "w"}, (3, 5, 8))):
        fused, report = fuse_onnx(_export_dynamic(model, x, axes), lowering="spatial-h")
        (outcome,) = [o for o in report.fused if o.kind == "x-volution"]
        if len(axes) == 3:
            why = ("the directional spatial interleave needs static spatial sizes (all but one axis)" if directional
                   else "the spatial-h interleave needs a static H or W (the Reshape merging the interleave into H "
                        "writes W)")
            assert outcome.lowering == "channel" and outcome.lowering_reason == f"spatial-h refused: {why}"
        else:
            assert outcome.lowering == "spatial-h", outcome.lowering_reason
        x2 = torch.randn(other[0], 3, *other[1:])
        with torch.no_grad():
            ref = model.double()(x2.double())
        model.float()
        assert rel_err(torch.from_numpy(_ort_run(fused, x2.numpy())), ref) <= 1e-4


@pytest.mark.parametrize("directional", [False, True])
def test_onnx_stack_with_dynamic_sizes(directional: bool) -> None:
    """The stack's Unsqueeze and Concat take any size; the Reshape splitting a directional T's channels writes
    all spatial sizes but one: with H and W dynamic the directional stack is refused with the reason, the
    site kept "channel" (exact)."""
    options = {"directional": True, "directions": 4} if directional else {}
    spec = SiteSpec(2, 3, 3, (3, 3), (1, 1), (1, 1), (1, 1), 3, True, "zeros", (6, 7), 2)
    model = nn.Sequential(_trained_site(spec, options, 5)).eval().float()
    x = spec.input(torch.float32, 5)
    for axes, other in (({0: "n", 2: "h"}, (5, 9, 7)), ({0: "n", 2: "h", 3: "w"}, (3, 5, 8))):
        fused, report = fuse_onnx(_export_dynamic(model, x, axes), lowering="stack")
        (outcome,) = [o for o in report.fused if o.kind == "x-volution"]
        if len(axes) == 3 and directional:
            why = "the directional stack needs static spatial sizes (all but one axis)"
            assert outcome.lowering == "channel" and outcome.lowering_reason == f"stack refused: {why}"
        else:
            assert outcome.lowering == "stack", outcome.lowering_reason
            assert "Squeeze" in [n.op_type for n in fused.graph.node]
        x2 = torch.randn(other[0], 3, *other[1:])
        with torch.no_grad():
            ref = model.double()(x2.double())
        model.float()
        assert rel_err(torch.from_numpy(_ort_run(fused, x2.numpy())), ref) <= 1e-4


def test_onnx_auto_is_the_rule() -> None:
    """fuse_onnx's auto: the depthwise site spatial, the dense one channel, by rule (no timing)."""
    xm, x = _depthwise_model()
    proto = _export_site(xm, x, 17)
    fused, report = fuse_onnx(proto, example_inputs=[x.numpy()])
    sites = [o for o in report.fused if o.kind == "x-volution"]
    assert len(sites) == 2
    assert sorted(o.lowering for o in sites) == ["channel", "spatial"]
    for o in sites:
        assert o.lowering_reason.startswith("rule "), o.lowering_reason
        assert ("depthwise" in o.lowering_reason) == (o.lowering == "spatial")
    with torch.no_grad():
        ref = xm(x)
    assert rel_err(torch.from_numpy(_ort_run(fused, x.numpy())), ref) <= 1e-4
