"""Verification: how far a model's outputs are from a reference, and when that is close enough.

One rule for every check in the package (``fuse``, ``fuse_onnx``, ``xvol verify``, the benchmarks):

- :func:`error_stats`: over every floating tensor of two outputs, the largest
  absolute difference and that difference relative to the largest
  ``|reference|`` of its tensor (the worst tensor counts). Non-finite values:
  where the reference is not finite the other output must hold the same value
  (NaN for NaN, the same infinity); only the finite values are compared. An
  output with no finite value at all cannot be checked. Integer and boolean
  tensors (indices, labels) are not compared.
- :func:`accepts`: within tolerance when the relative error is at most
  ``rtol``, or the absolute error at most ``atol`` (when given), or, given the
  errors against a float64 run of the unfused model, when the candidate's
  error against that run is at most :data:`UNFUSED_ERROR_FACTOR` times the
  unfused model's own error against it.
- Bounds follow the dtype (:data:`DEFAULT_RTOL`): ``1e-4`` for float32 and
  float64, ``1e-2`` for float16, ``5e-2`` for bfloat16.
- :func:`reference_run` / :func:`verify_model` (torch models, every dtype):
  the reference is the unfused model in its own dtype together with a float64
  run of a copy of it (the model itself is not changed; a float64 model is its
  own float64 run). A candidate passes when its error against the unfused
  model is within the dtype's bound, or when its error against the float64
  run is at most :data:`UNFUSED_ERROR_FACTOR` times the unfused model's own
  error against that run: a fused model as close to exact arithmetic as the
  unfused model is not wrong, even where the two round differently by more
  than the bound (a deep float32 network such as timm's res2net50_14w_8s:
  1.7e-4 apart, each 1.3e-4 from the float64 run). Where the copy cannot run
  in float64 (an operator without a float64 kernel, not enough memory) or
  its output does not match the model's in structure, only the bound applies,
  and a note (in :attr:`Reference.notes`, :attr:`Verdict.notes` and
  :meth:`Verdict.describe`) says why. Detection models (a ``transform``, a
  ``backbone`` and a ``head`` or an ``rpn``, as torchvision's) are compared
  on the outputs of ``backbone`` and ``head`` / ``rpn.head``, before
  post-processing (score threshold, top-k, non-maximum suppression turn
  rounding into different box sets).
- ONNX models are run and compared by :mod:`xvol_compiler.onnx_verify` (``onnx_session``, still importable
  from here, ``random_inputs``, ``run_onnx``, ``compare_onnx``) with the same rule.

An untrained X-volution site computes nothing in its attention branch (its
BatchNorm's gamma is 0), so a check of such a model says nothing about how the
attention was folded: :func:`xvol_compiler.attention_probe.with_exercised_attention`
gives a copy in which it does.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from xvol_compiler.errors import VerificationError

if TYPE_CHECKING:
    from xvol_compiler.onnx_verify import onnx_session

__all__ = [
    "DEFAULT_RTOL",
    "UNFUSED_ERROR_FACTOR",
    "ErrorStats",
    "OutputMismatchError",
    "Reference",
    "Verdict",
    "accepts",
    "default_rtol",
    "dtype_name",
    "error_stats",
    "onnx_session",
    "reference_run",
    "stage_paths",
    "tensors_of",
    "verify_model",
    "verify_outputs",
]

DEFAULT_RTOL: dict[str, float] = {"float64": 1e-4, "float32": 1e-4, "float16": 1e-2, "bfloat16": 5e-2}
# A candidate as accurate as the unfused model (both against a float64 run of it) passes: rounding is not a
# fusion error. The fused model rounds differently, not less: its folded weights are rounded once more in the
# model's dtype and its sums run in another order, so its error against float64 is comparable to the unfused
# model's, not equal to it (fused / unfused error against float64, measured: 0.99 on timm res2net50_14w_8s in
# float32; 0.92, 1.86 and 0.84 on an xvolified resnet18 with trained-like BatchNorms in float32, float16 and
# bfloat16). A factor of 4 (two bits) leaves about twice the largest measured ratio and nothing more: a wrong
# fold (a missing branch, a wrong BatchNorm scale, transposed taps) errs by the size of a branch's
# contribution, orders of magnitude beyond rounding.
UNFUSED_ERROR_FACTOR = 4.0
LOW_PRECISION = ("float16", "bfloat16")
DETECTION_STAGES = ("backbone", "head", "rpn.head")


class OutputMismatchError(VerificationError):
    """Two outputs differ in structure (number of tensors) or in a tensor's shape."""


def tensors_of(value: Any) -> Iterator[torch.Tensor]:
    """Every tensor in a (nested) output: tensors, sequences, mappings; numpy arrays become tensors."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, Mapping):
        for v in value.values():
            yield from tensors_of(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from tensors_of(v)
    elif hasattr(value, "__array__"):
        yield torch.as_tensor(value)


def dtype_name(dtype: Any) -> str:
    """``"float32"`` for ``torch.float32``, ``numpy.float32``, ``numpy.dtype('float32')`` or the string."""
    if isinstance(dtype, torch.dtype):
        return str(dtype).removeprefix("torch.")
    name = getattr(dtype, "name", None) or getattr(getattr(dtype, "dtype", None), "name", None)
    if name is None and isinstance(dtype, type):
        name = dtype.__name__
    return str(name if name is not None else dtype)


def default_rtol(dtype: Any) -> float:
    """The relative bound of :data:`DEFAULT_RTOL` for ``dtype`` (float32's for other types)."""
    return DEFAULT_RTOL.get(dtype_name(dtype), DEFAULT_RTOL["float32"])


@dataclass(frozen=True)
class ErrorStats:
    """Errors of one output against a reference (see the module docstring for the rule)."""

    max_abs: float = 0.0
    max_rel: float = 0.0
    compared: int = 0  # finite values compared
    nonfinite: int = 0  # reference values that are not finite (matched by the output unless ``mismatch``)
    mismatch: str = ""  # where the output's non-finite values differ from the reference's

    @property
    def checkable(self) -> bool:
        """Whether there was anything to compare (some finite value, or no floating value at all)."""
        return self.compared > 0 or self.nonfinite == 0

    def to_tuple(self) -> tuple[float, float]:
        """(max abs, max rel); both ``inf`` when non-finite values differ or nothing could be compared."""
        if self.mismatch or not self.checkable:
            return float("inf"), float("inf")
        return self.max_abs, self.max_rel


def error_stats(reference: Any, output: Any, names: Sequence[str] | None = None) -> ErrorStats:
    """Errors of ``output`` against ``reference`` over all their floating tensors (nested outputs, numpy).

    ``names`` label the tensors in messages. Raises :class:`OutputMismatchError`
    when the structures or shapes differ.
    """
    refs, outs = list(tensors_of(reference)), list(tensors_of(output))
    if len(refs) != len(outs):
        raise OutputMismatchError(f"outputs differ in structure: {len(refs)} vs {len(outs)} tensors")
    worst_abs = worst_rel = 0.0
    compared = nonfinite = 0
    mismatch = ""
    for i, (r, o) in enumerate(zip(refs, outs, strict=True)):
        label = names[i] if names is not None and i < len(names) else f"#{i}"
        if tuple(r.shape) != tuple(o.shape):
            raise OutputMismatchError(f"output {label}: shape {tuple(o.shape)}, reference {tuple(r.shape)}")
        if not r.is_floating_point() or r.numel() == 0:
            continue
        r64, o64 = r.detach().cpu().double(), o.detach().cpu().double()
        finite = r64.isfinite()
        bad = int(finite.numel() - finite.sum())
        if bad:
            nonfinite += bad
            same = torch.equal(finite, o64.isfinite()) and bool(
                ((r64[~finite] == o64[~finite]) | (r64[~finite].isnan() & o64[~finite].isnan())).all())
            if not same and not mismatch:
                mismatch = f"output {label} has non-finite values where the reference does not (or the reverse)"
        elif not bool(o64.isfinite().all()) and not mismatch:
            mismatch = f"output {label} has non-finite values where the reference does not"
        if not bool(finite.any()):
            continue
        r_f, o_f = r64[finite], o64[finite]
        compared += r_f.numel()
        if not bool(o_f.isfinite().all()):
            continue  # counted in ``mismatch``
        err = float((r_f - o_f).abs().max())
        scale = float(r_f.abs().max())
        worst_abs = max(worst_abs, err)
        worst_rel = max(worst_rel, err / scale if scale > 0 else err)
    if mismatch:
        worst_abs = worst_rel = float("inf")
    return ErrorStats(worst_abs, worst_rel, compared, nonfinite, mismatch)


def accepts(stats: ErrorStats, *, rtol: float, atol: float | None = None,
            unfused: ErrorStats | None = None, exact: ErrorStats | None = None) -> bool:
    """The tolerance rule.

    ``stats``: the candidate against the reference model (in its own dtype).
    Accepted when ``stats.max_rel <= rtol``, or ``stats.max_abs <= atol``
    (``atol`` given), or, with ``unfused`` (the reference model against a
    float64 run of it) and ``exact`` (the candidate against that run),
    ``exact.max_rel <= UNFUSED_ERROR_FACTOR * unfused.max_rel``. ``exact``
    None with ``unfused`` given: ``stats`` is itself against the float64 run.
    Never with mismatched non-finite values or nothing compared (in ``stats``,
    or in the float64 comparison for the second way).
    """
    if stats.mismatch or not stats.checkable:
        return False
    if stats.max_rel <= rtol or (atol is not None and stats.max_abs <= atol):
        return True
    if unfused is None or unfused.mismatch or not unfused.checkable:
        return False
    against_exact = stats if exact is None else exact
    if against_exact.mismatch or not against_exact.checkable:
        return False
    return against_exact.max_rel <= UNFUSED_ERROR_FACTOR * unfused.max_rel


# ---------------------------------------------------------------------------
# torch models
# ---------------------------------------------------------------------------


def model_dtype(model: nn.Module, inputs: Any = None) -> torch.dtype:
    """The dtype of the model's first floating parameter or buffer, else of its first floating input."""
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            return t.dtype
    for t in tensors_of(inputs):
        if t.is_floating_point():
            return t.dtype
    return torch.float32


def stage_paths(model: nn.Module) -> tuple[str, ...]:
    """Submodules compared instead of the final output: a detection model's backbone and heads.

    torchvision's detectors (a ``transform``, a ``backbone`` and either a
    ``head`` (SSD, RetinaNet, FCOS) or an ``rpn`` (R-CNNs: ``rpn.head``)) end in
    post-processing whose discrete choices amplify rounding; what precedes it
    is compared. Empty for other models.
    """
    names = dict(model.named_modules())
    if not {"backbone", "transform"} <= set(names) or not ("head" in names or "rpn" in names):
        return ()
    return tuple(p for p in DETECTION_STAGES if p in names)


def _to_float64(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.double() if value.is_floating_point() else value
    if isinstance(value, Mapping):
        rebuild: Any = type(value)  # the mapping's own class (a dict, an OrderedDict ...)
        return rebuild({k: _to_float64(v) for k, v in value.items()})
    if isinstance(value, tuple):
        return tuple(_to_float64(v) for v in value)
    if isinstance(value, list):
        return [_to_float64(v) for v in value]
    return value


def _detached(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, Mapping):
        return {k: _detached(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_detached(v) for v in value]
    return value


def _run(model: nn.Module, inputs: tuple[Any, ...], stages: Sequence[str]) -> tuple[Any, dict[str, Any]]:
    """(final output, {stage path: its output}) of one forward without grad; hooks removed afterwards."""
    captured: dict[str, Any] = {}
    handles = []
    modules = dict(model.named_modules())
    for path in stages:
        if path in modules:
            def hook(_m: nn.Module, _a: Any, out: Any, path: str = path) -> None:
                captured.setdefault(path, _detached(out))

            handles.append(modules[path].register_forward_hook(hook))
    try:
        with torch.no_grad():
            out = model(*inputs)
    finally:
        for h in handles:
            h.remove()
    return out, captured


@dataclass
class Reference:
    """What the unfused model computed on the verification inputs (see :func:`reference_run`)."""

    output: Any
    stages: dict[str, Any]
    dtype: torch.dtype
    exact_output: Any = None  # float64 run of a copy (None: it could not run; ``notes`` says why)
    exact_stages: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def has_exact(self) -> bool:
        """Whether the float64 run is there to judge candidates against (see :func:`reference_run`)."""
        return self.exact_output is not None

    @property
    def low_precision(self) -> bool:
        return dtype_name(self.dtype) in LOW_PRECISION

    def uses_stages(self, stages: Mapping[str, Any]) -> bool:
        """Whether a candidate that produced ``stages`` is compared on them (it produced every one)."""
        return bool(self.stages) and set(stages) == set(self.stages)

    def compared(self, stages: Mapping[str, Any]) -> tuple[Any, Any, str]:
        """(own value, float64 value or None, description) of what is compared against a candidate's
        ``stages``: the stage outputs when the candidate produced the same stages, else the final output."""
        if self.uses_stages(stages):
            exact = [self.exact_stages[p] for p in self.stages] if self.has_exact else None
            return ([self.stages[p] for p in self.stages], exact,
                    f"the outputs of {', '.join(self.stages)} (before post-processing)")
        return self.output, self.exact_output, "the outputs"

    def checkable(self) -> bool:
        """Whether the unfused model gave some finite value to compare (or no floating output at all)."""
        own, _, _ = self.compared(self.stages)
        return error_stats(own, own).checkable


def reference_run(model: nn.Module, inputs: tuple[Any, ...]) -> Reference:
    """Run ``model`` (eval mode, no grad) on ``inputs``, and a float64 copy of it on float64 inputs.

    The model is not changed (the float64 run uses a deep copy; a float64
    model is its own float64 run). When the copy cannot run in float64, or
    its output (or a stage's) differs from the model's in structure or shape,
    there is no float64 run (``exact_output`` None) and a note says why: only
    the dtype's bound against the unfused model then applies.
    """
    stages = stage_paths(model)
    output, captured = _run(model, inputs, stages)
    ref = Reference(_detached(output), captured, model_dtype(model, inputs))
    if dtype_name(ref.dtype) == "float64":
        ref.exact_output, ref.exact_stages = ref.output, dict(ref.stages)
        return ref
    fallback = (f"only the {dtype_name(ref.dtype)} bound against the unfused model applies (no "
                f"{UNFUSED_ERROR_FACTOR:g}x-its-own-error allowance)")
    try:
        exact_model = copy.deepcopy(model).double()
        exact_output, exact_stages = _run(exact_model, _to_float64(inputs), stages)
        del exact_model
    except Exception as err:  # any failure of the float64 copy (missing kernel, memory): bound only, with a note
        ref.notes.append(f"the float64 reference run failed ({type(err).__name__}: {' '.join(str(err).split())}); "
                         + fallback)
        return ref
    try:
        error_stats(ref.output, exact_output)
        for path in ref.stages:
            error_stats(ref.stages[path], exact_stages[path])
    except (OutputMismatchError, KeyError) as err:
        ref.notes.append(f"the float64 reference run gave other outputs than the model ({err}); " + fallback)
        return ref
    ref.exact_output, ref.exact_stages = exact_output, exact_stages
    return ref


@dataclass
class Verdict:
    """The result of one verification: errors, the bound used, and what was compared with what."""

    candidate: ErrorStats  # the candidate against the reference model in its own dtype
    unfused: ErrorStats | None  # the reference model against its float64 run (None: no float64 run)
    dtype: str
    rtol: float
    atol: float | None
    compared: str  # "the outputs" / "the outputs of backbone, head (before post-processing)"
    reference: str  # the reference model's name: "the unfused model" (or another name)
    ok: bool
    exact: ErrorStats | None = None  # the candidate against the float64 run (None: no float64 run)
    notes: tuple[str, ...] = ()  # e.g. why there is no float64 run

    @property
    def checkable(self) -> bool:
        return self.candidate.checkable

    @property
    def within_bound(self) -> bool:
        """Whether the candidate passed on the bound alone (not through the float64 allowance)."""
        return accepts(self.candidate, rtol=self.rtol, atol=self.atol)

    def describe(self) -> str:
        """One line: the errors, the bound and the dtype; the errors against the float64 run of the reference
        model (the candidate's and the reference model's own) when there is one, else why not."""
        c = self.candidate
        text = (f"max abs error {c.max_abs:.3g}, relative {c.max_rel:.3g} against {self.reference} on "
                f"{self.compared} ({self.dtype}, rtol={self.rtol:g}"
                + (f", atol={self.atol:g}" if self.atol is not None else "") + ")")
        if c.mismatch:
            text += f"; {c.mismatch}"
        if self.unfused is not None and self.exact is not None:
            text += (f"; against a float64 run of it: relative {self.exact.max_rel:.3g}, its own "
                     f"{self.unfused.max_rel:.3g} (accepted up to {UNFUSED_ERROR_FACTOR:g}x its own)")
            if self.ok and not self.within_bound:
                text += "; accepted: as close to the float64 run as the reference model itself"
        for note in self.notes:
            text += f"; {note}"
        return text


def verify_outputs(reference: Reference, candidate: Any, *, candidate_stages: Mapping[str, Any] | None = None,
                   rtol: float | None = None, atol: float | None = None,
                   name: str = "the unfused model") -> Verdict:
    """Judge a candidate's output (and stage outputs) against ``reference`` with the package's rule.

    The candidate's error against the reference model in its own dtype must be
    within ``rtol`` (None: :func:`default_rtol` of the reference's dtype) or
    ``atol``, or its error against the reference's float64 run at most
    :data:`UNFUSED_ERROR_FACTOR` times the reference model's own (see the
    module docstring). ``name`` names the reference model in
    :meth:`Verdict.describe`.
    """
    stages = dict(candidate_stages or {})
    own, exact, what = reference.compared(stages)
    cand = [stages[p] for p in reference.stages] if reference.uses_stages(stages) else candidate
    bound = default_rtol(reference.dtype) if rtol is None else rtol
    stats = error_stats(own, cand)
    unfused: ErrorStats | None = None
    against_exact: ErrorStats | None = None
    if exact is not None:
        unfused, against_exact = error_stats(exact, own), error_stats(exact, cand)
    ok = accepts(stats, rtol=bound, atol=atol, unfused=unfused, exact=against_exact)
    return Verdict(stats, unfused, dtype_name(reference.dtype), bound, atol, what, name, ok,
                   exact=against_exact, notes=tuple(reference.notes))


def verify_model(reference: Reference, model: nn.Module, inputs: tuple[Any, ...], *,
                 rtol: float | None = None, atol: float | None = None,
                 name: str = "the unfused model") -> Verdict:
    """Run ``model`` on ``inputs`` (no grad) and judge it against ``reference`` (:func:`verify_outputs`)."""
    output, captured = _run(model, inputs, tuple(reference.stages))
    return verify_outputs(reference, output, candidate_stages=captured, rtol=rtol, atol=atol, name=name)


def __getattr__(name: str) -> Any:
    # onnx_session moved to the ONNX half of the verify layer; loaded on use so that this module needs no onnx.
    if name == "onnx_session":
        from xvol_compiler.onnx_verify import onnx_session

        return onnx_session
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
