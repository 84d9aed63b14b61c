"""torch.fx adapter for the shared rewrite rules: a GraphModule as the rules' networkx view,
and ``Rewrite`` values applied back to the graph.

Convolutions are recognised both as ``call_module`` (``nn.Conv1d/2d/3d``) and as
``call_function`` (``F.conv*d`` / ``torch.conv*d`` on ``get_attr`` weights, which is
how an ``XVolution``'s own conv branch traces). A conv reading an
``interleave_groups`` node is presented as one multi-input branch, so fused
convolutions keep taking part in later rewrites.
"""

from __future__ import annotations

import operator
from collections import Counter
from collections.abc import Sequence

import networkx as nx
import torch
import torch.nn.functional as F
from torch import fx, nn

from xvol_compiler.fold import Branch, ConvGeometry, FoldError
from xvol_compiler.ops import (
    bn_params,
    conv_geometry,
    interleave_groups,
    interleave_spatial,
    lowered_convs,
    padded_conv,
    pssa_transform,
)
from xvol_compiler.rules import Rewrite

__all__ = ["FxAdapter"]

_CONV_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_FUNCTIONS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3, torch.conv1d: 1, torch.conv2d: 2, torch.conv3d: 3}
_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
_SOFTMAX = {F.softmax, torch.softmax, F.scaled_dot_product_attention}
_LINEAR = {torch.matmul, torch.bmm, F.linear, torch.einsum, operator.matmul}


def _tuple(value: object, ndim: int) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * ndim
    return tuple(int(v) for v in value)  # type: ignore[union-attr]


def _spatial(node: fx.Node) -> int | None:
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    if shape is None or len(shape) < 3:
        return None
    out = 1
    for s in shape[2:]:
        out *= int(s)
    return out


def _channels(node: fx.Node) -> int | None:
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    return None if shape is None or len(shape) < 2 else int(shape[1])


class FxAdapter:
    """Presents ``gm.graph`` to ``rules.run_rules`` and applies its rewrites in place."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        # Inputs of the interleaved convs this adapter created: (sources, channels).
        self.created: dict[fx.Node, tuple[tuple[fx.Node, ...], tuple[int, ...]]] = {}
        self.replaced_targets: set[str] = set()
        # Module path each created conv stands for (its site), while it may live under a temporary name.
        self.origin: dict[fx.Node, str] = {}
        # Lowering each created multi-input conv was emitted in, and the X-volution site it carries.
        self.lowered: dict[fx.Node, str] = {}
        self.site_names: dict[fx.Node, tuple[str, ...]] = {}

    # ------------------------------------------------------------------ view

    def view(self) -> nx.DiGraph:
        graph = self.gm.graph
        modules = dict(self.gm.named_modules())
        calls = Counter(n.target for n in graph.nodes if n.op in ("call_module", "get_attr"))
        view = nx.DiGraph()
        for node in graph.nodes:
            attrs: dict[str, object] = {"name": self._name(node), "users": len(node.users), "refusal": None,
                                        "spatial": _spatial(node)}
            kind, inputs = self._classify(node, modules, calls, attrs)
            attrs["kind"] = kind
            view.add_node(node, **attrs)
            for src in inputs:
                view.add_edge(src, node)
        return view

    def _name(self, node: fx.Node) -> str:
        if node in self.origin:
            return self.origin[node]
        if node.op == "call_module":
            return str(node.target)
        if node.op == "call_function" and (node.target in _CONV_FUNCTIONS or node.target is padded_conv):
            w = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
            if isinstance(w, fx.Node) and w.op == "get_attr":
                return str(w.target).rsplit(".", 1)[0] if "." in str(w.target) else "<root>"
        stack = node.meta.get("nn_module_stack")
        if stack:
            return f"{next(reversed(stack))}:{node.name}"
        return node.name

    def _classify(
        self, node: fx.Node, modules: dict[str, nn.Module], calls: Counter, attrs: dict[str, object]
    ) -> tuple[str, Sequence[fx.Node]]:
        data_inputs = list(node.all_input_nodes)
        if node.op == "placeholder":
            return "input", []
        if node.op == "call_module":
            module = modules[str(node.target)]
            if calls[node.target] > 1:
                attrs["refusal"] = (
                    f"module {node.target} is called {calls[node.target]} times; folding it would change every call"
                )
            if isinstance(module, _CONV_MODULES):
                return self._conv_module(node, module, attrs)
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                try:
                    attrs["bn"] = bn_params(module)
                except FoldError as err:
                    attrs["bn"], attrs["refusal"] = None, f"{node.target}: {err}"
                return "bn", data_inputs
            if isinstance(module, (nn.Linear, nn.MultiheadAttention)):
                return "conv_like", data_inputs
            if isinstance(module, nn.Softmax):
                return "softmax", data_inputs
            return "other", data_inputs
        if node.op == "call_function":
            target = node.target
            if target in _CONV_FUNCTIONS or target is padded_conv:
                return self._conv_function(node, calls, attrs)
            if target in _ADD_FUNCTIONS and self._is_plain_add(node):
                return "add", data_inputs
            if target is pssa_transform:
                return "pssa", data_inputs
            if target in _SOFTMAX:
                return "softmax", data_inputs
            if target in _LINEAR:
                return "conv_like", data_inputs
            return "other", data_inputs
        if node.op == "call_method":
            if node.target in ("add", "add_") and self._is_plain_add(node):
                return "add", data_inputs
            if node.target == "softmax":
                return "softmax", data_inputs
            return "other", data_inputs
        return "other", data_inputs

    @staticmethod
    def _is_plain_add(node: fx.Node) -> bool:
        """x + y of two graph values, no alpha, no scalar operand."""
        args = node.args[:2]
        return (
            len(node.args) == 2
            and all(isinstance(a, fx.Node) for a in args)
            and args[0] is not args[1]
            and not node.kwargs
        )

    def _sources(self, node: fx.Node, in_channels: int) -> tuple[tuple[fx.Node, ...], tuple[int, ...]]:
        inp = node.args[0]
        if not isinstance(inp, fx.Node):
            raise FoldError("conv input is not a graph value")
        if node in self.created:
            return self.created[node]
        if (
            inp.op == "call_function"
            and inp.target is interleave_groups
            and len(inp.users) == 1
        ):
            sources = tuple(inp.args[0])
            channels = tuple(_channels(s) for s in sources)
            if all(c is not None for c in channels) and sum(channels) == in_channels:  # type: ignore[arg-type]
                return sources, channels  # type: ignore[return-value]
        return (inp,), (in_channels,)

    def _conv_module(
        self, node: fx.Node, module: nn.Module, attrs: dict[str, object]
    ) -> tuple[str, Sequence[fx.Node]]:
        geometry = conv_geometry(module)
        sources, channels = self._sources(node, geometry.in_channels)
        attrs["branch"] = Branch(sources, channels, geometry, module.weight.detach(),
                                 None if module.bias is None else module.bias.detach())
        return "conv", sources

    def _conv_function(self, node: fx.Node, calls: Counter, attrs: dict[str, object]) -> tuple[str, Sequence[fx.Node]]:
        names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups", "padding_mode")
        defaults: dict[str, object] = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1,
                                       "padding_mode": "zeros"}
        args = dict(zip(names, node.args, strict=False))
        args.update(node.kwargs)
        for key, value in defaults.items():
            args.setdefault(key, value)
        weight, bias = args["weight"], args["bias"]
        const = [weight] + ([bias] if bias is not None else [])
        if not all(isinstance(v, fx.Node) and v.op == "get_attr" for v in const):
            attrs["branch"] = None
            return "conv", list(node.all_input_nodes)
        for v in const:
            if calls[v.target] > 1:
                attrs["refusal"] = f"parameter {v.target} is read by {calls[v.target]} nodes"
        w = self._fetch(str(weight.target))
        b = None if bias is None else self._fetch(str(bias.target))
        ndim = w.dim() - 2
        padding = args["padding"] if isinstance(args["padding"], str) else _tuple(args["padding"], ndim)
        geometry = ConvGeometry(
            in_channels=w.shape[1] * int(args["groups"]), out_channels=w.shape[0], kernel_size=tuple(w.shape[2:]),
            stride=_tuple(args["stride"], ndim), padding=padding, dilation=_tuple(args["dilation"], ndim),
            groups=int(args["groups"]), padding_mode=str(args["padding_mode"]),
        )
        sources, channels = self._sources(node, geometry.in_channels)
        attrs["branch"] = Branch(sources, channels, geometry, w.detach(), None if b is None else b.detach())
        return "conv", sources

    def _fetch(self, target: str) -> torch.Tensor:
        obj: object = self.gm
        for part in target.split("."):
            obj = getattr(obj, part)
        return obj  # type: ignore[return-value]

    # ------------------------------------------------------------------ apply

    def _owned_target(self, anchor: fx.Node) -> str:
        """The module path the new conv takes: the anchor conv's own (or its XVolution's) path."""
        if anchor.op == "call_module":
            return str(anchor.target)
        w = anchor.args[1] if len(anchor.args) > 1 else anchor.kwargs["weight"]
        return str(w.target).rsplit(".", 1)[0] if "." in str(w.target) else ""

    def apply(self, rewrite: Rewrite) -> None:
        graph = self.gm.graph
        output: fx.Node = rewrite.output  # type: ignore[assignment]
        branch = rewrite.branch
        g = branch.geometry
        sources = tuple(branch.inputs)
        lowering = rewrite.lowering if len(sources) > 1 else "channel"
        # (The caller has checked the lowering is allowed; refusing here would leave the graph half-rewritten.)
        convs, layout = lowered_convs(branch, lowering, single_conv=False)
        anchor: fx.Node = rewrite.anchor  # type: ignore[assignment]
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
            elif lowering == "spatial":
                parts = list(sources)
                if layout is not None and layout.pre_pads is not None:
                    flat = [p for pair in reversed(layout.pre_pads) for p in pair]
                    mode = "constant" if layout.pre_mode == "zeros" else layout.pre_mode
                    parts = [graph.call_function(F.pad, (s_, flat), {"mode": mode}) for s_ in parts]
                inp = graph.call_function(interleave_spatial, (parts,))
                inp.meta["is_wrapped"] = True
                conv_nodes.append(graph.create_node("call_module", "__pending__", (inp,), name=name))
            else:  # split: one conv per input and their sum
                for i, src in enumerate(sources):
                    conv_nodes.append(graph.create_node("call_module", "__pending__", (src,),
                                                        name=name if i == 0 else f"{name}_attn"))
            new = conv_nodes[0]
            for extra in conv_nodes[1:]:
                new = graph.call_function(operator.add, (new, extra))
        new.meta = {k: v for k, v in output.meta.items() if k in ("tensor_meta", "nn_module_stack", "val")}
        output.replace_all_uses_with(new)
        # Interleaved convs created earlier may read the value just replaced: keep their inputs current.
        for conv_node, (srcs, channels) in list(self.created.items()):
            if output in srcs:
                self.created[conv_node] = (tuple(new if s is output else s for s in srcs), channels)
        self._erase(rewrite.replaced)
        # The new conv takes the anchor's module path once nothing else uses it.
        for i, (node, module) in enumerate(zip(conv_nodes, convs, strict=True)):
            path = owner if i == 0 else f"{owner or 'fused_conv'}_attn"
            node.target = self._free_target(path)
            self.gm.add_submodule(str(node.target), module)
            self.origin[node] = path
        carried = [name for k in rewrite.replaced for name in self.site_names.pop(k, ())]
        if rewrite.kind == "x-volution" and rewrite.rule != "lowering":
            carried.append(rewrite.name)
        if carried and len(sources) > 1:
            self.site_names[conv_nodes[0]] = tuple(carried)  # the sites this conv carries, whatever its name
        if len(sources) > 1 and lowering == "channel":
            self.created[conv_nodes[0]] = (sources, branch.channels)  # type: ignore[assignment]
        if len(sources) > 1:
            self.lowered[conv_nodes[0]] = lowering

    def sites(self) -> list[tuple[fx.Node, Branch]]:
        """The multi-input convs this adapter created (fused X-volution sites), with their merged branch."""
        view = self.view()
        return [(node, view.nodes[node]["branch"]) for node in self.created if node in view.nodes
                and view.nodes[node].get("branch") is not None]

    def _free_target(self, target: str) -> str:
        used = {str(n.target) for n in self.gm.graph.nodes if n.op in ("call_module", "get_attr")}
        if target and not any(u == target or u.startswith(target + ".") for u in used):
            return target
        base = target or "fused_conv"
        for i in range(1, 100_000):
            candidate = f"{base}_fused{i}"
            if candidate not in used and not self._exists(candidate):
                return candidate
        raise RuntimeError(f"no free module name near {base!r}")

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
                raise RuntimeError(f"cannot erase {node}: still used by {list(node.users)}")
            inputs = list(node.all_input_nodes)
            if node.op == "call_module":
                self.replaced_targets.add(str(node.target))
            graph.erase_node(node)
            self.created.pop(node, None)
            self.origin.pop(node, None)
            self.lowered.pop(node, None)
            for inp in inputs:
                dead_helper = inp.op == "get_attr" or (
                    inp.op == "call_function" and inp.target in (interleave_groups, interleave_spatial)
                )
                if dead_helper and not inp.users:
                    if inp.op == "get_attr":
                        self.replaced_targets.add(str(inp.target))
                    graph.erase_node(inp)

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
        self.gm.graph.lint()
        self.gm.recompile()
        return self.gm
