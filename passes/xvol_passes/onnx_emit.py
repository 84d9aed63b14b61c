"""Emitting rewrites into an ONNX graph: the emitting half of ``OnnxGraphAdapter``, and the export.

``apply`` builds one ``Conv`` over ``rewrite.branch.inputs`` interleaved per group (``Concat``
for one group; ``Reshape -> Concat -> Reshape`` for several, which works for any batch and
spatial size; or ``Concat -> Gather``), with new uniquely named initializers in the original
weight dtype, and makes it the producer of the rewrite's output tensor: every consumer, graph
outputs included, keeps reading the same tensor name. The "spatial", "spatial-h", "stack" and "split"
lowerings (``xvol_compiler.lowering``) are emitted the same way ("stack": ``Unsqueeze`` (or ``Reshape``)
of each input, ``Concat`` on the new axis, a ``Conv`` of one more dimension, ``Squeeze``). Nodes left
without consumers by the rewrite are removed (and only those); untouched nodes keep their names, order and metadata.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import torch

from xvol_compiler.errors import XvolError
from xvol_compiler.fold import Branch, ConvGeometry, FoldError
from xvol_compiler.lowering import (
    SpatialLayout,
    interleave_factor,
    spatial_axis,
    spatial_layout,
    spatial_weight,
    split_geometries,
    split_weights,
    stack_layout,
    stack_weight,
)
from xvol_compiler.rules import Key, Lowering, Rewrite
from xvol_passes.onnx_pad import PAD_MODES
from xvol_passes.onnx_view import Interleaved, OnnxGraphReader

__all__ = ["ADAPTER_METADATA_KEY", "Interleave", "OnnxGraphEmitter", "OnnxRewriteError"]

Interleave = Literal["reshape", "gather"]
ADAPTER_METADATA_KEY = "xvol_compiler.rewrite"
_ONNX_PAD_MODES = {v: k for k, v in PAD_MODES.items() if k != "constant"}
_INT64_MAX = int(np.iinfo(np.int64).max)


class OnnxRewriteError(XvolError, RuntimeError):
    """A planned rewrite does not fit the ONNX graph as it is (the graph and its view disagree)."""


class OnnxGraphEmitter(OnnxGraphReader):
    """Applies rewrites to the graph in place; ``to_model`` exports it."""

    interleave_mode: Interleave
    _interleave_cache: dict[tuple[tuple[str, ...], int], gs.Variable]
    _names: set[str]  # every tensor and node name in use (new names are fresh)

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
            shape = self.shape(x)
            x = self._node("Concat", parts, base, nodes, axis=axis)
            size = shape[axis] if shape is not None and len(shape) > axis else None
            if shape is not None and isinstance(size, int):
                # Known shapes let the view read the chain back as one circular pad.
                self.shapes[x.name] = (*shape[:axis], size + left + right, *shape[axis + 1:])
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
        self._interleaved[out.name] = Interleaved(tuple(keys), tuple(channels), groups)
        self._interleave_cache[cache_key] = out
        shape = self.shape(tensors[0])
        if shape is not None and len(shape) == ndim + 2:
            # Known shapes let the view see through a pad the exporters' way (Slice/Concat) to this interleave.
            self.shapes[out.name] = (shape[0], total, *shape[2:])
        return out

    def _interleave_spatial(
        self, keys: Sequence[str], channels: Sequence[int], layout: SpatialLayout, axis: int, base: str,
        nodes: list[gs.Node],
    ) -> gs.Tensor:
        """``interleave_spatial`` along spatial axis ``axis`` (-1: W, -2: H): each input as (N, C, ..., S_axis,
        k, ...) (Unsqueeze, or Reshape + Transpose when k > 1), one Concat on that new axis, one Reshape
        merging it into ``S_axis`` (any batch size; the axes after ``axis`` are written as static sizes)."""
        ndim = layout.geometry.ndim
        parts, dims, dtype = self._per_channel_parts(
            keys, channels, layout, ndim, axis, lambda dims, k: _interleave_refusal(dims, k, axis), base, nodes)
        cat = self._node("Concat", parts, base, nodes, dtype=dtype, output="spatial_concat", axis=axis)
        after = dims[ndim + axis + 1:]  # static (checked above) unless the interleaved axis is
        merged_size = -1 if -1 not in after else sum(ct // channels[0] for ct in channels) * dims[axis]
        merged = self._int64(f"{base}/spatial_shape", [0] * (ndim + 2 + axis) + [merged_size, *after])
        return self._node("Reshape", [cat, merged], base, nodes, dtype=dtype, output="spatial_interleave")

    def _stack(self, keys: Sequence[str], channels: Sequence[int], layout: SpatialLayout, ndim: int, base: str,
               nodes: list[gs.Node]) -> gs.Tensor:
        """``stack_depth`` of ``ndim``-D inputs: each as (N, C, k, ...) (Unsqueeze, or Reshape when k > 1), one
        Concat on that new axis (written as ``-(ndim + 1)``, as the Unsqueeze's axis; any batch size)."""
        axis = -(ndim + 1)
        parts, _, dtype = self._per_channel_parts(keys, channels, layout, ndim, axis, _stack_refusal, base, nodes)
        return self._node("Concat", parts, base, nodes, dtype=dtype, output="stack", axis=axis)

    def _per_channel_parts(
        self, keys: Sequence[str], channels: Sequence[int], layout: SpatialLayout, ndim: int, axis: int,
        refusal: Callable[[list[int], int], str | None], base: str, nodes: list[gs.Node],
    ) -> tuple[list[gs.Tensor], list[int], Any]:
        """Each input of ``keys`` (padded first when the layout says so) with its ``k`` channels per channel of x
        on a new axis at ``axis`` (negative, of the result): Unsqueeze when k = 1, else Reshape to (N, C, k, ...)
        and, unless the new axis is the one after C, a Transpose moving k there; with the inputs' static spatial
        sizes (-1 where unknown) and dtype. ``refusal`` (of those sizes and the largest k) raises FoldError
        with its reason first."""
        tensors = [self._tensors[k] for k in keys]
        dtype = next((t.dtype for t in tensors if t.dtype is not None), None)
        c = channels[0]
        dims = self._spatial_dims(tensors[0], ndim, layout)
        why = refusal(dims, max(ct // c for ct in channels))
        if why:
            raise FoldError(why)
        parts = []
        for t, ct in zip(tensors, channels, strict=True):
            if layout.pre_pads is not None:
                t = self._pad(t, layout.pre_pads, layout.pre_mode, base, nodes)
            k = ct // c
            if k == 1:
                parts.append(self._node("Unsqueeze", [t, self._int64(f"{base}/axes", [axis])], base, nodes,
                                        dtype=dtype))
                continue
            grouped = self._node("Reshape", [t, self._int64(f"{base}/split_shape", [0, c, k, *dims])], base,
                                 nodes, dtype=dtype)
            order = list(range(3, 3 + ndim))
            order.insert(ndim + axis + 1, 2)  # k right after the interleaved axis (-(ndim+1): after C)
            perm = [0, 1, *order]
            parts.append(grouped if perm == sorted(perm) else
                         self._node("Transpose", [grouped], base, nodes, dtype=dtype, perm=perm))
        return parts, dims, dtype

    def _spatial_dims(self, x: gs.Tensor, ndim: int, layout: SpatialLayout) -> list[int]:
        """Static spatial sizes of ``x`` (after the layout's pre-padding), unknown ones as -1."""
        shape = self.shape(x)
        dims = list(shape[2:]) if shape is not None and len(shape) == ndim + 2 else [None] * ndim
        out: list[int] = []
        for axis, d in enumerate(dims):
            if isinstance(d, int) and layout.pre_pads is not None:
                d = d + sum(layout.pre_pads[axis])
            out.append(d if isinstance(d, int) else -1)
        return out

    def lowering_refusal(self, branch: Branch, lowering: Lowering) -> str | None:
        """Why this graph cannot emit ``lowering`` for ``branch`` beyond the math (None: it can)."""
        axis = spatial_axis(lowering)
        ndim = branch.geometry.ndim
        if (lowering != "stack" and (axis is None or -axis > ndim)) or len(branch.channels) < 2:
            return None  # (a missing axis is the math's refusal)
        shape = self.shape(self._tensors[str(branch.inputs[0])])
        dims = list(shape[2:]) if shape is not None and len(shape) == ndim + 2 else [None] * ndim
        known = [d if isinstance(d, int) else -1 for d in dims]
        k = branch.channels[1] // branch.channels[0]
        return _stack_refusal(known, k) if axis is None else _interleave_refusal(known, k, axis)

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

    def apply(self, rewrite: Rewrite) -> str:
        """Replace ``rewrite.replaced`` by one Conv producing ``rewrite.output``'s tensor (or, for a
        multi-input branch, its ``rewrite.lowering``: see ``xvol_compiler.lowering``); that tensor's name."""
        lowering = rewrite.lowering if len(rewrite.branch.inputs) > 1 else "channel"
        return self._emit(str(rewrite.anchor), str(rewrite.output), rewrite.branch, lowering, rewrite.kind)

    def relower(self, key: Key, branch: Branch, lowering: Lowering) -> str:
        """Emit the created Conv producing ``key`` (of ``branch``) again in ``lowering``; ``key``."""
        tag = "x-volution" if lowering == "channel" else f"lowering {lowering}"
        return self._emit(str(key), str(key), branch, lowering, tag)

    def _emit(self, anchor_key: str, output_key: str, branch: Branch, lowering: Lowering, tag: str) -> str:
        """One Conv (or a lowering's nodes) of ``branch`` producing ``output_key``, named after the conv
        producing ``anchor_key``; ``tag`` is recorded in the new nodes' metadata."""
        anchor_t = self._tensors[anchor_key]
        out_t = self._tensors[output_key]
        if len(anchor_t.inputs) != 1 or len(out_t.inputs) != 1:
            raise OnnxRewriteError(f"rewrite of {output_key}: its anchor or output has no producer")
        anchor, old = anchor_t.inputs[0], out_t.inputs[0]
        g = branch.geometry
        keys = [str(k) for k in branch.inputs]
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
        axis = spatial_axis(lowering)
        if lowering == "stack":
            layout = stack_layout(g, interleave_factor(branch), asymmetric_pads=True)
            x = self._stack(keys, branch.channels, layout, g.ndim, base, new_nodes)
            convs = [(x, stack_weight(branch.weight, layout.factor), bias_values, layout.geometry, layout.pads)]
        elif axis is not None:
            factor = interleave_factor(branch)
            layout = spatial_layout(g, factor, asymmetric_pads=True, axis=axis)
            x = self._interleave_spatial(keys, branch.channels, layout, axis, base, new_nodes)
            convs = [(x, spatial_weight(branch.weight, g.groups, factor, axis), bias_values, layout.geometry,
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
            if len(convs) == 1 and lowering != "stack":
                y: gs.Tensor = out_t
            else:
                y = gs.Variable(self._fresh(f"{base}/conv{i}_output"), dtype=out_t.dtype)
                self._hidden.add(y.name)
            conv = gs.Node("Conv", conv_name if i == 0 else self._fresh(f"{conv_name}_attn"),
                           self._conv_attrs(geometry, pads), inputs, [y])
            new_nodes.append(conv)
            main = main or conv
            results.append(y)
        if lowering == "stack":  # the stacked axis has size 1 after the conv
            axes = self._int64(f"{base}/squeeze_axes", [2])
            new_nodes.append(gs.Node("Squeeze", self._fresh(f"{base}/Squeeze"), {}, [results[0], axes], [out_t]))
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
        if tag not in done:
            done.append(tag)
        metadata.append((ADAPTER_METADATA_KEY, ", ".join(done)))
        for node in new_nodes:
            if node.op in ("Conv", "Add", "Squeeze") and node.outputs and node.outputs[0] is not None:
                self._new_metadata[id(node)] = metadata
        index = next(i for i, n in enumerate(self.graph.nodes) if n is old)
        self.graph.nodes[index:index] = new_nodes
        self._remove_dead([old])
        return output_key
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


def _stack_refusal(dims: Sequence[int], k: int) -> str | None:
    """Why the stack cannot be written for spatial sizes ``dims`` (-1: unknown) with ``k`` channels of T per
    channel of x (None: it can): the Reshape splitting T's channels (``k > 1``) takes all sizes but one."""
    if k > 1 and list(dims).count(-1) > 1:
        return "the directional stack needs static spatial sizes (all but one axis)"
    return None


def _interleave_refusal(dims: Sequence[int], k: int, axis: int) -> str | None:
    """Why the spatial interleave along ``axis`` cannot be written for spatial sizes ``dims`` (-1: unknown)
    with ``k`` channels of T per channel of x (None: it can). The Reshape splitting T's channels (``k > 1``)
    takes all sizes but one; the Reshape merging the interleaved axis writes the axes after it."""
    if k > 1 and list(dims).count(-1) > 1:
        return "the directional spatial interleave needs static spatial sizes (all but one axis)"
    if list(dims[len(dims) + axis:]).count(-1) > 1:
        return ("the spatial-h interleave needs a static H or W (the Reshape merging the interleave into H "
                "writes W)")
    return None
