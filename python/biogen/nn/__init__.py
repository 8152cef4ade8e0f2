"""Layers built on :mod:`biogen.ops`."""

from .performer import PerformerAttention

__all__ = ["PerformerAttention"]
