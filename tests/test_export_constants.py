"""Delegate-friendly constants: the PSSA ring kernel is a non-persistent buffer of the module that
uses it (``pssa_ring``), so ``torch.export`` programs read every convolution weight from a graph
input (parameter, buffer or lifted constant), never from a tensor built inside forward; the
state_dict keys stay those of the model without the buffer, and old checkpoints load strictly."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

import xvol_compiler
from tests.strategies import eager64, randomize_bn, rel_err
from xvol_compiler import XVolution, XVolutionDeploy, pssa_transform
from xvol_compiler.pssa import pssa_kernel

_ATEN = torch.ops.aten
_CONVS = {_ATEN.conv1d.default, _ATEN.conv2d.default, _ATEN.conv3d.default, _ATEN.convolution.default}
_BUILT = {_ATEN.lift_fresh_copy.default, _ATEN.detach_.default}
# The keys an XVolution site adds to its conv's (XVolution's docstring), for a site without extra branches.
_SITE_KEYS = ("attn_conv.weight", "attn_bn.weight", "attn_bn.bias", "attn_bn.running_mean",
              "attn_bn.running_var", "attn_bn.num_batches_tracked")


def _resnet18() -> tuple[nn.Module, nn.Module, torch.Tensor]:
    """resnet18 at 64 px (10 classes), its xvolified form with trained-looking BatchNorms (the
    attention branches contribute), both in eval mode, and an input."""
    torch.manual_seed(0)
    plain = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    xm = xvol_compiler.xvolify(copy.deepcopy(plain), example_inputs=(x,))
    with torch.no_grad():
        randomize_bn(xm, seed=3)
    return plain, xm.eval(), x


@pytest.fixture(scope="module")
def models() -> tuple[nn.Module, nn.Module, nn.Module, torch.Tensor]:
    plain, xm, x = _resnet18()
    return plain, xm, xvol_compiler.fuse(xm, example_inputs=(x,)), x


def _conv_weight_inputs(ep: torch.export.ExportedProgram) -> list[tuple[str, str]]:
    """(input kind, target) of every convolution's weight; AssertionError when one is not a graph input."""
    sig = ep.graph_signature
    kinds = {**{k: "parameter" for k in sig.inputs_to_parameters},
             **{k: "buffer" for k in sig.inputs_to_buffers},
             **{k: "constant" for k in sig.inputs_to_lifted_tensor_constants}}
    targets = {**sig.inputs_to_parameters, **sig.inputs_to_buffers, **sig.inputs_to_lifted_tensor_constants}
    found = []
    for node in ep.graph.nodes:
        if node.op != "call_function" or node.target not in _CONVS:
            continue
        weight = node.args[1]
        assert isinstance(weight, torch.fx.Node) and weight.op == "placeholder", (node.name, weight)
        assert weight.name in kinds, f"{node.name} reads {weight.name}, a user input"
        bias = node.args[2] if len(node.args) > 2 else None
        assert bias is None or (bias.op == "placeholder" and bias.name in kinds), (node.name, bias)
        found.append((kinds[weight.name], targets[weight.name]))
    return found


def _sites(model: nn.Module, kind: type[nn.Module]) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, kind)]


def test_fused_export_reads_every_conv_weight_from_a_graph_input(models) -> None:
    _, xm, fused, x = models
    sites = _sites(fused, XVolutionDeploy)
    assert len(sites) >= 2 and len(sites) == len(_sites(xm, XVolution))
    with torch.no_grad():
        ep = torch.export.export(fused, (x,))
    assert not [n.name for n in ep.graph.nodes if n.op == "call_function" and n.target in _BUILT]
    weights = _conv_weight_inputs(ep)
    rings = sorted(t for kind, t in weights if kind == "buffer")
    # One ring conv per site, each reading its own module's non-persistent buffer.
    assert rings == sorted(f"{s}.pssa_ring" for s in sites)
    assert all(not spec.persistent for spec in ep.graph_signature.input_specs if spec.target in rings)
    convs = [m for m in fused.modules() if isinstance(m, nn.Conv2d)]
    assert len(weights) == len(convs) + len(sites)  # every module conv, plus one ring conv per site
    with torch.no_grad():
        got = ep.module()(x)
    assert rel_err(got, eager64(xm, x)) <= 1e-5


def test_unfused_export_is_clean_too(models) -> None:
    _, xm, _, x = models
    with torch.no_grad():
        ep = torch.export.export(xm, (x,))
    assert not [n.name for n in ep.graph.nodes if n.op == "call_function" and n.target in _BUILT]
    rings = [t for kind, t in _conv_weight_inputs(ep) if kind == "buffer"]
    assert sorted(rings) == sorted(f"{s}.pssa_ring" for s in _sites(xm, XVolution))
    with torch.no_grad():
        assert rel_err(ep.module()(x), eager64(xm, x)) <= 1e-5


def test_state_dict_keys_unchanged_and_checkpoints_load_strictly(models, tmp_path: Path) -> None:
    plain, xm, fused, x = models
    sites = _sites(xm, XVolution)
    # Unfused: the plain model's keys plus the documented site keys, nothing for the kernel.
    expected = set(plain.state_dict()) | {f"{s}.{k}" for s in sites for k in _SITE_KEYS}
    assert set(xm.state_dict()) == expected
    # Fused: each site's deploy conv under the site's path, the kernel only as a non-persistent buffer.
    keys = set(fused.state_dict())
    assert not any("pssa_ring" in k for k in keys)
    for s in sites:
        assert {f"{s}.conv.weight", f"{s}.conv.bias"} <= keys
        assert fused.get_submodule(s).pssa_ring.shape == (xm.get_submodule(s).in_channels, 1, 3, 3)
    path = tmp_path / "fused.pt"
    torch.save(fused.state_dict(), path)
    # A fresh fused model from other weights: a strict load of the checkpoint restores the outputs.
    torch.manual_seed(7)
    other = xvol_compiler.fuse(_resnet18()[1], example_inputs=(x,))
    other.load_state_dict(torch.load(path, weights_only=True), strict=True)
    assert set(other.state_dict()) == keys
    with torch.no_grad():
        assert torch.equal(other(x), fused(x))
        assert rel_err(other(x), eager64(xm, x)) <= 1e-5
    # A checkpoint of the unfused model (no kernel key, as before the buffer existed) loads strictly.
    fresh = _resnet18()[1]
    fresh.load_state_dict(xm.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(fresh(x), xm(x))


def test_to_moves_the_kernel_and_keeps_exactness(models) -> None:
    _, xm, fused, x = models
    fused64 = copy.deepcopy(fused).to(torch.float64)
    site = _sites(fused64, XVolutionDeploy)[0]
    ring = fused64.get_submodule(site).pssa_ring
    assert ring.dtype == torch.float64
    assert torch.equal(ring, pssa_kernel(2, "full", False, ring.shape[0], torch.float64))
    with torch.no_grad():  # (the folded weights were rounded to float32 once: float32-level error)
        assert rel_err(fused64(x.double()), eager64(xm, x)) <= 1e-6
    meta = copy.deepcopy(xm).to("meta")
    assert meta.get_submodule(_sites(meta, XVolution)[0]).pssa_ring.device.type == "meta"


def test_graph_form_keeps_site_names_and_exports_clean(models) -> None:
    _, xm, _, x = models
    gm = xvol_compiler.fuse(xm, example_inputs=(x,), graph=True)
    keys = set(gm.state_dict())
    assert not any("_fused" in k or "pssa_ring" in k for k in keys)
    rings = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr" and "pssa_ring" in str(n.target)}
    # One root buffer per distinct kernel (resnet18's sites have 128 or 256 input channels here).
    channels = {xm.get_submodule(s).in_channels for s in _sites(xm, XVolution)}
    assert len(rings) == len(channels) and all("." not in r for r in rings)
    with torch.no_grad():
        ep = torch.export.export(gm, (x,))
        assert rel_err(ep.module()(x), eager64(xm, x)) <= 1e-5
    assert not [n.name for n in ep.graph.nodes if n.op == "call_function" and n.target in _BUILT]
    assert sum(kind == "buffer" for kind, _ in _conv_weight_inputs(ep)) == len(_sites(xm, XVolution))


def test_given_kernel_equals_built_kernel_and_is_checked() -> None:
    x = torch.randn(2, 3, 5, 7, dtype=torch.float64)
    ring32 = pssa_kernel(2, "axial", False, 3, torch.float32)
    got = pssa_transform(x, (1, 2), "axial", kernel=ring32)  # cast to x's dtype
    # The literal definition: the mean of the 4 axial neighbours at (1, 2), zero outside.
    padded = nn.functional.pad(x, (2, 2, 1, 1))
    neighbours = (padded[..., 0:5, 2:9] + padded[..., 2:7, 2:9] + padded[..., 1:6, 0:7] + padded[..., 1:6, 4:11])
    assert torch.allclose(got, x * neighbours / 4, rtol=0, atol=1e-14)
    with pytest.raises(ValueError, match="kernel of shape"):
        pssa_transform(x, 1, "axial", kernel=pssa_kernel(2, "axial", False, 4, torch.float64))


def test_strict_load_after_to_empty_restores_the_ring() -> None:
    """A model built on the meta device, moved with to_empty() and loaded from a checkpoint: the
    checkpoint has no ring, the load rewrites it (to_empty leaves it uninitialised: NaN here)."""
    torch.manual_seed(0)
    site = randomize_bn(XVolution.from_conv(nn.Conv2d(4, 6, 3, padding=1)), seed=1).eval()
    deploy = site.fuse()
    x = torch.randn(2, 4, 7, 7)
    for module in (site, deploy):
        empty = copy.deepcopy(module).to("meta").to_empty(device="cpu")
        with torch.no_grad():
            empty.pssa_ring.fill_(float("nan"))
        empty.load_state_dict(module.state_dict(), strict=True)
        assert torch.equal(empty.pssa_ring, pssa_kernel(2, "full", False, 4, torch.float32))
        with torch.no_grad():
            assert torch.equal(empty(x), module(x))
            assert rel_err(empty(x), eager64(site, x)) <= 1e-5
