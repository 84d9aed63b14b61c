"""The values the rule engine and the graph adapters exchange: view nodes, rewrites, report rows.

The view
--------
A ``networkx.DiGraph`` whose nodes are the adapter's own keys (FX nodes, ONNX tensor
names) and whose edges are data flow, producer -> consumer. Each node carries one
attribute, ``"info"``: a :class:`NodeInfo`. Read it with :func:`node_info`, write it
with :func:`add_node` / :func:`set_info`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any, Literal

import networkx as nx

from xvol_compiler.fold import BatchNormParams, Branch, ConvGeometry
from xvol_compiler.lowering import Lowering

__all__ = [
    "INFO",
    "Key",
    "Kind",
    "Lowering",
    "NodeInfo",
    "Outcome",
    "Rewrite",
    "Status",
    "add_node",
    "conv_macs",
    "node_info",
    "set_info",
]

Key = Hashable
INFO = "info"  # the view-node attribute holding its NodeInfo

Kind = Literal[
    "conv",  # a convolution; ``branch`` holds its weights when they are constants
    "bn",  # a BatchNorm; ``bn`` holds its parameters when foldable
    "add",  # a sum of two graph values
    "mul",  # a product of two graph values
    "reshape",  # a view, reshape, (un)squeeze, flatten or broadcast of one value
    "pssa",  # a recognised PSSA transform (or a part of one spelled out)
    "global_attention",  # an attention op
    "softmax",
    "conv_like",  # a linear op that is not foldable (matmul, linear, transposed conv ...)
    "site",  # an X-volution module call (the module form's trace)
    "input",  # a graph input, or a value from outside the graph
    "other",
]
Status = Literal["fused", "refused"]


@dataclass(frozen=True)
class NodeInfo:
    """What the rules know about one view node.

    ``branch``: conv nodes, a ``fold.Branch`` whose ``inputs`` are the keys of the nodes
    it reads (an interleaved conv lists every input; the adapter draws an edge from each),
    None when the weights are not constants. ``bn``: bn nodes, None when not foldable.
    ``refusal``: a reason the adapter already knows this node must not be rewritten
    (module reused, training mode, weights computed at run time ...). ``users``: how many
    consumers read the value (graph outputs count). ``spatial``: the number of output
    positions (product of spatial sizes), for MAC counts, when known.
    """

    kind: Kind
    name: str
    users: int = 1
    refusal: str | None = None
    spatial: int | None = None
    branch: Branch | None = None
    bn: BatchNormParams | None = None


def node_info(view: nx.DiGraph, key: Key) -> NodeInfo:
    info: NodeInfo = view.nodes[key][INFO]
    return info


def add_node(view: nx.DiGraph, key: Key, info: NodeInfo) -> None:
    view.add_node(key, **{INFO: info})


def set_info(view: nx.DiGraph, key: Key, **changes: Any) -> None:
    """Replace fields of a node's NodeInfo (``kind=``, ``branch=`` ...; each field has its own type)."""
    view.nodes[key][INFO] = dataclasses.replace(node_info(view, key), **changes)


def conv_macs(geometry: ConvGeometry, spatial: int | None) -> int | None:
    if spatial is None:
        return None
    return spatial * geometry.out_channels * (geometry.in_channels // geometry.groups) * math.prod(
        geometry.kernel_size
    )


@dataclass(frozen=True)
class Rewrite:
    """Replace ``replaced`` (whose value ``output`` is what the rest of the graph reads)
    by one convolution ``branch`` over ``branch.inputs`` (interleaved per group when > 1).

    ``rule``: the name of the rule that planned it; ``kind``: its report row label."""

    rule: str
    kind: str  # "conv+bn", "x-volution", "branch-sum", "identity-branch"
    name: str
    anchor: Key  # the conv whose place and name the new conv takes
    output: Key
    replaced: tuple[Key, ...]
    branch: Branch
    params_before: int
    macs_before: int | None
    macs_after: int | None
    lowering: Lowering = "channel"  # how a multi-input branch is emitted (xvol_compiler.lowering)

    @property
    def params_after(self) -> int:
        return self.branch.weight.numel() + (0 if self.branch.bias is None else self.branch.bias.numel())


@dataclass(frozen=True)
class Outcome:
    """One line of a fusion report: a rewrite done, or a match refused with its reason.

    ``kind`` is the label of the rule that made or refused it (the same for both)."""

    kind: str
    name: str
    status: Status
    reason: str = ""
    params_before: int = 0
    params_after: int = 0
    macs_before: int | None = None
    macs_after: int | None = None
    lowering: str = ""  # x-volution sites: the deploy lowering chosen
    lowering_reason: str = ""  # why that lowering (rule entry, measured or cached times, forced, fallback reason)
