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
    if dynamic_threshold is not None:
        th = threshold_scales_ref(x0, dynamic_threshold, sample_max_value).to(dt)
        th = th.reshape((-1,) + (1,) * (nd - 1))
        x0 = torch.maximum(torch.minimum(x0, th), -th) / th
    elif clip_sample is not None:
        x0 = x0.clamp(-clip_sample, clip_sample)
    prev = ps(c_sample) * x + ps(c_x0) * x0
    if c_eps is not None:
        prev = prev + ps(c_eps) * ((x - a * x0) / s)
    if prev_x0 is not None and c_prev_x0 is not None:
        prev = prev + ps(c_prev_x0) * prev_x0.to(dt)
    if noise is not None and c_noise is not None:
        prev = prev + ps(c_noise) * noise.to(dt)
    return prev.to(sample.dtype), x0.to(sample.dtype)
