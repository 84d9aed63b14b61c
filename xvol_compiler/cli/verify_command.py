"""``xvol verify``: two models' outputs compared on random inputs (ONNX files in onnxruntime, torch models).

The comparison itself is the verify layer's (:mod:`xvol_compiler.verify`, :mod:`xvol_compiler.onnx_verify`);
this module turns its flags into feeds and its errors into the command's advice.
"""

from __future__ import annotations

import argparse
from typing import Any

from xvol_compiler.cli.common import (
    CLI_FLOAT64_FIX,
    CLI_INPUT_FIX,
    EXIT_OK,
    CommandError,
    VerificationFailed,
    cli_message,
    input_size,
)
from xvol_compiler.cli.output import Output

__all__ = ["batched", "check_same_inputs", "cmd_verify", "onnx_feeds", "run_onnx_file"]


def cmd_verify(args: argparse.Namespace, out: Output) -> int:
    """Compare two ONNX files, a model and its fused form, or a model and an ONNX file, on random inputs.

    The tolerance follows the dtype unless ``--rtol`` is given (1e-4 for float32 and float64, 1e-2 for
    float16, 5e-2 for bfloat16); a torch model's result also passes when it is as close to a float64 run of
    the torch model as that model itself (within ``UNFUSED_ERROR_FACTOR``, see ``xvol_compiler.verify``), and
    torchvision detection models are compared on their backbone and head outputs (before post-processing).
    A model checked against its own fused form is checked with its attention exercised: zero BatchNorm gammas
    of its X-volution sites (every site before training) are set non-zero in a copy, which is fused and
    compared, so that the check covers the attention fold (the output says how many were set).
    """
    import torch

    from xvol_compiler.verify import ErrorStats, accepts, default_rtol

    torch.manual_seed(args.seed)
    size = input_size(args.input_size)
    a, b = args.a, args.b
    how: str
    if a.endswith(".onnx") and (b is None or b.endswith(".onnx")):
        from xvol_compiler.onnx_io import load_onnx
        from xvol_compiler.onnx_verify import OnnxVerificationError, compare_onnx, onnx_dtype
        from xvol_passes.fuse_onnx import fuse_onnx

        first = load_onnx(a).model
        if b is None:
            second, _ = fuse_onnx(first, verify=False)
            how = f"{a} vs its fused form (fuse_onnx)"
            labels = (f"model {a}", f"fused form of {a}")
        else:
            second = load_onnx(b).model
            how = f"{a} vs {b} (onnxruntime)"
            labels = (f"first model ({a})", f"second model ({b})")
            check_same_inputs(first, a, second, b)
        feeds = onnx_feeds(first, a, size, args.batch)
        try:
            abs_err, rel_err = compare_onnx(first, second, feeds, labels=labels)
        except OnnxVerificationError as err:
            raise CommandError(cli_message(err, CLI_INPUT_FIX, CLI_FLOAT64_FIX)) from err
        dtype = onnx_dtype(first)
        rtol = default_rtol(dtype) if args.rtol is None else args.rtol
        ok = accepts(ErrorStats(abs_err, rel_err, 1), rtol=rtol)
        detail = f"max abs error {abs_err:.3g}, relative {rel_err:.3g} ({dtype}, rtol {rtol:g})"
        extra: dict[str, Any] = {"dtype": dtype}
    else:
        from xvol_compiler.io import load_model
        from xvol_compiler.verify import reference_run, verify_model, verify_outputs

        torch_arg, other_arg = (a, b) if not a.endswith(".onnx") else (b, a)
        model, spec = load_model(torch_arg, num_classes=args.num_classes, input_size=size)
        model.eval()  # a model given by name is built in training mode: the check is of inference
        inputs = batched(spec.example_inputs(model), args.batch or 2)
        exercised: int | None = None
        if other_arg is not None and other_arg.endswith(".onnx"):
            reference = reference_run(model, inputs)
            verdict = verify_outputs(reference, run_onnx_file(other_arg, inputs), rtol=args.rtol, name=torch_arg)
            how = f"{torch_arg} (torch) vs {other_arg} (onnxruntime)"
        elif other_arg is not None:
            reference = reference_run(model, inputs)
            other, _ = load_model(other_arg, num_classes=args.num_classes, input_size=size)
            verdict = verify_model(reference, other.eval(), inputs, rtol=args.rtol, name=torch_arg)
            how = f"{torch_arg} vs {other_arg} (torch)"
        else:
            from xvol_compiler import fuse
            from xvol_compiler.attention_probe import with_exercised_attention

            # Zero attention gammas would make the T(x) half of every fused weight 0: check a copy where it is not.
            probe, exercised = with_exercised_attention(model, seed=args.seed)
            reference = reference_run(probe, inputs)
            fused = fuse(probe, example_inputs=inputs, verify=False)
            name = f"{torch_arg} (unfused{', attention exercised' if exercised else ''})"
            verdict = verify_model(reference, fused, inputs, rtol=args.rtol, name=name)
            how = f"{torch_arg} vs its fused form (fuse)"
            if exercised:
                how += (f", checked on a copy with the zero gammas of {exercised} X-volution attention / branch "
                        f"BatchNorm(s) set non-zero (seed {args.seed}) so that the attention fold is exercised")
        abs_err, rel_err, rtol, ok = verdict.candidate.max_abs, verdict.candidate.max_rel, verdict.rtol, verdict.ok
        detail = verdict.describe()
        extra = {"dtype": verdict.dtype, "reference": verdict.reference, "on": verdict.compared,
                 "unfused_rel_error": verdict.unfused.max_rel if verdict.unfused is not None else None,
                 "float64_rel_error": verdict.exact.max_rel if verdict.exact is not None else None,
                 "notes": list(verdict.notes)}
        if exercised is not None:
            extra["exercised_batchnorms"] = exercised
    out.json({"compared": how, "max_abs_error": abs_err, "max_rel_error": rel_err, "rtol": rtol, "ok": ok, **extra})
    out.line(f"{how}: {detail}: {'ok' if ok else 'FAILED'}")
    if not ok:
        raise VerificationFailed(f"outputs differ: {detail}")
    return EXIT_OK


def batched(inputs: tuple[Any, ...], batch: int) -> tuple[Any, ...]:
    """``inputs`` (batch 1) repeated to ``batch``: tensors along axis 0, lists of images (detection) as lists."""
    import torch

    def grow(t: Any) -> Any:
        if isinstance(t, torch.Tensor):
            return t.repeat(batch, *([1] * (t.dim() - 1)))
        if isinstance(t, list):
            return t * batch
        return t

    return tuple(grow(t) for t in inputs)



def run_onnx_file(path: str, inputs: tuple[Any, ...]) -> list[Any]:
    """Outputs of the ONNX file ``path`` in onnxruntime on torch ``inputs`` (in graph order); a one-line error
    with the command's flags when it does not run on them."""
    import numpy as np
    import torch

    from xvol_compiler.onnx_io import load_onnx
    from xvol_compiler.onnx_verify import OnnxVerificationError, float64_inputs, graph_inputs, run_onnx

    proto = load_onnx(path).model
    names = [i.name for i in graph_inputs(proto)]
    shapes = ", ".join(str(tuple(t.shape)) for t in inputs if hasattr(t, "shape"))
    fix = CLI_FLOAT64_FIX if float64_inputs(proto) else CLI_INPUT_FIX

    def refusal(why: str) -> CommandError:
        return CommandError(f"{path} does not run in onnxruntime on inputs of shape {shapes} ({why}): {fix}")

    if len(names) != len(inputs) or not all(isinstance(t, torch.Tensor) for t in inputs):
        raise refusal(f"{len(names)} inputs expected, {len(inputs)} given")
    feeds = {n: np.asarray(t.detach().cpu().numpy()) for n, t in zip(names, inputs, strict=True)}
    try:
        return run_onnx(proto, feeds, f"model {path}")
    except OnnxVerificationError as err:
        raise refusal(err.detail or err.problem) from err


def onnx_feeds(model: Any, path: str, size: list[int] | None, batch: int | None) -> dict[str, Any]:
    """Random feeds for ``model``: ``--input-size`` for its single input, else its declared shapes; ``--batch``
    on axis 0 (a fixed batch size that differs from an explicit ``--batch`` is refused)."""
    import numpy as np
    import onnx
    import torch

    from xvol_compiler.onnx_verify import graph_inputs, random_inputs

    inputs = graph_inputs(model)
    if size is not None:
        if len(inputs) != 1:
            raise CommandError(f"{path} has {len(inputs)} inputs; --input-size gives the shape of a single one")
        elem = inputs[0].type.tensor_type.elem_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(elem) if elem else np.float32
        return {inputs[0].name: torch.randn(batch or 2, *size).numpy().astype(dtype)}
    for vi in inputs:
        dims = vi.type.tensor_type.shape.dim
        if batch is not None and dims and dims[0].HasField("dim_value") and dims[0].dim_value != batch:
            raise CommandError(f"{path}: input {vi.name!r} has a fixed batch size of {dims[0].dim_value}, so "
                             f"--batch {batch} cannot apply: drop --batch (or export with a dynamic batch)")
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    return random_inputs(model, seed=seed, batch=batch or 2)


def check_same_inputs(first: Any, a: str, second: Any, b: str) -> None:
    """Two ONNX files are compared on the same feeds: refuse different input names or fixed sizes up front."""
    from xvol_compiler.onnx_verify import declared_inputs

    ins_a, ins_b = declared_inputs(first), declared_inputs(second)
    if set(ins_a) != set(ins_b):
        raise CommandError(f"{a} and {b} take different inputs ({sorted(ins_a)} vs {sorted(ins_b)}): xvol verify "
                         "runs both models on the same inputs")
    for name, dims_a in ins_a.items():
        dims_b = ins_b[name]
        fixed_differ = len(dims_a) != len(dims_b) or any(
            isinstance(x, int) and isinstance(y, int) and x != y for x, y in zip(dims_a, dims_b, strict=True))
        if fixed_differ:
            raise CommandError(f"input {name!r} has shape {dims_a} in {a} but {dims_b} in {b}: xvol verify runs "
                             "both models on the same inputs")

