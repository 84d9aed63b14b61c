"""The machine's load average around a measurement: recorded at start and end, a loaded machine flagged.

Latency ratios are only meaningful on an idle machine: another process on a shared core slows whichever
candidate runs beside it. Every benchmark records the load average when it starts and when it ends and
flags a machine above ``LOADED_PER_CORE`` (1-minute load per core) in its table and on the terminal. At
the end the figure includes the benchmark's own processes, so only the start decides the flag.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

LOADED_PER_CORE = 0.3

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadAverage:
    """1- and 5-minute load averages and the core count they are read against."""

    one_min: float
    five_min: float
    cores: int

    @property
    def loaded(self) -> bool:
        return self.one_min > LOADED_PER_CORE * self.cores

    def describe(self, when: str) -> str:
        """One line for a table's header or footer, with the flag when the machine was loaded."""
        text = f"load average ({when}) {self.one_min:.2f} (1 min), {self.five_min:.2f} (5 min) on {self.cores} cores"
        if self.loaded and when == "start":
            text += f"; LOADED (above {LOADED_PER_CORE} per core): these figures are not valid measurements"
        return text

    def to_dict(self) -> dict[str, float | int | bool]:
        return {"one_min": round(self.one_min, 2), "five_min": round(self.five_min, 2), "cores": self.cores,
                "loaded": self.loaded}


def load_average() -> LoadAverage | None:
    """The current load average, or None where the platform has none (Windows)."""
    try:
        one, five, _ = os.getloadavg()
    except (AttributeError, OSError):
        return None
    return LoadAverage(one, five, os.cpu_count() or 1)


def load_line(when: str) -> str:
    """``load_average().describe(when)``, logged as a warning when the machine is loaded at the start."""
    load = load_average()
    if load is None:
        return f"load average ({when}) not available on this platform"
    if load.loaded and when == "start":
        log.warning("the machine is loaded (%.2f on %d cores): benchmark figures will not be valid", load.one_min,
                    load.cores)
    return load.describe(when)
