"""`make demo` (examples/demo.py) with a tiny budget: exit 0, artifacts written, errors small, no overwrite."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

DEMO = Path(__file__).resolve().parents[1] / "examples" / "demo.py"
ARTIFACTS = ("fused.pt", "unfused.pt", "fused.onnx", "report.json", "report.txt")


def run_demo(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "COLUMNS": "160"}
    return subprocess.run([sys.executable, str(DEMO), *args], capture_output=True, text=True, timeout=600, env=env)


@pytest.mark.compile
def test_demo_quick_run(tmp_path: Path) -> None:
    out = tmp_path / "demo-out"
    proc = run_demo("--steps", "5", "--quick", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "all verifications passed" in proc.stdout
    for name in ARTIFACTS:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name

    report = json.loads((out / "report.json").read_text())
    assert report["model"] == "resnet18"
    assert report["sites"] == ["layer3.0.conv1", "layer3.0.conv2", "layer3.1.conv1", "layer3.1.conv2"]
    assert report["training"]["steps"] == 5
    for check in ("fx", "compile", "onnx"):
        abs_err, rel_err = report["max_error"][check]
        assert rel_err < 1e-4, (check, abs_err, rel_err)
        assert report["checks"][check] is True
    assert report["accuracy"]["unfused"] == report["accuracy"]["fused"] == report["accuracy"]["onnx"]
    assert report["macs"]["fused"] > report["macs"]["original"]
    assert report["fx_fusion_report"]["max_rel_error"] < 1e-4
    assert sum(o["kind"] == "x-volution" and o["status"] == "fused"
               for o in report["onnx_fusion_report"]["outcomes"]) == 4
    text = (out / "report.txt").read_text()
    assert "max error FX fused vs unfused" in text and "latency original : unfused : fused" in text

    # The fused checkpoint rebuilds through the CLI and matches the unfused one.
    from xvol_compiler.cli import main

    assert main(["verify", str(out / "unfused.pt"), str(out / "fused.pt")]) == 0



def test_demo_refuses_to_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("xvol_demo", DEMO)
    assert spec is not None and spec.loader is not None
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    (tmp_path / "report.json").write_text("{}")
    assert demo.main(["--steps", "1", "--quick", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "exists" in err and "--force" in err and "Traceback" not in err
    assert (tmp_path / "report.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]
