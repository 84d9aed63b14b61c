"""Choosing and emitting each fused site's deploy lowering, for both graph adapters.

After the rules reach their fixpoint every X-volution site is one conv over
``interleave_groups([x, T(x)])`` (the "channel" lowering). ``lower_sites`` then
picks, per site, the lowering to deploy (``xvol_compiler.lowering``) and
re-emits the site through the adapter's ``relower``:

``lowering="auto"`` (the default)
    a deterministic rule, no timing: the table of
    ``xvol_compiler.lowering_table`` keyed on the backend, the site's class
    (depthwise: one input channel of ``x`` per group; dense: one group;
    grouped), ``single_conv``, kernel, stride and shape class, each entry with
    the measurements it rests on. Today: a depthwise site takes "split" when
    ``single_conv=False``, else "spatial" ("spatial-h" for a 7x7 kernel); dense
    sites take "channel"; grouped sites "channel", or "split" in onnxruntime
    when ``single_conv=False``. The first exact lowering of the entry's order is
    taken. The same model, options and package version give the same fused
    structure whatever the machine's load.
``lowering="measure"`` (opt-in)
    the fastest exact lowering (every one: channel, spatial, spatial-h, stack, split
    where allowed) for ``backend``, timed on the site's real input
    shape (interleave + conv, 2 warm-up and 5 timed rounds, candidates
    round-robin, median): ``"eager"`` in eager PyTorch, ``"onnxruntime"`` on a
    one-site ONNX model per candidate (sessions without spinning thread
    pools). ``"compile"`` is not timed (compiling every candidate costs seconds
    per site) and, like a site without a static input shape, gets the rule.
    Times are kept in a persistent JSON cache (:func:`lowering_cache_path`:
    ``cache_path=``, else :func:`using_lowering_cache`, else
    ``$XVOL_LOWERING_CACHE``, else ``$XDG_CACHE_HOME/xvol-compiler/lowering-cache.json``,
    ``~/.cache`` without ``XDG_CACHE_HOME``), written atomically, keyed by
    site geometry, input shape, dtype, backend, threads, machine and package
    version: a later ``"measure"`` run reuses them without timing. The
    report's reason names the cache file.
a lowering name
    forced; a site where it is not exact (or not allowed) keeps "channel" and
    the report says why. With "auto", "spatial-h" (the interleave along H) and
    "stack" (a conv of one more dimension over x and T(x) stacked) are
    candidates where the rule's entry names them.

"split" (two convolutions and an add per site) is a candidate only with
``single_conv=False``.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import itertools
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from xvol_compiler.deploy import lowered_convs, run_lowering
from xvol_compiler.errors import InvalidArgumentError, XvolError
from xvol_compiler.files import PathLike, atomic_write_json, written_now
from xvol_compiler.fold import Branch, FoldError
from xvol_compiler.lowering import LOWERINGS, LoweringChoice, check_lowering
from xvol_compiler.lowering_table import RuleEntry, rule_entry, site_class
from xvol_compiler.rules import GraphAdapter, Key

__all__ = [
    "BACKENDS",
    "CACHE_ENV",
    "LOWERING_OPTIONS",
    "LoweringCacheError",
    "choose_lowering",
    "lower_sites",
    "lowering_cache_path",
    "site_option",
    "using_lowering_cache",
    "validate_options",
]

BACKENDS = ("eager", "compile", "onnxruntime")
LOWERING_OPTIONS = ("auto", "measure", *LOWERINGS)
CACHE_ENV = "XVOL_LOWERING_CACHE"
_CACHE_FORMAT = "xvol-compiler lowering cache"
_CACHE_VERSION = 1
_WARMUP, _ROUNDS = 2, 5
_CACHE_PATH: contextvars.ContextVar[Path | None] = contextvars.ContextVar("xvol_lowering_cache", default=None)


class LoweringCacheError(XvolError, ValueError):
    """The lowering cache file cannot be read as one (the message names the file and the fix)."""


LoweringOption = str | Mapping[str, str]


def validate_options(backend: str, lowering: LoweringOption, single_conv: bool) -> None:
    """InvalidArgumentError (a ValueError) naming the bad option and the choices."""
    if backend not in BACKENDS:
        raise InvalidArgumentError(f"backend={backend!r} is not one of {', '.join(BACKENDS)}")
    values = list(lowering.values()) if isinstance(lowering, Mapping) else [lowering]
    allowed = LOWERINGS if isinstance(lowering, Mapping) else LOWERING_OPTIONS
    for value in values:
        if value not in allowed:
            raise InvalidArgumentError(f"lowering={value!r} is not one of {', '.join(allowed)}")
        if value == "split" and single_conv:
            raise InvalidArgumentError(
                "lowering='split' is two convolutions per site: pass single_conv=False to allow it")


def site_option(lowering: LoweringOption, name: str) -> str:
    """The lowering asked for site ``name``: a mapping names sites (others keep "channel")."""
    return lowering.get(name, "channel") if isinstance(lowering, Mapping) else lowering


# --------------------------------------------------------------------------- the rule (lowering="auto")


def _rule(entry: RuleEntry, branch: Branch, exact: Sequence[str], *, backend: str,
          why: str = "rule") -> LoweringChoice:
    choice = next((name for name in entry.prefer if name in exact), "channel")
    skipped = list(itertools.takewhile(lambda name: name != choice, entry.prefer))  # (none of them exact)
    fallback = f" ({', '.join(skipped)} not exact)" if skipped else ""
    return LoweringChoice(choice, f"{why} {entry.name} ({backend}, {site_class(branch)} site) -> {choice}{fallback}")


# --------------------------------------------------------------------------- timing (lowering="measure")


def _static_shape(shape: Sequence[object] | None, ndim: int) -> tuple[int, ...] | None:
    """The input shape for a measurement: a dynamic batch becomes 1; other unknown sizes: None."""
    if shape is None or len(shape) != ndim + 2:
        return None
    dims = [1 if axis == 0 and not isinstance(d, int) else d for axis, d in enumerate(shape)]
    sizes = tuple(d for d in dims if isinstance(d, int) and d > 0)
    return sizes if len(sizes) == len(dims) else None


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
    from xvol_passes.onnx_site import one_site_session

    inputs = [t.numpy() for t in _inputs(branch, shape)]
    runs: dict[str, Callable[[], object]] = {}
    for lowering in candidates:
        session, names = one_site_session(branch, lowering, shape)
        feeds = dict(zip(names, inputs, strict=True))
        runs[lowering] = functools.partial(session.run, None, feeds)
    return _time_rounds(runs)


_MEASURED_BACKENDS = ("eager", "onnxruntime")


# --------------------------------------------------------------------------- the persistent cache


@contextlib.contextmanager
def using_lowering_cache(path: PathLike | None) -> Iterator[None]:
    """``lowering="measure"`` inside the block keeps its times in ``path`` (None: the default)."""
    token = _CACHE_PATH.set(None if path is None else Path(path))
    try:
        yield
    finally:
        _CACHE_PATH.reset(token)


def lowering_cache_path(path: PathLike | None = None) -> Path:
    """The cache file ``lowering="measure"`` uses: ``path``, else the one of :func:`using_lowering_cache`,
    else ``$XVOL_LOWERING_CACHE``, else ``$XDG_CACHE_HOME/xvol-compiler/lowering-cache.json``
    (``~/.cache`` when ``XDG_CACHE_HOME`` is unset or not absolute)."""
    if path is not None:
        return Path(path)
    chosen = _CACHE_PATH.get()
    if chosen is not None:
        return chosen
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env)
    return _default_cache_path()


def _default_cache_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME", "")
    root = Path(base) if os.path.isabs(base) else Path.home() / ".cache"
    return root / "xvol-compiler" / "lowering-cache.json"


def _read_cache(path: Path) -> list[dict[str, Any]]:
    """The cache's entries ([] when the file does not exist); LoweringCacheError for anything else."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    except OSError as err:
        raise LoweringCacheError(f"cannot read the lowering cache {path}: {err.strerror or err}") from err
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise LoweringCacheError(
            f"{path} is not a lowering cache (invalid JSON: {err.msg}, line {err.lineno}): delete it or pass "
            f"another cache path"
        ) from err
    if not isinstance(data, dict) or data.get("format") != _CACHE_FORMAT or not isinstance(data.get("entries"), list):
        raise LoweringCacheError(
            f"{path} is not a lowering cache (no \"format\": {_CACHE_FORMAT!r} with a list of \"entries\"): "
            "delete it or pass another cache path"
        )
    if data.get("version") != _CACHE_VERSION:
        return []  # another layout of the cache: measured again and rewritten
    return [e for e in data["entries"] if isinstance(e, dict) and isinstance(e.get("key"), dict)]


def _write_cache(path: Path, key: dict[str, Any], times: Mapping[str, float]) -> None:
    """Add (or replace) one entry; the file is rewritten atomically (read again first: other runs may
    have added entries meanwhile)."""
    if path == _default_cache_path():
        path.parent.mkdir(parents=True, exist_ok=True)  # the user's cache folder is ours to create
    entries = [e for e in _read_cache(path) if e["key"] != key]
    entries.append({"key": key, "times_us": {name: round(float(t), 3) for name, t in times.items()}})
    with written_now():  # not held back with a command's outputs: later sites read it at once
        atomic_write_json(path, {"format": _CACHE_FORMAT, "version": _CACHE_VERSION, "entries": entries}, force=True)


def _cache_key(branch: Branch, shape: tuple[int, ...], backend: str, candidates: Sequence[str]) -> dict[str, Any]:
    import xvol_compiler

    key = {
        "geometry": dataclasses.asdict(branch.geometry),
        "channels": list(branch.channels),
        "bias": branch.bias is not None,
        "input_shape": list(shape),
        "dtype": str(branch.weight.dtype),
        "backend": backend,
        "threads": torch.get_num_threads(),
        "machine": {"node": platform.node(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count()},
        "versions": {"xvol_compiler": xvol_compiler.__version__, "torch": torch.__version__,
                     "onnxruntime": _ort_version() if backend == "onnxruntime" else None},
        "candidates": list(candidates),
    }
    return json.loads(json.dumps(key))  # tuples as lists, as read back from the file


def _ort_version() -> str:
    import onnxruntime

    return str(onnxruntime.__version__)


def _measured(branch: Branch, exact: Sequence[str], entry: RuleEntry, *, backend: str,
              input_shape: Sequence[object] | None, cache_path: PathLike | None, note: str) -> LoweringChoice:
    if backend not in _MEASURED_BACKENDS:
        choice = _rule(entry, branch, exact, backend=backend,
                       why=f"{backend} is not measured (compiling every candidate costs seconds per site), rule")
        return LoweringChoice(choice.lowering, choice.reason + note)
    shape = _static_shape(input_shape, branch.geometry.ndim)
    if shape is None:
        choice = _rule(entry, branch, exact, backend=backend,
                       why="input shape unknown, not measured, rule")
        return LoweringChoice(choice.lowering, choice.reason + note)
    path = lowering_cache_path(cache_path)
    key = _cache_key(branch, shape, backend, exact)
    cached = next((e["times_us"] for e in _read_cache(path) if e["key"] == key), None)
    if isinstance(cached, dict) and all(isinstance(cached.get(name), (int, float)) for name in exact):
        times, how = {name: float(cached[name]) for name in exact}, "cached"
    else:
        measure = _measure_eager if backend == "eager" else _measure_onnxruntime
        times = measure(branch, exact, shape)
        _write_cache(path, key, times)
        how = "measured"
    best = min(exact, key=lambda name: (times[name], LOWERINGS.index(name)))
    shown = ", ".join(f"{name} {times[name]:.0f}" for name in exact)
    return LoweringChoice(
        best, f"{how} {backend} at {'x'.join(map(str, shape))} (us): {shown}; cache {path}{note}",
        tuple((name, float(times[name])) for name in exact),
    )


# --------------------------------------------------------------------------- choosing


def choose_lowering(
    branch: Branch,
    *,
    backend: str = "eager",
    lowering: str = "auto",
    single_conv: bool = True,
    input_shape: Sequence[object] | None = None,
    asymmetric_pads: bool = False,
    refusal: Callable[[str], str | None] | None = None,
    cache_path: PathLike | None = None,
) -> LoweringChoice:
    """The lowering for one site (see the module docstring); never raises for a site it cannot lower.

    ``cache_path``: the cache file of ``lowering="measure"`` (:func:`lowering_cache_path`); a cache that
    is not one raises :class:`LoweringCacheError`, one that cannot be written ``OutputError``.
    """
    validate_options(backend, lowering, single_conv)
    entry = rule_entry(branch, backend=backend, single_conv=single_conv, input_shape=input_shape)
    # channel, spatial and (allowed) split are always checked; "measure" times every lowering, the rule adds
    # those its entry names (spatial-h, stack), a forced one itself.
    wanted = {"channel", "spatial", "split"}
    wanted |= set(LOWERINGS if lowering == "measure" else entry.prefer if lowering == "auto" else (lowering,))
    candidates = [name for name in LOWERINGS if name in wanted and not (single_conv and name == "split")]
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
    if lowering not in ("auto", "measure"):
        if lowering in exact:
            return LoweringChoice(lowering, "forced")
        return LoweringChoice("channel", f"{lowering} refused: {refused.get(lowering, 'not a candidate')}")
    note = "".join(f"; {name} refused: {why}" for name, why in refused.items())
    if len(exact) == 1:
        return LoweringChoice(exact[0], f"the only exact lowering{note}")
    if lowering == "measure":
        return _measured(branch, exact, entry, backend=backend, input_shape=input_shape,
                         cache_path=cache_path, note=note)
    choice = _rule(entry, branch, exact, backend=backend)
    return LoweringChoice(choice.lowering, choice.reason + note)


def lower_sites(
    adapter: GraphAdapter[object],
    *,
    site_names: Mapping[Key, tuple[str, ...]] | None = None,
    backend: str = "eager",
    lowering: LoweringOption = "auto",
    single_conv: bool = True,
    prefix: str = "",
    cache_path: PathLike | None = None,
) -> dict[str, LoweringChoice]:
    """Choose each fused site's lowering and re-emit (``adapter.relower``) the sites that do not stay
    "channel"; name -> choice.

    ``site_names``: the sites each created conv carries (``RewriteLog.site_names``): a site is named after
    its X-volution rewrite, and later rewrites (conv+BN after it, an added branch) may name its conv after
    another conv. ``lowering`` may map site names (``prefix`` + the graph's name) to lowerings: how a saved
    fused model is rebuilt with the lowerings it was saved with. ``cache_path``: the cache file of
    ``lowering="measure"`` (:func:`lowering_cache_path`).
    """
    validate_options(backend, lowering, single_conv)
    site_names = {} if site_names is None else site_names
    choices: dict[str, LoweringChoice] = {}
    emitted = False
    for key, branch in adapter.sites():
        carried = site_names.get(key) or (adapter.site_name(key),)
        name = carried[0]
        choice = choose_lowering(
            branch, backend=backend, lowering=site_option(lowering, prefix + name), single_conv=single_conv,
            input_shape=adapter.input_shape(branch), asymmetric_pads=adapter.asymmetric_pads,
            refusal=functools.partial(adapter.lowering_refusal, branch),
            cache_path=cache_path,
        )
        for site in carried:  # (sites merged into one conv share it)
            choices[site] = choice
        if choice.lowering != "channel":
            if emitted:  # an earlier re-emission may have replaced this site's input (chained sites)
                branch = dict(adapter.sites()).get(key, branch)
            adapter.relower(key, branch, choice.lowering)  # type: ignore[arg-type]
            emitted = True
    return choices
