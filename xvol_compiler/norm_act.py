"""Norm-act layers: a BatchNorm subclass that applies its own dropout and activation after normalising.

timm's ``BatchNormAct2d`` is one module computing ``act(drop(batch_norm(x)))``. When the
normalisation folds into the convolution before it, what remains of the module is its
``drop`` and ``act``: :class:`NormActRemainder` runs them, under the same child names, so
their state_dict keys (a PReLU's weight) stay where they were.

A BatchNorm subclass qualifies only when its forward, traced with torch.fx (its ``drop``
and ``act`` children kept as calls), is exactly that chain: one ``batch_norm`` of the
input, then ``drop``, then ``act``, returned as is. Anything else keeps its own forward and
is not folded (:func:`norm_act_reason` says why).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx, nn

from xvol_compiler.errors import InvalidArgumentTypeError

__all__ = ["NormActRemainder", "has_own_forward", "norm_act_reason", "remainder_of"]

_PLAIN_BN_FORWARDS = {nn.modules.batchnorm._BatchNorm.forward, nn.SyncBatchNorm.forward}
_BATCH_NORM_CALLS = {F.batch_norm, torch.batch_norm}
_CHAIN = ("drop", "act")


class NormActRemainder(nn.Module):
    """What a norm-act layer computes once its normalisation is folded away: ``act(drop(x))``."""

    def __init__(self, drop: nn.Module, act: nn.Module) -> None:
        super().__init__()
        self.drop = drop
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(x))


_NO_OP_IN_EVAL = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)


def remainder_of(norm_act: nn.Module) -> nn.Module:
    """What replaces a norm-act layer whose normalisation was folded: its bare activation where the
    dropout does nothing in eval mode and the activation holds no state (no state_dict key moves),
    else :class:`NormActRemainder` with both."""
    drop, act = norm_act.drop, norm_act.act
    if not (isinstance(drop, nn.Module) and isinstance(act, nn.Module)):
        raise InvalidArgumentTypeError(
            f"remainder_of needs a norm-act layer whose drop and act are modules, got {type(norm_act).__name__} "
            "(check it with norm_act_reason first)"
        )
    stateless = not any(True for _ in act.parameters()) and not any(True for _ in act.buffers())
    if isinstance(drop, _NO_OP_IN_EVAL) and stateless:
        return act
    return NormActRemainder(drop, act)


def has_own_forward(bn: nn.Module) -> bool:
    """Whether a BatchNorm subclass replaces torch's forward (a norm-act layer, or anything else)."""
    return type(bn).forward not in _PLAIN_BN_FORWARDS


class _ChildTracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name in _CHAIN or super().is_leaf_module(m, module_qualified_name)


def norm_act_reason(bn: nn.Module) -> str:
    """'' when ``bn`` (a BatchNorm subclass with its own forward) is a norm-act layer, else why not."""
    name = type(bn).__name__
    children = dict(bn.named_children())
    if set(children) != set(_CHAIN):
        return f"{name} overrides BatchNorm's forward and is not a norm-act layer (children drop and act)"
    try:
        graph = _ChildTracer().trace(bn)
    except Exception as err:  # any tracing failure: the forward cannot be checked
        return f"{name} overrides BatchNorm's forward, which does not trace with torch.fx ({type(err).__name__})"
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    output = next(n for n in graph.nodes if n.op == "output")
    dependent: list[fx.Node] = []
    for node in graph.nodes:  # topological order: what the input flows into
        if node in inputs or any(a in dependent or a in inputs for a in node.all_input_nodes):
            if node not in inputs:
                dependent.append(node)
    # Shape checks (timm asserts x.ndim == 4) read the input but compute nothing that is returned.
    computed = [n for n in dependent if n.op != "output" and _reaches(n, output)]
    chain_ok = (
        len(inputs) == 1 and len(computed) == 3
        and computed[0].op == "call_function" and computed[0].target in _BATCH_NORM_CALLS
        and computed[0].args[0] is inputs[0]
        and [(n.op, n.target) for n in computed[1:]] == [("call_module", "drop"), ("call_module", "act")]
        and computed[1].args == (computed[0],) and computed[2].args == (computed[1],)
        and output.args[0] is computed[2]
    )
    if not chain_ok:
        return f"{name} overrides BatchNorm's forward with more than batch_norm -> drop -> act"
    if not _normalises_with_own_state(bn, computed[0]):
        return f"{name} overrides BatchNorm's forward and normalises with other statistics than its own"
    return ""


def _normalises_with_own_state(bn: nn.Module, call: fx.Node) -> bool:
    """The traced batch_norm reads the module's running statistics and affine parameters, in eval mode."""
    names = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
    args = dict(zip(names, call.args, strict=False))
    args.update(call.kwargs)

    def reads(value: object, attr: str) -> bool:
        if getattr(bn, attr, None) is None:
            return value is None
        return isinstance(value, fx.Node) and value.op == "get_attr" and value.target == attr

    return (all(reads(args.get(a), a) for a in ("running_mean", "running_var", "weight", "bias"))
            and args.get("training") is False and bool(args.get("eps") == bn.eps))


def _reaches(node: fx.Node, target: fx.Node) -> bool:
    stack, seen = [node], {node}
    while stack:
        n = stack.pop()
        if n is target:
            return True
        for user in n.users:
            if user not in seen:
                seen.add(user)
                stack.append(user)
    return False
