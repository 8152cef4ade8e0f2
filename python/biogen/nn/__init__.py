"""Layers built on :mod:`biogen.ops`."""

from .performer import PerformerAttention
from .transformer import MaskedSelfAttention, TransformerEncoder, TransformerEncoderLayer

__all__ = ["MaskedSelfAttention", "PerformerAttention", "TransformerEncoder", "TransformerEncoderLayer"]
