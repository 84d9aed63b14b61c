"""Wall time of ``fuse`` itself: this checkout against another checkout of the package, interleaved.

    git worktree add /tmp/xvol-ref <commit>            # the version to compare with
    python benchmarks/bench_fuse.py --ref-tree /tmp/xvol-ref
    python benchmarks/bench_fuse.py --ref-tree /tmp/xvol-ref --models resnet18 --repeats 3 --input-size 64  # smoke

Each measurement is a fresh Python process that imports one tree's package (this one, or the one at
``--ref-tree``), builds the torchvision model (``weights=None``, seeded), inserts X-volution at the
default sites, fuses once to warm up and then times one ``fuse(model, example_inputs=x, verify=False,
**options)`` (imports and model building are not timed). Processes for the two trees take turns within
each round, the first one alternating; the ratio is the median of the per-round ratios (this / ref) with
the 25th-75th percentiles. Options are the defaults of each version, and ``lowering="channel"`` (the same
structure in both, so the ratio is the fusion work alone). Run on an idle machine: the load average at
start and end is printed, and a load above 0.3 per core is flagged.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from xvol_compiler.machine_load import load_line

_WORKER = r'''
import importlib.util, json, sys, time
from pathlib import Path
tree = Path(sys.argv[1])
paths = {"xvol_compiler": tree / "xvol_compiler", "xvol_passes": tree / "passes"}

class _TreeFinder:
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name in paths:
            return importlib.util.spec_from_file_location(
                name, paths[name] / "__init__.py", submodule_search_locations=[str(paths[name])])
        return None

sys.meta_path.insert(0, _TreeFinder)
import torch, torchvision
import xvol_compiler
assert str(Path(xvol_compiler.__file__).resolve()).startswith(str(tree.resolve())), xvol_compiler.__file__
torch.set_num_threads(int(sys.argv[5]))
name, size, options = sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])
torch.manual_seed(0)
model = torchvision.models.get_model(name, weights=None)
x = torch.randn(1, 3, size, size)
model = xvol_compiler.xvolify(model, example_inputs=(x,)).eval()
xvol_compiler.fuse(model, example_inputs=(x,), verify=False, **options)
start = time.perf_counter()
xvol_compiler.fuse(model, example_inputs=(x,), verify=False, **options)
print(json.dumps({"seconds": time.perf_counter() - start}))
'''


def _time(tree: Path, model: str, size: int, options: dict[str, str], threads: int) -> float:
    out = subprocess.run([sys.executable, "-c", _WORKER, str(tree), model, str(size), json.dumps(options),
                          str(threads)], check=True, capture_output=True, text=True)
    return float(json.loads(out.stdout.strip().splitlines()[-1])["seconds"])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ref-tree", type=Path, required=True, help="checkout of the version to compare with")
    p.add_argument("--models", default="resnet50,mobilenet_v3_large,convnext_tiny")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--input-size", type=int, default=224)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    this = Path(__file__).resolve().parent.parent
    print(f"this tree {this}, ref tree {args.ref_tree.resolve()}; {load_line('start')}")
    option_sets = {"defaults": {}, "lowering=channel": {"lowering": "channel"}}
    times: dict[tuple[str, str, str], list[float]] = {}
    for r in range(args.repeats):
        for model in args.models.split(","):
            for label, options in option_sets.items():
                order = [("this", this), ("ref", args.ref_tree)]
                for which, tree in order if r % 2 == 0 else order[::-1]:
                    times.setdefault((model, label, which), []).append(
                        _time(tree, model, args.input_size, options, args.threads))
        print(f"round {r + 1}/{args.repeats} done", file=sys.stderr)
    print("| model | options | this (s) | ref (s) | this / ref | 25-75% |")
    print("|---|---|---:|---:|---:|---|")
    for model in args.models.split(","):
        for label in option_sets:
            mine, ref = times[(model, label, "this")], times[(model, label, "ref")]
            ratios = sorted(a / b for a, b in zip(mine, ref, strict=True))
            q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
            print(f"| {model} | {label} | {statistics.median(mine):.2f} | {statistics.median(ref):.2f} | "
                  f"{statistics.median(ratios):.3f} | {q[0]:.3f}-{q[2]:.3f} |")
    print(load_line("end, this benchmark included"))


if __name__ == "__main__":
    main()
