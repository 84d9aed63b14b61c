"""Where onnxruntime spends its time in the unfused and the fused ONNX graph, per operator type.

    .venv/bin/python benchmarks/profile_onnx.py                         # ResNet-50, dynamo exporter, batch 16
    .venv/bin/python benchmarks/profile_onnx.py --exporter legacy --batch 1 --runs 20

Exports the xvolified model (attention BatchNorms given small random scales,
as after training; the same set-up as ``bench_onnx.py``), fuses it with
``fuse_onnx``, runs both graphs in turns (``--runs`` rounds, the first graph
rotated each round) with onnxruntime's profiler on (CPUExecutionProvider, all
graph optimizations, ``--threads`` threads) and prints the kernel time per
operator type, as onnxruntime executes it after its own rewrites
(``ReorderInput``/``ReorderOutput`` are its NCHWc layout conversions): each
node's median over the profiled rounds, summed per type, after ``--warmup``
rounds, which are discarded. A second session of the unfused graph runs in the
same turns as a control: ``control - unfused`` is the noise floor that a
``fused - unfused`` difference must stand out of. Profile on an idle machine.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_onnx import EXPORTER_CONFIGS, build, session

from xvol_compiler import export_onnx, fuse_onnx
from xvol_compiler.machine_load import load_line
from xvol_compiler.report import render_table


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet50", help="torchvision model name (default resnet50)")
    p.add_argument("--exporter", default="dynamo", choices=["dynamo", "legacy"])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--runs", type=int, default=10, help="profiled rounds, each graph once per round (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="runs discarded first (default 2)")
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args(argv)


def interleaved_kernel_ms(sessions: dict[str, Any], feed: dict[str, np.ndarray], warmup: int, runs: int,
                          ) -> dict[str, dict[str, float]]:
    """Kernel milliseconds per run of each operator type, per session, the sessions run in turns.

    Each round runs every session once, the first one rotated, so that a drift of the machine (its speed
    moves between hours here) falls on both graphs alike rather than on whichever ran second. A node's time
    is the median over the profiled runs (robust to a stray slow run); an operator type's, the sum over its
    nodes."""
    tags = list(sessions)
    for round_ in range(warmup + runs):
        for tag in tags[round_ % len(tags):] + tags[:round_ % len(tags)]:
            sessions[tag].run(None, feed)
    return {tag: _median_ms_per_op(json.loads(Path(s.end_profiling()).read_text()), warmup)
            for tag, s in sessions.items()}


def _median_ms_per_op(events: list[dict[str, Any]], warmup: int) -> dict[str, float]:
    per_node: dict[str, list[tuple[float, str]]] = collections.defaultdict(list)
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            per_node[e["name"]].append((float(e["dur"]), e["args"]["op_name"]))
    per_op: collections.Counter[str] = collections.Counter()
    for node_runs in per_node.values():  # each node runs once per session.run, in order
        profiled = node_runs[warmup:]
        per_op[profiled[0][1]] += statistics.median(dur for dur, _ in profiled) / 1e3
    return dict(per_op)


def _row(name: str, ms: dict[str, float]) -> list[str]:
    return [name, f"{ms['unfused']:.2f}", f"{ms['fused']:.2f}", f"{ms['fused'] - ms['unfused']:+.2f}",
            f"{ms['control'] - ms['unfused']:+.2f}"]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    start_load = load_line("start")
    _, xvol = build(args.model, args.size)
    config = EXPORTER_CONFIGS[args.exporter]
    unfused = export_onnx(xvol, None, (torch.randn(1, 3, args.size, args.size),), **config)
    fused, report = fuse_onnx(unfused)
    feed = {"input": np.random.default_rng(0).standard_normal((args.batch, 3, args.size, args.size), np.float32)}
    with tempfile.TemporaryDirectory() as tmp:
        # A second session of the unfused graph is the control: its difference from the first is the noise
        # a fused - unfused difference has to stand out of.
        sessions = {tag: session(m, args.threads, profile_prefix=str(Path(tmp) / tag))
                    for tag, m in (("unfused", unfused), ("fused", fused), ("control", unfused))}
        times = interleaved_kernel_ms(sessions, feed, args.warmup, args.runs)
    ops = sorted(set().union(*times.values()), key=lambda op: -max(t.get(op, 0.0) for t in times.values()))
    rows = [_row(op, {tag: t.get(op, 0.0) for tag, t in times.items()}) for op in ops]
    rows.append(_row("total", {tag: sum(t.values()) for tag, t in times.items()}))
    sys.stdout.write(f"onnxruntime kernel time per run (ms), {args.model} {args.size}px batch {args.batch}, "
                     f"{args.exporter} exporter, {args.threads} threads, median of {args.runs} interleaved runs; "
                     f"{report.count('x-volution')} X-volution sites fused; {start_load}\n")
    sys.stdout.write(render_table(["operator", "unfused", "fused", "fused - unfused", "control - unfused"], rows)
                     + "\n")
    sys.stdout.write(load_line("end, this benchmark included") + "\n")


if __name__ == "__main__":
    main()
