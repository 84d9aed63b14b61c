"""The deterministic lowering rule of ``lowering="auto"``: data, one entry per site class and backend.

``lowering="auto"`` (``xvol_passes.lower.choose_lowering``) picks a
fused site's deploy lowering from this table, never by timing: the same model,
options and package version give the same fused structure whatever the
machine's load. Timing is opt-in (``lowering="measure"``).

A site is looked up by

- ``backend``: "eager", "compile", "onnxruntime";
- its class (:func:`site_class`): ``"depthwise"`` (one input channel of ``x``
  per group, the merged conv's ``groups == C_in(x)``), ``"dense"`` (``groups
  == 1``), ``"grouped"`` (any other grouping);
- ``single_conv`` (whether "split", two convolutions per site, is allowed);
- its kernel, stride and shape class (:func:`shape_class`: ``"batch1"``,
  ``"batched"``, ``"unknown"``). One entry matches a kernel (7x7 depthwise, [K]);
  the others match any kernel, stride and shape: the measurements below do not
  separate them.

The first matching entry gives an order of preference; the site gets the first
lowering of that order that is exact for it (``"channel"`` always is).

Sources (whole models, fused / original latency ratios, interleaved rounds,
measured on an idle 2-core CPU machine, onnxruntime sessions without spinning):

- [C16] ``torch.compile``, mobilenet_v3_large (depthwise sites), batch 16:
  unfused 1.143, channel 1.629, spatial 1.419, split 1.038.
- [O16] onnxruntime, mobilenet_v3_large, batch 16: unfused 1.142, channel
  1.762, spatial 1.373, split 1.120.
- [O1] onnxruntime, mobilenet_v3_large, batch 1: unfused 1.122, spatial 1.190,
  split 1.095.
- [E] eager: the former measured ``auto`` (per site, interleave + conv on the
  site's input shape, 5 rounds, median) chose "spatial" at every depthwise site
  of mobilenet_v3_large, efficientnet_b0 and convnext_tiny at 224 px
  (``benchmarks/results/20261201-233112-cpu.json``, ``models[*].lowerings.eager``;
  that file records a load average of 1.87 on 2 cores at its start); with
  spatial depthwise sites the README table (``benchmarks/results/20261201-233112-cpu.md``)
  has fused / unfused 0.86-0.99 in eager mode. Dense sites: "channel";
  ``benchmarks/results`` stores no per-lowering figures for dense sites
  (``benchmarks/bench_lowerings.py`` measures them). Whole dense models against their
  floors: [F].
- [S] "split" in eager mode, measured (``benchmarks/bench_site_forms.py``, whole
  depthwise sites from x, 15 interleaved rounds, 2 threads, 224 px,
  ``benchmarks/results/20261205-131118-site-forms.txt``): split is within 4% of
  the fastest fused form at 15 of the 20 eager rows of mobilenet_v3_large,
  efficientnet_b0 and convnext_tiny; whole models with ``--lowering split``
  (``benchmarks/results/20261205-085930-cpu-depthwise-split.md``): fused / unfused
  0.80-0.90 in eager, 0.86-0.92 under compile, 0.97-0.98 in onnxruntime.
- [H] "spatial-h" (interleave along H): faster than "spatial" at 30 of the 32
  stride-1 rows of the same site table (eager and compile, batch 1 and 16), but
  across whole models (``--lowering spatial-h``,
  ``benchmarks/results/20261205-140142-cpu-depthwise-spatial-h.md``) fused / unfused
  moves by -0.06 to +0.08 against "spatial", inside the rounds' spread, except
  convnext_tiny in eager at batch 16 (0.978 against 1.068). The rule keeps
  "spatial" for other kernels until a rule by stride is measured on whole models;
  ``lowering="spatial-h"`` selects it.
- [K] depthwise 7x7 sites (convnext_tiny): "spatial" doubles the W padding from 3 to 6,
  past oneDNN ``jit_uni_dw``'s limit on left padding on AVX2 (ur_w 4; 6 on AVX-512).
  One 7x7 site alone, eager, batch 16, on an AVX2 machine
  (C x H = 384x14, 768x7, 192x28): spatial 92.9 / 59.5 / 174.7 ms, spatial-h 16.9 /
  5.0 / 22.4 ms, split 15.1 / 4.5 / 28.0 ms. Whole convnext_tiny on the Intel Xeon machine
  ([H]): spatial-h against spatial, fused / unfused, eager 1.008 / 0.978 against
  1.018 / 1.068, compile 0.988 / 1.006 against 0.953 / 1.006, onnxruntime
  1.016 / 1.026 against 1.043 / 1.089. So a 7x7 depthwise site takes "spatial-h".
- [F] dense models against the MAC floor and the MAC floor plus T(x)
  (``benchmarks/bench_floor.py``; the files are named in the README's Benchmarks section):
  resnet18 and resnet50 in "channel" within 3% of the MAC floor or below it on every backend.
- [G] grouped and dense sites per lowering (``benchmarks/bench_lowerings.py --models
  resnet18,resnet50,regnet_y_400mf``,
  ``benchmarks/results/20261206-025746-lowerings-dense-grouped.txt``): at dense sites
  (resnet18, resnet50) every lowering is within a few % of "channel", split included, on
  every backend. At the grouped sites of regnet_y_400mf (8 channels per group) split is
  the fastest form in onnxruntime at every site: 5-41% faster than "channel" at batch 1,
  7-21% at batch 16 (the one-conv forms add the interleave's Reshape-Concat-Reshape
  copy: in onnxruntime's kernel profile the convolutions cost the same fused and
  unfused and the Concat is the difference, ``20261206-084032-onnx-profile-regnet.txt``;
  split's second conv takes the first's output as its sum input); in eager and compile
  split is slower at 5 of the 6 sites (the stride-2
  site aside), by 3-29%. So a grouped site takes "split" in onnxruntime when allowed, "channel" in eager
  mode and onnxruntime otherwise; under torch.compile see [GC].
- [GC] grouped sites under torch.compile, measured with freed host memory held
  (``xvol_compiler.host_memory``; AMD EPYC, AVX-512, 2026-12-06). Per site
  (``benchmarks/bench_lowerings.py --models regnet_y_400mf --backends compile --batches 1 16``,
  ``20261206-105136-lowerings-regnet-compile.txt``, load 0.37) "stack" is the fastest single conv at
  10 of the 12 site and batch pairs (within 1.03-1.13x at the other two) and 1.13-1.28x faster than
  "channel" at batch 1, 1.35-1.58x at batch 16. Whole model (``benchmarks/run.py
  --models regnet_y_400mf --backends compile --lowering L``, fused / unfused at batch 1 / 16): "stack"
  0.953 / 1.006, "split" 0.952 / 0.960 (``20261206-100253-cpu-dense-split.md``), "channel" (the
  rule before this entry) 0.966-1.018 / 1.098-1.122 in four runs (``20261206-094432-cpu-all.md`` and
  the ``-allocator-*`` files). So under compile a grouped site takes "stack", or "split" when allowed.
- [T] "stack" (a depth-2 Conv3d over ``stack_depth([x, T(x)])``): per site under
  torch.compile the best single conv at all five mobilenet_v3_large sites at batch 16
  (1.05-1.35x split against spatial's 1.18-1.77x, cleared caches,
  ``benchmarks/results/20261206-030728-site-forms-compile.txt``), 1.02-1.67x split in
  eager. Across whole models (one run per lowering, idle AMD EPYC, 2026-12-06:
  ``20261206-043227-cpu-depthwise-stack.md``, ``20261206-050245-cpu-depthwise-auto.md``,
  fused / unfused, stack against the rule's spatial / spatial-h) it is not consistently
  faster: compile mobilenet_v3_large 0.998 / 1.163 against 0.985 / 1.091 (batch 1 / 16),
  efficientnet_b0 0.893 / 0.870 against 0.965 / 0.887, convnext_tiny 0.999 / 1.021 against
  0.995 / 1.013; eager 0.92-1.02 against 0.87-1.01; onnxruntime 1.18-1.43 against
  1.01-1.14. So no entry takes it; ``lowering="stack"`` selects it. Not built: under
  torch.compile, the whole site as one stencil over x (no T(x) written), 2.8-3.4x split.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from xvol_compiler.errors import NotFoundError
from xvol_compiler.fold import Branch

__all__ = ["RULES", "SITE_CLASSES", "SHAPE_CLASSES", "RuleEntry", "rule_entry", "shape_class", "site_class"]

SITE_CLASSES = ("depthwise", "dense", "grouped")
SHAPE_CLASSES = ("batch1", "batched", "unknown")
_ALL_BACKENDS = ("eager", "compile", "onnxruntime")


@dataclass(frozen=True)
class RuleEntry:
    """One row of the rule: where it applies, the lowerings in order of preference, and why.

    ``single_conv``, ``kernel``, ``stride``, ``shape``: None matches any value.
    """

    name: str
    backends: tuple[str, ...]
    site: str
    single_conv: bool | None
    prefer: tuple[str, ...]
    source: str
    kernel: tuple[int, ...] | None = None
    stride: tuple[int, ...] | None = None
    shape: str | None = None

    def matches(self, backend: str, site: str, single_conv: bool, kernel: tuple[int, ...],
                stride: tuple[int, ...], shape: str) -> bool:
        return (backend in self.backends and site == self.site
                and self.single_conv in (None, single_conv)
                and self.kernel in (None, kernel) and self.stride in (None, stride) and self.shape in (None, shape))


RULES: tuple[RuleEntry, ...] = (
    RuleEntry("depthwise-split", _ALL_BACKENDS, "depthwise", False, ("split", "spatial", "channel"),
              "[C16] split 1.038 < spatial 1.419 < channel 1.629; [O16] split 1.120 < spatial 1.373 < channel "
              "1.762; [O1] split 1.095 < spatial 1.190; eager: [S]"),
    RuleEntry("depthwise-7x7-spatial-h", _ALL_BACKENDS, "depthwise", True, ("spatial-h", "spatial", "channel"),
              "[K] spatial doubles the W padding past the AVX2 depthwise kernel's limit; spatial-h keeps it "
              "(one 7x7 site: 5-12x faster than spatial on AVX2)", kernel=(7, 7)),
    RuleEntry("depthwise-spatial", _ALL_BACKENDS, "depthwise", True, ("spatial", "channel"),
              "[C16] spatial 1.419 < channel 1.629; [O16] spatial 1.373 < channel 1.762; eager: [E]"),
    RuleEntry("dense-channel", _ALL_BACKENDS, "dense", None, ("channel",),
              "eager: [E] (dense sites fastest in channel); one conv over 2x the input channels"),
    RuleEntry("grouped-split-onnxruntime", ("onnxruntime",), "grouped", False, ("split", "channel"),
              "[G] split faster than channel at every grouped site of regnet_y_400mf: 5-41% at batch 1, 7-21% at 16"),
    RuleEntry("grouped-split-compile", ("compile",), "grouped", False, ("split", "stack", "channel"),
              "[GC] whole regnet_y_400mf under compile, fused / unfused at batch 1 / 16: split 0.952 / 0.960, "
              "stack 0.953 / 1.006, channel 0.97-1.02 / 1.10-1.12"),
    RuleEntry("grouped-stack-compile", ("compile",), "grouped", True, ("stack", "channel"),
              "[GC] stack the fastest single conv per site under compile; whole regnet_y_400mf 0.953 / 1.006 of "
              "unfused against channel's 0.97-1.02 / 1.10-1.12"),
    RuleEntry("grouped-channel", _ALL_BACKENDS, "grouped", None, ("channel",),
              "[G] single-conv forms within a few % of each other; split slower in eager and compile at batch 1"),
)


def site_class(branch: Branch) -> str:
    """``"depthwise"`` (one input channel of ``x`` per group), ``"dense"`` (one group) or ``"grouped"``."""
    groups = branch.geometry.groups
    if branch.channels[0] == groups:
        return "depthwise"
    return "dense" if groups == 1 else "grouped"


def shape_class(input_shape: Sequence[object] | None) -> str:
    """``"batch1"``, ``"batched"`` (a known batch above 1) or ``"unknown"`` (no shape, or a dynamic batch)."""
    if not input_shape:
        return "unknown"
    batch = input_shape[0]
    if not isinstance(batch, int) or batch <= 0:
        return "unknown"
    return "batch1" if batch == 1 else "batched"


def rule_entry(branch: Branch, *, backend: str, single_conv: bool,
               input_shape: Sequence[object] | None = None) -> RuleEntry:
    """The first entry of :data:`RULES` for the site (every site class has one for every backend)."""
    g = branch.geometry
    key = (backend, site_class(branch), single_conv, tuple(g.kernel_size), tuple(g.stride), shape_class(input_shape))
    for entry in RULES:
        if entry.matches(*key):
            return entry
    raise NotFoundError(f"no lowering rule for backend={key[0]!r}, {key[1]} site, single_conv={key[2]}")
