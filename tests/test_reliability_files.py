"""Files in and out under hostile conditions: corrupt ONNX tensors, unwritable or missing output folders,
commands that must write all their outputs or none, and ONNX convs with asymmetric padding.

Unwritable folders: a read-only temporary directory, or, where that is writable anyway (root ignores
permissions), /sys; the fixture checks that creating a file there really fails.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from xvol_compiler.checkpoint import save_checkpoint
from xvol_compiler.cli import main
from xvol_compiler.onnx_io import OnnxFileError, export_onnx, external_data_path, load_onnx, save_onnx
from xvol_compiler.verify import onnx_session
from xvol_passes.fuse_onnx import fuse_onnx

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--num-classes", "10", "--input-size", "32"]


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


@pytest.fixture
def unwritable(tmp_path: Path) -> Iterator[Path]:
    """A directory in which creating a file fails (checked here, so no test silently writes)."""
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        for candidate in (locked, Path("/sys")):
            try:
                fd, name = tempfile.mkstemp(dir=candidate)
            except OSError:
                yield candidate
                return
            os.close(fd)
            os.unlink(name)
        pytest.fail("found no directory where creating a file fails")
    finally:
        locked.chmod(0o755)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def run_cli(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def _f32(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32)


def conv_bn_model(
    conv_attrs: dict[str, object], *, in_shape: Sequence[int | str] = (1, 3, 10, 10), seed: int = 0,
) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """x -> Conv(8 x C x 3 x 3, bias) -> BatchNormalization -> y, written with onnx.helper; and its weights."""
    rng = np.random.default_rng(seed)
    weights = {
        "w": _f32(rng, 8, int(in_shape[1]), 3, 3), "b": _f32(rng, 8),
        "scale": (1 + 0.3 * rng.standard_normal(8)).astype(np.float32), "shift": _f32(rng, 8),
        "mean": _f32(rng, 8), "var": (0.5 + rng.random(8)).astype(np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", kernel_shape=[3, 3], **conv_attrs),
        helper.make_node("BatchNormalization", ["c", "scale", "shift", "mean", "var"], ["y"], name="bn",
                         epsilon=1e-5),
    ]
    graph = helper.make_graph(
        nodes, "conv_bn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(in_shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None] * 4)],
        [numpy_helper.from_array(v, k) for k, v in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model, weights


def reference_conv_bn(x: np.ndarray, weights: dict[str, np.ndarray], pads: tuple[tuple[int, int], ...],
                      stride: int) -> np.ndarray:
    """The literal definition in float64: zero pad (begin, end) per axis, convolve, normalize."""
    w = {k: torch.from_numpy(v).double() for k, v in weights.items()}
    t = F.pad(torch.from_numpy(x).double(), [pads[1][0], pads[1][1], pads[0][0], pads[0][1]])
    c = F.conv2d(t, w["w"], w["b"], stride=stride)
    y = (c - w["mean"][:, None, None]) / torch.sqrt(w["var"][:, None, None] + 1e-5)
    return (y * w["scale"][:, None, None] + w["shift"][:, None, None]).numpy()


def ort_run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = onnx_session(model)
    return session.run(None, {"x": x})[0]


def rel(a: np.ndarray, b: np.ndarray) -> float:
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a64 - b64).max() / np.abs(b64).max())


def cut_initializer(model: onnx.ModelProto, name: str) -> onnx.ModelProto:
    """The model with the raw data of initializer ``name`` cut to half."""
    broken = onnx.ModelProto()
    broken.CopyFrom(model)
    init = next(t for t in broken.graph.initializer if t.name == name)
    init.raw_data = init.raw_data[: len(init.raw_data) // 2]
    return broken


# ---------------------------------------------------------------------------
# corrupt tensors are OnnxFileError naming the tensor and the file
# ---------------------------------------------------------------------------


def test_initializer_cut_to_half_names_the_tensor_and_the_file(tmp_path: Path) -> None:
    model, _ = conv_bn_model({"pads": [1, 1, 1, 1]})
    bad = tmp_path / "cut.onnx"
    bad.write_bytes(cut_initializer(model, "w").SerializeToString())
    out = tmp_path / "out.onnx"
    with pytest.raises(OnnxFileError, match=r"cut\.onnx: initializer 'w' holds 432 bytes .* needs 864") as err:
        fuse_onnx(bad, output_path=out)
    assert "reshape" not in str(err.value) and "\n" not in str(err.value)
    assert leftovers(tmp_path) == ["cut.onnx"]
    with pytest.raises(OnnxFileError, match="initializer 'w'"):
        load_onnx(bad)
    with pytest.raises(OnnxFileError, match="initializer 'w'"):  # a ModelProto given directly, too
        fuse_onnx(cut_initializer(model, "w"))


def test_corrupt_tensors_in_other_places_are_onnx_file_errors(tmp_path: Path) -> None:
    model, weights = conv_bn_model({"pads": [1, 1, 1, 1]})
    # The conv weight as a Constant node whose value is cut to half.
    as_constant = onnx.ModelProto()
    as_constant.CopyFrom(model)
    init = next(t for t in as_constant.graph.initializer if t.name == "w")
    value = onnx.TensorProto()
    value.CopyFrom(init)
    value.raw_data = value.raw_data[:100]
    as_constant.graph.initializer.remove(init)
    as_constant.graph.node.insert(0, helper.make_node("Constant", [], ["w"], name="w_const", value=value))
    # A BatchNorm parameter stored as float_data with one value too many.
    extra = onnx.ModelProto()
    extra.CopyFrom(model)
    var = next(t for t in extra.graph.initializer if t.name == "var")
    var.ClearField("raw_data")
    var.float_data.extend([*weights["var"].tolist(), 1.0])
    # (the Constant's data is also caught by onnx.checker, which names it "tensor name: w")
    for name, broken, needle in [("constant.onnx", as_constant, "(Constant attribute 'value'|tensor name: w)"),
                                 ("float_data.onnx", extra, "initializer 'var'")]:
        path = tmp_path / name
        path.write_bytes(broken.SerializeToString())
        with pytest.raises(OnnxFileError, match=f"{name}.*{needle}"):
            fuse_onnx(path)


def test_truncated_external_data_names_the_tensor(tmp_path: Path) -> None:
    model, _ = conv_bn_model({"pads": [1, 1, 1, 1]}, in_shape=(1, 16, 10, 10))
    path = tmp_path / "ext.onnx"
    save_onnx(model, path, external_data=True)
    data = external_data_path(path)
    assert data.stat().st_size == 8 * 16 * 9 * 4  # the conv weight went to the data file
    data.write_bytes(data.read_bytes()[:1000])
    with pytest.raises(OnnxFileError, match=r"ext\.onnx.*'w'"):
        fuse_onnx(path)


def test_cli_reports_a_corrupt_initializer_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model, _ = conv_bn_model({"pads": [1, 1, 1, 1]})
    bad = tmp_path / "cut.onnx"
    bad.write_bytes(cut_initializer(model, "w").SerializeToString())
    for argv in (["fuse-onnx", bad, "-o", tmp_path / "out.onnx"], ["verify", bad]):
        code, err = run_cli(capsys, *argv)
        assert code == 1
        assert err.startswith("xvol: error:") and "initializer 'w'" in err and "cut.onnx" in err, err
    assert leftovers(tmp_path) == ["cut.onnx"]


# ---------------------------------------------------------------------------
# unwritable and missing output folders: refused before any work, naming the real path
# ---------------------------------------------------------------------------


def _assert_output_error(err: BaseException, path: Path, why: str) -> None:
    text = str(err)
    assert str(path) in text and why in text, text
    assert ".tmp" not in text, text
    from xvol_compiler.files import OutputError

    assert isinstance(err, OutputError), type(err)


def test_fuse_onnx_refuses_an_unwritable_folder_before_loading(
    tmp_path: Path, unwritable: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    model, _ = conv_bn_model({"pads": [1, 1, 1, 1]})
    src = tmp_path / "in.onnx"
    src.write_bytes(model.SerializeToString())

    def no_work(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr("xvol_passes.fuse_onnx.load_onnx", no_work)
    out = unwritable / "out.onnx"
    with pytest.raises(ValueError) as err:
        fuse_onnx(src, output_path=out)
    _assert_output_error(err.value, out, "not writable")


def test_fuse_onnx_checks_the_output_data_file_before_fusing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, _ = conv_bn_model({"pads": [1, 1, 1, 1]}, in_shape=(1, 16, 10, 10))
    src = tmp_path / "ext.onnx"
    save_onnx(model, src, external_data=True)
    out = tmp_path / "out.onnx"
    external_data_path(out).write_bytes(b"someone else's weights")

    def no_work(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was fused before its data file was checked")

    monkeypatch.setattr("xvol_passes.fuse_onnx.run_rules", no_work)
    with pytest.raises(FileExistsError, match=r"out\.onnx\.data exists"):
        fuse_onnx(src, output_path=out)
    assert external_data_path(out).read_bytes() == b"someone else's weights" and not out.exists()


def test_export_onnx_refuses_an_unwritable_folder_before_exporting(
    unwritable: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_work(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was exported before the output was checked")

    monkeypatch.setattr(torch.onnx, "export", no_work)
    out = unwritable / "m.onnx"
    with pytest.raises(ValueError) as err:
        export_onnx(nn.Conv2d(1, 1, 1), out, (torch.randn(1, 1, 2, 2),), dynamo=False)
    _assert_output_error(err.value, out, "not writable")


def test_missing_folder_is_refused_not_created(tmp_path: Path) -> None:
    model, _ = conv_bn_model({"pads": [1, 1, 1, 1]})
    missing = tmp_path / "missing"
    with pytest.raises(ValueError) as err:
        save_checkpoint(missing / "c.pt", nn.Linear(2, 2))
    _assert_output_error(err.value, missing, "does not exist: create it first")
    with pytest.raises(ValueError) as err:
        save_onnx(model, missing / "m.onnx")
    _assert_output_error(err.value, missing, "does not exist: create it first")
    assert not missing.exists()
    # A "folder" that is a regular file.
    plain = tmp_path / "file.txt"
    plain.write_text("not a folder")
    with pytest.raises(ValueError) as err:
        save_onnx(model, plain / "m.onnx")
    _assert_output_error(err.value, plain, "is not a directory")
    assert plain.read_text() == "not a folder"


def test_checkpoint_and_picture_refuse_an_unwritable_folder(unwritable: Path) -> None:
    with pytest.raises(ValueError) as err:
        save_checkpoint(unwritable / "c.pt", nn.Linear(2, 2))
    _assert_output_error(err.value, unwritable / "c.pt", "not writable")
    import networkx as nx

    from xvol_compiler.pictures import draw_graphs

    g = nx.DiGraph()
    g.add_edge("a", "b")
    with pytest.raises(ValueError) as err:
        draw_graphs([("g", g)], unwritable / "g.png")
    _assert_output_error(err.value, unwritable / "g.png", "not writable")


@pytest.mark.parametrize("command", ["xvolify", "export", "graph"])
def test_cli_single_output_commands_check_before_loading(
    command: str, unwritable: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_work(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr("xvol_compiler.cli.common.load_model_arg", no_work)
    out = unwritable / ("out.png" if command == "graph" else "out.onnx" if command == "export" else "out.pt")
    code, err = run_cli(capsys, command, "resnet18", *SMALL, "-o", out)
    assert code == 1
    assert err.startswith("xvol: error:") and str(out) in err and "not writable" in err, err


# ---------------------------------------------------------------------------
# commands with several outputs write all of them or none
# ---------------------------------------------------------------------------


def test_cli_fuse_with_unwritable_onnx_writes_no_checkpoint(
    tmp_path: Path, unwritable: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "p1.pt"
    code, err = run_cli(capsys, "fuse", "resnet18", *SMALL, "-o", out, "--onnx", unwritable / "p1.onnx")
    assert code == 1
    assert str(unwritable / "p1.onnx") in err and "not writable" in err, err
    assert leftovers(tmp_path) == ["locked"]  # (the fixture's folder) and no p1.pt


def test_cli_fuse_failing_export_leaves_no_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    def failing_export(*args: object, **kwargs: object) -> None:
        raise OSError("No space left on device")

    monkeypatch.setattr("xvol_passes.fuse_onnx.export_onnx", failing_export)
    code, err = run_cli(capsys, "fuse", "resnet18", *SMALL, "--no-verify", "-o", tmp_path / "p1.pt",
                        "--onnx", tmp_path / "p1.onnx")
    assert code == 1 and "No space left" in err
    assert leftovers(tmp_path) == []


def test_cli_fuse_onnx_with_unwritable_report_writes_no_model(
    tmp_path: Path, unwritable: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    model, _ = conv_bn_model({"pads": [1, 1, 1, 1]})
    src = tmp_path / "in.onnx"
    src.write_bytes(model.SerializeToString())
    out, report = tmp_path / "out.onnx", unwritable / "report.json"
    code, err = run_cli(capsys, "fuse-onnx", src, "-o", out, "--report", report)
    assert code == 1 and str(report) in err and "not writable" in err, err
    assert not out.exists()


def test_cli_fuse_onnx_failing_report_writes_no_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    model, _ = conv_bn_model({"pads": [1, 1, 1, 1]})
    src = tmp_path / "in.onnx"
    src.write_bytes(model.SerializeToString())

    def failing(self: object) -> None:
        raise RuntimeError("report cannot be rendered")

    monkeypatch.setattr("xvol_compiler.fusion_report.FusionReport.to_dict", failing)
    # An unexpected exception is a bug: the command lets it through with its traceback, and writes nothing.
    with pytest.raises(RuntimeError, match="report cannot be rendered"):
        run_cli(capsys, "fuse-onnx", src, "-o", tmp_path / "out.onnx", "--report", tmp_path / "r.json")
    assert leftovers(tmp_path) == ["in.onnx"]
    monkeypatch.undo()
    code, err = run_cli(capsys, "fuse-onnx", src, "-o", tmp_path / "out.onnx", "--report", tmp_path / "r.json")
    assert code == 0, err
    assert leftovers(tmp_path) == ["in.onnx", "out.onnx", "r.json"]


def test_cli_same_file_for_two_outputs_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model, _ = conv_bn_model({"pads": [1, 1, 1, 1]})
    src = tmp_path / "in.onnx"
    src.write_bytes(model.SerializeToString())
    code, err = run_cli(capsys, "fuse-onnx", src, "-o", tmp_path / "o.onnx", "--report", tmp_path / "o.onnx")
    assert code == 1 and "two outputs" in err, err
    assert leftovers(tmp_path) == ["in.onnx"]


def test_demo_refuses_an_unwritable_out_folder_before_training(unwritable: Path, capsys: pytest.CaptureFixture[str],
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    spec = importlib.util.spec_from_file_location("xvol_demo_files", ROOT / "examples" / "demo.py")
    assert spec is not None and spec.loader is not None
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)

    def no_work(*args: object, **kwargs: object) -> None:
        raise AssertionError("the demo started working before checking its output folder")

    monkeypatch.setattr(demo, "torchvision_model", no_work)
    out = unwritable / "demo-out"
    assert demo.main(["--steps", "1", "--quick", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert str(unwritable) in " ".join(err.split()) and "not writable" in err, err
    assert not out.exists()


def test_files_written_together_are_undone_together(tmp_path: Path) -> None:
    from xvol_compiler.files import OutputExistsError, atomic_write_text, written_together

    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("old a")
    # An error inside the block: nothing appears, nothing is replaced.
    with pytest.raises(RuntimeError, match="late failure"), written_together():
        atomic_write_text(a, "new a", force=True)
        atomic_write_text(b, "new b")
        raise RuntimeError("late failure")
    assert a.read_text() == "old a" and leftovers(tmp_path) == ["a.txt"]
    # A rename that fails at the end (b appeared meanwhile, no force): a gets its old content back.
    with pytest.raises(OutputExistsError, match=r"b\.txt exists"), written_together():
        atomic_write_text(a, "new a", force=True)
        atomic_write_text(b, "new b")
        b.write_text("someone else's b")
    assert a.read_text() == "old a" and b.read_text() == "someone else's b"
    assert leftovers(tmp_path) == ["a.txt", "b.txt"]
    # Success: both written, no temporary left.
    b.unlink()
    with written_together():
        atomic_write_text(a, "new a", force=True)
        atomic_write_text(b, "new b")
        assert not b.exists()  # held back until the block ends
    assert a.read_text() == "new a" and b.read_text() == "new b"
    assert leftovers(tmp_path) == ["a.txt", "b.txt"]
    # Scratch files read back at once are written now, even inside a group.
    from xvol_compiler.files import written_now

    with pytest.raises(RuntimeError, match="late failure"), written_together():
        atomic_write_text(a, "newer a", force=True)
        with written_now():
            atomic_write_text(tmp_path / "scratch.txt", "read me")
        assert (tmp_path / "scratch.txt").read_text() == "read me"
        raise RuntimeError("late failure")
    assert a.read_text() == "new a"


# ---------------------------------------------------------------------------
# asymmetric Conv padding: BatchNorm folds, branch sums still check alignment
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("attrs", "pads", "stride"),
    [
        ({"pads": [0, 2, 1, 0]}, ((0, 1), (2, 0)), 1),  # ONNX order: h_begin, w_begin, h_end, w_end
        ({"auto_pad": "SAME_UPPER", "strides": [2, 2]}, ((0, 1), (0, 1)), 2),  # 10 px, k3, s2: total 1, end side
        ({"auto_pad": "SAME_LOWER", "strides": [2, 2]}, ((1, 0), (1, 0)), 2),
    ],
    ids=["pads-0210", "same-upper-s2", "same-lower-s2"],
)
def test_conv_bn_with_asymmetric_pads_folds_exactly(
    attrs: dict[str, object], pads: tuple[tuple[int, int], ...], stride: int,
) -> None:
    model, weights = conv_bn_model(attrs)
    fused, report = fuse_onnx(model)
    assert report.count("conv+bn") == 1, report
    assert not report.refused, report
    assert [n.op_type for n in fused.graph.node] == ["Conv"]
    x = np.random.default_rng(1).standard_normal((1, 3, 10, 10)).astype(np.float32)
    expected = reference_conv_bn(x, weights, pads, stride)
    assert ort_run(model, x).shape == expected.shape
    assert rel(ort_run(fused, x), expected) <= 1e-5
    assert report.max_rel_error is not None and report.max_rel_error <= 1e-5


def test_same_upper_with_stride_on_unknown_size_is_still_refused() -> None:
    model, _ = conv_bn_model({"auto_pad": "SAME_UPPER", "strides": [2, 2]}, in_shape=("n", 3, "h", "w"))
    _, report = fuse_onnx(model)
    assert report.count("conv+bn") == 0
    assert any("unknown size" in o.reason for o in report.refused), report


def _two_branch_model(pads_a: list[int], pads_b: list[int]) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    rng = np.random.default_rng(2)
    weights = {"wa": _f32(rng, 4, 3, 3, 3), "ba": _f32(rng, 4), "wb": _f32(rng, 4, 3, 3, 3), "bb": _f32(rng, 4)}
    nodes = [
        helper.make_node("Conv", ["x", "wa", "ba"], ["a"], name="conv_a", kernel_shape=[3, 3], pads=pads_a),
        helper.make_node("Conv", ["x", "wb", "bb"], ["b"], name="conv_b", kernel_shape=[3, 3], pads=pads_b),
        helper.make_node("Add", ["a", "b"], ["y"], name="add"),
    ]
    graph = helper.make_graph(
        nodes, "two_branches", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None] * 4)],
        [numpy_helper.from_array(v, k) for k, v in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model, weights


def _branch_reference(x: np.ndarray, weights: dict[str, np.ndarray], pads_a: list[int],
                      pads_b: list[int]) -> np.ndarray:
    t = torch.from_numpy(x).double()
    out = 0
    for key, p in (("a", pads_a), ("b", pads_b)):
        padded = F.pad(t, [p[1], p[3], p[0], p[2]])
        out = out + F.conv2d(padded, torch.from_numpy(weights[f"w{key}"]).double(),
                             torch.from_numpy(weights[f"b{key}"]).double())
    return out.numpy()


def test_branch_sum_with_aligned_asymmetric_pads_fuses_exactly() -> None:
    pads = [0, 1, 2, 1]
    model, weights = _two_branch_model(pads, pads)
    fused, report = fuse_onnx(model)
    assert report.count("branch-sum") == 1, report
    x = np.random.default_rng(3).standard_normal((1, 3, 8, 8)).astype(np.float32)
    assert rel(ort_run(fused, x), _branch_reference(x, weights, pads, pads)) <= 1e-5


def test_branch_sum_with_misaligned_pads_is_refused() -> None:
    # Same output size, but the branches read windows two rows apart: not one convolution.
    pads_a, pads_b = [0, 1, 2, 1], [2, 1, 0, 1]
    model, weights = _two_branch_model(pads_a, pads_b)
    fused, report = fuse_onnx(model)
    assert report.count("branch-sum") == 0
    assert any("misaligned" in o.reason for o in report.refused), report
    x = np.random.default_rng(4).standard_normal((1, 3, 8, 8)).astype(np.float32)
    assert rel(ort_run(fused, x), _branch_reference(x, weights, pads_a, pads_b)) <= 1e-5


def test_fold_math_merges_asymmetric_geometry_like_the_definition() -> None:
    """The shared fold math on (begin, end) pads: a 1x1 branch embedded into an asymmetric 3x3."""
    from xvol_compiler.fold import Branch, ConvGeometry, merge_branches

    torch.manual_seed(0)
    big = ConvGeometry(3, 4, (3, 3), (1, 1), ((0, 2), (1, 1)), (1, 1), 1)
    small = ConvGeometry(3, 4, (1, 1), (1, 1), (0, 0), (1, 1), 1)
    wa, ba = torch.randn(4, 3, 3, 3, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    wb, bb = torch.randn(4, 3, 1, 1, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    merged = merge_branches([Branch(("x",), (3,), big, wa, ba), Branch(("x",), (3,), small, wb, bb)])
    assert merged.geometry.pads() == ((0, 2), (1, 1))
    x = torch.randn(2, 3, 7, 6, dtype=torch.float64)
    expected = F.conv2d(F.pad(x, [1, 1, 0, 2]), wa, ba) + F.conv2d(x, wb, bb)
    (pt, pb), (pl, pr) = merged.geometry.pads()
    got = F.conv2d(F.pad(x, [pl, pr, pt, pb]), merged.weight, merged.bias)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.filterwarnings("ignore:Using padding='same'")
def test_fx_folds_bn_into_an_asymmetric_same_conv() -> None:
    """The FX side has no asymmetric-padding refusal: padding='same' with an even kernel (pads 1 and 2)."""
    from xvol_compiler import fuse

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 4, padding="same"), nn.BatchNorm2d(8))
    with torch.no_grad():
        model[1].running_mean.normal_()
        model[1].running_var.uniform_(0.5, 1.5)
        model[1].weight.normal_()
    model.eval()
    x = torch.randn(2, 3, 9, 9)
    fused = fuse(model, example_inputs=(x,))
    assert fused.xvol_fusion_report.count("conv+bn") == 1
    with torch.no_grad():
        expected = copy.deepcopy(model).double()(x.double())
        got = fused(x).double()
    assert float((got - expected).abs().max() / expected.abs().max()) <= 1e-5
