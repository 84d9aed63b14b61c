"""X-volution with true global self-attention in the attention branch (the paper's "X-volution (SA)").

    y = conv(x) + BN_a(Conv_a(SA(x)))
    SA(x) = softmax(Q K^T / sqrt(d)) V   over all positions, single head,
    Q = W_q x, K = W_k x (d channels), V = W_v x (C_in channels): 1x1 projections.

``Conv_a`` has the site's geometry and ``BN_a`` starts with gamma = 0, so
inserting the module changes nothing until it trains. The attention weights
depend on the input, so this is not a convolution: :meth:`fuse` refuses with
a :class:`~xvol_compiler.fold.FoldError`. Cost: O(P^2 (d + C_in)) per call for
P positions; keep it to low-resolution sites (output stride 16 or 32).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xvol_compiler.arguments import check_extra_branches, check_initialized, check_optional_int
from xvol_compiler.conv_modules import CONV_TYPES
from xvol_compiler.deploy import XVolutionDeploy
from xvol_compiler.errors import InvalidArgumentError
from xvol_compiler.fold import BatchNormParams, ConvGeometry, FoldError
from xvol_compiler.xvolution import EXTRA_BRANCHES, XVolution

__all__ = ["GLOBAL_ATTENTION_NOT_FUSABLE", "GlobalAttentionXVolution", "global_attention"]

GLOBAL_ATTENTION_NOT_FUSABLE = "global attention is input-dependent, not a convolution"


def global_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Single-head softmax(q k^T / sqrt(d)) v over all positions of (N, C, *spatial) maps.

    ``q`` and ``k`` have d channels, ``v`` any number; the output has v's shape.
    """
    n, c, *spatial = v.shape
    qs, ks, vs = (t.flatten(2).transpose(1, 2).unsqueeze(1) for t in (q, k, v))  # (N, 1, P, ch)
    out = F.scaled_dot_product_attention(qs, ks, vs)
    return out.squeeze(1).transpose(1, 2).reshape(n, c, *spatial)


class GlobalAttentionXVolution(XVolution):
    """``conv(x) + BN_a(Conv_a(SA(x)))`` with single-head global self-attention SA.

    Parameter names follow :class:`XVolution`: the site's ``weight``/``bias``
    under their original names, then ``attn_conv.weight``, ``attn_bn.*`` and
    the projections ``attn_q.weight``, ``attn_k.weight``, ``attn_v.weight``
    (1x1 convs, no bias). ``qk_channels`` is d (default ``max(1, C_in // 8)``).
    Extra RepVGG-style branches are accepted as in XVolution.
    """

    _pssa_attention = False  # no PSSA transform: no ring buffer

    def __init__(
        self,
        geometry: ConvGeometry,
        *,
        bias: bool = True,
        qk_channels: int | None = None,
        extra_branches: Sequence[str] = (),
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(geometry, bias=bias, extra_branches=extra_branches, device=device, dtype=dtype)
        c = geometry.in_channels
        d = qk_channels if qk_channels is not None else max(1, c // 8)
        if d < 1:
            raise InvalidArgumentError(f"qk_channels must be >= 1, got {qk_channels}")
        self.qk_channels = d
        conv = CONV_TYPES[geometry.ndim]
        self.attn_q = conv(c, d, 1, bias=False, device=device, dtype=dtype)
        self.attn_k = conv(c, d, 1, bias=False, device=device, dtype=dtype)
        self.attn_v = conv(c, c, 1, bias=False, device=device, dtype=dtype)

    @classmethod
    def from_conv(  # type: ignore[override]  # qk_channels instead of XVolution's PSSA options
        cls,
        conv: nn.Module,
        *,
        qk_channels: int | None = None,
        extra_branches: Sequence[str] = (),
    ) -> GlobalAttentionXVolution:
        """Wrap an ``nn.Conv1d/2d/3d``: its weight and bias are kept (the same Parameter objects), output unchanged."""
        if isinstance(conv, nn.Module):
            check_initialized(conv, f"conv ({type(conv).__name__})")
        check_optional_int("qk_channels", qk_channels, 1)
        check_extra_branches(extra_branches, EXTRA_BRANCHES)
        return cls._wrap(conv, qk_channels=qk_channels, extra_branches=extra_branches)

    def attention(self, x: Tensor) -> Tensor:
        """SA(x): (N, C_in, *spatial) -> (N, C_in, *spatial)."""
        return global_attention(self.attn_q(x), self.attn_k(x), self.attn_v(x))

    def _attention_repr(self) -> str:
        return f"attention=global, qk_channels={self.qk_channels}"

    def deploy_weights(self) -> tuple[Tensor, Tensor]:
        raise FoldError(GLOBAL_ATTENTION_NOT_FUSABLE)

    def fuse(self, lowering: str = "channel", *, single_conv: bool = True,
             bn: BatchNormParams | None = None, weights: tuple[Tensor, Tensor] | None = None) -> XVolutionDeploy:
        """Refused whatever the lowering: see :data:`GLOBAL_ATTENTION_NOT_FUSABLE`."""
        raise FoldError(GLOBAL_ATTENTION_NOT_FUSABLE)
