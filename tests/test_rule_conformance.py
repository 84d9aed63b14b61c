"""Conformance: the same small graph through both adapters (torch.fx graph form and ONNX) gives the same
outcomes (rule names, fused and refused counts), and both fused models equal a float64 run of the unfused
model (onnxruntime runs the fused ONNX graph).
"""

from __future__ import annotations

import copy
from collections import Counter

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from tests.random_cnn import simulate_training
from xvol_compiler import XVolution, export_onnx, fuse_onnx
from xvol_passes.fuse_fx import fuse_with_report


class SmallNet(nn.Module):
    """conv + BN, an X-volution site + BN, a RepVGG-like branch sum and an identity branch."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.stem_bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.site, self.site_bn = XVolution.from_conv(nn.Conv2d(8, 8, 3, padding=1)), nn.BatchNorm2d(8)
        self.k3, self.k1 = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 1)
        self.res = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem_bn(self.stem(x)))
        x = torch.relu(self.site_bn(self.site(x)))
        x = torch.relu(self.k3(x) + self.k1(x))
        return self.res(x) + x


def test_both_adapters_fuse_the_same_graph_the_same_way(tmp_path) -> None:
    torch.manual_seed(0)
    model = simulate_training(SmallNet()).eval()
    with torch.no_grad():  # a trained attention branch: T(x) reaches the output
        model.site.attn_bn.weight.uniform_(0.5, 1.0)
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        reference = copy.deepcopy(model).double()(x.double())

    fused_fx, fx_report = fuse_with_report(model, example_inputs=(x,), graph=True)
    path = tmp_path / "unfused.onnx"
    export_onnx(model, path, (x,))
    fused_onnx, onnx_report = fuse_onnx(str(path))

    def outcomes(report) -> Counter:
        return Counter((o.kind, o.status) for o in report.outcomes)

    # The FX graph form folds the attention BatchNorm into its conv, the ONNX export hands it in folded
    # already (or as a BatchNormalization the same rule folds): compare everything but conv+bn counts.
    fx, onnx = outcomes(fx_report), outcomes(onnx_report)
    for key in (("x-volution", "fused"), ("branch-sum", "fused"), ("identity-branch", "fused")):
        assert fx[key] == onnx[key] == 1, (fx, onnx)
    assert {k for k in fx if k[1] == "refused"} == {k for k in onnx if k[1] == "refused"}
    assert fx[("conv+bn", "fused")] >= 2 and onnx[("conv+bn", "fused")] >= 1

    with torch.no_grad():
        got_fx = fused_fx(x).double()
    session = ort.InferenceSession(fused_onnx.SerializeToString(), providers=["CPUExecutionProvider"])
    (got_onnx,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    scale = float(reference.abs().max())
    assert float((got_fx - reference).abs().max()) / scale < 1e-5
    assert float(np.abs(got_onnx - reference.numpy()).max()) / scale < 1e-5
