"""A custom import-linter contract: named modules never import given submodules of external packages.

import-linter's own contracts see an external package only as its top-level name (``torch``), so they
cannot tell ``torch.fx`` from ``torch.nn``. This contract reads the import statements themselves: each
source module, and every module of the checked packages it imports directly or indirectly, must have
no import line naming a forbidden module (``import torch.fx``, ``from torch import fx``,
``from torch.fx.node import Node``, ``import onnx``).
"""

from __future__ import annotations

import re

from grimp import ImportGraph
from importlinter.application import output
from importlinter.domain import fields
from importlinter.domain.contract import Contract, ContractCheck


def _names_forbidden(line: str, forbidden: str) -> bool:
    """Whether one import line imports ``forbidden`` (a dotted name) or something inside it."""
    parent, _, child = forbidden.rpartition(".")
    escaped = re.escape(forbidden)
    if re.search(rf"^\s*(import|from)\s+{escaped}(\.|\s|$)", line):
        return True
    from_parent = rf"^\s*from\s+{re.escape(parent)}\s+import\s+.*\b{re.escape(child)}\b"
    return bool(parent) and re.search(from_parent, line) is not None


class ForbiddenSubmoduleContract(Contract):
    """Source modules (and what they import inside the root packages) never import forbidden submodules."""

    type_name = "forbidden_submodules"

    source_modules = fields.SetField(subfield=fields.ModuleField())
    forbidden_modules = fields.SetField(subfield=fields.StringField())

    def check(self, graph: ImportGraph, verbose: bool) -> ContractCheck:
        roots = tuple(str(root) for root in self.session_options.get("root_packages", ()))  # type: ignore[attr-defined]
        violations: list[str] = []
        for source in sorted(str(module) for module in self.source_modules):  # type: ignore[attr-defined]
            reached = {source} | {m for m in graph.find_upstream_modules(source) if m.startswith(roots)}
            for module in sorted(reached):
                for imported in sorted(graph.find_modules_directly_imported_by(module)):
                    for detail in graph.get_import_details(importer=module, imported=imported):
                        line = detail["line_contents"]
                        for forbidden in sorted(self.forbidden_modules):  # type: ignore[attr-defined]
                            if _names_forbidden(line, forbidden):
                                via = "" if module == source else f" (imported by {source})"
                                violations.append(f"{module}:{detail['line_number']}{via}: {line.strip()}")
        return ContractCheck(kept=not violations, metadata={"violations": sorted(set(violations))})

    def render_broken_contract(self, check: ContractCheck) -> None:
        for violation in check.metadata["violations"]:
            output.print_error(violation)
