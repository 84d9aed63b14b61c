"""Pre-passes: view-to-view steps the driver runs on every fresh view, before the rules.

``PSSA_MARKING`` re-kinds a PSSA transform spelled out as a constant-kernel depthwise conv
whose output is multiplied with the conv's own input (``x * conv(x, pssa_kernel)``)
``"pssa"``: it is part of an X-volution site's T(x), never a conv to fold. Correctness
never rests on it: the rules only merge convs over the tensors they read, and a conv taken
for a transform is just left as it is.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import networkx as nx

from xvol_compiler.fold import Branch
from xvol_compiler.pssa import PssaKernelLayout, pssa_kernel_layout
from xvol_compiler.rules.types import Key, node_info, set_info

__all__ = ["PSSA_MARKING", "PRE_PASSES", "PrePass", "mark_pssa_transforms", "pssa_conv_layout", "pssa_products"]

# Reshape-like nodes walked between the ring conv, its input and the product (the directional
# form multiplies (N, C, |D|, ...) views); a few suffice, the limit only bounds the walk.
_RESHAPE_CHAIN_LIMIT = 8


@dataclass(frozen=True)
class PrePass:
    """A named step that changes node kinds of a view in place before the rules run."""

    name: str
    run: Callable[[nx.DiGraph], nx.DiGraph]


def pssa_conv_layout(branch: Branch) -> PssaKernelLayout | None:
    """The PSSA layout of a conv branch that computes the neighbour sums of a PSSA transform:
    one input, depthwise (groups == C_in), kernel 3 per axis, stride 1, dilation == padding
    (the shift) per axis, zero padding, no or zero bias, a ``pssa_kernel`` pattern in every channel."""
    g = branch.geometry
    if len(branch.inputs) != 1 or g.groups != g.in_channels or g.padding_mode != "zeros":
        return None
    if any(k != 3 for k in g.kernel_size) or any(s != 1 for s in g.stride):
        return None
    if any(pads != (d, d) for pads, d in zip(g.pads(), g.dilation, strict=True)):
        return None
    if branch.bias is not None and not bool((branch.bias == 0).all()):
        return None
    return pssa_kernel_layout(branch.weight, g.groups)


def _through_reshapes(view: nx.DiGraph, key: Key, forward: bool) -> Iterator[Key]:
    """``key`` and the nodes reached from it through reshape-like nodes: forward while the
    value has that one consumer in the view, backward while the node has one input."""
    yield key
    for _ in range(_RESHAPE_CHAIN_LIMIT):
        if forward:
            nxt = list(view.successors(key))
            if len(nxt) != 1 or node_info(view, nxt[0]).kind != "reshape":
                return
        else:
            if node_info(view, key).kind != "reshape":
                return
            nxt = list(view.predecessors(key))
            if len(nxt) != 1:
                return
        key = nxt[0]
        yield key


def pssa_products(view: nx.DiGraph) -> dict[Key, Key]:
    """Constant-kernel convs of the view that are the neighbour sums of a spelled-out PSSA
    transform, each with the product node that completes it: conv key -> product key.

    The conv (``pssa_conv_layout``) must feed, alone and possibly through reshapes, a
    ``mul`` whose other operand is the conv's own input (possibly through reshapes).
    Consumers outside the view (an ONNX ``Shape``: only the value's shape) do not count."""
    found: dict[Key, Key] = {}
    for key in view.nodes:
        info = node_info(view, key)
        if info.kind != "conv" or info.branch is None or pssa_conv_layout(info.branch) is None:
            continue
        source = info.branch.inputs[0]
        last = list(_through_reshapes(view, key, forward=True))[-1]
        products = list(view.successors(last))
        if len(products) != 1 or node_info(view, products[0]).kind != "mul":
            continue
        product = products[0]
        others = [p for p in view.predecessors(product) if p != last]
        if len(others) == 1 and source in _through_reshapes(view, others[0], forward=False):
            found[key] = product
    return found


def mark_pssa_transforms(view: nx.DiGraph) -> nx.DiGraph:
    """Re-kind each spelled-out PSSA transform's conv and product ``"pssa"`` (in place; returns ``view``)."""
    for conv, product in pssa_products(view).items():
        set_info(view, conv, kind="pssa")
        set_info(view, product, kind="pssa")
    return view


PSSA_MARKING = PrePass("pssa-marking", mark_pssa_transforms)
PRE_PASSES: tuple[PrePass, ...] = (PSSA_MARKING,)
