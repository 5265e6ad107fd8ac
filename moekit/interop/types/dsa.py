"""DeepSeek sparse attention (DSA) models: DeepSeek-V3.2 (``deepseek_v32``) and GLM-5
(``glm_moe_dsa``): DeepSeek-V3's MLA + MoE with a lightning indexer in every layer's attention,
which picks the ``index_topk`` tokens each query attends to.

The indexer holds ``wq_b`` (q_lora_rank → index_n_heads · index_head_dim), ``wk`` (d →
index_head_dim), a LayerNorm over the indexer key (weight and bias) and ``weights_proj`` (d →
index_n_heads); it is counted as the ``indexer`` component (moekit cannot build it). MoE layers
follow ``mlp_layer_types`` ("dense" / "sparse") when given, else ``first_k_dense_replace``.
Sources: transformers' ``modeling_deepseek_v32.py`` and ``modeling_glm_moe_dsa.py``.
"""

from __future__ import annotations

from moekit.accounting import Component, Counted, Term, count_extended
from moekit.interop.types._base import ModelType
from moekit.interop.types._reader import Reader
from moekit.interop.types.deepseek import mtp_extras
from moekit.interop.types.deepseek_v2 import read_mla_v3


def account(r: Reader) -> Counted:
    cfg = read_mla_v3(r)
    d, a = cfg.d_model, cfg.attention
    h, hd = r.int("index_n_heads"), r.int("index_head_dim")
    q_in = a.q_lora_rank if a.q_lora_rank is not None else d
    indexer = Component(
        "indexer",
        cfg.n_layers,
        f"{cfg.n_layers} layers",
        (
            Term("wq_b", (q_in, h, hd)),
            Term("wk", (d, hd)),
            Term("k_norm", (2, hd), matmul=False),
            Term("weights_proj", (d, h)),
        ),
    )
    return count_extended(cfg, [indexer, *mtp_extras(r, cfg)])


DEEPSEEK_V32 = ModelType("deepseek_v32", account=account)
GLM_MOE_DSA = ModelType("glm_moe_dsa", account=account)
