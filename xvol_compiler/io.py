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
- Models are named in one of three forms (:func:`build_model`): a torchvision
  model name (built with ``weights=None``, nothing is downloaded),
  ``timm:NAME`` (``timm.create_model(NAME, pretrained=False)``) or
  ``package.module:factory`` (a function returning an ``nn.Module``); or they
  are checkpoints written by this package, which record the name and rebuild
  their model through the same builder (:data:`META_KEY`).
"""

from __future__ import annotations

import difflib
import importlib
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from xvol_compiler.errors import MissingFileError, XvolError
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
    "build_model",
    "check_writable",
    "classification_model_names",
    "is_classification",
    "load_model",
    "model_names",
    "model_input_size",
    "save_model",
    "timm_model",
    "torchvision_model",
]

META_KEY = "xvol"
STAGES = ("original", "xvolified", "fused")


class InputError(XvolError, ValueError):
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
        if _is_timm_name(name):
            hint = f"; {name} is a timm model: give it as timm:{name}"
        raise InputError(f"unknown torchvision model {name!r}{hint} (other models: timm:NAME or "
                         "package.module:factory)")
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


def _is_timm_name(name: str) -> bool:
    try:
        import timm
    except ImportError:
        return False
    return bool(timm.is_model(name))


def is_classification(name: str) -> bool:
    """A model that takes one image batch: a torchvision classification model, a timm model or a factory's."""
    return model_kind(name) != "torchvision" or name in classification_model_names()


TIMM_PREFIX = "timm:"
_FACTORY = re.compile(r"(?P<module>[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*):(?P<attr>[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)")


def model_kind(name: str) -> str:
    """``"timm"`` for ``timm:NAME``, ``"factory"`` for ``package.module:factory``, else ``"torchvision"``."""
    if name.startswith(TIMM_PREFIX):
        return "timm"
    if _FACTORY.fullmatch(name):
        return "factory"
    return "torchvision"


def timm_model(name: str, *, num_classes: int | None = None, **kwargs: Any) -> nn.Module:
    """``timm.create_model(name, pretrained=False)``: nothing is downloaded.

    ``num_classes`` None keeps the model's own classifier size. An unknown name
    raises :class:`InputError` naming close ones and the ``timm.list_models`` pattern to search with.
    """
    try:
        import timm
    except ImportError as err:
        raise InputError(f"timm:{name} needs the timm package, which is not installed: pip install timm") from err
    if not name or not timm.is_model(name):
        base = name.split(".")[0]
        close = difflib.get_close_matches(base.lower(), timm.list_models(), n=3, cutoff=0.6)
        hint = f"did you mean {' or '.join(repr(TIMM_PREFIX + c) for c in close)}? " if close else ""
        stem = re.split(r"[_\d]", base, maxsplit=1)[0] or base
        raise InputError(
            f"unknown timm model {name!r}: {hint}list the names with timm.list_models({stem + '*'!r}) "
            "(wildcard patterns) and give one as timm:NAME")
    if num_classes is not None:
        kwargs.setdefault("num_classes", num_classes)
    try:
        return timm.create_model(name, pretrained=False, **kwargs)
    except (RuntimeError, TypeError, ValueError) as err:
        raise InputError(f"cannot build timm:{name} with {kwargs}: {err}") from err


def _import_module(module_name: str, spec: str) -> Any:
    """``importlib.import_module``; a module not found on ``sys.path`` is looked for in the current directory
    too (as ``python -m`` would), which is then kept on ``sys.path`` (at the end) for the module's own imports."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        top, cwd = module_name.split(".")[0], os.getcwd()
        if err.name == top and cwd not in sys.path and "" not in sys.path and (
                (Path(cwd) / top).is_dir() or (Path(cwd) / f"{top}.py").is_file()):
            sys.path.append(cwd)
            return _import_module(module_name, spec)
        raise InputError(
            f"cannot import module {module_name!r} of model {spec!r} ({err}): give an importable "
            "package.module:factory (installed, or under the current directory)") from err
    except Exception as err:  # the module itself failed while importing
        raise InputError(f"importing module {module_name!r} of model {spec!r} failed "
                         f"({type(err).__name__}: {err}): fix the module") from err


def factory_model(spec: str, *, num_classes: int | None = None) -> nn.Module:
    """The ``nn.Module`` that ``package.module:factory`` returns: called with no arguments, or with
    ``num_classes=`` when that is given."""
    match = _FACTORY.fullmatch(spec)
    if match is None:
        raise InputError(f"{spec!r} is not of the form package.module:factory")
    module = _import_module(match["module"], spec)
    obj: Any = module
    for part in match["attr"].split("."):
        if not hasattr(obj, part):
            names = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))]
            close = difflib.get_close_matches(part, names, n=3, cutoff=0.5)
            hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            raise InputError(f"module {match['module']!r} has no {match['attr']!r} (model {spec!r}){hint}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise InputError(f"{spec!r} is a {type(obj).__name__}, not a callable factory: name a function or class "
                         "that returns an nn.Module")
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    try:
        model = obj(**kwargs)
    except TypeError as err:
        how = f"with num_classes={num_classes}" if kwargs else "with no arguments"
        fix = "drop --num-classes or give the factory a num_classes argument" if kwargs else (
            "give the factory's other arguments defaults")
        raise InputError(f"calling {spec} {how} failed ({err}): {fix}") from err
    if not isinstance(model, nn.Module):
        raise InputError(f"{spec} returned a {type(model).__module__}.{type(model).__qualname__}, not a "
                         "torch.nn.Module: the factory must return the model")
    return model


def build_model(name: str, *, num_classes: int | None = 1000) -> nn.Module:
    """A model by name: ``timm:NAME``, ``package.module:factory`` or a torchvision name (see the module doc).

    ``num_classes`` None: the builder's default (a factory is then called with no arguments)."""
    kind = model_kind(name)
    if kind == "timm":
        return timm_model(name[len(TIMM_PREFIX):], num_classes=num_classes)
    if kind == "factory":
        return factory_model(name, num_classes=num_classes)
    return torchvision_model(name, num_classes=num_classes)


def model_input_size(model: nn.Module) -> list[int] | None:
    """The input size a timm model was trained with (its ``pretrained_cfg``), when it says; else None."""
    cfg = getattr(model, "pretrained_cfg", None)
    size = cfg.get("input_size") if isinstance(cfg, Mapping) else None
    if isinstance(size, Sequence) and len(size) == 3 and all(isinstance(v, int) and v > 0 for v in size):
        return [int(v) for v in size]
    return None


# ---------------------------------------------------------------------------
# Checkpoints that say how to rebuild their model
# ---------------------------------------------------------------------------


@dataclass
class ModelSpec:
    """How to rebuild a model: its name (see :func:`build_model`), head size, stage, and the xvolify call that
    made its sites. ``num_classes`` None: the builder's default.

    Stored in a checkpoint's ``metadata[META_KEY]`` as plain data (readable
    with ``torch.load(weights_only=True)``).
    """

    model: str
    num_classes: int | None = 1000
    stage: str = "original"
    sites: list[str] = field(default_factory=list)
    xvolify: dict[str, Any] = field(default_factory=dict)
    input_size: list[int] = field(default_factory=lambda: [3, 224, 224])
    lowerings: dict[str, str] = field(default_factory=dict)  # fused: site -> deploy lowering (else "channel")
    fused_modules: dict[str, Any] = field(default_factory=dict)  # what replaced what (xvol_passes.fused_record)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "checkpoint") -> ModelSpec:
        try:
            spec = cls(
                model=str(data["model"]),
                num_classes=None if data.get("num_classes", 1000) is None else int(data.get("num_classes", 1000)),
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
        from xvol_compiler.site_analysis import as_args, default_example_inputs

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
        from xvol_passes.fused_record import fused_record

        spec = replace(spec, fused_modules=fused_record(model, fused_paths))

    metadata = {META_KEY: spec.to_dict(), **(extra or {})}
    return save_checkpoint(path, model, metadata=metadata, force=force)


def _rebuild(spec: ModelSpec) -> nn.Module:
    model = build_model(spec.model, num_classes=spec.num_classes)
    if spec.stage == "original":
        return model
    if spec.stage == "fused" and spec.fused_modules:
        from xvol_passes.fused_record import rebuild_fused

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
    spec_or_path: str | os.PathLike[str], *, num_classes: int | None = 1000, input_size: Sequence[int] | None = None,
) -> tuple[nn.Module, ModelSpec]:
    """A model by name (:func:`build_model`), or from a checkpoint written by :func:`save_model`.

    A checkpoint is read with ``torch.load(weights_only=True)``; its model is
    rebuilt from the recorded :class:`ModelSpec` (xvolified / fused as it was)
    and its weights loaded strictly. ``num_classes`` and ``input_size`` apply
    to a model given by name (None: the builder's default; the input size of a
    timm model is then its ``pretrained_cfg`` one, else 3x224x224).
    """
    text = os.fspath(spec_or_path)
    path = Path(text)
    looks_like_file = path.suffix in (".pt", ".pth", ".ckpt", ".bin") or os.sep in text or path.exists()
    if not looks_like_file:
        model = build_model(text, num_classes=num_classes)
        size = list(input_size) if input_size else model_input_size(model) or [3, 224, 224]
        built_head = getattr(model, "num_classes", None)
        if num_classes is None and model_kind(text) == "timm" and isinstance(built_head, int):
            num_classes = built_head  # what timm built: recorded, so a rebuild gets the same head
        return model, ModelSpec(model=text, num_classes=num_classes, input_size=size)
    if not path.exists():
        raise MissingFileError(f"no such file: {path}")
    if path.suffix == ".onnx":
        raise InputError(f"{path} is an ONNX file; this command needs a model name or a checkpoint")
    from xvol_compiler.checkpoint import CheckpointError, load_checkpoint, read_checkpoint

    obj = read_checkpoint(path)
    metadata = obj.get("metadata")
    meta: Mapping[str, Any] = metadata if isinstance(metadata, Mapping) else {}
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
