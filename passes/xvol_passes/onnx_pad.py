"""The view-level pre-rule of the ONNX adapter: a ``Pad`` (or the Slice/Concat chain the TorchScript
exporter writes for circular padding) read by a ``Conv`` is absorbed into the conv's geometry.

A conv reading such a pad is shown to the rules as a conv with that padding (``padding_mode``
reflect / replicate / circular for the non-zero modes) over the pad's source, as onnxscript's
pad-into-conv rule does; the graph itself is untouched until a rule rewrites the conv, whose
emission writes the pad again (``xvol_passes.onnx_emit``).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from xvol_passes.onnx_constants import DEFAULT_DOMAINS, OnnxConstants

__all__ = ["PAD_MODES", "AbsorbedPad", "absorbable_pad"]

PAD_MODES = {"constant": "zeros", "reflect": "reflect", "edge": "replicate", "wrap": "circular"}
AbsorbedPad = tuple[list[tuple[int, int]], str, gs.Tensor]  # (spatial pads, torch padding_mode, source)


def absorbable_pad(consts: OnnxConstants, x: gs.Tensor, ndim: int) -> AbsorbedPad | None:
    """(spatial pads, torch padding_mode, source) when ``x`` is a spatial-only ``Pad`` of an
    activation with constant pads (zero value in constant mode): a conv reading it is a conv
    with that padding over the source."""
    if len(x.inputs) != 1:
        return None
    pad = x.inputs[0]
    if pad.op == "Concat" and pad.domain in DEFAULT_DOMAINS:
        return _wrap_concat_pad(consts, x, ndim)
    if pad.op != "Pad" or pad.domain not in DEFAULT_DOMAINS or len(pad.inputs) < 2:
        return None
    source = pad.inputs[0]
    if consts.is_static(source):
        return None
    mode = pad.attrs.get("mode", "constant")
    mode = mode.decode() if isinstance(mode, bytes) else str(mode)
    if mode not in PAD_MODES:
        return None
    pads_value = consts.const(pad.inputs[1]) if pad.inputs[1].name else None
    if pads_value is None:
        return None
    if mode == "constant" and len(pad.inputs) > 2 and pad.inputs[2].name:
        value = consts.const(pad.inputs[2])
        if value is None or bool(np.any(value != 0)):
            return None
    rank = ndim + 2
    pads = [int(p) for p in np.asarray(pads_value).reshape(-1)]
    axes = list(range(rank))
    if len(pad.inputs) > 3 and pad.inputs[3].name:
        axes_value = consts.const(pad.inputs[3])
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
    return list(zip(begin[2:], end[2:], strict=True)), PAD_MODES[mode], source


def _wrap_concat_pad(consts: OnnxConstants, x: gs.Tensor, ndim: int) -> AbsorbedPad | None:
    """(spatial pads, 'circular', source) when ``x`` is the chain the TorchScript exporter writes for
    circular padding (opset < 19 has no Pad 'wrap'): per spatial axis, one
    ``Concat(Slice(t, -left:), t, Slice(t, :right))``, either slice absent when its pad is 0."""
    rank = ndim + 2
    begin, end = [0] * rank, [0] * rank
    seen: set[int] = set()
    t = x
    while len(t.inputs) == 1 and t.inputs[0].op == "Concat" and t.inputs[0].domain in DEFAULT_DOMAINS:
        concat = t.inputs[0]
        axis = int(concat.attrs.get("axis", 0))
        axis = axis + rank if axis < 0 else axis
        if axis < 2 or axis >= rank or axis in seen:
            break
        parsed = _wrap_parts(consts, list(concat.inputs), axis)
        if parsed is None:
            break
        begin[axis], end[axis], t = parsed
        seen.add(axis)
    if t is x or consts.is_static(t):
        return None
    pads = list(zip(begin[2:], end[2:], strict=True))
    return pads, ("circular" if any(a or b for a, b in pads) else "zeros"), t


def _wrap_parts(consts: OnnxConstants, parts: list[gs.Tensor], axis: int) -> tuple[int, int, gs.Tensor] | None:
    """(left, right, source) when ``parts`` are [tail of source], source, [head of source] along ``axis``."""
    for i, source in enumerate(parts):
        before, after = parts[:i], parts[i + 1:]
        if len(before) > 1 or len(after) > 1:
            continue
        shape = consts.shape(source)
        size = shape[axis] if shape is not None and len(shape) > axis else None
        if shape is None or not isinstance(size, int):
            continue
        left = _slice_of(consts, before[0], source, axis, len(shape), size) if before else (size, size)
        right = _slice_of(consts, after[0], source, axis, len(shape), size) if after else (0, 0)
        if left is None or right is None or left[1] != size or right[0] != 0:
            continue
        left_pad, right_pad = size - left[0], right[1]
        if 0 <= left_pad <= size and 0 <= right_pad <= size:
            return left_pad, right_pad, source
    return None


def _slice_of(
    consts: OnnxConstants, t: gs.Tensor, source: gs.Tensor, axis: int, rank: int, size: int
) -> tuple[int, int] | None:
    """(start, end), clamped to [0, size], when ``t`` is a unit-step ``Slice`` of ``source`` (of rank ``rank``,
    ``size`` long on ``axis``) on ``axis`` only."""
    if len(t.inputs) != 1:
        return None
    node = t.inputs[0]
    if node.op != "Slice" or len(node.inputs) < 3 or node.inputs[0] is not source:
        return None
    values = [consts.const(v) if v.name else None for v in node.inputs[1:5]]
    if values[0] is None or values[1] is None:
        return None
    starts, ends = (np.asarray(v).reshape(-1) for v in values[:2])
    axes = np.arange(len(starts)) if len(values) < 3 or values[2] is None else np.asarray(values[2]).reshape(-1)
    steps = np.ones_like(starts) if len(values) < 4 or values[3] is None else np.asarray(values[3]).reshape(-1)
    if len(starts) != 1 or len(ends) != 1 or len(axes) != 1 or len(steps) != 1 or int(steps[0]) != 1:
        return None
    if int(axes[0]) % rank != axis:
        return None

    def clamp(v: int) -> int:
        return min(max(v + size if v < 0 else v, 0), size)

    return clamp(int(starts[0])), clamp(int(ends[0]))
