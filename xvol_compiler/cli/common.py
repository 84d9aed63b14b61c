"""What the subcommands share: exit codes, the command's own errors, common arguments, loading MODEL."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from xvol_compiler.errors import VerificationError, XvolError
from xvol_compiler.options import LOWERING_OPTIONS

__all__ = [
    "CLI_FLOAT64_FIX",
    "CLI_INPUT_FIX",
    "EXIT_ERROR",
    "EXIT_OK",
    "EXIT_USAGE",
    "CommandError",
    "VerificationFailed",
    "add_json",
    "add_lowering_flags",
    "add_model",
    "add_xvolify_options",
    "cli_message",
    "input_size",
    "load_model_arg",
    "parse_sites",
    "positive_int",
    "xvolify_kwargs",
]

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2


class CommandError(XvolError, ValueError):
    """A command line the command cannot carry out (a wrong kind of model or file, flags that contradict);
    the message names the problem and the flag that fixes it."""


class VerificationFailed(VerificationError):
    """Outputs differ beyond the tolerance; the message says by how much."""


def input_size(values: Sequence[int] | None) -> list[int] | None:
    """``S`` -> [3, S, S]; ``H W`` -> [3, H, W]; ``C H W`` as given."""
    if not values:
        return None
    if any(v < 1 for v in values):
        raise CommandError(f"--input-size values must be >= 1, got {list(values)}")
    if len(values) == 1:
        return [3, values[0], values[0]]
    if len(values) == 2:
        return [3, *values]
    if len(values) == 3:
        return list(values)
    raise CommandError(f"--input-size takes S, H W or C H W, got {len(values)} numbers")


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def parse_sites(text: str) -> Any:
    """``os16``, ``all``, ``re:<pattern>``, a name, or comma-separated names."""
    names = [s.strip() for s in text.split(",") if s.strip()]
    if not names:
        raise CommandError("--sites is empty")
    return names if len(names) > 1 else names[0]


MODEL_HELP = ("torchvision model name, timm:NAME, package.module:factory, or a checkpoint written by xvol / "
              "the demo (nothing is downloaded)")
NUM_CLASSES_HELP = ("classifier size for a model given by name (default: the builder's, 1000 for torchvision; "
                    "a factory gets num_classes=N only when this is given)")
INPUT_SIZE_HELP = ("example input: S, H W or C H W (default: a timm model's pretrained_cfg input size, else "
                   "3 224 224; a checkpoint's recorded size)")


def add_model(p: argparse.ArgumentParser, what: str = "MODEL") -> None:
    p.add_argument("model", metavar=what, help=MODEL_HELP)
    p.add_argument("--num-classes", type=positive_int, default=None, help=NUM_CLASSES_HELP)
    p.add_argument("--input-size", type=int, nargs="+", metavar="N", help=INPUT_SIZE_HELP)


def add_json(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")


def add_xvolify_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sites", default="os16",
                   help="site policy: os16 (default), os8, ..., all, re:<pattern>, a name or comma-separated names")
    p.add_argument("--shift", type=int, default=1, help="PSSA shift length L (default 1)")
    p.add_argument("--directions", default=None,
                   help="PSSA neighbourhood: 4/axial or 8/full in 2-D (default full)")
    p.add_argument("--directional", action="store_true", help="one PSSA product per direction (|D| x channels)")
    p.add_argument("--extra-branches", default="", help="comma-separated RepVGG-style branches: 1x1,identity,bn")
    p.add_argument("--attention", choices=("pssa", "global"), default="pssa",
                   help="pssa (fusable, default) or global self-attention (not fusable)")


def xvolify_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    directions: Any = args.directions
    if directions is not None and directions.isdigit():
        directions = int(directions)
    kwargs: dict[str, Any] = {
        "shift": args.shift,
        "directions": directions,
        "directional": args.directional,
        "extra_branches": [b.strip() for b in args.extra_branches.split(",") if b.strip()],
        "attention": args.attention,
    }
    return kwargs


def load_model_arg(args: argparse.Namespace) -> tuple[Any, Any]:
    from xvol_compiler.io import load_model

    if str(args.model).endswith(".onnx"):
        raise CommandError(f"{args.model} is an ONNX file; this command takes a model name or a checkpoint")
    return load_model(args.model, num_classes=args.num_classes, input_size=input_size(args.input_size))



def add_lowering_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lowering", choices=LOWERING_OPTIONS, default="auto",
                   help="deploy form of each site: auto (a fixed rule per backend and site class, no timing: "
                        "depthwise sites split with --split, else spatial; other sites channel), measure (time "
                        "the exact forms on this machine, kept in a cache file), channel, spatial (x and T(x) "
                        "interleaved along W), spatial-h (along H), stack (a conv of one more dimension over x "
                        "and T(x) stacked) or split (default auto)")
    p.add_argument("--lowering-cache", metavar="PATH", default=None,
                   help="cache file of --lowering measure (default $XVOL_LOWERING_CACHE, else "
                        "$XDG_CACHE_HOME/xvol-compiler/lowering-cache.json)")
    p.add_argument("--split", action="store_true",
                   help="allow more than one convolution per site (the split lowering: two convs and an add)")



CLI_INPUT_FIX = "give the input shape with --input-size (S, H W or C H W) and the batch with --batch"
CLI_FLOAT64_FIX = "onnxruntime has no float64 Conv: convert the model to float32 to verify it"


def cli_message(err: Any, fix_for_inputs: str, fix_for_float64: str) -> str:
    """An ``OnnxVerificationError``'s problem with the advice in command-line flags instead of API words."""
    from xvol_compiler.onnx_verify import API_FIX, FLOAT64_FIX

    fix = {API_FIX: fix_for_inputs, FLOAT64_FIX: fix_for_float64}.get(err.fix, err.fix)
    return f"{err.problem}: {fix}" if fix else str(err.problem)
