"""xvolify on every torchvision model (weights=None, small inputs).

For each model: xvolify with the default policy ("os16") either succeeds and
selects exactly the convs that an independent hook-based check finds at
output stride 16, or raises the documented "no site" error and the
independent check confirms there is no such conv. The xvolified model's eval
output equals the original's bit for bit, the original state_dict loads
with only the new attention keys missing, and one training step runs
(detection: train mode on images and targets) and reaches the new BN_a.

The full sweep is marked slow (``pytest -m slow tests/test_torchvision_sweep.py``);
``CI_MODELS`` run in CI. Covered: classification, segmentation, detection,
video, optical flow (RAFT), and the quantizable classification models built
float (``quantize=False``, the builders' default; quantized weights need
downloads and a quantized engine, and X-volution trains in float anyway).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torchvision
from torch import nn
from torchvision import models as M

import xvol_compiler as xc

FAMILIES = {
    "classification": M,
    "segmentation": M.segmentation,
    "detection": M.detection,
    "video": M.video,
    "optical_flow": M.optical_flow,
    "quantization": M.quantization,
}
FAMILY_OF = {name: fam for fam, mod in FAMILIES.items() for name in M.list_models(module=mod)}
ALL_MODELS = sorted(FAMILY_OF)

CI_MODELS = [
    "resnet18", "resnext50_32x4d", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "regnet_y_400mf",
    "densenet121", "convnext_tiny", "shufflenet_v2_x0_5", "squeezenet1_0", "googlenet", "inception_v3",
    "mnasnet0_5", "fcn_resnet50", "deeplabv3_mobilenet_v3_large", "lraspp_mobilenet_v3_large",
    "fasterrcnn_mobilenet_v3_large_320_fpn", "retinanet_resnet50_fpn", "fcos_resnet50_fpn",
    "ssdlite320_mobilenet_v3_large", "maskrcnn_resnet50_fpn", "r3d_18", "swin_t", "vit_b_16",
]
# In CI the train step runs on the small models, one per kind of output (plain logits, googlenet's aux
# outputs, segmentation dicts, detection losses, video); the bigger ones (resnext50, densenet121, regnet,
# efficientnet, inception_v3 (trains at 299 px), the ResNet-50 detectors and FCN) are checked for
# insertion, equality and state_dict in CI and train in the slow sweep.
CI_TRAIN = {
    "resnet18", "mobilenet_v3_small", "shufflenet_v2_x0_5", "squeezenet1_0", "mnasnet0_5", "convnext_tiny",
    "googlenet", "lraspp_mobilenet_v3_large", "fasterrcnn_mobilenet_v3_large_320_fpn",
    "ssdlite320_mobilenet_v3_large", "r3d_18",
}
# Above this many parameters the train step is skipped (memory on a shared machine); all else is checked.
TRAIN_PARAM_LIMIT = 200_000_000

FIXED_224 = ("vit_", "maxvit_")
FULL_VIDEO = ("s3d", "mvit_")
SSD_SIZE = {"ssd300_vgg16": 300, "ssdlite320_mobilenet_v3_large": 320}


@dataclass
class Case:
    name: str
    family: str
    kwargs: dict[str, Any]
    inputs: Any  # as xvolify's example_inputs
    train_inputs: Any
    reference: tuple[int, ...]  # spatial size the network sees (detection: after its resize)


def _case(name: str) -> Case:
    family = FAMILY_OF[name]
    g = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=g)

    if family == "detection":
        size = SSD_SIZE.get(name, 128)
        kwargs: dict[str, Any] = {"weights_backbone": None}
        if name not in SSD_SIZE:
            kwargs.update(min_size=128, max_size=128)
        if "rcnn" in name:  # fewer proposals: the RoI heads dominate the cost at this size
            kwargs.update(rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=50, rpn_pre_nms_top_n_train=100,
                          rpn_post_nms_top_n_train=50, box_batch_size_per_image=32)
        # Two training images: a BatchNorm on a 1x1 map (SSDlite's last extra layer) needs more than one value.
        return Case(name, family, kwargs, [rand(3, 128, 128)], [rand(3, 128, 128), rand(3, 128, 128)], (size, size))
    if family == "video":
        if name.startswith(FULL_VIDEO):  # sized for 16x224x224 clips; one clip trains (no BatchNorm on 1x1 maps)
            clip = rand(1, 3, 16, 224, 224)
            return Case(name, family, {}, clip, clip, (224, 224))
        return Case(name, family, {}, rand(1, 3, 4, 64, 64), rand(2, 3, 4, 64, 64), (64, 64))
    if family == "optical_flow":
        pair = (rand(1, 3, 128, 128), rand(1, 3, 128, 128))
        return Case(name, family, {}, pair, (rand(2, 3, 128, 128), rand(2, 3, 128, 128)), (128, 128))
    kwargs = {"weights_backbone": None} if family == "segmentation" else {}
    if name in ("googlenet", "quantized_googlenet", "inception_v3", "quantized_inception_v3"):
        kwargs["init_weights"] = True
    # inception's unpadded convs trim borders: below ~150 px its stage sizes round to the wrong power of two
    # (at 96 px Mixed_6 is 4x4: 96/4 = 24 -> 32); at 160 px Mixed_6 is 8x8 (20 -> 16), as at 224 or 299 px.
    s = 224 if name.startswith(FIXED_224) else 160 if "inception" in name else 64
    # inception's training-mode aux head needs its native 299 px (a 5x5 conv on a pooled Mixed_6e map).
    t = 299 if "inception" in name else s
    return Case(name, family, kwargs, rand(1, 3, s, s), rand(2, 3, t, t), (s, s))


def _nominal(ratio: float) -> float:
    """The documented rule: the nearest power of two in log scale."""
    return float(2.0 ** round(math.log2(ratio)))


def _independent_os16(model: nn.Module, case: Case) -> tuple[set[str], list[torch.Tensor]]:
    """Convs with kernel > 1, not patch embeddings, with a call whose output is at 1/16 of the reference size
    (and the model's eval outputs)."""
    found: set[str] = set()
    handles = []
    for name, m in model.named_modules():
        if not isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) or max(m.kernel_size) == 1:
            continue
        if m.kernel_size == m.stride and max(m.stride) > 1 and m.padding in ((0,) * len(m.kernel_size), "valid"):
            continue

        def hook(mod: nn.Module, args: Any, out: torch.Tensor, name: str = name) -> None:
            spatial = out.shape[-2:] if out.dim() >= 4 else out.shape[-1:]
            ref = case.reference[-len(spatial):]
            strides = {_nominal(r / o) for r, o in zip(ref, spatial, strict=True)}
            if strides == {16.0}:
                found.add(name)

        handles.append(m.register_forward_hook(hook))
    try:
        with torch.no_grad():
            out = _tensors(_run(model, case.inputs))
    finally:
        for h in handles:
            h.remove()
    return found, out


def _run(model: nn.Module, inputs: Any, *extra: Any) -> Any:
    return model(*inputs, *extra) if isinstance(inputs, tuple) else model(inputs, *extra)


def _tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for k in sorted(out) for t in _tensors(out[k])]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in _tensors(v)]
    return []


def _train_step(model: nn.Module, case: Case, site: nn.Module) -> None:
    model.train()
    if case.family == "detection":
        targets = []
        for _ in case.train_inputs:
            target = {"boxes": torch.tensor([[10.0, 20.0, 70.0, 90.0]]), "labels": torch.tensor([1])}
            if "maskrcnn" in case.name:
                target["masks"] = torch.zeros(1, 128, 128, dtype=torch.uint8)
                target["masks"][0, 20:90, 10:70] = 1
            if "keypoint" in case.name:
                target["keypoints"] = torch.tensor([[[15.0, 30.0, 1.0]] * 17])
            targets.append(target)
        out = model(case.train_inputs, targets)
    else:
        out = _run(model, case.train_inputs)
    loss = sum(t.float().square().mean() for t in _tensors(out) if t.is_floating_point())
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    loss.backward()
    opt.step()
    assert site.attn_bn.weight.grad is not None and torch.isfinite(site.attn_bn.weight.grad).all()


def check_model(name: str, train: bool = True) -> tuple[xc.XvolifyReport | None, bool]:
    """(report, whether the train step ran); report None when the model has no os16 site (error checked)."""
    case = _case(name)
    torch.manual_seed(0)
    model = M.get_model(name, weights=None, **case.kwargs).eval()
    expected, ref = _independent_os16(model, case)
    if not expected:
        with pytest.raises(xc.SiteSelectionError, match="no site of"):
            xc.xvolify(model, example_inputs=case.inputs)
        return None, False
    x = xc.xvolify(model, example_inputs=case.inputs)
    report = x.xvol_report
    assert set(report.selected_names) == expected
    assert type(x) is type(model)
    with torch.no_grad():
        out = _tensors(_run(x, case.inputs))
    assert len(ref) == len(out) and all(torch.equal(a, b) for a, b in zip(ref, out, strict=True))
    new = {k for k in x.state_dict() if k not in model.state_dict()}
    assert all(".attn_" in k for k in new)
    loaded = x.load_state_dict(model.state_dict(), strict=False)
    assert not loaded.unexpected_keys and set(loaded.missing_keys) <= new
    train = train and sum(p.numel() for p in x.parameters()) < TRAIN_PARAM_LIMIT
    if train:
        _train_step(x, case, x.get_submodule(report.selected_names[0]))
    return report, train


@pytest.mark.parametrize("name", CI_MODELS)
def test_ci_subset(name: str) -> None:
    check_model(name, train=name in CI_TRAIN)


@pytest.mark.slow
@pytest.mark.parametrize("name", ALL_MODELS)
def test_every_torchvision_model(name: str) -> None:
    """With XVOL_SWEEP_LOG=<file>, one JSON line per model is appended there (docs/sweep.md is made from it)."""
    log = os.environ.get("XVOL_SWEEP_LOG")
    t0 = time.perf_counter()
    entry: dict[str, Any] = {"model": name, "family": FAMILY_OF[name]}
    try:
        report, trained = check_model(name)
        if report is None:
            entry["result"] = "no os16 site (confirmed)"
        else:
            entry.update(
                result="ok", sites=len(report.selected), analysis=report.analysis,
                added_mac_fraction=round(report.added_mac_fraction, 4),
                shared=sum(1 for s in report.selected if s.calls > 1), trained=trained,
            )
    except BaseException as err:
        entry["result"] = f"FAILED: {type(err).__name__}: {str(err)[:300]}"
        raise
    finally:
        entry["seconds"] = round(time.perf_counter() - t0, 1)
        if log:
            with open(log, "a") as f:
                f.write(json.dumps(entry) + "\n")


def test_ci_models_exist() -> None:
    assert CI_TRAIN <= set(CI_MODELS) <= set(ALL_MODELS)
    assert len(ALL_MODELS) == 121 and torchvision.__version__.startswith("0.29")

