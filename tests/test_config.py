"""Config validation, JSON round trip, dotted overrides and fine-grained segmentation."""

from __future__ import annotations

import dataclasses
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moekit.config import AttentionConfig, ConfigError, ModelConfig, MoEConfig, fine_grained, set_by_path
from tests.conftest import small_config


def test_json_round_trip(tmp_path):
    cfg = small_config(score_func="sigmoid", n_group=2, topk_group=1, moe_layers=[1, 2])
    path = tmp_path / "c.json"
    cfg.to_json(path)
    assert ModelConfig.from_json(path) == cfg


def test_derived_values():
    cfg = small_config()
    assert cfg.attention.head_dim == 32 // 4
    assert cfg.moe.shared_ffn_dim == cfg.moe.expert_ffn_dim
    assert cfg.moe_layer_ids == [1, 2]
    assert cfg.n_dense_layers == 1


@pytest.mark.parametrize(
    "placement, n_layers, expected",
    [
        (dict(first_k_dense=1), 4, [1, 2, 3]),  # DeepSeekMoE: layer 0 dense
        (dict(first_k_dense=1, moe_every=2), 4, [1, 3]),  # "layers 2 and 4 (1-based) are MoE"
        (dict(moe_layers=[3, 1]), 4, [1, 3]),  # explicit list, sorted
        (dict(moe_every=2), 5, [0, 2, 4]),
    ],
)
def test_moe_placement(placement, n_layers, expected):
    cfg = ModelConfig(
        vocab_size=10,
        d_model=8,
        n_layers=n_layers,
        attention=AttentionConfig(n_heads=2),
        dense_ffn_dim=16,
        moe=MoEConfig(n_routed_experts=4, top_k=2, expert_ffn_dim=4, **placement),
    )
    assert cfg.moe_layer_ids == expected


@pytest.mark.parametrize(
    "key, value, field",
    [
        ("moe.top_k", 9, "moe.top_k"),  # top-k > experts
        ("vocab_size", 0, "vocab_size"),
        ("n_layers", -1, "n_layers"),
        ("moe.expert_ffn_dim", 0, "moe.expert_ffn_dim"),
        ("moe.moe_layers", [0, 5], "moe.moe_layers"),  # out of range
        ("moe.score_func", "relu", "moe.score_func"),
        ("moe.top_k", "two", "moe.top_k"),  # wrong type
        ("moe.norm_topk_prob", 1, "moe.norm_topk_prob"),
        ("attention.n_kv_heads", 3, "attention.n_heads"),  # 4 heads not divisible by 3
        ("moe.n_group", 3, "moe.n_group"),  # 8 experts not divisible by 3 groups
    ],
)
def test_invalid_values_name_the_field(key, value, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        set_by_path(small_config(), {key: value})


def test_width_not_divisible_by_heads():
    with pytest.raises(ConfigError, match=r"d_model \(30\) must be divisible by attention.n_heads"):
        ModelConfig(vocab_size=10, d_model=30, n_layers=1, attention=AttentionConfig(n_heads=4), dense_ffn_dim=8)


def test_unknown_keys_are_rejected():
    data = small_config().to_dict()
    data["moe"]["topk"] = 2
    with pytest.raises(ConfigError, match="moe.topk"):
        ModelConfig.from_dict(data)
    with pytest.raises(ConfigError, match="unknown config key 'moe.nope'"):
        set_by_path(small_config(), {"moe.nope": 1})


def test_bad_json_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="bad.json"):
        ModelConfig.from_json(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        ModelConfig.from_json(tmp_path / "missing.json")


@settings(max_examples=30, deadline=None)
@given(
    m=st.sampled_from([1, 2, 4]),
    n_experts=st.integers(1, 8),
    top_k=st.integers(1, 8),
    n_shared=st.integers(0, 2),
    width=st.sampled_from([8, 16, 32]),
)
def test_fine_grained_segmentation(m, n_experts, top_k, n_shared, width):
    top_k = min(top_k, n_experts)
    cfg = small_config(n_routed_experts=n_experts, top_k=top_k, expert_ffn_dim=width, n_shared_experts=n_shared)
    fg = fine_grained(cfg, m)
    assert fg.moe.n_routed_experts == n_experts * m
    assert fg.moe.top_k == top_k * m
    assert fg.moe.expert_ffn_dim * m == width
    # Routed and shared FFN widths per token are unchanged, hence FLOPs and parameters.
    assert fg.moe.top_k * fg.moe.expert_ffn_dim == top_k * width
    assert fg.moe.n_routed_experts * fg.moe.expert_ffn_dim == n_experts * width
    assert fg.moe.n_shared_experts * fg.moe.shared_ffn_dim == n_shared * width
    assert dataclasses.replace(fg.moe, n_routed_experts=n_experts, top_k=top_k) != cfg.moe or m == 1


def test_fine_grained_rejects_indivisible_width():
    with pytest.raises(ConfigError, match="divisible by m"):
        fine_grained(small_config(expert_ffn_dim=24), 5)


def test_config_json_is_plain():
    # Config is data: JSON-serialisable with no custom encoder.
    json.dumps(small_config().to_dict())


def test_fingerprint_holds_architecture_only():
    from moekit.config import architecture_fingerprint, fingerprint_diff
    from moekit.presets import get_preset

    cfg = get_preset("tiny")
    fp = architecture_fingerprint(cfg)
    same = cfg.replace(name="renamed", max_seq_len=cfg.max_seq_len * 2)
    same = set_by_path(same, {"moe.aux_loss_coef": 0.5, "moe.z_loss_coef": 1e-3, "moe.n_devices": 2})
    assert architecture_fingerprint(same) == fp
    # tiny balances without an auxiliary loss: turning that off removes the selection-bias buffer
    other = set_by_path(cfg, {"moe.top_k": 2, "norm_eps": 1e-5, "moe.aux_free_rate": 0.0})
    assert fingerprint_diff(fp, architecture_fingerprint(other)) == [
        "moe.top_k: 4 -> 2",
        "moe.uses_selection_bias: True -> False",
        "norm_eps: 1e-06 -> 1e-05",
    ]


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("field", ["norm_eps", "attention.rope_theta", "moe.routed_scaling_factor", "moe.z_loss_coef"])
def test_non_finite_numbers_are_refused_naming_the_field(field, value):
    from moekit.presets import get_preset

    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        set_by_path(get_preset("tiny"), {field: value})
