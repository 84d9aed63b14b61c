"""The xvolify pass on torchvision models and small hand-made ones."""

from __future__ import annotations

import io
import math
import re

import pytest
import torch
import torchvision
from torch import nn

import xvol_compiler as xc
from tests.strategies import rel_err
from xvol_compiler.fold import FoldError
from xvol_compiler.global_attention import GLOBAL_ATTENTION_NOT_FUSABLE, global_attention

LAYER3 = [f"layer3.{i}.conv2" for i in range(6)]
RESNET18_OS16 = ["layer3.0.conv1", "layer3.0.conv2", "layer3.1.conv1", "layer3.1.conv2"]
SMALL = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def resnet50() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet50().eval()


@pytest.fixture(scope="module")
def resnet50_x(resnet50: nn.Module) -> nn.Module:
    return xc.xvolify(resnet50)  # default sites and default 1x3x224x224 analysis input


def _new_keys(model: nn.Module, names: list[str]) -> set[str]:
    return {k for k in model.state_dict() if any(k.startswith(n + ".attn_") for n in names)}


def test_resnet50_default_selects_the_six_stage3_convs(resnet50_x: nn.Module) -> None:
    report = resnet50_x.xvol_report
    assert isinstance(report, xc.XvolifyReport)
    assert report.selected_names == LAYER3
    assert all(set(s.output_strides) == {16.0} for s in report.selected)
    assert report.analysis == "fx+hooks" and report.kind == "classification"
    text = str(report)
    for name in LAYER3:
        assert re.search(rf"^{re.escape(name)}\s+Conv2d\s+256->256 k3 s[12]\s+16\s", text, re.M), text
    # docs/operator.md, section 5: the six sites add about 17% to ResNet-50's multiply-adds.
    assert 0.16 < report.added_mac_fraction < 0.18
    assert report.added_params == 6 * (256 * 256 * 9 + 2 * 256)
    for name in LAYER3:
        assert isinstance(resnet50_x.get_submodule(name), xc.XVolution)


def test_output_equal_class_kept_and_caller_untouched(resnet50: nn.Module, resnet50_x: nn.Module) -> None:
    assert type(resnet50_x) is torchvision.models.ResNet
    assert not hasattr(resnet50, "xvol_report")
    assert all(isinstance(resnet50.get_submodule(n), nn.Conv2d) for n in LAYER3)
    with torch.no_grad():
        assert torch.equal(resnet50_x(SMALL), resnet50(SMALL))


def test_inplace_mutates_and_returns_the_same_object() -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    with torch.no_grad():
        ref = model(SMALL)
    out = xc.xvolify(model, inplace=True, example_inputs=SMALL)
    assert out is model and isinstance(model.layer3[0].conv2, xc.XVolution)
    assert model.xvol_report.selected_names == RESNET18_OS16
    with torch.no_grad():
        assert torch.equal(model(SMALL), ref)


def test_state_dict_round_trip(resnet50: nn.Module, resnet50_x: nn.Module) -> None:
    new = _new_keys(resnet50_x, LAYER3)
    assert len(new) == 6 * 6  # attn_conv.weight + attn_bn.{weight,bias,running_mean,running_var,num_batches_tracked}
    # The original checkpoint loads into the xvolified model: only the new keys are missing.
    # (BatchNorm fills a missing num_batches_tracked itself, so load_state_dict does not list it.)
    result = resnet50_x.load_state_dict(resnet50.state_dict(), strict=False)
    assert set(result.missing_keys) == {k for k in new if not k.endswith("num_batches_tracked")}
    assert not result.unexpected_keys
    # Site weights keep their keys and values.
    for name in LAYER3:
        assert torch.equal(resnet50_x.state_dict()[name + ".weight"], resnet50.state_dict()[name + ".weight"])
    # And back: the xvolified checkpoint loads into the original with only the new keys unexpected.
    fresh = torchvision.models.resnet50()
    back = fresh.load_state_dict(resnet50_x.state_dict(), strict=False)
    assert set(back.unexpected_keys) == new and not back.missing_keys


def test_train_step_reaches_the_new_parameters() -> None:
    torch.manual_seed(0)
    model = xc.xvolify(torchvision.models.resnet18(), example_inputs=SMALL).train()
    sites = [model.get_submodule(n) for n in model.xvol_report.selected_names]
    assert sites
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.rand(2, 3, 64, 64)
    model(x).square().mean().backward()
    for s in sites:
        # gamma = 0 blocks Conv_a at step 1: only BN_a's gamma and beta get a gradient.
        assert s.attn_bn.weight.grad.abs().sum() > 0 and s.attn_bn.bias.grad.abs().sum() > 0
        assert s.attn_conv.weight.grad is None or s.attn_conv.weight.grad.abs().sum() == 0
    opt.step()
    opt.zero_grad()
    model(x).square().mean().backward()
    for s in sites:
        assert s.attn_conv.weight.grad.abs().sum() > 0


def test_detection_model_keeps_class_and_trains() -> None:
    torch.manual_seed(0)
    model = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, min_size=128, max_size=128).eval()
    images = [torch.rand(3, 128, 128)]
    with torch.no_grad():
        ref = model(images)
    x = xc.xvolify(model, example_inputs=images)
    assert type(x) is type(model)
    report = x.xvol_report
    assert report.kind == "detection" and report.analysis == "hooks"
    assert report.selected and all(s.name.startswith("backbone.body.") for s in report.selected)
    with torch.no_grad():
        out = x(images)
    for a, b in zip(out, ref, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)
    x.train()
    targets = [{"boxes": torch.tensor([[10.0, 20.0, 70.0, 90.0]]), "labels": torch.tensor([3])}]
    losses = x(images, targets)
    assert set(losses) >= {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    sum(losses.values()).backward()
    site = x.get_submodule(report.selected_names[0])
    assert site.attn_bn.weight.grad is not None


def test_video_model_gets_conv3d_sites_at_spatial_os16() -> None:
    torch.manual_seed(0)
    model = torchvision.models.video.r3d_18().eval()
    clip = torch.rand(1, 3, 4, 64, 64)
    x = xc.xvolify(model, example_inputs=clip)
    report = x.xvol_report
    assert report.kind == "video"
    assert report.selected_names == ["layer4.0.conv1.0", "layer4.0.conv2.0", "layer4.1.conv1.0", "layer4.1.conv2.0"]
    for s in report.selected:
        assert s.conv_type == "Conv3d" and s.class_name == "Conv3DSimple"
        assert set(s.output_strides) == {16.0} and s.temporal_strides == (4.0,)
    assert "16 (t 4)" in str(report)
    with torch.no_grad():
        assert torch.equal(x(clip), model(clip))


def test_default_video_inputs() -> None:
    from xvol_compiler.sites import default_example_inputs

    model = torchvision.models.video.r3d_18()
    assert default_example_inputs(model).shape == (1, 3, 8, 112, 112)
    det = torchvision.models.detection.ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None)
    images = default_example_inputs(det)
    assert isinstance(images, list) and images[0].shape == (3, 224, 224)


@pytest.mark.parametrize("builder", ["vit", "swin"])
def test_transformers_have_no_site(builder: str) -> None:
    if builder == "vit":
        model = torchvision.models.VisionTransformer(
            image_size=64, patch_size=16, num_layers=1, num_heads=2, hidden_dim=32, mlp_dim=32)
    else:
        model = torchvision.models.swin_t()
    with pytest.raises(xc.SiteSelectionError, match="no spatial convolution besides patch embeddings") as err:
        xc.xvolify(model, example_inputs=SMALL)
    assert "patch embedding" in str(err.value)
    # Named explicitly, a patch embedding can still be forced.
    name = "conv_proj" if builder == "vit" else "features.0.0"
    forced = xc.xvolify(model, [name], example_inputs=SMALL)
    assert forced.xvol_report.selected_names == [name]


def test_global_attention_module_matches_reference() -> None:
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5), torch.randn(2, 7, 4, 5)
    qf, kf, vf = (t.flatten(2).double() for t in (q, k, v))
    attn = torch.softmax(qf.transpose(1, 2) @ kf / math.sqrt(3), dim=-1)  # (N, P, P)
    ref = (vf @ attn.transpose(1, 2)).reshape(2, 7, 4, 5)
    assert rel_err(global_attention(q, k, v), ref) < 1e-5


@pytest.mark.parametrize("ndim", [1, 2, 3])
def test_global_attention_site_is_exact_at_insertion_and_refuses_fusion(ndim: int) -> None:
    torch.manual_seed(0)
    conv = [nn.Conv1d, nn.Conv2d, nn.Conv3d][ndim - 1](8, 6, 3, 2, 1, groups=2)
    site = xc.GlobalAttentionXVolution.from_conv(conv).eval()
    x = torch.randn(2, 8, *([6] * ndim))
    assert torch.equal(site(x), conv(x))
    assert {k for k in site.state_dict() if not k.startswith("attn_")} == {"weight", "bias"}
    with pytest.raises(FoldError, match=GLOBAL_ATTENTION_NOT_FUSABLE):
        site.fuse()


def test_global_attention_variant_trains() -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    with torch.no_grad():
        ref = model(SMALL)
    x = xc.xvolify(model, attention="global", example_inputs=SMALL)
    assert "global" in x.xvol_report.attention
    sites = [x.get_submodule(n) for n in x.xvol_report.selected_names]
    assert sites and all(isinstance(s, xc.GlobalAttentionXVolution) for s in sites)
    with torch.no_grad():
        assert torch.equal(x(SMALL), ref)
    x.train()
    opt = torch.optim.SGD(x.parameters(), lr=0.05)
    batch = torch.rand(2, 3, 32, 32)  # stage 3 is 2x2 here: enough for attention, cheap
    for _ in range(2):
        opt.zero_grad()
        x(batch).square().mean().backward()
        opt.step()
    for s in sites:
        for p in (s.attn_q.weight, s.attn_k.weight, s.attn_v.weight, s.attn_conv.weight, s.attn_bn.weight):
            assert p.grad is not None and p.grad.abs().sum() > 0
    with pytest.raises(FoldError, match=GLOBAL_ATTENTION_NOT_FUSABLE):
        sites[0].eval().fuse()


class _Heads(nn.Module):
    """A backbone at output strides 8 and 16, one head conv shared by both levels, and an alias."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, 4, 1)
        self.c2 = nn.Conv2d(8, 8, 3, 2, 1)
        self.c3 = nn.Conv2d(8, 8, 3, 2, 1)
        self.head = nn.Conv2d(8, 8, 3, 1, 1)
        self.head_alias = self.head  # the same module registered twice

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        p8 = self.c2(self.c1(x))
        p16 = self.c3(p8)
        return [self.head(p8), self.head_alias(p16)]


def test_shared_head_policy_and_aliases() -> None:
    model = _Heads().eval()
    x = torch.rand(1, 3, 64, 64)
    out = xc.xvolify(model, example_inputs=x)
    report = out.xvol_report
    assert report.selected_names == ["c3", "head"]
    head = next(s for s in report.selected if s.name == "head")
    assert head.calls == 2 and head.output_strides == (8.0, 16.0) and head.aliases == ("head_alias",)
    assert out.head is out.head_alias and isinstance(out.head, xc.XVolution)
    assert "selected if any call qualifies" in str(report)
    strict = xc.xvolify(model, xc.SiteSelection(output_strides={16}, shared_calls="all"), example_inputs=x)
    assert strict.xvol_report.selected_names == ["c3"]
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(out(x), model(x), strict=True))


def test_budget_takes_the_largest_sites_first(resnet50: nn.Module) -> None:
    x = xc.xvolify(resnet50, xc.SiteSelection(output_strides={16}, max_sites=2), example_inputs=SMALL)
    assert x.xvol_report.selected_names == ["layer3.0.conv2", "layer3.1.conv2"]  # equal MACs: ties by name
    skipped = next(s for s in x.xvol_report.sites if s.name == "layer3.5.conv2")
    assert skipped.reason.startswith("budget: max_sites=2")
    frac = xc.xvolify(resnet50, xc.SiteSelection(output_strides={16}, max_added_mac_fraction=0.06),
                      example_inputs=SMALL)
    assert len(frac.xvol_report.selected) == 2 and frac.xvol_report.added_mac_fraction <= 0.06
    with pytest.raises(xc.SiteSelectionError, match="budget"):
        xc.xvolify(resnet50, xc.SiteSelection(output_strides={16}, max_added_mac_fraction=1e-4),
                   example_inputs=SMALL)


def test_selection_shorthands_on_a_resnet(resnet50: nn.Module) -> None:
    by_regex = xc.xvolify(resnet50, r"re:^layer3\.[0-2]\.conv2$", example_inputs=SMALL)
    assert by_regex.xvol_report.selected_names == LAYER3[:3]
    by_name = xc.xvolify(resnet50, ["layer2.0.conv2", "layer4.0.downsample.0"], example_inputs=SMALL)
    assert by_name.xvol_report.selected_names == ["layer2.0.conv2", "layer4.0.downsample.0"]
    by_pred = xc.xvolify(resnet50, lambda name, module, info: info.geometry.stride == (2, 2) and not info.pointwise,
                         example_inputs=SMALL)
    assert by_pred.xvol_report.selected_names == ["conv1", "layer2.0.conv2", "layer3.0.conv2", "layer4.0.conv2"]
    with pytest.raises(xc.SiteSelectionError, match=r"close matches: .*layer3\.0\.conv2"):
        xc.xvolify(resnet50, ["layer3.0.conv"], example_inputs=SMALL)
    with pytest.raises(xc.SiteSelectionError, match=r"strides present: 2 \(1\), 4 \(3\), 8 \(4\), 16 \(6\), 32"):
        xc.xvolify(resnet50, "os64", example_inputs=SMALL)


def test_extra_branches_skip_sites_that_cannot_hold_them() -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    x = xc.xvolify(model, extra_branches=("identity", "1x1"), example_inputs=SMALL)
    report = x.xvol_report
    assert report.selected_names == RESNET18_OS16[1:]
    skipped = {s.name: s.reason for s in report.sites if s.reason.startswith("extra branch")}
    assert list(skipped) == ["layer3.0.conv1"] and "stride 1" in skipped["layer3.0.conv1"]
    assert isinstance(x.layer3[1].conv1.branch_identity, nn.BatchNorm2d)
    with torch.no_grad():
        assert torch.equal(x(SMALL), model(SMALL))


def test_googlenet_aux_convs_are_not_run_unless_named() -> None:
    model = torchvision.models.googlenet(aux_logits=True, init_weights=False).eval()
    x = xc.xvolify(model, example_inputs=SMALL)
    aux = [s for s in x.xvol_report.sites if s.name.startswith("aux1.")]
    assert aux and all(s.reason.startswith("not run") and s.calls == 0 for s in aux)
    named = xc.xvolify(model, ["aux1.conv.conv"], example_inputs=SMALL)
    assert named.xvol_report.selected_names == ["aux1.conv.conv"]
    assert "not run" in str(named.xvol_report)


def test_conv1d_model_and_pssa_options() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv1d(4, 8, 5, 4, 2), nn.ReLU(), nn.Conv1d(8, 8, 3, 4, 1), nn.BatchNorm1d(8), nn.Conv1d(8, 8, 3, 1, 1),
    ).eval()
    x = xc.xvolify(model, shift=2, directional=True)  # default input: 1x4x224 from the first conv
    assert x.xvol_report.kind == "sequence" and x.xvol_report.selected_names == ["2", "4"]
    assert x[2].shift == (2,) and x[2].directional
    seq = torch.randn(2, 4, 96)
    with torch.no_grad():
        assert torch.equal(x(seq), model(seq))
    # directional PSSA in 1-D has |D| = 2 neighbours: twice the attention conv's MACs.
    assert x.xvol_report.selected[0].added_macs == 2 * x.xvol_report.selected[0].macs


def test_option_errors() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3, 16, 1))
    with pytest.raises(ValueError, match="attention='local'"):
        xc.xvolify(model, attention="local")
    with pytest.raises(ValueError, match="directional=True applies to PSSA only"):
        xc.xvolify(model, attention="global", directional=True)
    with pytest.raises(ValueError, match="unknown extra branches"):
        xc.xvolify(model, extra_branches=("2x2",))
    with pytest.raises(xc.SiteSelectionError, match="failed"):
        xc.xvolify(model, example_inputs=torch.rand(1, 5, 32, 32))


def test_xvolify_with_report_and_rich_rendering() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3, 16, 1))
    out, report = xc.xvolify_with_report(model, example_inputs=torch.rand(1, 3, 32, 32))
    assert out.xvol_report is report and report.selected_names == ["0"]
    from rich.console import Console

    console = Console(width=200, record=True, file=io.StringIO())
    console.print(report)
    assert "xvolify: Sequential" in console.export_text()
    assert report.to_dict()["added_macs"] == report.added_macs
    assert "0" in report.table(everything=True)


def test_xvolified_sites_fuse_to_the_same_output() -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    x = xc.xvolify(model, example_inputs=SMALL)
    for name in x.xvol_report.selected_names:
        site = x.get_submodule(name)
        with torch.no_grad():
            site.attn_bn.weight.normal_()  # pretend it trained
            feats = torch.randn(1, site.in_channels, 8, 8)
            assert rel_err(site.fuse()(feats), site(feats)) < 1e-4


def test_xvolifying_twice_says_the_sites_exist() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3, 4, 1), nn.Conv2d(4, 4, 3, 4, 1), nn.Conv2d(4, 4, 3, 1, 1))
    once = xc.xvolify(model, example_inputs=torch.rand(1, 3, 32, 32))
    assert once.xvol_report.selected_names == ["1", "2"]
    with pytest.raises(xc.SiteSelectionError, match=r"2 X-volution site\(s\) already present \(1, 2\)"):
        xc.xvolify(once, example_inputs=torch.rand(1, 3, 32, 32))
    with pytest.raises(xc.SiteSelectionError, match="'1' is already an X-volution site"):
        xc.xvolify(once, ["1"], example_inputs=torch.rand(1, 3, 32, 32))
