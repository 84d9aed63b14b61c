"""The ``xvol`` command: a thin layer over the passes (``xvolify``, ``fuse``, ``fuse_onnx``) and their reports.

Every subcommand has ``--help``; ``--json`` prints one JSON object to stdout
instead of tables (errors still go to stderr). A user error (bad model name,
missing or corrupt file, existing output without ``--force``) is one line on
stderr and exit status 1; a failed verification is exit status 1 as well;
``--traceback`` shows the Python traceback of an error. Any other exception
is a bug in xvol and shows its traceback.

MODEL arguments are one of:

  NAME                     a torchvision model (built with ``weights=None``)
  timm:NAME                a timm model (``timm.create_model(NAME, pretrained=False)``)
  package.module:factory   a function returning an ``nn.Module``, called with no
                           arguments (``num_classes=N`` with ``--num-classes N``)
  FILE.pt                  a checkpoint written by ``xvol xvolify`` / ``xvol fuse`` /
                           the demo, which records the model's name and rebuilds it

Nothing is downloaded. ``--num-classes`` applies to a model given by name
(default: the builder's, 1000 for torchvision); ``--input-size`` defaults to a
timm model's ``pretrained_cfg`` input size, else 3 224 224, and a checkpoint
records its own. Checkpoints are read with ``torch.load(weights_only=True)``.
Outputs are written atomically and never over an existing file without
``--force``.
"""


from __future__ import annotations

import argparse
import inspect
import sys
from collections.abc import Callable, Sequence

from xvol_compiler.cli.bench_graph import cmd_bench, cmd_graph
from xvol_compiler.cli.common import (
    EXIT_ERROR,
    EXIT_OK,
    EXIT_USAGE,
    INPUT_SIZE_HELP,
    MODEL_HELP,
    NUM_CLASSES_HELP,
    CommandError,
    VerificationFailed,
    add_json,
    add_lowering_flags,
    add_model,
    add_xvolify_options,
    positive_int,
)
from xvol_compiler.cli.errors import is_package_error, one_line
from xvol_compiler.cli.model_commands import cmd_export, cmd_fuse, cmd_fuse_onnx, cmd_sites, cmd_xvolify
from xvol_compiler.cli.output import Output, plain_help, plain_text
from xvol_compiler.cli.verify_command import cmd_verify

__all__ = [
    "EXIT_ERROR",
    "EXIT_OK",
    "EXIT_USAGE",
    "CommandError",
    "Output",
    "VerificationFailed",
    "build_parser",
    "main",
    "plain_text",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xvol", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--traceback", action="store_true", help="show the Python traceback of an error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, fn: Callable[..., int], help_text: str, epilog: str = "") -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=inspect.cleandoc(fn.__doc__ or help_text), epilog=epilog,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.set_defaults(handler=fn)
        return p

    p = add("sites", cmd_sites, "list candidate and selected sites (output stride, geometry, MACs)",
            "examples:\n  xvol sites resnet50 --sites os16\n  xvol sites timm:efficientnet_b0\n"
            "  xvol sites mypackage.models:my_cnn --input-size 64")
    add_model(p)
    add_xvolify_options(p)
    p.add_argument("--all", action="store_true", help="list every conv, pointwise and not-run ones included")
    add_json(p)

    p = add("xvolify", cmd_xvolify, "insert X-volution; save a checkpoint",
            "example: xvol xvolify resnet18 -o r18-xvol.pt --num-classes 10")
    add_model(p)
    add_xvolify_options(p)
    p.add_argument("-o", "--output", required=True, help="checkpoint to write (.pt)")
    p.add_argument("--force", action="store_true", help="overwrite the output")
    add_json(p)

    p = add("fuse", cmd_fuse, "fuse a model's sites in torch.fx; save the fused checkpoint (and ONNX)",
            "example: xvol fuse r18-xvol.pt -o r18-fused.pt --onnx r18-fused.onnx")
    add_model(p)
    p.add_argument("-o", "--output", required=True, help="fused checkpoint to write (.pt)")
    p.add_argument("--onnx", help="also export the fused model to this ONNX file")
    p.add_argument("--rtol", type=float, default=None,
                   help="verification tolerance (default: by dtype, 1e-4 for float32)")
    p.add_argument("--no-verify", action="store_true", help="skip the fused-vs-unfused check")
    p.add_argument("--force", action="store_true", help="overwrite the outputs")
    p.add_argument("--backend", choices=("eager", "compile", "onnxruntime"), default="eager",
                   help="backend the lowering of each site is chosen for (default eager)")
    add_lowering_flags(p)
    add_json(p)

    p = add("export", cmd_export, "export a model or checkpoint to ONNX",
            "example: xvol export r18-xvol.pt -o r18-xvol.onnx")
    add_model(p)
    p.add_argument("-o", "--output", required=True, help="ONNX file to write")
    p.add_argument("--opset", type=int, default=None,
                   help="ONNX opset (default: the exporter's); the command fails if the exporter cannot produce it")
    p.add_argument("--exporter", choices=("dynamo", "torchscript"), default="dynamo",
                   help="torch.export based exporter (default; opset >= 18) or the TorchScript one (older opsets)")
    p.add_argument("--static-batch", action="store_true", help="fixed batch size instead of a dynamic one")
    p.add_argument("--no-optimize", action="store_true", help="skip the exporter's graph optimizer")
    p.add_argument("--force", action="store_true", help="overwrite the output")
    add_json(p)

    p = add("fuse-onnx", cmd_fuse_onnx, "fuse an ONNX model; verify in onnxruntime",
            "example: xvol fuse-onnx r18-xvol.onnx -o r18-fused.onnx --report report.json")
    p.add_argument("input", metavar="IN.onnx", help="ONNX model to fuse")
    p.add_argument("-o", "--output", required=True, metavar="OUT.onnx", help="fused ONNX file to write")
    p.add_argument("--report", nargs="?", const="-", default=None, metavar="PATH",
                   help="print the per-site report; with PATH write it there (.json or text)")
    p.add_argument("--rtol", type=float, default=None,
                   help="verification tolerance (default: by dtype, 1e-4 for float32)")
    p.add_argument("--no-verify", action="store_true", help="skip the onnxruntime check")
    p.add_argument("--force", action="store_true", help="overwrite the outputs")
    add_lowering_flags(p)
    add_json(p)

    p = add("verify", cmd_verify, "compare two models' outputs (ONNX files, checkpoints, names)",
            "examples:\n  xvol verify a.onnx b.onnx\n  xvol verify r18-xvol.pt            "
            "(the model vs its fused form)\n  xvol verify r18-xvol.pt r18-fused.onnx")
    p.add_argument("a", metavar="A", help="ONNX file, or a model: " + MODEL_HELP)
    p.add_argument("b", metavar="B", nargs="?", help="second model; omitted: A's fused form")
    p.add_argument("--num-classes", type=positive_int, default=None, help=NUM_CLASSES_HELP)
    p.add_argument("--input-size", type=int, nargs="+", metavar="N", help="input: S, H W or C H W")
    p.add_argument("--batch", type=positive_int, default=None,
                   help="batch size of the random input (default 2; an ONNX input with a fixed batch keeps it)")
    p.add_argument("--rtol", type=float, default=None, help="largest relative error allowed (default: by dtype, "
                   "1e-4 for float32)")
    p.add_argument("--seed", type=int, default=0)
    add_json(p)

    p = add("bench", cmd_bench, "latency original : unfused : fused of a classification model",
            "examples:\n  xvol bench resnet50 --backend eager,onnxruntime --batch 1 16\n"
            "  xvol bench timm:convnext_atto\n  xvol bench r18-xvol.pt")
    p.add_argument("model", metavar="MODEL", help="classification model: " + MODEL_HELP + "; a checkpoint must "
                   "be original or xvolified")
    p.add_argument("--num-classes", type=positive_int, default=None, help=NUM_CLASSES_HELP)
    p.add_argument("--input-size", type=int, nargs="+", metavar="N", help=INPUT_SIZE_HELP)
    p.add_argument("--sites", default="os16", help="site policy (default os16; an xvolified checkpoint keeps its "
                   "own)")
    p.add_argument("--backend", default="eager", help="comma-separated: eager, compile, onnxruntime (default eager)")
    p.add_argument("--batch", type=int, nargs="+", default=[1], help="batch sizes (default 1)")
    p.add_argument("--repeats", type=int, default=10, help="interleaved rounds (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="rounds discarded first (default 2)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    add_json(p)

    p = add("graph", cmd_graph, "draw a site's subgraph before/after fusion (PNG/SVG/PDF)",
            "examples:\n  xvol graph resnet18 -o site.png --site layer3.0.conv2\n"
            "  xvol graph resnet18 -o site-onnx.svg --onnx\n  xvol graph model.onnx -o site.png\n"
            "  xvol graph resnet18 --whole -o fused.svg")
    add_model(p, "MODEL")
    add_xvolify_options(p)
    p.add_argument("-o", "--output", required=True, help="picture to write: .png, .svg or .pdf")
    p.add_argument("--site", help="qualified name of the site (default: the first one)")
    p.add_argument("--hops", type=int, default=2, help="neighbourhood radius in operations (default 2)")
    p.add_argument("--onnx", action="store_true", help="draw the ONNX graphs (export, fuse_onnx) instead of FX")
    p.add_argument("--whole", action="store_true", help="draw the whole fused graph (small models only)")
    p.add_argument("--force", action="store_true", help="overwrite the output")
    add_json(p)
    plain_help(parser)
    return parser



def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``xvol``; returns the exit status.

    The package's errors (and ``OSError``: a file that cannot be read or written) end as one line on stderr
    and exit status 1, their traceback with ``--traceback``; any other exception is a bug and propagates
    with its traceback.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    out = Output(getattr(args, "json", False))
    try:
        return int(args.handler(args, out))
    except VerificationFailed as err:
        sys.stderr.write(f"xvol: verification failed: {err}\n")
        return EXIT_ERROR
    except KeyboardInterrupt:
        sys.stderr.write("xvol: interrupted\n")
        return 130
    except Exception as err:
        if args.traceback or not is_package_error(err):
            raise
        sys.stderr.write(f"xvol: error: {one_line(err)}\n")
        return EXIT_ERROR
