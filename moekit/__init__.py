"""moekit: Mixture-of-Experts transformer language models in PyTorch."""

from moekit.config import AttentionConfig, ConfigError, ModelConfig, MoEConfig, fine_grained
from moekit.errors import MoekitError

__version__ = "0.1.0"

__all__ = ["AttentionConfig", "ConfigError", "MoEConfig", "ModelConfig", "MoekitError", "fine_grained"]
