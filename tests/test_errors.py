"""Every exception class the package defines derives from ``XvolError``, so one ``except`` catches
the package's errors; both verification errors (FX and ONNX) derive from ``VerificationError``."""

from __future__ import annotations

import ast
import builtins
import importlib
import inspect
import pkgutil
from pathlib import Path
from types import ModuleType

import pytest

import xvol_compiler
import xvol_passes
from xvol_compiler.errors import VerificationError, XvolError

# Control flow inside one function (never reaches a caller), not an error of the package.
INTERNAL_SIGNALS = {"xvol_compiler.rules.Refusal", "xvol_compiler.conv_modules._Captured"}
BUILTIN_PARENTS = (ValueError, TypeError, RuntimeError, OSError, LookupError)


def _modules() -> list[ModuleType]:
    modules = []
    for package in (xvol_compiler, xvol_passes):
        for info in pkgutil.walk_packages(package.__path__, f"{package.__name__}."):
            if info.name.endswith("__main__"):
                continue
            modules.append(importlib.import_module(info.name))
    return [xvol_compiler, xvol_passes, *modules]


def _defined_exceptions() -> dict[str, type[BaseException]]:
    """Exception classes by qualified name, each counted in the module that defines it."""
    found: dict[str, type[BaseException]] = {}
    for module in _modules():
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, BaseException) and cls.__module__ == module.__name__:
                found[f"{cls.__module__}.{cls.__qualname__}"] = cls
    return found


EXCEPTIONS = _defined_exceptions()


def test_the_walk_finds_the_package_errors() -> None:
    # The walk really reaches both packages: a broken walk would make the next test pass vacuously.
    for name in ("xvol_compiler.fold.FoldError", "xvol_passes.fuse_fx.FusionError",
                 "xvol_compiler.onnx_verify.OnnxVerificationError", "xvol_compiler.errors.XvolError"):
        assert name in EXCEPTIONS
    assert len(EXCEPTIONS) >= 18


@pytest.mark.parametrize("name", sorted(set(EXCEPTIONS) - INTERNAL_SIGNALS))
def test_every_package_exception_derives_from_xvol_error(name: str) -> None:
    cls = EXCEPTIONS[name]
    assert issubclass(cls, XvolError), f"{name} does not derive from xvol_compiler.errors.XvolError"
    if cls is not XvolError:
        # Each keeps a builtin parent, so `except ValueError` (or the like) code keeps working.
        assert issubclass(cls, BUILTIN_PARENTS), f"{name} lost its builtin parent"


@pytest.mark.parametrize("name", [
    "xvol_compiler.verify.OutputMismatchError",
    "xvol_passes.fuse_fx.FusionVerificationError",
    "xvol_compiler.onnx_verify.OnnxVerificationError",
])
def test_verification_errors_share_one_parent(name: str) -> None:
    cls = EXCEPTIONS[name]
    assert issubclass(cls, VerificationError)
    assert issubclass(cls, ValueError)


def test_old_catches_keep_working() -> None:
    from xvol_compiler.fold import FoldError
    from xvol_passes.fuse_fx import FusionError, FusionVerificationError
    from xvol_passes.fuse_onnx import OnnxError, OnnxVerificationError

    assert issubclass(FusionVerificationError, FusionError)
    assert issubclass(OnnxVerificationError, OnnxError)
    with pytest.raises(ValueError):
        raise FoldError("bad fold")
    with pytest.raises(XvolError):
        raise OnnxVerificationError("outputs differ")


# ---------------------------------------------------------------------------- no builtin raises

LIBRARY_ROOTS = (Path(xvol_compiler.__file__).parent, Path(xvol_passes.__file__).parent)
BUILTIN_ERRORS = {name for name, value in vars(builtins).items()
                  if isinstance(value, type) and issubclass(value, Exception)}


def _raised_builtins(path: Path) -> list[str]:
    """``raise BuiltinError(...)`` statements of a module, as "file:line name", except the two the language
    asks for: ``NotImplementedError`` (abstract methods) and ``AttributeError`` in a module ``__getattr__``."""
    found = []

    def visit(node: ast.AST, function: str) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            function = node.name
        if isinstance(node, ast.Raise) and node.exc is not None:
            exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
            allowed = isinstance(exc, ast.Name) and (
                exc.id == "NotImplementedError" or (exc.id == "AttributeError" and function == "__getattr__"))
            if isinstance(exc, ast.Name) and exc.id in BUILTIN_ERRORS and not allowed:
                found.append(f"{path.name}:{node.lineno} {exc.id}")
        for child in ast.iter_child_nodes(node):
            visit(child, function)

    visit(ast.parse(path.read_text(encoding="utf-8")), "")
    return sorted(set(found))


def test_the_library_raises_its_own_errors() -> None:
    """Every error the package raises on purpose is one of its own (an XvolError), so the xvol command and
    callers catch the package's errors by one type; a builtin error means a bug."""
    paths = [p for root in LIBRARY_ROOTS for p in root.rglob("*.py")]
    assert len(paths) > 50
    offenders = [hit for p in paths for hit in _raised_builtins(p)]
    assert not offenders, f"raise a package error (xvol_compiler.errors) instead: {offenders}"


def test_the_raise_scan_finds_a_builtin_raise(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("def f(x):\n    if x:\n        raise ValueError('bad')\n    raise NotImplementedError\n\n"
                      "def __getattr__(name):\n    raise AttributeError(name)\n")
    assert _raised_builtins(sample) == ["sample.py:3 ValueError"]
