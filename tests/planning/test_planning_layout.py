"""Layouts and per-rank parameters: hand-worked counts, the placement applied to built modules,
the layout rules, and a property over random layouts."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moekit.accounting import count_params
from moekit.config import AttentionConfig, ConfigError, ModelConfig, MoEConfig
from moekit.layers.experts import Experts
from moekit.models.transformer import MoETransformer
from moekit.planning import Layout, ParamSplit, candidate_layouts, per_rank_parameter_count, rank_parameter_split
from moekit.presets import get_preset
from tests.conftest import small_config


def placed_parameter_count(model: torch.nn.Module, layout: Layout) -> int:
    """The contract's placement applied to a built model's tensors: experts ``[E, F, D]`` /
    ``[E, D, F]`` cut to E/ep experts and F/etp wide (b1, b3 sliced, b2 whole), everything else
    whole. Counts what one rank would hold; tied weights count once (``parameters()`` dedupes)."""
    held = 0
    expert_params = set()
    for module in model.modules():
        if isinstance(module, Experts):
            e, f = module.n_experts // layout.ep, module.ffn_dim // layout.etp
            w1 = module.w1[:e, :f]
            w3 = module.w3[:e, :f]
            w2 = module.w2[:e, :, :f]
            held += w1.numel() + w3.numel() + w2.numel()
            if module.b1 is not None:
                held += module.b1[:e, :f].numel() + module.b3[:e, :f].numel() + module.b2[:e].numel()
            expert_params |= {id(p) for p in module.parameters()}
    return held + sum(p.numel() for p in model.parameters() if id(p) not in expert_params)


def _bias_config() -> ModelConfig:  # gpt-oss-like: expert biases, router bias, sinks
    return ModelConfig(
        vocab_size=64,
        d_model=16,
        n_layers=2,
        attention=AttentionConfig(n_heads=4, n_kv_heads=2, sinks=True, qkv_bias=True),
        dense_ffn_dim=32,
        moe=MoEConfig(n_routed_experts=8, top_k=2, expert_ffn_dim=12, router_bias=True, expert_bias=True),
        tie_embeddings=True,
    )


def test_hand_worked_small_config():
    cfg = small_config()  # d 32, 3 layers (layer 0 dense), 8 experts of width 24, one shared
    total = count_params(cfg).total
    per_expert = 3 * 32 * 24  # w1, w3, w2
    routed = 2 * 8 * per_expert  # 2 MoE layers
    replicated = total - routed
    assert per_rank_parameter_count(cfg, (1, 1, 1)) == total
    assert per_rank_parameter_count(cfg, (4, 4, 1)) == replicated + 2 * 2 * per_expert  # 2 experts each
    assert per_rank_parameter_count(cfg, (2, 1, 2)) == replicated + 2 * 8 * 3 * 32 * 12  # every expert, half wide
    assert per_rank_parameter_count(cfg, (8, 8, 3)) == replicated + 2 * 1 * 3 * 32 * 8
    assert rank_parameter_split(cfg, Layout(4, 2, 1)) == (replicated, 2 * 4 * per_expert)


def test_expert_biases_b2_whole_b1_b3_sliced():
    cfg = _bias_config()
    split = ParamSplit.from_config(cfg)
    assert (split.per_expert_sliced, split.per_expert_whole) == (3 * 16 * 12 + 2 * 12, 16)
    repl, experts = rank_parameter_split(cfg, (4, 2, 3))
    assert experts == 2 * 4 * ((3 * 16 * 12 + 2 * 12) // 3 + 16)


CONFIGS = {
    "small": small_config(),
    "biases+tied": _bias_config(),
    "tiny-preset": get_preset("tiny"),
    "all-moe": small_config(n_shared_experts=0, first_k_dense=0),
}
LAYOUTS = [(1, 1, 1), (2, 2, 1), (4, 2, 2), (8, 8, 1), (2, 1, 4), (4, 4, 3)]
VALID = [
    (name, layout)
    for name, cfg in CONFIGS.items()
    for layout in LAYOUTS
    if cfg.moe.n_routed_experts % layout[1] == 0 and cfg.moe.expert_ffn_dim % layout[2] == 0
]


@pytest.mark.parametrize("name, layout", VALID, ids=[f"{n}-{lay}" for n, lay in VALID])
def test_equals_placement_of_built_model(name, layout):
    cfg, lay = CONFIGS[name], Layout(*layout)
    with torch.device("meta"):
        model = MoETransformer(cfg)
    assert per_rank_parameter_count(cfg, lay) == placed_parameter_count(model, lay)


def test_placement_grid_covers_every_config():
    assert {name for name, _ in VALID} == set(CONFIGS) and len(VALID) >= 16


def test_dense_model_is_all_replicated():
    cfg = get_preset("tiny-dense")
    assert per_rank_parameter_count(cfg, (4, 1, 1)) == count_params(cfg).total
    assert candidate_layouts(4, ParamSplit.from_config(cfg)) == [Layout(4, 1, 1)]


@pytest.mark.parametrize(
    "layout, message",
    [
        ((4, 3, 1), r"ep \(3\) must divide dp \(4\)"),
        ((16, 16, 1), r"ep \(16\) must divide the routed experts \(8\)"),
        ((2, 1, 5), r"etp \(5\) must divide the expert width \(24\)"),
        ((0, 1, 1), "dp must be a positive integer"),
    ],
)
def test_layout_rules_name_the_broken_rule(layout, message):
    with pytest.raises(ConfigError, match=message):
        per_rank_parameter_count(small_config(), layout)


def test_candidate_layouts_of_eight_devices():
    split = ParamSplit.from_config(small_config())  # 8 experts, width 24
    got = {(x.dp, x.ep, x.etp) for x in candidate_layouts(8, split)}
    # etp in {1, 2, 4, 8} ∩ divisors of 24 = {1, 2, 4, 8}; dp = 8 / etp; ep | dp and ep | 8.
    want = {(8, 1, 1), (8, 2, 1), (8, 4, 1), (8, 8, 1), (4, 1, 2), (4, 2, 2), (4, 4, 2), (2, 1, 4), (2, 2, 4)}
    want |= {(1, 1, 8)}
    assert got == want
    assert {(x.dp, x.ep, x.etp) for x in candidate_layouts(8, split, ep=2)} == {(8, 2, 1), (4, 2, 2), (2, 2, 4)}


@settings(max_examples=60, deadline=None)
@given(
    e_pow=st.integers(0, 4),
    ep_pow=st.integers(0, 4),
    extra_dp=st.integers(1, 3),
    etp=st.sampled_from([1, 2, 3, 4, 6]),
    n_moe=st.integers(1, 4),
)
def test_every_expert_slice_is_held_dp_over_ep_times(e_pow, ep_pow, extra_dp, etp, n_moe):
    """Summed over the world, the ranks hold each expert slice once per dp/ep replica."""
    ep = 2 ** min(ep_pow, e_pow)
    n_experts, dp = 2**e_pow, ep * extra_dp
    split = ParamSplit(
        replicated=1000, per_expert_sliced=3 * 8 * 12, per_expert_whole=0, n_routed_experts=n_experts,
        n_moe_layers=n_moe, expert_ffn_dim=12,
    )  # fmt: skip
    repl, experts = rank_parameter_split(split, Layout(dp, ep, etp))
    assert repl == 1000
    assert experts * dp * etp == (dp // ep) * n_moe * n_experts * 3 * 8 * 12
