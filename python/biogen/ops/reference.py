"""Pure-PyTorch references: the oracle every kernel is tested against and the ``torch`` backend.

They are written for clarity, straight from the definitions in SPEC section 1; they may materialise
what the kernels avoid (an L x L score matrix here).
"""

from __future__ import annotations

import math
from typing import Optional

import torch


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """Softmax statistics are float32, float64 for float64 inputs (so gradcheck sees exact maths)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def masked_gene_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: Optional[torch.Tensor] = None,
    known: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    *,
    upcast: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T * scale + A) v with scGPT's padding and known/unknown mask.

    q, k, v: (batch, heads, length, head_dim). key_padding_mask: (batch, length) bool, True = pad.
    known: (batch, length) bool, True = known (None: all known). Query i attends key j iff j is not
    padding and (j is known or i == j). Returns ``(out, lse)``: out (batch, heads, length, head_dim)
    in q's dtype with zero rows for padded queries, lse (batch, heads, length) float32 (float64
    for float64 inputs) log-sum-exp of
    the scaled scores (-inf where a row attends nothing).

    ``upcast=False`` computes in the input dtype: the low-precision baseline of the 2x error rule.
    """
    B, H, L, D = q.shape
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    dt = torch.promote_types(q.dtype, torch.float32) if upcast else q.dtype
    valid = torch.ones(B, L, dtype=torch.bool, device=q.device)
    if key_padding_mask is not None:
        valid = ~key_padding_mask
    kn = torch.ones_like(valid) if known is None else known
    # Zero what padding holds so NaN written there cannot leak through 0 * NaN.
    vq = valid[:, None, :, None]
    qf = torch.where(vq, q, 0).to(dt)
    kf = torch.where(vq, k, 0).to(dt)
    vf = torch.where(vq, v, 0).to(dt)
    s = torch.matmul(qf, kf.transpose(-1, -2)) * scale
    eye = torch.eye(L, dtype=torch.bool, device=q.device)
    allowed = valid[:, None, None, :] & (kn[:, None, None, :] | eye) & valid[:, None, :, None]
    s = s.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(s.to(_lse_dtype(q.dtype)), dim=-1)
    finite = torch.isfinite(lse)
    p = torch.exp(s - torch.where(finite, lse, 0).to(dt)[..., None])
    p = torch.where(allowed, p, 0)
    out = torch.matmul(p, vf)
    out = torch.where(valid[:, None, :, None], out, 0)
    return out.to(q.dtype), lse


def masked_gene_attention_bwd_ref(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    key_padding_mask: Optional[torch.Tensor] = None,
    known: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`masked_gene_attention_ref` for q, k, v from the saved log-sum-exp.

    With P = exp(S - lse) on allowed pairs: dV = P^T dO, dS = P * (dO V^T - rowsum(dO * O)),
    dQ = scale dS K, dK = scale dS^T Q. Computed in float32 (float64 for float64 inputs).
    """
    B, H, L, D = q.shape
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    dt = torch.promote_types(q.dtype, torch.float32)
    valid = torch.ones(B, L, dtype=torch.bool, device=q.device) if key_padding_mask is None else ~key_padding_mask
    kn = torch.ones_like(valid) if known is None else known
    vq = valid[:, None, :, None]
    qf, kf, vf, of, gf = (torch.where(vq, t, 0).to(dt) for t in (q, k, v, out, grad_out))
    eye = torch.eye(L, dtype=torch.bool, device=q.device)
    allowed = valid[:, None, None, :] & (kn[:, None, None, :] | eye) & valid[:, None, :, None]
    s = torch.matmul(qf, kf.transpose(-1, -2)) * scale
    lse_f = torch.where(torch.isfinite(lse), lse, 0).to(dt)
    p = torch.where(allowed, torch.exp(s - lse_f[..., None]), 0)
    dv = torch.matmul(p.transpose(-1, -2), gf)
    dp = torch.matmul(gf, vf.transpose(-1, -2))
    delta = (gf * of).sum(-1, keepdim=True)
    ds = p * (dp - delta)
    dq = torch.matmul(ds, kf) * scale
    dk = torch.matmul(ds.transpose(-1, -2), qf) * scale
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
