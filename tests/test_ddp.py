"""examples/train_ddp.py under torchrun with two CPU processes (gloo): the ranks end with identical parameters."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

from xvol_compiler.checkpoint import load_checkpoint, read_checkpoint

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
from classifiers import build_model, parameter_checksum  # noqa: E402

TIMEOUT_S = 300  # generous for a loaded machine; the run itself takes ~15-25 s on 2 idle cores


def torchrun(out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("RANK", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "examples" / "train_ddp.py"), "--out", str(out), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, env=env, cwd=ROOT)


def test_two_ranks_train_to_identical_parameters(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = torchrun(out, "--steps", "3", "--batch-size", "16", "--log-every", "1")
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]

    printed = dict(re.findall(r"^rank (\d) parameter sha256 ([0-9a-f]{64})$", proc.stdout, re.M))
    assert sorted(printed) == ["0", "1"], log[-4000:]
    assert printed["0"] == printed["1"]
    assert f"checksum: all 2 ranks agree: {printed['0']}" in proc.stdout
    assert "gloo on cpu" in proc.stdout and "SyncBatchNorm off" in proc.stdout
    assert "trains only on CUDA/HPU/XPU tensors" in proc.stdout  # the logged reason for plain BatchNorm

    sums = json.loads((out / "checksums.json").read_text())
    ranks = {r["rank"]: r for r in sums["ranks"]}
    assert sums["agree"] is True and sums["step"] == 3
    assert ranks[0]["parameters"] == ranks[1]["parameters"] == printed["0"]
    # The ranks read different shards, so agreement comes from gradient averaging, not from equal data.
    assert ranks[0]["first_sample"] != ranks[1]["first_sample"]

    # The checkpoint (rank 0's DDP state dict, "module." keys) holds exactly those parameters, and they trained.
    ckpt = read_checkpoint(out / "checkpoint.pt")
    assert ckpt["step"] == 3 and ckpt["metadata"]["world_size"] == 2
    assert all(k.startswith("module.") for k in ckpt["model"])
    assert len(ckpt["optimizer"]["state"]) == len(ckpt["optimizer"]["param_groups"][0]["params"])
    torch.manual_seed(0)  # the script's default seed: the initial model
    initial = build_model("resnet18", "os16")
    initial_sum = parameter_checksum(initial)
    loaded = load_checkpoint(build_model("resnet18", "os16"), ckpt)
    assert parameter_checksum(loaded) == printed["0"] != initial_sum
    attn_gamma = loaded.layer3[0].conv2.attn_bn.weight.detach()
    assert float(attn_gamma.abs().max()) > 0 and torch.equal(initial.layer3[0].conv2.attn_bn.weight.detach(),
                                                           torch.zeros_like(attn_gamma))
