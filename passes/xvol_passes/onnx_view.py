"""Reading an ONNX graph as the rule engine's view: the reading half of ``OnnxGraphAdapter``.

One view node per *activation* tensor, keyed by the tensor's name: graph inputs (kind
``"input"``) and the outputs of the graph's nodes. Tensors no activation value flows into are
not in the view: constants and shape computations (``xvol_passes.onnx_constants``). Edges go
from each activation a node reads to each activation it writes. Kinds: ``Conv`` -> ``"conv"``,
``BatchNormalization`` -> ``"bn"``, two-input ``Add`` -> ``"add"``, a ``Mul`` of two activations
-> ``"mul"``, ``Reshape``/``Unsqueeze``/``Squeeze``/``Flatten``/``Expand``/``Identity`` of one
activation -> ``"reshape"``, ``Softmax`` -> ``"softmax"``, ``MatMul``/``Gemm``/``ConvTranspose``/...
-> ``"conv_like"``, attention ops -> ``"global_attention"``, everything else -> ``"other"``.

A conv reading a pad is shown with the pad absorbed (``xvol_passes.onnx_pad``). A conv the adapter
created over an interleave of several tensors is shown with its original inputs
(``Branch.inputs`` = the interleaved tensors' names), so n-ary sums and a later conv + BN fold
see one multi-input branch.
"""

from __future__ import annotations

import ast
import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, SupportsInt

import networkx as nx
import numpy as np
import onnx
import onnx_graphsurgeon as gs
import torch

from xvol_compiler.errors import InvalidArgumentError, InvalidArgumentTypeError
from xvol_compiler.fold import BatchNormParams, Branch, ConvGeometry
from xvol_compiler.onnx_io import model_skeleton
from xvol_compiler.report import with_article
from xvol_compiler.rules import INFO, NodeInfo, add_node
from xvol_passes.onnx_constants import DEFAULT_DOMAINS, OnnxConstants
from xvol_passes.onnx_pad import absorbable_pad

__all__ = ["OnnxGraphReader", "conv_geometry_from_onnx", "infer_shapes"]

_CONV_LIKE = {"MatMul", "Gemm", "ConvTranspose", "ConvInteger", "QLinearConv", "MatMulInteger", "QLinearMatMul",
              "Einsum", "DeformConv"}
_ATTENTION = {"Attention", "MultiHeadAttention", "GroupQueryAttention"}
# Views of one activation (the directional PSSA form multiplies (N, C, |D|, ...) views).
_RESHAPES = {"Reshape", "Unsqueeze", "Squeeze", "Flatten", "Expand", "Identity"}
_FLOAT_DTYPES = {np.dtype(np.float16): torch.float16, np.dtype(np.float32): torch.float32,
                 np.dtype(np.float64): torch.float64}


@dataclass(frozen=True)
class Interleaved:
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


def _int_tuple(value: object) -> tuple[int, ...]:
    """An attribute holding a list of ints, as a tuple."""
    if not isinstance(value, Iterable):
        raise InvalidArgumentTypeError(f"expected a list of ints, got {value!r}")
    return tuple(int(v) for v in value)


def _ints(value: object, n: int, default: int) -> tuple[int, ...]:
    if value is None:
        return (default,) * n
    out = _int_tuple(value)
    if len(out) != n:
        raise InvalidArgumentError(f"expected {n} values, got {out}")
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
    kernel = _int_tuple(attrs.get("kernel_shape") or weight_shape[2:])
    if kernel != tuple(weight_shape[2:]):
        return None, f"kernel_shape {kernel} does not match the weight {tuple(weight_shape)}"
    try:
        stride = _ints(attrs.get("strides"), ndim, 1)
        dilation = _ints(attrs.get("dilations"), ndim, 1)
        flat = _ints(attrs.get("pads"), 2 * ndim, 0)
    except (TypeError, ValueError) as err:
        return None, f"malformed strides, dilations or pads attribute: {err}"
    group_value = attrs.get("group", 1)
    if not isinstance(group_value, SupportsInt):
        raise InvalidArgumentTypeError(f"Conv attribute group={group_value!r} is not an int")
    group = int(group_value)
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


class OnnxGraphReader(OnnxConstants):
    """The view of the graph; ``_interleaved`` and ``_hidden`` are kept by the emitting half."""

    _interleaved: dict[str, Interleaved]  # interleave output -> what it interleaves
    _hidden: set[str]  # tensors of the emitter's interleave constructions: not in the view
    _metadata: dict[tuple[str, str, tuple[str, ...]], list[tuple[str, str]]]
    _new_metadata: dict[int, list[tuple[str, str]]]
    _name_cache: dict[int, tuple[gs.Node, str]]
    _branch_cache: dict[int, tuple[gs.Node, Branch | None, str | None]]
    _tensors: dict[str, gs.Tensor]

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
        x_shape = self.shape(x)
        spatial = None if x_shape is None or len(x_shape) < 3 else x_shape[2:]
        geometry, why = None, None
        absorbed = absorbable_pad(self, x, weight.dim() - 2)
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
    def _bn_params(self, node: gs.Node) -> tuple[BatchNormParams | None, str | None]:
        if int(node.attrs.get("training_mode", 0)):
            return None, f"{self._name(node)}: BatchNormalization in training mode (training_mode=1)"
        if any(o.outputs for o in node.outputs[1:]):
            return None, f"{self._name(node)}: BatchNormalization running-statistics outputs are used"
        values = [self.const(t) if t.name else None for t in node.inputs[1:5]]
        known = [v for v in values if v is not None]
        if len(known) != 4:
            return None, None
        scale, bias, mean, var = (self._torch(v) for v in known)
        if scale is None or bias is None or mean is None or var is None:
            return None, f"{self._name(node)}: BatchNormalization parameters are not float"
        eps = float(node.attrs.get("epsilon", 1e-5))
        return BatchNormParams(running_mean=mean, running_var=var, weight=scale, bias=bias, eps=eps), None

    def _spatial(self, t: gs.Tensor) -> int | None:
        shape = self.shape(t)
        if shape is None or len(shape) < 3:
            return None
        spatial = [d for d in shape[2:] if isinstance(d, int)]
        return math.prod(spatial) if len(spatial) == len(shape) - 2 else None

    def _users(self, t: gs.Tensor, outputs: set[int]) -> int:
        consumers = {id(n) for n in t.outputs}
        return len(consumers) + (1 if id(t) in outputs else 0)

    def _add_refusal(self, node: gs.Node) -> str | None:
        shapes = [self.shape(t) for t in node.inputs]
        known = [s for s in shapes if s is not None]
        if len(known) != len(shapes):
            return None
        a, b = known
        if len(a) != len(b) or any(isinstance(x, int) and isinstance(y, int) and x != y
                                   for x, y in zip(a, b, strict=True)):
            return f"{self._name(node)}: Add broadcasts {list(a)} with {list(b)}"
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
            add_node(view, t.name, NodeInfo(kind="input", name=t.name, users=self._users(t, outputs),
                                            spatial=self._spatial(t)))
        for node in graph.nodes:
            live_outputs = [o for o in node.outputs if o.name and o.name not in self._hidden]
            if not live_outputs or all(self.is_static(o) for o in live_outputs):
                continue
            attrs: dict[str, Any] = {"kind": "other", "refusal": None}
            op = node.op if node.domain in DEFAULT_DOMAINS else f"{node.domain}.{node.op}"
            if op == "Conv":
                if len(node.inputs) > 1 and not self.is_static(node.inputs[0]):
                    branch, refusal = self._conv_branch(node)
                    attrs.update(kind="conv", branch=branch, refusal=refusal)
            elif op == "BatchNormalization":
                bn, refusal = self._bn_params(node)
                attrs.update(kind="bn", bn=bn, refusal=refusal)
            elif op == "Add" and len(node.inputs) == 2:
                attrs.update(kind="add", refusal=self._add_refusal(node))
            elif op == "Mul" and len(node.inputs) == 2 and not any(self.is_static(t) for t in node.inputs):
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
                add_node(view, out.name, NodeInfo(name=self._name(node), users=self._users(out, outputs),
                                                  spatial=self._spatial(out), **attrs))
                for src in sources:
                    view.add_edge(src, out.name)
        # A source missing from the view (an outer-scope or unnamed tensor) is an opaque input.
        for key in list(view.nodes):
            if INFO not in view.nodes[key]:
                add_node(view, key, NodeInfo(kind="input", name=str(key)))
        return view

    def _sources(self, node: gs.Node) -> list[str]:
        """The activation tensors a node reads (the interleaved originals for our convs)."""
        if node.op == "Conv" and node.domain in DEFAULT_DOMAINS and len(node.inputs) > 1:
            branch, _ = self._conv_branch(node)
            if branch is not None:  # (weights are constants: the branch's inputs are all it reads)
                return [str(k) for k in branch.inputs]
        names = [t.name for t in node.inputs if t.name and not self.is_static(t)]
        return list(dict.fromkeys(names))
