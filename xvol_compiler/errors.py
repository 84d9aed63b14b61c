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
