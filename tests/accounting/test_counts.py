"""ParamCount.build: active shares, components outside the total, matmul weights; MTP modules;
stored bytes of quantised checkpoints (hand-worked numbers)."""

from __future__ import annotations

import json
from pathlib import Path

from moekit.accounting import Component, ParamCount, Term, account, count_extended, mtp_component
from moekit.accounting.quantized import stored_bytes
from moekit.interop.counting import count_hf
from tests.conftest import small_config

HF_CONFIGS = Path(__file__).parents[1] / "data" / "hf_configs"


def test_build_sums_active_shares_and_keeps_outside_components_apart():
    comps = [
        Component("embedding", 1, "", (Term("vocab·d", (10, 4), matmul=False),)),
        Component("routed_experts", 6, "", (Term("w", (3, 4, 2)), Term("b", (2,), matmul=False)), active_count=2),
        Component("mtp", 1, "", (Term("x", (5,)),), in_total=False),
        Component("lm_head", 1, "", (Term("vocab·d", (10, 4)),)),
    ]
    p = ParamCount.build(comps, tied_embeddings=False)
    assert p.total == 40 + 6 * 26 + 40 and p.active == 40 + 2 * 26 + 40
    assert p.breakdown["mtp"] == 5 and p.outside_total == ("mtp",)
    assert p.breakdown["routed_experts_active"] == 52
    assert p.matmul_active == 2 * 24 + 40  # expert weights a token meets + the head; no biases, no lookup
    inside = p.rebuilt([*comps[:2], Component("mtp", 1, "", (Term("x", (5,)),)), comps[3]])
    assert inside.total == p.total + 5 and inside.outside_total == ()


def test_mtp_module_is_one_moe_layer_plus_projection():
    cfg = small_config()  # d 32, 8 experts top-2 of width 24, one shared, GQA 4 heads / 2 kv
    c = mtp_component(cfg, 2)
    d, att = 32, 32 * 32 * 2 + 2 * 32 * 16  # q, o: d·d; k, v: d·(2 kv heads · 8)
    layer = att + 2 * d + 8 * 32 + 3 * d * 24 + 8 * 3 * d * 24
    assert c.value == 2 * (layer + 2 * d * d + 3 * d)
    assert c.active_value == c.value - 2 * 6 * 3 * d * 24  # 6 of the 8 experts idle
    counted = count_extended(cfg, [c])
    assert counted.params.total == account(cfg).params.total and counted.params.breakdown["mtp"] == c.value


def test_mxfp4_stores_experts_in_four_bits_plus_a_scale_per_32():
    """gpt-oss-120b's published checkpoint (MXFP4 experts, the rest bf16) is about 65 GB."""
    d = json.loads((HF_CONFIGS / "gpt-oss-120b.json").read_text())
    d["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.embed_tokens", "lm_head"]}
    report = account(count_hf(d))
    b = report.params.breakdown
    experts = b["routed_experts"]
    rest = report.params.total - experts
    assert report.quantization == "mxfp4 experts"
    assert report.stored_bytes == experts // 2 + experts // 32 + 2 * rest
    assert 64e9 < report.stored_bytes < 66.5e9
    assert (
        report.params.total
        == account(count_hf({k: v for k, v in d.items() if k != "quantization_config"})).params.total
    )


def test_unknown_quantisation_is_named_without_bytes():
    p = account(small_config()).params
    assert stored_bytes(p, {"quant_method": "awq"}) == ("awq", None)
