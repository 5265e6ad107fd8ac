"""Active parameters measured, not assumed: back-propagate from one token and count.

Every other token's hidden state is detached at each block input, so the gradient reaches exactly
the parameters this one token's computation touches: its embedding row, all attention and norm
weights, the router, the shared experts, the dense FFNs, the head, and the top-k routed experts
it chose in each MoE layer. The count must equal the analytic active count (minus the embedding
table, of which a lookup touches one row).
"""

from __future__ import annotations

import pytest
import torch

from moekit.accounting import count_params
from moekit.config import AttentionConfig, ModelConfig, MoEConfig, fine_grained
from moekit.models import MoETransformer


def base(**moe) -> ModelConfig:
    # norm_topk_prob=False: with renormalised top-k weights the unchosen experts' router rows
    # cancel out of the output and get an exactly zero gradient although they were computed.
    spec = dict(n_routed_experts=8, top_k=2, expert_ffn_dim=16, norm_topk_prob=False)
    spec.update(moe)
    return ModelConfig(
        vocab_size=50,
        d_model=24,
        n_layers=4,
        attention=AttentionConfig(n_heads=4, n_kv_heads=2),
        dense_ffn_dim=40,
        moe=MoEConfig(**spec),
    )


CONFIGS = {
    "routed only": base(),
    "with shared experts": base(n_shared_experts=2, shared_ffn_dim=12),
    "with dense layers": base(n_shared_experts=1, first_k_dense=1, moe_every=2),
    "fine-grained x4": fine_grained(base(n_shared_experts=1, first_k_dense=1), 4),
    "sigmoid + groups + qkv bias": base(score_func="sigmoid", n_group=4, topk_group=2).replace(
        attention=AttentionConfig(n_heads=4, n_kv_heads=2, qkv_bias=True, qk_norm="head")
    ),
}


def touched_parameters(model: MoETransformer, ids: torch.Tensor) -> int:
    def detach_others(_module, args):
        x, *rest = args
        return (torch.cat([x[:, :-1].detach(), x[:, -1:]], dim=1), *rest)

    hooks = [block.register_forward_pre_hook(detach_others) for block in model.layers]
    try:
        logits = model(ids).logits[0, -1]
        (logits * torch.randn_like(logits)).sum().backward()
    finally:
        for h in hooks:
            h.remove()
    return sum(int(torch.count_nonzero(p.grad)) for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("name", CONFIGS)
def test_one_token_touches_exactly_the_active_parameters(name):
    cfg = CONFIGS[name]
    torch.manual_seed(3)
    model = MoETransformer(cfg)
    ids = torch.randint(0, cfg.vocab_size, (1, 6))
    touched = touched_parameters(model, ids)
    counts = count_params(cfg)
    expected = counts.active - counts.breakdown["embedding"] + cfg.d_model
    if cfg.moe.score_func == "sigmoid":
        # A sigmoid gate uses no other expert's logit: the unchosen experts' router rows were
        # computed (the router is always active) but receive no gradient.
        n_moe = len(cfg.moe_layer_ids)
        untouched_router_rows = n_moe * (cfg.moe.n_routed_experts - cfg.moe.top_k) * cfg.d_model
        expected -= untouched_router_rows
    assert touched == expected
    # The classic mistake, multiplying the whole model by the number of experts used, is far off.
    assert touched < counts.total
