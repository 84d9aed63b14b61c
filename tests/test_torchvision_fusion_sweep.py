"""fuse on every torchvision model (weights=None, small inputs, trained-like BatchNorm statistics).

For each model: X-volution is inserted at the default sites ("os16") where it has any, the BatchNorm
statistics (the new attention BatchNorms included) are set away from their initial values, and ``fuse``
runs with its verification on. Independently of that verification, the fused and unfused float32 models
are compared here with forward hooks: detection models on the outputs of ``backbone`` and ``head``
(R-CNNs: ``rpn.head``), before post-processing; all other models on their outputs. Relative error
(max |fused - unfused| / max |unfused| per tensor) at most 1e-4.

The full sweep is marked slow (``pytest -m slow tests/test_torchvision_fusion_sweep.py``); ``CI_MODELS``
run in CI. The inputs and model arguments are those of the insertion sweep (tests/test_torchvision_sweep.py).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn
from torchvision import models as M

import xvol_compiler as xc
from tests.test_reliability_verify import trained_like
from tests.test_torchvision_sweep import ALL_MODELS, _case, _run, _tensors

CI_MODELS = ["resnet18", "ssdlite320_mobilenet_v3_large"]
RTOL = 1e-4


def _stages(model: nn.Module) -> list[str]:
    """Detection models (the detection family: a transform, a backbone, a head or an rpn): the modules
    before post-processing. Segmentation models also have a backbone, but no post-processing."""
    if not isinstance(model, (M.detection.ssd.SSD, M.detection.retinanet.RetinaNet, M.detection.fcos.FCOS,
                              M.detection.generalized_rcnn.GeneralizedRCNN)):
        return []
    names = dict(model.named_modules())
    return [p for p in ("backbone", "head", "rpn.head") if p in names]


def _outputs(model: nn.Module, inputs: Any, stages: list[str]) -> list[torch.Tensor]:
    """The model's output tensors, or those of ``stages`` (hooks set here), in a fixed order."""
    captured: dict[str, Any] = {}
    handles = [model.get_submodule(p).register_forward_hook(
        lambda _m, _a, out, p=p: captured.setdefault(p, out)) for p in stages]
    try:
        with torch.no_grad():
            out = _run(model, inputs)
    finally:
        for h in handles:
            h.remove()
    if stages:
        assert set(captured) == set(stages), f"stages not called: {set(stages) - set(captured)}"
        return [t for p in stages for t in _tensors(captured[p])]
    return _tensors(out)


def check_fusion(name: str) -> dict[str, Any]:
    case = _case(name)
    torch.manual_seed(0)
    model = M.get_model(name, weights=None, **case.kwargs).eval()
    try:
        model = xc.xvolify(model, example_inputs=case.inputs).eval()
    except xc.SiteSelectionError:
        pass  # no os16 site: conv + BN folding is still checked
    model = trained_like(model, gain=0.5)
    example = case.inputs if isinstance(case.inputs, tuple) else (case.inputs,)
    fused, report = xc.fuse_with_report(model, example_inputs=example)
    stages = _stages(model)
    want, got = _outputs(model, case.inputs, stages), _outputs(fused, case.inputs, stages)
    assert len(want) == len(got) and want
    worst = 0.0
    for w, g in zip(want, got, strict=True):
        assert w.shape == g.shape
        if not w.is_floating_point() or w.numel() == 0:
            continue
        assert torch.isfinite(w).all()
        worst = max(worst, float((g - w).abs().max()) / max(float(w.abs().max()), 1e-30))
    assert worst <= RTOL, f"{name}: relative error {worst:.3g}"
    return {"fused": sum(o.status == "fused" for o in report.outcomes), "worst": worst, "stages": stages}


@pytest.mark.parametrize("name", CI_MODELS)
def test_ci_fusion_subset(name: str) -> None:
    result = check_fusion(name)
    assert result["fused"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("name", ALL_MODELS)
def test_every_torchvision_model_fuses(name: str) -> None:
    check_fusion(name)
