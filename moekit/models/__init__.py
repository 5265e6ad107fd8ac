"""Models built from moekit.layers."""

from moekit.models.transformer import Block, ModelOutput, MoETransformer

__all__ = ["Block", "ModelOutput", "MoETransformer"]
