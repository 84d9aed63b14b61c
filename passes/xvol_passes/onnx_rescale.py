"""The INT8 rescale of :mod:`xvol_compiler.int8` on an ONNX graph (a fused graph from ``fuse_onnx``, or an unfused
one: any conv that reads T(x) is rescaled the same way).

A site here is the PSSA transform as exported: a depthwise ``Conv`` of ``x`` whose constant weight is the ring
(``pssa_kernel_layout``: plain, not directional), then ``Mul(x, ring_conv(x))`` = T(x). Everything T(x) flows into
must be a chain of the interleave ops ``fuse_onnx`` writes (``Concat``, ``Reshape``, ``Gather`` on channels,
``Pad``; ``Unsqueeze``/``Concat``/``Reshape`` of the spatial interleaves, along W or H, and
``Unsqueeze``/``Concat`` of the stack) ending in ``Conv`` nodes with constant weights; each such conv's input
channels (or taps) are traced back to x or T(x), so the weights that read T's channel c are known exactly whatever
the interleave. The rescale replaces the ring and those weights by new constants (``scale_ring``, ``1/s`` on what
reads T): no node is added.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import torch

from xvol_compiler.int8 import (
    Method,
    RescaleError,
    SiteStats,
    TReader,
    WeightGranularity,
    choose_t_scale,
    rescale_t_taps,
    scale_ring,
)
from xvol_compiler.pssa import pssa_kernel_layout

__all__ = ["OnnxRescaleSite", "apply_onnx_t_scales", "calibrate_onnx_site_stats", "calibrate_onnx_t_scales",
           "onnx_rescale_sites", "onnx_t_readers", "rescale_onnx"]

_PASS_THROUGH = {"Concat", "Reshape", "Gather", "Pad", "Unsqueeze"}
Source = tuple[str, int]  # ("x" or "t", channel)
Slot = tuple[int, int]  # (T's slot, the weight axis its taps alternate on: -1 W, -2 H, or the stacked axis)


@dataclass
class OnnxRescaleSite:
    """One PSSA transform of a graph and the convs that read its T(x)."""

    name: str  # the ring conv's name (the site's key in scale mappings)
    x: gs.Tensor
    t: gs.Tensor
    ring_conv: gs.Node
    # each conv T(x) reaches, with the source of each of its input channels (a channel interleave or T alone)
    # or, for a spatial interleave, T's slot in it and the axis (tap factor * t + slot of that axis reads T)
    convs: list[tuple[gs.Node, list[Source] | Slot]]


def _const(t: gs.Tensor) -> np.ndarray | None:
    if isinstance(t, gs.Constant):
        return np.asarray(t.values)
    if len(t.inputs) == 1 and t.inputs[0].op == "Constant":
        value = t.inputs[0].attrs.get("value")
        return None if value is None else np.asarray(value.values)
    return None


def _attr(node: gs.Node, name: str, default: int) -> int:
    return int(node.attrs.get(name, default))


def _ring_site(node: gs.Node) -> tuple[gs.Tensor, gs.Tensor] | None:
    """(x, T) when ``node`` is the ring conv of a plain PSSA transform whose Mul reads it."""
    if node.op != "Conv" or len(node.inputs) < 2 or (len(node.inputs) > 2 and node.inputs[2].name):
        return None  # (the ring conv has no bias)
    w = _const(node.inputs[1])
    if w is None or w.dtype.kind != "f" or w.ndim < 3:
        return None
    channels = _attr(node, "group", 1)
    if w.shape[0] != channels:
        return None
    layout = pssa_kernel_layout(torch.from_numpy(np.ascontiguousarray(w)), channels)
    if layout is None or layout.directional:
        return None
    x, r = node.inputs[0], node.outputs[0]
    if len(r.outputs) != 1 or r.outputs[0].op != "Mul" or len(r.outputs[0].inputs) != 2:
        return None
    mul = r.outputs[0]
    other = mul.inputs[1] if mul.inputs[0] is r else mul.inputs[0]
    if other is not x:
        return None
    return x, mul.outputs[0]


def _channels(t: gs.Tensor, x: gs.Tensor, tt: gs.Tensor, c: int, depth: int = 0) -> list[Source] | None:
    """The source channel ((x or t), index) of each channel of ``t``, or None when ``t`` is not a channel
    interleave of ``x`` and ``tt`` the way fuse_onnx writes it."""
    if t is x or t is tt:
        return [("x" if t is x else "t", i) for i in range(c)]
    if depth > 8 or len(t.inputs) != 1:
        return None
    node = t.inputs[0]
    if node.op == "Pad":
        return _channels(node.inputs[0], x, tt, c, depth + 1) if _spatial_pad(node) else None
    if node.op == "Concat" and _attr(node, "axis", 0) == 1:
        parts = [_channels(i, x, tt, c, depth + 1) for i in node.inputs]
        return None if any(p is None for p in parts) else [s for p in parts for s in p]  # type: ignore[union-attr]
    if node.op == "Gather" and _attr(node, "axis", 0) == 1:
        index, source = _const(node.inputs[1]), _channels(node.inputs[0], x, tt, c, depth + 1)
        if index is None or source is None or index.ndim != 1:
            return None
        return [source[int(i)] for i in index]
    if node.op == "Reshape":  # Reshape(Concat(axis=2, [Reshape(a, [0, g, -1, ...]), ...]), [0, C, -1, ...])
        merged, cat = _const(node.inputs[1]), node.inputs[0]
        if merged is None or len(merged) < 3 or list(merged[:1]) != [0] or merged[2] != -1:
            return None
        if len(cat.inputs) != 1 or cat.inputs[0].op != "Concat" or _attr(cat.inputs[0], "axis", 0) != 2:
            return None
        groups, parts = None, []
        for part in cat.inputs[0].inputs:
            if len(part.inputs) != 1 or part.inputs[0].op != "Reshape":
                return None
            shape = _const(part.inputs[0].inputs[1])
            if shape is None or len(shape) < 3 or shape[0] != 0 or shape[2] != -1 or groups not in (None, shape[1]):
                return None
            groups = int(shape[1])
            parts.append(_channels(part.inputs[0].inputs[0], x, tt, c, depth + 1))
        if groups is None or any(p is None or len(p) % groups for p in parts):
            return None
        out = [s for g in range(groups) for p in parts for s in p[g * len(p) // groups:(g + 1) * len(p) // groups]]  # type: ignore[index,arg-type]
        return out if int(merged[1]) == len(out) else None
    return None


def _spatial_pad(node: gs.Node) -> bool:
    """Whether a Pad node pads spatial axes only (batch and channel pads constant zero)."""
    pads = _const(node.inputs[1]) if len(node.inputs) > 1 else None
    if pads is None or pads.ndim != 1 or len(pads) % 2:
        return False
    rank = len(pads) // 2
    return not any(int(pads[i]) for i in (0, 1, rank, rank + 1))


def _unpadded(t: gs.Tensor) -> gs.Tensor:
    while len(t.inputs) == 1 and t.inputs[0].op == "Pad" and _spatial_pad(t.inputs[0]):
        t = t.inputs[0].inputs[0]
    return t


def _t_slot(t: gs.Tensor, x: gs.Tensor, tt: gs.Tensor) -> Slot | None:
    """T's position in a spatial interleave of ``[x, T]`` and its spatial axis (``interleave_spatial`` as
    fuse_onnx writes it: ``Reshape(Concat(axis=a, [Unsqueeze(x, a), Unsqueeze(T, a)]), [0, ..., 0, -1, ...])``
    with ``a`` -1 (W) or -2 (H), the Reshape copying every axis before the merged one), or in a stack
    (``Concat(axis=a, [Unsqueeze(x, a), Unsqueeze(T, a)])`` read by the conv itself, ``a`` negative: the
    weight's stacked axis), each input possibly padded first; else None."""
    t = _unpadded(t)
    if len(t.inputs) == 1 and t.inputs[0].op == "Concat":  # the stack: the Concat feeds the conv
        cat = t.inputs[0]
        axis = _attr(cat, "axis", 0)
        if axis >= 0:
            return None
    else:
        if len(t.inputs) != 1 or t.inputs[0].op != "Reshape":
            return None
        merged, shape = t.inputs[0].inputs[0], _const(t.inputs[0].inputs[1])
        if len(merged.inputs) != 1 or merged.inputs[0].op != "Concat" or shape is None or shape.ndim != 1:
            return None
        cat = merged.inputs[0]
        axis = _attr(cat, "axis", 0)
        if axis not in (-1, -2) or len(shape) + axis < 2 or any(int(v) for v in shape[:len(shape) + axis]):
            return None
    found = []
    for part in cat.inputs:
        if len(part.inputs) != 1 or part.inputs[0].op != "Unsqueeze":
            return None
        axes = _const(part.inputs[0].inputs[1]) if len(part.inputs[0].inputs) > 1 else None
        if axes is None or [int(a) for a in np.atleast_1d(axes)] != [axis]:
            return None
        found.append(_unpadded(part.inputs[0].inputs[0]))
    if len(found) != 2 or {id(f) for f in found} != {id(x), id(tt)}:
        return None
    return found.index(tt), axis


def _readers(t: gs.Tensor) -> list[gs.Node] | None:
    """The Conv nodes ``t`` flows into through interleave ops; None if it flows anywhere else."""
    convs: list[gs.Node] = []
    stack = [t]
    seen: set[int] = set()
    while stack:
        cur = stack.pop()
        for node in cur.outputs:
            if id(node) in seen:
                continue
            seen.add(id(node))
            if node.op == "Conv" and node.inputs[0] is cur and _const(node.inputs[1]) is not None:
                convs.append(node)
            elif node.op == "Concat" or (node.op in _PASS_THROUGH and node.inputs[0] is cur):
                stack.extend(node.outputs)
            else:
                return None
    return convs


def onnx_rescale_sites(graph: gs.Graph) -> list[OnnxRescaleSite]:
    """Every plain PSSA transform of ``graph`` whose T(x) only reaches convs through interleave ops."""
    sites = []
    outputs = {id(o) for o in graph.outputs}
    for node in graph.nodes:
        found = _ring_site(node)
        if found is None or id(found[1]) in outputs:
            continue
        x, t = found
        c = int(np.asarray(_const(node.inputs[1])).shape[0])
        readers = _readers(t)
        if not readers:
            continue
        convs: list[tuple[gs.Node, list[Source] | Slot]] = []
        for conv in readers:
            channels = _channels(conv.inputs[0], x, t, c)
            read = channels if channels is not None else _t_slot(conv.inputs[0], x, t)
            if read is None:
                break
            convs.append((conv, read))
        if len(convs) != len(readers):
            continue
        sites.append(OnnxRescaleSite(node.name, x, t, node, convs))
    return sites


def _divided(weight: np.ndarray, groups: int, sources: list[Source], s: np.ndarray) -> np.ndarray:
    """``weight`` with each column that reads T's channel c divided by ``s[c]`` (columns of group g read
    input channels g * columns + j)."""
    out_channels, columns = weight.shape[0], weight.shape[1]
    if len(sources) != groups * columns:
        raise RescaleError(f"a conv of {groups * columns} input channels reads {len(sources)}: not a rescalable site")
    divisor = np.ones((out_channels, columns), dtype=np.float64)
    per_group = out_channels // groups
    for i, (kind, ch) in enumerate(sources):
        if kind == "t":
            g, j = divmod(i, columns)
            divisor[g * per_group:(g + 1) * per_group, j] = s[ch]
    shaped = divisor.reshape(out_channels, columns, *(1,) * (weight.ndim - 2))
    return (weight.astype(np.float64) / shaped).astype(weight.dtype)


def apply_onnx_t_scales(model: onnx.ModelProto, scales: Mapping[str, np.ndarray | torch.Tensor]) -> onnx.ModelProto:
    """A copy of ``model`` with each named site (ring conv name) rescaled by its s (one per channel of x)."""
    graph = gs.import_onnx(model)
    sites = {s.name: s for s in onnx_rescale_sites(graph)}
    unknown = sorted(set(scales) - set(sites))
    if unknown:
        raise RescaleError(f"no rescalable PSSA site named {', '.join(unknown)}; sites: {', '.join(sites) or 'none'}")
    for name, value in scales.items():
        site = sites[name]
        s = np.asarray(value.detach().cpu() if isinstance(value, torch.Tensor) else value, dtype=np.float64)
        ring = np.asarray(_const(site.ring_conv.inputs[1]))
        scaled = scale_ring(torch.from_numpy(ring.astype(np.float64)), torch.from_numpy(s)).numpy()
        site.ring_conv.inputs[1] = gs.Constant(f"{name}/t_scaled_ring", scaled.astype(ring.dtype))
        for k, (conv, sources) in enumerate(site.convs):
            w = np.asarray(_const(conv.inputs[1]))
            if isinstance(sources, tuple):
                slot, axis = sources
                taps = rescale_t_taps(torch.from_numpy(w.astype(np.float64)), torch.from_numpy(s),
                                      _attr(conv, "group", 1), t_slot=slot, axis=axis)
                new = taps.numpy().astype(w.dtype)
            else:
                new = _divided(w, _attr(conv, "group", 1), sources, s)
            conv.inputs[1] = gs.Constant(f"{name}/t_scaled_weight_{k}", new)
    graph.cleanup()
    out = gs.export_onnx(graph, do_type_check=False)
    out.ir_version = model.ir_version
    del out.opset_import[:]
    out.opset_import.extend(model.opset_import)
    return out


def onnx_t_readers(site: OnnxRescaleSite) -> list[TReader]:
    """The conv weights of ``site`` that read T(x), with where they read it."""
    readers = []
    c = int(np.asarray(_const(site.ring_conv.inputs[1])).shape[0])
    twos = np.full(c, 2.0)
    for conv, sources in site.convs:
        w = np.asarray(_const(conv.inputs[1]), dtype=np.float64)
        ones = np.ones_like(w)
        if isinstance(sources, tuple):
            slot, axis = sources
            marked = rescale_t_taps(torch.from_numpy(ones), torch.from_numpy(twos), _attr(conv, "group", 1),
                                    t_slot=slot, axis=axis).numpy()
        else:
            marked = _divided(ones, _attr(conv, "group", 1), sources, twos)
        readers.append(TReader(torch.from_numpy(w), torch.from_numpy(marked != 1)))
    return readers


def calibrate_onnx_site_stats(model: onnx.ModelProto, batches: Iterable[np.ndarray | Mapping[str, np.ndarray]],
                              ) -> dict[str, SiteStats]:
    """What every rescalable site of ``model`` sees of x and T(x) in onnxruntime on ``batches`` (arrays for
    the first input, or feed dicts), by site name (its ring conv's)."""
    from xvol_compiler.verify import onnx_session

    graph = gs.import_onnx(model)
    sites = onnx_rescale_sites(graph)
    if not sites:
        raise RescaleError("no PSSA site (ring conv + Mul feeding convs) in the graph: pass a graph of an "
                           "xvolified model (fused by fuse_onnx or not)")
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    elem = model.graph.input[0].type.tensor_type.elem_type
    names = list(dict.fromkeys(n for s in sites for n in (s.x.name, s.t.name)))
    present = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.helper.make_tensor_value_info(n, elem, None) for n in names if n not in present)
    session = onnx_session(probe, threads=1)
    first = session.get_inputs()[0].name
    out_names = [o.name for o in session.get_outputs()]
    ranges: dict[str, np.ndarray] = {}
    sums: dict[str, list[float]] = {}  # name -> [sum of squares, element count]
    for batch in batches:
        feeds = dict(batch) if isinstance(batch, Mapping) else {first: np.asarray(batch)}
        values = dict(zip(out_names, session.run(out_names, feeds), strict=True))
        for n in names:
            v = np.abs(values[n]).swapaxes(0, 1).reshape(values[n].shape[1], -1).max(axis=1).astype(np.float64)
            ranges[n] = v if n not in ranges else np.maximum(ranges[n], v)
            total = sums.setdefault(n, [0.0, 0.0])
            total[0] += float(np.square(values[n], dtype=np.float64).sum())
            total[1] += values[n].size
    if not ranges:
        raise RescaleError("no calibration batch: pass at least one input batch")
    return {s.name: SiteStats(torch.from_numpy(ranges[s.x.name]), torch.from_numpy(ranges[s.t.name]),
                              sums[s.x.name][0] / sums[s.x.name][1], sums[s.t.name][0] / sums[s.t.name][1])
            for s in sites}


def calibrate_onnx_t_scales(model: onnx.ModelProto, batches: Iterable[np.ndarray | Mapping[str, np.ndarray]], *,
                            method: Method = "noise", weights: WeightGranularity = "per-channel",
                            per_channel: bool = False) -> dict[str, np.ndarray]:
    """s for every rescalable site of ``model`` from what onnxruntime shows of x and T(x) on ``batches``,
    chosen by ``method`` as :func:`xvol_compiler.int8.choose_t_scale` (``weights``: the quantizer's weight
    granularity)."""
    stats = calibrate_onnx_site_stats(model, batches)
    sites = {s.name: s for s in onnx_rescale_sites(gs.import_onnx(model))}
    return {name: choose_t_scale(st, onnx_t_readers(sites[name]), method=method, weights=weights,
                                 per_channel=per_channel).numpy() for name, st in stats.items()}


def rescale_onnx(model: onnx.ModelProto, batches: Iterable[np.ndarray | Mapping[str, np.ndarray]], *,
                 method: Method = "noise", weights: WeightGranularity = "per-channel",
                 per_channel: bool = False) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """Calibrate on ``batches`` and return the rescaled copy of ``model`` with the s applied per site."""
    scales = calibrate_onnx_t_scales(model, batches, method=method, weights=weights, per_channel=per_channel)
    return apply_onnx_t_scales(model, scales), scales
