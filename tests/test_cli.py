"""The `xvol` command: help, site listing, the xvolify -> fuse -> ONNX pipeline, errors without tracebacks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from xvol_compiler.cli import build_parser, main

SUBCOMMANDS = ["sites", "xvolify", "fuse", "export", "fuse-onnx", "verify", "bench", "graph"]
SMALL = ["--num-classes", "10", "--input-size", "32"]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code != 0
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("xvol: error:"), lines
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_help_of_every_subcommand(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert f"usage: xvol {command}" in out
    assert "--json" in out


def test_top_level_help_lists_every_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for command in SUBCOMMANDS:
        assert command in out
    assert {a.dest for a in build_parser()._actions} >= {"command", "traceback"}


def test_sites_resnet50_selects_the_six_layer3_conv2_at_os16(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "sites", "resnet50", "--json")
    assert code == 0
    data = json.loads(out)
    assert data["selected"] == [f"layer3.{i}.conv2" for i in range(6)]
    rows = {s["name"]: s for s in data["sites"]}
    for name in data["selected"]:
        assert rows[name]["output_strides"] == ["16"]
        assert rows[name]["kernel_size"] == [3, 3]
        assert rows[name]["added_macs"] == rows[name]["macs"] > 0
    assert not rows["layer2.0.conv2"]["selected"] and "output stride" in rows["layer2.0.conv2"]["reason"]
    assert 0.16 < data["added_mac_fraction"] < 0.18  # docs/operator.md, section 5: about 17%

    code, out, _ = run(capsys, "sites", "resnet50")
    assert code == 0
    for i in range(6):
        assert f"layer3.{i}.conv2" in out
    assert "6 selected" in out


def test_bad_model_name_is_one_line_with_a_suggestion(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "sites", "resnet51")
    assert_one_line_error(code, err, "resnet51", "did you mean")


def test_missing_files_are_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "fuse", tmp_path / "nope.pt", "-o", tmp_path / "out.pt")
    assert_one_line_error(code, err, "nope.pt")
    code, _, err = run(capsys, "fuse-onnx", tmp_path / "nope.onnx", "-o", tmp_path / "out.onnx")
    assert_one_line_error(code, err, "nope.onnx")
    code, _, err = run(capsys, "verify", tmp_path / "nope.onnx", tmp_path / "nope2.onnx")
    assert_one_line_error(code, err, "nope.onnx")
    assert not (tmp_path / "out.pt").exists() and not (tmp_path / "out.onnx").exists()


def test_corrupt_files_are_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad_onnx = tmp_path / "bad.onnx"
    bad_onnx.write_bytes(b"\x08\x07this is not a protobuf model\xff\xfe" * 10)
    code, _, err = run(capsys, "fuse-onnx", bad_onnx, "-o", tmp_path / "out.onnx")
    assert_one_line_error(code, err, "bad.onnx")
    assert not (tmp_path / "out.onnx").exists()
    code, _, err = run(capsys, "graph", bad_onnx, "-o", tmp_path / "g.png")
    assert_one_line_error(code, err, "bad.onnx")
    bad_ckpt = tmp_path / "bad.pt"
    bad_ckpt.write_bytes(b"not a zip file")
    code, _, err = run(capsys, "fuse", bad_ckpt, "-o", tmp_path / "out.pt")
    assert_one_line_error(code, err, "bad.pt")


def test_entry_point_error_has_no_traceback(tmp_path: Path) -> None:
    exe = Path(sys.executable).with_name("xvol")
    command = [str(exe)] if exe.exists() else [sys.executable, "-m", "xvol_compiler.cli"]
    bad = tmp_path / "corrupt.onnx"
    bad.write_bytes(b"garbage")
    proc = subprocess.run([*command, "fuse-onnx", str(bad), "-o", str(tmp_path / "o.onnx")], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("xvol: error:")


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """resnet18 (10 classes, 32 px) xvolified, fused, exported and fused as ONNX, in one folder."""
    folder = tmp_path_factory.mktemp("pipeline")
    assert main(["xvolify", "resnet18", *SMALL, "-o", str(folder / "x.pt")]) == 0
    assert main(["fuse", str(folder / "x.pt"), "-o", str(folder / "f.pt")]) == 0
    assert main(["export", str(folder / "x.pt"), "-o", str(folder / "x.onnx")]) == 0
    assert main(["fuse-onnx", str(folder / "x.onnx"), "-o", str(folder / "xf.onnx"), "--report",
                 str(folder / "report.json")]) == 0
    return folder


def test_pipeline_outputs_verify(pipeline: Path, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    for name in ("x.pt", "f.pt", "x.onnx", "xf.onnx", "report.json"):
        assert (pipeline / name).is_file(), name
    report = json.loads((pipeline / "report.json").read_text())
    assert sum(o["kind"] == "x-volution" and o["status"] == "fused" for o in report["outcomes"]) == 4
    pairs = [("x.pt", "f.pt"), ("x.pt", "xf.onnx"), ("x.onnx", "xf.onnx")]
    for a, b in pairs:
        argv = ["verify", pipeline / a] + ([pipeline / b] if b else []) + ["--json"]
        code, out, err = run(capsys, *argv)
        assert code == 0, err
        data = json.loads(out)
        assert data["ok"] and data["max_rel_error"] < 1e-4, (a, b, data)


def test_verify_fails_on_different_models(pipeline: Path, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    # resnet34, not resnet18: a resnet18 built from the same seed as the pipeline's is the same function as its
    # fused form (the attention branch starts at zero), which verify rightly accepts in eval mode.
    code, _, err = run(capsys, "verify", "resnet34", pipeline / "f.pt", "--num-classes", "10", "--input-size", "32")
    assert code == 1
    assert "Traceback" not in err and "verification failed" in err


def test_no_overwrite_without_force(pipeline: Path, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    target = pipeline / "x.pt"
    before = target.read_bytes()
    code, _, err = run(capsys, "xvolify", "resnet18", *SMALL, "-o", target)
    assert_one_line_error(code, err, "exists", "--force")
    assert target.read_bytes() == before
    xf = pipeline / "xf.onnx"
    before = xf.read_bytes()
    code, _, err = run(capsys, "fuse-onnx", pipeline / "x.onnx", "-o", xf)
    assert_one_line_error(code, err, "exists")
    assert xf.read_bytes() == before
    code, out, err = run(capsys, "fuse-onnx", pipeline / "x.onnx", "-o", xf, "--force", "--json")
    assert code == 0, err
    assert json.loads(out)["report"]["max_rel_error"] < 1e-4
    assert not [p for p in pipeline.iterdir() if p.name.startswith(".")], "temporary files left behind"


def test_json_outputs_parse(pipeline: Path, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    code, out, _ = run(capsys, "xvolify", "resnet18", *SMALL, "-o", pipeline / "x2.pt", "--sites",
                       "layer3.0.conv2,layer3.1.conv2", "--json")
    assert code == 0
    data = json.loads(out)
    assert data["sites"] == ["layer3.0.conv2", "layer3.1.conv2"]
    code, out, _ = run(capsys, "fuse", pipeline / "x2.pt", "-o", pipeline / "f2.pt", "--json")
    assert code == 0
    assert json.loads(out)["report"]["max_rel_error"] < 1e-4


def test_graph_pictures(pipeline: Path, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    code, out, err = run(capsys, "graph", pipeline / "x.pt", "-o", pipeline / "site.png", "--site",
                         "layer3.0.conv2", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["site"] == "layer3.0.conv2" and all(n > 3 for n in data["nodes"])
    assert (pipeline / "site.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code, _, err = run(capsys, "graph", pipeline / "x.onnx", "-o", pipeline / "site.svg")
    assert code == 0, err
    assert b"<svg" in (pipeline / "site.svg").read_bytes()[:2000]
    code, _, err = run(capsys, "graph", pipeline / "x.pt", "-o", pipeline / "nosite.png", "--site", "layer9.conv")
    assert_one_line_error(code, err, "layer9.conv")


def test_bench_json(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "bench", "resnet18", "--input-size", "32", "--repeats", "2", "--warmup", "0",
                         "--backend", "eager", "--json")
    assert code == 0, err
    data = json.loads(out)
    (result,) = data["results"]
    assert result["backend"] == "eager" and result["batch"] == 1
    assert result["ratio_fused"] > 0 and result["max_rel_error"]["fused"] < 1e-4
    assert data["mac_floor"] == data["macs"]["fused"] / data["macs"]["original"] > 1
    assert data["machine"]["torch"]
    code, _, err = run(capsys, "bench", "resnet18", "--backend", "tensorrt")
    assert_one_line_error(code, err, "tensorrt")


# --------------------------------------------------------------------------- errors: the package's, by type


def test_a_bad_option_is_the_package_error_on_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "xvolify", "resnet18", *SMALL, "--shift", "0", "-o", tmp_path / "x.pt")
    assert code == 1
    assert_one_line_error(code, err, "shift=0", "use an int >= 1")
    assert not (tmp_path / "x.pt").exists()


def test_package_errors_are_one_line_and_bugs_keep_their_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    from xvol_compiler.errors import XvolError
    from xvol_compiler.io import InputError

    raised: list[BaseException] = [
        XvolError("the checkpoint holds no model: write it with xvol xvolify"),
        InputError("resnet99 is not a model: did you mean resnet50?"),  # a package error not derived yet
        PermissionError(13, "Permission denied", "/root/model.pt"),
    ]
    for error in raised:
        def load(args: object, error: BaseException = error) -> None:
            raise error

        monkeypatch.setattr("xvol_compiler.cli.common.load_model_arg", load)
        code, out, err = run(capsys, "sites", "resnet18")
        assert_one_line_error(code, err, str(error).split(":")[0])
        assert code == 1 and out == ""
        with pytest.raises(type(error)):  # --traceback: the error itself, with its traceback
            main(["--traceback", "sites", "resnet18"])

    def buggy(args: object) -> object:
        return {}["input_size"]  # a failing expression, not an error the package raises on purpose

    monkeypatch.setattr("xvol_compiler.cli.common.load_model_arg", buggy)
    with pytest.raises(KeyError):
        main(["sites", "resnet18"])
    monkeypatch.setattr("xvol_compiler.cli.common.load_model_arg", lambda args: torch_failure())
    with pytest.raises(RuntimeError, match="is invalid for input of size 2"):
        main(["sites", "resnet18"])


def torch_failure() -> None:
    import torch

    torch.zeros(2).view(3)  # RuntimeError from torch: a bug of the caller, not a package error


def test_is_package_error_by_type() -> None:
    from xvol_compiler.arguments import check_bool
    from xvol_compiler.cli.errors import is_package_error
    from xvol_compiler.errors import VerificationError

    assert is_package_error(VerificationError("x")) and is_package_error(FileNotFoundError("x"))
    for bad in (RuntimeError("x"), ValueError("a builtin error: a bug, wherever it comes from")):
        assert not is_package_error(bad)
    with pytest.raises(ValueError) as info:  # ArgumentError: a package error that is also a ValueError
        check_bool("verify", "yes")
    assert is_package_error(info.value)
