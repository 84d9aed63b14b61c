"""Checks of the public entry points' arguments, before any work.

Each check raises :class:`ArgumentError` whose message names the argument,
the value given and what is accepted, so a bad type fails at the call and
not deep inside (``shift=1.5`` used to end in "'float' object is not
iterable"). ``ArgumentError`` is both a ``TypeError`` and a ``ValueError``:
code that caught either keeps working.
"""

from __future__ import annotations

import math
import os
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.parameter import is_lazy

from xvol_compiler.errors import XvolError

__all__ = [
    "ArgumentError",
    "check_bool",
    "check_choice",
    "check_directions",
    "check_example_inputs",
    "check_extra_branches",
    "check_initialized",
    "check_module",
    "check_names",
    "check_optional_int",
    "check_path",
    "check_shift",
    "check_tolerance",
]


class ArgumentError(XvolError, TypeError, ValueError):
    """An argument of a public function has the wrong type or value; the message names it and the fix."""


def _show(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({type(value).__name__})"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_bool(name: str, value: Any) -> None:
    """``value`` is True or False (not a truthy string such as ``"no"``)."""
    if not isinstance(value, bool):
        raise ArgumentError(f"{name}={_show(value)}: use True or False")


def check_choice(name: str, value: Any, choices: Collection[Any]) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ArgumentError(f"{name}={_show(value)}: use one of {', '.join(repr(c) for c in choices)}")


def check_optional_int(name: str, value: Any, minimum: int) -> None:
    """``value`` is None or an int >= ``minimum``."""
    if value is not None and not (_is_int(value) and value >= minimum):
        raise ArgumentError(f"{name}={_show(value)}: use None or an int >= {minimum}")


def check_tolerance(name: str, value: Any, *, optional: bool = False) -> None:
    """A finite real number (None too when ``optional``): NaN or infinity would make every comparison
    pass, a string would fail only after all the work."""
    if value is None and optional:
        return
    real = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not real or not math.isfinite(value):
        accepted = "None or a finite number such as 1e-4" if optional else "a finite number such as 1e-4"
        raise ArgumentError(f"{name}={_show(value)}: use {accepted}")


def check_shift(value: Any) -> None:
    """The PSSA shift: an int >= 1, or a non-empty sequence of such ints (one per spatial axis)."""
    ok = _is_int(value) and value >= 1
    if not ok and isinstance(value, Sequence) and not isinstance(value, str):
        ok = len(value) > 0 and all(_is_int(s) and s >= 1 for s in value)
    if not ok:
        raise ArgumentError(
            f"shift={_show(value)}: use an int >= 1 (the PSSA shift length) or one such int per spatial axis, "
            "e.g. (1, 2)"
        )


def check_directions(value: Any) -> None:
    """None, ``"axial"``, ``"full"`` or a neighbourhood size (which sizes exist depends on the site)."""
    if value is None or (isinstance(value, str) and value in ("axial", "full")) or _is_int(value):
        return
    raise ArgumentError(
        f"directions={_show(value)}: use None (full), 'axial', 'full' or a neighbourhood size "
        "(2 in 1-D; 4 or 8 in 2-D; 6 or 26 in 3-D)"
    )


def check_extra_branches(value: Any, allowed: Sequence[str]) -> None:
    """A sequence of branch names from ``allowed`` (a single string is refused: ``"1x1"`` is not ``("1x1",)``)."""
    choices = ", ".join(repr(a) for a in allowed)
    if isinstance(value, str):
        raise ArgumentError(
            f"extra_branches={_show(value)} is a string: pass a sequence of branch names, e.g. ({value!r},); "
            f"choose from {choices}"
        )
    if not isinstance(value, Collection):
        raise ArgumentError(f"extra_branches={_show(value)}: pass a sequence of branch names from {choices}")
    names = list(value)
    not_str = [v for v in names if not isinstance(v, str)]
    unknown = [v for v in names if isinstance(v, str) and v not in allowed]
    if not_str or unknown:
        raise ArgumentError(f"extra_branches: unknown extra branches {not_str + unknown}; choose from {choices}")
    if len(set(names)) != len(names):
        raise ArgumentError(f"extra_branches={names!r} names a branch twice; each of {choices} at most once")


def check_path(name: str, value: Any, *, optional: bool = False) -> None:
    """A file path (str or os.PathLike, not empty); None too when ``optional``."""
    if value is None and optional:
        return
    if not isinstance(value, (str, os.PathLike)) or os.fspath(value) in ("", b""):
        accepted = "None or a file path (str or pathlib.Path)" if optional else "a file path (str or pathlib.Path)"
        raise ArgumentError(f"{name}={_show(value)}: use {accepted}")


def check_names(name: str, value: Any) -> None:
    """None or a sequence of strings (a single string is refused)."""
    if value is None:
        return
    if isinstance(value, str) or not isinstance(value, Sequence) or not all(isinstance(v, str) for v in value):
        raise ArgumentError(f"{name}={_show(value)}: use None or a list of strings, e.g. ['input']")


def check_example_inputs(value: Any, *, optional: bool = True) -> None:
    """None (when ``optional``), a Tensor, a list (detection images), a tuple of positional arguments or a dict."""
    if value is None and optional:
        return
    if not isinstance(value, (torch.Tensor, list, tuple, Mapping)):
        hint = " (torch.from_numpy converts an array)" if type(value).__module__.startswith("numpy") else ""
        raise ArgumentError(
            f"example_inputs={_show(value)}: use a Tensor, a list of image tensors (detection models) or a tuple "
            f"of positional arguments{hint}"
        )


def check_initialized(model: nn.Module, what: str = "the model") -> None:
    """Refuse a model with uninitialised lazy parameters (``nn.LazyConv2d`` before its first forward)."""
    lazy = [name for name, p in (*model.named_parameters(), *model.named_buffers())
            if is_lazy(p)]
    if lazy:
        shown = ", ".join(lazy[:4]) + (f" and {len(lazy) - 4} more" if len(lazy) > 4 else "")
        raise ArgumentError(
            f"{what} has uninitialised lazy parameters ({shown}): their shapes are unknown until the model runs. "
            "Run one forward pass on an example input first (model(x)), then call this again"
        )


def check_module(name: str, value: Any) -> None:
    """An ``nn.Module`` whose parameters are all initialised."""
    if not isinstance(value, nn.Module):
        raise ArgumentError(f"{name}={_show(value)}: use a torch.nn.Module")
    check_initialized(value, f"{name} ({type(value).__name__})")
