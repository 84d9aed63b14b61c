"""A copy of a model whose X-volution attention actually computes something, for verification.

``XVolution`` starts with the gamma of its attention BatchNorm (``attn_bn``)
at 0, and so do the BatchNorms of its extra branches (``branch_1x1[1]``,
``branch_identity``): inserting a site changes nothing until it trains. Until
then the ``T(x)`` half of every fused weight is exactly 0, and a check of the
fused model passes whatever the attention fold does. :func:`with_exercised_attention`
gives a deep copy in which those gammas are non-zero (deterministic, seeded),
so that a check of the copy and of its fused form covers the attention fold;
:func:`has_silent_attention` says whether a model needs it.

Only zero gammas change (entry by entry); trained, non-zero ones stay as they
are, and nothing else (running statistics, biases, convolutions, the site's
own ``conv_bn``) is touched. Sites are found by type (``XVolution`` and its
subclasses such as ``GlobalAttentionXVolution``), in any container; a model
without any gives an unchanged copy and a count of 0.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import torch
from torch import nn

from xvol_compiler.errors import XvolError
from xvol_compiler.xvolution import XVolution

__all__ = ["GAMMA_RANGE", "AttentionProbeError", "has_silent_attention", "silent_batchnorms",
           "with_exercised_attention"]

GAMMA_RANGE: tuple[float, float] = (0.5, 1.5)  # new gammas: uniform in this range (a BatchNorm's usual scale)


class AttentionProbeError(XvolError, ValueError):
    """The argument is not something whose attention can be exercised (not a module, a bad seed)."""


def _site_batchnorms(site: XVolution, path: str) -> Iterator[tuple[str, nn.Module]]:
    """(path, BatchNorm) of the attention branch and of the extra 1x1 / identity branches of one site."""
    prefix = f"{path}." if path else ""
    yield f"{prefix}attn_bn", site.attn_bn
    if "1x1" in site.extra_branches:
        yield f"{prefix}branch_1x1.1", site.branch_1x1[1]
    if "identity" in site.extra_branches:
        yield f"{prefix}branch_identity", site.branch_identity


def _gamma(bn: nn.Module) -> torch.Tensor | None:
    """A BatchNorm's gamma (its ``weight``), None when it has none (``affine=False``)."""
    gamma = getattr(bn, "weight", None)
    return gamma if isinstance(gamma, torch.Tensor) else None


def silent_batchnorms(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path, BatchNorm) of every attention / extra-branch BatchNorm of an X-volution site in ``model`` with at
    least one gamma equal to 0 (a channel of that branch computes nothing), in ``named_modules`` order."""
    _check_module(model)
    found: list[tuple[str, nn.Module]] = []
    for path, module in model.named_modules():
        if isinstance(module, XVolution):
            for bn_path, bn in _site_batchnorms(module, path):
                gamma = _gamma(bn)
                if gamma is not None and bool((gamma == 0).any()):
                    found.append((bn_path, bn))
    return found


def has_silent_attention(model: nn.Module) -> bool:
    """Whether some X-volution site of ``model`` has an attention or extra-branch BatchNorm with a zero gamma
    (as every site has right after ``xvolify``): a check of such a model does not see that branch's fold."""
    return bool(silent_batchnorms(model))


def with_exercised_attention(model: nn.Module, *, seed: int = 0, scale: float = 1.0) -> tuple[nn.Module, int]:
    """``(copy, changed)``: a deep copy of ``model`` in which every zero gamma of an X-volution site's attention
    BatchNorm (``attn_bn``) and extra-branch BatchNorms (``branch_1x1[1]``, ``branch_identity``) is set to a
    value drawn uniformly from :data:`GAMMA_RANGE` (times ``scale``) by a ``torch.Generator`` seeded with
    ``seed``, and the number of BatchNorms changed. T(x) grows with the square of x: in a deep untrained
    network a smaller ``scale`` keeps the copy's outputs finite.

    Deterministic: the same model and seed give the same gammas. Non-zero
    gammas are kept. ``model`` itself is not changed (parameters, buffers,
    training flags); the copy keeps its training flags and ``requires_grad``.
    A model without X-volution sites (or without zero gammas) gives a plain
    copy and 0.
    """
    _check_module(model)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise AttentionProbeError(f"seed must be an int, got {seed!r}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
        raise AttentionProbeError(f"scale must be a positive number, got {scale!r}")
    probe = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    low, high = (scale * v for v in GAMMA_RANGE)
    changed = 0
    with torch.no_grad():
        for _path, bn in silent_batchnorms(probe):
            gamma = _gamma(bn)
            if gamma is None:  # (silent_batchnorms lists only BatchNorms with a gamma)
                continue
            drawn = torch.rand(gamma.shape, generator=generator, dtype=torch.float64) * (high - low) + low
            gamma.copy_(torch.where(gamma == 0, drawn.to(device=gamma.device, dtype=gamma.dtype), gamma))
            changed += 1
    return probe, changed


def _check_module(model: object) -> None:
    if not isinstance(model, nn.Module):
        raise AttentionProbeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
