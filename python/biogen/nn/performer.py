"""Performer self-attention layer (scBERT): projections and heads around the FAVOR+ kernel.

The kernel (:func:`biogen.ops.performer_attention`) takes the random feature matrix as an input;
redrawing it during training is this layer's job, as in performer-pytorch's ``ProjectionUpdater``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
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
        # One (b, n, 3, h, d) projection; q, k, v are strided views of it (the kernels take any
        # strides but the last): x is read (and, under autocast, cast) once, and the backward
        # gathers dq, dk, dv with one copy into the layout the weight-gradient matmul needs.
        w = torch.cat([self.to_q.weight, self.to_k.weight, self.to_v.weight])
        b = (None if self.to_q.bias is None else torch.cat([self.to_q.bias, self.to_k.bias, self.to_v.bias]))
        qkv = F.linear(x, w, b).unflatten(-1, (3, self.heads, self.dim_head))
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
        out = performer_attention(q, k, v, self.projection, key_padding_mask=key_padding_mask,
                                  causal=self.causal, kernel=self.kernel, backend=self.backend)
        return merge_heads_linear(out, self.to_out.weight, self.to_out.bias)


def _compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype ``F.linear(x, weight)`` would compute in: the autocast dtype for float32 weights
    under autocast on x's device, else the weight's dtype."""
    dev = x.device.type
    if weight.dtype == torch.float32 and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return weight.dtype


class _MergeHeadsLinear(torch.autograd.Function):
    """y = rearrange(o, "b h n d -> b n (h d)") @ W^T + bias, keeping ``o`` in its head-major layout.

    The merged (b, n, h*d) copy is needed by the forward matmul only; the backward is computed per
    head from ``o`` itself. ``o`` is the attention output, which the attention kernel saves for its
    own backward anyway, so no (b, n, h*d) activation is stored twice, and the gradient is written
    straight into the head-major layout the kernel's backward reads (no transpose copy).
    """

    @staticmethod
    def forward(ctx, o, weight, bias, dtype):
        with torch.autocast(o.device.type, enabled=False):
            o_c, w = o.to(dtype), weight.to(dtype)
            y = F.linear(o_c.transpose(1, 2).flatten(2), w, None if bias is None else bias.to(dtype))
        ctx.save_for_backward(o_c, w)
        ctx.has_bias, ctx.o_dtype, ctx.w_dtype = bias is not None, o.dtype, weight.dtype
        return y

    @staticmethod
    def backward(ctx, g):
        o, w = ctx.saved_tensors
        B, H, L, D = o.shape
        g = g.to(w.dtype)
        w_heads = w.unflatten(1, (H, D))  # (dim, H, D)
        do = dw = db = None
        if ctx.needs_input_grad[0]:
            do = torch.empty((B, H, L, D), dtype=w.dtype, device=o.device)
            for bi in range(B):
                for h in range(H):
                    torch.mm(g[bi], w_heads[:, h], out=do[bi, h])
            do = do.to(ctx.o_dtype)
        if ctx.needs_input_grad[1]:
            dw = torch.empty((w.shape[0], H, D), dtype=torch.float32 if w.dtype != torch.float64 else w.dtype,
                             device=o.device)
            for h in range(H):
                acc = sum(g[bi].t() @ o[bi, h] for bi in range(B))
                dw[:, h] = acc
            dw = dw.flatten(1).to(ctx.w_dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = g.sum((0, 1), dtype=torch.float32 if g.dtype != torch.float64 else g.dtype).to(ctx.w_dtype)
        return do, dw, db, None


def merge_heads_linear(o: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """Output projection of multi-head attention from the head-major layout.

    o: (batch, heads, length, head_dim); weight: (dim, heads * head_dim); bias: (dim,) or None.
    Returns (batch, length, dim) = ``F.linear(rearrange(o, "b h n d -> b n (h d)"), weight, bias)``,
    in the autocast dtype under autocast (as ``F.linear``).
    """
    return _MergeHeadsLinear.apply(o, weight, bias, _compute_dtype(o, weight))
