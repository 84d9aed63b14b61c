"""Fusion on torch.fx graphs: every foldable conv/BN/PSSA structure becomes one convolution.

``fuse_graph`` is the pass proper, ``GraphModule -> (GraphModule, FusionReport)``.
``fuse`` wraps it for any ``nn.Module``: it traces the largest pieces that trace
(the whole model, else its children, recursively), falls back to module-level
folding for ``XVolution`` modules called from untraceable code, and hands back
a model of the user's own class.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from xvol_compiler.arguments import ArgumentError, check_bool, check_example_inputs, check_module, check_tolerance
from xvol_compiler.fold import FoldError
from xvol_compiler.fusion_report import FusionReport
from xvol_compiler.ops import XVolution
from xvol_compiler.passes.fx_graph import FxAdapter
from xvol_compiler.rules import Outcome, run_rules
from xvol_compiler.training_flags import training_sensitive_modules
from xvol_compiler.verify import OutputMismatchError, reference_run, verify_model

__all__ = ["FusionError", "FusionVerificationError", "fuse", "fuse_graph", "fuse_with_report"]

log = logging.getLogger(__name__)


class FusionError(ValueError):
    """The model cannot be fused as asked; the message says why and what to do."""


class FusionVerificationError(FusionError):
    """The fused model does not reproduce the unfused one within tolerance."""


def fuse_graph(
    gm: fx.GraphModule, example_inputs: tuple[Any, ...] | None = None
) -> tuple[fx.GraphModule, FusionReport]:
    """Rewrite ``gm`` in place: conv+BN folds, X-volution sites and branch sums become one conv each."""
    if not isinstance(gm, fx.GraphModule):
        raise ArgumentError(
            f"gm={type(gm).__name__}: fuse_graph takes a torch.fx.GraphModule (torch.fx.symbolic_trace(model)); "
            "fuse() takes any nn.Module"
        )
    if example_inputs is not None:
        ShapeProp(gm).propagate(*example_inputs)
    adapter = FxAdapter(gm)
    rewrite_log = run_rules(adapter)
    adapter.finalize()
    return gm, FusionReport.from_log(rewrite_log, source="fx")


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
    def __init__(self) -> None:
        self.report = FusionReport(source="fx")

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
        part = FusionReport.from_log(run_rules(adapter), source="fx")
        adapter.finalize()
        prefix = f"{path}." if path else ""
        for o in part.outcomes:
            self.report.outcomes.append(Outcome(o.kind, prefix + o.name, o.status, o.reason, o.params_before,
                                                o.params_after, o.macs_before, o.macs_after))
        self.report.paths[path or "<model>"] = "fx graph"
        return _realize(module, gm, adapter.replaced_targets)

    def _fuse_site(self, site: XVolution, path: str) -> nn.Module:
        try:
            deploy = site.fuse()
        except FoldError as err:
            self.report.outcomes.append(Outcome("x-volution", path, "refused", str(err)))
            return site
        before = sum(p.numel() for p in site.parameters()) + sum(
            b.numel() for n, b in site.named_buffers() if "running" in n
        )
        self.report.outcomes.append(Outcome("x-volution", path, "fused", "", before,
                                            sum(p.numel() for p in deploy.parameters())))
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
) -> tuple[nn.Module, FusionReport]:
    """``fuse`` that also returns the report."""
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
    fuser = _Fuser()
    if isinstance(target, fx.GraphModule):
        target, part = fuse_graph(target, example)
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
    """
    fused, _ = fuse_with_report(model, example_inputs=example_inputs, verify=verify, atol=atol, rtol=rtol,
                                inplace=inplace)
    return fused
