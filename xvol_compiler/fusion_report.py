"""What a fusion pass did, per site: a :class:`~xvol_compiler.report.TableReport` dataclass."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from xvol_compiler.lowering import LoweringChoice
from xvol_compiler.report import TableReport, format_count
from xvol_compiler.rules import Outcome, RewriteLog

__all__ = ["FusionReport"]


@dataclass
class FusionReport(TableReport):
    """Per-site outcome of ``fuse`` / ``fuse_onnx``.

    ``outcomes`` lists every rewrite done and every match refused (with its
    reason); ``paths`` says, for untraceable models, which path each part took
    (``"fx"`` for a traced graph, ``"module"`` for module-level folding).
    ``max_abs_error`` / ``max_rel_error`` are measured against the unfused
    model when the pass verified its result.
    """

    source: str = "fx"
    outcomes: list[Outcome] = field(default_factory=list)
    paths: dict[str, str] = field(default_factory=dict)
    max_abs_error: float | None = None
    max_rel_error: float | None = None
    notes: list[str] = field(default_factory=list)

    @classmethod
    def from_log(cls, log: RewriteLog, source: str, prefix: str = "") -> FusionReport:
        outcomes = [replace(o, name=f"{prefix}{o.name}") for o in log.outcomes()]
        return cls(source=source, outcomes=outcomes)

    def set_lowerings(self, choices: Mapping[str, LoweringChoice]) -> None:
        """Record each fused X-volution site's deploy lowering and why (``choices``: site name -> choice)."""
        for i, o in enumerate(self.outcomes):
            choice = choices.get(o.name)
            if choice is not None and o.status == "fused" and o.kind == "x-volution":
                self.outcomes[i] = replace(o, lowering=choice.lowering, lowering_reason=choice.reason)
        named = {o.name for o in self.outcomes if o.kind == "x-volution" and o.status == "fused"}
        for name, choice in choices.items():
            if name not in named:
                self.notes.append(f"site {name}: lowering {choice.lowering} ({choice.reason})")

    def lowerings(self) -> dict[str, str]:
        """Site name -> the lowering it is deployed in (fused X-volution sites)."""
        return {o.name: o.lowering or "channel" for o in self.fused if o.kind == "x-volution"}

    def extend(self, other: FusionReport) -> None:
        self.outcomes.extend(other.outcomes)
        self.paths.update(other.paths)
        self.notes.extend(other.notes)

    def count(self, kind: str | None = None, status: str = "fused") -> int:
        return sum(1 for o in self.outcomes if o.status == status and (kind is None or o.kind == kind))

    @property
    def fused(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status == "fused"]

    @property
    def refused(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status == "refused"]

    def summary(self) -> str:
        kinds = Counter(o.kind for o in self.fused)
        parts = [f"{n} {k}" for k, n in sorted(kinds.items())]
        text = f"fused: {', '.join(parts) if parts else 'nothing'}; refused: {len(self.refused)}"
        if self.max_rel_error is not None:
            text += f"; max error vs unfused: {self.max_abs_error:.3g} abs, {self.max_rel_error:.3g} rel"
        return text

    def to_dict(self) -> dict[str, object]:
        return {
            "source": self.source,
            "outcomes": [asdict(o) for o in self.outcomes],
            "paths": dict(self.paths),
            "max_abs_error": self.max_abs_error,
            "max_rel_error": self.max_rel_error,
            "notes": list(self.notes),
            "summary": self.summary(),
        }

    @property
    def title(self) -> str:  # the table's title names the graph form that was fused
        return f"Fusion report ({self.source})"

    def headers(self) -> list[str]:
        return ["site", "pattern", "result", "params before", "params after", "MACs before", "MACs after",
                "lowering", "reason"]

    def rows(self) -> list[list[Any]]:
        return [
            [o.name, o.kind, o.status, format_count(o.params_before), format_count(o.params_after),
             format_count(o.macs_before), format_count(o.macs_after), o.lowering or "-",
             o.reason or o.lowering_reason]
            for o in sorted(self.outcomes, key=lambda o: (o.status != "fused", o.kind != "x-volution", o.name))
        ]

    def footer(self) -> list[str]:
        return [*(f"path: {k} -> {v}" for k, v in sorted(self.paths.items())), *self.notes, self.summary()]
