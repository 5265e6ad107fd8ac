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
  - "auto": "grouped_mm" where it is supported and fast (CUDA, bf16, aligned widths), else "fused".
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

import contextlib
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.layers.dispatch import Dispatch, combine, permute


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

    def resolved_impl(self, x: Tensor) -> str:
        """The implementation ``routed`` runs for input ``x`` ("auto" resolved by device and dtype)."""
        if self._impl != "auto":
            # NOTE: the fused path's hand-written backward knows only silu; other units use autograd.
            return "loop" if self._impl == "fused" and self.activation is not None else self._impl
        if grouped_mm_supported(self, x):
            return "grouped_mm"
        return "fused" if self.activation is None else "loop"

    def routed(self, x_TD: Tensor, d: Dispatch, weights_TK: Tensor) -> Tensor:
        """``y_TD[t] = sum_k weights_TK[t, k] * expert_{idx[t, k]}(x_TD[t])`` over kept assignments."""
        return EXPERT_IMPLS[self.resolved_impl(x_TD)](self, x_TD, d, weights_TK)

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


# --- CPU threads for the fused loop ----------------------------------------------------------
# NOTE: fine-grained experts get tens of rows each, and matmuls that small gain little from torch's
# intra-op threads: every op forks and joins the OpenMP team, and on a machine shared with other
# work each join can wait a whole time slice for a descheduled (or spinning) team member. Measured
# on 2 cores, DeepSeek-V3-like (256 experts x 128 wide, 2048 tokens) forward: 2.04x dense with 2
# intra-op threads against 1.58x with 2 single-threaded workers (OMP_WAIT_POLICY=passive), and 45x
# against 2.0x with OpenMP's default spin-waiting on a busy machine. So for small experts the loop
# splits the experts into ``torch.get_num_threads()`` contiguous groups of about equal rows and runs
# each on a worker thread whose torch ops are single-threaded (ops release the GIL). Workers write
# disjoint weight-gradient slices; each has its own ``[T, D]`` accumulator, summed once at the end.
# Big experts (many rows x wide) keep torch's intra-op threads, which split one large matmul well.
# Measured on 2 idle cores, hidden 1024: Mixtral-like at 2048 tokens (512 rows x 1024 wide per
# expert) ran 0.94x dense inline and 1.23x on workers; DeepSeekMoE-like (192 x 256) 1.19x inline,
# 1.13x on workers; its decode (6 x 256) 2.46x and 2.04x. Workers are used below this rows x width.
_BIG_EXPERT = 2**18

_pools: dict[int, ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()
_threads_override: int | None = None


@contextlib.contextmanager
def expert_threads(n: int | None):
    """Run the fused CPU loop on ``n`` worker threads inside the block (1: in the calling thread
    with torch's own intra-op threads; None, the default: ``torch.get_num_threads()`` workers for
    small experts, the calling thread for big ones)."""
    global _threads_override
    if n is not None and n < 1:
        raise ValueError(f"expert_threads needs n >= 1 or None, got {n}")
    previous, _threads_override = _threads_override, n
    try:
        yield
    finally:
        _threads_override = previous


def _single_threaded_worker() -> None:
    torch.get_num_threads()  # run torch's lazy per-thread setup now, so it cannot undo the next line
    torch.set_num_threads(1)  # this thread's OpenMP and MKL thread counts (plus a default, restored below)


def _workers(n: int) -> ThreadPoolExecutor:
    """``n`` started worker threads whose torch ops use one thread each (created once, then reused)."""
    with _pools_lock:
        if n not in _pools:
            threads = torch.get_num_threads()
            pool = ThreadPoolExecutor(n, thread_name_prefix="moekit-experts", initializer=_single_threaded_worker)
            started = threading.Barrier(n + 1)
            futures = [pool.submit(started.wait) for _ in range(n)]  # each blocks one thread: n start
            started.wait()
            for f in futures:
                f.result()
            torch.set_num_threads(threads)  # restore the process default the workers overwrote
            _pools[n] = pool
        return _pools[n]


def _forget_workers() -> None:
    global _pools_lock
    _pools.clear()  # a forked child inherits the executors but none of their threads
    _pools_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_workers)


def _map_experts(
    run: Callable[[list, Tensor | None], None], counts: list[int], ffn: int, acc_TD: Tensor | None, *rows_N
) -> Tensor | None:
    """Call ``run(experts, acc)`` on groups of the non-empty experts and return ``acc`` summed.

    ``experts`` lists ``(e, *[rows of expert e in each of rows_N])`` (None stays None). Off the CPU,
    with one thread, or when the experts' matmuls are big enough for torch's own threads (``ffn``,
    the expert width, sizes them), it is one call in this thread; otherwise one call per worker,
    each with its own zeroed copy of ``acc`` to accumulate into.
    """
    parts = [(None,) * len(counts) if r is None else r.split(counts) for r in rows_N]
    experts = [(e, *(p[e] for p in parts)) for e, n in enumerate(counts) if n]
    n_groups = 1
    if rows_N[0].device.type == "cpu" and experts:
        mean_rows = sum(counts) / len(experts)
        threads = _threads_override or (torch.get_num_threads() if mean_rows * ffn < _BIG_EXPERT else 1)
        n_groups = min(threads, len(experts))
    if n_groups <= 1:
        run(experts, acc_TD)
        return acc_TD
    groups = _balanced_groups(experts, [n for n in counts if n], n_groups)
    accs = [acc_TD] + [None if acc_TD is None else torch.zeros_like(acc_TD) for _ in groups[1:]]
    pool = _workers(n_groups)
    futures = [pool.submit(_no_grad_call, run, group, acc) for group, acc in zip(groups, accs, strict=True)]
    for f in futures:
        f.result()
    if acc_TD is not None:
        for acc in accs[1:]:
            acc_TD += acc
    return acc_TD


def _no_grad_call(run: Callable, *args) -> None:
    with torch.no_grad():  # grad mode is per thread; inside the Function nothing is recorded
        run(*args)


def _balanced_groups(items: list, sizes: list[int], n: int) -> list[list]:
    """Split ``items`` into at most ``n`` contiguous non-empty groups of about equal total size."""
    total, groups, current, acc = sum(sizes), [], [], 0
    for i, (item, size) in enumerate(zip(items, sizes, strict=True)):
        current.append(item)
        acc += size
        remaining_items, remaining_groups = len(items) - i - 1, n - len(groups) - 1
        if remaining_groups and (acc * n >= total * (len(groups) + 1) or remaining_items == remaining_groups):
            groups.append(current)
            current = []
    if current:
        groups.append(current)
    return groups


EXPERT_IMPLS: dict[str, Callable[[Experts, Tensor, Dispatch, Tensor], Tensor]] = {
    "fused": fused_experts,
    "loop": loop_experts,
    "grouped_mm": grouped_mm_experts,
}
