"""The benchmark behind ``xvol bench`` and ``benchmarks/run.py``: original vs unfused vs fused, per backend.

For one model: build it by name (:func:`xvol_compiler.io.build_model`: a
torchvision name with ``weights=None``, ``timm:NAME`` or
``package.module:factory``) or take the one given (a checkpoint's), xvolify it
(default sites) unless an xvolified model is given, give every attention BatchNorm a small non-zero scale (so the
attention branch contributes, as after training: with the gamma = 0 start
fusion would be checked against a branch that adds nothing), fuse it in FX
and, for onnxruntime, export the original and the unfused model and fuse
the latter with ``fuse_onnx``. Wall times and peak memory of the passes are
recorded; latency is measured interleaved (:func:`measure.interleaved_latency`).
"""

from __future__ import annotations

import copy
import functools
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from xvol_compiler import fuse, xvolify
from xvol_compiler.errors import InvalidArgumentError
from xvol_compiler.io import build_model
from xvol_compiler.measure import (
    Latency,
    PeakMemory,
    compile_timing_set,
    count_macs,
    count_params,
    interleaved_latency,
    max_error,
)
from xvol_compiler.onnx_verify import onnx_session
from xvol_compiler.options import BACKENDS
from xvol_compiler.xvolution import XVolution
from xvol_passes.fuse_onnx import export_onnx, fuse_onnx

__all__ = ["BACKENDS", "VARIANTS", "Prepared", "prepare", "prepare_onnx", "time_backend"]

VARIANTS = ("original", "unfused", "fused")


@dataclass
class Prepared:
    """The three variants of one model, and what making them cost."""

    name: str
    device: torch.device
    input_size: tuple[int, ...]
    models: dict[str, nn.Module]
    sites: list[str]
    selection: str
    params: dict[str, int]
    macs: dict[str, int]
    wall_s: dict[str, float] = field(default_factory=dict)
    peak_bytes: dict[str, int | None] = field(default_factory=dict)
    errors: dict[str, tuple[float, float]] = field(default_factory=dict)
    reports: dict[str, Any] = field(default_factory=dict)
    onnx_paths: dict[str, Path] = field(default_factory=dict)
    workdir: tempfile.TemporaryDirectory[str] | None = None

    @property
    def mac_floor(self) -> float:
        """Fused MACs / original MACs: the arithmetic lower bound of the fused latency ratio
        (docs/operator.md, section 5)."""
        return self.macs["fused"] / self.macs["original"]

    def example(self, batch: int = 1) -> tuple[torch.Tensor]:
        return (torch.randn(batch, *self.input_size, device=self.device),)

    def close(self) -> None:
        if self.workdir is not None:
            self.workdir.cleanup()
            self.workdir = None


def _perturb_attention(model: nn.Module, seed: int = 0, *, only_untrained: bool = False) -> None:
    """Small random scales and statistics on every attention BN, as a trained model would have
    (``only_untrained``: on those still at the gamma = 0 start only)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, XVolution):
                bn = m.attn_bn
                if only_untrained and bool(bn.weight.ne(0).any()):
                    continue
                # (a site builds attn_bn with running statistics, torch's default)
                mean, var = cast(torch.Tensor, bn.running_mean), cast(torch.Tensor, bn.running_var)
                n = bn.num_features
                bn.weight.copy_(0.05 * torch.randn(n, generator=gen))
                bn.bias.copy_(0.01 * torch.randn(n, generator=gen))
                mean.copy_(0.1 * torch.randn(n, generator=gen))
                var.copy_(1 + 0.2 * torch.rand(n, generator=gen))


def _peak(mem: PeakMemory) -> int | None:
    return mem.cuda_bytes if mem.cuda_bytes is not None else mem.host_bytes


def prepare(
    name: str,
    *,
    sites: Any = "os16",
    input_size: Sequence[int] = (3, 224, 224),
    num_classes: int | None = 1000,
    device: str | torch.device = "cpu",
    rtol: float = 1e-4,
    seed: int = 0,
    backend: str = "eager",
    lowering: str = "auto",
    model: nn.Module | None = None,
    xvolified: nn.Module | None = None,
) -> Prepared:
    """Original (BatchNorms folded), unfused (xvolified, eval) and fused (FX) forms of a model
    (the fused sites lowered for ``backend``, or as ``lowering`` forces).

    ``name`` is built with :func:`xvol_compiler.io.build_model` unless ``model`` (the original) is given.
    ``xvolified`` (an xvolified form of the model, e.g. a checkpoint's) replaces the xvolify step; its
    attention BatchNorms still at the gamma = 0 start get the small random scales, trained ones are kept."""
    torch.manual_seed(seed)
    dev = torch.device(device)
    size = tuple(int(v) for v in input_size)
    plain = (model if model is not None else build_model(name, num_classes=num_classes)).eval().to(dev)
    example = (torch.randn(1, *size, device=dev),)
    # The baseline is the original network in its own deploy form (BatchNorms folded), as an exporter
    # with BN folding gives it to onnxruntime: the fused X-volution model is compared with that.
    original = fuse(plain, example_inputs=example)
    if xvolified is None:
        t0 = time.perf_counter()
        unfused = xvolify(plain, sites=sites, example_inputs=example)
        wall = {"xvolify": time.perf_counter() - t0}
        _perturb_attention(unfused, seed)
    else:
        unfused, wall = xvolified.to(dev), {}
        _perturb_attention(unfused, seed, only_untrained=True)
    report = getattr(unfused, "xvol_report", None)
    site_names = list(report.selected_names) if report is not None else [
        n for n, m in unfused.named_modules() if isinstance(m, XVolution)]
    unfused.eval()
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        fused = fuse(unfused, example_inputs=example, verify=True, rtol=rtol, backend=backend, lowering=lowering,
                     single_conv=lowering != "split")
        wall["fuse_fx"] = time.perf_counter() - t0
    models = {"original": original, "unfused": unfused, "fused": fused}
    with torch.no_grad():
        err = max_error(unfused(*example), fused(*example))
    return Prepared(
        name=name, device=dev, input_size=size, models=models, sites=site_names,
        selection=report.selection if report is not None else "as given",
        params={k: count_params(m) for k, m in models.items()},
        macs={k: count_macs(m, example) for k, m in models.items()}, wall_s=wall,
        peak_bytes={"fuse_fx": _peak(mem)}, errors={"fx": err},
        reports={"xvolify": report, "fx": fused.xvol_fusion_report},
    )


def refuse_for(p: Prepared, backend: str, lowering: str = "auto") -> None:
    """Replace ``p``'s fused model by the unfused one fused for ``backend`` (its lowerings chosen for it)."""
    example = tuple(t.to(p.device) for t in p.example())
    p.models["fused"] = fuse(p.models["unfused"], example_inputs=example, verify=True, backend=backend,
                             lowering=lowering, single_conv=lowering != "split")
    p.reports["fx"] = p.models["fused"].xvol_fusion_report


def prepare_onnx(p: Prepared, *, rtol: float = 1e-4, opset: int | None = None, lowering: str = "auto") -> None:
    """Export the original and the unfused model, fuse the latter with ``fuse_onnx``; paths in ``p.onnx_paths``."""
    if p.workdir is None:
        p.workdir = tempfile.TemporaryDirectory(prefix="xvol-bench-")
    out = Path(p.workdir.name)
    example = tuple(t.cpu() for t in p.example())
    t0 = time.perf_counter()
    for variant in ("original", "unfused"):
        model = copy.deepcopy(p.models[variant]).cpu().eval()
        export_onnx(model, out / f"{variant}.onnx", example, opset=opset, force=True)
    p.wall_s["export_onnx_x2"] = time.perf_counter() - t0
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        _, report = fuse_onnx(str(out / "unfused.onnx"), verify=True, rtol=rtol, output_path=str(out / "fused.onnx"),
                              force=True, lowering=lowering, single_conv=lowering != "split")
        p.wall_s["fuse_onnx"] = time.perf_counter() - t0
    p.peak_bytes["fuse_onnx"] = mem.host_bytes
    p.reports["onnx"] = report
    p.onnx_paths = {v: out / f"{v}.onnx" for v in VARIANTS}


def _first_output(session: Any, feeds: dict[str, Any]) -> Any:
    return session.run(None, feeds)[0]


def _ort_session(path: Path, device: torch.device) -> Any:
    return onnx_session(path, threads=torch.get_num_threads(), cuda=device.type == "cuda")


def time_backend(
    p: Prepared, backend: str, batch: int, *, repeats: int = 20, warmup: int = 2, check: bool = True,
) -> tuple[Latency, dict[str, float]]:
    """Interleaved latency of the three variants on ``backend``; also their max error vs unfused eager.

    ``backend``: ``"eager"``, ``"compile"`` (``torch.compile``, default mode, static shapes:
    compilation happens before timing) or ``"onnxruntime"`` (needs
    :func:`prepare_onnx` first). Returns the latency and, when ``check``, the
    max relative error of each variant's output against the eager unfused one
    (the original differs from it by the attention branch: that number is not an error).
    """
    if backend not in BACKENDS:
        raise InvalidArgumentError(f"unknown backend {backend!r}; choose from {BACKENDS}")
    (x,) = p.example(batch)
    if backend == "compile":
        with compile_timing_set() as compile_static:
            compiled: dict[str, Callable[[], Any]] = {
                v: functools.partial(compile_static(p.models[v]), x) for v in VARIANTS}
            return _time_variants(p, compiled, x, repeats=repeats, warmup=warmup, check=check)
    if backend == "eager":
        eager: dict[str, Callable[[], Any]] = {v: functools.partial(p.models[v], x) for v in VARIANTS}
        return _time_variants(p, eager, x, repeats=repeats, warmup=warmup, check=check)
    if not p.onnx_paths:
        raise InvalidArgumentError("onnxruntime timing needs prepare_onnx() first")
    fns: dict[str, Callable[[], Any]] = {}
    for v in VARIANTS:
        session = _ort_session(p.onnx_paths[v], p.device)
        fns[v] = functools.partial(_first_output, session, {session.get_inputs()[0].name: x.cpu().numpy()})
    return _time_variants(p, fns, x, repeats=repeats, warmup=warmup, check=check)


def _time_variants(p: Prepared, fns: dict[str, Callable[[], Any]], x: torch.Tensor, *, repeats: int,
                   warmup: int, check: bool) -> tuple[Latency, dict[str, float]]:
    sync: Callable[[], None] | None = torch.cuda.synchronize if p.device.type == "cuda" else None
    errors: dict[str, float] = {}
    with torch.inference_mode():
        outs = {v: fn() for v, fn in fns.items()}  # also the first (compiling) call
        if check:
            ref = p.models["unfused"](x)
            errors = {v: max_error(ref, outs[v])[1] for v in ("unfused", "fused")}
        latency = interleaved_latency(fns, repeats=repeats, warmup=warmup, synchronize=sync)
    return latency, errors
