"""The repository's layout as the README describes it: every library module is listed in the README's
Layout section and every file listed there exists; no library module grows past 500 lines (one module,
one concern)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LIBRARY = (ROOT / "xvol_compiler", ROOT / "passes" / "xvol_passes")
MAX_LINES = 500


def library_modules() -> list[Path]:
    return sorted(p for package in LIBRARY for p in package.rglob("*.py") if "__pycache__" not in p.parts)


def layout_block() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    return section.split("```", 2)[1]


def test_the_walk_finds_the_library() -> None:
    names = {p.name for p in library_modules()}
    assert {"fold.py", "fuse_fx.py", "catalog.py", "fuse_onnx.py"} <= names


@pytest.mark.parametrize("path", library_modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_module_is_at_most_500_lines(path: Path) -> None:
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(ROOT)} has {lines} lines: split it along its seams"


def test_every_library_module_is_in_the_readme_layout() -> None:
    block = layout_block()
    listed = set(re.findall(r"\b([a-z_0-9]+\.py)\b", block))
    missing = []
    for path in library_modules():
        if path.name == "__init__.py" or path.name == "__main__.py":
            continue
        if path.parent.name in ("rules", "cli"):  # packages listed by their modules' stems
            if path.stem not in block:
                missing.append(str(path.relative_to(ROOT)))
        elif path.name not in listed:
            missing.append(str(path.relative_to(ROOT)))
    assert not missing, f"README.md's Layout section does not list {missing}"


def test_every_file_the_readme_layout_lists_exists() -> None:
    block = layout_block()
    known = {p.name for p in library_modules()}
    known |= {p.name for folder in ("examples", "benchmarks") for p in (ROOT / folder).glob("*.py")}
    known |= {p.name for p in (ROOT / "docs").glob("*.md")}
    listed = set(re.findall(r"\b([a-z_0-9-]+\.(?:py|md))\b", block))
    assert listed, "the Layout section lists files"
    assert not listed - known, f"README.md's Layout section lists files that do not exist: {sorted(listed - known)}"
