"""Balance losses on hand-worked examples, their gradients, aux-free balancing, routing statistics."""

from __future__ import annotations

import math

import pytest
import torch

from moekit.balancing import (
    balance_loss,
    balance_terms,
    chosen_counts,
    device_balance_loss,
    max_vio,
    router_z_loss,
    routing_stats,
    seq_balance_loss,
    switch_aux_loss,
    update_selection_bias,
)
from moekit.config import MoEConfig
from moekit.layers.moe import MoE
from moekit.layers.router import Router, Routing
from moekit.models import MoETransformer
from tests.conftest import small_config


def routing(scores, idx, keep=None, chosen=None, n_seqs=1, logits=None) -> Routing:
    """A hand-written Routing; logits default to log(scores) (so softmax(logits) == scores)."""
    scores_TE = torch.tensor(scores, dtype=torch.float32)
    idx_TK = torch.tensor(idx)
    keep_TK = None if keep is None else torch.tensor(keep)
    kept = idx_TK if keep_TK is None else idx_TK[keep_TK]
    return Routing(
        logits_TE=scores_TE.log() if logits is None else torch.tensor(logits),
        scores_TE=scores_TE,
        idx_TK=idx_TK,
        weights_TK=scores_TE.gather(1, idx_TK),
        counts_E=torch.bincount(kept.flatten(), minlength=scores_TE.shape[1]),
        keep_TK=keep_TK,
        chosen_TK=None if chosen is None else torch.tensor(chosen),
        n_seqs=n_seqs,
    )


# Worked examples -----------------------------------------------------------------------------

# T = 3 tokens, E = 4 experts, K = 2: counts [3, 2, 1, 0], P = [13, 8, 6, 3] / 30.
SCORES = [[0.4, 0.3, 0.2, 0.1], [0.5, 0.1, 0.3, 0.1], [0.4, 0.4, 0.1, 0.1]]
IDX = [[0, 1], [0, 2], [0, 1]]


def test_switch_loss_is_one_for_perfectly_uniform_routing():
    uniform = [[0.25] * 4] * 4
    assert switch_aux_loss(routing(uniform, [[0], [1], [2], [3]])).item() == pytest.approx(1.0)
    assert switch_aux_loss(routing(uniform, [[0, 1], [2, 3], [1, 0], [3, 2]])).item() == pytest.approx(1.0)


def test_switch_loss_worked_example():
    # f = [1, 0] (both tokens chose expert 0), P = [0.75, 0.25]: 2 * (1 * 0.75) = 1.5.
    assert switch_aux_loss(routing([[0.9, 0.1], [0.6, 0.4]], [[0], [0]])).item() == pytest.approx(1.5)


def test_switch_loss_equals_deepseekmoe_expert_level_loss():
    # DeepSeekMoE: f'_i = E / (K T) * count_i = (2/3) [3, 2, 1, 0]; sum_i f'_i P_i = 122/90 = 61/45.
    f = [4 / (2 * 3) * c for c in (3, 2, 1, 0)]
    p = [13 / 30, 8 / 30, 6 / 30, 3 / 30]
    by_hand = sum(a * b for a, b in zip(f, p, strict=True))
    assert by_hand == pytest.approx(61 / 45)
    assert switch_aux_loss(routing(SCORES, IDX)).item() == pytest.approx(61 / 45, rel=1e-6)


def test_device_loss_worked_example():
    # Devices {0, 1} and {2, 3}: f'' = [mean(2, 4/3), mean(2/3, 0)] = [5/3, 1/3],
    # P'' = [21/30, 9/30]: 5/3 * 21/30 + 1/3 * 9/30 = 19/15.
    assert device_balance_loss(routing(SCORES, IDX), n_devices=2).item() == pytest.approx(19 / 15, rel=1e-6)
    # One device: f'' = mean f' = 1, P'' = 1.
    assert device_balance_loss(routing(SCORES, IDX), n_devices=1).item() == pytest.approx(1.0)
    # One expert per device: sum_i f'_i P_i, the expert-level loss.
    assert device_balance_loss(routing(SCORES, IDX), n_devices=4).item() == pytest.approx(61 / 45, rel=1e-6)


def test_sequence_wise_loss_worked_example():
    # Two sequences of two tokens, E = 2, K = 1, unnormalised (sigmoid-like) scores.
    scores = [[0.6, 0.2], [0.3, 0.3], [0.8, 0.2], [0.9, 0.1]]
    idx = [[0], [1], [0], [0]]
    # Sequence 0: s' = [.75, .25], [.5, .5]; f = [1, 1]; P = [.625, .375] -> 1.
    # Sequence 1: s' = [.8, .2], [.9, .1]; f = [2, 0]; P = [.85, .15] -> 1.7. Mean: 1.35.
    r = routing(scores, idx, n_seqs=2)
    assert seq_balance_loss(r).item() == pytest.approx(1.35, rel=1e-6)
    # The whole batch as one sequence is a different number: f = [1.5, .5], P = [.7375, .2625].
    assert seq_balance_loss(r, n_seqs=1).item() == pytest.approx(1.2375, rel=1e-6)


def test_z_loss_worked_example():
    ln2 = math.log(2)
    logits = [[0.0, 0.0, 0.0, 0.0], [ln2, ln2, ln2, ln2]]  # logsumexp: ln 4 = 2 ln 2, ln 8 = 3 ln 2
    r = routing([[0.25] * 4] * 2, [[0], [1]], logits=logits)
    assert router_z_loss(r).item() == pytest.approx((4 + 9) / 2 * ln2**2, rel=1e-6)


def test_losses_count_the_routers_choice_before_capacity_dropping():
    dropless = routing(SCORES, IDX)
    dropped = routing(SCORES, IDX, keep=[[True, True], [False, True], [False, False]])
    assert dropped.counts_E.tolist() == [1, 1, 1, 0]
    for loss in (switch_aux_loss, seq_balance_loss, lambda r: device_balance_loss(r, 2)):
        torch.testing.assert_close(loss(dropless), loss(dropped))


def test_expert_choice_is_balanced_by_construction():
    router = Router(MoEConfig(n_routed_experts=4, top_k=2, expert_ffn_dim=4, router="expert_choice"), 6)
    r = router(torch.randn(10, 6))
    assert torch.equal(chosen_counts(r)[0], torch.full((4,), 5.0))  # C = ceil(10 * 2 / 4)
    assert switch_aux_loss(r).item() == pytest.approx(1.0)
    assert routing_stats([r])["max_vio"] == 0.0


# Gradients -----------------------------------------------------------------------------------


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
@pytest.mark.parametrize("name", ["aux", "device", "seq_aux", "z"])
def test_each_loss_reaches_the_router_weight(name, score_func):
    cfg = MoEConfig(
        n_routed_experts=8,
        top_k=2,
        expert_ffn_dim=4,
        score_func=score_func,
        n_devices=2,
        **{
            dict(aux="aux_loss_coef", device="device_loss_coef", seq_aux="seq_aux_loss_coef", z="z_loss_coef")[
                name
            ]: 0.1
        },
    )
    moe = MoE(cfg, d_model=6)
    _, r = moe(torch.randn(3, 5, 6))
    terms = balance_terms([r], cfg)
    assert list(terms) == [name]
    terms[name].backward()
    grad = moe.router.gate.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    assert moe.experts.w1.grad is None  # balance losses train the router only


def test_balance_loss_sums_weighted_terms_over_layers_and_skips_hash_layers():
    cfg = MoEConfig(
        n_routed_experts=4,
        top_k=2,
        expert_ffn_dim=4,
        aux_loss_coef=0.1,
        device_loss_coef=0.2,
        n_devices=2,
        seq_aux_loss_coef=0.3,
        z_loss_coef=0.4,
    )
    a = routing(SCORES, IDX)
    b = routing([[0.25] * 4] * 3, [[0, 1], [2, 3], [1, 2]])
    hashed = Routing(None, None, torch.tensor(IDX), torch.full((3, 2), 0.5), torch.tensor([3, 2, 1, 0]))
    terms = balance_terms([a, hashed, b], cfg)
    expect = {
        "aux": 0.1 * (switch_aux_loss(a) + switch_aux_loss(b)),
        "device": 0.2 * (device_balance_loss(a, 2) + device_balance_loss(b, 2)),
        "seq_aux": 0.3 * (seq_balance_loss(a) + seq_balance_loss(b)),
        "z": 0.4 * (router_z_loss(a) + router_z_loss(b)),
    }
    assert terms.keys() == expect.keys()
    for k in expect:
        torch.testing.assert_close(terms[k], expect[k])
    torch.testing.assert_close(balance_loss([a, hashed, b], cfg), sum(expect.values()))
    off = MoEConfig(n_routed_experts=4, top_k=2, expert_ffn_dim=4)
    assert balance_terms([a, b], off) == {} and balance_loss([a, b], off).item() == 0.0


def test_model_output_feeds_the_balance_loss():
    cfg = small_config(aux_loss_coef=0.01, seq_aux_loss_coef=0.01, z_loss_coef=0.001)
    model = MoETransformer(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 8))
    out = model(ids, labels=ids)
    assert all(r.n_seqs == 2 for r in out.routing)
    (out.loss + balance_loss(out.routing, cfg.moe)).backward()
    for lid in out.moe_layer_ids:
        assert model.layers[lid].ffn.router.gate.weight.grad.abs().sum() > 0


# Auxiliary-loss-free balancing -----------------------------------------------------------------


def test_selection_bias_update_worked_example():
    router = Router(MoEConfig(n_routed_experts=4, top_k=1, expert_ffn_dim=4, aux_free_rate=0.1), 3)
    gate = router.gate.weight.detach().clone()
    update_selection_bias(router, [torch.tensor([3, 1, 2, 2])])  # mean 2
    torch.testing.assert_close(router.selection_bias, torch.tensor([-0.1, 0.1, 0.0, 0.0]))
    update_selection_bias(router, [torch.tensor([3, 1, 2, 2])], rate=1.0)
    torch.testing.assert_close(router.selection_bias, torch.tensor([-1.1, 1.1, 0.0, 0.0]))
    assert torch.equal(router.gate.weight, gate)  # never touches a weight
    with pytest.raises(ValueError, match="1 routers"):
        update_selection_bias(router, [])
    # A Routing counts the router's choice (before dropping).
    r = routing(SCORES[:2] + [[0.1, 0.2, 0.3, 0.4]], [[0], [0], [3]], keep=[[True], [False], [True]])
    router.selection_bias.zero_()
    update_selection_bias(router, [r])  # load [2, 0, 0, 1], mean 0.75
    torch.testing.assert_close(router.selection_bias, torch.tensor([-0.1, 0.1, 0.1, -0.1]))


def test_selection_bias_updates_every_layer_and_round_trips_through_state_dict():
    cfg = small_config(score_func="sigmoid", aux_free_rate=1e-2)
    model = MoETransformer(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 8))
    update_selection_bias(model, model(ids).routing)
    keys = [k for k in model.state_dict() if k.endswith("selection_bias")]
    assert len(keys) == len(cfg.moe_layer_ids)
    assert all(model.state_dict()[k].abs().sum() > 0 for k in keys)
    fresh = MoETransformer(cfg)
    fresh.load_state_dict(model.state_dict())
    for k in keys:
        assert torch.equal(fresh.state_dict()[k], model.state_dict()[k])


def skewed_router() -> Router:
    """Sigmoid router whose logits carry a fixed per-expert offset from +2 to -2."""
    torch.manual_seed(0)
    cfg = MoEConfig(
        n_routed_experts=16, top_k=2, expert_ffn_dim=4, score_func="sigmoid", router_bias=True, selection_bias=True
    )
    router = Router(cfg, 16)
    with torch.no_grad():
        router.gate.bias.copy_(torch.linspace(2, -2, 16))
        router.gate.weight.normal_(std=0.3)
    return router


def simulate(router: Router, rate: float, steps: int = 60) -> list[float]:
    vio = []
    for _ in range(steps):
        r = router(torch.randn(256, 16))
        vio.append(max_vio(r.counts_E))
        update_selection_bias(router, [r], rate=rate)
    return vio


def test_aux_free_balancing_drives_max_vio_down_on_a_skewed_router():
    vio = simulate(skewed_router(), rate=0.02)
    first = sum(vio[:5]) / 5
    windows = [sum(vio[i : i + 5]) / 5 for i in range(0, 20, 5)]
    assert all(a > b for a, b in zip(windows, windows[1:], strict=False)), windows  # step by step
    assert sum(vio[-20:]) / 20 < 0.3 * first
    # Without the update the skew stays.
    control = simulate(skewed_router(), rate=0.0)
    assert sum(control[-20:]) / 20 > 0.8 * first


# Routing statistics ----------------------------------------------------------------------------


def test_routing_stats_worked_example():
    # Load [4, 2, 1, 1] (K = 2, T = 4), one assignment dropped; uniform scores.
    uniform = [[0.25] * 4] * 4
    r = routing(
        uniform, [[0, 1], [0, 2], [0, 1], [0, 3]], keep=[[True, True], [True, True], [True, True], [False, True]]
    )
    s = routing_stats([r], [5])
    (layer,) = s["layers"]
    assert layer["layer"] == 5
    assert layer["load_per_expert"] == [4, 2, 1, 1] and layer["tokens_per_expert"] == [3, 2, 1, 1]
    assert layer["max_vio"] == pytest.approx(1.0)  # 4 / 2 - 1
    assert layer["cv"] == pytest.approx(math.sqrt(1.5) / 2)  # std [4, 2, 1, 1] = sqrt(6 / 4)
    assert layer["entropy"] == pytest.approx(math.log(4))
    assert layer["drop_frac"] == pytest.approx(1 / 8)
    assert layer["unrouted_frac"] == 0.0  # token 3 still has expert 3
    assert layer["top_share"] == pytest.approx(0.5) and not layer["collapsed"]  # top 1 of 4 experts
    assert s["max_vio"] == pytest.approx(1.0) and s["warning"] is None
    assert max_vio(torch.tensor([4, 2, 1, 1])) == pytest.approx(1.0)


def test_routing_stats_flags_collapse_and_averages_layers():
    balanced = routing([[0.25] * 4] * 4, [[0], [1], [2], [3]])
    collapsed = routing([[0.97, 0.01, 0.01, 0.01]] * 4, [[0], [0], [0], [1]], keep=[[True], [True], [False], [True]])
    s = routing_stats([balanced, collapsed], [1, 3])
    assert [la["collapsed"] for la in s["layers"]] == [False, True]
    assert s["collapsed"] and "layer(s) 3" in s["warning"] and "75%" in s["warning"]
    assert s["max_vio"] == pytest.approx((0 + 2) / 2) and s["max_vio_max"] == pytest.approx(2.0)
    assert s["unrouted_frac"] == pytest.approx((0 + 0.25) / 2)
    assert s["entropy"] < math.log(4)
    # With two experts the busiest one is half the fair load: never called a collapse.
    assert not routing_stats([routing([[0.9, 0.1]] * 4, [[0], [0], [0], [1]])])["collapsed"]
    assert s["layers"][0]["entropy"] == pytest.approx(math.log(4))


def test_routing_stats_from_a_model():
    cfg = small_config(capacity_factor=0.5)
    out = MoETransformer(cfg)(torch.randint(0, cfg.vocab_size, (2, 8)))
    s = routing_stats(out.routing, out.moe_layer_ids)
    assert [la["layer"] for la in s["layers"]] == cfg.moe_layer_ids
    for la, r in zip(s["layers"], out.routing, strict=True):
        assert la["tokens_per_expert"] == r.counts_E.tolist()
        assert sum(la["load_per_expert"]) == 16 * cfg.moe.top_k
        assert la["drop_frac"] == pytest.approx(1 - sum(la["tokens_per_expert"]) / (16 * cfg.moe.top_k))
    assert 0 < s["entropy"] <= math.log(cfg.moe.n_routed_experts)
