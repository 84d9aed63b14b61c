"""The ONNX fusion pass: X-volution sites, conv + BN and branch sums into single convolutions.

``fuse_onnx`` loads a model (path, bytes or ``ModelProto``), runs the shared
rewrite rules (``xvol_compiler.rules``) through ``OnnxGraphAdapter``, checks
the result with ``onnx.checker`` (full check), verifies it numerically against
the unfused model in onnxruntime, and writes it atomically. A model without
fusable patterns is returned unchanged (byte for byte) with a report that says
so.
"""

from __future__ import annotations

import os
from collections.abc import Collection

import onnx

from xvol_compiler.arguments import ArgumentError, check_bool, check_choice, check_path
from xvol_compiler.fusion_report import FusionReport
from xvol_compiler.onnx_io import (
    PROTOBUF_LIMIT,
    OnnxError,
    OnnxFileError,
    OutputError,
    OutputExistsError,
    check_output_path,
    export_onnx,
    load_onnx,
    model_data_bytes,
    save_onnx,
)
from xvol_compiler.onnx_verify import (
    API_FIX,
    FLOAT64_FIX,
    ExampleInputs,
    OnnxVerificationError,
    compare_onnx,
    float64_inputs,
    onnx_dtype,
    random_inputs,
)
from xvol_compiler.options import FuseOptions, LoweringOption, merge
from xvol_compiler.rules import RuleSet, run_rules
from xvol_compiler.verify import ErrorStats, accepts, default_rtol
from xvol_passes.lower import lower_sites
from xvol_passes.onnx_graph import Interleave, OnnxGraphAdapter, infer_shapes

# API_FIX, FLOAT64_FIX, float64_inputs and the comparison names live in xvol_compiler.onnx_verify (the verify
# layer) and are imported from here by older code.
__all__ = [
    "API_FIX",
    "FLOAT64_FIX",
    "FuseOptions",
    "NO_SITES_NOTE",
    "OnnxError",
    "OnnxFileError",
    "OutputError",
    "OutputExistsError",
    "OnnxVerificationError",
    "compare_onnx",
    "onnx_dtype",
    "export_onnx",
    "float64_inputs",
    "fuse_onnx",
    "random_inputs",
]

NO_SITES_NOTE = "no fusable patterns: the model is returned unchanged"
def fuse_onnx(
    model_or_path: str | os.PathLike[str] | bytes | onnx.ModelProto,
    *,
    verify: bool = True,
    rtol: float | None = None,
    example_inputs: ExampleInputs | None = None,
    output_path: str | os.PathLike[str] | None = None,
    force: bool = False,
    interleave: Interleave = "reshape",
    lowering: LoweringOption = "auto",
    single_conv: bool = True,
    skip: Collection[str] = (),
    options: FuseOptions | None = None,
) -> tuple[onnx.ModelProto, FusionReport]:
    """Fuse every X-volution site, conv + BatchNorm and foldable branch sum of an ONNX model.

    Returns ``(fused_model, report)``. With ``verify`` the fused and original
    models run in onnxruntime on ``example_inputs`` (or random inputs of the
    graph's input shapes, dynamic dimensions 1 for the batch and 32 elsewhere)
    and ``report.max_abs_error`` / ``max_rel_error`` are filled; a relative
    error above ``rtol`` (None: by the model's dtype, as in
    :mod:`xvol_compiler.verify`: ``1e-4`` for float32 and float64, ``1e-2`` for
    float16, ``5e-2`` for bfloat16) raises ``OnnxVerificationError`` and
    nothing is written.
    ``output_path`` is written atomically, with external data (``<out>.data``)
    when the input had external data or the model exceeds 2 GiB; an existing
    file is only replaced with ``force=True``. A model with nothing to fuse is
    returned unchanged (and written unchanged when ``output_path`` is given),
    its report saying "no fusable patterns".

    Each X-volution site is written in a lowering (``xvol_compiler.lowering``) for onnxruntime:
    ``lowering="auto"``, a deterministic rule without timing (``xvol_compiler.lowering_table``, by
    backend "onnxruntime", site class, ``single_conv`` and kernel);
    ``lowering="measure"`` (opt-in), the fastest on a one-site model at the site's shapes, the times
    kept in a persistent cache file (``xvol_passes.lower``); or the one forced by
    ``lowering="channel"|"spatial"|"spatial-h"|"stack"|"split"`` (a site where it is not exact keeps
    "channel", the report says why); ``single_conv=False`` allows "split" (two Conv and an Add per site).
    ``skip`` names rules not to apply (``xvol_compiler.rules.RULES``); an unknown name raises
    ``UnknownRuleError`` listing the rules.

    ``options``: a :class:`~xvol_compiler.options.FuseOptions` (shared with ``fuse``) holding ``verify``,
    ``rtol``, ``lowering`` and ``single_conv`` at once; a keyword given a value other than its default
    replaces the option's value. Its ``backend`` must be None or "onnxruntime", and ``atol``, ``inplace``
    and ``graph`` apply to ``fuse`` only.

    Raises ``OnnxFileError`` (bad input), ``OutputExistsError`` /
    ``OutputError`` (an output that cannot be written, checked before any
    work), ``OnnxVerificationError``; all are ``ValueError`` with one-line
    messages.
    """
    opts = merge(options, FuseOptions, verify=verify, rtol=rtol, lowering=lowering, single_conv=single_conv,
                 skip=skip)
    _check_onnx_options(opts)
    verify, rtol, lowering, single_conv = opts.verify, opts.rtol, opts.lowering, opts.single_conv
    rules = RuleSet.of(skip=opts.skip)
    if not isinstance(model_or_path, (str, os.PathLike, bytes, bytearray, onnx.ModelProto)):
        raise ArgumentError(
            f"model_or_path={type(model_or_path).__name__}: use an ONNX file path (str or pathlib.Path), its bytes "
            "or an onnx.ModelProto (export a torch model with export_onnx first)"
        )
    check_path("output_path", output_path, optional=True)
    check_bool("force", force)
    check_choice("interleave", interleave, ("reshape", "gather"))
    if isinstance(example_inputs, (str, bytes)):
        raise ArgumentError(
            "example_inputs is a string: use a dict of arrays by input name, a sequence in graph order, or one array"
        )
    # Output checked before any work: existing without force, missing or unwritable folder.
    out_path = None if output_path is None else check_output_path(output_path, force=force)
    loaded = load_onnx(model_or_path)
    if out_path is not None and loaded.external_data:  # the output will have a data file too
        check_output_path(out_path, force=force, external_data=True)
    model = loaded.model
    adapter = OnnxGraphAdapter(model, infer_shapes(model), interleave=interleave)
    log = run_rules(adapter, rules)
    report = FusionReport.from_log(log, source="onnx")
    if log.applied:
        report.set_lowerings(lower_sites(adapter, site_names=log.site_names, backend="onnxruntime",
                                         lowering=lowering, single_conv=single_conv))
    if not log.applied:
        fused = model
        report.notes.append(NO_SITES_NOTE)
    else:
        fused = adapter.finalize()
        _check(fused)
        if verify:
            report.max_abs_error, report.max_rel_error = compare_onnx(model, fused, example_inputs, report.notes)
            dtype = onnx_dtype(model)
            bound = default_rtol(dtype) if rtol is None else rtol
            if not accepts(ErrorStats(report.max_abs_error, report.max_rel_error, 1), rtol=bound):
                raise OnnxVerificationError(
                    f"fused model differs from the original by {report.max_rel_error:.3g} (relative) > "
                    f"rtol={bound:g} ({dtype})"
                )
    if out_path is not None:
        big = model_data_bytes(fused) > PROTOBUF_LIMIT - 2**26
        # (a model over 2 GiB is checked from the written files, before they take their final names)
        save_onnx(fused, out_path, external_data=loaded.external_data or big, force=force,
                  full_check=big)
    return fused, report


def _check_onnx_options(options: FuseOptions) -> None:
    """Refuse the options of ``fuse`` that mean nothing for an ONNX model, rather than ignore them."""
    if options.backend not in (None, "onnxruntime"):
        raise ArgumentError(f"backend={options.backend!r}: fuse_onnx lowers every site for onnxruntime; use None "
                            "or 'onnxruntime'")
    for name, default in (("atol", None), ("inplace", False), ("graph", None)):
        if getattr(options, name) != default:
            raise ArgumentError(f"{name}={getattr(options, name)!r} applies to fuse only: leave it at {default!r} "
                                "for fuse_onnx")


def _check(model: onnx.ModelProto) -> None:
    if model_data_bytes(model) > PROTOBUF_LIMIT - 2**26:
        return  # checked from the saved file (a proto over 2 GiB cannot be serialized for the checker)
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as err:
        raise OnnxError(f"internal error: the fused model fails onnx.checker: {' '.join(str(err).split())}") from err
