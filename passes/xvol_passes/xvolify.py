"""The xvolify pass: replace selected convolutions of any CNN with X-volution training modules.

Each selected ``nn.Conv1d/2d/3d`` is swapped, at its qualified name (and at
every alias of a module registered twice), for ``XVolution.from_conv(conv)``
(or ``GlobalAttentionXVolution`` with ``attention="global"``) by ``setattr``
on its parent. Nothing else of the model changes: its class, methods, forward
signature and the Python code that calls the conv (loops in detection heads
included). The new module keeps the conv's ``weight``/``bias`` (the same
``Parameter`` objects of the copy, so ``requires_grad`` flags and ties
survive) under the same state_dict keys and starts with BN_a's gamma = 0, so
the result computes exactly what the original computed until it trains. Its
new parameters are trainable unless the conv's weight is frozen, then frozen
too; build the optimizer after xvolify. A weight-standardized conv keeps its
own forward as the site's conv branch.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

from torch import fx, nn

from xvol_compiler.arguments import check_example_inputs, check_module
from xvol_compiler.deploy import XVolutionDeploy
from xvol_compiler.errors import XvolError
from xvol_compiler.fold import FoldError
from xvol_compiler.global_attention import GlobalAttentionXVolution
from xvol_compiler.options import Attention, XvolifyKeywords, XvolifyOptions, merge
from xvol_compiler.pssa import Directions, interleave_groups, neighbour_offsets
from xvol_compiler.report import SiteReport, XvolifyReport
from xvol_compiler.site_analysis import AnalysisMode, ConvInfo, SiteSelectionError, analyze_model
from xvol_compiler.site_selection import SiteDecision, as_selection, select_sites
from xvol_compiler.xvolution import XVolution

if TYPE_CHECKING:
    from typing_extensions import Unpack  # typing.Unpack from Python 3.11; the package supports 3.10

__all__ = ["ModelCopyError", "XvolifyOptions", "added_cost", "xvolify", "xvolify_with_report"]


class ModelCopyError(XvolError, RuntimeError):
    """The model cannot be copied (``copy.deepcopy``); ``inplace=True`` changes it in place instead."""


def added_cost(
    info: ConvInfo,
    *,
    directions: Directions = None,
    directional: bool = False,
    extra_branches: Sequence[str] = (),
    attention: Attention = "pssa",
    qk_channels: int | None = None,
) -> tuple[int, int]:
    """(added MACs on the example inputs, added parameters) of turning ``info``'s conv into a site.

    The attention conv has the site's geometry over C_in (PSSA) or |D|*C_in
    (directional) channels: the site's MACs again, or |D| times. The 1x1
    branch adds MACs / kernel volume. Global attention adds its q/k/v 1x1
    projections and the two P x P matmuls per call. BatchNorms and the
    element-wise PSSA transform are not counted as MACs.
    """
    g = info.geometry
    k = math.prod(g.kernel_size)
    c_in, c_out, groups = g.in_channels, g.out_channels, g.groups
    fan = len(neighbour_offsets(g.ndim, directions)) if directional and attention == "pssa" else 1
    macs = info.macs * fan
    params = c_out * (c_in * fan // groups) * k + 2 * c_out
    if "1x1" in extra_branches:
        macs += info.macs // k
        params += c_out * (c_in // groups) + 2 * c_out
    if "identity" in extra_branches:
        params += 2 * c_out
    if "bn" in extra_branches:
        params += 2 * c_out
    if attention == "global":
        d = qk_channels if qk_channels is not None else max(1, c_in // 8)
        params += c_in * (2 * d + c_in)
        for call in info.calls:
            n, positions = call.input_shape[0], math.prod(call.input_shape[2:])
            macs += n * positions * c_in * (2 * d + c_in) + n * positions * positions * (d + c_in)
    return macs, params


def _validate(model: Any, example_inputs: Any) -> None:
    """The model and its example checked before any work (analysis runs the model); the options are checked
    by :class:`XvolifyOptions` itself."""
    check_module("model", model)
    check_example_inputs(example_inputs)
    _refuse_fused(model)


def _fused_evidence(model: nn.Module) -> str:
    """Why ``model`` looks like the output of a fusion pass ('' when it does not)."""
    for name, m in model.named_modules():
        where = f" ({name})" if name else ""
        if "xvol_fusion_report" in vars(m):
            return f"it carries xvol_fusion_report{where}"
        if getattr(type(m), "_xvol_fused_graph", False):
            return f"its forward is a fused graph{where}"
        if isinstance(m, XVolutionDeploy):
            return f"it holds the deploy form of a site at {name or 'its root'}"
        if isinstance(m, fx.GraphModule) and any(
                n.op == "call_function" and n.target is interleave_groups for n in m.graph.nodes):
            return f"its graph feeds interleave_groups([x, T(x)]) to a convolution{where}"
    return ""


def _refuse_fused(model: nn.Module) -> None:
    evidence = _fused_evidence(model)
    if evidence:
        raise SiteSelectionError(
            f"{type(model).__name__} is already fused ({evidence}): its convolutions are deploy weights, and "
            "X-volution inserted there would not train or fuse as a site. xvolify the unfused model (xvolify, "
            "train, then fuse)"
        )


def xvolify_with_report(
    model: nn.Module, sites: Any = "os16", **keywords: Unpack[XvolifyKeywords]
) -> tuple[nn.Module, XvolifyReport]:
    """Like :func:`xvolify`, returning ``(model, model.xvol_report)``.

    It takes ``xvolify``'s arguments: the model, ``sites``, then the keywords ``example_inputs``, ``shift``,
    ``directions``, ``directional``, ``extra_branches``, ``attention``, ``qk_channels``, ``inplace``, ``kind``,
    ``analysis`` and ``options`` (typed by :class:`~xvol_compiler.options.XvolifyKeywords`), with the same
    defaults and meaning.
    """
    result = xvolify(model, sites, **keywords)
    return result, cast(XvolifyReport, result.xvol_report)  # xvolify sets the report on its result


def _site_report(d: SiteDecision, attention: str) -> SiteReport:
    info = d.info
    return SiteReport(
        name=info.name,
        conv_type=info.conv_type,
        class_name=info.class_name,
        geometry=info.geometry,
        bias=info.bias,
        output_strides=info.output_strides,
        temporal_strides=info.temporal_strides,
        calls=len(info.calls),
        macs=info.macs,
        added_macs=d.added_macs if d.selected else 0,
        added_params=d.added_params if d.selected else 0,
        transform_elements=info.input_elements if d.selected and attention == "pssa" else 0,
        selected=d.selected,
        reason=d.reason,
        analysis=info.analysis,
        aliases=info.aliases,
    )


def xvolify(
    model: nn.Module,
    sites: Any = "os16",
    *,
    example_inputs: Any = None,
    shift: int | Sequence[int] = 1,
    directions: Directions = None,
    directional: bool = False,
    extra_branches: Sequence[str] = (),
    attention: Attention = "pssa",
    qk_channels: int | None = None,
    inplace: bool = False,
    kind: str | None = None,
    analysis: AnalysisMode = "auto",
    options: XvolifyOptions | None = None,
) -> nn.Module:
    """Insert X-volution at the selected conv sites of ``model``; returns the model (a copy unless ``inplace``).

    ``sites``: ``"os16"`` (default: every conv with kernel > 1 at output
    stride 16), ``"os<N>"``, ``"all"``, ``"re:<pattern>"``, a compiled regex,
    qualified names, a predicate ``(name, module, info) -> bool`` or a
    :class:`~xvol_compiler.sites.SiteSelection` (strides, kernels, budget...).
    ``example_inputs``: what the model is run on once (eval, no_grad) to find
    the convs that run and their output strides: a Tensor, a list of image
    tensors (detection), or a tuple of positional arguments; default by
    ``kind`` (detected from the model; see ``default_example_inputs``).
    ``shift``/``directions``/``directional``/``extra_branches``: the
    XVolution options. ``attention="global"`` uses true global self-attention
    (``GlobalAttentionXVolution``; trains, never fuses).

    The sites hold the convs' own Parameter objects (flags and ties kept); the
    new parameters are frozen where the conv's weight is frozen, else
    trainable. Build the optimizer after xvolify.

    ``options``: an :class:`~xvol_compiler.options.XvolifyOptions` holding these options (shift to analysis)
    at once; a keyword given a value other than its default replaces the option's value.

    The result has ``result.xvol_report`` (an :class:`XvolifyReport`; ``print``
    it). Raises :class:`SiteSelectionError` when a name is unknown or nothing
    is selected; the caller's model is then untouched.
    """
    opts = merge(options, XvolifyOptions, shift=shift, directions=directions, directional=directional,
                 extra_branches=extra_branches, attention=attention, qk_channels=qk_channels, inplace=inplace,
                 kind=kind, analysis=analysis)
    _validate(model, example_inputs)
    shift, directions, directional = opts.shift, opts.directions, opts.directional
    extra_branches, attention, qk_channels = opts.extra_branches, opts.attention, opts.qk_channels
    selection = as_selection(sites)
    found = analyze_model(model, example_inputs, kind=opts.kind, analysis=opts.analysis)

    def cost(info: ConvInfo) -> tuple[int, int]:
        return added_cost(info, directions=directions, directional=directional, extra_branches=extra_branches,
                          attention=attention, qk_channels=qk_channels)

    decisions = select_sites(model, found, selection, cost=cost)
    try:
        target = model if opts.inplace else copy.deepcopy(model)
    except Exception as err:
        raise ModelCopyError(
            f"cannot copy {type(model).__name__} ({type(err).__name__}: {err}); pass inplace=True to modify it"
        ) from err

    final: list[SiteDecision] = []
    for d in decisions:
        if not d.selected:
            final.append(d)
            continue
        conv = target.get_submodule(d.info.name)
        try:
            if attention == "global":
                site: nn.Module = GlobalAttentionXVolution.from_conv(
                    conv, qk_channels=qk_channels, extra_branches=extra_branches)
            else:
                site = XVolution.from_conv(conv, shift=shift, directions=directions, directional=directional,
                                           extra_branches=extra_branches)
        except FoldError as err:  # an extra branch this site's geometry cannot hold
            final.append(SiteDecision(d.info, False, f"extra branch: {err}"))
            continue
        for name in (d.info.name, *d.info.aliases):
            parent_name, _, leaf = name.rpartition(".")
            setattr(target.get_submodule(parent_name), leaf, site)
        final.append(d)
    if not any(d.selected for d in final):  # nothing was swapped
        raise SiteSelectionError(
            f"no site of {found.model} can take extra_branches={tuple(extra_branches)}: "
            + "; ".join(f"{d.info.name}: {d.reason}" for d in final if d.reason.startswith("extra branch"))[:2000]
            + ". Drop the branch or choose other sites."
        )

    attention_text = "global self-attention (not fusable)" if attention == "global" else (
        f"pssa shift={shift} directions={directions or 'full'}" + (" directional" if directional else ""))
    if extra_branches:
        attention_text += f", extra branches {tuple(extra_branches)}"
    report = XvolifyReport(
        model=found.model,
        kind=found.kind,
        selection=selection.describe(),
        attention=attention_text,
        analysis=found.path,
        input_shapes=found.inputs,
        sites=[_site_report(d, attention) for d in final],
        model_macs=found.total_macs,
        model_params=found.total_params,
        analysis_note=found.note,
        functional_convs=found.functional_convs,
        shared_policy=(
            "a module called several times is selected if "
            + ("any" if selection.shared_calls == "any" else "every")
            + " call qualifies (SiteSelection.shared_calls)"
        ),
    )
    setattr(target, "xvol_report", report)  # noqa: B010 (nn.Module types its attributes as tensors or modules)
    return target
