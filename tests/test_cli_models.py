"""`xvol` with models named as timm:NAME and package.module:factory; plain --help text."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

from tests.test_cli import SUBCOMMANDS, assert_one_line_error, run
from xvol_compiler.cli import main
from xvol_compiler.io import ModelSpec, load_model, save_model
from xvol_compiler.xvolution import XVolution

FACTORY = "tests.factory_models:tiny_cnn"


def test_sites_of_a_timm_model(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "sites", "timm:efficientnet_b0", "--input-size", "3", "64", "64", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["model"] == "timm:efficientnet_b0"
    assert data["inputs"] == "1x3x64x64"
    reference = timm.create_model("efficientnet_b0", pretrained=False)
    assert data["model_params"] == sum(p.numel() for p in reference.parameters())
    assert data["selected"], "efficientnet_b0 has depthwise 3x3/5x5 convs at output stride 16"
    rows = {s["name"]: s for s in data["sites"]}
    convs = dict(reference.named_modules())
    for name in data["selected"]:
        assert rows[name]["output_strides"] == ["16"]
        assert list(convs[name].kernel_size) == rows[name]["kernel_size"]


def test_timm_input_size_defaults_to_the_pretrained_cfg(capsys: pytest.CaptureFixture[str]) -> None:
    size = timm.get_pretrained_cfg("test_resnet").input_size
    assert tuple(size) != (3, 224, 224)  # else this test would not tell the default from the fallback
    code, out, err = run(capsys, "sites", "timm:test_resnet", "--json")
    assert code == 0, err
    assert json.loads(out)["inputs"] == "1x" + "x".join(map(str, size))


def test_factory_model_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    x_pt, f_pt = tmp_path / "x.pt", tmp_path / "f.pt"
    code, out, err = run(capsys, "xvolify", FACTORY, "--num-classes", "7", "--input-size", "32", "-o", x_pt,
                         "--json")
    assert code == 0, err
    assert json.loads(out)["sites"] == ["3.0", "4.0", "5.0"]  # the 3x3 convs whose output is at stride 16
    code, _, err = run(capsys, "fuse", x_pt, "-o", f_pt)
    assert code == 0, err
    code, out, err = run(capsys, "verify", x_pt, f_pt, "--json")
    assert code == 0, err
    assert json.loads(out)["ok"]
    code, out, err = run(capsys, "verify", x_pt, "--json")
    assert code == 0, err
    assert json.loads(out)["ok"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.pt", "x.pt"]

    xvolified, x_spec = load_model(x_pt)
    assert (x_spec.model, x_spec.num_classes, x_spec.stage, x_spec.input_size) == (FACTORY, 7, "xvolified",
                                                                                  [3, 32, 32])
    assert sum(isinstance(m, XVolution) for m in xvolified.modules()) == 3
    fused, f_spec = load_model(f_pt)
    assert (f_spec.model, f_spec.stage) == (FACTORY, "fused")
    assert f_spec.fused_modules  # rebuilt from the recorded fused structure on top of a fresh tiny_cnn
    assert not any(isinstance(m, XVolution) for m in fused.modules())
    inputs = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = xvolified.eval()(inputs), fused(inputs)
    assert got.shape == (3, 7)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_factory_checkpoint_with_live_attention_reloads_fused(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """Non-zero attention gammas: the reloaded fused checkpoint computes what the unfused model computes
    (checked in float64 against the unfused eager forward), and what fusing the model in this process gives."""
    from xvol_compiler import fuse

    x_pt, live_pt, f_pt = tmp_path / "x.pt", tmp_path / "live.pt", tmp_path / "f.pt"
    assert main(["xvolify", FACTORY, "--input-size", "32", "-o", str(x_pt)]) == 0
    xvolified, spec = load_model(x_pt)
    assert spec.num_classes is None  # the factory was called with no arguments: its default head
    live = copy.deepcopy(xvolified)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # attention BatchNorms as after training: scales of order 1, not the gamma = 0 start
        for site in (m for m in live.modules() if isinstance(m, XVolution)):
            site.attn_bn.weight.copy_(0.5 + torch.rand(site.attn_bn.num_features, generator=gen))
            site.attn_bn.bias.copy_(0.1 * torch.randn(site.attn_bn.num_features, generator=gen))
    save_model(live_pt, live, spec)
    code, _, err = run(capsys, "fuse", live_pt, "-o", f_pt)
    assert code == 0, err

    fused, f_spec = load_model(f_pt)
    assert f_spec.stage == "fused" and f_spec.model == FACTORY
    inputs = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    here = fuse(live.eval(), example_inputs=(inputs[:1],), verify=False)
    with torch.no_grad():
        reference = copy.deepcopy(live).double().eval()(inputs.double()).float()
        got, in_process, silent = fused(inputs), here(inputs), xvolified.eval()(inputs)
    assert got.shape == (2, 10)
    assert (reference - silent).abs().max() > 0.1 * reference.abs().max()  # the attention counts here
    torch.testing.assert_close(got, reference, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got, in_process, rtol=1e-5, atol=1e-6)


def test_bench_takes_checkpoints(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    x_pt, f_pt = tmp_path / "x.pt", tmp_path / "f.pt"
    assert main(["xvolify", FACTORY, "--input-size", "32", "-o", str(x_pt)]) == 0
    capsys.readouterr()
    code, out, err = run(capsys, "bench", x_pt, "--repeats", "2", "--warmup", "0", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["input_size"] == [3, 32, 32] and data["sites"] == ["3.0", "4.0", "5.0"]
    (result,) = data["results"]
    assert result["max_rel_error"]["fused"] < 1e-4
    assert data["mac_floor"] == data["macs"]["fused"] / data["macs"]["original"] > 1
    assert main(["fuse", str(x_pt), "-o", str(f_pt)]) == 0
    capsys.readouterr()
    code, _, err = run(capsys, "bench", f_pt)
    assert_one_line_error(code, err, "already fused", "xvolified checkpoint")


def test_factory_module_in_the_current_directory(tmp_path: Path) -> None:
    """The installed `xvol` script (whose sys.path lacks the current directory) finds a factory module there."""
    (tmp_path / "my_models.py").write_text(
        "from torch import nn\n\n\ndef two_convs():\n"
        "    return nn.Sequential(nn.Conv2d(3, 4, 3, 16, 1), nn.Conv2d(4, 4, 3, 1, 1))\n")
    exe = Path(sys.executable).with_name("xvol")
    assert exe.exists(), f"no xvol script next to {sys.executable}: install the package (make env) first"
    proc = subprocess.run([str(exe), "sites", "my_models:two_convs", "--input-size", "32", "--json"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": ""})
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["inputs"] == "1x3x32x32"
    assert data["model_params"] == (3 * 4 * 9 + 4) + (4 * 4 * 9 + 4)
    assert data["selected"] == ["0", "1"]  # both 3x3 convs have their output at stride 16


def test_bad_timm_name(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "sites", "timm:efficientnet_b00")
    assert_one_line_error(code, err, "unknown timm model 'efficientnet_b00'", "timm.list_models(",
                          "timm:efficientnet_b0")


def test_timm_name_given_as_torchvision_name(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "sites", "convnext_atto")
    assert_one_line_error(code, err, "unknown torchvision model", "timm:convnext_atto")


def test_bad_module_path(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "sites", "tests.no_such_models:tiny_cnn")
    assert_one_line_error(code, err, "cannot import module 'tests.no_such_models'", "package.module:factory")
    code, _, err = run(capsys, "xvolify", "tests.factory_models:tiny_cn", "-o", "unused.pt")
    assert_one_line_error(code, err, "has no 'tiny_cn'", "tiny_cnn")
    assert not Path("unused.pt").exists()


def test_factory_returning_something_else(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "sites", "tests.factory_models:not_a_module")
    assert_one_line_error(code, err, "returned a builtins.dict", "not a torch.nn.Module")
    code, _, err = run(capsys, "sites", "tests.factory_models:NOT_CALLABLE")
    assert_one_line_error(code, err, "not a callable factory")
    code, _, err = run(capsys, "sites", "tests.factory_models:needs_depth")
    assert_one_line_error(code, err, "with no arguments", "depth")
    code, _, err = run(capsys, "sites", "tests.factory_models:needs_depth", "--num-classes", "3")
    assert_one_line_error(code, err, "num_classes=3", "drop --num-classes")


def test_model_spec_keeps_a_builders_default_head() -> None:
    spec = ModelSpec.from_dict(ModelSpec(model=FACTORY, num_classes=None).to_dict())
    assert spec.num_classes is None
    assert ModelSpec.from_dict({"model": "resnet18"}).num_classes == 1000  # older checkpoints


@pytest.mark.parametrize("command", [None, *SUBCOMMANDS])
def test_help_is_plain_text(command: str | None, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"] if command else ["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "``" not in out and ":func:`" not in out and ":mod:`" not in out
    if command in (None, "sites", "bench"):
        assert "timm:" in out and "package.module:factory" in out
