"""ONNX fusion pass on an xvolified torchvision model: pass time and onnxruntime latency.

    .venv/bin/python benchmarks/bench_onnx.py                      # ResNet-50, both exporters, batch 1 and 16
    .venv/bin/python benchmarks/bench_onnx.py --exporters legacy --batches 1 --repeats 30
    .venv/bin/python benchmarks/bench_onnx.py --quick              # smoke run: 64 px, batch 1, 3 rounds

For each exporter (``dynamo``: torch.export based with its optimizer;
``legacy``: TorchScript), the original model, the xvolified model (default os16
sites; the attention BatchNorms get small random scales, as after training)
and the ``fuse_onnx`` result of the latter are exported with a dynamic batch.
Reported: the wall time of ``fuse_onnx`` without and with verification
(median of ``--runs``), the sites it fused, and per batch size the median
onnxruntime (CPUExecutionProvider, ``--threads`` intra-op threads) latency of
original : unfused : fused, measured interleaved (the three take turns within
each round), with the median per-round ratios and their 25th-75th percentile
spread. Benchmark on an idle machine: load changes the ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
import torchvision
from torch import nn

from xvol_compiler import XVolution, export_onnx, fuse_onnx, xvolify
from xvol_compiler.host_memory import hold_freed_memory
from xvol_compiler.machine_load import load_line
from xvol_compiler.measure import interleaved_latency, machine_info
from xvol_compiler.report import render_table

# How each exporter is called: dynamo with its optimizer, or the TorchScript exporter.
EXPORTER_CONFIGS: dict[str, dict[str, bool]] = {
    "dynamo": {"dynamo": True, "optimize": True}, "legacy": {"dynamo": False},
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet50", help="torchvision model name (default resnet50)")
    p.add_argument("--exporters", default="dynamo,legacy", help="comma-separated: dynamo, legacy")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16], help="batch sizes (default 1 16)")
    p.add_argument("--size", type=int, default=224, help="image size (default 224)")
    p.add_argument("--repeats", type=int, default=20, help="interleaved latency rounds (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="latency rounds discarded first (default 3)")
    p.add_argument("--runs", type=int, default=5, help="fuse_onnx timing runs (default 5)")
    p.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op and torch threads (default 2)")
    p.add_argument("--interleave", default="reshape", choices=["reshape", "gather"],
                   help="how grouped sites interleave their inputs (default reshape)")
    p.add_argument("--quick", action="store_true", help="smoke run: 64 px, batch 1, 3 rounds, 1 run")
    p.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    if args.quick:
        args.size, args.batches, args.repeats, args.warmup, args.runs = 64, [1], 3, 1, 1
    return args


def build(name: str, size: int) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    original = torchvision.models.get_model(name, weights=None).eval()
    xvol = xvolify(original, example_inputs=torch.randn(1, 3, size, size)).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in xvol.modules():
            if isinstance(m, XVolution):  # as after training: the attention branch contributes a little
                m.attn_bn.weight.copy_(0.1 * torch.randn(m.attn_bn.num_features, generator=g))
    return original, xvol


def session(model: onnx.ModelProto, threads: int, profile_prefix: str | None = None) -> Any:
    """A CPU onnxruntime session, all graph optimizations; with onnxruntime's profiler on when
    ``profile_prefix`` is given (its file starts with that path)."""
    from xvol_compiler.onnx_verify import onnx_session

    return onnx_session(model, threads=threads, profile_prefix=profile_prefix)


def bench_exporter(args: argparse.Namespace, exporter: str, original: nn.Module, xvol: nn.Module) -> dict[str, Any]:
    config = EXPORTER_CONFIGS[exporter]
    example = (torch.randn(1, 3, args.size, args.size),)
    t0 = time.perf_counter()
    original_onnx = export_onnx(original, None, example, **config)
    unfused_onnx = export_onnx(xvol, None, example, **config)
    export_s = time.perf_counter() - t0

    times, verify_times = [], []
    fused_onnx, report = None, None
    for _ in range(args.runs):
        t0 = time.perf_counter()
        fused_onnx, report = fuse_onnx(unfused_onnx, verify=False, interleave=args.interleave)
        times.append(time.perf_counter() - t0)
    for _ in range(max(1, args.runs // 2)):
        t0 = time.perf_counter()
        fused_onnx, report = fuse_onnx(unfused_onnx, verify=True, interleave=args.interleave)
        verify_times.append(time.perf_counter() - t0)
    assert fused_onnx is not None and report is not None

    sessions = {name: session(m, args.threads)
                for name, m in (("original", original_onnx), ("unfused", unfused_onnx), ("fused", fused_onnx))}
    latency: dict[str, Any] = {}
    for batch in args.batches:
        feed = {"input": np.random.default_rng(0).standard_normal((batch, 3, args.size, args.size), np.float32)}
        outs = {n: s.run(None, feed)[0] for n, s in sessions.items()}
        err = float(np.abs(outs["fused"] - outs["unfused"]).max() / max(np.abs(outs["unfused"]).max(), 1e-12))
        lat = interleaved_latency({n: (lambda s=s, f=feed: s.run(None, f)) for n, s in sessions.items()},
                                  repeats=args.repeats, warmup=args.warmup)
        latency[str(batch)] = {
            "median_ms": {n: 1e3 * lat.median(n) for n in sessions},
            "unfused/original": lat.ratio("unfused", "original"),
            "fused/original": lat.ratio("fused", "original"),
            "fused/unfused": lat.ratio("fused", "unfused"),
            "fused/unfused_p25_p75": lat.ratio_spread("fused", "unfused"),
            "fused_vs_unfused_rel_error": err,
        }
    return {
        "export_s": export_s,
        "fuse_onnx_s": statistics.median(times),
        "fuse_onnx_verify_s": statistics.median(verify_times),
        "sites_fused": report.count("x-volution"),
        "rewrites": {k: report.count(k) for k in ("x-volution", "conv+bn", "branch-sum", "identity-branch")},
        "refused": len(report.refused),
        "verify_max_rel_error": report.max_rel_error,
        "conv_nodes": {
            "original": sum(n.op_type == "Conv" for n in original_onnx.graph.node),
            "unfused": sum(n.op_type == "Conv" for n in unfused_onnx.graph.node),
            "fused": sum(n.op_type == "Conv" for n in fused_onnx.graph.node),
        },
        "latency": latency,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    print(f"host memory: {hold_freed_memory()}", flush=True)
    torch.set_num_threads(args.threads)
    start_load = load_line("start")
    original, xvol = build(args.model, args.size)
    results: dict[str, Any] = {"model": args.model, "size": args.size, "threads": args.threads,
                               "interleave": args.interleave, "machine": machine_info(), "exporters": {}}
    for exporter in [e.strip() for e in args.exporters.split(",") if e.strip()]:
        results["exporters"][exporter] = bench_exporter(args, exporter, original, xvol)

    rows = []
    for exporter, r in results["exporters"].items():
        for batch, lat in r["latency"].items():
            ms = lat["median_ms"]
            p25, p75 = lat["fused/unfused_p25_p75"]
            rows.append([
                exporter, str(r["sites_fused"]), f"{r['fuse_onnx_s']:.2f}", f"{r['fuse_onnx_verify_s']:.2f}", batch,
                f"{ms['original']:.2f}", f"{ms['unfused']:.2f}", f"{ms['fused']:.2f}",
                f"{lat['unfused/original']:.3f}", f"{lat['fused/original']:.3f}",
                f"{lat['fused/unfused']:.3f} ({p25:.3f}-{p75:.3f})", f"{lat['fused_vs_unfused_rel_error']:.1e}",
            ])
    info = results["machine"]
    title = (f"ONNX fusion, {args.model} {args.size}px, onnxruntime CPU {args.threads} threads, "
             f"{args.repeats} interleaved rounds; {info.get('cpu')}; {start_load}")
    table = render_table(
        ["exporter", "sites", "fuse s", "fuse+verify s", "batch", "original ms", "unfused ms", "fused ms",
         "unfused/orig", "fused/orig", "fused/unfused (p25-p75)", "rel err"],
        rows, title=title,
    )
    sys.stdout.write(table + "\n" + load_line("end, this benchmark included") + "\n")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2, default=float))
    return results


if __name__ == "__main__":
    main()
