"""Time the PSSA transform alone at real site shapes: the pooling formula against ``pssa_transform``.

    .venv/bin/python benchmarks/bench_transform.py [--repeats 31] [--threads 2] [--batches 1 16]

The reference ("avgpool") is the transform as it was computed before it became one
constant-kernel depthwise conv and one multiply: a 3x3 average pool, scale, subtract
the centre, divide, multiply (five memory passes). Shapes are the inputs of the sites
xvolify picks by default at 224 px: ResNet-50's layer3 (256 channels at 28x28 for the
strided first block, 14x14 after), MobileNetV3-Large's stride-16 depthwise convs
(240 at 28x28; 200, 184, 480 and 672 at 14x14), RegNetY-400MF's grouped convs (208
channels, 8 per group, at 28x28 for the strided first block, 14x14 after) and
ConvNeXt-Tiny's 7x7 depthwise convs (384 at 14x14). For scale, the site's own conv
(its kernel, stride and groups) is timed in the same rounds.
Eager, float32, full 8-neighbourhood, shift 1; rounds interleaved; per shape the
median, the 25-75% range and the speed-up (median of the per-round ratios).
Run on an idle machine: the numbers are wall-clock times.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from xvol_compiler import pssa_transform, render_table
from xvol_compiler.host_memory import hold_freed_memory
from xvol_compiler.machine_load import load_line
from xvol_compiler.measure import interleaved_latency

# (model and site, input channels, spatial size, channels per group of the site's conv (0: depthwise),
#  its kernel size and stride)
SITES: tuple[tuple[str, int, int, int, int, int], ...] = (
    ("resnet50 layer3.0", 256, 28, 256, 3, 2),
    ("resnet50 layer3.1-5", 256, 14, 256, 3, 1),
    ("mobilenet_v3_large features.7", 240, 28, 0, 3, 2),
    ("mobilenet_v3_large features.8", 200, 14, 0, 3, 1),
    ("mobilenet_v3_large features.9-10", 184, 14, 0, 3, 1),
    ("mobilenet_v3_large features.11", 480, 14, 0, 3, 1),
    ("mobilenet_v3_large features.12", 672, 14, 0, 3, 1),
    ("regnet_y_400mf block3-0", 208, 28, 8, 3, 2),
    ("regnet_y_400mf block3-1..5", 208, 14, 8, 3, 1),
    ("convnext_tiny features.5", 384, 14, 0, 7, 1),
)


def avgpool_transform(x: torch.Tensor) -> torch.Tensor:
    """T(x) by the pooling formula: x * (9 * avg_pool3x3(x) - x) / 8, zero padding counted."""
    box = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=True) * 9.0
    return x * ((box - x) / 8.0)


def _ms(times: Sequence[float], q: float) -> float:
    s = sorted(times)
    return 1e3 * s[min(len(s) - 1, round(q * (len(s) - 1)))]


def main(argv: list[str] | None = None) -> list[dict[str, object]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=31, help="timed rounds per shape")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--sites", type=int, default=len(SITES), help="only the first N site shapes (smoke runs)")
    args = parser.parse_args(argv)
    print(f"host memory: {hold_freed_memory()}", flush=True)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    start_load = load_line("start")
    rows, results = [], []
    for label, channels, size, per_group, kernel, stride in SITES[: args.sites]:
        groups = channels // per_group if per_group else channels
        weight = torch.randn(channels, channels // groups, kernel, kernel)
        for batch in args.batches:
            x = torch.randn(batch, channels, size, size)
            err = float((pssa_transform(x) - avgpool_transform(x)).abs().max() / avgpool_transform(x).abs().max())
            with torch.no_grad():
                latency = interleaved_latency(
                    {"avgpool": lambda x=x: avgpool_transform(x), "pssa_transform": lambda x=x: pssa_transform(x),
                     "site conv": lambda x=x, w=weight, g=groups, s=stride, p=kernel // 2: F.conv2d(
                         x, w, None, s, p, 1, g)},
                    repeats=args.repeats, warmup=args.warmup,
                )
            speedup = 1.0 / latency.ratio("pssa_transform", "avgpool")
            lo, hi = latency.ratio_spread("pssa_transform", "avgpool")
            cells = {name: (latency.median(name) * 1e3, _ms(t, 0.25), _ms(t, 0.75))
                     for name, t in latency.times.items()}
            rows.append([
                label, f"{batch}x{channels}x{size}x{size}",
                *(f"{m:.3f} ({a:.3f}-{b:.3f})" for m, a, b in cells.values()),
                f"{speedup:.2f}x ({1 / hi:.2f}-{1 / lo:.2f})",
                f"{latency.ratio('pssa_transform', 'site conv'):.2f}", f"{err:.1e}",
            ])
            results.append({"site": label, "shape": [batch, channels, size, size], "ms": cells,
                            "speedup": speedup, "speedup_p25_p75": [1 / hi, 1 / lo], "max_rel_error": err})
    title = (f"PSSA transform alone, eager float32: {args.repeats} interleaved rounds, {args.threads} threads, "
             f"torch {torch.__version__}; {start_load}")
    print(render_table(
        ["site", "input", "avgpool ms (p25-p75)", "pssa_transform ms (p25-p75)", "site conv ms (p25-p75)",
         "speed-up (p25-p75)", "transform / site conv", "rel. error"],
        rows, title=title,
    ))
    print(load_line("end, this benchmark included"))
    return results


if __name__ == "__main__":
    main()
