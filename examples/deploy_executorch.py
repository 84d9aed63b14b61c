"""Deploy a fused X-volution model with ExecuTorch: one XNNPACK delegate, run in the ExecuTorch runtime.

    pip install -e '.[executorch]'                     # or: make executorch-env
    python examples/deploy_executorch.py               # resnet18 -> resnet18_fused.pte
    python examples/deploy_executorch.py --model mobilenet_v3_small --out mnv3.pte --force

Steps: a torchvision model (``weights=None``, 10 classes) -> ``xvolify`` at the
default sites -> the attention made to matter (the zero-initialised gammas of
each site's attention BatchNorm set to non-zero values with
``with_exercised_attention``, so T(x) changes the output) -> ``fuse`` ->
``torch.export.export`` -> ``to_edge_transform_and_lower`` with the XNNPACK
partitioner -> count the delegate segments and name any operator on
activations left outside them -> write the ``.pte`` atomically (an existing file only with ``--force``)
-> load it in the ExecuTorch runtime, run it, and compare with the unfused
model run in float64. The exit status is 1 when the program has more than one
delegate segment, an operator on activations outside it, or an error above
``--tol``.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
import torchvision

import xvol_compiler
from xvol_compiler.attention_probe import with_exercised_attention
from xvol_compiler.executorch_io import delegate_report, lower_to_xnnpack, pte_bytes, run_pte
from xvol_compiler.files import OutputError, atomic_write_bytes, check_output


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet18", help="torchvision classification model name")
    parser.add_argument("--size", type=int, default=64, help="input height and width in pixels")
    parser.add_argument("--out", type=Path, default=None, help=".pte file to write (default: MODEL_fused.pte)")
    parser.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights, the attention and the input")
    parser.add_argument("--gamma-scale", type=float, default=0.3,
                        help="scale of the attention gammas (T(x) grows with the square of the activations)")
    parser.add_argument("--tol", type=float, default=1e-4, help="largest accepted error relative to max |output|")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = args.out if args.out is not None else Path(f"{args.model}_fused.pte")
    try:
        check_output(out, force=args.force)  # before any work
    except OutputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    plain = torchvision.models.get_model(args.model, weights=None, num_classes=10).eval()
    x = torch.randn(1, 3, args.size, args.size)
    sited = xvol_compiler.xvolify(copy.deepcopy(plain), example_inputs=(x,))
    unfused, changed = with_exercised_attention(sited, seed=args.seed, scale=args.gamma_scale)
    unfused.eval()
    fused = xvol_compiler.fuse(unfused, example_inputs=(x,))
    with torch.no_grad():
        reference = copy.deepcopy(unfused).double()(x.double())
        attention_effect = (reference - copy.deepcopy(plain).double()(x.double())).abs().max().item()

    start = time.perf_counter()
    edge = lower_to_xnnpack(fused, (x,))
    report = delegate_report(edge)
    data = pte_bytes(edge)
    lowered_s = time.perf_counter() - start
    atomic_write_bytes(out, data, force=args.force)

    got = run_pte(out, (x,))[0]
    max_err = (got.double() - reference).abs().max().item()
    rel = max_err / reference.abs().max().clamp_min(1e-12).item()
    sites = sum(isinstance(m, xvol_compiler.XVolutionDeploy) for m in fused.modules())
    print(f"model: {args.model}, input {tuple(x.shape)}, {sites} fused X-volution sites "
          f"({changed} attention BatchNorms exercised; attention changes the output by up to {attention_effect:.3g})")
    print(f"lowered to XNNPACK in {lowered_s:.1f} s: {report}")
    print(f"wrote {out} ({len(data) / 2**20:.1f} MiB)")
    print(f"ExecuTorch runtime vs unfused float64: max abs error {max_err:.3g} (relative {rel:.3g}, tol {args.tol:g})")
    ok = report.segments == 1 and not report.outside and rel <= args.tol  # (constant-only ops are fine)
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
