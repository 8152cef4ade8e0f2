"""Layers built on :mod:`biogen.ops`."""

from .transformer import MaskedSelfAttention, TransformerEncoder, TransformerEncoderLayer

__all__ = ["MaskedSelfAttention", "TransformerEncoder", "TransformerEncoderLayer"]
