"""An adapter over a networkx view alone: what a pass would do, without touching a graph."""

from __future__ import annotations

import dataclasses

import networkx as nx

from xvol_compiler.rules.types import Key, NodeInfo, Rewrite, add_node, node_info, set_info

__all__ = ["ViewAdapter"]


class ViewAdapter:
    """Applying a rewrite changes the view, nothing else.

    Runs the rules to their fixpoint without touching a graph, to learn what a pass would do
    (the module form lists the rewrites only the graph form can make)."""

    def __init__(self, view: nx.DiGraph) -> None:
        self._view = view
        self._count = 0

    def view(self) -> nx.DiGraph:
        return self._view

    def apply(self, rewrite: Rewrite) -> Key:
        view = self._view
        self._count += 1
        new = ("fused", self._count)
        out = node_info(view, rewrite.output)
        add_node(view, new, NodeInfo(kind="conv", name=rewrite.name, users=out.users, spatial=out.spatial,
                                     branch=rewrite.branch))
        for src in rewrite.branch.inputs:
            view.add_edge(src, new)
        for succ in list(view.successors(rewrite.output)):
            view.add_edge(new, succ)
            branch = node_info(view, succ).branch
            if branch is not None and rewrite.output in branch.inputs:
                inputs = tuple(new if k == rewrite.output else k for k in branch.inputs)
                set_info(view, succ, branch=dataclasses.replace(branch, inputs=inputs))
        view.remove_nodes_from(rewrite.replaced)
        return new
