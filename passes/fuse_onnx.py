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
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from xvol_compiler.fusion_report import FusionReport
from xvol_compiler.onnx_io import (
    PROTOBUF_LIMIT,
    OnnxError,
    OnnxFileError,
    OutputExistsError,
    check_output_path,
    export_onnx,
    load_onnx,
    model_data_bytes,
    save_onnx,
)
from xvol_compiler.passes.lower import lower_sites, validate_options
from xvol_compiler.passes.onnx_graph import Interleave, OnnxGraphAdapter, infer_shapes
from xvol_compiler.rules import run_rules

__all__ = [
    "NO_SITES_NOTE",
    "OnnxError",
    "OnnxFileError",
    "OutputExistsError",
    "OnnxVerificationError",
    "compare_onnx",
    "export_onnx",
    "fuse_onnx",
    "random_inputs",
]

NO_SITES_NOTE = "no fusable patterns: the model is returned unchanged"
ExampleInputs = Mapping[str, Any] | Sequence[Any] | Any


class OnnxVerificationError(OnnxError):
    """The fused model does not compute what the original computes (or cannot be run to check it)."""


def _as_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def random_inputs(
    model: onnx.ModelProto, example_inputs: ExampleInputs | None = None, *, seed: int = 0,
    dynamic_dim: int = 32,
) -> dict[str, np.ndarray]:
    """Feeds for every graph input: the given examples (a dict by name, a sequence in graph
    order, or a single array/tensor) or random values of the declared shape and type.
    Dynamic dimensions become 1 on axis 0 (batch) and ``dynamic_dim`` elsewhere."""
    initializers = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    given: dict[str, np.ndarray] = {}
    if example_inputs is not None:
        if isinstance(example_inputs, Mapping):
            given = {str(k): _as_numpy(v) for k, v in example_inputs.items()}
        else:
            items = list(example_inputs) if isinstance(example_inputs, (list, tuple)) else [example_inputs]
            given = {i.name: _as_numpy(v) for i, v in zip(inputs, items, strict=False)}
        unknown = set(given) - {i.name for i in inputs}
        if unknown:
            raise ValueError(f"example inputs {sorted(unknown)} are not inputs of the graph")
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for vi in inputs:
        if vi.name in given:
            feeds[vi.name] = given[vi.name]
            continue
        t = vi.type.tensor_type
        if not vi.type.HasField("tensor_type"):
            raise OnnxVerificationError(f"graph input {vi.name!r} is not a tensor: pass example_inputs")
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)
        shape = [
            d.dim_value if d.HasField("dim_value") else (1 if axis == 0 else dynamic_dim)
            for axis, d in enumerate(t.shape.dim)
        ]
        if np.issubdtype(dtype, np.floating):
            feeds[vi.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype == np.bool_:
            feeds[vi.name] = rng.integers(0, 2, shape).astype(np.bool_)
        else:
            feeds[vi.name] = rng.integers(0, 2, shape).astype(dtype)
    return feeds


def _session(model: onnx.ModelProto, tmp: Path, label: str) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = min(2, os.cpu_count() or 1)
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    if model_data_bytes(model) > PROTOBUF_LIMIT - 2**26:
        path = tmp / f"{label}.onnx"
        save_onnx(model, path, external_data=True, force=True)
        source: Any = str(path)
    else:
        source = model.SerializeToString()
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def compare_onnx(
    original: onnx.ModelProto,
    fused: onnx.ModelProto,
    example_inputs: ExampleInputs | None = None,
    notes: list[str] | None = None,
) -> tuple[float, float]:
    """Run both models in onnxruntime (CPU) on the same inputs; (max abs, max rel) error over outputs.

    The relative error of an output is ``max|fused - original| / max|original|``.
    Raises ``OnnxVerificationError`` when a model cannot be run, when the fused one
    gives a non-finite number where the original does not (or the reverse),
    and when the original gives no finite number at all (nothing to compare:
    overflowing BatchNorm statistics, usually). Non-finite values of the
    original are listed in ``notes`` when given.
    """
    feeds = random_inputs(original, example_inputs)
    with tempfile.TemporaryDirectory(prefix="xvol-verify-") as tmp:
        try:
            ref_session = _session(original, Path(tmp), "original")
            ref = ref_session.run(None, feeds)
        except Exception as err:  # onnxruntime raises many types
            raise OnnxVerificationError(
                f"cannot run the original model in onnxruntime to verify the fusion ({err}); "
                "pass example_inputs, or verify=False to skip"
            ) from err
        try:
            got = _session(fused, Path(tmp), "fused").run(None, feeds)
        except Exception as err:
            raise OnnxVerificationError(f"the fused model does not run in onnxruntime: {err}") from err
    abs_err = rel_err = 0.0
    for name, r, g in zip([o.name for o in original.graph.output], ref, got, strict=True):
        r64, g64 = np.asarray(r, dtype=np.float64), np.asarray(g, dtype=np.float64)
        if r64.shape != g64.shape:
            raise OnnxVerificationError(f"output {name!r}: shape {g64.shape} after fusion, {r64.shape} before")
        finite = np.isfinite(r64)
        if not np.array_equal(finite, np.isfinite(g64)):
            raise OnnxVerificationError(f"output {name!r}: the fused model gives non-finite values where the "
                                    "original does not (or the reverse)")
        if not finite.all():
            bad = int(finite.size - finite.sum())
            if not finite.any():
                raise OnnxVerificationError(
                    f"output {name!r} of the original model is not finite on the verification inputs, so the "
                    "fusion cannot be checked (BatchNorm statistics overflow?): pass example_inputs, or verify=False"
                )
            if notes is not None:
                notes.append(f"output {name!r}: {bad} of {finite.size} values of the original model are not "
                             "finite (the fused model agrees); compared the finite ones")
        diff = np.abs(g64[finite] - r64[finite])
        scale = max(float(np.abs(r64[finite]).max()), 1e-12)
        abs_err = max(abs_err, float(diff.max()))
        rel_err = max(rel_err, float(diff.max()) / scale)
    return abs_err, rel_err


def fuse_onnx(
    model_or_path: str | os.PathLike[str] | bytes | onnx.ModelProto,
    *,
    verify: bool = True,
    rtol: float = 1e-4,
    example_inputs: ExampleInputs | None = None,
    output_path: str | os.PathLike[str] | None = None,
    force: bool = False,
    interleave: Interleave = "reshape",
    lowering: str = "auto",
    single_conv: bool = True,
) -> tuple[onnx.ModelProto, FusionReport]:
    """Fuse every X-volution site, conv + BatchNorm and foldable branch sum of an ONNX model.

    Returns ``(fused_model, report)``. With ``verify`` the fused and original
    models run in onnxruntime on ``example_inputs`` (or random inputs of the
    graph's input shapes, dynamic dimensions 1 for the batch and 32 elsewhere)
    and ``report.max_abs_error`` / ``max_rel_error`` are filled; a relative
    error above ``rtol`` raises ``OnnxVerificationError`` and nothing is written.
    ``output_path`` is written atomically, with external data (``<out>.data``)
    when the input had external data or the model exceeds 2 GiB; an existing
    file is only replaced with ``force=True``. A model with nothing to fuse is
    returned unchanged (and written unchanged when ``output_path`` is given),
    its report saying "no fusable patterns".

    Each X-volution site is written in the lowering (``xvol_compiler.lowering``) fastest in
    onnxruntime, measured on a one-site model at the site's shapes (``lowering="auto"``), or the one
    forced by ``lowering="channel"|"spatial"|"split"`` (a site where it is not exact keeps "channel",
    the report says why); ``single_conv=False`` allows "split" (two Conv and an Add per site).

    Raises ``OnnxFileError`` (bad input), ``OutputExistsError``,
    ``OnnxVerificationError``; all are ``ValueError`` with one-line messages.
    """
    validate_options("onnxruntime", lowering, single_conv)
    out_path = None if output_path is None else check_output_path(output_path, force=force)
    loaded = load_onnx(model_or_path)
    model = loaded.model
    adapter = OnnxGraphAdapter(model, infer_shapes(model), interleave=interleave)
    log = run_rules(adapter)
    report = FusionReport.from_log(log, source="onnx")
    if log.applied:
        report.set_lowerings(lower_sites(
            adapter, name_of=adapter.site_name, shape_of=lambda branch: adapter.input_shape(str(branch.inputs[0])),
            backend="onnxruntime", lowering=lowering, single_conv=single_conv, asymmetric_pads=True,
            refusal=adapter.lowering_refusal,
        ))
    if not log.applied:
        fused = model
        report.notes.append(NO_SITES_NOTE)
    else:
        fused = adapter.to_model()
        _check(fused)
        if verify:
            report.max_abs_error, report.max_rel_error = compare_onnx(model, fused, example_inputs, report.notes)
            if report.max_rel_error > rtol:
                raise OnnxVerificationError(
                    f"fused model differs from the original by {report.max_rel_error:.3g} (relative) > rtol={rtol}"
                )
    if out_path is not None:
        external = loaded.external_data or model_data_bytes(fused) > PROTOBUF_LIMIT - 2**26
        save_onnx(fused, out_path, external_data=external, force=force)
        if model_data_bytes(fused) > PROTOBUF_LIMIT - 2**26:
            onnx.checker.check_model(str(out_path), full_check=True)
    return fused, report


def _check(model: onnx.ModelProto) -> None:
    if model_data_bytes(model) > PROTOBUF_LIMIT - 2**26:
        return  # checked from the saved file (a proto over 2 GiB cannot be serialized for the checker)
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as err:
        raise OnnxError(f"internal error: the fused model fails onnx.checker: {' '.join(str(err).split())}") from err
