"""Training for real: resumable data order and checkpoints, checkpoint loading, SyncBatchNorm, bfloat16 autocast."""

from __future__ import annotations

import copy
import os
import stat
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from tests.strategies import randomize_bn, rel_err
from xvol_compiler import XVolution, fuse, pssa_transform, xvolify
from xvol_compiler.checkpoint import (
    CheckpointError,
    convert_sync_batchnorm,
    load_checkpoint,
    read_checkpoint,
    revert_sync_batchnorm,
    save_checkpoint,
    strip_wrapper_prefixes,
    sync_batchnorm_supported,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from classifiers import build_model, fuse_for_deploy, parameter_checksum, site_names
from digits import digits_loaders, sgd, train_steps

OS16_SITES = ["layer3.0.conv1", "layer3.0.conv2", "layer3.1.conv1", "layer3.1.conv2"]


def state_equal(a: nn.Module, b: nn.Module) -> list[str]:
    """Names of the state entries (parameters and buffers) that differ bit for bit."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    return [k for k in sa if not torch.equal(sa[k], sb[k])]


# ---------------------------------------------------------------------------
# Data order and resume
# ---------------------------------------------------------------------------


class BatchRecorder(nn.Module):
    """A tiny trainable model that records which samples each training batch held."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3 * 8 * 8, 10)
        self.seen: list[tuple[float, ...]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(tuple(x[:, 0, 4, 4].tolist()))
        return self.fc(x.flatten(1))


def test_resumed_data_order_is_the_uninterrupted_one() -> None:
    train, _ = digits_loaders(8, 256, seed=5, num_replicas=1)
    per_epoch = len(train)
    assert per_epoch == 5  # 1437 training images // 256
    total, cut = 2 * per_epoch + 2, per_epoch + 2  # resume mid-epoch, cross an epoch boundary afterwards
    straight = BatchRecorder()
    train_steps(straight, train, steps=total)
    first, second = BatchRecorder(), BatchRecorder()
    train_steps(first, train, steps=cut)
    train_steps(second, train, steps=total, start_step=cut)
    assert len(straight.seen) == total and len(first.seen) == cut and len(second.seen) == total - cut
    assert first.seen + second.seen == straight.seen
    # The epochs really are reshuffled (set_epoch reaches the sampler), so the check above is not trivial.
    assert straight.seen[:per_epoch] != straight.seen[per_epoch:2 * per_epoch]
    assert sorted(straight.seen[0]) != sorted(straight.seen[per_epoch])


def test_resume_needs_an_epoch_ordered_loader() -> None:
    train, _ = digits_loaders(8, 256, seed=0)  # plain shuffled loader: order depends on the generator's history
    with pytest.raises(ValueError, match="num_replicas"):
        train_steps(BatchRecorder(), train, steps=3, start_step=1)


def test_checkpoint_resume_gives_the_uninterrupted_parameters(tmp_path: Path) -> None:
    """xvolified resnet18: 4 steps straight == 2 steps, DDP-style checkpoint, fresh model, 2 more steps.

    (Resuming across an epoch boundary is covered by the data-order test above.)
    """
    train, _ = digits_loaders(32, 32, seed=1, num_replicas=1)
    total, cut = 4, 2

    torch.manual_seed(0)
    straight = build_model("resnet18", "os16")
    opt_s = sgd(straight)
    train_steps(straight, train, steps=total, optimizer=opt_s)

    torch.manual_seed(0)
    first = build_model("resnet18", "os16")
    opt = sgd(first)
    train_steps(first, train, steps=cut, optimizer=opt)
    ddp_style = {f"module.{k}": v for k, v in first.state_dict().items()}  # what DDP's state_dict() holds
    path = save_checkpoint(tmp_path / "mid.pt", ddp_style, opt, step=cut, metadata={"seed": 1})

    torch.manual_seed(123)  # a different initialisation: everything must come from the checkpoint
    resumed = build_model("resnet18", "os16")
    assert state_equal(resumed, first)
    ckpt = read_checkpoint(path)
    load_checkpoint(resumed, ckpt)
    opt_r = sgd(resumed)
    opt_r.load_state_dict(ckpt["optimizer"])
    assert ckpt["step"] == cut and ckpt["metadata"] == {"seed": 1}
    train_steps(resumed, train, steps=total, optimizer=opt_r, start_step=ckpt["step"])

    assert state_equal(resumed, straight) == []
    assert parameter_checksum(resumed) == parameter_checksum(straight)
    for a, b in zip(opt_r.state_dict()["state"].values(), opt_s.state_dict()["state"].values(), strict=True):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])
    # The attention branches trained (gamma left 0), so the sites took part in what was compared.
    assert all(float(straight.get_submodule(n).attn_bn.weight.detach().abs().max()) > 0 for n in OS16_SITES)

    # Control: the same resume with a fresh optimizer (momentum lost) does not reproduce the run.
    control = build_model("resnet18", "os16")
    load_checkpoint(control, path)
    train_steps(control, train, steps=total, optimizer=sgd(control), start_step=cut)
    assert state_equal(control, straight) != []


# ---------------------------------------------------------------------------
# Checkpoint files and keys
# ---------------------------------------------------------------------------


def small_xvol_net() -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                        nn.Flatten(), nn.Linear(8 * 6 * 6, 4), nn.BatchNorm1d(4))
    net[3] = XVolution.from_conv(net[3])
    return randomize_bn(net)


@torch.no_grad()
def test_load_checkpoint_strips_ddp_and_compile_prefixes(tmp_path: Path) -> None:
    src = small_xvol_net()
    for p in src.parameters():
        p.add_(torch.randn_like(p))
    sd = src.state_dict()
    compiled = torch.compile(src)  # lazy: nothing compiles until it is called
    variants = {
        "ddp": {f"module.{k}": v for k, v in sd.items()},
        "compile": compiled.state_dict(),
        "ddp(compile)": {f"module.{k}": v for k, v in compiled.state_dict().items()},
        "compiled submodule": {k.replace("3.", "3._orig_mod.", 1) if k.startswith("3.") else k: v
                               for k, v in sd.items()},
    }
    assert all(k.startswith("_orig_mod.") for k in variants["compile"])
    for label, state in variants.items():
        dst = small_xvol_net()
        for p in dst.parameters():
            p.zero_()
        assert load_checkpoint(dst, state) is dst, label
        assert state_equal(dst, src) == [], label
    # Through a file, and into a wrapped target (the state goes to the innermost module).
    torch.save({"state_dict": variants["ddp"]}, tmp_path / "plain.pt")
    target = torch.compile(small_xvol_net())
    for p in target.parameters():
        p.zero_()
    load_checkpoint(target, tmp_path / "plain.pt")
    assert state_equal(target._orig_mod, src) == []


def test_a_real_module_prefix_is_kept() -> None:
    class Holder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.module = nn.Linear(2, 2)

    src, dst = Holder(), Holder()
    assert strip_wrapper_prefixes(src.state_dict(), set(dst.state_dict())).keys() == src.state_dict().keys()
    load_checkpoint(dst, src.state_dict())
    assert state_equal(dst, src) == []


def test_load_checkpoint_names_the_keys_that_do_not_fit() -> None:
    torch.manual_seed(0)
    plain = build_model("resnet18", "none")
    xvol = build_model("resnet18", "os16")
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(xvol, {f"module.{k}": v for k, v in plain.state_dict().items()})
    msg = str(err.value)
    assert "missing from the checkpoint (24)" in msg  # 4 sites x (attn_conv.weight + 5 attn_bn entries)
    assert "layer3.0.conv1.attn_conv.weight" in msg and "layer3.1.conv1.attn_bn.running_var" in msg
    assert "... (4 more)" in msg  # listings are capped at 20 keys
    assert "the checkpoint is of the plain model" in msg
    with pytest.raises(CheckpointError, match=r"(?s)unexpected in the checkpoint \(24\).*xvolify the model"):
        load_checkpoint(build_model("resnet18", "none"), xvol.state_dict())

    # strict=False: the matching keys load, the attention branches keep their fresh values.
    fresh_attn = xvol.layer3[0].conv1.attn_conv.weight.clone()
    load_checkpoint(xvol, plain.state_dict(), strict=False)
    assert torch.equal(xvol.layer3[0].conv1.weight, plain.layer3[0].conv1.weight)
    assert torch.equal(xvol.fc.weight, plain.fc.weight)
    assert torch.equal(xvol.layer3[0].conv1.attn_conv.weight, fresh_attn)

    bad = dict(plain.state_dict())
    bad["fc.weight"] = torch.zeros(7, 512)
    with pytest.raises(CheckpointError, match=r"shape mismatch \(1\): fc.weight: checkpoint \(7, 512\) vs model"):
        load_checkpoint(build_model("resnet18", "none"), bad, strict=False)


def test_save_checkpoint_is_atomic_and_refuses_to_overwrite(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    net = small_xvol_net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    (tmp_path / "sub").mkdir()  # writers never create directories
    path = save_checkpoint(tmp_path / "sub" / "ckpt.pt", net, opt, step=4, metadata={"name": "x", "sizes": [1, 2]})
    before = path.read_bytes()
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask  # not mkstemp's 0600
    ckpt = read_checkpoint(path)
    assert ckpt["format"] == "xvol-checkpoint/1" and ckpt["step"] == 4
    assert ckpt["metadata"] == {"name": "x", "sizes": [1, 2]}
    assert ckpt["optimizer"]["param_groups"][0]["momentum"] == 0.9

    with pytest.raises(FileExistsError, match="force=True"):
        save_checkpoint(path, net, step=5)
    assert path.read_bytes() == before

    # A write that dies half-way leaves the old file and no temporary behind.
    real_save = torch.save

    def dying_save(obj: object, f: object) -> None:
        real_save(obj, f)
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, net, step=6, force=True)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["ckpt.pt"]

    save_checkpoint(path, net, step=7, force=True)
    assert read_checkpoint(path)["step"] == 7

    # Metadata that torch.load(weights_only=True) would refuse is caught before anything is written.
    with pytest.raises(CheckpointError, match=r"metadata\['torch'\] is a torch.torch_version.TorchVersion"):
        save_checkpoint(tmp_path / "other.pt", net, metadata={"torch": torch.__version__})
    assert not (tmp_path / "other.pt").exists()


def test_read_checkpoint_refuses_pickled_code(tmp_path: Path) -> None:
    torch.save({"model": {}, "opt": torch.optim.SGD}, tmp_path / "code.pt")
    with pytest.raises(CheckpointError, match="weights_only=True"):
        read_checkpoint(tmp_path / "code.pt")
    with pytest.raises(CheckpointError, match="no checkpoint file"):
        read_checkpoint(tmp_path / "missing.pt")


# ---------------------------------------------------------------------------
# SyncBatchNorm
# ---------------------------------------------------------------------------


def test_syncbatchnorm_cannot_train_on_cpu_but_evaluates() -> None:
    """What the docs of checkpoint.py and train_ddp.py claim about torch's SyncBatchNorm on CPU."""
    assert not sync_batchnorm_supported("cpu") and sync_batchnorm_supported("cuda")
    bn = nn.SyncBatchNorm(4)
    x = torch.randn(8, 4, 3, 3)
    assert not dist.is_initialized()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with pytest.raises(ValueError, match="SyncBatchNorm expected input tensor to be on GPU"):
            bn(x)
        bn.eval()
        ref = nn.BatchNorm2d(4).eval()
        assert torch.equal(bn(x), ref(x))
    finally:
        dist.destroy_process_group()


@torch.no_grad()
def test_xvolution_fuses_with_syncbatchnorm_in_eval() -> None:
    torch.manual_seed(0)
    site = XVolution.from_conv(nn.Conv2d(6, 10, 3, stride=2, padding=1), extra_branches=("1x1", "bn"))
    site = convert_sync_batchnorm(site)
    kinds = [type(m) for m in (site.attn_bn, site.conv_bn, site.branch_1x1[1])]
    assert kinds == [nn.SyncBatchNorm] * 3
    randomize_bn(site, seed=3)
    site.eval()
    x = torch.randn(2, 6, 9, 9)
    ref = copy.deepcopy(site).double()(x.double())  # float64 reference of the unfused module
    fused = site.fuse()
    assert rel_err(fused(x), ref) < 1e-5
    assert rel_err(site(x), ref) < 1e-5
    attn = site.attn_bn(site.attn_conv(pssa_transform(x)))
    assert float(attn.abs().max()) > 0.1 * float(ref.abs().max())  # the attention branch is part of the output
    plain = copy.deepcopy(site)
    plain.attn_bn = nn.BatchNorm2d(10).eval()
    plain.attn_bn.load_state_dict(site.attn_bn.state_dict())
    assert torch.equal(plain(x), site(x))  # eval SyncBatchNorm is BatchNorm


@torch.no_grad()
def test_revert_sync_batchnorm_restores_the_batchnorm_kinds() -> None:
    torch.manual_seed(0)
    model = build_model("resnet18", "os16")
    randomize_bn(model, seed=1)
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    ref = model(x)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())

    torch_converted = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model))
    assert sum(isinstance(m, nn.SyncBatchNorm) for m in torch_converted.modules()) == n_bn
    # Without a record or example inputs only the sites' BatchNorms are known: the others are named.
    with pytest.raises(CheckpointError, match=r"dimensionality.*'bn1', 'layer1.0.bn1'"):
        revert_sync_batchnorm(torch_converted)
    reverted = revert_sync_batchnorm(torch_converted, example_inputs=(x,))
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in reverted.modules())
    assert sum(type(m) is nn.BatchNorm2d for m in reverted.modules()) == n_bn
    assert torch.equal(reverted(x), ref)
    assert state_equal(reverted, model) == []

    # Reverted, the whole-model fusion pass folds every BatchNorm and every site.
    fused = fuse(reverted, example_inputs=(x,))
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in fused.modules())
    assert not any(isinstance(m, XVolution) for m in fused.modules())
    assert rel_err(fused(x), ref) < 1e-4


def test_revert_uses_the_recorded_kind_and_shares_tensors() -> None:
    net = small_xvol_net()
    synced = convert_sync_batchnorm(copy.deepcopy(net))
    weight = synced[6].weight
    reverted = revert_sync_batchnorm(synced)
    assert [type(reverted[i]) for i in (1, 6)] == [nn.BatchNorm2d, nn.BatchNorm1d]
    assert type(reverted[3].attn_bn) is nn.BatchNorm2d
    assert reverted[6].weight is weight  # shared, as torch's own conversion does
    net.eval()
    reverted.eval()
    x = torch.randn(3, 3, 6, 6)
    assert torch.equal(reverted(x), net(x))


# ---------------------------------------------------------------------------
# Mixed precision
# ---------------------------------------------------------------------------


def test_bfloat16_autocast_training_then_float32_fusion() -> None:
    torch.manual_seed(0)
    model = build_model("resnet18", "os16")
    before = copy.deepcopy(model)
    out_dtypes: list[torch.dtype] = []
    model.fc.register_forward_hook(lambda m, a, out: out_dtypes.append(out.dtype))
    train, test = digits_loaders(32, 32, seed=0, num_replicas=1)
    losses = train_steps(model, train, steps=3, autocast=torch.bfloat16)

    assert out_dtypes == [torch.bfloat16] * 3  # the forward really ran in bfloat16
    assert all(torch.isfinite(torch.tensor(losses)))
    assert all(p.dtype == torch.float32 for p in model.parameters())
    unchanged = [n for n, p in model.named_parameters() if torch.equal(p, before.get_parameter(n))]
    assert unchanged == []
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not bool(p.grad.abs().max() > 0)]
    assert no_grad == []  # every parameter got a gradient on the last step, the attention branches included
    assert all(float(model.get_submodule(n).attn_bn.weight.detach().abs().max()) > 0 for n in site_names(model))

    model.eval()
    x = next(iter(test))[0][:32]
    with torch.no_grad():
        ref = model(x)  # unfused, float32, eval
        ref64 = copy.deepcopy(model).double()(x.double())
        fused = fuse_for_deploy(model, x)
        assert not any(isinstance(m, XVolution) for m in fused.modules())
        assert all(p.dtype == torch.float32 for p in fused.parameters())
        out = fused(x)
    assert out.dtype == torch.float32
    assert rel_err(out, ref) < 1e-4
    assert rel_err(out, ref64) < 1e-4
    assert torch.equal(out.argmax(1), ref.argmax(1))


def test_global_attention_sites_train_and_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = xvolify(build_model("resnet18", "none"), "os16", attention="global", inplace=True)
    start = copy.deepcopy(model)
    train, _ = digits_loaders(32, 16, seed=0, num_replicas=1)
    losses = train_steps(model, train, steps=2)
    assert all(torch.isfinite(torch.tensor(losses)))
    site = model.layer3[1].conv2
    assert type(site).__name__ == "GlobalAttentionXVolution"
    assert not torch.equal(site.attn_q.weight, start.layer3[1].conv2.attn_q.weight)
    # gamma left 0 after step 1, so step 2 sent a gradient through the attention itself (not weight decay only)
    assert site.attn_q.weight.grad is not None and float(site.attn_q.weight.grad.abs().max()) > 0
    path = save_checkpoint(tmp_path / "sa.pt", {f"module.{k}": v for k, v in model.state_dict().items()})
    fresh = xvolify(build_model("resnet18", "none"), "os16", attention="global", inplace=True)
    load_checkpoint(fresh, path)
    assert state_equal(fresh, model) == []
