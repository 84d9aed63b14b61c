"""The rewrite rules, each declared once, and the driver that applies them through a graph adapter.

Nothing here knows torch.fx or ONNX. A graph adapter (``xvol_passes.fx_graph``,
``xvol_passes.onnx_graph``) presents its graph as a ``networkx.DiGraph`` *view* of
:class:`NodeInfo` nodes and applies the ``Rewrite`` values the rules plan; the fold math
comes from ``xvol_compiler.fold``. The same rule therefore serves both graph kinds.

Modules: ``types`` (view nodes, rewrites, report rows, the ``Kind`` / ``Status`` / ``Lowering``
literals), ``patterns`` (structural patterns), ``prepass`` (the PSSA-marking pre-pass),
``checks`` (what the rules share), ``catalog`` (the rule objects and ``RULES``), ``driver``
(``RuleSet``, ``run_rules``, ``RewriteLog``), ``adapter`` (the adapter protocols),
``view_adapter`` (an adapter over a view alone).
"""

from xvol_compiler.rules.adapter import GraphAdapter, RewriteTarget, Shape
from xvol_compiler.rules.catalog import (
    BN_BRANCH,
    BRANCH_SUM,
    CONV_BN_RULE,
    IDENTITY_BRANCH,
    RULES,
    XVOLUTION,
    Rule,
)
from xvol_compiler.rules.checks import xvolution_base
from xvol_compiler.rules.driver import RewriteLog, RuleSet, UnknownRuleError, run_rules, try_rule
from xvol_compiler.rules.patterns import BN_SUM, CONV_BN, CONV_SUM, IDENTITY_SUM, Match, Pattern, pattern
from xvol_compiler.rules.prepass import (
    PRE_PASSES,
    PSSA_MARKING,
    PrePass,
    mark_pssa_transforms,
    pssa_conv_layout,
    pssa_products,
)
from xvol_compiler.rules.types import (
    INFO,
    Key,
    Kind,
    Lowering,
    NodeInfo,
    Outcome,
    Rewrite,
    Status,
    add_node,
    conv_macs,
    node_info,
    set_info,
)
from xvol_compiler.rules.view_adapter import ViewAdapter

__all__ = [
    "BN_BRANCH",
    "BN_SUM",
    "BRANCH_SUM",
    "CONV_BN",
    "CONV_BN_RULE",
    "CONV_SUM",
    "IDENTITY_BRANCH",
    "IDENTITY_SUM",
    "PRE_PASSES",
    "PSSA_MARKING",
    "RULES",
    "XVOLUTION",
    "GraphAdapter",
    "INFO",
    "Key",
    "Kind",
    "Lowering",
    "Match",
    "NodeInfo",
    "Outcome",
    "Pattern",
    "PrePass",
    "Refusal",
    "Rewrite",
    "RewriteLog",
    "RewriteTarget",
    "Rule",
    "RuleSet",
    "Shape",
    "Status",
    "UnknownRuleError",
    "ViewAdapter",
    "add_node",
    "conv_macs",
    "mark_pssa_transforms",
    "node_info",
    "pattern",
    "pssa_conv_layout",
    "pssa_products",
    "run_rules",
    "set_info",
    "try_rule",
    "xvolution_base",
]


class Refusal(Exception):
    """Kept for code that catches it: rules now say why they refuse by ``Rule.check``'s return value."""
