"""Memory per device and communication per step of one layout: hand-worked figures and the rules."""

from __future__ import annotations

import pytest

from moekit.accounting import count_params
from moekit.config import ConfigError
from moekit.planning import Layout, PlanRequest, estimate_activations, layout_cost, per_rank_parameter_count
from moekit.presets import get_preset
from tests.conftest import small_config

GIB = 2**30


def test_training_memory_and_traffic_by_hand():
    """small_config: d 32, 2 MoE layers of 8 experts (width 24, top-2); dp 4, ep 2, etp 1, bf16."""
    cfg = small_config()
    req = PlanRequest(devices=4, device_memory=GIB, dtype="bf16", micro_batch=2, seq_len=16)
    c = layout_cost(cfg, req, Layout(4, 2, 1))
    total = count_params(cfg).total
    routed = 2 * 8 * 3 * 32 * 24
    repl, experts = total - routed, routed // 2  # each rank: 4 of the 8 experts
    held = repl + experts
    assert c.params_per_rank == held and c.experts_per_rank == 4
    assert c.memory["weights"] == 2 * held and c.memory["gradients"] == 2 * held
    assert c.memory["optimizer"] == 12 * held  # fp32 master + m + v
    assert c.memory["activations"] == estimate_activations(cfg, "bf16", 16, Layout(4, 2, 1)).peak(32)
    assert c.total == sum(c.memory.values()) and c.fits
    tokens = 2 * 16
    # dispatch + combine, forward + backward: 32 tokens × 2 layers × 2 × (2 rows × 32 values × 2 B) × 1/2 × 2
    assert c.comm["all_to_all"] == tokens * 2 * 2 * 2 * 32 * 2 * 2 // 2
    assert c.comm["etp_all_reduce"] == 0
    # one token, one MoE layer, forward: 2 rows of 32 bf16 values, half of them leave the rank
    assert c.per_token_per_moe_layer == {"dispatch": 64, "combine": 64, "etp_all_reduce": 0}
    # ring all-reduce: replicated over dp 4 (2·3/4), experts over their dp/ep = 2 replicas (2·1/2)
    assert c.comm["grad_sync"] == pytest.approx(repl * 2 * 1.5 + experts * 2 * 1.0, abs=1)
    assert c.comm_per_step == sum(c.comm.values())
    assert c.comm_per_token == pytest.approx(c.comm_per_step * 4 / (4 * tokens))


def test_both_training_regimes_hold_16_bytes_per_parameter():
    cfg = small_config()
    for dtype in ("fp32", "bf16", "fp16"):
        c = layout_cost(cfg, PlanRequest(2, GIB, dtype=dtype), Layout(2, 2, 1))
        states = c.memory["weights"] + c.memory["gradients"] + c.memory["optimizer"]
        assert states == 16 * c.params_per_rank, dtype


def test_etp_all_reduce_by_hand_and_etp_duplication_charged_per_token():
    cfg = small_config()
    req = PlanRequest(devices=4, device_memory=GIB, mode="infer", micro_batch=1, seq_len=10)
    c = layout_cost(cfg, req, Layout(1, 1, 4))
    assert c.comm["all_to_all"] == 0
    assert c.comm["etp_all_reduce"] == 10 * 2 * 32 * 2 * 2 * 3 // 4  # tokens·n_moe·D·b·2(n-1)/n
    # 4 ranks move bytes for the same 10 tokens: per token counts all four.
    assert c.comm_per_token == pytest.approx(4 * c.comm_per_step / 10)
    dp = layout_cost(cfg, req, Layout(4, 4, 1))  # 4 ranks serve 40 tokens
    assert dp.comm_per_token == pytest.approx(4 * dp.comm_per_step / 40)


def test_inference_kv_cache_is_mla_compressed():
    cfg = get_preset("deepseek-v3")
    req = PlanRequest(devices=64, device_memory=80 * GIB, mode="infer", micro_batch=2, seq_len=4096)
    c = layout_cost(cfg, req, Layout(64, 64, 1))
    assert c.memory["kv_cache"] == 2 * 4096 * 61 * (512 + 64) * 2  # latent + rope key, bf16
    assert c.memory["weights"] == 2 * per_rank_parameter_count(cfg, (64, 64, 1))
    assert "optimizer" not in c.memory and c.comm["grad_sync"] == 0
    fp8 = layout_cost(cfg, PlanRequest(64, 80 * GIB, mode="infer", dtype="fp8"), Layout(64, 64, 1))
    assert fp8.memory["weights"] == per_rank_parameter_count(cfg, (64, 64, 1))


def test_zero3_shards_states_over_dp_and_expert_replicas():
    cfg = small_config()
    plain = layout_cost(cfg, PlanRequest(8, GIB), Layout(8, 2, 1))
    req = PlanRequest(8, GIB, zero3=True)
    z = layout_cost(cfg, req, Layout(8, 2, 1))
    repl = count_params(cfg).total - 2 * 8 * 3 * 32 * 24
    experts = 2 * 4 * 3 * 32 * 24
    held = repl / 8 + experts / 4  # replicated over dp 8, experts over dp/ep = 4 replicas
    assert z.memory["weights"] == pytest.approx(2 * held, abs=1)
    assert z.memory["optimizer"] == pytest.approx(12 * held, abs=1)
    assert z.memory["gathered"] > 0 and z.zero3
    assert z.total < plain.total
    assert z.comm["grad_sync"] == pytest.approx(1.5 * plain.comm["grad_sync"], abs=2)


def test_fits_uses_the_headroom():
    cfg = small_config()
    probe = layout_cost(cfg, PlanRequest(1, GIB), Layout(1))
    exact = PlanRequest(1, probe.total, headroom=0.0)
    assert layout_cost(cfg, exact, Layout(1)).fits
    tight = layout_cost(cfg, PlanRequest(1, probe.total, headroom=0.1), Layout(1))
    assert not tight.fits and tight.fits_without_headroom


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(dtype="fp8"), "dtype 'fp8' cannot be used to train"),
        (dict(headroom=1.5), r"headroom must be a fraction in \[0, 1\)"),
        (dict(devices=0), "devices must be a positive integer"),
        (dict(micro_batch=0), "micro_batch must be a positive integer"),
        (dict(mode="serve"), "mode must be 'train' or 'infer'"),
    ],
)
def test_bad_requests_name_the_field(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        PlanRequest(**{"devices": 8, "device_memory": GIB, **kwargs})


def test_recomputation_keeps_layer_inputs_and_repeats_the_exchanges():
    cfg = small_config()
    plain = layout_cost(cfg, PlanRequest(4, GIB, seq_len=256), Layout(4, 4, 1))
    again = layout_cost(cfg, PlanRequest(4, GIB, seq_len=256, recompute=True), Layout(4, 4, 1))
    assert again.memory["activations"] < plain.memory["activations"]
    assert again.memory["weights"] == plain.memory["weights"]
    assert again.comm["all_to_all"] * 2 == plain.comm["all_to_all"] * 3  # forward, backward, forward again
    with pytest.raises(ConfigError, match="recompute applies to training only"):
        PlanRequest(4, GIB, mode="infer", recompute=True)
