"""Measurements shared by the demo, ``xvol bench`` and ``benchmarks/run.py``.

- :func:`count_macs`: multiply-accumulates of every convolution and matrix
  product that runs (``torch.utils.flop_counter``, so functional convolutions
  of a fused ``GraphModule`` count too); element-wise work is not counted,
  nor the constant-kernel depthwise conv that computes a PSSA transform's
  neighbour sums (the transform is element-wise work, reported as elements).
- :func:`interleaved_latency`: the variants run in turn, round after round,
  so that a change in machine load hits all of them alike; ratios are the
  median of the per-round ratios, spread their 25th-75th percentiles.
- :class:`PeakMemory`: peak resident memory above the starting point while a
  block runs (sampled from ``/proc/self/statm``; ``ru_maxrss`` elsewhere),
  and the CUDA allocator's peak on a GPU.
- :func:`compile_timing_set`: ``torch.compile`` for one set of timed variants, from cleared
  caches, failing rather than falling back to eager mode.
- :func:`machine_info`: what the numbers were measured on.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import platform
import resource
import statistics
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from xvol_compiler.errors import InvalidArgumentError
from xvol_compiler.host_memory import host_memory_state
from xvol_compiler.machine_load import load_average
from xvol_compiler.verify import error_stats, tensors_of

__all__ = [
    "Latency",
    "PeakMemory",
    "compile_timing_set",
    "count_macs",
    "count_params",
    "max_error",
    "machine_info",
    "interleaved_latency",
    "tensors_of",
]


def count_macs(model: nn.Module | Callable[..., Any], inputs: Sequence[Any]) -> int:
    """Multiply-accumulates of one forward on ``inputs`` (half the counted FLOPs), no grad;
    the PSSA transform's constant-kernel convolutions are not counted."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    transform = _PssaConvMacs()
    with torch.no_grad(), counter, transform:
        model(*inputs)
    return int(counter.get_total_flops()) // 2 - transform.macs


class _PssaConvMacs(TorchDispatchMode):
    """MACs of the convolutions whose weight is a ``pssa_kernel`` pattern (the PSSA transform's
    neighbour sums), as ``FlopCounterMode`` counts them (output elements x C_in/groups x kernel)."""

    def __init__(self) -> None:
        super().__init__()
        self.macs = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten.convolution.default and not args[6]:
            from xvol_compiler.pssa import pssa_kernel_layout

            x, weight, groups = args[0], args[1], int(args[8])
            if groups == x.shape[1] and pssa_kernel_layout(weight, groups) is not None:
                self.macs += out.numel() * weight.shape[1] * math.prod(weight.shape[2:])
        return out


def count_params(model: nn.Module) -> int:
    """Number of parameters (trainable or not; buffers such as BN statistics excluded)."""
    return sum(p.numel() for p in model.parameters())


def max_error(reference: Any, output: Any) -> tuple[float, float]:
    """(max absolute error, max absolute error / max |reference|) over all floating tensors of two outputs.

    The package's one rule (:func:`xvol_compiler.verify.error_stats`): non-finite
    values must match the reference's and only finite ones are compared; a
    mismatch, or an output with no finite value, gives ``inf``. A structure or
    shape mismatch raises ``ValueError``.
    """
    return error_stats(reference, output).to_tuple()


# ---------------------------------------------------------------------------
# Latency
# ---------------------------------------------------------------------------


def _quantile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    pos = q * (len(ordered) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@dataclass
class Latency:
    """Per-round times (seconds) of each variant, measured interleaved."""

    times: dict[str, list[float]] = field(default_factory=dict)

    def median(self, name: str) -> float:
        return statistics.median(self.times[name])

    def ratio(self, name: str, base: str) -> float:
        """Median of the per-round ratios ``name / base``.

        Each round runs every variant back to back, so a per-round ratio sees
        one machine state; its median is robust to load that drifts between rounds.
        """
        return statistics.median(a / b for a, b in zip(self.times[name], self.times[base], strict=True))

    def ratio_spread(self, name: str, base: str) -> tuple[float, float]:
        """25th and 75th percentiles of the per-round ratios ``name / base``."""
        ratios = [a / b for a, b in zip(self.times[name], self.times[base], strict=True)]
        return _quantile(ratios, 0.25), _quantile(ratios, 0.75)

    def to_dict(self) -> dict[str, Any]:
        return {
            name: {"median_ms": 1e3 * self.median(name), "p25_ms": 1e3 * _quantile(t, 0.25),
                   "p75_ms": 1e3 * _quantile(t, 0.75), "rounds": len(t)}
            for name, t in self.times.items()
        }


def interleaved_latency(
    variants: Mapping[str, Callable[[], Any]],
    *,
    repeats: int = 20,
    warmup: int = 2,
    inner: int = 1,
    synchronize: Callable[[], None] | None = None,
) -> Latency:
    """Time each variant ``repeats`` times, the variants taking turns (round-robin) within each round.

    Each sample is the mean of ``inner`` consecutive calls; ``warmup`` rounds
    are run first and discarded. ``synchronize`` (e.g. ``torch.cuda.synchronize``)
    is called before the clock is read on both sides of a sample.
    """
    if repeats < 1 or inner < 1:
        raise InvalidArgumentError("repeats and inner must be >= 1")
    sync = synchronize or (lambda: None)
    names = list(variants)
    result = Latency({n: [] for n in names})
    for round_ in range(warmup + repeats):
        # Rotate the starting variant so none always runs first (after an idle gap or a cache flush).
        order = names[round_ % len(names):] + names[: round_ % len(names)]
        for name in order:
            fn = variants[name]
            sync()
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            sync()
            elapsed = (time.perf_counter() - start) / inner
            if round_ >= warmup:
                result.times[name].append(elapsed)
    return result


# ---------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------


@contextlib.contextmanager
def compile_timing_set() -> Iterator[Callable[[Callable[..., Any]], Callable[..., Any]]]:
    """Yields ``torch.compile`` with static shapes, for one set of variants to be timed inside the block.

    dynamo keeps at most ``recompile_limit`` (8) graphs per code object and past it runs the frame in
    eager mode with only a warning. Models of one class in several forms at several batch sizes pass
    that limit (resnet18 and resnet50 are both ``ResNet``: original, unfused and fused at batch 1 and
    16 are 12 graphs of ``ResNet.forward``), and "compile" would time eager mode. So the caches are
    cleared on entry, and inside the block reaching the limit raises. ``dynamic=False``: one static
    graph per batch size (a second batch would otherwise recompile with a dynamic batch dimension).
    """
    torch._dynamo.reset()
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        yield functools.partial(torch.compile, dynamic=False)


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class PeakMemory:
    """Peak memory growth while the ``with`` block runs.

    ``host_bytes``: peak resident set size minus the size at entry (sampled
    every ``interval`` seconds from ``/proc/self/statm``; where that file does
    not exist, the growth of ``ru_maxrss``, which only sees new all-time peaks).
    ``cuda_bytes``: the CUDA allocator's peak minus its allocation at entry,
    when CUDA is initialised.
    """

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.host_bytes = 0
        self.cuda_bytes: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._start = 0
        self._peak = 0
        self._maxrss = 0

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            rss = _rss_bytes()
            if rss is not None:
                self._peak = max(self._peak, rss)

    def __enter__(self) -> PeakMemory:
        rss = _rss_bytes()
        self._maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        if rss is not None:
            self._start = self._peak = rss
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._cuda_start = torch.cuda.memory_allocated()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            rss = _rss_bytes()
            self._stop.set()
            self._thread.join()
            self._peak = max(self._peak, rss or 0)
            self.host_bytes = self._peak - self._start
        else:
            scale = 1 if platform.system() == "Darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
            self.host_bytes = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - self._maxrss) * scale
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
            self.cuda_bytes = torch.cuda.max_memory_allocated() - self._cuda_start


# ---------------------------------------------------------------------------
# Machine
# ---------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str | torch.device = "cpu") -> dict[str, Any]:
    """CPU model and vector ISA, cores, torch / onnxruntime versions, threads, host memory, and the GPU when
    ``device`` is CUDA."""
    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),  # the vector ISA torch's kernels use
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "host_memory": host_memory_state(),
    }
    try:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    load = load_average()
    if load is not None:
        info["load_average_1min"] = round(load.one_min, 2)
        info["load_start"] = load.to_dict()
    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(dev)
        info["cuda"] = torch.version.cuda
    return info
