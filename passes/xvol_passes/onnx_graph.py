"""ONNX graph adapter for the shared rewrite rules (``xvol_compiler.rules``).

``OnnxGraphAdapter`` imports a ``ModelProto`` with onnx-graphsurgeon, presents it to
``run_rules`` as the networkx *view* the rules expect (``xvol_passes.onnx_view``, with
constants from ``xvol_passes.onnx_constants`` and pads absorbed by ``xvol_passes.onnx_pad``),
applies the ``Rewrite`` values they plan (``xvol_passes.onnx_emit``), and exports the edited
model. It implements ``xvol_compiler.rules.GraphAdapter``.
"""

from __future__ import annotations

import onnx

from xvol_compiler.errors import InvalidArgumentError
from xvol_compiler.fold import Branch
from xvol_compiler.rules import Key, Shape, node_info
from xvol_passes.onnx_constants import OnnxConstants, Shapes
from xvol_passes.onnx_emit import ADAPTER_METADATA_KEY, Interleave, OnnxGraphEmitter
from xvol_passes.onnx_view import conv_geometry_from_onnx, infer_shapes

__all__ = ["ADAPTER_METADATA_KEY", "Interleave", "OnnxGraphAdapter", "conv_geometry_from_onnx", "infer_shapes"]


class OnnxGraphAdapter(OnnxGraphEmitter):
    """onnx-graphsurgeon graph <-> the rules' networkx view (see the module docstring)."""

    asymmetric_pads = True  # an ONNX Conv writes (begin, end) pads apart

    def __init__(self, model: onnx.ModelProto, shapes: Shapes | None = None, *,
                 interleave: Interleave = "reshape") -> None:
        if interleave not in ("reshape", "gather"):
            raise InvalidArgumentError(f"interleave must be 'reshape' or 'gather', got {interleave!r}")
        OnnxConstants.__init__(self, model, shapes if shapes is not None else infer_shapes(model))
        self.interleave_mode = interleave
        self._metadata = {}
        for n in model.graph.node:
            if n.metadata_props:
                self._metadata[(n.name, n.op_type, tuple(n.output))] = [(p.key, p.value) for p in n.metadata_props]
        self._new_metadata = {}
        self._interleaved = {}
        self._interleave_cache = {}
        self._hidden = set()
        self._name_cache = {}
        self._branch_cache = {}
        self._names = {t.name for t in self.graph.tensors().values()} | {n.name for n in self.graph.nodes if n.name}
        self._tensors = {}

    def sites(self) -> list[tuple[Key, Branch]]:
        """Output tensor and merged branch of each multi-input Conv (the fused X-volution sites)."""
        view = self.view()
        found: list[tuple[Key, Branch]] = []
        for key in view.nodes:
            info = node_info(view, key)
            if info.kind == "conv" and info.branch is not None and len(info.branch.inputs) > 1:
                found.append((key, info.branch))
        return found

    def site_name(self, key: Key) -> str:
        return self._name(self._tensors[str(key)].inputs[0])

    def input_shape(self, branch: Branch) -> Shape | None:
        return self.shape(self._tensors[str(branch.inputs[0])])

    def finalize(self) -> onnx.ModelProto:
        return self.to_model()
