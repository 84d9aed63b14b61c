"""Op counts of ONNX graphs that tell the site convolutions from the PSSA transform's constant-kernel conv."""

from __future__ import annotations

from typing import Any

_VIEWS = {"Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity"}


def _nodes(model: Any) -> list[Any]:
    return list(model.graph.node) + [n for f in model.functions for n in f.node]


def is_pssa_conv(conv: Any, nodes: list[Any]) -> bool:
    """A Conv whose output (through views) is only multiplied with the conv's own input (through views):
    the neighbour sums of a PSSA transform ``x * conv(x, ring)``, not a convolution of the network."""
    producer = {o: n for n in nodes for o in n.output}
    consumers: dict[str, list[Any]] = {}
    for n in nodes:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    def source(name: str) -> str:
        while name in producer and producer[name].op_type in _VIEWS:
            name = producer[name].input[0]
        return name

    def users(name: str) -> list[Any]:  # (a Shape reads no values)
        return [n for n in consumers.get(name, []) if n.op_type not in ("Shape", "Size")]

    value = conv.output[0]
    while len(users(value)) == 1 and users(value)[0].op_type in _VIEWS and users(value)[0].input[0] == value:
        value = users(value)[0].output[0]
    readers = users(value)
    if len(readers) != 1 or readers[0].op_type != "Mul":
        return False
    others = [i for i in readers[0].input if i != value]
    return len(others) == 1 and source(others[0]) == source(conv.input[0])


def site_convs(model: Any) -> int:
    """Conv nodes of ``model`` other than the PSSA transform's constant-kernel convs."""
    nodes = _nodes(model)
    return sum(n.op_type == "Conv" and not is_pssa_conv(n, nodes) for n in nodes)
