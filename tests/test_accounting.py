"""Analytic accounting against external truth: published figures, transformers' own models built
on the meta device, moekit's MoETransformer, and hand-worked small examples."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moekit.accounting import (
    COMPONENTS,
    VENDOR_ACTIVE_CONVENTION,
    account,
    count_flops,
    count_params,
    kv_cache_bytes_per_token,
    kv_cache_values_per_token,
    weights_bytes,
)
from moekit.config import AttentionConfig, ConfigError, ModelConfig, MoEConfig, fine_grained
from moekit.interop.hf_config import config_from_hf
from moekit.presets import get_preset
from tests.conftest import small_config

HF_CONFIGS = Path(__file__).parent / "data" / "hf_configs"


def hf_json(name: str) -> dict:
    return json.loads((HF_CONFIGS / f"{name}.json").read_text())


def published(ours: int, figure: float, decimals: int, mode: str = "round") -> bool:
    """Does ``ours`` (in parameters or FLOPs) read as ``figure`` (in billions / T) at the published
    precision? ``mode="cut"`` for figures that were truncated rather than rounded."""
    scaled = ours / 1e9 if figure < 1e4 else ours
    if mode == "cut":
        return math.floor(scaled * 10**decimals + 1e-9) == round(figure * 10**decimals)
    return round(scaled, decimals) == pytest.approx(figure)


# Published totals -------------------------------------------------------------------------------

# (preset, published total in billions, decimals, source)
PUBLISHED_TOTALS = [
    ("mixtral-8x7b", 46.7, 1, "Mixtral paper / Mistral blog"),
    ("mixtral-8x22b", 141, 0, "Mistral blog"),
    ("deepseek-moe-2b", 2.0, 1, "DeepSeekMoE paper Table 1 (reconstructed config)"),
    ("deepseek-moe-16b", 16.4, 1, "DeepSeekMoE paper"),
    ("deepseek-moe-145b", 144.6, 1, "DeepSeekMoE paper Appendix A (reconstructed config)"),
    ("deepseek-v2", 236, 0, "DeepSeek-V2 paper"),
    ("deepseek-v2-lite", 15.7, 1, "DeepSeek-V2 paper Appendix B"),
    ("deepseek-v3", 671, 0, "DeepSeek-V3 paper (MTP module excluded)"),
    ("qwen1.5-moe-a2.7b", 14.3, 1, "Qwen1.5-MoE blog"),
    ("qwen3-30b-a3b", 30.5, 1, "Qwen3-30B-A3B model card"),
    ("olmoe-1b-7b", 6.9, 1, "OLMoE paper"),
    ("gpt-oss-20b", 20.91, 2, "gpt-oss model card Table 1"),
    ("gpt-oss-120b", 116.83, 2, "gpt-oss model card Table 1"),
    ("phi-3.5-moe", 41.9, 1, "Phi-3.5-MoE model card"),
    ("llama2-7b", 6.7, 1, "Llama 2 paper"),
    ("deepseek-llm-7b", 6.9, 1, "DeepSeekMoE paper Table 3 (DeepSeek 7B)"),
]


@pytest.mark.parametrize("preset, figure, decimals, source", PUBLISHED_TOTALS, ids=[t[0] for t in PUBLISHED_TOTALS])
def test_published_totals(preset, figure, decimals, source):
    total = count_params(get_preset(preset)).total
    assert published(total, figure, decimals), f"{preset}: ours {total / 1e9:.3f}B vs {figure}B ({source})"


# Published active parameters, each under its vendor's convention ----------------------------------

# (preset, published active in billions, decimals, vendor, rounding)
PUBLISHED_ACTIVE = [
    ("mixtral-8x7b", 12.9, 1, "mistral", "round"),
    ("mixtral-8x22b", 39, 0, "mistral", "round"),
    ("deepseek-moe-2b", 0.3, 1, "deepseek-moe", "round"),
    ("deepseek-moe-16b", 2.8, 1, "deepseek-moe", "round"),
    ("deepseek-moe-145b", 22.2, 1, "deepseek-moe", "round"),
    ("deepseek-v2", 21, 0, "deepseek-v2", "round"),
    ("deepseek-v2-lite", 2.4, 1, "deepseek-v2", "cut"),  # 2.451B: published cut, not rounded
    ("deepseek-v3", 37, 0, "deepseek-v3", "round"),
    ("qwen1.5-moe-a2.7b", 2.7, 1, "qwen", "round"),
    ("qwen3-30b-a3b", 3.3, 1, "qwen", "cut"),  # 3.353B: published cut, not rounded
    ("olmoe-1b-7b", 1.3, 1, "olmoe", "round"),
    ("gpt-oss-20b", 3.61, 2, "openai", "round"),
    ("gpt-oss-120b", 5.13, 2, "openai", "round"),
    ("phi-3.5-moe", 6.6, 1, "microsoft", "round"),
    ("llama-4-scout", 17, 0, "meta", "round"),
    ("llama-4-maverick", 17, 0, "meta", "round"),
]


@pytest.mark.parametrize(
    "preset, figure, decimals, vendor, mode", PUBLISHED_ACTIVE, ids=[t[0] for t in PUBLISHED_ACTIVE]
)
def test_published_active_counts(preset, figure, decimals, vendor, mode):
    p = count_params(get_preset(preset))
    convention = VENDOR_ACTIVE_CONVENTION[vendor]
    active = p.active_by(convention)
    assert published(active, figure, decimals, mode), f"{preset}: ours {active / 1e9:.3f}B ({convention}) vs {figure}B"


@pytest.mark.parametrize(
    "preset, figure, decimals",
    [
        # Where the two conventions read differently, only the vendor's one matches: the table in
        # accounting.VENDOR_ACTIVE_CONVENTION is a finding, not a guess.
        ("mixtral-8x7b", 12.9, 1),
        ("deepseek-moe-16b", 2.8, 1),
        ("deepseek-v3", 37, 0),
        ("olmoe-1b-7b", 1.3, 1),
        ("qwen1.5-moe-a2.7b", 2.7, 1),
        ("gpt-oss-20b", 3.61, 2),
        ("gpt-oss-120b", 5.13, 2),
        ("phi-3.5-moe", 6.6, 1),
        ("llama-4-scout", 17, 0),
    ],
)
def test_only_the_vendor_convention_matches(preset, figure, decimals):
    p = count_params(get_preset(preset))
    matching = {
        c for c in ("all", "no_input_embedding", "non_embedding") if published(p.active_by(c), figure, decimals)
    }
    assert len(matching) == 1, matching


def test_llama4_published_totals_include_the_vision_tower():
    """Scout "109B" and Maverick "400B" count the whole multimodal model; the text part (what moekit
    builds) is 107.8B and 400.7B. transformers' full model on the meta device closes the gap
    (108.6B and 401.6B; Maverick's figure is given to the nearest ten billion)."""
    transformers = pytest.importorskip("transformers")
    for name, preset, figure, unit in [
        ("llama-4-scout-17b-16e", "llama-4-scout", 109, 1e9),
        ("llama-4-maverick-17b-128e", "llama-4-maverick", 400, 1e10),
    ]:
        cfg = transformers.AutoConfig.for_model(**hf_json(name))
        with torch.device("meta"):
            full = sum(p.numel() for p in transformers.AutoModel.from_config(cfg).parameters())
        text = count_params(get_preset(preset)).total
        assert round(full / unit) * unit == figure * 1e9
        assert text < full < text * 1.01


# transformers' own models as the oracle ------------------------------------------------------------

TRANSFORMERS_CONFIGS = sorted(p.stem for p in HF_CONFIGS.glob("*.json") if hf_json(p.stem)["model_type"] != "deepseek")


def _transformers_model(d: dict):
    transformers = pytest.importorskip("transformers")
    d = {k: v for k, v in d.items() if not k.startswith("_")}
    if d["model_type"] == "llama4":  # the text model only; vision is not part of moekit
        d = d["text_config"]
    cfg = transformers.AutoConfig.for_model(**d)
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(cfg)


@pytest.mark.parametrize("name", TRANSFORMERS_CONFIGS)
def test_total_equals_transformers_model(name):
    """Build the real architecture from its published config.json on the meta device and compare
    exactly: the total, the embedding and head, and the routed experts (transformers 5 stores them
    fused under ``.experts.``) that the active count is derived from. DeepSeek-V3's MTP layer and
    its e_score_correction_bias buffer are not parameters of the transformers model either."""
    d = hf_json(name)
    model = _transformers_model(d)
    p = count_params(config_from_hf(d))
    named = dict(model.named_parameters())
    assert p.total == sum(t.numel() for t in named.values())
    assert p.breakdown["embedding"] == model.get_input_embeddings().weight.numel()
    assert p.breakdown["lm_head"] == sum(t.numel() for t in model.get_output_embeddings().parameters())
    assert p.breakdown["routed_experts"] == sum(t.numel() for n, t in named.items() if ".experts." in n)


# moekit's own model as the oracle, feature by feature ----------------------------------------------


def _cfg(attention: dict | None = None, moe: dict | None = None, dense: bool = False, **top) -> ModelConfig:
    att = dict(n_heads=4, n_kv_heads=2)
    att.update(attention or {})
    moe_kw = dict(n_routed_experts=6, top_k=2, expert_ffn_dim=20, n_shared_experts=1, first_k_dense=1)
    moe_kw.update(moe or {})
    kw = dict(vocab_size=53, d_model=32, n_layers=3, dense_ffn_dim=40)
    kw.update(top)
    return ModelConfig(attention=AttentionConfig(**att), moe=None if dense else MoEConfig(**moe_kw), **kw)


FEATURES = {
    "plain": _cfg(),
    "dense": _cfg(dense=True),
    "qkv-o-bias": _cfg(attention=dict(qkv_bias=True, o_bias=True)),
    "qk-norm-head": _cfg(attention=dict(qk_norm="head")),
    "qk-norm-full": _cfg(attention=dict(qk_norm="full")),
    "qk-norm-l2": _cfg(attention=dict(qk_norm="l2")),
    "sinks": _cfg(attention=dict(sinks=True)),
    "head-dim": _cfg(attention=dict(head_dim=12)),
    "mla": _cfg(
        attention=dict(kind="mla", q_lora_rank=16, kv_lora_rank=8, qk_nope_head_dim=6, qk_rope_head_dim=4, v_head_dim=5)
    ),
    "mla-no-q-lora-bias": _cfg(
        attention=dict(
            kind="mla",
            q_lora_rank=None,
            kv_lora_rank=8,
            qk_nope_head_dim=6,
            qk_rope_head_dim=4,
            v_head_dim=5,
            mla_bias=True,
        )
    ),
    "mla-bias": _cfg(attention=dict(kind="mla", q_lora_rank=16, kv_lora_rank=8, mla_bias=True)),
    "layernorm-head-bias": _cfg(norm="layernorm", lm_head_bias=True),
    "tied": _cfg(tie_embeddings=True),
    "tied-head-bias": _cfg(tie_embeddings=True, lm_head_bias=True),
    "router-expert-bias": _cfg(moe=dict(router_bias=True, expert_bias=True, n_shared_experts=0)),
    "shared-gate": _cfg(moe=dict(n_shared_experts=2, shared_ffn_dim=24, shared_expert_gate=True)),
    "selection-bias-buffer": _cfg(moe=dict(selection_bias=True, score_func="sigmoid", n_group=2, topk_group=1)),
    "explicit-moe-layers": _cfg(moe=dict(moe_layers=[0, 2]), n_layers=4),
    "moe-every": _cfg(moe=dict(first_k_dense=0, moe_every=2), n_layers=5),
    "router-switch": _cfg(moe=dict(router="switch", top_k=1)),
    "router-noisy-topk": _cfg(moe=dict(router="noisy_topk", router_bias=True)),
    "router-hash": _cfg(moe=dict(router="hash")),
    "router-expert-choice": _cfg(moe=dict(router="expert_choice")),
}


@pytest.mark.filterwarnings("ignore:router='expert_choice' is not causal")
@pytest.mark.parametrize("name", list(FEATURES))
def test_total_equals_moekit_model(name):
    from moekit.models import MoETransformer

    cfg = FEATURES[name]
    with torch.device("meta"):
        model = MoETransformer(cfg)
    assert count_params(cfg).total == sum(p.numel() for p in model.parameters())


def test_hand_worked_small_model():
    """conftest's small_config: V=97, d=32, 3 layers (first dense), 4 heads / 2 kv heads of 8,
    dense FFN 48, 8 routed experts of 24 (top-2) + 1 shared of 24, untied."""
    p = count_params(small_config())
    expected = {
        "embedding": 97 * 32,
        "attention": 3 * (32 * 32 + 32 * 16 + 32 * 16 + 32 * 32),
        "norms": 3 * 2 * 32 + 32,
        "routers": 2 * 8 * 32,
        "shared_experts": 2 * 3 * 32 * 24,
        "routed_experts": 2 * 8 * 3 * 32 * 24,
        "dense_ffn": 1 * 3 * 32 * 48,
        "lm_head": 97 * 32,
        "routed_experts_active": 2 * 2 * 3 * 32 * 24,
    }
    assert p.breakdown == expected
    assert p.total == 62240
    assert p.active == 62240 - 2 * 8 * 3 * 32 * 24 + 2 * 2 * 3 * 32 * 24 == 34592
    # matmul weights: attention + router + shared + 2 routed experts + dense, + the head (no embedding)
    assert p.matmul_active == 9216 + 512 + 4608 + 4 * 2304 + 4608 + 97 * 32
    f = count_flops(small_config(), 16)
    assert f.attention_per_token == 2 * 3 * 4 * (8 + 8) * 16
    assert f.forward_per_token == 2 * p.matmul_active + f.attention_per_token
    assert f.train_per_sequence == 3 * f.forward_per_token * 16
    causal = count_flops(small_config(), 16, causal=True)
    assert causal.attention_per_token == 3 * 4 * (8 + 8) * 17  # mean causal context (16 + 1) / 2


def test_tied_embeddings_count_the_matrix_once():
    untied, tied = count_params(_cfg()), count_params(_cfg(tie_embeddings=True))
    assert tied.breakdown["lm_head"] == 0
    assert tied.total == untied.total - 53 * 32
    assert tied.matmul_active == untied.matmul_active  # the head still multiplies every token
    assert tied.active_by("no_input_embedding") == tied.active  # the shared matrix is the head
    assert tied.active_by("non_embedding") == tied.active - 53 * 32


# FLOPs ------------------------------------------------------------------------------------------


def test_deepseekmoe_flops_per_sequence():
    """DeepSeekMoE paper: "FLOPs per 2K tokens" (2B, Table 1) and "per 4K tokens" (16B, 145B and
    the dense 7B baselines). Its convention is training FLOPs (3 × forward) over a sequence, with
    full-context attention: our ``train_per_sequence``. The 2B and 145B agree; the dense 7B rows
    agree to 0.5% (the paper used 72·L·d² for attention + FFN rather than exact widths). The 16B
    row (74.4T) was computed from nominal sizes (every layer MoE, experts of 2·d²: 120·L·d² +
    12·L·d·S + 6·V·d = 74.42T); the released model's 1408-wide experts give 75.9T."""
    t = 1e12
    f2b = count_flops(get_preset("deepseek-moe-2b"), 2048).train_per_sequence
    assert round(f2b / t, 1) == 4.3
    f145 = count_flops(get_preset("deepseek-moe-145b"), 4096).train_per_sequence
    assert f145 / t == pytest.approx(585.6, rel=2e-3)
    f16 = count_flops(get_preset("deepseek-moe-16b"), 4096).train_per_sequence
    assert round(f16 / t, 1) == 75.9
    d, n_layers, v, s = 2048, 28, 102400, 4096
    nominal = (120 * n_layers * d * d + 12 * n_layers * d * s + 6 * v * d) * s
    assert round(nominal / t, 1) == 74.4
    assert count_flops(get_preset("llama2-7b"), 4096).train_per_sequence / t == pytest.approx(187.9, rel=5e-3)
    assert count_flops(get_preset("deepseek-llm-7b"), 4096).train_per_sequence / t == pytest.approx(183.5, rel=5e-3)


def test_flops_ratio_deepseekmoe_16b_vs_dense_7b():
    """The paper's headline: DeepSeekMoE 16B needs about 40% of DeepSeek 7B's computation."""
    moe = count_flops(get_preset("deepseek-moe-16b")).train_per_sequence
    dense = count_flops(get_preset("deepseek-llm-7b")).train_per_sequence
    assert 0.39 < moe / dense < 0.42


def test_flops_forward_is_two_per_matmul_weight_plus_attention():
    cfg = get_preset("mixtral-8x7b")
    p, f = count_params(cfg), count_flops(cfg, 4096)
    assert f.matmul_per_token == 2 * p.matmul_active
    # matmul weights = active - embedding - norms (no biases or sinks in Mixtral)
    assert p.matmul_active == p.active - p.breakdown["embedding"] - p.breakdown["norms"]
    assert f.attention_per_token == 4 * 32 * 32 * 128 * 4096  # 2·(QK + AV) per layer, full context


def test_flops_rejects_bad_seq_len():
    with pytest.raises(ConfigError, match="seq_len"):
        count_flops(small_config(), 0)


# Memory -----------------------------------------------------------------------------------------


def test_kv_cache_gqa_and_mla():
    # Mixtral: 32 layers × K and V of 8 kv heads × 128, bf16
    assert kv_cache_bytes_per_token(get_preset("mixtral-8x7b")) == 32 * 2 * 8 * 128 * 2 == 131072
    # DeepSeek-V2 paper Table 1: MLA caches (d_c + d_h^R)·l = 4.5·d_h·l elements per token
    v2 = get_preset("deepseek-v2")
    assert kv_cache_values_per_token(v2) == 4.5 * 128 * 60
    assert kv_cache_bytes_per_token(get_preset("deepseek-v3"), "fp8") == 61 * (512 + 64)


def test_weights_bytes():
    cfg = get_preset("deepseek-v3")
    total = count_params(cfg).total
    assert weights_bytes(cfg) == {"fp32": 4 * total, "bf16": 2 * total, "fp8": total}
    with pytest.raises(ConfigError, match="dtype"):
        weights_bytes(cfg, ("int3",))


# Report -----------------------------------------------------------------------------------------


def test_report_formula_has_the_numbers_and_json_round_trips():
    r = account(get_preset("mixtral-8x7b"))
    assert "46,702,792,704" in r.formula
    assert "3·4096·14336" in r.formula
    assert "12,879,925,248" in r.formula
    d = json.loads(json.dumps(r.to_dict()))
    assert d["total"] == 46_702_792_704
    assert set(COMPONENTS) | {"routed_experts_active"} == set(d["breakdown"])
    assert sum(d["breakdown"][c] for c in COMPONENTS) == d["total"]
    assert d["flops_per_token"] == d["flops"]["forward_per_token"]


# Fine-grained segmentation keeps parameters and FLOPs ---------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    m=st.sampled_from([2, 3, 4]),
    n_routed=st.integers(1, 8),
    top_k_frac=st.floats(0.0, 1.0),
    base_ffn=st.integers(1, 6),
    n_shared=st.integers(0, 2),
    first_k_dense=st.integers(0, 2),
    router_bias=st.booleans(),
    expert_bias=st.booleans(),
    shared_gate=st.booleans(),
)
def test_fine_grained_keeps_expert_params_and_flops(
    m, n_routed, top_k_frac, base_ffn, n_shared, first_k_dense, router_bias, expert_bias, shared_gate
):
    """DeepSeekMoE §3.1: splitting each expert m ways and routing to m·K of them leaves the expert
    parameters (total and active) and their FLOPs unchanged. Only the parts that scale with the
    number of experts change, exactly: the router (m·E rows) and each expert's output bias b2."""
    top_k = max(1, round(top_k_frac * n_routed))
    cfg = _cfg(
        moe=dict(
            n_routed_experts=n_routed,
            top_k=top_k,
            expert_ffn_dim=12 * base_ffn,
            n_shared_experts=n_shared,
            shared_expert_gate=shared_gate and n_shared > 0,
            router_bias=router_bias,
            expert_bias=expert_bias,
            first_k_dense=first_k_dense,
        )
    )
    fg = fine_grained(cfg, m)
    a, b = count_params(cfg), count_params(fg)
    n_moe, d = len(cfg.moe_layer_ids), cfg.d_model
    router_delta = (m - 1) * n_moe * n_routed * (d + router_bias)
    b2_total_delta = (m - 1) * n_moe * n_routed * d * expert_bias
    b2_active_delta = (m - 1) * n_moe * top_k * d * expert_bias
    assert b.breakdown["shared_experts"] == a.breakdown["shared_experts"]
    assert b.breakdown["routed_experts"] - a.breakdown["routed_experts"] == b2_total_delta
    assert b.breakdown["routed_experts_active"] - a.breakdown["routed_experts_active"] == b2_active_delta
    assert b.breakdown["routers"] - a.breakdown["routers"] == router_delta
    assert b.total - a.total == router_delta + b2_total_delta
    assert b.active - a.active == router_delta + b2_active_delta
    fa, fb = count_flops(cfg, 64), count_flops(fg, 64)
    assert fb.attention_per_token == fa.attention_per_token
    assert fb.matmul_per_token - fa.matmul_per_token == 2 * (m - 1) * n_moe * n_routed * d  # router logits only


def test_fine_grained_deepseekmoe_16b_like():
    """A GShard-style 16-expert top-2 model and its m=4 segmentation (64 experts, top-8) hold the
    same expert parameters, active and total."""
    cfg = _cfg(moe=dict(n_routed_experts=16, top_k=2, expert_ffn_dim=64, n_shared_experts=0))
    a, b = count_params(cfg), count_params(fine_grained(cfg, 4))
    assert a.breakdown["routed_experts"] == b.breakdown["routed_experts"]
    assert a.breakdown["routed_experts_active"] == b.breakdown["routed_experts_active"]
    assert dataclasses.replace(fine_grained(cfg, 4).moe).n_routed_experts == 64
