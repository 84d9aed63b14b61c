"""Files in and out for the CLI, the demo and the benchmarks.

- Writes are atomic and checked before any work, by :mod:`xvol_compiler.files`
  (``atomic_path``, ``atomic_write_*`` and ``check_writable`` are re-exported
  here): an existing file is never overwritten unless ``force=True``, and an
  output's directory must exist.
- Checkpoints are read with ``torch.load(weights_only=True)`` only (through
  :func:`xvol_compiler.checkpoint.read_checkpoint`) and written with
  :func:`xvol_compiler.checkpoint.save_checkpoint`.
- ONNX files are read and written by :mod:`xvol_compiler.onnx_io` (``load_onnx``,
  ``save_onnx``: also atomic, also refusing to overwrite).
- Models are torchvision classification models built by name with
  ``weights=None`` (nothing is downloaded), or checkpoints written by this
  package, which record how to rebuild their model (:data:`META_KEY`).
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from xvol_compiler.files import atomic_path, atomic_write_bytes, atomic_write_json, atomic_write_text
from xvol_compiler.files import check_output as check_writable

__all__ = [
    "META_KEY",
    "InputError",
    "ModelSpec",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "check_writable",
    "classification_model_names",
    "is_classification",
    "load_model",
    "model_names",
    "save_model",
    "torchvision_model",
]

META_KEY = "xvol"
STAGES = ("original", "xvolified", "fused")


class InputError(ValueError):
    """A model name, file or argument the user gave that cannot be used; the message says why."""


# ---------------------------------------------------------------------------
# Models by name
# ---------------------------------------------------------------------------


def classification_model_names() -> list[str]:
    """Every torchvision classification model name (``torchvision.models.list_models``)."""
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def model_names() -> list[str]:
    """Every torchvision model name: classification, segmentation, detection, video, optical flow."""
    import torchvision

    return sorted(torchvision.models.list_models())


def torchvision_model(name: str, *, num_classes: int | None = 1000, **kwargs: Any) -> nn.Module:
    """A torchvision model by name with ``weights=None`` (and no backbone weights): nothing is downloaded.

    ``num_classes`` applies to classification models (None: the builder's
    default); ``kwargs`` go to the builder (e.g. ``aux_logits=False`` for
    googlenet). A bad name raises :class:`InputError` naming the close ones.
    """
    import torchvision

    if name not in model_names():
        close = difflib.get_close_matches(name.lower(), model_names(), n=3, cutoff=0.5)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else (
            "; torchvision.models.list_models() lists them")
        raise InputError(f"unknown torchvision model {name!r}{hint}")
    if name in classification_model_names():
        if num_classes is not None:
            kwargs.setdefault("num_classes", num_classes)
    else:
        kwargs.setdefault("weights_backbone", None)
    try:
        try:
            return torchvision.models.get_model(name, weights=None, **kwargs)
        except TypeError as err:
            if "weights_backbone" not in str(err):
                raise
            kwargs.pop("weights_backbone")
            return torchvision.models.get_model(name, weights=None, **kwargs)
    except (ValueError, TypeError) as err:
        raise InputError(f"cannot build {name} with {kwargs}: {err}") from err


def is_classification(name: str) -> bool:
    return name in classification_model_names()


# ---------------------------------------------------------------------------
# Checkpoints that say how to rebuild their model
# ---------------------------------------------------------------------------


@dataclass
class ModelSpec:
    """How to rebuild a model: torchvision name, head size, stage, and the xvolify call that made its sites.

    Stored in a checkpoint's ``metadata[META_KEY]`` as plain data (readable
    with ``torch.load(weights_only=True)``).
    """

    model: str
    num_classes: int = 1000
    stage: str = "original"
    sites: list[str] = field(default_factory=list)
    xvolify: dict[str, Any] = field(default_factory=dict)
    input_size: list[int] = field(default_factory=lambda: [3, 224, 224])
    lowerings: dict[str, str] = field(default_factory=dict)  # fused: site -> deploy lowering (else "channel")
    fused_modules: dict[str, Any] = field(default_factory=dict)  # fused: what replaced what (passes/fused_record.py)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "checkpoint") -> ModelSpec:
        try:
            spec = cls(
                model=str(data["model"]),
                num_classes=int(data.get("num_classes", 1000)),
                stage=str(data.get("stage", "original")),
                sites=[str(s) for s in data.get("sites", [])],
                xvolify=dict(data.get("xvolify", {})),
                input_size=[int(v) for v in data.get("input_size", [3, 224, 224])],
                lowerings={str(k): str(v) for k, v in dict(data.get("lowerings", {})).items()},
                fused_modules=dict(data.get("fused_modules", {})),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise InputError(f"{source}: malformed '{META_KEY}' metadata ({type(err).__name__}: {err})") from err
        if spec.stage not in STAGES:
            raise InputError(f"{source}: unknown stage {spec.stage!r} (expected one of {STAGES})")
        return spec

    def example_inputs(self, model: nn.Module | None = None, batch: int = 1) -> tuple[Any, ...]:
        """A random batch of ``input_size`` for classification models; the kind's default input otherwise."""
        if is_classification(self.model) or model is None:
            return (torch.randn(batch, *self.input_size),)
        from xvol_compiler.sites import as_args, default_example_inputs

        return as_args(default_example_inputs(model))


def save_model(
    path: str | os.PathLike[str], model: nn.Module, spec: ModelSpec, *, force: bool = False,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Save ``model``'s state dict with ``spec`` (so :func:`load_model` can rebuild it), atomically.

    A model fused in the module form (it carries ``xvol_fused_modules``) saved as stage "fused"
    gets its fused structure recorded in the spec, if the spec holds none yet."""
    from xvol_compiler.checkpoint import save_checkpoint

    fused_paths = getattr(model, "xvol_fused_modules", None)
    if spec.stage == "fused" and not spec.fused_modules and isinstance(fused_paths, Mapping):
        from xvol_compiler.passes.fused_record import fused_record

        spec = replace(spec, fused_modules=fused_record(model, fused_paths))

    metadata = {META_KEY: spec.to_dict(), **(extra or {})}
    return save_checkpoint(path, model, metadata=metadata, force=force)


def _rebuild(spec: ModelSpec) -> nn.Module:
    model = torchvision_model(spec.model, num_classes=spec.num_classes)
    if spec.stage == "original":
        return model
    if spec.stage == "fused" and spec.fused_modules:
        from xvol_compiler.passes.fused_record import rebuild_fused

        return rebuild_fused(model, spec.fused_modules)  # the recorded structure; the weights come next
    from xvol_compiler import fuse, xvolify

    example = spec.example_inputs(model)
    if spec.sites:  # a fused plain model (conv+BN folded only) has none
        model = xvolify(model, sites=list(spec.sites), example_inputs=example, **spec.xvolify)
    if spec.stage == "fused":
        # A fused checkpoint written before fused structures were recorded holds the flat graph
        # form: rebuilt by fusing the xvolified model again (only the structure matters here).
        lowerings = dict(spec.lowerings)
        model = fuse(model.eval(), example_inputs=example, verify=False, lowering=lowerings,
                     single_conv="split" not in lowerings.values(), graph=True)
    return model


def load_model(
    spec_or_path: str | os.PathLike[str], *, num_classes: int = 1000, input_size: Sequence[int] | None = None,
) -> tuple[nn.Module, ModelSpec]:
    """A model from a torchvision name, or from a checkpoint written by :func:`save_model`.

    A checkpoint is read with ``torch.load(weights_only=True)``; its model is
    rebuilt from the recorded :class:`ModelSpec` (xvolified / fused as it was)
    and its weights loaded strictly. ``num_classes`` and ``input_size`` apply
    to a model given by name.
    """
    text = os.fspath(spec_or_path)
    path = Path(text)
    looks_like_file = path.suffix in (".pt", ".pth", ".ckpt", ".bin") or os.sep in text or path.exists()
    if not looks_like_file:
        spec = ModelSpec(model=text, num_classes=num_classes,
                         input_size=list(input_size) if input_size else [3, 224, 224])
        return torchvision_model(text, num_classes=num_classes), spec
    if not path.exists():
        raise FileNotFoundError(f"no such file: {path}")
    if path.suffix == ".onnx":
        raise InputError(f"{path} is an ONNX file; this command needs a torchvision model name or a checkpoint")
    from xvol_compiler.checkpoint import CheckpointError, load_checkpoint, read_checkpoint

    obj = read_checkpoint(path)
    meta = obj.get("metadata") if isinstance(obj.get("metadata"), Mapping) else {}
    if META_KEY not in meta:
        raise InputError(
            f"{path} has no '{META_KEY}' metadata saying which model it holds; "
            "write checkpoints with `xvol xvolify` / xvol_compiler.io.save_model"
        )
    spec = ModelSpec.from_dict(meta[META_KEY], source=str(path))
    if input_size:
        spec.input_size = list(input_size)
    model = _rebuild(spec)
    try:
        load_checkpoint(model, obj, strict=True)
    except CheckpointError as err:
        if spec.stage == "fused" and not spec.fused_modules:
            raise CheckpointError(
                f"{path} is a fused checkpoint written by an earlier version of xvol-compiler (no record of its "
                f"fused structure), and its weights do not fit the structure rebuilt for it: {err}. Re-fuse the "
                f"xvolified checkpoint it came from: xvol fuse XVOLIFIED.pt -o FUSED.pt"
            ) from err
        raise
    return model.eval(), spec
