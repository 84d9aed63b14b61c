"""Training step, xvolified / original, eager, interleaved rounds.

    python benchmarks/bench_train.py                              # resnet50 and mobilenet_v3_large, batch 16, 224 px
    python benchmarks/bench_train.py --models resnet18 --batch 4 --input-size 64 --repeats 3   # smoke run

One step is forward, cross-entropy loss, backward and an SGD update (momentum 0.9), the model in train
mode (BatchNorm with batch statistics). The two forms (the original torchvision model, ``weights=None``,
and its ``xvolify`` at the default os16 sites) take turns within each round, the starting form rotated;
the ratio is the median of the per-round ratios, with the 25th-75th percentiles. Benchmark on an idle
machine: load changes the ratios.
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable

import torch
import torchvision
from torch import nn

from xvol_compiler import xvolify
from xvol_compiler.host_memory import hold_freed_memory
from xvol_compiler.machine_load import load_line
from xvol_compiler.measure import interleaved_latency, machine_info


def _step(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> Callable[[], None]:
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(x), target).backward()
        optimizer.step()

    return step


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="resnet50,mobilenet_v3_large", help="comma-separated torchvision names")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--input-size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=15, help="interleaved rounds (default 15)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    print(f"host memory: {hold_freed_memory()}", flush=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine_info()
    print(load_line("start"))
    print(f"{info.get('cpu', '?')}; {torch.get_num_threads()} torch threads; torch {torch.__version__}")
    print(f"training step, batch {args.batch}, {args.input_size} px, {args.repeats} interleaved rounds "
          f"({args.warmup} warm-up)\n")
    print("| model | sites | original ms | xvolified ms | xvolified / original [p25-p75] |")
    print("|---|---:|---:|---:|---:|")
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        torch.manual_seed(0)
        original = torchvision.models.get_model(name, weights=None).train()
        x = torch.randn(args.batch, 3, args.input_size, args.input_size)
        target = torch.randint(0, 1000, (args.batch,))
        xvol = xvolify(copy.deepcopy(original), example_inputs=x[:1]).train()
        sites = len(xvol.xvol_report.selected)
        lat = interleaved_latency({"original": _step(original, x, target), "xvolified": _step(xvol, x, target)},
                                  repeats=args.repeats, warmup=args.warmup)
        lo, hi = lat.ratio_spread("xvolified", "original")
        print(f"| {name} | {sites} | {1e3 * lat.median('original'):.1f} | {1e3 * lat.median('xvolified'):.1f} | "
              f"{lat.ratio('xvolified', 'original'):.3f} [{lo:.3f}-{hi:.3f}] |", flush=True)
    print(load_line("end, this benchmark included"))


if __name__ == "__main__":
    main()
