"""State and input checks: training flags kept, the modules that make fusion unsafe named, arguments
validated at the API boundary, fused models refused by xvolify, refusals listed once, the opset asked
for honoured, missing output directories refused, channels_last kept, and articles in messages.

Numbers are compared against a float64 eager run of the unfused model or onnxruntime on the file written.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import fx, nn

from tests.strategies import eager64 as _eager64
from tests.strategies import ort_run as _ort
from tests.strategies import randomize_bn, rel_err
from xvol_compiler import XVolution, fuse, fuse_onnx, fuse_with_report, xvolify
from xvol_compiler.cli import main
from xvol_compiler.fold import FoldError
from xvol_compiler.io import atomic_write_text, check_writable
from xvol_compiler.onnx_io import export_onnx, save_onnx
from xvol_compiler.sites import SiteSelectionError
from xvol_passes.fuse_fx import FusionError, fuse_graph

ArgumentErrors = (TypeError, ValueError)  # the package's ArgumentError is both


class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x))) + x


class Net(nn.Module):
    """stem, two stages (the second a Sequential of blocks, like torchvision's layer1), a pooled head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.layer1 = nn.Sequential(Block(8), Block(8))
        self.layer2 = nn.Sequential(nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer2(self.layer1(self.stem(x))).mean((2, 3)))


def _net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return randomize_bn(Net(), seed).eval()


X = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))


# --------------------------------------------------------------------------- training flags kept


def _flags(model: nn.Module) -> dict[str, bool]:
    return {name: m.training for name, m in model.named_modules()}


@pytest.mark.parametrize(("root", "layer1"), [(True, False), (False, True)])
def test_export_onnx_keeps_every_module_training_flag(tmp_path: Path, root: bool, layer1: bool) -> None:
    model = _net()
    model.train(root)
    model.layer1.train(layer1)
    model.layer1[1].bn.train(root)  # a third level that differs from its parent
    before = _flags(model)
    out = tmp_path / "m.onnx"
    export_onnx(model, out, (X,), dynamo=False)
    assert _flags(model) == before
    # The file computes the eval-mode model whatever the caller's flags were.
    assert rel_err(torch.from_numpy(_ort(out, X)), _eager64(model, X)) <= 1e-5


def test_export_onnx_keeps_flags_when_the_export_fails(tmp_path: Path) -> None:
    class Broken(Net):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("cannot run")

    model = Broken()
    model.train()
    model.layer1.eval()
    before = _flags(model)
    with pytest.raises(Exception, match="cannot run"):
        export_onnx(model, tmp_path / "m.onnx", (X,), dynamo=False)
    assert _flags(model) == before
    assert not (tmp_path / "m.onnx").exists()


def test_kept_training_flags_restores_each_module() -> None:
    from xvol_compiler.training_flags import kept_training_flags

    model = _net().train()
    model.layer1[0].eval()
    before = _flags(model)
    with pytest.raises(KeyError), kept_training_flags(model):
        model.eval()
        raise KeyError("inside")
    assert _flags(model) == before


def test_xvolify_and_fuse_keep_the_callers_flags() -> None:
    model = _net().train()
    model.layer1.eval()
    before = _flags(model)
    xvolify(model, sites="all", example_inputs=X)
    assert _flags(model) == before
    model.eval()
    fuse(model, example_inputs=(X,))
    assert all(not f for f in _flags(model).values())


# --------------------------------------------------------------------------- which flags block fusion


def test_fuse_symbolic_traced_eval_model() -> None:
    """symbolic_trace makes plain container modules (``layer1``, ``layer1.0``) that default to training
    mode; they compute the same in either mode, so the traced eval model fuses."""
    model = _net()
    gm = fx.symbolic_trace(model)
    containers = [n for n, m in gm.named_modules() if type(m) is nn.Module and m.training]
    assert containers, "the form under test: symbolic_trace created training-mode containers"
    fused, report = fuse_with_report(gm, example_inputs=(X,))
    assert report.count("conv+bn") == 4, str(report)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    assert rel_err(fused(X), _eager64(model, X)) <= 1e-5


def test_fuse_names_the_modules_in_training_mode() -> None:
    model = _net()
    model.layer1[1].bn.train()
    with pytest.raises(FusionError) as info:
        fuse(model, example_inputs=(X,))
    message = str(info.value)
    assert "layer1.1.bn (BatchNorm2d)" in message and "eval()" in message
    assert "(0)" not in message and "layer1.1," not in message  # its container is not listed


def test_fuse_refuses_training_dropout_and_stochastic_depth() -> None:
    from torchvision.ops import StochasticDepth

    class WithDrop(Net):
        def __init__(self) -> None:
            super().__init__()
            self.drop = nn.Dropout(0.5)
            self.depth = StochasticDepth(0.5, "row")

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.depth(self.drop(super().forward(x)))

    model = randomize_bn(WithDrop()).eval()
    model.drop.train()
    model.depth.train()
    with pytest.raises(FusionError) as info:
        fuse(model, example_inputs=(X,))
    assert "drop (Dropout)" in str(info.value) and "depth (StochasticDepth)" in str(info.value)
    model.eval()
    assert rel_err(fuse(model, example_inputs=(X,))(X), _eager64(model, X)) <= 1e-5


def test_fuse_model_in_training_mode_names_its_batchnorms() -> None:
    model = _net().train()
    with pytest.raises(FusionError, match=r"the model is in training mode.*stem\.1 \(BatchNorm2d\)"):
        fuse(model, example_inputs=(X,))


# --------------------------------------------------------------------------- arguments at the boundary


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"shift": 1.5}, "shift=1.5"),
        ({"shift": "2"}, "shift='2'"),
        ({"shift": 0}, "shift=0"),
        ({"shift": True}, "shift=True"),
        ({"extra_branches": "1x1"}, "extra_branches='1x1'"),
        ({"directional": "yes"}, "directional='yes'"),
        ({"inplace": 1}, "inplace=1"),
        ({"attention": "global", "qk_channels": 0}, "qk_channels=0"),
        ({"kind": "photo"}, "kind='photo'"),
        ({"example_inputs": np.zeros((1, 3, 16, 16), np.float32)}, "torch.from_numpy"),
    ],
)
def test_xvolify_names_the_bad_argument(kwargs: dict, needle: str) -> None:
    model = _net()
    state = copy.deepcopy(model.state_dict())
    kwargs = {"example_inputs": X, **kwargs}
    with pytest.raises(ArgumentErrors) as info:
        xvolify(model, sites="all", **kwargs)
    assert needle in str(info.value), str(info.value)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_extra_branches_string_message_lists_the_choices() -> None:
    with pytest.raises(ArgumentErrors, match=r"pass a sequence of branch names, e\.g\. \('1x1',\).*'identity'"):
        xvolify(_net(), sites="all", example_inputs=X, extra_branches="1x1")


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [({"shift": 1.5}, "shift=1.5"), ({"extra_branches": "bn"}, "extra_branches='bn'"),
     ({"directional": None}, "directional=None")],
)
def test_from_conv_names_the_bad_argument(kwargs: dict, needle: str) -> None:
    with pytest.raises(ArgumentErrors) as info:
        XVolution.from_conv(nn.Conv2d(4, 4, 3, padding=1), **kwargs)
    assert needle in str(info.value), str(info.value)


def _lazy_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.LazyConv2d(8, 3, padding=1), nn.LazyBatchNorm2d(), nn.ReLU(),
                         nn.LazyConv2d(8, 3, padding=1)).eval()


@pytest.mark.parametrize("entry", ["xvolify", "fuse", "export_onnx", "from_conv"])
def test_uninitialised_lazy_modules_say_run_a_forward_first(entry: str, tmp_path: Path) -> None:
    model = _lazy_net()
    calls = {
        "xvolify": lambda: xvolify(model, sites="all", example_inputs=X),
        "fuse": lambda: fuse(model, example_inputs=(X,)),
        "export_onnx": lambda: export_onnx(model, tmp_path / "m.onnx", (X,), dynamo=False),
        "from_conv": lambda: XVolution.from_conv(model[0]),
    }
    with pytest.raises(ArgumentErrors, match=r"uninitialised lazy parameters.*Run one forward pass"):
        calls[entry]()
    assert not (tmp_path / "m.onnx").exists()


def test_lazy_model_after_one_forward_xvolifies_and_fuses() -> None:
    model = _lazy_net()
    with torch.no_grad():
        model(X)
    randomize_bn(model)
    xm = xvolify(model, sites="all", example_inputs=X).eval()
    assert xm.xvol_report.selected_names == ["0", "3"]
    reference = _eager64(model, X)
    assert rel_err(xm(X), reference) <= 1e-6
    assert rel_err(fuse(xm, example_inputs=(X,))(X), reference) <= 1e-5


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [({"rtol": "1e-4"}, "rtol='1e-4'"), ({"rtol": float("inf")}, "rtol=inf (float): use None or a finite number"),
     ({"atol": float("nan")}, "atol=nan"),
     ({"verify": "no"}, "verify='no'"), ({"inplace": 1}, "inplace=1"),
     ({"example_inputs": np.zeros((1, 3, 16, 16), np.float32)}, "example_inputs=")],
)
def test_fuse_names_the_bad_argument(kwargs: dict, needle: str) -> None:
    kwargs = {"example_inputs": (X,), **kwargs}
    with pytest.raises(ArgumentErrors) as info:
        fuse(_net(), **kwargs)
    assert needle in str(info.value), str(info.value)


def test_fuse_and_fuse_graph_refuse_what_is_not_a_module() -> None:
    with pytest.raises(ArgumentErrors, match=r"model=.*torch\.nn\.Module"):
        fuse(lambda x: x, example_inputs=(X,))  # type: ignore[arg-type]
    with pytest.raises(ArgumentErrors, match=r"fuse_graph takes a torch\.fx\.GraphModule"):
        fuse_graph(_net())  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def small_onnx() -> onnx.ModelProto:
    return export_onnx(_net(), None, (X,), dynamo=False)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [({"rtol": float("nan")}, "rtol=nan"), ({"verify": "yes"}, "verify='yes'"),
     ({"interleave": "zip"}, "interleave='zip'"), ({"output_path": 3}, "output_path=3"),
     ({"force": None}, "force=None")],
)
def test_fuse_onnx_names_the_bad_argument(small_onnx: onnx.ModelProto, kwargs: dict, needle: str) -> None:
    with pytest.raises(ArgumentErrors) as info:
        fuse_onnx(small_onnx, **kwargs)
    assert needle in str(info.value), str(info.value)


def test_fuse_onnx_given_a_torch_model_says_export_first() -> None:
    with pytest.raises(ArgumentErrors, match=r"model_or_path=Net.*export_onnx"):
        fuse_onnx(_net())  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [({"opset": "13"}, "opset='13'"), ({"opset": 3}, "opset=3"), ({"dynamo": "yes"}, "dynamo='yes'"),
     ({"input_names": "x"}, "input_names='x'"), ({"external_data": 0}, "external_data=0")],
)
def test_export_onnx_names_the_bad_argument(tmp_path: Path, kwargs: dict, needle: str) -> None:
    with pytest.raises(ArgumentErrors) as info:
        export_onnx(_net(), tmp_path / "m.onnx", (X,), **kwargs)
    assert needle in str(info.value), str(info.value)
    assert not (tmp_path / "m.onnx").exists()


def test_export_onnx_refuses_what_is_not_a_module(tmp_path: Path) -> None:
    with pytest.raises(ArgumentErrors, match=r"model=.*torch\.nn\.Module"):
        export_onnx("resnet18", tmp_path / "m.onnx", (X,))


# --------------------------------------------------------------------------- fused models, reports, opsets


def _xvolified() -> nn.Module:
    model = _net()
    xm = xvolify(model, sites=["layer1.0.conv", "layer1.1.conv"], example_inputs=X)
    randomize_bn(xm, 3)
    return xm.eval()


def test_xvolify_refuses_an_fx_fused_model() -> None:
    fused = fuse(_xvolified(), example_inputs=(X,))
    with pytest.raises(SiteSelectionError, match=r"Net is already fused \(it carries xvol_fusion_report\).*unfused"):
        xvolify(fused, sites="all", example_inputs=X)


def test_xvolify_refuses_a_fused_graph_and_deploy_modules() -> None:
    xm = _xvolified()
    gm, _ = fuse_graph(fx.symbolic_trace(copy.deepcopy(xm)), (X,))
    with pytest.raises(SiteSelectionError, match=r"already fused \(its graph feeds interleave_groups"):
        xvolify(gm, sites="all", example_inputs=X)
    deployed = copy.deepcopy(xm)
    deployed.layer1[0].conv = deployed.layer1[0].conv.fuse()
    assert rel_err(deployed(X), _eager64(xm, X)) <= 1e-5  # the module-level deploy form under test
    with pytest.raises(SiteSelectionError, match=r"already fused \(it holds the deploy form of a site at layer1\.0"):
        xvolify(deployed, sites="all", example_inputs=X)


class SharedConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1, self.bn2 = nn.BatchNorm2d(4), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn1(self.conv(x)) + self.bn2(self.conv(x))


class TwoConsumers(SharedConv):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn1(y) * self.bn2(y)


@pytest.mark.parametrize("cls", [SharedConv, TwoConsumers])
def test_a_refusal_is_listed_once(cls: type[nn.Module]) -> None:
    model = randomize_bn(cls()).eval()
    fused, report = fuse_with_report(model, example_inputs=(X,))
    assert [(o.name, o.kind) for o in report.refused] == [("conv", "conv+bn")], str(report)
    assert str(report).count("refused") == 2  # one table row and the summary
    assert rel_err(fused(X), _eager64(model, X)) <= 1e-6


def test_export_onnx_refuses_an_opset_it_cannot_honour(tmp_path: Path) -> None:
    from xvol_compiler.onnx_io import OpsetError

    out = tmp_path / "m.onnx"
    with pytest.raises(OpsetError, match=r"opset 13 was asked for.*produced opset 18.*nothing was written"):
        export_onnx(_net(), out, (X,), opset=13, dynamo=True)
    assert not out.exists()
    proto = export_onnx(_net(), out, (X,), opset=13, dynamo=False)
    assert [o.version for o in onnx.load(str(out)).opset_import if o.domain in ("", "ai.onnx")] == [13]
    assert rel_err(torch.from_numpy(_ort(proto, X)), _eager64(_net(), X)) <= 1e-5


def test_cli_export_says_which_opset_it_wrote(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    small = ["--num-classes", "10", "--input-size", "32"]
    out = tmp_path / "r18.onnx"
    assert main(["export", "resnet18", *small, "--opset", "13", "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert "--opset 13" in err and "produced opset 18" in err and "--exporter torchscript" in err, err
    assert "wrote" not in err and not out.exists()
    assert main(["export", "resnet18", *small, "--opset", "13", "--exporter", "torchscript", "-o", str(out)]) == 0
    assert "ONNX opset 13, torchscript exporter" in capsys.readouterr().out
    assert [o.version for o in onnx.load(str(out)).opset_import if o.domain in ("", "ai.onnx")] == [13]


def test_missing_output_directories_are_refused_by_every_writer(tmp_path: Path,
                                                                small_onnx: onnx.ModelProto) -> None:
    """One rule for every writer: a missing directory is refused (naming it), never created."""
    model = _net()
    exported = tmp_path / "m.onnx"
    proto = export_onnx(model, exported, (X,), dynamo=False)
    assert rel_err(torch.from_numpy(_ort(exported, X)), _eager64(model, X)) <= 1e-5
    missing = "does not exist: create it first"
    with pytest.raises(ValueError, match=missing):
        export_onnx(model, tmp_path / "a" / "b" / "m.onnx", (X,), dynamo=False)
    with pytest.raises(ValueError, match=missing):
        fuse_onnx(proto, output_path=tmp_path / "c" / "fused.onnx")
    with pytest.raises(ValueError, match=missing):
        save_onnx(small_onnx, tmp_path / "d" / "s.onnx")
    with pytest.raises(ValueError, match=missing):
        atomic_write_text(tmp_path / "e" / "f" / "r.txt", "report\n")
    assert main(["fuse-onnx", str(exported), "-o", str(tmp_path / "g" / "h.onnx"), "--report",
                 str(tmp_path / "r.json")]) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_a_parent_that_is_a_file_is_refused_before_any_work(tmp_path: Path) -> None:
    class MustNotRun(Net):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise AssertionError("the model ran before the output path was checked")

    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match=r"cannot write .*m\.onnx: .*file is a file, not a directory"):
        export_onnx(MustNotRun(), blocker / "sub" / "m.onnx", (X,), dynamo=False)
    with pytest.raises(ValueError, match=r"is not a directory|is a file, not a directory"):
        check_writable(blocker / "r.txt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


@pytest.mark.parametrize("site", [False, True])
def test_fused_convs_keep_channels_last(site: bool) -> None:
    model = _xvolified() if site else _net()
    model = model.to(memory_format=torch.channels_last)
    x = X.to(memory_format=torch.channels_last)
    fused, report = fuse_with_report(model, example_inputs=(x,))
    assert report.count("x-volution" if site else "conv+bn") >= 2, str(report)
    convs = [m for m in fused.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    assert not any(c.weight.is_contiguous() for c in convs if c.kernel_size != (1, 1))
    assert rel_err(fused(x), _eager64(model, X)) <= 1e-5


def test_contiguous_weights_stay_contiguous() -> None:
    fused = fuse(_net(), example_inputs=(X,))
    assert all(m.weight.is_contiguous() for m in fused.modules() if isinstance(m, nn.Conv2d))


# --------------------------------------------------------------------------- articles in messages


def test_identity_branch_message_says_an_identity() -> None:
    with pytest.raises(FoldError, match="cannot add an identity branch"):
        XVolution.from_conv(nn.Conv2d(4, 4, 3, padding=0), extra_branches=("identity",))


def test_site_name_of_another_module_type_uses_an() -> None:
    with pytest.raises(SiteSelectionError, match=r"'layer1\.0\.bn' is a BatchNorm2d.*'stem\.2' is a ReLU"):
        xvolify(_net(), sites=["layer1.0.bn", "stem.2"], example_inputs=X)

    class WithPool(Net):
        def __init__(self) -> None:
            super().__init__()
            self.pool = nn.AdaptiveAvgPool2d(1)

    with pytest.raises(SiteSelectionError, match=r"'pool' is an AdaptiveAvgPool2d"):
        xvolify(WithPool(), sites=["pool"], example_inputs=X)


def test_with_article() -> None:
    from xvol_compiler.report import with_article

    words = ["identity", "1x1", "8-neighbour", "11x11", "Conv2d", "AdaptiveAvgPool2d", "edge", "reflect", "int"]
    assert [with_article(w) for w in words] == [
        "an identity", "a 1x1", "an 8-neighbour", "an 11x11", "a Conv2d", "an AdaptiveAvgPool2d", "an edge",
        "a reflect", "an int"]


def test_load_and_save_onnx_name_a_bad_argument(tmp_path: Path, small_onnx: onnx.ModelProto) -> None:
    from xvol_compiler.onnx_io import load_onnx

    with pytest.raises(ArgumentErrors, match=r"source=int: use an ONNX file path"):
        load_onnx(3)  # type: ignore[arg-type]
    with pytest.raises(ArgumentErrors, match=r"model=Net: save_onnx takes an onnx\.ModelProto"):
        save_onnx(_net(), tmp_path / "m.onnx")  # type: ignore[arg-type]
    with pytest.raises(ArgumentErrors, match=r"external_data='no'"):
        save_onnx(small_onnx, tmp_path / "m.onnx", external_data="no")  # type: ignore[arg-type]
    assert not (tmp_path / "m.onnx").exists()
