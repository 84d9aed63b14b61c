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
import logging
from typing import Any

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from xvol_compiler.fold import Branch, FoldError
from xvol_compiler.fusion_report import FusionReport
from xvol_compiler.lowering import LoweringChoice
from xvol_compiler.measure import tensors_of
from xvol_compiler.ops import XVolution, _merged_branch
from xvol_compiler.passes.fx_graph import FxAdapter
from xvol_compiler.passes.lower import LoweringOption, choose_lowering, lower_sites, site_option, validate_options
from xvol_compiler.rules import Outcome, run_rules

__all__ = ["FusionError", "FusionVerificationError", "fuse", "fuse_graph", "fuse_with_report"]

log = logging.getLogger(__name__)


class FusionError(ValueError):
    """The model cannot be fused as asked; the message says why and what to do."""


class FusionVerificationError(FusionError):
    """The fused model does not reproduce the unfused one within tolerance."""


def fuse_graph(
    gm: fx.GraphModule, example_inputs: tuple[Any, ...] | None = None, *, backend: str = "eager",
    lowering: LoweringOption = "auto", single_conv: bool = True,
) -> tuple[fx.GraphModule, FusionReport]:
    """Rewrite ``gm`` in place: conv+BN folds, X-volution sites and branch sums become one conv each
    (each site in the lowering chosen for ``backend``, see ``xvol_compiler.passes.lower``)."""
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


def _realize(original: nn.Module, gm: fx.GraphModule, replaced: set[str]) -> nn.Module:
    """``original`` running the rewritten graph while keeping its class and module tree.

    The object keeps its type (a generated subclass of the same name whose
    ``forward`` is the graph's code), its methods and attributes, and its
    module hierarchy (``model.layer3[0]`` still indexes); the modules the
    rewrite created are set at their paths, and those it folded away are removed.
    """
    cls = type(original)
    if getattr(cls, "_xvol_fused_graph", False):  # fusing a fused model: derive from the user's class again
        cls = cls.__bases__[0]
    fused_cls = type(cls.__name__, (cls,), {"forward": type(gm).forward, "__module__": cls.__module__,
                                            "__qualname__": cls.__qualname__, "_xvol_fused_graph": True})
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
    original.__class__ = fused_cls
    return original


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
            gm = fx.symbolic_trace(module)
        except Exception as err:  # any tracing failure means: try the children
            self.report.paths[path or "<model>"] = f"not traceable ({type(err).__name__}); children fused separately"
            for name, child in list(module.named_children()):
                fused = self.fuse_module(child, f"{path}.{name}" if path else name, None)
                if fused is not child:
                    setattr(module, name, fused)
            return module
        if example is not None:
            try:
                ShapeProp(gm).propagate(*example)
            except Exception as err:  # only MAC counts depend on shapes
                log.info("shape propagation failed (%s): fusing without MAC counts", err)
        adapter = FxAdapter(gm)
        rewrite_log = run_rules(adapter)
        part = FusionReport.from_log(rewrite_log, source="fx")
        prefix = f"{path}." if path else ""
        part.set_lowerings(lower_fx_sites(adapter, backend=self.backend, lowering=self.lowering,
                                          single_conv=self.single_conv, prefix=prefix))
        adapter.finalize()
        for o in part.outcomes:
            self.report.outcomes.append(dataclasses.replace(o, name=prefix + o.name))
        self.report.paths[path or "<model>"] = "fx graph"
        return _realize(module, gm, adapter.replaced_targets)

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


def _compare(ref: Any, out: Any) -> tuple[float, float, bool]:
    """(max abs error, max relative error, comparable) over every tensor of two outputs."""
    refs, outs = list(tensors_of(ref)), list(tensors_of(out))
    if len(refs) != len(outs) or any(r.shape != o.shape for r, o in zip(refs, outs, strict=True)):
        return float("nan"), float("nan"), False
    abs_err, rel_err, compared = 0.0, 0.0, 0
    for r, o in zip(refs, outs, strict=True):
        if not r.is_floating_point() or r.numel() == 0:
            continue
        compared += r.numel()
        if not (bool(r.isfinite().all()) and bool(o.isfinite().all())):
            return float("nan"), float("nan"), True
        diff = float((r.double() - o.double()).abs().max())
        scale = float(r.double().abs().max())
        abs_err = max(abs_err, diff)
        rel_err = max(rel_err, diff / max(scale, 1e-12))
    return abs_err, rel_err, compared > 0


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
    rtol: float = 1e-4,
    inplace: bool = False,
    backend: str = "eager",
    lowering: LoweringOption = "auto",
    single_conv: bool = True,
) -> tuple[nn.Module, FusionReport]:
    """``fuse`` that also returns the report."""
    validate_options(backend, lowering, single_conv)
    if model.training:
        raise FusionError(
            "the model is in training mode: BatchNorm then normalises with batch statistics, which no "
            "convolution can reproduce. Call model.eval() before fuse()."
        )
    training = [name for name, m in model.named_modules() if m.training]
    if training:
        raise FusionError(
            f"submodules are in training mode ({', '.join(training[:3])}{' ...' if len(training) > 3 else ''}); "
            "call model.eval() before fuse()"
        )
    example = _as_tuple(example_inputs) if example_inputs is not None else default_example_inputs(model)
    reference = None
    if verify:
        with torch.no_grad():
            reference = model(*example)
        if not all(bool(t.isfinite().all()) for t in tensors_of(reference) if t.is_floating_point()):
            raise FusionError(
                "the unfused model's output is not finite on the example input (BatchNorm statistics overflow?), "
                "so fusion cannot be verified: fix the model, pass other example_inputs, or verify=False"
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
    if verify:
        with torch.no_grad():
            out = target(*example)
        abs_err, rel_err, comparable = _compare(reference, out)
        if not comparable:
            report.notes.append(
                "outputs are empty or have data-dependent shapes (e.g. detections): verification compared nothing"
            )
        else:
            report.max_abs_error, report.max_rel_error = abs_err, rel_err
            too_far = rel_err > rtol if atol is None else abs_err > atol and rel_err > rtol
            if too_far or rel_err != rel_err:  # NaN: the fused output is not finite
                raise FusionVerificationError(
                    f"fused model differs from the unfused one: max abs error {abs_err:.3g}, relative {rel_err:.3g} "
                    f"(rtol={rtol}); the unfused model is untouched{'' if not inplace else ' (inplace: it is not)'}"
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
    rtol: float = 1e-4,
    inplace: bool = False,
    backend: str = "eager",
    lowering: LoweringOption = "auto",
    single_conv: bool = True,
) -> nn.Module:
    """Deploy form of ``model``: every fusable site one convolution; report at ``.xvol_fusion_report``.

    The model must be in eval mode. The result keeps the model's class and call
    signature (a GraphModule in gives a GraphModule out). With ``verify`` the
    fused and unfused outputs on ``example_inputs`` are compared and a
    ``FusionVerificationError`` is raised beyond ``rtol`` (relative to the
    largest output magnitude). Fusing a fused model changes nothing.

    Each X-volution site is deployed in the lowering (``xvol_compiler.lowering``) that is fastest
    for ``backend`` ("eager", "compile", "onnxruntime"), measured on the site's shapes
    (``lowering="auto"``), or the one forced by ``lowering="channel"|"spatial"|"split"`` (a site
    where it is not exact keeps "channel", with the reason in the report). ``single_conv=False``
    allows "split" (two convolutions and an add per site). ``lowering`` may also map site names to
    lowerings (``report.lowerings()`` of an earlier fusion; sites not named keep "channel"): how a
    saved fused model is rebuilt to load its state dict.
    """
    fused, _ = fuse_with_report(model, example_inputs=example_inputs, verify=verify, atol=atol, rtol=rtol,
                                inplace=inplace, backend=backend, lowering=lowering, single_conv=single_conv)
    return fused
