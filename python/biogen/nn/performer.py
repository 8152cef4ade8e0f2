"""Performer self-attention layer (scBERT): projections and heads around the FAVOR+ kernel.

The kernel (:func:`biogen.ops.performer_attention`) takes the random feature matrix as an input;
redrawing it during training is this layer's job, as in performer-pytorch's ``ProjectionUpdater``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from einops import rearrange
from torch import nn

from ..ops import gaussian_orthogonal_random_matrix, performer_attention


class PerformerAttention(nn.Module):
    """Multi-head FAVOR+ self-attention.

    Parameters
    ----------
    dim : model width.
    heads, dim_head : attention heads and their width (scBERT: 10 x 64 on dim 200).
    nb_features : random features m; default int(dim_head * ln(dim_head)) (64 -> 266).
    causal : prefix attention.
    kernel : 'softmax' (FAVOR+) or 'relu' (generalized attention).
    redraw_interval : draw a new projection every this many forward calls in training mode
        (performer-pytorch's default 1000); None never redraws. Eval mode never redraws.
    ortho_scaling : 0 (gaussian row norms) or 1 (rows of norm sqrt(dim_head)).
    qkv_bias : bias in the q, k, v projections.
    backend : kernel backend for :func:`biogen.ops.performer_attention` (None: auto).
    """

    def __init__(
        self,
        dim: int,
        *,
        heads: int = 8,
        dim_head: int = 64,
        nb_features: Optional[int] = None,
        causal: bool = False,
        kernel: str = "softmax",
        redraw_interval: Optional[int] = 1000,
        ortho_scaling: int = 0,
        qkv_bias: bool = False,
        backend: Optional[str] = None,
    ) -> None:
        super().__init__()
        if dim < 1 or heads < 1 or dim_head < 1:
            raise ValueError(f"dim, heads and dim_head must be positive, got {dim}, {heads}, {dim_head}")
        if redraw_interval is not None and redraw_interval < 1:
            raise ValueError(f"redraw_interval must be >= 1 or None, got {redraw_interval}")
        if kernel not in ("softmax", "relu"):
            raise ValueError(f"kernel must be 'softmax' or 'relu', got {kernel!r}")
        self.heads, self.dim_head = heads, dim_head
        self.nb_features = nb_features or int(dim_head * math.log(dim_head))
        self.causal, self.kernel, self.backend = causal, kernel, backend
        self.redraw_interval, self.ortho_scaling = redraw_interval, ortho_scaling
        inner = heads * dim_head
        self.to_q = nn.Linear(dim, inner, bias=qkv_bias)
        self.to_k = nn.Linear(dim, inner, bias=qkv_bias)
        self.to_v = nn.Linear(dim, inner, bias=qkv_bias)
        self.to_out = nn.Linear(inner, dim)
        self.register_buffer("projection", self._draw())
        self.register_buffer("calls_since_redraw", torch.zeros((), dtype=torch.long))

    def _draw(self, device=None) -> torch.Tensor:
        return gaussian_orthogonal_random_matrix(self.nb_features, self.dim_head, scaling=self.ortho_scaling,
                                                 device=device)

    @torch.no_grad()
    def redraw_projection(self) -> None:
        """Replace the random features now (in place, so the buffer keeps its identity)."""
        self.projection.copy_(self._draw(self.projection.device))
        self.calls_since_redraw.zero_()

    def forward(self, x: torch.Tensor, key_padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: (batch, length, dim); key_padding_mask: (batch, length) bool, True = padding.
        Returns (batch, length, dim); padded positions hold the output bias only."""
        if self.training and self.redraw_interval is not None:
            if int(self.calls_since_redraw) >= self.redraw_interval:
                self.redraw_projection()
            self.calls_since_redraw += 1
        q, k, v = (rearrange(f(x), "b n (h d) -> b h n d", h=self.heads) for f in (self.to_q, self.to_k, self.to_v))
        out = performer_attention(q, k, v, self.projection, key_padding_mask=key_padding_mask,
                                  causal=self.causal, kernel=self.kernel, backend=self.backend)
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))
