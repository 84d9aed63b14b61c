"""Train an xvolified torchvision classifier on the digits set under DistributedDataParallel.

    torchrun --nproc_per_node=2 examples/train_ddp.py --steps 20

Backend: NCCL with one GPU per local rank when CUDA is available, gloo on CPU
otherwise; the same script either way. Without torchrun it runs as a single
process (world size 1). Each rank reads its own shard of the training set
through a DistributedSampler (seed = --seed, epoch = step // batches per
epoch), so a resumed run sees exactly the batches an uninterrupted one would.

BatchNorm (the network's and the X-volution sites' attn_bn): with
``--sync-bn auto`` it becomes SyncBatchNorm where torch can train one, i.e. on
CUDA/HPU/XPU devices. torch 2.14's SyncBatchNorm refuses to train on CPU
tensors (ValueError; its aten::batch_norm_stats kernel has no CPU version), so
on CPU the plain BatchNorm stays: each rank normalises with its own batch
statistics and DDP broadcasts rank 0's running statistics at every forward.

At the end every rank hashes its parameters, rank 0 gathers the hashes,
checks that they agree, prints them, writes ``checksums.json`` and the
checkpoint ``checkpoint.pt`` (the DDP model's state dict, with ``module.``
prefixes, the optimizer state and the step) into --out, atomically, never
over an existing one without --force. Exit status 3 when ranks disagree.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from classifiers import SITE_POLICIES, buffer_checksum, build_model, parameter_checksum, site_names
from digits import digits_loaders, sgd, train_steps
from torch import nn

from xvol_compiler.checkpoint import (
    convert_sync_batchnorm,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
    sync_batchnorm_supported,
)
from xvol_compiler.files import atomic_write_json, written_together

log = logging.getLogger("train_ddp")
CHECKPOINT_NAME = "checkpoint.pt"
CHECKSUMS_NAME = "checksums.json"
# Settings that change the data order or the model: a resumed run must match them.
RESUME_KEYS = ("model", "sites", "seed", "batch_size", "image_size", "world_size", "lr")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20, help="train until this global step (default 20)")
    p.add_argument("--model", default="resnet18", help="torchvision classifier, built with weights=None")
    p.add_argument("--sites", default="os16", choices=sorted(SITE_POLICIES), help="X-volution site policy")
    p.add_argument("--seed", type=int, default=0, help="model initialisation and data order")
    p.add_argument("--batch-size", type=int, default=32, help="per rank")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--out", type=Path, default=Path("out/ddp"), help="directory for the checkpoint (default out/ddp)")
    p.add_argument("--resume", type=Path, default=None, help="checkpoint to continue from")
    p.add_argument("--force", action="store_true", help="overwrite an existing checkpoint in --out")
    p.add_argument("--autocast", action="store_true", help="forward in bfloat16 under torch.autocast")
    p.add_argument("--sync-bn", choices=("auto", "on", "off"), default="auto",
                   help="SyncBatchNorm: auto = where torch supports training it (not on CPU)")
    p.add_argument("--log-every", type=int, default=5)
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error("--steps must be >= 1")
    return args


def init_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device); NCCL + cuda:LOCAL_RANK when CUDA is available, else gloo + CPU."""
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if "RANK" in os.environ:  # launched by torchrun: env:// rendezvous
        dist.init_process_group(backend, timeout=timedelta(minutes=5))
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return dist.get_rank(), dist.get_world_size(), device


def use_sync_bn(choice: str, device: torch.device, world_size: int) -> bool:
    supported = sync_batchnorm_supported(device)
    if choice == "on" and not supported:
        raise SystemExit(
            f"--sync-bn on: torch {torch.__version__}'s SyncBatchNorm cannot train on {device.type} tensors "
            "(its forward raises ValueError, aten::batch_norm_stats has no CPU kernel); use --sync-bn auto/off"
        )
    if choice == "off":
        return False
    if not supported:
        log.info("plain BatchNorm: torch %s's SyncBatchNorm trains only on CUDA/HPU/XPU tensors, not %s; "
                 "each rank normalises with its own batch statistics, DDP broadcasts rank 0's running "
                 "statistics at each forward", torch.__version__, device.type)
        return False
    return world_size > 1 or choice == "on"


def check_resume(meta: dict[str, Any], settings: dict[str, Any]) -> None:
    diffs = {k: (meta.get(k), settings[k]) for k in RESUME_KEYS if meta.get(k) != settings[k]}
    if diffs:
        detail = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diffs.items())
        raise SystemExit(f"--resume: the checkpoint was trained with other settings ({detail})")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rank, world_size, device = init_distributed()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[rank {rank}] %(message)s", stream=sys.stdout)
    try:
        return run(args, rank, world_size, device)
    finally:
        dist.destroy_process_group()


def run(args: argparse.Namespace, rank: int, world_size: int, device: torch.device) -> int:
    settings = {"model": args.model, "sites": args.sites, "seed": args.seed, "batch_size": args.batch_size,
                "image_size": args.image_size, "world_size": world_size, "lr": args.lr}
    ckpt_path = args.out / CHECKPOINT_NAME
    if rank == 0:
        args.out.mkdir(parents=True, exist_ok=True)  # the output folder (checkpoints never create directories)
    refuse = [rank == 0 and ckpt_path.exists() and not args.force]
    dist.broadcast_object_list(refuse, src=0)
    if refuse[0]:
        if rank == 0:
            log.error("%s exists; pass --force to overwrite it", ckpt_path)
        return 2

    torch.manual_seed(args.seed)
    model = build_model(args.model, args.sites)
    start_step = 0
    optimizer_state = None
    if args.resume is not None:
        ckpt = read_checkpoint(args.resume)
        check_resume(ckpt.get("metadata") or {}, settings)
        load_checkpoint(model, ckpt)
        start_step, optimizer_state = int(ckpt["step"]), ckpt["optimizer"]
        log.info("resumed from %s at step %d", args.resume, start_step)
    sync = use_sync_bn(args.sync_bn, device, world_size)
    if sync:
        model = convert_sync_batchnorm(model)
    model.to(device)
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = sgd(ddp, args.lr)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)

    train, _ = digits_loaders(args.image_size, args.batch_size, args.seed, num_replicas=world_size, rank=rank)
    first = next(iter(train.sampler))
    log.info("%s, sites=%s (%d X-volution: %s), world size %d, %s on %s, SyncBatchNorm %s, autocast %s, "
             "%d batches of %d per rank per epoch", args.model, args.sites, len(site_names(model)),
             ", ".join(site_names(model)), world_size, dist.get_backend(), device,
             "on" if sync else "off", "bfloat16" if args.autocast else "off", len(train), args.batch_size)

    def on_step(step: int, loss: float) -> None:
        if step % args.log_every == 0 or step == args.steps:
            mean = torch.tensor([loss], dtype=torch.float64, device=device)
            dist.all_reduce(mean)
            log.info("step %d  loss %.4f (mean over ranks)", step, float(mean) / world_size)

    start = time.perf_counter()
    train_steps(ddp, train, steps=args.steps, optimizer=optimizer, start_step=start_step, on_step=on_step,
                autocast=torch.bfloat16 if args.autocast else None)
    elapsed = time.perf_counter() - start

    mine = {"rank": rank, "parameters": parameter_checksum(model), "buffers": buffer_checksum(model),
            "first_sample": int(first)}
    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, mine)
    agree = len({g["parameters"] for g in gathered}) == 1
    status = 0
    if rank == 0:
        log.info("trained steps %d..%d in %.1f s (%.2f s/step)", start_step + 1, args.steps, elapsed,
                 elapsed / max(1, args.steps - start_step))
        for g in gathered:
            print(f"rank {g['rank']} parameter sha256 {g['parameters']}", flush=True)
        if agree:
            print(f"checksum: all {world_size} ranks agree: {gathered[0]['parameters']}", flush=True)
        else:
            print(f"checksum: RANKS DISAGREE: {sorted({g['parameters'] for g in gathered})}", flush=True)
            status = 3
        buffers_agree = len({g["buffers"] for g in gathered}) == 1
        log.info("running statistics %s across ranks%s", "agree" if buffers_agree else "differ",
                 "" if buffers_agree or sync else
                 " (plain BatchNorm: each rank updated them from its own last batch; the checkpoint keeps rank 0's)")
        metadata = {**settings, "autocast": bool(args.autocast), "sync_bn": sync, "torch": str(torch.__version__),
                    "sites_list": site_names(model)}
        with written_together():  # the checkpoint and its checksums, or neither
            save_checkpoint(ckpt_path, ddp, optimizer, step=args.steps, metadata=metadata, force=args.force)
            atomic_write_json(args.out / CHECKSUMS_NAME, {"step": args.steps, "agree": agree, "ranks": gathered,
                                                          "elapsed_s": elapsed}, force=True)
        log.info("wrote %s", ckpt_path)
    dist.barrier()
    return status


if __name__ == "__main__":
    sys.exit(main())
