"""A one-site ONNX model per lowering candidate, for measuring it in onnxruntime.

The model takes the site's inputs ``[x, T(x)]`` as graph inputs and computes
the site's conv in the candidate lowering, emitted by ``OnnxGraphAdapter.relower``
(the same code that writes fused models), so what is measured is what is deployed.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from xvol_compiler.fold import Branch
from xvol_passes.onnx_graph import OnnxGraphAdapter

__all__ = ["one_site_model", "one_site_session"]

_ONNX_TYPES = {torch.float16: TensorProto.FLOAT16, torch.float32: TensorProto.FLOAT, torch.float64: TensorProto.DOUBLE}


def one_site_model(branch: Branch, lowering: str, shape: tuple[int, ...], opset: int = 17) -> onnx.ModelProto:
    """Inputs ``x0, x1, ...`` (the branch's inputs, batch and spatial sizes of ``shape``), output ``y``."""
    elem = _ONNX_TYPES[branch.weight.dtype]
    names = [f"x{i}" for i in range(len(branch.inputs))]
    inputs = [helper.make_tensor_value_info(n, elem, [shape[0], c, *shape[2:]])
              for n, c in zip(names, branch.channels, strict=True)]
    first = branch.blocks()[0].detach().cpu().numpy()
    weight = onnx.numpy_helper.from_array(np.ascontiguousarray(first), "site.weight")
    g = branch.geometry
    placeholder = helper.make_node("Conv", [names[0], "site.weight"], ["y"], name="site", group=g.groups,
                                   kernel_shape=list(g.kernel_size), strides=list(g.stride),
                                   dilations=list(g.dilation))
    graph = helper.make_graph([placeholder], "site", inputs, [helper.make_tensor_value_info("y", elem, None)],
                              [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    adapter = OnnxGraphAdapter(model)
    adapter.view()
    site = Branch(tuple(names), branch.channels, g, branch.weight, branch.bias)
    adapter.relower("y", site, lowering)  # type: ignore[arg-type]
    return adapter.finalize()


def one_site_session(branch: Branch, lowering: str, shape: tuple[int, ...]) -> tuple[Any, list[str]]:
    """An onnxruntime CPU session of ``one_site_model`` (torch's thread count, ``onnx_verify.onnx_session``:
    thread pools without spinning) and its input names."""
    from xvol_compiler.onnx_verify import onnx_session

    model = one_site_model(branch, lowering, shape)
    session = onnx_session(model, threads=torch.get_num_threads())
    return session, [i.name for i in model.graph.input]
