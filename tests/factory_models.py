"""Model factories for the ``package.module:factory`` model form (tests/test_cli_models.py)."""

from __future__ import annotations

from torch import nn

NOT_CALLABLE = 3


def _block(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


def tiny_cnn(num_classes: int = 10) -> nn.Module:
    """Four stride-2 blocks (output stride 16), two more 3x3 convs at output stride 16, a linear head."""
    return nn.Sequential(
        _block(3, 8, 2), _block(8, 16, 2), _block(16, 16, 2), _block(16, 24, 2),
        _block(24, 24, 1), _block(24, 24, 1),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, num_classes),
    )


def not_a_module() -> dict[str, int]:
    """A factory that returns something else than a model."""
    return {"layers": 3}


def needs_depth(depth: int) -> nn.Module:
    """A factory that cannot be called with no arguments."""
    return nn.Sequential(*[nn.Identity() for _ in range(depth)])
