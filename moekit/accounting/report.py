"""The accounting report ``moekit params`` shows: the numbers, the formula with them filled in, the JSON."""

from __future__ import annotations

from dataclasses import dataclass

from moekit.accounting.counts import COMPONENTS, Counted, ParamCount
from moekit.accounting.flops import (
    FlopCount,
    Model,
    attention_shapes,
    count_flops,
    dtype_bytes,
    kv_cache_bytes_per_token,
    kv_cache_window_bytes,
    params_of,
    weights_bytes,
)
from moekit.config import ModelConfig


@dataclass(frozen=True)
class Report:
    """Everything ``moekit params`` shows. ``kv_cache_bytes_per_token`` is None when the
    attention layers are unknown; ``stored_bytes`` is set for quantised configs (the bytes of
    the checkpoint's tensors, scales included, which ``params`` never counts)."""

    name: str
    params: ParamCount
    flops: FlopCount
    weights_bytes: dict[str, int]  # total parameters × bytes, by dtype
    kv_cache_dtype: str
    kv_cache_bytes_per_token: int | None
    formula: str
    max_seq_len: int = 4096
    stored_bytes: int | None = None
    quantization: str | None = None
    kv_cache_window_bytes: int = 0  # sliding-window layers' fixed cache per sequence (not per token)

    def to_dict(self) -> dict:
        """A JSON-ready dict (the ``moekit params --json`` schema)."""
        p, f = self.params, self.flops
        out = {
            "name": self.name,
            "total": p.total,
            "active": p.active,
            "breakdown": dict(p.breakdown),
            "active_breakdown": dict(p.active_breakdown),
            "tied_embeddings": p.tied_embeddings,
            "active_conventions": {c: p.active_by(c) for c in ("all", "no_input_embedding", "non_embedding")},
            "matmul_active": p.matmul_active,
            "flops_per_token": f.forward_per_token,
            "flops": {
                "seq_len": f.seq_len,
                "attention_context": "causal" if f.causal else "full",
                "matmul_per_token": f.matmul_per_token,
                "attention_per_token": f.attention_per_token,
                "forward_per_token": f.forward_per_token,
                "train_per_token": f.train_per_token,
                "train_per_sequence": f.train_per_sequence,
            },
            "weights_bytes": dict(self.weights_bytes),
            "kv_cache_dtype": self.kv_cache_dtype,
            "kv_cache_bytes_per_token": self.kv_cache_bytes_per_token,
            "kv_cache_window_bytes": self.kv_cache_window_bytes,
            "formula": self.formula,
        }
        if p.active_range is not None:
            out["active_min"], out["active_max"] = p.active_range
        if p.outside_total:
            out["outside_total"] = list(p.outside_total)
        if p.notes:
            out["notes"] = list(p.notes)
        if self.quantization is not None:
            out["quantization"] = self.quantization
            out["stored_bytes"] = self.stored_bytes
        return out


def _formula(model: Model, p: ParamCount, f: FlopCount, kv_dtype: str) -> str:
    names = [c.name for c in p.components]
    width = max(len(c) for c in (*names, "routed_experts_active", "train FLOPs/seq"))
    lines = [
        f"{c.name:<{width}} = {c.text()}" + ("  (not in the total)" if not c.in_total else "") for c in p.components
    ]
    routed = next((c for c in p.components if c.name == "routed_experts"), None)
    if routed is not None and routed.count:
        if isinstance(model, ModelConfig) and model.moe is not None:
            share = f"top_k / n_routed = {p.breakdown['routed_experts']:,} × {model.moe.top_k} / {model.moe.n_routed_experts}"
        else:
            share = f"(experts a token uses) = {p.breakdown['routed_experts']:,} × {routed.active_count or '…'} / {routed.count}"
            if routed.active is not None:
                share = "(the experts a token uses, by layer)"
        lines.append(
            f"{'routed_experts_active':<{width}} = routed_experts × {share} = {p.breakdown['routed_experts_active']:,}"
        )
    summed = [c.name for c in p.components if c.in_total]
    parts = " + ".join(f"{p.breakdown[c]:,}" for c in summed)
    lines.append(f"{'total':<{width}} = {parts} = {p.total:,}")
    lines.append(
        f"{'active':<{width}} = total - routed_experts + routed_experts_active = "
        f"{p.total:,} - {p.breakdown.get('routed_experts', 0):,} + {p.breakdown['routed_experts_active']:,} = {p.active:,}"
    )
    if p.active_range is not None:
        lo, hi = p.active_range
        lines.append(f"{'':<{width}}   (active under uniform routing; from {lo:,} to {hi:,} as routing varies)")
    if p.tied_embeddings:
        lines.append(f"{'':<{width}}   (tied embeddings: the output head reuses the embedding matrix, counted once)")
    shapes = attention_shapes(model)
    if shapes is None or f.attention_per_token is None:
        lines.append(f"{'FLOPs/token':<{width}} = 2·N_matmul = 2·{p.matmul_active:,} = {f.forward_per_token:,}")
        lines.append(f"{'':<{width}}   (attention scores not included: the attention layers are not known)")
    else:

        def ctx(s) -> str:  # a sliding window caps the keys a query sees
            n = f.seq_len if s.window is None else min(f.seq_len, s.window)
            return f"({n}+1)" if f.causal else f"2·{n}"

        sum_ = " + ".join(f"{s.n_layers}·{s.n_heads}·({s.d_qk}+{s.d_v})·{ctx(s)}" for s in shapes)
        lines.append(
            f"{'FLOPs/token':<{width}} = 2·N_matmul + {'' if f.causal else '2·'}L·H·(d_qk+d_v)·{'(S+1)' if f.causal else 'S'} = "
            f"2·{p.matmul_active:,} + {sum_} = {f.forward_per_token:,}"
        )
    lines.append(
        f"{'train FLOPs/seq':<{width}} = 3 × FLOPs/token × S = 3 × {f.forward_per_token:,} × {f.seq_len} = {f.train_per_sequence:,}"
    )
    kv_bytes = kv_cache_bytes_per_token(model, kv_dtype)
    if shapes is not None and kv_bytes is not None:
        b = dtype_bytes(kv_dtype)
        full = [s for s in shapes if s.window is None]
        if len(shapes) == 1 and shapes[0].kv_text.startswith("("):
            kv = f"L·(kv_lora_rank + qk_rope_head_dim)·bytes = {shapes[0].n_layers}·{shapes[0].kv_text}"
        else:
            kv = "L·2·G·hd·bytes = " + (" + ".join(f"{s.n_layers}·{s.kv_text}" for s in full) or "0")
        lines.append(f"{'KV cache/token':<{width}} = {kv}·{b} = {kv_bytes:,} B ({kv_dtype})")
        for s in shapes:
            if s.window is not None:
                fixed = s.n_layers * s.kv_values * s.window * b
                lines.append(
                    f"{'':<{width}}   + {s.n_layers} sliding-window layers cache only their last {s.window} tokens: "
                    f"{s.n_layers}·{s.kv_text}·{s.window}·{b} = {fixed:,} B per sequence, whatever its length"
                )
    for note in p.notes:
        lines.append(f"{'note':<{width}}   {note}")
    return "\n".join(lines)


def account(model: Model, seq_len: int = 4096, *, kv_dtype: str = "bf16", causal: bool = False) -> Report:
    """The full accounting report of ``model`` (a ``ModelConfig`` or a ``Counted``): parameters,
    FLOPs at ``seq_len``, memory."""
    p = params_of(model)
    f = count_flops(model, seq_len, causal=causal)
    stored, quant = None, None
    if isinstance(model, Counted) and model.quantization is not None:
        from moekit.accounting.quantized import stored_bytes  # only quantised configs need it

        quant, stored = stored_bytes(p, model.quantization)
    return Report(
        name=model.name,
        params=p,
        flops=f,
        weights_bytes=weights_bytes(model),
        kv_cache_dtype=kv_dtype,
        kv_cache_bytes_per_token=kv_cache_bytes_per_token(model, kv_dtype),
        kv_cache_window_bytes=kv_cache_window_bytes(model, kv_dtype),
        formula=_formula(model, p, f, kv_dtype),
        max_seq_len=model.max_seq_len,
        stored_bytes=stored,
        quantization=quant,
    )


__all__ = ["COMPONENTS", "Report", "account"]
