"""Latency of original : unfused (eval) : fused models, per backend and batch size, interleaved repeats.

    python benchmarks/run.py                        # the five default models, eager + compile + onnxruntime
    python benchmarks/run.py --models resnet50 --backends eager,onnxruntime --batches 1 --repeats 30
    python benchmarks/run.py --quick                # smoke run: small input, 3 rounds, batch 1

For each model (torchvision, ``weights=None``, default os16 sites; the
attention BatchNorms get small random scales so the attention branch
contributes as after training): wall time of ``xvolify``, FX ``fuse`` and
``fuse_onnx``, their peak memory, params and MACs of the three forms, and per
backend and batch the median latency of each form, measured interleaved
(round-robin within each round), with the ratios to the original, the spread
(25th-75th percentile of the per-round ratios) and the arithmetic floor
fused MACs / original MACs (docs/operator.md, section 5) next to them.

Writes ``<out>/latest.md``, ``latest.json`` and ``latest.png`` (``--quick``:
``quick.*``) plus a time-stamped copy of the markdown, each with the machine
description (CPU model, cores, threads, torch version). Runs on CUDA when
available (``--device``); onnxruntime then uses its CUDA provider if installed.
Benchmark on an idle machine: load changes the ratios.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from xvol_compiler.benchmark import BACKENDS, prepare, prepare_onnx, refuse_for, time_backend
from xvol_compiler.host_memory import hold_freed_memory
from xvol_compiler.io import atomic_path, atomic_write_json, atomic_write_text
from xvol_compiler.machine_load import LoadAverage, load_average, load_line
from xvol_compiler.measure import machine_info
from xvol_compiler.options import LOWERING_OPTIONS
from xvol_compiler.report import format_count

DEFAULT_MODELS = ("resnet18", "resnet50", "mobilenet_v3_large", "efficientnet_b0", "convnext_tiny")
RESULTS = Path(__file__).resolve().parent / "results"
README = Path(__file__).resolve().parents[1] / "README.md"
MARKERS = ("<!-- bench:start -->", "<!-- bench:end -->")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma-separated torchvision names")
    p.add_argument("--backends", default=",".join(BACKENDS), help=f"comma-separated: {', '.join(BACKENDS)}")
    p.add_argument("--batches", type=int, nargs="+", default=None, help="batch sizes (default 1 16)")
    p.add_argument("--repeats", type=int, default=None, help="interleaved rounds per measurement (default 20)")
    p.add_argument("--warmup", type=int, default=None, help="rounds discarded first (default 3)")
    p.add_argument("--input-size", type=int, default=None, help="image size (default 224)")
    p.add_argument("--sites", default="os16", help="site policy (default os16)")
    p.add_argument("--lowering", default="auto", choices=LOWERING_OPTIONS,
                   help="deploy lowering of the fused sites (default auto: the deterministic rule per backend and "
                        "site class; measure: timed on this machine, cached)")
    p.add_argument("--backend-aware", action="store_true",
                   help="fuse the model for each backend row (fuse(..., backend=b)); default: fused for eager")
    p.add_argument("--threads", type=int, default=None, help="torch and onnxruntime threads (default: torch's)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--system-allocator", action="store_true",
                   help="leave glibc's allocator at its defaults (default: freed memory held, so that no call pays "
                        "page faults again; xvol_compiler/host_memory.py)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 64 px, batch 1, 3 rounds, 1 warm-up; results to quick.*")
    p.add_argument("--out", type=Path, default=RESULTS, help=f"results folder (default {RESULTS})")
    p.add_argument("--readme", action="store_true",
                   help="also copy the tables into README.md (between the bench:start / bench:end markers)")
    args = p.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    bad = set(args.backends) - set(BACKENDS)
    if bad:
        p.error(f"unknown backends {sorted(bad)}; choose from {', '.join(BACKENDS)}")
    args.batches = args.batches or ([1] if args.quick else [1, 16])
    args.repeats = args.repeats or (3 if args.quick else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    args.input_size = args.input_size or (64 if args.quick else 224)
    return args


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.0f} MiB"


def bench_model(name: str, args: argparse.Namespace, device: str, log: Any) -> dict[str, Any]:
    """Every backend and batch of one model; failures are recorded, not raised."""
    entry: dict[str, Any] = {"model": name, "results": [], "errors": []}
    p = prepare(name, sites=args.sites, input_size=(3, args.input_size, args.input_size), device=device,
                lowering=args.lowering)
    try:
        entry.update(sites=p.sites, selection=p.selection, params=p.params, macs=p.macs, mac_floor=p.mac_floor,
                     fx_error=p.errors["fx"], fx_report=p.reports["fx"].summary())
        if "onnxruntime" in args.backends:
            try:
                prepare_onnx(p, lowering=args.lowering)
                entry["onnx_report"] = p.reports["onnx"].summary()
            except Exception as err:  # recorded in the results: one failing model must not stop the run
                entry["errors"].append(f"onnx: {type(err).__name__}: {err}")
        for backend in args.backends:
            if backend == "onnxruntime" and not p.onnx_paths:
                continue
            if args.backend_aware and backend != "onnxruntime":  # (fuse_onnx always chooses for onnxruntime)
                refuse_for(p, backend, args.lowering)
                entry.setdefault("lowerings", {})[backend] = p.reports["fx"].lowerings()
            for batch in args.batches:
                t0 = time.perf_counter()
                try:
                    lat, errs = time_backend(p, backend, batch, repeats=args.repeats, warmup=args.warmup)
                except Exception as err:
                    entry["errors"].append(f"{backend} batch {batch}: {type(err).__name__}: {err}")
                    log(f"  {backend:12s} batch {batch:3d}: FAILED {type(err).__name__}: {err}")
                    continue
                row = {
                    "backend": backend, "batch": batch, "latency": lat.to_dict(),
                    "ratio_unfused": lat.ratio("unfused", "original"), "ratio_fused": lat.ratio("fused", "original"),
                    "iqr_unfused": lat.ratio_spread("unfused", "original"),
                    "iqr_fused": lat.ratio_spread("fused", "original"),
                    "fused_over_unfused": lat.ratio("fused", "unfused"),
                    "iqr_fused_over_unfused": lat.ratio_spread("fused", "unfused"),
                    "max_rel_error": errs, "seconds": time.perf_counter() - t0,
                }
                entry["results"].append(row)
                log(f"  {backend:12s} batch {batch:3d}: original {1e3 * lat.median('original'):8.2f} ms, "
                    f"unfused {row['ratio_unfused']:.3f}, fused {row['ratio_fused']:.3f} "
                    f"(floor {p.mac_floor:.3f}), fused/unfused {row['fused_over_unfused']:.3f}")
        entry.update(wall_s=p.wall_s, peak_bytes=p.peak_bytes)
    finally:
        p.close()
    return entry


def _load_text(load: dict[str, Any] | None, when: str) -> str:
    if load is None:
        return f"load average ({when}) not recorded"
    return LoadAverage(load["one_min"], load["five_min"], load["cores"]).describe(when)


def _isa(machine: dict[str, Any]) -> str:
    """" (AVX512)": the vector ISA torch used, where the run recorded it."""
    return f" ({machine['cpu_capability']})" if machine.get("cpu_capability") else ""


def markdown(data: dict[str, Any]) -> str:
    m = data["machine"]
    lines = [
        f"# X-volution latency: original : unfused : fused ({data['device']})",
        "",
        f"{data['date']}; {m.get('gpu', m['cpu'])}{_isa(m)}; {m['cores']} cores ({m['cores_usable']} usable), "
        f"{m['torch_threads']} torch threads; torch {m['torch']}, onnxruntime {m.get('onnxruntime', '-')}, "
        f"python {m['python']}.",
        f"{_load_text(m.get('load_start'), 'start')}; "
        f"{_load_text(data.get('load_end'), 'end, this benchmark included')}.",
        f"Command: `{data.get('command', 'not recorded')}`.",
        f"Host memory: {m.get('host_memory', 'not recorded')}.",
        f"Input {data['input_size']} px, sites {data['sites']}; median of {data['repeats']} interleaved rounds "
        f"({data['warmup']} warm-up); ratios are to the original model, the median of the per-round ratios; [a-b] "
        "is their 25th-75th percentile. MAC floor = fused MACs / original MACs (docs/operator.md, section 5): "
        "the fused ratio "
        "cannot go below it by arithmetic alone.",
        "",
        "| model | backend | batch | original ms | unfused / original | fused / original | MAC floor "
        "| fused / unfused | max rel err (fused) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for e in data["models"]:
        for r in e["results"]:
            a, b = r["iqr_unfused"]
            c, d = r["iqr_fused"]
            err = r["max_rel_error"].get("fused")
            lines.append(
                f"| {e['model']} | {r['backend']} | {r['batch']} | {r['latency']['original']['median_ms']:.2f} "
                f"| {r['ratio_unfused']:.3f} [{a:.3f}-{b:.3f}] | {r['ratio_fused']:.3f} [{c:.3f}-{d:.3f}] "
                f"| {e['mac_floor']:.3f} | {r['fused_over_unfused']:.3f} | "
                f"{'-' if err is None else f'{err:.1e}'} |")
    lines += [
        "",
        "| model | sites | params original / unfused / fused | MACs original / unfused / fused | xvolify s "
        "| FX fuse s | ONNX export s (x2) | ONNX fuse s | peak mem FX fuse | peak mem ONNX fuse |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for e in data["models"]:
        if "params" not in e:
            continue
        w, pk = e.get("wall_s", {}), e.get("peak_bytes", {})

        def sec(key: str, w: dict[str, float] = w) -> str:
            return f"{w[key]:.2f}" if key in w else "-"

        lines.append(
            f"| {e['model']} | {len(e['sites'])} | {' / '.join(format_count(v) for v in e['params'].values())} "
            f"| {' / '.join(format_count(v) for v in e['macs'].values())} | {sec('xvolify')} | {sec('fuse_fx')} "
            f"| {sec('export_onnx_x2')} | {sec('fuse_onnx')} | {_mib(pk.get('fuse_fx'))} "
            f"| {_mib(pk.get('fuse_onnx'))} |")
    errors = [f"- {e['model']}: {msg}" for e in data["models"] for msg in e["errors"]]
    if errors:
        lines += ["", "Failures:", "", *errors]
    lines += ["", "FX fuse wall time includes its verification forward; peak memory is the resident-set growth "
              "during the pass (GPU: the allocator's peak)."]
    return "\n".join(lines) + "\n"


def plot(data: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    backends = [b for b in BACKENDS if any(r["backend"] == b for e in data["models"] for r in e["results"])]
    if not backends:
        return
    models = [e["model"] for e in data["models"] if e["results"]]
    batches = sorted({r["batch"] for e in data["models"] for r in e["results"]})
    fig, axes = plt.subplots(1, len(backends), figsize=(5.5 * len(backends), 4.2), squeeze=False)
    width = 0.8 / (2 * len(batches))
    for ax, backend in zip(axes[0], backends, strict=True):
        for mi, e in enumerate(e for e in data["models"] if e["results"]):
            for bi, batch in enumerate(batches):
                r = next((r for r in e["results"] if r["backend"] == backend and r["batch"] == batch), None)
                if r is None:
                    continue
                for vi, (key, iqr, colour) in enumerate((("ratio_unfused", "iqr_unfused", "#bdbdbd"),
                                                         ("ratio_fused", "iqr_fused", "#3182bd"))):
                    x = mi - 0.4 + width * (2 * bi + vi + 0.5)
                    lo, hi = r[iqr]
                    ax.bar(x, r[key], width, color=colour, edgecolor="black", linewidth=0.4,
                           hatch="//" if bi else None)
                    ax.errorbar(x, r[key], yerr=[[max(r[key] - lo, 0)], [max(hi - r[key], 0)]], color="black",
                                capsize=2, linewidth=0.8)
            ax.hlines(e["mac_floor"], mi - 0.42, mi + 0.42, colors="#d62728", linewidth=1.5)
        ax.axhline(1.0, color="black", linewidth=0.6)
        ax.set_xticks(range(len(models)))
        ax.set_xticklabels(models, rotation=20, ha="right", fontsize=8)
        ax.set_title(backend, fontsize=10)
        ax.set_ylabel("latency / original")
        ax.set_ylim(bottom=max(0.0, min(0.8, ax.get_ylim()[0])))
    from matplotlib.patches import Patch

    handles = [Patch(facecolor="#bdbdbd", edgecolor="black", label="unfused (eval)"),
               Patch(facecolor="#3182bd", edgecolor="black", label="fused"),
               plt.Line2D([], [], color="#d62728", label="MAC floor (fused / original)")]
    handles += [Patch(facecolor="white", edgecolor="black", hatch="//" if i else None, label=f"batch {b}")
                for i, b in enumerate(batches)]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    m = data["machine"]
    fig.suptitle(f"{m.get('gpu', m['cpu'])}, {m['torch_threads']} threads, torch {m['torch']} - "
                 f"{data['input_size']} px, median of {data['repeats']} interleaved rounds, bars: IQR", fontsize=9)
    fig.tight_layout(rect=(0, 0.07, 1, 0.95))
    with atomic_path(path, force=True) as tmp:
        fig.savefig(tmp, format="png", dpi=130)
    plt.close(fig)


def update_readme(text: str, readme: Path = README) -> None:
    """Replace what is between the benchmark markers of the README with ``text`` (atomic write)."""
    content = readme.read_text()
    start, end = (content.find(m) for m in MARKERS)
    if start < 0 or end < start:
        raise ValueError(f"{readme} has no {MARKERS[0]} ... {MARKERS[1]} block")
    body = text.split("\n", 1)[1].lstrip("\n")  # the markdown's own title line is the README's section title
    new = content[: start + len(MARKERS[0])] + "\n" + body.rstrip() + "\n" + content[end:]
    atomic_write_text(readme, new, force=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.system_allocator:
        hold_freed_memory()
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "No CUDA runtime" on CPU machines
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    started = dt.datetime.now(dt.timezone.utc)
    data: dict[str, Any] = {
        "date": started.strftime("%Y-%m-%d %H:%M UTC"), "device": device, "machine": machine_info(device),
        "input_size": args.input_size, "sites": args.sites, "repeats": args.repeats, "warmup": args.warmup,
        "backends": args.backends, "batches": args.batches, "models": [],
        "command": " ".join(["python benchmarks/run.py", *(sys.argv[1:] if argv is None else argv)]),
    }

    def log(text: str) -> None:
        print(text, flush=True)

    log(load_line("start"))
    log(f"{len(args.models)} model(s) x {args.backends} x batch {args.batches} on {device}, "
        f"{torch.get_num_threads()} threads, {args.repeats} rounds")
    failed = False
    for name in args.models:
        log(f"{name}:")
        t0 = time.perf_counter()
        try:
            entry = bench_model(name, args, device, log)
        except Exception as err:  # recorded: the other models still run
            failed = True
            entry = {"model": name, "results": [], "errors": [f"{type(err).__name__}: {err}"]}
            log(f"  FAILED: {type(err).__name__}: {err}")
            traceback.print_exc()
        entry["seconds"] = time.perf_counter() - t0
        data["models"].append(entry)
    end_load = load_average()
    data["load_end"] = None if end_load is None else end_load.to_dict()
    stem = "quick" if args.quick else "latest"
    args.out.mkdir(parents=True, exist_ok=True)
    text = markdown(data)
    atomic_write_text(args.out / f"{stem}.md", text, force=True)
    if not args.quick:
        atomic_write_text(args.out / f"{started.strftime('%Y%m%d-%H%M%S')}-{device}.md", text, force=True)
    atomic_write_json(args.out / f"{stem}.json", data, force=True)
    plot(data, args.out / f"{stem}.png")
    if args.readme and not args.quick:
        update_readme(text + f"\nPlot: `{args.out.name}/{stem}.png` (under `benchmarks/`).\n")
    log("")
    log(text)
    log(f"wrote {args.out / stem}.md, .json, .png")
    return 1 if failed or any(e["errors"] for e in data["models"]) else 0


if __name__ == "__main__":
    sys.exit(main())
