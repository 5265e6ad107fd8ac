"""``moekit.tracing``: the parameters a token touched, counted from the modules, against the analytic
accounting; expert choices read from the routing; expert load over a corpus."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from moekit.accounting import count_params
from moekit.config import AttentionConfig, ModelConfig, MoEConfig
from moekit.models import MoETransformer
from moekit.tracing import expert_load, module_counts, trace_text
from tests.conftest import small_config

MLA = ModelConfig(
    vocab_size=64,
    d_model=32,
    n_layers=3,
    attention=AttentionConfig(
        n_heads=2, kind="mla", q_lora_rank=16, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8
    ),
    dense_ffn_dim=40,
    moe=MoEConfig(
        n_routed_experts=8,
        top_k=3,
        expert_ffn_dim=8,
        n_shared_experts=1,
        score_func="sigmoid",
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
        selection_bias=True,
        first_k_dense=1,
    ),  # fmt: skip
)
CONFIGS = {
    "shared + dense layer": small_config(),
    "expert biases, tied head": dataclasses.replace(
        small_config(expert_bias=True, n_shared_experts=0), tie_embeddings=True
    ),
    "qwen2-style shared gate": small_config(shared_expert_gate=True, top_k=3),
    "MLA, sigmoid groups": MLA,
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_touched_equals_accounting_active_for_exactly_top_k(name):
    """Every token of a dropless top-k router uses exactly top_k experts per MoE layer, so the
    parameters it touched, counted from the modules, must equal the analytic active count."""
    cfg = CONFIGS[name]
    model = MoETransformer(cfg).eval()
    trace = trace_text(model, torch.randint(0, cfg.vocab_size, (9,)).tolist())
    active = count_params(cfg).active
    assert trace.active_params == active and trace.total_params == count_params(cfg).total
    for tok in trace.tokens:
        assert [len(c.experts) for c in tok.layers] == [cfg.moe.top_k] * len(cfg.moe_layer_ids)
        assert tok.touched_params == active
    # and the module counts are what they say: a routed expert's slice, everything else
    always, per_expert = module_counts(model)
    routed = sum(p.numel() for b in model.layers if b.is_moe for p in b.ffn.experts.parameters())
    assert per_expert * cfg.moe.n_routed_experts * len(cfg.moe_layer_ids) == routed
    assert always + routed == model.num_parameters() == count_params(cfg).total


def test_choices_are_the_routers_highest_weight_first():
    cfg = small_config(top_k=3)
    model = MoETransformer(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (6,))
    trace = trace_text(model, ids.tolist(), decode=lambda i: f"<{i[0]}>")
    with torch.no_grad():
        routing = model(ids[None]).routing
    for t, tok in enumerate(trace.tokens):
        assert tok.text == f"<{ids[t].item()}>"
        for choice, r in zip(tok.layers, routing, strict=True):
            w = r.weights_TK[t]
            assert choice.weights == sorted(choice.weights, reverse=True)
            assert set(choice.experts) == set(r.idx_TK[t].tolist())
            for e, g in zip(choice.experts, choice.weights, strict=True):
                assert g == pytest.approx(w[r.idx_TK[t].tolist().index(e)].item(), abs=1e-6)


def test_capacity_drops_lower_the_touched_count():
    """A dropped assignment computes nothing: each costs exactly one expert's parameters."""
    cfg = small_config(capacity_factor=0.5, top_k=3)
    model = MoETransformer(cfg).eval()
    trace = trace_text(model, torch.randint(0, cfg.vocab_size, (16,)).tolist())
    active = count_params(cfg).active
    dropped = 0
    for tok in trace.tokens:
        missing = sum(cfg.moe.top_k - len(c.experts) for c in tok.layers)
        assert tok.touched_params == active - missing * trace.params_per_expert
        dropped += missing
    assert dropped > 0  # capacity 0.5 must drop some


def test_expert_load_counts_every_assignment():
    cfg = small_config(top_k=2)
    model = MoETransformer(cfg).eval()
    seqs = [torch.randint(0, cfg.vocab_size, (1, n)) for n in (5, 11)]
    loads = expert_load(model, seqs)
    assert [x.layer for x in loads] == cfg.moe_layer_ids
    for load in loads:
        assert sum(load.counts) == 16 * 2 and len(load.counts) == 8
        mean = 32 / 8
        assert load.max_vio == pytest.approx((max(load.counts) - mean) / mean)
        assert load.unused == load.counts.count(0)
