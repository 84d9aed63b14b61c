"""Which exceptions the ``xvol`` command reports as one line (the package's errors, ``OSError``) and which are
bugs that keep their traceback (everything else).

The package's errors are caught by type: :class:`~xvol_compiler.errors.XvolError` (every error class of the
package derives from it) and ``OSError``. The builtin ``ValueError`` / ``TypeError`` / ``LookupError`` that a
``raise`` statement of the package still raises itself (argument checks of pure functions) are one line too
(:func:`raised_by_package`); everything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import linecache

from xvol_compiler.errors import XvolError

__all__ = ["is_package_error", "one_line", "raised_by_package"]

_PACKAGES = ("xvol_compiler", "xvol_passes")


def is_package_error(err: BaseException) -> bool:
    """Whether the command reports ``err`` as one line: a package error (``XvolError``), an ``OSError``, or
    a builtin error a ``raise`` statement of the package raised itself; anything else is a bug."""
    if isinstance(err, (XvolError, OSError)):
        return True
    return isinstance(err, (ValueError, TypeError, LookupError)) and raised_by_package(err)


def raised_by_package(err: BaseException) -> bool:
    """Whether ``err`` comes from a ``raise`` statement in the package's own code (its innermost frame is a
    package module, at a ``raise`` line): an error the package raises on purpose with a builtin type. An
    exception from a library the package calls, or from a failing expression of the package, is not."""
    tb = err.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    module = str(tb.tb_frame.f_globals.get("__name__", ""))
    if module.split(".")[0] not in _PACKAGES:
        return False
    line = linecache.getline(tb.tb_frame.f_code.co_filename, tb.tb_lineno)
    return line.lstrip().startswith("raise ")


def one_line(err: BaseException, limit: int = 600) -> str:
    """The error's message on one line (lines joined by '; '), cut at ``limit`` characters."""
    text = str(err.args[0]) if isinstance(err, KeyError) and len(err.args) == 1 else str(err)
    parts = [" ".join(line.split()) for line in text.strip().splitlines()]
    text = "; ".join(p for p in parts if p) or type(err).__name__
    return text if len(text) <= limit else text[: limit - 4] + " ..."
