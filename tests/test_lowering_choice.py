"""How a site's lowering is chosen: ``auto`` is a deterministic rule (no timing, the same structure every
time), ``measure`` times candidates and keeps them in a persistent cache file; onnxruntime sessions do not
spin."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import onnx
import pytest
import torch
from torch import nn

from tests.test_lowering import _depthwise_model, _export_site
from xvol_compiler import XVolution, fuse, xvolify
from xvol_compiler.cli import main
from xvol_compiler.fold import Branch, ConvGeometry
from xvol_compiler.lowering_table import RULES, SITE_CLASSES, rule_entry, shape_class, site_class
from xvol_compiler.verify import onnx_session
from xvol_passes import lower
from xvol_passes.fuse_fx import fuse_with_report
from xvol_passes.fuse_onnx import fuse_onnx
from xvol_passes.lower import (
    BACKENDS,
    CACHE_ENV,
    LoweringCacheError,
    choose_lowering,
    lowering_cache_path,
    using_lowering_cache,
)
from xvol_passes.onnx_site import one_site_model, one_site_session

SPINNING = ("session.intra_op.allow_spinning", "session.inter_op.allow_spinning")


@pytest.fixture(autouse=True)
def _no_user_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No test here reads or writes the user's cache folder."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "env-cache.json"))


def _branch(site: str, *, dilation: tuple[int, int] = (1, 1), channels: int = 4, kernel: int = 3) -> Branch:
    """A merged [x, T(x)] site (factor 2) of the given class, ``kernel`` x ``kernel`` (3x3 by default)."""
    groups = {"depthwise": channels, "dense": 1, "grouped": 2}[site]
    out = 6 if site != "depthwise" else channels
    pad = tuple(d * (kernel // 2) for d in dilation)
    geometry = ConvGeometry(2 * channels, out, (kernel, kernel), (1, 1), pad, dilation, groups)
    weight = torch.randn(out, 2 * channels // groups, kernel, kernel, generator=torch.Generator().manual_seed(0))
    return Branch(("x", "t"), (channels, channels), geometry, weight, torch.zeros(out))


def _no_timing(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("lowering='auto' must not time anything")

    for name in ("_time_rounds", "_measure_eager", "_measure_onnxruntime"):
        monkeypatch.setattr(lower, name, refuse)
    monkeypatch.setattr("xvol_passes.onnx_site.one_site_session", refuse)


# --------------------------------------------------------------------------- the rule


EXPECTED = {("depthwise", True): "spatial", ("depthwise", False): "split",
            ("dense", True): "channel", ("dense", False): "channel",
            ("grouped", True): "channel", ("grouped", False): "channel"}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("site", "single_conv"), list(EXPECTED))
@pytest.mark.parametrize("shape", [(2, 4, 9, 9), (1, 4, 9, 9), ("batch", 4, 9, 9), None])
def test_rule_choice_per_site_class_and_backend(backend: str, site: str, single_conv: bool, shape: tuple | None,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    _no_timing(monkeypatch)
    branch = _branch(site)
    assert site_class(branch) == site
    choice = choose_lowering(branch, backend=backend, single_conv=single_conv, input_shape=shape)
    # grouped sites: two convs beat the interleave in onnxruntime (lowering_table [G]); under compile the
    # depth-2 Conv3d is the fastest single conv and split the fastest when allowed ([GC])
    expected = {("onnxruntime", "grouped", False): "split", ("compile", "grouped", False): "split",
                ("compile", "grouped", True): "stack"}.get((backend, site, single_conv))
    assert choice.lowering == (expected or EXPECTED[site, single_conv])
    assert choice.reason.startswith("rule ") and f"({backend}, {site} site)" in choice.reason
    assert choice.times_us == ()


def test_rule_table_covers_every_site_class_and_backend() -> None:
    for backend in BACKENDS:
        for site in SITE_CLASSES:
            for single_conv in (True, False):
                entry = rule_entry(_branch(site), backend=backend, single_conv=single_conv)
                assert entry.prefer[-1] == "channel" and entry.source.strip()
                assert single_conv is False or "split" not in entry.prefer
    assert len({e.name for e in RULES}) == len(RULES)
    assert [shape_class(s) for s in [(1, 3), (8, 3), ("N", 3), None]] == ["batch1", "batched", "unknown", "unknown"]


def test_rule_takes_the_next_exact_lowering() -> None:
    """The rule's first lowering refused for the site (here by the adapter): the next exact one, and why."""
    branch = _branch("depthwise")
    choice = choose_lowering(branch, backend="onnxruntime", single_conv=False,
                             refusal=lambda name: "no Split here" if name == "split" else None)
    assert choice.lowering == "spatial"
    assert "split not exact" in choice.reason and "split refused: no Split here" in choice.reason
    dilated = choose_lowering(_branch("depthwise", dilation=(1, 2)), backend="compile", single_conv=True)
    assert dilated.lowering == "channel" and "spatial refused: dilation 2" in dilated.reason


# --------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("single_conv", [True, False])
def test_auto_fuses_without_timing_and_identically(single_conv: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    _no_timing(monkeypatch)
    xm, x = _depthwise_model()
    for backend in BACKENDS:
        a, ra = fuse_with_report(xm, example_inputs=x, backend=backend, single_conv=single_conv)
        b, rb = fuse_with_report(xm, example_inputs=x, backend=backend, single_conv=single_conv)
        assert ra.lowerings() == rb.lowerings() == {"3": "split" if not single_conv else "spatial", "6": "channel"}
        assert str(a) == str(b)
        assert getattr(a, "code", None) == getattr(b, "code", None)
        assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}
    proto = _export_site(xm, x, 17)
    fa, ra = fuse_onnx(proto, example_inputs=[x.numpy()], single_conv=single_conv)
    fb, rb = fuse_onnx(proto, example_inputs=[x.numpy()], single_conv=single_conv)
    assert ra.lowerings() == rb.lowerings()
    assert sorted(ra.lowerings().values()) == ["channel", "split" if not single_conv else "spatial"]
    assert fa.SerializeToString() == fb.SerializeToString()


# --------------------------------------------------------------------------- measure and its cache


def _counting_timer(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """Replace the timer: spatial 10 us, channel 20 us, spatial-h 25 us, stack 27 us, split 30 us; returns the
    list of timed candidate sets."""
    calls: list[dict] = []
    fixed = {"spatial": 10.0, "channel": 20.0, "spatial-h": 25.0, "stack": 27.0, "split": 30.0}

    def timer(runs: dict) -> dict[str, float]:
        calls.append(dict(runs))
        return {name: fixed[name] for name in runs}

    monkeypatch.setattr(lower, "_time_rounds", timer)
    return calls


@pytest.mark.parametrize("backend", ["eager", "onnxruntime"])
def test_measure_writes_the_cache_atomically_and_reuses_it(backend: str, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _counting_timer(monkeypatch)
    writes: list[Path] = []
    real_write = lower.atomic_write_json

    def spy(path: Path, data: object, *, force: bool = False) -> Path:
        writes.append(Path(path))
        return real_write(path, data, force=force)

    monkeypatch.setattr(lower, "atomic_write_json", spy)
    cache = tmp_path / "cache.json"
    branch = _branch("dense")
    first = choose_lowering(branch, backend=backend, lowering="measure", input_shape=(1, 4, 9, 9), cache_path=cache)
    timed = {"channel": 20.0, "spatial": 10.0, "spatial-h": 25.0, "stack": 27.0}
    assert len(calls) == 1 and set(calls[0]) == set(timed)  # every exact lowering (split not allowed)
    assert first.lowering == "spatial" and first.reason.startswith(f"measured {backend} at 1x4x9x9")
    assert str(cache) in first.reason and dict(first.times_us) == timed
    assert writes == [cache]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache.json"]  # no temporaries left
    data = json.loads(cache.read_text())
    assert data["format"] == "xvol-compiler lowering cache" and data["version"] == 1
    (entry,) = data["entries"]
    assert entry["times_us"] == timed
    key = entry["key"]
    assert key["backend"] == backend and key["input_shape"] == [1, 4, 9, 9] and key["dtype"] == "torch.float32"
    assert key["threads"] == torch.get_num_threads() and key["versions"]["xvol_compiler"]
    assert key["geometry"]["groups"] == 1 and key["channels"] == [4, 4] and key["machine"]["cpus"]

    again = choose_lowering(branch, backend=backend, lowering="measure", input_shape=(1, 4, 9, 9), cache_path=cache)
    assert len(calls) == 1 and writes == [cache]  # reused: not timed, not written
    assert again.lowering == "spatial" and again.reason.startswith("cached ") and str(cache) in again.reason

    other = choose_lowering(branch, backend=backend, lowering="measure", input_shape=(2, 4, 9, 9), cache_path=cache)
    assert len(calls) == 2 and other.reason.startswith("measured ")
    assert len(json.loads(cache.read_text())["entries"]) == 2  # both kept


def test_measure_through_fuse_uses_the_context_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _counting_timer(monkeypatch)
    xm, x = _depthwise_model()
    cache = tmp_path / "ctx.json"
    with using_lowering_cache(cache):
        assert lowering_cache_path() == cache
        fused = fuse(xm, example_inputs=x, lowering="measure", single_conv=False)
        timed = len(calls)
        again = fuse(xm, example_inputs=x, lowering="measure", single_conv=False)
    assert timed == 2 and len(calls) == 2  # two sites measured once, then read from the file
    assert fused.xvol_fusion_report.lowerings() == again.xvol_fusion_report.lowerings() == {"3": "spatial",
                                                                                             "6": "spatial"}
    assert cache.exists() and not (tmp_path / "env-cache.json").exists()


def test_cache_path_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert lowering_cache_path() == tmp_path / "env-cache.json"
    with using_lowering_cache(tmp_path / "a.json"):
        assert lowering_cache_path() == tmp_path / "a.json"
        assert lowering_cache_path(tmp_path / "b.json") == tmp_path / "b.json"
    monkeypatch.delenv(CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    default = tmp_path / "xdg" / "xvol-compiler" / "lowering-cache.json"
    assert lowering_cache_path() == default
    calls = _counting_timer(monkeypatch)
    choice = choose_lowering(_branch("depthwise"), lowering="measure", input_shape=(1, 4, 9, 9))
    assert len(calls) == 1 and default.exists() and str(default) in choice.reason  # the user's cache folder made


def test_bad_cache_file_is_an_error_and_is_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _counting_timer(monkeypatch)
    for text, why in [("{not json", "invalid JSON"), ('{"models": []}', "not a lowering cache")]:
        path = tmp_path / "mine.json"
        path.write_text(text)
        with pytest.raises(LoweringCacheError, match="delete it or pass another cache path") as err:
            choose_lowering(_branch("dense"), lowering="measure", input_shape=(1, 4, 9, 9), cache_path=path)
        assert str(path) in str(err.value) and why in str(err.value)
        assert path.read_text() == text


def test_measure_without_timing_where_it_cannot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """compile is not timed, nor a site without a static input shape: the rule, and no cache file."""
    _no_timing(monkeypatch)
    cache = tmp_path / "c.json"
    compiled = choose_lowering(_branch("depthwise"), backend="compile", lowering="measure",
                               input_shape=(1, 4, 9, 9), cache_path=cache)
    assert compiled.lowering == "spatial" and "compile is not measured" in compiled.reason
    unknown = choose_lowering(_branch("dense"), lowering="measure", input_shape=None, cache_path=cache)
    assert unknown.lowering == "channel" and "input shape unknown" in unknown.reason
    assert not cache.exists()


# --------------------------------------------------------------------------- onnxruntime sessions


def test_onnxruntime_sessions_do_not_spin() -> None:
    xm, x = _depthwise_model()
    proto = _export_site(xm, x, 17)
    sessions = [onnx_session(proto), onnx_session(proto.SerializeToString(), threads=1)]
    site, _ = one_site_session(_branch("depthwise"), "spatial", (1, 4, 9, 9))
    for session in [*sessions, site]:
        options = session.get_session_options()
        assert [options.get_session_config_entry(key) for key in SPINNING] == ["0", "0"]
    assert isinstance(proto, onnx.ModelProto)


def test_cli_lowering_flags(capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("fuse", "fuse-onnx"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        out = " ".join(capsys.readouterr().out.split())
        assert "measure" in out and "--lowering-cache" in out and "no timing" in out and "spatial-h" in out


def test_spatial_h_only_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    """The rule never takes spatial-h for a 3x3 site; forced, it is taken where exact, by name per site
    too; a one-site ONNX model of it runs like the channel form."""
    _no_timing(monkeypatch)
    for site in SITE_CLASSES:
        for backend in BACKENDS:
            assert choose_lowering(_branch(site), backend=backend).lowering != "spatial-h"
        forced = choose_lowering(_branch(site), lowering="spatial-h")
        assert (forced.lowering, forced.reason) == ("spatial-h", "forced")
    dilated = choose_lowering(_branch("depthwise", dilation=(2, 1)), lowering="spatial-h")
    assert dilated.lowering == "channel" and "spatial-h refused: dilation 2 on the H axis" in dilated.reason
    xm, x = _depthwise_model()
    _, report = fuse_with_report(xm, example_inputs=x, lowering={"3": "spatial-h", "6": "spatial"})
    assert report.lowerings() == {"3": "spatial-h", "6": "spatial"}


@pytest.mark.parametrize("backend", BACKENDS)
def test_rule_takes_spatial_h_for_7x7_depthwise_sites(backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """7x7 depthwise: spatial-h with one conv (spatial would double the W padding past the AVX2 kernel's
    limit), split when allowed; a dilated H refuses spatial-h and the next exact lowering is spatial."""
    _no_timing(monkeypatch)
    choice = choose_lowering(_branch("depthwise", kernel=7), backend=backend, single_conv=True)
    assert choice.lowering == "spatial-h" and "depthwise-7x7-spatial-h" in choice.reason
    assert choose_lowering(_branch("depthwise", kernel=7), backend=backend, single_conv=False).lowering == "split"
    assert choose_lowering(_branch("dense", kernel=7), backend=backend).lowering == "channel"
    dilated = choose_lowering(_branch("depthwise", kernel=7, dilation=(2, 1)), backend=backend, single_conv=True)
    assert dilated.lowering == "spatial" and "spatial-h refused: dilation 2 on the H axis" in dilated.reason


def test_default_fuse_of_a_7x7_depthwise_model_is_exact() -> None:
    """The default fuse of a 7x7 depthwise site takes spatial-h and matches a float64 eager run
    of the unfused model."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 7, padding=3, groups=8), nn.BatchNorm2d(8), nn.ReLU())
    x = torch.randn(2, 3, 12, 10)
    xm = xvolify(model, sites=["3"], example_inputs=x, directional=False)
    for m in xm.modules():
        if isinstance(m, XVolution):
            nn.init.normal_(m.attn_conv.weight)
            nn.init.normal_(m.attn_bn.weight)
    xm.eval()
    with torch.no_grad():
        ref = copy.deepcopy(xm).double()(x.double())
    fused, report = fuse_with_report(xm, example_inputs=x)
    assert report.lowerings() == {"3": "spatial-h"}
    with torch.no_grad():
        out = fused(x)
    assert float((out.double() - ref).abs().max()) <= 1e-5 * float(ref.abs().max())


def test_onnx_grouped_site_takes_split_when_allowed() -> None:
    """A grouped site fused for onnxruntime with single_conv=False is two convs and matches a float64
    eager run of the unfused model in onnxruntime; with one conv it stays "channel"."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.BatchNorm2d(8), nn.ReLU())
    x = torch.randn(2, 3, 10, 9)
    xm = xvolify(model, sites=["3"], example_inputs=x, directional=False)
    for m in xm.modules():
        if isinstance(m, XVolution):
            nn.init.normal_(m.attn_conv.weight)
            nn.init.normal_(m.attn_bn.weight)
    xm.eval()
    with torch.no_grad():
        ref = copy.deepcopy(xm).double()(x.double())
    proto = _export_site(xm, x, 17)
    for single_conv, lowering in [(False, "split"), (True, "channel")]:
        fused, report = fuse_onnx(proto, single_conv=single_conv,
                                  example_inputs=[x.numpy()])
        assert list(report.lowerings().values()) == [lowering]
        session = onnx_session(fused, threads=1)
        got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
        assert float((got.double() - ref).abs().max()) <= 1e-5 * float(ref.abs().max())


def test_one_site_model_of_spatial_h_matches_channel() -> None:
    branch = _branch("grouped")
    x = [torch.randn(2, 4, 7, 8, generator=torch.Generator().manual_seed(i)).numpy() for i in range(2)]
    outs = []
    for lowering in ("channel", "spatial-h"):
        model = one_site_model(branch, lowering, (2, 4, 7, 8))
        session = onnx_session(model, threads=1)
        outs.append(session.run(None, dict(zip([i.name for i in model.graph.input], x, strict=True)))[0])
    assert abs(outs[0] - outs[1]).max() <= 1e-4 * abs(outs[0]).max()
