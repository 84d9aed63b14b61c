"""Constant evaluation for the ONNX adapter: which tensors are constants (initializers, ``Constant``
outputs, small constant subgraphs evaluated with ``onnx.reference``) and which are *static* (no
activation value flows into them: constants, and shapes of activations), with their values.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import numpy.typing as npt
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter

from xvol_compiler.onnx_io import OnnxFileError

__all__ = ["DEFAULT_DOMAINS", "OnnxConstants", "Shapes", "tensor_values"]

Shapes = Mapping[str, tuple[int | str | None, ...]]
DEFAULT_DOMAINS = (None, "", "ai.onnx")
# Ops whose output is a constant when their inputs are: evaluated with onnx.reference.
_FOLDABLE = {
    "Identity", "Cast", "CastLike", "Shape", "Size", "Expand", "Reshape", "Unsqueeze", "Squeeze", "Flatten",
    "Concat", "Transpose", "Gather", "Slice", "Add", "Sub", "Mul", "Div", "Neg", "Sqrt", "Reciprocal", "Pow",
    "Abs", "ConstantOfShape", "Range", "Tile", "Mod",
    # Weight standardization (StdConv2d / ScaledStdConv2d) as the TorchScript exporter writes it.
    "ReduceMean", "BatchNormalization",
}
_SHAPE_ONLY = {("Shape", 0), ("Size", 0), ("CastLike", 1)}  # (op, input): only the tensor's type/shape is read
_FOLD_ELEMENT_LIMIT = 1 << 26  # do not evaluate constant subgraphs larger than this (elements)
_MAX_DEPTH = 32  # producers followed back from a tensor before it counts as neither constant nor static


def tensor_values(t: gs.Constant) -> np.ndarray:
    """A constant's data. ``load_onnx`` checks every tensor of a file; a model given to the adapter
    directly may still hold data that does not fit its shape or type: say which tensor."""
    try:
        return np.asarray(t.values)
    except Exception as err:  # numpy / onnx / ml_dtypes errors, depending on the damage
        raise OnnxFileError(f"tensor {t.name!r} of the model cannot be read as its shape and type say: "
                            f"{' '.join(str(err).split())}") from err


class OnnxConstants:
    """The constants of ``graph`` (an onnx-graphsurgeon import of ``model``), cached by tensor name."""

    def __init__(self, model: onnx.ModelProto, shapes: Shapes) -> None:
        self.model = model
        self.graph = gs.import_onnx(model)
        self.shapes = dict(shapes)
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
        self._const_cache: dict[str, np.ndarray | None] = {}
        self._is_const_cache: dict[str, bool] = {}  # tensor names are never reused (see the emitter's _fresh)
        self._is_static_cache: dict[str, bool] = {}

    def is_const(self, t: gs.Tensor, depth: int = 0) -> bool:
        return self._cached_check(t, depth, self._is_const_cache, self._compute_is_const)

    @staticmethod
    def _cached_check(t: gs.Tensor, depth: int, cache: dict[str, bool],
                      compute: Callable[[gs.Tensor, int], bool]) -> bool:
        """``is_const`` / ``is_static``: True for a ``gs.Constant``; False for a tensor without exactly one
        producer, or more than ``_MAX_DEPTH`` producers deep; else ``compute(t, depth)``, cached by name."""
        if isinstance(t, gs.Constant):
            return True
        if not t.name or len(t.inputs) != 1 or depth > _MAX_DEPTH:
            return False
        cached = cache.get(t.name)
        if cached is None:
            cached = cache[t.name] = compute(t, depth)
        return cached

    def _compute_is_const(self, t: gs.Tensor, depth: int) -> bool:
        node = t.inputs[0]
        if node.domain not in DEFAULT_DOMAINS:
            return False
        if node.op == "Constant":
            return True
        if node.op not in _FOLDABLE:
            return False
        for i, inp in enumerate(node.inputs):
            if not inp.name:
                continue
            if (node.op, i) in _SHAPE_ONLY and self._known_type(inp, need_shape=node.op != "CastLike"):
                continue
            if not self.is_const(inp, depth + 1):
                return False
        return True

    def is_static(self, t: gs.Tensor, depth: int = 0) -> bool:
        """Whether no activation *value* flows into ``t``: constants, and what is computed from
        constants and the shapes (``Shape``/``Size``) or types of activations, such as the target
        shape of a dynamic-batch ``Reshape``. Static tensors are not in the view: they are
        metadata, not data, for the rules' question "is this derived from that tensor alone"."""
        return self._cached_check(t, depth, self._is_static_cache, self._compute_is_static)

    def _compute_is_static(self, t: gs.Tensor, depth: int) -> bool:
        node = t.inputs[0]
        if node.domain not in DEFAULT_DOMAINS:
            return False
        if node.op in ("Constant", "Shape", "Size"):
            return True
        if node.op not in _FOLDABLE:
            return False
        return all(
            not inp.name or (node.op, i) in _SHAPE_ONLY or self.is_static(inp, depth + 1)
            for i, inp in enumerate(node.inputs)
        )

    def _known_type(self, t: gs.Tensor, *, need_shape: bool) -> bool:
        if t.dtype is None and not isinstance(t, gs.Constant):
            return False
        if not need_shape:
            return True
        return _int_shape(self.shape(t)) is not None

    def shape(self, t: gs.Tensor) -> tuple[int | str | None, ...] | None:
        if t.shape is not None:
            return tuple(t.shape)
        return self.shapes.get(t.name)

    def const(self, t: gs.Tensor) -> np.ndarray | None:
        """The value of a constant tensor (evaluating small constant subgraphs), else None."""
        if isinstance(t, gs.Constant):
            return tensor_values(t)
        if t.name in self._const_cache:
            return self._const_cache[t.name]
        value = self._evaluate(t) if self.is_const(t) else None
        self._const_cache[t.name] = value
        return value

    def _evaluate(self, t: gs.Tensor) -> np.ndarray | None:
        from onnx.reference import ReferenceEvaluator

        node = t.inputs[0]
        if node.op == "Constant":
            attrs = node.attrs
            if "value" in attrs:
                value = attrs["value"]
                return tensor_values(value) if isinstance(value, gs.Constant) else np.asarray(value)
            for key, dtype in (("value_float", np.float32), ("value_floats", np.float32), ("value_int", np.int64),
                               ("value_ints", np.int64)):
                if key in attrs:
                    return np.asarray(attrs[key], dtype=dtype)
            return None
        feeds: dict[str, np.ndarray] = {}
        for i, inp in enumerate(node.inputs):
            if not inp.name:
                continue
            value = self.const(inp)
            if value is None and (node.op, i) in _SHAPE_ONLY:
                input_dtype: npt.DTypeLike = inp.dtype if isinstance(inp.dtype, np.dtype) \
                    else onnx.helper.tensor_dtype_to_np_dtype(inp.dtype)
                shape = _int_shape(self.shape(inp) or ()) if node.op != "CastLike" else (0,)
                if shape is None:  # (is_const checked the shape is known; an unknown one is not a constant)
                    return None
                value = np.broadcast_to(np.zeros((), dtype=input_dtype), shape)
            if value is None:
                return None
            if value.size > _FOLD_ELEMENT_LIMIT and node.op not in ("Shape", "Size"):
                return None
            feeds[inp.name] = value
        try:
            proto = OnnxExporter.export_node(node)
            results = ReferenceEvaluator(proto, opsets={"": self.opset}).run(None, feeds)
        except Exception:  # anything the reference evaluator cannot do is "not constant"
            return None
        for out, value in zip(node.outputs, results, strict=False):
            if out is not t:
                self._const_cache[out.name] = np.asarray(value)
        return np.asarray(results[node.outputs.index(t)])


def _int_shape(shape: tuple[int | str | None, ...] | None) -> tuple[int, ...] | None:
    """``shape`` when every dimension is a known int, else None."""
    if shape is None:
        return None
    dims = tuple(d for d in shape if isinstance(d, int))
    return dims if len(dims) == len(shape) else None
