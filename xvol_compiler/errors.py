"""The package's exception base classes.

Every error the package raises on purpose derives from :class:`XvolError`, so a caller (the ``xvol``
command among them) catches the package's errors by one type and lets anything else surface as a bug.
Each concrete error also derives from the builtin type a Python user expects (``ValueError`` for bad
values, ``TypeError`` for bad types, ``FileExistsError`` for an output in the way), so existing
``except ValueError`` code keeps working.
"""

from __future__ import annotations


class XvolError(Exception):
    """Base class of every error raised by xvol-compiler; its message names the problem and the fix."""


class VerificationError(XvolError, ValueError):
    """A fused model or graph differs from the unfused one beyond the tolerance (FX and ONNX alike)."""


class InvalidArgumentError(XvolError, ValueError):
    """An argument has a value the function cannot take (the message names the argument and what it accepts)."""


class InvalidArgumentTypeError(XvolError, TypeError):
    """An argument has a type the function cannot take (the message names the argument and what it accepts)."""


class NotFoundError(XvolError, KeyError):
    """A name (module, site, rule, model) the caller gave does not exist; the message lists what does."""

    def __str__(self) -> str:
        # KeyError quotes its message; the package's messages are sentences.
        return str(self.args[0]) if len(self.args) == 1 else super().__str__()


class MissingFileError(XvolError, FileNotFoundError):
    """A file the caller named does not exist (the message gives the path)."""
