"""Site analysis: which convolutions of a model run, at what output stride, at what cost.

Analysis (:func:`analyze_model`) runs the model once in eval mode under
``torch.no_grad()`` on example inputs, with forward hooks on every
convolution and linear module. Hooks see every call of every module, also
modules called from Python loops (detection heads) and models that do not
trace. When the whole model traces with ``torch.fx`` (convolutions kept as
leaf modules; analysis path ``"fx+hooks"``), the graph is searched for
functional convolutions (``F.conv2d`` outside a module: they cannot be
swapped, so they are reported, with their output strides from running the
graph through an FX interpreter); FX is never required: a model that does
not trace is analysed by hooks alone (path ``"hooks"``).

Definitions (documented in README, section "xvolify"):

- **reference resolution**, per number of spatial dimensions n: the spatial
  size of the first positional input tensor with n + 2 dimensions (the
  network input); for detection models (they resize their images inside,
  ``GeneralizedRCNNTransform``) and when there is no such tensor, the input
  of the first conv call of that kind: the image as the network sees it.
  Override with ``reference_size``.
- **output stride** of a call: reference size / output size, per spatial
  axis (Conv2d: H, W; Conv1d: length; Conv3d: H, W, the last two axes; the
  first Conv3d axis gives the separate **temporal stride**). The nominal
  stride is the ratio rounded to the nearest power of two in log scale:
  unpadded convolutions trim borders (inception: 224 / 12 = 18.7 -> 16) and
  can make a ratio integral by coincidence (inception at 160 px: 160 / 8 =
  20 -> 16), so exact integers are not trusted either; networks with
  stride-3 stages get rounded strides too (the exact ratios are kept in
  ``ConvCall.ratio`` for predicates). When the spatial axes disagree the
  stride is the tuple, e.g. (16, 8).
- **MACs**: multiply-accumulates of Conv*, ConvTranspose* and Linear modules
  on the example inputs (conv: output elements x C_in/groups x kernel
  volume). Attention matmuls outside ``nn.Linear`` are not counted.
- **patch embedding**: a conv with kernel == stride > 1 and no padding (ViT,
  Swin, ConvNeXt downsampling): it does no spatial mixing across patches, so
  policies skip it unless it is named explicitly.
- **shared modules**: a module called several times (shared detection head
  convs) has one output stride per call; a stride policy selects it if ANY of
  its calls qualifies, and its MACs are summed over all calls.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import torch
import torch.fx
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd

from xvol_compiler.arguments import check_example_inputs, check_module
from xvol_compiler.conv_modules import CONV_CALLS, CONV_TYPES, PLAIN_CONV_FORWARDS, conv_geometry
from xvol_compiler.deploy import XVolutionDeploy
from xvol_compiler.errors import InvalidArgumentError, XvolError
from xvol_compiler.fold import ConvGeometry
from xvol_compiler.report import format_stride
from xvol_compiler.xvolution import XVolution, conv_forward_reason

__all__ = [
    "CONV_MODULES",
    "KINDS",
    "SITE_TYPE_NAMES",
    "AnalysisMode",
    "ConvCall",
    "ConvInfo",
    "ModelAnalysis",
    "ModelKind",
    "SiteSelectionError",
    "Stride",
    "analyze_model",
    "as_args",
    "default_example_inputs",
    "describe_inputs",
    "detect_kind",
    "nominal_stride",
]

CONV_MODULES: tuple[type[_ConvNd], ...] = tuple(CONV_TYPES.values())
_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_SITE_CONTAINERS = (XVolution, XVolutionDeploy)
# Class names of modules that already are X-volution sites (ModelAnalysis.other_modules holds class names).
SITE_TYPE_NAMES = {"XVolution", "XVolutionDeploy", "GlobalAttentionXVolution"}

Stride = float | tuple[float, ...]
ModelKind = Literal["classification", "segmentation", "detection", "video", "optical_flow", "image", "sequence"]
KINDS: tuple[str, ...] = ("classification", "segmentation", "detection", "video", "optical_flow", "image", "sequence")
AnalysisMode = Literal["auto", "hooks", "fx"]
_FULL_SIZE_VIDEO = {"S3D", "MViT"}


class SiteSelectionError(XvolError, ValueError):
    """A site selection that names unknown modules or selects nothing; the message lists what exists."""


# --------------------------------------------------------------------------- model kind and inputs


def detect_kind(model: nn.Module) -> str:
    """Guess the model kind from torchvision's module path, else from the conv types it holds."""
    path = type(model).__module__
    for key in ("detection", "segmentation", "video", "optical_flow"):
        if path.startswith(f"torchvision.models.{key}"):
            return key
    if path.startswith("torchvision.models"):
        return "classification"
    types = {type(m) for m in model.modules()}
    if any(issubclass(t, nn.Conv3d) for t in types):
        return "video"
    if any(issubclass(t, nn.Conv2d) for t in types):
        return "image"
    if any(issubclass(t, nn.Conv1d) for t in types):
        return "sequence"
    return "image"


def _first_conv_channels(model: nn.Module, default: int = 3) -> int:
    if type(model).__module__.startswith("torchvision.models"):
        return default
    for m in model.modules():
        if isinstance(m, CONV_MODULES):
            return int(m.in_channels)
    return default


def default_example_inputs(model: nn.Module, kind: str | None = None) -> Tensor | list[Tensor] | tuple[Tensor, ...]:
    """Default inputs per kind, on the model's device and dtype.

    classification/segmentation/image: 1x3x224x224; detection: ``[3x224x224]``
    (a list with one image); video: 1x3x8x112x112 (torchvision's S3D and
    MViT, whose pools/reshapes are sized for it: 1x3x16x224x224); optical flow: two
    1x3x224x224 images; sequence (Conv1d): 1xCx224. For models outside
    torchvision C is the first conv's ``in_channels``, else 3.
    """
    kind = kind or detect_kind(model)
    if kind not in KINDS:
        raise InvalidArgumentError(f"unknown model kind {kind!r}; use one of {', '.join(KINDS)}")
    p = next(iter(model.parameters()), None)
    device = p.device if p is not None else torch.device("cpu")
    dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
    c = _first_conv_channels(model)
    g = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> Tensor:
        return torch.rand(*shape, generator=g).to(device=device, dtype=dtype)

    if kind == "detection":
        return [rand(c, 224, 224)]
    if kind == "video":
        if type(model).__name__ in _FULL_SIZE_VIDEO:  # pools/reshapes sized for 16x224x224 clips
            return rand(1, c, 16, 224, 224)
        return rand(1, c, 8, 112, 112)
    if kind == "optical_flow":
        return (rand(1, c, 224, 224), rand(1, c, 224, 224))
    if kind == "sequence":
        return rand(1, c, 224)
    return rand(1, c, 224, 224)


def as_args(example_inputs: Any) -> tuple[Any, ...]:
    """A Tensor or a list (detection images) is the single positional argument; a tuple is unpacked."""
    if isinstance(example_inputs, tuple):
        return example_inputs
    return (example_inputs,)


def describe_inputs(args: tuple[Any, ...]) -> str:
    def one(a: Any) -> str:
        if isinstance(a, Tensor):
            return "x".join(map(str, a.shape))
        if isinstance(a, (list, tuple)):
            return "[" + ", ".join(one(v) for v in a) + "]"
        return type(a).__name__

    return ", ".join(one(a) for a in args)


# --------------------------------------------------------------------------- analysis


def nominal_stride(ratio: float) -> float:
    """The power of two nearest to ``ratio`` in log scale (16 for 12 ... 22, 8 for 6 ... 11)."""
    if ratio <= 0 or not math.isfinite(ratio):
        raise InvalidArgumentError(f"output stride ratio must be positive, got {ratio}")
    return float(2.0 ** round(math.log2(ratio)))


@dataclass(frozen=True)
class ConvCall:
    """One call of a conv module: shapes, MACs and (after analysis) its strides."""

    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    macs: int
    output_stride: Stride = float("nan")
    temporal_stride: float | None = None
    ratio: tuple[float, ...] = ()


@dataclass
class ConvInfo:
    """What analysis knows about one conv module (also what a selection predicate receives).

    ``conv_type`` is the torch base class (Conv1d/2d/3d); ``class_name`` the
    module's own class (e.g. torchvision's ``Conv3DSimple``).
    """

    name: str
    conv_type: str
    class_name: str
    geometry: ConvGeometry
    bias: bool
    params: int
    aliases: tuple[str, ...] = ()
    calls: list[ConvCall] = field(default_factory=list)
    not_swappable: str = ""
    analysis: str = "hooks"

    @property
    def ndim(self) -> int:
        return self.geometry.ndim

    @property
    def ran(self) -> bool:
        return bool(self.calls)

    @property
    def macs(self) -> int:
        return sum(c.macs for c in self.calls)

    @property
    def output_strides(self) -> tuple[Stride, ...]:
        return tuple(c.output_stride for c in self.calls)

    @property
    def temporal_strides(self) -> tuple[float, ...] | None:
        if self.ndim != 3:
            return None
        return tuple(c.temporal_stride for c in self.calls if c.temporal_stride is not None)

    @property
    def input_elements(self) -> int:
        return sum(math.prod(c.input_shape) for c in self.calls)

    @property
    def patch_embedding(self) -> bool:
        g = self.geometry
        no_pad = g.padding == "valid" or (not isinstance(g.padding, str) and all(p == 0 for p in g.padding))
        return no_pad and g.kernel_size == g.stride and any(s > 1 for s in g.stride)

    @property
    def pointwise(self) -> bool:
        return max(self.geometry.kernel_size) == 1


@dataclass
class ModelAnalysis:
    """Every conv module of a model (registration order) with its calls on the example inputs."""

    model: str
    kind: str
    inputs: str
    convs: dict[str, ConvInfo]
    total_macs: int
    total_params: int
    reference_sizes: dict[int, tuple[int, ...]]
    path: str
    note: str = ""
    functional_convs: list[str] = field(default_factory=list)
    other_modules: dict[str, str] = field(default_factory=dict)

    def lookup(self, name: str) -> ConvInfo | None:
        if name in self.convs:
            return self.convs[name]
        for info in self.convs.values():
            if name in info.aliases:
                return info
        return None


def _conv_macs(module: nn.Module, inp: tuple[int, ...], out: tuple[int, ...]) -> int:
    module = cast(_ConvNd, module)  # a conv, a transposed conv or a site: each holds a conv's attributes
    k = math.prod(module.kernel_size)
    if isinstance(module, _TRANSPOSED):
        return math.prod(inp) * (module.out_channels // module.groups) * k
    return math.prod(out) * (module.in_channels // module.groups) * k


class _LeafTracer(torch.fx.Tracer):
    """Keeps every conv, linear and X-volution module a leaf, so its forward hooks fire in the FX run."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        leaf = (*CONV_MODULES, *_TRANSPOSED, nn.Linear, *_SITE_CONTAINERS)
        return isinstance(m, leaf) or super().is_leaf_module(m, module_qualified_name)


class _FxRecorder(torch.fx.Interpreter):
    """Runs a traced graph and records the shapes of functional convolution calls."""

    def __init__(self, gm: torch.fx.GraphModule) -> None:
        super().__init__(gm)
        self.functional: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = []

    def run_node(self, n: torch.fx.Node) -> Any:
        out = super().run_node(n)
        if n.op == "call_function" and n.target in CONV_CALLS and isinstance(out, Tensor):
            x = n.args[0] if n.args else n.kwargs.get("input")
            x_shape = tuple(self.env[x].shape) if isinstance(x, torch.fx.Node) else ()
            self.functional.append((n.name, x_shape, tuple(out.shape)))
        return out


def _not_swappable(m: nn.Module) -> str:
    if torch.nn.utils.parametrize.is_parametrized(m):
        return "parametrized: its weight is computed by a parametrization that a swap would drop"
    if type(m).forward not in PLAIN_CONV_FORWARDS:
        # A forward that only computes its weight (weight standardization) becomes the site's conv branch.
        reason = conv_forward_reason(m)
        if reason:
            return reason
    if m._forward_pre_hooks or m._forward_hooks:
        return "hooked: the module has forward hooks (e.g. weight_norm) that a swap would drop"
    return ""


def analyze_model(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    kind: str | None = None,
    analysis: AnalysisMode = "auto",
    reference_size: Sequence[int] | None = None,
) -> ModelAnalysis:
    """Run ``model`` once (eval, no_grad) and describe every conv module: calls, shapes, strides, MACs.

    The model is left as it was: module training flags are restored and the
    hooks removed. ``analysis="hooks"`` skips the FX attempt; ``"fx"``
    requires the model to trace.
    """
    check_module("model", model)
    check_example_inputs(example_inputs)
    if analysis not in ("auto", "hooks", "fx"):
        raise InvalidArgumentError(f"analysis={analysis!r}: use 'auto', 'hooks' or 'fx'")
    kind = kind or detect_kind(model)
    if kind not in KINDS:
        raise InvalidArgumentError(f"unknown model kind {kind!r}; use one of {', '.join(KINDS)}")
    if example_inputs is None:
        example_inputs = default_example_inputs(model, kind)
    args = as_args(example_inputs)

    all_named = list(model.named_modules(remove_duplicate=False))
    inside: set[int] = set()  # convs that belong to an existing X-volution site
    for _, m in all_named:
        if isinstance(m, _SITE_CONTAINERS):
            inside.update(id(c) for c in m.modules() if c is not m)
    primary: dict[int, str] = {}
    aliases: dict[int, list[str]] = {}
    convs: dict[str, ConvInfo] = {}
    other: dict[str, str] = {}
    for name, m in all_named:
        if id(m) in primary:
            if name not in aliases[id(m)] and name != primary[id(m)]:
                aliases[id(m)].append(name)
            continue
        primary[id(m)], aliases[id(m)] = name, []
        if isinstance(m, CONV_MODULES) and id(m) not in inside and name:
            base = next(t.__name__ for t in CONV_MODULES if isinstance(m, t))
            convs[name] = ConvInfo(
                name=name, conv_type=base, class_name=type(m).__name__, geometry=conv_geometry(m),
                bias=m.bias is not None, params=sum(p.numel() for p in m.parameters(recurse=False)),
                not_swappable=_not_swappable(m),
            )
        elif name:
            other[name] = type(m).__name__
    id_of = {n: i for i, n in primary.items()}
    for info in convs.values():
        info.aliases = tuple(aliases[id_of[info.name]])

    calls: dict[str, list[tuple[tuple[int, ...], tuple[int, ...], int]]] = {n: [] for n in convs}
    first_input: dict[int, tuple[int, ...]] = {}
    macs = [0]

    def make_hook(name: str, m: nn.Module) -> Callable[..., None]:
        def hook(mod: nn.Module, a: tuple[Any, ...], kw: dict[str, Any], out: Any) -> None:
            x = a[0] if a else next(iter(kw.values()), None)
            if not isinstance(x, Tensor) or not isinstance(out, Tensor):
                return
            inp, o = tuple(x.shape), tuple(out.shape)
            if isinstance(mod, nn.Linear):
                macs[0] += math.prod(o) * mod.in_features
                return
            if isinstance(mod, _SITE_CONTAINERS):
                if isinstance(mod, XVolution):  # its main conv is functional; the other convs have hooks
                    macs[0] += math.prod(o) * (mod.in_channels // mod.groups) * math.prod(mod.kernel_size)
                return
            n_mac = _conv_macs(mod, inp, o)
            macs[0] += n_mac
            if isinstance(mod, CONV_MODULES) and not isinstance(mod, _TRANSPOSED):
                first_input.setdefault(len(mod.kernel_size), inp[2:])
                if name in calls:
                    calls[name].append((inp, o, n_mac))

        return hook

    path, note = "hooks", ""
    functional: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = []
    training = {m: m.training for _, m in all_named}
    handles = []
    try:
        unique: dict[int, nn.Module] = {id(m): m for _, m in all_named}
        for m in unique.values():
            if isinstance(m, (*CONV_MODULES, *_TRANSPOSED, nn.Linear, *_SITE_CONTAINERS)):
                handles.append(m.register_forward_hook(make_hook(primary[id(m)], m), with_kwargs=True))
        model.eval()
        with torch.no_grad():
            ran = False
            if analysis in ("auto", "fx"):
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        graph = _LeafTracer().trace(model)
                    path = "fx+hooks"
                    if any(n.op == "call_function" and n.target in CONV_CALLS for n in graph.nodes):
                        # Only then is the (slower) interpreter needed: it records the functional calls' shapes.
                        recorder = _FxRecorder(torch.fx.GraphModule(model, graph))
                        recorder.run(*args)
                        functional, ran = recorder.functional, True
                except Exception as err:  # any tracing failure falls back to plain hooks
                    if analysis == "fx":
                        raise SiteSelectionError(
                            f"analysis='fx' but the model does not trace or run under torch.fx: "
                            f"{type(err).__name__}: {err}; use analysis='auto' or 'hooks'"
                        ) from err
                    path, note = "hooks", f"fx trace failed ({type(err).__name__}), forward hooks used"
                    for lst in calls.values():
                        lst.clear()
                    first_input.clear()
                    macs[0] = 0
            if not ran:
                try:
                    model(*args)
                except Exception as err:
                    raise SiteSelectionError(
                        f"running the model on example inputs ({describe_inputs(args)}) failed: "
                        f"{type(err).__name__}: {err}. Pass example_inputs= (a Tensor, a list of images for "
                        "detection models, or a tuple of positional arguments) or kind="
                    ) from err
    finally:
        for h in handles:
            h.remove()
        for m, flag in training.items():
            m.training = flag

    refs: dict[int, tuple[int, ...]] = dict(first_input)
    for nd in list(refs) if kind != "detection" else ():  # detection models resize their input inside
        direct = next((a for a in args if isinstance(a, Tensor) and a.dim() == nd + 2), None)
        if direct is not None:
            refs[nd] = tuple(direct.shape[2:])
    if reference_size is not None:
        given = tuple(int(v) for v in reference_size)
        for nd in (1, 2, 3):
            refs[nd] = given[-nd:] if len(given) >= nd else refs.get(nd, ())
    for name, info in convs.items():
        info.analysis = path
        nd = info.ndim
        ref = refs.get(nd)
        for inp, out, n_mac in calls[name]:
            info.calls.append(_make_call(inp, out, n_mac, ref, nd))
    functional_names = []
    for fname, inp, out in functional:
        nd = len(out) - 2
        call = _make_call(inp, out, 0, refs.get(nd), nd)
        functional_names.append(f"{fname} (output stride {format_stride(call.output_stride)})")
    return ModelAnalysis(
        model=type(model).__name__, kind=kind, inputs=describe_inputs(args), convs=convs, total_macs=macs[0],
        total_params=sum(p.numel() for p in model.parameters()), reference_sizes=refs, path=path, note=note,
        functional_convs=functional_names, other_modules=other,
    )


def _make_call(
    inp: tuple[int, ...], out: tuple[int, ...], n_mac: int, ref: tuple[int, ...] | None, nd: int
) -> ConvCall:
    spatial_out = out[2:]
    if not ref or len(ref) != len(spatial_out) or any(o == 0 for o in spatial_out):
        return ConvCall(inp, out, n_mac)
    ratio = tuple(r / o for r, o in zip(ref, spatial_out, strict=True))
    temporal = None
    if nd == 3:
        temporal, spatial_ratio = nominal_stride(ratio[0]), ratio[1:]
    else:
        spatial_ratio = ratio
    axes = tuple(nominal_stride(r) for r in spatial_ratio)
    stride: Stride = axes[0] if len(set(axes)) == 1 else axes
    return ConvCall(inp, out, n_mac, stride, temporal, ratio)
