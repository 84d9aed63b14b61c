"""What the module form of fusion replaced, as plain data, and the fused structure rebuilt from it.

A fused checkpoint stores :func:`fused_record` of its model: for every replaced path, the
kind of module now there and what builds it empty (geometry, lowering, the PSSA transform's
options). :func:`rebuild_fused` puts those modules, with placeholder weights, into a freshly
built *original* model, so the checkpoint's state dict loads without running ``xvolify`` and
``fuse`` on random weights (timm's ``inference_mode=True`` idea).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict
from typing import Any

from torch import nn
from torch.nn.modules.conv import _ConvNd

from xvol_compiler.conv_modules import CONV_TYPES, conv_geometry
from xvol_compiler.deploy import XVolutionDeploy
from xvol_compiler.errors import XvolError
from xvol_compiler.fold import ConvGeometry
from xvol_compiler.norm_act import remainder_of

__all__ = ["FusedRecordError", "fused_record", "rebuild_fused"]

RECORD_VERSION = 1


class FusedRecordError(XvolError, ValueError):
    """A fused-structure record that does not fit the model it is applied to."""


def _geometry(data: Mapping[str, Any]) -> ConvGeometry:
    fields = dict(data)
    for key in ("kernel_size", "stride", "dilation"):
        fields[key] = tuple(int(v) for v in fields[key])
    padding = fields["padding"]
    if not isinstance(padding, str):
        fields["padding"] = tuple(tuple(p) if isinstance(p, (list, tuple)) else int(p) for p in padding)
    return ConvGeometry(**fields)


def _geometry_data(geometry: ConvGeometry) -> dict[str, Any]:
    data = asdict(geometry)
    for key, value in data.items():
        if isinstance(value, tuple):
            data[key] = [list(v) if isinstance(v, tuple) else v for v in value]
    return data


def fused_record(model: nn.Module, paths: Mapping[str, str]) -> dict[str, Any]:
    """The record of the modules at ``paths`` of a module-form fused ``model`` (path -> what the unfused
    model held there, ``fused.xvol_fused_modules``)."""
    entries: list[dict[str, Any]] = []
    for path, was in paths.items():
        module = model.get_submodule(path)
        if isinstance(module, XVolutionDeploy):
            entries.append({"path": path, "module": "x-volution", "geometry": _geometry_data(module.site_geometry),
                            "lowering": module.lowering, "single_conv": module.single_conv,
                            "shift": list(module.shift), "directions": module.directions,
                            "directional": module.directional})
        elif isinstance(module, tuple(CONV_TYPES.values())):
            entries.append({"path": path, "module": "conv", "geometry": _geometry_data(conv_geometry(module)),
                            "bias": module.bias is not None})
        elif isinstance(module, nn.Identity):
            entries.append({"path": path, "module": "identity"})
        elif was == "norm-act":
            entries.append({"path": path, "module": "norm-act"})
        else:
            raise FusedRecordError(f"{path} holds a {type(module).__name__}, which no fusion puts there")
    return {"version": RECORD_VERSION, "modules": entries}


def _empty(entry: Mapping[str, Any], current: nn.Module) -> nn.Module:
    kind = entry.get("module")
    if kind == "x-volution":
        return XVolutionDeploy(_geometry(entry["geometry"]), shift=tuple(entry["shift"]),
                               directions=int(entry["directions"]),
                               directional=bool(entry["directional"]), lowering=str(entry["lowering"]),
                               single_conv=bool(entry["single_conv"]))
    if kind == "conv":
        g = _geometry(entry["geometry"])
        # Typed as a callable: the per-dimension classes declare per-dimension tuple types, a geometry holds tuples.
        conv_type: Callable[..., _ConvNd] = CONV_TYPES[len(g.kernel_size)]
        return conv_type(
            g.in_channels, g.out_channels, g.kernel_size, g.stride, g.padding, g.dilation, g.groups,
            bias=bool(entry["bias"]), padding_mode=g.padding_mode)
    if kind == "norm-act":
        drop, act = getattr(current, "drop", None), getattr(current, "act", None)
        if not isinstance(drop, nn.Module) or not isinstance(act, nn.Module):
            raise FusedRecordError(f"{entry['path']}: the record says a norm-act layer, the model has "
                                   f"{type(current).__name__}")
        return remainder_of(current)
    if kind == "identity":
        return nn.Identity()
    raise FusedRecordError(f"{entry.get('path')}: unknown module kind {kind!r} in the fused record")


def rebuild_fused(model: nn.Module, record: Mapping[str, Any]) -> nn.Module:
    """``model`` (its original, unfused structure) with the recorded fused modules put in place (in place)."""
    if int(record.get("version", 0)) != RECORD_VERSION:
        raise FusedRecordError(f"fused record version {record.get('version')!r}; this package reads "
                               f"version {RECORD_VERSION}")
    for entry in record.get("modules", []):
        path = str(entry.get("path", ""))
        try:
            current = model.get_submodule(path)
        except AttributeError as err:
            raise FusedRecordError(f"the fused record names {path!r}, which the model does not have") from err
        parent_path, _, name = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, name, _empty(entry, current).eval())
    return model.eval()
