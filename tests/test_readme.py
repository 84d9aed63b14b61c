"""README.md's Python blocks run as written.

Conventions (also stated in a comment at the top of README.md):

- Every fenced block opened with ```python (or ```py) is run. The blocks of one
  section (from a Markdown heading to the next) run in README order in one
  namespace, so a later block may use what an earlier one of its section
  defined; every section starts from a fresh namespace, in a fresh temporary
  working directory.
- A ```text block that follows a python block (only blank lines between) is
  that block's printed output: each of its lines, except ``...`` lines (which
  elide), must appear in what the block printed, in order.
- A block containing a line ``# readme-test: skip (reason)`` is not run (and
  the section's test reports it as skipped, with the reason); no other block
  is skipped. A skip marker without a reason is an error.

Blocks are compiled with README.md's line numbers, so a traceback points at the
README line, and a failure names the block's first line.
"""

from __future__ import annotations

import ast
import contextlib
import inspect
import io
import re
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import xvol_compiler

README = Path(__file__).resolve().parent.parent / "README.md"
PYTHON_LANGS = {"python", "py", "python3"}
SKIP_RE = re.compile(r"^\s*#\s*readme-test:\s*skip\b(.*)$")
HEADING_RE = re.compile(r"^#{1,6}\s+(.*\S)\s*$")


@dataclass(frozen=True)
class Block:
    lang: str
    line: int  # 1-based line of the block's first code line in the file
    end: int  # 1-based line of its closing fence
    code: str
    section: str
    skip_reason: str | None = None


def parse_blocks(text: str) -> list[Block]:
    """Every fenced block of ``text``, in order, with its language, first code line and section heading."""
    blocks: list[Block] = []
    section = "(top)"
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        fence = re.match(r"^(\s*)(```+)\s*([\w+-]*)\s*$", line)
        if fence is None:
            heading = HEADING_RE.match(line)
            if heading:
                section = heading.group(1)
            i += 1
            continue
        ticks, lang = fence.group(2), fence.group(3).lower()
        body: list[str] = []
        i += 1
        while i < len(lines) and lines[i].strip() != ticks:
            body.append(lines[i])
            i += 1
        if i == len(lines):
            raise ValueError(f"line {i - len(body)}: unclosed code fence {line!r}")
        start = i - len(body) + 1  # 1-based line of the first body line
        skip = None
        for b in body:
            m = SKIP_RE.match(b)
            if m:
                reason = m.group(1).strip()
                if not (reason.startswith("(") and reason.endswith(")") and reason[1:-1].strip()):
                    raise ValueError(f"README.md:{start}: skip marker without a reason: {b.strip()!r}")
                skip = reason[1:-1].strip()
        blocks.append(Block(lang, start, i + 1, "\n".join(body) + "\n", section, skip))
        i += 1
    return blocks


def python_sections(blocks: list[Block], lines: list[str]) -> dict[str, list[tuple[Block, Block | None]]]:
    """Python blocks by section, in order, each with the text block that shows its output (or None)."""
    sections: dict[str, list[tuple[Block, Block | None]]] = {}
    for k, block in enumerate(blocks):
        if block.lang not in PYTHON_LANGS:
            continue
        shown = None
        if k + 1 < len(blocks) and blocks[k + 1].lang == "text":
            nxt = blocks[k + 1]
            between = lines[block.end : nxt.line - 2]  # after the closing fence, before the next opening one
            if all(not s.strip() for s in between):
                shown = nxt
        sections.setdefault(block.section, []).append((block, shown))
    return sections


def run_block(block: Block, namespace: dict, filename: str = "README.md") -> str:
    """Run ``block`` in ``namespace`` with the file's line numbers; what it printed."""
    code = compile("\n" * (block.line - 1) + block.code, filename, "exec")
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            exec(code, namespace)
    except BaseException as e:  # re-raised with the block's line, whatever it was
        if isinstance(e, (KeyboardInterrupt, pytest.skip.Exception)):
            raise
        lines = [f.lineno for f in traceback.extract_tb(e.__traceback__) if f.filename == filename]
        at = f" at line {lines[-1]}" if lines else ""
        raise AssertionError(
            f"{filename}:{block.line}: the python block of section {block.section!r} raised{at} "
            f"{type(e).__name__}: {e}"
        ) from e
    return out.getvalue()


def check_output(block: Block, shown: Block, printed: str) -> None:
    """Each line of ``shown`` (but ``...``) appears in ``printed``, in order."""
    out_lines = [s.rstrip() for s in printed.splitlines()]
    pos = 0
    for k, want in enumerate(shown.code.splitlines()):
        want = want.rstrip()
        if want.strip() == "...":
            continue
        try:
            pos = out_lines.index(want, pos) + 1
        except ValueError:
            raise AssertionError(
                f"README.md:{shown.line + k}: the output shown for the block at line {block.line} is not what it "
                f"prints: {want!r} is missing (in order); it printed:\n{printed}"
            ) from None


README_TEXT = README.read_text(encoding="utf-8")
README_LINES = README_TEXT.splitlines()
BLOCKS = parse_blocks(README_TEXT)
SECTIONS = python_sections(BLOCKS, README_LINES)


def test_every_python_fence_is_found():
    opened = [n for n, s in enumerate(README_LINES, 1) if re.match(r"^\s*```\s*(python|py|python3)\s*$", s)]
    found = [b.line - 1 for b in BLOCKS if b.lang in PYTHON_LANGS]
    assert found == opened
    assert len(found) >= 5, "the README's API examples"
    assert "Quick start (API)" in SECTIONS


@pytest.fixture
def one_thread():
    """One torch thread: on two shared, loaded cores, two threads' spin-waiting made these blocks 10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("section", list(SECTIONS), ids=lambda s: re.sub(r"\W+", "-", s).strip("-").lower())
def test_readme_section_runs(section, tmp_path, monkeypatch, one_thread):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)  # README blocks draw random weights and inputs: a failure reproduces
    namespace: dict = {"__name__": "__readme__"}
    skipped = []
    for block, shown in SECTIONS[section]:
        if block.skip_reason is not None:
            skipped.append(f"README.md:{block.line} ({block.skip_reason})")
            continue
        printed = run_block(block, namespace)
        if shown is not None:
            check_output(block, shown, printed)
    if skipped:
        pytest.skip(f"section {section!r}: the other blocks ran; not run: " + ", ".join(skipped))


def test_xvolify_signature_block_matches_the_function():
    """The xvolify section's signature listing (a text block) names xvolify's parameters and defaults."""
    listing = next(b for b in BLOCKS if b.lang == "text" and b.code.startswith("xvolify(model"))
    head = listing.code.split("->")[0]
    tree = ast.parse(f"def {head.strip()}: pass")
    args = tree.body[0].args
    written = {a.arg: None for a in args.args + args.kwonlyargs}
    defaults = [*([None] * (len(args.args) - len(args.defaults))), *args.defaults, *args.kw_defaults]
    for name, default in zip(written, defaults, strict=True):
        written[name] = None if default is None else ast.literal_eval(default)
    params = inspect.signature(xvol_compiler.xvolify).parameters
    real = {n: (None if p.default is inspect.Parameter.empty else p.default) for n, p in params.items()}
    assert written == real, f"README.md:{listing.line}: the listed signature is not xvolify's"
    kw_only = {n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    assert {a.arg for a in args.kwonlyargs} == kw_only


# --------------------------------------------------------------------------- the harness itself

SAMPLE = """# T

## One
```python
a = 1
```

```text
x
```

## Two
```python
print("first")
print("second")
```

```text
first
...
second
```

```python
b = a  # NameError: sections do not share names
```

```py
# readme-test: skip (needs a GPU)
raise RuntimeError
```
"""


def test_parse_blocks_sections_lines_and_markers():
    blocks = parse_blocks(SAMPLE)
    assert [(b.lang, b.line, b.section) for b in blocks] == [
        ("python", 5, "One"), ("text", 9, "One"), ("python", 14, "Two"), ("text", 19, "Two"),
        ("python", 25, "Two"), ("py", 29, "Two"),
    ]
    assert blocks[-1].skip_reason == "needs a GPU"
    assert all(b.skip_reason is None for b in blocks[:-1])
    with pytest.raises(ValueError, match="without a reason"):
        parse_blocks("```python\n# readme-test: skip\n```\n")
    with pytest.raises(ValueError, match="unclosed"):
        parse_blocks("```python\nx = 1\n")


def test_run_block_reports_the_readme_line():
    blocks = parse_blocks(SAMPLE)
    ns: dict = {}
    run_block(blocks[0], ns)
    assert ns["a"] == 1
    with pytest.raises(AssertionError, match=r"README.md:25: .* at line 25 NameError") as info:
        run_block(blocks[4], {})
    tb = info.value.__cause__.__traceback__
    assert inspect.getinnerframes(tb)[-1].lineno == 25  # the traceback points at the README line


def test_check_output_in_order_with_elision():
    blocks = parse_blocks(SAMPLE)
    check_output(blocks[2], blocks[3], "first\nmiddle\nsecond\n")
    with pytest.raises(AssertionError, match=r"README.md:21: .*'second' is missing"):
        check_output(blocks[2], blocks[3], "second\nfirst\n")
