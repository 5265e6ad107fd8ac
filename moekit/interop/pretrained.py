"""Checkpoint folders: load Hugging Face or moekit ones into a ``MoETransformer``, save either kind.

A folder holds ``config.json`` and ``model.safetensors`` (or shards listed by
``model.safetensors.index.json``), and optionally ``tokenizer.json``.
- Hugging Face folders: ``config.json`` has a ``model_type``; tensors use the hub names (see
  ``hf_weights``). Read by ``hf_config.config_from_hf``, written by ``hf_export.to_hf_config``.
- moekit folders: ``config.json`` is ``ModelConfig.to_dict()``; tensors use moekit's own names.

Loading is strict and all-or-nothing: names, shapes and config options are checked on the
tensors' headers before a model exists, so a bad folder raises a ``MoekitError`` naming the
tensor or field and never yields a partly loaded model. ``device="meta"`` stops there: the model
has the right shapes and dtypes and no data is read (for accounting).

The tokenizer: ``from_pretrained`` sets ``model.tokenizer`` to ``load_tokenizer(folder)``, a
``moekit.tokenizer.Tokenizer`` or None; ``save_pretrained`` writes it back as ``tokenizer.json``.
``model.generation_config`` holds the folder's ``generation_config.json`` (or None). A moekit
training run directory loads its newest checkpoint (``run_folder``).
"""

from __future__ import annotations

import json
import re
import shutil
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from moekit.atomic import atomic_folder
from moekit.config import ConfigError, ModelConfig
from moekit.interop.hf_weights import (
    CheckpointError,
    Piece,
    Source,
    UnsupportedError,
    check_tensors,
    hf_sources,
    resolve,
    to_hf_state_dict,
)
from moekit.interop.run_folder import resolve_run_folder
from moekit.models.generation import GenerationConfig
from moekit.models.transformer import MoETransformer
from moekit.tokenizer import ByteTokenizer, TextTokenizer, Tokenizer

CONFIG, WEIGHTS, INDEX, TOKENIZER = "config.json", "model.safetensors", "model.safetensors.index.json", "tokenizer.json"
# Files next to the weights that a conversion carries over unchanged (tokenizer, generation).
SIDE_FILES = (
    TOKENIZER,
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
)

_ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


# Reading ----------------------------------------------------------------------------------------


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder: the index's shards, or ``model.safetensors``."""
    if (folder / INDEX).is_file():
        index = _read_json(folder / INDEX)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{folder / INDEX} has no 'weight_map' object")
        files = [folder / name for name in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"shard {f.name} listed in {INDEX} is missing from {folder}")
        return files
    if (folder / WEIGHTS).is_file():
        return [folder / WEIGHTS]
    found = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt*"))
    hint = f" (found {found[:3]}: only safetensors checkpoints are supported)" if found else ""
    raise CheckpointError(f"{folder} has neither {WEIGHTS} nor {INDEX}{hint}")


def read_headers(folder: Path) -> dict[str, tuple[Path, Tensor]]:
    """Every tensor of the folder's safetensors files as ``name -> (file, meta tensor)``: names,
    shapes and dtypes from the headers, no data read."""
    out: dict[str, tuple[Path, Tensor]] = {}
    for path in weight_files(folder):
        try:
            with safe_open(path, framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                    if name in out:
                        raise CheckpointError(f"tensor {name!r} appears in more than one shard ({path.name})")
                    sl = f.get_slice(name)
                    dtype = _ST_DTYPES.get(sl.get_dtype())
                    if dtype is None:
                        raise CheckpointError(f"tensor {name!r} in {path.name} has unsupported dtype {sl.get_dtype()}")
                    out[name] = (path, torch.empty(sl.get_shape(), dtype=dtype, device="meta"))
        except (OSError, SafetensorError) as e:
            raise CheckpointError(f"cannot read {path}: {e}") from None
    return out


def read_tensors(folder: Path, meta: bool = False) -> dict[str, Tensor]:
    """Every tensor of the folder's safetensors files; meta tensors (header only) when ``meta``."""
    headers = read_headers(folder)
    if meta:
        return {name: t for name, (_, t) in headers.items()}
    out: dict[str, Tensor] = {}
    for path in dict.fromkeys(p for p, _ in headers.values()):
        try:
            with safe_open(path, framework="pt") as f:
                for name in f.keys():  # noqa: SIM118
                    out[name] = f.get_tensor(name)
        except (OSError, SafetensorError) as e:
            raise CheckpointError(f"cannot read {path}: {e}") from None
    return out


def load_tokenizer(path: str | Path) -> Tokenizer | None:
    """The folder's tokenizer (``tokenizer.json`` with its ``tokenizer_config.json``; a byte-level
    training run's byte tokenizer), or None when there is none.

    Without the optional ``tokenizers`` package a present tokenizer is skipped with a warning.
    """
    run = resolve_run_folder(path)
    folder = Path(path) if run is None else run.checkpoint
    if run is not None and run.tokenizer_kind == "byte":
        return ByteTokenizer()
    if not (folder / TOKENIZER).is_file():
        return None
    try:
        import tokenizers  # noqa: F401
    except ImportError:
        warnings.warn(
            f"{folder / TOKENIZER} not loaded: install the 'tokenizers' package (pip install moekit[hf])", stacklevel=2
        )
        return None
    return TextTokenizer.from_folder(folder)


# Config options transformers honours but ModelConfig does not represent: refuse them rather than
# load a model that computes something else. (config_from_hf already rejects what changes shapes.)
def _check_hf_options(d: dict[str, Any]) -> None:
    mt = d.get("model_type")
    where = f"config.json (model_type {mt})"

    def refuse(key: str, why: str) -> None:
        raise UnsupportedError(f"{where}: '{key}' = {d[key]!r} is not supported: {why}")

    if d.get("quantization_config") is not None:
        refuse("quantization_config", "quantized checkpoints must be dequantized first")
    if d.get("hidden_act", "silu") != "silu":
        refuse("hidden_act", "moekit's FFNs are SwiGLU (silu)")
    if mt == "mixtral" and d.get("sliding_window") is not None:
        if d["sliding_window"] < d.get("max_position_embeddings", 0):
            refuse("sliding_window", "sliding-window attention is not implemented")
    if mt in ("qwen2_moe", "qwen3_moe") and d.get("use_sliding_window"):
        refuse("use_sliding_window", "sliding-window attention is not implemented")
    if mt == "olmoe" and d.get("clip_qkv") is not None:
        refuse("clip_qkv", "q/k/v clamping is not implemented")
    if mt == "deepseek_v3" and d.get("scoring_func", "sigmoid") != "sigmoid":
        refuse("scoring_func", "transformers' DeepSeek-V3 always scores with a sigmoid")
    for key in ("rope_scaling", "rope_parameters"):
        rope = d.get(key)
        if isinstance(rope, dict) and rope.get("truncate") is False:
            raise UnsupportedError(f"{where}: '{key}.truncate' = False is not supported: YaRN is always truncated")
        if isinstance(rope, dict) and rope.get("partial_rotary_factor", 1.0) != 1.0:
            raise UnsupportedError(
                f"{where}: '{key}.partial_rotary_factor' is not supported: rotary covers whole heads"
            )


def _hf_ignored(d: dict[str, Any], n_layers: int):
    """Checkpoint tensors the model does not use: rotary caches of old exports and DeepSeek-V3's
    multi-token-prediction layers (``num_nextn_predict_layers`` after the last layer)."""
    n_extra = int(d.get("num_nextn_predict_layers") or 0)
    layer = re.compile(r"model\.layers\.(\d+)\.")

    def ignore(name: str) -> bool:
        if name.endswith("rotary_emb.inv_freq"):
            return True
        m = layer.match(name)
        return m is not None and n_layers <= int(m.group(1)) < n_layers + n_extra

    return ignore


def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    names.update({"float16": torch.float16, "fp16": torch.float16})
    if dtype not in names:
        raise ConfigError(f"dtype must be one of {sorted(names)}, got {dtype!r}")
    return names[dtype]


def load_config(path: str | Path) -> tuple[ModelConfig, dict[str, Any] | None]:
    """The folder's ``ModelConfig`` and, for a Hugging Face folder, its raw ``config.json`` dict."""
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder {folder} does not exist")
    raw = _read_json(folder / CONFIG)
    if not isinstance(raw, dict):
        raise CheckpointError(f"{folder / CONFIG} must hold a JSON object")
    if "model_type" not in raw:
        try:
            return ModelConfig.from_dict(raw), None
        except ConfigError as e:
            raise ConfigError(f"{folder / CONFIG}: {e}") from None
    from moekit.interop.hf_config import config_from_hf

    _check_hf_options(raw)
    return config_from_hf(raw, where=f"{folder / CONFIG}"), raw


@dataclass
class Checkpoint:
    """A checkpoint folder checked on its headers: what to build and where each tensor comes from."""

    path: Path  # what the caller named (a folder or a run directory)
    folder: Path  # the folder holding the weights
    config: ModelConfig
    raw: dict[str, Any] | None  # a Hugging Face folder's config.json
    headers: dict[str, tuple[Path, Tensor]]  # checkpoint tensor name -> (file, meta tensor)
    sources: dict[str, Source]  # moekit state-dict key -> where it comes from

    @property
    def dtype(self) -> torch.dtype:
        """The checkpoint's dtype: that of its embedding."""
        embed = self.sources["embed.weight"]
        assert isinstance(embed, Piece)
        return self.headers[embed.name][1].dtype


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint folder's config and tensor headers and check them (names, shapes, config
    options) without reading any data. Raises a ``MoekitError`` naming the field or tensor."""
    run = resolve_run_folder(path)
    folder = Path(path) if run is None else run.checkpoint
    cfg, raw = load_config(folder)
    headers = read_headers(folder)
    meta = {name: t for name, (_, t) in headers.items()}
    if raw is not None:
        ignore = _hf_ignored(raw, cfg.n_layers)
        sources = hf_sources(meta, cfg, raw["model_type"], ignore, what=f"checkpoint {folder}")
    else:
        sources = _moekit_sources(meta, cfg, what=f"moekit checkpoint {folder}")
    return Checkpoint(Path(path), folder, cfg, raw, headers, sources)


def from_pretrained(
    path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype | str | None = None
) -> MoETransformer:
    """Load a Hugging Face or moekit checkpoint folder as a ``MoETransformer`` (in eval mode).

    Hugging Face model types: mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v3 (hub per-expert
    or transformers-5 fused expert tensors). ``dtype`` None keeps the checkpoint's dtype (that of
    its embedding); buffers (the router's selection bias) stay fp32 as in transformers.
    ``device="meta"`` reads headers only. ``model.tokenizer`` is the folder's tokenizer or None.
    ``path`` may be a moekit training run directory: its newest checkpoint is loaded.
    Raises ``CheckpointError`` / ``UnsupportedError`` / ``ConfigError`` (all ``MoekitError``).
    ``moekit.parallel.load_sharded`` loads one process's shard of the experts instead.
    """
    target = _resolve_dtype(dtype)
    ckpt = open_checkpoint(path)  # everything checked on the headers before any data is read
    meta = torch.device(device).type == "meta"
    tensors = {n: t for n, (_, t) in ckpt.headers.items()} if meta else read_tensors(ckpt.folder)
    sd = {
        name: torch.stack([resolve(tensors, p) for p in src]) if isinstance(src, list) else resolve(tensors, src)
        for name, src in ckpt.sources.items()
    }
    model = _assemble(ckpt.config, sd, target or ckpt.dtype)
    if not meta:
        model.to(device)
    return finish_loading(model, ckpt)


def finish_loading(model: MoETransformer, ckpt: Checkpoint) -> MoETransformer:
    """Eval mode, the folder's tokenizer and generation defaults."""
    model.eval()
    model.tokenizer = load_tokenizer(ckpt.path)
    model.generation_config = GenerationConfig.from_folder(ckpt.folder)
    return model


def _moekit_tensors(model: MoETransformer) -> dict[str, Tensor]:
    sd = model.state_dict()
    if model.config.tie_embeddings:
        sd.pop("lm_head.weight", None)
    return sd


def _moekit_sources(tensors: dict[str, Tensor], cfg: ModelConfig, what: str) -> dict[str, Source]:
    with torch.device("meta"):
        expected = _moekit_tensors(MoETransformer(cfg))
    check_tensors(tensors, expected, what)
    sources: dict[str, Source] = {name: Piece(name) for name in tensors}
    if cfg.tie_embeddings:
        sources["lm_head.weight"] = Piece("embed.weight")
    return sources


def _assemble(
    cfg: ModelConfig, sd: dict[str, Tensor], dtype: torch.dtype, model: MoETransformer | None = None
) -> MoETransformer:
    """Build ``cfg`` on the meta device and adopt the checked tensors (no init, no copy on CPU).

    ``model``: a meta model already built (and sharded by ``moekit.parallel``) to adopt them."""
    if model is None:
        with torch.device("meta"):
            model = MoETransformer(cfg)
    buffers = {name for name, _ in model.named_buffers()}
    cast = {k: t.to(torch.float32 if k in buffers else dtype) if t.is_floating_point() else t for k, t in sd.items()}
    model.load_state_dict(cast, strict=True, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    if not sd["embed.weight"].is_meta:
        left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
        if left:  # a tensor no checkpoint provides (a non-persistent buffer): a moekit bug
            raise CheckpointError(f"internal error: {left[:3]} were not loaded")
    return model


# Writing ----------------------------------------------------------------------------------------


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", size.upper().replace("IB", "iB"))
    if m is None:
        raise ConfigError(f"max_shard_size must be bytes or like '5GB' / '500MiB', got {size!r}")
    unit = m.group(2) or "B"
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
    scale.update({"KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40})
    return int(float(m.group(1)) * scale[unit])


def _write_tensors(folder: Path, tensors: dict[str, Tensor], max_shard_size: int) -> None:
    """One ``model.safetensors``, or shards + index when larger than ``max_shard_size`` bytes."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    # NOTE: clone per shard: split experts are views of one stacked tensor, and safetensors
    # refuses tensors sharing storage. Peak extra memory is one shard.
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file({k: tensors[k].detach().cpu().clone() for k in shards[0]}, folder / WEIGHTS, metadata=meta)
        return
    weight_map = {}
    for i, names in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: tensors[k].detach().cpu().clone() for k in names}, folder / file, metadata=meta)
        weight_map.update(dict.fromkeys(names, file))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")


@contextmanager
def _atomic_folder(dst: Path) -> Iterator[Path]:
    """``atomic_folder``, but an existing ``dst`` is replaced only if it is empty or a checkpoint."""
    if dst.exists() and not (dst.is_dir() and (not any(dst.iterdir()) or (dst / CONFIG).is_file())):
        raise CheckpointError(f"{dst} exists and is not a checkpoint folder; refusing to replace it")
    with atomic_folder(dst) as tmp:
        yield tmp


def save_pretrained(
    model: MoETransformer,
    path: str | Path,
    format: Literal["hf", "moekit"] = "hf",
    *,
    model_type: str | None = None,
    max_shard_size: int | str = "5GB",
    copy_files: Iterable[str | Path] = (),
) -> Path:
    """Write ``model`` as a checkpoint folder, atomically (a temp folder renamed into place).

    ``format="hf"``: Hugging Face layout loadable by ``transformers.AutoModelForCausalLM``;
    ``model_type`` None infers it from the config (``hf_export.infer_model_type``).
    ``format="moekit"``: ``ModelConfig`` JSON and moekit tensor names. ``model.tokenizer`` (if
    set) is written as ``tokenizer.json``; ``copy_files`` are copied in as they are.
    """
    from moekit.interop.hf_export import infer_model_type, to_hf_config

    cfg = model.config
    if any(t.is_meta for t in model.state_dict().values()):
        raise CheckpointError("cannot save a model on the meta device (it holds no weights)")
    if format == "hf":
        model_type = model_type or infer_model_type(cfg)
        config = to_hf_config(cfg, model_type)
        config["dtype"] = str(model.embed.weight.dtype).removeprefix("torch.")
        tensors = to_hf_state_dict(model.state_dict(), cfg, model_type, complete=True)
    elif format == "moekit":
        config = cfg.to_dict()
        tensors = _moekit_tensors(model)
    else:
        raise ConfigError(f"format must be 'hf' or 'moekit', got {format!r}")
    limit = _parse_size(max_shard_size)
    dst = Path(path)
    with _atomic_folder(dst) as tmp:
        (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        _write_tensors(tmp, tensors, limit)
        for f in map(Path, copy_files):
            shutil.copy2(f, tmp / f.name)
        tokenizer = getattr(model, "tokenizer", None)
        if tokenizer is not None and not (tmp / TOKENIZER).exists():
            tokenizer.save(str(tmp / TOKENIZER))
    return dst


def convert(
    src: str | Path,
    dst: str | Path,
    format: Literal["hf", "moekit"] = "hf",
    *,
    model_type: str | None = None,
    dtype: torch.dtype | str | None = None,
    max_shard_size: int | str = "5GB",
) -> Path:
    """Load ``src`` (either kind) and write it to ``dst`` as ``format``, carrying the tokenizer
    and generation files (``SIDE_FILES``) across unchanged."""
    model = from_pretrained(src, dtype=dtype)
    side = [Path(src) / name for name in SIDE_FILES if (Path(src) / name).is_file()]
    return save_pretrained(model, dst, format, model_type=model_type, max_shard_size=max_shard_size, copy_files=side)


__all__ = [
    "SIDE_FILES",
    "Checkpoint",
    "convert",
    "finish_loading",
    "from_pretrained",
    "load_config",
    "load_tokenizer",
    "open_checkpoint",
    "read_headers",
    "read_tensors",
    "save_pretrained",
    "weight_files",
]
