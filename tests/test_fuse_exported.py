"""fuse(ExportedProgram): the rules on a torch.export program's ATen graph, returned as a program.

Reference: a float64 eager run of the unfused X-volution model the program was exported from.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

from xvol_compiler import fuse
from xvol_compiler.arguments import ArgumentError
from xvol_compiler.attention_probe import with_exercised_attention
from xvol_passes.fuse_fx import fuse_with_report
from xvol_passes.xvolify import xvolify

InputKind = torch.export.graph_signature.InputKind


@pytest.fixture(scope="module")
def trained_like() -> nn.Module:
    torch.manual_seed(0)
    x = torch.randn(1, 3, 64, 64)
    model = xvolify(torchvision.models.resnet18(weights=None).eval(), sites="os16", example_inputs=x).eval()
    model, changed = with_exercised_attention(model, scale=0.1)  # non-zero attention: T(x) counts
    assert changed == 4
    return model


@pytest.fixture(scope="module")
def exported(trained_like: nn.Module) -> torch.export.ExportedProgram:
    x = torch.randn(2, 3, 64, 64)
    return torch.export.export(trained_like, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))


def _relative_error(got: torch.Tensor, reference: torch.Tensor) -> float:
    return float((got.double() - reference).abs().max() / reference.abs().max())


def test_fusing_a_program_gives_a_program_exact_against_the_float64_unfused_model(
    trained_like: nn.Module, exported: torch.export.ExportedProgram
) -> None:
    fused, report = fuse_with_report(exported)
    assert isinstance(fused, torch.export.ExportedProgram)
    # 20 conv+BN pairs of resnet18 and 4 attention conv+BN pairs, then the 4 sites
    assert report.count("x-volution") == 4 and report.count("conv+bn") == 24
    reference_model = copy.deepcopy(trained_like).double()
    for batch in (1, 3, 5):  # the batch dimension stayed dynamic: other sizes than the example's run
        x = torch.randn(batch, 3, 64, 64)
        with torch.no_grad():
            reference = reference_model(x.double())
            got = fused.module()(x)
        assert got.shape == reference.shape
        assert _relative_error(got, reference) < 1e-5


def test_the_fused_program_has_no_batch_norm_and_reads_every_conv_weight_from_its_inputs(
    exported: torch.export.ExportedProgram,
) -> None:
    fused = fuse(exported)
    calls = [n for n in fused.graph.nodes if n.op == "call_function"]
    assert not [n for n in calls if "batch_norm" in str(n.target)]
    lifted = {spec.arg.name for spec in fused.graph_signature.input_specs
              if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR)}
    convs = [n for n in calls if n.target in (torch.ops.aten.conv2d.default, torch.ops.aten.convolution.default)]
    assert len(convs) == 24  # 16 plain convs, 4 fused sites, 4 PSSA ring convs
    assert all(n.args[1].name in lifted for n in convs)


def test_the_dynamic_batch_is_kept(exported: torch.export.ExportedProgram) -> None:
    fused = fuse(exported)
    user_input = next(spec.arg.name for spec in fused.graph_signature.input_specs if spec.kind == InputKind.USER_INPUT)
    placeholder = next(n for n in fused.graph.nodes if n.name == user_input)
    assert isinstance(placeholder.meta["val"].shape[0], torch.SymInt)
    assert [str(r) for r in fused.range_constraints.values()] == [str(r) for r in exported.range_constraints.values()]


def test_a_program_fuses_in_the_graph_form_only(exported: torch.export.ExportedProgram) -> None:
    with pytest.raises(ArgumentError, match="graph form only"):
        fuse(exported, graph=False)
