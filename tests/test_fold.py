"""Foundation: the PSSA transform against a naive reference, and XVolution fold math
(training form vs deploy form) on random site geometries."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from tests.hyp import examples
from tests.strategies import SiteSpec, conv_sites, randomize_bn, rel_err
from xvol_compiler import FoldError, XVolution, pssa_transform
from xvol_compiler.fold import BatchNormParams, fold_conv_bn
from xvol_compiler.pssa import neighbour_offsets


def naive_pssa(x: torch.Tensor, shift, directions=None, directional=False) -> torch.Tensor:
    """The definition of docs/operator.md (section 1) written out literally: one shifted copy per direction,
    zero fill."""
    ndim = x.dim() - 2
    shifts = (shift,) * ndim if isinstance(shift, int) else tuple(shift)
    copies = []
    for off in neighbour_offsets(ndim, directions):
        out = torch.zeros_like(x)
        src, dst = [slice(None)] * 2, [slice(None)] * 2
        for axis, (o, s) in enumerate(zip(off, shifts, strict=True)):
            n, k = x.shape[2 + axis], o * s
            # out[i] = x[i + k]
            dst.append(slice(max(0, -k), max(0, min(n, n - k))))
            src.append(slice(max(0, k), max(0, min(n, n + k))))
        if all(d.stop > d.start for d in dst[2:]):
            out[tuple(dst)] = x[tuple(src)]
        copies.append(out)
    if directional:
        return torch.stack([x * c for c in copies], dim=2).flatten(1, 2)
    return x * torch.stack(copies).mean(0)


@settings(max_examples=examples(150))
@given(
    ndim=st.sampled_from([1, 2, 3]),
    full=st.booleans(),
    directional=st.booleans(),
    shift=st.integers(1, 4),
    size=st.lists(st.integers(1, 9), min_size=3, max_size=3),
    channels=st.integers(1, 4),
)
def test_pssa_matches_naive_definition(ndim, full, directional, shift, size, channels):
    x = torch.randn(2, channels, *size[:ndim], dtype=torch.float64)
    directions = "full" if full else "axial"
    got = pssa_transform(x, shift, directions, directional)
    want = naive_pssa(x, shift, directions, directional)
    assert got.shape == want.shape
    assert torch.allclose(got, want, rtol=0, atol=1e-13)


def test_pssa_per_axis_shift_and_default_neighbourhood():
    x = torch.randn(1, 3, 5, 6, 7, dtype=torch.float64)
    assert torch.allclose(pssa_transform(x, (1, 2, 3)), naive_pssa(x, (1, 2, 3)), atol=1e-13)
    assert len(neighbour_offsets(2)) == 8 and len(neighbour_offsets(3)) == 26 and len(neighbour_offsets(1)) == 2
    with pytest.raises(ValueError, match="not a neighbourhood"):
        pssa_transform(torch.randn(1, 1, 4, 4), 1, 6)
    with pytest.raises(ValueError, match="shift"):
        pssa_transform(torch.randn(1, 1, 4, 4), 0)


def _build_site(spec: SiteSpec, extras: tuple[str, ...], shift: int, directions: str, directional: bool):
    torch.manual_seed(0)
    conv = spec.conv(torch.float64)
    try:
        site = XVolution.from_conv(conv, shift=shift, directions=directions, directional=directional,
                                   extra_branches=extras)
    except FoldError:
        # Extra branches are refused where docs/operator.md (section 4) forbids them (misaligned 1x1, identity with
        # stride); the refusal itself is tested separately. Fall back to the plain site.
        site = XVolution.from_conv(conv, shift=shift, directions=directions, directional=directional)
    return conv, site


def _simulate_training(site: XVolution, seed: int) -> XVolution:
    randomize_bn(site, seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in site.named_parameters():
            if "bn" not in name and "identity" not in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) / max(1, p[0].numel()) ** 0.5)
    return site.eval()


@settings(max_examples=examples(300))
@given(
    spec=conv_sites(ndims=(2,)),
    extras=st.sampled_from([(), ("1x1",), ("identity",), ("bn",), ("1x1", "identity", "bn")]),
    shift=st.integers(1, 3),
    directions=st.sampled_from(["full", "axial"]),
    directional=st.booleans(),
    channels_last=st.booleans(),
)
def test_fold_xvolution_deploy_matches_training_form(spec, extras, shift, directions, directional, channels_last):
    _, site = _build_site(spec, extras, shift, directions, directional)
    _simulate_training(site, seed=spec.in_channels * 7 + spec.kernel_size[0])
    x = spec.input(torch.float64)
    deploy = site.fuse()
    ref = site(x)
    got = deploy(x)
    assert got.shape == ref.shape
    assert rel_err(got, ref) <= 1e-10

    # float32 deploy form against the float64 training-form reference
    site32, deploy32 = site.float(), deploy.float()
    x32 = x.float()
    if channels_last:
        x32 = x32.contiguous(memory_format=torch.channels_last)
    assert rel_err(deploy32(x32), ref) <= 1e-4
    assert rel_err(site32(x32), ref) <= 1e-4


@settings(max_examples=examples(120))
@given(spec=conv_sites(ndims=(1, 3), max_kernel=5), shift=st.integers(1, 2), full=st.booleans(),
       directional=st.booleans())
def test_fold_xvolution_deploy_matches_training_form_1d_3d(spec, shift, full, directional):
    _, site = _build_site(spec, ("1x1", "bn"), shift, "full" if full else "axial", directional)
    _simulate_training(site, seed=3)
    x = spec.input(torch.float64)
    assert rel_err(site.fuse()(x), site(x)) <= 1e-10


@settings(max_examples=examples(100))
@given(spec=conv_sites(ndims=(1, 2, 3), max_kernel=5), extras=st.sampled_from([(), ("1x1", "identity")]))
def test_fold_insertion_with_zero_gamma_is_exact(spec, extras):
    """At insertion the module computes exactly what the site computed (eval, float64)."""
    conv, site = _build_site(spec, extras, 1, "full", False)
    randomize_bn(site, 1)  # statistics move, but gamma (and beta of new BNs) stay 0
    with torch.no_grad():
        for m in site.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m is not getattr(site, "conv_bn", None):
                m.weight.zero_()
                m.bias.zero_()
    x = spec.input(torch.float64)
    assert torch.equal(site.eval()(x), conv.eval()(x))


def test_fold_insertion_exact_with_post_bn_branch():
    conv = nn.Conv2d(4, 6, 3, padding=1).eval()
    site = XVolution.from_conv(conv, extra_branches=("bn",)).eval()
    x = torch.randn(2, 4, 9, 9)
    assert torch.equal(site(x), conv(x))


def test_fold_gradients_reach_both_branches():
    conv = nn.Conv2d(4, 6, 3, padding=1)
    site = XVolution.from_conv(conv, extra_branches=("1x1",)).train()
    opt = torch.optim.SGD(site.parameters(), lr=0.1)
    x = torch.randn(4, 4, 8, 8)
    for _ in range(2):  # step 1 moves gamma off zero, step 2 reaches Conv_a through it
        opt.zero_grad()
        loss = site(x).square().mean()
        loss.backward()
        assert torch.isfinite(loss)
        assert site.weight.grad.abs().sum() > 0
        assert site.attn_bn.weight.grad.abs().sum() > 0
        opt.step()
    assert site.attn_conv.weight.grad.abs().sum() > 0
    assert site.branch_1x1[0].weight.grad.abs().sum() > 0


def test_fold_conv_bn_matches_eval_module_and_keeps_dtype():
    conv = nn.Conv2d(5, 7, 3, groups=1, bias=False)
    bn = randomize_bn(nn.BatchNorm2d(7)).eval()
    w, b = fold_conv_bn(conv.weight, conv.bias,
                        BatchNormParams(bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps))
    assert w.dtype == torch.float32 and b.dtype == torch.float32
    x = torch.randn(2, 5, 8, 8)
    ref = bn.double()(conv.double()(x.double()))
    assert rel_err(nn.functional.conv2d(x, w, b), ref) <= 1e-5


def test_fold_refusals_name_the_problem():
    conv = nn.Conv2d(4, 4, 3, padding=1)
    site = XVolution.from_conv(conv)
    site.train()
    with pytest.raises(FoldError, match=r"training mode.*eval\(\)"):
        site.fuse()
    site.eval()
    site.attn_bn.running_var[0] = float("inf")
    with pytest.raises(FoldError, match="non-finite"):
        site.fuse()
    no_stats = XVolution.from_conv(conv)
    no_stats.attn_bn = nn.BatchNorm2d(4, track_running_stats=False).eval()
    with pytest.raises(FoldError, match="running statistics"):
        no_stats.eval().fuse()
    with pytest.raises(FoldError, match="1x1"):
        XVolution.from_conv(nn.Conv2d(4, 4, 3, padding=0), extra_branches=("1x1",))
    with pytest.raises(FoldError, match="identity"):
        XVolution.from_conv(nn.Conv2d(4, 4, 3, padding=1, stride=2), extra_branches=("identity",))
    with pytest.raises(TypeError, match="Conv1d/2d/3d"):
        XVolution.from_conv(nn.Linear(3, 3))


def test_fold_keeps_original_keys():
    conv = nn.Conv2d(4, 6, 3, padding=1)
    site = XVolution.from_conv(conv, extra_branches=("1x1",))
    missing, unexpected = site.load_state_dict(conv.state_dict(), strict=False)
    assert not unexpected
    assert all(k.startswith(("attn_", "branch_")) for k in missing)
    assert {"weight", "bias"} <= set(site.state_dict())


@pytest.mark.compile
def test_fold_compile_fullgraph_matches_eager():
    conv = nn.Conv2d(6, 8, 3, padding=1, groups=2)
    site = _simulate_training(XVolution.from_conv(conv, extra_branches=("1x1",)), 5)
    deploy = site.fuse()
    x = torch.randn(2, 6, 11, 9)
    for m in (site, deploy):
        compiled = torch.compile(m, fullgraph=True)
        assert rel_err(compiled(x), m(x)) <= 1e-5
