"""Whether a conv subclass's own ``forward`` is one convolution of its input, checked by tracing it
with torch.fx (weight standardization qualifies: timm's ``StdConv2d``/``ScaledStdConv2d``)."""

from __future__ import annotations

from collections.abc import Collection
from typing import cast

import torch.fx
from torch import nn

from xvol_compiler.conv_modules import CONV_ATTRIBUTES, CONV_CALLS, PLAIN_CONV_FORWARDS, conv_geometry
from xvol_compiler.errors import InvalidArgumentTypeError

__all__ = ["traced_forward_reason"]


def _int_tuple(value: object, ndim: int) -> tuple[int, ...] | str:
    if isinstance(value, str):
        return value
    if isinstance(value, int):
        return (value,) * ndim
    if isinstance(value, (tuple, list)):
        return tuple(int(v) for v in value)
    raise InvalidArgumentTypeError(f"not an int or a sequence of ints: {value!r}")


def traced_forward_reason(conv: nn.Module, reserved_names: Collection[str] = ()) -> str:
    """'' when ``conv``'s forward is one convolution of its input, else why it is not.

    A plain ``nn.Conv1d/2d/3d`` qualifies. A subclass that overrides
    ``forward`` qualifies when its forward, traced with torch.fx, is one
    ``F.conv{1,2,3}d`` of the unchanged input with the module's own geometry,
    returned as is, whose weight and bias are computed from the module's
    parameters and constants only, and none of its own attributes, parameters
    or buffers is named like one of ``reserved_names`` (the names of the
    module that is to adopt them). Such a weight is constant in eval mode.
    """
    if type(conv).forward in PLAIN_CONV_FORWARDS:
        return ""
    cls = type(conv).__qualname__
    head = f"custom forward: {cls} overrides forward()"
    try:
        graph = torch.fx.Tracer().trace(conv)
    except Exception as err:  # any tracing failure: the forward cannot be checked
        return f"{head} and does not trace with torch.fx ({type(err).__name__}); a swap would drop that behaviour"
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    if len(inputs) != 1:
        return f"{head} with {len(inputs)} inputs; a swap would drop that behaviour"
    dependent: set[torch.fx.Node] = set()
    for node in graph.nodes:  # topological order: everything the input flows into
        if node in inputs or any(a in dependent for a in node.all_input_nodes):
            dependent.add(node)
    convs = [n for n in dependent if n.op == "call_function" and n.target in CONV_CALLS]
    output = next(n for n in graph.nodes if n.op == "output")
    if len(convs) != 1:
        return f"{head} and calls {len(convs)} convolutions on its input; a swap would drop that behaviour"
    others = [str(n.target) for n in dependent if n not in (inputs[0], convs[0], output)]
    if others or output.args[0] is not convs[0]:
        what = f" ({', '.join(sorted(others)[:3])})" if others else ""
        return (f"{head} and computes more than a convolution of its input{what}; "
                "a swap would drop that behaviour")
    call = convs[0]
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    args = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}
    args.update(zip(names, call.args, strict=False))
    args.update(call.kwargs)
    if args["input"] is not inputs[0]:
        return f"{head} and transforms its input before the convolution; a swap would drop that behaviour"
    ndim = CONV_CALLS[call.target]
    g = conv_geometry(conv)
    wanted = (g.stride, g.padding, g.dilation, g.groups)
    try:
        groups = int(cast(int, args["groups"]))
        found = (*(_int_tuple(args[k], ndim) for k in ("stride", "padding", "dilation")), groups)
    except (TypeError, ValueError):
        found = ()
    if found != wanted or g.padding_mode != "zeros":
        return f"{head} and convolves with another geometry than its own; a swap would drop that behaviour"
    for node in graph.nodes:
        if node.op == "call_module" or (node.op == "call_method" and str(node.target).endswith("_")):
            return f"{head} and its weight computation calls {node.target} (a module or in-place op)"
    own = (set(vars(conv)) - CONV_ATTRIBUTES) | (set(conv._parameters) - {"weight", "bias"}) | set(conv._buffers)
    clash = sorted(own & set(reserved_names))
    if clash:
        return f"{head} and its attribute(s) {', '.join(clash)} clash with the X-volution site's own"
    return ""
