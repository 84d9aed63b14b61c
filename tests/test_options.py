"""FuseOptions / XvolifyOptions: options= and the keywords give the same result; one check per option."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from tests.factory_models import tiny_cnn
from xvol_compiler.arguments import ArgumentError
from xvol_compiler.attention_probe import with_exercised_attention
from xvol_compiler.onnx_io import export_onnx
from xvol_compiler.onnx_verify import onnx_session
from xvol_compiler.options import FuseOptions, XvolifyOptions
from xvol_passes.fuse_fx import fuse, fuse_with_report
from xvol_passes.fuse_onnx import fuse_onnx
from xvol_passes.xvolify import xvolify, xvolify_with_report

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
SITES = ["3.0", "4.0", "5.0"]  # tiny_cnn's 3x3 convs at output stride 16


def rel_error(got: torch.Tensor | np.ndarray, expected: torch.Tensor) -> float:
    """max |got - expected| / max |expected|, in float64."""
    got64, exp64 = torch.as_tensor(got).double(), expected.double()
    return float((got64 - exp64).abs().max() / exp64.abs().max())


def float64_run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The unfused model in float64, eager: the reference every fused form is held to."""
    with torch.no_grad():
        return copy.deepcopy(model).double().eval()(x.double())


@pytest.fixture(scope="module")
def xvolified() -> nn.Module:
    """tiny_cnn with X-volution at its three stride-16 convs, attention gammas non-zero (so the fold matters)."""
    torch.manual_seed(0)
    model = xvolify(tiny_cnn(), example_inputs=X[:1])
    probe, changed = with_exercised_attention(model, seed=1)
    assert changed == 3
    return probe.eval()


# --------------------------------------------------------------------------- same result both ways


@pytest.mark.parametrize("lowering", ["spatial", "spatial-h", "stack"])
def test_fuse_options_and_keywords_give_the_same_model(xvolified: nn.Module, lowering: str) -> None:
    by_keywords, report_k = fuse_with_report(xvolified, example_inputs=X, lowering=lowering, rtol=1e-4)
    by_options, report_o = fuse_with_report(xvolified, example_inputs=X,
                                            options=FuseOptions(lowering=lowering, rtol=1e-4))
    assert report_k.lowerings() == report_o.lowerings() == dict.fromkeys(SITES, lowering)
    with torch.no_grad():
        out_k, out_o = by_keywords(X), by_options(X)
    assert torch.equal(out_k, out_o)
    assert rel_error(out_o, float64_run(xvolified, X)) <= 1e-4
    assert report_o.max_rel_error is not None and report_o.max_rel_error <= 1e-4


def test_a_keyword_other_than_its_default_replaces_the_option(xvolified: nn.Module) -> None:
    options = FuseOptions(lowering="channel", single_conv=False)
    _, report = fuse_with_report(xvolified, example_inputs=X, options=options, lowering="split")
    assert report.lowerings() == dict.fromkeys(SITES, "split")  # the keyword won; single_conv=False kept
    _, report = fuse_with_report(xvolified, example_inputs=X, options=options)
    assert report.lowerings() == dict.fromkeys(SITES, "channel")
    fused = fuse(xvolified, example_inputs=X, options=FuseOptions(verify=False), lowering="spatial")
    assert fused.xvol_fusion_report.lowerings() == dict.fromkeys(SITES, "spatial")
    assert fused.xvol_fusion_report.max_rel_error is None  # verify=False from the options: nothing compared


def test_fuse_onnx_options_and_keywords_write_the_same_graph(xvolified: nn.Module, tmp_path: Path) -> None:
    path = tmp_path / "unfused.onnx"
    export_onnx(xvolified, path, (X[:1],), dynamo=False)
    by_keywords, report_k = fuse_onnx(path, lowering="split", single_conv=False)
    by_options, report_o = fuse_onnx(path, options=FuseOptions(lowering="split", single_conv=False))
    assert by_keywords.SerializeToString() == by_options.SerializeToString()
    assert report_k.lowerings() == report_o.lowerings() and set(report_o.lowerings().values()) == {"split"}
    session = onnx_session(by_options, threads=1)
    (out,) = session.run(None, {session.get_inputs()[0].name: X.numpy()})
    assert rel_error(out, float64_run(xvolified, X)) <= 1e-4


def test_xvolify_options_and_keywords_give_the_same_model() -> None:
    keywords: dict[str, Any] = {"shift": 2, "directions": "axial", "extra_branches": ["1x1"]}
    torch.manual_seed(3)
    by_keywords, report_k = xvolify_with_report(tiny_cnn(), example_inputs=X[:1], **keywords)
    torch.manual_seed(3)
    original = tiny_cnn().eval()
    by_options, report_o = xvolify_with_report(original, example_inputs=X[:1], options=XvolifyOptions(**keywords))
    assert str(report_k) == str(report_o) and report_o.selected_names == SITES
    state_k, state_o = by_keywords.state_dict(), by_options.state_dict()
    assert state_k.keys() == state_o.keys() and all(torch.equal(state_k[k], state_o[k]) for k in state_k)
    with torch.no_grad():  # attention gammas start at 0: the result computes what the original computes
        assert torch.equal(by_options.eval()(X), original(X))
    assert xvolify(tiny_cnn(), example_inputs=X[:1], options=XvolifyOptions(shift=2)).get_submodule("3.0").shift \
        == by_options.get_submodule("3.0").shift


def test_options_are_frozen_and_normalised() -> None:
    options = XvolifyOptions(shift=[1, 2], extra_branches=["1x1", "bn"])
    assert options.shift == (1, 2) and options.extra_branches == ("1x1", "bn")
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.shift = 3  # type: ignore[misc]
    assert FuseOptions(skip=["conv+bn"]).skip == ("conv+bn",)
    assert FuseOptions().backend_or("eager") == "eager" and FuseOptions(backend="compile").backend_or("x") == "compile"


# --------------------------------------------------------------------------- one check per option


@pytest.mark.parametrize(("fields", "named"), [
    ({"verify": "yes"}, "verify="),
    ({"rtol": float("nan")}, "rtol="),
    ({"atol": "1e-5"}, "atol="),
    ({"inplace": 1}, "inplace="),
    ({"backend": "tensorrt"}, "backend="),
    ({"lowering": "fastest"}, "lowering="),
    ({"lowering": {"3.0": "diagonal"}}, "lowering="),
    ({"lowering": "split"}, "single_conv=False"),
    ({"single_conv": None}, "single_conv="),
    ({"graph": "no"}, "graph="),
    ({"skip": "conv+bn"}, "skip="),
])
def test_bad_fuse_option_names_itself(fields: dict[str, Any], named: str) -> None:
    with pytest.raises(ArgumentError, match=named):
        FuseOptions(**fields)


@pytest.mark.parametrize(("fields", "named"), [
    ({"shift": 0}, "shift="),
    ({"shift": 1.5}, "shift="),
    ({"directions": "diagonal"}, "directions="),
    ({"directional": "yes"}, "directional="),
    ({"extra_branches": "1x1"}, "extra_branches="),
    ({"extra_branches": ("3x3",)}, "extra_branches"),
    ({"attention": "local"}, "attention="),
    ({"qk_channels": 0, "attention": "global"}, "qk_channels="),
    ({"qk_channels": 4}, "qk_channels applies to attention='global'"),
    ({"directional": True, "attention": "global"}, "directional=True applies to PSSA only"),
    ({"inplace": "no"}, "inplace="),
    ({"kind": "cars"}, "kind="),
    ({"analysis": "trace"}, "analysis="),
])
def test_bad_xvolify_option_names_itself(fields: dict[str, Any], named: str) -> None:
    with pytest.raises(ArgumentError, match=named):
        XvolifyOptions(**fields)


def test_a_bad_keyword_is_refused_by_the_same_check_before_any_work(xvolified: nn.Module) -> None:
    with pytest.raises(ArgumentError, match="rtol="):
        fuse(xvolified, example_inputs=X, rtol="1e-4")
    with pytest.raises(ArgumentError, match="backend="):
        fuse(xvolified, example_inputs=X, options=FuseOptions(), backend="tpu")
    with pytest.raises(ArgumentError, match="shift="):
        xvolify(tiny_cnn(), example_inputs=X[:1], options=XvolifyOptions(), shift=0)
    with pytest.raises(ArgumentError, match="options=XvolifyOptions: use a FuseOptions"):
        fuse(xvolified, example_inputs=X, options=XvolifyOptions())  # type: ignore[arg-type]


def test_fuse_onnx_refuses_options_that_only_fuse_reads(tmp_path: Path) -> None:
    model = onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("Relu", ["x"], ["y"])], "relu",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 2])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 2])]))
    for options, named in [(FuseOptions(backend="eager"), "backend='eager'"), (FuseOptions(atol=1e-5), "atol="),
                           (FuseOptions(inplace=True), "inplace="), (FuseOptions(graph=True), "graph=")]:
        with pytest.raises(ArgumentError, match=named):
            fuse_onnx(model, options=options)
    fused, report = fuse_onnx(model, options=FuseOptions(backend="onnxruntime"))
    assert fused.SerializeToString() == model.SerializeToString() and not report.outcomes
