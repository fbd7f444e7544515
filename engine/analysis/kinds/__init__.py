"""Analysis kinds: one module per kind, each a ``@register_analysis`` class (see ``base.py`` for the contract).

Every module in this package is imported here, so a new analysis only needs its own file: no list to edit.
"""

import importlib
import pkgutil

from engine.analysis.kinds.base import (
    Analysis,
    AnalysisError,
    AnalysisInputs,
    AnalysisParams,
    ParamFlag,
    Progress,
    analysis_kinds,
    get_analysis,
    param_flags,
    register_analysis,
)

for _module in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _module.name != "base" and not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "Analysis",
    "AnalysisError",
    "AnalysisInputs",
    "AnalysisParams",
    "ParamFlag",
    "Progress",
    "analysis_kinds",
    "get_analysis",
    "param_flags",
    "register_analysis",
]
