"""The ``xvol`` command: a thin layer over the passes (``xvolify``, ``fuse``, ``fuse_onnx``) and their reports.

Every subcommand has ``--help``; ``--json`` prints one JSON object to stdout
instead of tables (errors still go to stderr). A user error (bad model name,
missing or corrupt file, existing output without ``--force``) is one line on
stderr and exit status 1; a failed verification is exit status 1 as well;
``--traceback`` shows the Python traceback of an error.

MODEL arguments are one of:

  NAME                     a torchvision model (built with ``weights=None``)
  timm:NAME                a timm model (``timm.create_model(NAME, pretrained=False)``)
  package.module:factory   a function returning an ``nn.Module``, called with no
                           arguments (``num_classes=N`` with ``--num-classes N``)
  FILE.pt                  a checkpoint written by ``xvol xvolify`` / ``xvol fuse`` /
                           the demo, which records the model's name and rebuilds it

Nothing is downloaded. ``--num-classes`` applies to a model given by name
(default: the builder's, 1000 for torchvision); ``--input-size`` defaults to a
timm model's ``pretrained_cfg`` input size, else 3 224 224, and a checkpoint
records its own. Checkpoints are read with ``torch.load(weights_only=True)``.
Outputs are written atomically and never over an existing file without
``--force``.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import math
import re
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from xvol_compiler.errors import VerificationError

__all__ = ["build_parser", "main"]

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2


class VerificationFailed(VerificationError):
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


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _sites(text: str) -> Any:
    """``os16``, ``all``, ``re:<pattern>``, a name, or comma-separated names."""
    names = [s.strip() for s in text.split(",") if s.strip()]
    if not names:
        raise ValueError("--sites is empty")
    return names if len(names) > 1 else names[0]


MODEL_HELP = ("torchvision model name, timm:NAME, package.module:factory, or a checkpoint written by xvol / "
              "the demo (nothing is downloaded)")
NUM_CLASSES_HELP = ("classifier size for a model given by name (default: the builder's, 1000 for torchvision; "
                    "a factory gets num_classes=N only when this is given)")
INPUT_SIZE_HELP = ("example input: S, H W or C H W (default: a timm model's pretrained_cfg input size, else "
                   "3 224 224; a checkpoint's recorded size)")


def _add_model(p: argparse.ArgumentParser, what: str = "MODEL") -> None:
    p.add_argument("model", metavar=what, help=MODEL_HELP)
    p.add_argument("--num-classes", type=_positive_int, default=None, help=NUM_CLASSES_HELP)
    p.add_argument("--input-size", type=int, nargs="+", metavar="N", help=INPUT_SIZE_HELP)


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
        raise ValueError(f"{args.model} is an ONNX file; this command takes a model name or a checkpoint")
    return load_model(args.model, num_classes=args.num_classes, input_size=_input_size(args.input_size))


# ---------------------------------------------------------------------------
# Subcommands
# ---------------------------------------------------------------------------


def cmd_sites(args: argparse.Namespace, out: Output) -> int:
    """Candidate and selected X-volution sites of a model."""
    from xvol_compiler.report import format_count, format_stride
    from xvol_compiler.site_analysis import analyze_model
    from xvol_compiler.site_selection import select_sites
    from xvol_passes.xvolify import added_cost

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
    p.add_argument("--lowering", choices=("auto", "measure", "channel", "spatial", "split"), default="auto",
                   help="deploy form of each site: auto (a fixed rule per backend and site class, no timing: "
                        "depthwise sites split with --split, else spatial; other sites channel), measure (time "
                        "the exact forms on this machine, kept in a cache file), channel, spatial or split "
                        "(default auto)")
    p.add_argument("--lowering-cache", metavar="PATH", default=None,
                   help="cache file of --lowering measure (default $XVOL_LOWERING_CACHE, else "
                        "$XDG_CACHE_HOME/xvol-compiler/lowering-cache.json)")
    p.add_argument("--split", action="store_true",
                   help="allow more than one convolution per site (the split lowering: two convs and an add)")


def cmd_fuse(args: argparse.Namespace, out: Output) -> int:
    """Fuse every site (and conv+BN) of a model in torch.fx; save the fused checkpoint and optionally ONNX."""
    from xvol_compiler import fuse
    from xvol_compiler.files import check_outputs, written_together
    from xvol_compiler.io import save_model
    from xvol_passes.fuse_onnx import export_onnx
    from xvol_passes.lower import using_lowering_cache

    check_outputs([args.output, *([args.onnx] if args.onnx else [])], force=args.force)
    model, spec = _load(args)
    if spec.stage == "fused":
        raise ValueError(f"{args.model} is already fused")
    example = spec.example_inputs(model)
    with using_lowering_cache(args.lowering_cache):
        fused = fuse(model.eval(), example_inputs=example, verify=not args.no_verify, rtol=args.rtol,
                     backend=args.backend, lowering=args.lowering, single_conv=not args.split)
    report = fused.xvol_fusion_report
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
    model, spec = _load(args)
    dynamo = args.exporter == "dynamo"
    try:
        proto = export_onnx(model.eval(), args.output, spec.example_inputs(model), opset=args.opset, dynamo=dynamo,
                            dynamic_batch=not args.static_batch, optimize=not args.no_optimize, force=args.force)
    except OpsetError as err:
        hint = "use --opset 18 or higher, or --exporter torchscript for an older opset" if dynamo else (
            "choose another --opset")
        raise ValueError(f"--opset {err.asked}: the {args.exporter} exporter produced opset {err.written} "
                         f"instead; nothing was written ({hint})") from err
    opset = onnx_opset(proto)
    out.json({"output": str(args.output), "model": spec.model, "stage": spec.stage, "opset": opset,
              "exporter": args.exporter})
    out.line(f"wrote {args.output} ({spec.model}, {spec.stage}; ONNX opset {opset}, {args.exporter} exporter)")
    return EXIT_OK


def cmd_fuse_onnx(args: argparse.Namespace, out: Output) -> int:
    """Fuse every X-volution site, conv+BN and branch sum of an ONNX model; verify in onnxruntime."""
    from xvol_compiler.files import atomic_write_json, atomic_write_text, check_outputs, written_together
    from xvol_passes.fuse_onnx import fuse_onnx

    report_path = None if args.report in (None, "-") else Path(args.report)
    check_outputs([args.output, *([report_path] if report_path else [])], force=args.force)
    from xvol_passes.fuse_onnx import OnnxVerificationError
    from xvol_passes.lower import using_lowering_cache

    with written_together(), using_lowering_cache(args.lowering_cache):  # the fused model and report, or nothing
        try:
            _, report = fuse_onnx(args.input, verify=not args.no_verify, rtol=args.rtol, output_path=args.output,
                                  force=args.force, lowering=args.lowering, single_conv=not args.split)
        except OnnxVerificationError as err:
            raise ValueError(_cli_message(err, "skip the check with --no-verify",
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


def _batched(inputs: tuple[Any, ...], batch: int) -> tuple[Any, ...]:
    """``inputs`` (batch 1) repeated to ``batch``: tensors along axis 0, lists of images (detection) as lists."""
    import torch

    def grow(t: Any) -> Any:
        if isinstance(t, torch.Tensor):
            return t.repeat(batch, *([1] * (t.dim() - 1)))
        if isinstance(t, list):
            return t * batch
        return t

    return tuple(grow(t) for t in inputs)


CLI_INPUT_FIX = "give the input shape with --input-size (S, H W or C H W) and the batch with --batch"
CLI_FLOAT64_FIX = "onnxruntime has no float64 Conv: convert the model to float32 to verify it"


def _cli_message(err: Any, fix_for_inputs: str, fix_for_float64: str) -> str:
    """An ``OnnxVerificationError``'s problem with the advice in command-line flags instead of API words."""
    from xvol_passes.fuse_onnx import API_FIX, FLOAT64_FIX

    fix = {API_FIX: fix_for_inputs, FLOAT64_FIX: fix_for_float64}.get(err.fix, err.fix)
    return f"{err.problem}: {fix}" if fix else err.problem


def _run_onnx(path: str, inputs: tuple[Any, ...]) -> list[Any]:
    import numpy as np

    from xvol_compiler.onnx_io import load_onnx
    from xvol_compiler.verify import onnx_session
    from xvol_passes.fuse_onnx import float64_inputs

    proto = load_onnx(path).model
    try:
        session = onnx_session(proto)
        names = [i.name for i in session.get_inputs()]
        if len(names) != len(inputs):
            raise ValueError(f"{len(names)} inputs expected, {len(inputs)} given")
        return session.run(None, {n: np.asarray(t.numpy()) for n, t in zip(names, inputs, strict=True)})
    except Exception as err:  # onnxruntime raises many types
        text = " ".join(str(err).split())
        shapes = ", ".join(str(tuple(t.shape)) for t in inputs if hasattr(t, "shape"))
        fix = CLI_FLOAT64_FIX if float64_inputs(proto) else CLI_INPUT_FIX
        raise ValueError(f"{path} does not run in onnxruntime on inputs of shape {shapes} ({text}): {fix}") from err


def _onnx_feeds(model: Any, path: str, size: list[int] | None, batch: int | None) -> dict[str, Any]:
    """Random feeds for ``model``: ``--input-size`` for its single input, else its declared shapes; ``--batch``
    on axis 0 (a fixed batch size that differs from an explicit ``--batch`` is refused)."""
    import numpy as np
    import onnx
    import torch

    from xvol_passes.fuse_onnx import random_inputs

    initializers = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if size is not None:
        if len(inputs) != 1:
            raise ValueError(f"{path} has {len(inputs)} inputs; --input-size gives the shape of a single one")
        elem = inputs[0].type.tensor_type.elem_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(elem) if elem else np.float32
        return {inputs[0].name: torch.randn(batch or 2, *size).numpy().astype(dtype)}
    for vi in inputs:
        dims = vi.type.tensor_type.shape.dim
        if batch is not None and dims and dims[0].HasField("dim_value") and dims[0].dim_value != batch:
            raise ValueError(f"{path}: input {vi.name!r} has a fixed batch size of {dims[0].dim_value}, so "
                             f"--batch {batch} cannot apply: drop --batch (or export with a dynamic batch)")
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    return random_inputs(model, seed=seed, batch=batch or 2)


def _declared_inputs(model: Any) -> dict[str, list[int | str]]:
    """Graph inputs (initializers excluded) and their declared shapes: numbers, or names of dynamic axes."""
    initializers = {t.name for t in model.graph.initializer}
    return {i.name: [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                     for d in i.type.tensor_type.shape.dim]
            for i in model.graph.input if i.name not in initializers}


def _check_same_inputs(first: Any, a: str, second: Any, b: str) -> None:
    """Two ONNX files are compared on the same feeds: refuse different input names or fixed sizes up front."""
    ins_a, ins_b = _declared_inputs(first), _declared_inputs(second)
    if set(ins_a) != set(ins_b):
        raise ValueError(f"{a} and {b} take different inputs ({sorted(ins_a)} vs {sorted(ins_b)}): xvol verify "
                         "runs both models on the same inputs")
    for name, dims_a in ins_a.items():
        dims_b = ins_b[name]
        fixed_differ = len(dims_a) != len(dims_b) or any(
            isinstance(x, int) and isinstance(y, int) and x != y for x, y in zip(dims_a, dims_b, strict=True))
        if fixed_differ:
            raise ValueError(f"input {name!r} has shape {dims_a} in {a} but {dims_b} in {b}: xvol verify runs "
                             "both models on the same inputs")


def cmd_verify(args: argparse.Namespace, out: Output) -> int:
    """Compare two ONNX files, a model and its fused form, or a model and an ONNX file, on random inputs.

    The tolerance follows the dtype unless ``--rtol`` is given (1e-4 for float32 and float64, 1e-2 for
    float16, 5e-2 for bfloat16); a torch model's result also passes when it is as close to a float64 run of
    the torch model as that model itself (within ``UNFUSED_ERROR_FACTOR``, see ``xvol_compiler.verify``), and
    torchvision detection models are compared on their backbone and head outputs (before post-processing).
    A model checked against its own fused form is checked with its attention exercised: zero BatchNorm gammas
    of its X-volution sites (every site before training) are set non-zero in a copy, which is fused and
    compared, so that the check covers the attention fold (the output says how many were set).
    """
    import torch

    from xvol_compiler.verify import ErrorStats, accepts, default_rtol

    torch.manual_seed(args.seed)
    size = _input_size(args.input_size)
    a, b = args.a, args.b
    how: str
    if a.endswith(".onnx") and (b is None or b.endswith(".onnx")):
        from xvol_compiler.onnx_io import load_onnx
        from xvol_passes.fuse_onnx import OnnxVerificationError, compare_onnx, fuse_onnx, onnx_dtype

        first = load_onnx(a).model
        if b is None:
            second, _ = fuse_onnx(first, verify=False)
            how = f"{a} vs its fused form (fuse_onnx)"
            labels = (f"model {a}", f"fused form of {a}")
        else:
            second = load_onnx(b).model
            how = f"{a} vs {b} (onnxruntime)"
            labels = (f"first model ({a})", f"second model ({b})")
            _check_same_inputs(first, a, second, b)
        feeds = _onnx_feeds(first, a, size, args.batch)
        try:
            abs_err, rel_err = compare_onnx(first, second, feeds, labels=labels)
        except OnnxVerificationError as err:
            raise ValueError(_cli_message(err, CLI_INPUT_FIX, CLI_FLOAT64_FIX)) from err
        dtype = onnx_dtype(first)
        rtol = default_rtol(dtype) if args.rtol is None else args.rtol
        ok = accepts(ErrorStats(abs_err, rel_err, 1), rtol=rtol)
        detail = f"max abs error {abs_err:.3g}, relative {rel_err:.3g} ({dtype}, rtol {rtol:g})"
        extra: dict[str, Any] = {"dtype": dtype}
    else:
        from xvol_compiler.io import load_model
        from xvol_compiler.verify import reference_run, verify_model, verify_outputs

        torch_arg, other_arg = (a, b) if not a.endswith(".onnx") else (b, a)
        model, spec = load_model(torch_arg, num_classes=args.num_classes, input_size=size)
        model.eval()  # a model given by name is built in training mode: the check is of inference
        inputs = _batched(spec.example_inputs(model), args.batch or 2)
        exercised: int | None = None
        if other_arg is not None and other_arg.endswith(".onnx"):
            reference = reference_run(model, inputs)
            verdict = verify_outputs(reference, _run_onnx(other_arg, inputs), rtol=args.rtol, name=torch_arg)
            how = f"{torch_arg} (torch) vs {other_arg} (onnxruntime)"
        elif other_arg is not None:
            reference = reference_run(model, inputs)
            other, _ = load_model(other_arg, num_classes=args.num_classes, input_size=size)
            verdict = verify_model(reference, other.eval(), inputs, rtol=args.rtol, name=torch_arg)
            how = f"{torch_arg} vs {other_arg} (torch)"
        else:
            from xvol_compiler import fuse
            from xvol_compiler.attention_probe import with_exercised_attention

            # Zero attention gammas would make the T(x) half of every fused weight 0: check a copy where it is not.
            probe, exercised = with_exercised_attention(model, seed=args.seed)
            reference = reference_run(probe, inputs)
            fused = fuse(probe, example_inputs=inputs, verify=False)
            name = f"{torch_arg} (unfused{', attention exercised' if exercised else ''})"
            verdict = verify_model(reference, fused, inputs, rtol=args.rtol, name=name)
            how = f"{torch_arg} vs its fused form (fuse)"
            if exercised:
                how += (f", checked on a copy with the zero gammas of {exercised} X-volution attention / branch "
                        f"BatchNorm(s) set non-zero (seed {args.seed}) so that the attention fold is exercised")
        abs_err, rel_err, rtol, ok = verdict.candidate.max_abs, verdict.candidate.max_rel, verdict.rtol, verdict.ok
        detail = verdict.describe()
        extra = {"dtype": verdict.dtype, "reference": verdict.reference, "on": verdict.compared,
                 "unfused_rel_error": verdict.unfused.max_rel if verdict.unfused is not None else None,
                 "float64_rel_error": verdict.exact.max_rel if verdict.exact is not None else None,
                 "notes": list(verdict.notes)}
        if exercised is not None:
            extra["exercised_batchnorms"] = exercised
    out.json({"compared": how, "max_abs_error": abs_err, "max_rel_error": rel_err, "rtol": rtol, "ok": ok, **extra})
    out.line(f"{how}: {detail}: {'ok' if ok else 'FAILED'}")
    if not ok:
        raise VerificationFailed(f"outputs differ: {detail}")
    return EXIT_OK


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
        raise ValueError(f"unknown backend(s) {sorted(unknown)}; choose from {', '.join(BACKENDS)}")
    torch.manual_seed(0)  # the same random weights for a model given by name, run after run
    model, spec = _load(args)
    if not is_classification(spec.model):
        raise ValueError(f"xvol bench takes a classification model; {spec.model} is not one")
    if spec.stage == "fused":
        raise ValueError(f"{args.model} is already fused, so there is no unfused model to time against: give "
                         "the xvolified checkpoint it came from, or the original model")
    original, xvolified = (model, None) if spec.stage == "original" else (
        build_model(spec.model, num_classes=spec.num_classes), model)
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "No CUDA runtime" on CPU machines
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    size = list(spec.input_size)
    p = prepare(spec.model, sites=_sites(args.sites), input_size=size, device=device, model=original,
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
    out.print(_rich_table(
        ["backend", "batch", "original ms", "unfused/orig", "fused/orig", "fused IQR", "fused/unfused",
         "MAC floor", "max rel err"], rows, title=f"{args.model} on {device}", caption=caption))
    return EXIT_OK


def cmd_graph(args: argparse.Namespace, out: Output) -> int:
    """Picture of one site's neighbourhood before and after fusion (FX or ONNX), or of a whole fused graph."""
    from xvol_compiler import fuse, pictures, xvolify
    from xvol_compiler.io import check_writable
    from xvol_passes.fuse_onnx import export_onnx, fuse_onnx

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


# ---------------------------------------------------------------------------
# Parser and entry point
# ---------------------------------------------------------------------------


_LITERAL = re.compile(r"``(.+?)``", re.DOTALL)
_ROLE = re.compile(r":(?:func|class|meth|mod|data|attr|exc|obj):`~?([^`]+)`")


def plain_text(text: str) -> str:
    """Docstring text for ``--help``: reST literals (double backticks) and roles (:func:`x`) become plain x."""
    return _LITERAL.sub(r"\1", _ROLE.sub(r"\1", text))


def _plain_help(parser: argparse.ArgumentParser) -> None:
    """Every description, epilog and argument help of ``parser`` and its subcommands as :func:`plain_text`."""
    for attr in ("description", "epilog"):
        if getattr(parser, attr):
            setattr(parser, attr, plain_text(getattr(parser, attr)))
    for action in parser._actions:
        if isinstance(action.help, str):
            action.help = plain_text(action.help)
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:
                if isinstance(choice.help, str):
                    choice.help = plain_text(choice.help)
            for sub in dict.fromkeys(action.choices.values()):
                _plain_help(sub)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xvol", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--traceback", action="store_true", help="show the Python traceback of an error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, fn: Callable[..., int], help_text: str, epilog: str = "") -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=inspect.cleandoc(fn.__doc__ or help_text), epilog=epilog,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.set_defaults(handler=fn)
        return p

    p = add("sites", cmd_sites, "list candidate and selected sites (output stride, geometry, MACs)",
            "examples:\n  xvol sites resnet50 --sites os16\n  xvol sites timm:efficientnet_b0\n"
            "  xvol sites mypackage.models:my_cnn --input-size 64")
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
    p.add_argument("--rtol", type=float, default=None,
                   help="verification tolerance (default: by dtype, 1e-4 for float32)")
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
    p.add_argument("--opset", type=int, default=None,
                   help="ONNX opset (default: the exporter's); the command fails if the exporter cannot produce it")
    p.add_argument("--exporter", choices=("dynamo", "torchscript"), default="dynamo",
                   help="torch.export based exporter (default; opset >= 18) or the TorchScript one (older opsets)")
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
    p.add_argument("--rtol", type=float, default=None,
                   help="verification tolerance (default: by dtype, 1e-4 for float32)")
    p.add_argument("--no-verify", action="store_true", help="skip the onnxruntime check")
    p.add_argument("--force", action="store_true", help="overwrite the outputs")
    _lowering_flags(p)
    _add_json(p)

    p = add("verify", cmd_verify, "compare two models' outputs (ONNX files, checkpoints, names)",
            "examples:\n  xvol verify a.onnx b.onnx\n  xvol verify r18-xvol.pt            "
            "(the model vs its fused form)\n  xvol verify r18-xvol.pt r18-fused.onnx")
    p.add_argument("a", metavar="A", help="ONNX file, or a model: " + MODEL_HELP)
    p.add_argument("b", metavar="B", nargs="?", help="second model; omitted: A's fused form")
    p.add_argument("--num-classes", type=_positive_int, default=None, help=NUM_CLASSES_HELP)
    p.add_argument("--input-size", type=int, nargs="+", metavar="N", help="input: S, H W or C H W")
    p.add_argument("--batch", type=_positive_int, default=None,
                   help="batch size of the random input (default 2; an ONNX input with a fixed batch keeps it)")
    p.add_argument("--rtol", type=float, default=None, help="largest relative error allowed (default: by dtype, "
                   "1e-4 for float32)")
    p.add_argument("--seed", type=int, default=0)
    _add_json(p)

    p = add("bench", cmd_bench, "latency original : unfused : fused of a classification model",
            "examples:\n  xvol bench resnet50 --backend eager,onnxruntime --batch 1 16\n"
            "  xvol bench timm:convnext_atto\n  xvol bench r18-xvol.pt")
    p.add_argument("model", metavar="MODEL", help="classification model: " + MODEL_HELP + "; a checkpoint must "
                   "be original or xvolified")
    p.add_argument("--num-classes", type=_positive_int, default=None, help=NUM_CLASSES_HELP)
    p.add_argument("--input-size", type=int, nargs="+", metavar="N", help=INPUT_SIZE_HELP)
    p.add_argument("--sites", default="os16", help="site policy (default os16; an xvolified checkpoint keeps its "
                   "own)")
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
    _plain_help(parser)
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
