"""The INT8 rescale (``xvol_compiler.int8``, ``xvol_passes.onnx_rescale``): interleaving x and s*T(x) with
1/s folded into the weight columns that read T(x) computes the same function. Checked against the
unrescaled fused model and the float64 eager run of the unfused site, in PyTorch and onnxruntime, for
random geometries and random s; the calibrated s against its literal definition; the rescaled form
through a state_dict round trip."""

from __future__ import annotations

import copy
from typing import cast

import numpy as np
import onnx_graphsurgeon as gs
import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

from tests.hyp import examples
from tests.strategies import SiteSpec, conv_sites, eager64, ort_run, randomize_bn, rel_err
from xvol_compiler import XVolution, XVolutionDeploy, fuse
from xvol_compiler.fold import FoldError
from xvol_compiler.int8 import (
    RescaleError,
    SiteStats,
    TReader,
    apply_t_scales,
    calibrate_t_scales,
    channel_absmax,
    deploy_sites,
    quantization_noise,
    rescale_deploy,
    rescale_fused_model,
    rescale_t_columns,
    rescale_t_taps,
    scale_ring,
    t_scale_from_ranges,
    t_scale_min_noise,
)
from xvol_compiler.lowering import spatial_axis
from xvol_compiler.onnx_io import export_onnx
from xvol_compiler.ops import interleave_groups, interleave_spatial, pssa_kernel, pssa_transform, stack_depth
from xvol_passes.fuse_onnx import fuse_onnx
from xvol_passes.onnx_graph import Interleave
from xvol_passes.onnx_rescale import apply_onnx_t_scales, calibrate_onnx_t_scales, onnx_rescale_sites, rescale_onnx

TOL = 1e-4
ACT = 6.0  # input scale: trained-like activations, T(x) ~ 36 x's range


def random_scale(channels: int, seed: int) -> torch.Tensor:
    """Log-uniform s in [1e-3, 1e3]: far from 1, so a wrong column or channel shows."""
    g = torch.Generator().manual_seed(seed)
    return torch.exp((torch.rand(channels, generator=g, dtype=torch.float64) * 2 - 1) * np.log(1e3))


def site_model(site: SiteSpec, shift: int, axial: bool, directional: bool = False) -> nn.Sequential:
    xvol = XVolution.from_conv(site.conv(torch.float32), shift=shift, directions="axial" if axial else None,
                               directional=directional)
    return cast(nn.Sequential, randomize_bn(nn.Sequential(xvol), seed=5).eval())


def has_ring(ndim: int, shift: int, directional: bool) -> bool:
    """When pssa_transform computes R(x) as a conv with the ring kernel (see ops._fast_form)."""
    return not directional and (ndim < 3 or shift == 1)


# ----------------------------------------------------------------------------- pure functions


def test_t_scale_from_ranges_is_the_ratio_of_ranges() -> None:
    x = torch.tensor([2.0, 3.0, 0.0, 4.0])
    t = torch.tensor([8.0, 0.0, 5.0, 1.0])
    per_channel = torch.tensor([0.25, 1.0, 1.0, 4.0], dtype=torch.float64)
    assert torch.equal(t_scale_from_ranges(x, t, per_channel=True), per_channel)
    assert torch.equal(t_scale_from_ranges(x, t, per_channel=False), torch.full((4,), 0.5, dtype=torch.float64))
    with pytest.raises(RescaleError, match="one max"):
        t_scale_from_ranges(x, t[:3])
    with pytest.raises(RescaleError, match="non-finite"):
        t_scale_from_ranges(x, torch.tensor([1.0, float("nan"), 1.0, 1.0]))


def test_scale_ring_multiplies_each_channel_filter() -> None:
    ring = pssa_kernel(2, None, False, 3, torch.float64)
    s = torch.tensor([2.0, 0.5, 7.0], dtype=torch.float64)
    scaled = scale_ring(ring, s)
    for c in range(3):
        assert torch.equal(scaled[c], ring[c] * s[c])
    x = torch.randn(2, 3, 6, 5, dtype=torch.float64)
    literal = x * F.conv2d(x, scaled, None, 1, 1, 1, 3)
    assert torch.allclose(literal, pssa_transform(x) * s.view(1, 3, 1, 1), rtol=1e-12, atol=1e-12)
    with pytest.raises(RescaleError, match="> 0"):
        scale_ring(ring, torch.tensor([1.0, 0.0, 1.0]))


@settings(max_examples=examples(40))
@given(groups=st.sampled_from([1, 2, 3]), per_group=st.integers(1, 3), out_per_group=st.integers(1, 3),
       split=st.booleans(), seed=st.integers(0, 2**16))
def test_rescaled_columns_read_s_times_t(groups: int, per_group: int, out_per_group: int, split: bool,
                                         seed: int) -> None:
    """conv([x, s*T], rescale_t_columns(w)) == conv([x, T], w) for grouped convs (and conv(s*T) alone)."""
    c, out = groups * per_group, groups * out_per_group
    g = torch.Generator().manual_seed(seed)
    x, t = torch.randn(2, c, 5, 6, generator=g, dtype=torch.float64), torch.randn(2, c, 5, 6, generator=g,
                                                                                  dtype=torch.float64)
    s = random_scale(c, seed)
    columns = per_group if split else 2 * per_group
    w = torch.randn(out, columns, 3, 3, generator=g, dtype=torch.float64)
    rescaled = rescale_t_columns(w, s, groups, 0 if split else c)
    if split:
        ref, got = F.conv2d(t, w, groups=groups), F.conv2d(t * s.view(1, -1, 1, 1), rescaled, groups=groups)
    else:
        ref = F.conv2d(interleave_groups([x, t], groups), w, groups=groups)
        got = F.conv2d(interleave_groups([x, t * s.view(1, -1, 1, 1)], groups), rescaled, groups=groups)
    assert rel_err(got, ref) <= 1e-12


@settings(max_examples=examples(20))
@given(ndim=st.sampled_from([2, 3]), lowering=st.sampled_from(["spatial", "spatial-h"]),
       groups=st.sampled_from([1, 2]), per_group=st.integers(1, 2), out_per_group=st.integers(1, 2),
       seed=st.integers(0, 2**16))
def test_rescaled_taps_read_s_times_t(ndim: int, lowering: str, groups: int, per_group: int, out_per_group: int,
                                      seed: int) -> None:
    """conv(interleave_spatial([x, s*T], axis), rescale_t_taps(w)) == conv(interleave_spatial([x, T], axis), w)
    along W ("spatial") and H ("spatial-h")."""
    axis = cast(int, spatial_axis(lowering))
    c, out = groups * per_group, groups * out_per_group
    g = torch.Generator().manual_seed(seed)
    size = (3, 4, 5)[3 - ndim:]
    x, t = (torch.randn(2, c, *size, generator=g, dtype=torch.float64) for _ in range(2))
    s = random_scale(c, seed)
    kernel = [2] * ndim
    kernel[axis] *= 2  # two taps of the interleaved axis per site tap: x's, then T's
    w = torch.randn(out, per_group, *kernel, generator=g, dtype=torch.float64)
    conv = {2: F.conv2d, 3: F.conv3d}[ndim]
    stride = [1] * ndim
    stride[axis] = 2
    scaled_t = t * s.view(1, -1, *(1,) * ndim)
    ref = conv(interleave_spatial([x, t], axis), w, None, stride, 0, 1, groups)
    got = conv(interleave_spatial([x, scaled_t], axis), rescale_t_taps(w, s, groups, axis=axis), None, stride, 0,
               1, groups)
    assert rel_err(got, ref) <= 1e-12


def test_rescaled_stack_taps_read_s_times_t() -> None:
    """conv3d(stack_depth([x, s*T]), rescale_t_taps(w, axis=-3)) == conv3d(stack_depth([x, T]), w): the taps
    of the stacked axis that read T (slot 1) divided by s."""
    groups, per_group, c_out = 2, 2, 6
    c = groups * per_group
    g = torch.Generator().manual_seed(11)
    x, t = (torch.randn(2, c, 5, 6, generator=g, dtype=torch.float64) for _ in range(2))
    s = random_scale(c, 11)
    w = torch.randn(c_out, per_group, 2, 3, 3, generator=g, dtype=torch.float64)
    ref = F.conv3d(stack_depth([x, t]), w, None, 1, (0, 1, 1), 1, groups)
    got = F.conv3d(stack_depth([x, t * s.view(1, -1, 1, 1)]), rescale_t_taps(w, s, groups, axis=-3), None, 1,
                   (0, 1, 1), 1, groups)
    assert rel_err(got, ref) <= 1e-12


# ----------------------------------------------------------------------------- deploy modules (PyTorch)


def deploy_of(model: nn.Sequential, lowering: str) -> XVolutionDeploy:
    try:
        return cast(XVolution, model[0]).fuse(lowering, single_conv=lowering != "split")
    except FoldError:  # (the spatial lowering is not exact for every geometry)
        assume(False)
        raise


@settings(max_examples=examples(60))
@given(site=conv_sites(ndims=(1, 2, 3), max_kernel=5), shift=st.integers(1, 2), axial=st.booleans(),
       lowering=st.sampled_from(["channel", "split", "spatial", "spatial-h", "stack"]), seed=st.integers(0, 2**16))
def test_rescaled_deploy_module_is_exact(site: SiteSpec, shift: int, axial: bool, lowering: str,
                                         seed: int) -> None:
    model = site_model(site, shift, axial)
    deploy = deploy_of(model, lowering)
    x = site.input(torch.float32, seed) * ACT
    with torch.no_grad():
        before = deploy(x)
    if not has_ring(site.ndim, shift, False):
        with pytest.raises(RescaleError, match="without a ring conv"):
            rescale_deploy(deploy, random_scale(site.in_channels, seed))
        return
    rescale_deploy(deploy, random_scale(site.in_channels, seed))
    with torch.no_grad():
        after = deploy(x)
    assert rel_err(after, before) <= TOL
    assert rel_err(after, eager64(model, x)) <= TOL
    # The checkpoint holds the rescaled form: a fresh deploy module loads it and computes the same.
    fresh = deploy_of(model, lowering)
    fresh.load_state_dict(deploy.state_dict())
    with torch.no_grad():
        assert rel_err(fresh(x), eager64(model, x)) <= TOL


def test_directional_site_is_refused_with_the_reason() -> None:
    site = XVolution.from_conv(nn.Conv2d(3, 4, 3, padding=1), directional=True)
    randomize_bn(site).eval()
    with pytest.raises(RescaleError, match="without a ring conv"):
        rescale_fused_model(nn.Sequential(site.fuse()), [torch.randn(1, 3, 6, 6)])


def test_unfused_model_is_refused() -> None:
    model = nn.Sequential(XVolution.from_conv(nn.Conv2d(3, 4, 3, padding=1))).eval()
    with pytest.raises(RescaleError, match="no XVolutionDeploy"):
        calibrate_t_scales(model, [torch.randn(1, 3, 6, 6)])


class TwoSites(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.a = XVolution.from_conv(nn.Conv2d(8, 8, 3, padding=1, groups=2))
        self.bn = nn.BatchNorm2d(8)
        self.b = XVolution.from_conv(nn.Conv2d(8, 6, 3, stride=2, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.bn(self.a(self.stem(x)))))


@pytest.fixture(scope="module")
def two_sites() -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(TwoSites(), seed=2).eval()


@pytest.mark.parametrize("per_channel", [True, False])
def test_calibrated_ranges_balance_and_stay_exact(two_sites: nn.Module, per_channel: bool) -> None:
    x = torch.randn(4, 3, 12, 12) * ACT
    fused = fuse(copy.deepcopy(two_sites), example_inputs=x)
    ranges: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, site in deploy_sites(fused).items():  # the literal definition: ranges of the unrescaled form
        site.register_forward_pre_hook(lambda m, a, n=name: ranges.__setitem__(
            n, (channel_absmax(a[0]), channel_absmax(pssa_transform(a[0])))))
    with torch.no_grad():
        fused(x)
    scales = rescale_fused_model(fused, [x], method="ranges", per_channel=per_channel)
    assert set(scales) == {"a", "b"}
    for name, s in scales.items():
        xr, tr = ranges[name]
        if per_channel:  # (a dead, all-zero, channel keeps s = 1)
            expected = torch.where((xr > 0) & (tr > 0), xr / tr, 1.0)
        else:
            expected = (xr.max() / tr.max()).expand_as(xr)
        assert torch.allclose(s, expected, rtol=1e-6)
        assert float((s - 1).abs().max()) > 0.5  # (trained-like inputs: T(x) far outgrows x)
    with torch.no_grad():
        assert rel_err(fused(x), eager64(two_sites, x)) <= TOL
    # A second calibration finds the ranges balanced: s = 1.
    again = calibrate_t_scales(fused, [x], method="ranges", per_channel=per_channel)
    for s in again.values():
        assert torch.allclose(s, torch.ones_like(s), rtol=1e-5)


def test_quantization_noise_by_hand() -> None:
    """One output channel reading x (weight 0.5) and T (weight 2); max|x| 1, max|T| 4, E[x^2] 0.25, E[T^2] 4.
    s = 0.5: activation step 2/127 on 0.5^2 + 2^2/0.5^2 = 16.25; weight step max(0.5, 2/0.5)/127 = 4/127 on
    0.25 + 0.5^2 * 4 = 1.25: (4 * 16.25 + 16 * 1.25) / 127^2 = 85 / 16129. s = 2: (64 * 1.25 + 1 * 16.25) / 16129."""
    stats = SiteStats(torch.tensor([1.0]), torch.tensor([4.0]), 0.25, 4.0)
    reader = TReader(torch.tensor([[[[0.5]], [[2.0]]]]), torch.tensor([[[[False]], [[True]]]]))
    got = quantization_noise(torch.tensor([0.5, 2.0]), stats, [reader], "per-channel")
    assert torch.allclose(got, torch.tensor([85 / 16129, 96.25 / 16129], dtype=torch.float64), rtol=1e-12)
    s = t_scale_min_noise(stats, [reader], "per-channel")
    grid = torch.logspace(-4, 2, 2001, dtype=torch.float64)
    assert float(quantization_noise(s[:1], stats, [reader], "per-channel")[0]) <= float(
        quantization_noise(grid, stats, [reader], "per-channel").min()) * 1.01


def _fake_int8(t: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.round(t / step), -127, 127) * step


def site_conv_errors(model: nn.Module, x: torch.Tensor, weights: str) -> dict[str, float]:
    """Each fused site's conv run in simulated int8 (the literal definition: symmetric, its input with one
    scale from max |.|, its weight per tensor or per output channel), relative squared error at its output."""
    errors = {}
    for name, site in deploy_sites(model).items():
        seen: dict[str, torch.Tensor] = {}
        handle = site.conv.register_forward_hook(lambda _m, a, out, seen=seen: seen.update(z=a[0], y=out))
        with torch.no_grad():
            model(x)
        handle.remove()
        z, y, w = seen["z"].double(), seen["y"].double(), site.conv.weight.detach().double()
        peak = w.abs().max() if weights == "per-tensor" else w.abs().amax(dim=(1, 2, 3), keepdim=True)
        bias = None if site.conv.bias is None else site.conv.bias.detach().double()
        got = site.conv._conv_forward(_fake_int8(z, z.abs().max() / 127), _fake_int8(w, peak / 127), bias)
        errors[name] = float((got - y).square().mean() / y.square().mean())
    return errors


@pytest.mark.parametrize("weights", ["per-tensor", "per-channel"])
def test_noise_scale_is_best_in_simulated_int8(two_sites: nn.Module, weights: str) -> None:
    x = torch.randn(8, 3, 12, 12) * ACT
    fused = fuse(copy.deepcopy(two_sites), example_inputs=x)
    errors = {}
    for method in ("none", "ranges", "noise"):
        model = copy.deepcopy(fused)
        if method != "none":
            rescale_fused_model(model, [x], method=method, weights=weights)  # type: ignore[arg-type]
        errors[method] = site_conv_errors(model, x, weights)
    for site in ("a", "b"):
        assert errors["noise"][site] <= 1.02 * min(errors["none"][site], errors["ranges"][site]), errors
        assert errors["noise"][site] < 0.5 * errors["none"][site], errors  # T(x) outgrows x: the rescale matters


def test_bad_method_and_weights_are_refused(two_sites: nn.Module) -> None:
    x = torch.randn(2, 3, 12, 12)
    fused = fuse(copy.deepcopy(two_sites), example_inputs=x)
    with pytest.raises(RescaleError, match="method='ranges' with per_channel=True"):
        calibrate_t_scales(fused, [x], per_channel=True)
    with pytest.raises(RescaleError, match="weights='int4'"):
        calibrate_t_scales(fused, [x], weights="int4")  # type: ignore[arg-type]
    with pytest.raises(RescaleError, match="method='minmax'"):
        calibrate_t_scales(fused, [x], method="minmax")  # type: ignore[arg-type]


def test_plain_checkpoint_loaded_into_rescaled_model_drops_the_rescale(two_sites: nn.Module) -> None:
    x = torch.randn(2, 3, 12, 12) * ACT
    plain = fuse(copy.deepcopy(two_sites), example_inputs=x)
    rescaled = copy.deepcopy(plain)
    rescale_fused_model(rescaled, [x])
    assert "a.t_scale" in rescaled.state_dict() and "a.t_scale" not in plain.state_dict()
    rescaled.load_state_dict(plain.state_dict())  # strict: keys of the plain form
    with torch.no_grad():
        assert rel_err(rescaled(x), eager64(two_sites, x)) <= TOL
    assert not any("t_scale" in k for k in rescaled.state_dict())


def test_unknown_site_name_is_refused(two_sites: nn.Module) -> None:
    fused = fuse(copy.deepcopy(two_sites), example_inputs=torch.randn(1, 3, 12, 12))
    with pytest.raises(RescaleError, match="no fused site named c"):
        apply_t_scales(fused, {"c": torch.ones(8)})


# ----------------------------------------------------------------------------- ONNX (onnxruntime)


@settings(max_examples=examples(25))
@given(site=conv_sites(ndims=(1, 2), max_kernel=4), shift=st.integers(1, 2), axial=st.booleans(),
       interleave=st.sampled_from(["reshape", "gather"]),
       lowering=st.sampled_from(["auto", "channel", "split", "spatial-h", "stack"]),
       seed=st.integers(0, 2**16))
def test_rescaled_onnx_graph_is_exact(site: SiteSpec, shift: int, axial: bool, interleave: str, lowering: str,
                                      seed: int) -> None:
    """Every lowering fuse_onnx writes ("auto": spatial for depthwise sites, else channel; split; spatial-h,
    which a 1-D site refuses: then channel; stack)."""
    # (TorchScript writes padding="same" with a dilation as auto_pad, which onnxruntime cannot run)
    assume(site.padding != "same" or all(d == 1 for d in site.dilation))
    model = site_model(site, shift, axial)
    x = site.input(torch.float32, seed) * ACT
    fused, report = fuse_onnx(export_onnx(model, None, (x,), dynamo=False), interleave=cast(Interleave, interleave),
                              lowering=lowering, single_conv=lowering != "split")
    assert report.count("x-volution") == 1, str(report)
    sites = onnx_rescale_sites(gs.import_onnx(fused))
    assert len(sites) == 1 and len(sites[0].convs) == 1, str(report)  # (split: the x conv reads no T)
    rescaled = apply_onnx_t_scales(fused, {sites[0].name: random_scale(site.in_channels, seed)})
    got = ort_run(rescaled, x)
    assert rel_err(torch.from_numpy(got), torch.from_numpy(ort_run(fused, x))) <= TOL
    assert rel_err(torch.from_numpy(got), eager64(model, x)) <= TOL


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("lowering", ["spatial", "spatial-h"])
def test_rescaled_onnx_spatial_interleave_finds_its_axis(lowering: str, ndim: int) -> None:
    """fuse_onnx's spatial interleaves (along W and along H, padded inputs first for a non-zero padding mode):
    the rescale finds T's slot and axis, and the rescaled graph is exact, as the rescaled deploy module."""
    site = SiteSpec(ndim, 4, 4, (3,) * ndim, (1,) * (ndim - 1) + (2,), (1,) * ndim, (1,) * ndim, 4, True,
                    "reflect" if ndim == 2 else "zeros", (5,) * (ndim - 1) + (6,), 2)
    model = site_model(site, 1, False)
    x = site.input(torch.float32, 3) * ACT
    fused, report = fuse_onnx(export_onnx(model, None, (x,), dynamo=False), lowering=lowering)
    assert report.lowerings() == dict.fromkeys(report.lowerings(), lowering), str(report)
    (found,) = onnx_rescale_sites(gs.import_onnx(fused))
    assert [read for _, read in found.convs] == [(1, spatial_axis(lowering))]
    s = random_scale(4, 7)
    rescaled = apply_onnx_t_scales(fused, {found.name: s})
    got = torch.from_numpy(ort_run(rescaled, x))
    assert rel_err(got, eager64(model, x)) <= TOL
    deploy = deploy_of(model, lowering)
    rescale_deploy(deploy, s)
    with torch.no_grad():
        assert rel_err(got, deploy(x)) <= TOL


@pytest.mark.parametrize("ndim", [1, 2])
def test_rescaled_onnx_stack_finds_its_axis(ndim: int) -> None:
    """fuse_onnx's stack (inputs padded first for a non-zero padding mode): the rescale finds T's slot on the
    stacked axis of the weight, and the rescaled graph is exact, as the rescaled deploy module."""
    site = SiteSpec(ndim, 4, 4, (3,) * ndim, (1,) * (ndim - 1) + (2,), (1,) * ndim, (1,) * ndim, 4, True,
                    "reflect", (5,) * (ndim - 1) + (6,), 2)
    model = site_model(site, 1, False)
    x = site.input(torch.float32, 3) * ACT
    fused, report = fuse_onnx(export_onnx(model, None, (x,), dynamo=False), lowering="stack")
    assert report.lowerings() == dict.fromkeys(report.lowerings(), "stack"), str(report)
    (found,) = onnx_rescale_sites(gs.import_onnx(fused))
    assert [read for _, read in found.convs] == [(1, -(ndim + 1))]
    s = random_scale(4, 8)
    rescaled = apply_onnx_t_scales(fused, {found.name: s})
    got = torch.from_numpy(ort_run(rescaled, x))
    assert rel_err(got, eager64(model, x)) <= TOL
    deploy = deploy_of(model, "stack")
    rescale_deploy(deploy, s)
    with torch.no_grad():
        assert rel_err(got, deploy(x)) <= TOL


@pytest.mark.parametrize("dynamo", [False, True])
def test_onnx_calibration_matches_pytorch(two_sites: nn.Module, dynamo: bool) -> None:
    """onnxruntime calibration of the fused graph finds the s PyTorch finds on the fused module, and the
    rescaled graph (fused, and unfused: its attention convs read T(x) alone) stays exact."""
    x = torch.randn(4, 3, 12, 12) * ACT
    unfused = export_onnx(two_sites, None, (x,), dynamo=dynamo)
    fused, _ = fuse_onnx(unfused)
    torch_fused = fuse(copy.deepcopy(two_sites), example_inputs=x)
    for graph, method in ((fused, "noise"), (fused, "ranges"), (unfused, "ranges")):
        torch_scales = calibrate_t_scales(torch_fused, [x], method=method)
        onnx_scales = calibrate_onnx_t_scales(graph, [x.numpy()], method=method)
        assert len(onnx_scales) == 2
        # sites in graph order: a then b
        for s_onnx, s_torch in zip(onnx_scales.values(), torch_scales.values(), strict=True):
            assert np.allclose(s_onnx, s_torch.numpy(), rtol=1e-4)
        rescaled, _ = rescale_onnx(graph, [x.numpy()], method=method)
        assert rel_err(torch.from_numpy(ort_run(rescaled, x)), eager64(two_sites, x)) <= TOL
    for s in calibrate_onnx_t_scales(unfused, [x.numpy()], method="noise").values():
        assert np.array_equal(s, np.ones_like(s))


def test_onnx_without_sites_is_refused() -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 3)).eval()
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(RescaleError, match="no PSSA site"):
        calibrate_onnx_t_scales(export_onnx(net, None, (x,), dynamo=False), [x.numpy()])
