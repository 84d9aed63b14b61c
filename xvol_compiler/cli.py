"""The ``xvol`` command: a thin layer over the passes (``xvolify``, ``fuse``, ``fuse_onnx``) and their reports.

Every subcommand has ``--help``; ``--json`` prints one JSON object to stdout
instead of tables (errors still go to stderr). A user error (bad model name,
missing or corrupt file, existing output without ``--force``) is one line on
stderr and exit status 1; a failed verification is exit status 1 as well;
``--traceback`` shows the Python traceback of an error.

MODEL arguments are a torchvision model name (built with ``weights=None``,
nothing is downloaded) or a checkpoint written by ``xvol xvolify`` /
``xvol fuse`` / the demo, which records how to rebuild its model; checkpoints
are read with ``torch.load(weights_only=True)``. Outputs are written
atomically and never over an existing file without ``--force``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["build_parser", "main"]

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2


class VerificationFailed(Exception):
    """Outputs differ beyond the tolerance; the message says by how much."""


# ---------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------


class Output:
    """Tables and lines to stdout (rich), or a single JSON object with ``--json``."""

    def __init__(self, as_json: bool) -> None:
        from rich.console import Console

        self.as_json = as_json
        # Captured or piped output is not cut to 80 columns.
        self.console = Console(highlight=False, soft_wrap=False, width=None if sys.stdout.isatty() else 200)

    def print(self, *items: Any) -> None:
        if not self.as_json:
            self.console.print(*items)

    def line(self, text: str) -> None:
        if not self.as_json:
            self.console.print(text, markup=False)

    def json(self, data: Any) -> None:
        if self.as_json:
            sys.stdout.write(json.dumps(data, indent=2, default=_jsonable) + "\n")


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if hasattr(value, "to_dict"):
        return value.to_dict()
    return str(value)


def _rich_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], title: str = "", caption: str = "") -> Any:
    from rich.table import Table

    table = Table(title=title or None, caption=caption or None, caption_justify="left")
    for i, h in enumerate(headers):
        numeric = bool(rows) and all(_numeric(str(r[i])) for r in rows)
        table.add_column(h, justify="right" if numeric else "left", overflow="fold")
    for r in rows:
        table.add_row(*(str(c) for c in r))
    return table


_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)(e[+-]?\d+)?[KMG%]?")


def _numeric(text: str) -> bool:
    return text == "-" or _NUMBER.fullmatch(text) is not None


# ---------------------------------------------------------------------------
# Arguments shared by several subcommands
# ---------------------------------------------------------------------------


def _input_size(values: Sequence[int] | None) -> list[int] | None:
    """``S`` -> [3, S, S]; ``H W`` -> [3, H, W]; ``C H W`` as given."""
    if not values:
        return None
    if any(v < 1 for v in values):
        raise ValueError(f"--input-size values must be >= 1, got {list(values)}")
    if len(values) == 1:
        return [3, values[0], values[0]]
    if len(values) == 2:
        return [3, *values]
    if len(values) == 3:
        return list(values)
    raise ValueError(f"--input-size takes S, H W or C H W, got {len(values)} numbers")


def _sites(text: str) -> Any:
    """``os16``, ``all``, ``re:<pattern>``, a name, or comma-separated names."""
    names = [s.strip() for s in text.split(",") if s.strip()]
    if not names:
        raise ValueError("--sites is empty")
    return names if len(names) > 1 else names[0]


def _add_model(p: argparse.ArgumentParser, what: str = "MODEL") -> None:
    p.add_argument("model", metavar=what,
                   help="torchvision model name (weights=None) or a checkpoint written by xvol / the demo")
    p.add_argument("--num-classes", type=int, default=1000, help="classifier size for a model given by name "
                   "(default 1000)")
    p.add_argument("--input-size", type=int, nargs="+", metavar="N",
                   help="example input: S, H W or C H W (default 3 224 224, or what the checkpoint records)")


def _add_json(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")


def _add_xvolify_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sites", default="os16",
                   help="site policy: os16 (default), os8, ..., all, re:<pattern>, a name or comma-separated names")
    p.add_argument("--shift", type=int, default=1, help="PSSA shift length L (default 1)")
    p.add_argument("--directions", default=None,
                   help="PSSA neighbourhood: 4/axial or 8/full in 2-D (default full)")
    p.add_argument("--directional", action="store_true", help="one PSSA product per direction (|D| x channels)")
    p.add_argument("--extra-branches", default="", help="comma-separated RepVGG-style branches: 1x1,identity,bn")
    p.add_argument("--attention", choices=("pssa", "global"), default="pssa",
                   help="pssa (fusable, default) or global self-attention (not fusable)")


def _xvolify_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    directions: Any = args.directions
    if directions is not None and directions.isdigit():
        directions = int(directions)
    kwargs: dict[str, Any] = {
        "shift": args.shift,
        "directions": directions,
        "directional": args.directional,
        "extra_branches": [b.strip() for b in args.extra_branches.split(",") if b.strip()],
        "attention": args.attention,
    }
    return kwargs


def _load(args: argparse.Namespace) -> tuple[Any, Any]:
    from xvol_compiler.io import load_model

    if str(args.model).endswith(".onnx"):
        raise ValueError(f"{args.model} is an ONNX file; this command takes a torchvision name or a checkpoint")
    return load_model(args.model, num_classes=args.num_classes, input_size=_input_size(args.input_size))


# ---------------------------------------------------------------------------
# Subcommands
# ---------------------------------------------------------------------------


def cmd_sites(args: argparse.Namespace, out: Output) -> int:
    """Candidate and selected X-volution sites of a model."""
    from xvol_compiler.passes.xvolify import added_cost
    from xvol_compiler.report import format_count, format_stride
    from xvol_compiler.sites import analyze_model, select_sites

    model, spec = _load(args)
    example = spec.example_inputs(model)
    found = analyze_model(model, example)
    kwargs = _xvolify_kwargs(args)
    kwargs.pop("shift")

    def cost(info: Any) -> tuple[int, int]:
        return added_cost(info, **kwargs)

    decisions = select_sites(model, found, _sites(args.sites), cost=cost, allow_empty=True)
    shown = [d for d in decisions if args.all or d.selected or (d.info.ran and not d.info.pointwise)]
    selected = [d for d in decisions if d.selected]
    added = sum(d.added_macs for d in selected)

    def strides(d: Any) -> str:
        if not d.info.ran:
            return "not run"
        return ",".join(format_stride(s) for s in dict.fromkeys(d.info.output_strides))

    def geometry(d: Any) -> str:
        g = d.info.geometry
        text = f"{g.in_channels}->{g.out_channels} k{'x'.join(map(str, g.kernel_size))} " \
               f"s{'x'.join(map(str, g.stride))}"
        if any(v != 1 for v in g.dilation):
            text += f" d{'x'.join(map(str, g.dilation))}"
        return text + (f" g{g.groups}" if g.groups != 1 else "")

    data = {
        "model": spec.model,
        "inputs": found.inputs,
        "selection": str(args.sites),
        "model_macs": found.total_macs,
        "model_params": found.total_params,
        "selected": [d.info.name for d in selected],
        "added_macs": added,
        "added_mac_fraction": added / found.total_macs if found.total_macs else None,
        "sites": [
            {
                "name": d.info.name, "type": d.info.conv_type, "geometry": geometry(d),
                "in_channels": d.info.geometry.in_channels, "out_channels": d.info.geometry.out_channels,
                "kernel_size": list(d.info.geometry.kernel_size), "stride": list(d.info.geometry.stride),
                "groups": d.info.geometry.groups, "output_strides": [format_stride(s) for s in d.info.output_strides],
                "macs": d.info.macs, "added_macs": d.added_macs, "added_params": d.added_params,
                "selected": d.selected, "reason": d.reason,
            }
            for d in shown
        ],
    }
    out.json(data)
    rows = [
        [d.info.name, geometry(d), strides(d), format_count(d.info.macs),
         format_count(d.added_macs) if d.selected else "-", "yes" if d.selected else "no",
         "" if d.selected else d.reason]
        for d in shown
    ]
    caption = (f"{len(selected)} selected of {len(shown)} {'convs' if args.all else 'spatial convs'} "
               f"({len(decisions)} convs in all); +{format_count(added)} MACs = "
               f"{100 * added / max(found.total_macs, 1):.1f}% of {format_count(found.total_macs)}; "
               f"inputs {found.inputs}")
    out.print(_rich_table(["site", "geometry", "output stride", "MACs", "+MACs", "selected", "why not"], rows,
                          title=f"{spec.model}: sites for {args.sites}", caption=caption))
    return EXIT_OK


def cmd_xvolify(args: argparse.Namespace, out: Output) -> int:
    """Insert X-volution at the selected sites; save a checkpoint that ``xvol fuse`` can rebuild."""
    from xvol_compiler import xvolify
    from xvol_compiler.io import ModelSpec, check_writable, save_model

    check_writable(args.output, force=args.force)
    model, spec = _load(args)
    if spec.stage != "original":
        raise ValueError(f"{args.model} is already {spec.stage}; xvolify a plain model")
    kwargs = _xvolify_kwargs(args)
    result = xvolify(model, sites=_sites(args.sites), example_inputs=spec.example_inputs(model), **kwargs)
    report = result.xvol_report
    new = ModelSpec(model=spec.model, num_classes=spec.num_classes, stage="xvolified",
                    sites=list(report.selected_names), xvolify=kwargs, input_size=spec.input_size)
    save_model(args.output, result, new, force=args.force)
    out.json({"output": str(args.output), "sites": new.sites, "report": report.to_dict()})
    out.print(report)
    out.line(f"wrote {args.output} ({len(new.sites)} site(s))")
    return EXIT_OK


def _lowering_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lowering", choices=("auto", "channel", "spatial", "split"), default="auto",
                   help="deploy form of each site: auto (fastest exact one for the backend, measured), channel, "
                        "spatial or split (default auto)")
    p.add_argument("--split", action="store_true",
                   help="allow more than one convolution per site (the split lowering: two convs and an add)")


def cmd_fuse(args: argparse.Namespace, out: Output) -> int:
    """Fuse every site (and conv+BN) of a model in torch.fx; save the fused checkpoint and optionally ONNX."""
    from xvol_compiler import fuse
    from xvol_compiler.io import check_writable, save_model
    from xvol_compiler.onnx_io import check_output_path
    from xvol_compiler.passes.fuse_onnx import export_onnx

    check_writable(args.output, force=args.force)
    if args.onnx:
        check_output_path(args.onnx, force=args.force)
    model, spec = _load(args)
    if spec.stage == "fused":
        raise ValueError(f"{args.model} is already fused")
    example = spec.example_inputs(model)
    fused = fuse(model.eval(), example_inputs=example, verify=not args.no_verify, rtol=args.rtol,
                 backend=args.backend, lowering=args.lowering, single_conv=not args.split)
    report = fused.xvol_fusion_report
    spec.stage = "fused"
    spec.lowerings = report.lowerings()
    save_model(args.output, fused, spec, force=args.force)
    if args.onnx:
        export_onnx(fused, args.onnx, example, force=args.force)
    out.json({"output": str(args.output), "onnx": args.onnx, "report": report.to_dict()})
    out.line(str(report))
    out.line(f"wrote {args.output}" + (f" and {args.onnx}" if args.onnx else ""))
    return EXIT_OK


def cmd_export(args: argparse.Namespace, out: Output) -> int:
    """Export a model (original, xvolified or fused) to ONNX."""
    from xvol_compiler.onnx_io import check_output_path
    from xvol_compiler.passes.fuse_onnx import export_onnx

    check_output_path(args.output, force=args.force)
    model, spec = _load(args)
    export_onnx(model.eval(), args.output, spec.example_inputs(model), opset=args.opset,
                dynamic_batch=not args.static_batch, optimize=not args.no_optimize, force=args.force)
    out.json({"output": str(args.output), "model": spec.model, "stage": spec.stage})
    out.line(f"wrote {args.output} ({spec.model}, {spec.stage})")
    return EXIT_OK


def cmd_fuse_onnx(args: argparse.Namespace, out: Output) -> int:
    """Fuse every X-volution site, conv+BN and branch sum of an ONNX model; verify in onnxruntime."""
    from xvol_compiler.io import atomic_write_json, atomic_write_text, check_writable
    from xvol_compiler.onnx_io import check_output_path
    from xvol_compiler.passes.fuse_onnx import fuse_onnx

    check_output_path(args.output, force=args.force)
    if args.report not in (None, "-"):
        check_writable(args.report, force=args.force)
    _, report = fuse_onnx(args.input, verify=not args.no_verify, rtol=args.rtol, output_path=args.output,
                          force=args.force, lowering=args.lowering, single_conv=not args.split)
    if args.report not in (None, "-"):
        path = Path(args.report)
        if path.suffix == ".json":
            atomic_write_json(path, report.to_dict(), force=args.force)
        else:
            atomic_write_text(path, str(report) + "\n", force=args.force)
    out.json({"input": args.input, "output": args.output, "report": report.to_dict()})
    out.line(str(report) if args.report == "-" else report.summary())
    out.line(f"wrote {args.output}" + (f" and {args.report}" if args.report not in (None, "-") else ""))
    return EXIT_OK


def _run_torch(model: Any, inputs: tuple[Any, ...]) -> Any:
    import torch

    with torch.no_grad():
        return model(*inputs)


def _run_onnx(path: str, inputs: tuple[Any, ...]) -> list[Any]:
    import onnxruntime as ort

    from xvol_compiler.onnx_io import load_onnx

    proto = load_onnx(path).model
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return session.run(None, {n: t.numpy() for n, t in zip(names, inputs, strict=True)})


def cmd_verify(args: argparse.Namespace, out: Output) -> int:
    """Compare two ONNX files, a model and its fused form, or a model and an ONNX file, on random inputs."""
    import torch

    from xvol_compiler.measure import max_error

    torch.manual_seed(args.seed)
    size = _input_size(args.input_size)
    a, b = args.a, args.b
    how: str
    if a.endswith(".onnx") and (b is None or b.endswith(".onnx")):
        from xvol_compiler.onnx_io import load_onnx
        from xvol_compiler.passes.fuse_onnx import compare_onnx, fuse_onnx

        first = load_onnx(a).model
        if b is None:
            second, _ = fuse_onnx(first, verify=False)
            how = f"{a} vs its fused form (fuse_onnx)"
        else:
            second = load_onnx(b).model
            how = f"{a} vs {b} (onnxruntime)"
        feeds = None
        if size is not None:
            feeds = [torch.randn(args.batch, *size).numpy()]
        abs_err, rel_err = compare_onnx(first, second, feeds)
    else:
        from xvol_compiler.io import load_model

        torch_arg, onnx_arg = (a, b) if not a.endswith(".onnx") else (b, a)
        model, spec = load_model(torch_arg, num_classes=args.num_classes, input_size=size)
        inputs = tuple(t.repeat(args.batch, *([1] * (t.dim() - 1))) if isinstance(t, torch.Tensor) else t
                       for t in spec.example_inputs(model))
        ref = _run_torch(model, inputs)
        if onnx_arg is not None and onnx_arg.endswith(".onnx"):
            got = _run_onnx(onnx_arg, inputs)
            how = f"{torch_arg} (torch) vs {onnx_arg} (onnxruntime)"
        elif onnx_arg is not None:
            other, _ = load_model(onnx_arg, num_classes=args.num_classes, input_size=size)
            got = _run_torch(other, inputs)
            how = f"{torch_arg} vs {onnx_arg} (torch)"
        else:
            from xvol_compiler import fuse

            fused = fuse(model.eval(), example_inputs=inputs, verify=False)
            got = _run_torch(fused, inputs)
            how = f"{torch_arg} vs its fused form (fuse)"
        abs_err, rel_err = max_error(ref, got)
    ok = rel_err <= args.rtol
    out.json({"compared": how, "max_abs_error": abs_err, "max_rel_error": rel_err, "rtol": args.rtol, "ok": ok})
    out.line(f"{how}: max abs error {abs_err:.3g}, relative {rel_err:.3g} (rtol {args.rtol:g}): "
             f"{'ok' if ok else 'FAILED'}")
    if not ok:
        raise VerificationFailed(f"outputs differ: relative error {rel_err:.3g} > rtol {args.rtol:g}")
    return EXIT_OK


def cmd_bench(args: argparse.Namespace, out: Output) -> int:
    """Latency ratios original : unfused : fused of one torchvision model, interleaved repeats."""
    import torch

    from xvol_compiler.benchmark import BACKENDS, prepare, prepare_onnx, time_backend
    from xvol_compiler.io import is_classification, model_names
    from xvol_compiler.measure import machine_info
    from xvol_compiler.report import format_count

    if args.model not in model_names():
        from xvol_compiler.io import torchvision_model

        torchvision_model(args.model)  # raises the "did you mean" error
    if not is_classification(args.model):
        raise ValueError(f"xvol bench takes a torchvision classification model; {args.model} is not one")
    backends = [b.strip() for b in args.backend.split(",") if b.strip()]
    unknown = set(backends) - set(BACKENDS)
    if unknown:
        raise ValueError(f"unknown backend(s) {sorted(unknown)}; choose from {', '.join(BACKENDS)}")
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "No CUDA runtime" on CPU machines
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    size = _input_size(args.input_size) or [3, 224, 224]
    p = prepare(args.model, sites=_sites(args.sites), input_size=size, num_classes=args.num_classes, device=device)
    try:
        if "onnxruntime" in backends:
            prepare_onnx(p)
        rows, results = [], []
        for backend in backends:
            for batch in args.batch:
                lat, errs = time_backend(p, backend, batch, repeats=args.repeats, warmup=args.warmup)
                r_u, r_f = lat.ratio("unfused", "original"), lat.ratio("fused", "original")
                s_f = lat.ratio_spread("fused", "original")
                results.append({"backend": backend, "batch": batch, "latency": lat.to_dict(),
                                "ratio_unfused": r_u, "ratio_fused": r_f, "ratio_fused_iqr": s_f,
                                "fused_over_unfused": r_f / r_u, "max_rel_error": errs})
                rows.append([backend, batch, f"{1e3 * lat.median('original'):.2f}", f"{r_u:.3f}", f"{r_f:.3f}",
                             f"{s_f[0]:.3f}-{s_f[1]:.3f}", f"{r_f / r_u:.3f}", f"{p.mac_floor:.3f}",
                             f"{max(errs.values()):.1e}" if errs else "-"])
    finally:
        p.close()
    data = {"model": args.model, "device": device, "input_size": size, "sites": p.sites, "params": p.params,
            "macs": p.macs, "mac_floor": p.mac_floor, "wall_s": p.wall_s, "peak_bytes": p.peak_bytes,
            "repeats": args.repeats, "results": results, "machine": machine_info(device)}
    out.json(data)
    caption = (f"{len(p.sites)} sites ({p.selection}); params {' / '.join(format_count(v) for v in p.params.values())}"
               f"; MACs {' / '.join(format_count(v) for v in p.macs.values())} (original / unfused / fused); "
               f"ratios: median and IQR of the per-round ratios over {args.repeats} interleaved rounds")
    out.print(_rich_table(
        ["backend", "batch", "original ms", "unfused/orig", "fused/orig", "fused IQR", "fused/unfused",
         "MAC floor", "max rel err"], rows, title=f"{args.model} on {device}", caption=caption))
    return EXIT_OK


def cmd_graph(args: argparse.Namespace, out: Output) -> int:
    """Picture of one site's neighbourhood before and after fusion (FX or ONNX), or of a whole fused graph."""
    from xvol_compiler import fuse, pictures, xvolify
    from xvol_compiler.io import check_writable
    from xvol_compiler.passes.fuse_onnx import export_onnx, fuse_onnx

    check_writable(args.output, force=args.force)
    if Path(args.output).suffix.lower() not in (".png", ".svg", ".pdf"):
        raise ValueError(f"{args.output}: the picture must be a .png, .svg or .pdf file")
    site = args.site
    if args.model.endswith(".onnx"):
        from xvol_compiler.onnx_io import load_onnx

        before_proto = load_onnx(args.model).model
        after_proto, report = fuse_onnx(before_proto, verify=False)
        site = site or _first_onnx_site(before_proto)
        before: Callable[[], Any] = lambda: pictures.onnx_graph(before_proto)  # noqa: E731
        after: Callable[[], Any] = lambda: pictures.onnx_graph(after_proto)  # noqa: E731
        kind, name = "ONNX", Path(args.model).name
    else:
        model, spec = _load(args)
        example = spec.example_inputs(model)
        if spec.stage == "original":
            model = xvolify(model, sites=_sites(args.sites), example_inputs=example, **_xvolify_kwargs(args))
        if spec.stage == "fused":
            raise ValueError(f"{args.model} is already fused: give the unfused model or checkpoint")
        unfused = model.eval()
        sites = [n for n, m in unfused.named_modules() if type(m).__name__ in ("XVolution",
                                                                              "GlobalAttentionXVolution")]
        site = site or (sites[0] if sites else None)
        name = spec.model
        if args.onnx:
            with tempfile.TemporaryDirectory(prefix="xvol-graph-") as tmp:
                before_proto = export_onnx(unfused, Path(tmp) / "unfused.onnx", example)
            after_proto, report = fuse_onnx(before_proto, verify=False)
            before = lambda: pictures.onnx_graph(before_proto)  # noqa: E731
            after = lambda: pictures.onnx_graph(after_proto)  # noqa: E731
            kind = "ONNX"
        else:
            fused = fuse(unfused, example_inputs=example, verify=False)
            report = fused.xvol_fusion_report
            before = lambda: pictures.fx_graph(unfused)  # noqa: E731
            after = lambda: pictures.fx_graph(fused)  # noqa: E731
            kind = "torch.fx"
    if args.whole:
        panels = [pictures.whole_panel(after(), f"{name}: whole fused graph ({kind})")]
        title = f"{name} after fusion ({kind}): {report.summary()}"
    else:
        if not site:
            raise ValueError("no X-volution site found: name one with --site")
        panels = pictures.site_panels(before, after, site, hops=args.hops)
        title = f"{name}: site {site} ({kind})"
    pictures.draw_graphs(panels, args.output, title=title, force=args.force)
    out.json({"output": str(args.output), "site": None if args.whole else site, "graph": kind,
              "nodes": [len(g) for _, g in panels]})
    out.line(f"wrote {args.output}")
    return EXIT_OK


def _first_onnx_site(proto: Any) -> str | None:
    """The module scope of the first PSSA-looking pattern in an exported graph (an AveragePool feeding Mul)."""
    for node in proto.graph.node:
        meta = {p.key: p.value for p in node.metadata_props}
        scopes = meta.get("pkg.torch.onnx.name_scopes", "")
        if node.op_type == "AveragePool" and scopes:
            parts = [s.strip(" '\"") for s in scopes.strip("[]").split(",")]
            if len(parts) >= 2:
                return parts[-2]
    return None


# ---------------------------------------------------------------------------
# Parser and entry point
# ---------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xvol", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--traceback", action="store_true", help="show the Python traceback of an error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, fn: Callable[..., int], help_text: str, epilog: str = "") -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=(fn.__doc__ or help_text).strip(), epilog=epilog,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.set_defaults(handler=fn)
        return p

    p = add("sites", cmd_sites, "list candidate and selected sites (output stride, geometry, MACs)",
            "example: xvol sites resnet50 --sites os16")
    _add_model(p)
    _add_xvolify_options(p)
    p.add_argument("--all", action="store_true", help="list every conv, pointwise and not-run ones included")
    _add_json(p)

    p = add("xvolify", cmd_xvolify, "insert X-volution; save a checkpoint",
            "example: xvol xvolify resnet18 -o r18-xvol.pt --num-classes 10")
    _add_model(p)
    _add_xvolify_options(p)
    p.add_argument("-o", "--output", required=True, help="checkpoint to write (.pt)")
    p.add_argument("--force", action="store_true", help="overwrite the output")
    _add_json(p)

    p = add("fuse", cmd_fuse, "fuse a model's sites in torch.fx; save the fused checkpoint (and ONNX)",
            "example: xvol fuse r18-xvol.pt -o r18-fused.pt --onnx r18-fused.onnx")
    _add_model(p)
    p.add_argument("-o", "--output", required=True, help="fused checkpoint to write (.pt)")
    p.add_argument("--onnx", help="also export the fused model to this ONNX file")
    p.add_argument("--rtol", type=float, default=1e-4, help="verification tolerance (default 1e-4)")
    p.add_argument("--no-verify", action="store_true", help="skip the fused-vs-unfused check")
    p.add_argument("--force", action="store_true", help="overwrite the outputs")
    p.add_argument("--backend", choices=("eager", "compile", "onnxruntime"), default="eager",
                   help="backend the lowering of each site is chosen for (default eager)")
    _lowering_flags(p)
    _add_json(p)

    p = add("export", cmd_export, "export a model or checkpoint to ONNX",
            "example: xvol export r18-xvol.pt -o r18-xvol.onnx")
    _add_model(p)
    p.add_argument("-o", "--output", required=True, help="ONNX file to write")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    p.add_argument("--static-batch", action="store_true", help="fixed batch size instead of a dynamic one")
    p.add_argument("--no-optimize", action="store_true", help="skip the exporter's graph optimizer")
    p.add_argument("--force", action="store_true", help="overwrite the output")
    _add_json(p)

    p = add("fuse-onnx", cmd_fuse_onnx, "fuse an ONNX model; verify in onnxruntime",
            "example: xvol fuse-onnx r18-xvol.onnx -o r18-fused.onnx --report report.json")
    p.add_argument("input", metavar="IN.onnx", help="ONNX model to fuse")
    p.add_argument("-o", "--output", required=True, metavar="OUT.onnx", help="fused ONNX file to write")
    p.add_argument("--report", nargs="?", const="-", default=None, metavar="PATH",
                   help="print the per-site report; with PATH write it there (.json or text)")
    p.add_argument("--rtol", type=float, default=1e-4, help="verification tolerance (default 1e-4)")
    p.add_argument("--no-verify", action="store_true", help="skip the onnxruntime check")
    p.add_argument("--force", action="store_true", help="overwrite the outputs")
    _lowering_flags(p)
    _add_json(p)

    p = add("verify", cmd_verify, "compare two models' outputs (ONNX files, checkpoints, names)",
            "examples:\n  xvol verify a.onnx b.onnx\n  xvol verify r18-xvol.pt            "
            "(the model vs its fused form)\n  xvol verify r18-xvol.pt r18-fused.onnx")
    p.add_argument("a", metavar="A", help="ONNX file, checkpoint or torchvision name")
    p.add_argument("b", metavar="B", nargs="?", help="second model; omitted: A's fused form")
    p.add_argument("--num-classes", type=int, default=1000, help="classifier size for models given by name")
    p.add_argument("--input-size", type=int, nargs="+", metavar="N", help="input: S, H W or C H W")
    p.add_argument("--batch", type=int, default=2, help="batch size of the random input (default 2)")
    p.add_argument("--rtol", type=float, default=1e-4, help="largest relative error allowed (default 1e-4)")
    p.add_argument("--seed", type=int, default=0)
    _add_json(p)

    p = add("bench", cmd_bench, "latency original : unfused : fused of a torchvision model",
            "example: xvol bench resnet50 --backend eager,onnxruntime --batch 1 16")
    p.add_argument("model", metavar="MODEL", help="torchvision classification model name")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--input-size", type=int, nargs="+", metavar="N", help="input: S, H W or C H W (default 224)")
    p.add_argument("--sites", default="os16", help="site policy (default os16)")
    p.add_argument("--backend", default="eager", help="comma-separated: eager, compile, onnxruntime (default eager)")
    p.add_argument("--batch", type=int, nargs="+", default=[1], help="batch sizes (default 1)")
    p.add_argument("--repeats", type=int, default=10, help="interleaved rounds (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="rounds discarded first (default 2)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    _add_json(p)

    p = add("graph", cmd_graph, "draw a site's subgraph before/after fusion (PNG/SVG/PDF)",
            "examples:\n  xvol graph resnet18 -o site.png --site layer3.0.conv2\n"
            "  xvol graph resnet18 -o site-onnx.svg --onnx\n  xvol graph model.onnx -o site.png\n"
            "  xvol graph resnet18 --whole -o fused.svg")
    _add_model(p, "MODEL")
    _add_xvolify_options(p)
    p.add_argument("-o", "--output", required=True, help="picture to write: .png, .svg or .pdf")
    p.add_argument("--site", help="qualified name of the site (default: the first one)")
    p.add_argument("--hops", type=int, default=2, help="neighbourhood radius in operations (default 2)")
    p.add_argument("--onnx", action="store_true", help="draw the ONNX graphs (export, fuse_onnx) instead of FX")
    p.add_argument("--whole", action="store_true", help="draw the whole fused graph (small models only)")
    p.add_argument("--force", action="store_true", help="overwrite the output")
    _add_json(p)
    return parser


def _one_line(err: BaseException, limit: int = 600) -> str:
    """The error's message on one line (lines joined by '; '), cut at ``limit`` characters."""
    text = str(err.args[0]) if isinstance(err, KeyError) and len(err.args) == 1 else str(err)
    parts = [" ".join(line.split()) for line in text.strip().splitlines()]
    text = "; ".join(p for p in parts if p) or type(err).__name__
    return text if len(text) <= limit else text[: limit - 4] + " ..."


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``xvol``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    out = Output(getattr(args, "json", False))
    try:
        return int(args.handler(args, out))
    except VerificationFailed as err:
        sys.stderr.write(f"xvol: verification failed: {err}\n")
        return EXIT_ERROR
    except KeyboardInterrupt:
        sys.stderr.write("xvol: interrupted\n")
        return 130
    except Exception as err:  # every error ends as one message on stderr, not a traceback
        if args.traceback:
            raise
        expected = isinstance(err, (ValueError, OSError, RuntimeError, TypeError, LookupError))
        prefix = "xvol: error" if expected else f"xvol: internal error ({type(err).__name__})"
        sys.stderr.write(f"{prefix}: {_one_line(err)}\n")
        if not expected:
            sys.stderr.write("xvol: run with --traceback for details\n")
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
