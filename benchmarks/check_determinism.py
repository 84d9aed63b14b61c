"""Same model, options and package version: same fused structure, whatever the machine's load.

    python benchmarks/check_determinism.py                      # mobilenet_v3_large, efficientnet_b0; 3 at once
    python benchmarks/check_determinism.py --models resnet18 --processes 4

For each model, ``--processes`` processes start at the same moment and each fuses the xvolified model with
default options, in the FX pass (``fuse``) and the ONNX pass (``fuse_onnx``), on a machine they load with
each other. Each prints a digest of what it built: the lowering of every site, the fused module's
structure (``str(module)``, parameter and buffer names and shapes) and the fused ONNX graph's nodes (op,
inputs, outputs, attributes) and initializer shapes. The check passes when every process of a model wrote
the same digests. Weights are seeded; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

DEFAULT_MODELS = ("mobilenet_v3_large", "efficientnet_b0")


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def fuse_digests(name: str, size: int) -> dict[str, object]:
    """One process's digests of ``name`` fused by both passes with default options."""
    import onnx
    import torch

    from xvol_compiler import export_onnx, fuse_with_report, xvolify
    from xvol_compiler.io import torchvision_model
    from xvol_passes.fuse_onnx import fuse_onnx

    torch.manual_seed(0)
    x = torch.randn(1, 3, size, size)
    model = xvolify(torchvision_model(name, num_classes=1000).eval(), example_inputs=x).eval()
    fused, report = fuse_with_report(model, example_inputs=x)
    module_text = str(fused) + "".join(f"\n{k} {tuple(v.shape)}" for k, v in fused.state_dict().items())
    graph, onnx_report = fuse_onnx(export_onnx(model, None, (x,), dynamo=False), example_inputs=[x.numpy()])
    nodes = "\n".join(f"{n.op_type} {list(n.input)} {list(n.output)} "
                      f"{sorted((a.name, str(onnx.helper.get_attribute_value(a))) for a in n.attribute)}"
                      for n in graph.graph.node)
    inits = "\n".join(f"{i.name} {list(i.dims)}" for i in graph.graph.initializer)
    return {"fx_lowerings": report.lowerings(), "fx_structure": _digest(module_text),
            "onnx_lowerings": onnx_report.lowerings(), "onnx_structure": _digest(nodes + "\n" + inits)}


def run_concurrently(name: str, size: int, processes: int) -> list[dict[str, object]]:
    command = [sys.executable, __file__, "--one", name, "--size", str(size)]

    def one(_: int) -> dict[str, object]:
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise SystemExit(f"{name}: a fusing process failed:\n{done.stderr[-2000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])

    with ThreadPoolExecutor(processes) as pool:
        return list(pool.map(one, range(processes)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS))
    parser.add_argument("--processes", type=int, default=3)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a child process: fuse this model, print its digests
    args = parser.parse_args(argv)
    if args.one:
        sys.stdout.write(json.dumps(fuse_digests(args.one, args.size), sort_keys=True) + "\n")
        return 0
    # Load is the point here (the processes load the machine for each other): recorded, not flagged.
    sys.stdout.write(f"load average at start {os.getloadavg()}\n")
    failed = False
    for name in args.models:
        results = run_concurrently(name, args.size, args.processes)
        distinct = {json.dumps(r, sort_keys=True) for r in results}
        first = results[0]
        lowerings = sorted(set(first["fx_lowerings"].values()))  # type: ignore[attr-defined]
        sys.stdout.write(f"{name}: {args.processes} concurrent processes, {len(distinct)} distinct result(s); "
                         f"FX {first['fx_structure']} ONNX {first['onnx_structure']}; "
                         f"{len(first['fx_lowerings'])} sites, lowerings {lowerings}\n")  # type: ignore[arg-type]
        failed |= len(distinct) != 1
    sys.stdout.write(f"load average at end {os.getloadavg()}\n")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
