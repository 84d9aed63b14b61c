"""The rewrite rules, as objects: ``name``, ``kind``, ``pattern``, ``owns``, ``check``, ``rewrite``.

A rule is tried on each placement (``match``) of its ``pattern`` in the view:

``owns(view, match) -> bool``
    whether the match is this rule's at all, silently (a sum of unrelated tensors is no
    branch sum; two rules sharing a pattern split its matches between them);
``check(view, match) -> str | None``
    the reason the rule does not apply here (reported as a refused row), None when it does;
``rewrite(view, match) -> Rewrite``
    the replacement; a ``FoldError`` it raises (weights that do not fold) becomes a refused
    row in the driver.

``name`` identifies the rule (``skip=``); ``kind`` labels its report rows, fused or refused.
Nothing here knows torch.fx or ONNX: the fold math comes from ``xvol_compiler.fold``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import networkx as nx

from xvol_compiler.errors import InvalidArgumentError
from xvol_compiler.fold import Branch, fold_conv_bn, merge_branches
from xvol_compiler.rules.checks import (
    ATTENTION_REASON,
    bn_reason,
    branch_reason,
    build_rewrite,
    first_reason,
    identity_branch,
    identity_reason,
    main_branch,
    node_reason,
    xvolution_base,
)
from xvol_compiler.rules.patterns import BN_SUM, CONV_BN, CONV_SUM, IDENTITY_SUM, Match, Pattern
from xvol_compiler.rules.types import Key, Rewrite, node_info

__all__ = [
    "BN_BRANCH",
    "BRANCH_SUM",
    "CONV_BN_RULE",
    "IDENTITY_BRANCH",
    "RULES",
    "Rule",
    "XVOLUTION",
]


class Rule(ABC):
    name: str
    kind: str
    pattern: Pattern

    def owns(self, view: nx.DiGraph, match: Match) -> bool:
        return True

    @abstractmethod
    def check(self, view: nx.DiGraph, match: Match) -> str | None: ...

    @abstractmethod
    def rewrite(self, view: nx.DiGraph, match: Match) -> Rewrite: ...

    def anchor(self, match: Match) -> Key:
        """The node a refused row is named after."""
        return match["conv"] if "conv" in match else match["a"]

    def __repr__(self) -> str:
        return f"<rule {self.name}>"


def _branch(view: nx.DiGraph, key: Key) -> Branch:
    branch = node_info(view, key).branch
    if branch is None:  # (check() refused it: a rewrite is never planned without)
        raise InvalidArgumentError(f"rewrite planned for {key!r} without constant weights")
    return branch


class ConvBnRule(Rule):
    """conv -> BN: one conv with the BatchNorm folded in."""

    name = kind = "conv+bn"
    pattern = CONV_BN

    def check(self, view: nx.DiGraph, match: Match) -> str | None:
        return first_reason(node_reason(view, match["conv"], single_user=True),
                            node_reason(view, match["bn"], single_user=False),
                            branch_reason(view, match["conv"]), bn_reason(view, match["bn"]))

    def rewrite(self, view: nx.DiGraph, match: Match) -> Rewrite:
        branch = _branch(view, match["conv"])
        bn = node_info(view, match["bn"]).bn
        if bn is None:
            raise InvalidArgumentError("rewrite planned without BatchNorm parameters")
        w, b = fold_conv_bn(branch.weight, branch.bias, bn)
        folded = Branch(branch.inputs, branch.channels, branch.geometry, w, b)
        return build_rewrite(view, self.name, self.kind, match["conv"], match["bn"], (match["conv"], match["bn"]),
                             folded)


@dataclass(frozen=True)
class _SumPlan:
    """How a conv + conv sum reads: its kind, the match with ``a`` the branch reading x, and whether the
    transform between the inputs goes through attention."""

    kind: str | None  # "x-volution", "branch-sum", or None: a sum of unrelated tensors
    match: Match
    attention: bool = False


_last_plan: list[tuple[nx.DiGraph, tuple[tuple[str, Key], ...], _SumPlan]] = []


def _sum_plan(view: nx.DiGraph, match: Match) -> _SumPlan:
    """Classify a conv + conv match (the last answer is kept: owns, check and rewrite ask in turn)."""
    items = tuple(sorted(match.items(), key=lambda kv: kv[0]))
    if _last_plan and _last_plan[0][0] is view and _last_plan[0][1] == items:
        return _last_plan[0][2]
    plan = _classify_sum(view, dict(match))
    _last_plan[:] = [(view, items, plan)]
    return plan


def _classify_sum(view: nx.DiGraph, m: Match) -> _SumPlan:
    a, b = node_info(view, m["a"]).branch, node_info(view, m["b"]).branch
    if a is None or b is None:
        return _SumPlan("branch-sum", m)  # refused by the branch-sum rule: weights are not constants
    inputs = list(dict.fromkeys((*a.inputs, *b.inputs)))
    if len(inputs) == 1:
        return _SumPlan("branch-sum", m)
    base, attention = xvolution_base(view, inputs)
    if base is None:
        return _SumPlan(None, m)  # sums of unrelated tensors (residual adds): nothing to gain by concatenating
    if base not in a.inputs:  # the branch reading x goes first: deploy input is [x, T(x)]
        m = {**m, "a": m["b"], "b": m["a"]}
        a, b = b, a
    # Only the merge that brings T(x) in makes the site; adding a branch to a merged site is a sum.
    joins = not (set(b.inputs) <= set(a.inputs) or set(a.inputs) <= set(b.inputs))
    return _SumPlan("x-volution" if joins or attention else "branch-sum", m, attention)


class _ConvSumRule(Rule):
    pattern = CONV_SUM

    def owns(self, view: nx.DiGraph, match: Match) -> bool:
        return _sum_plan(view, match).kind == self.kind

    def check(self, view: nx.DiGraph, match: Match) -> str | None:
        reason = first_reason(branch_reason(view, match["a"]), branch_reason(view, match["b"]))
        if reason:
            return reason
        plan = _sum_plan(view, match)
        if plan.attention:
            return ATTENTION_REASON
        m = plan.match
        return first_reason(node_reason(view, m["a"], single_user=True), node_reason(view, m["b"], single_user=True),
                            node_reason(view, m["add"], single_user=False))

    def rewrite(self, view: nx.DiGraph, match: Match) -> Rewrite:
        m = _sum_plan(view, match).match
        a, b = _branch(view, m["a"]), _branch(view, m["b"])
        merged = merge_branches([a, b])
        anchor = m["a"] if self.kind == "x-volution" else main_branch(view, (m["a"], a), (m["b"], b))
        return build_rewrite(view, self.name, self.kind, anchor, m["add"], (m["a"], m["b"], m["add"]), merged)


class XVolutionRule(_ConvSumRule):
    """add(conv(x), conv(T(x))) with T(x) derived from x without convolutions: one conv over
    ``interleave_groups([x, T(x)])``. Through softmax (global attention): refused."""

    name = kind = "x-volution"


class BranchSumRule(_ConvSumRule):
    """add(conv_a, conv_b) of branches over the same inputs: one conv (kernels embedded and added)."""

    name = kind = "branch-sum"


class BnBranchRule(Rule):
    """add(conv(x), BN(x)): the BatchNorm as a centre kernel added to the conv."""

    name = "bn-branch"
    kind = "branch-sum"
    pattern = BN_SUM

    def check(self, view: nx.DiGraph, match: Match) -> str | None:
        reason = first_reason(node_reason(view, match["conv"], single_user=True),
                              node_reason(view, match["bn"], single_user=True),
                              node_reason(view, match["add"], single_user=False),
                              bn_reason(view, match["bn"]), branch_reason(view, match["conv"]))
        return reason or identity_reason(_branch(view, match["conv"]), match["x"])

    def rewrite(self, view: nx.DiGraph, match: Match) -> Rewrite:
        branch = _branch(view, match["conv"])
        ident = identity_branch(branch, match["x"], node_info(view, match["bn"]).bn)
        merged = merge_branches([branch, ident])
        return build_rewrite(view, self.name, self.kind, match["conv"], match["add"],
                             (match["conv"], match["bn"], match["add"]), merged)


class IdentityBranchRule(Rule):
    """add(conv(x), x): the identity kernel added to the conv."""

    name = kind = "identity-branch"
    pattern = IDENTITY_SUM

    def check(self, view: nx.DiGraph, match: Match) -> str | None:
        reason = first_reason(node_reason(view, match["conv"], single_user=True),
                              node_reason(view, match["add"], single_user=False), branch_reason(view, match["conv"]))
        return reason or identity_reason(_branch(view, match["conv"]), match["x"])

    def rewrite(self, view: nx.DiGraph, match: Match) -> Rewrite:
        branch = _branch(view, match["conv"])
        merged = merge_branches([branch, identity_branch(branch, match["x"], None)])
        return build_rewrite(view, self.name, self.kind, match["conv"], match["add"], (match["conv"], match["add"]),
                             merged)


CONV_BN_RULE = ConvBnRule()
XVOLUTION = XVolutionRule()
BRANCH_SUM = BranchSumRule()
BN_BRANCH = BnBranchRule()
IDENTITY_BRANCH = IdentityBranchRule()

# Order matters only for speed: BN folds first, so sums see plain convs. Rules sharing a pattern
# (x-volution, branch-sum) are tried together, match by match.
RULES: tuple[Rule, ...] = (CONV_BN_RULE, XVOLUTION, BRANCH_SUM, BN_BRANCH, IDENTITY_BRANCH)
