"""One tokenizer protocol for the tokenizers moekit trains and the ones checkpoints ship.

- ``ByteTokenizer``: UTF-8 bytes as ids (training's ``train.tokenizer=byte``).
- ``TextTokenizer``: a Hugging Face ``tokenizers.Tokenizer`` (a folder's ``tokenizer.json``) plus
  what ``tokenizer_config.json`` adds: the end-of-sequence token and the chat template. Training's
  ``BPETokenizer`` (``moekit.training.tokenizer``) is one, trained on a corpus.

Generation needs ``encode`` / ``decode``, ``eos_token_ids`` (where to stop) and, for chat, the
template (rendered by ``render_chat`` with ``jinja2`` as transformers does); training needs
``encode_batch``, ``eot_id`` (the document separator) and ``to_str`` (the tokenizer's identity).
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from moekit.errors import CheckpointError, MoekitError

EOT = "<|endoftext|>"
TOKENIZER_FILE, TOKENIZER_CONFIG, CHAT_TEMPLATE_FILE = "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"


class Tokenizer(Protocol):
    kind: str  # "byte", "bpe" (trained by moekit) or "hf" (loaded from a folder)
    vocab_size: int
    eot_id: int | None  # separates documents in training's token stream
    eos_token_ids: list[int]  # generation stops at any of these
    chat_template: str | None  # a jinja2 template over ``messages``, or None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...

    def decode(self, ids: list[int]) -> str: ...

    def to_str(self) -> str: ...  # the tokenizer's identity (BPE: its tokenizer.json text)


class ByteTokenizer:
    """UTF-8 bytes as ids (vocabulary 256); NUL, which text files never contain, separates documents."""

    kind = "byte"
    vocab_size = 256
    eot_id = 0
    eos_token_ids = [0]
    chat_template = None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if 0 < i < 256).decode("utf-8", errors="replace")

    def to_str(self) -> str:
        return "byte"  # identifies it in cache keys; nothing to save

    def save(self, folder: str | Path) -> None:
        """Nothing to write: a byte-level run is recognised from its run directory."""


def _token_text(value: Any) -> str | None:
    """A special token in tokenizer_config.json: a string or an ``AddedToken`` dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class TextTokenizer:
    """A ``tokenizers.Tokenizer`` with the special tokens and chat template of its folder."""

    kind = "hf"

    def __init__(self, tok: Any, config: dict[str, Any] | None = None, chat_template: str | None = None):
        self.tok = tok
        config = config or {}
        self.vocab_size = tok.get_vocab_size()
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        eos_id = None if self.eos_token is None else tok.token_to_id(self.eos_token)
        eot_id = tok.token_to_id(EOT)
        self.eot_id = eot_id if eot_id is not None else eos_id
        ids = [i for i in (eos_id, eot_id) if i is not None]
        self.eos_token_ids = list(dict.fromkeys(ids))
        if self.eos_token is None and eot_id is not None:
            self.eos_token = EOT
        template = chat_template if chat_template is not None else config.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        self.chat_template = template if isinstance(template, str) else None

    @classmethod
    def from_folder(cls, folder: str | Path) -> TextTokenizer | None:
        """The folder's tokenizer (``tokenizer.json`` + ``tokenizer_config.json`` + ``chat_template.jinja``),
        or None when it has no ``tokenizer.json``."""
        folder = Path(folder)
        file = folder / TOKENIZER_FILE
        if not file.is_file():
            return None
        try:
            from tokenizers import Tokenizer as HFTokenizer
        except ImportError:
            raise MoekitError(f"{file} needs the 'tokenizers' package: pip install 'moekit[hf]'") from None
        try:
            tok = HFTokenizer.from_file(str(file))
        except Exception as e:  # tokenizers raises plain Exceptions for malformed files
            raise CheckpointError(f"cannot read {file}: {e}") from None
        config: dict[str, Any] = {}
        if (folder / TOKENIZER_CONFIG).is_file():
            try:
                config = json.loads((folder / TOKENIZER_CONFIG).read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                raise CheckpointError(f"cannot read {folder / TOKENIZER_CONFIG}: {e}") from None
            if not isinstance(config, dict):
                raise CheckpointError(f"{folder / TOKENIZER_CONFIG} must hold a JSON object")
        template = None
        if (folder / CHAT_TEMPLATE_FILE).is_file():
            template = (folder / CHAT_TEMPLATE_FILE).read_text()
        return cls(tok, config, template)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts)]

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)

    def to_str(self) -> str:
        return self.tok.to_str()

    def save(self, path: str | Path) -> None:
        """Write ``tokenizer.json`` to ``path`` (a file path)."""
        self.tok.save(str(path))


def render_chat(tokenizer: Tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
    """The tokenizer's chat template rendered over ``messages`` (``[{"role": ..., "content": ...}]``)
    with ``jinja2``'s sandbox, with the variables and helpers transformers provides."""
    template = tokenizer.chat_template
    if template is None:
        raise MoekitError("this model's tokenizer has no chat template (tokenizer_config.json 'chat_template')")
    try:
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise MoekitError("chat templates need the 'jinja2' package: pip install 'moekit[hf]'") from None

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys=False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template).render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=getattr(tokenizer, "bos_token", None) or "",
            eos_token=getattr(tokenizer, "eos_token", None) or "",
        )
    except TemplateError as e:
        raise MoekitError(f"the chat template failed: {e}") from None


__all__ = ["EOT", "ByteTokenizer", "TextTokenizer", "Tokenizer", "render_chat"]
