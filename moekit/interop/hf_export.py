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
from moekit.interop.types._writer import mismatches

ARCHITECTURES: dict[str, str] = {n: t.architecture for n, t in TYPES.items() if t.write and t.architecture}
BUILDERS: dict[str, Callable[[ModelConfig], dict[str, Any]]] = {n: t.write for n, t in TYPES.items() if t.write}


def infer_model_type(cfg: ModelConfig) -> str:
    """The HF model type that expresses ``cfg``: of the writable types whose writer accepts every
    field, the first whose ``claims`` fits its distinguishing features (MLA -> deepseek_v2/v3, gated
    shared expert -> qwen2_moe, sigmoid or shared experts with GQA -> glm4_moe, ...), else the first.

    When none accepts it, the error names the nearest type (fewest differing fields) and every
    field that differs there.
    """
    if cfg.moe is None:
        raise UnsupportedError("moe is None: a dense model has no Hugging Face MoE model type")
    diffs = {name: mismatches(t.write, cfg) for name, t in TYPES.items() if t.write is not None}
    fits = [name for name, found in diffs.items() if not found]
    for name in fits:
        claims = TYPES[name].claims
        if claims is not None and claims(cfg):
            return name
    if fits:
        return fits[0]
    nearest = min(diffs, key=lambda name: len(diffs[name]))
    raise UnsupportedError(
        f"no Hugging Face model type expresses this config; the nearest is {nearest!r}, which differs in "
        f"{len(diffs[nearest])} field(s): " + "; ".join(diffs[nearest])
    )


def to_hf_config(cfg: ModelConfig, model_type: str | None = None) -> dict[str, Any]:
    """The ``config.json`` dict of ``cfg`` as HF ``model_type`` (inferred when None)."""
    model_type = model_type or infer_model_type(cfg)
    if model_type not in BUILDERS:
        raise UnsupportedError(f"model_type {model_type!r} cannot be written; supported: {sorted(BUILDERS)}")
    diffs = mismatches(BUILDERS[model_type], cfg)
    if diffs:
        raise UnsupportedError(
            f"this config cannot be written as model_type {model_type!r}: it differs in {len(diffs)} field(s): "
            + "; ".join(diffs)
        )
    return BUILDERS[model_type](cfg)


__all__ = ["ARCHITECTURES", "BUILDERS", "infer_model_type", "to_hf_config"]
