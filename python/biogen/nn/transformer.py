"""Transformer encoder layers whose self-attention is :func:`biogen.ops.masked_gene_attention`.

Parameter names follow ``torch.nn.TransformerEncoderLayer`` (``linear1``, ``linear2``, ``norm1``,
``norm2``) and flash-attn's ``FlashMHA`` (``self_attn.Wqkv``, ``self_attn.out_proj``), so scGPT
checkpoints map onto these modules name for name (see :mod:`biogen.models.scgpt`).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from biogen.ops import masked_gene_attention


class MaskedSelfAttention(nn.Module):
    """Multi-head self-attention with padding and scGPT's known/unknown mask.

    One fused ``Wqkv`` projection whose output is viewed, without a copy, as q, k, v of shape
    (batch, heads, length, head_dim); the row layout of ``Wqkv.weight`` is (q | k | v) x heads x
    head_dim, the same as ``nn.MultiheadAttention.in_proj_weight`` and flash-attn's ``Wqkv``.

    Attention probabilities are not dropped out (the fused kernel never forms them); dropout is
    applied to the residual branches of :class:`TransformerEncoderLayer` instead.
    """

    def __init__(self, d_model: int, nhead: int, bias: bool = True):
        super().__init__()
        if d_model % nhead != 0:
            raise ValueError(f"d_model ({d_model}) must be divisible by nhead ({nhead})")
        self.d_model, self.nhead, self.head_dim = d_model, nhead, d_model // nhead
        self.Wqkv = nn.Linear(d_model, 3 * d_model, bias=bias)
        self.out_proj = nn.Linear(d_model, d_model, bias=bias)

    def forward(
        self,
        x: torch.Tensor,
        key_padding_mask: Optional[torch.Tensor] = None,
        known: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """x: (batch, length, d_model); key_padding_mask, known: (batch, length) bool.

        Returns (batch, length, d_model).
        """
        B, L, _ = x.shape
        qkv = self.Wqkv(x).view(B, L, 3, self.nhead, self.head_dim).permute(2, 0, 3, 1, 4)
        o = masked_gene_attention(qkv[0], qkv[1], qkv[2], key_padding_mask=key_padding_mask, known=known)
        return self.out_proj(o.transpose(1, 2).reshape(B, L, self.d_model))


class TransformerEncoderLayer(nn.Module):
    """Self-attention + ReLU feed-forward, post-norm by default like ``nn.TransformerEncoderLayer``.

    ``pre_norm=True`` is the standard pre-norm block ``x + f(norm(x))``. (scGPT's own "pre" scheme
    drops the un-normalised residual; checkpoints trained with it are not reproduced exactly.)
    """

    def __init__(self, d_model: int, nhead: int, d_hid: int, dropout: float = 0.1, pre_norm: bool = False,
                 layer_norm_eps: float = 1e-5):
        super().__init__()
        self.self_attn = MaskedSelfAttention(d_model, nhead)
        self.linear1 = nn.Linear(d_model, d_hid)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_hid, d_model)
        self.norm1 = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.norm2 = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.pre_norm = pre_norm

    def _ff(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout2(self.linear2(self.dropout(F.relu(self.linear1(x)))))

    def forward(self, x, key_padding_mask=None, known=None):
        """x: (batch, length, d_model) -> (batch, length, d_model)."""
        if self.pre_norm:
            x = x + self.dropout1(self.self_attn(self.norm1(x), key_padding_mask, known))
            return x + self._ff(self.norm2(x))
        x = self.norm1(x + self.dropout1(self.self_attn(x, key_padding_mask, known)))
        return self.norm2(x + self._ff(x))


class TransformerEncoder(nn.Module):
    """A stack of :class:`TransformerEncoderLayer` (``layers.N.*`` like ``nn.TransformerEncoder``)."""

    def __init__(self, nlayers: int, d_model: int, nhead: int, d_hid: int, dropout: float = 0.1,
                 pre_norm: bool = False):
        super().__init__()
        self.layers = nn.ModuleList(
            TransformerEncoderLayer(d_model, nhead, d_hid, dropout, pre_norm) for _ in range(nlayers)
        )
        # Pre-norm stacks end un-normalised otherwise; post-norm already ends with a LayerNorm.
        self.norm = nn.LayerNorm(d_model) if pre_norm else None

    def forward(self, x, key_padding_mask=None, known=None):
        """x: (batch, length, d_model); masks (batch, length) bool. Padded rows come out as-is."""
        for layer in self.layers:
            x = layer(x, key_padding_mask, known)
        return x if self.norm is None else self.norm(x)
