"""Submodules of a module-form fused model: each computes what it computed before fusion; a fused module
called alone computes the chain it replaced (the torch.ao convention), a BatchNorm's Identity passes its
input through.

References are float64 eager runs of the unfused model (inputs and outputs of
every submodule recorded with hooks); the fused model runs in float32.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.feature_extraction import create_feature_extractor

from tests.strategies import cast_copy, randomize_bn, rel_err, tensors_in
from xvol_compiler import XVolution, XVolutionDeploy, fuse, fuse_with_report, xvolify

TOL = 1e-5  # float32 fused against the float64 unfused reference


def _clone(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, (tuple, list)):
        return type(value)(_clone(v) for v in value)
    if isinstance(value, dict):
        return type(value)((k, _clone(v)) for k, v in value.items())
    return value


@torch.no_grad()
def _record(model: nn.Module, *args: Any) -> dict[str, tuple[tuple[Any, ...], Any]]:
    """Input (before the call: in-place modules change it) and output of each submodule's first call."""
    inputs: dict[str, tuple[Any, ...]] = {}
    calls: dict[str, tuple[tuple[Any, ...], Any]] = {}
    handles = []
    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(
            lambda m, a, name=name: None if name in inputs else inputs.__setitem__(name, _clone(a))))
        handles.append(module.register_forward_hook(
            lambda m, a, out, name=name: None if name in calls else calls.__setitem__(
                name, (inputs[name], _clone(out)))))
    try:
        model(*args)
    finally:
        for h in handles:
            h.remove()
    return calls


def _fused_convs(fused: nn.Module, unfused: nn.Module) -> set[str]:
    """Paths where fusion put a new module: folded convs, deploy sites and the Identities of folded BatchNorms."""
    before = dict(unfused.named_modules())
    out = set()
    for name, m in fused.named_modules():
        if name not in before or m is before[name]:
            continue
        if isinstance(m, (nn.modules.conv._ConvNd, XVolutionDeploy, nn.Identity)):
            out.add(name)
    return out


def _check_submodules(fused: nn.Module, reference: nn.Module, calls: dict, skip: set[str]) -> int:
    """Every submodule of ``fused`` outside ``skip`` reproduces its recorded float64 call; returns how many ran."""
    fused_modules = dict(fused.named_modules())
    checked = 0
    for name, (args, out) in calls.items():
        if name == "" or name in skip or name not in fused_modules:
            continue
        with torch.no_grad():
            got = fused_modules[name](*cast_copy(args, torch.float32))
        refs, gots = tensors_in(out), tensors_in(got)
        assert len(refs) == len(gots) > 0, name
        for r, g in zip(refs, gots, strict=True):
            assert g.shape == r.shape, name
            assert rel_err(g, r) <= TOL, (name, type(fused_modules[name]).__name__, rel_err(g, r))
        checked += 1
    return checked


def _resnet18(sites: bool, size: int = 64) -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    if sites:
        model = xvolify(model, example_inputs=torch.randn(1, 3, size, size)).eval()
    with torch.no_grad():
        randomize_bn(model, seed=1)
    return model


@torch.no_grad()
def _trained_like_bn(model: nn.Module, seed: int) -> None:
    """Moderate BatchNorm statistics, so that the deep detection backbone stays finite in float32."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.copy_(torch.rand(m.num_features, generator=g) * 0.5 + 0.5)
            m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)


def _conv_bn_chain(name: str) -> str:
    """The BatchNorm that follows a conv of torchvision's ResNet (conv1 -> bn1, downsample.0 -> downsample.1)."""
    head, _, last = name.rpartition(".")
    folded = "1" if last == "0" else last.replace("conv", "bn")
    return f"{head}.{folded}" if head else folded


@pytest.mark.parametrize("sites", [False, True], ids=["plain", "xvolution"])
def test_every_submodule_of_fused_resnet18_computes_what_it_computed(sites):
    model = _resnet18(sites)
    x = torch.randn(2, 3, 64, 64)
    fused, report = fuse_with_report(model, example_inputs=(x,))
    assert report.count("conv+bn") == 20 and report.count("x-volution") == 4 * sites, str(report)
    reference = copy.deepcopy(model).double()
    calls = _record(reference, x.double())
    products = _fused_convs(fused, model)
    convs = {p for p in products if not isinstance(fused.get_submodule(p), nn.Identity)}
    assert len(convs) == 20 and len(products) == 40  # every conv absorbed its BatchNorm, now an Identity
    # containers and the untouched leaves compute exactly what they computed
    checked = _check_submodules(fused, reference, calls, skip=products)
    assert checked == 27  # 15 containers, 9 ReLUs, maxpool, avgpool, fc
    ref_modules = dict(reference.named_modules())
    for name in sorted(convs):
        module = fused.get_submodule(name)
        assert isinstance(module, XVolutionDeploy) == isinstance(ref_modules[name], XVolution), name
        args, _ = calls[name]
        # a fused conv (or deploy site) stands for the conv (site) and the BatchNorm it absorbed
        with torch.no_grad():
            expected = ref_modules[_conv_bn_chain(name)](ref_modules[name](*args))
            assert rel_err(module(*cast_copy(args, torch.float32)), expected) <= TOL, name


@pytest.mark.parametrize("sites", [False, True], ids=["plain", "xvolution"])
def test_fused_resnet18_forward_impl_and_hooks(sites):
    model = _resnet18(sites)
    x = torch.randn(2, 3, 64, 64)
    fused = fuse(model, example_inputs=(x,))
    reference = copy.deepcopy(model).double()
    with torch.no_grad():
        expected = reference(x.double())
        assert rel_err(fused._forward_impl(x), expected) <= TOL
        seen = []
        handle = fused.layer3.register_forward_hook(lambda m, a, out: seen.append(out))
        fused(x)
        handle.remove()
        feat = reference.layer3(reference.layer2(reference.layer1(reference.maxpool(
            reference.relu(reference.bn1(reference.conv1(x.double())))))))
    assert len(seen) == 1 and rel_err(seen[0], feat) <= TOL  # a hook on a fused container fires


def test_create_feature_extractor_on_fused_model():
    model = _resnet18(True)
    x = torch.randn(2, 3, 64, 64)
    fused = fuse(model, example_inputs=(x,))
    # "layer2.1.add" (the residual sum before its ReLU) exists only where the block keeps its own graph
    nodes = {"layer1": "c2", "layer2.1.add": "c3_sum", "layer2": "c3", "layer3.0": "c4_0", "layer3": "c4",
             "layer4": "c5"}
    reference = create_feature_extractor(copy.deepcopy(model).double(), nodes).eval()
    extractor = create_feature_extractor(fused, nodes).eval()
    with torch.no_grad():
        ref, out = reference(x.double()), extractor(x)
    assert sorted(out) == sorted(ref)
    for key in ref:
        assert rel_err(out[key], ref[key]) <= TOL, key


def test_intermediate_layer_getter_on_fused_model():
    model = _resnet18(True)
    x = torch.randn(2, 3, 64, 64)
    fused = fuse(model, example_inputs=(x,))
    layers = {"layer2": "0", "layer3": "1", "layer4": "2"}
    reference = IntermediateLayerGetter(copy.deepcopy(model).double(), layers)
    getter = IntermediateLayerGetter(fused, layers)
    with torch.no_grad():
        ref, out = reference(x.double()), getter(x)
    assert list(out) == list(ref) == ["0", "1", "2"]
    for key in ref:
        assert rel_err(out[key], ref[key]) <= TOL, key


def test_fused_detection_model_backbone_submodules():
    torch.manual_seed(0)
    detector = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None).eval()
    image = torch.rand(3, 96, 96)
    detector = xvolify(detector, sites="all", example_inputs=[image]).eval()
    _trained_like_bn(detector, seed=2)
    fused, report = fuse_with_report(detector, example_inputs=([image],))
    assert report.count("x-volution") >= 1
    x = torch.rand(1, 3, 96, 96)
    reference = copy.deepcopy(detector.backbone).double()
    calls = _record(reference, x.double())
    products = _fused_convs(fused.backbone, detector.backbone)
    assert products
    checked = _check_submodules(fused.backbone, reference, calls, skip=products)
    assert checked >= 20
    with torch.no_grad():  # the backbone as a whole, and the FPN on the body's features
        ref = reference(x.double())
        out = fused.backbone(x)
        feats = fused.backbone.body(x)
        assert rel_err(torch.cat([t.flatten() for t in fused.backbone.fpn(feats).values()]),
                       torch.cat([t.flatten() for t in ref.values()])) <= TOL
    assert list(out) == list(ref)
    for key in ref:
        assert rel_err(out[key], ref[key]) <= TOL, key


class _ConvOnly(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return self.conv(x)


class _BnAfterChild(nn.Module):
    """The BatchNorm lives in the parent, the conv it folds into in a child."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = _ConvOnly()
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.inner(x))))


def test_pair_across_a_container_boundary_is_left_for_the_graph_form():
    """Folding inner.conv with the parent's bn would make ``inner`` alone compute conv + bn: refused."""
    model = randomize_bn(_BnAfterChild()).eval()
    x = torch.randn(2, 3, 8, 8)
    fused, report = fuse_with_report(model, example_inputs=(x,))
    assert report.count("conv+bn") == 1  # the head's own pair
    assert any("inner.conv and bn are in different modules" in o.reason and "what inner computes" in o.reason
               for o in report.refused), str(report)
    assert isinstance(fused.bn, nn.BatchNorm2d)
    reference = copy.deepcopy(model).double()
    with torch.no_grad():
        assert rel_err(fused(x), reference(x.double())) <= TOL
        assert rel_err(fused.inner(x), reference.inner(x.double())) <= TOL
    graph, graph_report = fuse_with_report(model, example_inputs=(x,), graph=True)
    assert graph_report.count("conv+bn") == 2
    with torch.no_grad():
        assert rel_err(graph(x), reference(x.double())) <= TOL


def test_fusing_a_fused_model_keeps_its_submodules_working():
    model = _resnet18(True)
    x = torch.randn(2, 3, 64, 64)
    fused = fuse(model, example_inputs=(x,))
    again, report = fuse_with_report(fused, example_inputs=(x,))
    assert report.count() == 0
    reference = copy.deepcopy(model).double()
    calls = _record(reference, x.double())
    assert _check_submodules(again, reference, calls, skip=_fused_convs(again, model)) == 27
    with torch.no_grad():
        assert rel_err(again._forward_impl(x), reference(x.double())) <= TOL


def test_fused_container_exports_and_traces():
    model = _resnet18(True)
    x = torch.randn(2, 3, 64, 64)
    fused = fuse(model, example_inputs=(x,))
    reference = copy.deepcopy(model).double()
    with torch.no_grad():
        feat = reference.layer2(reference.layer1(reference.maxpool(reference.relu(reference.bn1(
            reference.conv1(x.double()))))))
        expected = reference.layer3(feat)
    exported = torch.export.export(fused.layer3, (feat.float(),))
    assert rel_err(exported.module()(feat.float()), expected) <= TOL
    assert rel_err(torch.fx.symbolic_trace(fused.layer3)(feat.float()), expected) <= TOL
