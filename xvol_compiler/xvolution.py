"""The training form of an X-volution site, :class:`XVolution`: ``conv(x) + BN_a(Conv_a(T_L(x)))``
and its optional RepVGG/DBB-style branches, folded by :meth:`XVolution.fuse` into its deploy form
(:class:`xvol_compiler.deploy.XVolutionDeploy`)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Self, cast

import torch
import torch.fx
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from xvol_compiler.arguments import check_bool, check_directions, check_extra_branches, check_initialized, check_shift
from xvol_compiler.conv_forward import traced_forward_reason
from xvol_compiler.conv_modules import (
    BN_TYPES,
    CONV_ATTRIBUTES,
    CONV_FUNCTIONS,
    CONV_TYPES,
    PLAIN_CONV_FORWARDS,
    bn_params,
    captured_conv_weights,
    conv_geometry,
    padded_conv,
)
from xvol_compiler.deploy import XVolutionDeploy
from xvol_compiler.errors import InvalidArgumentError, InvalidArgumentTypeError
from xvol_compiler.fold import (
    BatchNormParams,
    Branch,
    ConvGeometry,
    FoldError,
    bn_as_kernel,
    embedding_offset,
    fold_conv_bn,
    merge_branches,
)
from xvol_compiler.pssa import (
    Directions,
    match_t_scale,
    neighbour_offsets,
    pssa_ring_buffer,
    pssa_transform,
    refill_ring,
    shift_tuple,
    site_ring,
)

__all__ = ["EXTRA_BRANCHES", "XVolution", "conv_forward_reason"]

EXTRA_BRANCHES = ("1x1", "identity", "bn")

# Each is one call_function node in an FX trace of a site, so passes can recognise it.
torch.fx.wrap("pssa_transform")
torch.fx.wrap("padded_conv")


def conv_forward_reason(conv: nn.Module) -> str:
    """'' when ``conv`` can become the conv branch of a site: its forward is one convolution of its
    input (see :func:`xvol_compiler.conv_forward.traced_forward_reason`) and none of its own names
    clashes with the site's; else why not."""
    if type(conv).forward in PLAIN_CONV_FORWARDS:
        return ""  # (before the site's names: building them draws from the RNG, a plain conv needs none)
    return traced_forward_reason(conv, _site_attribute_names())


@functools.cache
def _site_attribute_names() -> frozenset[str]:
    """Names an X-volution site defines itself (class and instance attributes, global-attention ones too)."""
    site = XVolution(ConvGeometry(1, 1, (1,), (1,), (0,), (1,), 1))
    return frozenset(dir(site)) | frozenset(vars(site)) | {"attn_q", "attn_k", "attn_v", "qk_channels"}



def _exact_identity_var(eps: float, dtype: torch.dtype) -> float:
    """A running_var with (var + eps) == 1 exactly in ``dtype``, so an eval BN starts as identity."""
    one = torch.tensor(1.0, dtype=dtype)
    var = torch.tensor(1.0 - eps, dtype=dtype)
    for _ in range(64):
        total = var + torch.tensor(eps, dtype=dtype)
        if total == one:
            break
        var = torch.nextafter(var, var + (one - total))
    return float(var)


def _conv_type(ndim: int) -> Callable[..., _ConvNd]:
    """The ``nn.Conv{ndim}d`` class, called with per-axis size tuples of length ``ndim`` (torch's stubs give
    each class its own fixed-length tuple type, which a length known only at run time cannot name)."""
    return CONV_TYPES[ndim]


def _zero_gamma_bn(channels: int, ndim: int) -> _BatchNorm:
    bn = BN_TYPES[ndim](channels)
    nn.init.zeros_(bn.weight)
    return bn


class XVolution(nn.Module):
    """Training form of an X-volution site (docs/operator.md, sections 1-3).

    ``y = conv(x) + BN_a(Conv_a(T_L(x)))`` (+ optional RepVGG/DBB-style branches).
    The site's own ``weight``/``bias`` stay on this module under the same names,
    so a checkpoint of the original model loads with ``strict=False`` and only
    the new keys missing: ``attn_conv.weight``, ``attn_bn.*`` and, when chosen,
    ``branch_1x1.{0,1}.*``, ``branch_identity.*``, ``conv_bn.*``.

    :meth:`from_conv` keeps the conv's own ``Parameter`` objects (not copies),
    so ``requires_grad`` flags and weights tied to other modules survive. Rule
    for the new parameters (attention conv and BatchNorm, extra branches):
    trainable, unless the conv's weight is frozen (``requires_grad=False``),
    then they are frozen too. Build the optimizer after the site exists: one
    built before holds neither the new parameters nor, for a copied model, the
    copy's.

    A conv subclass whose forward computes its weight from its parameters
    (weight standardization, see :func:`conv_forward_reason`) keeps that
    forward as the conv branch: ``conv_class`` is the subclass, its extra
    parameters and attributes (e.g. ``gain``, ``eps``) move onto the site
    under the same names, and :meth:`conv_weights` evaluates the weight it
    computes (constant in eval mode).

    The PSSA ring kernel is a non-persistent buffer, ``pssa_ring`` (see :func:`pssa_ring_buffer`):
    not in the state_dict, moved by ``.to()``, a buffer input of ``torch.export`` programs.
    """

    _pssa_attention: ClassVar[bool] = True  # False: the attention branch is no PSSA transform (no ring buffer)

    def __init__(
        self,
        geometry: ConvGeometry,
        *,
        bias: bool = True,
        shift: int | Sequence[int] = 1,
        directions: Directions = None,
        directional: bool = False,
        extra_branches: Sequence[str] = (),
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        g = geometry
        ndim = g.ndim
        if ndim not in CONV_TYPES:
            raise InvalidArgumentError(f"X-volution supports Conv1d/2d/3d sites, got {ndim} spatial dims")
        check_extra_branches(extra_branches, EXTRA_BRANCHES)
        self.in_channels, self.out_channels = g.in_channels, g.out_channels
        self.kernel_size, self.stride, self.dilation = g.kernel_size, g.stride, g.dilation
        self.padding, self.groups, self.padding_mode = g.padding, g.groups, g.padding_mode
        self.shift = shift_tuple(shift, ndim)
        self.directions = len(neighbour_offsets(ndim, directions))
        self.directional = directional
        if self._pssa_attention:
            pssa_ring_buffer(self, g.in_channels, ndim, self.shift, self.directions, directional, device, dtype)
        # (Tensor: from_conv puts the conv's own weight and bias here, which torch types as Tensor.)
        self.weight: Tensor = nn.Parameter(
            torch.empty(g.out_channels, g.in_channels // g.groups, *g.kernel_size, device=device, dtype=dtype)
        )
        self.bias: Tensor | None = (
            nn.Parameter(torch.zeros(g.out_channels, device=device, dtype=dtype)) if bias else None
        )
        attn_in = g.in_channels * (self.directions if directional else 1)
        self.attn_conv = _conv_type(ndim)(
            attn_in, g.out_channels, g.kernel_size, g.stride, g.padding, g.dilation, g.groups,
            bias=False, padding_mode=g.padding_mode, device=device, dtype=dtype,
        )
        self.attn_bn = _zero_gamma_bn(g.out_channels, ndim).to(device=device, dtype=dtype)
        self.extra_branches = tuple(extra_branches)
        self.conv_class: type[nn.Module] | None = None  # a conv subclass whose forward is the conv branch
        if "1x1" in extra_branches:
            self.branch_1x1 = self._make_1x1_branch(g).to(device=device, dtype=dtype)
        if "identity" in extra_branches:
            if g.in_channels != g.out_channels or any(s != 1 for s in g.stride):
                raise FoldError("an identity branch needs C_in == C_out and stride 1")
            self._check_embeddable(ConvGeometry(
                g.in_channels, g.out_channels, (1,) * ndim, g.stride, (0,) * ndim, (1,) * ndim, g.groups
            ), "an identity")
            self.branch_identity = _zero_gamma_bn(g.out_channels, ndim).to(device=device, dtype=dtype)
        if "bn" in extra_branches:
            bn = BN_TYPES[ndim](g.out_channels).to(device=device, dtype=dtype)
            running_var = cast(Tensor, bn.running_var)  # a BatchNorm built with running statistics (the default)
            running_var.fill_(_exact_identity_var(bn.eps, running_var.dtype))
            self.conv_bn = bn

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        match_t_scale(self, state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        refill_ring(self)  # a meta-built model after to_empty(): the checkpoint does not hold the ring

    def _check_embeddable(self, small: ConvGeometry, branch: str) -> tuple[int, ...]:
        """``small``'s offset inside the site's kernel; ``branch`` names it with its article ("a 1x1")."""
        try:
            return embedding_offset(small, self.geometry)
        except FoldError as err:
            raise FoldError(f"cannot add {branch} branch to this site: {err}") from err

    def _make_1x1_branch(self, g: ConvGeometry) -> nn.Sequential:
        ndim = g.ndim
        pads = []
        for axis, (k, d, (pl, pr)) in enumerate(zip(g.kernel_size, g.dilation, g.pads(), strict=True)):
            if k % 2 == 0 or pl != pr:
                raise FoldError(f"cannot add a 1x1 branch: kernel/padding on axis {axis} has no centre tap")
            pads.append(pl - d * (k - 1) // 2)
        small = ConvGeometry(g.in_channels, g.out_channels, (1,) * ndim, g.stride, tuple(pads), (1,) * ndim, g.groups)
        if any(p < 0 for p in pads):
            raise FoldError(f"cannot add a 1x1 branch: padding {g.padding} is smaller than the kernel's half-width")
        self._check_embeddable(small, "a 1x1")
        conv = _conv_type(ndim)(g.in_channels, g.out_channels, 1, g.stride, tuple(pads), 1, g.groups, bias=False)
        return nn.Sequential(conv, _zero_gamma_bn(g.out_channels, ndim))

    @property
    def geometry(self) -> ConvGeometry:
        return conv_geometry(self)

    @property
    def ndim(self) -> int:
        return len(self.kernel_size)

    @classmethod
    def from_conv(
        cls,
        conv: nn.Module,
        *,
        shift: int | Sequence[int] = 1,
        directions: Directions = None,
        directional: bool = False,
        extra_branches: Sequence[str] = (),
    ) -> XVolution:
        """Wrap an existing ``nn.Conv1d/2d/3d``: its weight and bias are kept (the same Parameter objects).

        The new parameters are trainable unless ``conv.weight`` is frozen, then
        frozen too. Deep-copy ``conv`` first for a site that shares nothing.
        """
        if isinstance(conv, nn.Module):
            check_initialized(conv, f"conv ({type(conv).__name__})")
        check_shift(shift)
        check_directions(directions)
        check_bool("directional", directional)
        check_extra_branches(extra_branches, EXTRA_BRANCHES)
        return cls._wrap(conv, shift=shift, directions=directions, directional=directional,
                         extra_branches=extra_branches)

    @classmethod
    def _wrap(cls, conv: nn.Module, **options: Any) -> Self:
        """A site of this class around ``conv``: same geometry and Parameter objects, training flag kept.
        ``options``: keywords of ``cls``'s constructor (a subclass has its own)."""
        if not isinstance(conv, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) or isinstance(conv, XVolution):
            raise InvalidArgumentTypeError(
                f"{cls.__name__}.from_conv needs an nn.Conv1d/2d/3d, got {type(conv).__name__}"
            )
        reason = conv_forward_reason(conv)
        if reason:
            raise InvalidArgumentTypeError(f"{cls.__name__}.from_conv cannot wrap this conv: {reason}")
        p = conv.weight
        site = cls(conv_geometry(conv), bias=conv.bias is not None, device=p.device, dtype=p.dtype, **options)
        with torch.no_grad():
            # Conv_a starts like a fresh conv of the site's geometry; BN_a's zero gamma silences it.
            nn.init.kaiming_uniform_(site.attn_conv.weight, a=5**0.5)
        if not conv.weight.requires_grad:  # a frozen conv gives a frozen site
            for param in site.parameters():
                param.requires_grad_(False)
        site.weight = conv.weight
        site.bias = conv.bias
        site._adopt_conv_class(conv)
        site.train(conv.training)
        return site

    def _adopt_conv_class(self, conv: nn.Module) -> None:
        """Take ``conv``'s own state (extra parameters, buffers, attributes) and its forward as the conv branch."""
        if type(conv).forward in PLAIN_CONV_FORWARDS:
            return  # a subclass that keeps nn.ConvNd's forward is a plain conv
        # (conv_forward_reason has checked that none of these names clashes with the site's own.)
        for name, value in vars(conv).items():
            if name not in CONV_ATTRIBUTES:
                setattr(self, name, value)
        for name, param in conv._parameters.items():
            if name not in ("weight", "bias"):
                self.register_parameter(name, param)
        for name, buf in conv._buffers.items():
            self.register_buffer(name, buf, persistent=name not in conv._non_persistent_buffers_set)
        self.conv_class = type(conv)

    def _conv_forward(self, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """nn.ConvNd's helper, for adopted forwards that call it."""
        return padded_conv(input, weight, bias, self.stride, self.padding, self.dilation, self.groups,
                           self.padding_mode)

    def _conv(self, x: Tensor) -> Tensor:
        if self.conv_class is not None:
            return self.conv_class.forward(self, x)  # the adopted conv's own forward, weight transform included
        if self.padding_mode != "zeros":
            return padded_conv(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups,
                               self.padding_mode)
        conv = CONV_FUNCTIONS[self.ndim]
        return conv(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def conv_weights(self) -> tuple[Tensor, Tensor | None]:
        """The (weight, bias) the conv branch convolves with.

        The parameters themselves, or for an adopted ``conv_class`` what its
        forward computes from them: evaluated once from float64 copies of the
        site's floating-point parameters and buffers, then cast back to the
        weight's dtype.
        """
        if self.conv_class is None:
            return self.weight, self.bias
        return captured_conv_weights(self, self.conv_class.__name__)

    def attention(self, x: Tensor) -> Tensor:
        """The attention branch's input transform: T_L(x) (PSSA)."""
        return pssa_transform(x, self.shift, self.directions, self.directional, kernel=site_ring(self))

    def forward(self, x: Tensor) -> Tensor:
        y = self._conv(x)
        if "bn" in self.extra_branches:
            y = self.conv_bn(y)
        if "1x1" in self.extra_branches:
            y = y + self.branch_1x1(x)
        if "identity" in self.extra_branches:
            y = y + self.branch_identity(x)
        return y + self.attn_bn(self.attn_conv(self.attention(x)))

    def _attention_repr(self) -> str:
        return f"shift={self.shift}, directions={self.directions}, directional={self.directional}"

    def extra_repr(self) -> str:
        g = self.geometry
        return (
            f"{g.in_channels}, {g.out_channels}, kernel_size={g.kernel_size}, stride={g.stride}, "
            f"padding={g.padding}, dilation={g.dilation}, groups={g.groups}, {self._attention_repr()}, "
            f"extra_branches={self.extra_branches}"
            + (f", conv_class={self.conv_class.__name__}" if self.conv_class is not None else "")
        )

    def deploy_weights(self) -> tuple[Tensor, Tensor]:
        """(weight, bias) of the single deploy convolution, from the shared fold functions."""
        if not all(torch.isfinite(p).all() for p in self.parameters()):
            raise FoldError("non-finite values in the site's parameters")
        g = self.geometry
        w, b = self.conv_weights()
        if "bn" in self.extra_branches:
            w, b = fold_conv_bn(w, b, bn_params(self.conv_bn))
        x, t = "x", "T(x)"
        branches = [Branch((x,), (g.in_channels,), g, w, b)]
        if "1x1" in self.extra_branches:
            # (conv, BatchNorm), as _make_1x1_branch builds it
            conv1, bn1 = cast(_ConvNd, self.branch_1x1[0]), self.branch_1x1[1]
            branches.append(Branch((x,), (g.in_channels,), conv_geometry(conv1),
                                   *fold_conv_bn(conv1.weight, conv1.bias, bn_params(bn1))))
        if "identity" in self.extra_branches:
            ndim = g.ndim
            ident = ConvGeometry(g.in_channels, g.out_channels, (1,) * ndim, g.stride, (0,) * ndim, (1,) * ndim,
                                 g.groups)
            wi, bi = bn_as_kernel(bn_params(self.branch_identity), g.groups, (1,) * ndim, (0,) * ndim, w.dtype)
            branches.append(Branch((x,), (g.in_channels,), ident, wi, bi))
        attn = self.attn_conv
        branches.append(Branch((t,), (attn.in_channels,), conv_geometry(attn),
                               *fold_conv_bn(attn.weight, None, bn_params(self.attn_bn))))
        merged = merge_branches(branches)
        if merged.inputs != (x, t):
            raise FoldError(f"unexpected deploy inputs {merged.inputs}")
        if merged.bias is None:  # merge_branches sums the branches' biases (zeros for none)
            raise FoldError("the merged branches have no bias")
        if not (torch.isfinite(merged.weight).all() and torch.isfinite(merged.bias).all()):
            raise FoldError("folded weights are not finite (BN statistics overflowed)")
        return merged.weight, merged.bias

    @torch.no_grad()
    def fuse(self, lowering: str = "channel", *, single_conv: bool = True,
             bn: BatchNormParams | None = None, weights: tuple[Tensor, Tensor] | None = None) -> XVolutionDeploy:
        """The deploy form: one convolution over ``interleave_groups([x, T(x)])`` (``lowering="channel"``),
        over ``interleave_spatial([x, T(x)])`` (``"spatial"``: along W; ``"spatial-h"``: along H,
        ``interleave_spatial([x, T(x)], -2)``), one convolution of one more dimension over
        ``stack_depth([x, T(x)])`` (``"stack"``), or, with ``single_conv=False``,
        two convolutions and an add (``"split"``); ``bn``, an eval BatchNorm applied to the site's
        output, folded in. ``weights``: :meth:`deploy_weights` when already computed.
        FoldError says why a lowering is not exact here."""
        w, b = self.deploy_weights() if weights is None else weights
        if bn is not None:
            w, b = fold_conv_bn(w, b, bn)
        deploy = XVolutionDeploy(self.geometry, shift=self.shift, directions=self.directions,
                                 directional=self.directional, lowering=lowering, single_conv=single_conv,
                                 device=w.device, dtype=w.dtype)
        deploy.load_merged(w, b)
        return deploy.eval()
