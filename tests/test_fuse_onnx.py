"""ONNX fusion pass: exported graphs of both torch exporters (dynamo with and without its
optimizer, TorchScript; opsets 17-21; dynamic batch) fused by ``fuse_onnx`` and checked in
onnxruntime against the unfused graph and against float64 eager PyTorch; site geometries
by hypothesis; xvolified ResNets; FX round trip; bad files, atomic writes, external data."""

from __future__ import annotations

import io
import os
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from tests.hyp import examples
from tests.onnx_counts import site_convs
from tests.strategies import SiteSpec, conv_sites, randomize_bn
from xvol_compiler import XVolution
from xvol_compiler.fold import FoldError
from xvol_compiler.onnx_io import OnnxFileError, OutputExistsError, export_onnx, external_data_path, save_onnx
from xvol_compiler.verify import onnx_session
from xvol_passes.fuse_onnx import NO_SITES_NOTE, OnnxVerificationError, fuse_onnx

CONFIGS = {
    "dynamo": dict(dynamo=True, optimize=True),
    "dynamo-noopt": dict(dynamo=True, optimize=False),
    "dynamo-opset21": dict(dynamo=True, optimize=False, opset=21),
    "legacy": dict(dynamo=False),
    "legacy-opset17": dict(dynamo=False, opset=17),
}
TOL = 1e-4


# ----------------------------------------------------------------------------- helpers


def session(model: onnx.ModelProto | str | Path) -> ort.InferenceSession:
    return onnx_session(model, threads=1)


def run(model: onnx.ModelProto | str | Path, x: torch.Tensor) -> np.ndarray:
    s = session(model)
    return s.run(None, {s.get_inputs()[0].name: x.numpy()})[0]


def rel(a: np.ndarray | torch.Tensor, ref: np.ndarray | torch.Tensor) -> float:
    a64 = np.asarray(a, dtype=np.float64)
    r64 = np.asarray(ref.detach().numpy() if isinstance(ref, torch.Tensor) else ref, dtype=np.float64)
    return float(np.abs(a64 - r64).max() / max(np.abs(r64).max(), 1e-12))


def eager64(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    import copy

    m = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        return m(x.double())


def ops(model: onnx.ModelProto) -> Counter[str]:
    return Counter(n.op_type for n in model.graph.node)


def conv_sums(model: onnx.ModelProto) -> list[str]:
    """Adds whose two operands are both Conv outputs (what fusion removes)."""
    producer = {o: n.op_type for n in model.graph.node for o in n.output}
    return [n.name for n in model.graph.node
            if n.op_type == "Add" and all(producer.get(i) == "Conv" for i in n.input)]


def plain_convs(model: nn.Module) -> int:
    """Convolutions of the deploy form: every nn.Conv outside an XVolution, plus one per site."""
    count = 0
    for m in model.modules():
        if isinstance(m, XVolution):
            count += 1
        elif isinstance(m, nn.Conv2d | nn.Conv1d | nn.Conv3d) and not _inside_site(model, m):
            count += 1
    return count


def _inside_site(model: nn.Module, conv: nn.Module) -> bool:
    return any(conv is sub for site in model.modules() if isinstance(site, XVolution) for sub in site.modules())


class RepVGGBlock(nn.Module):
    """3x3 conv + BN, 1x1 conv + BN and a BN identity, summed (RepVGG training block)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.k3 = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))
        self.k1 = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c))
        self.ident = nn.BatchNorm2d(c)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.k3(x) + self.k1(x) + self.ident(x))


def zoo() -> nn.Module:
    """One small net with every kind of site: conv+BN, X-volution with groups 1 / 2 / depthwise,
    directional, shift 2 on 4 axial directions, extra branches, a RepVGG block."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        XVolution.from_conv(nn.Conv2d(8, 8, 3, padding=1), extra_branches=("1x1", "identity", "bn")), nn.ReLU(),
        XVolution.from_conv(nn.Conv2d(8, 12, 3, padding=1, groups=2), directional=True), nn.ReLU(),
        XVolution.from_conv(nn.Conv2d(12, 12, 3, stride=2, padding=2, dilation=2, groups=12), shift=2,
                            directions="axial"),
        nn.ReLU(),
        RepVGGBlock(12),
        nn.Conv2d(12, 6, 1), nn.BatchNorm2d(6),
    )
    return randomize_bn(net, seed=1).eval()


ZOO_SITES = 3
ZOO_CONVS = 6  # stem, three sites, the RepVGG block, the head


# ----------------------------------------------------------------------------- exporters x small models


@pytest.fixture(scope="module")
def zoo_model() -> nn.Module:
    return zoo()


@pytest.mark.parametrize("config", list(CONFIGS))
def test_zoo_every_exporter(zoo_model: nn.Module, config: str) -> None:
    x = torch.randn(2, 3, 12, 12)
    unfused = export_onnx(zoo_model, None, (x,), **CONFIGS[config])
    fused, report = fuse_onnx(unfused)
    assert report.count("x-volution") == ZOO_SITES, str(report)
    assert report.max_rel_error is not None and report.max_rel_error <= TOL
    counts = ops(fused)
    assert site_convs(fused) == ZOO_CONVS
    assert counts["BatchNormalization"] == 0
    assert conv_sums(fused) == []
    onnx.checker.check_model(fused, full_check=True)
    # dynamic batch: another batch size than the export's
    x3 = torch.randn(3, 3, 12, 12)
    assert rel(run(fused, x3), run(unfused, x3)) <= TOL
    assert rel(run(fused, x3), eager64(zoo_model, x3)) <= TOL
    # what the pass keeps
    assert fused.ir_version == unfused.ir_version
    assert list(fused.opset_import) == list(unfused.opset_import)
    assert [i.name for i in fused.graph.input] == [i.name for i in unfused.graph.input]
    assert [o.name for o in fused.graph.output] == [o.name for o in unfused.graph.output]
    assert fused.producer_name == unfused.producer_name
    kept = {(n.name, n.op_type, tuple((p.key, p.value) for p in n.metadata_props))
            for n in unfused.graph.node if n.op_type in ("Relu", "AveragePool")}
    assert kept <= {(n.name, n.op_type, tuple((p.key, p.value) for p in n.metadata_props)) for n in fused.graph.node}
    # fusing the fused model finds nothing more
    again, second = fuse_onnx(fused)
    assert second.fused == [] and NO_SITES_NOTE in second.notes and again is fused


@pytest.mark.parametrize(
    ("make", "kind"),
    [
        (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), "conv+bn"),
        (lambda: nn.Sequential(XVolution.from_conv(nn.Conv2d(3, 4, 3, padding=1))), "x-volution"),
        (lambda: nn.Sequential(XVolution.from_conv(nn.Conv2d(4, 6, 3, padding=1, groups=2))), "x-volution"),
        (lambda: nn.Sequential(XVolution.from_conv(nn.Conv2d(4, 4, 5, padding=2, groups=4))), "x-volution"),
        (lambda: nn.Sequential(XVolution.from_conv(nn.Conv2d(4, 4, 3, padding=1, groups=2), directional=True,
                                                   directions=4, shift=(1, 2))), "x-volution"),
        (lambda: nn.Sequential(XVolution.from_conv(nn.Conv2d(4, 4, 3, padding=1),
                                                   extra_branches=("1x1", "identity"))), "x-volution"),
        (lambda: nn.Sequential(XVolution.from_conv(nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"))),
         "x-volution"),
        (lambda: nn.Sequential(XVolution.from_conv(nn.Conv2d(4, 4, 4, padding="same"))), "x-volution"),
        (lambda: nn.Sequential(XVolution.from_conv(nn.Conv1d(4, 4, 3, padding=1))), "x-volution"),
        (lambda: nn.Sequential(XVolution.from_conv(nn.Conv3d(2, 4, 3, padding=1))), "x-volution"),
        (lambda: RepVGGBlock(4), "branch-sum"),
    ],
    ids=["conv-bn", "xvol-g1", "xvol-g2", "xvol-depthwise", "xvol-directional", "xvol-extra", "xvol-reflect",
         "xvol-same-even", "xvol-1d", "xvol-3d", "repvgg"],
)
def test_single_site(make, kind: str) -> None:
    torch.manual_seed(0)
    model = randomize_bn(make()).eval()
    first = next(m for m in model.modules() if isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d | XVolution))
    x = torch.randn(2, first.in_channels, *([7] * len(first.kernel_size)))
    # (the TorchScript exporter folds conv + BN itself: that case is exported by dynamo without its optimizer)
    unfused = export_onnx(model, None, (x,), **CONFIGS["dynamo-noopt" if kind == "conv+bn" else "legacy"])
    fused, report = fuse_onnx(unfused)
    assert report.count(kind) >= 1, str(report)
    assert site_convs(fused) == 1
    assert ops(fused)["BatchNormalization"] == 0
    assert rel(run(fused, x), run(unfused, x)) <= TOL
    assert rel(run(fused, x), eager64(model, x)) <= TOL


def test_grouped_interleave_modes_agree() -> None:
    model = randomize_bn(nn.Sequential(XVolution.from_conv(nn.Conv2d(6, 6, 3, padding=1, groups=3),
                                                           directional=True))).eval()
    x = torch.randn(2, 6, 9, 8)
    buffer = io.BytesIO()
    torch.onnx.export(model, (x,), buffer, dynamo=False, input_names=["input"], output_names=["output"],
                      dynamic_axes={"input": {0: "n", 2: "h", 3: "w"}, "output": {0: "n", 2: "h", 3: "w"}})
    unfused = onnx.load_from_string(buffer.getvalue())
    reshape, _ = fuse_onnx(unfused, interleave="reshape")
    gather, _ = fuse_onnx(unfused, interleave="gather")
    assert ops(gather)["Gather"] == ops(reshape)["Gather"] + 1
    # dynamic spatial size too: the Reshape interleave reads no static size
    x2 = torch.randn(3, 6, 5, 11)
    assert rel(run(reshape, x2), run(gather, x2)) <= TOL
    assert rel(run(reshape, x2), eager64(model, x2)) <= TOL


def test_global_attention_stays_unfused() -> None:
    """True global attention is no convolution: the site's two convs stay, and the report says why."""
    from xvol_compiler import GlobalAttentionXVolution, xvolify

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
    model = xvolify(net, sites="all", attention="global", example_inputs=torch.randn(1, 3, 16, 16)).eval()
    x = torch.randn(1, 3, 16, 16)
    unfused = export_onnx(model, None, (x,), dynamo=False)
    fused, report = fuse_onnx(unfused)
    assert report.count("x-volution") == 0
    sites = sum(isinstance(m, GlobalAttentionXVolution) for m in model.modules())
    assert sites == 2
    reasons = [o.reason for o in report.refused]
    assert reasons.count("global attention is input-dependent, not a convolution") == sites, str(report)
    assert ops(fused)["Softmax"] == sites
    assert ops(fused)["Conv"] == 5 * sites  # the site's conv, Conv_a, and the Q/K/V projections
    assert rel(run(fused, x), run(unfused, x)) <= TOL


# ----------------------------------------------------------------------------- circular padding


@pytest.mark.parametrize("opset", [17, 20])
@pytest.mark.parametrize("padding", [(0, 1), (2, 1), (1, 0)])
def test_circular_padding_written_as_slices_fuses(opset: int, padding: tuple[int, int]) -> None:
    """TorchScript writes circular padding as Slice/Concat per axis (a single-input Concat where the pad
    is 0); the site still fuses to one Conv, and before opset 19 (no Pad 'wrap') the fused graph pads
    with Slice/Concat too."""
    conv = nn.Conv2d(3, 2, (1, 3), stride=(1, 2), padding=padding, padding_mode="circular")
    model = randomize_bn(nn.Sequential(XVolution.from_conv(conv)), seed=1).eval()
    x = torch.randn(2, 3, 9, 7)
    unfused = export_onnx(model, None, (x,), dynamo=False, opset=opset)
    assert ops(unfused)["Pad"] == 0 and ops(unfused)["Slice"] > 0  # the form under test
    fused, report = fuse_onnx(unfused, example_inputs=[x])
    assert report.count("x-volution") == 1, str(report)
    assert site_convs(fused) == 1
    assert ops(fused)["Pad"] == (1 if opset >= 19 else 0)
    assert rel(run(fused, x), eager64(model, x)) <= TOL


# ----------------------------------------------------------------------------- property test


@settings(max_examples=examples(30))
@given(
    site=conv_sites(ndims=(1, 2, 3), max_kernel=5),
    dynamo=st.sampled_from([False] * 9 + [True]),  # (a dynamo export takes seconds: a few of them)
    directional=st.booleans(),
    shift=st.integers(1, 2),
    axial=st.booleans(),
    extra=st.sampled_from([(), ("1x1",), ("identity",), ("bn",), ("1x1", "identity", "bn")]),
)
def test_random_sites_fuse_exactly(
    site: SiteSpec, dynamo: bool, directional: bool, shift: int, axial: bool, extra: tuple[str, ...]
) -> None:
    conv = site.conv(torch.float32)
    try:
        xvol = XVolution.from_conv(conv, shift=shift, directions="axial" if axial else None,
                                   directional=directional, extra_branches=extra)
    except FoldError:
        xvol = XVolution.from_conv(conv, shift=shift, directions="axial" if axial else None, directional=directional)
    model = randomize_bn(nn.Sequential(xvol), seed=3).eval()
    x = site.input(torch.float32)
    unfused = export_onnx(model, None, (x,), dynamo=dynamo)
    # TorchScript writes padding="same" as auto_pad=SAME_UPPER, which onnxruntime cannot run with a
    # dilation (the fused conv has explicit pads and runs): compare that case with PyTorch only.
    runnable = dynamo or site.padding != "same" or all(d == 1 for d in site.dilation)
    fused, report = fuse_onnx(unfused, example_inputs=[x], verify=runnable)
    assert report.count("x-volution") == 1, str(report)
    assert site_convs(fused) == 1
    assert ops(fused)["BatchNormalization"] == 0
    if runnable:
        assert rel(run(fused, x), run(unfused, x)) <= TOL
    assert rel(run(fused, x), eager64(model, x)) <= TOL


# ----------------------------------------------------------------------------- xvolified torchvision models


def xvolified(name: str, *, train_steps: int = 2, size: int = 64) -> nn.Module:
    """torchvision ``name`` with X-volution at its stage-3 (os16) sites, a few SGD steps on random
    data (so BN statistics and the attention BN move off their initial values), then eval."""
    import torchvision

    from xvol_compiler import xvolify

    torch.manual_seed(0)
    model = xvolify(getattr(torchvision.models, name)(num_classes=10), example_inputs=torch.randn(1, 3, size, size))
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(train_steps):
        x, y = torch.randn(2, 3, size, size), torch.randint(0, 10, (2,))
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    # Running statistics as a trained model has them (a cumulative average over a few batches): two
    # momentum updates alone leave them far from the activations, and second-order PSSA terms overflow.
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(4, 3, size, size))
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, size, size)).isfinite().all()
    assert any(float(m.attn_bn.weight.abs().max()) > 0 for m in model.modules() if isinstance(m, XVolution))
    return model


def check_torchvision(model: nn.Module, config: str, sites: int, size: int = 64) -> None:
    x = torch.randn(2, 3, size, size)
    unfused = export_onnx(model, None, (x,), **CONFIGS[config])
    fused, report = fuse_onnx(unfused)
    assert report.count("x-volution") == sites, str(report)
    assert report.max_rel_error is not None and report.max_rel_error <= TOL
    # one conv per site and per plain conv: no site's branch sum is left (residual adds of a
    # downsample conv and a block's last conv do join two convs, and stay)
    assert site_convs(fused) == plain_convs(model)
    assert ops(fused)["BatchNormalization"] == 0
    x3 = torch.randn(3, 3, size, size)
    ref = eager64(model, x3)
    # Float rounding of this model on this input, measured: the unfused graph's own error against float64.
    # Chained quadratic PSSA sites amplify it (efficientnet_b0's unfused float32 model: up to 5e-3 here).
    rounding = rel(run(unfused, x3), ref)
    assert rel(run(fused, x3), ref) <= max(TOL, 4 * rounding)


@pytest.fixture(scope="module")
def resnet18() -> nn.Module:
    return xvolified("resnet18")


@pytest.fixture(scope="module")
def resnet50() -> nn.Module:
    return xvolified("resnet50")


def test_resnet18_dynamo(resnet18: nn.Module) -> None:
    assert sum(isinstance(m, XVolution) for m in resnet18.modules()) == 4
    check_torchvision(resnet18, "dynamo", sites=4)


def test_resnet50_legacy(resnet50: nn.Module) -> None:
    assert sum(isinstance(m, XVolution) for m in resnet50.modules()) == 6
    check_torchvision(resnet50, "legacy", sites=6)


SLOW_MODELS = {"resnet18": 4, "resnet50": 6, "mobilenet_v3_large": None, "efficientnet_b0": None,
               "regnet_y_400mf": None, "convnext_tiny": None}


@pytest.mark.slow
@pytest.mark.parametrize("config", ["dynamo", "dynamo-noopt", "legacy"])
@pytest.mark.parametrize("name", list(SLOW_MODELS))
def test_torchvision_matrix(name: str, config: str) -> None:
    model = xvolified(name)
    sites = SLOW_MODELS[name]
    check_torchvision(model, config, sites if sites is not None else sum(isinstance(m, XVolution)
                                                                         for m in model.modules()))


# ----------------------------------------------------------------------------- FX round trip


@pytest.mark.parametrize("dynamo", [False, True], ids=["legacy", "dynamo"])
def test_fx_fused_export_matches_onnx_fusion(zoo_model: nn.Module, dynamo: bool) -> None:
    from xvol_compiler import fuse

    x = torch.randn(2, 3, 12, 12)
    fx_fused = fuse(zoo_model, example_inputs=(x,), graph=True)  # the ONNX pass is a graph pass: every rule
    from_fx = export_onnx(fx_fused, None, (x,), dynamo=dynamo)
    from_onnx, _ = fuse_onnx(export_onnx(zoo_model, None, (x,), dynamo=dynamo))
    assert site_convs(from_fx) == site_convs(from_onnx) == ZOO_CONVS
    assert rel(run(from_onnx, x), run(from_fx, x)) <= TOL


# ----------------------------------------------------------------------------- files


@pytest.fixture(scope="module")
def small_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = randomize_bn(nn.Sequential(XVolution.from_conv(nn.Conv2d(3, 4, 3, padding=1)), nn.ReLU())).eval()
    path = tmp_path_factory.mktemp("onnx") / "xvol.onnx"
    export_onnx(model, path, (torch.randn(1, 3, 8, 8),), dynamo=False)
    return path


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"", "empty"),
        (b"\x00\x01\x02garbage\xff" * 37, "not an ONNX model"),
        (os.urandom(4096), "not an ONNX model|not a valid ONNX model"),
        (b"ir_version: 8\ngraph { }", "not an ONNX model|not a valid ONNX model"),
    ],
    ids=["empty", "garbage", "random", "text"],
)
def test_bad_files_rejected(tmp_path: Path, content: bytes, match: str) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(content)
    out = tmp_path / "out.onnx"
    with pytest.raises(OnnxFileError, match=match) as err:
        fuse_onnx(bad, output_path=out)
    assert "\n" not in str(err.value)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.onnx"]


def test_truncated_file_rejected(tmp_path: Path, small_onnx: Path) -> None:
    data = small_onnx.read_bytes()
    for cut in (len(data) // 3, len(data) - 7):
        bad = tmp_path / "cut.onnx"
        bad.write_bytes(data[:cut])
        with pytest.raises(OnnxFileError):
            fuse_onnx(bad, output_path=tmp_path / "out.onnx")
        assert not (tmp_path / "out.onnx").exists()
    with pytest.raises(OnnxFileError, match="no such file"):
        fuse_onnx(tmp_path / "missing.onnx")


def test_no_sites_returns_model_unchanged(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(5))
    x = torch.randn(1, 3, 6, 6)
    model(x)
    path = tmp_path / "plain.onnx"
    proto = export_onnx(model.eval(), path, (x,), dynamo=False)
    fused, report = fuse_onnx(path, output_path=tmp_path / "out.onnx")
    assert report.outcomes == [] and NO_SITES_NOTE in report.notes
    assert fused.SerializeToString() == proto.SerializeToString()
    assert (tmp_path / "out.onnx").read_bytes() == path.read_bytes()


def test_output_is_atomic_and_not_overwritten(tmp_path: Path, small_onnx: Path) -> None:
    out = tmp_path / "fused.onnx"
    out.write_bytes(b"precious")
    with pytest.raises(OutputExistsError, match="force"):
        fuse_onnx(small_onnx, output_path=out)
    assert out.read_bytes() == b"precious"
    fused, report = fuse_onnx(small_onnx, output_path=out, force=True)
    assert report.count("x-volution") == 1
    assert onnx.load(str(out)).SerializeToString() == fused.SerializeToString()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fused.onnx"]  # no temporary left behind
    with pytest.raises(OutputExistsError):
        export_onnx(nn.Conv2d(1, 1, 1), out, (torch.randn(1, 1, 2, 2),), dynamo=False)


def test_external_data_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = randomize_bn(nn.Sequential(XVolution.from_conv(nn.Conv2d(16, 32, 3, padding=1)), nn.ReLU())).eval()
    x = torch.randn(2, 16, 8, 8)
    src = tmp_path / "model.onnx"
    export_onnx(model, src, (x,), dynamo=True, external_data=True)
    weight_bytes = 2 * 32 * 16 * 9 * 4  # the site's conv and Conv_a, float32
    assert external_data_path(src).stat().st_size >= weight_bytes
    out = tmp_path / "fused.onnx"
    _, report = fuse_onnx(src, output_path=out)
    assert report.count("x-volution") == 1
    # external data in, external data out: the fused kernel (32 x 2*16 x 3 x 3) lives in the data file
    assert external_data_path(out).stat().st_size >= weight_bytes
    assert out.stat().st_size < weight_bytes
    # loads with its weights from the data file, and runs like the original
    reloaded = onnx.load(str(out))
    onnx.checker.check_model(str(out), full_check=True)
    assert rel(run(out, x), run(src, x)) <= TOL
    assert rel(run(reloaded, x), eager64(model, x)) <= TOL
    # a data file that went missing is a clear error, not a crash
    external_data_path(src).unlink()
    with pytest.raises(OnnxFileError, match="external data"):
        fuse_onnx(src)


def test_save_refuses_overwrite_of_data_file(tmp_path: Path, small_onnx: Path) -> None:
    model = onnx.load(str(small_onnx))
    out = tmp_path / "m.onnx"
    external_data_path(out).write_bytes(b"someone else's weights")
    with pytest.raises(OutputExistsError):
        save_onnx(model, out, external_data=True)
    assert not out.exists()


def test_verification_failure_raises_and_writes_nothing(tmp_path: Path, small_onnx: Path) -> None:
    out = tmp_path / "fused.onnx"
    with pytest.raises(OnnxVerificationError, match="rtol"):
        fuse_onnx(small_onnx, rtol=-1.0, output_path=out)
    assert not out.exists()
