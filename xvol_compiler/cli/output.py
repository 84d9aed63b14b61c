"""What the command prints: rich tables and lines, or one JSON object (``--json``); plain ``--help`` text."""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["Output", "plain_help", "plain_text", "rich_table"]


class Output:
    """Tables and lines to stdout (rich), or a single JSON object with ``--json``."""

    def __init__(self, as_json: bool) -> None:
        from rich.console import Console

        self.as_json = as_json
        # Captured or piped output is not cut to 80 columns.
        self.console = Console(highlight=False, soft_wrap=False, width=None if sys.stdout.isatty() else 200)

    def print(self, *items: Any) -> None:
        if not self.as_json:
            self.console.print(*items)

    def line(self, text: str) -> None:
        if not self.as_json:
            self.console.print(text, markup=False)

    def json(self, data: Any) -> None:
        if self.as_json:
            sys.stdout.write(json.dumps(data, indent=2, default=_jsonable) + "\n")


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if hasattr(value, "to_dict"):
        return value.to_dict()
    return str(value)


def rich_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], title: str = "", caption: str = "") -> Any:
    from rich.table import Table

    table = Table(title=title or None, caption=caption or None, caption_justify="left")
    for i, h in enumerate(headers):
        numeric = bool(rows) and all(_numeric(str(r[i])) for r in rows)
        table.add_column(h, justify="right" if numeric else "left", overflow="fold")
    for r in rows:
        table.add_row(*(str(c) for c in r))
    return table


_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)(e[+-]?\d+)?[KMG%]?")


def _numeric(text: str) -> bool:
    return text == "-" or _NUMBER.fullmatch(text) is not None


_LITERAL = re.compile(r"``(.+?)``", re.DOTALL)
_ROLE = re.compile(r":(?:func|class|meth|mod|data|attr|exc|obj):`~?([^`]+)`")


def plain_text(text: str) -> str:
    """Docstring text for ``--help``: reST literals (double backticks) and roles (:func:`x`) become plain x."""
    return _LITERAL.sub(r"\1", _ROLE.sub(r"\1", text))


def plain_help(parser: argparse.ArgumentParser) -> None:
    """Every description, epilog and argument help of ``parser`` and its subcommands as :func:`plain_text`."""
    for attr in ("description", "epilog"):
        if getattr(parser, attr):
            setattr(parser, attr, plain_text(getattr(parser, attr)))
    for action in parser._actions:
        if isinstance(action.help, str):
            action.help = plain_text(action.help)
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:
                if isinstance(choice.help, str):
                    choice.help = plain_text(choice.help)
            for sub in dict.fromkeys(action.choices.values()):
                plain_help(sub)

