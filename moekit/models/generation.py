"""Text generation with a KV cache: sampling rules, generation defaults, streaming.

``generate(model, input_ids, ...)`` (also ``MoETransformer.generate``) runs the prompt once
(prefill), then one token per step against the cache, so a step costs the same whatever the
length so far (plus attention over the cache). Settings left as None come from
``model.generation_config`` (``from_pretrained`` reads the folder's ``generation_config.json``),
else greedy decoding. Temperature 0 is greedy; otherwise logits / temperature -> top-k -> top-p
(nucleus) -> sample, in transformers' order, from a ``torch.Generator`` seeded by ``seed``.
Left-padded batches pass ``attention_mask``: padding takes no position, is never attended to and
never reaches the routed experts. Generation stops at ``max_new_tokens`` or when every row has
produced an end-of-sequence token (finished rows are filled with ``pad_token_id``).

Shapes: B batch, T prompt length, V vocabulary.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from moekit.config import ConfigError
from moekit.models.transformer import ContextLengthError, MoETransformer

GENERATION_CONFIG = "generation_config.json"
DEFAULT_MAX_NEW_TOKENS = 64


@dataclass
class GenerationConfig:
    """Generation defaults (a subset of transformers' ``generation_config.json``)."""

    max_new_tokens: int | None = None
    temperature: float = 0.0  # 0: greedy
    top_k: int | None = None
    top_p: float | None = None
    eos_token_id: list[int] = field(default_factory=list)
    pad_token_id: int | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = GENERATION_CONFIG) -> GenerationConfig:
        """Read transformers' fields; ``do_sample`` false (its default) means greedy."""

        def number(key: str, kind: type) -> Any:
            v = d.get(key)
            if v is None:
                return None
            if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and not isinstance(v, int)):
                raise ConfigError(f"{where}: '{key}' must be a {kind.__name__}, got {v!r}")
            return kind(v)

        eos = d.get("eos_token_id")
        eos_ids = [] if eos is None else [eos] if isinstance(eos, int) else eos
        if not isinstance(eos_ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in eos_ids):
            raise ConfigError(f"{where}: 'eos_token_id' must be an integer or a list of integers, got {eos!r}")
        sample = bool(d.get("do_sample", False))
        temperature = number("temperature", float)
        top_k = number("top_k", int)
        return cls(
            max_new_tokens=number("max_new_tokens", int),
            temperature=(1.0 if temperature is None else temperature) if sample else 0.0,
            top_k=top_k if sample and top_k else None,  # transformers' top_k = 0 means off
            top_p=number("top_p", float) if sample else None,
            eos_token_id=list(eos_ids),
            pad_token_id=number("pad_token_id", int),
        )

    @classmethod
    def from_folder(cls, folder: str | Path) -> GenerationConfig | None:
        """The folder's ``generation_config.json``, or None when it has none."""
        path = Path(folder) / GENERATION_CONFIG
        if not path.is_file():
            return None
        try:
            d = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"cannot read {path}: {e}") from None
        if not isinstance(d, dict):
            raise ConfigError(f"{path} must hold a JSON object")
        return cls.from_dict(d, str(path))


class Streamer(Protocol):
    """Receives each step's new tokens ``[B]`` as they are chosen, then ``end()`` once."""

    def put(self, tokens_B: Tensor) -> None: ...

    def end(self) -> None: ...


class TextStreamer:
    """Writes the decoded text of a one-sequence generation as it grows.

    Decodes everything produced so far and writes the new part, holding back text that ends in
    an incomplete UTF-8 sequence (U+FFFD) until the next token completes it. ``stop_ids`` (the
    end-of-sequence tokens) are not written.
    """

    def __init__(self, decode: Callable[[list[int]], str], write: Callable[[str], Any], stop_ids: Sequence[int] = ()):
        self.decode, self.write, self.stop_ids = decode, write, set(stop_ids)
        self.ids: list[int] = []
        self.printed = 0

    def put(self, tokens_B: Tensor) -> None:
        if tokens_B.numel() != 1:
            raise ValueError("TextStreamer streams one sequence; generate with batch size 1")
        token = int(tokens_B.reshape(-1)[0])
        if token in self.stop_ids:
            return
        self.ids.append(token)
        text = self.decode(self.ids)
        if text.endswith("\ufffd"):
            return
        self.write(text[self.printed :])
        self.printed = len(text)

    def end(self) -> None:
        text = self.decode(self.ids)
        if len(text) > self.printed:
            self.write(text[self.printed :])
            self.printed = len(text)

    @property
    def text(self) -> str:
        return self.decode(self.ids)


def sample_next(
    logits_BV: Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The next token of each row ``[B]``: argmax at temperature 0, else a draw after top-k / top-p."""
    if temperature <= 0:
        return logits_BV.argmax(dim=-1)
    logits_BV = logits_BV.float() / temperature
    if top_k is not None and top_k < logits_BV.shape[-1]:
        kth_B1 = logits_BV.topk(top_k, dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth_B1, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_BV, order_BV = logits_BV.sort(dim=-1, descending=True)
        probs_BV = sorted_BV.softmax(dim=-1)
        # Drop a token when the more likely ones already hold top_p of the mass (the first stays).
        drop_BV = (probs_BV.cumsum(dim=-1) - probs_BV) >= top_p
        drop_BV[:, 0] = False
        logits_BV = logits_BV.masked_fill(drop_BV.scatter(1, order_BV, drop_BV), float("-inf"))
    probs_BV = logits_BV.softmax(dim=-1)
    return torch.multinomial(probs_BV, 1, generator=generator).squeeze(-1)


def _check_settings(max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if temperature < 0:
        raise ConfigError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ConfigError(f"top_k must be a positive integer, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ConfigError(f"top_p must be in (0, 1], got {top_p}")


@torch.no_grad()
def generate(
    model: MoETransformer,
    input_ids: Tensor,
    max_new_tokens: int | None = None,
    *,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    seed: int | None = None,
    attention_mask: Tensor | None = None,
    streamer: Streamer | None = None,
    token_sync: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """The prompt ``input_ids`` ``[B, T]`` followed by up to ``max_new_tokens`` new tokens.

    ``attention_mask`` ``[B, T]``: 0 at left padding. ``eos_token_id``: one id or several; a row
    that produced one is finished. ``seed``: sampling draws from a generator seeded with it (the
    same seed, prompt and settings give the same tokens). ``streamer.put`` gets each step's tokens.
    ``token_sync`` makes the processes of a sharded model agree on each step's tokens (it returns
    rank 0's, see ``moekit.parallel.inference``), so they stop at the same step.
    A prompt plus ``max_new_tokens`` longer than the model's ``max_seq_len`` is a
    ``ContextLengthError``.
    """
    defaults = getattr(model, "generation_config", None) or GenerationConfig()
    max_new = max_new_tokens if max_new_tokens is not None else defaults.max_new_tokens or DEFAULT_MAX_NEW_TOKENS
    temperature = defaults.temperature if temperature is None else temperature
    if top_k is None and top_p is None:
        top_k, top_p = defaults.top_k, defaults.top_p
    _check_settings(max_new, temperature, top_k, top_p)
    eos = defaults.eos_token_id if eos_token_id is None else eos_token_id
    eos_ids = [eos] if isinstance(eos, int) else list(eos)
    pad = pad_token_id if pad_token_id is not None else defaults.pad_token_id
    if pad is None:
        pad = eos_ids[0] if eos_ids else 0
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ConfigError(f"input_ids must be [batch, prompt length >= 1], got shape {tuple(input_ids.shape)}")
    b, t = input_ids.shape
    if t + max_new > model.config.max_seq_len:
        raise ContextLengthError(
            f"the prompt ({t} tokens) plus max_new_tokens ({max_new}) is {t + max_new} tokens, more than the "
            f"model's context (max_seq_len {model.config.max_seq_len}); shorten the prompt or generate fewer tokens"
        )
    if attention_mask is not None:
        if attention_mask.shape != input_ids.shape:
            raise ConfigError(
                f"attention_mask has shape {tuple(attention_mask.shape)}, expected that of input_ids {(b, t)}"
            )
        if not bool(attention_mask[:, -1].all()):
            raise ConfigError("attention_mask must be left-padded: the last token of every row must be real (1)")
    device = input_ids.device
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    eos_t = torch.tensor(eos_ids, dtype=torch.long, device=device)
    cache = model.new_cache(b, t + max_new)
    logits_BV = model(input_ids, cache=cache, attention_mask=attention_mask).logits[:, -1]
    finished_B = torch.zeros(b, dtype=torch.bool, device=device)
    new: list[Tensor] = []
    for step in range(max_new):
        next_B = sample_next(logits_BV, temperature, top_k, top_p, generator)
        if token_sync is not None:
            next_B = token_sync(next_B)
        if eos_ids:
            next_B = next_B.masked_fill(finished_B, pad)
            finished_B = finished_B | torch.isin(next_B, eos_t)
        new.append(next_B)
        if streamer is not None:
            streamer.put(next_B)
        if step == max_new - 1 or (eos_ids and bool(finished_B.all())):
            break
        logits_BV = model(next_B[:, None], cache=cache).logits[:, -1]
    if streamer is not None:
        streamer.end()
    return torch.cat([input_ids, torch.stack(new, dim=1)], dim=1)


__all__ = [
    "GENERATION_CONFIG",
    "GenerationConfig",
    "Streamer",
    "TextStreamer",
    "generate",
    "sample_next",
]
