"""The contract between the rule engine (and the lowering pass) and a graph adapter.

``RewriteTarget`` is what ``run_rules`` needs; ``GraphAdapter`` is everything the passes
reach on an adapter (``passes/xvol_passes``: the torch.fx and ONNX adapters implement it).
"""

from __future__ import annotations

from typing import Protocol, TypeVar

import networkx as nx

from xvol_compiler.fold import Branch
from xvol_compiler.rules.types import Key, Lowering, Rewrite

__all__ = ["GraphAdapter", "RewriteTarget", "Shape"]

Shape = tuple[int | str | None, ...]
Result = TypeVar("Result", covariant=True)


class RewriteTarget(Protocol):
    def view(self) -> nx.DiGraph:
        """A fresh view of the graph as it is now (``xvol_compiler.rules.types``)."""
        ...

    def apply(self, rewrite: Rewrite) -> Key:
        """Replace ``rewrite.replaced`` by one conv of ``rewrite.branch``; the new conv's view key."""
        ...


class GraphAdapter(RewriteTarget, Protocol[Result]):
    # Whether the graph writes a conv's (begin, end) pads apart: the lowering check allows asymmetric pads.
    asymmetric_pads: bool

    def sites(self) -> list[tuple[Key, Branch]]:
        """The multi-input convs this adapter created (fused X-volution sites), with their merged branch."""
        ...

    def site_name(self, key: Key) -> str:
        """What reports call the conv ``key``."""
        ...

    def input_shape(self, branch: Branch) -> Shape | None:
        """The shape of ``branch``'s first input, when known."""
        ...

    def lowering_refusal(self, branch: Branch, lowering: Lowering) -> str | None:
        """Why this graph cannot emit ``lowering`` for ``branch`` beyond the math (None: it can)."""
        ...

    def relower(self, key: Key, branch: Branch, lowering: Lowering) -> Key:
        """Emit the site ``key`` (a created conv of ``branch``) again in ``lowering``; its new key."""
        ...

    def finalize(self) -> Result:
        """The rewritten graph, ready to use."""
        ...
