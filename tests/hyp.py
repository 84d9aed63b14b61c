"""Example counts per hypothesis profile (tests ask for their CI count; the long profile raises it)."""

import os


def examples(ci: int, long: int = 5000) -> int:
    """``ci`` examples in the seeded CI profile, ``max(ci, long)`` under HYPOTHESIS_PROFILE=long."""
    return max(ci, long) if os.environ.get("HYPOTHESIS_PROFILE") == "long" else ci
