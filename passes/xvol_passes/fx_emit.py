"""Emitting rewrites into a torch.fx graph: the emitting half of ``FxAdapter`` (``xvol_passes.fx_graph``).

A rewrite becomes new ``call_module`` convs (one per input for the "split" lowering) over the
interleave of the branch's inputs, inserted before the value it replaces; the replaced nodes and
the constants left dead are erased, and the new conv takes its site's module path once free.
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import fx

from xvol_compiler.deploy import lowered_convs
from xvol_compiler.errors import XvolError
from xvol_compiler.fold import Branch, FoldError
from xvol_compiler.lowering import spatial_axis
from xvol_compiler.pssa import interleave_groups, interleave_spatial, stack_depth
from xvol_compiler.rules import Key, Lowering, Rewrite
from xvol_passes.fx_read import FxGraphReader, as_node

__all__ = ["FxGraphEmitter", "FxRewriteError"]


class FxRewriteError(XvolError, RuntimeError):
    """A planned rewrite does not fit the torch.fx graph as it is (the graph and its view disagree)."""


class FxGraphEmitter(FxGraphReader):
    """Applies rewrites to ``gm.graph`` in place (reading constants through the reading half)."""

    replaced_targets: set[str]
    # Lowering each created multi-input conv was emitted in.
    lowered: dict[fx.Node, str]

    def _owned_target(self, anchor: fx.Node) -> str:
        """The module path the new conv takes: the anchor conv's own (or its XVolution's) path."""
        if anchor.op == "call_module":
            return str(anchor.target)
        w = anchor.args[1] if len(anchor.args) > 1 else anchor.kwargs["weight"]
        return (self._param_owner(w, anchor) if isinstance(w, fx.Node) else None) or ""

    def apply(self, rewrite: Rewrite) -> fx.Node:
        """Replace ``rewrite.replaced`` by the conv(s) of ``rewrite.branch``; the (first) new conv node."""
        lowering = rewrite.lowering if len(rewrite.branch.inputs) > 1 else "channel"
        return self._emit(as_node(rewrite.anchor), as_node(rewrite.output), rewrite.replaced, rewrite.branch,
                          lowering)

    def relower(self, key: Key, branch: Branch, lowering: Lowering) -> fx.Node:
        """Emit the created conv ``key`` (of ``branch``) again in ``lowering``; the new conv node."""
        node = as_node(key)
        return self._emit(node, node, (node,), branch, lowering)

    def _emit(self, anchor: fx.Node, output: fx.Node, replaced: Sequence[object], branch: Branch,
              lowering: Lowering) -> fx.Node:
        graph = self.gm.graph
        g = branch.geometry
        sources = tuple(as_node(key) for key in branch.inputs)
        # (The caller has checked the lowering is allowed; refusing here would leave the graph half-rewritten.)
        convs, layout = lowered_convs(branch, lowering, single_conv=False)
        memory_format = self._memory_format(anchor)
        if memory_format is not None:  # the site's weight layout (channels_last) is kept for the fused convs
            with torch.no_grad():
                for module in convs:
                    module.weight.data = module.weight.data.contiguous(memory_format=memory_format)
        owner = self.origin.get(anchor) or self._owned_target(anchor)
        name = (owner or "fused_conv").replace(".", "_")
        conv_nodes: list[fx.Node] = []
        with graph.inserting_before(output):
            if lowering == "channel":
                if len(sources) == 1:
                    inp = sources[0]
                else:
                    inp = graph.call_function(interleave_groups, (list(sources), g.groups))
                    inp.meta["is_wrapped"] = True  # codegen emits fx.wrap, so the result traces again as one node
                conv_nodes.append(graph.create_node("call_module", "__pending__", (inp,), name=name))
            elif lowering == "stack" or spatial_axis(lowering) is not None:
                parts = list(sources)
                if layout is not None and layout.pre_pads is not None:
                    flat = [p for pair in reversed(layout.pre_pads) for p in pair]
                    mode = "constant" if layout.pre_mode == "zeros" else layout.pre_mode
                    parts = [graph.call_function(F.pad, (s_, flat), {"mode": mode}) for s_ in parts]
                if lowering == "stack":
                    inp = graph.call_function(stack_depth, (parts,))
                else:
                    inp = graph.call_function(interleave_spatial, (parts, spatial_axis(lowering)))
                inp.meta["is_wrapped"] = True
                conv_nodes.append(graph.create_node("call_module", "__pending__", (inp,), name=name))
            else:  # split: one conv per input and their sum
                for i, src in enumerate(sources):
                    conv_nodes.append(graph.create_node("call_module", "__pending__", (src,),
                                                        name=name if i == 0 else f"{name}_attn"))
            new = conv_nodes[0]
            if lowering == "stack":  # the stacked axis has size 1 after the conv
                new = graph.call_method("squeeze", (new, 2))
            for extra in conv_nodes[1:]:
                new = graph.call_function(operator.add, (new, extra))
        new.meta = {k: v for k, v in output.meta.items() if k in ("tensor_meta", "nn_module_stack", "val")}
        output.replace_all_uses_with(new)
        # Interleaved convs created earlier may read the value just replaced: keep their inputs current.
        for conv_node, (srcs, channels) in list(self.created.items()):
            if output in srcs:
                self.created[conv_node] = (tuple(new if s is output else s for s in srcs), channels)
        self._erase(replaced)
        # The new conv takes the anchor's module path once nothing else uses it.
        for i, (node, module) in enumerate(zip(conv_nodes, convs, strict=True)):
            path = owner if i == 0 else f"{owner or 'fused_conv'}_attn"
            node.target = self._free_target(path)
            self.gm.add_submodule(str(node.target), module)
            self.origin[node] = path
        if len(sources) > 1 and lowering == "channel":
            self.created[conv_nodes[0]] = (sources, branch.channels)
        if len(sources) > 1:
            self.lowered[conv_nodes[0]] = lowering
        return conv_nodes[0]

    def _memory_format(self, anchor: fx.Node) -> torch.memory_format | None:
        """``channels_last`` (``channels_last_3d``) when the anchor conv's weight is stored so, else None."""
        w: object
        try:
            if anchor.op == "call_module":
                w = self.gm.get_submodule(str(anchor.target)).weight
            else:
                w_node = anchor.args[1] if len(anchor.args) > 1 else anchor.kwargs["weight"]
                if not isinstance(w_node, fx.Node):
                    return None
                w = self._fetch(str(w_node.target))
        except (AttributeError, KeyError):
            return None
        if not isinstance(w, torch.Tensor):
            return None
        layouts = {4: torch.channels_last, 5: torch.channels_last_3d}
        layout = layouts.get(w.dim())
        if layout is None or w.is_contiguous() or not w.is_contiguous(memory_format=layout):
            return None
        return layout

    def _free_target(self, target: str) -> str:
        used = {str(n.target) for n in self.gm.graph.nodes if n.op in ("call_module", "get_attr")}
        if target and not any(u == target or u.startswith(target + ".") for u in used):
            return target
        base = target or "fused_conv"
        for i in range(1, 100_000):
            candidate = f"{base}_fused{i}"
            if candidate not in used and not self._exists(candidate):
                return candidate
        raise FxRewriteError(f"no free module name near {base!r}")

    def _exists(self, target: str) -> bool:
        try:
            self.gm.get_submodule(target)
        except AttributeError:
            return False
        return True

    def _erase(self, nodes: Sequence[object]) -> None:
        """Erase the replaced nodes (users first), then get_attr/interleave inputs left dead."""
        graph = self.gm.graph
        pending = [n for n in nodes if isinstance(n, fx.Node)]
        order = {n: i for i, n in enumerate(graph.nodes)}
        for node in sorted(pending, key=lambda n: -order[n]):
            if node.users:
                raise FxRewriteError(f"cannot erase {node}: still used by {list(node.users)}")
            inputs = list(node.all_input_nodes)
            if node.op == "call_module":
                self.replaced_targets.add(str(node.target))
            graph.erase_node(node)
            self.created.pop(node, None)
            self.origin.pop(node, None)
            self.lowered.pop(node, None)
            for inp in inputs:
                if inp.op == "call_function" and inp.target in (interleave_groups, interleave_spatial, stack_depth):
                    if not inp.users:
                        graph.erase_node(inp)
                else:
                    self._erase_dead_constant(inp)

    def _erase_dead_constant(self, node: fx.Node) -> None:
        """Erase a constant nothing reads any more (a get_attr, or a weight computation) and its dead inputs."""
        erased: set[fx.Node] = set()
        stack = [node]
        while stack:
            n = stack.pop()
            if n in erased or n.users or self._constant_roots(n) is None:
                continue
            stack.extend(n.all_input_nodes)
            # A parameter tied to a module still called (read here under that module's name) stays with it.
            if n.op == "get_attr" and not self._module_called(str(n.target).rpartition(".")[0]):
                self.replaced_targets.add(str(n.target))
            self.gm.graph.erase_node(n)
            erased.add(n)

    def finalize(self) -> fx.GraphModule:
        """Give fused convs their site's path where it is free, drop modules nothing calls, recompile."""
        for node, owner in self.origin.items():
            if node.target != owner and owner and self._free_target(owner) == owner:
                module = self.gm.get_submodule(str(node.target))
                self.gm.delete_submodule(str(node.target))
                self.replaced_targets.add(str(node.target))
                node.target = owner
                self.gm.add_submodule(owner, module)
        self.gm.delete_all_unused_submodules()
        # A rewrite emits its nodes before the value it replaces; where a site's inputs are defined later
        # than one of its branches, a stable topological order puts every node after its inputs.
        _place_after_inputs(self.gm.graph)
        self.gm.graph.lint()
        self.gm.recompile()
        return self.gm


def _place_after_inputs(graph: fx.Graph) -> None:
    """Reorder ``graph`` so that every node comes after its inputs, keeping the order otherwise
    (a stable topological sort, in place). A rewrite emits its nodes before the value it replaces;
    a site whose T(x) is computed after its conv branch reads inputs defined later than that."""
    order = list(graph.nodes)
    placed: set[fx.Node] = set()
    result: list[fx.Node] = []
    pending = order
    while pending:
        waiting = []
        for node in pending:
            if all(i in placed for i in node.all_input_nodes):
                result.append(node)
                placed.add(node)
            else:
                waiting.append(node)
        if len(waiting) == len(pending):
            raise FoldError(f"the rewritten graph has a cycle through {waiting[0].name}")
        pending = waiting
    if result != order:
        for before, node in itertools.pairwise(result):
            before.append(node)
