"""The subcommands that read a model and write one: ``sites``, ``xvolify``, ``fuse``, ``export``, ``fuse-onnx``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from xvol_compiler.cli import common
from xvol_compiler.cli.common import EXIT_OK, CommandError, cli_message, parse_sites, xvolify_kwargs
from xvol_compiler.cli.output import Output, rich_table

if TYPE_CHECKING:
    from xvol_compiler.options import FuseOptions

__all__ = ["cmd_export", "cmd_fuse", "cmd_fuse_onnx", "cmd_sites", "cmd_xvolify", "fuse_options"]


def fuse_options(args: argparse.Namespace) -> FuseOptions:
    """The ``FuseOptions`` of ``fuse`` / ``fuse-onnx``'s flags (fuse-onnx has no ``--backend``: onnxruntime)."""
    from xvol_compiler.options import FuseOptions

    return FuseOptions(verify=not args.no_verify, rtol=args.rtol, backend=getattr(args, "backend", None),
                       lowering=args.lowering, single_conv=not args.split)


def cmd_sites(args: argparse.Namespace, out: Output) -> int:
    """Candidate and selected X-volution sites of a model."""
    from xvol_compiler.report import format_count, format_stride
    from xvol_compiler.sites import analyze_model, select_sites
    from xvol_passes.xvolify import added_cost

    model, spec = common.load_model_arg(args)
    example = spec.example_inputs(model)
    found = analyze_model(model, example)
    kwargs = xvolify_kwargs(args)
    kwargs.pop("shift")

    def cost(info: Any) -> tuple[int, int]:
        return added_cost(info, **kwargs)

    decisions = select_sites(model, found, parse_sites(args.sites), cost=cost, allow_empty=True)
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
    out.print(rich_table(["site", "geometry", "output stride", "MACs", "+MACs", "selected", "why not"], rows,
                          title=f"{spec.model}: sites for {args.sites}", caption=caption))
    return EXIT_OK


def cmd_xvolify(args: argparse.Namespace, out: Output) -> int:
    """Insert X-volution at the selected sites; save a checkpoint that ``xvol fuse`` can rebuild."""
    from xvol_compiler.io import ModelSpec, check_writable, save_model
    from xvol_passes.xvolify import xvolify_with_report

    check_writable(args.output, force=args.force)
    model, spec = common.load_model_arg(args)
    if spec.stage != "original":
        raise CommandError(f"{args.model} is already {spec.stage}; xvolify a plain model")
    kwargs = xvolify_kwargs(args)
    result, report = xvolify_with_report(model, parse_sites(args.sites), example_inputs=spec.example_inputs(model),
                                         **kwargs)
    new = ModelSpec(model=spec.model, num_classes=spec.num_classes, stage="xvolified",
                    sites=list(report.selected_names), xvolify=kwargs, input_size=spec.input_size)
    save_model(args.output, result, new, force=args.force)
    out.json({"output": str(args.output), "sites": new.sites, "report": report.to_dict()})
    out.print(report)
    out.line(f"wrote {args.output} ({len(new.sites)} site(s))")
    return EXIT_OK



def cmd_fuse(args: argparse.Namespace, out: Output) -> int:
    """Fuse every site (and conv+BN) of a model in torch.fx; save the fused checkpoint and optionally ONNX."""
    from xvol_compiler.files import check_outputs, written_together
    from xvol_compiler.io import save_model
    from xvol_passes.fuse_fx import fuse_with_report
    from xvol_passes.fuse_onnx import export_onnx
    from xvol_passes.lower import using_lowering_cache

    check_outputs([args.output, *([args.onnx] if args.onnx else [])], force=args.force)
    model, spec = common.load_model_arg(args)
    if spec.stage == "fused":
        raise CommandError(f"{args.model} is already fused")
    example = spec.example_inputs(model)
    with using_lowering_cache(args.lowering_cache):
        fused, report = fuse_with_report(model.eval(), example_inputs=example, options=fuse_options(args))
    spec.stage = "fused"
    spec.lowerings = report.lowerings()
    with written_together():  # the checkpoint and the ONNX file, or neither
        save_model(args.output, fused, spec, force=args.force)
        if args.onnx:
            export_onnx(fused, args.onnx, example, force=args.force)
    out.json({"output": str(args.output), "onnx": args.onnx, "report": report.to_dict()})
    out.line(str(report))
    out.line(f"wrote {args.output}" + (f" and {args.onnx}" if args.onnx else ""))
    return EXIT_OK


def cmd_export(args: argparse.Namespace, out: Output) -> int:
    """Export a model (original, xvolified or fused) to ONNX.

    The file has the opset asked for (``--opset``) or the command fails and writes nothing; the line
    printed says which opset and exporter were used.
    """
    from xvol_compiler.onnx_io import OpsetError, check_output_path, onnx_opset
    from xvol_passes.fuse_onnx import export_onnx

    check_output_path(args.output, force=args.force)
    model, spec = common.load_model_arg(args)
    dynamo = args.exporter == "dynamo"
    try:
        proto = export_onnx(model.eval(), args.output, spec.example_inputs(model), opset=args.opset, dynamo=dynamo,
                            dynamic_batch=not args.static_batch, optimize=not args.no_optimize, force=args.force)
    except OpsetError as err:
        hint = "use --opset 18 or higher, or --exporter torchscript for an older opset" if dynamo else (
            "choose another --opset")
        raise CommandError(f"--opset {err.asked}: the {args.exporter} exporter produced opset {err.written} "
                         f"instead; nothing was written ({hint})") from err
    opset = onnx_opset(proto)
    out.json({"output": str(args.output), "model": spec.model, "stage": spec.stage, "opset": opset,
              "exporter": args.exporter})
    out.line(f"wrote {args.output} ({spec.model}, {spec.stage}; ONNX opset {opset}, {args.exporter} exporter)")
    return EXIT_OK


def cmd_fuse_onnx(args: argparse.Namespace, out: Output) -> int:
    """Fuse every X-volution site, conv+BN and branch sum of an ONNX model; verify in onnxruntime."""
    from xvol_compiler.files import atomic_write_json, atomic_write_text, check_outputs, written_together
    from xvol_compiler.onnx_verify import OnnxVerificationError
    from xvol_passes.fuse_onnx import fuse_onnx
    from xvol_passes.lower import using_lowering_cache

    report_path = None if args.report in (None, "-") else Path(args.report)
    check_outputs([args.output, *([report_path] if report_path else [])], force=args.force)
    with written_together(), using_lowering_cache(args.lowering_cache):  # the fused model and report, or nothing
        try:
            _, report = fuse_onnx(args.input, output_path=args.output, force=args.force, options=fuse_options(args))
        except OnnxVerificationError as err:
            raise CommandError(cli_message(err, "skip the check with --no-verify",
                                           "convert the model to float32, or skip the check with --no-verify")) from err
        if report_path is not None:
            if report_path.suffix == ".json":
                atomic_write_json(report_path, report.to_dict(), force=args.force)
            else:
                atomic_write_text(report_path, str(report) + "\n", force=args.force)
    out.json({"input": args.input, "output": args.output, "report": report.to_dict()})
    out.line(str(report) if args.report == "-" else report.summary())
    out.line(f"wrote {args.output}" + (f" and {args.report}" if args.report not in (None, "-") else ""))
    return EXIT_OK
