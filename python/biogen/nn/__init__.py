"""Layers built on biogen.ops: attention blocks, embeddings, UNet blocks."""

from .unet import (
    CrossAttention,
    Downsample,
    GroupNormAct,
    ResBlock,
    SelfAttention,
    TimestepEmbedding,
    UNet,
    UNetConfig,
    Upsample,
    timestep_embedding,
)

__all__ = [
    "CrossAttention",
    "Downsample",
    "GroupNormAct",
    "ResBlock",
    "SelfAttention",
    "TimestepEmbedding",
    "UNet",
    "UNetConfig",
    "Upsample",
    "timestep_embedding",
]
