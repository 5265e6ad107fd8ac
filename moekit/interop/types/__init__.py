"""The registry of Hugging Face model types: one ``ModelType`` record per ``model_type``.

Every public module of this package defines its types as module-level ``ModelType`` instances;
``TYPES`` collects them all by name when the package is imported, so adding a type is adding one
file (or one record to a family's file). Lookup: ``get_type`` by ``model_type``, ``type_of`` for a
config dict (its ``model_type``, else its ``architectures`` for configs that carry none).
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from moekit.interop.types._base import GATE_UP_DOWN, HFLayout, ModelType, UnsupportedError


def _discover() -> dict[str, ModelType]:
    found: dict[str, ModelType] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        for value in vars(module).values():
            if isinstance(value, ModelType) and found.get(value.name) is not value:
                if value.name in found:
                    raise RuntimeError(f"model type {value.name!r} is registered twice (in {info.name})")
                found[value.name] = value
    return dict(sorted(found.items()))


TYPES: dict[str, ModelType] = _discover()


def get_type(model_type: str) -> ModelType | None:
    """The record of ``model_type``, or None when moekit has none."""
    return TYPES.get(model_type)


def type_of(d: dict[str, Any]) -> ModelType | None:
    """The record for a config dict: by its ``model_type``, else by its ``architectures``."""
    mt = d.get("model_type")
    if mt is not None:
        return TYPES.get(mt)
    archs = d.get("architectures") or []
    for t in TYPES.values():
        if any(a in t.architectures for a in archs if isinstance(a, str)):
            return t
    return None


def loadable_types() -> list[str]:
    return [name for name, t in TYPES.items() if t.loadable]


def writable_types() -> list[str]:
    return [name for name, t in TYPES.items() if t.writable]


__all__ = [
    "GATE_UP_DOWN",
    "TYPES",
    "HFLayout",
    "ModelType",
    "UnsupportedError",
    "get_type",
    "loadable_types",
    "type_of",
    "writable_types",
]
