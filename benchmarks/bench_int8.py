"""INT8 accuracy (SQNR against float) of original / unfused / fused / fused-rescaled X-volution models.

    python benchmarks/bench_int8.py --quick          # a few minutes on two cores
    python benchmarks/bench_int8.py                  # more data, larger images
    (needs the int8 extra: pip install -e .[int8], i.e. torchao, for the PT2E rows)

Model: torchvision resnet18 (``weights=None``), X-volution at xvolify's default os16 sites (layer3's 3x3
convs), given trained-like activation ranges (nothing is trained or downloaded):

- inputs: seeded random smooth images (bilinear upsampled 1/8-size noise plus fine noise), standardized
  per channel over the data set like ImageNet-normalized images;
- every BatchNorm, the attention branches' ``attn_bn`` included (so the attention gammas are non-zero),
  gets gamma ~ 0.8 * lognormal(0, 0.5) (a per-channel spread, a few large channels) and
  beta ~ N(0, 0.3); then the running statistics are recalibrated on the calibration images
  (train mode, cumulative average), so every BatchNorm normalizes what it really sees and the
  activations carry the ranges those affine values imply (residual stream max |x| of about 10-20,
  T(x) = x * R(x) several times larger);
- conv weights: torchvision's and xvolify's initializations.

Forms: original (resnet18 before xvolify, same recipe), unfused (xvolified), fused (``fuse``, channel
lowering; ONNX: ``fuse_onnx(lowering="channel")``), fused-rescaled (the fused form with x and s*T(x)
interleaved, ``xvol_compiler.int8`` / ``xvol_passes.onnx_rescale``; one s per site, by equal ranges
("ranges") and by the noise model ("noise", chosen for the column's weight granularity); one s per channel
was measured harmful before, results/20261204-191400-int8-tiny.md).
Toolchains: PT2E (torchao ``prepare_pt2e``/``convert_pt2e`` with the XNNPACK quantizer, symmetric
int8, per-tensor or per-channel weights) and onnxruntime ``quantize_static`` (QDQ, MinMax, int8
activations and weights, per-tensor or per-channel weights). Whole model: SQNR of the logits on the
evaluation images. Per site: each site alone (its float input captured from the float model), so the
number is the site's own quantization error; "split" is the two-conv form where x and T(x) are
quantized with separate scales, the reference the rescaled single conv should match.
SQNR = 10 log10(sum ref^2 / sum (q - ref)^2), dB. Results to benchmarks/results/ (never overwritten
without --force); ``os.getloadavg()`` at start and end in the output.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from torch import nn

from xvol_compiler import XVolution, export_onnx, fuse, xvolify
from xvol_compiler.files import atomic_write_json, atomic_write_text, check_outputs
from xvol_compiler.host_memory import hold_freed_memory
from xvol_compiler.int8 import WeightGranularity, deploy_sites, rescale_fused_model
from xvol_compiler.io import torchvision_model
from xvol_compiler.report import render_table
from xvol_passes.fuse_onnx import fuse_onnx
from xvol_passes.onnx_rescale import rescale_onnx

RESULTS = Path(__file__).resolve().parent / "results"
Forward = Callable[[torch.Tensor], torch.Tensor]


# ----------------------------------------------------------------------------- data and model


def images(n: int, size: int, seed: int) -> torch.Tensor:
    """Smooth random images, standardized per channel over the set (like ImageNet-normalized inputs)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(n, 3, max(1, size // 8), max(1, size // 8), generator=g)
    x = F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    x = x + 0.3 * torch.randn(n, 3, size, size, generator=g)
    return (x - x.mean(dim=(0, 2, 3), keepdim=True)) / x.std(dim=(0, 2, 3), keepdim=True)


@torch.no_grad()
def trained_like(model: nn.Module, batches: Sequence[torch.Tensor], seed: int, gamma: float = 0.8,
                 spread: float = 0.5) -> nn.Module:
    """Draw BatchNorm affine values (gamma ~ ``gamma`` lognormal(0, ``spread``), beta ~ N(0, 0.3)), then
    recalibrate the running statistics on ``batches`` (train mode, cumulative average); eval mode on return."""
    g = torch.Generator().manual_seed(seed)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        n = bn.num_features
        bn.weight.copy_(gamma * torch.exp(spread * torch.randn(n, generator=g)))
        bn.bias.copy_(0.3 * torch.randn(n, generator=g))
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the calibration batches
    model.train()
    for b in batches:
        model(b)
    for bn in bns:
        bn.momentum = 0.1
    return model.eval()


def sqnr(q: Sequence[torch.Tensor | np.ndarray], ref: Sequence[torch.Tensor | np.ndarray]) -> float:
    num = sum(float(np.sum(np.asarray(r, dtype=np.float64) ** 2)) for r in ref)
    err = sum(float(np.sum((np.asarray(a, dtype=np.float64) - np.asarray(r, dtype=np.float64)) ** 2))
              for a, r in zip(q, ref, strict=True))
    return math.inf if err == 0 else 10 * math.log10(num / err)


# ----------------------------------------------------------------------------- toolchains


def pt2e_quantize(model: nn.Module, calib: Sequence[torch.Tensor], per_channel: bool) -> Forward:
    """torchao PT2E with the XNNPACK quantizer (symmetric int8), calibrated on ``calib``."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    try:  # torchao 0.18 keeps its copy of the XNNPACK quantizer under testing/; executorch ships the same one
        from torchao.testing.pt2e._xnnpack_quantizer import XNNPACKQuantizer, get_symmetric_quantization_config
    except ImportError:  # pragma: no cover - depends on the installed torchao
        from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (  # type: ignore[no-redef]
            XNNPACKQuantizer,
            get_symmetric_quantization_config,
        )
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=per_channel))
        graph = torch.export.export(model.eval(), (calib[0],)).module()
        prepared = prepare_pt2e(graph, quantizer)  # type: ignore[arg-type]
        with torch.no_grad():
            for b in calib:
                prepared(b)
        converted = convert_pt2e(prepared)

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return converted(x)

    return run


def ort_quantize(model: onnx.ModelProto, calib: Sequence[torch.Tensor], per_channel: bool, tmp: Path) -> Forward:
    """onnxruntime quantize_static: QDQ, MinMax calibration on ``calib``, int8 activations and weights."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    from xvol_compiler.verify import onnx_session

    name = model.graph.input[0].name
    feeds = [{name: b.numpy()} for b in calib]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(feeds)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.it, None)

    src, dst = tmp / f"in{time.monotonic_ns()}.onnx", tmp / f"q{time.monotonic_ns()}.onnx"
    onnx.save(model, src)
    quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=per_channel,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax)
    session = onnx_session(str(dst), threads=1)

    def run(x: torch.Tensor) -> np.ndarray:
        return session.run(None, {name: x.numpy()})[0]

    return run  # type: ignore[return-value]


def float_onnx(model: onnx.ModelProto) -> Forward:
    from xvol_compiler.verify import onnx_session

    session = onnx_session(model, threads=1)
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x.numpy()})[0]  # type: ignore[return-value]


# ----------------------------------------------------------------------------- forms


GRANULARITIES: tuple[WeightGranularity, ...] = ("per-tensor", "per-channel")
RESCALED = {"fused-rescaled (ranges)": "ranges", "fused-rescaled (noise)": "noise"}
_SITE = "0"  # the site's name inside nn.Sequential(site)
TorchForms = dict[str, dict[WeightGranularity, nn.Module]]
OnnxForms = dict[str, dict[WeightGranularity, onnx.ModelProto]]


def torch_forms(unfused: nn.Module, calib: Sequence[torch.Tensor]) -> TorchForms:
    """form -> the model for each weight granularity (the same model but for the noise-model rescale,
    which is chosen for the granularity the quantizer will use)."""
    fused = fuse(copy.deepcopy(unfused), example_inputs=calib[0], lowering="channel")
    forms: TorchForms = {
        "unfused": dict.fromkeys(GRANULARITIES, unfused), "fused": dict.fromkeys(GRANULARITIES, fused)}
    for form, method in RESCALED.items():
        forms[form] = {}
        for weights in GRANULARITIES:
            model = copy.deepcopy(fused)
            rescale_fused_model(model, calib, method=method, weights=weights)  # type: ignore[arg-type]
            forms[form][weights] = model
    return forms


def onnx_forms(unfused: nn.Module, calib: Sequence[torch.Tensor]) -> OnnxForms:
    graph = export_onnx(unfused, None, (calib[0],), dynamo=False)
    fused, _ = fuse_onnx(graph, lowering="channel", example_inputs=[calib[0]])
    forms: OnnxForms = {
        "unfused": dict.fromkeys(GRANULARITIES, graph), "fused": dict.fromkeys(GRANULARITIES, fused)}
    arrays = [b.numpy() for b in calib]
    for form, method in RESCALED.items():
        forms[form] = {w: rescale_onnx(fused, arrays, method=method, weights=w)[0]  # type: ignore[arg-type]
                       for w in GRANULARITIES}
    return forms


def sqnr_cells(torch_models: TorchForms, onnx_models: OnnxForms, calib: Sequence[torch.Tensor],
               evals: Sequence[torch.Tensor], tmp: Path) -> dict[str, list[float]]:
    """form -> [PT2E per-tensor, PT2E per-channel, ORT per-tensor, ORT per-channel] SQNR in dB, each against
    the float run of the same model."""
    out: dict[str, list[float]] = {}
    for form, by_weights in torch_models.items():
        row = []
        for weights in GRANULARITIES:
            model = by_weights[weights]
            with torch.no_grad():
                ref_t = [model(x) for x in evals]
            q = pt2e_quantize(copy.deepcopy(model), calib, weights == "per-channel")
            row.append(sqnr([q(x) for x in evals], ref_t))
        for weights in GRANULARITIES:
            graph = onnx_models[form][weights]
            ref_o = [float_onnx(graph)(x) for x in evals]
            qo = ort_quantize(graph, calib, weights == "per-channel", tmp)
            row.append(sqnr([qo(x) for x in evals], ref_o))
        out[form] = row
    return out


def site_forms(site: XVolution, calib: Sequence[torch.Tensor]) -> tuple[TorchForms, OnnxForms]:
    """One site alone in every form, PyTorch and ONNX ("split": x and T(x) quantized separately)."""
    site = copy.deepcopy(site).eval()
    wrapped = nn.Sequential(site)
    forms = torch_forms(wrapped, calib)
    forms["split"] = dict.fromkeys(GRANULARITIES, nn.Sequential(site.fuse("split", single_conv=False)))
    graphs = onnx_forms(wrapped, calib)
    split, _ = fuse_onnx(graphs["unfused"]["per-tensor"], lowering="split", single_conv=False,
                         example_inputs=[calib[0]])
    graphs["split"] = dict.fromkeys(GRANULARITIES, split)
    return forms, graphs


def capture_site_inputs(model: nn.Module, batches: Sequence[torch.Tensor]) -> dict[str, list[torch.Tensor]]:
    seen: dict[str, list[torch.Tensor]] = {}
    handles = [m.register_forward_pre_hook(lambda _m, a, n=n: seen.setdefault(n, []).append(a[0].detach().clone()))
               for n, m in model.named_modules() if isinstance(m, XVolution)]
    with torch.no_grad():
        for b in batches:
            model(b)
    for h in handles:
        h.remove()
    return seen


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="96 px, 16 calibration and 8 evaluation images")
    parser.add_argument("--size", type=int, default=None, help="image size (default 160, 96 with --quick)")
    parser.add_argument("--calib", type=int, default=None, help="calibration images (default 64; 16 with --quick)")
    parser.add_argument("--eval", type=int, default=None, help="evaluation images (default 32; 8 with --quick)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gamma", type=float, default=0.8,
                        help="BatchNorm gamma median (default 0.8; larger: wider activations, T(x) outgrows x more)")
    parser.add_argument("--gamma-spread", type=float, default=0.5, help="sigma of log gamma (default 0.5)")
    parser.add_argument("--output", type=Path, default=None, help="output stem (default results/<time>-int8)")
    parser.add_argument("--force", action="store_true", help="replace existing output files")
    args = parser.parse_args(argv)
    print(f"host memory: {hold_freed_memory()}", flush=True)
    size = args.size or (96 if args.quick else 160)
    n_calib = args.calib or (16 if args.quick else 64)
    n_eval = args.eval or (8 if args.quick else 32)
    stem = args.output or RESULTS / f"{datetime.datetime.now(datetime.timezone.utc):%Y%m%d-%H%M%S}-int8"
    md, js = check_outputs([Path(f"{stem}.md"), Path(f"{stem}.json")], force=args.force)  # (a "." in the stem stays)
    load_start = os.getloadavg()
    started = time.monotonic()
    torch.manual_seed(args.seed)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

    data = images(n_calib + n_eval, size, args.seed)
    calib = list(data[:n_calib].split(args.batch))
    evals = list(data[n_calib:].split(args.batch))
    bn_draw = {"gamma": args.gamma, "spread": args.gamma_spread}
    original = trained_like(torchvision_model("resnet18", num_classes=1000), calib, args.seed, **bn_draw)
    unfused = xvolify(copy.deepcopy(original), example_inputs=calib[0])
    # attention gammas drawn non-zero, statistics recalibrated
    unfused = trained_like(unfused, calib, args.seed + 1, **bn_draw)
    sites = {n: m for n, m in unfused.named_modules() if isinstance(m, XVolution)}

    headers = ["form", "PT2E per-tensor", "PT2E per-channel", "ORT per-tensor", "ORT per-channel"]
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        models = torch_forms(unfused, calib)
        graphs = onnx_forms(unfused, calib)
        models = {"original": dict.fromkeys(GRANULARITIES, original), **models}
        original_graph = export_onnx(original, None, (calib[0],), dynamo=False)
        graphs = {"original": dict.fromkeys(GRANULARITIES, original_graph), **graphs}
        whole = sqnr_cells(models, graphs, calib, evals, tmp)
        ranges = {}
        scales = {}
        inputs = capture_site_inputs(unfused, calib + evals)
        per_site: dict[str, dict[str, list[float]]] = {}
        for name, site in sites.items():
            s_calib, s_eval = inputs[name][: len(calib)], inputs[name][len(calib):]
            xs = torch.cat(s_calib)
            from xvol_compiler.ops import pssa_transform

            ranges[name] = (float(xs.abs().max()), float(pssa_transform(xs).abs().max()))
            forms, site_graphs = site_forms(site, s_calib)
            scales[name] = {f"{method} {w}": float(deploy_sites(forms[form][w])[_SITE].t_scale[0])
                            for form, method in RESCALED.items() for w in GRANULARITIES}
            per_site[name] = sqnr_cells(forms, site_graphs, s_calib, s_eval, tmp)
    load_end = os.getloadavg()
    elapsed = time.monotonic() - started

    def fmt(v: float) -> str:
        return f"{v:.2f}"

    notes = [
        f"resnet18 (weights=None), {len(sites)} X-volution sites ({', '.join(sites)}), {size} px, "
        f"{n_calib} calibration / {n_eval} evaluation images (seeded random, batch {args.batch})",
        f"trained-like ranges: BN gamma ~ {args.gamma}*lognormal(0,{args.gamma_spread}), beta ~ N(0,0.3) (attention "
        "BNs too), running stats recalibrated on the calibration images",
        f"os.getloadavg() start {tuple(round(v, 2) for v in load_start)}, end {tuple(round(v, 2) for v in load_end)}; "
        f"{elapsed:.0f} s; torch {torch.__version__}",
    ]
    out = [render_table(headers, [[f, *map(fmt, v)] for f, v in whole.items()],
                        title="Whole-model SQNR vs float (dB), logits", notes=notes)]
    for name, cells in per_site.items():
        xr, tr = ranges[name]
        chosen = ", ".join(f"{k} {v:.3g}" for k, v in scales[name].items())
        site_notes = [f"max|x| {xr:.1f}, max|T(x)| {tr:.1f}; s: {chosen}"]
        out.append(render_table(headers, [[f, *map(fmt, v)] for f, v in cells.items()],
                                title=f"Site {name}: SQNR of the site alone vs float (dB)", notes=site_notes))
    text = "\n\n".join(out) + "\n"
    sys.stdout.write(text)
    atomic_write_text(md, "```\n" + text + "```\n", force=args.force)
    atomic_write_json(js, {"headers": headers, "whole_model": whole, "per_site": per_site, "ranges": ranges,
                           "s_per_site": scales, "notes": notes, "load_start": load_start, "load_end": load_end,
                           "argv": sys.argv[1:] if argv is None else argv}, force=args.force)
    sys.stdout.write(f"wrote {md} and {js}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
