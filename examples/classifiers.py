"""The classifiers of the training examples: a torchvision model (weights=None), plain or xvolified.

Site policies (``SITE_POLICIES``), handed to ``xvol_compiler.xvolify``, which
measures output strides on its default 224 px example input:

- ``none``: the plain model (baseline);
- ``os16``: every spatial (K > 1) convolution at output stride 16, the paper's
  default placement (in a ResNet: all 3x3 convs of stage 3);
- ``os8+16``: every spatial convolution at output stride 8 or 16 (stages 2 and 3).
"""

from __future__ import annotations

import copy
import hashlib

import torch
import torchvision
from torch import nn

import xvol_compiler
from xvol_compiler import XVolution
from xvol_compiler.sites import SiteSelection

SITE_POLICIES: dict[str, SiteSelection | None] = {
    "none": None,
    "os16": SiteSelection(output_strides={16}, label="os16"),
    "os8+16": SiteSelection(output_strides={8, 16}, label="os8+16"),
}


def build_model(name: str = "resnet18", policy: str = "os16", *, num_classes: int = 10) -> nn.Module:
    """``torchvision.models.get_model(name, weights=None, num_classes=...)`` with the policy's sites xvolified.

    Initialisation draws from torch's global generator: seed it first for a
    reproducible model.
    """
    if policy not in SITE_POLICIES:
        raise ValueError(f"unknown site policy {policy!r}; choose from {sorted(SITE_POLICIES)}")
    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    selection = SITE_POLICIES[policy]
    if selection is None:
        return model
    return xvol_compiler.xvolify(model, selection, inplace=True)


@torch.no_grad()
def fuse_for_deploy(model: nn.Module, example_inputs: torch.Tensor, *, verify: bool = True) -> nn.Module:
    """Deploy form of an eval-mode model (a copy): ``xvol_compiler.fuse`` when the package has it.

    Otherwise every X-volution site is replaced by ``XVolution.fuse()`` (module
    level; the rest of the network is left as it is). ``verify`` is passed to
    ``xvol_compiler.fuse`` (compare fused and unfused on ``example_inputs``).
    """
    fuse = getattr(xvol_compiler, "fuse", None)
    if fuse is not None:
        return fuse(model, example_inputs=(example_inputs,), verify=verify)
    fused = copy.deepcopy(model).eval()
    for name in site_names(fused):
        parent_name, _, attr = name.rpartition(".")
        parent = fused.get_submodule(parent_name)
        setattr(parent, attr, getattr(parent, attr).fuse())
    return fused


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
