"""Fused checkpoints record what replaced what, and rebuild from the record (no xvolify + fuse on random weights).

References: the fused model that was saved (float32, same weights) and a float64 run of the unfused model.
"""

from __future__ import annotations

import copy
import json

import pytest
import timm
import torch
import torchvision
from torch import nn

from tests.strategies import randomize_bn, rel_err
from xvol_compiler import XVolutionDeploy, fuse, xvolify
from xvol_compiler.checkpoint import CheckpointError
from xvol_compiler.io import ModelSpec, load_model, save_model
from xvol_passes.fused_record import FusedRecordError, fused_record, rebuild_fused


def _xvolified_resnet18(size: int = 64) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    x = torch.randn(2, 3, size, size)
    model = xvolify(torchvision.models.resnet18(num_classes=10), example_inputs=(x,)).eval()
    with torch.no_grad():
        randomize_bn(model, seed=3)
        for m in model.modules():
            if hasattr(m, "attn_bn"):
                m.attn_bn.weight.uniform_(0.5, 1.5)
    return model, x


@pytest.mark.parametrize("lowering", ["channel", "spatial", "spatial-h", "stack"])
def test_record_rebuilds_the_fused_structure_in_a_fresh_model(lowering):
    model, x = _xvolified_resnet18()
    fused = fuse(model, example_inputs=(x,), lowering=lowering)
    record = json.loads(json.dumps(fused_record(fused, fused.xvol_fused_modules)))  # plain data
    assert {e["module"] for e in record["modules"]} == {"x-volution", "conv", "identity"}
    rebuilt = rebuild_fused(torchvision.models.resnet18(num_classes=10), record)
    rebuilt.load_state_dict(fused.state_dict(), strict=True)
    assert isinstance(rebuilt.layer3[0].conv1, XVolutionDeploy) and isinstance(rebuilt.layer3[0].bn1, nn.Identity)
    with torch.no_grad():
        reference = copy.deepcopy(model).double()(x.double())
        assert torch.equal(rebuilt(x), fused(x))
        assert rel_err(rebuilt(x), reference) <= 1e-5


def test_fused_checkpoint_loads_from_its_record(tmp_path):
    model, x = _xvolified_resnet18()
    fused = fuse(model, example_inputs=(x,))
    spec = ModelSpec(model="resnet18", num_classes=10, stage="fused", input_size=[3, 64, 64],
                     fused_modules=fused_record(fused, fused.xvol_fused_modules))
    path = save_model(tmp_path / "fused.pt", fused, spec)
    loaded, loaded_spec = load_model(path)
    assert loaded_spec.fused_modules == spec.fused_modules
    with torch.no_grad():
        assert torch.equal(loaded(x), fused(x))


class _NormActNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = timm.layers.BatchNormAct2d(8, act_layer=nn.PReLU)  # a stateful activation
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = timm.layers.BatchNormAct2d(8, act_layer=nn.SiLU)

    def forward(self, x):
        return self.bn2(self.conv2(self.bn(self.conv(x))))


def test_norm_act_layers_rebuild_with_their_activation():
    model = randomize_bn(_NormActNet(), seed=4).eval()
    x = torch.randn(2, 3, 9, 9)
    fused = fuse(model, example_inputs=(x,))
    assert isinstance(fused.bn2, nn.SiLU)  # the bare activation: no state, no key moves
    assert list(fused.bn.state_dict()) == ["act.weight"]  # PReLU keeps its key under the norm-act's path
    record = fused_record(fused, fused.xvol_fused_modules)
    rebuilt = rebuild_fused(_NormActNet().eval(), record)
    rebuilt.load_state_dict(fused.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), fused(x))
        assert rel_err(fused(x), copy.deepcopy(model).double()(x.double())) <= 1e-5


def test_record_that_does_not_fit_the_model_is_an_error():
    model, x = _xvolified_resnet18()
    fused = fuse(model, example_inputs=(x,))
    record = fused_record(fused, fused.xvol_fused_modules)
    with pytest.raises(FusedRecordError, match=r"names '[a-z0-9.]+', which the model does not have"):
        rebuild_fused(nn.Sequential(nn.Conv2d(3, 3, 1)), record)
    with pytest.raises(FusedRecordError, match="version"):
        rebuild_fused(torchvision.models.resnet18(num_classes=10), {**record, "version": 99})


def test_checkpoint_of_the_flat_form_still_loads_or_says_how_to_refuse(tmp_path):
    """A fused checkpoint without a record (earlier versions saved the flat graph form's state dict)."""
    model, x = _xvolified_resnet18()
    sites = [p for p, m in model.named_modules() if hasattr(m, "attn_bn")]
    flat = fuse(model, example_inputs=(x,), graph=True, lowering="channel")
    spec = ModelSpec(model="resnet18", num_classes=10, stage="fused", input_size=[3, 64, 64], sites=sites,
                     lowerings=flat.xvol_fusion_report.lowerings())
    path = save_model(tmp_path / "flat.pt", flat, spec)
    loaded, _ = load_model(path)
    with torch.no_grad():
        assert torch.equal(loaded(x), flat(x))
    # weights that fit no rebuilt structure: the message says how to re-fuse
    wrong = save_model(tmp_path / "wrong.pt", nn.Sequential(nn.Conv2d(3, 3, 1)), spec)
    with pytest.raises(CheckpointError, match=r"(?s)earlier version.*xvol fuse XVOLIFIED\.pt -o FUSED\.pt"):
        load_model(wrong)
