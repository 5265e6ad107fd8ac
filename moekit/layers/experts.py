"""The routed experts: SwiGLU FFNs stored as stacked weights, and the ways to compute them.

Shapes: T tokens, K experts per token, N rows (kept assignments, sorted by expert), E experts,
F expert width, D model width. ``y = w2 (silu(w1 x + b1) * (w3 x + b3)) + b2``; biases only for gpt-oss, whose
``activation`` also replaces ``silu(h1) * h3`` (``clamped_swiglu``).

The expert weight layout (decided once; expert parallelism, expert tensor parallelism, checkpoint
names and any future fused gate+up matmul share it): three stacked tensors ``w1_EFD`` (gate),
``w3_EFD`` (up), ``w2_EDF`` (down), each ``[E, out, in]`` like ``nn.Linear.weight`` per expert.
- Expert parallelism shards dim 0: a rank holds a contiguous block of GLOBAL expert ids.
- Expert tensor parallelism slices F (distributed-llama): w1/w3 rows (their outputs), w2 columns
  (its inputs), so every rank's slice is a contiguous block of one axis and partial outputs sum.
- Checkpoints store the full tensors under global expert ids (``layers.N.ffn.experts.w1`` etc.);
  HF mapping stacks/splits dim 0. Gate and up stay two tensors, never one interleaved ``[E, 2F, D]``:
  a fused gate+up matmul concatenates per shard (``torch.cat([w1, w3], 1)`` on the local slice), so
  slicing F stays a slice of one axis and names map one-to-one to HF's gate_proj/up_proj.
A module built by ``moekit.parallel.parallelize`` holds only its slice: ``n_experts`` and ``ffn_dim``
are then the local counts.

Two entry points:
- ``Experts.routed(x_TD, dispatch, weights_TK) -> y_TD``: the whole routed half of an MoE layer,
  sum over each token's kept experts of gate weight x expert(token). ``impl`` picks how
  (``EXPERT_IMPLS``):
  - "fused": one autograd Function that walks the experts, gathers each one's rows from ``x``,
    scatters its gate-weighted output into ``y`` and has a hand-written backward (CPU default);
  - "loop": permute all rows once, one autograd chain per expert on its contiguous slice, combine;
  - "grouped_mm": permute, ``torch._grouped_mm`` for all experts at once, combine (CUDA bf16);
  - "decode": small batches (tokens x top_k <= ``DECODE_MAX_ASSIGNMENTS``): only the chosen experts,
    each one's weights read in place (``w1[e]`` is a view), in the calling thread (or, for
    inference on several threads, on the fused loop's single-threaded workers);
  - "auto": "grouped_mm" where it is supported and fast (CUDA, bf16, aligned widths), else "decode"
    for small batches and "fused" for the rest (prefill, training).
- ``Experts.forward(x_ND, counts_E) -> y_ND``: rows already in expert order (as expert
  parallelism's all-to-all delivers them): grouped_mm where ``impl`` resolves to it, else the loop.

NOTE (CPU, measured on 2 cores with ``moekit bench``): "fused" wins because it never materialises an
``[N, D]`` buffer (at 2048 tokens x top-8 x D 1024 that is 64 MiB, which glibc serves as fresh
mmap'd pages that fault in on every call), builds no ``[E, F, D]`` zero-filled gradient per expert
(the cost of indexing stacked weights inside autograd), saves only the two ``[N, F]`` pre-activations
for backward and computes nothing for empty experts. ``torch._grouped_mm`` on CPU is a loop of one
matmul per group (empty groups included) over permuted ``[N, D]`` buffers, so it is not the CPU
default; on CUDA it is one kernel and the natural choice.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.layers.dispatch import Dispatch, combine, permute
from moekit.layers.expert_threads import (  # noqa: F401 (expert_threads, _workers, _balanced_groups: re-exported)
    _balanced_groups,
    _map_experts,
    _workers,
    expert_threads,
    worker_count,
)

FUSED_PATHS = ("fused", "decode")  # implementations that take tokens in and give tokens out


class Experts(nn.Module):
    """``n_experts`` SwiGLU FFNs of width ``ffn_dim`` with stacked weights ``[E, F, D]`` / ``[E, D, F]``."""

    def __init__(
        self,
        n_experts: int,
        d_model: int,
        ffn_dim: int,
        bias: bool = False,
        impl: str = "auto",
        activation: Callable[[Tensor, Tensor], Tensor] | None = None,
    ):
        super().__init__()
        self.n_experts, self.d_model, self.ffn_dim = n_experts, d_model, ffn_dim
        self.activation = activation  # (h1, h3) -> gated unit; None: silu(h1) * h3
        self.w1 = nn.Parameter(torch.empty(n_experts, ffn_dim, d_model))
        self.w3 = nn.Parameter(torch.empty(n_experts, ffn_dim, d_model))
        self.w2 = nn.Parameter(torch.empty(n_experts, d_model, ffn_dim))
        if bias:  # gpt-oss
            self.b1 = nn.Parameter(torch.zeros(n_experts, ffn_dim))
            self.b3 = nn.Parameter(torch.zeros(n_experts, ffn_dim))
            self.b2 = nn.Parameter(torch.zeros(n_experts, d_model))
        else:
            self.b1 = self.b3 = self.b2 = None
        self.impl = impl
        self.reset_parameters()

    @property
    def impl(self) -> str:
        return self._impl

    @impl.setter
    def impl(self, name: str) -> None:
        if name != "auto" and name not in EXPERT_IMPLS:
            raise ValueError(f"unknown experts impl {name!r}; expected one of {['auto', *EXPERT_IMPLS]}")
        self._impl = name

    def reset_parameters(self, std: float = 0.02) -> None:
        for w in (self.w1, self.w3, self.w2):
            nn.init.normal_(w, std=std)

    def resolved_impl(self, x: Tensor, n_assignments: int | None = None) -> str:
        """The implementation ``routed`` runs for input ``x`` with ``n_assignments`` (token, expert)
        pairs ("auto" resolved by device, dtype and batch size; None: a large batch)."""
        if self._impl != "auto":
            # NOTE: the fused and decode paths' hand-written kernels know only silu; other units use autograd.
            return "loop" if self._impl in FUSED_PATHS and self.activation is not None else self._impl
        if grouped_mm_supported(self, x):
            return "grouped_mm"
        if self.activation is not None:
            return "loop"
        small = n_assignments is not None and n_assignments <= DECODE_MAX_ASSIGNMENTS
        return "decode" if small else "fused"

    def routed(self, x_TD: Tensor, d: Dispatch, weights_TK: Tensor) -> Tensor:
        """``y_TD[t] = sum_k weights_TK[t, k] * expert_{idx[t, k]}(x_TD[t])`` over kept assignments."""
        return EXPERT_IMPLS[self.resolved_impl(x_TD, weights_TK.numel())](self, x_TD, d, weights_TK)

    def forward(self, x_ND: Tensor, counts_E: Tensor) -> Tensor:
        """Each expert applied to its contiguous slice of expert-sorted rows: ``[N, D]``."""
        if self.resolved_impl(x_ND) == "grouped_mm":
            return grouped_mm_rows(self, x_ND, counts_E)
        return loop_rows(self, x_ND, counts_E)


def _swiglu(x: Tensor, w1: Tensor, w3: Tensor, w2: Tensor, b1=None, b3=None, b2=None, act=None) -> Tensor:
    h1, h3 = F.linear(x, w1, b1), F.linear(x, w3, b3)
    return F.linear(F.silu(h1) * h3 if act is None else act(h1, h3), w2, b2)


def clamped_swiglu(h1: Tensor, h3: Tensor, alpha: float, limit: float) -> Tensor:
    """gpt-oss's gated unit: ``g * sigmoid(alpha * g) * (u + 1)``, g = min(h1, limit), u = h3 clamped to +-limit."""
    g, u = h1.clamp(max=limit), h3.clamp(-limit, limit)
    return g * torch.sigmoid(alpha * g) * (u + 1)


# --- on expert-sorted rows ------------------------------------------------------------------


def loop_rows(ex: Experts, x_ND: Tensor, counts_E: Tensor) -> Tensor:
    """One autograd matmul chain per non-empty expert over its contiguous slice of rows."""
    # NOTE: unbind the stacked weights once. Indexing w[e] per expert makes autograd build a
    # zero-filled full-size gradient for every expert (measured: 4.5 s -> 0.6 s fwd+bwd at 64 experts).
    w1s, w3s, w2s = ex.w1.unbind(0), ex.w3.unbind(0), ex.w2.unbind(0)
    b1s, b3s, b2s = (b.unbind(0) if b is not None else [None] * ex.n_experts for b in (ex.b1, ex.b3, ex.b2))
    outs = []
    for e, x_e in enumerate(x_ND.split(counts_E.tolist())):
        if x_e.shape[0] == 0:
            continue  # empty experts cost nothing
        outs.append(_swiglu(x_e, w1s[e], w3s[e], w2s[e], b1s[e], b3s[e], b2s[e], ex.activation))
    if not outs:
        # No rows at all (e.g. an expert-parallel rank nobody routed to): an empty product still
        # links the weights into the graph, so every expert gets a zero gradient, not None.
        return _swiglu(x_ND[:0], w1s[0], w3s[0], w2s[0], b1s[0], b3s[0], b2s[0], ex.activation)
    return torch.cat(outs)


def grouped_mm_supported(ex: Experts, x: Tensor) -> bool:
    """Whether ``torch._grouped_mm`` runs this layer as one fast kernel: CUDA (sm80+), bf16
    inputs and weights, D and F multiples of 8 (its operands need 16-byte aligned strides) and
    fewer than 1024 experts (the bf16 kernel's group limit)."""
    if not (x.is_cuda and hasattr(torch, "_grouped_mm")):
        return False
    if x.dtype != torch.bfloat16 or ex.w1.dtype != torch.bfloat16:
        return False
    if not grouped_mm_aligned(ex, x.dtype) or ex.n_experts >= 1024:
        return False
    return torch.cuda.get_device_capability(x.device) >= (8, 0)


def grouped_mm_aligned(ex: Experts, dtype: torch.dtype) -> bool:
    """``_grouped_mm`` (CPU too) needs every operand's row stride to be a multiple of 16 bytes."""
    per_16_bytes = 16 // torch.empty(0, dtype=dtype).element_size()
    return ex.d_model % per_16_bytes == 0 and ex.ffn_dim % per_16_bytes == 0


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous: ``_grouped_mm``'s backward
    rejects stride-0 gradients, e.g. the expanded ones of ``y.sum().backward()``."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:
        return g.contiguous()


def grouped_mm_rows(ex: Experts, x_ND: Tensor, counts_E: Tensor) -> Tensor:
    """All experts at once with ``torch._grouped_mm`` (one kernel per projection on CUDA).

    Biases, which ``_grouped_mm`` does not take, are added per row from each row's expert id.
    """
    if not grouped_mm_aligned(ex, x_ND.dtype):
        raise ValueError(
            f"grouped_mm needs d_model ({ex.d_model}) and ffn_dim ({ex.ffn_dim}) to be multiples of "
            f"{16 // x_ND.element_size()} for {x_ND.dtype} (16-byte aligned strides); use impl='fused'"
        )
    offs_E = counts_E.cumsum(0).to(torch.int32)
    h1_NF = torch._grouped_mm(x_ND, ex.w1.transpose(-1, -2), offs=offs_E)
    h3_NF = torch._grouped_mm(x_ND, ex.w3.transpose(-1, -2), offs=offs_E)
    if ex.b1 is not None:
        eid_N = torch.repeat_interleave(
            torch.arange(ex.n_experts, device=x_ND.device), counts_E, output_size=x_ND.shape[0]
        )
        h1_NF = h1_NF + ex.b1[eid_N]
        h3_NF = h3_NF + ex.b3[eid_N]
    a_NF = F.silu(h1_NF) * h3_NF if ex.activation is None else ex.activation(h1_NF, h3_NF)
    y_ND = torch._grouped_mm(a_NF, ex.w2.transpose(-1, -2), offs=offs_E)
    if ex.b2 is not None:
        y_ND = y_ND + ex.b2[eid_N]
    return _ContiguousGrad.apply(y_ND)


# --- the whole routed computation: tokens in, tokens out ------------------------------------


def loop_experts(ex: Experts, x_TD: Tensor, d: Dispatch, weights_TK: Tensor) -> Tensor:
    return combine(loop_rows(ex, permute(x_TD, d), d.counts_E), d, weights_TK, x_TD.shape[0])


def grouped_mm_experts(ex: Experts, x_TD: Tensor, d: Dispatch, weights_TK: Tensor) -> Tensor:
    return combine(grouped_mm_rows(ex, permute(x_TD, d), d.counts_E), d, weights_TK, x_TD.shape[0])


def fused_experts(ex: Experts, x_TD: Tensor, d: Dispatch, weights_TK: Tensor) -> Tensor:
    gate_N = weights_TK.reshape(-1).index_select(0, d.order_N).to(x_TD.dtype)
    tensors = (x_TD, gate_N, ex.w1, ex.w3, ex.w2, ex.b1, ex.b3, ex.b2)
    save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    return _FusedExperts.apply(d.token_N, d.counts_E.tolist(), save, *tensors)


# NOTE (decode): at batch 1 a token reads its top_k experts' weights once; the time is those bytes
# over the memory bandwidth plus a few microseconds per op. Measured on 2 busy cores, 64 experts
# of 192 x 512, top-8, one token, one thread, weights cache-warm: a per-expert loop of torch.mv
# 0.48-0.62 ms, of F.linear 0.55-0.79 ms, ``torch._grouped_mm`` over the stacked weights 1.2 ms (one matmul per group, the 56
# empty ones included), the fused path 1.7-2.6 ms (its sort and its worker threads, which a busy
# machine deschedules). Gate and up stay two matmuls: the layout keeps w1 and w3 apart, and one
# matmul over both would need a concatenated copy of the weights. At 64 assignments (batch 8 x
# top-8, 8 such layers, busy machine) this path and the fused one ran level: 9.0 against 9.7 ms per
# layer on one thread, 22 against 26 ms on two; past that the sorted dispatch takes over.
# A single row goes through ``torch.linalg.vecdot(w, x)`` rather than ``F.linear``/``torch.mv`` (MKL's
# sgemv on this AMD CPU): 65 against 85 us per cold 192 x 512 matrix, a whole decode step 32.4 against
# 36.3 ms. Re-measured (CPU time, one thread, busy machine, cold / cache-warm): gate/up-shaped
# [192, 512] mv 44 / 12 us, vecdot 42 / 24; down-shaped [512, 192] mv 58 / 14, vecdot 38 / 25; in a
# whole batch-1 step, mv for gate and up and vecdot for down was 4% slower than vecdot for all.
# A gathered copy of the chosen experts then one ``bmm`` cost 140-150 us per expert (index_select).
DECODE_MAX_ASSIGNMENTS = 64


def _mv(w_OI: Tensor, x_I: Tensor, b_O: Tensor | None) -> Tensor:
    """``w @ x (+ b)`` as ``linalg.vecdot`` (see the NOTE above), ``[O]``."""
    y_O = torch.linalg.vecdot(w_OI, x_I)
    return y_O if b_O is None else y_O + b_O


def _one_row(ex: Experts, e: int, x_D: Tensor) -> Tensor:
    """Expert ``e`` on one row, weights read in place: ``[D]``."""
    b1, b3, b2 = (None if b is None else b[e] for b in (ex.b1, ex.b3, ex.b2))
    return _mv(ex.w2[e], F.silu(_mv(ex.w1[e], x_D, b1)) * _mv(ex.w3[e], x_D, b3), b2)


def decode_experts(ex: Experts, x_TD: Tensor, d: Dispatch, weights_TK: Tensor) -> Tensor:
    """Only the chosen experts, in the calling thread: per expert with rows, its gate, up and down
    projections on its rows (one row: a vector, read straight from ``x``), weights used in place.

    Plain autograd ops, so it also trains (on unbound weight views: no full-size zero gradient
    per expert); the gate weights scale the concatenated outputs once, and one ``index_add``
    returns them to their tokens.
    """
    gate_N = weights_TK.reshape(-1).index_select(0, d.order_N).to(x_TD.dtype)
    counts = d.counts_E.tolist()
    grad = torch.is_grad_enabled()
    on_workers = x_TD.device.type == "cpu" and worker_count() > 1
    if not grad and x_TD.shape[0] == 1 and not on_workers:
        # NOTE: one token (batch-1 decode): no token bookkeeping; the K outputs are stacked and
        # mixed by their gate weights in one product, ``gate_K @ y_KD``.
        outs = [_one_row(ex, e, x_TD[0]) for e, n in enumerate(counts) if n]
        if not outs:
            return torch.zeros_like(x_TD)
        return (gate_N @ torch.stack(outs)).unsqueeze(0)
    gate_N1 = gate_N.unsqueeze(1)
    if not grad and on_workers:
        return _decode_on_workers(ex, x_TD, d, gate_N1, counts)
    w1s, w3s, w2s = (w.unbind(0) if grad and w.requires_grad else w for w in (ex.w1, ex.w3, ex.w2))
    tokens = d.token_N.tolist()
    b1s, b3s, b2s = (((None,) * ex.n_experts) if b is None else b for b in (ex.b1, ex.b3, ex.b2))
    outs, start = [], 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        if n == 1:  # one row: matrix-vector products
            x_D = x_TD[tokens[start]]
            h_F = F.silu(_mv(w1s[e], x_D, b1s[e])) * _mv(w3s[e], x_D, b3s[e])
            outs.append(_mv(w2s[e], h_F, b2s[e]).unsqueeze(0))
        else:
            x_nD = x_TD.index_select(0, d.token_N[start : start + n])
            h_nF = F.silu(F.linear(x_nD, w1s[e], b1s[e])) * F.linear(x_nD, w3s[e], b3s[e])
            outs.append(F.linear(h_nF, w2s[e], b2s[e]))
        start += n
    out_TD = torch.zeros_like(x_TD)
    if not outs:  # every assignment dropped: link the weights so they get zero gradients
        return out_TD + 0 * _swiglu(x_TD[:0], ex.w1[0], ex.w3[0], ex.w2[0]).sum()
    y_ND = torch.cat(outs) if len(outs) > 1 else outs[0]
    return out_TD.index_add(0, d.token_N, y_ND * gate_N1)


def _decode_on_workers(ex: Experts, x_TD: Tensor, d: Dispatch, gate_N1: Tensor, counts: list[int]) -> Tensor:
    """``decode_experts`` without autograd on more than one torch thread: the chosen experts split
    among single-threaded workers (``_map_experts``), each adding its gated outputs into its own
    ``[T, D]``. NOTE: the same ops on 2 intra-op threads ran 3-7x slower on a busy 2-core machine
    (64 x 192 x 512, top-8, one layer: 11.5 against 3.6 ms at one token), since every tiny op forks
    and joins the OpenMP team."""

    def run(experts, acc_TD: Tensor) -> None:
        for e, tok_n, gate_n1 in experts:
            if tok_n.shape[0] == 1:
                y_nD = _one_row(ex, e, x_TD[tok_n[0]]).unsqueeze(0)
            else:
                x_nD = x_TD.index_select(0, tok_n)
                b1, b3, b2 = (None if b is None else b[e] for b in (ex.b1, ex.b3, ex.b2))
                y_nD = F.linear(F.silu(F.linear(x_nD, ex.w1[e], b1)) * F.linear(x_nD, ex.w3[e], b3), ex.w2[e], b2)
            acc_TD.index_add_(0, tok_n, y_nD * gate_n1)

    return _map_experts(run, counts, ex.ffn_dim, torch.zeros_like(x_TD), d.token_N, gate_N1)


class _FusedExperts(torch.autograd.Function):
    """Gather -> SwiGLU -> gate-weighted scatter, one expert at a time, with a hand-written backward.

    Every temporary is one expert's size (``[n_e, D]`` or ``[n_e, F]``); the only full-size buffers
    are the output ``[T, D]`` (one per worker thread, summed at the end) and, when a backward will
    follow, the pre-activations ``h1``/``h3`` ``[N, F]`` (a dense FFN saves as much). The backward
    recomputes ``silu`` from them (elementwise, cheap) instead of saving it, folds the gate weight
    into the ``[n_e, F]`` side of each product and writes weight gradients straight into their
    stacked ``[E, ...]`` buffers. Experts are split among worker threads (see ``_map_experts``).
    """

    @staticmethod
    def forward(ctx, token_N, counts, save, x_TD, gate_N, w1, w3, w2, b1, b3, b2):
        h1_NF = x_TD.new_empty(token_N.shape[0], w1.shape[1]) if save else None
        h3_NF = torch.empty_like(h1_NF) if save else None

        def run(experts, out_TD):
            for e, tok, gate, h1_out, h3_out in experts:
                x_e = x_TD.index_select(0, tok)
                h1 = _linear(x_e, w1[e], None if b1 is None else b1[e], h1_out)
                h3 = _linear(x_e, w3[e], None if b3 is None else b3[e], h3_out)
                # NOTE: the gate weight scales the [n, F] activation, not the [n, D] output (F <= D
                # for fine-grained experts); w2 is linear, so only b2 needs scaling separately.
                y = torch.mm(F.silu(h1).mul_(h3).mul_(gate.unsqueeze(1)), w2[e].t())
                if b2 is not None:
                    y.addr_(gate, b2[e])
                out_TD.index_add_(0, tok, y)

        out_TD = _map_experts(run, counts, w1.shape[1], torch.zeros_like(x_TD), token_N, gate_N, h1_NF, h3_NF)
        if save:
            ctx.save_for_backward(token_N, x_TD, gate_N, w1, w3, w2, b2, h1_NF, h3_NF)
            ctx.counts = counts
        return out_TD

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_TD):
        token_N, x_TD, gate_N, w1, w3, w2, b2, h1_NF, h3_NF = ctx.saved_tensors
        need_x, need_gate, need_w1, need_w3, need_w2, need_b1, need_b3, need_b2 = ctx.needs_input_grad[3:]
        g_TD = g_TD.contiguous()
        dgate_N = torch.empty_like(gate_N) if need_gate else None
        dw1, dw3, dw2 = (
            torch.empty_like(w) if need else None for w, need in ((w1, need_w1), (w3, need_w3), (w2, need_w2))
        )
        db1, db3, db2 = (
            w.new_empty(w.shape[:2]) if need else None for w, need in ((w1, need_b1), (w3, need_b3), (w2, need_b2))
        )
        empty_E = torch.tensor([e for e, n in enumerate(ctx.counts) if n == 0], dtype=torch.long, device=w1.device)
        for grad in (dw1, dw3, dw2, db1, db3, db2):  # an empty expert's weights get exactly zero gradient
            if grad is not None and empty_E.numel():
                grad.index_fill_(0, empty_E, 0)

        def run(experts, dx_TD):
            for e, tok, gate, h1, h3, dgate in experts:
                g_e = g_TD.index_select(0, tok)
                s = F.silu(h1)
                a = s * h3  # the activation before gating
                ga = torch.mm(g_e, w2[e])  # d loss / d (gate * a)
                if need_gate:
                    torch.linalg.vecdot(ga, a, out=dgate)
                    if b2 is not None:
                        dgate += torch.mv(g_e, b2[e])
                if need_w2:
                    torch.mm(g_e.t(), a.mul_(gate.unsqueeze(1)), out=dw2[e])
                if need_b2:
                    torch.mv(g_e.t(), gate, out=db2[e])
                da = ga.mul_(gate.unsqueeze(1))
                dh3 = da * s
                dh1 = torch.ops.aten.silu_backward(da.mul_(h3), h1)
                if need_b1:
                    torch.sum(dh1, 0, out=db1[e])
                if need_b3:
                    torch.sum(dh3, 0, out=db3[e])
                if need_w1 or need_w3:
                    x_e = x_TD.index_select(0, tok)
                    if need_w1:
                        torch.mm(dh1.t(), x_e, out=dw1[e])
                    if need_w3:
                        torch.mm(dh3.t(), x_e, out=dw3[e])
                if need_x:
                    dx_TD.index_add_(0, tok, torch.mm(dh1, w1[e]).addmm_(dh3, w3[e]))

        dx_TD = torch.zeros_like(x_TD) if need_x else None
        dx_TD = _map_experts(run, ctx.counts, w1.shape[1], dx_TD, token_N, gate_N, h1_NF, h3_NF, dgate_N)
        return None, None, None, dx_TD, dgate_N, dw1, dw3, dw2, db1, db3, db2


def _linear(x: Tensor, w: Tensor, b: Tensor | None, out: Tensor | None) -> Tensor:
    """``x @ w.T (+ b)``, written into ``out`` when given."""
    if b is None:
        return torch.mm(x, w.t()) if out is None else torch.mm(x, w.t(), out=out)
    return torch.addmm(b, x, w.t()) if out is None else torch.addmm(b, x, w.t(), out=out)


EXPERT_IMPLS: dict[str, Callable[[Experts, Tensor, Dispatch, Tensor], Tensor]] = {
    "fused": fused_experts,
    "loop": loop_experts,
    "grouped_mm": grouped_mm_experts,
    "decode": decode_experts,
}
