"""Kimi-K2 (``kimi_k2``, Moonshot AI): DeepSeek-V3's architecture and checkpoint layout under its own
model_type (384 experts, 64 heads, one dense layer); the config's ``architectures`` is
``DeepseekV3ForCausalLM``. Loadable like deepseek_v3."""

from __future__ import annotations

from moekit.interop.types._base import ModelType
from moekit.interop.types.deepseek import mtp_extras
from moekit.interop.types.deepseek_v3 import DEEPSEEK_V3

KIMI_K2 = ModelType(
    "kimi_k2",
    read=DEEPSEEK_V3.read,
    layout=DEEPSEEK_V3.layout,
    refuse=DEEPSEEK_V3.refuse,
    extras=mtp_extras,
)
