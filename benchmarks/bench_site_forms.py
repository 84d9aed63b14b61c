"""Whole depthwise sites (T(x) and the convolution) in every exact form, eager and torch.compile, with the memory floor.

    python benchmarks/bench_site_forms.py                     # mobilenet_v3_large, efficientnet_b0, batch 1 and 16
    python benchmarks/bench_site_forms.py --quick             # smoke run: 64 px, 2 rounds, 2 sites

For each distinct depthwise X-volution site geometry of the models (xvolify's
default os16 sites, 224 px; attention BatchNorms with random scales so the
attention branch counts), every form runs from the site's input ``x`` to its
output ``y``:

- ``unfused``: the trained ``XVolution`` in eval mode (conv, T(x), attention conv, BatchNorm);
- ``split``, ``spatial``, ``spatial-h``, ``stack``, ``channel``: the package's deploy lowerings
  (``XVolution.fuse(lowering)``; whichever ``xvol_compiler.lowering.LOWERINGS`` has; ``stack`` is the
  depth-2 Conv3d over ``stack([x, T(x)], 2)``, kernel ``(2, kh, kw)``, formerly measured here as ``conv3d``);
- ``stencil``: the site written as shifted slices of one padded ``x`` (T(x) and
  both branches as a sum of taps), for inductor to turn into one loop nest that
  never writes T(x) or an interleave.

Every form is checked against a float64 run of ``unfused`` before timing (relative
error < 1e-4). ``floor`` is the memory floor, one read of ``x`` and one write of
``y``, timed as a copy of that many bytes (``torch.empty_like(x).copy_(x)`` scaled by
``(|x| + |y|) / (2 |x|)``). Candidates run round-robin in each round; medians and
25-75% ranges in microseconds; ratios are to ``split``. Run on an idle machine.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from xvol_compiler import XVolution, xvolify
from xvol_compiler.fold import FoldError
from xvol_compiler.host_memory import hold_freed_memory
from xvol_compiler.io import torchvision_model
from xvol_compiler.lowering import LOWERINGS
from xvol_compiler.machine_load import load_line
from xvol_compiler.measure import compile_timing_set
from xvol_compiler.pssa import neighbour_offsets
from xvol_compiler.report import render_table

DEFAULT_MODELS = ("mobilenet_v3_large", "efficientnet_b0")


def depthwise_sites(name: str, size: int) -> list[tuple[str, XVolution, tuple[int, ...]]]:
    """(site name, XVolution in eval mode, input shape at batch 1) of each depthwise site, one per geometry."""
    torch.manual_seed(0)
    x = torch.randn(1, 3, size, size)
    model = xvolify(torchvision_model(name, num_classes=1000).eval(), example_inputs=x).eval()
    shapes: dict[str, tuple[int, ...]] = {}
    hooks = []
    for site, m in model.named_modules():
        if isinstance(m, XVolution):
            with torch.no_grad():
                m.attn_bn.weight.normal_()
            hooks.append(m.register_forward_hook(
                lambda mod, args, out, site=site: shapes.__setitem__(site, tuple(args[0].shape))))
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    out, seen = [], set()
    for site, m in model.named_modules():
        if not isinstance(m, XVolution):
            continue
        g = m.geometry
        if g.groups != g.in_channels or m.directional or g.dilation != (1, 1) or g.padding_mode != "zeros":
            continue
        key = (shapes[site][1:], g.kernel_size, g.stride, g.padding)
        if key not in seen:
            seen.add(key)
            out.append((f"{name}:{site}", m, shapes[site]))
    return out


def stencil_form(site: XVolution) -> Callable[[Tensor], Tensor]:
    """The site as a sum of taps over one zero-padded x: T = x * mean of the ring, both convs as taps.

    T(x) is zero wherever x is (outside the image), so T on the conv's padded grid
    is the product of padded slices: no separate padding of T is needed.
    """
    deploy = site.fuse("split", single_conv=False)
    wx, wt = deploy.conv.weight.detach(), deploy.conv_attn.weight.detach()
    bias = deploy.conv.bias.detach() if deploy.conv.bias is not None else torch.zeros(wx.shape[0])
    g = site.geometry
    (kh, kw), (sh, sw) = g.kernel_size, g.stride
    (ph, _), (pw, _) = g.pads()
    lh, lw = site.shift
    ring = neighbour_offsets(2, site.directions)
    c = wx.shape[0]
    wx_taps = wx.reshape(c, kh * kw).t().reshape(kh * kw, 1, c, 1, 1).contiguous()
    wt_taps = wt.reshape(c, kh * kw).t().reshape(kh * kw, 1, c, 1, 1).contiguous()
    b = bias.reshape(1, c, 1, 1)

    def run(x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        hp, wp = h + 2 * ph, w + 2 * pw
        xp = F.pad(x, (pw + lw, pw + lw, ph + lh, ph + lh))
        core = xp[..., lh:lh + hp, lw:lw + wp]
        total = None
        for dy, dx in ring:
            v = xp[..., lh + dy * lh:lh + dy * lh + hp, lw + dx * lw:lw + dx * lw + wp]
            total = v if total is None else total + v
        t = core * (total / float(len(ring)))
        ho, wo = (hp - kh) // sh + 1, (wp - kw) // sw + 1
        y = b
        for i in range(kh):
            for j in range(kw):
                rows = slice(i, i + sh * (ho - 1) + 1, sh)
                cols = slice(j, j + sw * (wo - 1) + 1, sw)
                y = y + wx_taps[i * kw + j] * core[..., rows, cols] + wt_taps[i * kw + j] * t[..., rows, cols]
        return y

    return run


def forms(site: XVolution) -> dict[str, Callable[[Tensor], Tensor]]:
    out: dict[str, Callable[[Tensor], Tensor]] = {"unfused": site}
    for lowering in LOWERINGS:
        try:
            out[lowering] = site.fuse(lowering, single_conv=False)
        except FoldError:
            continue
    out["stencil"] = stencil_form(site)
    return out


def check_exact(site: XVolution, runs: dict[str, Callable[[Tensor], Tensor]], x: Tensor) -> None:
    """Every form within 1e-4 relative of the unfused site run in float64."""
    import copy

    ref = copy.deepcopy(site).double()(x.double())
    scale = ref.abs().max().item()
    for name, fn in runs.items():
        err = (fn(x).double() - ref).abs().max().item() / scale
        if err > 1e-4:
            raise SystemExit(f"{name}: relative error {err:.2e} against the float64 unfused site")


def time_rounds(runs: dict[str, Callable[[], object]], repeats: int, warmup: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {k: [] for k in runs}
    names = list(runs)
    for r in range(warmup + repeats):
        order = names[r % len(names):] + names[: r % len(names)]
        for k in order:
            t0 = time.perf_counter()
            runs[k]()
            if r >= warmup:
                times[k].append((time.perf_counter() - t0) * 1e6)
    return times


def _q(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(DEFAULT_MODELS))
    p.add_argument("--backends", default="eager,compile")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--input-size", type=int, default=224)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="smoke run: 64 px, 2 rounds, 2 sites")
    args = p.parse_args(argv)
    print(f"host memory: {hold_freed_memory()}", flush=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.input_size, args.repeats, args.warmup = 64, 2, 1
    start_load = load_line("start")
    print(start_load, flush=True)
    names: list[str] = []
    rows: list[list[Any]] = []
    for model in [m for m in args.models.split(",") if m]:
        sites = depthwise_sites(model, args.input_size)
        if args.quick:
            sites = sites[:2]
        for site_name, site, shape1 in sites:
            g = site.geometry
            for batch in args.batches:
                x = torch.randn(batch, *shape1[1:], generator=torch.Generator().manual_seed(1))
                with torch.inference_mode():
                    fns = forms(site)
                    check_exact(site, fns, x)
                    y = fns["split"](x)
                    floor_scale = (x.numel() + y.numel()) / (2 * x.numel())
                    for backend in [b for b in args.backends.split(",") if b]:
                        runs: dict[str, Callable[[], object]] = {
                            "copy": lambda x=x: torch.empty_like(x).copy_(x)}
                        with contextlib.ExitStack() as stack:
                            compile_static = (stack.enter_context(compile_timing_set()) if backend == "compile"
                                              else None)
                            for k, fn in fns.items():
                                if k == "stencil" and backend == "eager":
                                    continue  # the stencil is written for inductor
                                f = compile_static(fn) if compile_static is not None else fn
                                runs[k] = lambda f=f, x=x: f(x)
                            times = time_rounds(runs, args.repeats, args.warmup)
                        med = {k: statistics.median(v) for k, v in times.items()}
                        for k in med:
                            if k not in names and k != "copy":
                                names.append(k)
                        floor = med.pop("copy") * floor_scale
                        cells = {k: f"{med[k]:.0f} [{_q(times[k], .25):.0f}-{_q(times[k], .75):.0f}] "
                                    f"{med[k] / med['split']:.2f}" for k in med}
                        single = [k for k in med if k not in ("unfused", "split")]
                        best = min(single, key=med.__getitem__)
                        rows.append([site_name, f"{shape1[1]}x{shape1[2]}x{shape1[3]} k{g.kernel_size[0]} "
                                     f"s{g.stride[0]}", backend, batch, f"{floor:.0f}", cells,
                                     f"{best} {med[best] / med['split']:.2f}"])
                        print(f"{site_name} {backend} b{batch}: " + ", ".join(
                            f"{k} {med[k]:.0f}" for k in med) + f"; floor {floor:.0f} us", flush=True)
    header = ["site", "C x H x W, kernel, stride", "backend", "batch", "floor us",
              *(f"{k} us [p25-p75] / split" for k in names), "best single-conv form / split"]
    table = [[*r[:5], *(r[5].get(k, "-") for k in names), r[6]] for r in rows]
    print(render_table(header, table,
                       title=f"Depthwise sites, whole site from x, median of {args.repeats} interleaved rounds, "
                             f"{args.input_size} px, {torch.get_num_threads()} threads; {start_load}"))
    print(load_line("end, this benchmark included"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
