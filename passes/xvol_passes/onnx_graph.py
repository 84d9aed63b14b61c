"""ONNX graph adapter for the shared rewrite rules (``xvol_compiler.rules``).

``OnnxGraphAdapter`` imports a ``ModelProto`` with onnx-graphsurgeon, presents
it to ``run_rules`` as the networkx *view* the rules expect, applies the
``Rewrite`` values they plan, and exports the edited model.

The view
--------
One view node per *activation* tensor, keyed by the tensor's name: graph
inputs (kind ``"input"``) and the outputs of the graph's nodes. Tensors no
activation value flows into are not in the view: constants (initializers,
``Constant`` outputs, small constant subgraphs such as the
``Shape``/``Expand``/``CastLike`` chain the dynamo exporter emits for a conv
bias: the weights of the nodes that read them) and shape computations (what
``Shape``/``Size`` of an activation and constants give, e.g. the target shape
of a dynamic-batch ``Reshape``). Edges go from each activation a node reads to
each activation it writes. Kinds: ``Conv`` -> ``"conv"``, ``BatchNormalization`` ->
``"bn"``, two-input ``Add`` -> ``"add"``, a ``Mul`` of two activations ->
``"mul"``, ``Reshape``/``Unsqueeze``/``Squeeze``/``Flatten``/``Expand``/``Identity``
of one activation -> ``"reshape"``, ``Softmax`` -> ``"softmax"``,
``MatMul``/``Gemm``/``ConvTranspose``/... -> ``"conv_like"``, attention ops ->
``"global_attention"``, everything else (``Cast``, the decomposed PSSA ops ...)
-> ``"other"``.

A conv this adapter created over an interleave of several tensors is shown
with its original inputs (``Branch.inputs`` = the interleaved tensors' names),
so n-ary sums and a later conv + BN fold see one multi-input branch.

Rewrites
--------
``apply`` builds one ``Conv`` over ``rewrite.branch.inputs`` interleaved per
group (``Concat`` for one group; ``Reshape -> Concat -> Reshape`` for several,
which works for any batch and spatial size), with new uniquely named
initializers in the original weight dtype, and makes it the producer of the
rewrite's output tensor: every consumer, graph outputs included, keeps reading
the same tensor name. Nodes left without consumers by the rewrite are removed
(and only those); untouched nodes keep their names, order and metadata.
"""

from __future__ import annotations

import ast
import math
import re
import warnings
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import networkx as nx
import numpy as np
import onnx
import onnx_graphsurgeon as gs
import torch
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter

from xvol_compiler.fold import BatchNormParams, Branch, ConvGeometry, FoldError
from xvol_compiler.lowering import (
    SpatialLayout,
    interleave_factor,
    spatial_layout,
    spatial_weight,
    split_geometries,
    split_weights,
)
from xvol_compiler.onnx_io import OnnxFileError, model_skeleton
from xvol_compiler.report import with_article
from xvol_compiler.rules import Rewrite

__all__ = ["ADAPTER_METADATA_KEY", "OnnxGraphAdapter", "conv_geometry_from_onnx", "infer_shapes"]

Key = Hashable
Interleave = Literal["reshape", "gather"]

ADAPTER_METADATA_KEY = "xvol_compiler.rewrite"

_CONV_LIKE = {"MatMul", "Gemm", "ConvTranspose", "ConvInteger", "QLinearConv", "MatMulInteger", "QLinearMatMul",
              "Einsum", "DeformConv"}
_ATTENTION = {"Attention", "MultiHeadAttention", "GroupQueryAttention"}
# Views of one activation (the directional PSSA form multiplies (N, C, |D|, ...) views).
_RESHAPES = {"Reshape", "Unsqueeze", "Squeeze", "Flatten", "Expand", "Identity"}
# Ops whose output is a constant when their inputs are: evaluated with onnx.reference.
_FOLDABLE = {
    "Identity", "Cast", "CastLike", "Shape", "Size", "Expand", "Reshape", "Unsqueeze", "Squeeze", "Flatten",
    "Concat", "Transpose", "Gather", "Slice", "Add", "Sub", "Mul", "Div", "Neg", "Sqrt", "Reciprocal", "Pow",
    "Abs", "ConstantOfShape", "Range", "Tile", "Mod",
    # Weight standardization (StdConv2d / ScaledStdConv2d) as the TorchScript exporter writes it.
    "ReduceMean", "BatchNormalization",
}
_SHAPE_ONLY = {("Shape", 0), ("Size", 0), ("CastLike", 1)}  # (op, input): only the tensor's type/shape is read
_PAD_MODES = {"constant": "zeros", "reflect": "reflect", "edge": "replicate", "wrap": "circular"}
_ONNX_PAD_MODES = {v: k for k, v in _PAD_MODES.items() if k != "constant"}
_FLOAT_DTYPES = {np.dtype(np.float16): torch.float16, np.dtype(np.float32): torch.float32,
                 np.dtype(np.float64): torch.float64}
_INT64_MAX = int(np.iinfo(np.int64).max)
_DEFAULT_DOMAINS = (None, "", "ai.onnx")
_FOLD_ELEMENT_LIMIT = 1 << 26  # do not evaluate constant subgraphs larger than this (elements)


@dataclass(frozen=True)
class _Interleaved:
    keys: tuple[str, ...]
    channels: tuple[int, ...]
    groups: int


def infer_shapes(model: onnx.ModelProto) -> dict[str, tuple[int | str | None, ...]]:
    """Tensor name -> shape by ONNX shape inference, run on a weight-free skeleton of the model
    (large initializers become typed graph inputs), so it is fast and works past 2 GiB."""
    skeleton = model_skeleton(model)
    try:
        inferred = onnx.shape_inference.infer_shapes(skeleton, data_prop=True)
    except Exception:  # shapes are optional information (MAC counts, auto_pad)
        inferred = skeleton
    shapes: dict[str, tuple[int | str | None, ...]] = {}
    for vi in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
        t = vi.type.tensor_type
        if not vi.type.HasField("tensor_type") or not t.HasField("shape"):
            continue
        dims: list[int | str | None] = []
        for d in t.shape.dim:
            dims.append(d.dim_value if d.HasField("dim_value") else (d.dim_param or None))
        shapes[vi.name] = tuple(dims)
    return shapes


def _ints(value: object, n: int, default: int) -> tuple[int, ...]:
    if value is None:
        return (default,) * n
    out = tuple(int(v) for v in value)  # type: ignore[union-attr]
    if len(out) != n:
        raise ValueError(f"expected {n} values, got {out}")
    return out


def conv_geometry_from_onnx(
    attrs: Mapping[str, object],
    weight_shape: Sequence[int],
    input_spatial: Sequence[int | str | None] | None = None,
    *,
    extra_pads: Sequence[tuple[int, int]] | None = None,
    padding_mode: str = "zeros",
) -> tuple[ConvGeometry | None, str | None]:
    """ConvGeometry of an ONNX ``Conv`` (attributes + weight shape), or (None, why) when its
    padding is unknown (auto_pad with stride > 1 on an input of unknown size). Asymmetric pads
    (explicit, or auto_pad=SAME_* with an odd total) are kept as (begin, end) pairs: a BatchNorm
    folds into such a conv exactly, and branch sums check the alignment side by side.

    ``extra_pads``/``padding_mode`` describe a ``Pad`` node the conv reads through (absorbed
    into the geometry): zero pads add to the conv's own, other modes need the conv's own to be 0."""
    ndim = len(weight_shape) - 2
    if ndim < 1:
        return None, f"Conv weight of rank {len(weight_shape)}"
    kernel = tuple(int(k) for k in attrs.get("kernel_shape") or weight_shape[2:])  # type: ignore[union-attr]
    if kernel != tuple(weight_shape[2:]):
        return None, f"kernel_shape {kernel} does not match the weight {tuple(weight_shape)}"
    try:
        stride = _ints(attrs.get("strides"), ndim, 1)
        dilation = _ints(attrs.get("dilations"), ndim, 1)
        flat = _ints(attrs.get("pads"), 2 * ndim, 0)
    except (TypeError, ValueError) as err:
        return None, f"malformed strides, dilations or pads attribute: {err}"
    group = int(attrs.get("group", 1))  # type: ignore[arg-type]
    auto_pad = attrs.get("auto_pad", "NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
    if auto_pad in ("", "NOTSET"):
        pairs = list(zip(flat[:ndim], flat[ndim:], strict=True))
    elif auto_pad == "VALID":
        pairs = [(0, 0)] * ndim
    elif auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        pairs = []
        for axis, (k, s, d) in enumerate(zip(kernel, stride, dilation, strict=True)):
            if s == 1:
                total = d * (k - 1)
            else:
                size = None if input_spatial is None else input_spatial[axis]
                if not isinstance(size, int):
                    return None, f"auto_pad={auto_pad} with stride {s} on an input of unknown size"
                out = -(-size // s)
                total = max(0, (out - 1) * s + d * (k - 1) + 1 - size)
            small, big = total // 2, total - total // 2
            pairs.append((small, big) if auto_pad == "SAME_UPPER" else (big, small))
    else:
        return None, f"unknown auto_pad {auto_pad!r}"
    if extra_pads is not None:
        if padding_mode != "zeros" and any(p != (0, 0) for p in pairs):
            return None, f"zero padding on top of {with_article(padding_mode)} Pad"
        pairs = [(a + c, b + d) for (a, b), (c, d) in zip(pairs, extra_pads, strict=True)]
    padding: tuple[int, ...] | tuple[tuple[int, int], ...] | str
    if all(a == b for a, b in pairs):
        padding = tuple(a for a, _ in pairs)
    elif all((a, b) == (d * (k - 1) // 2, d * (k - 1) - d * (k - 1) // 2)
             for (a, b), k, d in zip(pairs, kernel, dilation, strict=True)):
        padding = "same"  # torch's split of an odd total: the extra pad at the end
    else:
        padding = tuple((int(a), int(b)) for a, b in pairs)
    geometry = ConvGeometry(
        in_channels=int(weight_shape[1]) * group, out_channels=int(weight_shape[0]), kernel_size=kernel,
        stride=stride, padding=padding, dilation=dilation, groups=group, padding_mode=padding_mode,
    )
    return geometry, None


def _values(t: gs.Constant) -> np.ndarray:
    """A constant's data. ``load_onnx`` checks every tensor of a file; a model given to the adapter
    directly may still hold data that does not fit its shape or type: say which tensor."""
    try:
        return np.asarray(t.values)
    except Exception as err:  # numpy / onnx / ml_dtypes errors, depending on the damage
        raise OnnxFileError(f"tensor {t.name!r} of the model cannot be read as its shape and type say: "
                            f"{' '.join(str(err).split())}") from err


def _scope_name(node: gs.Node, metadata: Mapping[str, str]) -> str:
    """A readable site name: the module path the dynamo exporter records, else the node name."""
    scopes = metadata.get("pkg.torch.onnx.name_scopes")
    if scopes:
        try:
            parts = ast.literal_eval(scopes)
        except (ValueError, SyntaxError):
            parts = None
        if isinstance(parts, list) and len(parts) >= 2 and parts[-2]:
            return str(parts[-2])
    return node.name or (node.outputs[0].name if node.outputs else node.op)


class OnnxGraphAdapter:
    """onnx-graphsurgeon graph <-> the rules' networkx view (see the module docstring)."""

    def __init__(
        self,
        model: onnx.ModelProto,
        shapes: Mapping[str, tuple[int | str | None, ...]] | None = None,
        *,
        interleave: Interleave = "reshape",
    ) -> None:
        if interleave not in ("reshape", "gather"):
            raise ValueError(f"interleave must be 'reshape' or 'gather', got {interleave!r}")
        self.model = model
        self.graph = gs.import_onnx(model)
        self.shapes = dict(shapes) if shapes is not None else infer_shapes(model)
        self.interleave_mode: Interleave = interleave
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
        self._metadata: dict[tuple[str, str, tuple[str, ...]], list[tuple[str, str]]] = {}
        for n in model.graph.node:
            if n.metadata_props:
                self._metadata[(n.name, n.op_type, tuple(n.output))] = [(p.key, p.value) for p in n.metadata_props]
        self._new_metadata: dict[int, list[tuple[str, str]]] = {}
        self._interleaved: dict[str, _Interleaved] = {}
        self._interleave_cache: dict[tuple[tuple[str, ...], int], gs.Variable] = {}
        self._hidden: set[str] = set()  # tensors of our interleave constructions: not in the view
        self._const_cache: dict[str, np.ndarray | None] = {}
        self._is_const_cache: dict[str, bool] = {}  # tensor names are never reused (see _fresh)
        self._is_static_cache: dict[str, bool] = {}
        self._name_cache: dict[int, tuple[gs.Node, str]] = {}
        self._branch_cache: dict[int, tuple[gs.Node, Branch | None, str | None]] = {}
        self._names: set[str] = set()
        for t in self.graph.tensors().values():
            self._names.add(t.name)
        for n in self.graph.nodes:
            if n.name:
                self._names.add(n.name)
        self._tensors: dict[str, gs.Tensor] = {}
        self.rewrites: list[Rewrite] = []
        self.site_names: dict[str, tuple[str, ...]] = {}  # multi-input conv output -> X-volution sites

    # ------------------------------------------------------------------ constants

    def _is_const(self, t: gs.Tensor, depth: int = 0) -> bool:
        if isinstance(t, gs.Constant):
            return True
        if not t.name or len(t.inputs) != 1 or depth > 32:
            return False
        cached = self._is_const_cache.get(t.name)
        if cached is None:
            cached = self._is_const_cache[t.name] = self._compute_is_const(t, depth)
        return cached

    def _compute_is_const(self, t: gs.Tensor, depth: int) -> bool:
        node = t.inputs[0]
        if node.domain not in _DEFAULT_DOMAINS:
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
            if not self._is_const(inp, depth + 1):
                return False
        return True

    def _is_static(self, t: gs.Tensor, depth: int = 0) -> bool:
        """Whether no activation *value* flows into ``t``: constants, and what is computed from
        constants and the shapes (``Shape``/``Size``) or types of activations, such as the target
        shape of a dynamic-batch ``Reshape``. Static tensors are not in the view: they are
        metadata, not data, for the rules' question "is this derived from that tensor alone"."""
        if isinstance(t, gs.Constant):
            return True
        if not t.name or len(t.inputs) != 1 or depth > 32:
            return False
        cached = self._is_static_cache.get(t.name)
        if cached is None:
            node = t.inputs[0]
            if node.domain not in _DEFAULT_DOMAINS:
                cached = False
            elif node.op in ("Constant", "Shape", "Size"):
                cached = True
            elif node.op in _FOLDABLE:
                cached = all(
                    not inp.name or (node.op, i) in _SHAPE_ONLY or self._is_static(inp, depth + 1)
                    for i, inp in enumerate(node.inputs)
                )
            else:
                cached = False
            self._is_static_cache[t.name] = cached
        return cached

    def _known_type(self, t: gs.Tensor, *, need_shape: bool) -> bool:
        if t.dtype is None and not isinstance(t, gs.Constant):
            return False
        if not need_shape:
            return True
        shape = self._shape(t)
        return shape is not None and all(isinstance(d, int) for d in shape)

    def _shape(self, t: gs.Tensor) -> tuple[int | str | None, ...] | None:
        if t.shape is not None:
            return tuple(t.shape)
        return self.shapes.get(t.name)

    def const(self, t: gs.Tensor) -> np.ndarray | None:
        """The value of a constant tensor (evaluating small constant subgraphs), else None."""
        if isinstance(t, gs.Constant):
            return _values(t)
        if t.name in self._const_cache:
            return self._const_cache[t.name]
        value = self._evaluate(t) if self._is_const(t) else None
        self._const_cache[t.name] = value
        return value

    def _evaluate(self, t: gs.Tensor) -> np.ndarray | None:
        from onnx.reference import ReferenceEvaluator

        node = t.inputs[0]
        if node.op == "Constant":
            attrs = node.attrs
            if "value" in attrs:
                value = attrs["value"]
                return _values(value) if isinstance(value, gs.Constant) else np.asarray(value)
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
                dtype = onnx.helper.tensor_dtype_to_np_dtype(inp.dtype) if not isinstance(inp.dtype, np.dtype) \
                    else inp.dtype
                shape = self._shape(inp) if node.op != "CastLike" else (0,)
                value = np.broadcast_to(np.zeros((), dtype=dtype), tuple(int(d) for d in shape or ()))
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

    # ------------------------------------------------------------------ the view

    def _metadata_of(self, node: gs.Node) -> dict[str, str]:
        props = self._new_metadata.get(id(node))
        if props is None:
            props = self._metadata.get((node.name, node.op, tuple(o.name for o in node.outputs)), [])
        return dict(props)

    def _name(self, node: gs.Node) -> str:
        cached = self._name_cache.get(id(node))
        if cached is None or cached[0] is not node:
            cached = self._name_cache[id(node)] = (node, _scope_name(node, self._metadata_of(node)))
        return cached[1]

    def _torch(self, value: np.ndarray) -> torch.Tensor | None:
        if value.dtype not in _FLOAT_DTYPES:
            return None
        if not value.flags.writeable:
            # Weights loaded from the model are read-only views of its bytes; the fold math never
            # writes into its inputs, so share them instead of copying (torch only warns about it).
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                return torch.from_numpy(np.ascontiguousarray(value))
        return torch.from_numpy(np.ascontiguousarray(value))

    def _conv_branch(self, node: gs.Node) -> tuple[Branch | None, str | None]:
        cached = self._branch_cache.get(id(node))
        if cached is not None and cached[0] is node:
            return cached[1], cached[2]
        branch, refusal = self._make_conv_branch(node)
        self._branch_cache[id(node)] = (node, branch, refusal)
        return branch, refusal

    def _make_conv_branch(self, node: gs.Node) -> tuple[Branch | None, str | None]:
        x = node.inputs[0]
        w_t = node.inputs[1] if len(node.inputs) > 1 else None
        b_t = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
        w_np = None if w_t is None else self.const(w_t)
        b_np = None if b_t is None else self.const(b_t)
        if w_np is None or (b_t is not None and b_np is None):
            return None, None
        weight = self._torch(w_np)
        bias = None if b_np is None else self._torch(b_np)
        if weight is None or (b_np is not None and bias is None):
            return None, f"{self._name(node)}: weight dtype {w_np.dtype} is not a float type the fold supports"
        if bias is not None and bias.shape != (weight.shape[0],):
            return None, f"{self._name(node)}: bias shape {tuple(bias.shape)} does not match the weight"
        x_shape = self._shape(x)
        spatial = None if x_shape is None or len(x_shape) < 3 else x_shape[2:]
        geometry, why = None, None
        absorbed = self._absorbable_pad(x, weight.dim() - 2)
        if absorbed is not None:
            extra, mode, source = absorbed
            geometry, _ = conv_geometry_from_onnx(node.attrs, tuple(weight.shape), spatial, extra_pads=extra,
                                                  padding_mode=mode)
            if geometry is not None:
                x = source
        if geometry is None:
            geometry, why = conv_geometry_from_onnx(node.attrs, tuple(weight.shape), spatial)
        if geometry is None:
            return None, f"{self._name(node)}: {why}"
        info = self._interleaved.get(x.name)
        if info is not None and info.groups == geometry.groups and sum(info.channels) == geometry.in_channels:
            inputs, channels = info.keys, info.channels
        else:
            inputs, channels = (x.name,), (geometry.in_channels,)
        return Branch(inputs, channels, geometry, weight, bias), None

    def _absorbable_pad(self, x: gs.Tensor, ndim: int) -> tuple[list[tuple[int, int]], str, gs.Tensor] | None:
        """(spatial pads, torch padding_mode, source) when ``x`` is a spatial-only ``Pad`` of an
        activation with constant pads (zero value in constant mode): a conv reading it is a conv
        with that padding over the source."""
        if len(x.inputs) != 1:
            return None
        pad = x.inputs[0]
        if pad.op == "Concat" and pad.domain in _DEFAULT_DOMAINS:
            return self._wrap_concat_pad(x, ndim)
        if pad.op != "Pad" or pad.domain not in _DEFAULT_DOMAINS or len(pad.inputs) < 2:
            return None
        source = pad.inputs[0]
        if self._is_static(source):
            return None
        mode = pad.attrs.get("mode", "constant")
        mode = mode.decode() if isinstance(mode, bytes) else str(mode)
        if mode not in _PAD_MODES:
            return None
        pads = self.const(pad.inputs[1]) if pad.inputs[1].name else None
        if pads is None:
            return None
        if mode == "constant" and len(pad.inputs) > 2 and pad.inputs[2].name:
            value = self.const(pad.inputs[2])
            if value is None or bool(np.any(value != 0)):
                return None
        rank = ndim + 2
        pads = [int(p) for p in np.asarray(pads).reshape(-1)]
        axes = list(range(rank))
        if len(pad.inputs) > 3 and pad.inputs[3].name:
            axes_value = self.const(pad.inputs[3])
            if axes_value is None:
                return None
            axes = [int(a) % rank for a in np.asarray(axes_value).reshape(-1)]
        if len(pads) != 2 * len(axes):
            return None
        begin, end = [0] * rank, [0] * rank
        for i, axis in enumerate(axes):
            begin[axis], end[axis] = pads[i], pads[len(axes) + i]
        if begin[:2] != [0, 0] or end[:2] != [0, 0] or min(begin + end) < 0:
            return None
        return list(zip(begin[2:], end[2:], strict=True)), _PAD_MODES[mode], source

    def _wrap_concat_pad(self, x: gs.Tensor, ndim: int) -> tuple[list[tuple[int, int]], str, gs.Tensor] | None:
        """(spatial pads, 'circular', source) when ``x`` is the chain the TorchScript exporter writes for
        circular padding (opset < 19 has no Pad 'wrap'): per spatial axis, one
        ``Concat(Slice(t, -left:), t, Slice(t, :right))``, either slice absent when its pad is 0."""
        rank = ndim + 2
        begin, end = [0] * rank, [0] * rank
        seen: set[int] = set()
        t = x
        while len(t.inputs) == 1 and t.inputs[0].op == "Concat" and t.inputs[0].domain in _DEFAULT_DOMAINS:
            concat = t.inputs[0]
            axis = int(concat.attrs.get("axis", 0))
            axis = axis + rank if axis < 0 else axis
            if axis < 2 or axis >= rank or axis in seen:
                break
            parsed = self._wrap_parts(list(concat.inputs), axis)
            if parsed is None:
                break
            begin[axis], end[axis], t = parsed
            seen.add(axis)
        if t is x or self._is_static(t):
            return None
        pads = list(zip(begin[2:], end[2:], strict=True))
        return pads, ("circular" if any(a or b for a, b in pads) else "zeros"), t

    def _wrap_parts(self, parts: list[gs.Tensor], axis: int) -> tuple[int, int, gs.Tensor] | None:
        """(left, right, source) when ``parts`` are [tail of source], source, [head of source] along ``axis``."""
        for i, source in enumerate(parts):
            before, after = parts[:i], parts[i + 1:]
            if len(before) > 1 or len(after) > 1:
                continue
            shape = self._shape(source)
            size = shape[axis] if shape is not None and len(shape) > axis else None
            if not isinstance(size, int):
                continue
            left = self._slice_of(before[0], source, axis, shape) if before else (size, size)
            right = self._slice_of(after[0], source, axis, shape) if after else (0, 0)
            if left is None or right is None or left[1] != size or right[0] != 0:
                continue
            left_pad, right_pad = size - left[0], right[1]
            if 0 <= left_pad <= size and 0 <= right_pad <= size:
                return left_pad, right_pad, source
        return None

    def _slice_of(
        self, t: gs.Tensor, source: gs.Tensor, axis: int, shape: tuple[int | str | None, ...]
    ) -> tuple[int, int] | None:
        """(start, end), clamped to [0, size], when ``t`` is a unit-step ``Slice`` of ``source`` (of ``shape``)
        on ``axis`` only."""
        if len(t.inputs) != 1:
            return None
        node = t.inputs[0]
        if node.op != "Slice" or len(node.inputs) < 3 or node.inputs[0] is not source:
            return None
        values = [self.const(v) if v.name else None for v in node.inputs[1:5]]
        if values[0] is None or values[1] is None:
            return None
        starts, ends = (np.asarray(v).reshape(-1) for v in values[:2])
        axes = np.arange(len(starts)) if len(values) < 3 or values[2] is None else np.asarray(values[2]).reshape(-1)
        steps = np.ones_like(starts) if len(values) < 4 or values[3] is None else np.asarray(values[3]).reshape(-1)
        if len(starts) != 1 or len(ends) != 1 or len(axes) != 1 or len(steps) != 1 or int(steps[0]) != 1:
            return None
        if int(axes[0]) % len(shape) != axis:
            return None
        size = int(shape[axis])  # the caller checked it is known

        def clamp(v: int) -> int:
            return min(max(v + size if v < 0 else v, 0), size)

        return clamp(int(starts[0])), clamp(int(ends[0]))

    def _bn_params(self, node: gs.Node) -> tuple[BatchNormParams | None, str | None]:
        if int(node.attrs.get("training_mode", 0)):
            return None, f"{self._name(node)}: BatchNormalization in training mode (training_mode=1)"
        if any(o.outputs for o in node.outputs[1:]):
            return None, f"{self._name(node)}: BatchNormalization running-statistics outputs are used"
        values = [self.const(t) if t.name else None for t in node.inputs[1:5]]
        if len(values) != 4 or any(v is None for v in values):
            return None, None
        tensors = [self._torch(v) for v in values]  # type: ignore[arg-type]
        if any(t is None for t in tensors):
            return None, f"{self._name(node)}: BatchNormalization parameters are not float"
        scale, bias, mean, var = tensors
        eps = float(node.attrs.get("epsilon", 1e-5))
        return BatchNormParams(running_mean=mean, running_var=var, weight=scale, bias=bias, eps=eps), None

    def _spatial(self, t: gs.Tensor) -> int | None:
        shape = self._shape(t)
        if shape is None or len(shape) < 3 or not all(isinstance(d, int) for d in shape[2:]):
            return None
        return math.prod(int(d) for d in shape[2:])

    def _users(self, t: gs.Tensor, outputs: set[int]) -> int:
        consumers = {id(n) for n in t.outputs}
        return len(consumers) + (1 if id(t) in outputs else 0)

    def _add_refusal(self, node: gs.Node) -> str | None:
        shapes = [self._shape(t) for t in node.inputs]
        if any(s is None for s in shapes):
            return None
        a, b = shapes
        if len(a) != len(b) or any(isinstance(x, int) and isinstance(y, int) and x != y  # type: ignore[arg-type]
                                   for x, y in zip(a, b, strict=True)):  # type: ignore[arg-type]
            return f"{self._name(node)}: Add broadcasts {list(a)} with {list(b)}"  # type: ignore[arg-type]
        return None

    def view(self) -> nx.DiGraph:
        graph = self.graph
        view = nx.DiGraph()
        self._tensors = {}
        outputs = {id(t) for t in graph.outputs}
        for t in graph.inputs:
            if isinstance(t, gs.Constant):
                continue
            self._tensors[t.name] = t
            view.add_node(t.name, kind="input", name=t.name, users=self._users(t, outputs), refusal=None,
                          spatial=self._spatial(t))
        for node in graph.nodes:
            live_outputs = [o for o in node.outputs if o.name and o.name not in self._hidden]
            if not live_outputs or all(self._is_static(o) for o in live_outputs):
                continue
            attrs: dict[str, object] = {"kind": "other", "refusal": None, "name": self._name(node)}
            op = node.op if node.domain in _DEFAULT_DOMAINS else f"{node.domain}.{node.op}"
            if op == "Conv":
                if len(node.inputs) > 1 and not self._is_static(node.inputs[0]):
                    branch, refusal = self._conv_branch(node)
                    attrs.update(kind="conv", branch=branch, refusal=refusal)
            elif op == "BatchNormalization":
                bn, refusal = self._bn_params(node)
                attrs.update(kind="bn", bn=bn, refusal=refusal)
            elif op == "Add" and len(node.inputs) == 2:
                attrs.update(kind="add", refusal=self._add_refusal(node))
            elif op == "Mul" and len(node.inputs) == 2 and not any(self._is_static(t) for t in node.inputs):
                attrs["kind"] = "mul"
            elif op in _RESHAPES and len(self._sources(node)) == 1:
                attrs["kind"] = "reshape"
            elif op == "Softmax" or op == "LogSoftmax":
                attrs["kind"] = "softmax"
            elif node.op in _CONV_LIKE:
                attrs["kind"] = "conv_like"
            elif node.op in _ATTENTION:
                attrs["kind"] = "global_attention"
            sources = self._sources(node)
            for out in live_outputs:
                self._tensors[out.name] = out
                view.add_node(out.name, **attrs, users=self._users(out, outputs), spatial=self._spatial(out))
                for src in sources:
                    view.add_edge(src, out.name)
        # A source missing from the view (an outer-scope or unnamed tensor) is an opaque input.
        for key in list(view.nodes):
            if "kind" not in view.nodes[key]:
                view.nodes[key].update(kind="input", name=str(key), users=1, refusal=None, spatial=None)
        return view

    def _sources(self, node: gs.Node) -> list[str]:
        """The activation tensors a node reads (the interleaved originals for our convs)."""
        if node.op == "Conv" and node.domain in _DEFAULT_DOMAINS and len(node.inputs) > 1:
            branch, _ = self._conv_branch(node)
            if branch is not None:  # (weights are constants: the branch's inputs are all it reads)
                return [str(k) for k in branch.inputs]
        names = [t.name for t in node.inputs if t.name and not self._is_static(t)]
        return list(dict.fromkeys(names))

    # ------------------------------------------------------------------ rewriting

    def _fresh(self, base: str) -> str:
        base = re.sub(r"(__xvol\d*)+$", "", base) or "xvol"
        name = f"{base}__xvol"
        n = 1
        while name in self._names:
            n += 1
            name = f"{base}__xvol{n}"
        self._names.add(name)
        return name

    def _int64(self, base: str, values: Sequence[int]) -> gs.Constant:
        return gs.Constant(self._fresh(base), np.asarray(list(values), dtype=np.int64))

    def _pad(self, x: gs.Tensor, pads: Sequence[tuple[int, int]], mode: str, base: str,
             nodes: list[gs.Node]) -> gs.Tensor:
        """``x`` padded on its spatial axes in a torch padding mode: a ``Pad`` node, or for 'circular' before
        opset 19 (no Pad 'wrap') the Slice/Concat chain the TorchScript exporter writes."""
        if mode != "circular" or self.opset >= 19:
            amounts = self._int64(f"{base}/pads", [0, 0, *(p for p, _ in pads), 0, 0, *(p for _, p in pads)])
            return self._node("Pad", [x, amounts], base, nodes, mode=_ONNX_PAD_MODES[mode])
        for axis, (left, right) in enumerate(pads, start=2):
            if not (left or right):
                continue
            parts = [self._slice(x, -left, _INT64_MAX, axis, base, nodes)] if left else []
            parts.append(x)
            parts += [self._slice(x, 0, right, axis, base, nodes)] if right else []
            shape = self._shape(x)
            x = self._node("Concat", parts, base, nodes, axis=axis)
            if shape is not None and len(shape) > axis and isinstance(shape[axis], int):
                # Known shapes let the view read the chain back as one circular pad.
                self.shapes[x.name] = (*shape[:axis], shape[axis] + left + right, *shape[axis + 1:])
        return x

    def _slice(self, x: gs.Tensor, start: int, end: int, axis: int, base: str, nodes: list[gs.Node]) -> gs.Tensor:
        bounds = [self._int64(f"{base}/{what}", [v]) for what, v in (("starts", start), ("ends", end), ("axes", axis))]
        return self._node("Slice", [x, *bounds], base, nodes)

    def _node(self, op: str, inputs: list[gs.Tensor], base: str, nodes: list[gs.Node], *,
              dtype: Any = None, output: str | None = None, **attrs: Any) -> gs.Variable:
        """A new node ``op`` on ``inputs``, appended to ``nodes``; its one output, hidden from the view
        (``dtype``: the first input's unless given)."""
        out = gs.Variable(self._fresh(f"{base}/{output or op + '_output'}"),
                          dtype=inputs[0].dtype if dtype is None else dtype)
        self._hidden.add(out.name)
        nodes.append(gs.Node(op, self._fresh(f"{base}/{op}"), attrs, inputs, [out]))
        return out

    def _interleave(
        self, keys: Sequence[str], channels: Sequence[int], groups: int, ndim: int, base: str, nodes: list[gs.Node]
    ) -> gs.Tensor:
        tensors = [self._tensors[k] for k in keys]
        if len(tensors) == 1:
            return tensors[0]
        cache_key = (tuple(keys), groups)
        cached = self._interleave_cache.get(cache_key)
        if cached is not None and cached.inputs and cached.outputs:
            return cached
        dtype = next((t.dtype for t in tensors if t.dtype is not None), None)
        total = sum(channels)
        if groups == 1:
            out = self._node("Concat", list(tensors), base, nodes, dtype=dtype, output="interleave", axis=1)
        elif self.interleave_mode == "gather":
            cat = self._node("Concat", list(tensors), base, nodes, dtype=dtype, output="concat", axis=1)
            offsets = np.cumsum([0, *channels[:-1]])
            perm = [
                int(off + g * (c // groups) + i)
                for g in range(groups)
                for off, c in zip(offsets, channels, strict=True)
                for i in range(c // groups)
            ]
            index = self._int64(f"{base}/interleave_index", perm)
            out = self._node("Gather", [cat, index], base, nodes, dtype=dtype, output="interleave", axis=1)
        else:
            # (N, C, S1, ..., Sn) -> (N, g, C/g*S1, S2, ..., Sn): each group's channels stay contiguous,
            # concatenating on axis 2 interleaves the inputs group by group; only the Concat copies.
            split = self._int64(f"{base}/group_shape", [0, groups, -1] + [0] * (ndim - 1))
            merged = self._int64(f"{base}/interleave_shape", [0, total, -1] + [0] * (ndim - 1))
            parts = [self._node("Reshape", [t, split], base, nodes, dtype=dtype, output=f"{t.name}/grouped")
                     for t in tensors]
            cat = self._node("Concat", parts, base, nodes, dtype=dtype, output="concat", axis=2)
            out = self._node("Reshape", [cat, merged], base, nodes, dtype=dtype, output="interleave")
        self._interleaved[out.name] = _Interleaved(tuple(keys), tuple(channels), groups)
        self._interleave_cache[cache_key] = out
        shape = self._shape(tensors[0])
        if shape is not None and len(shape) == ndim + 2:
            # Known shapes let the view see through a pad the exporters' way (Slice/Concat) to this interleave.
            self.shapes[out.name] = (shape[0], total, *shape[2:])
        return out

    def _interleave_spatial(
        self, keys: Sequence[str], channels: Sequence[int], layout: SpatialLayout, base: str, nodes: list[gs.Node]
    ) -> gs.Tensor:
        """``interleave_spatial``: each input as (N, C, *S, k) (Unsqueeze, or Reshape + Transpose when k > 1),
        one Concat on the last axis, one Reshape merging it into the last spatial axis (any batch size)."""
        tensors = [self._tensors[k] for k in keys]
        dtype = next((t.dtype for t in tensors if t.dtype is not None), None)
        c = channels[0]
        parts = []
        for t, ct in zip(tensors, channels, strict=True):
            if layout.pre_pads is not None:
                t = self._pad(t, layout.pre_pads, layout.pre_mode, base, nodes)
            ndim = layout.geometry.ndim
            k = ct // c
            if k == 1:
                parts.append(self._node("Unsqueeze", [t, self._int64(f"{base}/axes", [-1])], base, nodes,
                                        dtype=dtype))
                continue
            spatial = self._spatial_dims(self._tensors[keys[0]], ndim, layout)
            grouped = self._node("Reshape", [t, self._int64(f"{base}/split_shape", [0, c, k, *spatial])], base,
                                 nodes, dtype=dtype)
            perm = [0, 1, *range(3, 3 + ndim), 2]
            parts.append(self._node("Transpose", [grouped], base, nodes, dtype=dtype, perm=perm))
        cat = self._node("Concat", parts, base, nodes, dtype=dtype, output="spatial_concat", axis=-1)
        merged = self._int64(f"{base}/spatial_shape", [0] * (layout.geometry.ndim + 1) + [-1])
        return self._node("Reshape", [cat, merged], base, nodes, dtype=dtype, output="spatial_interleave")

    def _spatial_dims(self, x: gs.Tensor, ndim: int, layout: SpatialLayout) -> list[int]:
        """Static spatial sizes of ``x`` (after the layout's pre-padding), one unknown as -1."""
        shape = self._shape(x)
        dims = list(shape[2:]) if shape is not None and len(shape) == ndim + 2 else [None] * ndim
        out: list[int] = []
        for axis, d in enumerate(dims):
            if isinstance(d, int) and layout.pre_pads is not None:
                d = d + sum(layout.pre_pads[axis])
            out.append(d if isinstance(d, int) else -1)
        if out.count(-1) > 1:
            raise FoldError("the directional spatial interleave needs static spatial sizes (all but one axis)")
        return out

    def lowering_refusal(self, branch: Branch, lowering: str) -> str | None:
        """Why this graph cannot emit ``lowering`` for ``branch`` beyond the math (None: it can)."""
        if lowering != "spatial" or branch.channels[1] == branch.channels[0]:
            return None
        shape = self._shape(self._tensors[str(branch.inputs[0])])
        ndim = branch.geometry.ndim
        dims = list(shape[2:]) if shape is not None and len(shape) == ndim + 2 else [None] * ndim
        if sum(not isinstance(d, int) for d in dims) > 1:
            return "the directional spatial interleave needs static spatial sizes (all but one axis)"
        return None

    def _constant(self, values: torch.Tensor, name: str, dtype: np.dtype) -> gs.Constant:
        return gs.Constant(self._fresh(name),
                           np.ascontiguousarray(values.detach().cpu().numpy().astype(dtype, copy=False)))

    @staticmethod
    def _conv_attrs(g: ConvGeometry, pads: Sequence[tuple[int, int]]) -> dict[str, Any]:
        return {
            "dilations": list(g.dilation),
            "group": int(g.groups),
            "kernel_shape": list(g.kernel_size),
            "pads": [p for p, _ in pads] + [p for _, p in pads],
            "strides": list(g.stride),
        }

    def apply(self, rewrite: Rewrite) -> None:
        """Replace ``rewrite.replaced`` by one Conv producing ``rewrite.output``'s tensor (or, for a
        multi-input branch, its ``rewrite.lowering``: see ``xvol_compiler.lowering``)."""
        anchor_t = self._tensors[str(rewrite.anchor)]
        out_t = self._tensors[str(rewrite.output)]
        if len(anchor_t.inputs) != 1 or len(out_t.inputs) != 1:
            raise RuntimeError(f"rewrite {rewrite.name}: its anchor or output has no producer")
        anchor, old = anchor_t.inputs[0], out_t.inputs[0]
        branch = rewrite.branch
        g = branch.geometry
        keys = [str(k) for k in branch.inputs]
        lowering = rewrite.lowering if len(keys) > 1 else "channel"
        base = anchor.name or out_t.name
        new_nodes: list[gs.Node] = []
        w_old = anchor.inputs[1]
        w_np = self.const(w_old)
        dtype = np.dtype(np.float32) if w_np is None else w_np.dtype
        bias_values = torch.zeros(g.out_channels) if branch.bias is None else branch.bias
        b_old = anchor.inputs[2] if len(anchor.inputs) > 2 and anchor.inputs[2].name else None
        if isinstance(b_old, gs.Constant):
            bias_name = b_old.name
        elif w_old.name.endswith("weight"):
            bias_name = w_old.name[: -len("weight")] + "bias"
        else:
            bias_name = f"{w_old.name or base}.bias"
        weight_name = w_old.name or f"{base}.weight"
        conv_name = anchor.name or self._fresh(f"{base}/Conv")
        convs: list[tuple[gs.Tensor, torch.Tensor, torch.Tensor | None, ConvGeometry, Sequence[tuple[int, int]]]]
        if lowering == "spatial":
            factor = interleave_factor(branch)
            layout = spatial_layout(g, factor, asymmetric_pads=True)
            x = self._interleave_spatial(keys, branch.channels, layout, base, new_nodes)
            convs = [(x, spatial_weight(branch.weight, g.groups, factor), bias_values, layout.geometry,
                      layout.pads)]
        elif lowering == "split":
            convs = []
            for key, geometry, (w, b) in zip(keys, split_geometries(branch),
                                             split_weights(Branch(branch.inputs, branch.channels, g,
                                                                  branch.weight, bias_values)), strict=True):
                convs.append((self._tensors[key], w, b, geometry, g.pads()))
        else:
            x = self._interleave(keys, branch.channels, g.groups, g.ndim, base, new_nodes)
            convs = [(x, branch.weight, bias_values, g, g.pads())]
        old.outputs.remove(out_t)
        results: list[gs.Tensor] = []
        main: gs.Node | None = None
        for i, (x, w, b, geometry, pads) in enumerate(convs):
            if geometry.padding_mode != "zeros":
                # reflect / replicate / circular: an explicit Pad of the (interleaved) input, as the exporters emit.
                x, pads = self._pad(x, pads, geometry.padding_mode, base, new_nodes), tuple((0, 0) for _ in pads)
            inputs = [x, self._constant(w, weight_name if i == 0 else f"{weight_name}_attn", dtype)]
            if b is not None:
                inputs.append(self._constant(b, bias_name, dtype))
            last = i == len(convs) - 1 and len(convs) == 1
            if last:
                y: gs.Tensor = out_t
            else:
                y = gs.Variable(self._fresh(f"{base}/conv{i}_output"), dtype=out_t.dtype)
                self._hidden.add(y.name)
            conv = gs.Node("Conv", conv_name if i == 0 else self._fresh(f"{conv_name}_attn"),
                           self._conv_attrs(geometry, pads), inputs, [y])
            new_nodes.append(conv)
            main = main or conv
            results.append(y)
        if len(results) > 1:
            total = results[0]
            for j, y in enumerate(results[1:], start=1):
                out = out_t if j == len(results) - 1 else gs.Variable(self._fresh(f"{base}/sum"), dtype=out_t.dtype)
                new_nodes.append(gs.Node("Add", self._fresh(f"{base}/Add"), {}, [total, y], [out]))
                total = out
        anchor_metadata = self._metadata_of(anchor)
        metadata = [(k, v) for k, v in anchor_metadata.items()
                    if k in ("namespace", "pkg.torch.onnx.name_scopes", "pkg.torch.onnx.class_hierarchy")]
        done = [anchor_metadata[ADAPTER_METADATA_KEY]] if ADAPTER_METADATA_KEY in anchor_metadata else []
        tag = rewrite.kind if lowering == "channel" or rewrite.rule != "lowering" else f"lowering {lowering}"
        if tag not in done:
            done.append(tag)
        metadata.append((ADAPTER_METADATA_KEY, ", ".join(done)))
        for node in new_nodes:
            if node.op in ("Conv", "Add") and node.outputs and node.outputs[0] is not None:
                self._new_metadata[id(node)] = metadata
        carried = [name for k in rewrite.replaced for name in self.site_names.pop(str(k), ())]
        if rewrite.kind == "x-volution" and rewrite.rule != "lowering":
            carried.append(rewrite.name)
        if carried and len(keys) > 1:
            self.site_names[out_t.name] = tuple(carried)  # the sites this conv carries, whatever its name
        index = next(i for i, n in enumerate(self.graph.nodes) if n is old)
        self.graph.nodes[index:index] = new_nodes
        self._remove_dead([old])
        self.rewrites.append(rewrite)

    def sites(self) -> list[tuple[str, Branch]]:
        """Output tensor and merged branch of each multi-input Conv (the fused X-volution sites)."""
        view = self.view()
        return [(key, attrs["branch"]) for key, attrs in view.nodes(data=True)
                if attrs.get("kind") == "conv" and attrs.get("branch") is not None
                and len(attrs["branch"].inputs) > 1]

    def site_name(self, key: str) -> str:
        return self._name(self._tensors[key].inputs[0])

    def input_shape(self, key: str) -> tuple[int | str | None, ...] | None:
        return self._shape(self._tensors[key])

    def _remove_dead(self, candidates: Iterable[gs.Node]) -> None:
        """Remove the candidates and their producers, transitively, once nothing reads their outputs."""
        outputs = {id(t) for t in self.graph.outputs}
        removed: set[int] = set()
        stack = list(candidates)
        while stack:
            node = stack.pop()
            if id(node) in removed or any(o.outputs or id(o) in outputs for o in node.outputs):
                continue
            inputs = list(node.inputs)
            node.inputs.clear()
            node.outputs.clear()
            removed.add(id(node))
            self._branch_cache.pop(id(node), None)
            for t in inputs:
                if len(t.inputs) == 1 and not t.outputs:
                    stack.append(t.inputs[0])
        if removed:
            self.graph.nodes = [n for n in self.graph.nodes if id(n) not in removed]

    # ------------------------------------------------------------------ export

    def to_model(self) -> onnx.ModelProto:
        """The edited model; model-level fields and untouched nodes' metadata as in the original."""
        self.graph.toposort()
        model = gs.export_onnx(self.graph, do_type_check=False)
        src = self.model
        model.ir_version = src.ir_version
        del model.opset_import[:]
        model.opset_import.extend(src.opset_import)
        model.producer_name, model.producer_version = src.producer_name, src.producer_version
        model.domain, model.model_version, model.doc_string = src.domain, src.model_version, src.doc_string
        del model.metadata_props[:]
        model.metadata_props.extend(src.metadata_props)
        for proto, node in zip(model.graph.node, self.graph.nodes, strict=True):
            for key, value in self._metadata_of(node).items():
                proto.metadata_props.add(key=key, value=value)
        by_name = {n.name: n for n in src.graph.node if n.name}
        for proto in model.graph.node:
            original = by_name.get(proto.name)
            if original is not None and original.op_type == proto.op_type and original.doc_string:
                proto.doc_string = original.doc_string
        return model
