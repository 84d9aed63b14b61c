"""The custom import-linter contract reads import lines right: what it must flag and what it must not."""

from __future__ import annotations

import pytest

from tests.import_contracts import _names_forbidden


@pytest.mark.parametrize(
    "line",
    [
        "import torch.fx",
        "import torch.fx as fx",
        "from torch import fx",
        "from torch import fx, nn",
        "from torch import nn, fx",
        "from torch.fx import GraphModule",
        "from torch.fx.passes.shape_prop import ShapeProp",
        "    from torch import fx  # lazily",
    ],
)
def test_flags_imports_of_torch_fx(line: str) -> None:
    assert _names_forbidden(line, "torch.fx")


@pytest.mark.parametrize(
    "line",
    ["import torch", "from torch import nn", "import torch.nn.functional as F", "from torch.func import vmap",
     "import fxtools"],
)
def test_leaves_other_torch_imports_alone(line: str) -> None:
    assert not _names_forbidden(line, "torch.fx")


@pytest.mark.parametrize("line", ["import onnx", "from onnx import helper", "import onnx.numpy_helper"])
def test_flags_top_level_package_imports(line: str) -> None:
    assert _names_forbidden(line, "onnx")


@pytest.mark.parametrize("line", ["import onnx_graphsurgeon as gs", "import onnxruntime"])
def test_a_longer_name_is_another_package(line: str) -> None:
    assert not _names_forbidden(line, "onnx")
