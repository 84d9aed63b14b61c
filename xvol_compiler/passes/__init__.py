"""The passes' former import path, kept as an alias: ``xvol_compiler.passes.NAME`` is ``xvol_passes.NAME``.

The passes live in the package ``xvol_passes`` (source root ``passes/``). Importing this alias registers
each pass module under its old name too, so both names give the same module objects (one copy of each
module and of its error classes).
"""

from __future__ import annotations

import importlib
import pkgutil
import sys

import xvol_passes

for _info in pkgutil.iter_modules(xvol_passes.__path__):
    sys.modules[f"{__name__}.{_info.name}"] = importlib.import_module(f"xvol_passes.{_info.name}")
    globals()[_info.name] = sys.modules[f"{__name__}.{_info.name}"]
