"""Per-site latency of every deploy lowering (channel, spatial, split) on eager, torch.compile and onnxruntime.

    python benchmarks/bench_lowerings.py                       # the six default models, batch 1 and 16
    python benchmarks/bench_lowerings.py --models mobilenet_v3_large --batches 1 --repeats 5 --quick

For each X-volution site of each model (xvolify's default os16 sites, 224 px),
the site's interleave + convolution is timed in every exact lowering on its real
input shape: candidates run round-robin inside each round; the table gives the
median and the 25th-75th percentiles in microseconds, the fastest single-conv
lowering, and what ``lowering="auto"`` picks for that backend (the deterministic
rule of ``xvol_compiler/lowering_table.py``, single_conv=True): run on an idle
machine, this is how the rule's entries are checked. Measure on an idle machine.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import fx

from xvol_compiler import XVolution, xvolify
from xvol_compiler.deploy import lowered_convs, run_lowering
from xvol_compiler.host_memory import hold_freed_memory
from xvol_compiler.io import torchvision_model
from xvol_compiler.lowering import LOWERINGS, check_lowering
from xvol_compiler.machine_load import load_line
from xvol_compiler.measure import compile_timing_set
from xvol_compiler.report import render_table
from xvol_compiler.rules import run_rules
from xvol_passes.fx_graph import FxAdapter
from xvol_passes.lower import choose_lowering

DEFAULT_MODELS = ("resnet18", "resnet50", "regnet_y_400mf", "mobilenet_v3_large", "efficientnet_b0", "convnext_tiny")
BACKENDS = ("eager", "compile", "onnxruntime")


def site_branches(name: str, size: int) -> list[tuple[str, Any, tuple[int, ...]]]:
    """(site name, merged branch, input shape at batch 1) of each fused X-volution site of ``name``."""
    torch.manual_seed(0)
    x = torch.randn(1, 3, size, size)
    model = xvolify(torchvision_model(name, num_classes=1000).eval(), example_inputs=x)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, XVolution):
                m.attn_bn.weight.normal_()
    gm = fx.symbolic_trace(model.eval())
    fx.passes.shape_prop.ShapeProp(gm).propagate(x)
    adapter = FxAdapter(gm)
    run_rules(adapter)
    out = []
    for node, branch in adapter.sites():
        shape = tuple(int(d) for d in branch.inputs[0].meta["tensor_meta"].shape)
        out.append((adapter.origin.get(node) or str(node), branch, shape))
    return out


def candidate_runs(branch: Any, shape: tuple[int, ...], backend: str,
                   compile_static: Callable[..., Any] | None = None) -> dict[str, Callable[[], object]]:
    gen = torch.Generator().manual_seed(0)
    inputs = [torch.randn(shape[0], c, *shape[2:], generator=gen) for c in branch.channels]
    runs: dict[str, Callable[[], object]] = {}
    for lowering in LOWERINGS:
        try:
            check_lowering(branch, lowering, single_conv=False)
        except ValueError:
            continue
        if backend == "onnxruntime":
            from xvol_passes.onnx_site import one_site_session

            session, names = one_site_session(branch, lowering, shape)
            feeds = {n: t.numpy() for n, t in zip(names, inputs, strict=True)}
            runs[lowering] = lambda s=session, f=feeds: s.run(None, f)
            continue
        convs, layout = lowered_convs(branch, lowering, single_conv=False)

        def fn(*ts: torch.Tensor, lowering: str = lowering, convs: list = convs, layout: Any = layout) -> object:
            return run_lowering(lowering, convs, layout, list(ts))

        if compile_static is not None:
            fn = compile_static(fn)
        runs[lowering] = lambda fn=fn: fn(*inputs)
    return runs


def time_rounds(runs: dict[str, Callable[[], object]], repeats: int, warmup: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {k: [] for k in runs}
    names = list(runs)
    with torch.inference_mode():
        for r in range(warmup + repeats):
            order = names[r % len(names):] + names[: r % len(names)]  # rotate the starting candidate
            for k in order:
                t0 = time.perf_counter()
                runs[k]()
                if r >= warmup:
                    times[k].append((time.perf_counter() - t0) * 1e6)
    return times


def _q(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(DEFAULT_MODELS))
    p.add_argument("--backends", default=",".join(BACKENDS))
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--repeats", type=int, default=15, help="interleaved timed rounds (default 15)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--input-size", type=int, default=224)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="smoke run: 64 px, 2 rounds, first 2 sites per model")
    args = p.parse_args(argv)
    print(f"host memory: {hold_freed_memory()}", flush=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.input_size, args.repeats, args.warmup = 64, 2, 1
    start_load = load_line("start")
    rows = []
    for name in [m for m in args.models.split(",") if m]:
        sites = site_branches(name, args.input_size)
        if args.quick:
            sites = sites[:2]
        for site, branch, shape1 in sites:
            for backend in [b for b in args.backends.split(",") if b]:
                for batch in args.batches:
                    shape = (batch, *shape1[1:])
                    with contextlib.ExitStack() as stack:
                        compile_static = stack.enter_context(compile_timing_set()) if backend == "compile" else None
                        runs = candidate_runs(branch, shape, backend, compile_static)
                        times = time_rounds(runs, args.repeats, args.warmup)
                    med = {k: statistics.median(v) for k, v in times.items()}
                    single = [k for k in med if k != "split"]
                    fastest = min(single, key=med.__getitem__)
                    auto = choose_lowering(branch, backend=backend, input_shape=shape).lowering
                    cells = [f"{med[k]:.0f} [{_q(times[k], .25):.0f}-{_q(times[k], .75):.0f}]" if k in med else "-"
                             for k in LOWERINGS]
                    rows.append([name, site, backend, batch, *cells, fastest, auto,
                                 "yes" if auto == fastest else f"{med[auto] / med[fastest]:.2f}x"])
    print(render_table(["model", "site", "backend", "batch", *(f"{k} us" for k in LOWERINGS), "fastest (1 conv)",
                        "auto", "auto = fastest"], rows,
                       title=f"Lowerings per site, median [p25-p75] of {args.repeats} interleaved rounds, "
                             f"{args.input_size} px, {torch.get_num_threads()} threads; {start_load}"))
    print(load_line("end, this benchmark included"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
