"""Every router against its definition: property tests on random shapes, plus worked cases.

References here are written per token (or per expert) with plain loops, independently of
``moekit.layers.router``'s vectorised code.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from moekit.config import ConfigError, MoEConfig
from moekit.layers.moe import MoE
from moekit.layers.router import NonCausalRoutingWarning, Router, capacity_keep, hash_table
from moekit.models import MoETransformer
from tests.conftest import small_config

FAST = settings(max_examples=25, deadline=None)


@st.composite
def shapes(draw, max_experts: int = 12):
    """(T, D, E, K, seed) with 1 <= K <= E."""
    e = draw(st.integers(1, max_experts))
    return draw(st.integers(1, 24)), draw(st.integers(1, 6)), e, draw(st.integers(1, e)), draw(st.integers(0, 2**16))


def make_router(t, d, e, k, seed, vocab_size=None, **cfg) -> tuple[Router, torch.Tensor]:
    torch.manual_seed(seed)
    router = Router(MoEConfig(n_routed_experts=e, top_k=k, expert_ffn_dim=4, **cfg), d, vocab_size)
    return router, torch.randn(t, d)


def distinct_per_token(idx_TK: torch.Tensor) -> bool:
    return all(len(set(row)) == len(row) for row in idx_TK.tolist())


def scores_of(router: Router, x: torch.Tensor) -> torch.Tensor:
    logits = x @ router.gate.weight.T
    if router.gate.bias is not None:
        logits = logits + router.gate.bias
    return logits.softmax(-1) if router.cfg.score_func == "softmax" else logits.sigmoid()


# Token-choice top-k -------------------------------------------------------------------------


@FAST
@given(shapes(), st.sampled_from(["softmax", "sigmoid"]), st.booleans(), st.sampled_from([1.0, 2.5]))
def test_topk_matches_per_token_definition(shape, score_func, norm, scale):
    router, x = make_router(*shape, score_func=score_func, norm_topk_prob=norm, routed_scaling_factor=scale)
    r = router(x)
    scores = scores_of(router, x)
    for t in range(x.shape[0]):
        order = sorted(range(shape[2]), key=lambda i: -scores[t, i].item())
        assert set(r.idx_TK[t].tolist()) == set(order[: shape[3]])
        w = scores[t, r.idx_TK[t]]
        w = (w / w.sum() if norm else w) * scale
        torch.testing.assert_close(r.weights_TK[t], w)
    assert distinct_per_token(r.idx_TK)
    assert torch.all(r.weights_TK >= 0)
    if norm:
        torch.testing.assert_close(r.weights_TK.sum(-1), torch.full((x.shape[0],), scale))
    assert torch.equal(r.counts_E, torch.bincount(r.idx_TK.flatten(), minlength=shape[2]))
    assert r.keep_TK is None and r.capacity is None  # dropless by default


@FAST
@given(shapes())
def test_mixtral_topk_of_logits_then_softmax_is_softmax_topk_renormalised(shape):
    router, x = make_router(*shape)  # the default: softmax, norm_topk_prob=True
    r = router(x)
    logits = x @ router.gate.weight.T
    top = logits.topk(shape[3], dim=-1)  # Mixtral: top-k of the logits, softmax over the chosen
    assert torch.equal(r.idx_TK.sort(-1).values, top.indices.sort(-1).values)
    mixtral_w = top.values.softmax(-1)
    ours = r.weights_TK.gather(1, r.idx_TK.argsort(-1))  # both sorted by expert id
    torch.testing.assert_close(ours, mixtral_w.gather(1, top.indices.argsort(-1)))


@FAST
@given(shapes(max_experts=16), st.sampled_from(["top2_sum", "max"]), st.data())
def test_group_limited_picks_only_inside_the_best_groups(shape, group_score, data):
    t, d, _, _, seed = shape
    n_group = data.draw(st.integers(1, 4))
    per_group = data.draw(st.integers(1, 4))
    topk_group = data.draw(st.integers(1, n_group))
    e = n_group * per_group
    k = data.draw(st.integers(1, topk_group * per_group))
    router, x = make_router(
        t, d, e, k, seed, score_func="sigmoid", n_group=n_group, topk_group=topk_group, group_score=group_score
    )
    r = router(x)
    scores = scores_of(router, x)
    for tok in range(t):
        groups = scores[tok].view(n_group, per_group)
        if group_score == "max":
            value = groups.max(-1).values
        else:
            value = groups.sort(-1, descending=True).values[:, :2].sum(-1)
        best = set(sorted(range(n_group), key=lambda g: -value[g].item())[:topk_group])
        assert {i // per_group for i in r.idx_TK[tok].tolist()} <= best
        # ... and inside them it is plain top-k.
        allowed = [i for i in range(e) if i // per_group in best]
        expect = sorted(allowed, key=lambda i: -scores[tok, i].item())[:k]
        assert set(r.idx_TK[tok].tolist()) == set(expect)
    assert distinct_per_token(r.idx_TK)


@FAST
@given(shapes(), st.sampled_from(["softmax", "sigmoid"]), st.booleans(), st.data())
def test_selection_bias_changes_the_choice_never_the_weights(shape, score_func, norm, data):
    router, x = make_router(*shape, score_func=score_func, norm_topk_prob=norm, aux_free_rate=1e-3)
    unbiased = router(x)
    bias = torch.tensor(data.draw(st.lists(st.floats(-2, 2), min_size=shape[2], max_size=shape[2])))
    router.selection_bias.copy_(bias)
    r = router(x)
    # The weights of whatever was chosen come from the unbiased scores.
    w = scores_of(router, x).gather(1, r.idx_TK)
    if norm:
        w = w / w.sum(-1, keepdim=True)
    torch.testing.assert_close(r.weights_TK, w)
    torch.testing.assert_close(r.scores_TE, unbiased.scores_TE)
    # The choice is top-k of scores + bias.
    expect = (r.scores_TE + bias).topk(shape[3], dim=-1).indices
    assert torch.equal(r.idx_TK.sort(-1).values, expect.sort(-1).values)
    # A large enough bias forces an expert into every token's choice.
    router.selection_bias.zero_()
    router.selection_bias[0] = 10.0
    assert torch.all((router(x).idx_TK == 0).any(-1))


def test_selection_bias_is_a_saved_buffer_not_a_parameter():
    router, _ = make_router(4, 3, 4, 2, 0, aux_free_rate=1e-3)
    assert "selection_bias" in router.state_dict()
    assert all("selection_bias" not in n for n, _ in router.named_parameters())


# Switch and noisy top-k --------------------------------------------------------------------


@FAST
@given(shapes())
def test_switch_weight_is_the_top1_softmax_probability(shape):
    t, d, e, _, seed = shape
    router, x = make_router(t, d, e, 1, seed, router="switch")  # norm_topk_prob=True is ignored
    r = router(x)
    probs = scores_of(router, x)
    assert r.idx_TK.shape == (t, 1)
    torch.testing.assert_close(r.weights_TK[:, 0], probs.max(-1).values)
    assert torch.equal(probs.gather(1, r.idx_TK), probs.max(-1, keepdim=True).values)


def test_switch_config_is_top1_softmax():
    with pytest.raises(ConfigError, match="moe.top_k"):
        MoEConfig(n_routed_experts=4, top_k=2, expert_ffn_dim=4, router="switch")
    with pytest.raises(ConfigError, match="moe.score_func"):
        MoEConfig(n_routed_experts=4, top_k=1, expert_ffn_dim=4, router="switch", score_func="sigmoid")


def sparsemixer_per_token(logits: list[float], eps: float) -> tuple[list[int], list[float]]:
    """PhiMoE's inference rule for one token, from its description (two rounds of top-1)."""
    idx, weights, out = [], [], set()
    for _ in range(2):
        best = max(v for j, v in enumerate(logits) if j not in out)
        j_best = next(j for j, v in enumerate(logits) if j not in out and v == best)
        near = [j for j, v in enumerate(logits) if j not in out and (best - v) / max(abs(v), best) <= 2 * eps]
        z = sum(math.exp(logits[j]) for j in near)
        idx.append(j_best)
        weights.append(math.exp(logits[j_best]) / z)
        out.add(j_best)
    return idx, weights


def test_sparsemixer_worked_example():
    """logits (3, 2.9, 1, -1), eps 0.05: round one keeps 3 and 2.9 (0.1 / 3 <= 0.1), weight
    sigmoid(0.1); round two, without expert 0, keeps 2.9 alone: weight 1."""
    router, _ = make_router(1, 4, 4, 2, 0, router="sparsemixer", sparsemixer_eps=0.05)
    with torch.no_grad():
        router.gate.weight.copy_(torch.diag(torch.ones(4)))
    r = router(torch.tensor([[3.0, 2.9, 1.0, -1.0]]))
    assert r.idx_TK.tolist() == [[0, 1]]
    torch.testing.assert_close(r.weights_TK, torch.tensor([[1 / (1 + math.exp(-0.1)), 1.0]]))


@FAST
@given(shapes(), st.floats(0.0, 0.5))
def test_sparsemixer_matches_per_token_definition(shape, eps):
    t, d, e, _, seed = shape
    if e < 2:
        return
    router, x = make_router(t, d, e, 2, seed, router="sparsemixer", sparsemixer_eps=eps)
    r = router(x)
    for row, logits in enumerate(r.logits_TE.tolist()):
        idx, weights = sparsemixer_per_token(logits, eps)
        assert r.idx_TK[row].tolist() == idx
        torch.testing.assert_close(r.weights_TK[row], torch.tensor(weights), rtol=1e-5, atol=1e-6)


def test_sparsemixer_config_is_top2_softmax():
    with pytest.raises(ConfigError, match="moe.top_k must be 2"):
        MoEConfig(n_routed_experts=4, top_k=3, expert_ffn_dim=4, router="sparsemixer")
    with pytest.raises(ConfigError, match="sparsemixer"):
        MoEConfig(n_routed_experts=4, top_k=2, expert_ffn_dim=4, router="sparsemixer", score_func="sigmoid")


@FAST
@given(shapes())
def test_noisy_topk_is_clean_topk_in_eval_and_shazeer_gating_in_training(shape):
    router, x = make_router(*shape, router="noisy_topk", router_noise_std=1.0)
    assert router.noise.weight.shape == (shape[2], shape[1])
    clean = x @ router.gate.weight.T
    r_eval = router.eval()(x)
    torch.testing.assert_close(r_eval.logits_TE, clean)
    router.train()
    torch.manual_seed(shape[4] + 1)
    r = router(x)
    # H(x) = x Wg + N(0, 1) * softplus(x W_noise), with the same normal draw.
    torch.manual_seed(shape[4] + 1)
    h = clean + torch.randn_like(clean) * F.softplus(x @ router.noise.weight.T)
    torch.testing.assert_close(r.logits_TE, h)
    # softmax(KeepTopK(H, k)): -inf outside the top k, softmax over the rest.
    kth = h.topk(shape[3], dim=-1).values[:, -1:]
    gates = h.masked_fill(h < kth, float("-inf")).softmax(-1)
    torch.testing.assert_close(r.weights_TK, gates.gather(1, r.idx_TK))
    assert distinct_per_token(r.idx_TK) and torch.all(r.weights_TK >= 0)


def test_noisy_topk_noise_weights_get_gradient_in_training():
    router, x = make_router(16, 6, 8, 2, 0, router="noisy_topk")
    r = router.train()(x)
    (r.weights_TK * torch.randn_like(r.weights_TK)).sum().backward()
    assert router.noise.weight.grad is not None and router.noise.weight.grad.abs().sum() > 0
    assert router.gate.weight.grad.abs().sum() > 0


# Hash routing ------------------------------------------------------------------------------


@FAST
@given(shapes(), st.integers(1, 50), st.integers(0, 3))
def test_hash_routing_is_a_fixed_table_of_token_ids(shape, vocab, hash_seed):
    t, d, e, k, seed = shape
    router, x = make_router(t, d, e, k, seed, vocab_size=vocab, router="hash", hash_seed=hash_seed)
    assert router.gate is None and list(router.parameters()) == []  # nothing learned
    ids = torch.randint(0, vocab, (t,))
    r = router(x, ids)
    table = hash_table(vocab, e, k, hash_seed)
    assert torch.equal(router.hash_table, table)  # deterministic by seed
    assert torch.equal(r.idx_TK, table[ids])
    assert distinct_per_token(r.idx_TK) and distinct_per_token(table)
    torch.testing.assert_close(r.weights_TK, torch.full((t, k), 1.0 / k))
    torch.testing.assert_close(r.weights_TK.sum(-1), torch.ones(t))
    # The input is irrelevant; only the token ids matter.
    assert torch.equal(router(torch.randn(t, d), ids).idx_TK, r.idx_TK)
    assert r.logits_TE is None and r.scores_TE is None


def test_hash_table_depends_on_seed_saved_and_restored_from_meta():
    assert not torch.equal(hash_table(1000, 8, 1, 0), hash_table(1000, 8, 1, 1))
    counts = torch.bincount(hash_table(8000, 8, 1, 0).flatten(), minlength=8).float()
    assert counts.min() > 0.9 * 1000 and counts.max() < 1.1 * 1000  # spread over experts
    cfg = small_config(router="hash", top_k=2)
    ref = MoETransformer(cfg)
    with torch.device("meta"):
        model = MoETransformer(cfg)
    model.to_empty(device="cpu")
    model.init_weights()
    key = "layers.1.ffn.router.hash_table"
    assert torch.equal(model.state_dict()[key], ref.state_dict()[key])


def test_hash_routing_needs_token_ids_and_vocab():
    cfg = MoEConfig(n_routed_experts=4, top_k=1, expert_ffn_dim=4, router="hash")
    with pytest.raises(ValueError, match="vocab_size"):
        Router(cfg, 8)
    with pytest.raises(ValueError, match="token ids"):
        Router(cfg, 8, vocab_size=10)(torch.randn(3, 8))
    with pytest.raises(ConfigError, match="aux_loss_coef"):
        MoEConfig(n_routed_experts=4, top_k=1, expert_ffn_dim=4, router="hash", aux_loss_coef=0.01)


def test_model_passes_input_ids_to_hash_router():
    cfg = small_config(router="hash", top_k=1)
    model = MoETransformer(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 7))
    out = model(ids)
    for routing, lid in zip(out.routing, out.moe_layer_ids, strict=True):
        table = model.layers[lid].ffn.router.hash_table
        assert torch.equal(routing.idx_TK, table[ids.flatten()])


# Expert choice ------------------------------------------------------------------------------


@FAST
@given(shapes(), st.sampled_from([None, 0.5, 1.0, 2.0]), st.sampled_from(["softmax", "sigmoid"]))
def test_expert_choice_gives_every_expert_exactly_c_tokens(shape, cf, score_func):
    t, d, e, k, seed = shape
    router, x = make_router(*shape, router="expert_choice", capacity_factor=cf, score_func=score_func)
    r = router(x)
    c = min(t, math.ceil(t * (k if cf is None else cf) / e))  # cf None means top_k
    assert r.capacity == c
    assert torch.equal(r.counts_E, torch.full((e,), c))
    assert torch.equal(r.keep_TK.sum(0), torch.full((e,), c))
    assert torch.equal(r.idx_TK, torch.arange(e).expand(t, e))  # slot j is expert j
    scores = scores_of(router, x)
    for j in range(e):  # each expert took its best tokens
        taken, rest = scores[r.keep_TK[:, j], j], scores[~r.keep_TK[:, j], j]
        if rest.numel():
            assert taken.min() >= rest.max()
    torch.testing.assert_close(r.weights_TK, scores * r.keep_TK)
    assert torch.all(r.weights_TK >= 0)
    per_token = r.keep_TK.sum(-1)
    assert per_token.min() >= 0 and per_token.max() <= e and per_token.sum() == e * c


def test_expert_choice_is_not_causal_and_says_so():
    # One expert taking ceil(2 tokens * 0.5 / 1) = 1 token, by sigmoid score x * 1.
    cfg = MoEConfig(
        n_routed_experts=1, top_k=1, expert_ffn_dim=4, router="expert_choice", capacity_factor=0.5, score_func="sigmoid"
    )
    router = Router(cfg, 1)
    with torch.no_grad():
        router.gate.weight.fill_(1.0)
    first = torch.tensor([[1.0]])
    # Whether token 0 gets the expert depends on the token after it.
    assert router(torch.cat([first, torch.tensor([[0.0]])])).keep_TK[0, 0]
    assert not router(torch.cat([first, torch.tensor([[2.0]])])).keep_TK[0, 0]
    with pytest.warns(NonCausalRoutingWarning, match="not causal"):
        MoETransformer(small_config(router="expert_choice"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", NonCausalRoutingWarning)
        MoETransformer(small_config())
    with pytest.raises(ConfigError, match="aux_free_rate"):
        MoEConfig(n_routed_experts=4, top_k=1, expert_ffn_dim=4, router="expert_choice", aux_free_rate=1e-3)


# Capacity and dropping ---------------------------------------------------------------------


def reference_capacity_keep(idx_TK: torch.Tensor, capacity: int) -> torch.Tensor:
    """GShard priority: all first choices in token order, then all second choices, ..."""
    t, k = idx_TK.shape
    keep = torch.zeros(t, k, dtype=torch.bool)
    used: dict[int, int] = {}
    for slot in range(k):
        for tok in range(t):
            e = int(idx_TK[tok, slot])
            if used.get(e, 0) < capacity:
                used[e] = used.get(e, 0) + 1
                keep[tok, slot] = True
    return keep


@FAST
@given(shapes(), st.sampled_from(["topk", "noisy_topk", "hash"]), st.sampled_from([0.25, 0.5, 1.0, 1.5]))
def test_capacity_is_never_exceeded_and_drops_follow_priority(shape, kind, cf):
    t, d, e, k, seed = shape
    router, x = make_router(*shape, vocab_size=30, router=kind, capacity_factor=cf)
    r = router(x, torch.randint(0, 30, (t,)))
    c = math.ceil(t * k * cf / e)
    assert r.capacity == c
    assert torch.all(r.counts_E <= c)
    assert torch.equal(r.keep_TK, reference_capacity_keep(r.idx_TK, c))
    assert torch.equal(r.counts_E, torch.bincount(r.idx_TK[r.keep_TK], minlength=e))
    assert torch.all(r.weights_TK[~r.keep_TK] == 0)
    assert distinct_per_token(r.idx_TK)


def test_capacity_keep_worked_example():
    idx = torch.tensor([[0, 1], [0, 2], [0, 1], [1, 0]])
    # capacity 2: expert 0 takes the first choices of tokens 0, 1; token 2's first choice and
    # token 3's second are dropped; expert 1 takes token 3's first choice, then token 0's second.
    expect = torch.tensor([[True, True], [True, True], [False, False], [True, False]])
    assert torch.equal(capacity_keep(idx, 3, 2), expect)


# The MoE block with every router: the output loses nothing that was kept ------------------


ROUTER_CASES = [
    dict(router="topk"),
    dict(router="topk", score_func="sigmoid", n_group=2, topk_group=1, aux_free_rate=1e-3, routed_scaling_factor=2.0),
    dict(router="switch", top_k=1),
    dict(router="noisy_topk"),
    dict(router="hash"),
    dict(router="expert_choice"),
    dict(router="expert_choice", capacity_factor=0.75),
    dict(router="topk", capacity_factor=0.5),
    dict(router="switch", top_k=1, capacity_factor=1.0),
    dict(router="hash", capacity_factor=0.5),
    dict(router="sparsemixer", sparsemixer_eps=0.2),
]


def per_token_output(moe: MoE, x_TD: torch.Tensor, routing) -> torch.Tensor:
    """Each token's output: the weighted sum of its kept experts, plus the shared experts."""
    ex = moe.experts
    keep = routing.keep_TK if routing.keep_TK is not None else torch.ones_like(routing.idx_TK, dtype=torch.bool)
    rows = []
    for t in range(x_TD.shape[0]):
        y = torch.zeros_like(x_TD[t])
        for e, w, kept in zip(routing.idx_TK[t].tolist(), routing.weights_TK[t], keep[t].tolist(), strict=True):
            if kept:
                y = y + w * (ex.w2[e] @ (F.silu(ex.w1[e] @ x_TD[t]) * (ex.w3[e] @ x_TD[t])))
        if moe.shared_experts is not None:
            s = moe.shared_experts(x_TD[t])
            y = y + (torch.sigmoid(moe.shared_gate(x_TD[t])) * s if moe.shared_gate is not None else s)
        rows.append(y)
    return torch.stack(rows)


@pytest.mark.parametrize("case", ROUTER_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("shared", [0, 1])
@pytest.mark.parametrize("impl", ["loop", "reference"])
def test_moe_output_equals_per_token_sum_for_every_router(case, shared, impl):
    torch.manual_seed(3)
    cfg = dict(n_routed_experts=6, top_k=2, expert_ffn_dim=8, n_shared_experts=shared, shared_expert_gate=bool(shared))
    cfg.update(case)
    moe = MoE(MoEConfig(**cfg), d_model=10, impl=impl, vocab_size=20).eval()
    x = torch.randn(2, 9, 10)
    y, r = moe(x, token_ids=torch.randint(0, 20, (2, 9)))
    assert r.n_seqs == 2
    torch.testing.assert_close(y.view(18, 10), per_token_output(moe, x.view(18, 10), r), atol=1e-5, rtol=1e-5)
    if case.get("capacity_factor") is None and case["router"] != "expert_choice":  # dropless: nothing lost
        assert r.keep_TK is None and int(r.counts_E.sum()) == r.idx_TK.numel()


def test_dropped_assignments_fall_back_to_the_residual():
    torch.manual_seed(0)
    cfg = small_config(router="switch", top_k=1, capacity_factor=0.25, n_shared_experts=0)
    model = MoETransformer(cfg)
    block = model.layers[1]
    x = torch.randn(1, 16, cfg.d_model)
    y, r = block.ffn(block.ffn_norm(x))
    dropped = ~r.keep_TK[:, 0]
    assert dropped.any()
    assert torch.all(y.view(16, -1)[dropped] == 0)  # the block adds nothing: x passes through


def test_default_router_unchanged_from_the_plain_formula():
    """Mixtral/Qwen/DeepSeek-V3 parity rests on the default path: softmax/sigmoid -> top-k -> renorm."""
    torch.manual_seed(0)
    router, x = make_router(50, 12, 8, 2, 0)
    r = router(x)
    logits = F.linear(x, router.gate.weight)
    assert torch.equal(r.logits_TE, logits)
    idx = logits.softmax(-1).topk(2, dim=-1).indices
    w = logits.softmax(-1).gather(1, idx)
    assert torch.equal(r.idx_TK, idx)
    assert torch.equal(r.weights_TK, w / (w.sum(-1, keepdim=True) + 1e-20))
    assert r.keep_TK is None and r.chosen_TK is None


@FAST
@given(shapes(), st.sampled_from(["topk_capacity", "expert_choice", "hash", "topk"]), st.data())
def test_masked_padding_routes_like_removed_padding(shape, rule, data):
    """A token mask (False at padding) routes the real tokens exactly as if the padding were not
    there: same experts, weights, kept slots and counts; padding gets no slot at all."""
    t, d, e, k, seed = shape
    cfg = {
        "topk_capacity": dict(capacity_factor=1.0),
        "expert_choice": dict(router="expert_choice", capacity_factor=1.5),
        "hash": dict(router="hash"),
        "topk": {},
    }[rule]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NonCausalRoutingWarning)
        router, x = make_router(t, d, e, k, seed, vocab_size=50, **cfg)
    mask_T = torch.tensor(data.draw(st.lists(st.booleans(), min_size=t, max_size=t)))
    if not mask_T.any():
        mask_T[0] = True
    ids_T = torch.randint(0, 50, (t,), generator=torch.Generator().manual_seed(seed))
    masked = router(x, ids_T, mask_T)
    alone = router(x[mask_T], ids_T[mask_T])
    keep = masked.keep_TK if masked.keep_TK is not None else torch.ones_like(masked.idx_TK, dtype=torch.bool)
    keep_alone = alone.keep_TK if alone.keep_TK is not None else torch.ones_like(alone.idx_TK, dtype=torch.bool)
    assert not keep[~mask_T].any() and (masked.weights_TK[~mask_T] == 0).all()
    assert torch.equal(masked.counts_E, alone.counts_E)
    assert torch.equal(keep[mask_T], keep_alone)
    assert torch.equal(masked.idx_TK[mask_T][keep[mask_T]], alone.idx_TK[keep_alone])
    torch.testing.assert_close(masked.weights_TK[mask_T], alone.weights_TK)
    assert masked.capacity == alone.capacity
