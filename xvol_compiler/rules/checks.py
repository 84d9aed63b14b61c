"""Checks and helpers the rules share: node refusals, the X-volution derivation, rewrite building."""

from __future__ import annotations

import math
from collections.abc import Sequence

import networkx as nx

from xvol_compiler.fold import BatchNormParams, Branch, ConvGeometry, FoldError, bn_as_kernel
from xvol_compiler.rules.types import Key, Rewrite, conv_macs, node_info

__all__ = [
    "ATTENTION_REASON",
    "branch_reason",
    "bn_reason",
    "build_rewrite",
    "first_reason",
    "identity_branch",
    "identity_reason",
    "main_branch",
    "node_reason",
    "xvolution_base",
]

ATTENTION_REASON = "global attention is input-dependent, not a convolution"

# Nodes walked to prove one input derived from another. Exported graphs spell PSSA out op by op: a
# directional 3-D transform (26 shifted products) is ~100 ONNX nodes, where FX shows one call.
_DERIVATION_LIMIT = 512
_ATTENTION = {"softmax", "global_attention"}
_LINEAR = {"conv", "conv_like"}


def node_reason(view: nx.DiGraph, key: Key, *, single_user: bool) -> str | None:
    """Why ``key`` must not be rewritten: the adapter's refusal, or (``single_user``) other consumers."""
    info = node_info(view, key)
    if info.refusal:
        return info.refusal
    if single_user and info.users != 1:
        return f"{info.name} output is also used elsewhere ({info.users} users)"
    return None


def branch_reason(view: nx.DiGraph, key: Key) -> str | None:
    info = node_info(view, key)
    return f"{info.name}: weights are not constants" if info.branch is None else None


def bn_reason(view: nx.DiGraph, key: Key) -> str | None:
    info = node_info(view, key)
    return f"{info.name}: BatchNorm is not foldable" if info.bn is None else None


def first_reason(*reasons: str | None) -> str | None:
    return next((r for r in reasons if r), None)


def identity_reason(branch: Branch, x: Key) -> str | None:
    """Why an identity branch over ``x`` cannot be added to ``branch`` (None: it can)."""
    if x not in branch.inputs:
        return "identity branch reads a different tensor than the conv"
    channels = branch.channels[branch.inputs.index(x)]
    if channels != branch.geometry.out_channels:
        return f"identity branch needs C_in == C_out, got {channels} and {branch.geometry.out_channels}"
    return None


def identity_branch(branch: Branch, x: Key, bn: BatchNormParams | None) -> Branch:
    """The 1x1 branch computing ``x`` (or ``bn(x)``) in ``branch``'s groups (``identity_reason`` checked)."""
    channels = branch.channels[branch.inputs.index(x)]
    g = branch.geometry
    ndim = g.ndim
    geometry = ConvGeometry(channels, g.out_channels, (1,) * ndim, (1,) * ndim, (0,) * ndim, (1,) * ndim, g.groups)
    if bn is None:
        bn = BatchNormParams(
            running_mean=branch.weight.new_zeros(channels), running_var=branch.weight.new_ones(channels),
            weight=None, bias=None, eps=0.0,
        )
    w, b = bn_as_kernel(bn, g.groups, (1,) * ndim, (0,) * ndim, branch.weight.dtype)
    return Branch((x,), (channels,), geometry, w, b)


def _params(view: nx.DiGraph, keys: Sequence[Key]) -> tuple[int, int | None]:
    params = 0
    macs: int | None = 0
    for key in keys:
        info = node_info(view, key)
        if info.branch is not None:
            branch = info.branch
            params += branch.weight.numel() + (0 if branch.bias is None else branch.bias.numel())
            m = conv_macs(branch.geometry, info.spatial)
            macs = None if m is None or macs is None else macs + m
        if info.bn is not None:
            params += 2 * info.bn.num_features
    return params, macs


def build_rewrite(
    view: nx.DiGraph, rule: str, kind: str, anchor: Key, output: Key, replaced: Sequence[Key], branch: Branch
) -> Rewrite:
    """The rewrite replacing ``replaced`` by ``branch``; FoldError when the folded weights are not finite."""
    for w in (branch.weight, branch.bias):
        if w is not None and not bool(w.isfinite().all()):
            raise FoldError("folded weights are not finite (BatchNorm statistics overflow)")
    params, macs = _params(view, replaced)
    return Rewrite(
        rule=rule, kind=kind, name=node_info(view, anchor).name, anchor=anchor, output=output,
        replaced=tuple(replaced), branch=branch, params_before=params, macs_before=macs,
        macs_after=conv_macs(branch.geometry, node_info(view, output).spatial),
    )


def _derivation_kinds(view: nx.DiGraph, derived: Key, base: Key) -> set[str] | None:
    """Kinds of the nodes computing ``derived`` from ``base`` alone; None if it reads anything else
    (a graph input, or more than ``_DERIVATION_LIMIT`` nodes away)."""
    kinds: set[str] = set()
    stack, seen = [derived], {derived}
    while stack:
        key = stack.pop()
        kind = node_info(view, key).kind
        if kind == "input":
            return None
        kinds.add(kind)
        for pred in view.predecessors(key):
            if pred == base or pred in seen:
                continue
            if len(seen) >= _DERIVATION_LIMIT:
                return None
            seen.add(pred)
            stack.append(pred)
    if not any(base in view.predecessors(k) for k in seen):
        return None
    return kinds


def xvolution_base(view: nx.DiGraph, inputs: Sequence[Key]) -> tuple[Key | None, bool]:
    """(the input every other input is computed from by a parameter-free transform, through attention):
    the conv branch's x, with T(x) = PSSA(x) at an X-volution site; (None, False) for unrelated tensors.

    A transform through softmax is global attention (X-volution (SA)): ``through attention`` True, the
    site refused. One through other convolutions is just another layer: the inputs count as unrelated.
    """
    for base in inputs:
        derivations = [_derivation_kinds(view, other, base) for other in inputs if other != base]
        known = [d for d in derivations if d is not None]
        if len(known) != len(derivations):
            continue
        kinds: set[str] = set().union(*known)
        if kinds & _ATTENTION:
            return base, True
        if kinds & _LINEAR:
            continue
        return base, False
    return None, False


def main_branch(view: nx.DiGraph, a: tuple[Key, Branch], b: tuple[Key, Branch]) -> Key:
    """Which conv of a branch sum (key, branch) the merged one is named after: the largest kernel
    (not an added 1x1), else the shorter name (the site, not its branch)."""
    ka, kb = (math.prod(branch.geometry.kernel_size) for _, branch in (a, b))
    if ka != kb:
        return a[0] if ka > kb else b[0]
    name_a, name_b = node_info(view, a[0]).name, node_info(view, b[0]).name
    return a[0] if (len(name_a), name_a) <= (len(name_b), name_b) else b[0]
