"""The decoder-only causal LM, built only from ``moekit.layers``.

embed -> [RMSNorm -> attention -> + -> RMSNorm -> dense FFN or MoE -> +] x L -> norm -> head
(Granite's multipliers, when set, scale the embeddings, each branch before its +, and the logits).
A forward pass can extend a ``ModelCache`` (incremental decoding) and take an attention mask that
marks padding (left-padded batches); generation itself lives in ``moekit.models.generation``.
Shapes: B batch, T tokens, D width, V vocabulary, L filled cache slots.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from moekit.config import ConfigError, ModelConfig
from moekit.layers.attention import build_attention, rotary_for
from moekit.layers.experts import Experts
from moekit.layers.kv_cache import ModelCache, padded_causal_mask
from moekit.layers.loss import next_token_loss
from moekit.layers.mlp import FeedForward
from moekit.layers.moe import MoE
from moekit.layers.norm import build_norm
from moekit.layers.rope import RotaryEmbedding
from moekit.layers.router import NonCausalRoutingWarning, Router, Routing


class ContextLengthError(ConfigError):
    """A sequence (prompt plus new tokens) is longer than the model's ``max_seq_len``."""


@dataclass
class ModelOutput:
    """What a forward pass returns; ``.logits`` as transformers users expect."""

    logits: Tensor  # [B, T, V]
    loss: Tensor | None = None  # next-token cross-entropy when labels are given
    routing: list[Routing] = field(default_factory=list)  # one per MoE layer, in layer order
    moe_layer_ids: list[int] = field(default_factory=list)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int, rope: RotaryEmbedding | None = None):
        super().__init__()
        self.layer_id = layer_id
        self.residual_multiplier = cfg.residual_multiplier
        self.attn_norm = build_norm(cfg.norm, cfg.d_model, cfg.norm_eps)
        self.attn = build_attention(cfg.attention, cfg.d_model, cfg.norm_eps, rope, layer_id)
        self.ffn_norm = build_norm(cfg.norm, cfg.d_model, cfg.norm_eps)
        self.is_moe = cfg.is_moe_layer(layer_id)
        if self.is_moe:
            assert cfg.moe is not None
            self.ffn: nn.Module = MoE(cfg.moe, cfg.d_model, vocab_size=cfg.vocab_size)
        else:
            self.ffn = FeedForward(cfg.d_model, cfg.dense_ffn_dim, bias=cfg.dense_ffn_bias)

    def forward(
        self,
        x_BTD: Tensor,
        positions_T: Tensor,
        token_ids_BT: Tensor | None = None,
        cache: ModelCache | None = None,
        mask: Tensor | None = None,
        token_mask_BT: Tensor | None = None,
    ) -> tuple[Tensor, Routing | None]:
        """``token_ids_BT`` (the input ids) reach the router for hash routing; ``token_mask_BT``
        (False at padding) keeps padding out of the router's counts and capacity."""
        layer_cache = None if cache is None else cache.layers[self.layer_id]
        offset = 0 if cache is None else cache.length
        m = self.residual_multiplier
        attn_BTD = self.attn(self.attn_norm(x_BTD), positions_T, layer_cache, offset, mask)
        x_BTD = x_BTD + (attn_BTD if m == 1.0 else attn_BTD * m)
        h_BTD = self.ffn_norm(x_BTD)
        routing = None
        if self.is_moe:
            y_BTD, routing = self.ffn(h_BTD, token_ids_BT, token_mask_BT)
        else:
            y_BTD = self.ffn(h_BTD)
        return x_BTD + (y_BTD if m == 1.0 else y_BTD * m), routing


class MoETransformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        if cfg.moe is not None and cfg.moe.router == "expert_choice" and cfg.moe_layer_ids:
            # Python's default warning filters show it once per calling line, not once per model built.
            warnings.warn(
                "router='expert_choice' is not causal: each expert picks its tokens from the whole batch, "
                "later positions included, so a token's output depends on future tokens (training leaks "
                "them; generation cannot reproduce it)",
                NonCausalRoutingWarning,
                stacklevel=2,
            )
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        # One rotary table for all layers (no parameters, not in the state dict).
        rope = rotary_for(cfg.attention, cfg.max_seq_len)
        self.layers = nn.ModuleList(Block(cfg, i, rope) for i in range(cfg.n_layers))
        self.norm = build_norm(cfg.norm, cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=cfg.lm_head_bias)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        # Set by ``from_pretrained`` from the folder: a ``moekit.tokenizer.Tokenizer`` and a
        # ``moekit.models.generation.GenerationConfig`` (generate's defaults), or None.
        self.tokenizer: Any = None
        self.generation_config: Any = None
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        """Normal(0, std) weights, zero biases, unit norms; output projections scaled by 1/sqrt(2L)."""
        out_std = std / (2 * self.config.n_layers) ** 0.5
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=out_std if name.endswith(("o_proj", "w2")) else std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=std)
            elif isinstance(module, Experts):
                nn.init.normal_(module.w1, std=std)
                nn.init.normal_(module.w3, std=std)
                nn.init.normal_(module.w2, std=out_std)
            elif isinstance(module, Router):
                module.reset_buffers()  # selection bias to 0, hash table from its seed

    def set_moe_impl(self, impl: str) -> None:
        """Switch every MoE layer's expert computation ("loop", "grouped_mm", "reference")."""
        for block in self.layers:
            if block.is_moe:
                block.ffn.impl = impl

    def forward(
        self,
        input_ids: Tensor,
        labels: Tensor | None = None,
        *,
        cache: ModelCache | None = None,
        attention_mask: Tensor | None = None,
    ) -> ModelOutput:
        """``labels`` follow transformers: same shape as ``input_ids``, shifted inside, -100 ignored.

        ``cache`` (from ``new_cache``): the tokens extend it and attend to what it holds.
        ``attention_mask`` ``[B, T]``: 1 at real tokens, 0 at padding of ``input_ids`` (the new
        tokens only; the cache remembers earlier ones). Padding takes no rotary position, is never
        attended to, and is not counted or given capacity by the routers.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        t = input_ids.shape[1]
        past = 0 if cache is None else cache.length
        if past + t > self.config.max_seq_len:
            raise ContextLengthError(
                f"{past + t} tokens exceed the model's context (max_seq_len {self.config.max_seq_len})"
            )
        token_mask_BT = None if attention_mask is None else attention_mask.bool()
        if cache is not None:
            positions, mask = cache.append(token_mask_BT, t)
            if not cache.padded:
                token_mask_BT = None
        elif token_mask_BT is not None:
            positions = (token_mask_BT.long().cumsum(dim=1) - 1).clamp_min(0)
            mask = padded_causal_mask(token_mask_BT, t)
        else:
            positions, mask = torch.arange(t, device=input_ids.device), None
        x_BTD = self.embed(input_ids)
        if self.config.embedding_multiplier != 1.0:
            x_BTD = x_BTD * self.config.embedding_multiplier
        routings, moe_ids = [], []
        for block in self.layers:
            x_BTD, routing = block(x_BTD, positions, input_ids, cache, mask, token_mask_BT)
            if routing is not None:
                routings.append(routing)
                moe_ids.append(block.layer_id)
        if cache is not None:
            cache.advance(t)
        logits_BTV = self.lm_head(self.norm(x_BTD))
        if self.config.logits_divisor != 1.0:
            logits_BTV = logits_BTV / self.config.logits_divisor
        loss = None
        if labels is not None:
            loss = next_token_loss(logits_BTV, labels)
        return ModelOutput(logits=logits_BTV, loss=loss, routing=routings, moe_layer_ids=moe_ids)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def save_pretrained(self, path: str | Path, format: Literal["hf", "moekit"] = "hf", **kwargs: Any) -> Path:
        """Write a checkpoint folder; see ``moekit.interop.pretrained.save_pretrained``."""
        from moekit.interop.pretrained import save_pretrained  # interop sits downstream of models

        return save_pretrained(self, path, format, **kwargs)

    def new_cache(self, batch: int, max_len: int | None = None, dtype: torch.dtype | None = None) -> ModelCache:
        """An empty KV cache for ``batch`` sequences of up to ``max_len`` tokens (default: the
        context), in the model's dtype and on its device."""
        p = self.embed.weight
        return ModelCache(self.config, batch, max_len or self.config.max_seq_len, dtype or p.dtype, p.device)

    def generate(self, input_ids: Tensor, max_new_tokens: int | None = None, **kwargs: Any) -> Tensor:
        """Continue ``input_ids`` with a KV cache; see ``moekit.models.generation.generate``."""
        from moekit.models.generation import generate

        return generate(self, input_ids, max_new_tokens, **kwargs)
