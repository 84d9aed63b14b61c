"""Time xvolify on ResNet-50 (default sites, default 1x3x224x224 analysis input).

    .venv/bin/python benchmarks/bench_xvolify.py [--runs 7] [--threads 2] [--model resnet50]

Prints the median and spread of the whole call and of its parts: analysis
(one eval forward with hooks, plus the FX trace), the copy and the swap.
Run on an idle machine: the numbers are wall-clock times.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
import torchvision

from xvol_compiler import analyze_model, render_table, xvolify
from xvol_compiler.machine_load import load_line


def _median(fn: Callable[[], object], runs: int) -> tuple[float, float, float]:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times), max(times)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", default="resnet50")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    start_load = load_line("start")
    model = torchvision.models.get_model(args.model, weights=None).eval()
    with torch.no_grad():  # warm-up: the first forward pays one-time allocator/kernel set-up
        model(torch.rand(1, 3, 224, 224))
    rows, result = [], {}
    for label, fn in [
        ("xvolify (default)", lambda: xvolify(model)),
        ("  analysis, auto (fx trace + hooks)", lambda: analyze_model(model)),
        ("  analysis, hooks only", lambda: analyze_model(model, analysis="hooks")),
        ("  copy.deepcopy(model)", lambda: copy.deepcopy(model)),
        ("eager forward 1x3x224x224", lambda: torch.no_grad()(model)(torch.rand(1, 3, 224, 224))),
    ]:
        med, lo, hi = _median(fn, args.runs)
        result[label.strip()] = med
        rows.append([label, f"{med:.3f}", f"{lo:.3f}", f"{hi:.3f}"])
    sites = len(xvolify(model).xvol_report.selected)
    title = (f"xvolify on {args.model}: {sites} sites; {args.runs} runs, {args.threads} threads, "
             f"torch {torch.__version__}; {start_load}")
    print(render_table(["step", "median s", "min s", "max s"], rows, title=title))
    print(load_line("end, this benchmark included"))
    return result


if __name__ == "__main__":
    main()
