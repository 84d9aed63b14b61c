"""The driver: a rule set applied through an adapter to its fixpoint, with its log.

Each round the driver asks the adapter for a fresh view, runs the pre-passes on it, and
collects one batch of disjoint rewrites from the first pattern that yields any; the adapter
applies the batch and the next round starts. ``check`` refusals and ``FoldError`` from a
rule's ``rewrite`` become refused rows here, once per (rule, site, reason). The driver also
keeps which X-volution sites each created conv carries (``RewriteLog.site_names``), so later
rewrites (a BN folded after the site, an added branch) that rename the conv keep the site's name.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field

import networkx as nx

from xvol_compiler.errors import XvolError
from xvol_compiler.fold import FoldError
from xvol_compiler.rules.adapter import RewriteTarget
from xvol_compiler.rules.catalog import RULES, Rule
from xvol_compiler.rules.patterns import Match, Pattern
from xvol_compiler.rules.prepass import PRE_PASSES, PrePass
from xvol_compiler.rules.types import Key, Outcome, Rewrite, node_info

__all__ = ["RewriteLimitError", "RewriteLog", "RuleSet", "UnknownRuleError", "run_rules", "try_rule"]


class UnknownRuleError(XvolError, ValueError):
    """A rule name given to ``skip`` names no rule; the message lists the known ones."""


class RewriteLimitError(XvolError, RuntimeError):
    """The rules still matched after ``max_rounds`` rounds of rewriting (no fixpoint reached)."""


@dataclass(frozen=True)
class RuleSet:
    """Rules in the order they are tried, minus those named in ``skip``, and the view pre-passes."""

    rules: tuple[Rule, ...] = RULES
    skip: frozenset[str] = frozenset()
    pre_passes: tuple[PrePass, ...] = PRE_PASSES

    def __post_init__(self) -> None:
        known = [r.name for r in self.rules]
        unknown = sorted(set(self.skip) - set(known))
        if unknown:
            raise UnknownRuleError(
                f"skip={unknown}: no rule of that name; the rules are {', '.join(known)}")

    @classmethod
    def of(cls, rules: Iterable[Rule] = RULES, skip: Collection[str] = ()) -> RuleSet:
        if isinstance(skip, str):
            skip = (skip,)  # one name, not its letters
        return cls(tuple(rules), frozenset(skip))

    def active(self) -> tuple[Rule, ...]:
        return tuple(r for r in self.rules if r.name not in self.skip)

    def groups(self) -> list[tuple[Pattern, list[Rule]]]:
        """The active rules by pattern, in order: rules sharing a pattern are tried together, match by match."""
        groups: list[tuple[Pattern, list[Rule]]] = []
        for rule in self.active():
            if groups and groups[-1][0] is rule.pattern:
                groups[-1][1].append(rule)
            else:
                groups.append((rule.pattern, [rule]))
        return groups


def try_rule(rule: Rule, view: nx.DiGraph, match: Match) -> Rewrite | str:
    """The rewrite ``rule`` plans for ``match``, or the reason it refuses (a ``FoldError`` included)."""
    try:
        reason = rule.check(view, match)
        if reason:
            return reason
        return rule.rewrite(view, match)
    except FoldError as err:
        return str(err)


@dataclass
class RewriteLog:
    applied: list[Rewrite] = field(default_factory=list)
    refused: list[Outcome] = field(default_factory=list)
    # Created multi-input conv -> the X-volution sites it carries (first: the one it is named after).
    site_names: dict[Key, tuple[str, ...]] = field(default_factory=dict)

    def outcomes(self) -> list[Outcome]:
        done = [
            Outcome(r.kind, r.name, "fused", "", r.params_before, r.params_after, r.macs_before, r.macs_after)
            for r in self.applied
        ]
        return done + self.refused

    def record(self, rewrite: Rewrite, new: Key) -> None:
        """Log ``rewrite``, applied as the conv ``new``: it carries the sites of the nodes it replaced."""
        self.applied.append(rewrite)
        carried = [name for k in rewrite.replaced for name in self.site_names.pop(k, ())]
        if rewrite.kind == "x-volution":
            carried.append(rewrite.name)
        if carried and len(rewrite.branch.inputs) > 1:
            self.site_names[new] = tuple(carried)

    def moved(self, old: Key, new: Key) -> None:
        """The conv ``old`` was re-emitted as ``new`` (a site relowered)."""
        if old in self.site_names:
            self.site_names[new] = self.site_names.pop(old)


def run_rules(
    adapter: RewriteTarget,
    rules: RuleSet | Sequence[Rule] = RULES,
    max_rounds: int = 10_000,
    *,
    skip: Collection[str] = (),
) -> RewriteLog:
    """Apply ``rules`` (less those named in ``skip``) until none matches. Each round applies a batch of
    disjoint rewrites of one pattern, then rebuilds the view. A refused match is not tried again, and a
    refusal is reported once per (rule, site, reason): a shared conv or a conv with two consumers
    matches once per call or consumer, but is one site."""
    rule_set = rules if isinstance(rules, RuleSet) else RuleSet.of(rules, skip)
    if skip and isinstance(rules, RuleSet):
        rule_set = RuleSet.of(rules.rules, set(rules.skip) | set(skip))
    groups = rule_set.groups()
    log = RewriteLog()
    tried: set[tuple[str, frozenset[Key]]] = set()
    reported: set[tuple[str, str, str]] = set()
    for _ in range(max_rounds):
        view = adapter.view()
        for pre in rule_set.pre_passes:
            view = pre.run(view)
        batch: list[Rewrite] = []
        for pattern, members in groups:
            taken: set[Key] = set()  # nodes the batch replaces
            read: set[Key] = set()  # values the batch's new convs read
            for m in pattern.matches(view):
                nodes = frozenset(m.values())
                key = (pattern.name, nodes)
                if key in tried or nodes & taken or nodes & read:
                    continue
                rule = next((r for r in members if r.owns(view, m)), None)
                planned = None if rule is None else try_rule(rule, view, dict(m))
                if not isinstance(planned, Rewrite):
                    tried.add(key)
                    if planned is not None and rule is not None:
                        name = node_info(view, rule.anchor(m)).name
                        if (rule.name, name, planned) not in reported:
                            reported.add((rule.name, name, planned))
                            log.refused.append(Outcome(rule.kind, name, "refused", planned))
                    continue
                if set(planned.branch.inputs) & taken:
                    continue  # reads a value another rewrite of this batch replaces: next round
                taken |= nodes
                read |= set(planned.branch.inputs)
                batch.append(planned)
            if batch:
                break
        if not batch:
            return log
        for rewrite in batch:
            log.record(rewrite, adapter.apply(rewrite))
    raise RewriteLimitError(
        f"rewriting did not reach a fixpoint in {max_rounds} rounds: a rule keeps matching its own output "
        "(skip it by name), or the graph needs a larger max_rounds"
    )
