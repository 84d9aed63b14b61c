"""A small real data set that ships with scikit-learn (no downloads): handwritten digits.

1,797 grey 8x8 images of the digits 0-9, upsampled to a CNN-friendly size and
repeated to 3 channels. The split is fixed (seeded permutation, 80 / 20) and
does not depend on the model being trained.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

SPLIT_SEED = 0


def digits_tensors(image_size: int = 32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_test, y_test): float images (N, 3, S, S) normalised, int64 labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    x = ((x - 0.5) / 0.5).repeat(1, 3, 1, 1)
    y = torch.tensor(data.target, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(SPLIT_SEED))
    n_train = int(0.8 * len(y))
    train, test = perm[:n_train], perm[n_train:]
    return x[train], y[train], x[test], y[test]


def digits_loaders(
    image_size: int = 32,
    batch_size: int = 64,
    seed: int = 0,
    *,
    num_replicas: int | None = None,
    rank: int = 0,
) -> tuple[DataLoader, DataLoader]:
    """Train (shuffled with ``seed``) and test loaders over the fixed split.

    With ``num_replicas`` the train loader reads through a
    ``DistributedSampler(num_replicas, rank, seed=seed, drop_last=True)``: rank
    ``rank``'s shard, in an order that is a function of (seed, epoch) only, so
    :func:`train_steps` can resume mid-run (``start_step``). Use
    ``num_replicas=1`` for a resumable single-process run. The test loader is
    never sharded.
    """
    x_tr, y_tr, x_te, y_te = digits_tensors(image_size)
    train_set = TensorDataset(x_tr, y_tr)
    if num_replicas is None:
        train = DataLoader(train_set, batch_size=batch_size, shuffle=True,
                           generator=torch.Generator().manual_seed(seed), drop_last=True)
    else:
        sampler = DistributedSampler(train_set, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed,
                                     drop_last=True)
        train = DataLoader(train_set, batch_size=batch_size, sampler=sampler, drop_last=True)
    test = DataLoader(TensorDataset(x_te, y_te), batch_size=256, shuffle=False)
    return train, test


def sgd(model: nn.Module, lr: float = 0.05) -> torch.optim.Optimizer:
    """The optimizer :func:`train_steps` uses by default: SGD, momentum 0.9, weight decay 1e-4."""
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)


def train_steps(
    model: nn.Module,
    loader: DataLoader,
    *,
    steps: int | None = None,
    seconds: float | None = None,
    lr: float = 0.05,
    on_step: Callable[[int, float], None] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    start_step: int = 0,
    autocast: torch.dtype | None = None,
) -> list[float]:
    """SGD with momentum until step ``steps`` (cycling the loader) or until ``seconds`` pass.

    ``optimizer`` defaults to :func:`sgd` with ``lr``; pass one to keep (or
    restore) its state across calls. ``start_step`` is the number of steps
    already taken: training continues from that point of the data order
    (epoch ``start_step // len(loader)``, skipping the batches already seen),
    which needs a sampler with ``set_epoch`` (``digits_loaders(num_replicas=...)``);
    ``steps`` counts from 0, not from ``start_step``. A sampler with ``set_epoch``
    is told the epoch before each pass. ``autocast`` runs forward and loss under
    ``torch.autocast`` with that dtype (e.g. ``torch.bfloat16`` on CPU); the
    parameters and the optimizer stay in their own dtype. Batches are moved to
    the device of the model's parameters. Returns the losses of the steps taken
    by this call; ``on_step(step, loss)`` gets the 1-based global step.
    """
    sampler = getattr(loader, "sampler", None)
    set_epoch = getattr(sampler, "set_epoch", None)
    if start_step and set_epoch is None:
        raise ValueError(
            "resuming (start_step > 0) needs a loader whose order depends only on the epoch: "
            "build it with digits_loaders(num_replicas=...)"
        )
    per_epoch = len(loader)
    if per_epoch == 0:
        raise ValueError("the loader yields no batches (batch size larger than the shard with drop_last?)")
    model.train()
    opt = optimizer if optimizer is not None else sgd(model, lr)
    device = next(model.parameters()).device
    cast = (torch.autocast(device.type, dtype=autocast) if autocast is not None
            else contextlib.nullcontext())
    losses: list[float] = []
    start = time.perf_counter()
    step = start_step
    epoch, skip = divmod(start_step, per_epoch)
    if steps is not None and step >= steps:
        return losses
    while True:
        if set_epoch is not None:
            set_epoch(epoch)
        for xb, yb in itertools.islice(loader, skip, None):
            xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
            with cast:
                loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            step += 1
            if on_step is not None:
                on_step(step, losses[-1])
            if (steps is not None and step >= steps) or (
                seconds is not None and time.perf_counter() - start >= seconds
            ):
                return losses
        epoch, skip = epoch + 1, 0


@torch.no_grad()
def predict(model: nn.Module, loader: DataLoader) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, labels) over the whole loader, in eval mode."""
    model.eval()
    logits, labels = [], []
    for xb, yb in loader:
        logits.append(model(xb))
        labels.append(yb)
    return torch.cat(logits), torch.cat(labels)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(1) == labels).float().mean())
