"""Benchmarks flag a loaded machine: above 0.3 load per core at the start."""

from __future__ import annotations

from xvol_compiler.machine_load import LoadAverage, load_average, load_line


def test_a_machine_above_the_threshold_is_flagged_at_the_start_only() -> None:
    busy = LoadAverage(one_min=0.61, five_min=0.2, cores=2)
    assert busy.loaded
    assert "LOADED" in busy.describe("start")
    assert "0.61 (1 min)" in busy.describe("start")
    # At the end the benchmark's own processes are in the figure: recorded, never flagged.
    assert "LOADED" not in busy.describe("end")


def test_an_idle_machine_is_not_flagged() -> None:
    idle = LoadAverage(one_min=0.59, five_min=0.9, cores=2)
    assert not idle.loaded
    assert "LOADED" not in idle.describe("start")
    assert idle.to_dict() == {"one_min": 0.59, "five_min": 0.9, "cores": 2, "loaded": False}


def test_the_current_load_is_read() -> None:
    load = load_average()
    assert load is not None and load.cores >= 1 and load.one_min >= 0
    assert load_line("start").startswith("load average (start)")
