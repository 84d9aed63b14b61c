"""Lowering a model to ExecuTorch with the XNNPACK delegate, and running the ``.pte`` program it makes.

ExecuTorch is optional (``pip install -e .[executorch]``, pinned with the rest of its closure in
``requirements-executorch.lock``): importing this module does not need it; each function imports it
on first use and raises :class:`ExecutorchMissingError`, naming the extra, when it is absent.

- :func:`lower_to_xnnpack` exports a model (in eval mode, without gradients; the caller's training
  flags are restored) with ``torch.export`` and lowers it with
  ``to_edge_transform_and_lower(..., partitioner=[XnnpackPartitioner()])``.
- :func:`delegate_report` counts the delegate segments of the lowered program and names the
  operators left outside them (run by ExecuTorch's portable kernels). A fused X-volution model lowers
  to one segment with no operator on activations outside it: the PSSA ring kernel is a buffer
  (``pssa_ring``), so the ring convolution's weight is a graph input the partitioner takes, like
  every other conv weight.
- :func:`pte_bytes` serializes the program; :func:`run_pte` runs a ``.pte`` (bytes or a file) in
  the ExecuTorch runtime.
"""

from __future__ import annotations

import importlib
import operator
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from xvol_compiler.errors import XvolError
from xvol_compiler.training_flags import kept_training_flags

__all__ = [
    "DelegateReport",
    "ExecutorchError",
    "ExecutorchMissingError",
    "delegate_report",
    "executorch_available",
    "lower_to_xnnpack",
    "pte_bytes",
    "run_pte",
]

_INSTALL_HINT = "install the optional extra: pip install -e '.[executorch]' (or make executorch-env)"


class ExecutorchError(XvolError, RuntimeError):
    """Lowering to ExecuTorch or running a ``.pte`` program failed."""


class ExecutorchMissingError(ExecutorchError, ImportError):
    """The ``executorch`` package (an optional extra) is not installed."""


def _import(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ExecutorchMissingError(f"cannot import {module} ({error}): {_INSTALL_HINT}") from error


def executorch_available() -> bool:
    """Whether the ``executorch`` package can be imported."""
    try:
        importlib.import_module("executorch.exir")
    except ImportError:
        return False
    return True


@dataclass(frozen=True)
class DelegateReport:
    """The delegate segments of a lowered program and the operators left outside them.

    ``outside`` are operators on activations (they depend on a user input): each one splits the model
    between the delegate and the portable kernels. ``on_constants`` read only weights and constants,
    such as the float32 casts of the int64 scalars 3 and 6 that hardswish and hardsigmoid decompose
    into (torchvision's MobileNetV3 has them without any X-volution site).
    """

    segments: int  # executorch_call_delegate calls in the program's graph
    outside: tuple[str, ...]  # operators on activations outside every delegate, in graph order
    on_constants: tuple[str, ...] = ()  # operators outside the delegates that read only constants

    def __str__(self) -> str:
        rest = ", ".join(self.outside) if self.outside else "none"
        constants = f" ({len(self.on_constants)} more on constants only)" if self.on_constants else ""
        return f"{self.segments} delegate segment(s); operators on activations outside them: {rest}{constants}"


def lower_to_xnnpack(model: nn.Module | torch.export.ExportedProgram, example_inputs: tuple[Any, ...]) -> Any:
    """The ``EdgeProgramManager`` of ``model`` lowered with the XNNPACK partitioner.

    An ``nn.Module`` is exported with ``torch.export.export(model, example_inputs)`` in eval mode
    without gradients (its training flags are restored afterwards); an ``ExportedProgram`` is
    lowered as it is (``example_inputs`` unused).
    """
    exir = _import("executorch.exir")
    partitioner = _import("executorch.backends.xnnpack.partition.xnnpack_partitioner").XnnpackPartitioner
    if isinstance(model, torch.export.ExportedProgram):
        program = model
    elif isinstance(model, nn.Module):
        with kept_training_flags(model), torch.no_grad():
            model.eval()
            program = torch.export.export(model, tuple(example_inputs))
    else:
        raise ExecutorchError(
            f"model={type(model).__name__}: pass a torch.nn.Module or a torch.export.ExportedProgram")
    return exir.to_edge_transform_and_lower(program, partitioner=[partitioner()])


def _is_delegate_call(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and getattr(node.target, "__name__", "") == "executorch_call_delegate"


def _op_name(target: Any) -> str:
    name = getattr(target, "__name__", None) or str(target)
    return str(name)


def delegate_report(edge: Any) -> DelegateReport:
    """Delegate segments of an ``EdgeProgramManager`` (or its ``ExportedProgram``) and the operators
    outside them; ``getitem`` (reading a delegate's outputs) is plumbing, not an operator."""
    program = edge.exported_program() if hasattr(edge, "exported_program") else edge
    on_activations = set(program.graph_signature.user_inputs)  # names of nodes that depend on a user input
    segments = 0
    outside: list[str] = []
    on_constants: list[str] = []
    for node in program.graph.nodes:
        if any(n.name in on_activations for n in node.all_input_nodes):
            on_activations.add(node.name)
        if _is_delegate_call(node):
            segments += 1
        elif node.op == "call_function" and node.target is not operator.getitem:
            (outside if node.name in on_activations else on_constants).append(_op_name(node.target))
    return DelegateReport(segments, tuple(outside), tuple(on_constants))


def pte_bytes(edge: Any) -> bytes:
    """The ``.pte`` program (flatbuffer bytes) of a lowered ``EdgeProgramManager``."""
    return bytes(edge.to_executorch().buffer)


def run_pte(program: bytes | str | os.PathLike[str], inputs: Sequence[Tensor], *,
            method: str = "forward") -> list[Tensor]:
    """Outputs of ``method`` of a ``.pte`` program (bytes or a file path) run in the ExecuTorch runtime."""
    runtime = _import("executorch.runtime").Runtime.get()
    data: bytes | Path = program if isinstance(program, bytes) else Path(program)
    try:
        loaded = runtime.load_program(data)
        runner = loaded.load_method(method)
    except (RuntimeError, ValueError) as error:
        raise ExecutorchError(f"cannot load method {method!r} of the .pte program ({error}): "
                              "pass a program written by pte_bytes or to_executorch()") from error
    if runner is None:
        raise ExecutorchError(f"the .pte program has no method {method!r}: pass one of {sorted(loaded.method_names)}")
    return [out for out in runner.execute(list(inputs)) if isinstance(out, Tensor)]
