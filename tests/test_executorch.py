"""ExecuTorch: a fused model lowers to XNNPACK as one delegate segment and its .pte runs exactly.

Reference: a float64 eager run of the unfused X-volution model. Needs the optional extra
(``pip install -e .[executorch]``; ``make test`` installs it).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

pytest.importorskip("executorch.exir", reason="the executorch extra is not installed (pip install -e .[executorch])")

from xvol_compiler import fuse, xvolify
from xvol_compiler.attention_probe import with_exercised_attention
from xvol_compiler.executorch_io import (
    ExecutorchError,
    delegate_report,
    lower_to_xnnpack,
    pte_bytes,
    run_pte,
)

SIZE = 32


@pytest.fixture(scope="module")
def unfused() -> nn.Module:
    torch.manual_seed(0)
    x = torch.randn(1, 3, SIZE, SIZE)
    model = xvolify(torchvision.models.resnet18(weights=None).eval(), sites="os16", example_inputs=x).eval()
    model, changed = with_exercised_attention(model, scale=0.3)  # T(x) changes the output
    assert changed == 4
    return model


@pytest.fixture(scope="module")
def lowered_fused(unfused: nn.Module) -> tuple[object, torch.Tensor]:
    x = torch.randn(1, 3, SIZE, SIZE)
    return lower_to_xnnpack(fuse(unfused, example_inputs=x), (x,)), x


def test_a_fused_model_is_one_xnnpack_segment(lowered_fused: tuple[object, torch.Tensor]) -> None:
    report = delegate_report(lowered_fused[0])
    assert report.segments == 1, str(report)
    assert report.outside == (), str(report)


def test_the_pte_runs_and_equals_the_float64_unfused_model(
    unfused: nn.Module, lowered_fused: tuple[object, torch.Tensor]
) -> None:
    edge, x = lowered_fused
    (got,) = run_pte(pte_bytes(edge), [x])
    with torch.no_grad():
        reference = copy.deepcopy(unfused).double()(x.double())
        attention_free = copy.deepcopy(unfused)
        for module in attention_free.modules():
            if hasattr(module, "attn_bn"):
                nn.init.zeros_(module.attn_bn.weight)
                nn.init.zeros_(module.attn_bn.bias)
        without_attention = attention_free.double()(x.double())
    error = float((got.double() - reference).abs().max() / reference.abs().max())
    assert error < 1e-5
    # The check can fail: the attention branch moves the output far more than the tolerance.
    assert float((without_attention - reference).abs().max() / reference.abs().max()) > 1e-2


def test_a_program_that_is_not_a_pte_is_refused() -> None:
    with pytest.raises(ExecutorchError, match="cannot load method"):
        run_pte(b"not a program", [torch.zeros(1)])
