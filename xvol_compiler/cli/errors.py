"""Which exceptions the ``xvol`` command reports as one line and which are bugs that keep their traceback.

The package's errors are caught by type: :class:`~xvol_compiler.errors.XvolError` (every error the package
raises on purpose derives from it; ``tests/test_errors.py`` checks the library raises no builtin error)
and ``OSError`` (a file the user named). Everything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from xvol_compiler.errors import XvolError

__all__ = ["is_package_error", "one_line"]


def is_package_error(err: BaseException) -> bool:
    """Whether the command reports ``err`` as one line: a package error (``XvolError``) or an ``OSError``."""
    return isinstance(err, (XvolError, OSError))


def one_line(err: BaseException, limit: int = 600) -> str:
    """The error's message on one line (lines joined by '; '), cut at ``limit`` characters."""
    text = str(err.args[0]) if isinstance(err, KeyError) and len(err.args) == 1 else str(err)
    parts = [" ".join(line.split()) for line in text.strip().splitlines()]
    text = "; ".join(p for p in parts if p) or type(err).__name__
    return text if len(text) <= limit else text[: limit - 4] + " ..."
