"""fuse on timm CNNs of many families (pretrained=False: nothing is downloaded), in module form and graph form.

For each model in ``MODELS`` (the smallest variant of its family, input ``1x3xSxS``, S the smallest size it
runs at on CPU, 64 for most):

- X-volution is inserted at the default sites (``xvolify(model, example_inputs=x)``). A model listed in
  ``NO_SITE`` must make ``xvolify`` raise ``SiteSelectionError`` (nothing selected); it is then fused for
  conv + BatchNorm only. Every other model must get sites; nothing else is caught.
- BatchNorm statistics and affine parameters are set away from their initial values
  (``tests.test_reliability_verify.trained_like``), and every site's attention gamma (``attn_bn.weight``,
  zero at initialisation) is set non-zero, so the attention fold is exercised; the attention BatchNorms'
  statistics are those of their inputs on a calibration batch (see ``set_attention``).
- The reference is an independent float64 eager run of a deep copy of the unfused model. The unfused
  float32 model's own error against it (``own``) sets the bound: relative error (max |a - ref| / max |ref|)
  at most ``max(1e-4, 4 * own)``.

Checked, in eval mode, no grad:

1. module form, ``fuse(model)``: every site became an ``XVolutionDeploy`` (no ``XVolution`` left);
   ``forward`` and ``forward_features`` match the reference within the bound; the caller's model is
   unchanged (state dict, module types).
2. submodules of the module form: a sample of stages / blocks (and the modules holding the first and the last
   site) of the unfused model is recorded with
   forward hooks (inputs, float32 outputs, float64 outputs); the fused module at the same path, called on
   the same input, matches within that submodule's bound, or raises ``xvol_compiler.FusionError``
   (never another error, a wrong shape or a wrong value).
3. graph form, ``fuse(model, graph=True)``: a ``torch.fx.GraphModule`` without ``XVolution`` modules whose
   forward matches within the bound, or (a model torch.fx cannot trace) a ``FusionError`` naming the
   tracing problem.
4. ``torch.export`` of fused efficientnet_b0 (module form) has no batch norm op left.

The full sweep is marked slow::

    .venv/bin/python -m pytest -m slow tests/test_timm_sweep.py --durations=0

(about 2.5 minutes for the 36 models with one thread on an otherwise busy 2-core machine; prefix
``OMP_NUM_THREADS=1`` there: two OpenMP threads competing with other processes were ~10x slower).
``CI_MODELS`` also run unmarked (ids ``ci-<name>``) in the CI suite (``-m "not slow"``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import pytest
import timm
import torch
from torch import fx, nn

import xvol_compiler as xc
from tests.strategies import cast_copy, rel_err, tensors_in
from tests.test_reliability_verify import trained_like
from xvol_compiler import XVolution, XVolutionDeploy

# name -> input size (S of 1x3xSxS): the smallest variant of each family, at a small input it accepts.
MODELS: dict[str, int] = {
    "dla34": 64,
    "dla46_c": 64,
    "hrnet_w18_small": 64,
    "res2net50_14w_8s": 64,
    "ghostnet_100": 64,
    "ghostnetv2_100": 64,
    "repghostnet_050": 64,
    "rexnet_100": 64,
    "mobileone_s0": 64,
    "fastvit_t8": 64,
    "efficientnet_b0": 64,
    "tf_efficientnet_b0": 64,  # "same" padding (Conv2dSame)
    "efficientnetv2_rw_t": 64,
    "convnext_atto": 64,
    "regnetx_002": 64,
    "regnety_002": 64,
    "cspresnet50": 64,
    "dpn48b": 64,
    "ese_vovnet19b_dw": 64,
    "selecsls42b": 64,
    "tresnet_m": 64,
    "nf_resnet26": 64,
    "resnetv2_18": 64,
    "resnet18": 64,
    "skresnet18": 64,
    "resnest14d": 64,
    "mobilenetv3_small_050": 64,
    "mobilenetv2_050": 64,
    "mobilenetv4_conv_small": 64,
    "repvgg_a0": 64,
    "densenet121": 64,
    "mixnet_s": 64,
    "lcnet_050": 64,
    "hgnetv2_b0": 64,
    "efficientvit_b0": 64,
    "inception_v3": 96,  # no default (os16) site at this size: conv + BN fusion only
}
NO_SITE = {"inception_v3"}
CI_MODELS = ["dla46_c", "ghostnetv2_100", "efficientnet_b0", "resnet18"]
BATCH = 2
MIN_RTOL = 1e-4
SUBMODULE_SAMPLE = 6  # stages / blocks per model, plus the first and the last site


def bound(own: float) -> float:
    """What the fused float32 model may differ from the float64 reference: the unfused float32 model's own
    error, with headroom, and never below 1e-4."""
    return max(MIN_RTOL, 4 * own)


def worst_error(got: Any, want32: Any, want64: Any, where: str) -> tuple[float, float]:
    """(error of ``got``, error of the unfused float32 ``want32``), both against the float64 ``want64``;
    shapes and the number of tensors must be those of the reference."""
    g, w32, w64 = tensors_in(got), tensors_in(want32), tensors_in(want64)
    assert w64, f"{where}: the reference has no tensor output"
    assert len(g) == len(w64) == len(w32), f"{where}: {len(g)} output tensors, reference {len(w64)}"
    err = own = 0.0
    for a, b, r in zip(g, w32, w64, strict=True):
        assert a.shape == r.shape, f"{where}: shape {tuple(a.shape)}, reference {tuple(r.shape)}"
        assert a.dtype == b.dtype, f"{where}: dtype {a.dtype}, unfused {b.dtype}"
        if not r.is_floating_point():
            assert torch.equal(a, r.to(a.dtype)), f"{where}: integer output differs"
            continue
        assert torch.isfinite(r).all(), f"{where}: the float64 reference is not finite"
        assert torch.isfinite(a).all(), f"{where}: non-finite fused output"
        err, own = max(err, rel_err(a, r)), max(own, rel_err(b, r))
    return err, own


def assert_close(got: Any, want32: Any, want64: Any, where: str) -> None:
    err, own = worst_error(got, want32, want64, where)
    assert err <= bound(own), f"{where}: relative error {err:.3g} > {bound(own):.3g} (unfused float32: {own:.3g})"


def snapshot(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, type]]:
    return ({k: v.detach().clone() for k, v in model.state_dict().items()},
            {n: type(m) for n, m in model.named_modules()})


def assert_unchanged(model: nn.Module, before: tuple[dict[str, torch.Tensor], dict[str, type]]) -> None:
    state, types = before
    now = model.state_dict()
    assert list(now) == list(state), "fuse changed the caller's state dict keys"
    changed = [k for k, v in state.items() if now[k].dtype != v.dtype or not torch.equal(now[k], v)]
    assert not changed, f"fuse changed the caller's tensors: {changed[:5]}"
    assert {n: type(m) for n, m in model.named_modules()} == types, "fuse changed the caller's modules"


# ----------------------------------------------------------------------------- building a case


@dataclass
class Recorded:
    """One call of a submodule of the unfused model: its inputs, its float32 and float64 outputs."""

    path: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    out32: Any
    out64: Any


@dataclass
class Case:
    name: str
    model: nn.Module  # xvolified (unless NO_SITE), trained-like, eval; the caller's model
    x: torch.Tensor
    sites: list[str]
    out32: Any
    out64: Any
    feat32: Any
    feat64: Any
    recorded: list[Recorded] = field(default_factory=list)
    _fused: Any = field(default=None, repr=False)

    def fused(self) -> nn.Module:
        """``fuse(model)`` (module form), run once per case; a failure is raised again to every test."""
        if self._fused is None:
            before = snapshot(self.model)
            try:
                self._fused = ("ok", xc.fuse(self.model, example_inputs=(self.x,)), before)
            except Exception as err:  # kept to be raised again, unchanged, by each test using it
                self._fused = ("error", err, before)
        kind, value, _ = self._fused
        if kind == "error":
            raise value
        return value

    def snapshot_before_fuse(self) -> tuple[dict[str, torch.Tensor], dict[str, type]]:
        return self._fused[2]


def set_attention(model: nn.Module, x: torch.Tensor, seed: int = 1) -> list[str]:
    """Every site's attention branch as after training; returns the site names.

    The attention BatchNorm's statistics are those of its input on ``x`` (one pass with only these
    BatchNorms in training mode, cumulative average): PSSA is second order in the site's input, so the
    random statistics of ``trained_like`` would square the activations' scale at every site and, in deep
    chains of sites (mobileone_s0: 40), overflow even float64. The gamma (``attn_bn.weight``, zero at
    initialisation) is set to ``[0.1, 0.3)`` with random signs, the beta to ``[-0.1, 0.1)``: with gammas
    of ``[0.25, 0.75)`` the 40 chained sites of mobileone_s0 still grow to 1e18 and the unfused float32
    model is 1e-3 from float64.
    """
    g = torch.Generator().manual_seed(seed)
    sites = {name: m for name, m in model.named_modules() if isinstance(m, XVolution)}
    bns = [m.attn_bn for m in sites.values()]
    momentum = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    with torch.no_grad():
        model(x)
        for bn, m in zip(bns, momentum, strict=True):
            bn.momentum = m
            bn.eval()
            sign = torch.randint(0, 2, bn.weight.shape, generator=g) * 2 - 1
            bn.weight.copy_((torch.rand(bn.weight.shape, generator=g) + 0.5) * 0.2 * sign)
            bn.bias.copy_(torch.rand(bn.bias.shape, generator=g) * 0.2 - 0.1)
    return list(sites)


def build(name: str) -> nn.Module:
    """The model with sites (or, for NO_SITE, without), trained-like, in eval mode."""
    size = MODELS[name]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    if name in NO_SITE:
        with pytest.raises(xc.SiteSelectionError, match=r"^no site"):
            xc.xvolify(model, example_inputs=x)
    else:
        model = xc.xvolify(model, example_inputs=x)
    model = trained_like(model, seed=0, gain=0.5).eval()
    sites = set_attention(model, torch.rand(4, 3, size, size, generator=torch.Generator().manual_seed(2)))
    assert bool(sites) == (name not in NO_SITE), f"{name}: sites {sites}"
    assert all(model.get_submodule(s).attn_bn.weight.ne(0).all() for s in sites)
    return model.eval()


def parent(path: str) -> str:
    return path.rpartition(".")[0]


def submodule_paths(model: nn.Module, sites: list[str]) -> list[str]:
    """Candidates: modules holding others (a conv and its BatchNorm together, or neither) at depth 1 and 2
    (stages, blocks), and the modules holding the first and the last site. Not leaves: a folded conv, or
    the module in place of a folded BatchNorm (timm's BatchNormAct2d included), computes something else
    alone by design."""
    def holder(n: str, m: nn.Module) -> bool:
        return (bool(n) and any(True for _ in m.children())
                and not isinstance(m, (XVolution, nn.modules.batchnorm._BatchNorm)))

    modules = dict(model.named_modules())
    paths = [n for n, m in modules.items() if n.count(".") <= 1 and holder(n, m)]
    return list(dict.fromkeys(paths + [parent(s) for s in sites[:1] + sites[-1:] if holder(parent(s),
                                                                                             modules[parent(s)])]))


def record(model: nn.Module, x: torch.Tensor, paths: list[str]) -> tuple[Any, dict[str, tuple[Any, Any, Any, int]]]:
    """Run ``model`` on ``x`` with hooks on ``paths``: its output, and per path the first call's
    (args, kwargs, output) and how often it was called."""
    calls: dict[str, tuple[Any, Any, Any, int]] = {}

    inputs: dict[str, tuple[Any, Any]] = {}

    def pre_hook(path: str):
        # Before the call: a module may change its input in place (hrnet's ``x[i] = branch(x[i])``).
        def fn(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            inputs.setdefault(path, (cast_copy(args, x.dtype), cast_copy(kwargs, x.dtype)))
        return fn

    def hook(path: str):
        def fn(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
            if path in calls:
                a, k, o, n = calls[path]
                calls[path] = (a, k, o, n + 1)
            else:
                calls[path] = (*inputs[path], cast_copy(out, x.dtype), 1)
        return fn

    handles = [model.get_submodule(p).register_forward_pre_hook(pre_hook(p), with_kwargs=True) for p in paths]
    handles += [model.get_submodule(p).register_forward_hook(hook(p), with_kwargs=True) for p in paths]
    try:
        with torch.no_grad():
            out = model(x)
    finally:
        for h in handles:
            h.remove()
    return out, calls


def make_case(name: str) -> Case:
    model = build(name)
    size = MODELS[name]
    x = torch.rand(BATCH, 3, size, size, generator=torch.Generator().manual_seed(1))
    sites = [n for n, m in model.named_modules() if isinstance(m, XVolution)]
    model64 = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        feat32, feat64 = model.forward_features(x), model64.forward_features(x.double())
    paths = submodule_paths(model, sites)
    out32, calls32 = record(model, x, paths)
    out64, calls64 = record(model64, x.double(), paths)
    del model64
    case = Case(name, model, x, sites, out32, out64, feat32, feat64)
    # Paths called once, on tensors; a sample spread over the model, and the holders of the first and last site.
    once = [p for p in paths if calls32.get(p, (0, 0, 0, 0))[3] == 1 and calls64[p][3] == 1
            and tensors_in(calls32[p][0]) and tensors_in(calls32[p][2])]
    holders = {parent(s) for s in sites[:1] + sites[-1:]}
    blocks = [p for p in once if p not in holders]
    k = min(SUBMODULE_SAMPLE, len(blocks))
    spread = [blocks[round(i * (len(blocks) - 1) / max(1, k - 1))] for i in range(k)]
    chosen = list(dict.fromkeys(spread + [p for p in once if p in holders]))
    case.recorded = [Recorded(p, calls32[p][0], calls32[p][1], calls32[p][2], calls64[p][2]) for p in chosen]
    own = worst_error(out32, out32, out64, f"{name} unfused")[1]
    assert own < 1e-3, f"{name}: the unfused float32 model is {own:.3g} from float64: the case is ill-conditioned"
    return case


def _params(names: list[str]) -> list[Any]:
    """Every model marked slow (``-m slow`` runs them all); CI_MODELS again, unmarked, as ``ci-<name>``."""
    return ([pytest.param(n, id=n, marks=pytest.mark.slow) for n in MODELS]
            + [pytest.param(n, id=f"ci-{n}") for n in names])


@pytest.fixture(scope="module", params=_params(CI_MODELS))
def case(request: pytest.FixtureRequest) -> Case:
    return make_case(request.param)


# ----------------------------------------------------------------------------- the checks


def containers(model: nn.Module, sites: list[str]) -> dict[str, type]:
    """Paths and classes of the modules that hold others, outside the sites and the BatchNorms (timm's
    BatchNormAct2d holds its activation): the user's program, which the module form keeps."""
    return {n: type(m) for n, m in model.named_modules()
            if any(True for _ in m.children()) and not isinstance(m, (XVolution, nn.modules.batchnorm._BatchNorm))
            and not any(n == s or n.startswith(s + ".") for s in sites)}


def test_module_form(case: Case) -> None:
    fused = case.fused()
    with torch.no_grad():
        assert_close(fused(case.x), case.out32, case.out64, f"{case.name} forward")
        assert_close(fused.forward_features(case.x), case.feat32, case.feat64, f"{case.name} forward_features")
    assert_unchanged(case.model, case.snapshot_before_fuse())
    # Only leaf modules are replaced: every container keeps its path and class (its forward).
    want = containers(case.model, case.sites)
    got = {n: type(fused.get_submodule(n)) for n in want}
    replaced = [f"{n or '<root>'}: {want[n].__qualname__} -> {got[n].__module__}.{got[n].__qualname__}"
                + (" (a generated subclass)" if issubclass(got[n], want[n]) else "")
                for n in want if got[n] is not want[n]]
    assert not replaced, f"{len(replaced)} containers replaced, e.g. {replaced[:3]}"
    assert not any(isinstance(m, XVolution) for m in fused.modules()), "an X-volution site was not fused"
    deploy = sorted(n for n, m in fused.named_modules() if isinstance(m, XVolutionDeploy))
    assert deploy == sorted(case.sites), "each site becomes an XVolutionDeploy at its own path"


def test_module_form_submodules(case: Case) -> None:
    fused = case.fused()
    assert case.recorded, f"{case.name}: no submodule was recorded"
    raised = []
    for rec in case.recorded:
        module = fused.get_submodule(rec.path)
        try:
            with torch.no_grad():
                out = module(*cast_copy(rec.args, case.x.dtype), **cast_copy(rec.kwargs, case.x.dtype))
        except xc.FusionError as err:
            assert str(err), f"{rec.path}: FusionError without a message"
            raised.append(rec.path)
            continue
        assert_close(out, rec.out32, rec.out64, f"{case.name}.{rec.path}")
    assert len(raised) < len(case.recorded), f"no sampled submodule runs alone: {raised}"


def test_graph_form(case: Case) -> None:
    before = snapshot(case.model)
    try:
        gm = xc.fuse(case.model, example_inputs=(case.x,), graph=True)
    except xc.FusionError as err:
        # Only a model torch.fx cannot trace may refuse the graph form; the error says so.
        message = str(err).lower()
        assert "trac" in message or "fx" in message, f"{case.name}: graph form refused without naming fx: {err}"
        assert_unchanged(case.model, before)
        return
    assert_unchanged(case.model, before)
    assert isinstance(gm, fx.GraphModule), type(gm)
    assert not any(isinstance(m, XVolution) for m in gm.modules()), "an X-volution site was not fused"
    with torch.no_grad():
        assert_close(gm(case.x), case.out32, case.out64, f"{case.name} graph form")


@pytest.mark.parametrize("case", [pytest.param("efficientnet_b0", id="ci-efficientnet_b0")], indirect=True)
def test_export_of_fused_efficientnet_has_no_batch_norm(case: Case) -> None:
    """timm's BatchNormAct2d (BatchNorm + activation in one module) is folded too: nothing is left for
    torch.export to lower to a batch norm op."""
    exported = torch.export.export(case.fused(), (case.x,))
    left = [n for n in exported.graph.nodes if "batch_norm" in str(n.target)]
    assert not left, f"{len(left)} batch norm nodes left, e.g. {[str(n.target) for n in left[:3]]}"
    with torch.no_grad():
        assert_close(exported.module()(case.x), case.out32, case.out64, "efficientnet_b0 exported")
