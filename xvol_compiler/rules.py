"""Rewrite rules, each declared once, and the networkx matcher that applies them.

This module knows neither torch.fx nor ONNX. A graph adapter (``passes/xvol_passes/fx_graph.py``,
``passes/xvol_passes/onnx_graph.py``) presents its graph as a ``networkx.DiGraph`` *view*
and applies the ``Rewrite`` values this module plans; the fold math comes from
``xvol_compiler.fold``. The same rule therefore serves both graph kinds.

The view
--------
Nodes are the adapter's own keys. Edges are data flow, producer -> consumer.
Node attributes:

``kind``
    ``"conv"``, ``"bn"``, ``"add"``, ``"mul"`` (a product of two graph values),
    ``"reshape"`` (a view, reshape, (un)squeeze, flatten or broadcast of one
    value), ``"pssa"`` (a recognised PSSA transform), ``"global_attention"``,
    ``"softmax"``, ``"conv_like"`` (a linear op that is not foldable),
    ``"input"`` (a graph input), or ``"other"``.
``branch``
    conv nodes: a ``fold.Branch`` whose ``inputs`` are the keys of the nodes it
    reads (an interleaved conv lists every input; the adapter draws an edge from
    each). ``None`` when the weights are not constants.
``bn``
    bn nodes: ``fold.BatchNormParams``, or ``None`` when not foldable.
``refusal``
    a reason the adapter already knows this node must not be rewritten
    (module reused, training mode, weights computed at run time ...), or ``None``.
``users``
    how many consumers read the node's output (graph outputs count).
``name``
    what reports call the node.
``spatial``
    optional: the number of output positions (product of spatial sizes), for MAC counts.

A PSSA transform spelled out as a constant-kernel depthwise conv whose output is
multiplied with the conv's own input (``x * conv(x, pssa_kernel)``, see
``mark_pssa_transforms``) is re-kinded ``"pssa"`` before the rules run: it is
part of an X-volution site's T(x), never a conv to fold.

Patterns are matched with ``DiGraphMatcher`` subgraph monomorphisms on node
kinds. Edges are unordered pairs of values, so ``add`` matches with its
operands in either order; n-ary sums reduce pairwise to a fixpoint.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import networkx as nx
from networkx.algorithms.isomorphism import DiGraphMatcher

from xvol_compiler.fold import (
    BatchNormParams,
    Branch,
    ConvGeometry,
    FoldError,
    bn_as_kernel,
    fold_conv_bn,
    merge_branches,
)
from xvol_compiler.pssa import PssaKernelLayout, pssa_kernel_layout

__all__ = [
    "RULES",
    "GraphAdapter",
    "Outcome",
    "Pattern",
    "Refusal",
    "Rewrite",
    "RewriteLog",
    "Rule",
    "ViewAdapter",
    "conv_macs",
    "mark_pssa_transforms",
    "pattern",
    "pssa_conv_layout",
    "pssa_products",
    "run_rules",
]

Key = Hashable


# --------------------------------------------------------------------------- patterns


@dataclass(frozen=True)
class Pattern:
    """A small DiGraph of role names; each role has a required ``kind`` (None: any node)."""

    name: str
    graph: nx.DiGraph

    def matches(self, view: nx.DiGraph) -> Iterator[dict[str, Key]]:
        """Every placement of the pattern in ``view``, as role -> node key (each node set once)."""
        matcher = DiGraphMatcher(view, self.graph, node_match=_kind_match)
        seen: set[frozenset[Key]] = set()
        for mapping in matcher.subgraph_monomorphisms_iter():
            nodes = frozenset(mapping)
            if nodes in seen:
                continue  # the same nodes with commutative roles swapped
            seen.add(nodes)
            yield {role: key for key, role in mapping.items()}


def _kind_match(view_attrs: Mapping[str, object], pattern_attrs: Mapping[str, object]) -> bool:
    want = pattern_attrs.get("kind")
    return want is None or view_attrs.get("kind") == want


def pattern(name: str, roles: Mapping[str, str | None], edges: Sequence[tuple[str, str]]) -> Pattern:
    graph = nx.DiGraph()
    for role, kind in roles.items():
        graph.add_node(role, kind=kind)
    graph.add_edges_from(edges)
    return Pattern(name, graph)


CONV_BN = pattern("conv+bn", {"conv": "conv", "bn": "bn"}, [("conv", "bn")])
CONV_SUM = pattern("conv+conv", {"a": "conv", "b": "conv", "add": "add"}, [("a", "add"), ("b", "add")])
BN_SUM = pattern(
    "conv+bn-branch",
    {"x": None, "conv": "conv", "bn": "bn", "add": "add"},
    [("x", "conv"), ("x", "bn"), ("conv", "add"), ("bn", "add")],
)
IDENTITY_SUM = pattern(
    "conv+identity", {"x": None, "conv": "conv", "add": "add"}, [("x", "conv"), ("conv", "add"), ("x", "add")]
)


# --------------------------------------------------------------------------- rewrites


class Refusal(Exception):
    """A match that must stay as it is; the message is the reason shown in reports."""


@dataclass(frozen=True)
class Rewrite:
    """Replace ``replaced`` (whose value ``output`` is what the rest of the graph reads)
    by one convolution ``branch`` over ``branch.inputs`` (interleaved per group when > 1)."""

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
    lowering: str = "channel"  # how a multi-input branch is emitted (xvol_compiler.lowering)

    @property
    def params_after(self) -> int:
        return self.branch.weight.numel() + (0 if self.branch.bias is None else self.branch.bias.numel())


@dataclass(frozen=True)
class Outcome:
    """One line of a fusion report: a rewrite done, or a match refused with its reason."""

    kind: str
    name: str
    status: str  # "fused" | "refused"
    reason: str = ""
    params_before: int = 0
    params_after: int = 0
    macs_before: int | None = None
    macs_after: int | None = None
    lowering: str = ""  # x-volution sites: the deploy lowering chosen
    lowering_reason: str = ""  # why that lowering (rule entry, measured or cached times, forced, fallback reason)


@dataclass(frozen=True)
class Rule:
    pattern: Pattern
    plan: Callable[[nx.DiGraph, dict[str, Key]], Rewrite | None]  # None: not applicable, say nothing


class GraphAdapter(Protocol):
    def view(self) -> nx.DiGraph: ...

    def apply(self, rewrite: Rewrite) -> None: ...


# --------------------------------------------------------------------------- checks shared by all rules


def conv_macs(geometry: ConvGeometry, spatial: int | None) -> int | None:
    if spatial is None:
        return None
    return spatial * geometry.out_channels * (geometry.in_channels // geometry.groups) * math.prod(
        geometry.kernel_size
    )


def _attrs(view: nx.DiGraph, key: Key) -> Mapping[str, object]:
    return view.nodes[key]


def _check_node(view: nx.DiGraph, key: Key, *, single_user: bool) -> None:
    attrs = _attrs(view, key)
    if attrs.get("refusal"):
        raise Refusal(str(attrs["refusal"]))
    if single_user and attrs.get("users", 1) != 1:
        raise Refusal(f"{attrs.get('name', key)} output is also used elsewhere ({attrs.get('users')} users)")


def _branch(view: nx.DiGraph, key: Key) -> Branch:
    branch = _attrs(view, key).get("branch")
    if branch is None:
        raise Refusal(f"{_attrs(view, key).get('name', key)}: weights are not constants")
    return branch


def _bn(view: nx.DiGraph, key: Key) -> BatchNormParams:
    bn = _attrs(view, key).get("bn")
    if bn is None:
        raise Refusal(f"{_attrs(view, key).get('name', key)}: BatchNorm is not foldable")
    return bn


def _params(view: nx.DiGraph, keys: Sequence[Key]) -> tuple[int, int | None]:
    params, macs = 0, 0
    for key in keys:
        attrs = _attrs(view, key)
        branch, bn = attrs.get("branch"), attrs.get("bn")
        if branch is not None:
            params += branch.weight.numel() + (0 if branch.bias is None else branch.bias.numel())
            m = conv_macs(branch.geometry, attrs.get("spatial"))
            macs = None if m is None or macs is None else macs + m
        if bn is not None:
            params += 2 * bn.num_features
    return params, macs


def _rewrite(
    view: nx.DiGraph, rule: str, kind: str, anchor: Key, output: Key, replaced: Sequence[Key], branch: Branch
) -> Rewrite:
    for w in (branch.weight, branch.bias):
        if w is not None and not bool(w.isfinite().all()):
            raise Refusal("folded weights are not finite (BatchNorm statistics overflow)")
    params, macs = _params(view, replaced)
    return Rewrite(
        rule=rule, kind=kind, name=str(_attrs(view, anchor).get("name", anchor)), anchor=anchor, output=output,
        replaced=tuple(replaced), branch=branch, params_before=params, macs_before=macs,
        macs_after=conv_macs(branch.geometry, _attrs(view, output).get("spatial")),
    )


# --------------------------------------------------------------------------- PSSA spelled out

# Reshape-like nodes walked between the ring conv, its input and the product (the directional
# form multiplies (N, C, |D|, ...) views); a few suffice, the limit only bounds the walk.
_RESHAPE_CHAIN_LIMIT = 8


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
            if len(nxt) != 1 or _attrs(view, nxt[0]).get("kind") != "reshape":
                return
        else:
            if _attrs(view, key).get("kind") != "reshape":
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
    Consumers outside the view (an ONNX ``Shape``: only the value's shape) do not count.
    Correctness never rests on this: the rules only merge convs over the tensors they read,
    and a conv taken for a transform is just left as it is."""
    found: dict[Key, Key] = {}
    for key, attrs in view.nodes(data=True):
        branch = attrs.get("branch")
        if attrs.get("kind") != "conv" or branch is None or pssa_conv_layout(branch) is None:
            continue
        source = branch.inputs[0]
        chain = list(_through_reshapes(view, key, forward=True))
        last = chain[-1]
        products = list(view.successors(last))
        if len(products) != 1 or _attrs(view, products[0]).get("kind") != "mul":
            continue
        product = products[0]
        others = [p for p in view.predecessors(product) if p != last]
        if len(others) == 1 and source in _through_reshapes(view, others[0], forward=False):
            found[key] = product
    return found


def mark_pssa_transforms(view: nx.DiGraph) -> nx.DiGraph:
    """Re-kind each spelled-out PSSA transform's conv and product ``"pssa"`` (in place; returns ``view``)."""
    for conv, product in pssa_products(view).items():
        view.nodes[conv]["kind"] = "pssa"
        view.nodes[product]["kind"] = "pssa"
    return view


# --------------------------------------------------------------------------- the rules


def plan_conv_bn(view: nx.DiGraph, m: dict[str, Key]) -> Rewrite:
    _check_node(view, m["conv"], single_user=True)
    _check_node(view, m["bn"], single_user=False)
    branch = _branch(view, m["conv"])
    try:
        w, b = fold_conv_bn(branch.weight, branch.bias, _bn(view, m["bn"]))
    except FoldError as err:
        raise Refusal(str(err)) from err
    folded = Branch(branch.inputs, branch.channels, branch.geometry, w, b)
    return _rewrite(view, CONV_BN.name, "conv+bn", m["conv"], m["bn"], (m["conv"], m["bn"]), folded)


# Nodes walked to prove one input derived from another. Exported graphs spell PSSA out op by op: a
# directional 3-D transform (26 shifted products) is ~100 ONNX nodes, where FX shows one call.
_DERIVATION_LIMIT = 512
_ATTENTION = {"softmax", "global_attention"}
_LINEAR = {"conv", "conv_like"}


def _derivation_kinds(view: nx.DiGraph, derived: Key, base: Key) -> set[str] | None:
    """Kinds of the nodes computing ``derived`` from ``base`` alone; None if it reads anything else
    (a graph input, or more than ``_DERIVATION_LIMIT`` nodes away)."""
    kinds: set[str] = set()
    stack, seen = [derived], {derived}
    while stack:
        key = stack.pop()
        kind = str(_attrs(view, key).get("kind"))
        if kind == "input":
            return None
        kinds.add(kind)
        for pred in view.predecessors(key):
            if pred == base or pred in seen:
                continue
            if len(seen) >= _DERIVATION_LIMIT:
                return None
            seen.add(pred)
            stack.append(pred)
    if not any(base in view.predecessors(k) for k in seen):
        return None
    return kinds


def _xvolution_base(view: nx.DiGraph, inputs: Sequence[Key]) -> Key | None:
    """The input every other input is computed from by a parameter-free transform (the conv
    branch's x, with T(x) = PSSA(x): an X-volution site), or None for unrelated tensors.

    A transform through softmax is global attention (X-volution (SA)): refused with the reason.
    One through other convolutions is just another layer: the inputs count as unrelated.
    """
    for base in inputs:
        derivations = [_derivation_kinds(view, other, base) for other in inputs if other != base]
        if any(d is None for d in derivations):
            continue
        kinds = set().union(*derivations)
        if kinds & _ATTENTION:
            raise Refusal("global attention is input-dependent, not a convolution")
        if kinds & _LINEAR:
            continue
        return base
    return None


def plan_conv_sum(view: nx.DiGraph, m: dict[str, Key]) -> Rewrite | None:
    a, b = _branch(view, m["a"]), _branch(view, m["b"])
    inputs = list(dict.fromkeys((*a.inputs, *b.inputs)))
    kind = "branch-sum"
    if len(inputs) > 1:
        base = _xvolution_base(view, inputs)
        if base is None:
            return None  # sums of unrelated tensors (residual adds): nothing to gain by concatenating
        if base not in a.inputs:  # the branch reading x goes first: deploy input is [x, T(x)]
            m["a"], m["b"], a, b = m["b"], m["a"], b, a
        # Only the merge that brings T(x) in makes the site; adding a branch to a merged site is a sum.
        if not (set(b.inputs) <= set(a.inputs) or set(a.inputs) <= set(b.inputs)):
            kind = "x-volution"
    for role in ("a", "b"):
        _check_node(view, m[role], single_user=True)
    _check_node(view, m["add"], single_user=False)
    try:
        merged = merge_branches([a, b])
    except FoldError as err:
        raise Refusal(str(err)) from err
    return _rewrite(view, CONV_SUM.name, kind, _main_branch(view, m, a, b, kind), m["add"],
                    (m["a"], m["b"], m["add"]), merged)


def _main_branch(view: nx.DiGraph, m: dict[str, Key], a: Branch, b: Branch, kind: str) -> Key:
    """Which conv the merged one is named after: the branch reading x at an X-volution site,
    else the largest kernel (not an added 1x1), else the shorter name (the site, not its branch)."""
    if kind == "x-volution":
        return m["a"]
    ka, kb = math.prod(a.geometry.kernel_size), math.prod(b.geometry.kernel_size)
    if ka != kb:
        return m["a"] if ka > kb else m["b"]
    name_a, name_b = (str(_attrs(view, m[r]).get("name", m[r])) for r in ("a", "b"))
    return m["a"] if (len(name_a), name_a) <= (len(name_b), name_b) else m["b"]


def _identity_branch(view: nx.DiGraph, conv: Key, x: Key, bn: BatchNormParams | None) -> Branch:
    branch = _branch(view, conv)
    if x not in branch.inputs:
        raise Refusal("identity branch reads a different tensor than the conv")
    channels = branch.channels[branch.inputs.index(x)]
    g = branch.geometry
    ndim = g.ndim
    if channels != g.out_channels:
        raise Refusal(f"identity branch needs C_in == C_out, got {channels} and {g.out_channels}")
    geometry = ConvGeometry(channels, g.out_channels, (1,) * ndim, (1,) * ndim, (0,) * ndim, (1,) * ndim, g.groups)
    if bn is None:
        bn = BatchNormParams(
            running_mean=branch.weight.new_zeros(channels), running_var=branch.weight.new_ones(channels),
            weight=None, bias=None, eps=0.0,
        )
    w, b = bn_as_kernel(bn, g.groups, (1,) * ndim, (0,) * ndim, branch.weight.dtype)
    return Branch((x,), (channels,), geometry, w, b)


def plan_bn_sum(view: nx.DiGraph, m: dict[str, Key]) -> Rewrite:
    _check_node(view, m["conv"], single_user=True)
    _check_node(view, m["bn"], single_user=True)
    _check_node(view, m["add"], single_user=False)
    ident = _identity_branch(view, m["conv"], m["x"], _bn(view, m["bn"]))
    try:
        merged = merge_branches([_branch(view, m["conv"]), ident])
    except FoldError as err:
        raise Refusal(str(err)) from err
    return _rewrite(view, BN_SUM.name, "branch-sum", m["conv"], m["add"], (m["conv"], m["bn"], m["add"]), merged)


def plan_identity_sum(view: nx.DiGraph, m: dict[str, Key]) -> Rewrite:
    _check_node(view, m["conv"], single_user=True)
    _check_node(view, m["add"], single_user=False)
    ident = _identity_branch(view, m["conv"], m["x"], None)
    try:
        merged = merge_branches([_branch(view, m["conv"]), ident])
    except FoldError as err:
        raise Refusal(str(err)) from err
    return _rewrite(view, IDENTITY_SUM.name, "identity-branch", m["conv"], m["add"], (m["conv"], m["add"]), merged)


# Order matters only for speed: BN folds first, so sums see plain convs.
RULES: tuple[Rule, ...] = (
    Rule(CONV_BN, plan_conv_bn),
    Rule(CONV_SUM, plan_conv_sum),
    Rule(BN_SUM, plan_bn_sum),
    Rule(IDENTITY_SUM, plan_identity_sum),
)


# --------------------------------------------------------------------------- driver


@dataclass
class RewriteLog:
    applied: list[Rewrite] = field(default_factory=list)
    refused: list[Outcome] = field(default_factory=list)

    def outcomes(self) -> list[Outcome]:
        done = [
            Outcome(r.kind, r.name, "fused", "", r.params_before, r.params_after, r.macs_before, r.macs_after)
            for r in self.applied
        ]
        return done + self.refused


def run_rules(adapter: GraphAdapter, rules: Sequence[Rule] = RULES, max_rounds: int = 10_000) -> RewriteLog:
    """Apply ``rules`` until none matches. Each round applies a batch of disjoint
    rewrites of one rule, then rebuilds the view. A refused match is not tried
    again, and a refusal is reported once per (rule, site, reason): a shared conv
    or a conv with two consumers matches once per call or consumer, but is one site."""
    log = RewriteLog()
    refused: set[tuple[str, frozenset[Key]]] = set()
    reported: set[tuple[str, str, str]] = set()
    for _ in range(max_rounds):
        view = mark_pssa_transforms(adapter.view())
        batch: list[Rewrite] = []
        for rule in rules:
            taken: set[Key] = set()  # nodes the batch replaces
            read: set[Key] = set()  # values the batch's new convs read
            for m in rule.pattern.matches(view):
                nodes = frozenset(m.values())
                key = (rule.pattern.name, nodes)
                if key in refused or nodes & taken or nodes & read:
                    continue
                try:
                    rewrite = rule.plan(view, dict(m))
                except Refusal as why:
                    refused.add(key)
                    anchor = m.get("conv", m.get("a"))
                    line = (rule.pattern.name, str(_attrs(view, anchor).get("name", anchor)), str(why))
                    if line not in reported:
                        reported.add(line)
                        log.refused.append(Outcome(line[0], line[1], "refused", line[2]))
                    continue
                if rewrite is None:
                    refused.add(key)
                    continue
                if set(rewrite.branch.inputs) & taken:
                    continue  # reads a value another rewrite of this batch replaces: next round
                taken |= nodes
                read |= set(rewrite.branch.inputs)
                batch.append(rewrite)
            if batch:
                break
        if not batch:
            return log
        for rewrite in batch:
            adapter.apply(rewrite)
        log.applied.extend(batch)
    raise RuntimeError(f"rewriting did not reach a fixpoint in {max_rounds} rounds")


class ViewAdapter:
    """An adapter over a networkx view alone: applying a rewrite changes the view, nothing else.

    Runs the rules to their fixpoint without touching a graph, to learn what a pass would do
    (the module form lists the rewrites only the graph form can make)."""

    def __init__(self, view: nx.DiGraph) -> None:
        self._view = view
        self._count = 0

    def view(self) -> nx.DiGraph:
        return self._view

    def apply(self, rewrite: Rewrite) -> None:
        view = self._view
        self._count += 1
        new = ("fused", self._count)
        out = _attrs(view, rewrite.output)
        view.add_node(new, kind="conv", branch=rewrite.branch, name=rewrite.name, users=out.get("users", 1),
                      refusal=None, spatial=out.get("spatial"))
        for src in rewrite.branch.inputs:
            view.add_edge(src, new)
        for succ in list(view.successors(rewrite.output)):
            view.add_edge(new, succ)
            branch = _attrs(view, succ).get("branch")
            if branch is not None and rewrite.output in branch.inputs:
                inputs = tuple(new if k == rewrite.output else k for k in branch.inputs)
                view.nodes[succ]["branch"] = dataclasses.replace(branch, inputs=inputs)
        view.remove_nodes_from(rewrite.replaced)
