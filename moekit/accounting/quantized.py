"""Stored bytes of a quantised checkpoint: parameters at their stored width plus the scale tensors.

Parameters are always counted as parameters (``ParamCount``); scales are never parameters. The
stored size depends on the scheme in the config's ``quantization_config``:

- ``fp8`` with ``weight_block_size`` [128, 128] (DeepSeek-V3, Kimi-K2, GLM-4.5-FP8, MiniMax-M2): every
  linear weight of the decoder layers (attention, experts, shared experts, dense FFNs) is one
  byte, with one fp32 scale per 128×128 block (``weight_scale_inv``); the embedding, the output
  head, norms and routers stay bf16 (``modules_to_not_convert`` keeps them out).
- ``mxfp4`` (gpt-oss): routed-expert weights are 4-bit with one uint8 scale per 32 values
  (the OCP microscaling format); everything else bf16.

Blocks are counted per parameter (``numel / block``), which matches the real scale count when
every matrix dimension is a multiple of the block (all the published models); a ragged matrix
holds up to one more row/column of blocks.
"""

from __future__ import annotations

from moekit.accounting.counts import ParamCount

_BF16 = 2
_NOT_QUANTISED = ("embedding", "lm_head", "norms", "routers")


def stored_bytes(p: ParamCount, q: dict) -> tuple[str, int | None]:
    """(scheme, bytes) of a checkpoint quantised as ``q`` (a ``quantization_config``); bytes is
    None for a scheme moekit does not know (its name is still reported)."""
    method = str(q.get("quant_method", "unknown"))
    fmt = str(q.get("fmt", ""))
    quantised = {c: v for c, v in p.breakdown.items() if c != "routed_experts_active"}
    if method == "fp8":
        block = q.get("weight_block_size") or [128, 128]
        per_block = int(block[0]) * int(block[1])
        q8 = sum(v for c, v in quantised.items() if c not in _NOT_QUANTISED)
        rest = sum(v for c, v in quantised.items() if c in _NOT_QUANTISED)
        return f"fp8 {fmt} blocks {block[0]}x{block[1]}".replace("  ", " "), q8 + 4 * (q8 // per_block) + _BF16 * rest
    if method == "mxfp4":
        experts = quantised.get("routed_experts", 0)
        rest = sum(v for c, v in quantised.items() if c != "routed_experts")
        return "mxfp4 experts", experts // 2 + experts // 32 + _BF16 * rest
    return method, None
