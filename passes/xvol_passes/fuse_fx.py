"""Fusion entry points: ``fuse`` / ``fuse_with_report`` in two forms, and the FX graph pass ``fuse_graph``.

- **module form** (default): ``passes/xvol_passes/fuse_modules.py``. The model keeps its own code;
  every fusion is a leaf-module replacement found by tracing (an X-volution site becomes
  its deploy module, a folded conv takes a conv's place and ``nn.Identity`` its BatchNorm's).
- **graph form** (``graph=True``): the model is traced once with torch.fx into one flat
  ``GraphModule`` and ``fuse_graph`` applies every rule to it, including those that need
  graph surgery (branch sums, identity branches, a conv + BN branch, functional convs).

``fuse_graph`` is the FX pass proper, ``GraphModule -> (GraphModule, FusionReport)``.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Collection
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from xvol_compiler.arguments import ArgumentError, check_example_inputs, check_module
from xvol_compiler.attention_probe import GAMMA_RANGE, has_silent_attention, with_exercised_attention
from xvol_compiler.errors import VerificationError, XvolError
from xvol_compiler.fusion_report import FusionReport
from xvol_compiler.options import FuseKeywords, FuseOptions, merge
from xvol_compiler.rules import RuleSet, run_rules
from xvol_compiler.training_flags import training_sensitive_modules
from xvol_compiler.verify import OutputMismatchError, reference_run, verify_model
from xvol_passes.fuse_exported import dynamic_shapes_of, normalize_aten
from xvol_passes.fuse_modules import Replacement, apply_replacements, fuse_modules, fused_paths
from xvol_passes.fx_graph import FxAdapter, hoist_ring_kernels
from xvol_passes.fx_norm_act import trace_with_norm_acts_split
from xvol_passes.lower import LoweringOption, lower_sites, validate_options

if TYPE_CHECKING:
    from typing_extensions import Unpack  # typing.Unpack from Python 3.11; the package supports 3.10

__all__ = [
    "FuseOptions",
    "FusedSubmoduleError",
    "FusionError",
    "FusionVerificationError",
    "fuse",
    "fuse_graph",
    "fuse_with_report",
]

log = logging.getLogger(__name__)


class FusionError(XvolError, ValueError):
    """The model cannot be fused as asked; the message says why and what to do."""


class FusionVerificationError(FusionError, VerificationError):
    """The fused model does not reproduce the unfused one within tolerance."""


class FusedSubmoduleError(FusionError):
    """Kept for code that catches it: the module form keeps every submodule runnable and never raises it."""


def fuse_graph(
    gm: fx.GraphModule, example_inputs: tuple[Any, ...] | None = None, *, backend: str = "eager",
    lowering: LoweringOption = "auto", single_conv: bool = True, skip: Collection[str] = (),
) -> tuple[fx.GraphModule, FusionReport]:
    """Rewrite ``gm`` in place: conv+BN folds, X-volution sites and branch sums become one conv each
    (each site in the lowering chosen for ``backend``, see ``xvol_passes.lower``); the rules named in
    ``skip`` (``xvol_compiler.rules.RULES``) are not applied."""
    if not isinstance(gm, fx.GraphModule):
        raise ArgumentError(
            f"gm={type(gm).__name__}: fuse_graph takes a torch.fx.GraphModule (torch.fx.symbolic_trace(model)); "
            "fuse() takes any nn.Module"
        )
    validate_options(backend, lowering, single_conv)
    rules = RuleSet.of(skip=skip)
    if example_inputs is not None:
        try:
            ShapeProp(gm).propagate(*example_inputs)
        except Exception as err:  # only MAC counts and the lowering choice use shapes
            log.info("shape propagation failed (%s): fusing without shapes", err)
    hoist_ring_kernels(gm)
    adapter = FxAdapter(gm)
    rewrite_log = run_rules(adapter, rules)
    choices = lower_sites(adapter, site_names=rewrite_log.site_names, backend=backend, lowering=lowering,
                          single_conv=single_conv)
    adapter.finalize()
    report = FusionReport.from_log(rewrite_log, source="fx")
    report.set_lowerings(choices)
    return gm, report


def default_example_inputs(model: nn.Module) -> tuple[Any, ...]:
    """The example input xvolify uses for this kind of model."""
    from xvol_compiler.site_analysis import default_example_inputs as sites_default

    return _as_tuple(sites_default(model))


def _as_tuple(example_inputs: Any) -> tuple[Any, ...]:
    """Positional arguments: a tuple as is; a Tensor, or a list of images (detection), is one argument."""
    return example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)


def fuse_with_report(model: nn.Module, **keywords: Unpack[FuseKeywords]) -> tuple[nn.Module, FusionReport]:
    """``fuse`` that also returns the report: ``(fused, fused.xvol_fusion_report)``.

    It takes ``fuse``'s arguments: the model, then the keywords ``example_inputs``, ``verify``, ``atol``,
    ``rtol``, ``inplace``, ``backend``, ``lowering``, ``single_conv``, ``graph``, ``skip`` and ``options``
    (typed by :class:`~xvol_compiler.options.FuseKeywords`), with the same defaults and meaning.
    """
    fused = fuse(model, **keywords)
    # fuse sets the report on every result it returns (a module or an ExportedProgram).
    return fused, cast(FusionReport, fused.xvol_fusion_report)


def _fuse_exported(program: torch.export.ExportedProgram, *, example_inputs: Any, graph: bool | None,
                   **options: Any) -> tuple[Any, FusionReport]:
    """The graph form on the program's unlifted ATen graph, exported again with its dynamic dimensions."""
    if graph is False:
        raise ArgumentError("an ExportedProgram is a graph: it fuses in the graph form only (leave graph unset)")
    if example_inputs is None:
        args, kwargs = program.example_inputs or ((), {})
        if kwargs:
            raise ArgumentError("the program was exported with keyword inputs: pass example_inputs as a tuple of "
                                "the positional inputs it takes")
        example_inputs = args
    example = _as_tuple(example_inputs)
    fused, report = fuse_with_report(program.module(), example_inputs=example, graph=True, **options)
    fused_program = torch.export.export(fused, example, dynamic_shapes=dynamic_shapes_of(program))
    setattr(fused_program, "xvol_fusion_report", report)  # noqa: B010 (ExportedProgram declares no such attribute)
    return fused_program, report


def _check_eval(model: nn.Module) -> None:
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


def _fuse_graph_form(model: nn.Module, example: tuple[Any, ...], *, inplace: bool, backend: str,
                     lowering: LoweringOption, single_conv: bool, skip: Collection[str] = (),
                     ) -> tuple[fx.GraphModule, FusionReport]:
    """The flat GraphModule of ``model`` with every rule applied."""
    if isinstance(model, fx.GraphModule):
        gm = model if inplace else copy.deepcopy(model)
        normalize_aten(gm)  # an ATen-level graph (torch.export's module(), make_fx): the forms rules read
    else:
        try:
            gm = trace_with_norm_acts_split(model if inplace else copy.deepcopy(model))
        except Exception as err:  # any tracing failure: the graph form cannot exist
            raise FusionError(
                f"the graph form needs a model torch.fx can trace, and {type(model).__name__} does not "
                f"({type(err).__name__}: {err}); the module form (fuse(model), graph=False) fuses any model"
            ) from err
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    unused = [str(n.target) for n in placeholders if not n.users]
    optional = [str(n.target) for n in placeholders if n.users and n.args and n.args[0] is None]
    if unused or optional:
        what = (f"ignores its argument(s) {', '.join(unused)}" if unused else
                f"uses its argument(s) {', '.join(optional)} as tensors although they default to None")
        raise FusionError(
            f"the graph form of {type(model).__name__} {what}: torch.fx followed one path of the Python code "
            "around them (an isinstance or None check), and the flat graph would drop the others; use the "
            "module form (fuse(model), graph=False), which keeps the model's own code"
        )
    gm, report = fuse_graph(gm, example, backend=backend, lowering=lowering, single_conv=single_conv, skip=skip)
    report.paths["<model>"] = "graph form (flat fx.GraphModule)"
    return gm, report


# Scales of the gammas given to untrained attention BatchNorms for the second check, tried in turn.
_PROBE_SCALES = (1.0, 1e-1, 1e-2, 1e-3)


def _verify_exercised(model: nn.Module, example: tuple[Any, ...], report: FusionReport,
                      replacements: list[Replacement] | None, *, rtol: float | None, atol: float | None,
                      inplace: bool, backend: str, lowering: LoweringOption, single_conv: bool,
                      skip: Collection[str] = ()) -> None:
    """Verify the fusion again on a copy whose untrained (zero-gamma) attention BatchNorms are given
    non-zero gammas: with gamma 0 the T(x) half of every fused weight is 0 and a wrong attention fold
    would pass. The module form applies the same replacements to the copy; the graph form fuses it again."""
    for scale in _PROBE_SCALES:  # the largest gammas whose run stays finite (T(x) is quadratic in x)
        probe, changed = with_exercised_attention(model, scale=scale)
        probe_reference = reference_run(probe, example)
        if probe_reference.checkable():
            break
    else:
        report.notes.append(
            f"the attention fold was not checked with exercised attention: with {changed} untrained attention "
            f"BatchNorm(s) given gammas down to {_PROBE_SCALES[-1] * GAMMA_RANGE[0]:g}, the unfused model's "
            "output has no finite value on the example input"
        )
        return
    fused_probe: nn.Module
    if replacements is None:
        fused_probe, _ = _fuse_graph_form(probe, example, inplace=True, backend=backend, lowering=lowering,
                                          single_conv=single_conv, skip=skip)
    else:
        fused_probe = apply_replacements(probe, replacements, single_conv=single_conv)
    verdict = verify_model(probe_reference, fused_probe.eval(), example, rtol=rtol, atol=atol)
    report.notes.append(f"verified again with {changed} untrained attention BatchNorm(s) given gammas in "
                        f"[{scale * GAMMA_RANGE[0]:g}, {scale * GAMMA_RANGE[1]:g}]: {verdict.describe()}")
    if not verdict.ok:
        raise FusionVerificationError(
            f"with its attention exercised (the untrained attention BatchNorms given non-zero gammas), the "
            f"fused model differs from the unfused one: {verdict.describe()}; the attention fold is wrong "
            f"for this model; the unfused model is untouched{'' if not inplace else ' (inplace: it is not)'}"
        )


def _verify(reference: Any, target: nn.Module, example: tuple[Any, ...], report: FusionReport, *,
            rtol: float | None, atol: float | None, inplace: bool) -> None:
    report.notes.extend(reference.notes)
    try:
        verdict = verify_model(reference, target, example, rtol=rtol, atol=atol)
    except OutputMismatchError:
        verdict = None
    if verdict is None or verdict.candidate.compared == 0:
        report.notes.append(
            "outputs are empty or have data-dependent shapes (e.g. detections): verification compared nothing"
        )
        return
    report.max_abs_error, report.max_rel_error = verdict.candidate.max_abs, verdict.candidate.max_rel
    if verdict.unfused is not None or reference.stages:
        report.notes.append(f"verified: {verdict.describe()}")
    if not verdict.ok:
        raise FusionVerificationError(
            f"fused model differs from the unfused one: {verdict.describe()}; the unfused model is "
            f"untouched{'' if not inplace else ' (inplace: it is not)'}"
        )


def fuse(
    model: nn.Module,
    *,
    example_inputs: Any = None,
    verify: bool = True,
    atol: float | None = None,
    rtol: float | None = None,
    inplace: bool = False,
    backend: str | None = None,
    lowering: LoweringOption = "auto",
    single_conv: bool = True,
    graph: bool | None = None,
    skip: Collection[str] = (),
    options: FuseOptions | None = None,
) -> nn.Module:
    """Deploy form of ``model``: every fusable site one convolution; report at ``.xvol_fusion_report``.

    The model must be in eval mode. Two forms:

    - module form (``graph=False``, the default for any ``nn.Module``): the model
      keeps its class, its code, its methods, hooks and submodule calls; each
      X-volution site becomes an ``XVolutionDeploy`` module, each conv + BatchNorm
      pair that the trace shows safe a folded conv with ``nn.Identity`` (or a
      norm-act layer's activation) where the BatchNorm was. A fused module called
      alone computes the chain it replaced. Matches needing graph surgery (branch
      sums, identity branches) are reported "graph form only".
    - graph form (``graph=True``, the default for a ``torch.fx.GraphModule``): one
      flat ``GraphModule`` traced from the model with every rule applied. An ATen-level
      graph (``ExportedProgram.module()``, make_fx) is read as well.

    A ``torch.export.ExportedProgram`` gives an ``ExportedProgram``: the graph form on its
    ATen graph (``xvol_passes.fuse_exported``), exported again with the same dynamic
    dimensions; ``example_inputs`` default to the program's own.

    Fusing a fused model changes nothing.

    With ``verify`` the fused model is checked on ``example_inputs`` by the rule
    of :mod:`xvol_compiler.verify`, and ``FusionVerificationError`` (naming the
    errors, the bound and the dtype) is raised when it fails:

    - error: the largest absolute difference, relative to the largest
      ``|reference|`` of its tensor; non-finite values must match the
      reference's, only finite ones are compared;
    - the reference, for every dtype: the unfused model itself, and a float64
      run of (a copy of) it;
    - accepted when the relative error against the unfused model is at most
      ``rtol`` (None: by dtype, ``1e-4`` for float32 and float64, ``1e-2`` for
      float16, ``5e-2`` for bfloat16), or the absolute error at most ``atol``
      when given, or when the fused model's relative error against the
      float64 run is at most ``UNFUSED_ERROR_FACTOR`` (4) times the unfused
      model's own: a fused model as close to exact arithmetic as the unfused
      one is not wrong where the two merely round differently;
    - where the float64 copy cannot run (an operator without float64 support),
      only the bound applies and the report's notes say why;
    - an untrained X-volution site (attention BatchNorm gamma 0) has an
      attention branch that computes nothing, so its fold is not checked:
      ``xvol_compiler.attention_probe.with_exercised_attention`` gives a copy
      whose attention computes (``xvol verify`` uses it);
    - detection models (a ``transform``, a ``backbone`` and a ``head`` or an
      ``rpn``, as torchvision's) are compared on the outputs of ``backbone`` and
      ``head`` / ``rpn.head``, before post-processing, whose thresholds and
      non-maximum suppression turn rounding into different box sets.

    The model itself is not changed by the check (it runs in eval mode, without grad).

    Each X-volution site is deployed in a lowering (``xvol_compiler.lowering``) for ``backend``
    ("eager", "compile", "onnxruntime"; None: "eager"). ``lowering="auto"``: a deterministic rule, no timing
    (``xvol_compiler.lowering_table``, by backend, site class, ``single_conv`` and kernel), so the same model
    and options always give the same structure. ``lowering="measure"`` (opt-in) times the exact candidates on
    the site's shapes and keeps the times in a persistent cache file (``xvol_passes.lower``; the report's
    reason names it). ``lowering="channel"|"spatial"|"spatial-h"|"stack"|"split"`` forces one (a site
    where it is not exact keeps "channel", with the reason in the report). ``single_conv=False``
    allows "split" (two convolutions and an add per site). ``lowering`` may also map site names to
    lowerings (``report.lowerings()`` of an earlier fusion; sites not named keep "channel"): how a
    saved fused model is rebuilt to load its state dict.

    ``skip`` names rules not to apply (``xvol_compiler.rules.RULES``: "conv+bn", "x-volution",
    "branch-sum", "bn-branch", "identity-branch"); an unknown name raises ``UnknownRuleError``
    listing them.

    ``options``: an :class:`~xvol_compiler.options.FuseOptions` holding these options (verify to skip) at
    once, shared with ``fuse_onnx``; a keyword given a value other than its default replaces the option's value.
    """
    opts = merge(options, FuseOptions, verify=verify, atol=atol, rtol=rtol, inplace=inplace, backend=backend,
                 lowering=lowering, single_conv=single_conv, graph=graph, skip=skip)
    verify, atol, rtol, inplace, graph = opts.verify, opts.atol, opts.rtol, opts.inplace, opts.graph
    skip = RuleSet.of(skip=opts.skip).skip  # an unknown rule name raises, listing the rules
    if isinstance(model, torch.export.ExportedProgram):
        fused_program, _ = _fuse_exported(model, example_inputs=example_inputs, graph=graph, options=opts)
        return fused_program
    check_module("model", model)
    check_example_inputs(example_inputs)
    _check_eval(model)
    graph_form = isinstance(model, fx.GraphModule) if graph is None else graph
    example = _as_tuple(example_inputs) if example_inputs is not None else default_example_inputs(model)
    reference = None
    if verify:
        reference = reference_run(model, example)
        if not reference.checkable():
            raise FusionError(
                "the unfused model's output has no finite value on the example input (BatchNorm statistics "
                "overflow?), so fusion cannot be verified: fix the model, pass other example_inputs, or verify=False"
            )
    backend = opts.backend_or("eager")
    lowering, single_conv = opts.lowering, opts.single_conv
    replacements: list[Replacement] = []
    target: nn.Module
    if graph_form:
        target, report = _fuse_graph_form(model, example, inplace=inplace, backend=backend, lowering=lowering,
                                          single_conv=single_conv, skip=skip)
    else:
        copied = model if inplace else copy.deepcopy(model)
        target, report, replacements = fuse_modules(copied, example, backend=backend, lowering=lowering,
                                                    single_conv=single_conv, skip=skip)
    target.eval()
    if not report.outcomes:
        report.notes.append("no fusable patterns found (no BatchNorm after a conv, no X-volution site)")
    if reference is not None:
        _verify(reference, target, example, report, rtol=rtol, atol=atol, inplace=inplace)
        if has_silent_attention(model):
            _verify_exercised(model, example, report, replacements if not graph_form else None,
                              rtol=rtol, atol=atol, inplace=inplace, backend=backend, lowering=lowering,
                              single_conv=single_conv, skip=skip)
    if not graph_form:
        # Every path a replacement changed: what a fused checkpoint records (passes/xvol_passes/fused_record.py).
        setattr(target, "xvol_fused_modules", fused_paths(model, replacements))  # noqa: B010 (see below)
    # setattr: nn.Module types its attributes as tensors or modules.
    setattr(target, "xvol_fusion_report", report)  # noqa: B010
    log.info("%s", report.summary())
    return target
