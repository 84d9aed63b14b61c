"""Patterns: small DiGraphs of roles with required node kinds, matched on structure alone.

Patterns are matched with ``DiGraphMatcher`` subgraph monomorphisms on node kinds, never on
node names. Edges are unordered pairs of values, so ``add`` matches with its operands in
either order; n-ary sums reduce pairwise to a fixpoint.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import networkx as nx
from networkx.algorithms.isomorphism import DiGraphMatcher

from xvol_compiler.rules.types import INFO, Key, Kind

__all__ = ["BN_SUM", "CONV_BN", "CONV_SUM", "IDENTITY_SUM", "Match", "Pattern", "pattern"]

Match = dict[str, Key]  # role -> view node


@dataclass(frozen=True)
class Pattern:
    """A small DiGraph of role names; each role has a required ``kind`` (None: any node)."""

    name: str
    graph: nx.DiGraph

    def matches(self, view: nx.DiGraph) -> Iterator[Match]:
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
    return want is None or getattr(view_attrs.get(INFO), "kind", None) == want


def pattern(name: str, roles: Mapping[str, Kind | None], edges: Sequence[tuple[str, str]]) -> Pattern:
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
