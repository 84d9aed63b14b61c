"""Pictures of graphs: the neighbourhood of one site before and after fusion, or a whole (small) graph.

Graphs are read into ``networkx.DiGraph`` values (one node per operation,
edges are data flow) from a ``torch.fx`` trace or an ONNX model, then drawn
with matplotlib in layers (topological generations, inputs at the top).
Each node carries ``label`` (what is drawn), ``category`` (its colour) and
``site`` (True for the operations that belong to the chosen site).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import networkx as nx
from torch import fx, nn

from xvol_compiler.errors import InvalidArgumentError
from xvol_compiler.files import OutputError, atomic_path, check_output

__all__ = [
    "draw_graphs",
    "fx_graph",
    "neighbourhood",
    "onnx_graph",
    "site_nodes",
    "site_panels",
    "whole_panel",
]

COLOURS = {
    "conv": "#6baed6",
    "norm": "#fdae6b",
    "pssa": "#c994c7",
    "merge": "#bdbdbd",
    "activation": "#a1d99b",
    "pool": "#fdd0a2",
    "io": "#ffffff",
    "other": "#f0f0f0",
}
_SUFFIX_FORMATS = (".png", ".svg", ".pdf")


def _category(op: str) -> str:
    o = op.lower()
    if "conv" in o or o in ("linear", "gemm", "matmul", "addmm"):
        return "conv"
    if "norm" in o:
        return "norm"
    if "pssa" in o or "interleave" in o or o in ("concat", "cat"):
        return "pssa"
    if o in ("add", "iadd", "sum", "sub", "mul", "div"):
        return "merge"
    if o in ("relu", "relu6", "silu", "gelu", "hardswish", "hardsigmoid", "sigmoid", "tanh", "clip", "softmax"):
        return "activation"
    if "pool" in o or o in ("mean", "adaptive_avg_pool2d", "flatten", "reshape", "view", "transpose", "permute"):
        return "pool"
    if o in ("input", "output", "placeholder"):
        return "io"
    return "other"


# ---------------------------------------------------------------------------
# Reading graphs
# ---------------------------------------------------------------------------


def _module_label(module: nn.Module) -> str:
    name = type(module).__name__
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        k = "x".join(map(str, module.kernel_size))
        extra = f" s{module.stride[0]}" if any(s != 1 for s in module.stride) else ""
        extra += f" g{module.groups}" if module.groups != 1 else ""
        return f"{name}\n{module.in_channels}->{module.out_channels} k{k}{extra}"
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return f"{name}\n{module.num_features}"
    if isinstance(module, nn.Linear):
        return f"Linear\n{module.in_features}->{module.out_features}"
    return name


def _fx_op(node: fx.Node, root: nn.Module) -> tuple[str, str]:
    """(operation name for the category, label text) of an FX node."""
    if node.op == "call_module":
        module = root.get_submodule(str(node.target))
        return type(module).__name__, _module_label(module)
    if node.op == "call_function":
        name = getattr(node.target, "__name__", str(node.target)).rsplit(".", 1)[-1]
        if name == "getitem":
            return "getitem", f"[{node.args[1]}]"
        weight = node.args[1] if len(node.args) > 1 else None
        if "conv" in name and isinstance(weight, fx.Node) and weight.op == "get_attr":
            try:
                shape = tuple(_fetch(root, str(weight.target)).shape)
            except AttributeError:
                return name, name
            groups = node.args[6] if len(node.args) > 6 else node.kwargs.get("groups", 1)
            label = f"{name}\n{shape[1] * groups}->{shape[0]} k{'x'.join(map(str, shape[2:]))}"
            return name, label + (f" g{groups}" if groups != 1 else "")
        return name, name
    if node.op == "call_method":
        return str(node.target), f".{node.target}()"
    return node.op, node.name


def _fetch(root: nn.Module, target: str) -> Any:
    parent, _, name = target.rpartition(".")
    return getattr(root.get_submodule(parent) if parent else root, name)


def _scopes(node: fx.Node) -> list[str]:
    stack = node.meta.get("nn_module_stack") or {}
    scopes = []
    for value in stack.values():
        path = value[0] if isinstance(value, tuple) else value
        scopes.append(str(path))
    return scopes


def fx_graph(model: nn.Module, *, leaf_modules: Sequence[type[nn.Module]] = ()) -> nx.DiGraph:
    """The data-flow graph of ``torch.fx.symbolic_trace(model)``, parameters (``get_attr``) left out.

    Modules of the types in ``leaf_modules`` stay one node each; other custom
    modules (``XVolution``, ``XVolutionDeploy``) are traced through, so their
    inner operations show. Raises ``InvalidArgumentError`` (a ``ValueError``) when the model does not trace.
    """
    leaves = tuple(leaf_modules)

    class Tracer(fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return isinstance(m, leaves) or super().is_leaf_module(m, qualname)

    try:
        graph = Tracer().trace(model)
    except Exception as err:  # tracing failures come in many types
        raise InvalidArgumentError(
            f"{type(model).__name__} does not trace with torch.fx ({type(err).__name__}: {err})") from err
    g = nx.DiGraph()
    for node in graph.nodes:
        if node.op == "get_attr":
            continue
        op, label = _fx_op(node, model)
        target = str(node.target) if node.op == "call_module" else ""
        g.add_node(node.name, op=op, label=label, category=_category(op if node.op != "placeholder" else "input"),
                   scopes=[*_scopes(node), target] if target else _scopes(node), target=target)
        for arg in node.all_input_nodes:
            if arg.op != "get_attr":
                g.add_edge(arg.name, node.name)
    return g


def onnx_graph(model: Any) -> nx.DiGraph:
    """The data-flow graph of an ONNX ``ModelProto`` (or a path to one); initializers and constants left out."""
    import onnx

    if isinstance(model, (str, os.PathLike)):
        from xvol_compiler.onnx_io import load_onnx

        model = load_onnx(model).model
    graph = model.graph
    initializers = {i.name for i in graph.initializer}
    producer: dict[str, str] = {}
    g = nx.DiGraph()
    for inp in graph.input:
        if inp.name not in initializers:
            g.add_node(f"input:{inp.name}", op="input", label=inp.name, category="io", scopes=[], params=[])
            producer[inp.name] = f"input:{inp.name}"
    for i, node in enumerate(graph.node):
        if node.op_type == "Constant":
            continue
        key = node.name or f"{node.op_type}_{i}"
        meta = {p.key: p.value for p in node.metadata_props}
        scopes: list[str] = []
        raw = meta.get("pkg.torch.onnx.name_scopes")
        if raw:
            scopes = [s.strip(" '\"") for s in raw.strip("[]").split(",")]
        params = [n for n in node.input if n in initializers]
        label = node.op_type
        if node.op_type == "Conv" and params:
            dims = next((list(t.dims) for t in graph.initializer if t.name == params[0]), None)
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            if dims:
                group = attrs.get("group", 1)
                label += f"\n{dims[1] * group}->{dims[0]} k{'x'.join(map(str, dims[2:]))}"
                label += f" g{group}" if group != 1 else ""
        g.add_node(key, op=node.op_type, label=label, category=_category(node.op_type), scopes=scopes, params=params)
        for name in node.input:
            if name in producer:
                g.add_edge(producer[name], key)
        for name in node.output:
            producer[name] = key
    for out in graph.output:
        if out.name in producer:
            g.add_node(f"output:{out.name}", op="output", label=out.name, category="io", scopes=[], params=[])
            g.add_edge(producer[out.name], f"output:{out.name}")
    return g


# ---------------------------------------------------------------------------
# Choosing what to draw
# ---------------------------------------------------------------------------


def site_nodes(g: nx.DiGraph, site: str) -> list[str]:
    """Nodes that belong to module ``site``: by module scope, call target or parameter name."""
    prefix = site + "."
    found = []
    for key, data in g.nodes(data=True):
        scopes = data.get("scopes") or []
        params = data.get("params") or []
        if any(s == site or s.startswith(prefix) for s in scopes) or any(p.startswith(prefix) for p in params):
            found.append(key)
    return found


def neighbourhood(g: nx.DiGraph, nodes: Sequence[str], hops: int = 2) -> nx.DiGraph:
    """The subgraph of ``nodes`` and everything within ``hops`` edges of them (either direction)."""
    keep = set(nodes)
    frontier = set(nodes)
    for _ in range(hops):
        nxt: set[str] = set()
        for n in frontier:
            nxt.update(g.predecessors(n))
            nxt.update(g.successors(n))
        frontier = nxt - keep
        keep |= nxt
    sub = g.subgraph(keep).copy()
    marked = set(nodes)
    for n in sub.nodes:
        sub.nodes[n]["site"] = n in marked
    return sub


# ---------------------------------------------------------------------------
# Drawing
# ---------------------------------------------------------------------------


MAX_ROWS = 24  # a graph deeper than this is drawn in several columns, top to bottom, left to right


def _layers(g: nx.DiGraph) -> list[list[str]]:
    return [list(layer) for layer in nx.topological_generations(g)] if len(g) else []


def _layout(g: nx.DiGraph) -> dict[str, tuple[float, float]]:
    """Layers by topological generation; within a layer, nodes ordered by their predecessors' mean x.

    More than :data:`MAX_ROWS` layers wrap into further columns (a long chain reads like a page of text).
    """
    layers = _layers(g)
    span = max((len(layer) for layer in layers), default=1) + 1.5
    pos: dict[str, tuple[float, float]] = {}
    for depth, layer in enumerate(layers):
        column, row = divmod(depth, MAX_ROWS)

        def key(n: str) -> tuple[float, str]:
            xs = [pos[p][0] for p in g.predecessors(n) if p in pos]
            return (sum(xs) / len(xs) if xs else 0.0, n)

        ordered = sorted(layer, key=key)
        for i, n in enumerate(ordered):
            pos[n] = (column * span + i - (len(ordered) - 1) / 2, -row)
    return pos


def _extent(g: nx.DiGraph) -> tuple[float, float]:
    """(width, height) in layout units."""
    layers = _layers(g) or [[]]
    columns = -(-len(layers) // MAX_ROWS)
    widest = max(len(layer) for layer in layers)
    return columns * (widest + 1.5), min(len(layers), MAX_ROWS)


def _draw_one(ax: Any, g: nx.DiGraph, title: str) -> None:
    pos = _layout(g)
    colours = [COLOURS.get(g.nodes[n].get("category", "other"), COLOURS["other"]) for n in g.nodes]
    edges = ["#d62728" if g.nodes[n].get("site") else "#555555" for n in g.nodes]
    widths = [2.5 if g.nodes[n].get("site") else 0.8 for n in g.nodes]
    nx.draw_networkx_edges(g, pos, ax=ax, arrows=True, arrowsize=10, edge_color="#888888", width=0.8,
                           node_size=2200)
    nx.draw_networkx_nodes(g, pos, ax=ax, node_color=colours, edgecolors=edges, linewidths=widths,
                           node_size=2200, node_shape="s")
    labels = {n: g.nodes[n].get("label", n) for n in g.nodes}
    nx.draw_networkx_labels(g, pos, labels, ax=ax, font_size=6)
    ax.set_title(title, fontsize=9)
    ax.axis("off")
    if pos:
        xs = [p[0] for p in pos.values()]
        ys = [p[1] for p in pos.values()]
        ax.set_xlim(min(xs) - 0.8, max(xs) + 0.8)
        ax.set_ylim(min(ys) - 0.8, max(ys) + 0.8)


def draw_graphs(
    panels: Sequence[tuple[str, nx.DiGraph]], path: str | os.PathLike[str], *, title: str = "", force: bool = False,
) -> Path:
    """Draw the graphs side by side into a PNG, SVG or PDF (by suffix), written atomically; return the path."""
    path = Path(path)
    if path.suffix.lower() not in _SUFFIX_FORMATS:
        raise OutputError(f"picture file {path} must end in {', '.join(_SUFFIX_FORMATS)}")
    check_output(path, force=force)  # before drawing, which takes a while for large graphs
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    widths, heights = [], []
    for _, g in panels:
        w, h = _extent(g)
        widths.append(max(3.0, 1.1 * w))
        heights.append(max(3.0, 0.85 * h))
    fig, axes = plt.subplots(1, len(panels), figsize=(sum(widths), max(heights) + 0.8),
                             gridspec_kw={"width_ratios": widths}, squeeze=False)
    for ax, (name, g) in zip(axes[0], panels, strict=True):
        _draw_one(ax, g, name)
    used = {g.nodes[n].get("category", "other") for _, g in panels for n in g.nodes}
    handles = [Patch(facecolor=COLOURS[c], edgecolor="#555555", label=c) for c in COLOURS if c in used]
    handles.append(Patch(facecolor="white", edgecolor="#d62728", linewidth=2, label="site"))
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 2 * len(panels) + 2), fontsize=7,
               frameon=False)
    if title:
        import textwrap

        fig.suptitle(textwrap.fill(title, max(30, int(12 * sum(widths)))), fontsize=10)
    fig.tight_layout(rect=(0, 0.04, 1, 0.97))
    try:
        with atomic_path(path, force=force) as tmp:
            fig.savefig(tmp, format=path.suffix.lower().lstrip("."), dpi=150)
    finally:
        plt.close(fig)
    return path


def _with_feeding_transforms(g: nx.DiGraph, nodes: Sequence[str]) -> list[str]:
    """``nodes`` plus the transform ops (PSSA, interleave / concat) that feed them and only them.

    A fused graph computes a site's transform outside the site's module
    scope; those ops belong to the site in the picture.
    """
    found = list(nodes)
    marked = set(nodes)
    frontier = list(nodes)
    while frontier:
        n = frontier.pop()
        for p in g.predecessors(n):
            if p in marked or g.nodes[p].get("category") != "pssa":
                continue
            if all(s in marked for s in g.successors(p)):
                marked.add(p)
                found.append(p)
                frontier.append(p)
    return found


def site_panels(
    before: Callable[[], nx.DiGraph], after: Callable[[], nx.DiGraph], site: str, hops: int = 2,
) -> list[tuple[str, nx.DiGraph]]:
    """Before / after neighbourhoods of ``site``; ``InvalidArgumentError`` (a ``ValueError``) when it is not found."""
    panels = []
    for name, make in (("before fusion", before), ("after fusion", after)):
        g = make()
        nodes = site_nodes(g, site)
        if not nodes:
            raise InvalidArgumentError(f"no operation of site {site!r} in the {name.split()[0]} graph")
        nodes = _with_feeding_transforms(g, nodes)
        panels.append((f"{site}\n{name}: {len(nodes)} op(s)", neighbourhood(g, nodes, hops)))
    return panels


def whole_panel(g: nx.DiGraph, title: str, max_nodes: int = 400) -> tuple[str, nx.DiGraph]:
    """A whole graph as one panel; refuses graphs too large to read."""
    if len(g) > max_nodes:
        raise InvalidArgumentError(f"the graph has {len(g)} operations (> {max_nodes}): draw one site instead (--site)")
    for n in g.nodes:
        g.nodes[n].setdefault("site", False)
    return title, g
