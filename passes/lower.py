"""Choosing and emitting each fused site's deploy lowering, for both graph adapters.

After the rules reach their fixpoint every X-volution site is one conv over
``interleave_groups([x, T(x)])`` (the "channel" lowering). ``lower_sites`` then
picks, per site, the lowering to deploy (``xvol_compiler.lowering``) and
re-emits the site through the adapter's ``apply``:

``lowering="auto"``
    the fastest exact lowering for ``backend``. ``"eager"``: measured in eager
    PyTorch on the site's real input shape (interleave + conv, 2 warm-up and 5
    timed rounds, candidates round-robin, median). ``"onnxruntime"``: measured
    the same way on a one-site ONNX model per candidate. ``"compile"``: a rule
    (compiling every candidate costs seconds per site): a depthwise site (one
    input channel of ``x`` per group) takes "spatial", which keeps that layout
    for the depthwise kernels the compiled graph calls; any other site
    "channel". Without a known input shape the same rule applies. Measurements
    are cached in memory per (site geometry, input shape, dtype, backend,
    threads, machine).
a lowering name
    forced; a site where it is not exact (or not allowed) keeps "channel" and
    the report says why.

"split" (two convolutions and an add per site) is a candidate only with
``single_conv=False``.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import torch

from xvol_compiler.fold import Branch, FoldError
from xvol_compiler.lowering import LOWERINGS, LoweringChoice, check_lowering
from xvol_compiler.ops import lowered_convs, run_lowering
from xvol_compiler.rules import Rewrite

__all__ = ["BACKENDS", "LOWERING_OPTIONS", "choose_lowering", "lower_sites", "site_option", "validate_options"]

BACKENDS = ("eager", "compile", "onnxruntime")
LOWERING_OPTIONS = ("auto", *LOWERINGS)
_WARMUP, _ROUNDS = 2, 5
_CACHE: dict[tuple[Any, ...], dict[str, float]] = {}


class LoweringAdapter(Protocol):
    def sites(self) -> list[tuple[Any, Branch]]: ...

    def apply(self, rewrite: Rewrite) -> None: ...


LoweringOption = str | Mapping[str, str]


def validate_options(backend: str, lowering: LoweringOption, single_conv: bool) -> None:
    """ValueError naming the bad option and the choices."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {', '.join(BACKENDS)}")
    values = list(lowering.values()) if isinstance(lowering, Mapping) else [lowering]
    allowed = LOWERINGS if isinstance(lowering, Mapping) else LOWERING_OPTIONS
    for value in values:
        if value not in allowed:
            raise ValueError(f"lowering={value!r} is not one of {', '.join(allowed)}")
        if value == "split" and single_conv:
            raise ValueError("lowering='split' is two convolutions per site: pass single_conv=False to allow it")


def site_option(lowering: LoweringOption, name: str) -> str:
    """The lowering asked for site ``name``: a mapping names sites (others keep "channel")."""
    return lowering.get(name, "channel") if isinstance(lowering, Mapping) else lowering


def _is_depthwise(branch: Branch) -> bool:
    return branch.channels[0] == branch.geometry.groups


def _rule(branch: Branch, exact: Sequence[str], why: str) -> LoweringChoice:
    if _is_depthwise(branch) and "spatial" in exact:
        return LoweringChoice("spatial", f"{why}: depthwise site -> spatial (one input channel per group)")
    what = "depthwise site, spatial not exact" if _is_depthwise(branch) else "dense site"
    return LoweringChoice("channel", f"{why}: {what} -> channel")


def _static_shape(shape: Sequence[object] | None, ndim: int) -> tuple[int, ...] | None:
    """The input shape for a measurement: a dynamic batch becomes 1; other unknown sizes: None."""
    if shape is None or len(shape) != ndim + 2:
        return None
    dims = [1 if axis == 0 and not isinstance(d, int) else d for axis, d in enumerate(shape)]
    return tuple(dims) if all(isinstance(d, int) and d > 0 for d in dims) else None  # type: ignore[misc]


def _time_rounds(runs: dict[str, Callable[[], object]]) -> dict[str, float]:
    """Median microseconds per candidate, candidates run round-robin."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for i in range(_WARMUP + _ROUNDS):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            if i >= _WARMUP:
                times[name].append((time.perf_counter() - start) * 1e6)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _inputs(branch: Branch, shape: tuple[int, ...]) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(shape[0], c, *shape[2:], generator=gen, dtype=branch.weight.dtype) for c in branch.channels]


def _measure_eager(branch: Branch, candidates: Sequence[str], shape: tuple[int, ...]) -> dict[str, float]:
    inputs = _inputs(branch, shape)
    runs: dict[str, Callable[[], object]] = {}
    for lowering in candidates:
        convs, layout = lowered_convs(branch, lowering, single_conv=False)

        def run(lowering: str = lowering, convs: list = convs, layout: Any = layout) -> object:
            with torch.no_grad():
                return run_lowering(lowering, convs, layout, inputs)

        runs[lowering] = run
    return _time_rounds(runs)


def _measure_onnxruntime(branch: Branch, candidates: Sequence[str], shape: tuple[int, ...]) -> dict[str, float]:
    from xvol_compiler.passes.onnx_site import one_site_session

    inputs = [t.numpy() for t in _inputs(branch, shape)]
    runs: dict[str, Callable[[], object]] = {}
    for lowering in candidates:
        session, names = one_site_session(branch, lowering, shape)
        feeds = dict(zip(names, inputs, strict=True))
        runs[lowering] = lambda session=session, feeds=feeds: session.run(None, feeds)
    return _time_rounds(runs)


def choose_lowering(
    branch: Branch,
    *,
    backend: str = "eager",
    lowering: str = "auto",
    single_conv: bool = True,
    input_shape: Sequence[object] | None = None,
    asymmetric_pads: bool = False,
    refusal: Callable[[str], str | None] | None = None,
) -> LoweringChoice:
    """The lowering for one site (see the module docstring); never raises for a site it cannot lower."""
    validate_options(backend, lowering, single_conv)
    candidates = ["channel", "spatial"] + ([] if single_conv else ["split"])
    exact: list[str] = []
    refused: dict[str, str] = {}
    for name in candidates:
        try:
            check_lowering(branch, name, single_conv=single_conv, asymmetric_pads=asymmetric_pads)
            why = refusal(name) if refusal is not None else None
            if why:
                raise FoldError(why)
            exact.append(name)
        except FoldError as err:
            refused[name] = str(err)
    if lowering != "auto":
        if lowering in exact:
            return LoweringChoice(lowering, "forced")
        return LoweringChoice("channel", f"{lowering} refused: {refused.get(lowering, 'not a candidate')}")
    note = "".join(f"; {name} refused: {why}" for name, why in refused.items())
    if len(exact) == 1:
        return LoweringChoice(exact[0], f"the only exact lowering{note}")
    if backend == "compile":
        choice = _rule(branch, exact, "rule for compile")
        return LoweringChoice(choice.lowering, choice.reason + note)
    shape = _static_shape(input_shape, branch.geometry.ndim)
    if shape is None:
        choice = _rule(branch, exact, "input shape unknown, rule")
        return LoweringChoice(choice.lowering, choice.reason + note)
    threads = torch.get_num_threads()
    key = (branch.geometry, branch.channels, shape, branch.weight.dtype, backend, threads, platform.node(),
           platform.processor(), os.cpu_count(), tuple(exact))
    times = _CACHE.get(key)
    if times is None:
        measure = _measure_eager if backend == "eager" else _measure_onnxruntime
        times = _CACHE[key] = measure(branch, exact, shape)
    best = min(exact, key=lambda name: (times[name], LOWERINGS.index(name)))
    shown = ", ".join(f"{name} {times[name]:.0f}" for name in exact)
    return LoweringChoice(best, f"measured {backend} at {'x'.join(map(str, shape))} (us): {shown}{note}",
                          tuple((name, float(times[name])) for name in exact))


def lower_sites(
    adapter: LoweringAdapter,
    *,
    name_of: Callable[[Any], str],
    shape_of: Callable[[Branch], Sequence[object] | None],
    backend: str = "eager",
    lowering: LoweringOption = "auto",
    single_conv: bool = True,
    asymmetric_pads: bool = False,
    refusal: Callable[[Branch, str], str | None] | None = None,
    prefix: str = "",
) -> dict[str, LoweringChoice]:
    """Choose each fused site's lowering and re-emit the sites that do not stay "channel"; name -> choice.

    ``lowering`` may map site names (``prefix`` + the graph's name) to lowerings: how a saved fused
    model is rebuilt with the lowerings it was saved with.
    """
    validate_options(backend, lowering, single_conv)
    # A site is named after its X-volution rewrite (the adapters track it): later rewrites (conv+BN after
    # it, an added branch) may name its conv after another conv.
    site_names = getattr(adapter, "site_names", {})
    choices: dict[str, LoweringChoice] = {}
    for key, branch in adapter.sites():
        carried = site_names.get(key) or (name_of(key),)
        name = carried[0]
        choice = choose_lowering(
            branch, backend=backend, lowering=site_option(lowering, prefix + name), single_conv=single_conv,
            input_shape=shape_of(branch),
            asymmetric_pads=asymmetric_pads,
            refusal=None if refusal is None else (lambda name, branch=branch: refusal(branch, name)),
        )
        for site in carried:  # (sites merged into one conv share it)
            choices[site] = choice
        if choice.lowering != "channel":
            adapter.apply(Rewrite(rule="lowering", kind="x-volution", name=name, anchor=key, output=key,
                                  replaced=(key,), branch=branch, params_before=0, macs_before=None,
                                  macs_after=None, lowering=choice.lowering))
    return choices
