"""Layers built on biogen.ops: transformer and attention blocks, UNet blocks."""

from .performer import PerformerAttention
from .transformer import MaskedSelfAttention, TransformerEncoder, TransformerEncoderLayer
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
    "MaskedSelfAttention",
    "PerformerAttention",
    "ResBlock",
    "SelfAttention",
    "TimestepEmbedding",
    "TransformerEncoder",
    "TransformerEncoderLayer",
    "UNet",
    "UNET_PRESETS",
    "UNetConfig",
    "Upsample",
    "timestep_embedding",
    "unet_preset",
]
