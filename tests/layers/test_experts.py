"""Every expert implementation against the plain masked-loop reference, forward and backward."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moekit.config import MoEConfig
from moekit.layers.dispatch import permute, sort_by_expert
from moekit.layers.experts import (
    DECODE_MAX_ASSIGNMENTS,
    EXPERT_IMPLS,
    Experts,
    _balanced_groups,
    _FusedExperts,
    _workers,
    expert_threads,
    grouped_mm_aligned,
    grouped_mm_supported,
)
from moekit.layers.moe import MoE, reference_routed
from moekit.layers.router import Routing

CPU_IMPLS = ["fused", "loop", "grouped_mm", "decode", "auto"]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def make_case(
    n_tokens: int,
    n_experts: int,
    top_k: int,
    d_model: int,
    ffn: int,
    bias: bool = False,
    n_used: int | None = None,
    drop: float = 0.0,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
):
    """Experts with random weights and a random routing over the first ``n_used`` experts (the
    rest stay empty), each token's experts distinct; ``drop`` is the chance an assignment is dropped."""
    g = torch.Generator().manual_seed(seed)
    ex = Experts(n_experts, d_model, ffn, bias=bias)
    with torch.no_grad():
        for p in ex.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    ex.to(device=device, dtype=dtype)
    n_used = n_experts if n_used is None else n_used
    idx_TK = torch.stack([torch.randperm(n_used, generator=g)[:top_k] for _ in range(n_tokens)]).view(n_tokens, top_k)
    weights_TK = torch.rand(n_tokens, top_k, generator=g)
    keep_TK = torch.rand(n_tokens, top_k, generator=g) >= drop if drop else None
    counts = torch.bincount(idx_TK[keep_TK] if keep_TK is not None else idx_TK.reshape(-1), minlength=n_experts)
    routing = Routing(
        logits_TE=None,
        scores_TE=None,
        idx_TK=idx_TK.to(device),
        weights_TK=weights_TK.to(device).requires_grad_(),
        counts_E=counts.to(device),
        keep_TK=None if keep_TK is None else keep_TK.to(device),
    )
    x_TD = (torch.randn(n_tokens, d_model, generator=g)).to(device=device, dtype=dtype).requires_grad_()
    return ex, x_TD, routing


def run(ex: Experts, x_TD: torch.Tensor, routing: Routing, impl: str, g_TD: torch.Tensor):
    """Output and gradients of x, every expert weight and the gate weights."""
    inputs = [x_TD, routing.weights_TK, *ex.parameters()]
    if impl == "reference":
        y_TD = reference_routed(ex, x_TD, routing)
    else:
        ex.impl = impl
        d = sort_by_expert(routing.idx_TK, ex.n_experts, routing.keep_TK)
        y_TD = ex.routed(x_TD, d, routing.weights_TK)
    if y_TD.requires_grad:
        grads = torch.autograd.grad(y_TD, inputs, g_TD, allow_unused=True)
    else:  # the reference touches no expert when every assignment is dropped
        grads = [None] * len(inputs)
    return [y_TD.detach()] + [torch.zeros_like(i) if gr is None else gr for i, gr in zip(inputs, grads, strict=True)]


def assert_matches_reference(ex, x_TD, routing, impl, atol=1e-5, rtol=1e-5):
    if impl == "grouped_mm" and not grouped_mm_aligned(ex, x_TD.dtype):
        with pytest.raises(ValueError, match="16-byte aligned"):
            run(ex, x_TD, routing, impl, x_TD)
        return
    g_TD = torch.randn_like(x_TD)
    expected = run(ex, x_TD, routing, "reference", g_TD)
    got = run(ex, x_TD, routing, impl, g_TD)
    names = ["y", "x", "gate weights", *(n for n, _ in ex.named_parameters())]
    for name, a, b in zip(names, got, expected, strict=True):
        torch.testing.assert_close(a.float(), b.float(), atol=atol, rtol=rtol, msg=lambda m, n=name: f"{impl} {n}: {m}")


CASES = {
    "mixtral-like": dict(n_tokens=24, n_experts=8, top_k=2, d_model=16, ffn=24),
    "fine-grained": dict(n_tokens=30, n_experts=16, top_k=6, d_model=12, ffn=4, bias=True),
    "top1": dict(n_tokens=17, n_experts=5, top_k=1, d_model=8, ffn=8),
    "one expert": dict(n_tokens=9, n_experts=1, top_k=1, d_model=8, ffn=12),
    "unaligned widths": dict(n_tokens=9, n_experts=3, top_k=2, d_model=7, ffn=6),
    "empty experts": dict(n_tokens=20, n_experts=10, top_k=2, d_model=8, ffn=8, n_used=4),
    "expert biases": dict(n_tokens=20, n_experts=6, top_k=2, d_model=8, ffn=8, bias=True, n_used=5),
    "capacity drops": dict(n_tokens=25, n_experts=6, top_k=3, d_model=8, ffn=8, drop=0.3, bias=True),
    "everything dropped": dict(n_tokens=6, n_experts=4, top_k=2, d_model=8, ffn=8, drop=1.0),
    "one token": dict(n_tokens=1, n_experts=7, top_k=3, d_model=8, ffn=8),
    "one token, biases, drops": dict(n_tokens=1, n_experts=7, top_k=4, d_model=8, ffn=8, bias=True, drop=0.5),
}


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("case", list(CASES))
def test_impl_matches_reference(impl, case):
    assert_matches_reference(*make_case(**CASES[case]), impl)


@pytest.mark.parametrize("threads", [1, 2, 5])
@pytest.mark.parametrize("case", ["fine-grained", "empty experts", "capacity drops", "one expert"])
def test_fused_on_worker_threads_matches_reference(threads, case):
    """The fused loop splits experts among worker threads; any split gives the same result."""
    with expert_threads(threads):
        assert_matches_reference(*make_case(**CASES[case]), "fused")


@pytest.mark.parametrize("threads", [1, 2, 5])
@pytest.mark.parametrize(
    "case",
    ["fine-grained", "empty experts", "capacity drops", "one token", "one token, biases, drops", "everything dropped"],
)
def test_decode_without_grad_on_worker_threads_matches_reference(threads, case):
    """Inference on more than one thread hands the chosen experts to single-threaded workers; on
    one thread a single token takes the one-token path (its K outputs mixed by one product)."""
    ex, x_TD, routing = make_case(**CASES[case])
    ex.impl = "decode"
    d = sort_by_expert(routing.idx_TK, ex.n_experts, routing.keep_TK)
    with torch.no_grad(), expert_threads(threads):
        y_TD = ex.routed(x_TD, d, routing.weights_TK)
        torch.testing.assert_close(y_TD, reference_routed(ex, x_TD, routing), atol=1e-5, rtol=1e-5)


def test_worker_threads_are_single_threaded_and_leave_torch_alone():
    before = torch.get_num_threads()
    pool = _workers(2)
    assert torch.get_num_threads() == before
    assert [pool.submit(torch.get_num_threads).result() for _ in range(4)] == [1] * 4
    with pytest.raises(ValueError, match="n >= 1"):
        with expert_threads(0):
            pass


def test_balanced_groups_are_contiguous_and_nonempty():
    for sizes, n in [([5, 5, 5, 5], 2), ([1, 1, 1, 100], 2), ([100, 1, 1, 1], 3), ([3], 4), ([64] * 256, 2)]:
        groups = _balanced_groups(list(range(len(sizes))), sizes, n)
        assert [i for g in groups for i in g] == list(range(len(sizes)))
        assert all(groups) and len(groups) == min(n, len(sizes))
    halves = _balanced_groups(list(range(256)), [64] * 256, 2)
    assert [len(g) for g in halves] == [128, 128]


@settings(max_examples=30, deadline=None)
@given(
    n_tokens=st.integers(1, 40),
    n_experts=st.integers(1, 12),
    k_frac=st.floats(0, 1),
    used_frac=st.floats(0, 1),
    d_model=st.integers(1, 20),
    ffn=st.integers(1, 20),
    bias=st.booleans(),
    drop=st.sampled_from([0.0, 0.0, 0.5]),
    seed=st.integers(0, 2**16),
)
def test_random_shapes_match_reference(n_tokens, n_experts, k_frac, used_frac, d_model, ffn, bias, drop, seed):
    top_k = 1 + int(k_frac * (n_experts - 1))
    n_used = top_k + int(used_frac * (n_experts - top_k))
    case = make_case(n_tokens, n_experts, top_k, d_model, ffn, bias, n_used, drop, seed)
    for impl in ("fused", "loop", "grouped_mm", "decode"):
        assert_matches_reference(*case, impl)


def test_fused_backward_passes_gradcheck():
    ex, x_TD, routing = make_case(7, 5, 2, 6, 4, bias=True, n_used=4, dtype=torch.float64, drop=0.2)
    d = sort_by_expert(routing.idx_TK, 5, routing.keep_TK)
    gate_N = routing.weights_TK.detach().double().reshape(-1)[d.order_N].requires_grad_()
    counts = d.counts_E.tolist()

    def f(x, gate, w1, w3, w2, b1, b3, b2):
        return _FusedExperts.apply(d.token_N, counts, True, x, gate, w1, w3, w2, b1, b3, b2)

    assert torch.autograd.gradcheck(f, (x_TD, gate_N, ex.w1, ex.w3, ex.w2, ex.b1, ex.b3, ex.b2))


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_frozen_weights_and_no_grad(impl):
    ex, x_TD, routing = make_case(**CASES["expert biases"])
    d = sort_by_expert(routing.idx_TK, ex.n_experts, routing.keep_TK)
    ex.impl = impl
    with torch.no_grad():
        y_ref = reference_routed(ex, x_TD, routing)
        torch.testing.assert_close(ex.routed(x_TD, d, routing.weights_TK), y_ref, atol=1e-5, rtol=1e-5)
    ex.requires_grad_(False)  # only x needs a gradient: weight gradients are not computed
    (gx,) = torch.autograd.grad(ex.routed(x_TD, d, routing.weights_TK.detach()).square().sum(), [x_TD])
    (gx_ref,) = torch.autograd.grad(reference_routed(ex, x_TD, routing).square().sum(), [x_TD])
    torch.testing.assert_close(gx, gx_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_rows_entry_point_matches_reference(impl):
    """``Experts.forward`` on expert-sorted rows (what expert parallelism calls)."""
    ex, x_TD, routing = make_case(**CASES["empty experts"])
    ex.impl = impl
    d = sort_by_expert(routing.idx_TK, ex.n_experts)
    y_ND = ex(permute(x_TD, d), d.counts_E)
    expert_N = routing.idx_TK.reshape(-1)[d.order_N]
    for n in range(0, y_ND.shape[0], 7):
        e, t = expert_N[n].item(), d.token_N[n].item()
        h = torch.nn.functional.silu(ex.w1[e] @ x_TD[t]) * (ex.w3[e] @ x_TD[t])
        torch.testing.assert_close(y_ND[n], ex.w2[e] @ h, atol=1e-5, rtol=1e-5)
    y_ND.sum().backward()  # a stride-0 incoming gradient is accepted by every path
    assert x_TD.grad is not None


@pytest.mark.parametrize("impl", ["fused", "loop", "grouped_mm", "decode", "auto"])
def test_moe_layer_matches_reference_incl_router_grads(impl):
    cfg = MoEConfig(n_routed_experts=8, top_k=3, expert_ffn_dim=8, n_shared_experts=1, expert_bias=True)
    moe = MoE(cfg, d_model=12, impl="reference")
    x = torch.randn(2, 9, 12, requires_grad=True)
    outs = {}
    for name in ("reference", impl):
        moe.impl = name
        y, _ = moe(x)
        outs[name] = [y, *torch.autograd.grad(y.square().sum(), [x, *moe.parameters()])]
    for a, b in zip(outs[impl], outs["reference"], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_auto_picks_fused_on_cpu_and_unknown_impl_raises():
    ex = Experts(4, 8, 8)
    x = torch.randn(3, 8)
    assert ex.impl == "auto" and ex.resolved_impl(x) == "fused"
    assert ex.resolved_impl(x, DECODE_MAX_ASSIGNMENTS) == "decode"  # small batches: only the chosen experts
    assert ex.resolved_impl(x, DECODE_MAX_ASSIGNMENTS + 1) == "fused"
    assert not grouped_mm_supported(ex.to(torch.bfloat16), x.bfloat16())
    with pytest.raises(ValueError, match="unknown experts impl 'fast'"):
        ex.impl = "fast"
    assert set(EXPERT_IMPLS) == {"fused", "loop", "grouped_mm", "decode"}


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("case", ["mixtral-like", "empty experts", "capacity drops"])
def test_cuda_bf16_grouped_mm_matches_fp32_reference(case):
    shape = dict(CASES[case], d_model=64, ffn=32)  # grouped_mm wants 16-byte aligned widths
    ex, x_TD, routing = make_case(**shape, device="cuda")
    g_TD = torch.randn_like(x_TD)
    expected = run(ex, x_TD, routing, "reference", g_TD)
    ex_bf, x_bf, routing_bf = make_case(**shape, device="cuda", dtype=torch.bfloat16)
    ex_bf.impl = "auto"
    assert ex_bf.resolved_impl(x_bf) == ("grouped_mm" if grouped_mm_supported(ex_bf, x_bf) else "fused")
    got = run(ex_bf, x_bf, routing_bf, "auto", g_TD.bfloat16())
    for a, b in zip(got, expected, strict=True):
        scale = b.abs().max().clamp_min(1e-3)
        assert (a.float() - b).abs().max() <= 3e-2 * scale


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("impl", ["fused", "loop", "grouped_mm", "decode"])
def test_cuda_fp32_impls_match_reference(impl):
    if impl == "grouped_mm":
        pytest.skip("torch._grouped_mm on CUDA is a bf16 kernel")
    assert_matches_reference(*make_case(**CASES["expert biases"], device="cuda"), impl, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("impl", ["loop", "fused"])
def test_no_rows_gives_zero_not_missing_gradients(impl):
    """An expert-parallel rank nobody routes to still gets (zero) gradients for its experts, so a
    gradient all-reduce over ranks never meets a None."""
    ex = Experts(3, 8, 4, impl=impl)
    x_ND = torch.randn(0, 8, requires_grad=True)
    y = ex(x_ND, torch.zeros(3, dtype=torch.long))
    assert y.shape == (0, 8)
    y.sum().backward()
    for p in ex.parameters():
        assert p.grad is not None and torch.count_nonzero(p.grad) == 0


def test_decode_reads_only_chosen_experts_weights_in_place(monkeypatch):
    """The decode path never copies a weight: every matmul's weight operand is a view into the
    stacked tensors at a chosen expert's offset, and no other expert is touched."""
    import moekit.layers.experts as experts_mod

    ex, x_TD, routing = make_case(n_tokens=3, n_experts=6, top_k=3, d_model=8, ffn=6)  # single and shared rows
    seen = []
    real_linear, real_vecdot = experts_mod.F.linear, torch.linalg.vecdot

    def spy_linear(x, w, b=None):
        seen.append((w.untyped_storage().data_ptr(), w.storage_offset()))
        return real_linear(x, w, b)

    def spy_vecdot(w, x):  # one row: matrix-vector products
        seen.append((w.untyped_storage().data_ptr(), w.storage_offset()))
        return real_vecdot(w, x)

    monkeypatch.setattr(experts_mod.F, "linear", spy_linear)
    monkeypatch.setattr(torch.linalg, "vecdot", spy_vecdot)
    ex.impl = "decode"
    d = sort_by_expert(routing.idx_TK, ex.n_experts)
    with torch.no_grad():
        ex.routed(x_TD, d, routing.weights_TK)
    stacks = {ex.w1.untyped_storage().data_ptr(): ex.w1, ex.w3.untyped_storage().data_ptr(): ex.w3}
    stacks[ex.w2.untyped_storage().data_ptr()] = ex.w2
    chosen = set(routing.idx_TK.reshape(-1).tolist())
    assert len(seen) == 3 * len(chosen)  # gate, up, down: once per chosen expert
    for storage, offset in seen:
        w = stacks[storage]  # in place: the weight is the stacked parameter's own storage
        per_expert = w[0].numel()
        assert offset % per_expert == 0 and offset // per_expert in chosen


def test_auto_decodes_small_batches_and_keeps_the_sorted_dispatch_for_prefill(monkeypatch):
    """In one generation, the prompt (tokens x top_k > 64) goes through the fused sorted dispatch and
    every one-token step through the decode path; the tokens equal those of the reference loop."""
    import moekit.layers.experts as experts_mod
    from moekit.config import AttentionConfig, ModelConfig
    from moekit.models import MoETransformer

    cfg = ModelConfig(
        vocab_size=50, d_model=16, n_layers=2, dense_ffn_dim=24, attention=AttentionConfig(n_heads=2),
        moe=MoEConfig(n_routed_experts=8, top_k=4, expert_ffn_dim=8),
    )  # fmt: skip
    model = MoETransformer(cfg).eval()
    calls = []
    for name in ("fused", "decode"):
        real = EXPERT_IMPLS[name]

        def spy(ex, x_TD, d, w, real=real, name=name):
            calls.append((name, x_TD.shape[0]))
            return real(ex, x_TD, d, w)

        monkeypatch.setitem(experts_mod.EXPERT_IMPLS, name, spy)
    prompt = torch.randint(0, 50, (1, 20))
    out = model.generate(prompt, 5, eos_token_id=[])
    assert calls == [("fused", 20)] * 2 + [("decode", 1)] * 2 * 4  # prefill, then 4 steps x 2 layers
    model.set_moe_impl("reference")
    torch.testing.assert_close(model.generate(prompt, 5, eos_token_id=[]), out)


@pytest.mark.parametrize(
    "counts, ffn, d_model, expected",
    [
        ([256] * 16, 128, 256, False),  # a small training layer: the calling thread (spin not paid back)
        ([256] * 64, 192, 512, True),  # a big call of small experts: workers
        ([2] * 256, 256, 1024, True),  # decode-size rows: matmuls too small for intra-op threads
        ([512] * 8, 14336, 4096, False),  # Mixtral-size experts: intra-op threads split each matmul
    ],
)
def test_when_the_experts_go_to_workers(counts, ffn, d_model, expected):
    from moekit.layers.expert_threads import _use_workers

    assert _use_workers(counts, len(counts), ffn, d_model) is expected
