"""``xvol bench`` (latency original : unfused : fused) and ``xvol graph`` (pictures of the fused graph)."""

from __future__ import annotations

import argparse
import logging
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from xvol_compiler.cli import common
from xvol_compiler.cli.common import EXIT_OK, CommandError, parse_sites, xvolify_kwargs
from xvol_compiler.cli.output import Output, rich_table

__all__ = ["cmd_bench", "cmd_graph", "first_onnx_site"]


def cmd_bench(args: argparse.Namespace, out: Output) -> int:
    """Latency ratios original : unfused : fused of one classification model, interleaved repeats.

    MODEL is a name (torchvision, ``timm:NAME``, ``package.module:factory``) or a checkpoint: an original one
    is xvolified at ``--sites``; an xvolified one is timed as it is, against its model rebuilt by name
    (random weights: only the latency of the original matters), and only its attention BatchNorms still at
    the gamma = 0 start get small random scales. A fused checkpoint holds no unfused form to compare with.
    """
    import torch

    from xvol_compiler.benchmark import BACKENDS, prepare, prepare_onnx, time_backend
    from xvol_compiler.io import build_model, is_classification
    from xvol_compiler.measure import machine_info
    from xvol_compiler.report import format_count

    backends = [b.strip() for b in args.backend.split(",") if b.strip()]
    unknown = set(backends) - set(BACKENDS)
    if unknown:
        raise CommandError(f"unknown backend(s) {sorted(unknown)}; choose from {', '.join(BACKENDS)}")
    torch.manual_seed(0)  # the same random weights for a model given by name, run after run
    model, spec = common.load_model_arg(args)
    if not is_classification(spec.model):
        raise CommandError(f"xvol bench takes a classification model; {spec.model} is not one")
    if spec.stage == "fused":
        raise CommandError(f"{args.model} is already fused, so there is no unfused model to time against: give "
                         "the xvolified checkpoint it came from, or the original model")
    original, xvolified = (model, None) if spec.stage == "original" else (
        build_model(spec.model, num_classes=spec.num_classes), model)
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "No CUDA runtime" on CPU machines
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    size = list(spec.input_size)
    p = prepare(spec.model, sites=parse_sites(args.sites), input_size=size, device=device, model=original,
                xvolified=xvolified)
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
    out.print(rich_table(
        ["backend", "batch", "original ms", "unfused/orig", "fused/orig", "fused IQR", "fused/unfused",
         "MAC floor", "max rel err"], rows, title=f"{args.model} on {device}", caption=caption))
    return EXIT_OK


def cmd_graph(args: argparse.Namespace, out: Output) -> int:
    """Picture of one site's neighbourhood before and after fusion (FX or ONNX), or of a whole fused graph."""
    from xvol_compiler import pictures
    from xvol_compiler.io import check_writable
    from xvol_passes.fuse_fx import fuse_with_report
    from xvol_passes.fuse_onnx import export_onnx, fuse_onnx
    from xvol_passes.xvolify import xvolify

    check_writable(args.output, force=args.force)
    if Path(args.output).suffix.lower() not in (".png", ".svg", ".pdf"):
        raise CommandError(f"{args.output}: the picture must be a .png, .svg or .pdf file")
    site = args.site
    if args.model.endswith(".onnx"):
        from xvol_compiler.onnx_io import load_onnx

        before_proto = load_onnx(args.model).model
        after_proto, report = fuse_onnx(before_proto, verify=False)
        site = site or first_onnx_site(before_proto)
        before: Callable[[], Any] = lambda: pictures.onnx_graph(before_proto)  # noqa: E731
        after: Callable[[], Any] = lambda: pictures.onnx_graph(after_proto)  # noqa: E731
        kind, name = "ONNX", Path(args.model).name
    else:
        model, spec = common.load_model_arg(args)
        example = spec.example_inputs(model)
        if spec.stage == "original":
            model = xvolify(model, sites=parse_sites(args.sites), example_inputs=example, **xvolify_kwargs(args))
        if spec.stage == "fused":
            raise CommandError(f"{args.model} is already fused: give the unfused model or checkpoint")
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
            fused, report = fuse_with_report(unfused, example_inputs=example, verify=False)
            before = lambda: pictures.fx_graph(unfused)  # noqa: E731
            after = lambda: pictures.fx_graph(fused)  # noqa: E731
            kind = "torch.fx"
    if args.whole:
        panels = [pictures.whole_panel(after(), f"{name}: whole fused graph ({kind})")]
        title = f"{name} after fusion ({kind}): {report.summary()}"
    else:
        if not site:
            raise CommandError("no X-volution site found: name one with --site")
        panels = pictures.site_panels(before, after, site, hops=args.hops)
        title = f"{name}: site {site} ({kind})"
    pictures.draw_graphs(panels, args.output, title=title, force=args.force)
    out.json({"output": str(args.output), "site": None if args.whole else site, "graph": kind,
              "nodes": [len(g) for _, g in panels]})
    out.line(f"wrote {args.output}")
    return EXIT_OK


def first_onnx_site(proto: Any) -> str | None:
    """The module scope of the first PSSA-looking pattern in an exported graph: a Conv whose output is
    multiplied with the conv's own input (the transform today), or an AveragePool (older exports)."""
    multiplied = {(a, b) for n in proto.graph.node if n.op_type == "Mul" and len(n.input) == 2
                  for a, b in (tuple(n.input), tuple(reversed(n.input)))}
    for node in proto.graph.node:
        meta = {p.key: p.value for p in node.metadata_props}
        scopes = meta.get("pkg.torch.onnx.name_scopes", "")
        transform_conv = node.op_type == "Conv" and (node.output[0], node.input[0]) in multiplied
        if (node.op_type == "AveragePool" or transform_conv) and scopes:
            parts = [s.strip(" '\"") for s in scopes.strip("[]").split(",")]
            if len(parts) >= 2:
                return parts[-2]
    return None
