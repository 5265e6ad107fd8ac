"""Reading Hugging Face ``config.json`` dicts: typed key access and the fields every decoder shares.

``Reader`` names the missing or mistyped key (and the model type) in its error; ``common`` reads
the keys every decoder-only config shares; ``make`` assembles a ``ModelConfig``. The per-type
readers in this package are built from these.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from moekit.config import AttentionConfig, ConfigError, ModelConfig, MoEConfig

MISSING = object()


class Reader:
    """Typed access to one HF config dict; errors name the key and the model type."""

    def __init__(self, d: dict[str, Any], where: str):
        self.d, self.where = d, where

    def get(self, key: str, default: Any = MISSING, *aliases: str) -> Any:
        for k in (key, *aliases):
            if k in self.d and self.d[k] is not None:
                return self.d[k]
        if default is MISSING:
            raise ConfigError(f"{self.where} is missing the key '{key}'")
        return default

    def int(self, key: str, default: Any = MISSING, *aliases: str) -> Any:
        v = self.get(key, default, *aliases)
        if v is default and default is not MISSING:
            return v
        if isinstance(v, bool) or not isinstance(v, int):
            raise ConfigError(f"{self.where}: '{key}' must be an integer, got {v!r}")
        return v

    def float(self, key: str, default: Any = MISSING) -> Any:
        v = self.get(key, default)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ConfigError(f"{self.where}: '{key}' must be a number, got {v!r}")
        return float(v)

    def bool(self, key: str, default: Any = MISSING) -> bool:
        v = self.get(key, default)
        if not isinstance(v, bool):
            raise ConfigError(f"{self.where}: '{key}' must be true or false, got {v!r}")
        return v

    def int_list(self, key: str, default: Any = MISSING) -> list[int]:
        v = self.get(key, default)
        if not isinstance(v, list) or any(isinstance(i, bool) or not isinstance(i, int) for i in v):
            raise ConfigError(f"{self.where}: '{key}' must be a list of integers, got {v!r}")
        return list(v)

    def reject(self, key: str, bad: Callable[[Any], bool], why: str) -> None:
        """Raise if ``key`` is present with a value ``bad`` says moekit cannot represent."""
        v = self.d.get(key)
        if v is not None and bad(v):
            raise ConfigError(f"{self.where}: '{key}' = {v!r} is not supported: {why}")


def constant(r: Reader, key: str, default: Any = MISSING, *aliases: str, n_layers: int | None = None) -> int:
    """An integer key that may also be a per-layer list of one repeated value (Hunyuan, XVERSE,
    Skywork); ``n_layers``, when given, is the length such a list must have. moekit's MoE layers
    all have the same expert count and top-k, so a list of different values is refused."""
    v = r.get(key, default, *aliases)
    if isinstance(v, list):
        bad = not v or any(isinstance(x, bool) or not isinstance(x, int) for x in v)
        if bad or (n_layers is not None and len(v) != n_layers):
            raise ConfigError(f"{r.where}: '{key}' must be an integer or one integer per layer, got {v!r}")
        if len(set(v)) != 1:
            raise ConfigError(f"{r.where}: '{key}' = {v!r} is not supported: moekit's MoE layers all have one value")
        v = v[0]
    if isinstance(v, bool) or not isinstance(v, int):
        raise ConfigError(f"{r.where}: '{key}' must be an integer (or a list of one repeated value), got {v!r}")
    return v


def rope(r: Reader, theta_default: float = 10000.0) -> dict[str, Any]:
    """rope_theta and rope_scaling, from either the config.json keys or transformers 5's
    ``rope_parameters`` (which folds the theta into the scaling dict)."""
    params = r.get("rope_parameters", None)
    scaling = r.get("rope_scaling", None)
    theta = r.get("rope_theta", None)
    if isinstance(params, dict):
        theta = params.get("rope_theta", theta)
        rest = {k: v for k, v in params.items() if k not in ("rope_theta", "partial_rotary_factor")}
        if scaling is None and rest.get("rope_type", rest.get("type", "default")) != "default":
            scaling = rest
    out: dict[str, Any] = {"rope_theta": float(theta) if theta is not None else theta_default}
    if scaling is not None:
        if not isinstance(scaling, dict):
            raise ConfigError(f"{r.where}: 'rope_scaling' must be an object, got {scaling!r}")
        if scaling.get("rope_type", scaling.get("type")) != "default":
            out["rope_scaling"] = {k: v for k, v in scaling.items() if k != "partial_rotary_factor"}
    return out


def partial_rotary_factor(r: Reader, default: float = 1.0) -> float:
    """The rotated share of each head: a top-level key (hub configs) or inside ``rope_parameters``."""
    params = r.get("rope_parameters", None)
    inner = params.get("partial_rotary_factor") if isinstance(params, dict) else None
    v = r.get("partial_rotary_factor", default) if inner is None else inner
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ConfigError(f"{r.where}: 'partial_rotary_factor' must be a number, got {v!r}")
    return float(v)


def placement(n_layers: int, moe_ids: list[int]) -> dict[str, Any]:
    """MoE layer placement in moekit's convention (first_k_dense / moe_every) when it can be
    written that way, else an explicit ``moe_layers`` list."""
    ids = sorted(set(moe_ids))
    first = ids[0]
    every = ids[1] - ids[0] if len(ids) > 1 else n_layers - first
    rule = [i for i in range(n_layers) if i >= first and (i - first) % every == 0]
    if rule == ids:
        return {"first_k_dense": first, "moe_every": every}
    return {"moe_layers": ids}


def common(
    r: Reader, *, head_dim_key: bool = True, eps_default: float = 1e-6, theta_default: float = 10000.0
) -> dict[str, Any]:
    """Fields every decoder-only HF config shares; ``*_default``: the type's config class defaults."""
    d_model = r.int("hidden_size")
    n_heads = r.int("num_attention_heads")
    att: dict[str, Any] = {
        "n_heads": n_heads,
        "n_kv_heads": r.int("num_key_value_heads", n_heads),
        **rope(r, theta_default),
    }
    if head_dim_key:
        att["head_dim"] = r.int("head_dim", None)
    return {
        "vocab_size": r.int("vocab_size"),
        "d_model": d_model,
        "n_layers": r.int("num_hidden_layers"),
        "norm_eps": r.float("rms_norm_eps", eps_default),
        "tie_embeddings": r.bool("tie_word_embeddings", False),
        "max_seq_len": r.int("max_position_embeddings", 4096),
        "attention": att,
    }


def make(r: Reader, base: dict[str, Any], **kw: Any) -> ModelConfig:
    """ModelConfig from ``base`` (see ``common``) plus per-type fields."""
    attention = AttentionConfig(**base.pop("attention"))
    moe = kw.pop("moe", None)
    moe_ids = kw.pop("moe_ids", [])
    if moe is not None and moe_ids:
        moe = MoEConfig(**moe, **placement(base["n_layers"], moe_ids))
    else:
        moe = None
    return ModelConfig(
        **base, **kw, attention=attention, moe=moe, name=str(r.d.get("_name_or_path") or r.d.get("model_type", ""))
    )


def mlp_bias_unsupported(r: Reader) -> None:
    r.reject("mlp_bias", lambda v: v is True, "moekit's dense FFN and experts have no biases (except moe.expert_bias)")
