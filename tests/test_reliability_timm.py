"""xvolify keeps how a model trains (frozen, tied and shared parameters), and weight-standardized
convolutions (timm's StdConv2d / ScaledStdConv2d: NF-ResNet, ResNetV2-BiT) become sites that fuse exactly.

timm models are built with pretrained=False: nothing is downloaded.
"""

from __future__ import annotations

import copy
from functools import partial

import numpy as np
import onnxruntime as ort
import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from timm.layers import GroupNormAct, ScaledStdConv2d, StdConv2d, StdConv2dSame
from timm.models.resnetv2 import ResNetV2
from torch import nn

import xvol_compiler as xc
from tests.strategies import randomize_bn, rel_err
from xvol_compiler import XVolution
from xvol_compiler.onnx_io import export_onnx
from xvol_compiler.sites import SiteSelectionError
from xvol_passes.fuse_onnx import fuse_onnx

SMALL = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
WS_CONVS = (StdConv2d, ScaledStdConv2d)


# ----------------------------------------------------------------------------- item 2: how the model trains


def _site_new_params(site: XVolution) -> list[nn.Parameter]:
    own = {id(site.weight), id(site.bias)}
    return [p for p in site.parameters() if id(p) not in own]


def test_frozen_convs_stay_frozen_and_their_attention_too() -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    model.layer3.requires_grad_(False)
    xm = xc.xvolify(model, sites="re:^layer[23]\\.0\\.conv2$", example_inputs=SMALL)
    frozen, trainable = xm.layer3[0].conv2, xm.layer2[0].conv2
    assert isinstance(frozen, XVolution) and isinstance(trainable, XVolution)
    assert frozen.weight.requires_grad is False
    assert all(not p.requires_grad for p in _site_new_params(frozen))
    assert trainable.weight.requires_grad is True
    assert all(p.requires_grad for p in _site_new_params(trainable))
    # The flags are kept by the model's training: frozen parameters get no gradient.
    xm.train()
    xm(torch.rand(2, 3, 64, 64)).sum().backward()
    assert all(p.grad is None for p in xm.layer3.parameters())
    assert trainable.weight.grad is not None and trainable.attn_conv.weight.grad is not None
    # The caller's model is untouched and shares nothing with the copy.
    assert isinstance(model.layer3[0].conv2, nn.Conv2d)
    assert all(p.grad is None for p in model.parameters())
    assert model.layer2[0].conv2.weight is not trainable.weight


class _Tied(nn.Module):
    """a and b share one weight; c (not a site: 1x1 after a conv of the same weight shape) shares a's bias."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(4, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, padding=1, stride=2)
        self.b.weight = self.a.weight
        self.c = nn.Conv2d(4, 4, 3, padding=1, stride=2)  # not selected
        self.c.bias = self.a.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(F.relu(self.a(x))) + self.c(x)


def test_tied_and_shared_parameters_stay_tied() -> None:
    torch.manual_seed(0)
    model = _Tied().eval()
    x = torch.randn(1, 4, 16, 16)
    xm = xc.xvolify(model, sites=["a", "b"], example_inputs=x)
    assert isinstance(xm.a, XVolution) and isinstance(xm.b, XVolution) and isinstance(xm.c, nn.Conv2d)
    assert xm.a.weight is xm.b.weight, "tied site weights must stay one Parameter"
    assert xm.a.bias is xm.c.bias, "a parameter shared with a non-site module must stay shared"
    assert xm.a.weight is not model.a.weight, "the copy shares nothing with the caller's model"
    assert len(list(xm.parameters())) == len(list(model.parameters())) + 2 * 3  # attn conv, BN gamma, BN beta
    with torch.no_grad():
        assert torch.equal(xm(x), model(x))
    # One SGD step moves the tie as one parameter.
    xm.train()
    opt = torch.optim.SGD(xm.parameters(), lr=0.1)
    xm(x).square().mean().backward()
    opt.step()
    assert xm.a.weight is xm.b.weight and xm.a.bias is xm.c.bias
    assert not torch.equal(xm.a.weight, model.a.weight)


@pytest.mark.parametrize("sites", [["a", "b"], ["a"], ["b"]])
def test_tied_parameters_fuse_exactly_and_stay_with_their_modules(sites: list[str]) -> None:
    """A weight tied between a site and a plain conv (or two sites) is read under one name in the trace:
    each fused conv takes its own site's path and the plain conv keeps the shared weight."""
    torch.manual_seed(0)
    model = _Tied().eval()
    x = torch.randn(1, 4, 16, 16)
    xm = randomize_bn(xc.xvolify(model, sites=sites, example_inputs=x), 3).eval()
    with torch.no_grad():
        ref = copy.deepcopy(xm).double()(x.double())
        fused, report = xc.fuse_with_report(xm, example_inputs=x)
        assert rel_err(fused(x), ref) < 1e-5
    assert sorted(o.name for o in report.outcomes if o.kind == "x-volution" and o.status == "fused") == sites
    assert {n: type(m) for n, m in fused.named_children()} == {
        n: xc.XVolutionDeploy if n in sites else nn.Conv2d for n in ("a", "b", "c")}
    for name in {"a", "b"} - set(sites):
        assert torch.equal(getattr(fused, name).weight, xm.get_submodule(name).weight)


class _Aliased(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.alias = self.conv  # the same module under a second name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv(x))


def test_inplace_keeps_the_parameter_objects_and_aliases() -> None:
    """A module registered under two names is one site at both; inplace keeps the caller's Parameters,
    so an optimizer built before xvolify still trains the conv weights (not the new ones: build it after)."""
    torch.manual_seed(0)
    model = _Aliased().eval()
    conv = model.conv
    weight, bias = conv.weight, conv.bias
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(1, 3, 8, 8)
    xm = xc.xvolify(model, sites=["conv"], example_inputs=x, inplace=True)
    assert xm is model and isinstance(xm.conv, XVolution) and xm.alias is xm.conv
    assert xm.conv.weight is weight and xm.conv.bias is bias
    in_opt = {id(p) for group in opt.param_groups for p in group["params"]}
    in_model = {id(p) for p in xm.parameters()}
    assert in_opt <= in_model
    assert {id(p) for p in _site_new_params(xm.conv)}.isdisjoint(in_opt)


# ----------------------------------------------------------------------------- item 14: weight-standardized convs


def _spatial_ws_convs_at(model: nn.Module, x: torch.Tensor, stride: int) -> list[str]:
    """Independent reference: the weight-standardized convs with kernel > 1 whose output is input / stride."""
    found: list[str] = []
    handles = [
        m.register_forward_hook(lambda mod, a, out, name=name: found.append(name)
                                if out.shape[-1] * stride == x.shape[-1] else None)
        for name, m in model.named_modules() if isinstance(m, WS_CONVS) and max(m.kernel_size) > 1
    ]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return sorted(found)


def _trained_like(model: nn.Module, seed: int) -> nn.Module:
    """A few training-mode steps of BN statistics, then random BN affine values and WS gains."""
    g = torch.Generator().manual_seed(seed)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(2, 3, 64, 64, generator=g))
        for name, p in model.named_parameters():
            if name.endswith("attn_bn.weight") or name.endswith("attn_bn.bias"):
                p.copy_(torch.randn(p.shape, generator=g))
            elif name.endswith("gain"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
    return model.eval()


def _nontrivial(model: nn.Module, seed: int) -> nn.Module:
    """Non-zero residual gains (NF nets start with zero-initialised last convs: blocks would be identities)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gain"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            elif name.endswith("conv3.weight") and not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def _small_bit() -> nn.Module:
    """ResNetV2-BiT as timm builds resnetv2_50x1_bit (fixed stem, StdConv2d, GroupNorm), one block per stage."""
    torch.manual_seed(0)
    return ResNetV2(layers=(1, 1, 1, 1), num_classes=10, stem_type="fixed",
                    conv_layer=partial(StdConv2d, eps=1e-8), norm_layer=partial(GroupNormAct, num_groups=32))


def _nf_resnet26() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("nf_resnet26", pretrained=False, num_classes=10)


def _check_insert_and_fx_fuse(model: nn.Module, ws_type: type[nn.Module]) -> nn.Module:
    model = _nontrivial(model, 1)
    expected = _spatial_ws_convs_at(model, SMALL, 16)
    assert expected, "the model has weight-standardized convs at output stride 16"
    xm = xc.xvolify(model, example_inputs=SMALL)
    report = xm.xvol_report
    assert sorted(report.selected_names) == expected
    assert all(s.class_name == ws_type.__name__ for s in report.selected)
    for name in expected:
        site = xm.get_submodule(name)
        assert isinstance(site, XVolution) and site.conv_class is ws_type
        assert site.weight is not model.get_submodule(name).weight
    with torch.no_grad():
        assert torch.equal(xm(SMALL), model(SMALL)), "insertion is exact (gamma = 0, the conv's own forward)"
    xm = _trained_like(xm, 2)
    reference = copy.deepcopy(xm).double()
    with torch.no_grad():
        ref = reference(SMALL.double())
        unfused_err = rel_err(xm(SMALL), ref)  # float32 rounding of the unfused model itself
    fused, fusion = xc.fuse_with_report(xm, example_inputs=SMALL)
    fused_sites = [o for o in fusion.outcomes if o.kind == "x-volution" and o.status == "fused"]
    assert sorted(o.name for o in fused_sites) == expected
    for name in expected:
        assert type(fused.get_submodule(name)) is xc.XVolutionDeploy
    with torch.no_grad():
        out = fused(SMALL)
    # Exact to float rounding: as close to the float64 reference as the unfused float32 model is.
    assert rel_err(out, ref) <= max(1e-5, 2 * unfused_err), (rel_err(out, ref), unfused_err)
    return xm


def _onnx_session_output(path: str, x: torch.Tensor) -> np.ndarray:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    s = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x.numpy()})[0]


def _check_onnx_fuse(xm: nn.Module, n_sites: int, tmp_path, dynamo: bool) -> None:
    reference = copy.deepcopy(xm).double()
    with torch.no_grad():
        ref = reference(SMALL.double())
    path = str(tmp_path / f"unfused_{dynamo}.onnx")
    export_onnx(xm, path, SMALL, dynamo=dynamo)
    fused_path = str(tmp_path / f"fused_{dynamo}.onnx")
    _, report = fuse_onnx(path, output_path=fused_path)
    sites = [o for o in report.outcomes if o.kind == "x-volution"]
    assert len(sites) == n_sites and all(o.status == "fused" for o in sites), [(o.name, o.reason) for o in sites]
    out = _onnx_session_output(fused_path, SMALL)
    assert rel_err(torch.from_numpy(out), ref) <= 1e-4


def test_nf_resnet26_scaled_std_conv_sites_insert_and_fuse_fx() -> None:
    _check_insert_and_fx_fuse(_nf_resnet26(), ScaledStdConv2d)


def test_small_resnetv2_bit_std_conv_sites_fuse_fx_and_onnx(tmp_path) -> None:
    xm = _check_insert_and_fx_fuse(_small_bit(), StdConv2d)
    _check_onnx_fuse(xm, len(xm.xvol_report.selected), tmp_path, dynamo=False)


@pytest.mark.slow
@pytest.mark.parametrize("dynamo", [True, False])
def test_nf_resnet26_fuses_in_onnx(tmp_path, dynamo: bool) -> None:
    xm = _check_insert_and_fx_fuse(_nf_resnet26(), ScaledStdConv2d)
    _check_onnx_fuse(xm, len(xm.xvol_report.selected), tmp_path, dynamo=dynamo)


@pytest.mark.slow
def test_resnetv2_50x1_bit_fuses_fx_and_onnx(tmp_path) -> None:
    torch.manual_seed(0)
    xm = _check_insert_and_fx_fuse(timm.create_model("resnetv2_50x1_bit", pretrained=False, num_classes=10),
                                   StdConv2d)
    _check_onnx_fuse(xm, len(xm.xvol_report.selected), tmp_path, dynamo=True)


def test_weight_standardized_site_trains_like_the_conv() -> None:
    """The conv branch is the module's own forward: standardization included in training (gradients too)."""
    torch.manual_seed(0)
    conv = ScaledStdConv2d(4, 6, 3, padding=1).double()
    with torch.no_grad():
        conv.gain.uniform_(0.5, 1.5)
    site = XVolution.from_conv(copy.deepcopy(conv)).train()
    assert {"weight", "bias", "gain"} <= set(site.state_dict())
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64, requires_grad=True)
    y_site, y_conv = site(x), conv(x)
    assert torch.equal(y_site, y_conv)
    g = torch.randn_like(y_conv)
    y_site.backward(g)
    y_conv.backward(g)
    assert torch.allclose(site.gain.grad, conv.gain.grad, rtol=0, atol=1e-12)
    assert torch.allclose(site.weight.grad, conv.weight.grad, rtol=0, atol=1e-12)
    # The folded weight is the standardized one: the literal definition, in float64.
    w = conv.weight
    mean = w.mean(dim=(1, 2, 3), keepdim=True)
    var = w.var(dim=(1, 2, 3), unbiased=False, keepdim=True)
    literal = (w - mean) / torch.sqrt(var + conv.eps) * conv.gain * conv.scale
    effective, _ = site.conv_weights()
    assert torch.allclose(effective, literal, rtol=0, atol=1e-12)


class _Unswappable(nn.Module):
    """Every spatial conv has a forward that is more than a weight transform (dynamic SAME padding)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = StdConv2dSame(3, 8, 3, stride=2, padding="SAME")
        self.body = nn.Sequential(*(StdConv2dSame(8, 8, 3, stride=2, padding="SAME") for _ in range(3)))
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.stem(x)))


def test_no_site_message_names_the_skip_reasons() -> None:
    model = _Unswappable().eval()
    found = xc.analyze_model(model, SMALL)
    assert all(found.convs[f"body.{i}"].not_swappable.startswith("custom forward") for i in range(3))
    with pytest.raises(SiteSelectionError) as err:
        xc.xvolify(model, example_inputs=SMALL)
    msg = str(err.value)
    assert "no spatial (kernel > 1) convolution" not in msg
    assert "All 4 spatial (kernel > 1) convs of this model cannot become sites (4 custom forward)" in msg
    assert "no candidate at output stride 16 (spatial convs there skipped: 1 custom forward)" in msg
    assert "StdConv2dSame" in msg


def test_nf_resnet26_has_sites_by_default() -> None:
    """Before: 'This model has no spatial (kernel > 1) convolution' although its os16 convs were listed."""
    found = xc.analyze_model(_nf_resnet26().eval(), SMALL)
    spatial = [i for i in found.convs.values() if max(i.geometry.kernel_size) > 1]
    assert spatial and all(not i.not_swappable for i in spatial)
