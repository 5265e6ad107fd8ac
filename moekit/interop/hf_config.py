"""Hugging Face ``config.json`` → ``ModelConfig``, and ``load_spec`` for everything a CLI accepts.

The rules of each ``model_type`` live in its record in ``moekit.interop.types``; this module
dispatches to them. A field that changes the parameter count and that ``ModelConfig`` cannot
express raises ``ConfigError`` naming it (never a silently wrong count).

Not represented, on purpose (they change behaviour, not parameters): OLMoE's ``clip_qkv`` (its
loader refuses it). (PhiMoE's sparsemixer router, DBRX's q/k/v clamp, Granite's multipliers,
sliding-window and chunked layers, gpt-oss's clamped SwiGLU, Llama 4's NoPE layers and
input-scaled routing are config settings, read by the types that load.) DeepSeek-V3's
multi-token-prediction module (``num_nextn_predict_layers``) is not part of the model, as in
transformers (the 671B total excludes it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from moekit.config import ConfigError, ModelConfig
from moekit.interop.types import TYPES, ModelType, type_of
from moekit.interop.types._reader import Reader
from moekit.presets import PRESETS, get_preset

SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(name for name, t in TYPES.items() if t.read or t.sub_config)


def resolve_type(d: Any, where: str = "Hugging Face config") -> tuple[ModelType, dict[str, Any]]:
    """The type record of a config dict and the dict its reader takes (a ``sub_config`` unpacked).

    Raises ``ConfigError`` for a non-object, a missing or unknown ``model_type``.
    """
    if not isinstance(d, dict):
        raise ConfigError(f"{where} must be a JSON object")
    t = type_of(d)
    known = ", ".join(TYPES)
    if t is None:
        if d.get("model_type") is None:
            raise ConfigError(f"{where} has no 'model_type' (nor a known 'architectures'); supported: {known}")
        raise ConfigError(f"{where}: unsupported model_type {d['model_type']!r}; supported: {known}")
    if t.sub_config is not None:
        inner = d.get(t.sub_config)
        if not isinstance(inner, dict):
            raise ConfigError(f"{where}: model_type {t.name!r} needs a {t.sub_config!r} object")
        inner = dict(inner)
        inner.setdefault("model_type", f"{t.name}_text")
        for key in ("tie_word_embeddings", "_name_or_path"):
            if key in d and key not in inner:
                inner[key] = d[key]
        return resolve_type(inner, where)
    d = dict(d, model_type=t.name) if d.get("model_type") is None else d
    return t, d


def config_from_hf(d: dict[str, Any], where: str = "Hugging Face config") -> ModelConfig:
    """A ``ModelConfig`` from a Hugging Face ``config.json`` dict (see ``SUPPORTED_MODEL_TYPES``).

    A multimodal ``llama4`` config is read from its ``text_config`` (the vision tower is not
    counted). Raises ``ConfigError`` for an unknown ``model_type``, a type moekit can count but
    not build, or any field that would change the parameter count and cannot be represented.
    """
    t, d = resolve_type(d, where)
    if t.read is None:
        raise ConfigError(f"{where}: model_type {t.name!r} can be counted (moekit params) but not built by moekit")
    return t.read(Reader(d, f"{where} (model_type {t.name})"))


# SPEC resolution ----------------------------------------------------------------------------


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"config file {path} is not valid JSON: {e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {path}: {e}") from None


def read_spec(spec: str) -> tuple[Path | None, dict[str, Any] | ModelConfig]:
    """Resolve a model SPEC to a ``ModelConfig`` (a preset, a moekit config JSON) or to the
    path and dict of a Hugging Face ``config.json`` (a file, or a folder holding one).

    A file is a Hugging Face config when it has ``model_type`` (or an ``architectures`` entry a
    type record knows: Grok-1 ports carry no model_type), a moekit config when it has
    ``d_model``. Every failure is a ``ConfigError`` naming the preset or file.
    """
    if spec in PRESETS:
        return None, get_preset(spec)
    path = Path(spec)
    if path.is_dir():
        path = path / "config.json"
        if not path.is_file():
            raise ConfigError(f"folder {spec} has no config.json")
    elif not path.exists():
        if path.suffix == ".json" or "/" in spec or "\\" in spec:
            raise ConfigError(f"config file {spec} does not exist")
        get_preset(spec)  # raises: unknown preset, listing the known names
    data = _read_json(path)
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a JSON object")
    if "model_type" in data or type_of(data) is not None:
        return path, data
    if "d_model" in data:
        try:
            cfg = ModelConfig.from_dict(data)
        except ConfigError as e:
            raise ConfigError(f"config file {path}: {e}") from None
        if not cfg.name:
            cfg.name = path.stem if path.name != "config.json" else path.parent.name
        return path, cfg
    raise ConfigError(
        f"config file {path} is neither a moekit config (no 'd_model') nor a Hugging Face config.json (no 'model_type')"
    )


def load_spec(spec: str) -> ModelConfig:
    """Resolve a model SPEC (see ``read_spec``) to a buildable ``ModelConfig``."""
    path, data = read_spec(spec)
    if isinstance(data, ModelConfig):
        return data
    assert path is not None
    cfg = config_from_hf(data, where=f"config file {path}")
    if not data.get("_name_or_path"):  # name it after its folder (or file), not its type
        cfg.name = path.parent.name if path.name == "config.json" else path.stem
    return cfg


__all__ = ["SUPPORTED_MODEL_TYPES", "config_from_hf", "load_spec", "read_spec", "resolve_type"]
