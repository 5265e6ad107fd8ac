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
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes
from torch import Tensor

from moekit.atomic import atomic_folder
from moekit.config import ConfigError, ModelConfig
from moekit.files import record_owned, write_bytes, write_errors, write_json
from moekit.interop.hf_weights import (
    CheckpointError,
    Piece,
    Source,
    UnsupportedError,
    check_tensors,
    hf_sources,
    layout,
    prepare_hf_tensors,
    resolve,
    to_hf_state_dict,
)
from moekit.interop.run_folder import resolve_run_folder
from moekit.interop.safety import PRETRAINED_KIND, check_tied_head, member, plan_write
from moekit.interop.types import get_type
from moekit.interop.types._base import refused
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
        files = [member(folder, name, str(folder / INDEX)) for name in sorted(set(weight_map.values()), key=str)]
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"shard {f.name} listed in {INDEX} is missing from {folder}")
        return files
    if (folder / WEIGHTS).is_file():
        return [member(folder, WEIGHTS, str(folder))]
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
# The checks every type shares are here; each type's own are its record's ``refuse``.
def _check_hf_options(d: dict[str, Any]) -> None:
    where = f"config.json (model_type {d.get('model_type')})"
    if d.get("quantization_config") is not None:
        raise refused(d, "quantization_config", "quantized checkpoints must be dequantized first")
    if d.get("hidden_act", "silu") != "silu":
        raise refused(d, "hidden_act", "moekit's FFNs are SwiGLU (silu)")
    t = get_type(d.get("model_type", ""))
    for key in ("rope_scaling", "rope_parameters"):
        rope = d.get(key)
        partial = t is not None and t.partial_rotary
        if isinstance(rope, dict) and rope.get("partial_rotary_factor", 1.0) != 1.0 and not partial:
            raise UnsupportedError(
                f"{where}: '{key}.partial_rotary_factor' is not supported: rotary covers whole heads"
            )
    if t is not None:
        t.refuse(d)


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
    sources: dict[str, Source]  # moekit state-dict key -> where it comes from (a piece of ``named``)
    # The type's rewrite of the file tensors into the names the pieces use (``prepare_hf_tensors``:
    # HFLayout.from_file); None: the pieces name file tensors.
    rewrite: Callable[[dict[str, Tensor]], dict[str, Tensor]] | None = None

    @property
    def named(self) -> dict[str, Tensor]:
        """The meta tensors the sources' pieces name (the headers', rewritten if the type does)."""
        meta = {name: t for name, (_, t) in self.headers.items()}
        return self.rewrite(meta) if self.rewrite is not None else meta

    @property
    def dtype(self) -> torch.dtype:
        """The checkpoint's dtype: that of its embedding."""
        embed = self.sources["embed.weight"]
        assert isinstance(embed, Piece)
        return self.named[embed.name].dtype


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint folder's config and tensor headers and check them (names, shapes, config
    options) without reading any data. Raises a ``MoekitError`` naming the field or tensor."""
    run = resolve_run_folder(path)
    folder = Path(path) if run is None else run.checkpoint
    cfg, raw = load_config(folder)
    headers = read_headers(folder)
    meta = {name: t for name, (_, t) in headers.items()}
    check_tied_head(meta, cfg.tie_embeddings, str(folder))  # shapes here; loaders check the values they read
    if raw is not None:
        t = get_type(raw["model_type"])
        ignore = t.ignore(raw, cfg.n_layers) if t is not None else None
        sources = hf_sources(meta, cfg, raw["model_type"], ignore, what=f"checkpoint {folder}")
        if layout(raw["model_type"]).from_file is not None:
            rewrite = partial(prepare_hf_tensors, cfg=cfg, model_type=raw["model_type"], ignore=ignore)
            return Checkpoint(Path(path), folder, cfg, raw, headers, sources, rewrite)
    else:
        sources = _moekit_sources(meta, cfg, what=f"moekit checkpoint {folder}")
    return Checkpoint(Path(path), folder, cfg, raw, headers, sources)


def from_pretrained(
    path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype | str | None = None
) -> MoETransformer:
    """Load a Hugging Face or moekit checkpoint folder as a ``MoETransformer`` (in eval mode).

    Hugging Face model types: those whose record is ``loadable`` (``moekit.interop.types``: mixtral,
    qwen2_moe, qwen3_moe, olmoe, deepseek_v2, deepseek_v3, kimi_k2, glm4_moe, dots1, gpt_oss, llama4_text,
    phimoe, granitemoe(shared), dbrx, ernie4_5_moe, minimax_m2, hunyuan_v1_moe; hub per-expert or
    transformers-5 fused expert tensors). ``dtype`` None keeps the checkpoint's dtype (that of
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
    check_tied_head(tensors, ckpt.config.tie_embeddings, str(ckpt.folder))  # now on the values
    if ckpt.rewrite is not None:
        tensors = ckpt.rewrite(tensors)  # views of the file tensors, under the names the pieces use
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
    if isinstance(size, int) and size > 0:
        return size
    m = (
        None
        if isinstance(size, int)
        else re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", size.upper().replace("IB", "iB"))
    )
    if m is None:
        raise ConfigError(f"max_shard_size must be bytes or like '5GB' / '500MiB', got {size!r}")
    unit = m.group(2) or "B"
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
    scale.update({"KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40})
    n = int(float(m.group(1)) * scale[unit])
    if n <= 0:
        raise ConfigError(f"max_shard_size must be positive, got {size!r}")
    return n


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
    # NOTE: serialised in memory, then written by ``write_bytes`` (see ``moekit.files``: a full
    # disk must fail loudly); peak extra memory is two shards.
    meta = {"format": "pt"}

    def write(names: list[str], file: str) -> None:
        data = safetensors_bytes({k: tensors[k].detach().cpu().clone() for k in names}, metadata=meta)
        write_bytes(folder / file, data, "weights")

    if len(shards) == 1:
        write(shards[0], WEIGHTS)
        return
    weight_map = {}
    for i, names in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write(names, file)
        weight_map.update(dict.fromkeys(names, file))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    write_json(folder / INDEX, index, "index")


def save_pretrained(
    model: MoETransformer,
    path: str | Path,
    format: Literal["hf", "moekit"] = "hf",
    *,
    model_type: str | None = None,
    max_shard_size: int | str = "5GB",
    copy_files: Iterable[str | Path] = (),
    overwrite: bool = False,
) -> Path:
    """Write ``model`` as a checkpoint folder, atomically (a temp folder renamed into place).

    ``format="hf"``: Hugging Face layout loadable by ``transformers.AutoModelForCausalLM``;
    ``model_type`` None infers it from the config (``hf_export.infer_model_type``).
    ``format="moekit"``: ``ModelConfig`` JSON and moekit tensor names. ``model.tokenizer`` (if
    set) is written as ``tokenizer.json``; ``copy_files`` are copied in as they are.

    An existing ``path`` is replaced only where moekit wrote it (``moekit.interop.safety.plan_write``):
    a folder holding files moekit did not write is refused unless ``overwrite``, and even then only
    its weights and config are replaced; its other files stay (and win over ``copy_files``).
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
    keep = plan_write(dst, overwrite)
    with write_errors(dst, "checkpoint folder"), atomic_folder(dst, carry=keep) as tmp:
        write_json(tmp / CONFIG, config, "config")
        _write_tensors(tmp, tensors, limit)
        for f in map(Path, copy_files):
            if f.name not in keep:
                write_bytes(tmp / f.name, f.read_bytes(), "file")
        tokenizer = getattr(model, "tokenizer", None)
        if tokenizer is not None and TOKENIZER not in keep and not (tmp / TOKENIZER).exists():
            tokenizer.save(tmp / TOKENIZER)  # a byte-level tokenizer writes nothing
        record_owned(tmp, PRETRAINED_KIND, [p.name for p in tmp.iterdir()])
    return dst


def convert(
    src: str | Path,
    dst: str | Path,
    format: Literal["hf", "moekit"] = "hf",
    *,
    model_type: str | None = None,
    dtype: torch.dtype | str | None = None,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
) -> Path:
    """Load ``src`` (either kind) and write it to ``dst`` as ``format``, carrying the tokenizer
    and generation files (``SIDE_FILES``) across unchanged. ``dst`` may be ``src`` (with
    ``overwrite``): its weights and config are rewritten, its other files kept."""
    plan_write(Path(dst), overwrite)  # refuse before the (possibly long) load
    model = from_pretrained(src, dtype=dtype)
    side = [Path(src) / name for name in SIDE_FILES if (Path(src) / name).is_file()]
    return save_pretrained(
        model, dst, format, model_type=model_type, max_shard_size=max_shard_size, copy_files=side, overwrite=overwrite
    )


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
