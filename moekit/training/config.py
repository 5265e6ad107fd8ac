"""Training configuration: ``TrainConfig`` and ``RunConfig`` (the model and training configs of one run).

A run directory's ``config.json`` is ``RunConfig.to_dict()``: ``{"model": {...}, "train": {...}}``.
``--set`` keys starting with ``train.`` address ``TrainConfig``; every other key addresses the
model config exactly as ``moekit.config.set_by_path`` does (``moe.top_k=4``).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from moekit.config import (
    ConfigError,
    ModelConfig,
    check_choice,
    check_finite,
    check_positive,
    dataclass_from_dict,
    set_by_path,
)
from moekit.presets import get_preset


@dataclass
class TrainConfig:
    """How a model is trained: optimiser, schedule, batches, data and logging.

    Defaults follow the DeepSeekMoE recipe (Dai et al. 2024, §4.1.2) scaled down to CPU-sized runs:
    AdamW with betas (0.9, 0.95) and weight decay 0.1, linear warm-up, then the learning rate
    multiplied by 0.316 at 80% and again at 90% of the steps, gradient clipping at 1.0.
    """

    steps: int = 1000  # total optimiser steps; --resume continues up to this many
    batch_size: int = 8  # sequences per step
    seq_len: int = 256  # tokens per sequence
    lr: float = 1e-3  # peak learning rate
    schedule: Literal["step", "cosine"] = "step"  # "step": DeepSeekMoE's x0.316 at 80% and 90%
    # Linear warm-up; capped at 10% of ``steps`` so that short runs still spend most steps at peak.
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # cosine: the final learning rate as a fraction of the peak
    weight_decay: float = 0.1  # on matrices only (embeddings, projections, experts), never norms/biases
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    seed: int = 0  # model initialisation, data order and any router noise
    # Data ---------------------------------------------------------------------------------------
    data: str | None = None  # a text file or folder; None: this Python's standard library sources
    tokenizer: Literal["bpe", "byte"] = "bpe"  # "byte": 256 ids, no training (sets vocab_size = 256)
    val_fraction: float = 0.05  # share of files (or, for one file, of text) held out for validation
    # Logging and checkpoints --------------------------------------------------------------------
    log_every: int = 10  # steps between metrics.jsonl records
    eval_every: int = 100  # steps between validation losses (also logged)
    eval_batches: int = 8  # validation batches per evaluation (fixed windows, same every time)
    ckpt_every: int = 200  # steps between checkpoints (one is always written at the end)
    keep_checkpoints: int = 2  # older checkpoints are deleted

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        check_finite(self, "train")
        for name in (
            "steps",
            "batch_size",
            "seq_len",
            "lr",
            "log_every",
            "eval_every",
            "eval_batches",
            "ckpt_every",
            "keep_checkpoints",
        ):
            check_positive(f"train.{name}", getattr(self, name))
        if self.seq_len < 2:
            raise ConfigError(f"train.seq_len must be >= 2 (one input and one target), got {self.seq_len}")
        for name in ("warmup_steps", "weight_decay", "grad_clip", "min_lr_ratio"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be in [0, 1), got {getattr(self, name)}")
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"train.val_fraction must be in (0, 1), got {self.val_fraction}")
        check_choice("train.schedule", self.schedule, ("step", "cosine"))
        check_choice("train.tokenizer", self.tokenizer, ("bpe", "byte"))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        return dataclass_from_dict(cls, data, "train")


@dataclass
class RunConfig:
    """Everything that defines a training run; ``config.json`` of a run directory."""

    model: ModelConfig
    train: TrainConfig

    def __post_init__(self) -> None:
        if self.train.tokenizer == "byte" and self.model.vocab_size != 256:
            # The byte tokenizer has exactly 256 ids; a larger embedding would only hold unused rows.
            self.model = self.model.replace(vocab_size=256)
        if self.train.seq_len > self.model.max_seq_len:
            raise ConfigError(
                f"train.seq_len ({self.train.seq_len}) is longer than the model's context max_seq_len "
                f"({self.model.max_seq_len}); lower train.seq_len or raise max_seq_len"
            )

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model.to_dict(), "train": self.train.to_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        unknown = sorted(set(data) - {"model", "train"})
        if unknown or "model" not in data:
            raise ConfigError("a run config must be an object with keys 'model' and optionally 'train'")
        return cls(ModelConfig.from_dict(data["model"]), TrainConfig.from_dict(data.get("train") or {}))

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_json(cls, path: str | Path) -> RunConfig:
        """A run config, or a bare model config (then with default training settings)."""
        data = _read_json_object(Path(path))
        if "model" in data:
            return cls.from_dict(data)
        return cls(ModelConfig.from_dict(data), TrainConfig())

    def with_overrides(self, assignments: dict[str, Any]) -> RunConfig:
        """A validated copy with dotted keys set: ``train.lr`` -> TrainConfig, anything else -> model."""
        model_set = {k.removeprefix("model."): v for k, v in assignments.items() if not k.startswith("train.")}
        train = self.train.to_dict()
        for key, value in assignments.items():
            if not key.startswith("train."):
                continue
            name = key.removeprefix("train.")
            if name not in train:
                raise ConfigError(f"unknown config key {key!r}; known train keys: {', '.join(sorted(train))}")
            train[name] = value
        model = set_by_path(self.model, model_set) if model_set else self.model
        return RunConfig(model, TrainConfig.from_dict(train))


def make_run_config(
    preset: str | None = None,
    config: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    data: str | Path | None = None,
) -> RunConfig:
    """The run config the ``train`` command describes: a preset and/or a JSON file, then overrides.

    ``config`` is a run config (``{"model": ..., "train": ...}``, e.g. another run's
    ``config.json``), a bare model config, or, together with ``preset``, ``{"train": {...}}``.
    ``data`` is stored as an absolute path so that the run can be resumed from anywhere.
    """
    if preset is None and config is None:
        raise ConfigError("give --preset NAME or --config FILE to say which model to train")
    if config is None:
        run = RunConfig(get_preset(preset), TrainConfig())
    elif preset is None:
        run = RunConfig.from_json(config)
    else:
        data_ = _read_json_object(Path(config))
        if set(data_) != {"train"}:
            raise ConfigError(f'with --preset, --config {config} may only hold {{"train": {{...}}}}')
        run = RunConfig(get_preset(preset), TrainConfig.from_dict(data_["train"]))
    assignments = dict(overrides or {})
    if data is not None:
        assignments["train.data"] = str(Path(data).expanduser().resolve())
    return run.with_overrides(assignments) if assignments else run


def _read_json_object(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path} is not valid JSON: {e}") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a JSON object")
    return data


def parse_assignments(items: list[str]) -> dict[str, Any]:
    """``["moe.top_k=4", "train.lr=3e-4", "moe.router=hash"]`` -> values parsed as JSON, else kept as text."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        try:
            out[key.strip()] = json.loads(text)
        except json.JSONDecodeError:
            out[key.strip()] = text
    return out


__all__ = ["RunConfig", "TrainConfig", "make_run_config", "parse_assignments"]
