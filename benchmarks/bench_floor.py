"""The floor a fused model is measured against: the MAC floor, and the MAC floor plus the transform T(x).

    python benchmarks/bench_floor.py                            # resnet18, resnet50, regnet_y_400mf, convnext_tiny
    python benchmarks/bench_floor.py --models resnet18 --backends eager --batches 1 --quick

The MAC floor (fused MACs / original MACs, docs/operator.md section 5) leaves out
the transform T(x) = x * R(x), which every fused site still computes: it is
memory-bound and costs time without multiply-adds. This benchmark measures it.
Besides the original (BatchNorms folded), unfused and fused models (fused for each
backend, default options or ``--lowering``), it times two programs built from the original's FX trace:
``original + T``, which also computes T(x) on each site's input and returns it as an
extra output (so no backend can drop it), and its control ``original + x``, which
returns each site's input x itself. The two differ only in computing T: the FX
module's own call overhead (in eager mode a traced module runs slower than the
model's own forward) and the extra outputs (copied out by onnxruntime) are in both. Then

    transform floor = MAC floor + (original + T) / (original + x) - 1

is what the fused model would cost if its convolutions ran at the original's speed
per multiply-add and T(x) cost what it costs beside the original. The five variants
run round-robin in each round (``xvol_compiler.measure.interleaved_latency``);
ratios are medians of the per-round ratios with their 25-75% range. onnxruntime
sessions run without spinning thread pools, and freed host memory is held
(``xvol_compiler.host_memory``; ``--system-allocator`` leaves glibc's defaults).
Run on an idle machine: the load average is recorded at the start and the end.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as dt
import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, fx, nn

from xvol_compiler.benchmark import Prepared, prepare, prepare_onnx, refuse_for
from xvol_compiler.host_memory import hold_freed_memory
from xvol_compiler.io import atomic_write_text
from xvol_compiler.machine_load import load_line
from xvol_compiler.measure import Latency, compile_timing_set, interleaved_latency, machine_info
from xvol_compiler.onnx_io import export_onnx
from xvol_compiler.onnx_verify import onnx_session
from xvol_compiler.options import LOWERING_OPTIONS
from xvol_compiler.pssa import pssa_transform
from xvol_compiler.report import render_table

DEFAULT_MODELS = ("resnet18", "resnet50", "regnet_y_400mf", "convnext_tiny")
BACKENDS = ("eager", "compile", "onnxruntime")
RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = ("original", "unfused", "fused", "original+x", "original+T")


def original_with_site_outputs(original: nn.Module, sites: list[str], *, transform: bool) -> fx.GraphModule:
    """The original's FX trace returning, after the model's output, T(x) of every site's input x
    (``transform``: ``original + T``) or x itself (its control ``original + x``).

    Built on an FX trace, so the extra outputs are plain graph outputs: eager, torch.compile and the
    ONNX exporter see the same program (a Python-side list of tensors would break inductor's graph)."""
    gm = fx.symbolic_trace(copy.deepcopy(original))
    wanted = set(sites)
    extra = []
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target in wanted:
            if transform:
                with gm.graph.inserting_before(node):
                    extra.append(gm.graph.call_function(pssa_transform, (node.args[0],)))
            else:
                extra.append(node.args[0])
    if len(extra) != len(wanted):
        raise RuntimeError(f"found {len(extra)} of the {len(wanted)} sites in the trace of the original")
    output = next(n for n in gm.graph.nodes if n.op == "output")
    output.args = ((output.args[0], *extra),)
    gm.recompile()
    return gm


def _first(session: Any, feeds: dict[str, Any]) -> Any:
    return session.run(None, feeds)


def runs_for(p: Prepared, with_outputs: dict[str, fx.GraphModule], backend: str, x: Tensor,
             compile_static: Callable[[nn.Module], Any] | None = None) -> dict[str, Callable[[], Any]]:
    """One zero-argument call per variant on ``backend`` (the fused model already fused for it);
    ``with_outputs``: ``original+x`` and ``original+T`` (:func:`original_with_site_outputs` of ``p``'s
    original); ``compile_static``: the compiler of :func:`xvol_compiler.measure.compile_timing_set`
    (backend "compile")."""
    models = {**{v: p.models[v] for v in VARIANTS[:3]}, **with_outputs}
    if backend == "eager":
        return {v: functools.partial(m, x) for v, m in models.items()}
    if backend == "compile":
        if compile_static is None:
            raise RuntimeError("backend 'compile' needs compile_static (compile_timing_set)")
        return {v: functools.partial(compile_static(m), x) for v, m in models.items()}
    if p.workdir is None:
        raise RuntimeError("onnxruntime needs prepare_onnx() first")
    paths = dict(p.onnx_paths)
    for variant, model in with_outputs.items():
        paths[variant] = Path(p.workdir.name) / f"{variant.replace('+', '_')}.onnx"
        if not paths[variant].exists():
            export_onnx(model, paths[variant], (x[:1],), force=True)
    runs = {}
    for v in VARIANTS:
        session = onnx_session(paths[v], threads=torch.get_num_threads())
        runs[v] = functools.partial(_first, session, {session.get_inputs()[0].name: x.numpy()})
    return runs


def check_outputs(runs: dict[str, Callable[[], Any]], sites: int) -> None:
    """``original + T`` must return T(x) of every site and its control x, or the floor would be wrong."""
    for variant in ("original+x", "original+T"):
        outs = runs[variant]()
        if len(outs) != 1 + sites:
            raise RuntimeError(f"{variant} returned {len(outs)} outputs, expected {1 + sites}")


def row(p: Prepared, backend: str, batch: int, lat: Latency) -> list[Any]:
    def cell(v: str, base: str = "original") -> str:
        lo, hi = lat.ratio_spread(v, base)
        return f"{lat.ratio(v, base):.3f} [{lo:.3f}-{hi:.3f}]"

    t_floor = p.mac_floor + lat.ratio("original+T", "original+x") - 1
    fused = lat.ratio("fused", "original")
    return [p.name, backend, batch, f"{1e3 * lat.median('original'):.2f}", f"{p.mac_floor:.3f}",
            cell("original+T", "original+x"), f"{t_floor:.3f}", cell("unfused"), cell("fused"),
            f"{fused / p.mac_floor:.3f}", f"{fused / t_floor:.3f}", f"{lat.ratio('fused', 'unfused'):.3f}"]


HEADER = ["model", "backend", "batch", "original ms", "MAC floor", "original+T / original+x", "transform floor",
          "unfused / original", "fused / original", "fused / MAC floor", "fused / transform floor",
          "fused / unfused"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(DEFAULT_MODELS))
    ap.add_argument("--backends", default=",".join(BACKENDS))
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--input-size", type=int, default=224)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=RESULTS, help=f"results folder (default {RESULTS})")
    ap.add_argument("--quick", action="store_true", help="smoke run: 64 px, 2 rounds; nothing written")
    ap.add_argument("--lowering", default="auto", choices=LOWERING_OPTIONS,
                    help="deploy lowering of the fused sites (default auto: the rule per backend; split: two convs)")
    ap.add_argument("--system-allocator", action="store_true",
                    help="leave glibc's allocator at its defaults (default: freed memory held)")
    args = ap.parse_args(argv)
    if not args.system_allocator:
        hold_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.input_size, args.repeats, args.warmup = 64, 2, 1
    backends = [b for b in args.backends.split(",") if b]
    bad = set(backends) - set(BACKENDS)
    if bad:
        ap.error(f"unknown backends {sorted(bad)}; choose from {', '.join(BACKENDS)}")
    command = "python benchmarks/bench_floor.py " + " ".join(argv if argv is not None else sys.argv[1:])
    start = load_line("start")
    print(start, flush=True)
    rows = []
    for name in [m for m in args.models.split(",") if m]:
        p = prepare(name, input_size=(3, args.input_size, args.input_size))
        try:
            with_outputs = {v: original_with_site_outputs(p.models["original"], p.sites, transform=v == "original+T")
                            .eval() for v in ("original+x", "original+T")}
            for backend in backends:
                if backend == "onnxruntime":
                    prepare_onnx(p, lowering=args.lowering)
                else:
                    refuse_for(p, backend, args.lowering)
                for batch in args.batches:
                    (x,) = p.example(batch)
                    with contextlib.ExitStack() as stack:
                        stack.enter_context(torch.inference_mode())
                        compile_static = stack.enter_context(compile_timing_set()) if backend == "compile" else None
                        runs = runs_for(p, with_outputs, backend, x, compile_static)
                        check_outputs(runs, len(p.sites))
                        lat = interleaved_latency(runs, repeats=args.repeats, warmup=args.warmup)
                    rows.append(row(p, backend, batch, lat))
                    print(" | ".join(str(c) for c in rows[-1]), flush=True)
        finally:
            p.close()
    end = load_line("end, this benchmark included")
    info = machine_info("cpu")
    title = (f"Fused latency against its floors, median of {args.repeats} interleaved rounds, {args.input_size} px, "
             f"{torch.get_num_threads()} threads")
    text = "\n".join([
        f"# {title}", "",
        f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC; {info.get('cpu', '?')} "
        f"({info.get('cpu_capability', '?')}); torch {torch.__version__}.",
        start + "; " + end + ".", f"Command: `{command.strip()}`.", f"Host memory: {info['host_memory']}.", "",
        "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER),
        *("| " + " | ".join(str(c) for c in r) + " |" for r in rows), ""])
    print(render_table(HEADER, rows, title=title))
    print(end)
    if not args.quick:
        out = args.out / f"{dt.datetime.now(dt.timezone.utc):%Y%m%d-%H%M%S}-cpu-floor.md"
        atomic_write_text(out, text)
        print(f"written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
