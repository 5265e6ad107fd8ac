"""Published figures of MoE models moekit counts natively, each under its vendor's convention.

The configs in tests/data/published_configs/ hold the values of the models' published config.json
files. The model repositories on the Hugging Face hub cannot be reached from this machine, so
they were written down from the published configs as remembered and cross-checked against each
vendor's model card / report (layer counts, widths, expert counts); Snowflake Arctic's and
Hunyuan-Large's (remote code, no transformers class) were reconstructed from their model cards
and modelling code. A figure matches when ours is within the rounding of the published figure
or 2% of it, whichever is larger.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moekit.accounting import VENDOR_ACTIVE_CONVENTION, Counted, account
from moekit.interop.counting import count_hf, load_counted

HF_CONFIGS = Path(__file__).parents[2] / "data" / "published_configs"

# (config file, published total, published active, vendor, source). Figures are strings as
# published: their last digit sets the rounding ("1T": ±0.5T, "800M": ±50M, "3.3B": ±0.05B); a
# trailing "cut" marks a figure the vendor truncated rather than rounded (Qwen's "A3B" names).
PUBLISHED = [
    ("kimi-k2-instruct", "1T", "32B", "moonshot", "Kimi-K2 model card: 1T total, 32B activated"),
    ("glm-4.5", "355B", "32B", "zai", "GLM-4.5 report Table 1: 355B total, 32B activated"),
    ("glm-4.5-air", "106B", "12B", "zai", "GLM-4.5 report Table 1: 106B total, 12B activated"),
    ("qwen3-next-80b-a3b", "80B", "3B cut", "qwen", "Qwen3-Next model card: 80B total, 3B activated"),
    ("dbrx-base", "132B", "36B", "databricks", "DBRX blog: 132B total, 36B active"),
    ("jamba-v0.1", "52B", "12B", "ai21", "Jamba paper: 52B total, 12B active"),
    ("granite-3.0-3b-a800m", "3B", "800M", "ibm", "Granite 3.0 report: 3B total, 800M active"),
    ("minimax-m2", "230B", "10B", "minimax", "MiniMax-M2 model card: 230B total, 10B active"),
    ("dots.llm1.base", "142B", "14B", "rednote", "dots.llm1 report: 142B total, 14B activated"),
    ("snowflake-arctic-base", "480B", "17B", "snowflake", "Arctic model card: 480B total, 17B active"),
    ("hunyuan-large", "389B", "52B", "tencent", "Hunyuan-Large report Table 1: 389B total, 52B activated"),
    # Remote-code types, configs reconstructed from the model cards:
    ("ling-lite", "16.8B", "2.75B", "inclusionai", "Ling-lite model card: 16.8B total, 2.75B activated"),
    ("xverse-moe-a4.2b", "25.8B", "4.2B", "xverse", "XVERSE-MoE-A4.2B model card: 25.8B total, 4.2B activated"),
    ("skywork-moe-base", "146B", "22B", "skywork", "Skywork-MoE report: 146B total, 22B activated"),
]
_SCALE = {"T": 1e12, "B": 1e9, "M": 1e6}


def matches(ours: int, published: str) -> bool:
    """Is ``ours`` within the rounding of ``published`` ("32B", "1T", "3B cut") or 2% of it,
    whichever is larger?"""
    text, _, mode = published.partition(" ")
    scale = _SCALE[text[-1]]
    digits = text[:-1]
    figure = float(digits) * scale
    unit = 10 ** -(len(digits.split(".")[1]) if "." in digits else 0) * scale
    if digits.rstrip("0") != digits and "." not in digits:  # "800M": the zeros are not significant
        unit *= 10 ** (len(digits) - len(digits.rstrip("0")))
    if mode == "cut":
        return figure <= ours < figure + unit or abs(ours - figure) <= 0.02 * figure
    return abs(ours - figure) <= max(unit / 2, 0.02 * figure)


def counted(name: str) -> Counted:
    c = load_counted(str(HF_CONFIGS / f"{name}.json"))
    assert isinstance(c, Counted) or hasattr(c, "moe"), name
    return c


@pytest.mark.parametrize("name, total, active, vendor, source", PUBLISHED, ids=[p[0] for p in PUBLISHED])
def test_published_figures(name, total, active, vendor, source):
    p = account(counted(name)).params
    assert matches(p.total, total), f"{name}: total {p.total / 1e9:.2f}B vs {total} ({source})"
    ours = p.active_by(VENDOR_ACTIVE_CONVENTION[vendor])
    assert matches(ours, active), f"{name}: active {ours / 1e9:.2f}B vs {active} ({source})"


def test_matches_reads_the_published_precision():
    assert matches(1.4e12, "1T") and not matches(1.6e12, "1T")
    assert matches(0.84e9, "800M") and not matches(0.86e9, "800M")
    assert matches(3.87e9, "3B cut") and not matches(4.1e9, "3B cut")
    assert matches(353e9, "355B") and not matches(347e9, "355B")  # 2% of 355B is wider than ±0.5B


def test_the_native_path_counts_them_without_transformers(monkeypatch):
    """Every published model above has a native reader: no transformers needed."""
    import sys

    monkeypatch.setitem(sys.modules, "transformers", None)
    for name, *_ in PUBLISHED:
        assert counted(name)


def test_mtp_modules_are_outside_the_total_unless_asked():
    """GLM-4.5's one MTP layer (num_nextn_predict_layers): a full MoE decoder layer plus eh_proj
    and three norms, its embedding and head shared with the model."""
    d = json.loads((HF_CONFIGS / "glm-4.5.json").read_text())
    out = count_hf(d)
    with_mtp = count_hf(d, include_mtp=True)
    mtp = out.params.breakdown["mtp"]
    assert "mtp" in out.params.outside_total and with_mtp.params.total == out.params.total + mtp
    # One MoE layer of the main model (attention, 2 norms, router, shared and 160 routed experts).
    per_layer = (
        sum(out.params.breakdown[c] for c in ("routers", "shared_experts", "routed_experts")) // (92 - 3)
        + out.params.breakdown["attention"] // 92
    )
    norms = (2 + 3) * 5120 + 2 * 128  # 2 layer norms + enorm/hnorm/head norm + q/k norms
    assert mtp == per_layer + 2 * 5120 * 5120 + norms


def test_quantised_configs_report_stored_bytes():
    """Kimi-K2 ships FP8 weights with [128, 128] block scales: one byte per quantised parameter
    plus a 4-byte scale per 16,384, two bytes for the bf16 embedding, head, norms and routers."""
    report = account(counted("kimi-k2-instruct"))
    b = report.params.breakdown
    bf16 = b["embedding"] + b["lm_head"] + b["norms"] + b["routers"]
    q = report.params.total - bf16
    assert report.quantization.startswith("fp8")
    assert report.stored_bytes == q + 4 * (q // 16384) + 2 * bf16
    assert 1.02e12 < report.stored_bytes < 1.04e12  # the published checkpoint: about 1.03 TB
    assert report.params.total == account(counted("kimi-k2-instruct")).params.total  # scales never counted


def test_skywork_top2_is_hard_coded():
    """Skywork-MoE's config has no top-k key (its code routes to 2 experts); a port that adds
    one is read."""
    d = json.loads((HF_CONFIGS / "skywork-moe-base.json").read_text())
    b = count_hf(d).params.breakdown
    assert b["routed_experts_active"] * 8 == b["routed_experts"]  # 2 of 16
    b = count_hf(dict(d, num_experts_per_tok=4)).params.breakdown
    assert b["routed_experts_active"] * 4 == b["routed_experts"]


def test_grok1_is_recognised_by_its_architectures():
    d = json.loads((HF_CONFIGS / "grok-1.json").read_text())
    assert "model_type" not in d
    c = count_hf(d)
    assert matches(c.params.total, "314B")  # xAI: "314B parameter Mixture-of-Experts"
    b = c.params.breakdown
    assert b["norms"] == 64 * 4 * 6144 + 6144  # four RMSNorms a layer and the final one
    assert b["routed_experts_active"] * 4 == b["routed_experts"]  # top-2 of 8


def test_arctic_residual_mlp_is_model_wide():
    """Arctic's card: "a 10B dense transformer model with a residual 128×3.66B MoE MLP"."""
    b = counted("snowflake-arctic-base").params.breakdown
    assert b["routed_experts"] / 128 / 1e9 == pytest.approx(3.66, abs=0.005)
    dense = b["embedding"] + b["lm_head"] + b["attention"] + b["residual_mlp"] + b["norms"] + b["routers"]
    assert dense / 1e9 == pytest.approx(10, abs=0.05)


def test_hunyuan_cross_layer_attention_halves_kv():
    """With cla_share_factor 2, 32 of the 64 layers have k and v projections (and a KV cache)."""
    c = counted("hunyuan-large")
    d, h, g, hd = 6400, 80, 8, 80
    assert c.params.breakdown["attention"] == 64 * (2 * d * h * hd) + 32 * (2 * d * g * hd)
    assert account(c).kv_cache_bytes_per_token == 32 * 2 * g * hd * 2
