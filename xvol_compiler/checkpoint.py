"""Checkpoints of (distributed) training runs, and SyncBatchNorm on the way to deployment.

A model trained under ``DistributedDataParallel`` saves keys prefixed with
``module.``; one wrapped by ``torch.compile`` saves ``_orig_mod.``.
:func:`load_checkpoint` loads either into a fresh, unwrapped (xvolified)
model, and says exactly which keys did not match when they do not.
:func:`save_checkpoint` writes atomically (temporary file in the same
directory, then a rename), so a crash never leaves a half-written checkpoint
under the final name, and it refuses to overwrite unless asked.

SyncBatchNorm, as torch 2.14 ships it:

- in training mode with an initialised process group it only runs on
  CUDA/HPU/XPU/PrivateUse1 tensors: on CPU its forward raises ``ValueError``
  ("SyncBatchNorm expected input tensor to be on GPU ..."), even with a
  world size of 1, and the kernels it uses (``aten::batch_norm_stats``) have
  no CPU implementation. :func:`sync_batchnorm_supported` answers the question
  for a device;
- in eval mode (or with no process group) it is plain batch norm on any
  device, so an eval SyncBatchNorm folds like a BatchNorm (``bn_params`` only
  reads running statistics).

It does not record whether it replaced a BatchNorm1d, 2d or 3d, yet fusion
passes match ``nn.BatchNorm2d`` and friends. :func:`revert_sync_batchnorm`
turns every SyncBatchNorm back into the BatchNorm of the right dimensionality;
how it knows the dimensionality is documented there.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase

from xvol_compiler.errors import XvolError
from xvol_compiler.files import atomic_path, check_output
from xvol_compiler.report import with_article
from xvol_compiler.training_flags import kept_training_flags

__all__ = [
    "CHECKPOINT_FORMAT",
    "CheckpointError",
    "convert_sync_batchnorm",
    "load_checkpoint",
    "read_checkpoint",
    "revert_sync_batchnorm",
    "save_checkpoint",
    "strip_wrapper_prefixes",
    "sync_batchnorm_supported",
    "unwrap_model",
]

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "xvol-checkpoint/1"
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_COMPILE_SEGMENT = "_orig_mod."
_BN_TYPE_ATTR = "_xvol_bn_type"
_BN_BY_DIM: dict[int, type[nn.modules.batchnorm._BatchNorm]] = {
    2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d,
}
_LISTED = 20  # keys listed per category in an error message


class CheckpointError(XvolError, RuntimeError):
    """A checkpoint that does not fit the model, or that cannot be read or written as asked."""


# ---------------------------------------------------------------------------
# Saving and loading
# ---------------------------------------------------------------------------


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside ``DistributedDataParallel`` / ``DataParallel`` / ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(inner := getattr(model, "_orig_mod", None), nn.Module):
            model = inner
        else:
            return model


def strip_wrapper_prefixes(
    state_dict: Mapping[str, Any], reference_keys: set[str] | None = None
) -> dict[str, Any]:
    """Remove the ``module.`` (DDP, DataParallel) and ``_orig_mod.`` (torch.compile) parts of keys.

    A leading ``module.`` or ``_orig_mod.`` is removed when every key carries
    it, repeatedly (``module._orig_mod.x`` -> ``x``); an inner ``_orig_mod.``
    (a compiled submodule) is removed from every key that has one. When
    ``reference_keys`` (the target model's keys) are given, a prefix the target
    itself uses is kept: a model with a real submodule named ``module`` loads
    unchanged.
    """
    ref = reference_keys or set()
    out = dict(state_dict)
    changed = True
    while changed and out:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in out) and not any(k.startswith(prefix) for k in ref):
                out = {k[len(prefix):]: v for k, v in out.items()}
                changed = True
    if not any(_COMPILE_SEGMENT in k for k in ref):
        out = {k.replace("." + _COMPILE_SEGMENT, "."): v for k, v in out.items()}
    return out


def read_checkpoint(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint file with ``torch.load(weights_only=True)`` (tensors and plain containers only)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint file at {path}")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError ... depending on the damage
        raise CheckpointError(
            f"cannot read {path} with torch.load(weights_only=True): {type(err).__name__}: {err}"
        ) from err
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds {with_article(type(obj).__name__)}, not a checkpoint or state dict")
    return obj


def _model_state(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    """The model's state dict: the ``model`` (or ``state_dict``) entry of a checkpoint, or the mapping itself."""
    for key in ("model", "state_dict"):
        inner = obj.get(key)
        if isinstance(inner, Mapping):
            return inner
    return obj


def _hints(missing: list[str], unexpected: list[str]) -> list[str]:
    attn = ("attn_conv.", "attn_bn.")
    hints = []
    if any(any(a in k for a in attn) for k in missing) and not any(any(a in k for a in attn) for k in unexpected):
        hints.append("the model has X-volution sites the checkpoint lacks: the checkpoint is of the plain model "
                     "(load with strict=False to start the attention branches from scratch)")
    if any(any(a in k for a in attn) for k in unexpected) and not any(any(a in k for a in attn) for k in missing):
        hints.append("the checkpoint has X-volution sites the model lacks: xvolify the model with the same sites "
                     "before loading")
    if any(k.endswith(".conv.weight") for k in unexpected) and any("attn_conv." in k for k in missing):
        hints.append("the checkpoint looks fused (deploy form): load it into a fused model")
    if any(k.startswith(WRAPPER_PREFIXES) for k in unexpected):
        hints.append("some keys keep a wrapper prefix (module. / _orig_mod.) that not every key has")
    return hints


def _listing(title: str, keys: list[str]) -> str:
    shown = ", ".join(keys[:_LISTED])
    more = f", ... ({len(keys) - _LISTED} more)" if len(keys) > _LISTED else ""
    return f"  {title} ({len(keys)}): {shown}{more}"


def load_checkpoint(
    model: nn.Module, path_or_state_dict: str | os.PathLike[str] | Mapping[str, Any], *, strict: bool = True
) -> nn.Module:
    """Load a (DDP / torch.compile) checkpoint into ``model`` and return ``model``.

    ``path_or_state_dict`` is a file written by :func:`save_checkpoint` or
    ``torch.save``, read with ``torch.load(weights_only=True)``, or an
    in-memory mapping: a checkpoint dict (its ``model`` or ``state_dict``
    entry is used) or a bare state dict. ``module.`` and ``_orig_mod.``
    prefixes are stripped (see :func:`strip_wrapper_prefixes`); ``model`` may
    itself be wrapped, the state goes into the innermost module. Tensors are
    copied onto the model's own devices and dtypes.

    With ``strict=True`` any missing or unexpected key raises
    :class:`CheckpointError` listing them; a shape mismatch raises in either
    mode. With ``strict=False`` the keys that did not match are logged as a
    warning and the rest is loaded.
    """
    if isinstance(path_or_state_dict, Mapping):
        state = _model_state(path_or_state_dict)
    else:
        state = _model_state(read_checkpoint(path_or_state_dict))
    bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        raise CheckpointError(f"not a state dict: entries that are not str -> Tensor: {bad[:_LISTED]}")
    target = unwrap_model(model)
    own = target.state_dict()
    state = strip_wrapper_prefixes(state, set(own))
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(state)
        if state[k].shape != own[k].shape
    )
    if mismatched or (strict and (missing or unexpected)):
        lines = [f"checkpoint does not fit {type(target).__name__}:"]
        if missing:
            lines.append(_listing("missing from the checkpoint", missing))
        if unexpected:
            lines.append(_listing("unexpected in the checkpoint", unexpected))
        if mismatched:
            lines.append(_listing("shape mismatch", mismatched))
        lines += [f"  hint: {h}" for h in _hints(missing, unexpected)]
        raise CheckpointError("\n".join(lines))
    if missing or unexpected:
        log.warning("loaded with strict=False; missing %d key(s) %s, unexpected %d key(s) %s",
                    len(missing), missing[:_LISTED], len(unexpected), unexpected[:_LISTED])
    target.load_state_dict(state, strict=False)
    return model


_PLAIN_TYPES = (str, int, float, bool, type(None), torch.dtype, torch.device, torch.Size)


def _check_plain(obj: Any, where: str) -> None:
    """Refuse what ``torch.load(weights_only=True)`` would not read back (exact types: no str subclasses)."""
    if isinstance(obj, Tensor) or type(obj) in _PLAIN_TYPES:
        return
    if type(obj) in (list, tuple):
        for i, item in enumerate(obj):
            _check_plain(item, f"{where}[{i}]")
        return
    if type(obj) is dict:
        for key, value in obj.items():
            _check_plain(key, f"{where} key {key!r}")
            _check_plain(value, f"{where}[{key!r}]")
        return
    raise CheckpointError(
        f"{where} is {with_article(type(obj).__module__)}.{type(obj).__qualname__}, which "
        "torch.load(weights_only=True) refuses: convert it to str/int/float/bool/None, a tensor, "
        "or a list/tuple/dict of them"
    )


def save_checkpoint(
    path: str | os.PathLike[str],
    model: nn.Module | Mapping[str, Tensor],
    optimizer: torch.optim.Optimizer | None = None,
    *,
    step: int | None = None,
    metadata: Mapping[str, Any] | None = None,
    force: bool = False,
) -> Path:
    """Write ``{"format", "model", "optimizer", "step", "metadata"}`` to ``path`` atomically; return the path.

    ``model`` is a module (its ``state_dict()`` is saved as is: a DDP model
    keeps its ``module.`` prefixes, which :func:`load_checkpoint` strips) or a
    state dict. ``metadata`` must hold only what ``torch.load(weights_only=True)``
    reads back: str, int, float, bool, None, tensors and lists/tuples/dicts of
    them. The file is written next to ``path`` under a temporary name, flushed
    to disk, then renamed: readers see the old file or the complete new one.
    An existing ``path`` raises ``OutputExistsError`` (a ``FileExistsError``)
    unless ``force=True``; a missing or unwritable directory raises
    ``OutputError`` (see :mod:`xvol_compiler.files`).
    """
    path = check_output(path, force=force)
    payload: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "model": model.state_dict() if isinstance(model, nn.Module) else dict(model),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "step": step,
        "metadata": dict(metadata or {}),
    }
    _check_plain(payload["metadata"], "metadata")
    _check_plain(payload["step"], "step")
    with atomic_path(path, force=force) as tmp:
        torch.save(payload, tmp)
    return path


# ---------------------------------------------------------------------------
# SyncBatchNorm
# ---------------------------------------------------------------------------


def sync_batchnorm_supported(device: torch.device | str) -> bool:
    """Whether ``nn.SyncBatchNorm`` can train (synchronise batch statistics) on ``device`` in torch 2.14.

    The module's forward accepts CUDA, HPU, XPU and the PrivateUse1 backend in
    training mode; CPU raises ``ValueError`` (and ``aten::batch_norm_stats``,
    which it needs, has no CPU kernel). Eval mode works everywhere.
    """
    kind = torch.device(device).type
    return kind in ("cuda", "hpu", "xpu", torch._C._get_privateuse1_backend_name())


def convert_sync_batchnorm(model: nn.Module, process_group: Any = None) -> nn.Module:
    """``nn.SyncBatchNorm.convert_sync_batchnorm`` that remembers each BatchNorm's class.

    The class is kept on the new module (a plain attribute, not in the state
    dict) so :func:`revert_sync_batchnorm` restores it without guessing.
    Parameters and buffers are shared with the original modules, as torch does.
    """
    kinds = {name: type(m) for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
             and not isinstance(m, nn.SyncBatchNorm)}
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(model, process_group)
    for name, m in converted.named_modules():
        if isinstance(m, nn.SyncBatchNorm) and name in kinds:
            setattr(m, _BN_TYPE_ATTR, kinds[name])
    return converted


def _owner_dims(model: nn.Module) -> dict[str, int]:
    """BatchNorm input ranks known from the X-volution site that owns them (attn_bn, conv_bn, branches)."""
    from xvol_compiler.xvolution import XVolution

    dims = {}
    for name, m in model.named_modules():
        if isinstance(m, XVolution):
            for sub_name, sub in m.named_modules():
                if isinstance(sub, nn.SyncBatchNorm):
                    dims[f"{name}.{sub_name}" if name else sub_name] = m.ndim + 2
    return dims


@torch.no_grad()
def _observed_dims(model: nn.Module, example_inputs: tuple[Any, ...]) -> dict[str, int]:
    """Input rank of every SyncBatchNorm, seen in one eval-mode forward (SyncBatchNorm eval runs on CPU)."""
    dims: dict[str, int] = {}
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, nn.SyncBatchNorm):
            hooks.append(m.register_forward_pre_hook(
                lambda mod, args, name=name: dims.__setitem__(name, args[0].dim())))
    try:
        with kept_training_flags(model):
            model.eval()
            model(*example_inputs)
    finally:
        for h in hooks:
            h.remove()
    return dims


def revert_sync_batchnorm(model: nn.Module, example_inputs: tuple[Any, ...] | None = None) -> nn.Module:
    """Replace every ``nn.SyncBatchNorm`` in ``model`` by ``nn.BatchNorm1d/2d/3d``, in place; return the model.

    SyncBatchNorm does not know which BatchNorm it replaced, so each one's
    dimensionality comes from, in this order:

    1. the class recorded by :func:`convert_sync_batchnorm`;
    2. the X-volution site that owns it (``attn_bn``, ``conv_bn``, the branch
       BatchNorms of an ``XVolution`` with N spatial dims are BatchNorm{N}d);
    3. the rank of its input in one eval-mode forward of ``example_inputs``,
       when given (a tuple of positional inputs; 2-D or 3-D input means
       BatchNorm1d);
    4. otherwise :class:`CheckpointError` names the modules left undecided.

    Parameters and buffers are shared, not copied (as in torch's own
    conversion); the training flag, process-group-free state and device are
    kept. If ``model`` itself is a SyncBatchNorm the new module is returned.
    """
    syncs = [name for name, m in model.named_modules() if isinstance(m, nn.SyncBatchNorm)]
    if not syncs:
        return model
    dims = _owner_dims(model)
    unknown = [n for n in syncs if n not in dims and not hasattr(model.get_submodule(n), _BN_TYPE_ATTR)]
    if unknown and example_inputs is not None:
        dims.update({k: v for k, v in _observed_dims(model, tuple(example_inputs)).items() if k not in dims})
    kinds: dict[str, type[nn.Module]] = {}
    undecided = []
    for name in syncs:
        recorded = getattr(model.get_submodule(name), _BN_TYPE_ATTR, None)
        if recorded is not None:
            kinds[name] = recorded
        elif name in dims and dims[name] in _BN_BY_DIM:
            kinds[name] = _BN_BY_DIM[dims[name]]
        else:
            undecided.append(name or "<root>")
    if undecided:
        raise CheckpointError(
            "cannot tell the dimensionality of these SyncBatchNorm modules: "
            f"{undecided[:_LISTED]}; convert with xvol_compiler.checkpoint.convert_sync_batchnorm, "
            "or pass example_inputs so one eval forward can observe their inputs"
        )
    return _replace(model, "", kinds)


def _rebuild(sync: nn.SyncBatchNorm, kind: type[nn.Module]) -> nn.Module:
    make = cast(Callable[..., _NormBase], kind)  # a BatchNorm1d/2d/3d class
    bn = make(sync.num_features, sync.eps, sync.momentum, sync.affine, sync.track_running_stats,
              device=sync.running_mean.device if sync.running_mean is not None else None)
    if sync.affine:
        bn.weight, bn.bias = sync.weight, sync.bias
    bn.running_mean, bn.running_var = sync.running_mean, sync.running_var
    bn.num_batches_tracked = sync.num_batches_tracked
    bn.train(sync.training)
    if hasattr(sync, "qconfig"):
        bn.qconfig = sync.qconfig
    return bn


def _replace(module: nn.Module, prefix: str, kinds: Mapping[str, type[nn.Module]]) -> nn.Module:
    if isinstance(module, nn.SyncBatchNorm):
        return _rebuild(module, kinds[prefix])
    for name, child in module.named_children():
        full = f"{prefix}.{name}" if prefix else name
        new = _replace(child, full, kinds)
        if new is not child:
            setattr(module, name, new)
    return module
