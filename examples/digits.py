"""A small real data set that ships with scikit-learn (no downloads): handwritten digits.

1,797 grey 8x8 images of the digits 0-9, upsampled to a CNN-friendly size and
repeated to 3 channels. The split is fixed (seeded permutation, 80 / 20) and
does not depend on the model being trained.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

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
    image_size: int = 32, batch_size: int = 64, seed: int = 0
) -> tuple[DataLoader, DataLoader]:
    """Train (shuffled with ``seed``) and test loaders over the fixed split."""
    x_tr, y_tr, x_te, y_te = digits_tensors(image_size)
    train = DataLoader(TensorDataset(x_tr, y_tr), batch_size=batch_size, shuffle=True,
                       generator=torch.Generator().manual_seed(seed), drop_last=True)
    test = DataLoader(TensorDataset(x_te, y_te), batch_size=256, shuffle=False)
    return train, test


def train_steps(
    model: nn.Module,
    loader: DataLoader,
    *,
    steps: int | None = None,
    seconds: float | None = None,
    lr: float = 0.05,
    on_step: Callable[[int, float], None] | None = None,
) -> list[float]:
    """SGD with momentum for ``steps`` steps (cycling the loader) or until ``seconds`` pass."""
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    losses: list[float] = []
    start = time.perf_counter()
    step = 0
    while True:
        for xb, yb in loader:
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
