"""Snowflake Arctic (``arctic``, remote code, not in transformers): a dense transformer with a
residual MoE beside it: every layer has attention, a dense "residual" SwiGLU MLP as wide as the
model (``hidden_size``), and (every ``moe_layer_frequency`` layers) top-k routed experts of
``intermediate_size`` (else a dense MLP of that width), with its own pre-norm for the residual MLP.

Sources: Snowflake's ``modeling_arctic.py`` (``ArcticMLP(is_residual_mlp=True)`` is
``hidden_size`` wide) and the Arctic model card ("a 10B dense transformer model with a residual
128×3.66B MoE MLP ... 480B total and 17B active parameters").
"""

from __future__ import annotations

from moekit.accounting import Component, Counted, Term, count_extended
from moekit.interop.types._base import ModelType
from moekit.interop.types._reader import MISSING, Reader, common, make


def account(r: Reader) -> Counted:
    base = common(r)
    n = base["n_layers"]
    every = r.int("moe_layer_frequency", 2)
    moe = dict(
        n_routed_experts=r.int("num_local_experts", MISSING, "num_experts"),
        top_k=r.int("num_experts_per_tok"),
        expert_ffn_dim=r.int("intermediate_size"),
    )
    ids = [i for i in range(n) if (i + 1) % every == 0] if moe["n_routed_experts"] > 1 else []
    cfg = make(r, base, dense_ffn_dim=r.int("intermediate_size"), moe=moe if ids else None, moe_ids=ids)
    d = cfg.d_model
    extra = []
    if r.bool("parallel_attn_mlp_res", False):
        extra.append(
            Component(
                "residual_mlp",
                n,
                f"{n} layers",
                (Term("w1,w3,w2", (3, d, d)), Term("residual_norm", (d,), matmul=False)),
            )
        )
    return count_extended(cfg, extra)


ARCTIC = ModelType("arctic", account=account)
