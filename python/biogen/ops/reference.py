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


# ----------------------------------------------------------------------------- Performer (SPEC 1.2)

# performer-pytorch's causal_linear_attention_noncuda adds this to every prefix sum of phi(k) in the
# denominator; the causal kernels keep it so they compute the same function.
PERFORMER_CAUSAL_EPS = 1e-6


def performer_eps(kernel: str, eps: Optional[float]) -> float:
    """performer-pytorch's defaults: 1e-4 in softmax_kernel, 1e-3 in generalized_kernel."""
    if eps is not None:
        return float(eps)
    return 1e-4 if kernel == "softmax" else 1e-3


def performer_features_ref(x, projection, valid, kernel, eps, stabiliser=None):
    """phi(x) of FAVOR+ (materialised): x (batch, heads, length, head_dim) already in the compute dtype,
    valid (batch, 1, length, 1) bool. Returns (phi, stabiliser): for queries (``stabiliser=None`` and
    is_query) the per-row max; pass ``stabiliser="keys"`` for the key max over valid rows and
    features (per batch and head). Stabilisers are detached; rows not valid are zero."""
    D = x.shape[-1]
    m = projection.shape[0]
    s = D ** -0.25
    dd = torch.matmul(x * s, projection.to(x.dtype).t())
    if kernel == "relu":
        phi = torch.relu(dd) + eps
        stab = torch.zeros(dd.shape[:2], dtype=dd.dtype, device=dd.device)
    else:
        diag = (x * x).sum(-1, keepdim=True) * (s * s / 2)
        if stabiliser == "keys":
            c = dd.masked_fill(~valid, float("-inf")).amax(dim=(-1, -2), keepdim=True).detach()
            c = torch.where(torch.isfinite(c), c, 0)  # a head with no valid key
            stab = c[..., 0, 0]
        else:
            c = dd.amax(dim=-1, keepdim=True).detach()
            stab = c[..., 0]
        phi = (m ** -0.5) * (torch.exp(dd - diag - c) + eps)
    return torch.where(valid, phi, 0), stab


def performer_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    projection: torch.Tensor,
    key_padding_mask: Optional[torch.Tensor] = None,
    causal: bool = False,
    kernel: str = "softmax",
    eps: Optional[float] = None,
    *,
    upcast: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FAVOR+ linear attention straight from the definition, materialising phi(Q), phi(K).

    q, k, v: (batch, heads, length, head_dim); projection: (nb_features, head_dim).
    key_padding_mask: (batch, length) bool, True = padding. Returns ``(out, key_stabiliser)``: out
    (batch, heads, length, head_dim) in q's dtype (zero rows for padded queries); key_stabiliser
    (batch, heads) float32 (float64 for float64 inputs), 0 for the relu kernel.

    Non-causal: out_i = phi(q_i) (sum_j phi(k_j) v_j^T) / (phi(q_i) . sum_j phi(k_j)) over valid j.
    Causal: the sums run over valid j <= i and the denominator is phi(q_i) . (sum_j phi(k_j) + 1e-6),
    as in performer-pytorch's causal_linear_attention_noncuda (which materialises L x L here).
    ``upcast=False`` computes the features in the input dtype: the low-precision baseline of the 2x
    error rule.
    """
    B, H, L, D = q.shape
    eps = performer_eps(kernel, eps)
    dt = torch.promote_types(q.dtype, torch.float32) if upcast else q.dtype
    valid = torch.ones(B, L, dtype=torch.bool, device=q.device) if key_padding_mask is None else ~key_padding_mask
    vq = valid[:, None, :, None]
    qf, kf, vf = (torch.where(vq, t, 0).to(dt) for t in (q, k, v))
    w = projection.to(dt)
    phq, _ = performer_features_ref(qf, w, vq, kernel, eps)
    phk, ck = performer_features_ref(kf, w, vq, kernel, eps, stabiliser="keys")
    if not upcast:
        # Features are rounded to the input dtype (performer-pytorch's ``type_as(data)``), but the
        # sums run in float32: in fp16 products of two small features underflow to 0/0 = NaN.
        phq, phk, vf = (t.float() for t in (phq, phk, vf))
    if causal:
        p = torch.matmul(phq, phk.transpose(-1, -2))
        p = torch.tril(p)
        num = torch.matmul(p, vf)
        den = p.sum(-1, keepdim=True) + PERFORMER_CAUSAL_EPS * phq.sum(-1, keepdim=True)
    else:
        ctx = torch.matmul(phk.transpose(-1, -2), vf)
        num = torch.matmul(phq, ctx)
        den = torch.matmul(phq, phk.sum(-2)[..., None])
    den = torch.where(vq, den, 1)
    out = torch.where(vq, num / den, 0)
    return out.to(q.dtype), ck.to(_lse_dtype(q.dtype))


def performer_attention_bwd_ref(grad_out, q, k, v, projection, key_padding_mask=None, causal=False,
                                kernel="softmax", eps=None):
    """Gradients of :func:`performer_attention_ref` for q, k, v with the stabilisers constant.

    With num_i, den_i the numerator and denominator of out_i: dnum = dO / den,
    dden = -(dO . O) / den. Non-causal: dphi(q) = dnum C^T + dden z^T, dC = phi(q)^T dnum,
    dz = phi(q)^T dden, dphi(k) = V dC^T + dz, dV = phi(k) dC. Causal with M = tril(dnum V^T + dden):
    dphi(q) = M phi(k) + 1e-6 dden, dphi(k) = M^T phi(q), dV = tril(phi(q) phi(k)^T)^T dnum.
    Through the features: softmax dx = s G W - s^2 x sum_f G with G = dphi (phi - ratio eps);
    relu dx = s G W with G = dphi [x.W > 0]. Float32 (float64 for float64 inputs).
    """
    B, H, L, D = q.shape
    eps = performer_eps(kernel, eps)
    dt = torch.promote_types(q.dtype, torch.float32)
    valid = torch.ones(B, L, dtype=torch.bool, device=q.device) if key_padding_mask is None else ~key_padding_mask
    vq = valid[:, None, :, None]
    qf, kf, vf, gf = (torch.where(vq, t, 0).to(dt) for t in (q, k, v, grad_out))
    w = projection.to(dt)
    s = D ** -0.25
    ratio = projection.shape[0] ** -0.5 if kernel == "softmax" else 1.0
    phq, _ = performer_features_ref(qf, w, vq, kernel, eps)
    phk, _ = performer_features_ref(kf, w, vq, kernel, eps, stabiliser="keys")
    if causal:
        p = torch.tril(torch.matmul(phq, phk.transpose(-1, -2)))
        num = torch.matmul(p, vf)
        den = p.sum(-1, keepdim=True) + PERFORMER_CAUSAL_EPS * phq.sum(-1, keepdim=True)
    else:
        ctx = torch.matmul(phk.transpose(-1, -2), vf)
        z = phk.sum(-2)
        num = torch.matmul(phq, ctx)
        den = torch.matmul(phq, z[..., None])
    den = torch.where(vq, den, 1)
    out = num / den
    dnum = gf / den
    dden = -(gf * out).sum(-1, keepdim=True) / den
    if causal:
        mm = torch.tril(torch.matmul(dnum, vf.transpose(-1, -2)) + dden)
        dphq = torch.matmul(mm, phk) + PERFORMER_CAUSAL_EPS * dden
        dphk = torch.matmul(mm.transpose(-1, -2), phq)
        dv = torch.matmul(p.transpose(-1, -2), dnum)
    else:
        dphq = torch.matmul(dnum, ctx.transpose(-1, -2)) + dden * z[..., None, :]
        dc = torch.matmul(phq.transpose(-1, -2), dnum)
        dz = (dden * phq).sum(-2)
        dphk = torch.matmul(vf, dc.transpose(-1, -2)) + dz[..., None, :]
        dv = torch.matmul(phk, dc)

    def through_features(dphi, x, phi):
        if kernel == "softmax":
            g = dphi * (phi - ratio * eps)
            return s * torch.matmul(g, w) - (s * s) * x * g.sum(-1, keepdim=True)
        g = dphi * (torch.matmul(x * s, w.t()) > 0)
        return s * torch.matmul(g, w)

    dq = through_features(dphq, qf, phq)
    dk = through_features(dphk, kf, phk)
    return tuple(torch.where(vq, g_, 0).to(t.dtype) for g_, t in zip((dq, dk, dv), (q, k, v)))
