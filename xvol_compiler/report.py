"""Reports that print as tables.

Every pass returns a report dataclass. ``str(report)`` is a plain-text table
(no terminal codes: safe in logs, doctests and files); ``rich`` renders the
same rows as a rich table (``rich.print(report)``, or ``report.rich_table()``).

Every report (:class:`XvolifyReport` here, ``FusionReport`` of the fusion
passes) subclasses :class:`TableReport` and implements ``title``, ``headers``,
``rows`` and optionally ``footer`` (the lines under the table); the rendering
and the count format (:func:`format_count`: 950, 12.3K, 4.11M) live here once.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from xvol_compiler.errors import InvalidArgumentError
from xvol_compiler.fold import ConvGeometry

__all__ = [
    "SiteReport",
    "TableReport",
    "XvolifyReport",
    "format_count",
    "format_stride",
    "render_table",
    "with_article",
]


def with_article(noun: str) -> str:
    """``noun`` after "a" or "an" by its first sound: "an identity", "a 1x1", "an 8-neighbour", "a Conv2d"."""
    text = str(noun)
    vowel = text[:1].lower() in ("a", "e", "i", "o", "u") or re.match(r"(8|11|18)(\D|$)", text) is not None
    return f"{'an' if vowel else 'a'} {text}"


def format_count(n: float | None) -> str:
    """Short human count, the one format of every report: 950, 12.3K, 4.11M, 2.05G; None: "-"."""
    if n is None or (isinstance(n, float) and not math.isfinite(n)):
        return "-"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.3g}" if isinstance(n, float) and not float(n).is_integer() else str(int(n))


def _stride_key(s: float | tuple[float, ...]) -> tuple[float, ...]:
    return s if isinstance(s, tuple) else (s,)


def format_stride(s: float | tuple[float, ...]) -> str:
    """16 -> '16', 0.5 -> '1/2', 17.6 -> '17.6', (16, 8) -> '16x8' (anisotropic)."""
    if isinstance(s, tuple):
        return "x".join(format_stride(v) for v in s)
    if float(s).is_integer():
        return str(int(s))
    if s < 1 and float(1 / s).is_integer():
        return f"1/{int(1 / s)}"
    return f"{s:.3g}"


def _is_number(cell: str) -> bool:
    return bool(cell) and (cell[0].isdigit() or cell[0] in "+-.") and cell not in ("-",)


def render_table(
    headers: Sequence[str],
    rows: Sequence[Sequence[Any]],
    *,
    title: str | None = None,
    notes: Sequence[str] = (),
) -> str:
    """A plain-text table: columns padded, numeric cells right-aligned, notes under it."""
    cells = [[str(c) for c in row] for row in rows]
    heads = [str(h) for h in headers]
    widths = [len(h) for h in heads]
    for row in cells:
        if len(row) != len(heads):
            raise InvalidArgumentError(f"table row has {len(row)} cells but there are {len(heads)} headers: {row}")
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]

    def line(row: Sequence[str]) -> str:
        parts = [c.rjust(w) if _is_number(c) else c.ljust(w) for c, w in zip(row, widths, strict=True)]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    out = []
    if title:
        out.append(title)
    out += [line(heads), rule]
    out += [line(r) for r in cells]
    if not cells:
        out.append("(none)")
    out += list(notes)
    return "\n".join(out)


class TableReport:
    """Base for reports: subclasses give ``title``, ``headers()``, ``rows()`` and ``footer()``."""

    @property
    def title(self) -> str:
        return ""

    def headers(self) -> list[str]:
        raise NotImplementedError

    def rows(self) -> list[list[Any]]:
        raise NotImplementedError

    def footer(self) -> list[str]:
        """Lines printed under the table (a rich table's caption): by default what a ``notes()``
        method gives (the hook's older name, which subclasses written for it keep), else none."""
        notes = getattr(self, "notes", None)
        return [str(line) for line in notes()] if callable(notes) else []

    def __str__(self) -> str:
        return render_table(self.headers(), self.rows(), title=self.title, notes=self.footer())

    def rich_table(self) -> Any:
        """The same table as a ``rich.table.Table`` (notes as its caption)."""
        from rich.table import Table

        table = Table(title=self.title or None, caption="\n".join(self.footer()) or None, caption_justify="left")
        rows = [[str(c) for c in r] for r in self.rows()]
        for i, h in enumerate(self.headers()):
            numeric = bool(rows) and all(_is_number(r[i]) or r[i] == "-" for r in rows)
            table.add_column(h, justify="right" if numeric else "left")
        for r in rows:
            table.add_row(*r)
        return table

    def __rich__(self) -> Any:
        return self.rich_table()


@dataclass(frozen=True)
class SiteReport:
    """One convolution as xvolify saw it.

    ``output_strides`` holds one nominal output stride per call of the module
    (shared detection heads run several times); ``temporal_strides`` likewise
    for Conv3d (``None`` otherwise). MACs are summed over the calls on the
    example inputs. ``added_macs`` counts the new convolutions only; the
    element-wise transform is ``transform_elements`` (input elements touched,
    memory-bound, not in the MAC totals).
    """

    name: str
    conv_type: str
    class_name: str
    geometry: ConvGeometry
    bias: bool
    output_strides: tuple[float | tuple[float, ...], ...]
    temporal_strides: tuple[float, ...] | None
    calls: int
    macs: int
    added_macs: int
    added_params: int
    transform_elements: int
    selected: bool
    reason: str
    analysis: str
    aliases: tuple[str, ...] = ()

    @property
    def macs_after(self) -> int:
        return self.macs + self.added_macs if self.selected else self.macs

    def stride_text(self) -> str:
        if not self.calls:
            return "not run"
        text = ",".join(format_stride(s) for s in sorted(set(self.output_strides), key=_stride_key))
        if self.temporal_strides is not None:
            text += " (t " + ",".join(format_stride(s) for s in sorted(set(self.temporal_strides))) + ")"
        return text

    def geometry_text(self) -> str:
        g = self.geometry

        def axes(v: tuple[int, ...]) -> str:
            return str(v[0]) if len(set(v)) == 1 else "x".join(map(str, v))

        text = f"{g.in_channels}->{g.out_channels} k{axes(g.kernel_size)} s{axes(g.stride)}"
        if any(d != 1 for d in g.dilation):
            text += f" d{axes(g.dilation)}"
        if g.groups != 1:
            text += f" g{g.groups}"
        return text


@dataclass
class XvolifyReport(TableReport):
    """What :func:`xvol_compiler.xvolify` did: every conv considered, selected or skipped with a reason.

    ``str(report)`` lists the selected sites and summarises the skipped ones by
    reason; ``report.table(everything=True)`` lists every conv.
    """

    model: str
    kind: str
    selection: str
    attention: str
    analysis: str
    input_shapes: str
    sites: list[SiteReport]
    model_macs: int
    model_params: int
    analysis_note: str = ""
    functional_convs: list[str] = field(default_factory=list)
    shared_policy: str = "a module called several times is selected if any of its calls qualifies"

    @property
    def title(self) -> str:
        return f"xvolify: {self.model}"

    @property
    def selected(self) -> list[SiteReport]:
        return [s for s in self.sites if s.selected]

    @property
    def skipped(self) -> list[SiteReport]:
        return [s for s in self.sites if not s.selected]

    @property
    def selected_names(self) -> list[str]:
        return [s.name for s in self.selected]

    @property
    def added_macs(self) -> int:
        return sum(s.added_macs for s in self.selected)

    @property
    def added_params(self) -> int:
        return sum(s.added_params for s in self.selected)

    @property
    def added_mac_fraction(self) -> float:
        return self.added_macs / self.model_macs if self.model_macs else float("nan")

    def headers(self) -> list[str]:
        return ["site", "type", "geometry", "output stride", "calls", "MACs", "MACs after", "+params", "status"]

    def _row(self, s: SiteReport) -> list[Any]:
        return [
            s.name + (f" (= {', '.join(s.aliases)})" if s.aliases else ""),
            s.conv_type if s.class_name == s.conv_type else f"{s.conv_type} ({s.class_name})",
            s.geometry_text(),
            s.stride_text(),
            s.calls,
            format_count(s.macs),
            format_count(s.macs_after),
            format_count(s.added_params) if s.selected else "-",
            s.reason,
        ]

    def rows(self) -> list[list[Any]]:
        return [self._row(s) for s in self.selected]

    def notes(self) -> list[str]:
        """The lines under the table: inputs, selection, added cost, skipped convs by reason."""
        sel = self.selected
        frac = self.added_mac_fraction
        notes = [
            f"model {self.model} ({self.kind}), inputs {self.input_shapes}, analysis: {self.analysis}"
            + (f" ({self.analysis_note})" if self.analysis_note else ""),
            f"selection: {self.selection}; attention: {self.attention}",
            f"{len(sel)} site(s) selected of {len(self.sites)} convs; +{format_count(self.added_params)} params "
            f"(model {format_count(self.model_params)}); +{format_count(self.added_macs)} MACs = "
            f"{100 * frac:.3g}% of the model's {format_count(self.model_macs)} conv+linear MACs",
        ]
        transform = sum(s.transform_elements for s in sel)
        if transform:
            notes.append(
                f"plus the element-wise attention transform over {format_count(transform)} input elements "
                "(memory-bound, not counted in MACs)"
            )
        if any(s.calls > 1 for s in sel):
            notes.append(f"shared modules: {self.shared_policy}")
        counts: dict[str, int] = {}
        for s in self.skipped:
            key = s.reason.split(":")[0]
            counts[key] = counts.get(key, 0) + 1
        if counts:
            notes.append("skipped: " + "; ".join(f"{n} {r}" for r, n in sorted(counts.items(), key=lambda kv: -kv[1])))
        if self.functional_convs:
            notes.append(
                "functional convolutions (not modules, cannot be swapped): " + ", ".join(self.functional_convs)
            )
        return notes

    def table(self, everything: bool = False) -> str:
        """The table of selected sites, or of every conv (``everything=True``)."""
        rows = [self._row(s) for s in (self.sites if everything else self.selected)]
        return render_table(self.headers(), rows, title=self.title, notes=self.notes())

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON-serialisable after ``json.dumps(..., default=str)``)."""
        data = asdict(self)
        data["added_macs"] = self.added_macs
        data["added_params"] = self.added_params
        data["added_mac_fraction"] = self.added_mac_fraction
        return data
