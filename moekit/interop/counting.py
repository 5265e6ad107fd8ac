"""``moekit params`` SPEC → what accounting counts: a ``ModelConfig`` or a ``Counted``.

A preset or moekit config is a ``ModelConfig``. A Hugging Face config goes to its type's record
(``moekit.interop.types``): a native reader gives a ``ModelConfig`` (plus ``extras``: a
``Counted``), a native accountant a ``Counted``; a type without a record goes to transformers'
module tree on the meta device (``hf_generic``, needs ``moekit[hf]``).

Multi-token-prediction modules are counted under ``mtp`` and left out of the total, as the
vendors publish; ``include_mtp`` brings them in. A ``quantization_config`` rides along so the
report can give the checkpoint's stored bytes (parameters never count scale tensors).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from moekit.accounting import Counted, count_extended
from moekit.config import ConfigError, ModelConfig
from moekit.interop.hf_config import read_spec, resolve_type
from moekit.interop.types import TYPES
from moekit.interop.types._reader import Reader


def count_hf(
    d: dict[str, Any], where: str = "Hugging Face config", *, include_mtp: bool = False
) -> ModelConfig | Counted:
    """What accounting counts for a Hugging Face config dict (see the module docstring)."""
    if not isinstance(d, dict):
        raise ConfigError(f"{where} must be a JSON object")
    quant = d.get("quantization_config") if isinstance(d.get("quantization_config"), dict) else None
    try:
        t, inner = resolve_type(d, where)
    except ConfigError:
        if d.get("model_type") in TYPES or d.get("model_type") is None:
            raise
        from moekit.interop.hf_generic import count_with_transformers

        counted = count_with_transformers(d, where)
        return dataclasses.replace(counted, quantization=quant)
    r = Reader(inner, f"{where} (model_type {t.name})")
    if t.account is not None:
        counted = t.account(r)
    else:
        assert t.read is not None
        cfg = t.read(r)
        extra = t.extras(r, cfg) if t.extras is not None else []
        if not extra and quant is None:
            return cfg
        counted = count_extended(cfg, extra)
    if include_mtp and counted.params.outside_total:
        comps = [dataclasses.replace(c, in_total=True) for c in counted.params.components]
        counted = dataclasses.replace(
            counted, params=counted.params.rebuilt(comps, ("multi-token prediction included",))
        )
    return dataclasses.replace(counted, quantization=quant)


def load_counted(spec: str, *, include_mtp: bool = False) -> ModelConfig | Counted:
    """Resolve SPEC like ``hf_config.load_spec``, counting any Hugging Face MoE config."""
    path, data = read_spec(spec)
    if isinstance(data, ModelConfig):
        return data
    counted = count_hf(data, where=f"config file {path}", include_mtp=include_mtp)
    if not data.get("_name_or_path"):  # name it after its folder (or file), not its type
        name = path.parent.name if path.name == "config.json" else path.stem
        counted = dataclasses.replace(counted, name=name) if isinstance(counted, Counted) else counted
        if isinstance(counted, ModelConfig):
            counted.name = name
    return counted


__all__ = ["count_hf", "load_counted"]
