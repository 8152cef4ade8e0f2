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


# ----------------------------------------------------------------------------- diffusion (SPEC 1.3)


def _spatial_flat(t: torch.Tensor) -> torch.Tensor:
    """(B, C, *spatial) -> (B, C, S)."""
    return t.reshape(t.shape[0], t.shape[1], -1)


def group_norm_silu_ref(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor,
    bias: torch.Tensor,
    scale: Optional[torch.Tensor] = None,
    shift: Optional[torch.Tensor] = None,
    eps: float = 1e-5,
    act: str = "silu",
    *,
    upcast: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GroupNorm -> affine -> optional FiLM ``y * (1 + scale) + shift`` -> SiLU / identity.

    x: (B, C, *spatial); weight, bias: (C,); scale, shift: (B, C). Statistics are the biased
    variance over each (batch, group) block of C/G channels x spatial, as ``F.group_norm``.
    Returns ``(y, mean, rstd)``: y in x's dtype and memory format, mean and rstd (B, G) float32
    (float64 for float64 inputs). ``upcast=False`` computes in x's dtype (the 2x rule baseline).
    """
    B, C = x.shape[:2]
    G = num_groups
    dt = torch.promote_types(x.dtype, torch.float32) if upcast else x.dtype
    xf = _spatial_flat(x).to(dt).reshape(B, G, -1)
    var, mean = torch.var_mean(xf, dim=-1, unbiased=False)
    rstd = torch.rsqrt(var + eps)
    xhat = ((xf - mean[..., None]) * rstd[..., None]).reshape(B, C, -1)
    z = xhat * weight.to(dt)[None, :, None] + bias.to(dt)[None, :, None]
    if scale is not None:
        z = z * (1 + scale.to(dt)[..., None])
    if shift is not None:
        z = z + shift.to(dt)[..., None]
    y = torch.nn.functional.silu(z) if act == "silu" else z
    y = y.reshape(x.shape).to(x.dtype)
    out = torch.empty_like(x)  # same memory format as x
    out.copy_(y)
    sdt = _lse_dtype(x.dtype)
    return out, mean.to(sdt), rstd.to(sdt)


def group_norm_silu_bwd_ref(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor,
    bias: torch.Tensor,
    scale: Optional[torch.Tensor],
    shift: Optional[torch.Tensor],
    mean: torch.Tensor,
    rstd: torch.Tensor,
    act: str = "silu",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`group_norm_silu_ref` from the saved statistics.

    With xhat the normalised input, a = w xhat + b, f = 1 + scale, z = f a + shift, dz = dy act'(z):
    dshift = sum_s dz, dscale = sum_s dz a, dbias = sum_{b,s} f dz, dweight = sum_{b,s} f dz xhat,
    dx = rstd (f w dz - mean_g(f w dz) - xhat mean_g(f w dz xhat)). Returns (dx, dweight, dbias,
    dscale, dshift); dscale / dshift are (B, C) even when scale / shift are None. float32 maths
    (float64 for float64 inputs); dx in x's dtype and memory format, the rest float32 / float64.
    """
    B, C = x.shape[:2]
    G = num_groups
    dt = torch.promote_types(x.dtype, torch.float32)
    xf = _spatial_flat(x).to(dt).reshape(B, G, -1)
    xhat = ((xf - mean.to(dt)[..., None]) * rstd.to(dt)[..., None]).reshape(B, C, -1)
    w = weight.to(dt)[None, :, None]
    a = xhat * w + bias.to(dt)[None, :, None]
    f = torch.ones(B, C, 1, dtype=dt, device=x.device) if scale is None else 1 + scale.to(dt)[..., None]
    z = a * f
    if shift is not None:
        z = z + shift.to(dt)[..., None]
    dy = _spatial_flat(grad_y).to(dt)
    if act == "silu":
        sig = torch.sigmoid(z)
        dz = dy * sig * (1 + z * (1 - sig))
    else:
        dz = dy
    dshift = dz.sum(-1)
    dscale = (dz * a).sum(-1)
    s_dz_xhat = (dz * xhat).sum(-1)
    dbias = (f[..., 0] * dshift).sum(0)
    dweight = (f[..., 0] * s_dz_xhat).sum(0)
    g = (f * w * dz).reshape(B, G, -1)
    gx = (g * xhat.reshape(B, G, -1))
    dx = rstd.to(dt)[..., None] * (g - g.mean(-1, keepdim=True) - xhat.reshape(B, G, -1) * gx.mean(-1, keepdim=True))
    dx_out = torch.empty_like(x)
    dx_out.copy_(dx.reshape(x.shape))
    return dx_out, dweight, dbias, dscale, dshift


def _per_sample(c: torch.Tensor, ndim: int, dt: torch.dtype) -> torch.Tensor:
    return c.to(dt).reshape((-1,) + (1,) * (ndim - 1))


def threshold_scales_ref(x0: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
    """Imagen dynamic thresholding scale per sample: quantile(|x0|, ratio) clamped to [1, max_value]."""
    s = torch.quantile(x0.reshape(x0.shape[0], -1).abs().float(), ratio, dim=1)
    return s.clamp(min=1.0, max=max_value)


def sampler_step_ref(
    sample: torch.Tensor,
    model_output: torch.Tensor,
    alpha_t: torch.Tensor,
    sigma_t: torch.Tensor,
    c_sample: torch.Tensor,
    c_x0: torch.Tensor,
    c_eps: Optional[torch.Tensor] = None,
    c_noise: Optional[torch.Tensor] = None,
    prediction_type: str = "epsilon",
    model_output_uncond: Optional[torch.Tensor] = None,
    guidance_scale: float = 1.0,
    prev_x0: Optional[torch.Tensor] = None,
    c_prev_x0: Optional[torch.Tensor] = None,
    noise: Optional[torch.Tensor] = None,
    clip_sample: Optional[float] = None,
    dynamic_threshold: Optional[float] = None,
    sample_max_value: float = 1.0,
    use_clipped_model_output: bool = False,
    *,
    upcast: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The general linear VP sampler update (see :func:`biogen.ops.sampler_step`).

    Returns ``(prev_sample, pred_x0)`` in sample's dtype; maths in float32 (float64 for float64).
    """
    dt = torch.promote_types(sample.dtype, torch.float32) if upcast else sample.dtype
    nd = sample.dim()
    ps = lambda c: _per_sample(c, nd, dt)  # noqa: E731
    x = sample.to(dt)
    m = model_output.to(dt)
    if model_output_uncond is not None:
        mu = model_output_uncond.to(dt)
        m = mu + guidance_scale * (m - mu)
    a, s = ps(alpha_t), ps(sigma_t)
    if prediction_type == "epsilon":
        x0 = (x - s * m) / a
    elif prediction_type == "sample":
        x0 = m.clone()  # never return (an alias of) an input
    elif prediction_type == "v_prediction":
        x0 = a * x - s * m
    else:
        raise ValueError(f"unknown prediction_type {prediction_type!r}")
    if c_eps is not None and not use_clipped_model_output:
        # the network's eps, as diffusers' DDIM (the eps implied by the x0 before clipping)
        if prediction_type == "epsilon":
            eps = m
        elif prediction_type == "sample":
            eps = (x - a * m) / s
        else:
            eps = a * m + s * x
    if dynamic_threshold is not None:
        th = threshold_scales_ref(x0, dynamic_threshold, sample_max_value).to(dt)
        th = th.reshape((-1,) + (1,) * (nd - 1))
        x0 = torch.maximum(torch.minimum(x0, th), -th) / th
    elif clip_sample is not None:
        x0 = x0.clamp(-clip_sample, clip_sample)
    prev = ps(c_sample) * x + ps(c_x0) * x0
    if c_eps is not None:
        if use_clipped_model_output:
            eps = (x - a * x0) / s
        prev = prev + ps(c_eps) * eps
    if prev_x0 is not None and c_prev_x0 is not None:
        prev = prev + ps(c_prev_x0) * prev_x0.to(dt)
    if noise is not None and c_noise is not None:
        prev = prev + ps(c_noise) * noise.to(dt)
    return prev.to(sample.dtype), x0.to(sample.dtype)
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
