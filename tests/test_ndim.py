"""X-volution for Conv1d and Conv3d: FX fusion on random 1-D/3-D sites, and the torchvision video models."""

from __future__ import annotations

import pytest
import torch
import torchvision
from hypothesis import given, note, settings
from hypothesis import strategies as st
from torch import nn

from tests.hyp import examples
from tests.strategies import conv_sites, randomize_bn, rel_err
from xvol_compiler import XVolution, fuse_with_report, xvolify

BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


class SiteWithBN(nn.Module):
    def __init__(self, site: XVolution) -> None:
        super().__init__()
        self.site = site
        self.bn = BN[site.ndim](site.out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.site(x))


@settings(max_examples=examples(100))
@given(
    spec=conv_sites(ndims=(1, 3), max_kernel=5),
    shift=st.integers(1, 2),
    full=st.booleans(),
    directional=st.booleans(),
    seed=st.integers(0, 100),
)
def test_fx_fuse_1d_3d_sites(spec, shift, full, directional, seed):
    conv = spec.conv(torch.float64)
    site = XVolution.from_conv(conv, shift=shift, directions="full" if full else "axial", directional=directional)
    model = randomize_bn(SiteWithBN(site).double(), seed)
    with torch.no_grad():
        site.attn_conv.weight.normal_()
    model.eval()
    x = spec.input(torch.float64)
    note(repr(site))
    ref = model(x)
    fused, report = fuse_with_report(model, example_inputs=(x,))
    assert report.count("x-volution") == 1, str(report)
    assert rel_err(fused(x), ref) <= 1e-10
    kinds = [type(m) for m in fused.modules() if isinstance(m, (nn.Conv1d, nn.Conv3d, nn.modules.batchnorm._BatchNorm))]
    assert kinds == [type(conv)]


@torch.no_grad()
def _move_bn_statistics(model: nn.Module, clip: torch.Tensor) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = 0.5
            m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            if name.endswith("attn_bn"):  # small attention gammas: stacked second-order terms grow fast
                m.weight.mul_(0.1)
    model.train()
    for _ in range(2):  # batch 2: a single clip gives near-zero variances in the late 1x1x1 stages
        model(torch.randn((2, *clip.shape[1:]), generator=g))
    return model.eval()


VIDEO = {
    "r3d_18": torchvision.models.video.r3d_18,
    "mc3_18": torchvision.models.video.mc3_18,
    "r2plus1d_18": torchvision.models.video.r2plus1d_18,
    "s3d": torchvision.models.video.s3d,
}


def _video_roundtrip(name: str, clip: torch.Tensor) -> None:
    model = xvolify(VIDEO[name]().eval(), example_inputs=(clip,))
    sites = [n for n, m in model.named_modules() if isinstance(m, XVolution)]
    assert sites, model.xvol_report
    assert all(isinstance(m.attn_conv, nn.Conv3d) for m in model.modules() if isinstance(m, XVolution))
    _move_bn_statistics(model, clip)
    ref = model(clip)
    fused, report = fuse_with_report(model, example_inputs=(clip,))
    assert report.count("x-volution") == len(sites), str(report)
    assert rel_err(fused(clip), ref) <= 1e-4


def test_video_r3d_18_sites_at_spatial_os16_fuse():
    clip = torch.randn(1, 3, 4, 64, 64)
    model = xvolify(torchvision.models.video.r3d_18().eval(), example_inputs=(clip,))
    report = str(model.xvol_report)
    assert "layer4.0.conv1.0" in report and "Conv3d" in report
    _video_roundtrip("r3d_18", clip)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(VIDEO))
def test_video_models_full_clip(name):
    # s3d ends in a (2, 7, 7) average pool: it needs 16 frames of 224 px.
    shape = (1, 3, 16, 224, 224) if name == "s3d" else (1, 3, 8, 112, 112)
    _video_roundtrip(name, torch.randn(shape))


def test_video_r3d_18_onnx_fusion(tmp_path):
    from xvol_compiler.onnx_io import export_onnx
    from xvol_passes.fuse_onnx import fuse_onnx

    clip = torch.randn(1, 3, 4, 32, 32)
    model = _move_bn_statistics(xvolify(torchvision.models.video.r3d_18().eval(), example_inputs=(clip,)), clip)
    path = tmp_path / "r3d.onnx"
    export_onnx(model, path, (clip,))
    fused, report = fuse_onnx(path)
    assert report.count("x-volution") == sum(isinstance(m, XVolution) for m in model.modules()), str(report)
    assert report.max_rel_error is not None and report.max_rel_error <= 1e-4
    assert not [n for n in fused.graph.node if n.op_type == "BatchNormalization"]
