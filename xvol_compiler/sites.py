"""Site discovery and selection: which convolutions of a model run, at what output stride, at what
cost, and which of them become X-volution sites.

The code lives in :mod:`xvol_compiler.site_analysis` (running the model with forward hooks, and
FX where it traces: strides, MACs, definitions) and :mod:`xvol_compiler.site_selection` (the
selection policies and :func:`select_sites`); this module re-exports both, so
``from xvol_compiler.sites import ...`` keeps working.
"""

from __future__ import annotations

from xvol_compiler.site_analysis import (
    CONV_MODULES,
    KINDS,
    SITE_TYPE_NAMES,
    AnalysisMode,
    ConvCall,
    ConvInfo,
    ModelAnalysis,
    ModelKind,
    SiteSelectionError,
    Stride,
    analyze_model,
    as_args,
    default_example_inputs,
    describe_inputs,
    detect_kind,
    nominal_stride,
)
from xvol_compiler.site_selection import (
    CostFn,
    Predicate,
    SiteDecision,
    SiteSelection,
    as_selection,
    select_sites,
)

__all__ = [
    "CONV_MODULES",
    "KINDS",
    "SITE_TYPE_NAMES",
    "AnalysisMode",
    "ConvCall",
    "ConvInfo",
    "CostFn",
    "ModelAnalysis",
    "ModelKind",
    "Predicate",
    "SiteDecision",
    "SiteSelection",
    "SiteSelectionError",
    "Stride",
    "analyze_model",
    "as_args",
    "as_selection",
    "default_example_inputs",
    "describe_inputs",
    "detect_kind",
    "nominal_stride",
    "select_sites",
]
