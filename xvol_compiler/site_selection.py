"""Site selection: the policies (:class:`SiteSelection`: output strides, kernels, names, budget) that
choose, from a :class:`~xvol_compiler.site_analysis.ModelAnalysis`, which convolutions become
X-volution sites, and :func:`select_sites`, which gives every conv its verdict and its cost."""

from __future__ import annotations

import difflib
import math
import re
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

from xvol_compiler.errors import InvalidArgumentError, InvalidArgumentTypeError
from xvol_compiler.report import format_stride, with_article
from xvol_compiler.site_analysis import SITE_TYPE_NAMES, ConvInfo, ModelAnalysis, SiteSelectionError, Stride

__all__ = ["CostFn", "Predicate", "SiteDecision", "SiteSelection", "as_selection", "select_sites"]

Predicate = Callable[[str, nn.Module, ConvInfo], bool]


def _kernel_key(k: int | Sequence[int]) -> int | tuple[int, ...]:
    return int(k) if isinstance(k, int) else tuple(int(v) for v in k)


@dataclass(frozen=True)
class SiteSelection:
    """Which convolutions become X-volution sites. All given criteria must hold (AND).

    - ``output_strides``: keep convs with a call at one of these output
      strides (a number; a tuple such as ``(16, 8)`` for anisotropic strides).
    - ``temporal_strides``: for Conv3d, keep convs with a call at one of these.
    - ``kernel_sizes``: exact kernels (an int means that size on every axis).
      Without it, pointwise convs (kernel 1 on every axis) are excluded
      unless ``min_kernel=1``: a conv qualifies when its largest kernel axis
      is ``>= min_kernel``.
    - ``conv_types``: e.g. ``("Conv2d",)``.
    - ``names``: qualified module names (exact; an alias of a shared module
      counts). Naming a conv also overrides the default exclusions
      (pointwise, patch embedding, not run on the example inputs).
    - ``regex``: ``re.search`` on the qualified name (anchor with ``^...$``).
    - ``predicate(name, module, info) -> bool`` with ``info`` a :class:`ConvInfo`.
    - ``include_patch_embeddings``: also allow kernel == stride convs.
    - ``shared_calls``: a module called several times (shared detection head)
      matches a stride criterion when ``"any"`` (default) or ``"all"`` of its
      calls do.
    - Budget, applied last, largest benefit first: candidates ordered by the
      site's MACs on the example inputs, descending (ties by name), each taken
      when it still fits: at most ``max_sites`` sites and at most
      ``max_added_mac_fraction`` added MACs / the model's conv+linear MACs.
    """

    output_strides: Collection[Stride] | None = None
    temporal_strides: Collection[float] | None = None
    kernel_sizes: Collection[int | tuple[int, ...]] | None = None
    min_kernel: int = 2
    conv_types: Collection[str] | None = None
    names: Sequence[str] | None = None
    regex: str | re.Pattern[str] | None = None
    predicate: Predicate | None = None
    include_patch_embeddings: bool = False
    max_sites: int | None = None
    max_added_mac_fraction: float | None = None
    shared_calls: Literal["any", "all"] = "any"
    label: str | None = None

    def __post_init__(self) -> None:
        def fix(attr: str, value: Any) -> None:
            object.__setattr__(self, attr, value)

        if self.output_strides is not None:
            fix("output_strides", frozenset(
                tuple(float(v) for v in s) if isinstance(s, (tuple, list)) else float(s) for s in self.output_strides
            ))
        if self.temporal_strides is not None:
            fix("temporal_strides", frozenset(float(s) for s in self.temporal_strides))
        if self.kernel_sizes is not None:
            fix("kernel_sizes", frozenset(_kernel_key(k) for k in self.kernel_sizes))
        if self.conv_types is not None:
            types = frozenset(t if isinstance(t, str) else t.__name__ for t in self.conv_types)
            bad = types - {"Conv1d", "Conv2d", "Conv3d"}
            if bad:
                raise InvalidArgumentError(f"conv_types {sorted(bad)} unknown: use 'Conv1d', 'Conv2d' or 'Conv3d'")
            fix("conv_types", types)
        if self.names is not None:
            if isinstance(self.names, str):
                fix("names", (self.names,))
            else:
                fix("names", tuple(self.names))
        if isinstance(self.regex, str):
            fix("regex", re.compile(self.regex))
        if self.max_sites is not None and self.max_sites < 1:
            raise InvalidArgumentError(f"max_sites must be >= 1, got {self.max_sites}")
        if self.max_added_mac_fraction is not None and not self.max_added_mac_fraction > 0:
            raise InvalidArgumentError(f"max_added_mac_fraction must be > 0, got {self.max_added_mac_fraction}")
        if self.shared_calls not in ("any", "all"):
            raise InvalidArgumentError(f"shared_calls={self.shared_calls!r}: use 'any' or 'all'")
        if self.min_kernel < 1:
            raise InvalidArgumentError(f"min_kernel must be >= 1, got {self.min_kernel}")

    def describe(self) -> str:
        if self.label:
            return self.label
        parts: list[str] = []
        if self.output_strides is not None:
            parts.append("output stride in {" + ",".join(format_stride(s) for s in sorted(
                self.output_strides, key=lambda s: s if isinstance(s, tuple) else (s,))) + "}")
        if self.temporal_strides is not None:
            parts.append("temporal stride in {" + ",".join(format_stride(s) for s in sorted(self.temporal_strides))
                         + "}")
        if self.kernel_sizes is not None:
            parts.append(f"kernel in {sorted(self.kernel_sizes, key=str)}")
        elif self.min_kernel > 1:
            parts.append(f"kernel >= {self.min_kernel}")
        # (criterion, how to say it): each one given (not None) is said, in this order.
        criteria: list[tuple[object, Callable[[Any], str]]] = [
            (self.conv_types, lambda types: f"type in {sorted(types)}"),
            (self.names, lambda names: f"names {list(names)}"),
            (self.regex, lambda regex: f"regex {(regex if isinstance(regex, str) else regex.pattern)!r}"),
            (self.predicate, lambda predicate: f"predicate {getattr(predicate, '__name__', 'callable')}"),
            (self.max_sites, lambda n: f"at most {n} sites"),
            (self.max_added_mac_fraction, lambda fraction: f"at most +{100 * fraction:.3g}% MACs"),
        ]
        parts += [say(value) for value, say in criteria if value is not None]
        return ", ".join(parts) if parts else "all spatial convs"

    @property
    def needs_runtime(self) -> bool:
        return self.output_strides is not None or self.temporal_strides is not None


_OS_SHORTHAND = re.compile(r"os(\d+)")


def as_selection(sites: Any) -> SiteSelection:
    """Turn a shorthand into a :class:`SiteSelection`.

    ``"os16"`` (any ``"os<N>"``): spatial convs at output stride N; ``"all"``:
    every spatial conv that runs; ``"re:<pattern>"`` or a compiled regex;
    another string: one qualified name; a list/tuple of names; a callable
    predicate ``(name, module, info) -> bool``; a SiteSelection as is.
    """
    if isinstance(sites, SiteSelection):
        return sites
    if isinstance(sites, str):
        if sites == "all":
            return SiteSelection(label="all")
        match = _OS_SHORTHAND.fullmatch(sites)
        if match:
            return SiteSelection(output_strides={int(match.group(1))}, label=sites)
        if sites.startswith("re:"):
            return SiteSelection(regex=sites[3:])
        return SiteSelection(names=(sites,))
    if isinstance(sites, re.Pattern):
        return SiteSelection(regex=sites)
    if callable(sites):
        return SiteSelection(predicate=sites)
    if isinstance(sites, Iterable):
        names = list(sites)
        if not names or not all(isinstance(n, str) for n in names):
            raise InvalidArgumentTypeError(
                f"a list of sites must be non-empty qualified module names (str), got {names!r}"
            )
        return SiteSelection(names=tuple(names))
    raise InvalidArgumentTypeError(
        f"sites={sites!r} ({type(sites).__name__}) is not a selection: use 'os16', 'all', 're:<pattern>', "
        "a list of names, a compiled regex, a predicate (name, module, info) -> bool, or a SiteSelection"
    )


@dataclass(frozen=True)
class SiteDecision:
    """The verdict on one conv: selected or not, why, and what selecting it costs."""

    info: ConvInfo
    selected: bool
    reason: str
    added_macs: int = 0
    added_params: int = 0


CostFn = Callable[[ConvInfo], tuple[int, int]]


def _same_geometry_cost(info: ConvInfo) -> tuple[int, int]:
    g = info.geometry
    return info.macs, g.out_channels * (g.in_channels // g.groups) * math.prod(g.kernel_size) + 2 * g.out_channels


def _check_names(analysis: ModelAnalysis, names: Sequence[str]) -> None:
    known = list(analysis.convs)
    for info in analysis.convs.values():
        known += info.aliases
    problems = []
    for name in names:
        if analysis.lookup(name) is not None:
            continue
        if name in analysis.other_modules:
            what = analysis.other_modules[name]
            if what in SITE_TYPE_NAMES:
                problems.append(f"{name!r} is already an X-volution site ({what})")
            else:
                problems.append(f"{name!r} is {with_article(what)}, not a Conv1d/2d/3d")
            continue
        close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
        if close:
            hint = f"close matches: {', '.join(close)}"
        else:
            hint = f"{len(known)} convs exist, e.g. {', '.join(known[:5])}"
        problems.append(f"{name!r} is not a conv of {analysis.model} ({hint})")
    if problems:
        raise SiteSelectionError("unknown site name(s): " + "; ".join(problems))


def _kernel_matches(kernel: tuple[int, ...], wanted: Collection[int | tuple[int, ...]]) -> bool:
    return kernel in wanted or (len(set(kernel)) == 1 and kernel[0] in wanted)


def _verdict(info: ConvInfo, module: nn.Module, sel: SiteSelection) -> str:
    """'' when the conv is a candidate, else the reason (the part before ':' groups reasons in reports)."""
    names = sel.names or ()
    named = info.name in names or any(a in names for a in info.aliases)
    if info.not_swappable:
        if named:
            raise SiteSelectionError(f"{info.name!r} cannot become an X-volution site: {info.not_swappable}")
        return info.not_swappable
    if not info.ran and not named:
        return "not run: never called on the example inputs (e.g. an aux head active only in training)"
    if info.patch_embedding and not named and not sel.include_patch_embeddings:
        k = "x".join(map(str, info.geometry.kernel_size))
        return f"patch embedding: kernel = stride = {k} (name it or set include_patch_embeddings=True)"
    if sel.conv_types is not None and info.conv_type not in sel.conv_types:
        return f"conv type: {info.conv_type}"
    kernel = info.geometry.kernel_size
    if sel.kernel_sizes is not None:
        if not _kernel_matches(kernel, sel.kernel_sizes):
            return f"kernel: {'x'.join(map(str, kernel))}"
    elif max(kernel) < sel.min_kernel and not named:
        return "pointwise: kernel 1" if max(kernel) == 1 else f"kernel: {'x'.join(map(str, kernel))}"
    if sel.output_strides is not None:
        if not info.ran:
            return "not run: output stride unknown"
        hits = [s in sel.output_strides for s in info.output_strides]
        if not (any(hits) if sel.shared_calls == "any" else all(hits)):
            found = ",".join(format_stride(s) for s in dict.fromkeys(info.output_strides))
            return f"output stride: {found}"
    if sel.temporal_strides is not None:
        temporal = info.temporal_strides or ()
        hits = [t in sel.temporal_strides for t in temporal]
        if not hits or not (any(hits) if sel.shared_calls == "any" else all(hits)):
            return "temporal stride: " + (",".join(format_stride(t) for t in dict.fromkeys(temporal)) or "none")
    if sel.names is not None and not named:
        return "not named"
    if sel.regex is not None and not any(re.search(sel.regex, n) for n in (info.name, *info.aliases)):
        return "regex: no match"
    if sel.predicate is not None and not sel.predicate(info.name, module, info):
        return "predicate: returned False"
    return ""


def select_sites(
    model: nn.Module,
    analysis: ModelAnalysis,
    selection: Any,
    *,
    cost: CostFn | None = None,
    allow_empty: bool = False,
) -> list[SiteDecision]:
    """Apply a selection (or shorthand) to an analysed model: one decision per conv, registration order.

    ``cost(info) -> (added_macs, added_params)`` prices a site for the budget
    (default: one more conv of the site's geometry plus a BatchNorm). Raises
    :class:`SiteSelectionError` for unknown names and, unless ``allow_empty``,
    when nothing is selected.
    """
    sel = as_selection(selection)
    if sel.names is not None:
        _check_names(analysis, sel.names)
    cost = cost or _same_geometry_cost
    verdicts: dict[str, str] = {}
    for name, info in analysis.convs.items():
        verdicts[name] = _verdict(info, model.get_submodule(name), sel)
    candidates = [analysis.convs[n] for n, v in verdicts.items() if not v]
    prices = {info.name: cost(info) for info in candidates}
    taken: set[str] = set()
    if sel.max_sites is not None or sel.max_added_mac_fraction is not None:
        budget_macs = (sel.max_added_mac_fraction or math.inf) * analysis.total_macs
        used = 0
        for info in sorted(candidates, key=lambda i: (-i.macs, i.name)):
            add = prices[info.name][0]
            if sel.max_sites is not None and len(taken) >= sel.max_sites:
                verdicts[info.name] = f"budget: max_sites={sel.max_sites} reached (sites taken by MACs, largest first)"
            elif used + add > budget_macs:
                verdicts[info.name] = (
                    f"budget: +{100 * add / analysis.total_macs:.2f}% MACs would exceed "
                    f"max_added_mac_fraction={sel.max_added_mac_fraction:g}"
                )
            else:
                taken.add(info.name)
                used += add
    else:
        taken = {info.name for info in candidates}
    decisions = []
    for name, info in analysis.convs.items():
        if name in taken:
            macs, params = prices[name]
            decisions.append(SiteDecision(info, True, f"selected ({sel.describe()})", macs, params))
        else:
            decisions.append(SiteDecision(info, False, verdicts[name]))
    if not taken and not allow_empty:
        raise SiteSelectionError(_nothing_selected(analysis, sel, decisions))
    return decisions


def _nothing_selected(analysis: ModelAnalysis, sel: SiteSelection, decisions: list[SiteDecision]) -> str:
    """What was searched, what exists, and how to choose otherwise."""
    convs = analysis.convs.values()
    if not convs:
        return (
            f"no sites: {analysis.model} has no Conv1d/2d/3d module (X-volution replaces convolutions)"
            + (f"; functional convolutions: {', '.join(analysis.functional_convs)}" if analysis.functional_convs
               else "")
        )
    types = Counter(i.conv_type for i in convs)
    lines = [
        f"no site of {analysis.model} matches selection {sel.describe()!r} "
        f"(inputs {analysis.inputs}, {analysis.kind}).",
        "convs: " + ", ".join(f"{n} {t}" for t, n in sorted(types.items())) + ".",
    ]
    for conv_type in sorted(types):
        strides: Counter[str] = Counter()
        for i in convs:
            if i.conv_type == conv_type and i.ran and not i.pointwise and not i.patch_embedding:
                for s in dict.fromkeys(i.output_strides):
                    strides[format_stride(s)] += 1
        if strides:
            order = sorted(strides, key=lambda s: [_parse_stride(v) for v in s.split("x")])
            present = ", ".join(f"{s} ({strides[s]})" for s in order)
            lines.append(f"spatial (kernel > 1) {conv_type} output strides present: {present}.")
        else:
            lines.append(f"no spatial (kernel > 1) {conv_type} that runs outside patch embeddings.")
    if sel.output_strides is not None:
        wanted = ",".join(format_stride(s) for s in sel.output_strides)
        there = Counter(
            d.reason.split(":")[0] for d in decisions
            if not d.selected and not d.info.pointwise and any(s in sel.output_strides for s in d.info.output_strides)
        )
        lines.append(f"no candidate at output stride {wanted}"
                     + (" (spatial convs there skipped: " + "; ".join(f"{n} {r}" for r, n in there.most_common())
                        + ")" if there else "") + ".")
    reasons = Counter(d.reason.split(":")[0] for d in decisions if not d.selected)
    lines.append("skipped: " + "; ".join(f"{n} {r}" for r, n in reasons.most_common()) + ".")
    existing = [n for n, t in analysis.other_modules.items() if t in SITE_TYPE_NAMES]
    if existing:
        lines.append(f"{len(existing)} X-volution site(s) already present ({', '.join(existing[:4])}"
                     + (" ..." if len(existing) > 4 else "") + ").")
    patches = [i.name for i in convs if i.patch_embedding]
    if patches:
        lines.append(f"patch embeddings (kernel == stride): {', '.join(patches[:6])}"
                     + (" ..." if len(patches) > 6 else "") + ".")
    spatial = [i for i in convs if not i.pointwise and not i.patch_embedding]
    unswappable = Counter(i.not_swappable.split(":")[0] for i in spatial if i.not_swappable)
    if not spatial and patches:
        lines.append(
            "This model has no spatial convolution besides patch embeddings (a vision transformer?): X-volution "
            "has no natural site here; name a patch embedding (sites=[...]) to force one."
        )
    elif not spatial:
        lines.append("This model has no spatial (kernel > 1) convolution; name convs (sites=[...]) to force sites.")
    elif sum(unswappable.values()) == len(spatial):
        example = next(i for i in spatial if i.not_swappable)
        lines.append(
            f"All {len(spatial)} spatial (kernel > 1) convs of this model cannot become sites ("
            + "; ".join(f"{n} {r}" for r, n in unswappable.most_common())
            + f"), e.g. {example.name}: {example.not_swappable}. A site needs a conv whose forward is "
            "nn.Conv1d/2d/3d's, or one that only computes its weight from its parameters (weight standardization)."
        )
    else:
        lines.append(
            "Choose sites= another output stride (e.g. 'os8'), 'all', names, 're:<pattern>' or a SiteSelection."
        )
    return " ".join(lines)


def _parse_stride(text: str) -> float:
    """Inverse of format_stride for one axis ('16' -> 16.0, '1/2' -> 0.5)."""
    if text.startswith("1/"):
        return 1.0 / float(text[2:])
    return float(text)
