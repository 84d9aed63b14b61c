"""The module form of fusion: every fusion is a leaf-module replacement; the user's program runs unchanged.

As torch.ao's ``fuse_modules`` and timm's ``reparameterize_model`` do, the model's own
code is never replaced. The model is traced with torch.fx only to *find* what is safe
to fuse (X-volution sites, convolutions, BatchNorms and norm-act layers are kept as
calls), with the shared rule engine's view and its ``conv+bn`` rule; then each fusion
is applied by putting a new module at a path:

``x-volution``
    every ``XVolution`` becomes its deploy module (``XVolutionDeploy``: one convolution
    over the interleave of x and T(x), T(x) computed inside), in the lowering chosen for
    the backend. Exact wherever and however often the site is called, so no trace is needed.
``conv+bn``
    a convolution (or an X-volution site) whose output has one consumer, a BatchNorm:
    the folded convolution (the deploy module with the BatchNorm folded in) in place of
    the conv, ``nn.Identity`` where the BatchNorm was (for a norm-act layer, its
    dropout and activation alone: ``NormActRemainder``). Made only when the trace shows
    it safe: both are module calls, each module is called once, neither is registered
    at two paths, their parameters belong to them alone, the BatchNorm folds exactly.

A fused module called on its own computes the chain it replaced (a folded conv gives
``bn(conv(x))``), the torch.ao convention. Matches that need graph surgery (branch sums,
identity branches, a conv + BN branch, convolutions called as functions) are listed
as "graph form only": ``fuse(model, graph=True)`` applies them.

A part of the model that torch.fx cannot trace is searched child by child; the sites
in it are still replaced, and the pairs inside its traceable children still fold.

The plan (:class:`Replacement` values) depends on the model's structure only, so the
same plan applies to a copy with other weights (verification with exercised attention)
and is what a fused checkpoint records (``xvol_compiler.fused_record``).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from xvol_compiler.conv_modules import CONV_TYPES, bn_params, conv_geometry, conv_module_weights
from xvol_compiler.deploy import XVolutionDeploy, lowered_convs, merged_branch
from xvol_compiler.errors import InvalidArgumentError, InvalidArgumentTypeError
from xvol_compiler.fold import Branch, FoldError, fold_conv_bn
from xvol_compiler.fusion_report import FusionReport
from xvol_compiler.lowering import LoweringChoice
from xvol_compiler.norm_act import has_own_forward, norm_act_reason, remainder_of
from xvol_compiler.rules import (
    CONV_BN,
    CONV_BN_RULE,
    XVOLUTION,
    Outcome,
    RuleSet,
    ViewAdapter,
    node_info,
    run_rules,
    set_info,
    try_rule,
)
from xvol_compiler.xvolution import XVolution, conv_forward_reason
from xvol_passes.fx_graph import FxAdapter
from xvol_passes.fx_read import as_node
from xvol_passes.lower import LoweringOption, choose_lowering, site_option

__all__ = ["GRAPH_FORM_ONLY", "Replacement", "apply_replacements", "fuse_modules", "fused_paths", "plan_replacements"]

log = logging.getLogger(__name__)

GRAPH_FORM_ONLY = "graph form only: fuse(model, graph=True) applies it"
_CONV_MODULES = tuple(CONV_TYPES.values())


@dataclass(frozen=True)
class Replacement:
    """One leaf-module replacement: the module at ``path`` becomes the fused form of ``rule``.

    ``rule`` "x-volution": the site at ``path`` becomes its deploy module; "conv+bn": the
    conv (or site) at ``path`` absorbs the BatchNorm at ``bn_path``, which becomes
    ``nn.Identity`` (or its dropout and activation). ``lowering`` is the site's deploy lowering.
    """

    rule: str
    path: str
    bn_path: str = ""
    lowering: str = ""
    lowering_reason: str = ""


@dataclass
class Plan:
    replacements: list[Replacement] = field(default_factory=list)
    outcomes: list[Outcome] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    built: dict[str, nn.Module] = field(default_factory=dict)  # path -> its new module, from the planned weights


# ---------------------------------------------------------------- finding what is safe


class _FindTracer(fx.Tracer):
    """Keeps sites, foldable convs, BatchNorms and norm-act layers as calls; traces through the rest."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, (XVolution, XVolutionDeploy)):
            return True
        if isinstance(m, _CONV_MODULES):
            return not conv_forward_reason(m)  # a conv with another forward is traced through, as written
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            return not has_own_forward(m) or not norm_act_reason(m)
        return super().is_leaf_module(m, module_qualified_name)


def _shared(model: nn.Module) -> tuple[set[str], set[str]]:
    """Paths of modules registered at several paths, and of modules owning a parameter another module also holds."""
    paths: dict[int, list[str]] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(module), []).append(path)
    shared_modules = {p for ps in paths.values() if len(ps) > 1 for p in ps}
    owners: dict[int, set[str]] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        for param in module.parameters(recurse=False):
            owners.setdefault(id(param), set()).add(path)
    shared_params = {p for ps in owners.values() if len(ps) > 1 for p in ps}
    return shared_modules, shared_params


def _trace(module: nn.Module) -> fx.GraphModule:
    tracer = _FindTracer()
    graph = tracer.trace(module)
    return fx.GraphModule(tracer.root, graph, type(module).__name__)


def _traced_parts(model: nn.Module, path: str, notes: list[str]) -> list[tuple[str, fx.GraphModule]]:
    """(path, graph) of the largest parts of ``model`` that trace: itself, else its children, recursively."""
    try:
        return [(path, _trace(model))]
    except Exception as err:  # any tracing failure: look inside
        children = list(model.named_children())
        where = path or "the model"
        if children:
            notes.append(f"{where} does not trace with torch.fx ({type(err).__name__}): its children are searched")
        parts: list[tuple[str, fx.GraphModule]] = []
        for name, child in children:
            if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in child.modules()):
                parts += _traced_parts(child, f"{path}.{name}" if path else name, notes)
        return parts


def _pair_refusal(view: nx.DiGraph, producer: fx.Node, bn: fx.Node, shared_modules: set[str],
                  shared_params: set[str], prefix: str) -> str:
    """Why the module-form replacement of ``producer`` + ``bn`` is not safe ('' when it is)."""
    if producer.op != "call_module" or bn.op != "call_module":
        what = producer if producer.op != "call_module" else bn
        return f"{node_info(view, what).name} is not a module call; {GRAPH_FORM_ONLY}"
    conv_path, bn_path = prefix + str(producer.target), prefix + str(bn.target)
    conv_parent, bn_parent = conv_path.rpartition(".")[0], bn_path.rpartition(".")[0]
    if conv_parent != bn_parent:  # a container holding one of them would compute something else alone
        crossed = bn_parent if not conv_parent or bn_path.startswith(conv_parent + ".") else conv_parent
        return (f"{conv_path} and {bn_path} are in different modules: folding would change what {crossed} "
                f"computes when called on its own; {GRAPH_FORM_ONLY}")
    for node in (producer, bn):
        path = prefix + str(node.target)
        if path in shared_modules:
            return f"module {path} is registered at several paths; folding it would change every use"
        if path in shared_params:
            return f"a parameter of {path} is shared with another module; folding would untie it"
    return ""


def _graph_only(view: nx.DiGraph, skip: Collection[str] = ()) -> list[Outcome]:
    """What only the graph form can do here: the rules (but conv+bn and those in ``skip``) run to their
    fixpoint on a copy of the view in which every conv -> BatchNorm pair is already one conv (their
    weights need not be folded to see the structure); every rewrite is "graph form only", and every
    refusal keeps its reason."""
    log = run_rules(ViewAdapter(_bns_contracted(view)), RuleSet.of(skip={*skip, CONV_BN_RULE.name}))
    return [Outcome(r.kind, r.name, "refused", GRAPH_FORM_ONLY) for r in log.applied] + log.refused


def _bns_contracted(view: nx.DiGraph) -> nx.DiGraph:
    """A copy of ``view`` in which each BatchNorm fed by a single-consumer conv is merged into that conv."""
    out = view.copy()
    for conv, bn in [(m["conv"], m["bn"]) for m in CONV_BN.matches(view)]:
        info, bn_info = node_info(view, conv), node_info(view, bn)
        foldable = info.branch is not None and bn_info.bn is not None
        if (info.users != 1 or info.refusal or bn_info.refusal or not foldable
                or conv not in out or bn not in out):
            continue  # the graph form would not fold it either
        for succ in list(out.successors(bn)):
            out.add_edge(conv, succ)
            branch = node_info(out, succ).branch
            if branch is not None and bn in branch.inputs:
                set_info(out, succ, branch=dataclasses.replace(
                    branch, inputs=tuple(conv if k == bn else k for k in branch.inputs)))
        set_info(out, conv, users=node_info(out, bn).users)
        out.remove_node(bn)
    return out


def _site_shapes(model: nn.Module, example: tuple[Any, ...] | None) -> dict[str, tuple[int, ...]]:
    """Input shape of every X-volution site on ``example`` (for the lowering choice), by path."""
    sites = {p: m for p, m in model.named_modules() if isinstance(m, XVolution)}
    if not sites or example is None:
        return {}
    shapes: dict[str, tuple[int, ...]] = {}

    def record(path: str, args: tuple[Any, ...]) -> None:
        if args and isinstance(args[0], torch.Tensor):
            shapes.setdefault(path, tuple(args[0].shape))

    handles = [m.register_forward_pre_hook(lambda _m, args, p=p: record(p, args)) for p, m in sites.items()]
    try:
        with torch.no_grad():
            model(*example)
    except Exception as err:  # only the lowering choice uses shapes
        log.info("site shapes unknown (%s): lowerings chosen without them", err)
    finally:
        for h in handles:
            h.remove()
    return shapes


def _propagate_shapes(gm: fx.GraphModule, example: tuple[Any, ...] | None) -> bool:
    """Record tensor shapes on the nodes of the whole model's graph (MAC counts, site shapes)."""
    if example is None:
        return False
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(*example)
    except Exception as err:  # only MAC counts and the lowering choice use shapes
        log.info("shape propagation failed (%s): fusing without shapes", err)
        return False
    return True


def _node_shapes(gm: fx.GraphModule) -> dict[str, tuple[int, ...]]:
    """Input shape of each site call of a shape-propagated graph, by module path."""
    shapes: dict[str, tuple[int, ...]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.args and isinstance(node.args[0], fx.Node):
            meta = node.args[0].meta.get("tensor_meta")
            if meta is not None and hasattr(meta, "shape"):
                shapes.setdefault(str(node.target), tuple(int(d) for d in meta.shape))
    return shapes


def plan_replacements(
    model: nn.Module, example: tuple[Any, ...] | None = None, *, backend: str = "eager",
    lowering: LoweringOption = "auto", single_conv: bool = True, skip: Collection[str] = (),
) -> Plan:
    """What the module form replaces in ``model`` (nothing is changed), with the report's outcomes;
    the rules named in ``skip`` are not applied ("conv+bn": no pair folds, "x-volution": sites stay)."""
    skip = RuleSet.of(skip=skip).skip
    fold_bns = CONV_BN_RULE.name not in skip
    plan = Plan()
    shared_modules, shared_params = _shared(model)
    modules = dict(model.named_modules())
    site_bn: dict[str, str] = {}  # site path -> the BatchNorm folded into it
    parts = _traced_parts(model, "", plan.notes)
    shapes: dict[str, tuple[int, ...]] | None = None
    if len(parts) == 1 and parts[0][0] == "" and _propagate_shapes(parts[0][1], example):
        shapes = _node_shapes(parts[0][1])
    for prefix_path, gm in parts:
        prefix = f"{prefix_path}." if prefix_path else ""
        view = FxAdapter(gm).view()
        for m in CONV_BN.matches(view) if fold_bns else ():
            producer, bn = as_node(m["conv"]), as_node(m["bn"])
            name = prefix + node_info(view, producer).name
            why = _pair_refusal(view, producer, bn, shared_modules, shared_params, prefix)
            planned = why or try_rule(CONV_BN_RULE, view, dict(m))
            if isinstance(planned, str):
                plan.outcomes.append(Outcome("conv+bn", name, "refused", planned))
                continue
            rewrite = planned
            path, bn_path = prefix + str(producer.target), prefix + str(bn.target)
            plan.replacements.append(Replacement("conv+bn", path, bn_path))
            plan.built[path] = _conv_like(modules[path], rewrite.branch)
            plan.built[bn_path] = _bn_remainder(modules[bn_path])
            plan.outcomes.append(Outcome("conv+bn", path, "fused", "", rewrite.params_before, rewrite.params_after,
                                         rewrite.macs_before, rewrite.macs_after))
        for producer, bn in _site_bn_matches(view) if fold_bns else ():
            path, bn_path = prefix + str(producer.target), prefix + str(bn.target)
            if not isinstance(modules.get(path), XVolution):
                continue  # an already fused site: nothing to do
            why = _pair_refusal(view, producer, bn, shared_modules, shared_params, prefix)
            why = why or node_info(view, producer).refusal or node_info(view, bn).refusal or ""
            if not why and node_info(view, producer).users != 1:
                why = f"{path} output is also used elsewhere ({node_info(view, producer).users} users)"
            if why:
                plan.outcomes.append(Outcome("conv+bn", path, "refused", why))
                continue
            site_bn[path] = bn_path
            plan.outcomes.append(Outcome("conv+bn", path, "fused", "", 2 * modules[bn_path].num_features, 0))
        plan.outcomes += [dataclasses.replace(o, name=prefix + o.name) for o in _graph_only(view, skip)]
    if shapes is None:
        shapes = _site_shapes(model, example) if lowering in ("auto", "measure") else {}
    for path, site in modules.items():
        if not isinstance(site, XVolution) or XVOLUTION.name in skip:
            continue
        params = sum(p.numel() for p in site.parameters()) + sum(
            b.numel() for n, b in site.named_buffers() if "running" in n)
        bn_path = site_bn.get(path, "")
        try:
            weights = site.deploy_weights()
            choice = _site_lowering(site, path, weights, shapes.get(path), backend, lowering, single_conv)
            deploy = _keep_layout(site.fuse(choice.lowering, single_conv=single_conv, weights=weights,
                                            bn=bn_params(modules[bn_path]) if bn_path else None), site.weight)
        except FoldError as err:
            plan.outcomes.append(Outcome("x-volution", path, "refused", str(err)))
            plan.outcomes = [o for o in plan.outcomes if not (o.kind == "conv+bn" and o.name == path)]
            continue
        plan.replacements.append(Replacement("x-volution", path, bn_path, choice.lowering, choice.reason))
        plan.built[path] = deploy
        if bn_path:
            plan.built[bn_path] = _bn_remainder(modules[bn_path])
        plan.outcomes.append(Outcome("x-volution", path, "fused", "", params,
                                     sum(p.numel() for p in deploy.parameters()),
                                     lowering=choice.lowering, lowering_reason=choice.reason))
    return plan


def _site_bn_matches(view: nx.DiGraph) -> list[tuple[fx.Node, fx.Node]]:
    """(site call, BatchNorm call) where a site's output feeds a BatchNorm."""
    return [(key, user) for key in view.nodes if node_info(view, key).kind == "site"
            for user in view.successors(key) if node_info(view, user).kind == "bn"]


def _site_lowering(site: XVolution, path: str, weights: tuple[torch.Tensor, torch.Tensor],
                   shape: tuple[int, ...] | None, backend: str, lowering: LoweringOption,
                   single_conv: bool) -> LoweringChoice:
    w, b = weights
    factor = 1 + (site.directions if site.directional else 1)
    return choose_lowering(merged_branch(site.geometry, factor, w, b), backend=backend,
                           lowering=site_option(lowering, path), single_conv=single_conv, input_shape=shape)


# ---------------------------------------------------------------- applying the plan


def _keep_layout(module: nn.Module, like: torch.Tensor) -> nn.Module:
    """``module``'s conv weights in the memory format of ``like`` (a site's or conv's weight: channels_last
    stays channels_last); returns ``module``."""
    layout = {4: torch.channels_last, 5: torch.channels_last_3d}.get(like.dim())
    if layout is None or like.is_contiguous() or not like.is_contiguous(memory_format=layout):
        return module
    with torch.no_grad():
        for conv in module.modules():
            if isinstance(conv, _CONV_MODULES) and conv.weight.dim() == like.dim():
                conv.weight.data = conv.weight.data.contiguous(memory_format=layout)
    return module


def _weight_of(module: nn.Module) -> torch.Tensor:
    """The ``weight`` of a conv or a site (a parameter of both)."""
    weight = module.weight
    if not isinstance(weight, torch.Tensor):
        raise InvalidArgumentTypeError(f"{type(module).__name__}.weight is a {type(weight).__name__}, not a tensor")
    return weight


def _conv_like(conv: nn.Module, branch: Branch) -> nn.Module:
    """A plain conv of ``branch``'s geometry and weights, in ``conv``'s place: its weight layout kept."""
    return _keep_layout(lowered_convs(branch, "channel")[0][0], _weight_of(conv))


def _folded_conv(conv: nn.Module, bn: nn.Module) -> nn.Module:
    """A plain conv computing ``bn(conv(x))``: same geometry, weight layout, device and dtype."""
    geometry = conv_geometry(conv)
    w, b = fold_conv_bn(*conv_module_weights(conv), bn_params(bn))
    return _conv_like(conv, Branch(("x",), (geometry.in_channels,), geometry, w, b))


def _bn_remainder(bn: nn.Module) -> nn.Module:
    if has_own_forward(bn):  # a norm-act layer (checked when planned): its dropout and activation stay
        return remainder_of(bn)
    return nn.Identity()


def _put(model: nn.Module, built: dict[str, nn.Module]) -> None:
    """Set each built module at its path and at every other path of the module it replaces (a site
    registered twice is one site: both paths get the same deploy module)."""
    aliases: dict[int, list[str]] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        aliases.setdefault(id(module), []).append(path)
    targets = [(new, aliases[id(model.get_submodule(path))]) for path, new in built.items()]
    for new, paths in targets:
        for path in paths:
            parent_path, _, name = path.rpartition(".")
            parent = model.get_submodule(parent_path) if parent_path else model
            setattr(parent, name, new.eval())


def built_modules(model: nn.Module, replacements: Sequence[Replacement], *, single_conv: bool = True
                  ) -> dict[str, nn.Module]:
    """The new module of every path a replacement touches, from ``model``'s current weights."""
    built: dict[str, nn.Module] = {}
    for r in replacements:
        module = model.get_submodule(r.path)
        bn = model.get_submodule(r.bn_path) if r.bn_path else None
        if r.rule == "x-volution":
            if not isinstance(module, XVolution):
                raise InvalidArgumentTypeError(
                    f"{r.path} holds a {type(module).__name__}, not an XVolution site: an x-volution replacement "
                    "applies to the model it was planned on")
            built[r.path] = _keep_layout(module.fuse(r.lowering or "channel", single_conv=single_conv,
                                                     bn=None if bn is None else bn_params(bn)), module.weight)
        elif bn is None:
            raise InvalidArgumentError(f"the conv+bn replacement of {r.path} names no BatchNorm (bn_path)")
        else:
            built[r.path] = _folded_conv(module, bn)
        if bn is not None:
            built[r.bn_path] = _bn_remainder(bn)
    return built


def apply_replacements(model: nn.Module, replacements: Sequence[Replacement], *, single_conv: bool = True
                       ) -> nn.Module:
    """Put every replacement of ``replacements`` in ``model`` (in place); returns ``model``."""
    _put(model, built_modules(model, replacements, single_conv=single_conv))
    return model


def fused_paths(model: nn.Module, replacements: Sequence[Replacement]) -> dict[str, str]:
    """Every path the replacements change, with what the unfused ``model`` held there: "conv",
    "x-volution", "batchnorm" or "norm-act" (a norm-act layer, which leaves its activation)."""
    paths: dict[str, str] = {}
    for r in replacements:
        paths[r.path] = "x-volution" if r.rule == "x-volution" else "conv"
        if r.bn_path:
            paths[r.bn_path] = "norm-act" if has_own_forward(model.get_submodule(r.bn_path)) else "batchnorm"
    return paths


def fuse_modules(
    model: nn.Module, example: tuple[Any, ...] | None = None, *, backend: str = "eager",
    lowering: LoweringOption = "auto", single_conv: bool = True, skip: Collection[str] = (),
) -> tuple[nn.Module, FusionReport, list[Replacement]]:
    """The pass: ``model`` (changed in place) with every safe replacement applied, its report and the plan."""
    plan = plan_replacements(model, example, backend=backend, lowering=lowering, single_conv=single_conv,
                             skip=skip)
    _put(model, plan.built)
    report = FusionReport(source="modules", outcomes=_unique(plan.outcomes), notes=plan.notes)
    report.paths["<model>"] = "module form (leaf-module replacements)"
    return model, report, plan.replacements


def _unique(outcomes: Sequence[Outcome]) -> list[Outcome]:
    """Each (kind, name, status, reason) once: a module called in several traced parts is one site."""
    seen: set[tuple[str, str, str, str]] = set()
    kept: list[Outcome] = []
    for o in outcomes:
        key = (o.kind, o.name, o.status, o.reason)
        if key not in seen:
            seen.add(key)
            kept.append(o)
    return kept
