"""DBRX (``dbrx``): a nested config, fused q/k/v with clamping, LayerNorm without bias, fused experts.

``config.json`` keeps the attention settings in ``attn_config`` (``kv_n_heads``, ``clip_qkv``,
``rope_theta``) and the MoE ones in ``ffn_config`` (``ffn_hidden_size``, ``moe_num_experts``,
``moe_top_k``, ``moe_normalize_expert_weights``: the p of the p-norm the top-k softmax weights are
divided by; 1 is moekit's renormalisation, null none). Every layer is MoE; norms are LayerNorms
without bias (eps 1e-5).

Rotary theta: the top-level ``rope_parameters`` / ``rope_theta`` that transformers 5 writes, else
``attn_config.rope_theta`` (hub checkpoints; transformers 5.24 ignores that key and uses 10000,
which is not what DBRX was trained with), else 10000.

Files: ``transformer.wte``, ``transformer.blocks.{i}.norm_attn_norm.{norm_1, attn.Wqkv, attn.out_proj,
norm_2}``, ``ffn.router.layer``, ``ffn.experts.mlp.{w1, v1, w2}`` (each ``[E * F, D]``; w2 is the
transposed down projection), ``transformer.norm_f``, ``lm_head``. ``Wqkv`` is split into q/k/v at
load and fused back at save.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import Tensor

from moekit.config import ConfigError, ModelConfig
from moekit.interop.types._base import GATE_UP_DOWN, HFLayout, ModelType, UnsupportedError
from moekit.interop.types._reader import Reader, make, rope
from moekit.interop.types._rewrite import pop_experts, rename, split_rows
from moekit.interop.types._writer import all_moe, gqa, require, softmax_router
from moekit.interop.types._writer import common as write_common

ARCHITECTURE = "DbrxForCausalLM"


def _sub(r: Reader, key: str) -> Reader:
    sub = r.get(key, {})
    if not isinstance(sub, dict):
        raise ConfigError(f"{r.where}: '{key}' must be an object, got {sub!r}")
    return Reader(sub, f"{r.where} {key}")


def read(r: Reader) -> ModelConfig:
    att, ffn = _sub(r, "attn_config"), _sub(r, "ffn_config")
    n_heads = r.int("n_heads", 16, "num_attention_heads")
    theta = rope(r, att.float("rope_theta", 10000.0))
    attention = {"n_heads": n_heads, "n_kv_heads": att.int("kv_n_heads", 1), **theta}
    clip = att.get("clip_qkv", None)
    if clip is not None:
        attention["clip_qkv"] = att.float("clip_qkv")
    n_layers = r.int("n_layers", 24, "num_hidden_layers")
    base = {
        "vocab_size": r.int("vocab_size", 32000),
        "d_model": r.int("d_model", 2048, "hidden_size"),
        "n_layers": n_layers,
        "norm_eps": 1e-5,  # nn.LayerNorm's default: DBRX sets none
        "tie_embeddings": r.bool("tie_word_embeddings", False),
        "max_seq_len": r.int("max_seq_len", 2048, "max_position_embeddings"),
        "attention": attention,
    }
    moe = dict(
        n_routed_experts=ffn.int("moe_num_experts", 4),
        top_k=ffn.int("moe_top_k", 1),
        expert_ffn_dim=ffn.int("ffn_hidden_size", 3584),
        norm_topk_prob=ffn.d.get("moe_normalize_expert_weights", 1.0) is not None,
    )
    return make(
        r, base, dense_ffn_dim=moe["expert_ffn_dim"], moe=moe, moe_ids=list(range(n_layers)), norm="layernorm_nobias"
    )


def write(cfg: ModelConfig) -> dict[str, Any]:
    mt = "dbrx"
    moe, out = write_common(cfg, mt, ARCHITECTURE, norm="layernorm_nobias", writes=("attention.clip_qkv",))
    gqa(cfg, mt, "none", "all")
    att = cfg.attention
    require(not att.qkv_bias, "attention.qkv_bias", True, mt, "False")
    require(att.head_dim * att.n_heads == cfg.d_model, "attention.head_dim", att.head_dim, mt, "d_model // n_heads")
    require(cfg.norm_eps == 1e-5, "norm_eps", cfg.norm_eps, mt, "1e-05 (DBRX's LayerNorms use the default)")
    require(not cfg.tie_embeddings, "tie_embeddings", True, mt, "False")
    softmax_router(cfg, moe, mt)
    require(moe.n_shared_experts == 0, "moe.n_shared_experts", moe.n_shared_experts, mt, "0")
    all_moe(cfg, mt)
    rope_keys = {k: out[k] for k in ("rope_theta", "rope_scaling") if k in out}
    return {
        "architectures": [ARCHITECTURE],
        "model_type": mt,
        "vocab_size": cfg.vocab_size,
        "d_model": cfg.d_model,
        "n_heads": att.n_heads,
        "n_layers": cfg.n_layers,
        "max_seq_len": cfg.max_seq_len,
        "tie_word_embeddings": False,
        **rope_keys,
        "attn_config": {"kv_n_heads": att.n_kv_heads, "clip_qkv": att.clip_qkv, "rope_theta": att.rope_theta},
        "ffn_config": {
            "ffn_hidden_size": moe.expert_ffn_dim,
            "moe_num_experts": moe.n_routed_experts,
            "moe_top_k": moe.top_k,
            "moe_normalize_expert_weights": 1.0 if moe.norm_topk_prob else None,
            "ffn_act_fn": {"name": "silu"},
        },
    }


def refuse(d: dict[str, Any]) -> None:
    ffn = d.get("ffn_config") or {}
    p = ffn.get("moe_normalize_expert_weights", 1.0)
    if p is not None and p != 1:
        raise UnsupportedError(
            f"config.json (model_type dbrx): 'ffn_config.moe_normalize_expert_weights' = {p!r} is not supported: "
            "moekit renormalises top-k weights by their sum (p = 1) or not at all (null)"
        )
    act = (ffn.get("ffn_act_fn") or {"name": "silu"}).get("name", "silu")
    if act != "silu":
        raise UnsupportedError(
            f"config.json (model_type dbrx): 'ffn_config.ffn_act_fn' = {act!r} is not supported: "
            "moekit's experts are SwiGLU (silu)"
        )


_BLOCK = r"^transformer\.blocks\.(\d+)\."
_RENAMES = [
    (r"^transformer\.wte\.", "model.embed_tokens."),
    (r"^transformer\.norm_f\.", "model.norm."),
    (_BLOCK + r"norm_attn_norm\.norm_1\.", r"model.layers.\1.input_layernorm."),
    (_BLOCK + r"norm_attn_norm\.norm_2\.", r"model.layers.\1.post_attention_layernorm."),
    (_BLOCK + r"norm_attn_norm\.attn\.out_proj\.", r"model.layers.\1.self_attn.o_proj."),
    (_BLOCK + r"ffn\.router\.layer\.", r"model.layers.\1.mlp.gate."),
]


def from_file(tensors: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    out = rename(tensors, _RENAMES)
    att = cfg.attention
    assert att.head_dim is not None and att.n_kv_heads is not None and cfg.moe is not None
    sizes = [att.n_heads * att.head_dim, att.n_kv_heads * att.head_dim, att.n_kv_heads * att.head_dim]
    e, f = cfg.moe.n_routed_experts, cfg.moe.expert_ffn_dim
    fused = re.compile(_BLOCK + r"(norm_attn_norm\.attn\.Wqkv\.weight|ffn\.experts\.mlp\.(w1|v1|w2))$")
    for name in [n for n in out if fused.match(n)]:
        m = fused.match(name)
        layer, t = f"model.layers.{m.group(1)}.", out[name]
        del out[name]
        if m.group(2).endswith("Wqkv.weight"):
            for proj, part in zip(("q_proj", "k_proj", "v_proj"), split_rows(name, t, sizes), strict=True):
                out[f"{layer}self_attn.{proj}.weight"] = part
            continue
        w_EFD = split_rows(name, t, [e * f])[0].view(e, f, t.shape[1])
        kind = m.group(3)
        for j in range(e):
            hf = {"w1": "gate_proj", "v1": "up_proj", "w2": "down_proj"}[kind]
            out[f"{layer}mlp.experts.{j}.{hf}.weight"] = w_EFD[j].t() if kind == "w2" else w_EFD[j]
    return out


def to_file(tensors: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    out = dict(tensors)
    for i, (gate, up, down) in pop_experts(out, cfg, "mlp", GATE_UP_DOWN).items():
        block = f"transformer.blocks.{i}.ffn.experts.mlp."
        out[block + "w1"] = gate.reshape(-1, gate.shape[-1])
        out[block + "v1"] = up.reshape(-1, up.shape[-1])
        out[block + "w2"] = down.transpose(1, 2).reshape(-1, down.shape[1])
    for i in range(cfg.n_layers):
        attn = f"model.layers.{i}.self_attn."
        qkv = [out.pop(f"{attn}{p}_proj.weight") for p in "qkv"]
        out[f"transformer.blocks.{i}.norm_attn_norm.attn.Wqkv.weight"] = torch.cat(qkv)
    back = [
        (r"^model\.embed_tokens\.", "transformer.wte."),
        (r"^model\.norm\.", "transformer.norm_f."),
        (r"^model\.layers\.(\d+)\.input_layernorm\.", r"transformer.blocks.\1.norm_attn_norm.norm_1."),
        (r"^model\.layers\.(\d+)\.post_attention_layernorm\.", r"transformer.blocks.\1.norm_attn_norm.norm_2."),
        (r"^model\.layers\.(\d+)\.self_attn\.o_proj\.", r"transformer.blocks.\1.norm_attn_norm.attn.out_proj."),
        (r"^model\.layers\.(\d+)\.mlp\.gate\.", r"transformer.blocks.\1.ffn.router.layer."),
    ]
    return rename(out, back)


DBRX = ModelType(
    "dbrx",
    read=read,
    write=write,
    architecture=ARCHITECTURE,
    layout=HFLayout("mlp", GATE_UP_DOWN, from_file=from_file, to_file=to_file),
    refuse=refuse,
    claims=lambda cfg: cfg.norm == "layernorm_nobias",
)
