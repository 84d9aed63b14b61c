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
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import numpy as np
import onnx

from xvol_compiler.arguments import ArgumentError, check_bool, check_choice, check_path, check_tolerance
from xvol_compiler.errors import VerificationError
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
from xvol_compiler.rules import RuleSet, run_rules
from xvol_compiler.verify import ErrorStats, OutputMismatchError, accepts, default_rtol, error_stats, onnx_session
from xvol_passes.lower import lower_sites, validate_options
from xvol_passes.onnx_graph import Interleave, OnnxGraphAdapter, infer_shapes

__all__ = [
    "NO_SITES_NOTE",
    "OnnxError",
    "OnnxFileError",
    "OutputError",
    "OutputExistsError",
    "OnnxVerificationError",
    "compare_onnx",
    "onnx_dtype",
    "export_onnx",
    "fuse_onnx",
    "random_inputs",
]

NO_SITES_NOTE = "no fusable patterns: the model is returned unchanged"
ExampleInputs = Mapping[str, Any] | Sequence[Any] | Any


API_FIX = "pass example_inputs, or verify=False to skip the check"
FLOAT64_FIX = "convert the model to float32 to verify it, or skip the check (verify=False)"


class OnnxVerificationError(OnnxError, VerificationError):
    """The fused model does not compute what the original computes (or cannot be run to check it).

    ``problem`` says what went wrong, ``fix`` what to do in API terms (empty when
    there is nothing to pass); the message is both. A command line reuses
    ``problem`` with its own flags.
    """

    def __init__(self, problem: str, fix: str = "") -> None:
        super().__init__(f"{problem}: {fix}" if fix else problem)
        self.problem, self.fix = " ".join(problem.split()), fix


def _as_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def random_inputs(
    model: onnx.ModelProto, example_inputs: ExampleInputs | None = None, *, seed: int = 0,
    dynamic_dim: int = 32, batch: int = 1,
) -> dict[str, np.ndarray]:
    """Feeds for every graph input: the given examples (a dict by name, a sequence in graph
    order, or a single array/tensor) or random values of the declared shape and type.
    Dynamic dimensions become ``batch`` on axis 0 and ``dynamic_dim`` elsewhere."""
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
            d.dim_value if d.HasField("dim_value") else (batch if axis == 0 else dynamic_dim)
            for axis, d in enumerate(t.shape.dim)
        ]
        if np.issubdtype(dtype, np.floating):
            feeds[vi.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype == np.bool_:
            feeds[vi.name] = rng.integers(0, 2, shape).astype(np.bool_)
        else:
            feeds[vi.name] = rng.integers(0, 2, shape).astype(dtype)
    return feeds


def float64_inputs(model: onnx.ModelProto) -> list[str]:
    """Names of the graph inputs of type double (onnxruntime's CPU provider has no double Conv)."""
    initializers = {t.name for t in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in initializers
            and i.type.tensor_type.elem_type == onnx.TensorProto.DOUBLE]


def _run(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray], label: str, fix: str) -> list[Any]:
    """Outputs of ``model`` in onnxruntime; ``OnnxVerificationError`` naming ``label`` when it cannot run
    (with ``fix``, or the float64 advice when onnxruntime lacks a double kernel)."""
    try:
        return onnx_session(model, threads=min(2, os.cpu_count() or 1)).run(None, dict(feeds))
    except Exception as err:  # onnxruntime raises many types
        text = " ".join(str(err).split())
        if float64_inputs(model) and ("NOT_IMPLEMENTED" in text or "implementation" in text.lower()):
            raise OnnxVerificationError(
                f"the {label} cannot run in onnxruntime, which has no float64 kernel for some of its operators "
                f"(Conv among them) ({text})", FLOAT64_FIX,
            ) from err
        raise OnnxVerificationError(f"the {label} does not run in onnxruntime ({text})", fix) from err


def onnx_dtype(model: onnx.ModelProto) -> str:
    """Element type of the model's first floating graph output (then input), e.g. ``"float16"``."""
    for vi in list(model.graph.output) + list(model.graph.input):
        elem = vi.type.tensor_type.elem_type
        if elem in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
                    onnx.TensorProto.BFLOAT16):
            return {onnx.TensorProto.BFLOAT16: "bfloat16"}.get(
                elem, np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem)).name)
    return "float32"


def compare_onnx(
    original: onnx.ModelProto,
    fused: onnx.ModelProto,
    example_inputs: ExampleInputs | None = None,
    notes: list[str] | None = None,
    *,
    labels: tuple[str, str] = ("original model", "fused model"),
) -> tuple[float, float]:
    """Run both models in onnxruntime (CPU) on the same inputs; (max abs, max rel) error over outputs.

    The errors follow the package's rule (:func:`xvol_compiler.verify.error_stats`):
    the relative error of an output is ``max|fused - original| / max|original|``.
    Raises ``OnnxVerificationError`` when a model cannot be run, when the fused one
    gives a non-finite number where the original does not (or the reverse),
    and when the original gives no finite number at all (nothing to compare:
    overflowing BatchNorm statistics, usually). Non-finite values of the
    original are listed in ``notes`` when given. ``labels`` name the two models
    in messages.
    """
    first, second = labels
    feeds = random_inputs(original, example_inputs)
    ref = _run(original, feeds, first, API_FIX)
    got = _run(fused, feeds, second, "")
    names = [o.name for o in original.graph.output]
    if len(ref) != len(got):
        raise OnnxVerificationError(f"the {first} has {len(ref)} outputs, the {second} {len(got)}")
    abs_err = rel_err = 0.0
    for name, r, g in zip(names, ref, got, strict=True):
        try:
            stats = error_stats(np.asarray(r), np.asarray(g), [repr(name)])
        except OutputMismatchError:
            raise OnnxVerificationError(f"output {name!r}: shape {np.shape(g)} in the {second}, "
                                        f"{np.shape(r)} in the {first}") from None
        if stats.mismatch:
            raise OnnxVerificationError(f"output {name!r}: the {second} gives non-finite values where the "
                                        f"{first} does not (or the reverse)")
        if not stats.checkable:
            raise OnnxVerificationError(
                f"output {name!r} of the {first} is not finite on the verification inputs, so the models cannot "
                "be compared (BatchNorm statistics overflow?)", API_FIX)
        if stats.nonfinite and notes is not None:
            notes.append(f"output {name!r}: {stats.nonfinite} of {np.size(r)} values of the {first} are not "
                         f"finite (the {second} agrees); compared the finite ones")
        abs_err, rel_err = max(abs_err, stats.max_abs), max(rel_err, stats.max_rel)
    return abs_err, rel_err


def fuse_onnx(
    model_or_path: str | os.PathLike[str] | bytes | onnx.ModelProto,
    *,
    verify: bool = True,
    rtol: float | None = None,
    example_inputs: ExampleInputs | None = None,
    output_path: str | os.PathLike[str] | None = None,
    force: bool = False,
    interleave: Interleave = "reshape",
    lowering: str = "auto",
    single_conv: bool = True,
    skip: Collection[str] = (),
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
    ``lowering="auto"``, a deterministic rule without timing (``xvol_compiler.lowering_table``: a
    depthwise site takes "split" with ``single_conv=False``, else "spatial"; other sites "channel");
    ``lowering="measure"`` (opt-in), the fastest on a one-site model at the site's shapes, the times
    kept in a persistent cache file (``xvol_passes.lower``); or the one forced by
    ``lowering="channel"|"spatial"|"split"`` (a site where it is not exact keeps "channel", the
    report says why); ``single_conv=False`` allows "split" (two Conv and an Add per site).
    ``skip`` names rules not to apply (``xvol_compiler.rules.RULES``); an unknown name raises
    ``UnknownRuleError`` listing the rules.

    Raises ``OnnxFileError`` (bad input), ``OutputExistsError`` /
    ``OutputError`` (an output that cannot be written, checked before any
    work), ``OnnxVerificationError``; all are ``ValueError`` with one-line
    messages.
    """
    validate_options("onnxruntime", lowering, single_conv)
    rules = RuleSet.of(skip=skip)
    if not isinstance(model_or_path, (str, os.PathLike, bytes, bytearray, onnx.ModelProto)):
        raise ArgumentError(
            f"model_or_path={type(model_or_path).__name__}: use an ONNX file path (str or pathlib.Path), its bytes "
            "or an onnx.ModelProto (export a torch model with export_onnx first)"
        )
    check_bool("verify", verify)
    check_tolerance("rtol", rtol, optional=True)
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


def _check(model: onnx.ModelProto) -> None:
    if model_data_bytes(model) > PROTOBUF_LIMIT - 2**26:
        return  # checked from the saved file (a proto over 2 GiB cannot be serialized for the checker)
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as err:
        raise OnnxError(f"internal error: the fused model fails onnx.checker: {' '.join(str(err).split())}") from err
