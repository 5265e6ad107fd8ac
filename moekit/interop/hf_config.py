"""Hugging Face ``config.json`` → ``ModelConfig``, and ``load_spec`` for everything a CLI accepts.

Each supported ``model_type`` has one small reader; shared keys go through ``_Reader``, which names
the missing or mistyped key in its error. A field that changes the parameter count and that
``ModelConfig`` cannot express raises ``ConfigError`` naming it (never a silently wrong count).

Not represented, on purpose (they change behaviour, not parameters): sliding-window / chunked
attention layouts, gpt-oss's clamped SwiGLU, PhiMoE's sparsemixer router, Llama 4's no-rope layers
and its L2 q/k norm being applied only on rotary layers, OLMoE's ``clip_qkv``. DeepSeek-V3's
multi-token-prediction module (``num_nextn_predict_layers``) is not part of the model, as in
transformers (the 671B total excludes it).

Sources: transformers' modeling files for each type (5.x), DeepSeek's remote code for
``model_type == "deepseek"`` (DeepSeekMoE, not in transformers).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from moekit.config import AttentionConfig, ConfigError, ModelConfig, MoEConfig
from moekit.presets import PRESETS, get_preset

_MISSING = object()


class _Reader:
    """Typed access to one HF config dict; errors name the key and the model type."""

    def __init__(self, d: dict[str, Any], where: str):
        self.d, self.where = d, where

    def get(self, key: str, default: Any = _MISSING, *aliases: str) -> Any:
        for k in (key, *aliases):
            if k in self.d and self.d[k] is not None:
                return self.d[k]
        if default is _MISSING:
            raise ConfigError(f"{self.where} is missing the key '{key}'")
        return default

    def int(self, key: str, default: Any = _MISSING, *aliases: str) -> Any:
        v = self.get(key, default, *aliases)
        if v is default and default is not _MISSING:
            return v
        if isinstance(v, bool) or not isinstance(v, int):
            raise ConfigError(f"{self.where}: '{key}' must be an integer, got {v!r}")
        return v

    def float(self, key: str, default: Any = _MISSING) -> Any:
        v = self.get(key, default)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ConfigError(f"{self.where}: '{key}' must be a number, got {v!r}")
        return float(v)

    def bool(self, key: str, default: Any = _MISSING) -> bool:
        v = self.get(key, default)
        if not isinstance(v, bool):
            raise ConfigError(f"{self.where}: '{key}' must be true or false, got {v!r}")
        return v

    def int_list(self, key: str, default: Any = _MISSING) -> list[int]:
        v = self.get(key, default)
        if not isinstance(v, list) or any(isinstance(i, bool) or not isinstance(i, int) for i in v):
            raise ConfigError(f"{self.where}: '{key}' must be a list of integers, got {v!r}")
        return list(v)

    def reject(self, key: str, bad: Callable[[Any], bool], why: str) -> None:
        """Raise if ``key`` is present with a value ``bad`` says moekit cannot represent."""
        v = self.d.get(key)
        if v is not None and bad(v):
            raise ConfigError(f"{self.where}: '{key}' = {v!r} is not supported: {why}")


def _rope(r: _Reader) -> dict[str, Any]:
    """rope_theta and rope_scaling, from either the config.json keys or transformers 5's
    ``rope_parameters`` (which folds the theta into the scaling dict)."""
    params = r.get("rope_parameters", None)
    scaling = r.get("rope_scaling", None)
    theta = r.get("rope_theta", None)
    if isinstance(params, dict):
        theta = params.get("rope_theta", theta)
        rest = {k: v for k, v in params.items() if k != "rope_theta"}
        if scaling is None and rest.get("rope_type", rest.get("type", "default")) != "default":
            scaling = rest
    out: dict[str, Any] = {"rope_theta": float(theta) if theta is not None else 10000.0}
    if scaling is not None:
        if not isinstance(scaling, dict):
            raise ConfigError(f"{r.where}: 'rope_scaling' must be an object, got {scaling!r}")
        if scaling.get("rope_type", scaling.get("type")) != "default":
            out["rope_scaling"] = dict(scaling)
    return out


def _placement(n_layers: int, moe_ids: list[int]) -> dict[str, Any]:
    """MoE layer placement in moekit's convention (first_k_dense / moe_every) when it can be
    written that way, else an explicit ``moe_layers`` list."""
    ids = sorted(set(moe_ids))
    first = ids[0]
    every = ids[1] - ids[0] if len(ids) > 1 else n_layers - first
    rule = [i for i in range(n_layers) if i >= first and (i - first) % every == 0]
    if rule == ids:
        return {"first_k_dense": first, "moe_every": every}
    return {"moe_layers": ids}


def _common(r: _Reader, *, head_dim_key: bool = True) -> dict[str, Any]:
    """Fields every decoder-only HF config shares."""
    d_model = r.int("hidden_size")
    n_heads = r.int("num_attention_heads")
    att: dict[str, Any] = {"n_heads": n_heads, "n_kv_heads": r.int("num_key_value_heads", n_heads), **_rope(r)}
    if head_dim_key:
        att["head_dim"] = r.int("head_dim", None)
    return {
        "vocab_size": r.int("vocab_size"),
        "d_model": d_model,
        "n_layers": r.int("num_hidden_layers"),
        "norm_eps": r.float("rms_norm_eps", 1e-6),
        "tie_embeddings": r.bool("tie_word_embeddings", False),
        "max_seq_len": r.int("max_position_embeddings", 4096),
        "attention": att,
    }


def _make(r: _Reader, base: dict[str, Any], **kw: Any) -> ModelConfig:
    """ModelConfig from ``base`` (see ``_common``) plus per-type fields."""
    attention = AttentionConfig(**base.pop("attention"))
    moe = kw.pop("moe", None)
    moe_ids = kw.pop("moe_ids", [])
    if moe is not None and moe_ids:
        moe = MoEConfig(**moe, **_placement(base["n_layers"], moe_ids))
    else:
        moe = None
    return ModelConfig(
        **base, **kw, attention=attention, moe=moe, name=str(r.d.get("_name_or_path") or r.d.get("model_type", ""))
    )


def _mlp_bias_unsupported(r: _Reader) -> None:
    r.reject("mlp_bias", lambda v: v is True, "moekit's dense FFN and experts have no biases (except moe.expert_bias)")


# Readers, one per model_type ------------------------------------------------------------------


def _llama(r: _Reader) -> ModelConfig:
    """llama / mistral / qwen2 / qwen3: dense baselines."""
    _mlp_bias_unsupported(r)
    base = _common(r)
    mt = r.d.get("model_type")
    bias = r.bool("attention_bias", False)
    if mt == "qwen2":  # q/k/v biases, no o bias
        base["attention"].update(qkv_bias=True)
    else:
        base["attention"].update(qkv_bias=bias, o_bias=bias)
    if mt == "qwen3":
        base["attention"]["qk_norm"] = "head"
    return _make(r, base, dense_ffn_dim=r.int("intermediate_size"))


def _mixtral(r: _Reader) -> ModelConfig:
    base = _common(r)
    e = r.int("num_local_experts", _MISSING, "num_experts")
    moe = dict(n_routed_experts=e, top_k=r.int("num_experts_per_tok"), expert_ffn_dim=r.int("intermediate_size"))
    return _make(r, base, dense_ffn_dim=r.int("intermediate_size"), moe=moe, moe_ids=list(range(base["n_layers"])))


def _qwen_moe_ids(r: _Reader, n_layers: int, n_experts: int) -> list[int]:
    """Qwen2/3-MoE: layer i is MoE iff i not in mlp_only_layers, num_experts > 0 and
    (i + 1) % decoder_sparse_step == 0 (transformers' Qwen2MoeDecoderLayer)."""
    dense = set(r.int_list("mlp_only_layers", []))
    step = r.int("decoder_sparse_step", 1)
    if step < 1:
        raise ConfigError(f"{r.where}: 'decoder_sparse_step' must be >= 1, got {step}")
    if n_experts <= 0:
        return []
    return [i for i in range(n_layers) if i not in dense and (i + 1) % step == 0]


def _qwen2_moe(r: _Reader) -> ModelConfig:
    base = _common(r)
    base["attention"]["qkv_bias"] = r.bool("qkv_bias", True)  # Qwen2: q/k/v biased, o not
    e = r.int("num_experts", 0, "num_local_experts")
    shared = r.int("shared_expert_intermediate_size", 0)
    if e > 0 and shared <= 0:
        # transformers still builds the sigmoid gate (d parameters) around a width-0 expert.
        raise ConfigError(f"{r.where}: 'shared_expert_intermediate_size' = {shared} is not supported (need > 0)")
    moe = dict(
        n_routed_experts=max(e, 1),
        top_k=r.int("num_experts_per_tok", 1),
        expert_ffn_dim=r.int("moe_intermediate_size", 1),
        n_shared_experts=1,
        shared_ffn_dim=shared if shared > 0 else None,
        shared_expert_gate=True,
        norm_topk_prob=r.bool("norm_topk_prob", False),
    )
    ids = _qwen_moe_ids(r, base["n_layers"], e)
    return _make(r, base, dense_ffn_dim=r.int("intermediate_size"), moe=moe if ids else None, moe_ids=ids)


def _qwen3_moe(r: _Reader) -> ModelConfig:
    base = _common(r)
    bias = r.bool("attention_bias", False)
    base["attention"].update(qkv_bias=bias, o_bias=bias, qk_norm="head")
    e = r.int("num_experts", 0, "num_local_experts")
    moe = dict(
        n_routed_experts=max(e, 1),
        top_k=r.int("num_experts_per_tok", 1),
        expert_ffn_dim=r.int("moe_intermediate_size", 1),
        norm_topk_prob=r.bool("norm_topk_prob", False),
    )
    ids = _qwen_moe_ids(r, base["n_layers"], e)
    return _make(r, base, dense_ffn_dim=r.int("intermediate_size"), moe=moe if ids else None, moe_ids=ids)


def _olmoe(r: _Reader) -> ModelConfig:
    base = _common(r)
    bias = r.bool("attention_bias", False)
    r.reject(
        "head_dim", lambda v: v != base["d_model"] // base["attention"]["n_heads"], "OLMoE's q_norm is hidden_size wide"
    )
    base["attention"].update(qkv_bias=bias, o_bias=bias, qk_norm="full")
    moe = dict(
        n_routed_experts=r.int("num_experts", _MISSING, "num_local_experts"),
        top_k=r.int("num_experts_per_tok"),
        expert_ffn_dim=r.int("intermediate_size"),
        norm_topk_prob=r.bool("norm_topk_prob", False),
    )
    return _make(r, base, dense_ffn_dim=r.int("intermediate_size"), moe=moe, moe_ids=list(range(base["n_layers"])))


def _deepseek_moe_ids(r: _Reader, n_layers: int) -> list[int]:
    """DeepSeek's rule (modeling_deepseek.py): layer i is MoE iff n_routed_experts is set,
    i >= first_k_dense_replace and i % moe_layer_freq == 0."""
    if r.int("n_routed_experts", 0) <= 0:
        return []
    first = r.int("first_k_dense_replace", 0)
    freq = r.int("moe_layer_freq", 1)
    if freq < 1:
        raise ConfigError(f"{r.where}: 'moe_layer_freq' must be >= 1, got {freq}")
    return [i for i in range(n_layers) if i >= first and i % freq == 0]


def _deepseek_moe_fields(r: _Reader) -> dict[str, Any]:
    n_shared = r.int("n_shared_experts", 0)
    # transformers' DeepseekV3 always scores with a sigmoid, and configs it writes have no scoring_func.
    score = r.get("scoring_func", "sigmoid" if r.d.get("model_type") == "deepseek_v3" else "softmax")
    if score not in ("softmax", "sigmoid"):
        raise ConfigError(f"{r.where}: 'scoring_func' = {score!r} is not supported (softmax or sigmoid)")
    return dict(
        n_routed_experts=r.int("n_routed_experts", 1),
        top_k=r.int("num_experts_per_tok", 1),
        expert_ffn_dim=r.int("moe_intermediate_size", 1),
        n_shared_experts=n_shared,
        score_func=score,
        norm_topk_prob=r.bool("norm_topk_prob", False),
        routed_scaling_factor=r.float("routed_scaling_factor", 1.0),
    )


def _deepseek(r: _Reader) -> ModelConfig:
    """DeepSeekMoE (model_type "deepseek", trust_remote_code): LLaMA attention + DeepSeekMoE FFN."""
    _mlp_bias_unsupported(r)
    base = _common(r)
    bias = r.bool("attention_bias", False)
    base["attention"].update(qkv_bias=bias, o_bias=bias)
    ids = _deepseek_moe_ids(r, base["n_layers"])
    return _make(r, base, dense_ffn_dim=r.int("intermediate_size"), moe=_deepseek_moe_fields(r), moe_ids=ids)


def _deepseek_v2(r: _Reader) -> ModelConfig:
    """DeepSeek-V2 / V2-Lite / V3: multi-head latent attention + DeepSeekMoE."""
    _mlp_bias_unsupported(r)
    base = _common(r, head_dim_key=False)
    mt = r.d.get("model_type")
    q_lora = r.int("q_lora_rank", None)
    if q_lora == 0:  # DeepSeek's own inference configs write 0 for "no q compression"
        q_lora = None
    base["attention"] = {
        "n_heads": base["attention"]["n_heads"],
        "kind": "mla",
        "q_lora_rank": q_lora,
        "kv_lora_rank": r.int("kv_lora_rank"),
        "qk_nope_head_dim": r.int("qk_nope_head_dim"),
        "qk_rope_head_dim": r.int("qk_rope_head_dim"),
        "v_head_dim": r.int("v_head_dim"),
        "mla_bias": r.bool("attention_bias", False),
        # DeepSeek's checkpoints store rotary pairs interleaved (V2's complex rotary, V3's flag).
        "rope_interleave": r.bool("rope_interleave", True),
        "rope_theta": base["attention"]["rope_theta"],
        "rope_scaling": base["attention"].get("rope_scaling"),
    }
    moe = _deepseek_moe_fields(r)
    method = r.get("topk_method", "noaux_tc" if mt == "deepseek_v3" else "greedy")
    if method not in ("greedy", "group_limited_greedy", "noaux_tc"):
        raise ConfigError(
            f"{r.where}: 'topk_method' = {method!r} is not supported (greedy, group_limited_greedy, noaux_tc)"
        )
    if method != "greedy":
        # V2 ranks groups by their best expert, V3 by the sum of their two best.
        group_score = "max" if method == "group_limited_greedy" else "top2_sum"
        moe.update(n_group=r.int("n_group", 1), topk_group=r.int("topk_group", 1), group_score=group_score)
    # noaux_tc: DeepSeek-V3's e_score_correction_bias, a buffer steering selection only.
    moe["selection_bias"] = method == "noaux_tc"
    ids = _deepseek_moe_ids(r, base["n_layers"])
    return _make(r, base, dense_ffn_dim=r.int("intermediate_size"), moe=moe, moe_ids=ids)


def _gpt_oss(r: _Reader) -> ModelConfig:
    base = _common(r)
    bias = r.bool("attention_bias", True)
    base["attention"].update(qkv_bias=bias, o_bias=bias, sinks=True)
    moe = dict(
        n_routed_experts=r.int("num_local_experts", _MISSING, "num_experts"),
        top_k=r.int("num_experts_per_tok", _MISSING, "experts_per_token"),
        expert_ffn_dim=r.int("intermediate_size"),
        router_bias=True,
        expert_bias=True,
    )
    return _make(r, base, dense_ffn_dim=r.int("intermediate_size"), moe=moe, moe_ids=list(range(base["n_layers"])))


def _phimoe(r: _Reader) -> ModelConfig:
    base = _common(r)
    bias = r.bool("attention_bias", False)
    base["attention"].update(qkv_bias=bias, o_bias=bias)
    moe = dict(
        n_routed_experts=r.int("num_local_experts", _MISSING, "num_experts"),
        top_k=r.int("num_experts_per_tok"),
        expert_ffn_dim=r.int("intermediate_size"),
    )
    return _make(
        r,
        base,
        dense_ffn_dim=r.int("intermediate_size"),
        moe=moe,
        moe_ids=list(range(base["n_layers"])),
        norm="layernorm",
        lm_head_bias=r.bool("lm_head_bias", False),
    )


def _llama4_text(r: _Reader) -> ModelConfig:
    base = _common(r)
    bias = r.bool("attention_bias", False)
    base["attention"].update(qkv_bias=bias, o_bias=bias, qk_norm="l2" if r.bool("use_qk_norm", True) else "none")
    n_layers = base["n_layers"]
    ids = r.int_list("moe_layers", None) if r.get("moe_layers", None) is not None else None
    if ids is None:
        step = r.int("interleave_moe_layer_step", 1)
        if step < 1:
            raise ConfigError(f"{r.where}: 'interleave_moe_layer_step' must be >= 1, got {step}")
        ids = list(range(step - 1, n_layers, step))  # transformers' Llama4TextConfig
    f = r.int("intermediate_size")
    moe = dict(
        n_routed_experts=r.int("num_local_experts", _MISSING, "num_experts"),
        top_k=r.int("num_experts_per_tok", 1),
        expert_ffn_dim=f,
        n_shared_experts=1,  # Llama4TextMoe.shared_expert, as wide as a routed expert
        shared_ffn_dim=f,
        score_func="sigmoid",
        norm_topk_prob=False,
    )
    return _make(r, base, dense_ffn_dim=r.int("intermediate_size_mlp", f), moe=moe, moe_ids=ids)


_READERS: dict[str, Callable[[_Reader], ModelConfig]] = {
    "deepseek": _deepseek,
    "deepseek_v2": _deepseek_v2,
    "deepseek_v3": _deepseek_v2,
    "gpt_oss": _gpt_oss,
    "llama": _llama,
    "llama4": _llama4_text,  # the text part of the multimodal config (see config_from_hf)
    "llama4_text": _llama4_text,
    "mistral": _llama,
    "mixtral": _mixtral,
    "olmoe": _olmoe,
    "phimoe": _phimoe,
    "qwen2": _llama,
    "qwen2_moe": _qwen2_moe,
    "qwen3": _llama,
    "qwen3_moe": _qwen3_moe,
}
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(sorted(_READERS))


def config_from_hf(d: dict[str, Any], where: str = "Hugging Face config") -> ModelConfig:
    """A ``ModelConfig`` from a Hugging Face ``config.json`` dict (see ``SUPPORTED_MODEL_TYPES``).

    A multimodal ``llama4`` config is read from its ``text_config`` (the vision tower is not
    counted). Raises ``ConfigError`` for an unknown ``model_type`` or any field that would change
    the parameter count and cannot be represented.
    """
    if not isinstance(d, dict):
        raise ConfigError(f"{where} must be a JSON object")
    model_type = d.get("model_type")
    if model_type is None:
        raise ConfigError(f"{where} has no 'model_type'; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    if model_type not in _READERS:
        raise ConfigError(
            f"{where}: unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    if model_type == "llama4":
        text = d.get("text_config")
        if not isinstance(text, dict):
            raise ConfigError(f"{where}: model_type 'llama4' needs a 'text_config' object")
        text = {**text, "model_type": "llama4_text"}
        for key in ("tie_word_embeddings", "_name_or_path"):
            if key in d and key not in text:
                text[key] = d[key]
        d, model_type = text, "llama4_text"
    return _READERS[model_type](_Reader(d, f"{where} (model_type {model_type})"))


# SPEC resolution ----------------------------------------------------------------------------


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"config file {path} is not valid JSON: {e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {path}: {e}") from None


def load_spec(spec: str) -> ModelConfig:
    """Resolve a model SPEC: a preset name, a moekit config JSON (``ModelConfig.to_dict`` form),
    a Hugging Face ``config.json``, or a folder holding a ``config.json``.

    A file is a Hugging Face config when it has ``model_type``, a moekit config when it has
    ``d_model``. Every failure is a ``ConfigError`` naming the preset or file.
    """
    if spec in PRESETS:
        return get_preset(spec)
    path = Path(spec)
    if path.is_dir():
        path = path / "config.json"
        if not path.is_file():
            raise ConfigError(f"folder {spec} has no config.json")
    elif not path.exists():
        if path.suffix == ".json" or "/" in spec or "\\" in spec:
            raise ConfigError(f"config file {spec} does not exist")
        get_preset(spec)  # raises: unknown preset, listing the known names
    data = _read_json(path)
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a JSON object")
    if "model_type" in data:
        cfg = config_from_hf(data, where=f"config file {path}")
        if not data.get("_name_or_path"):  # name it after its folder (or file), not its type
            cfg.name = path.parent.name if path.name == "config.json" else path.stem
        return cfg
    if "d_model" in data:
        try:
            cfg = ModelConfig.from_dict(data)
        except ConfigError as e:
            raise ConfigError(f"config file {path}: {e}") from None
        if not cfg.name:
            cfg.name = path.stem if path.name != "config.json" else path.parent.name
        return cfg
    raise ConfigError(
        f"config file {path} is neither a moekit config (no 'd_model') nor a Hugging Face config.json (no 'model_type')"
    )


__all__ = ["SUPPORTED_MODEL_TYPES", "config_from_hf", "load_spec"]
