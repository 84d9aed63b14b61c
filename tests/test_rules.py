"""Every rule on hand-built views: a fused case checked against the literal math, and each refusal reason.

The views are networkx graphs built here node by node (``NodeInfo``), with no torch.fx or ONNX graph behind
them; the rules run through ``ViewAdapter``, which applies a rewrite to the view alone.
"""

from __future__ import annotations

import networkx as nx
import pytest
import torch
import torch.nn.functional as F

from xvol_compiler.fold import BatchNormParams, Branch, ConvGeometry
from xvol_compiler.rules import (
    RULES,
    NodeInfo,
    RuleSet,
    UnknownRuleError,
    ViewAdapter,
    add_node,
    node_info,
    run_rules,
)

C = 4


def _conv(inputs: tuple[str, ...], out: int = C, k: int = 3, groups: int = 1, bias: bool = True) -> Branch:
    torch.manual_seed(len(inputs) + out + k)
    channels = tuple(C for _ in inputs)
    geometry = ConvGeometry(sum(channels), out, (k, k), (1, 1), (k // 2, k // 2), (1, 1), groups)
    weight = torch.randn(out, sum(channels) // groups, k, k, dtype=torch.float64)
    return Branch(inputs, channels, geometry, weight, torch.randn(out, dtype=torch.float64) if bias else None)


def _bn(channels: int = C) -> BatchNormParams:
    g = torch.Generator().manual_seed(1)
    return BatchNormParams(torch.randn(channels, generator=g, dtype=torch.float64),
                           torch.rand(channels, generator=g, dtype=torch.float64) + 0.5,
                           torch.randn(channels, generator=g, dtype=torch.float64),
                           torch.randn(channels, generator=g, dtype=torch.float64), 1e-5)


def _view(nodes: dict[str, NodeInfo], edges: list[tuple[str, str]]) -> nx.DiGraph:
    view = nx.DiGraph()
    for key, info in nodes.items():
        add_node(view, key, info)
    view.add_edges_from(edges)
    return view


def _run(view: nx.DiGraph, **kwargs: object) -> tuple[list[tuple[str, str, str]], nx.DiGraph]:
    log = run_rules(ViewAdapter(view), **kwargs)  # type: ignore[arg-type]
    return [(o.kind, o.status, o.reason) for o in log.outcomes()], view


def _fused_branch(view: nx.DiGraph) -> Branch:
    (key,) = [k for k in view.nodes if isinstance(k, tuple) and k[0] == "fused"]
    branch = node_info(view, key).branch
    assert branch is not None
    return branch


def _apply(branch: Branch, x: dict[str, torch.Tensor]) -> torch.Tensor:
    """The literal conv of a branch over its inputs (interleaved per group when several)."""
    parts = [x[k] for k in branch.inputs]
    g = branch.geometry
    if len(parts) > 1:
        chunks = [p.chunk(g.groups, dim=1) for p in parts]
        inp = torch.cat([c for group in zip(*chunks, strict=True) for c in group], dim=1)
    else:
        inp = parts[0]
    return F.conv2d(inp, branch.weight, branch.bias, g.stride, g.padding, g.dilation, g.groups)


def _bn_apply(x: torch.Tensor, bn: BatchNormParams) -> torch.Tensor:
    return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)


X = {"x": torch.randn(2, C, 6, 6, dtype=torch.float64)}


# ------------------------------------------------------------------------------------------------ conv+bn


def test_conv_bn_folds_to_the_literal_batch_norm_of_the_conv() -> None:
    conv, bn = _conv(("x",)), _bn()
    outcomes, view = _run(_view({"x": NodeInfo("input", "x"), "conv": NodeInfo("conv", "conv", branch=conv),
                                 "bn": NodeInfo("bn", "bn", bn=bn)}, [("x", "conv"), ("conv", "bn")]))
    assert outcomes == [("conv+bn", "fused", "")]
    torch.testing.assert_close(_apply(_fused_branch(view), X), _bn_apply(_apply(conv, X), bn))


def test_conv_bn_is_refused_when_the_conv_output_has_another_consumer() -> None:
    shared = NodeInfo("conv", "conv", users=2, branch=_conv(("x",)))
    outcomes, _ = _run(_view({"x": NodeInfo("input", "x"), "conv": shared, "bn": NodeInfo("bn", "bn", bn=_bn())},
                             [("x", "conv"), ("conv", "bn")]))
    assert [(k, s) for k, s, _ in outcomes] == [("conv+bn", "refused")]
    assert "consumer" in outcomes[0][2] or "used" in outcomes[0][2], outcomes


@pytest.mark.parametrize("where", ["conv", "bn"])
def test_conv_bn_is_refused_with_the_reason_the_adapter_knows(where: str) -> None:
    nodes = {"x": NodeInfo("input", "x"), "conv": NodeInfo("conv", "conv", branch=_conv(("x",))),
             "bn": NodeInfo("bn", "bn", bn=_bn())}
    nodes[where] = NodeInfo(nodes[where].kind, where, refusal=f"{where} is called twice",
                            branch=nodes[where].branch, bn=nodes[where].bn)
    outcomes, _ = _run(_view(nodes, [("x", "conv"), ("conv", "bn")]))
    assert outcomes == [("conv+bn", "refused", f"{where} is called twice")]


def test_conv_bn_is_refused_when_the_weights_are_not_constants() -> None:
    outcomes, _ = _run(_view({"x": NodeInfo("input", "x"), "conv": NodeInfo("conv", "conv", branch=None),
                              "bn": NodeInfo("bn", "bn", bn=_bn())}, [("x", "conv"), ("conv", "bn")]))
    assert [(k, s) for k, s, _ in outcomes] == [("conv+bn", "refused")]
    assert outcomes[0][2]


# ---------------------------------------------------------------------------------- sums of branches


def _sum_view(a: Branch, b: Branch, extra: dict[str, NodeInfo] | None = None,
              edges: list[tuple[str, str]] | None = None) -> nx.DiGraph:
    nodes = {"x": NodeInfo("input", "x"), **(extra or {}), "a": NodeInfo("conv", "a", branch=a),
             "b": NodeInfo("conv", "b", branch=b), "add": NodeInfo("add", "add")}
    return _view(nodes, [*(edges or []), *((i, "a") for i in a.inputs), *((i, "b") for i in b.inputs),
                         ("a", "add"), ("b", "add")])


def test_branch_sum_adds_the_kernels() -> None:
    a, b = _conv(("x",)), _conv(("x",), k=1)
    outcomes, view = _run(_sum_view(a, b))
    assert outcomes == [("branch-sum", "fused", "")]
    torch.testing.assert_close(_apply(_fused_branch(view), X), _apply(a, X) + _apply(b, X))


def test_branch_sum_is_refused_when_a_branch_has_another_consumer() -> None:
    a, b = _conv(("x",)), _conv(("x",))
    view = _sum_view(a, b)
    view.nodes["b"]["info"] = NodeInfo("conv", "b", users=2, branch=b)
    outcomes, _ = _run(view)
    assert [(k, s) for k, s, _ in outcomes] == [("branch-sum", "refused")]


def test_an_x_volution_site_becomes_one_conv_over_x_and_its_transform() -> None:
    a, b = _conv(("x",)), _conv(("t",))
    view = _sum_view(a, b, {"t": NodeInfo("pssa", "t")}, [("x", "t")])
    outcomes, view = _run(view)
    assert outcomes == [("x-volution", "fused", "")]
    x = {**X, "t": torch.randn(2, C, 6, 6, dtype=torch.float64)}
    fused = _fused_branch(view)
    assert fused.inputs == ("x", "t")
    torch.testing.assert_close(_apply(fused, x), _apply(a, x) + _apply(b, x))


def test_a_site_through_softmax_is_refused_as_an_x_volution_site() -> None:
    a, b = _conv(("x",)), _conv(("s",))
    view = _sum_view(a, b, {"s": NodeInfo("softmax", "s")}, [("x", "s")])
    outcomes, _ = _run(view)
    assert [(k, s) for k, s, _ in outcomes] == [("x-volution", "refused")]
    assert "global attention" in outcomes[0][2]


def test_unrelated_tensors_are_left_alone_silently() -> None:
    a, b = _conv(("x",)), _conv(("y",))
    view = _sum_view(a, b, {"y": NodeInfo("input", "y")})
    outcomes, _ = _run(view)
    assert outcomes == []


def test_identity_branch_adds_the_identity_kernel() -> None:
    a = _conv(("x",))
    view = _view({"x": NodeInfo("input", "x"), "a": NodeInfo("conv", "a", branch=a), "add": NodeInfo("add", "add")},
                 [("x", "a"), ("a", "add"), ("x", "add")])
    outcomes, view = _run(view)
    assert outcomes == [("identity-branch", "fused", "")]
    torch.testing.assert_close(_apply(_fused_branch(view), X), _apply(a, X) + X["x"])


def test_identity_branch_is_refused_when_the_channels_differ() -> None:
    a = _conv(("x",), out=2 * C)
    view = _view({"x": NodeInfo("input", "x"), "a": NodeInfo("conv", "a", branch=a), "add": NodeInfo("add", "add")},
                 [("x", "a"), ("a", "add"), ("x", "add")])
    outcomes, _ = _run(view)
    assert [(k, s) for k, s, _ in outcomes] == [("identity-branch", "refused")]


def test_bn_branch_adds_the_batch_norm_as_a_centre_kernel() -> None:
    a, bn = _conv(("x",)), _bn()
    view = _view({"x": NodeInfo("input", "x"), "a": NodeInfo("conv", "a", branch=a), "bn": NodeInfo("bn", "bn", bn=bn),
                  "add": NodeInfo("add", "add")}, [("x", "a"), ("x", "bn"), ("a", "add"), ("bn", "add")])
    outcomes, view = _run(view)
    assert outcomes == [("branch-sum", "fused", "")]  # the bn-branch rule reports as a branch sum
    torch.testing.assert_close(_apply(_fused_branch(view), X), _apply(a, X) + _bn_apply(X["x"], bn))


def test_bn_branch_is_refused_when_the_batch_norm_cannot_fold() -> None:
    a = _conv(("x",))
    view = _view({"x": NodeInfo("input", "x"), "a": NodeInfo("conv", "a", branch=a),
                  "bn": NodeInfo("bn", "bn", bn=None, refusal="bn is in training mode"),
                  "add": NodeInfo("add", "add")}, [("x", "a"), ("x", "bn"), ("a", "add"), ("bn", "add")])
    outcomes, _ = _run(view)
    assert ("branch-sum", "refused", "bn is in training mode") in outcomes


# ---------------------------------------------------------------------------------------- the rule set


def test_a_skipped_rule_does_not_run_and_an_unknown_name_is_an_error() -> None:
    view = _view({"x": NodeInfo("input", "x"), "conv": NodeInfo("conv", "conv", branch=_conv(("x",))),
                  "bn": NodeInfo("bn", "bn", bn=_bn())}, [("x", "conv"), ("conv", "bn")])
    outcomes, _ = _run(view, skip=("conv+bn",))
    assert outcomes == []
    with pytest.raises(UnknownRuleError, match="conv\\+bn"):
        RuleSet.of(skip=("conv-bn",))
    assert [r.name for r in RULES] == ["conv+bn", "x-volution", "branch-sum", "bn-branch", "identity-branch"]


@pytest.mark.parametrize("graph", [False, True])
def test_fuse_skip_leaves_the_rule_out_in_both_forms(graph: bool) -> None:
    """fuse(skip=("conv+bn",)) keeps every BatchNorm; without skip none is left (module and graph form)."""
    import torch
    from torch import nn

    from xvol_compiler import fuse

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    with torch.no_grad():
        model[1].running_mean.normal_()
        model[1].running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 3, 8, 8)

    def batch_norms(m: nn.Module) -> int:
        return sum(isinstance(c, nn.BatchNorm2d) for c in m.modules())

    kept = fuse(model, example_inputs=x, skip=("conv+bn",), graph=graph)
    folded = fuse(model, example_inputs=x, graph=graph)
    assert batch_norms(kept) == 1 and batch_norms(folded) == 0
    with torch.no_grad():
        torch.testing.assert_close(kept(x), model(x))
        torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)
