"""FX fusion pass: random branch structures, refusals, real models, compile and export."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from hypothesis import given, note, settings
from hypothesis import strategies as st
from torch import fx, nn

from tests.hyp import examples
from tests.strategies import conv_sites, randomize_bn, rel_err
from xvol_compiler import XVolution
from xvol_passes.fuse_fx import FusionError, fuse, fuse_graph, fuse_with_report


def _convs(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d))]


def _bns(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _simulate_training(model: nn.Module, seed: int) -> nn.Module:
    randomize_bn(model, seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:  # conv kernels, scaled so activations stay O(1)
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) / p[0].numel() ** 0.5)
    return model.eval()


class RepBlock(nn.Module):
    """RepVGG/DBB-style block written by hand: KxK+BN, 1x1+BN, BN identity, summed in a chosen order/form."""

    def __init__(self, channels: int, kernel: int, order: list[str], form: str, post_bn: bool) -> None:
        super().__init__()
        self.order, self.form = order, form
        self.kxk = nn.Sequential(nn.Conv2d(channels, channels, kernel, padding=kernel // 2, bias=False),
                                 nn.BatchNorm2d(channels))
        self.one = nn.Sequential(nn.Conv2d(channels, channels, 1, bias=True), nn.BatchNorm2d(channels))
        self.ident = nn.BatchNorm2d(channels)
        self.post = nn.BatchNorm2d(channels) if post_bn else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = {"kxk": self.kxk, "1x1": self.one, "identity": self.ident}
        y = parts[self.order[0]](x)
        for name in self.order[1:]:
            if self.form == "add":
                y = y + parts[name](x)
            elif self.form == "radd":
                y = parts[name](x) + y
            elif self.form == "torch.add":
                y = torch.add(y, parts[name](x))
            else:
                y += parts[name](x)
        return self.post(y)


class SiteNet(nn.Module):
    """A stem conv+BN, one X-volution site (optionally with a BN after it), a head."""

    def __init__(self, site: XVolution, bn_after: bool) -> None:
        super().__init__()
        self.site = site
        self.bn = nn.BatchNorm2d(site.out_channels) if bn_after else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.site(x)))


@settings(max_examples=examples(150))
@given(
    spec=conv_sites(ndims=(2,), max_kernel=5),
    extras=st.sampled_from([(), ("1x1",), ("identity",), ("bn",), ("1x1", "identity", "bn")]),
    directional=st.booleans(),
    bn_after=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_fuse_xvolution_sites(spec, extras, directional, bn_after, seed):
    conv = spec.conv(torch.float64)
    try:
        site = XVolution.from_conv(conv, directional=directional, extra_branches=extras)
    except Exception:  # extra branch not legal for this geometry: the plain site
        site = XVolution.from_conv(conv, directional=directional)
    model = _simulate_training(SiteNet(site, bn_after).double(), seed)
    x = spec.input(torch.float64)
    note(f"site={site!r} bn_after={bn_after}")
    ref = model(x)
    fused, report = fuse_with_report(model, example_inputs=(x,))
    assert rel_err(fused(x), ref) <= 1e-10
    # one conv, no BatchNorm, no X-volution module left
    assert report.count("x-volution") == 1, str(report)
    assert len(_convs(fused)) == 1 and not _bns(fused)
    assert not any(isinstance(m, XVolution) for m in fused.modules())
    gm = fx.symbolic_trace(fused)
    assert not any(n.target in ("add",) or getattr(n.target, "__name__", "") == "add" for n in gm.graph.nodes)
    # float32 deploy model against the float64 reference
    fused32 = copy.deepcopy(fused).float()
    assert rel_err(fused32(x.float()), ref) <= 1e-4


@settings(max_examples=examples(100))
@given(
    channels=st.integers(1, 6),
    kernel=st.sampled_from([1, 3, 5]),
    order=st.permutations(["kxk", "1x1", "identity"]),
    form=st.sampled_from(["add", "radd", "torch.add", "iadd"]),
    post_bn=st.booleans(),
    size=st.integers(1, 9),
    seed=st.integers(0, 1000),
)
def test_fuse_branch_sums_any_order_and_form(channels, kernel, order, form, post_bn, size, seed):
    model = _simulate_training(RepBlock(channels, kernel, list(order), form, post_bn).double(), seed)
    x = torch.randn(2, channels, size, size + 2, dtype=torch.float64)
    ref = model(x)
    fused, report = fuse_with_report(model, example_inputs=(x,), graph=True)
    assert rel_err(fused(x), ref) <= 1e-10
    assert len(_convs(fused)) == 1 and not _bns(fused), str(report)
    in_place, modules_report = fuse_with_report(model, example_inputs=(x,))  # the module form: branch sums stay
    assert rel_err(in_place(x), ref) <= 1e-10
    assert any(o.reason.startswith("graph form only") for o in modules_report.refused), str(modules_report)


class SharedBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.other = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.bn(self.other(x))


class ConvUsedTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) * y


def _unchanged(model: nn.Module, x: torch.Tensor) -> tuple[nn.Module, object]:
    fused, report = fuse_with_report(_simulate_training(model, 0), example_inputs=(x,))
    assert rel_err(fused(x), model(x)) <= 1e-5
    return fused, report


def test_fuse_refuses_reused_bn_module():
    fused, report = _unchanged(SharedBN(), torch.randn(1, 3, 8, 8))
    assert len(_bns(fused)) == 1
    assert any("called 2 times" in o.reason for o in report.refused), str(report)


def test_fuse_refuses_conv_output_used_elsewhere():
    fused, report = _unchanged(ConvUsedTwice(), torch.randn(1, 3, 8, 8))
    assert len(_bns(fused)) == 1
    assert any("also used elsewhere" in o.reason for o in report.refused), str(report)


class TwoBranches(nn.Module):
    def __init__(self, a: nn.Conv2d, b: nn.Conv2d) -> None:
        super().__init__()
        self.a, self.b = a, b

    def forward(self, x):
        return self.a(x) + self.b(x)


# Pairs whose outputs have equal shapes but which are not one convolution.
MISMATCHED = {
    "stride mismatch": (nn.Conv2d(4, 4, 3, stride=2, padding=1), nn.Conv2d(4, 4, 1), 1),
    "dilation mismatch": (nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=2, dilation=2), 9),
    "misaligned": (nn.Conv2d(4, 4, 3, stride=3), nn.Conv2d(4, 4, 1, stride=3), 6),
}


@pytest.mark.parametrize("reason", sorted(MISMATCHED))
def test_fuse_refuses_mismatched_branches(reason):
    a, b, size = MISMATCHED[reason]
    x = torch.randn(1, 4, size, size)
    fused, report = _unchanged(TwoBranches(copy.deepcopy(a), copy.deepcopy(b)), x)
    assert len(_convs(fused)) == 2
    assert any(reason in o.reason for o in report.refused), str(report)


def test_fuse_training_mode_explains_itself():
    model = SiteNet(XVolution.from_conv(nn.Conv2d(3, 4, 3, padding=1)), True)
    with pytest.raises(FusionError, match=r"training mode.*eval\(\)"):
        fuse(model, example_inputs=(torch.randn(1, 3, 8, 8),))


def test_fuse_does_not_mutate_and_is_idempotent():
    model = _simulate_training(SiteNet(XVolution.from_conv(nn.Conv2d(3, 4, 3, padding=1)), True), 3)
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(2, 3, 7, 7)
    fused = fuse(model, example_inputs=(x,))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert isinstance(model.site, XVolution)
    assert isinstance(fused, SiteNet)
    again, report = fuse_with_report(fused, example_inputs=(x,))
    assert report.count() == 0
    assert torch.equal(again(x), fused(x))


def test_fuse_graph_module_in_graph_module_out():
    model = _simulate_training(SiteNet(XVolution.from_conv(nn.Conv2d(3, 4, 3, padding=1)), True), 4)
    x = torch.randn(2, 3, 7, 7)
    gm, report = fuse_graph(fx.symbolic_trace(copy.deepcopy(model)), (x,))
    assert isinstance(gm, fx.GraphModule)
    assert report.count("x-volution") == 1 and report.count("conv+bn") == 2
    assert rel_err(gm(x), model(x)) <= 1e-5


@torch.no_grad()
def _move_bn_statistics(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Training-mode forwards move the running statistics; affine values and BN_a gammas get random values."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = 0.5
            m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    model.train()
    for _ in range(3):
        model(torch.randn(x.shape, generator=g))
    return model.eval()


def _train_briefly(model: nn.Module, size: int, steps: int = 2) -> nn.Module:
    torch.manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    model.train()
    for _ in range(steps):
        out = model(torch.randn(4, 3, size, size))
        if isinstance(out, dict):
            out = out["out"]
        loss = out.float().pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def _xvolify_os16(model: nn.Module, size: int) -> nn.Module:
    from xvol_compiler import xvolify

    return xvolify(model, example_inputs=(torch.randn(1, 3, size, size),))


REAL_MODELS = {
    "resnet18": lambda: torchvision.models.resnet18(),
    "mobilenet_v3_large": lambda: torchvision.models.mobilenet_v3_large(),
    "efficientnet_b0": lambda: torchvision.models.efficientnet_b0(),
    "regnet_y_400mf": lambda: torchvision.models.regnet_y_400mf(),
    "convnext_tiny": lambda: torchvision.models.convnext_tiny(),
}


@pytest.mark.parametrize("name", sorted(REAL_MODELS))
def test_fuse_real_models_after_training(name):
    size = 64
    model = _train_briefly(_xvolify_os16(REAL_MODELS[name](), size), size)
    x = torch.randn(2, 3, size, size)
    ref = model(x)
    fused, report = fuse_with_report(model, example_inputs=(x,))
    sites = sum(isinstance(m, XVolution) for m in model.modules())
    assert report.count("x-volution") == sites > 0, str(report)
    assert not report.refused, str(report)
    assert rel_err(fused(x), ref) <= 1e-4
    assert not any(isinstance(m, XVolution) for m in fused.modules())


@pytest.mark.slow
def test_fuse_resnet50_all_sites_and_bns():
    model = _train_briefly(_xvolify_os16(torchvision.models.resnet50(), 64), 64)
    x = torch.randn(1, 3, 64, 64)
    # graph form: the 53 BatchNorms of ResNet-50 and the 6 attention-branch BNs, each a conv+bn rewrite
    flat, flat_report = fuse_with_report(model, example_inputs=(x,), graph=True)
    assert flat_report.count("x-volution") == 6 and flat_report.count("conv+bn") == 53 + 6
    assert not _bns(flat)
    assert rel_err(flat(x), model(x)) <= 1e-4
    # module form: the attention BNs fold inside each site's deploy module; the 53 pairs are conv+bn
    fused, report = fuse_with_report(model, example_inputs=(x,))
    assert report.count("x-volution") == 6 and report.count("conv+bn") == 53
    assert not _bns(fused)
    assert rel_err(fused(x), model(x)) <= 1e-4


@pytest.mark.parametrize("part", ["deeplabv3_backbone", "fasterrcnn_backbone"])
def test_fuse_segmentation_and_detection_backbones(part):
    if part == "deeplabv3_backbone":
        backbone = torchvision.models.segmentation.deeplabv3_mobilenet_v3_large(weights=None,
                                                                                weights_backbone=None).backbone
    else:
        backbone = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
            weights=None, weights_backbone=None).backbone
    from xvol_compiler import xvolify

    x = torch.randn(1, 3, 96, 96)
    model = xvolify(backbone, sites="all", example_inputs=(x,))
    _move_bn_statistics(model, x)
    ref = model(x)
    fused, report = fuse_with_report(model, example_inputs=(x,))
    assert report.count("x-volution") >= 1
    assert rel_err(torch.cat([t.flatten() for t in fused(x).values()]),
                   torch.cat([t.flatten() for t in ref.values()])) <= 1e-4


@pytest.mark.compile
def test_fused_model_compiles_fullgraph_and_exports():
    model = _train_briefly(_xvolify_os16(torchvision.models.resnet18(), 64), 64)
    x = torch.randn(1, 3, 64, 64)
    fused = fuse(model, example_inputs=(x,))
    compiled = torch.compile(fused, fullgraph=True)
    assert rel_err(compiled(x), fused(x)) <= 1e-4
    exported = torch.export.export(fused, (x,))
    assert rel_err(exported.module()(x), fused(x)) <= 1e-5


class ReluConvBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(torch.relu(x)))


def test_fused_code_leaves_tracing_of_other_models_intact():
    """Fused code must only mark its own interleave nodes as fx-wrapped, never an input like torch.relu."""
    x = torch.randn(1, 3, 8, 8)
    fused = fuse(_simulate_training(ReluConvBN(), 2), example_inputs=(x,))
    gm = fx.symbolic_trace(fused)
    assert rel_err(gm(x), fused(x)) <= 1e-6
    exported = torch.export.export(ReluConvBN().eval(), (x,))
    assert exported.module()(x).shape == (1, 4, 8, 8)


def test_global_attention_sites_are_refused_with_reason_while_bns_fold():
    """X-volution (SA): the graph pass leaves the site unmerged, says why, and still folds what it can."""
    from xvol_compiler import xvolify

    x = torch.randn(2, 3, 64, 64)
    model = _train_briefly(xvolify(torchvision.models.resnet18(), attention="global", example_inputs=x[:1]), 64)
    sites = sum(type(m).__name__ == "GlobalAttentionXVolution" for m in model.modules())
    fused, report = fuse_with_report(model, example_inputs=(x,))
    reasons = [o.reason for o in report.refused]
    assert reasons.count("global attention is input-dependent, not a convolution") == sites > 0, str(report)
    assert report.count("x-volution") == 0
    assert report.count("conv+bn") >= 15
    assert rel_err(fused(x), model(x)) <= 1e-4


def test_exported_programs_and_their_aten_graphs_fuse():
    model = _simulate_training(SiteNet(XVolution.from_conv(nn.Conv2d(3, 4, 3, padding=1)), True), 5)
    x = torch.randn(2, 3, 7, 7)
    ep = torch.export.export(model, (x,))
    program, report = fuse_with_report(ep)
    assert isinstance(program, torch.export.ExportedProgram) and report.count("x-volution") == 1
    assert rel_err(program.module()(x), model(x)) <= 1e-6
    fused, report = fuse_with_report(ep.module(), example_inputs=(x,))  # the unlifted ATen graph alone
    assert report.count("x-volution") == 1
    assert rel_err(fused(x), model(x)) <= 1e-6
