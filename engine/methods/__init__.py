"""PEFT methods: one module per method, all registered by name (see ``base.py`` for the contract).

Every module in this package is imported here, so a new method only needs its own file with a
``@register_method`` class: no list to edit.
"""

import importlib
import pkgutil

from engine.methods.base import (
    AdaptedLinear,
    Method,
    MethodConfig,
    TargetedConfig,
    TrainContext,
    build_method,
    get_method,
    method_config,
    method_names,
    register_method,
)

for _module in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _module.name != "base" and not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "AdaptedLinear",
    "Method",
    "MethodConfig",
    "TargetedConfig",
    "TrainContext",
    "build_method",
    "get_method",
    "method_config",
    "method_names",
    "register_method",
]
