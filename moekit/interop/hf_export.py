"""ModelConfig -> a Hugging Face ``config.json`` dict, by the writer of the model type's record.

The reverse of ``moekit.interop.hf_config.config_from_hf``. Each writer (in
``moekit.interop.types``) first checks that the config is expressible in its type and raises
``UnsupportedError`` naming the first field that is not.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from moekit.config import ModelConfig
from moekit.interop.types import TYPES, UnsupportedError

ARCHITECTURES: dict[str, str] = {n: t.architecture for n, t in TYPES.items() if t.write and t.architecture}
BUILDERS: dict[str, Callable[[ModelConfig], dict[str, Any]]] = {n: t.write for n, t in TYPES.items() if t.write}


def infer_model_type(cfg: ModelConfig) -> str:
    """The HF model type whose architecture matches ``cfg``'s distinguishing features.

    Only a guess from the config (each writable type's ``claims``: MLA -> deepseek_v3, gated
    shared expert -> qwen2_moe, per-head q/k norm -> qwen3_moe, full q/k norm -> olmoe, else
    mixtral); ``to_hf_config`` then checks every field against the guessed type.
    """
    if cfg.moe is None:
        raise UnsupportedError("moe is None: a dense model has no Hugging Face MoE model type")
    for name, t in TYPES.items():
        if t.write is not None and t.claims is not None and t.claims(cfg):
            return name
    raise UnsupportedError(f"no writable model type fits this config; writable: {sorted(BUILDERS)}")


def to_hf_config(cfg: ModelConfig, model_type: str | None = None) -> dict[str, Any]:
    """The ``config.json`` dict of ``cfg`` as HF ``model_type`` (inferred when None)."""
    model_type = model_type or infer_model_type(cfg)
    if model_type not in BUILDERS:
        raise UnsupportedError(f"model_type {model_type!r} cannot be written; supported: {sorted(BUILDERS)}")
    return BUILDERS[model_type](cfg)


__all__ = ["ARCHITECTURES", "BUILDERS", "infer_model_type", "to_hf_config"]
