"""GLM-4.7-Flash (``glm4_moe_lite``, Z.ai): DeepSeek-V3's architecture (MLA, sigmoid-routed experts
with a shared expert, dense layers by ``mlp_layer_types``) under GLM's name; its MTP layers
(``num_nextn_predict_layers``) are counted apart. Source: transformers' ``modeling_glm4_moe_lite.py``."""

from __future__ import annotations

from moekit.interop.types._base import ModelType
from moekit.interop.types.deepseek import mtp_extras
from moekit.interop.types.deepseek_v2 import read_mla_v3

GLM4_MOE_LITE = ModelType("glm4_moe_lite", read=read_mla_v3, extras=mtp_extras)
