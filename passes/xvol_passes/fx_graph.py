"""torch.fx adapter for the shared rewrite rules: a GraphModule as the rules' networkx view
(``xvol_passes.fx_read``), and ``Rewrite`` values applied back to the graph (``xvol_passes.fx_emit``).

``FxAdapter`` implements ``xvol_compiler.rules.GraphAdapter``; ``hoist_ring_kernels`` prepares a
traced graph (PSSA ring kernels as buffers of the root) before the rules run.
"""

from __future__ import annotations

import torch
from torch import fx

from xvol_compiler.fold import Branch
from xvol_compiler.pssa import PSSA_RING, pssa_transform
from xvol_compiler.rules import Key, Lowering, Shape, node_info
from xvol_passes.fx_emit import FxGraphEmitter
from xvol_passes.fx_read import as_node

__all__ = ["FxAdapter", "hoist_ring_kernels"]


def hoist_ring_kernels(gm: fx.GraphModule) -> int:
    """Move the PSSA ring kernels that ``pssa_transform`` calls read (``kernel=`` a ``get_attr`` of a
    site's ``pssa_ring`` buffer) to non-persistent buffers of ``gm`` itself, one per distinct kernel:
    ``pssa_ring``, ``pssa_ring_1``, ... (in place; returns how many calls were retargeted).

    A site's path then holds only its parameters, so the conv that replaces the site can take the
    site's name (a buffer left under it would push the new conv to ``<site>_fused1``), and no
    kernel key appears in the state_dict."""
    kernels: list[tuple[str, torch.Tensor]] = []
    retargeted = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not pssa_transform:
            continue
        old = node.kwargs.get("kernel")
        if not isinstance(old, fx.Node) or old.op != "get_attr" or not str(old.target).endswith(PSSA_RING):
            continue
        owner_path, _, field = str(old.target).rpartition(".")
        owner = gm.get_submodule(owner_path) if owner_path else gm
        value = owner._buffers.get(field)
        if value is None:
            continue
        name = next((n for n, t in kernels if t.shape == value.shape and t.dtype == value.dtype
                     and t.device == value.device and bool(torch.equal(t, value))), None)
        if name is None:
            name = PSSA_RING if not kernels else f"{PSSA_RING}_{len(kernels)}"
            while hasattr(gm, name):
                name += "_"
            gm.register_buffer(name, value, persistent=False)
            kernels.append((name, value))
        with gm.graph.inserting_before(old):
            new = gm.graph.get_attr(name)
        new.meta = dict(old.meta)
        node.update_kwarg("kernel", new)
        retargeted += 1
        if not old.users:
            gm.graph.erase_node(old)
            if not any(n.op == "get_attr" and n.target == old.target for n in gm.graph.nodes):
                del owner._buffers[field]
                owner._non_persistent_buffers_set.discard(field)
    if retargeted:
        gm.recompile()
    return retargeted


class FxAdapter(FxGraphEmitter):
    """Presents ``gm.graph`` to ``rules.run_rules`` and applies its rewrites in place."""

    asymmetric_pads = False  # a torch conv pads both sides alike

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.created = {}
        self.replaced_targets = set()
        self.origin = {}
        self.lowered = {}

    def sites(self) -> list[tuple[Key, Branch]]:
        """The multi-input convs this adapter created (fused X-volution sites), with their merged branch."""
        view = self.view()
        found: list[tuple[Key, Branch]] = []
        for node in self.created:
            branch = node_info(view, node).branch if node in view.nodes else None
            if branch is not None:
                found.append((node, branch))
        return found

    def site_name(self, key: Key) -> str:
        node = as_node(key)
        return self.origin.get(node) or self._name(node)

    def input_shape(self, branch: Branch) -> Shape | None:
        meta = getattr(branch.inputs[0], "meta", {}).get("tensor_meta")
        shape = getattr(meta, "shape", None)
        return None if shape is None else tuple(int(d) for d in shape)

    def lowering_refusal(self, branch: Branch, lowering: Lowering) -> str | None:
        return None  # every exact lowering can be emitted in a GraphModule
