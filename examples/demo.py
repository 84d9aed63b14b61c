"""End-to-end demo: xvolify a torchvision model, train it briefly on digits, fuse it (FX and ONNX), verify.

    python examples/demo.py                       # resnet18, about two minutes on 2 CPU cores
    python examples/demo.py --model mobilenet_v3_large --steps 150
    python examples/demo.py --steps 5 --quick     # smoke test: seconds of training, few timing repeats

Steps: build the model (``weights=None``, 10 classes) -> ``xvolify`` at the
default sites (output stride 16) -> train on the scikit-learn digits set for a
bounded number of steps / seconds -> accuracy -> ``fuse`` (torch.fx) -> fused
accuracy and error vs unfused -> ``torch.compile`` the fused model, check it
matches -> export the unfused model to ONNX -> ``fuse_onnx`` -> run in
onnxruntime and compare -> one summary table. Artifacts go to ``--out``
(default ``xvol-demo-out/``, created if missing; its parent must exist):
``fused.pt`` (state dict + how to rebuild it, loadable by ``xvol``),
``unfused.pt``, ``fused.onnx``, ``report.json`` and ``report.txt``, written
together at the end: all five or none. The exit status is 1 when a
verification fails.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))

from digits import accuracy, digits_loaders, predict, train_steps

from xvol_compiler import fuse, xvolify
from xvol_compiler.files import (
    OutputError,
    atomic_write_json,
    atomic_write_text,
    check_output_dir,
    check_outputs,
    written_together,
)
from xvol_compiler.io import InputError, ModelSpec, save_model, torchvision_model
from xvol_compiler.measure import count_macs, count_params, interleaved_latency, machine_info, max_error
from xvol_compiler.onnx_io import save_onnx
from xvol_compiler.onnx_verify import onnx_session
from xvol_compiler.report import format_count
from xvol_passes.fuse_onnx import export_onnx, fuse_onnx

ARTIFACTS = ("fused.pt", "unfused.pt", "fused.onnx", "report.json", "report.txt")
# Models whose auxiliary classifiers return tuples in training mode.
NO_AUX = {"googlenet": {"aux_logits": False, "init_weights": True}, "inception_v3": {"aux_logits": False,
                                                                                 "init_weights": True}}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet18", help="torchvision classification model name (default resnet18)")
    p.add_argument("--sites", default="os16", help="xvolify site policy: os16, os8, all, re:<pattern>, a,b names")
    p.add_argument("--image-size", type=int, default=32, help="training / evaluation image size (default 32)")
    p.add_argument("--steps", type=int, default=150,
                   help="at most this many training steps (default 150: about 97%% test accuracy for resnet18)")
    p.add_argument("--seconds", type=float, default=120.0,
                   help="at most this many seconds of training (default 120; a busy machine takes fewer steps)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--latency-size", type=int, default=None,
                   help="image size for the latency and MAC figures (default 224; --quick: --image-size)")
    p.add_argument("--repeats", type=int, default=None, help="interleaved latency rounds (default 15; --quick: 3)")
    p.add_argument("--rtol", type=float, default=1e-4,
                   help="largest error allowed, relative to the largest output magnitude (default 1e-4)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile check")
    p.add_argument("--quick", action="store_true", help="smoke-test settings: tiny latency run at the training size")
    p.add_argument("--out", type=Path, default=Path("xvol-demo-out"), help="artifact folder (default xvol-demo-out/)")
    p.add_argument("--force", action="store_true", help="overwrite artifacts already in --out")
    args = p.parse_args(argv)
    if args.latency_size is None:
        args.latency_size = args.image_size if args.quick else 224
    if args.repeats is None:
        args.repeats = 3 if args.quick else 15
    if args.steps < 0 or args.seconds < 0 or args.repeats < 1:
        p.error("--steps and --seconds must be >= 0, --repeats >= 1")
    return args


def _sites_arg(text: str) -> Any:
    return [s for s in text.split(",") if s] if "," in text else text


def _ok(flag: bool) -> str:
    return "[green]ok[/green]" if flag else "[bold red]FAILED[/bold red]"


def _ort_session(model: Any) -> Any:
    return onnx_session(model, threads=torch.get_num_threads())


def run(args: argparse.Namespace, console: Console) -> int:
    check_output_dir(args.out)
    if args.out.is_dir():
        check_outputs([args.out / name for name in ARTIFACTS], force=args.force)
    torch.manual_seed(args.seed)
    kwargs = NO_AUX.get(args.model, {})
    original = torchvision_model(args.model, num_classes=10, **kwargs).eval()
    example = (torch.randn(1, 3, args.image_size, args.image_size),)
    checks: dict[str, bool] = {}

    # 1. xvolify
    t0 = time.perf_counter()
    model = xvolify(original, sites=_sites_arg(args.sites), example_inputs=example)
    xv_report = model.xvol_report
    sites = list(xv_report.selected_names)
    console.print(f"xvolify: {len(sites)} site(s) of {args.model} at {xv_report.selection} "
                  f"({time.perf_counter() - t0:.1f} s): {', '.join(sites)}")

    # 2. train
    train_loader, test_loader = digits_loaders(args.image_size, args.batch_size, seed=args.seed)
    losses: list[float] = []
    with Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
                  TimeElapsedColumn(), console=console, transient=False) as progress:
        task = progress.add_task("train", total=args.steps, loss="-")

        def on_step(step: int, loss: float) -> None:
            progress.update(task, completed=step, loss=f"{loss:.3f}")

        t0 = time.perf_counter()
        if args.steps > 0:
            losses = train_steps(model, train_loader, steps=args.steps, seconds=args.seconds, lr=args.lr,
                                 on_step=on_step)
        train_seconds = time.perf_counter() - t0
    model.eval()

    # 3. accuracy, 4. FX fusion
    logits_u, labels = predict(model, test_loader)
    acc_u = accuracy(logits_u, labels)
    t0 = time.perf_counter()
    fused = fuse(model, example_inputs=example, verify=True, rtol=args.rtol)
    fuse_seconds = time.perf_counter() - t0
    fx_report = fused.xvol_fusion_report
    logits_f, _ = predict(fused, test_loader)
    acc_f = accuracy(logits_f, labels)
    err_fx = max_error(logits_u, logits_f)
    checks["fx"] = err_fx[1] <= args.rtol
    agree = float((logits_u.argmax(1) == logits_f.argmax(1)).float().mean())

    # 5. torch.compile
    err_compile: tuple[float, float] | None = None
    if not args.no_compile:
        compiled = torch.compile(fused)
        xb = next(iter(test_loader))[0]
        with torch.no_grad():
            err_compile = max_error(fused(xb), compiled(xb))
        checks["compile"] = err_compile[1] <= max(args.rtol, 1e-4)

    # 6. ONNX: export the unfused model, fuse the graph, run it in onnxruntime
    with tempfile.TemporaryDirectory() as tmp:
        unfused_onnx = Path(tmp) / "unfused.onnx"
        t0 = time.perf_counter()
        export_onnx(model, unfused_onnx, example)
        export_seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        fused_onnx, onnx_report = fuse_onnx(str(unfused_onnx), verify=True, rtol=args.rtol)
        fuse_onnx_seconds = time.perf_counter() - t0
    session = _ort_session(fused_onnx)
    input_name = session.get_inputs()[0].name
    logits_o = torch.cat([torch.from_numpy(session.run(None, {input_name: xb.numpy()})[0]) for xb, _ in test_loader])
    err_onnx = max_error(logits_u, logits_o)
    acc_o = accuracy(logits_o, labels)
    checks["onnx"] = err_onnx[1] <= args.rtol

    # 7. cost: params, MACs, latency (eager, batch 1), interleaved
    big = (torch.randn(1, 3, args.latency_size, args.latency_size),)
    variants = {"original": original.eval(), "unfused": model, "fused": fused}
    macs = {k: count_macs(m, big) for k, m in variants.items()}
    params = {k: count_params(m) for k, m in variants.items()}
    with torch.inference_mode():
        lat = interleaved_latency({k: (lambda m=m: m(*big)) for k, m in variants.items()}, repeats=args.repeats,
                                  warmup=1)
    r_unfused, r_fused = lat.ratio("unfused", "original"), lat.ratio("fused", "original")
    floor = macs["fused"] / macs["original"]

    # 8. the table
    def err_text(err: tuple[float, float] | None, check: str) -> str:
        if err is None:
            return "skipped (--no-compile)"
        return f"{err[0]:.2e} abs, {err[1]:.2e} rel  {_ok(checks[check])}"

    n_fx, n_onnx = fx_report.count("x-volution"), onnx_report.count("x-volution")
    table = Table(title=f"X-volution demo: {args.model} on digits ({args.image_size} px)", show_lines=False)
    table.add_column("quantity")
    table.add_column("value")
    rows = [
        ("sites", f"{len(sites)} at {xv_report.selection}: {', '.join(sites)}"),
        ("training", f"{len(losses)} steps, {train_seconds:.0f} s, batch {args.batch_size}, last loss "
                     f"{losses[-1] if losses else float('nan'):.3f}"),
        ("params original / unfused / fused", " / ".join(format_count(params[k]) for k in variants)),
        (f"MACs original / unfused / fused ({args.latency_size} px)",
         " / ".join(format_count(macs[k]) for k in variants) + f"  (floor fused/original {floor:.3f})"),
        ("accuracy unfused / fused / ONNX", f"{100 * acc_u:.1f}% / {100 * acc_f:.1f}% / {100 * acc_o:.1f}%  "
                                            f"(argmax agreement {100 * agree:.1f}%)"),
        ("FX fusion", f"{n_fx} site(s) fused, {len(fx_report.refused)} refused, {fuse_seconds:.1f} s"),
        ("max error FX fused vs unfused", err_text(err_fx, "fx")),
        ("max error torch.compile vs eager fused", err_text(err_compile, "compile")),
        ("ONNX fusion", f"{n_onnx} site(s) fused, {len(onnx_report.refused)} refused, export {export_seconds:.1f} s, "
                        f"fuse {fuse_onnx_seconds:.1f} s"),
        ("max error ONNX fused (onnxruntime) vs unfused", err_text(err_onnx, "onnx")),
        (f"latency original : unfused : fused (eager, batch 1, {args.latency_size} px)",
         f"1 : {r_unfused:.3f} : {r_fused:.3f}  (fused/unfused {lat.ratio('fused', 'unfused'):.3f}; median of "
         f"{args.repeats} interleaved rounds; original {1e3 * lat.median('original'):.1f} ms)"),
    ]
    for row in rows:
        table.add_row(*row)
    for note in onnx_report.notes:
        table.add_row("note", note)
    console.print(table)

    # 9. artifacts
    spec = ModelSpec(model=args.model, num_classes=10, stage="xvolified", sites=sites, xvolify={},
                     input_size=[3, args.image_size, args.image_size])
    fused_spec = ModelSpec(**{**spec.to_dict(), "stage": "fused"})
    summary = {
        "model": args.model, "image_size": args.image_size, "sites": sites, "selection": xv_report.selection,
        "training": {"steps": len(losses), "seconds": train_seconds, "last_loss": losses[-1] if losses else None},
        "params": params, "macs": macs, "macs_size": args.latency_size, "mac_floor_fused_over_original": floor,
        "accuracy": {"unfused": acc_u, "fused": acc_f, "onnx": acc_o, "argmax_agreement": agree},
        "max_error": {"fx": err_fx, "compile": err_compile, "onnx": err_onnx},
        "checks": checks, "rtol": args.rtol,
        "latency": {"backend": "eager", "batch": 1, "size": args.latency_size, "rounds": lat.to_dict(),
                    "ratio_unfused": r_unfused, "ratio_fused": r_fused,
                    "ratio_unfused_spread": lat.ratio_spread("unfused", "original"),
                    "ratio_fused_spread": lat.ratio_spread("fused", "original")},
        "wall_seconds": {"train": train_seconds, "fuse_fx": fuse_seconds, "export_onnx": export_seconds,
                         "fuse_onnx": fuse_onnx_seconds},
        "machine": machine_info(),
        "xvolify_report": xv_report.to_dict(), "fx_fusion_report": fx_report.to_dict(),
        "onnx_fusion_report": onnx_report.to_dict(),
    }
    text_console = Console(record=True, width=160, file=io.StringIO())
    text_console.print(table)
    text = "\n\n".join([text_console.export_text(), str(xv_report), str(fx_report), str(onnx_report)])
    created = not args.out.exists()
    args.out.mkdir(exist_ok=True)  # the artifact folder itself, never its parents (checked at the start)
    try:
        with written_together():  # all five artifacts or none
            save_model(args.out / "unfused.pt", model, spec, force=args.force)
            save_model(args.out / "fused.pt", fused, fused_spec, force=args.force)
            save_onnx(fused_onnx, args.out / "fused.onnx", force=args.force)
            atomic_write_json(args.out / "report.json", summary, force=args.force)
            atomic_write_text(args.out / "report.txt", text + "\n", force=args.force)
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                args.out.rmdir()
        raise
    console.print(f"artifacts in {args.out}/: {', '.join(ARTIFACTS)}")
    failed = [k for k, v in checks.items() if not v]
    if failed:
        console.print(f"[bold red]verification failed: {', '.join(failed)}[/bold red]")
        return 1
    console.print("[green]all verifications passed[/green]")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "No CUDA runtime" on CPU machines
    console = Console()
    try:
        return run(args, console)
    except (InputError, OutputError, FileExistsError, FileNotFoundError) as err:
        Console(stderr=True).print(f"demo: error: {err}", markup=False, highlight=False)
        return 2


if __name__ == "__main__":
    sys.exit(main())
