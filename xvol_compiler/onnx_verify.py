"""The ONNX half of the verify layer: onnxruntime sessions, feeds, running and comparing ONNX models.

- :func:`onnx_session`: the one onnxruntime session set-up of the package (CPU, quiet logs, thread pools
  without spinning, models over 2 GiB through external data); every session the package makes comes from it.
- :func:`random_inputs`: feeds for every graph input, given or random of the declared shapes.
- :func:`run_onnx`: a model's outputs on feeds, or :class:`OnnxVerificationError` naming the model.
- :func:`compare_onnx`: two models on the same feeds, errors by the package's rule
  (:func:`xvol_compiler.verify.error_stats`).

``OnnxVerificationError`` carries ``problem`` and ``fix`` apart, so the ``xvol`` command replaces the API
advice (:data:`API_FIX`, :data:`FLOAT64_FIX`) with its own flags.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from xvol_compiler.errors import InvalidArgumentError, VerificationError
from xvol_compiler.onnx_io import OnnxError
from xvol_compiler.verify import OutputMismatchError, error_stats

__all__ = [
    "API_FIX",
    "FLOAT64_FIX",
    "ExampleInputs",
    "OnnxVerificationError",
    "compare_onnx",
    "declared_inputs",
    "float64_inputs",
    "graph_inputs",
    "onnx_dtype",
    "onnx_session",
    "random_inputs",
    "run_onnx",
]

ExampleInputs = Mapping[str, Any] | Sequence[Any] | Any

API_FIX = "pass example_inputs, or verify=False to skip the check"
FLOAT64_FIX = "convert the model to float32 to verify it, or skip the check (verify=False)"


class OnnxVerificationError(OnnxError, VerificationError):
    """The fused model does not compute what the original computes (or cannot be run to check it).

    ``problem`` says what went wrong, ``fix`` what to do in API terms (empty when
    there is nothing to pass); the message is both. A command line reuses
    ``problem`` with its own flags.
    """

    def __init__(self, problem: str, fix: str = "", *, detail: str = "") -> None:
        super().__init__(f"{problem}: {fix}" if fix else problem)
        self.problem, self.fix = " ".join(problem.split()), fix
        self.detail = detail  # onnxruntime's own message, when a model did not run


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
    inputs = graph_inputs(model)
    given: dict[str, np.ndarray] = {}
    if example_inputs is not None:
        if isinstance(example_inputs, Mapping):
            given = {str(k): _as_numpy(v) for k, v in example_inputs.items()}
        else:
            items = list(example_inputs) if isinstance(example_inputs, (list, tuple)) else [example_inputs]
            given = {i.name: _as_numpy(v) for i, v in zip(inputs, items, strict=False)}
        unknown = set(given) - {i.name for i in inputs}
        if unknown:
            raise InvalidArgumentError(f"example inputs {sorted(unknown)} are not inputs of the graph")
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


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """The graph inputs a caller feeds (initializers listed as inputs by older exporters excluded)."""
    initializers = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in initializers]


def declared_inputs(model: onnx.ModelProto) -> dict[str, list[int | str]]:
    """Graph inputs and their declared shapes: numbers, or names of dynamic axes (``"?"`` when unnamed)."""
    return {i.name: [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                     for d in i.type.tensor_type.shape.dim]
            for i in graph_inputs(model)}


def float64_inputs(model: onnx.ModelProto) -> list[str]:
    """Names of the graph inputs of type double (onnxruntime's CPU provider has no double Conv)."""
    return [i.name for i in graph_inputs(model) if i.type.tensor_type.elem_type == onnx.TensorProto.DOUBLE]


def run_onnx(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray], label: str, fix: str = "", *,
             threads: int | None = None) -> list[Any]:
    """Outputs of ``model`` in onnxruntime (an :func:`onnx_session` with ``threads`` intra-op threads, None:
    two at most); ``OnnxVerificationError`` naming ``label`` when it cannot run (with ``fix``, or the
    float64 advice when onnxruntime lacks a double kernel), onnxruntime's message in its ``detail``."""
    try:
        session = onnx_session(model, threads=min(2, os.cpu_count() or 1) if threads is None else threads)
        outputs: list[Any] = session.run(None, dict(feeds))
        return outputs
    except Exception as err:  # onnxruntime raises many types
        text = " ".join(str(err).split())
        if float64_inputs(model) and ("NOT_IMPLEMENTED" in text or "implementation" in text.lower()):
            raise OnnxVerificationError(
                f"the {label} cannot run in onnxruntime, which has no float64 kernel for some of its operators "
                f"(Conv among them) ({text})", FLOAT64_FIX, detail=text,
            ) from err
        raise OnnxVerificationError(f"the {label} does not run in onnxruntime ({text})", fix, detail=text) from err


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
    ref = run_onnx(original, feeds, first, API_FIX)
    got = run_onnx(fused, feeds, second)
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




def onnx_session(
    model: Any,
    *,
    threads: int | None = None,
    optimize: bool = True,
    cuda: bool = False,
    profile_prefix: str | None = None,
) -> Any:
    """An onnxruntime ``InferenceSession`` for a ``ModelProto``, serialized bytes or a path.

    CPU execution provider (CUDA first when ``cuda`` and available), one
    inter-op thread, ``threads`` intra-op threads (None: onnxruntime's
    default), thread pools that do not spin between runs
    (``session.intra_op.allow_spinning`` and ``session.inter_op.allow_spinning``
    ``"0"``: a spinning pool steals the cores of the next session), all graph
    optimizations unless ``optimize=False``, warnings off, onnxruntime's
    profiler on when ``profile_prefix`` is given. A ``ModelProto`` too large
    for one protobuf is handed over through a temporary file with external data.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # Thread pools that spin after a run steal the cores of the next session that runs (several sessions
    # interleaved in one process: 22.6 ms against 5.9 ms without spinning, mobilenet_v3_large at batch 1).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    options.log_severity_level = 3
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    providers = ["CPUExecutionProvider"]
    if cuda and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    if isinstance(model, onnx.ModelProto):
        from xvol_compiler.files import written_now
        from xvol_compiler.onnx_io import PROTOBUF_LIMIT, model_data_bytes, save_onnx

        if model_data_bytes(model) > PROTOBUF_LIMIT - 2**26:
            with tempfile.TemporaryDirectory(prefix="xvol-session-") as tmp:
                path = Path(tmp) / "model.onnx"
                with written_now():  # read back at once, even while a command's own outputs are held back
                    save_onnx(model, path, external_data=True, force=True)
                return ort.InferenceSession(str(path), options, providers=providers)
        return ort.InferenceSession(model.SerializeToString(), options, providers=providers)
    if isinstance(model, (bytes, bytearray)):
        return ort.InferenceSession(bytes(model), options, providers=providers)
    return ort.InferenceSession(os.fspath(model), options, providers=providers)
