"""Fusion on torch.fx graphs: every foldable conv/BN/PSSA structure becomes one convolution.

``fuse_graph`` is the pass proper, ``GraphModule -> (GraphModule, FusionReport)``.
``fuse`` wraps it for any ``nn.Module``: it traces the largest pieces that trace
(the whole model, else its children, recursively), falls back to module-level
folding for ``XVolution`` modules called from untraceable code, and hands back
a model of the user's own class.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from xvol_compiler.arguments import ArgumentError, check_bool, check_example_inputs, check_module, check_tolerance
from xvol_compiler.fold import Branch, FoldError
from xvol_compiler.fusion_report import FusionReport
from xvol_compiler.lowering import LoweringChoice
from xvol_compiler.ops import XVolution, _merged_branch
from xvol_compiler.passes.fx_graph import FxAdapter
from xvol_compiler.passes.lower import LoweringOption, choose_lowering, lower_sites, site_option, validate_options
from xvol_compiler.rules import Outcome, run_rules
from xvol_compiler.training_flags import training_sensitive_modules
from xvol_compiler.verify import OutputMismatchError, reference_run, verify_model

__all__ = ["FusedSubmoduleError", "FusionError", "FusionVerificationError", "fuse", "fuse_graph", "fuse_with_report"]

log = logging.getLogger(__name__)


class FusionError(ValueError):
    """The model cannot be fused as asked; the message says why and what to do."""


class FusionVerificationError(FusionError):
    """The fused model does not reproduce the unfused one within tolerance."""


class FusedSubmoduleError(FusionError):
    """A submodule of a fused model cannot run on its own: a rewrite merged it with modules outside it."""


def fuse_graph(
    gm: fx.GraphModule, example_inputs: tuple[Any, ...] | None = None, *, backend: str = "eager",
    lowering: LoweringOption = "auto", single_conv: bool = True,
) -> tuple[fx.GraphModule, FusionReport]:
    """Rewrite ``gm`` in place: conv+BN folds, X-volution sites and branch sums become one conv each
    (each site in the lowering chosen for ``backend``, see ``xvol_compiler.passes.lower``)."""
    if not isinstance(gm, fx.GraphModule):
        raise ArgumentError(
            f"gm={type(gm).__name__}: fuse_graph takes a torch.fx.GraphModule (torch.fx.symbolic_trace(model)); "
            "fuse() takes any nn.Module"
        )
    validate_options(backend, lowering, single_conv)
    if example_inputs is not None:
        ShapeProp(gm).propagate(*example_inputs)
    adapter = FxAdapter(gm)
    rewrite_log = run_rules(adapter)
    choices = lower_fx_sites(adapter, backend=backend, lowering=lowering, single_conv=single_conv)
    adapter.finalize()
    report = FusionReport.from_log(rewrite_log, source="fx")
    report.set_lowerings(choices)
    return gm, report


def _input_shape(branch: Branch) -> tuple[int, ...] | None:
    meta = getattr(branch.inputs[0], "meta", {}).get("tensor_meta")
    shape = getattr(meta, "shape", None)
    return None if shape is None else tuple(int(d) for d in shape)


def lower_fx_sites(adapter: FxAdapter, *, backend: str, lowering: LoweringOption, single_conv: bool,
                   prefix: str = "") -> dict[str, LoweringChoice]:
    """Each fused site of ``adapter``'s graph in its chosen lowering (name -> choice)."""
    return lower_sites(adapter, name_of=lambda node: adapter.origin.get(node) or adapter._name(node),
                       shape_of=_input_shape, backend=backend, lowering=lowering, single_conv=single_conv,
                       prefix=prefix)


def _has_foldable(module: nn.Module) -> bool:
    """Whether tracing can find anything: a BatchNorm, an X-volution site or convs (branch sums)."""
    kinds = (nn.modules.batchnorm._BatchNorm, XVolution, nn.Conv1d, nn.Conv2d, nn.Conv3d)
    return any(isinstance(m, kinds) for m in module.modules())


def _set_path(root: nn.Module, path: str, value: nn.Module | torch.Tensor | None) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    if value is None:
        delattr(parent, name)
    elif isinstance(value, nn.Module):
        parent.add_module(name, value)
    else:
        setattr(parent, name, value)


def _fused_class(cls: type, forward: Callable[..., Any], aliases: tuple[str, ...] = ()) -> type:
    """A subclass of the user's class (same name) whose ``forward``, and the methods in ``aliases``, is ``forward``."""
    if getattr(cls, "_xvol_fused_graph", False):  # fusing a fused model: derive from the user's class again
        aliases = tuple(sorted(set(aliases) | set(getattr(cls, "_xvol_aliases", ()))))
        cls = cls.__bases__[0]
    namespace: dict[str, Any] = {"forward": forward, "__module__": cls.__module__, "__qualname__": cls.__qualname__,
                                 "_xvol_fused_graph": True, "_xvol_aliases": tuple(aliases)}
    namespace.update({name: forward for name in aliases})
    return type(cls.__name__, (cls,), namespace)


def _realize(original: nn.Module, gm: fx.GraphModule, replaced: set[str]) -> nn.Module:
    """``original`` running the rewritten graph while keeping its class and module tree.

    The object keeps its type (a generated subclass of the same name whose
    ``forward`` is the graph's code), its methods and attributes, and its
    module hierarchy (``model.layer3[0]`` still indexes); the modules the
    rewrite created are set at their paths, and those it folded away are removed.
    ``_rebuild_forwards`` then gives the submodules forwards that work again.
    """
    used = {str(n.target) for n in gm.graph.nodes if n.op in ("call_module", "get_attr")}
    for path in sorted(replaced, key=lambda p: -p.count(".")):
        if path not in used and not any(u.startswith(path + ".") for u in used):
            try:
                _set_path(original, path, None)
            except AttributeError:
                pass  # already removed with its parent
    # Containers the rewrite emptied (an XVolution whose every branch was fused elsewhere, a
    # Sequential(conv, bn) branch): nothing calls them and they hold nothing.
    shells = {p.rsplit(".", i)[0] for p in replaced for i in range(1, p.count(".") + 1)}
    for path in sorted(shells, key=lambda p: -p.count(".")):
        if path in used or any(u.startswith(path + ".") for u in used):
            continue
        try:
            module = original.get_submodule(path)
        except AttributeError:
            continue
        if not any(True for _ in module.parameters()) and not any(True for _ in module.buffers()):
            _set_path(original, path, None)
    for path in sorted(used, key=lambda p: p.count(".")):
        value = gm.get_submodule(path) if path in dict(gm.named_modules()) else None
        if value is None:
            parent_path, _, name = path.rpartition(".")
            value = getattr(gm.get_submodule(parent_path) if parent_path else gm, name)
        _set_path(original, path, value)
    original.__class__ = _fused_class(type(original), type(gm).forward)
    return original


# ---------------------------------------------------------------- submodules of a fused model
#
# The whole model is fused as one flat graph (rewrites may cross module boundaries: a site in
# ``layer3.0.conv2`` absorbs the ``layer3.0.bn2`` of its parent). Afterwards every container of
# the user's tree gets a forward of its own, so that ``fused.layer1(x)``, forward hooks and feature
# extractors work: its subtree is traced again from an unfused copy, with the containers below it
# that already work kept as calls, and fused alone. That graph is used only if every module it
# needs is in the fused tree as it is (the same object, or the same fused conv): then the container
# computes what it computed before. Otherwise (a rewrite crossed its boundary) its forward raises
# ``FusedSubmoduleError`` naming it and the reason.


class _LeafTracer(fx.Tracer):
    """``fx.Tracer`` that also keeps the submodules at ``leaves`` (qualified names) as calls."""

    def __init__(self, leaves: frozenset[str]) -> None:
        super().__init__()
        self.leaves = leaves

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name in self.leaves or super().is_leaf_module(m, module_qualified_name)


def _user_methods(module: nn.Module) -> list[str]:
    """Plain methods defined by the model's own classes (not torch's), other than ``forward``."""
    names: list[str] = []
    for klass in type(module).__mro__:
        if klass is object or klass.__module__.split(".")[0] == "torch":
            continue
        for name, value in vars(klass).items():
            if inspect.isfunction(value) and name != "forward" and not name.startswith("__") and name not in names:
                names.append(name)
    return names


def _trace(module: nn.Module, leaves: frozenset[str] = frozenset()) -> tuple[fx.GraphModule, tuple[str, ...]]:
    """Trace ``module`` keeping ``leaves`` as calls; also the names of its methods equivalent to forward.

    A method is equivalent to forward when forward calls it with forward's own
    arguments and returns its result (ResNet's ``_forward_impl``): the fused
    class gives it the fused forward, since its Python code calls modules fusion removed.
    """
    calls: list[tuple[str, tuple[Any, ...], dict[str, Any], Any]] = []
    names = _user_methods(module)
    def recorder(name: str, bound: Callable[..., Any]) -> Callable[..., Any]:
        def record(*args: Any, **kwargs: Any) -> Any:
            out = bound(*args, **kwargs)
            calls.append((name, args, kwargs, out))
            return out

        return record

    for name in names:
        module.__dict__[name] = recorder(name, getattr(module, name))  # shadows the method while tracing
    try:
        tracer = _LeafTracer(leaves)
        graph = tracer.trace(module)
    finally:
        for name in names:
            module.__dict__.pop(name, None)
    gm = fx.GraphModule(tracer.root, graph, type(module).__name__)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    result = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    equivalent = []
    for name, args, kwargs, out in calls:
        same_args = len(args) == len(placeholders) and all(
            isinstance(a, fx.Proxy) and a.node is p for a, p in zip(args, placeholders, strict=True))
        if not kwargs and same_args and isinstance(out, fx.Proxy) and out.node is result and name not in equivalent:
            equivalent.append(name)
    return gm, tuple(equivalent)


def _lookup(root: nn.Module, path: str) -> Any:
    obj: Any = root
    for part in path.split(".") if path else ():
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _identities(module: nn.Module) -> dict[str, int]:
    """``id`` of every module, parameter and buffer of ``module`` by qualified name."""
    ids = {p: id(m) for p, m in module.named_modules(remove_duplicate=False)}
    ids.update((p, id(t)) for p, t in module.named_parameters(remove_duplicate=False))
    ids.update((p, id(t)) for p, t in module.named_buffers(remove_duplicate=False))
    return ids


def _same_fused_conv(a: nn.Module, b: nn.Module) -> bool:
    """Two fused convs of the same geometry whose weights agree to float rounding (fold order may differ)."""
    if type(a) is not type(b) or a.extra_repr() != b.extra_repr():
        return False
    sa, sb = a.state_dict(), b.state_dict()
    if sa.keys() != sb.keys():
        return False
    for key, ta in sa.items():
        tb = sb[key]
        if ta.shape != tb.shape or ta.dtype != tb.dtype:
            return False
        if tb.numel() and not torch.equal(ta, tb):
            scale = float(tb.abs().max()) if tb.is_floating_point() else 0.0
            if not tb.is_floating_point() or float((ta - tb).abs().max()) > 1e-5 * max(scale, 1e-30):
                return False
    return True


def _bind(gm: fx.GraphModule, adapter: FxAdapter, path: str, root: nn.Module, before: dict[str, int],
          flat_products: set[int]) -> tuple[str | None, list[tuple[str, Any]]]:
    """Why ``gm`` (the container at ``path`` fused alone) cannot run on the fused ``root`` (None: it can).

    Also the constants the tracer created, which the container must hold.
    """
    prefix = f"{path}." if path else ""
    products = {str(n.target) for n in adapter.origin}
    constants: list[tuple[str, Any]] = []
    for node in gm.graph.nodes:
        if node.op not in ("call_module", "get_attr"):
            continue
        target = str(node.target)
        full = prefix + target
        final = _lookup(root, full)
        if target in products:
            mine = _lookup(gm, target)
            if final is None or id(final) not in flat_products or not _same_fused_conv(final, mine):
                return (f"fusing it alone does not give {full} the form the whole model's fusion gave it "
                        "(a rewrite crosses its boundary)"), []
        elif full in before:
            if final is None or id(final) != before[full]:
                return f"{full}, which it uses, was fused with modules outside it", []
        else:
            constants.append((target, _lookup(gm, target)))
    return None, constants


def _own_level_intact(original: nn.Module, final: nn.Module, prefix: str, before: dict[str, int],
                      working: set[str]) -> bool:
    """Whether ``final`` holds the same direct children, parameters and buffers as before fusion, its
    child containers all working: then its own Python code (forward and every method) still computes
    what it computed."""
    for name, child in original.named_children():
        now = final._modules.get(name)
        if now is None or id(now) != before.get(prefix + name):
            return False
        if any(True for _ in child.children()) and prefix + name not in working:
            return False
    for name in list(original._parameters) + list(original._buffers):
        now = final._parameters.get(name, final._buffers.get(name))
        then = before.get(prefix + name)
        if (now is None) != (then is None) or (now is not None and id(now) != then):
            return False
    return True


def _check_interleaved_input(path: str, sources: int, module: nn.Module, args: tuple[Any, ...]) -> None:
    """Forward pre-hook of a fused conv that reads interleaved inputs: a direct call with the site's input fails
    clearly (the graph always passes the interleaved tensor)."""
    x = args[0] if args else None
    expected = getattr(module, "in_channels", None)
    if isinstance(x, torch.Tensor) and x.dim() >= 2 and expected is not None and x.shape[1] != expected:
        raise FusedSubmoduleError(
            f"{path} is a fused convolution over the interleaved channels of {sources} inputs (an X-volution "
            f"site: x and T(x)), {expected} channels in all, and got {x.shape[1]}: it cannot run on the site's "
            "input alone; call the module that contains it"
        )


def _unavailable_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    raise FusedSubmoduleError(self.__dict__.get("_xvol_unavailable", "this submodule was fused with its parent"))


def _rebuild_forwards(root: nn.Module, pristine: nn.Module, before: dict[str, int], flat_gm: fx.GraphModule,
                      flat_products: set[int], root_aliases: tuple[str, ...], lowerings: dict[str, str]) -> None:
    """Give every container of the fused ``root`` a forward that computes what it computed before.

    ``pristine`` is an unfused copy of ``root``; ``before`` the identities of
    ``root``'s objects before fusion; ``flat_products`` the ids of the convs
    the flat fusion created; ``root_aliases`` the model's methods equivalent
    to forward; ``lowerings`` the lowering the flat fusion gave each site (by path
    under ``root``), which every container's own fusion repeats, so that its
    convs are the flat fusion's. Containers are done innermost first: one whose
    direct children are intact keeps its own code; the others get a fused
    graph of their own that keeps the working containers below them as calls
    (so forward hooks on those fire and feature extractors see them).
    """
    final = dict(root.named_modules())
    originals = dict(pristine.named_modules())
    containers = [
        p for p, m in final.items()
        if p in originals and id(m) == before.get(p) and any(True for _ in originals[p].children())
    ]
    containers.sort(key=lambda p: (p == "", -p.count(".")))
    working: set[str] = set()
    for path in containers:
        prefix = f"{path}." if path else ""
        if path and _own_level_intact(originals[path], final[path], prefix, before, working):
            working.add(path)  # it calls what it called before (children that work): its own code still works
            continue
        leaves = frozenset(q[len(prefix):] for q in working if q.startswith(prefix))
        if not path and not leaves:  # no container below works as a call: the flat graph is the model's own
            root.__class__ = _fused_class(type(root), type(flat_gm).forward, root_aliases)
            continue
        attempts = [leaves] if not path else ([leaves, frozenset()] if leaves else [leaves])
        reason, aliases = "", ()
        for attempt in attempts:
            try:
                gm, aliases = _trace(originals[path], attempt)
                adapter = FxAdapter(gm)
                run_rules(adapter)
                lower_fx_sites(adapter, backend="eager", lowering=lowerings, single_conv=False, prefix=prefix)
                adapter.finalize()
            except Exception as err:  # any failure means: this container cannot be rebuilt
                reason = f"it does not trace on its own ({type(err).__name__}: {err})"
                continue
            why, constants = _bind(gm, adapter, path, root, before, flat_products)
            if why is None:
                for target, value in constants:
                    _set_path(final[path], target, value)
                final[path].__class__ = _fused_class(type(final[path]), type(gm).forward, aliases)
                working.add(path)
                break
            reason = why
        else:
            if not path:  # the model itself: keep the flat graph, which is always right
                root.__class__ = _fused_class(type(root), type(flat_gm).forward, root_aliases)
                continue
            module = final[path]
            module.__dict__["_xvol_unavailable"] = (
                f"{path} ({type(module).__name__}) cannot run on its own in the fused model: {reason}; "
                "call the model or a module that contains it"
            )
            module.__class__ = _fused_class(type(module), _unavailable_forward, aliases)


class _Fuser:
    def __init__(self, backend: str = "eager", lowering: LoweringOption = "auto", single_conv: bool = True) -> None:
        self.report = FusionReport(source="fx")
        self.backend, self.lowering, self.single_conv = backend, lowering, single_conv

    def fuse_module(self, module: nn.Module, path: str, example: tuple[Any, ...] | None) -> nn.Module:
        if not _has_foldable(module):
            return module
        if isinstance(module, XVolution):
            return self._fuse_site(module, path)
        try:
            gm, aliases = _trace(module)
        except Exception as err:  # any tracing failure means: try the children
            self.report.paths[path or "<model>"] = f"not traceable ({type(err).__name__}); children fused separately"
            for name, child in list(module.named_children()):
                fused = self.fuse_module(child, f"{path}.{name}" if path else name, None)
                if fused is not child:
                    setattr(module, name, fused)
            return module
        before = _identities(module)
        if example is not None:
            try:
                ShapeProp(gm).propagate(*example)
            except Exception as err:  # only MAC counts depend on shapes
                log.info("shape propagation failed (%s): fusing without MAC counts", err)
        adapter = FxAdapter(gm)
        rewrite_log = run_rules(adapter)
        part = FusionReport.from_log(rewrite_log, source="fx")
        prefix = f"{path}." if path else ""
        choices = lower_fx_sites(adapter, backend=self.backend, lowering=self.lowering,
                                 single_conv=self.single_conv, prefix=prefix)
        part.set_lowerings(choices)
        adapter.finalize()
        for o in part.outcomes:
            self.report.outcomes.append(dataclasses.replace(o, name=prefix + o.name))
        self.report.paths[path or "<model>"] = "fx graph"
        products = {str(n.target) for n in adapter.origin}
        flat_products = {id(gm.get_submodule(p)) for p in products}
        gone = set(adapter.replaced_targets) | products
        changed = {p.rsplit(".", i)[0] for p in gone for i in range(1, p.count(".") + 1)}
        changed = {c for c in changed if not any(c == g or c.startswith(g + ".") for g in gone)}
        # The module is still unfused here (the rewrites built new modules): copy it for the containers to
        # be traced again, if any container below the model changed.
        pristine = copy.deepcopy(module) if changed else None
        fused = _realize(module, gm, adapter.replaced_targets)
        for node, (sources, _) in adapter.created.items():
            fused.get_submodule(str(node.target)).register_forward_pre_hook(
                functools.partial(_check_interleaved_input, prefix + str(node.target), len(sources)))
        if pristine is None:
            fused.__class__ = _fused_class(type(fused), type(gm).forward, aliases)
        else:
            with torch.random.fork_rng(devices=[]):  # the convs built while fusing containers again draw random init
                _rebuild_forwards(fused, pristine, before, gm, flat_products, aliases,
                                  {name: c.lowering for name, c in choices.items()})
        return fused

    def _fuse_site(self, site: XVolution, path: str) -> nn.Module:
        try:
            w, b = site.deploy_weights()
            factor = 1 + (site.directions if site.directional else 1)
            choice = choose_lowering(_merged_branch(site.geometry, factor, w, b), backend=self.backend,
                                     lowering=site_option(self.lowering, path), single_conv=self.single_conv)
            deploy = site.fuse(choice.lowering, single_conv=self.single_conv)
        except FoldError as err:
            self.report.outcomes.append(Outcome("x-volution", path, "refused", str(err)))
            return site
        before = sum(p.numel() for p in site.parameters()) + sum(
            b.numel() for n, b in site.named_buffers() if "running" in n
        )
        self.report.outcomes.append(Outcome("x-volution", path, "fused", "", before,
                                            sum(p.numel() for p in deploy.parameters()),
                                            lowering=choice.lowering, lowering_reason=choice.reason))
        self.report.paths[path] = "module (XVolution.fuse)"
        return deploy


def default_example_inputs(model: nn.Module) -> tuple[Any, ...]:
    """The example input xvolify uses for this kind of model."""
    from xvol_compiler.sites import default_example_inputs as sites_default

    return _as_tuple(sites_default(model))


def _as_tuple(example_inputs: Any) -> tuple[Any, ...]:
    """Positional arguments: a tuple as is; a Tensor, or a list of images (detection), is one argument."""
    return example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)


def fuse_with_report(
    model: nn.Module,
    *,
    example_inputs: Any = None,
    verify: bool = True,
    atol: float | None = None,
    rtol: float | None = None,
    inplace: bool = False,
    backend: str = "eager",
    lowering: LoweringOption = "auto",
    single_conv: bool = True,
) -> tuple[nn.Module, FusionReport]:
    """``fuse`` that also returns the report."""
    validate_options(backend, lowering, single_conv)
    check_module("model", model)
    check_example_inputs(example_inputs)
    check_bool("verify", verify)
    check_bool("inplace", inplace)
    check_tolerance("rtol", rtol, optional=True)
    check_tolerance("atol", atol, optional=True)
    # Only modules whose flag changes their result matter: torch.fx.symbolic_trace creates plain
    # containers in training mode, which compute the same either way.
    training = training_sensitive_modules(model)
    if training:
        names = ", ".join(f"{name} ({type(m).__name__})" for name, m in training[:4])
        more = f" and {len(training) - 4} more" if len(training) > 4 else ""
        what = "the model is" if model.training else f"{len(training)} submodule(s) are"
        raise FusionError(
            f"{what} in training mode where the mode changes the result: {names}{more}. BatchNorm then "
            "normalises with batch statistics and dropout is random, which no convolution can reproduce. "
            "Call model.eval() before fuse()."
        )
    example = _as_tuple(example_inputs) if example_inputs is not None else default_example_inputs(model)
    reference = None
    if verify:
        reference = reference_run(model, example)
        if not reference.checkable():
            raise FusionError(
                "the unfused model's output has no finite value on the example input (BatchNorm statistics "
                "overflow?), so fusion cannot be verified: fix the model, pass other example_inputs, or verify=False"
            )
    target = model if inplace else copy.deepcopy(model)
    fuser = _Fuser(backend, lowering, single_conv)
    if isinstance(target, fx.GraphModule):
        target, part = fuse_graph(target, example, backend=backend, lowering=lowering, single_conv=single_conv)
        fuser.report.extend(part)
        fuser.report.paths["<model>"] = "fx graph"
    else:
        target = fuser.fuse_module(target, "", example)
    target.eval()
    report = fuser.report
    if not report.outcomes:
        report.notes.append("no fusable patterns found (no BatchNorm after a conv, no X-volution site)")
    if reference is not None:
        report.notes.extend(reference.notes)
        try:
            verdict = verify_model(reference, target, example, rtol=rtol, atol=atol)
        except OutputMismatchError:
            verdict = None
        if verdict is None or verdict.candidate.compared == 0:
            report.notes.append(
                "outputs are empty or have data-dependent shapes (e.g. detections): verification compared nothing"
            )
        else:
            report.max_abs_error, report.max_rel_error = verdict.candidate.max_abs, verdict.candidate.max_rel
            if verdict.unfused is not None or reference.stages:
                report.notes.append(f"verified: {verdict.describe()}")
            if not verdict.ok:
                raise FusionVerificationError(
                    f"fused model differs from the unfused one: {verdict.describe()}; the unfused model is "
                    f"untouched{'' if not inplace else ' (inplace: it is not)'}"
                )
    target.xvol_fusion_report = report
    log.info("%s", report.summary())
    return target, report


def fuse(
    model: nn.Module,
    *,
    example_inputs: Any = None,
    verify: bool = True,
    atol: float | None = None,
    rtol: float | None = None,
    inplace: bool = False,
    backend: str = "eager",
    lowering: LoweringOption = "auto",
    single_conv: bool = True,
) -> nn.Module:
    """Deploy form of ``model``: every fusable site one convolution; report at ``.xvol_fusion_report``.

    The model must be in eval mode. The result keeps the model's class and call
    signature (a GraphModule in gives a GraphModule out). Fusing a fused model
    changes nothing.

    With ``verify`` the fused model is checked on ``example_inputs`` by the rule
    of :mod:`xvol_compiler.verify`, and ``FusionVerificationError`` (naming the
    errors, the bound and the dtype) is raised when it fails:

    - error: the largest absolute difference, relative to the largest
      ``|reference|`` of its tensor; non-finite values must match the
      reference's, only finite ones are compared;
    - accepted when the relative error is at most ``rtol`` (None: by dtype,
      ``1e-4`` for float32 and float64, ``1e-2`` for float16, ``5e-2`` for
      bfloat16), or the absolute error at most ``atol`` when given;
    - float32 / float64 models: the reference is the unfused model itself;
      float16 / bfloat16 models: a float64 run of (a copy of) the unfused model,
      and the fused model is also accepted when its error is at most 4 times
      the unfused model's own error against that run;
    - detection models (a ``transform``, a ``backbone`` and a ``head`` or an
      ``rpn``, as torchvision's) are compared on the outputs of ``backbone`` and
      ``head`` / ``rpn.head``, before post-processing, whose thresholds and
      non-maximum suppression turn rounding into different box sets.

    The model itself is not changed by the check (it runs in eval mode, without grad).

    Each X-volution site is deployed in a lowering (``xvol_compiler.lowering``) for ``backend``
    ("eager", "compile", "onnxruntime"). ``lowering="auto"``: a deterministic rule, no timing
    (``xvol_compiler.lowering_table``: a depthwise site takes "split" with ``single_conv=False``,
    else "spatial"; dense and grouped sites "channel"), so the same model and options always give
    the same structure. ``lowering="measure"`` (opt-in) times the exact candidates on the site's
    shapes and keeps the times in a persistent cache file (``xvol_compiler.passes.lower``; the
    report's reason names it). ``lowering="channel"|"spatial"|"split"`` forces one (a site
    where it is not exact keeps "channel", with the reason in the report). ``single_conv=False``
    allows "split" (two convolutions and an add per site). ``lowering`` may also map site names to
    lowerings (``report.lowerings()`` of an earlier fusion; sites not named keep "channel"): how a
    saved fused model is rebuilt to load its state dict.
    """
    fused, _ = fuse_with_report(model, example_inputs=example_inputs, verify=verify, atol=atol, rtol=rtol,
                                inplace=inplace, backend=backend, lowering=lowering, single_conv=single_conv)
    return fused
