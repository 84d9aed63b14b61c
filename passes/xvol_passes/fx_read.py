"""Reading a torch.fx graph as the rule engine's view (``xvol_compiler.rules``): the reading half
of ``FxAdapter`` (``xvol_passes.fx_graph``).

Convolutions are recognised both as ``call_module`` (``nn.Conv1d/2d/3d``) and as
``call_function`` (``F.conv*d`` / ``torch.conv*d`` on ``get_attr`` weights, which is
how an ``XVolution``'s own conv branch traces; or on weights computed from
parameters alone, which is how a weight-standardized conv traces: that
computation is evaluated once, in float64). A conv reading an
``interleave_groups`` node is presented as one multi-input branch, so fused
convolutions keep taking part in later rewrites.
"""

from __future__ import annotations

import operator
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any, SupportsInt

import networkx as nx
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.node import Argument

from xvol_compiler.conv_modules import CONV_CALLS as _CONV_FUNCTIONS
from xvol_compiler.conv_modules import bn_params, conv_geometry, conv_module_weights, padded_conv
from xvol_compiler.deploy import XVolutionDeploy
from xvol_compiler.errors import InvalidArgumentTypeError
from xvol_compiler.fold import Branch, ConvGeometry, FoldError
from xvol_compiler.norm_act import has_own_forward, norm_act_reason
from xvol_compiler.pssa import interleave_groups, pssa_transform
from xvol_compiler.rules import Key, Kind, NodeInfo, add_node
from xvol_compiler.xvolution import XVolution, conv_forward_reason

__all__ = ["FxGraphReader", "as_node"]

_CONV_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
_MUL_FUNCTIONS = {operator.mul, operator.imul, torch.mul, torch.ops.aten.mul.Tensor}
_MUL_METHODS = {"mul", "mul_"}
_ATEN = torch.ops.aten
# Views of one value (the directional PSSA form multiplies (N, C, |D|, ...) views).
_RESHAPE_FUNCTIONS = {
    torch.reshape, torch.flatten, torch.unflatten, torch.squeeze, torch.unsqueeze,
    _ATEN.view.default, _ATEN.reshape.default, _ATEN._unsafe_view.default, _ATEN.unsqueeze.default,
    _ATEN.squeeze.dim, _ATEN.flatten.using_ints, _ATEN.unflatten.int, _ATEN.expand.default,
}
_RESHAPE_METHODS = {"view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "expand", "expand_as"}
# Aten-level graphs (make_fx, torch.export): the convolution ops and the names of their arguments.
_ATEN_CONVS = {
    _ATEN.conv1d.default: ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
    _ATEN.conv2d.default: ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
    _ATEN.conv3d.default: ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
    _ATEN.convolution.default: ("input", "weight", "bias", "stride", "padding", "dilation", "transposed",
                                "output_padding", "groups"),
}
_SOFTMAX = {F.softmax, torch.softmax, F.scaled_dot_product_attention}
_LINEAR = {torch.matmul, torch.bmm, F.linear, torch.einsum, operator.matmul}
# Random ops: a value computed with one is not a constant, whatever its inputs.
_RANDOM = {torch.rand_like, torch.randn_like, torch.randint_like, torch.bernoulli, torch.normal, torch.poisson,
           torch.multinomial, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
           F.feature_alpha_dropout}
_RANDOM_METHODS = {"bernoulli", "multinomial"}


def as_node(key: Key) -> fx.Node:
    """A view key of this adapter (or a branch input it wrote): an ``fx.Node`` of the graph."""
    if not isinstance(key, fx.Node):
        raise InvalidArgumentTypeError(f"{key!r} ({type(key).__name__}) is not a node of a torch.fx graph")
    return key


def _tuple(value: object, ndim: int) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * ndim
    if not isinstance(value, Iterable):
        raise InvalidArgumentTypeError(f"expected an int or a sequence of ints, got {value!r}")
    return tuple(int(v) for v in value)


# Copies of a constant that torch.export writes around a tensor literal (lift_fresh_copy, detach_).
_CONSTANT_COPIES = {_ATEN.lift_fresh_copy.default, _ATEN.detach.default, _ATEN.detach_.default,
                    _ATEN.clone.default}


def _constant_attr(value: Argument) -> Argument:
    """The ``get_attr`` node behind copies of a constant, else ``value`` itself."""
    while (isinstance(value, fx.Node) and value.op == "call_function" and value.target in _CONSTANT_COPIES
           and len(value.all_input_nodes) == 1 and len(value.users) == 1):
        value = value.args[0]
    return value


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


class FxGraphReader:
    """The view of ``gm.graph``; ``origin`` and ``created`` are kept by the emitting half."""

    gm: fx.GraphModule
    # Inputs of the interleaved convs the adapter created: (sources, channels).
    created: dict[fx.Node, tuple[tuple[fx.Node, ...], tuple[int, ...]]]
    # Module path each created conv stands for (its site), while it may live under a temporary name.
    origin: dict[fx.Node, str]

    def view(self) -> nx.DiGraph:
        graph = self.gm.graph
        modules = dict(self.gm.named_modules())
        calls = Counter(n.target for n in graph.nodes if n.op in ("call_module", "get_attr"))
        view = nx.DiGraph()
        for node in graph.nodes:
            attrs: dict[str, Any] = {}  # what the classification learns: refusal, branch, bn
            kind, inputs = self._classify(node, modules, calls, attrs)
            add_node(view, node, NodeInfo(kind=kind, name=self._name(node), users=len(node.users),
                                          spatial=_spatial(node), **attrs))
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
            owner = self._param_owner(w, node) if isinstance(w, fx.Node) else None
            if owner is not None:
                return owner or "<root>"
        stack = node.meta.get("nn_module_stack")
        if stack:
            return f"{next(reversed(stack))}:{node.name}"
        return node.name

    def _classify(
        self, node: fx.Node, modules: dict[str, nn.Module], calls: Counter, attrs: dict[str, Any]
    ) -> tuple[Kind, Sequence[fx.Node]]:
        data_inputs = list(node.all_input_nodes)
        if node.op == "placeholder":
            return "input", []
        if node.op == "call_module":
            module = modules[str(node.target)]
            if calls[node.target] > 1:
                attrs["refusal"] = (
                    f"module {node.target} is called {calls[node.target]} times; folding it would change every call"
                )
            if isinstance(module, (XVolution, XVolutionDeploy)):
                return "site", data_inputs  # a leaf only in the module form's trace
            if isinstance(module, _CONV_MODULES):
                return self._conv_module(node, module, attrs)
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                why = norm_act_reason(module) if has_own_forward(module) else ""
                try:
                    attrs["bn"] = bn_params(module)
                except FoldError as err:
                    why = str(err)
                if why:
                    attrs["bn"], attrs["refusal"] = None, f"{node.target}: {why}"
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
            if target in _ATEN_CONVS:
                if target is _ATEN.convolution.default and len(node.args) > 6 and node.args[6]:
                    return "conv_like", data_inputs  # a transposed convolution
                return self._conv_function(node, calls, attrs, _ATEN_CONVS[target])
            if target in _ADD_FUNCTIONS and self._is_plain_add(node):
                return "add", data_inputs
            if target in _MUL_FUNCTIONS and self._is_plain_add(node):
                return "mul", data_inputs
            if target in _RESHAPE_FUNCTIONS and len(data_inputs) == 1:
                return "reshape", data_inputs
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
            if node.target in _MUL_METHODS and self._is_plain_add(node):
                return "mul", data_inputs
            if node.target in _RESHAPE_METHODS and len(data_inputs) == 1:
                return "reshape", data_inputs
            if node.target == "softmax":
                return "softmax", data_inputs
            return "other", data_inputs
        return "other", data_inputs

    @staticmethod
    def _is_plain_add(node: fx.Node) -> bool:
        """x + y (or x * y) of two graph values, no alpha, no scalar operand."""
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
            interleaved = inp.args[0]
            if isinstance(interleaved, (list, tuple)):
                sources = tuple(s for s in interleaved if isinstance(s, fx.Node))
                channels = tuple(c for c in map(_channels, sources) if c is not None)
                if len(channels) == len(sources) == len(interleaved) and sum(channels) == in_channels:
                    return sources, channels
        return (inp,), (in_channels,)

    def _conv_module(
        self, node: fx.Node, module: nn.Module, attrs: dict[str, Any]
    ) -> tuple[Kind, Sequence[fx.Node]]:
        geometry = conv_geometry(module)
        sources, channels = self._sources(node, geometry.in_channels)
        why = conv_forward_reason(module)
        if why:
            attrs["branch"], attrs["refusal"] = None, f"{node.target}: {why}"
            return "conv", sources
        weight, bias = conv_module_weights(module)
        attrs["branch"] = Branch(sources, channels, geometry, weight.detach(), None if bias is None else bias.detach())
        return "conv", sources

    def _conv_function(
        self, node: fx.Node, calls: Counter, attrs: dict[str, Any],
        names: Sequence[str] = ("input", "weight", "bias", "stride", "padding", "dilation", "groups", "padding_mode"),
    ) -> tuple[Kind, Sequence[fx.Node]]:
        defaults: dict[str, Argument] = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1,
                                         "padding_mode": "zeros"}
        args = dict(zip(names, node.args, strict=False))
        args.update(node.kwargs)
        for key, value in defaults.items():
            args.setdefault(key, value)
        params = self._constant_params(_constant_attr(args["weight"]), _constant_attr(args["bias"]))
        if params is None:
            attrs["branch"] = None
            return "conv", list(node.all_input_nodes)
        weight, bias, roots = params
        computed: list[fx.Node] = []  # e.g. groups=x.shape[1]: known only when the graph runs
        fx.node.map_arg(tuple(args.get(k) for k in ("stride", "padding", "dilation", "groups", "padding_mode")),
                        computed.append)
        if computed:
            attrs["branch"] = None
            attrs["refusal"] = f"{self._name(node)}: conv arguments computed in the graph ({computed[0].name})"
            return "conv", list(node.all_input_nodes)
        for v in roots:
            if calls[v.target] > 1:
                attrs["refusal"] = f"parameter {v.target} is read by {calls[v.target]} nodes"
        w = self._constant(weight)
        b = None if bias is None else self._constant(bias)
        ndim = w.dim() - 2
        padding = args["padding"] if isinstance(args["padding"], str) else _tuple(args["padding"], ndim)
        groups = args["groups"]
        if not isinstance(groups, SupportsInt):
            raise InvalidArgumentTypeError(f"{self._name(node)}: conv groups={groups!r} is not an int")
        geometry = ConvGeometry(
            in_channels=w.shape[1] * int(groups), out_channels=w.shape[0], kernel_size=tuple(w.shape[2:]),
            stride=_tuple(args["stride"], ndim), padding=padding, dilation=_tuple(args["dilation"], ndim),
            groups=int(groups), padding_mode=str(args["padding_mode"]),
        )
        sources, channels = self._sources(node, geometry.in_channels)
        attrs["branch"] = Branch(sources, channels, geometry, w.detach(), None if b is None else b.detach())
        return "conv", sources

    def _constant_params(self, weight: Argument, bias: Argument
                         ) -> tuple[fx.Node, fx.Node | None, list[fx.Node]] | None:
        """(weight, bias, the ``get_attr`` nodes they are computed from, without repeats) when the weight
        and the bias (or None) are graph values computed from parameters alone, else None."""
        if not isinstance(weight, fx.Node) or not (bias is None or isinstance(bias, fx.Node)):
            return None
        roots: list[fx.Node] = []
        for value in (weight,) if bias is None else (weight, bias):
            found = self._constant_roots(value)
            if found is None:
                return None
            roots += found
        return weight, bias, list(dict.fromkeys(roots))

    def _fetch(self, target: str) -> object:
        """The attribute of ``gm`` at the dotted path ``target`` (what a ``get_attr`` node reads)."""
        obj: object = self.gm
        for part in target.split("."):
            obj = getattr(obj, part)
        return obj

    @staticmethod
    def _constant_roots(node: fx.Node) -> list[fx.Node] | None:
        """The ``get_attr`` nodes a value is computed from, or None when it is not computed from them alone.

        Constant means: a ``get_attr``, or a function/method call (not in place)
        whose inputs are all constant, such as the weight standardization of a
        ``StdConv2d`` traced through. Module calls and graph inputs are not constant.
        """
        roots: list[fx.Node] = []
        seen: set[fx.Node] = set()
        stack = [node]
        while stack:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            if n.op == "get_attr":
                roots.append(n)
                continue
            pure = (n.op == "call_function" and n.target not in _RANDOM) or (
                n.op == "call_method" and not str(n.target).endswith("_") and n.target not in _RANDOM_METHODS)
            if not pure or not n.all_input_nodes:
                return None
            stack.extend(n.all_input_nodes)
        return roots

    def _constant(self, node: fx.Node) -> torch.Tensor:
        """A constant value: a parameter as it is, or a computation on parameters evaluated in float64.

        The computed value is cast once to the dtype of its first floating-point parameter.
        """
        if node.op == "get_attr":
            fetched = self._fetch(str(node.target))
            if not isinstance(fetched, torch.Tensor):
                raise FoldError(f"{node.name} is not a tensor")
            return fetched
        order = {n: i for i, n in enumerate(self.gm.graph.nodes)}
        needed: set[fx.Node] = set()
        stack = [node]
        while stack:
            n = stack.pop()
            if n not in needed:
                needed.add(n)
                stack.extend(n.all_input_nodes)
        env: dict[fx.Node, Any] = {}  # whatever each operation returns (tensors, shapes, scalars)
        dtype: torch.dtype | None = None
        with torch.no_grad():
            for n in sorted(needed, key=order.__getitem__):
                if n.op == "get_attr":
                    t = self._fetch(str(n.target))
                    if isinstance(t, torch.Tensor) and t.is_floating_point():
                        dtype = dtype or t.dtype
                        t = t.detach().double()
                    env[n] = t
                    continue
                args = fx.node.map_arg(n.args, env.__getitem__)
                kwargs = fx.node.map_arg(n.kwargs, env.__getitem__)
                target = n.target
                if n.op == "call_function" and callable(target):
                    env[n] = target(*args, **kwargs)
                else:  # a call_method (the only other operation _constant_roots admits)
                    env[n] = getattr(args[0], str(target))(*args[1:], **kwargs)
        value = env[node]
        if not isinstance(value, torch.Tensor):
            raise FoldError(f"{node.name} is not a tensor")
        return value.to(dtype) if dtype is not None and value.is_floating_point() else value

    def _param_owner(self, node: fx.Node, conv: fx.Node | None = None) -> str | None:
        """Module path of the parameters a constant value is computed from (their common prefix), else None.

        A parameter shared by several modules (tied weights) is read under its first name: when that
        name belongs to a module unrelated to the one ``conv`` was traced in, that module is the owner.
        """
        roots = self._constant_roots(node)
        if not roots:
            return None
        owner = self._common_path(roots)
        stack = conv.meta.get("nn_module_stack") if conv is not None else None
        if stack and owner:
            inner = next(reversed(stack.values()))
            path = inner[0] if isinstance(inner, tuple) else None
            related = isinstance(path, str) and (
                not path or owner == path or owner.startswith(path + ".") or path.startswith(owner + "."))
            if isinstance(path, str) and not related:
                return path
        return owner

    @staticmethod
    def _common_path(roots: Sequence[fx.Node]) -> str:
        paths = [str(r.target).split(".")[:-1] for r in roots]
        common: list[str] = []
        for parts in zip(*paths, strict=False):
            if len(set(parts)) != 1:
                break
            common.append(parts[0])
        return ".".join(common)

    def _module_called(self, path: str) -> bool:
        """Whether a module call still in the graph runs the module at ``path`` (itself or an ancestor)."""
        return any(
            n.op == "call_module" and (path == str(n.target) or path.startswith(f"{n.target}."))
            for n in self.gm.graph.nodes
        )
