"""Triton sampler_step: one elementwise kernel over (sample, block) with per-sample coefficients.

Dynamic thresholding runs in two launches around a per-sample quantile: the first writes the
unclipped x0 in float32, ``torch.quantile`` takes the per-sample threshold, the second finishes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..sampler import PREDICTION_TYPES

BLOCK = 1024


@triton.jit
def _kernel(x_ptr, m_ptr, mu_ptr, px0_ptr, nz_ptr, prev_ptr, x0_ptr, x0f_ptr, th_ptr,
            a_ptr, s_ptr, cs_ptr, cx0_ptr, ceps_ptr, cn_ptr, cpx_ptr,
            N, w, clip,
            PRED: tl.constexpr, HAS_UNCOND: tl.constexpr, CLIP: tl.constexpr, HAS_EPS: tl.constexpr,
            HAS_PX0: tl.constexpr, HAS_NOISE: tl.constexpr, MODE: tl.constexpr, CLIPPED_EPS: tl.constexpr,
            BLOCK: tl.constexpr):
    # MODE 0: whole step; 1: write the unclipped x0 (float32) only; 2: finish from it with th[b]
    b = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    msk = offs < N
    idx = b.to(tl.int64) * N + offs
    a = tl.load(a_ptr + b)
    s = tl.load(s_ptr + b)
    x = tl.load(x_ptr + idx, mask=msk, other=0.0).to(tl.float32)
    # the guided output: for x0 (MODE 0, 1) and for the network's eps (diffusers' DDIM default)
    NET_EPS: tl.constexpr = HAS_EPS and not CLIPPED_EPS
    if MODE != 2 or NET_EPS:
        m = tl.load(m_ptr + idx, mask=msk, other=0.0).to(tl.float32)
        if HAS_UNCOND:
            u = tl.load(mu_ptr + idx, mask=msk, other=0.0).to(tl.float32)
            m = u + w * (m - u)
    if MODE == 2:
        th = tl.load(th_ptr + b)
        x0 = tl.load(x0f_ptr + idx, mask=msk, other=0.0)
        x0 = tl.minimum(tl.maximum(x0, -th), th) / th
    else:
        if PRED == 0:
            x0 = (x - s * m) / a
        elif PRED == 1:
            x0 = m
        else:
            x0 = a * x - s * m
        if CLIP:
            x0 = tl.minimum(tl.maximum(x0, -clip), clip)
    if MODE == 1:
        tl.store(x0f_ptr + idx, x0, mask=msk)
    else:
        out = tl.load(cs_ptr + b) * x + tl.load(cx0_ptr + b) * x0
        if HAS_EPS:
            if CLIPPED_EPS:
                eps = (x - a * x0) / s
            elif PRED == 0:
                eps = m
            elif PRED == 1:
                eps = (x - a * m) / s
            else:
                eps = a * m + s * x
            out += tl.load(ceps_ptr + b) * eps
        if HAS_PX0:
            out += tl.load(cpx_ptr + b) * tl.load(px0_ptr + idx, mask=msk, other=0.0).to(tl.float32)
        if HAS_NOISE:
            out += tl.load(cn_ptr + b) * tl.load(nz_ptr + idx, mask=msk, other=0.0).to(tl.float32)
        tl.store(prev_ptr + idx, out.to(prev_ptr.dtype.element_ty), mask=msk)
        tl.store(x0_ptr + idx, x0.to(x0_ptr.dtype.element_ty), mask=msk)


def sampler_step(sample, model_output, alpha_t, sigma_t, c_sample, c_x0, c_eps, c_noise, prediction_type,
                 model_output_uncond, guidance_scale, prev_x0, c_prev_x0, noise, clip_sample, dynamic_threshold,
                 sample_max_value, use_clipped_model_output=False):
    c = lambda t: None if t is None else t.contiguous()  # noqa: E731
    x, m, mu, px0, nz = (c(t) for t in (sample, model_output, model_output_uncond, prev_x0, noise))
    coefs = [None if t is None else t.to(torch.float32).contiguous()
             for t in (alpha_t, sigma_t, c_sample, c_x0, c_eps, c_noise, c_prev_x0)]
    if px0 is None or coefs[6] is None:
        px0, coefs[6] = None, None
    if nz is None or coefs[5] is None:
        nz, coefs[5] = None, None
    B = x.shape[0]
    N = x.numel() // B
    prev, x0 = torch.empty_like(x), torch.empty_like(x)
    dummy = coefs[0]
    p = lambda t: dummy if t is None else t  # noqa: E731
    block = max(16, min(BLOCK, triton.next_power_of_2(N)))
    grid = (B, triton.cdiv(N, block))
    flags = dict(PRED=PREDICTION_TYPES[prediction_type], HAS_UNCOND=mu is not None,
                 CLIP=clip_sample is not None and dynamic_threshold is None, HAS_EPS=coefs[4] is not None,
                 HAS_PX0=px0 is not None, HAS_NOISE=nz is not None, CLIPPED_EPS=bool(use_clipped_model_output),
                 BLOCK=block)
    args = [x, m, p(mu), p(px0), p(nz), prev, x0]
    tail = [*(p(t) for t in coefs), N, float(guidance_scale), 0.0 if clip_sample is None else float(clip_sample)]
    if dynamic_threshold is None:
        _kernel[grid](*args, dummy, dummy, *tail, MODE=0, **flags)
        return prev, x0
    x0f = torch.empty((B, N), dtype=torch.float32, device=x.device)
    _kernel[grid](*args, x0f, dummy, *tail, MODE=1, **flags)
    th = torch.quantile(x0f.abs(), float(dynamic_threshold), dim=1).clamp(min=1.0, max=float(sample_max_value))
    _kernel[grid](*args, x0f, th.contiguous(), *tail, MODE=2, **flags)
    return prev, x0
