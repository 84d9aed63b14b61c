"""Which exceptions the ``xvol`` command reports as one line (the package's errors, ``OSError``) and which are
bugs that keep their traceback (everything else).

The package's errors are caught by type: :class:`~xvol_compiler.errors.XvolError`, and, until every package
error derives from it, the package's own error classes listed here (:func:`errors_not_yet_derived`) and the
builtin ``ValueError`` / ``TypeError`` / ``LookupError`` that a ``raise`` statement of the package raises
itself (:func:`raised_by_package`). Both shims go once every error of the package derives from ``XvolError``.
"""

from __future__ import annotations

import linecache
import sys

from xvol_compiler.errors import XvolError

__all__ = ["errors_not_yet_derived", "is_package_error", "one_line", "raised_by_package"]

# (module, class) of the package's error classes that do not derive from XvolError yet. A class whose module
# was never imported cannot have been raised, so only loaded modules are looked at and nothing is imported.
_NOT_YET_DERIVED = (
    ("xvol_compiler.arguments", "ArgumentError"),
    ("xvol_compiler.attention_probe", "AttentionProbeError"),
    ("xvol_compiler.checkpoint", "CheckpointError"),
    ("xvol_compiler.files", "OutputError"),
    ("xvol_compiler.fold", "FoldError"),
    ("xvol_compiler.io", "InputError"),
    ("xvol_compiler.onnx_io", "OnnxError"),
    ("xvol_compiler.sites", "SiteSelectionError"),
    ("xvol_compiler.verify", "OutputMismatchError"),
    ("xvol_passes.fuse_fx", "FusionError"),
    ("xvol_passes.fused_record", "FusedRecordError"),
    ("xvol_passes.lower", "LoweringCacheError"),
)
_PACKAGES = ("xvol_compiler", "xvol_passes")


def is_package_error(err: BaseException) -> bool:
    """Whether the command reports ``err`` as one line: a package error (``XvolError``, and the shims below
    until every package error derives from it) or an ``OSError``; anything else is a bug."""
    if isinstance(err, (XvolError, OSError, *errors_not_yet_derived())):
        return True
    return isinstance(err, (ValueError, TypeError, LookupError)) and raised_by_package(err)


def errors_not_yet_derived() -> tuple[type[Exception], ...]:
    """The package's error classes, among those loaded, that do not derive from ``XvolError`` yet."""
    found: list[type[Exception]] = []
    for module_name, class_name in _NOT_YET_DERIVED:
        cls = getattr(sys.modules.get(module_name), class_name, None)
        if isinstance(cls, type) and issubclass(cls, Exception) and not issubclass(cls, XvolError):
            found.append(cls)
    return tuple(found)


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
