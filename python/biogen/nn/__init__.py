"""Layers built on biogen.ops: attention blocks, embeddings, UNet blocks."""

from .unet import (
    CrossAttention,
    Downsample,
    GroupNormAct,
    ResBlock,
    SelfAttention,
    TimestepEmbedding,
    UNet,
    UNET_PRESETS,
    UNetConfig,
    Upsample,
    timestep_embedding,
    unet_preset,
)

__all__ = [
    "CrossAttention",
    "Downsample",
    "GroupNormAct",
    "ResBlock",
    "SelfAttention",
    "TimestepEmbedding",
    "UNet",
    "UNET_PRESETS",
    "UNetConfig",
    "Upsample",
    "timestep_embedding",
    "unet_preset",
]
