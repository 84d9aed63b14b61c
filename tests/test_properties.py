"""End-to-end properties on random CNNs (tests/random_cnn.py): xvolify, simulate training, fuse (FX and
ONNX), compile, train.

Each property draws a random CNN, a site policy and extra branches. The CI
profile runs 200 examples per property (the ONNX property: 200 per exporter, divided among the
three lowerings), except torch.compile, which runs a subset (21, 7 per lowering); the long profile
(``HYPOTHESIS_PROFILE=long``) runs 5,000 of each (torch.compile: 500).
"""

from __future__ import annotations

import copy
import io
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import assume, event, example, given, note, settings
from hypothesis import strategies as st
from torch import nn

from tests.hyp import examples
from tests.onnx_counts import site_convs
from tests.random_cnn import (
    CNNSpec,
    ConvSpec,
    conv_names,
    conv_specs,
    expected_fusion,
    extra_branch_ok,
    forward_values,
    random_cnns,
    rel_error,
    simulate_training,
    site_candidates,
)
from xvol_compiler import SiteSelection, SiteSelectionError, XVolution, xvolify
from xvol_compiler.lowering import LOWERINGS
from xvol_passes.fuse_fx import fuse_with_report
from xvol_passes.fuse_onnx import fuse_onnx

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")

REGEXES = ("re:^l\\d+$", "re:kxk$", "re:^l[0-2](\\.|$)")


@dataclass(frozen=True)
class Case:
    """A random CNN, a site policy (as ``site_candidates`` reads it) and the X-volution extra branches."""

    spec: CNNSpec
    policy: Any
    extra_branches: tuple[str, ...]
    seed: int

    def xvolify_sites(self) -> Any:
        """The policy as ``xvolify(sites=...)`` takes it."""
        p = self.policy
        if p == "all" or isinstance(p, list) or (isinstance(p, str) and p.startswith("re:")):
            return p
        kind, arg = p
        if kind == "kernel":
            return SiteSelection(kernel_sizes={arg})
        return _even_out  # ("even_out", None)

    def expected_sites(self) -> list[str]:
        convs = conv_specs(self.spec)
        return [n for n in site_candidates(self.spec, self.policy)
                if all(extra_branch_ok(convs[n], b) for b in self.extra_branches)]

    def describe(self) -> str:
        return (f"{self.spec.describe()}\nsites={self.policy!r} extra_branches={self.extra_branches} "
                f"seed={self.seed}")

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(self.describe())


def _even_out(name: str, module: nn.Module, info: Any) -> bool:
    return module.out_channels % 2 == 0


@st.composite
def cases(draw: st.DrawFn, extra_branches: bool = True) -> Case:
    spec = draw(random_cnns(max_layers=6, max_channels=8, max_size=15, min_convs=1))
    names = conv_names(spec)
    kind = draw(st.sampled_from(["all", "names", "all", "regex", "kernel", "predicate"]))
    policy: Any
    if kind == "names":
        policy = sorted(draw(st.sets(st.sampled_from(names), min_size=1)), key=names.index)
    elif kind == "regex":
        policy = draw(st.sampled_from(REGEXES))
    elif kind == "kernel":
        policy = ("kernel", draw(st.sampled_from([3, 1, 5])))
    elif kind == "predicate":
        policy = ("even_out", None)
    else:
        policy = "all"
    extras: tuple[str, ...] = ()
    if extra_branches:
        extras = draw(st.sampled_from([(), (), ("1x1",), ("bn",), ("identity",), ("1x1", "identity", "bn")]))
    return Case(spec, policy, extras, draw(st.integers(0, 2**16)))


def _sites(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, XVolution)]


def _count(model: nn.Module, cls: type[nn.Module]) -> int:
    return sum(isinstance(m, cls) for m in model.modules())


def _xvolified(case: Case) -> tuple[nn.Module, torch.Tensor]:
    """The case's model with X-volution at its sites, training simulated, eval, float64; and its input."""
    model = case.spec.build(torch.float64, seed=case.seed)
    x = case.spec.input(torch.float64, seed=case.seed)
    xm = xvolify(model, case.xvolify_sites(), example_inputs=x, extra_branches=case.extra_branches)
    simulate_training(xm, seed=case.seed + 1)
    return xm.eval(), x


def _noted_with_sites(case: Case) -> bool:
    """Notes the case (hypothesis prints it with a failure); False, tallied as an event, when the policy
    selects no site (xvolify refuses those: property 1 checks that)."""
    note(case.describe())
    if case.expected_sites():
        return True
    event("no site selected (xvolify refuses: property 1)")
    return False


def _finite(values: list[torch.Tensor]) -> bool:
    return all(bool(v.isfinite().all()) for v in values)


# --------------------------------------------------------------------------- (1) insertion is exact


@settings(max_examples=examples(200))
@given(case=cases())
def test_xvolify_at_insertion_computes_the_original(case: Case) -> None:
    note(case.describe())
    model = simulate_training(case.spec.build(torch.float64, seed=case.seed), seed=case.seed).eval()
    x = case.spec.input(torch.float64, seed=case.seed)
    with torch.no_grad():
        ref = forward_values(model, x)
    expected = case.expected_sites()
    if not expected:
        event("no site selected")
        with pytest.raises(SiteSelectionError):
            xvolify(model, case.xvolify_sites(), example_inputs=x, extra_branches=case.extra_branches)
        return
    xm = xvolify(model, case.xvolify_sites(), example_inputs=x, extra_branches=case.extra_branches)
    assert _sites(xm) == expected
    assert not _sites(model), "xvolify changed the caller's model (inplace=False)"
    assert not xm.training
    with torch.no_grad():
        got = forward_values(xm, x)
        again = forward_values(model, x)
    assert rel_error(again, ref) == 0.0
    assert rel_error(got, ref) <= 1e-12


# --------------------------------------------------------------------------- (2) fused == unfused


@settings(max_examples=examples(200))
@given(case=cases())
def test_fuse_after_training_matches_unfused(case: Case) -> None:
    if not _noted_with_sites(case):
        return
    xm, x = _xvolified(case)
    with torch.no_grad():
        ref = forward_values(xm, x)
    assert _finite(ref), "simulated training made the float64 reference non-finite"
    fused, report = fuse_with_report(xm, example_inputs=x)
    note(str(report))
    with torch.no_grad():
        got = forward_values(fused, x)
    assert rel_error(got, ref) <= 1e-10

    # float32 deploy model against the float64 unfused reference
    fused32 = fuse_with_report(copy.deepcopy(xm).float(), example_inputs=x.float())[0]
    with torch.no_grad():
        got32 = forward_values(fused32, x.float())
    assert rel_error(got32, ref) <= 1e-4


# --------------------------------------------------------------------------- (3) nothing foldable is left


@settings(max_examples=examples(200))
@given(case=cases())
def test_fuse_leaves_nothing_foldable_and_is_idempotent(case: Case) -> None:
    if not _noted_with_sites(case):
        return
    xm, x = _xvolified(case)
    sites = _sites(xm)
    expected = expected_fusion(case.spec, sites, case.extra_branches)
    note(f"expected: {expected}")
    event(f"expected rewrites besides the sites: {min(len(expected.rewrites), 4)}{'+' * (len(expected.rewrites) >= 4)}")
    fused, report = fuse_with_report(xm, example_inputs=x, graph=True)  # every rule: the graph form
    note(str(report))
    assert not _sites(fused), "an XVolution module is left in the fused model (unfused, or a shell around its conv)"
    assert report.count("x-volution") >= len(sites)
    assert _count(fused, nn.Conv2d) == expected.convs
    assert _count(fused, nn.modules.batchnorm._BatchNorm) == expected.batchnorms
    assert all(o.reason.strip() for o in report.refused), "a refusal without a reason"

    again, report2 = fuse_with_report(fused, example_inputs=x, graph=True)
    assert not report2.fused, f"fusing a fused model changed it: {report2.summary()}"
    assert _count(again, nn.Conv2d) == expected.convs
    with torch.no_grad():
        a, b = forward_values(fused, x), forward_values(again, x)
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))


# --------------------------------------------------------------------------- (4) ONNX


def _export(model: nn.Module, x: torch.Tensor, dynamo: bool) -> Any:
    import onnx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            program = torch.onnx.export(model, (x,), dynamo=True, verbose=False)
            return program.model_proto
        buf = io.BytesIO()
        torch.onnx.export(model, (x,), buf, dynamo=False)
        return onnx.load_from_string(buf.getvalue())


def _ort(model: Any, x: np.ndarray) -> list[torch.Tensor]:
    from xvol_compiler.verify import onnx_session

    sess = onnx_session(model, threads=1, optimize=False)
    name = sess.get_inputs()[0].name
    return [torch.from_numpy(np.asarray(o)) for o in sess.run(None, {name: x})]


def _op_count(model: Any, op: str) -> int:
    nodes = list(model.graph.node) + [n for f in model.functions for n in f.node]
    return sum(n.op_type == op for n in nodes)


def _circular_site() -> Case:
    """The long profile's counterexample: TorchScript writes circular padding as Slice/Concat chains."""
    conv = ConvSpec(0, 3, 1, (1, 3), stride=(1, 2), padding=(0, 1), bias=False, padding_mode="circular")
    return Case(CNNSpec(1, 3, 9, 9, (conv,), ((3, 9, 9), conv.out_shape((3, 9, 9)))), "all", (), 3)


@pytest.mark.parametrize("lowering", LOWERINGS)
@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
@settings(max_examples=examples(200 // len(LOWERINGS)))  # an export and two onnxruntime sessions per example
@example(case=_circular_site())
@given(case=cases())
def test_fuse_onnx_matches_pytorch(dynamo: bool, lowering: str, case: Case) -> None:
    if not _noted_with_sites(case):
        return
    xm, x = _xvolified(case)
    sites = _sites(xm)
    expected = expected_fusion(case.spec, sites, case.extra_branches)
    note(f"expected: {expected}")
    model32, x32 = copy.deepcopy(xm).float(), x.float()
    with torch.no_grad():
        ref = forward_values(model32, x32)
    proto = _export(model32, x32, dynamo)
    # The TorchScript exporter writes padding='same' with dilation as auto_pad=SAME_*, which onnxruntime's
    # optimized kernels refuse: such an export cannot run, so there is nothing to compare against.
    unsupported = "Dilation not supported for AutoPadType"
    try:
        unfused = _ort(proto, x32.numpy())
    except Exception as err:
        assume(unsupported not in str(err))
        raise
    assert rel_error(unfused, ref) <= 1e-4
    try:
        fused, report = fuse_onnx(proto, example_inputs=[x32.numpy()], lowering=lowering, single_conv=False)
    except Exception as err:  # only the original model failing to run in onnxruntime is excused
        assume(not ("cannot run the original model" in str(err) and unsupported in str(err)))
        raise
    note(str(report))
    got = _ort(fused, x32.numpy())
    assert rel_error(got, ref) <= 1e-4
    # A split site is two convolutions (sites merged into one conv by a branch sum split together).
    split = sum(v == "split" for v in report.lowerings().values())
    convs = site_convs(fused)  # (the PSSA transform's constant-kernel convs aside)
    assert convs == expected.convs if not split else expected.convs < convs <= expected.convs + split
    assert _op_count(fused, "BatchNormalization") == expected.batchnorms
    assert all(o.reason.strip() for o in report.refused), "a refusal without a reason"
    assert all(o.lowering in (lowering, "channel") for o in report.fused if o.kind == "x-volution")


# --------------------------------------------------------------------------- (5) torch.compile


@pytest.mark.compile
@pytest.mark.parametrize("lowering", LOWERINGS)
@settings(max_examples=examples(21 // len(LOWERINGS), long=500))
@given(case=cases())
def test_compiled_fused_model_matches_eager(lowering: str, case: Case) -> None:
    if not _noted_with_sites(case):
        return
    xm, x = _xvolified(case)
    fused = fuse_with_report(xm.float(), example_inputs=x.float(), lowering=lowering, single_conv=False)[0]
    torch._dynamo.reset()
    compiled = torch.compile(fused, fullgraph=True)
    with torch.no_grad():
        eager = forward_values(fused, x.float())
        got = forward_values(compiled, x.float())
    assert rel_error(got, eager) <= 1e-5


# --------------------------------------------------------------------------- (6) gradients


@settings(max_examples=examples(200))
@given(case=cases())
def test_one_training_step_moves_attention(case: Case) -> None:
    if not _noted_with_sites(case):
        return
    model = case.spec.build(torch.float64, seed=case.seed)
    x = case.spec.input(torch.float64, seed=case.seed, batch=2)  # train-mode BN needs > 1 value per channel
    xm = xvolify(model, case.xvolify_sites(), example_inputs=x, extra_branches=case.extra_branches).train()
    sites = {name: m for name, m in xm.named_modules() if isinstance(m, XVolution)}
    captured: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(name: str) -> Callable[..., None]:
        def record(module: XVolution, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            out.retain_grad()
            attn = module.attn_conv(module_pssa(module, args[0])).detach()
            captured[name] = (out, attn)
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in sites.items()]
    opt = torch.optim.SGD(xm.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(case.seed)
    outs = forward_values(xm, x)
    weights = [torch.randn(o.shape, generator=g, dtype=o.dtype) for o in outs]
    loss = sum((o * w).sum() for o, w in zip(outs, weights, strict=True)) / sum(o.numel() for o in outs)
    assert torch.isfinite(loss)
    opt.zero_grad()
    loss.backward()
    for h in handles:
        h.remove()
    assert all(p.grad is None or bool(p.grad.isfinite().all()) for p in xm.parameters())
    opt.step()
    for name, site in sites.items():
        out, attn = captured[name]
        gamma = site.attn_bn.weight
        reached = out.grad is not None and out.grad.abs().flatten(2).amax(dim=(0, 2)) > 0  # per channel
        varied = attn.flatten(2).transpose(0, 1).flatten(1).std(dim=1) > 1e-6 * attn.abs().max().clamp_min(1e-300)
        movable = reached & varied if out.grad is not None else torch.zeros_like(gamma, dtype=torch.bool)
        note(f"{name}: gamma={gamma.detach().tolist()} movable={movable.tolist()}")
        assert bool((gamma[movable] != 0).all()), f"{name}: BN_a gamma did not move off 0"
    with torch.no_grad():
        after = forward_values(xm, x)
    assert _finite(after)


def module_pssa(site: XVolution, x: torch.Tensor) -> torch.Tensor:
    from xvol_compiler.pssa import pssa_transform

    return pssa_transform(x, site.shift, site.directions, site.directional)
