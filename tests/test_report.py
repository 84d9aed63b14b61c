"""Reports: one count format for all of them, and the fusion report is a TableReport like the others."""

from __future__ import annotations

import rich.table

from xvol_compiler.fusion_report import FusionReport
from xvol_compiler.report import TableReport, format_count
from xvol_compiler.rules import Outcome


def test_format_count_literal_values() -> None:
    assert [format_count(n) for n in (None, 0, 950, 12_300, 4_110_000, 2_050_000_000, 1.5)] == [
        "-", "0", "950", "12.3K", "4.11M", "2.05G", "1.5",
    ]


def _report() -> FusionReport:
    report = FusionReport(source="fx", outcomes=[
        Outcome("x-volution", "layer1.conv", "fused", params_before=12_300, params_after=9_216,
                macs_before=4_110_000, macs_after=2_050_000_000, lowering="channel"),
        Outcome("conv+bn", "stem", "refused", reason="conv used elsewhere"),
    ], paths={"head": "module"}, notes=["a note"])
    report.max_abs_error, report.max_rel_error = 1e-6, 2e-6
    return report


def test_fusion_report_is_a_table_report_with_the_shared_count_format() -> None:
    report = _report()
    assert isinstance(report, TableReport)
    assert report.title == "Fusion report (fx)"
    assert report.rows()[0][:7] == ["layer1.conv", "x-volution", "fused", "12.3K", "9.22K", "4.11M", "2.05G"]
    assert report.rows()[1][:7] == ["stem", "conv+bn", "refused", "0", "0", "-", "-"]
    assert report.footer() == ["path: head -> module", "a note", report.summary()]
    text = str(report).splitlines()
    assert text[0] == "Fusion report (fx)"
    assert text[1].split() == ["site", "pattern", "result", "params", "before", "params", "after", "MACs", "before",
                               "MACs", "after", "lowering", "reason"]
    assert text[3].split() == ["layer1.conv", "x-volution", "fused", "12.3K", "9.22K", "4.11M", "2.05G", "channel"]
    assert text[-1] == "fused: 1 x-volution; refused: 1; max error vs unfused: 1e-06 abs, 2e-06 rel"
    # the notes field stays a list the passes append to
    assert report.notes == ["a note"]


def test_fusion_report_renders_with_rich() -> None:
    table = _report().rich_table()
    assert isinstance(table, rich.table.Table)
    assert [c.header for c in table.columns][:3] == ["site", "pattern", "result"]
    assert table.row_count == 2
    assert "path: head -> module" in str(table.caption)


def test_a_table_report_with_a_notes_method_still_prints_them() -> None:
    class Old(TableReport):
        def headers(self) -> list[str]:
            return ["a"]

        def rows(self) -> list[list[object]]:
            return [[1]]

        def notes(self) -> list[str]:
            return ["under the table"]

    assert str(Old()).splitlines() == ["a", "-", "1", "under the table"]
