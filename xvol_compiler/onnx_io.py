"""Loading, saving and exporting ONNX files safely.

- ``load_onnx`` rejects empty, truncated, random or non-ONNX files with a
  one-line ``OnnxFileError`` before anything else happens, and loads external
  data (``model.onnx`` + ``model.onnx.data``) so no weight is lost.
  Every tensor's data is checked against its shape and type, so a corrupt
  initializer is an ``OnnxFileError`` naming it, not a numpy error later.
- ``save_onnx`` writes the model and its external data atomically, as a unit
  (:mod:`xvol_compiler.files`), never overwrites an existing file unless
  ``force`` is given, and writes external data when asked or when the model is
  over 2 GiB.
- ``export_onnx`` wraps ``torch.onnx.export`` (dynamo or TorchScript exporter)
  and saves its result with ``save_onnx``; the caller's model keeps every
  module's training flag, and an opset the exporter did not produce is an
  error, not a silently different file.
"""

from __future__ import annotations

import io
import itertools
import math
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
from google.protobuf.message import DecodeError  # type: ignore[import-untyped]
from onnx import external_data_helper, numpy_helper

from xvol_compiler.arguments import (
    ArgumentError,
    check_bool,
    check_example_inputs,
    check_module,
    check_names,
    check_optional_int,
    check_path,
)
from xvol_compiler.errors import XvolError
from xvol_compiler.files import OutputError, OutputExistsError, atomic_outputs, check_outputs
from xvol_compiler.training_flags import kept_training_flags

__all__ = [
    "PROTOBUF_LIMIT",
    "LoadedModel",
    "OnnxError",
    "OnnxFileError",
    "OutputError",
    "OpsetError",
    "OutputExistsError",
    "check_output_path",
    "export_onnx",
    "external_data_path",
    "load_onnx",
    "model_data_bytes",
    "model_skeleton",
    "onnx_opset",
    "save_onnx",
    "uses_external_data",
]

PROTOBUF_LIMIT = 2**31 - 1  # a serialized ModelProto cannot exceed 2 GiB


class OnnxError(XvolError, ValueError):
    """Base of the ONNX errors of this package; the message is one line."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


class OnnxFileError(OnnxError):
    """The file is not a usable ONNX model (empty, truncated, not ONNX, missing external data)."""


class OpsetError(OnnxError):
    """The exporter produced another opset than the one asked for (nothing was written)."""

    def __init__(self, message: str, asked: int, written: int | None) -> None:
        super().__init__(message)
        self.asked, self.written = asked, written


@dataclass
class LoadedModel:
    """A model with all its weights in memory, and how it was stored."""

    model: onnx.ModelProto
    external_data: bool  # the file kept (some of) its weights in external data files
    path: Path | None = None


def external_data_path(path: str | os.PathLike[str]) -> Path:
    """Where ``save_onnx`` puts the external data of ``path``: ``<name>.data`` next to it."""
    p = Path(path)
    return p.with_name(p.name + ".data")


def uses_external_data(model: onnx.ModelProto) -> bool:
    """Whether any initializer (or Constant attribute) of the model refers to an external file."""
    return any(
        external_data_helper.uses_external_data(t) for t in external_data_helper._get_all_tensors(model)
    )


def model_data_bytes(model: onnx.ModelProto) -> int:
    """Bytes of tensor data held in memory by the model (initializers, Constant attributes)."""
    total = 0
    for t in external_data_helper._get_all_tensors(model):
        if t.HasField("raw_data"):
            total += len(t.raw_data)
        else:
            total += 8 * (len(t.float_data) + len(t.int32_data) + len(t.int64_data) + len(t.double_data)
                          + len(t.uint64_data)) + sum(len(s) for s in t.string_data)
    return total


def model_skeleton(model: onnx.ModelProto, keep_elements: int = 64) -> onnx.ModelProto:
    """The model without its large weights: initializers over ``keep_elements`` elements (or stored
    externally) become typed graph inputs. Checking and shape inference on it are fast and work
    for models over 2 GiB; small (shape-like) initializers are kept so shapes still propagate."""
    skeleton = onnx.ModelProto()
    for field in ("ir_version", "producer_name", "producer_version", "domain", "model_version"):
        setattr(skeleton, field, getattr(model, field))
    skeleton.opset_import.extend(model.opset_import)
    skeleton.functions.extend(model.functions)
    src, graph = model.graph, skeleton.graph
    graph.name = src.name
    graph.node.extend(src.node)
    graph.input.extend(src.input)
    graph.output.extend(src.output)
    graph.value_info.extend(src.value_info)
    graph.sparse_initializer.extend(src.sparse_initializer)
    input_names = {i.name for i in src.input}
    for init in src.initializer:
        small = math.prod(init.dims) <= keep_elements and init.data_location != onnx.TensorProto.EXTERNAL
        if small:
            graph.initializer.append(init)
        elif init.name not in input_names:
            graph.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    return skeleton


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _validate(model: onnx.ModelProto, where: str) -> None:
    if model.ir_version <= 0 or not model.opset_import or not model.HasField("graph"):
        raise OnnxFileError(f"{where} is not an ONNX model (no IR version, opset or graph)")
    if not model.graph.output:
        raise OnnxFileError(f"{where} is not a usable ONNX model: the graph has no outputs")
    try:
        onnx.checker.check_model(model_skeleton(model))
    except onnx.checker.ValidationError as err:
        raise OnnxFileError(f"{where} is not a valid ONNX model: {_one_line(err)}") from err
    _check_tensors(model, where)


def _graph_tensors(graph: onnx.GraphProto) -> Iterator[tuple[str, onnx.TensorProto]]:
    """(kind, tensor) for the data a graph holds: initializers, sparse ones, Constant-like attributes,
    and the same in subgraphs (If / Loop / Scan bodies)."""
    for t in graph.initializer:
        yield "initializer", t
    for sparse in graph.sparse_initializer:
        yield "sparse initializer values", sparse.values
        yield "sparse initializer indices", sparse.indices
    yield from _node_tensors(graph.node)


def _node_tensors(nodes: Sequence[onnx.NodeProto]) -> Iterator[tuple[str, onnx.TensorProto]]:
    for node in nodes:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield f"{node.op_type} attribute {attr.name!r}", attr.t
            for t in attr.tensors:
                yield f"{node.op_type} attribute {attr.name!r}", t
            if attr.HasField("sparse_tensor"):
                yield f"{node.op_type} attribute {attr.name!r}", attr.sparse_tensor.values
            if attr.HasField("g"):
                yield from _graph_tensors(attr.g)
            for g in attr.graphs:
                yield from _graph_tensors(g)


_PACKED_TYPES = {getattr(onnx.TensorProto, n) for n in ("INT4", "UINT4", "FLOAT4E2M1", "INT2", "UINT2",
                                                       "FLOAT6E2M3", "FLOAT6E3M2") if hasattr(onnx.TensorProto, n)}


def _check_tensor(t: onnx.TensorProto) -> str | None:
    """Why the tensor's data cannot be read as its shape and type say, or None when it can."""
    if any(d < 0 for d in t.dims):
        return f"negative dimension in its shape {list(t.dims)}"
    try:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.data_type)
    except (KeyError, ValueError, TypeError):
        return f"unknown data type {t.data_type}"
    count = math.prod(t.dims)
    if t.HasField("raw_data") and t.data_type not in _PACKED_TYPES and t.data_type != onnx.TensorProto.STRING:
        need = count * dtype.itemsize
        if len(t.raw_data) != need:
            return (f"holds {len(t.raw_data)} bytes of data where its shape {list(t.dims)} of "
                    f"{onnx.TensorProto.DataType.Name(t.data_type).lower()} needs {need}")
        return None
    try:
        numpy_helper.to_array(t)
    except Exception as err:  # numpy, onnx and ml_dtypes raise many types for inconsistent data
        return f"its data does not fit its shape {list(t.dims)} and type ({_one_line(err)})"
    return None


def _check_tensors(model: onnx.ModelProto, where: str) -> None:
    """Every tensor of the model can be read as its shape and type say (an ``OnnxFileError`` otherwise,
    naming the tensor and ``where``), so nothing later fails on a corrupt initializer."""
    functions = (item for f in model.functions for item in _node_tensors(f.node))
    for kind, t in itertools.chain(_graph_tensors(model.graph), functions):
        problem = _check_tensor(t)
        if problem is not None:
            raise OnnxFileError(f"{where}: {kind} {t.name!r} {problem}: the file is corrupt or truncated")


def load_onnx(source: str | os.PathLike[str] | bytes | onnx.ModelProto) -> LoadedModel:
    """Load and validate an ONNX model with all its external data.

    ``source`` is a path, the serialized bytes, or a ``ModelProto`` (used as
    it is, never modified). Raises ``OnnxFileError`` with a one-line message for a
    missing, empty, truncated, random or non-ONNX file and for missing
    external data.
    """
    if not isinstance(source, (str, os.PathLike, bytes, bytearray, onnx.ModelProto)):
        raise ArgumentError(
            f"source={type(source).__name__}: use an ONNX file path (str or pathlib.Path), its bytes or an "
            "onnx.ModelProto"
        )
    if isinstance(source, onnx.ModelProto):
        model = source
        if uses_external_data(model):
            raise OnnxFileError(
                "the model refers to external data files that are not loaded: pass its path instead"
            )
        _validate(model, "the model")
        return LoadedModel(model, external_data=False)
    if isinstance(source, (bytes, bytearray)):
        where, data, path = "the given bytes", bytes(source), None
    else:
        path = Path(source)
        where = str(path)
        if not path.exists():
            raise OnnxFileError(f"{where}: no such file")
        if not path.is_file():
            raise OnnxFileError(f"{where}: not a file")
        try:
            data = path.read_bytes()
        except OSError as err:
            raise OnnxFileError(f"{where}: cannot read: {_one_line(err)}") from err
    if not data:
        raise OnnxFileError(f"{where} is empty, not an ONNX model")
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as err:
        raise OnnxFileError(f"{where} is not an ONNX model (truncated or not a protobuf file): "
                            f"{_one_line(err)}") from err
    external = uses_external_data(model)
    if external:
        if path is None:
            raise OnnxFileError("the model refers to external data files: load it from its path")
        try:
            external_data_helper.load_external_data_for_model(model, str(path.parent))
        except (OSError, ValueError, TypeError, KeyError, onnx.checker.ValidationError) as err:
            raise OnnxFileError(f"{where}: cannot load its external data: {_one_line(err)}") from err
    _validate(model, where)
    return LoadedModel(model, external_data=external, path=path)


def check_output_path(path: str | os.PathLike[str], *, force: bool, external_data: bool = False) -> Path:
    """Fail early (before any work) when ``path`` (and with ``external_data`` its ``.data`` file)
    may not be written: ``OutputExistsError`` without ``force``, ``OutputError`` for a directory or a
    missing or unwritable folder (see :mod:`xvol_compiler.files`)."""
    check_path("path", path)
    check_bool("force", force)
    out = Path(path)
    check_outputs([out, external_data_path(out)] if external_data else [out], force=force)
    return out


def save_onnx(
    model: onnx.ModelProto,
    path: str | os.PathLike[str],
    *,
    external_data: bool | None = None,
    force: bool = False,
    full_check: bool = False,
) -> Path:
    """Write ``model`` to ``path`` atomically; external data goes to ``<path>.data``, written with it as a unit.

    ``external_data=None`` chooses external data only when the model is too
    large for one protobuf file. The model passed in is not modified. Nothing
    is written when ``path`` exists and ``force`` is False. ``full_check``
    runs ``onnx.checker`` (full check) on the written files before they take
    their final names (the way to check a model over 2 GiB).
    """
    if not isinstance(model, onnx.ModelProto):
        raise ArgumentError(f"model={type(model).__name__}: save_onnx takes an onnx.ModelProto")
    check_path("path", path)
    if external_data is not None:
        check_bool("external_data", external_data)
    out = Path(path)
    size = model_data_bytes(model)
    external = size > PROTOBUF_LIMIT - 2**26 if external_data is None else external_data
    if not external and size > PROTOBUF_LIMIT - 2**26:
        raise OnnxError(f"the model holds {size / 2**30:.2f} GiB of weights: save it with external data")
    check_output_path(out, force=force, external_data=external)
    data = external_data_path(out)
    # The temporaries keep the final names, side by side: the model refers to its data file by name.
    with atomic_outputs([out, data] if external else [out], force=force, optional=[data]) as tmps:
        tmp_model = tmps[0]
        if external:
            copy = onnx.ModelProto()
            copy.CopyFrom(model)
            # (convert_model_to_external_data edits the copy: the caller's model keeps its data in memory.)
            external_data_helper.convert_model_to_external_data(
                copy, all_tensors_to_one_file=True, location=data.name, size_threshold=1024
            )
            onnx.save_model(copy, str(tmp_model))
        else:
            tmp_model.write_bytes(model.SerializeToString())
        if full_check:
            try:
                onnx.checker.check_model(str(tmp_model), full_check=True)
            except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as err:
                raise OnnxError(f"{out} fails onnx.checker: {_one_line(err)}") from err
    return out


def _tensor_args(args: Any) -> list[Any]:
    import torch

    items = args if isinstance(args, (tuple, list)) else (args,)
    return [a for a in items if isinstance(a, torch.Tensor)]


def export_onnx(
    model: Any,
    path: str | os.PathLike[str] | None,
    example_inputs: Any,
    *,
    dynamo: bool = True,
    optimize: bool = True,
    opset: int | None = None,
    dynamic_batch: bool = True,
    external_data: bool = False,
    force: bool = False,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
) -> onnx.ModelProto:
    """Export a ``torch.nn.Module`` to ONNX and (when ``path`` is given) save it with ``save_onnx``.

    ``dynamo=True`` uses the ``torch.export`` based exporter (``optimize`` runs
    its graph optimizer, which folds BatchNorm into Conv); ``dynamo=False`` the
    TorchScript exporter. ``dynamic_batch`` makes dimension 0 of every tensor
    input (and output) dynamic; a batch-1 example is repeated to batch 2 for
    the dynamo exporter, which would otherwise specialise on the size 1.
    Inputs are named ``input`` (``input_0``, ``input_1``, ... for several) and
    outputs ``output`` (``output_0``, ...) unless names are given. Returns the
    exported ``ModelProto`` (weights in memory).
    """
    import torch

    check_module("model", model)
    check_path("path", path, optional=True)
    check_example_inputs(example_inputs, optional=False)
    for flag, value in (("dynamo", dynamo), ("optimize", optimize), ("dynamic_batch", dynamic_batch),
                        ("external_data", external_data), ("force", force)):
        check_bool(flag, value)
    check_optional_int("opset", opset, 7)
    check_names("input_names", input_names)
    check_names("output_names", output_names)
    if path is not None:
        check_output_path(path, force=force, external_data=external_data)
    args = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    tensors = _tensor_args(args)
    if input_names is None:
        input_names = ["input"] if len(tensors) == 1 else [f"input_{i}" for i in range(len(tensors))]
    with kept_training_flags(model), warnings.catch_warnings():
        model.eval()
        warnings.simplefilter("ignore")
        if dynamo:
            dynamic_shapes = None
            if dynamic_batch:
                batch = torch.export.Dim("batch", min=1)
                args = tuple(
                    a.expand(2, *a.shape[1:]).contiguous() if isinstance(a, torch.Tensor) and a.dim() > 0
                    and a.shape[0] == 1 else a
                    for a in args
                )
                dynamic_shapes = tuple(
                    {0: batch} if isinstance(a, torch.Tensor) and a.dim() > 0 else None for a in args
                )
            program = torch.onnx.export(
                model, args, None, dynamo=True, optimize=optimize, opset_version=opset, verbose=False,
                input_names=list(input_names), output_names=None if output_names is None else list(output_names),
                dynamic_shapes=dynamic_shapes,
            )
            if program is None:  # pragma: no cover - torch returns the program when f is None
                raise OnnxError("torch.onnx.export returned no program")
            proto = program.model_proto
        else:
            buffer = io.BytesIO()
            outputs = list(output_names) if output_names is not None else None
            dynamic_axes: Mapping[str, Mapping[int, str]] | None = None
            if dynamic_batch:
                if outputs is None:
                    with torch.no_grad():
                        result = model(*args)
                    n_out = len(result) if isinstance(result, (tuple, list)) else 1
                    outputs = ["output"] if n_out == 1 else [f"output_{i}" for i in range(n_out)]
                dynamic_axes = {name: {0: "batch"} for name in [*input_names, *outputs]}
            # (the TorchScript exporter writes to a file-like object too; the annotation says a path)
            torch.onnx.export(
                model, args, buffer, dynamo=False, opset_version=opset, input_names=list(input_names),  # type: ignore[arg-type]
                output_names=outputs, dynamic_axes=dynamic_axes, do_constant_folding=True,
            )
            proto = onnx.load_from_string(buffer.getvalue())
    written = onnx_opset(proto)
    if opset is not None and written != opset:
        # The dynamo exporter builds opset 18+ and converts down when asked; a failed conversion keeps
        # the higher opset and only logs it. A file of another opset than asked for is not written.
        raise OpsetError(
            f"opset {opset} was asked for but the {'dynamo' if dynamo else 'TorchScript'} exporter produced "
            f"opset {written}{' (it could not convert this model down)' if dynamo else ''}; nothing was written. "
            + ("Use opset >= 18, or dynamo=False (the TorchScript exporter) for an older opset"
               if dynamo else "Use another opset"),
            asked=opset, written=written,
        )
    if path is not None:
        save_onnx(proto, path, external_data=external_data, force=force)
    return proto


def onnx_opset(model: onnx.ModelProto) -> int | None:
    """The model's default-domain (``ai.onnx``) opset version, or None when it imports none."""
    return next((int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
