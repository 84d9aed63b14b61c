"""Tracing for the graph form: norm-act layers (timm's ``BatchNormAct2d``) split into BatchNorm, dropout, activation.

Traced through, a norm-act layer is an ``F.batch_norm`` call no rule folds. Kept as one call, a
fold would lose its activation. So the graph form's tracer keeps each norm-act layer (one that
:func:`xvol_compiler.norm_act.norm_act_reason` accepts) as a call, and then replaces that call by
three: a plain BatchNorm holding the layer's own parameters and statistics, its ``drop`` and its
``act`` (at ``<name>_norm``, ``<name>_drop``, ``<name>_act`` beside it). The BatchNorm then folds like
any other.
"""

from __future__ import annotations

from typing import TypeGuard

from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from xvol_compiler.norm_act import has_own_forward, norm_act_reason

__all__ = ["trace_with_norm_acts_split"]

_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _is_norm_act(m: nn.Module) -> TypeGuard[_BatchNorm]:
    return isinstance(m, _BatchNorm) and has_own_forward(m) and not norm_act_reason(m)


class _NormActTracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return _is_norm_act(m) or super().is_leaf_module(m, module_qualified_name)


def _plain_batchnorm(norm_act: _BatchNorm) -> nn.Module:
    """A torch BatchNorm of the same kind sharing ``norm_act``'s parameters and running statistics."""
    kind = next((t for t in _BN_TYPES if isinstance(norm_act, t)), nn.BatchNorm2d)
    plain = kind(norm_act.num_features, eps=norm_act.eps, momentum=norm_act.momentum, affine=norm_act.affine,
                 track_running_stats=norm_act.track_running_stats)
    for name in ("weight", "bias"):
        setattr(plain, name, getattr(norm_act, name))
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        plain.register_buffer(name, getattr(norm_act, name))
    return plain.train(norm_act.training)


def trace_with_norm_acts_split(model: nn.Module) -> fx.GraphModule:
    """``torch.fx.symbolic_trace(model)``, with every norm-act layer's call split in three."""
    tracer = _NormActTracer()
    graph = tracer.trace(model)
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    for node in list(gm.graph.nodes):
        if node.op != "call_module":
            continue
        path = str(node.target)
        layer = gm.get_submodule(path)
        if not _is_norm_act(layer):
            continue
        # norm_act_reason accepted the layer: its children are exactly the modules drop and act.
        children = dict(layer.named_children())
        parts = {"norm": _plain_batchnorm(layer), "drop": children["drop"], "act": children["act"]}
        value = node.args[0]
        with gm.graph.inserting_before(node):
            for suffix, module in parts.items():
                target = f"{path}_{suffix}"
                gm.add_submodule(target, module)
                value = gm.graph.call_module(target, (value,))
        node.replace_all_uses_with(value)
        gm.graph.erase_node(node)
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm
