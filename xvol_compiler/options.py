"""The options of the passes, each checked once: :class:`FuseOptions` and :class:`XvolifyOptions`.

``fuse`` / ``fuse_with_report`` / ``fuse_onnx`` take ``options=FuseOptions(...)`` and ``xvolify`` /
``xvolify_with_report`` take ``options=XvolifyOptions(...)``, so one set of options can be kept and passed
to several calls. The keywords of those functions keep working: without ``options`` they build one; with
it, a keyword given a value other than its default replaces that field (:func:`merge`). Every check is in
``__post_init__``, so a bad value raises :class:`~xvol_compiler.arguments.ArgumentError` naming the option
whichever way it was given, before any work.

:class:`FuseKeywords` and :class:`XvolifyKeywords` type those keywords for the ``*_with_report`` variants,
which take the same keywords as ``fuse`` / ``xvolify`` (``**keywords: Unpack[FuseKeywords]``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypedDict, TypeVar

from xvol_compiler.arguments import (
    ArgumentError,
    check_bool,
    check_choice,
    check_directions,
    check_extra_branches,
    check_optional_int,
    check_shift,
    check_tolerance,
)
from xvol_compiler.lowering import LOWERINGS
from xvol_compiler.pssa import Directions
from xvol_compiler.site_analysis import KINDS, AnalysisMode
from xvol_compiler.xvolution import EXTRA_BRANCHES

__all__ = [
    "ATTENTIONS",
    "Attention",
    "BACKENDS",
    "LOWERING_OPTIONS",
    "FuseKeywords",
    "FuseOptions",
    "LoweringOption",
    "XvolifyKeywords",
    "XvolifyOptions",
    "merge",
]

BACKENDS: tuple[str, ...] = ("eager", "compile", "onnxruntime")
LOWERING_OPTIONS: tuple[str, ...] = ("auto", "measure", *LOWERINGS)
ANALYSIS_MODES: tuple[str, ...] = ("auto", "hooks", "fx")
ATTENTIONS: tuple[str, ...] = ("pssa", "global")
LoweringOption = str | Mapping[str, str]
Attention = Literal["pssa", "global"]


def check_lowering_option(lowering: Any, single_conv: bool) -> None:
    """``lowering``: a name of :data:`LOWERING_OPTIONS`, or a mapping of site names to lowering names."""
    if isinstance(lowering, Mapping):
        values, allowed = list(lowering.values()), LOWERINGS
    else:
        values, allowed = [lowering], LOWERING_OPTIONS
    for value in values:
        if not isinstance(value, str) or value not in allowed:
            raise ArgumentError(f"lowering={value!r} is not one of {', '.join(allowed)}")
        if value == "split" and single_conv:
            raise ArgumentError(
                "lowering='split' is two convolutions per site: pass single_conv=False to allow it")


@dataclass(frozen=True)
class FuseOptions:
    """What ``fuse``, ``fuse_with_report`` and ``fuse_onnx`` do (see ``fuse`` for each option's meaning).

    ``backend`` None is the pass's own runtime: "eager" for ``fuse``, "onnxruntime" for ``fuse_onnx``
    (which writes for onnxruntime only). ``atol``, ``inplace`` and ``graph`` apply to ``fuse`` only.
    ``skip`` names rules to leave out (empty: every rule runs).
    """

    verify: bool = True
    rtol: float | None = None
    atol: float | None = None
    inplace: bool = False
    backend: str | None = None  # None: the pass's own runtime
    lowering: LoweringOption = "auto"
    single_conv: bool = True
    graph: bool | None = None
    skip: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_bool("verify", self.verify)
        check_tolerance("rtol", self.rtol, optional=True)
        check_tolerance("atol", self.atol, optional=True)
        check_bool("inplace", self.inplace)
        if self.backend is not None and (not isinstance(self.backend, str) or self.backend not in BACKENDS):
            raise ArgumentError(f"backend={self.backend!r} is not one of {', '.join(BACKENDS)}")
        check_bool("single_conv", self.single_conv)
        check_lowering_option(self.lowering, self.single_conv)
        if self.graph is not None:
            check_bool("graph", self.graph)
        if isinstance(self.skip, str) or not isinstance(self.skip, Sequence) or not all(
                isinstance(s, str) for s in self.skip):
            raise ArgumentError(f"skip={self.skip!r}: use a sequence of rule names, e.g. ('conv+bn',)")
        object.__setattr__(self, "skip", tuple(self.skip))

    def backend_or(self, default: str) -> str:
        """The backend the sites are lowered for: ``backend``, else the pass's ``default``."""
        return self.backend if self.backend is not None else default


@dataclass(frozen=True)
class XvolifyOptions:
    """What ``xvolify`` and ``xvolify_with_report`` insert (see ``xvolify`` for each option's meaning)."""

    shift: int | tuple[int, ...] = 1
    directions: Directions = None
    directional: bool = False
    extra_branches: tuple[str, ...] = ()
    attention: Attention = "pssa"
    qk_channels: int | None = None
    inplace: bool = False
    kind: str | None = None
    analysis: AnalysisMode = "auto"

    def __post_init__(self) -> None:
        check_shift(self.shift)
        if not isinstance(self.shift, int):
            object.__setattr__(self, "shift", tuple(self.shift))
        check_directions(self.directions)
        check_bool("directional", self.directional)
        check_extra_branches(self.extra_branches, EXTRA_BRANCHES)
        object.__setattr__(self, "extra_branches", tuple(self.extra_branches))
        if not isinstance(self.attention, str) or self.attention not in ATTENTIONS:
            raise ArgumentError(
                f"attention={self.attention!r}: use 'pssa' (foldable) or 'global' (true self-attention)")
        check_optional_int("qk_channels", self.qk_channels, 1)
        check_bool("inplace", self.inplace)
        if self.kind is not None:
            check_choice("kind", self.kind, KINDS)
        check_choice("analysis", self.analysis, ANALYSIS_MODES)
        if self.attention == "global" and self.directional:
            raise ArgumentError("directional=True applies to PSSA only; drop it with attention='global'")
        if self.attention == "pssa" and self.qk_channels is not None:
            raise ArgumentError("qk_channels applies to attention='global' only")


class FuseKeywords(TypedDict, total=False):
    """The keyword arguments of ``fuse`` (and so of ``fuse_with_report``), each optional; see ``fuse``."""

    example_inputs: Any
    verify: bool
    atol: float | None
    rtol: float | None
    inplace: bool
    backend: str | None
    lowering: LoweringOption
    single_conv: bool
    graph: bool | None
    skip: Collection[str]
    options: FuseOptions | None


class XvolifyKeywords(TypedDict, total=False):
    """The keyword arguments of ``xvolify`` (and so of ``xvolify_with_report``), each optional; see ``xvolify``."""

    example_inputs: Any
    shift: int | Sequence[int]
    directions: Directions
    directional: bool
    extra_branches: Sequence[str]
    attention: Attention
    qk_channels: int | None
    inplace: bool
    kind: str | None
    analysis: AnalysisMode
    options: XvolifyOptions | None


Options = TypeVar("Options", FuseOptions, XvolifyOptions)


def merge(options: Options | None, cls: type[Options], **keywords: Any) -> Options:
    """``options`` (or ``cls()`` when None) with every keyword that differs from its field's default applied.

    The passes call this with their keyword arguments, whose defaults are the fields' defaults: a keyword
    left at its default keeps the value in ``options``, any other value replaces it.
    """
    if options is None:
        options = cls()
    elif not isinstance(options, cls):
        raise ArgumentError(f"options={type(options).__name__}: use a {cls.__name__} (xvol_compiler.options)")
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    changed = {name: value for name, value in keywords.items() if not _same(value, defaults[name])}
    return dataclasses.replace(options, **changed) if changed else options


def _same(value: Any, default: Any) -> bool:
    """Whether a keyword still has its default (a sequence equal to the default tuple counts, ``[]`` for ``()``)."""
    if isinstance(default, tuple) and isinstance(value, Sequence) and not isinstance(value, str):
        return tuple(value) == default
    return type(value) is type(default) and value == default
