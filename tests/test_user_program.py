"""The user's program survives fusion: every class of Python a model may contain, in both forms of ``fuse``.

Module form (``fuse(model)``): the model's forward and every other method run as written; fusions are
leaf-module replacements (``XVolution`` -> ``XVolutionDeploy``, folded conv in place, ``nn.Identity`` where
its BatchNorm was), made only where a trace proves them safe, refused with a reason otherwise. Graph form
(``fuse(model, graph=True)``): a flat ``torch.fx.GraphModule`` whose ``forward`` must be right, or a
``FusionError`` subclass (with a message) when a flat graph cannot hold the model's Python.

Every check compares the fused float32 model with a float64 eager run of a deep copy of the unfused
model (non-trivial BN statistics, non-zero attention BN gamma so the attention branch matters), by the
relative error ``max|a - ref| / max|ref| <= 1e-5``.
"""

from __future__ import annotations

import copy
import operator
import re
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import fx, nn

import xvol_compiler
from tests.strategies import cast_copy, randomize_bn, rel_err
from xvol_compiler import FusionError, XVolution, XVolutionDeploy, pssa_transform

TOL = 1e-5  # float32 fused against the float64 unfused reference
FORMS = ("module", "graph")


# ---------------------------------------------------------------------------------------------- helpers


def _form(form: str) -> dict[str, bool]:
    """``graph=True`` for the graph form; the module form is fuse's default, so it passes no flag."""
    assert form in FORMS, form
    return {"graph": True} if form == "graph" else {}


def fused(model: nn.Module, form: str, **kw: Any) -> nn.Module:
    return xvol_compiler.fuse(model, **_form(form), **_lowering(kw))


def _lowering(kw: dict[str, Any]) -> dict[str, Any]:
    """``lowering="channel"`` unless a test asks for another: "auto" times the candidates on the
    machine, which is slow on two shared cores and makes the chosen structure depend on the load."""
    return {"lowering": "channel", **kw}


def fuse_or_refusal(model: nn.Module, form: str, **kw: Any) -> tuple[nn.Module | None, FusionError | None]:
    """(fused model, None), or (None, the error) when the *graph* form refuses with a FusionError.

    Only for models whose forward branches on an argument (``isinstance(bias, Tensor)``, ``y is not None``):
    a flat graph cannot hold both paths, so graph form may refuse them; the module form never may.
    """
    if form == "module":
        return fused(model, form, **kw), None
    with _Catch() as caught:
        result = fused(model, form, **kw)
    if caught.error is not None:
        assert str(caught.error).strip(), "a refusal must say why"
        return None, caught.error
    return result, None


class _Catch:
    """Catches a FusionError (only) and keeps it; any other exception propagates and fails the test."""

    error: FusionError | None = None

    def __enter__(self) -> _Catch:
        return self

    def __exit__(self, kind: Any, value: Any, tb: Any) -> bool:
        if isinstance(value, FusionError):
            self.error = value
            return True
        return False


def site(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, **kw: Any) -> XVolution:
    return XVolution.from_conv(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups), **kw)


@torch.no_grad()
def prepare(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics and affine values; every site's attention BN gamma in +-[0.5, 1.5]."""
    randomize_bn(model, seed)
    g = torch.Generator().manual_seed(seed + 1)
    for m in model.modules():
        if isinstance(m, XVolution):
            n = m.attn_bn.num_features
            sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
            m.attn_bn.weight.copy_(sign * (0.5 + torch.rand(n, generator=g)))
    return model.eval()


def ref64(model: nn.Module, method: str, *args: Any, **kwargs: Any) -> Any:
    """``method`` of a float64 deep copy of the unfused model, eval mode, no grad."""
    m = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        return getattr(m, method)(*cast_copy(args, torch.float64), **cast_copy(kwargs, torch.float64))


def run(model: nn.Module, method: str, *args: Any, **kwargs: Any) -> Any:
    with torch.no_grad():
        return getattr(model, method)(*args, **kwargs)


def assert_close(out: Any, ref: Any, what: str = "output") -> None:
    if isinstance(ref, (tuple, list)):
        assert isinstance(out, (tuple, list)) and len(out) == len(ref), f"{what}: {type(out)} vs {type(ref)}"
        for i, (o, r) in enumerate(zip(out, ref, strict=True)):
            assert_close(o, r, f"{what}[{i}]")
        return
    assert isinstance(out, torch.Tensor), f"{what}: got {type(out).__name__}"
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    err = rel_err(out, ref)
    assert err <= TOL, f"{what}: relative error {err:.3g} > {TOL}"


def check(model: nn.Module, fused_model: nn.Module, method: str, *args: Any, **kwargs: Any) -> None:
    assert_close(run(fused_model, method, *args, **kwargs), ref64(model, method, *args, **kwargs), method)


def inp(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# ------------------------------------------------------------------ 1. a method other than forward


class FeaturesNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn_stem = nn.BatchNorm2d(8)
        self.site = site(8, 8)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Conv2d(8, 4, 1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn_stem(self.stem(x)))
        return torch.relu(self.bn(self.site(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x)).mean((2, 3))


@pytest.mark.parametrize("form", FORMS)
def test_method_other_than_forward(form: str) -> None:
    model = prepare(FeaturesNet())
    x = inp(2, 3, 10, 10)
    f = fused(model, form, example_inputs=(x,))
    check(model, f, "forward", x)
    if form == "module":
        check(model, f, "features", x)


# ------------------------------------------------------------------ 2. an isinstance(bias, Tensor) argument


class BiasNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(site(3, 8), nn.BatchNorm2d(8), nn.ReLU())
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        y = self.body(x)
        if isinstance(bias, torch.Tensor):
            y = y + bias
        return self.bn(self.conv(y))


@pytest.mark.parametrize("form", FORMS)
def test_isinstance_bias_argument(form: str) -> None:
    model = prepare(BiasNet())
    x, b = inp(2, 3, 9, 9), inp(1, 8, 1, 1, seed=1) * 3
    f, refusal = fuse_or_refusal(model, form, example_inputs=(x,))
    if refusal is not None:
        return  # graph form refused, with a message (checked): a flat graph cannot hold both paths
    check(model, f, "forward", x)
    check(model, f, "forward", x, b)
    check(model, f, "forward", x, bias=b)


# ------------------------------------------------------------------ 3. optional arguments (timm dla style)


class DlaLikeBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = site(c, c)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor, shortcut: torch.Tensor | None = None) -> torch.Tensor:
        if shortcut is None:
            shortcut = x
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + shortcut)


class DlaLikeNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.stem_bn = nn.BatchNorm2d(6)
        self.block1 = DlaLikeBlock(6)
        self.block2 = DlaLikeBlock(6)
        self.project = nn.Conv2d(6, 6, 1)
        self.project_bn = nn.BatchNorm2d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem_bn(self.stem(x)))
        a = self.block1(x)
        return self.block2(a, self.project_bn(self.project(x)))


@pytest.mark.parametrize("form", FORMS)
def test_block_with_optional_argument(form: str) -> None:
    model = prepare(DlaLikeNet())
    x = inp(2, 3, 12, 12)
    f = fused(model, form, example_inputs=(x,))
    check(model, f, "forward", x)
    if form == "module":  # the blocks themselves, called both ways
        h = inp(1, 6, 8, 8, seed=2)
        s = inp(1, 6, 8, 8, seed=3)
        assert_close(run(f.block1, "forward", h), ref64(model.block1, "forward", h), "block1(h)")
        assert_close(run(f.block1, "forward", h, s), ref64(model.block1, "forward", h, s), "block1(h, s)")
        assert_close(run(f.block2, "forward", h, shortcut=s), ref64(model.block2, "forward", h, shortcut=s),
                     "block2(h, shortcut=s)")


class OptionalInputNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(site(3, 8), nn.BatchNorm2d(8), nn.ReLU())
        self.side = nn.Conv2d(2, 8, 3, padding=1)
        self.side_bn = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        out = self.body(x)
        if y is not None:
            out = out + self.side_bn(self.side(y))
        return out


@pytest.mark.parametrize("form", FORMS)
def test_model_forward_with_optional_argument(form: str) -> None:
    model = prepare(OptionalInputNet())
    x, y = inp(2, 3, 10, 10), inp(2, 2, 10, 10, seed=1)
    f, refusal = fuse_or_refusal(model, form, example_inputs=(x,))
    if refusal is not None:
        return  # graph form refused, with a message (checked): a flat graph cannot hold both paths
    check(model, f, "forward", x)
    check(model, f, "forward", x, y)
    check(model, f, "forward", x, y=y)


# ------------------------------------------------------------------ 4. timm-like feature methods


class TimmLikeNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.act1 = nn.ReLU()
        self.layer1 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        # A plain conv here: the test makes it a site with xvolify, as a user would.
        self.layer2 = nn.Sequential(nn.Conv2d(8, 12, 3, 2, 1), nn.BatchNorm2d(12), nn.ReLU())
        self.fc = nn.Linear(12, 5)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.act1(x)
        return self.layer2(self.layer1(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.mean((2, 3))
        return x if pre_logits else self.fc(x)

    def forward_intermediates(self, x: torch.Tensor, indices: int = 3) -> tuple[torch.Tensor, list[torch.Tensor]]:
        intermediates = []
        x = self.act1(self.bn1(self.conv1(x)))
        intermediates.append(x)
        for stage in (self.layer1, self.layer2)[: indices - 1]:
            x = stage(x)
            intermediates.append(x)
        return x, intermediates

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@pytest.mark.parametrize("form", FORMS)
def test_timm_like_feature_methods(form: str) -> None:
    x = inp(2, 3, 12, 12)
    model = prepare(xvol_compiler.xvolify(TimmLikeNet(), sites=["layer2.0"], example_inputs=x))
    assert isinstance(model.layer2[0], XVolution)
    f = fused(model, form, example_inputs=(x,))
    check(model, f, "forward", x)
    if form == "module":
        check(model, f, "forward_features", x)
        check(model, f, "forward_intermediates", x)
        check(model, f, "forward_intermediates", x, indices=2)
        feats = inp(2, 12, 6, 6, seed=4)
        check(model, f, "forward_head", feats, pre_logits=True)
        check(model, f, "forward_head", feats)


# ------------------------------------------------------------------ 5. calls, modes, hooks, sharing


class ScaledBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = site(c, c)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor, scale: float | None = None, residual: torch.Tensor | None = None
                ) -> torch.Tensor:
        y = self.bn(self.conv(x))
        if scale is not None:
            y = y * scale
        if residual is not None:
            y = y + residual
        return torch.relu(y)


class TwiceNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.stem_bn = nn.BatchNorm2d(6)
        self.block = ScaledBlock(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem_bn(self.stem(x)))
        a = self.block(x)
        return self.block(a, scale=0.5, residual=x)


@pytest.mark.parametrize("form", FORMS)
def test_block_called_twice_with_different_arguments(form: str) -> None:
    model = prepare(TwiceNet())
    x = inp(2, 3, 10, 10)
    f = fused(model, form, example_inputs=(x,))
    check(model, f, "forward", x)
    if form == "module":
        h = inp(1, 6, 8, 8, seed=5)
        assert_close(run(f.block, "forward", h, scale=2.0, residual=h),
                     ref64(model.block, "forward", h, scale=2.0, residual=h), "block(h, scale, residual)")


class TrainingBranchNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.site = site(3, 8)
        self.bn = nn.BatchNorm2d(8)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.aux = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> Any:
        y = torch.relu(self.bn(self.site(x)))
        y = y + 1.0 if self.training else y * 0.5
        z = self.bn2(self.conv(y))
        if self.training:
            return z, self.aux(y)
        return z


@pytest.mark.parametrize("form", FORMS)
def test_training_flag_branches(form: str) -> None:
    model = prepare(TrainingBranchNet())
    x = inp(2, 3, 9, 9)
    f = fused(model, form, example_inputs=(x,))
    assert not f.training
    check(model, f, "forward", x)  # the eval branch, with the eval-branch reference
    if form == "module":
        f.train().eval()  # a mode round trip changes nothing in folded weights
        check(model, f, "forward", x)


class HookNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.site_block = nn.Sequential(site(8, 8), nn.BatchNorm2d(8))
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.site_block(self.block(x))))


def _record64(model: nn.Module, names: list[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Float64 outputs of the named submodules of a deep copy of the unfused model."""
    m = copy.deepcopy(model).double().eval()
    for mod in m.modules():
        mod._forward_hooks.clear()
    out: dict[str, torch.Tensor] = {}
    for name in names:
        m.get_submodule(name).register_forward_hook(lambda _m, _a, o, name=name: out.__setitem__(name, o))
    with torch.no_grad():
        m(x.double())
    return out


def test_forward_hooks_fire_and_see_right_values() -> None:
    model = prepare(HookNet())
    x = inp(2, 3, 10, 10)
    names = ["block", "site_block", "head"]
    want = _record64(model, names, x)
    seen: dict[str, list[torch.Tensor]] = {}

    def recorder(name: str) -> Any:
        return lambda _m, _a, o: seen.setdefault(name, []).append(o.detach().clone())

    for name in ("block", "head"):  # registered by the user before fusing: kept
        model.get_submodule(name).register_forward_hook(recorder(f"before:{name}"))
    f = fused(model, "module", example_inputs=(x,))
    for name in names:  # registered on the fused model
        f.get_submodule(name).register_forward_hook(recorder(f"after:{name}"))
    seen.clear()  # fusing ran the model (verification): only the call below counts
    run(f, "forward", x)
    expected = {"before:block", "before:head", "after:block", "after:site_block", "after:head"}
    assert set(seen) == expected, f"hooks that fired: {sorted(seen)}"
    for key, outs in seen.items():
        assert len(outs) == 1, f"{key} fired {len(outs)} times"
        assert_close(outs[0], want[key.split(":")[1]], key)


class SharedNet(nn.Module):
    """A conv used at two places: called twice, registered under two names, or its weight tied to another's."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.bn2 = nn.BatchNorm2d(8)
        if how == "registered twice":
            self.alias = self.conv
        elif how == "tied weight":
            self.other = nn.Conv2d(3, 8, 3, padding=1)
            self.other.weight = self.conv.weight
        self.tail = site(8, 8)
        self.tail_bn = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        second = {"called twice": self.conv, "registered twice": getattr(self, "alias", None),
                  "tied weight": getattr(self, "other", None)}[self.how]
        y = self.bn1(self.conv(x)) + self.bn2(second(x))
        return self.tail_bn(self.tail(torch.relu(y)))


@pytest.mark.parametrize("how", ["called twice", "registered twice", "tied weight"])
@pytest.mark.parametrize("form", FORMS)
def test_module_reused_in_two_places(form: str, how: str) -> None:
    model = prepare(SharedNet(how))
    weight = model.conv.weight.detach().clone()
    x = inp(2, 3, 10, 10)
    f, report = xvol_compiler.fuse_with_report(model, **_form(form), **_lowering({"example_inputs": (x,)}))
    check(model, f, "forward", x)
    assert f.xvol_fusion_report is report
    if form == "module":
        shared = re.compile(r"\b(conv|alias|other|bn1|bn2)\b")  # not tail.attn_conv
        refused = [o for o in report.refused if shared.search(o.name)]
        assert refused, f"the shared conv's fold is not refused: {report}"
        assert all(o.reason.strip() for o in refused), f"a refusal without a reason: {refused}"
        assert type(f.conv) is nn.Conv2d and torch.equal(f.conv.weight, weight)
        assert isinstance(f.bn1, nn.BatchNorm2d) and isinstance(f.bn2, nn.BatchNorm2d)
        if how == "registered twice":
            assert f.alias is f.conv
        if how == "tied weight":
            assert type(f.other) is nn.Conv2d and f.other.weight is f.conv.weight
        assert isinstance(f.tail, XVolutionDeploy)  # the rest still fuses


# ------------------------------------------------------------------ 6. a depthwise site, spatial lowering


class DepthwiseNet(nn.Module):
    def __init__(self, bn_only_consumer: bool) -> None:
        super().__init__()
        self.bn_only_consumer = bn_only_consumer
        self.pw = nn.Conv2d(3, 6, 1)
        self.site = site(6, 6, groups=6)
        self.bn = nn.BatchNorm2d(6)
        self.head = nn.Conv2d(6, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pw(x)
        s = self.site(h)
        y = torch.relu(self.bn(s))
        if not self.bn_only_consumer:
            y = y + s
        return self.head(y)


@pytest.mark.parametrize("lowering", ["spatial", "spatial-h", "stack"])
@pytest.mark.parametrize("bn_only_consumer", [True, False])
@pytest.mark.parametrize("form", FORMS)
def test_depthwise_site_spatial_lowering(form: str, bn_only_consumer: bool, lowering: str) -> None:
    model = prepare(DepthwiseNet(bn_only_consumer))
    x = inp(2, 3, 12, 12)
    f = fused(model, form, example_inputs=(x,), lowering=lowering)
    check(model, f, "forward", x)
    lowerings = f.xvol_fusion_report.lowerings()
    assert list(lowerings.values()) == [lowering], lowerings
    if form == "graph":
        return
    # The fused site called alone on an input of its own: the site's value (and its BN's, when that BN
    # was folded in and is now an Identity), or the package's error naming it; never another width.
    bn_folded = isinstance(f.bn, nn.Identity)
    ref = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        site_input = model.pw(x)  # what the site gets in the model, and another size it accepts
    for h in (site_input, inp(2, 6, 11, 13, seed=6)):
        with torch.no_grad():
            want = ref.site(h.double())
            if bn_folded:
                want = ref.bn(want)
        with _Catch() as caught:
            out = run(f.site, "forward", h)
        if caught.error is not None:
            assert "site" in str(caught.error), f"the error does not name the module: {caught.error}"
        else:
            assert_close(out, want, f"fused site alone on {tuple(h.shape)}")
    assert isinstance(f.site, XVolutionDeploy)
    assert bn_folded == bn_only_consumer  # the BN folds into the site only when it is the site's only consumer


# ------------------------------------------------------------------ 7. module form structure, caller's model


class StructNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn_stem = nn.BatchNorm2d(8)
        self.site = site(8, 8)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Conv2d(8, 4, 1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn_stem(self.stem(x)))
        x = torch.relu(self.bn(self.site(x)))
        return self.fc(self.head(x).mean((2, 3)))


def _snapshot(model: nn.Module) -> tuple[dict[str, type], dict[str, torch.Tensor]]:
    return ({n: type(m) for n, m in model.named_modules()},
            {k: v.detach().clone() for k, v in model.state_dict().items()})


def _assert_unchanged(model: nn.Module, snapshot: tuple[dict[str, type], dict[str, torch.Tensor]]) -> None:
    types, state = snapshot
    now_types, now_state = _snapshot(model)
    assert now_types == types, "the caller's module tree changed"
    assert now_state.keys() == state.keys(), "the caller's state_dict keys changed"
    for k, v in state.items():
        assert torch.equal(now_state[k], v), f"the caller's {k} changed"
    assert not hasattr(model, "xvol_fusion_report")


def test_module_form_structure() -> None:
    model = prepare(StructNet())
    before = _snapshot(model)
    x = inp(2, 3, 10, 10)
    f = fused(model, "module", example_inputs=(x,))
    assert f is not model
    assert type(f) is StructNet  # the user's class, forward and methods as written
    assert isinstance(f.site, XVolutionDeploy)
    assert isinstance(f.bn, nn.Identity) and isinstance(f.bn_stem, nn.Identity)
    assert type(f.stem) is nn.Conv2d
    assert type(f.head) is nn.Conv2d and type(f.fc) is nn.Linear
    untouched = {k: v for k, v in before[1].items() if k.startswith(("head.", "fc."))}
    fused_state = f.state_dict()
    for k, v in untouched.items():
        assert k in fused_state, f"untouched key {k} is gone"
        assert torch.equal(fused_state[k], v), f"untouched {k} changed"
    assert {k for k in fused_state if k.startswith(("head.", "fc."))} == untouched.keys()
    _assert_unchanged(model, before)
    check(model, f, "forward", x)
    # Each replacement called alone computes the chain it replaced (torch.ao convention).
    ref = copy.deepcopy(model).double().eval()
    h = inp(1, 8, 9, 9, seed=7)
    with torch.no_grad():
        assert_close(run(f.stem, "forward", x), ref.bn_stem(ref.stem(x.double())), "folded stem alone")
        assert_close(run(f.site, "forward", h), ref.bn(ref.site(h.double())), "deploy site alone")


def test_graph_form_structure() -> None:
    model = prepare(StructNet())
    before = _snapshot(model)
    x = inp(2, 3, 10, 10)
    f = fused(model, "graph", example_inputs=(x,))
    assert isinstance(f, fx.GraphModule)
    f.graph.lint()
    left = [n for n, m in f.named_modules() if isinstance(m, (XVolution, nn.modules.batchnorm._BatchNorm))]
    assert not left, f"unfused modules left in the graph form: {left}"
    _assert_unchanged(model, before)
    check(model, f, "forward", x)


class NormActNet(nn.Module):
    def __init__(self) -> None:
        from timm.layers import BatchNormAct2d

        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.norm = BatchNormAct2d(8, act_layer=nn.ReLU)
        self.site = site(8, 8)
        self.norm2 = BatchNormAct2d(8, act_layer=nn.SiLU)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm2(self.site(self.norm(self.conv(x))))


@pytest.mark.parametrize("form", FORMS)
def test_timm_norm_act_becomes_bare_activation(form: str) -> None:
    model = prepare(NormActNet())
    before = _snapshot(model)
    x = inp(2, 3, 10, 10)
    f = fused(model, form, example_inputs=(x,))
    check(model, f, "forward", x)
    _assert_unchanged(model, before)
    if form == "module":
        assert type(f.norm) is nn.ReLU and type(f.norm2) is nn.SiLU
        assert type(f.conv) is nn.Conv2d and isinstance(f.site, XVolutionDeploy)
        ref = copy.deepcopy(model).double().eval()
        with torch.no_grad():
            assert_close(run(f.conv, "forward", x), F.batch_norm(
                ref.conv(x.double()), ref.norm.running_mean, ref.norm.running_var, ref.norm.weight, ref.norm.bias,
                False, 0.0, ref.norm.eps), "folded conv alone (conv + BN, no activation)")


# ------------------------------------------------------------------ 8. graph form: site inputs defined late


@st.composite
def late_site_graphs(draw: st.DrawFn) -> dict[str, Any]:
    depthwise = draw(st.booleans())
    c = draw(st.sampled_from([2, 4]))
    return {
        "c": c,
        "out": c if depthwise else draw(st.sampled_from([2, 3, 4])),
        "groups": c if depthwise else 1,
        "k": draw(st.sampled_from([1, 3])),
        "shift": draw(st.sampled_from([1, 2])),
        "bn_after": draw(st.booleans()),
        "attention_first": draw(st.booleans()),  # else: the conv branch first, T(x) right before the add
        "swap_add": draw(st.booleans()),
        "size": draw(st.integers(8, 12)),
        "lowering": draw(st.sampled_from(["channel", "spatial", "spatial-h", "stack"])),
    }


def build_late_site(p: dict[str, Any]) -> fx.GraphModule:
    """``tanh(inp)`` -> site ``conv(x) + attn_bn(attn_conv(pssa_transform(x)))``, built node by node with
    unrelated nodes first and in between, so x and T(x) are defined late in the graph."""
    c, o, k, g = p["c"], p["out"], p["k"], p["groups"]
    root = nn.Module()
    root.pre = nn.Conv2d(c, c, 1)
    root.pre_bn = nn.BatchNorm2d(c)
    root.site_conv = nn.Conv2d(c, o, k, padding=k // 2, groups=g)
    root.attn_conv = nn.Conv2d(c, o, k, padding=k // 2, groups=g, bias=False)
    root.attn_bn = nn.BatchNorm2d(o)
    root.bn_out = nn.BatchNorm2d(o)
    graph = fx.Graph()
    x_in = graph.placeholder("inp")
    u = graph.call_module("pre", (x_in,))  # unrelated: a conv + BN of its own before the site
    u = graph.call_module("pre_bn", (u,))
    u = graph.call_function(torch.relu, (u,))
    x = graph.call_function(torch.tanh, (x_in,))  # the site's input, defined after the unrelated nodes

    def conv_branch() -> fx.Node:
        return graph.call_module("site_conv", (x,))

    def attention_branch() -> fx.Node:
        t = graph.call_function(pssa_transform, (x,), {"shift": p["shift"]})
        return graph.call_module("attn_bn", (graph.call_module("attn_conv", (t,)),))

    if p["attention_first"]:
        a = attention_branch()
        u = graph.call_function(torch.sigmoid, (u,))
        y = conv_branch()
    else:
        y = conv_branch()
        u = graph.call_function(torch.sigmoid, (u,))
        a = attention_branch()
    s = graph.call_function(operator.add, (a, y) if p["swap_add"] else (y, a))
    if p["bn_after"]:
        s = graph.call_module("bn_out", (s,))
    graph.output((s, u))
    gm = fx.GraphModule(root, graph)
    gm.graph.lint()
    return prepare(gm, seed=p["size"])


@settings(max_examples=10)
@given(p=late_site_graphs())
def test_graph_form_site_inputs_defined_late(p: dict[str, Any]) -> None:
    torch.manual_seed(0)
    gm = build_late_site(p)
    with torch.no_grad():  # attention matters: BN_a's gamma is non-zero
        gm.attn_bn.weight.copy_(torch.linspace(0.5, 1.5, p["out"]))
    x = inp(2, p["c"], p["size"], p["size"] + 1, seed=p["size"])
    f, report = xvol_compiler.fuse_with_report(gm, graph=True, example_inputs=(x,), lowering=p["lowering"])
    assert isinstance(f, fx.GraphModule)
    f.graph.lint()
    assert report.count("x-volution") == 1, str(report)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in f.modules()), "a BN left unfolded"
    assert list(report.lowerings().values()) == [p["lowering"]], report.lowerings()
    assert_close(run(f, "forward", x), ref64(gm, "forward", x), "late-site graph")


class ChainedSitesNet(nn.Module):
    """Two depthwise sites in a row with a BatchNorm between them (timm ghostnetv2's short_conv): the
    second site's input is the first site's output, which the spatial lowering re-emits."""

    def __init__(self) -> None:
        super().__init__()
        self.first = site(6, 6, k=3, groups=6)
        self.bn1 = nn.BatchNorm2d(6)
        self.second = site(6, 6, k=3, groups=6)
        self.bn2 = nn.BatchNorm2d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.second(self.bn1(self.first(x))))


@pytest.mark.parametrize("lowering", ["channel", "spatial", "spatial-h", "stack"])
@pytest.mark.parametrize("form", FORMS)
def test_chained_sites_in_every_lowering(form: str, lowering: str) -> None:
    model = prepare(ChainedSitesNet())
    x = inp(2, 6, 9, 11)
    out = fused(model, form, example_inputs=(x,), lowering=lowering)
    report = out.xvol_fusion_report
    assert report.lowerings() == {"first": lowering, "second": lowering}, str(report)
    check(model, out, "forward", x)


class AliasedSiteNet(nn.Module):
    """One conv registered at two paths and called at both (xvolify makes it one site at both)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(4, 4, 3, padding=1)
        self.b = self.a

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


def test_site_registered_at_two_paths_gets_one_deploy_module_at_both() -> None:
    x = inp(2, 4, 8, 8)
    model = prepare(xvol_compiler.xvolify(AliasedSiteNet(), sites=["a"], example_inputs=(x,)))
    assert model.a is model.b and isinstance(model.a, XVolution)
    out = fused(model, "module", example_inputs=(x,))
    assert isinstance(out.a, XVolutionDeploy) and out.b is out.a
    check(model, out, "forward", x)
