"""The KV cache: per-layer key/value storage preallocated for a whole generation, and the model-level
bookkeeping (how many positions are filled, which of them are padding, each row's next position).

- ``KVCache``: grouped-query attention stores its roped keys and its values, ``[B, G, S, d]`` each.
- ``SlidingKVCache``: a sliding-window layer (gpt-oss) keeps only its last ``window`` slots in a ring.
- ``LatentCache``: multi-head latent attention (DeepSeek-V2/V3) stores only the normalised latent
  and the roped, head-shared key part, ``[B, S, C + R]`` (576 values per token for V3 instead of
  40,960 for expanded keys and values); the heads' keys and values are recomputed from it, or the
  up-projections are absorbed into the query and the output (see ``LatentAttention``).
- ``ModelCache``: one of those per layer plus ``length`` (positions filled, the same for every
  row), ``valid_BS`` (False at padding slots; None while there is no padding) and ``next_pos_B``
  (each row's next rotary position: left padding takes no position, as in transformers).

Storage is allocated once in the model's dtype; ``bytes_per_token`` equals
``moekit.accounting.kv_cache_bytes_per_token`` at that dtype (a test checks it).
Shapes: B batch, G key/value heads, S cache slots (max length), T new tokens, L filled slots
(``length`` + T), d head width, C latent width, R rotary width.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moekit.config import ModelConfig


class KVCache:
    """Keys and values of one grouped-query attention layer."""

    def __init__(self, batch: int, n_kv_heads: int, max_len: int, k_dim: int, v_dim: int, dtype, device):
        self.k_BGSd = torch.empty(batch, n_kv_heads, max_len, k_dim, dtype=dtype, device=device)
        self.v_BGSd = torch.empty(batch, n_kv_heads, max_len, v_dim, dtype=dtype, device=device)

    def update(self, k_BGTd: Tensor, v_BGTd: Tensor, offset: int) -> tuple[Tensor, Tensor]:
        """Store the new keys/values at ``offset`` and return all filled ones, ``[B, G, L, d]`` views."""
        end = offset + k_BGTd.shape[2]
        self.k_BGSd[:, :, offset:end] = k_BGTd
        self.v_BGSd[:, :, offset:end] = v_BGTd
        return self.k_BGSd[:, :, :end], self.v_BGSd[:, :, :end]

    @property
    def values_per_token(self) -> int:
        return self.k_BGSd.shape[1] * (self.k_BGSd.shape[3] + self.v_BGSd.shape[3])


class SlidingKVCache:
    """Keys and values of one sliding-window layer: only the last ``window`` slots, in a ring.

    A query at slot q sees slots q - window + 1 .. q, so after the new tokens are stored nothing
    older than the last ``window`` slots is ever read again; memory is fixed, not per token.
    """

    def __init__(self, batch: int, n_kv_heads: int, window: int, k_dim: int, v_dim: int, dtype, device):
        self.window = window
        self.k_BGWd = torch.empty(batch, n_kv_heads, window, k_dim, dtype=dtype, device=device)
        self.v_BGWd = torch.empty(batch, n_kv_heads, window, v_dim, dtype=dtype, device=device)

    def update(self, k_BGTd: Tensor, v_BGTd: Tensor, offset: int) -> tuple[Tensor, Tensor]:
        """Store the new keys/values (slots ``offset ..``) and return those of slots
        ``offset - min(offset, window - 1) .. offset + T``: the earlier ones still inside a new
        query's window, then the new ones."""
        t, w = k_BGTd.shape[2], self.window
        keep = min(offset, w - 1)
        device = k_BGTd.device
        if keep:
            ring = torch.arange(offset - keep, offset, device=device) % w
            k_BGLd = torch.cat([self.k_BGWd[:, :, ring], k_BGTd], dim=2)
            v_BGLd = torch.cat([self.v_BGWd[:, :, ring], v_BGTd], dim=2)
        else:
            k_BGLd, v_BGLd = k_BGTd, v_BGTd
        n = min(t, w)
        ring = torch.arange(offset + t - n, offset + t, device=device) % w
        self.k_BGWd[:, :, ring] = k_BGTd[:, :, t - n :]
        self.v_BGWd[:, :, ring] = v_BGTd[:, :, t - n :]
        return k_BGLd, v_BGLd

    @property
    def values_per_token(self) -> int:
        return 0  # a fixed-size ring: see window_values

    @property
    def window_values(self) -> int:
        return self.window * self.k_BGWd.shape[1] * (self.k_BGWd.shape[3] + self.v_BGWd.shape[3])


class LatentCache:
    """The normalised kv latent and the roped shared key of one latent-attention layer, ``[B, S, C + R]``.

    One tensor, latent first: the absorbed decode path attends over it directly (keys are the
    whole row, values its first C columns).
    """

    def __init__(self, batch: int, max_len: int, latent_dim: int, rope_dim: int, dtype, device):
        self.latent_dim = latent_dim
        self.kv_BSX = torch.empty(batch, max_len, latent_dim + rope_dim, dtype=dtype, device=device)

    def update(self, latent_BTC: Tensor, k_rot_BTR: Tensor, offset: int) -> Tensor:
        """Store the new rows at ``offset`` and return all filled ones, a ``[B, L, C + R]`` view."""
        end = offset + latent_BTC.shape[1]
        self.kv_BSX[:, offset:end, : self.latent_dim] = latent_BTC
        self.kv_BSX[:, offset:end, self.latent_dim :] = k_rot_BTR
        return self.kv_BSX[:, :end]

    @property
    def values_per_token(self) -> int:
        return self.kv_BSX.shape[2]


class ModelCache:
    """Every layer's cache and the positions bookkeeping shared by all layers."""

    def __init__(
        self, cfg: ModelConfig, batch: int, max_len: int, dtype: torch.dtype, device: torch.device | str = "cpu"
    ):
        a = cfg.attention
        self.max_len, self.batch = max_len, batch
        if a.kind == "mla":
            self.layers: list[KVCache | SlidingKVCache | LatentCache] = [
                LatentCache(batch, max_len, a.kv_lora_rank, a.qk_rope_head_dim, dtype, device)
                for _ in range(cfg.n_layers)
            ]
        else:
            assert a.n_kv_heads is not None and a.head_dim is not None
            self.layers = [
                SlidingKVCache(
                    batch, a.n_kv_heads, min(a.sliding_window, max_len), a.head_dim, a.head_dim, dtype, device
                )
                if a.is_sliding(i) and a.sliding_window is not None
                else KVCache(batch, a.n_kv_heads, max_len, a.head_dim, a.head_dim, dtype, device)
                for i in range(cfg.n_layers)
            ]
        self.length = 0
        self.valid_BS: Tensor | None = None
        self.next_pos_B = torch.zeros(batch, dtype=torch.long, device=device)
        self.padded = False  # True from the first padding on: masks and per-row positions from then
        self._real_B: Tensor | None = None  # real tokens per row in the last ``append``

    @property
    def _value_size(self) -> int:
        first = self.layers[0]
        return (
            first.kv_BSX
            if isinstance(first, LatentCache)
            else first.k_BGSd
            if isinstance(first, KVCache)
            else first.k_BGWd
        ).element_size()

    @property
    def bytes_per_token(self) -> int:
        """Bytes stored per cached token over all layers (one sequence); sliding-window layers add
        none (their fixed ring is ``window_bytes``)."""
        return sum(layer.values_per_token for layer in self.layers) * self._value_size

    @property
    def window_bytes(self) -> int:
        """Bytes the sliding-window layers' rings hold in all (one sequence), whatever its length."""
        return sum(getattr(layer, "window_values", 0) for layer in self.layers) * self._value_size

    def append(self, mask_BT: Tensor | None, t: int) -> tuple[Tensor, Tensor | None]:
        """Register ``t`` new tokens (``mask_BT`` False at padding) and return their rotary positions
        (``[T]``, or ``[B, T]`` once there is padding) and the attention mask over the filled slots
        (``[B, 1, T, L]`` bool, or None for plain causal attention). Call once per forward, before
        the layers; ``advance`` after them."""
        if self.length + t > self.max_len:
            raise ValueError(f"the cache holds {self.max_len} positions; {self.length} used, {t} more requested")
        device = self.next_pos_B.device
        if mask_BT is not None and not self.padded and bool(mask_BT.all()):
            mask_BT = None  # all real tokens: keep the cheap unpadded path
        if mask_BT is None and not self.padded:
            return torch.arange(self.length, self.length + t, device=device), None
        if not self.padded:  # the first padding: earlier slots were all real
            self.valid_BS = torch.zeros(self.batch, self.max_len, dtype=torch.bool, device=device)
            self.valid_BS[:, : self.length] = True
            self.padded = True
        assert self.valid_BS is not None
        mask_BT = torch.ones(self.batch, t, dtype=torch.bool, device=device) if mask_BT is None else mask_BT.bool()
        end = self.length + t
        self.valid_BS[:, self.length : end] = mask_BT
        positions_BT = (self.next_pos_B[:, None] + mask_BT.long().cumsum(dim=1) - 1).clamp_min(0)
        self._real_B = mask_BT.long().sum(dim=1)
        return positions_BT, padded_causal_mask(self.valid_BS[:, :end], t)

    def advance(self, t: int) -> None:
        """Mark the ``t`` tokens registered by ``append`` as filled."""
        self.length += t
        if self.padded:
            assert self._real_B is not None
            self.next_pos_B += self._real_B
        else:
            self.next_pos_B += t


def padded_causal_mask(valid_BL: Tensor, t: int) -> Tensor:
    """``[B, 1, T, L]`` bool: the last ``t`` slots attend causally to the real slots before them.

    A padding query attends to itself only, so no softmax row is empty (its output is never used).
    """
    n = valid_BL.shape[1]
    q_T1 = torch.arange(n - t, n, device=valid_BL.device)[:, None]
    k_1L = torch.arange(n, device=valid_BL.device)[None, :]
    causal_TL = k_1L <= q_T1
    return ((causal_TL[None] & valid_BL[:, None, :]) | (k_1L == q_T1)[None]).unsqueeze(1)
