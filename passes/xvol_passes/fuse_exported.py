"""fuse(ExportedProgram): the rules applied to a program from ``torch.export``, returned as a program.

A program exported from an X-volution model holds ATen operations on lifted weights: ``aten.conv2d``,
``aten.batch_norm`` (or ``_native_batch_norm_legit_no_training``, after decompositions) and, for each
site, the PSSA transform as its two operations ``x * aten.conv2d(x, ring, groups=C)``. This pass:

1. unlifts the program (``ep.module()``: weights become ``get_attr`` nodes of one GraphModule);
2. restates the ATen operations in the forms the FX adapter reads (``normalize_aten``): each inference
   batch norm on constant statistics becomes a BatchNorm module call, each ``x * depthwise conv of x``
   whose kernel *is* a PSSA ring (read from its values, not its name) becomes ``pssa_transform``, and
   each two-operand ``aten.add`` a Python add;
3. fuses that graph with the graph form (every rule, verified against the unfused program);
4. exports the fused graph again with the program's dynamic dimensions, so the result has a new graph
   signature and state (folded weights, no batch norm) and the same input ranges.
"""

from __future__ import annotations

import operator
from typing import Any, cast

import sympy
import torch
from torch import fx, nn

from xvol_compiler.pssa import pssa_kernel_layout, pssa_transform

_ATEN = torch.ops.aten
_CONVS = {_ATEN.conv1d.default: 1, _ATEN.conv2d.default: 2, _ATEN.conv3d.default: 3}
_BATCH_NORMS = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


def _constant(gm: fx.GraphModule, node: Any) -> torch.Tensor | None:
    """The tensor a ``get_attr`` node reads, else None."""
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    value: object = gm
    for part in str(node.target).split("."):
        value = getattr(value, part, None)
    return value if isinstance(value, torch.Tensor) else None


def _batch_norm_args(node: fx.Node) -> tuple[Any, ...] | None:
    """(x, weight, bias, mean, var, momentum, eps) of an inference batch norm, else None."""
    if node.target is _ATEN.batch_norm.default and len(node.args) >= 8 and node.args[5] is False:
        x, weight, bias, mean, var, _, momentum, eps = node.args[:8]
        return x, weight, bias, mean, var, momentum, eps
    if node.target is _ATEN._native_batch_norm_legit_no_training.default and len(node.args) >= 7:
        return tuple(node.args[:7])
    return None


def _as_module(gm: fx.GraphModule, node: fx.Node, args: tuple[Any, ...], index: int) -> bool:
    """Replace one ATen batch norm on constant statistics by a call of an equivalent BatchNorm module."""
    x, weight, bias, mean, var, momentum, eps = args
    tensors = [_constant(gm, a) for a in (weight, bias, mean, var)]
    if tensors[2] is None or tensors[3] is None or any(t is None for a, t in zip((weight, bias), tensors[:2],
                                                                                 strict=True) if a is not None):
        return False
    ndim = x.meta["val"].dim() - 2 if isinstance(x, fx.Node) and "val" in x.meta else None
    if ndim not in _BATCH_NORMS:
        return False
    channels = tensors[2].numel()
    bn = _BATCH_NORMS[ndim](channels, eps=float(eps), momentum=float(momentum), affine=weight is not None)
    # track_running_stats=True (the default) registers both statistics buffers: tensors, never None.
    running_mean, running_var = cast(torch.Tensor, bn.running_mean), cast(torch.Tensor, bn.running_var)
    with torch.no_grad():
        running_mean.copy_(tensors[2])
        running_var.copy_(tensors[3])
        if weight is not None:
            bn.weight.copy_(tensors[0] if tensors[0] is not None else torch.ones(channels))
            bn.bias.copy_(tensors[1] if tensors[1] is not None else torch.zeros(channels))
    name = f"exported_batch_norm_{index}"
    gm.add_submodule(name, bn.eval().to(tensors[2].device))
    with gm.graph.inserting_before(node):
        call = gm.graph.call_module(name, (x,))
    call.meta = dict(node.meta)
    if node.target is _ATEN.batch_norm.default:
        node.replace_all_uses_with(call)
    else:  # a tuple (out, mean, invstd): inference reads its element 0 only
        users = list(node.users)
        if not all(u.target is operator.getitem and u.args[1] == 0 for u in users):
            gm.graph.erase_node(call)
            return False
        for user in users:
            user.replace_all_uses_with(call)
            gm.graph.erase_node(user)
    gm.graph.erase_node(node)
    return True


def _as_pssa(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Replace ``x * conv(x, ring, padding=L, dilation=L, groups=C)`` by ``pssa_transform(x, L, |D|)``."""
    if node.target not in (_ATEN.mul.Tensor, operator.mul) or len(node.args) != 2:
        return False
    for x, conv in (node.args, node.args[::-1]):
        if not (isinstance(conv, fx.Node) and conv.op == "call_function" and conv.target in _CONVS
                and conv.args and conv.args[0] is x and len(conv.users) == 1):
            continue
        ndim = _CONVS[conv.target]
        params = list(conv.args) + [None] * (7 - len(conv.args))
        ring, bias, stride, padding, dilation, groups = params[1:7]
        kernel = _constant(gm, ring)
        one = [1] * ndim
        if (kernel is None or bias is not None or (stride or one) != one or not isinstance(groups, int) or not groups
                or not isinstance(padding, (list, tuple))):
            continue
        layout = pssa_kernel_layout(kernel, int(groups))
        plain_ring = layout is not None and not layout.directional and abs(layout.scale * layout.directions - 1) < 1e-6
        if layout is None or not plain_ring or padding != dilation:
            continue
        with gm.graph.inserting_before(node):
            call = gm.graph.call_function(pssa_transform, (x, tuple(padding), layout.directions), {"kernel": ring})
        call.meta = dict(node.meta)
        node.replace_all_uses_with(call)
        gm.graph.erase_node(node)
        gm.graph.erase_node(conv)
        return True
    return False


def normalize_aten(gm: fx.GraphModule) -> tuple[int, int]:
    """Restate inference batch norms as module calls and PSSA transforms as ``pssa_transform``, in place.

    Returns how many of each were restated; anything else is left as it is (and stays unfused)."""
    batch_norms = transforms = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        args = _batch_norm_args(node)
        if args is not None and _as_module(gm, node, args, batch_norms):
            batch_norms += 1
        elif _as_pssa(gm, node):
            transforms += 1
        elif node.target is _ATEN.add.Tensor and len(node.args) == 2 and not node.kwargs:
            node.target = operator.add  # the same sum; the adapter reads branch sums as Python adds
    gm.graph.lint()
    gm.recompile()
    return batch_norms, transforms


def _finite(bound: Any) -> int | None:
    """A range bound as an int; None for an infinite one (torch's int_oo is a sympy Number, not an Integer)."""
    return int(bound) if isinstance(bound, sympy.Integer) else None


def dynamic_shapes_of(ep: torch.export.ExportedProgram) -> tuple[Any, ...] | None:
    """The program's dynamic dimensions as a ``dynamic_shapes`` argument for its positional inputs
    (one ``Dim`` per symbol, with the program's range), or None when every dimension is static."""
    user_inputs = [spec.arg.name for spec in ep.graph_signature.input_specs
                   if spec.kind == torch.export.graph_signature.InputKind.USER_INPUT]
    values = {n.name: n.meta.get("val") for n in ep.graph.nodes if n.op == "placeholder"}
    dims: dict[str, Any] = {}
    shapes: list[dict[int, Any] | None] = []
    for name in user_inputs:
        value = values.get(name)
        spec: dict[int, Any] = {}
        for axis, size in enumerate(getattr(value, "shape", ())):
            if isinstance(size, torch.SymInt):
                symbol = size.node.expr
                if str(symbol) not in dims:
                    bounds = ep.range_constraints.get(symbol)
                    lower = _finite(bounds.lower) if bounds is not None else None
                    upper = _finite(bounds.upper) if bounds is not None else None
                    dims[str(symbol)] = torch.export.Dim(f"d_{symbol}", min=lower, max=upper)
                spec[axis] = dims[str(symbol)]
        shapes.append(spec or None)
    return tuple(shapes) if dims else None
