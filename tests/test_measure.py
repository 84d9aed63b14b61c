"""compile_timing_set: timed "compile" variants never run in eager mode unnoticed."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.exc import FailOnRecompileLimitHit

from xvol_compiler.measure import compile_timing_set


def _scale(x: torch.Tensor) -> torch.Tensor:
    return x * 2 + 1


def test_a_timing_set_starts_from_cleared_caches_and_refuses_the_eager_fallback() -> None:
    limit = torch._dynamo.config.recompile_limit
    shapes = [(n,) for n in range(1, limit + 2)]  # one static graph per shape: one past the limit
    with compile_timing_set() as compile_static:
        fn = compile_static(_scale, backend="eager")
        for shape in shapes[:limit]:
            x = torch.randn(shape)
            assert torch.equal(fn(x), x * 2 + 1)
        with pytest.raises(FailOnRecompileLimitHit):
            fn(torch.randn(shapes[limit]))
    # A new set clears the graphs of the last one: the same shapes compile again without reaching the limit.
    with compile_timing_set() as compile_static:
        fn = compile_static(_scale, backend="eager")
        for shape in shapes[1:]:
            x = torch.randn(shape)
            assert torch.equal(fn(x), x * 2 + 1)
    # Outside a set the limit is dynamo's default again (a warning and eager mode).
    assert torch._dynamo.config.fail_on_recompile_limit_hit is False
