"""The classifiers of the training examples: a torchvision model (weights=None), plain or xvolified.

Site policies (``SITE_POLICIES``):

- ``none``: the plain model (baseline);
- ``os16``: every spatial (K > 1) convolution whose output stride is 16, the
  SPEC's default placement (in a ResNet: all 3x3 convs of stage 3);
- ``os8+16``: every spatial convolution at output stride 8 or 16 (stages 2 and 3).

Output strides are measured, not read from names: one forward of a
``STRIDE_PROBE`` px image with hooks on the convolutions. When the package
exports ``xvolify`` it inserts the sites (given the measured names); until
then each site is swapped for ``XVolution.from_conv`` here.
"""

from __future__ import annotations

import hashlib

import torch
import torchvision
from torch import nn

import xvol_compiler
from xvol_compiler import XVolution

SITE_POLICIES: dict[str, tuple[int, ...]] = {"none": (), "os16": (16,), "os8+16": (8, 16)}
STRIDE_PROBE = 224
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@torch.no_grad()
def conv_output_strides(model: nn.Module, image_size: int = STRIDE_PROBE) -> dict[str, int]:
    """Output stride (input side / output side) of every Conv2d, from one eval forward."""
    strides: dict[str, int] = {}
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(
                lambda mod, args, out, name=name: strides.__setitem__(name, image_size // out.shape[-1])))
    was_training = model.training
    try:
        model.eval()
        model(torch.zeros(1, 3, image_size, image_size, device=next(model.parameters()).device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return strides


def policy_sites(model: nn.Module, policy: str) -> list[str]:
    """Qualified names of the convolutions a site policy selects (spatial kernels only)."""
    if policy not in SITE_POLICIES:
        raise ValueError(f"unknown site policy {policy!r}; choose from {sorted(SITE_POLICIES)}")
    wanted = SITE_POLICIES[policy]
    if not wanted:
        return []
    strides = conv_output_strides(model)
    modules = dict(model.named_modules())
    return [n for n, s in strides.items() if s in wanted and any(k > 1 for k in modules[n].kernel_size)]


def xvolify_sites(model: nn.Module, sites: list[str]) -> nn.Module:
    """Replace the named convolutions by X-volution training modules (in place)."""
    xvolify = getattr(xvol_compiler, "xvolify", None)
    if xvolify is not None:
        return xvolify(model, sites=sites, inplace=True)
    for name in sites:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, attr, XVolution.from_conv(getattr(parent, attr)))
    return model


def build_model(name: str = "resnet18", policy: str = "os16", *, num_classes: int = 10) -> nn.Module:
    """``torchvision.models.get_model(name, weights=None, num_classes=...)`` with the policy's sites xvolified.

    Initialisation draws from torch's global generator: seed it first for a
    reproducible model.
    """
    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    sites = policy_sites(model, policy)
    if policy != "none" and not sites:
        raise ValueError(f"policy {policy!r} selects no convolution of {name}")
    return xvolify_sites(model, sites)


def site_names(model: nn.Module) -> list[str]:
    """Names of the X-volution sites (training form) in a model."""
    return [n for n, m in model.named_modules() if isinstance(m, XVolution)]


def parameter_checksum(model: nn.Module) -> str:
    """SHA-256 over every parameter's name, dtype, shape and raw bytes, in ``named_parameters`` order."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        t = p.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(p.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def buffer_checksum(model: nn.Module) -> str:
    """SHA-256 over the buffers (BatchNorm running statistics and counters), as :func:`parameter_checksum`."""
    h = hashlib.sha256()
    for name, b in model.named_buffers():
        t = b.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(b.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
