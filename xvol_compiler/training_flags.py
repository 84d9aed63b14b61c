"""Training flags of a module tree: saving and restoring them, and finding the ones that matter.

``model.train(flag)`` / ``model.eval()`` set one flag on every module of the
tree, so code that switches a caller's model to eval for a moment and then
calls ``model.train(was_training)`` loses per-submodule flags (a model in
train mode with a frozen, eval-mode backbone comes back all in train mode).
:func:`kept_training_flags` saves the flag of every module and restores each
one. :func:`training_sensitive_modules` lists the modules in training mode
whose flag changes what they compute (BatchNorm, dropout, ... ): a plain
container in training mode (``torch.fx.symbolic_trace`` creates them) does
not.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Iterator

from torch import nn

__all__ = ["kept_training_flags", "reads_training_flag", "training_sensitive_modules"]

# Modules of torch whose training-mode forward differs from the eval one (the flag is read by C++
# code or a functional call, so their source is not inspected).
_SENSITIVE_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._BatchNorm,
    nn.modules.dropout._DropoutNd,
    nn.RNNBase,
    nn.MultiheadAttention,
)


@contextlib.contextmanager
def kept_training_flags(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block the model may be switched to eval/train; afterwards every module has its own
    training flag back (also on an exception), whatever the block did to the tree."""
    flags = [(m, m.training) for m in model.modules()]
    try:
        yield model
    finally:
        for module, flag in flags:
            module.training = flag


@functools.lru_cache(maxsize=4096)
def _forward_reads_training(cls: type) -> bool:
    """Whether ``cls.forward`` (its own code, not nn.Module's) mentions ``self.training``."""
    forward = getattr(cls, "forward", None)
    if forward is None or forward is nn.Module.forward:
        return False
    try:
        source = inspect.getsource(forward)
    except (OSError, TypeError):  # generated code (torch.fx) reads no flag: it was fixed when traced
        return False
    return "self.training" in source


def reads_training_flag(module: nn.Module) -> bool:
    """Whether ``module``'s own forward computes something else in training mode.

    BatchNorm (running vs batch statistics), InstanceNorm with running
    statistics, dropout of every kind, RNNs and MultiheadAttention (their
    dropout), and any module whose ``forward`` reads ``self.training``
    (stochastic depth, an XVolution subclass with training-only code ...).
    Containers (``nn.Sequential``, the plain modules ``torch.fx`` creates,
    generated graph code) do not: their children decide.
    """
    if isinstance(module, nn.modules.instancenorm._InstanceNorm):
        return bool(module.track_running_stats)
    if isinstance(module, _SENSITIVE_TYPES):
        return True
    if type(module).__module__.startswith("torch.nn."):
        return False  # torch's other modules ignore the flag
    cls: type = type(module)  # (as plain ``type``: mypy does not see a module class as Hashable for the cache)
    return _forward_reads_training(cls)


def training_sensitive_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, module) of every module in training mode whose flag changes its result;
    the root is named ``"<model>"``."""
    return [
        (name or "<model>", m)
        for name, m in model.named_modules()
        if m.training and reads_training_flag(m)
    ]
