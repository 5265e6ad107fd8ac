"""moekit: Mixture-of-Experts transformer language models in PyTorch."""

from typing import Any

from moekit.config import AttentionConfig, ConfigError, ModelConfig, MoEConfig, fine_grained
from moekit.errors import MoekitError

__version__ = "0.1.0"

# Checkpoint loading pulls in safetensors and the model code; import it on first use only.
_LAZY = {"from_pretrained": "moekit.interop.pretrained", "load_tokenizer": "moekit.interop.pretrained"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'moekit' has no attribute {name!r}")


__all__ = [
    "AttentionConfig",
    "ConfigError",
    "MoEConfig",
    "ModelConfig",
    "MoekitError",
    "fine_grained",
    "from_pretrained",
    "load_tokenizer",
]
