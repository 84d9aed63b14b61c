"""Site discovery and selection: which convolutions of a model run, at what output stride, at what
cost, and which of them become X-volution sites.

The code lives in :mod:`xvol_compiler.site_analysis` (running the model with forward hooks, and
FX where it traces: strides, MACs, definitions) and :mod:`xvol_compiler.site_selection` (the
selection policies and :func:`select_sites`); this module re-exports both, so
``from xvol_compiler.sites import ...`` keeps working.
"""

from __future__ import annotations

from xvol_compiler import site_analysis, site_selection
from xvol_compiler.site_analysis import *  # noqa: F403  (a facade: each module's __all__ is the list)
from xvol_compiler.site_selection import *  # noqa: F403

__all__ = [*site_analysis.__all__, *site_selection.__all__]
