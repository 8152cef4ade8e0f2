"""Performer FAVOR+ attention in Triton, non-causal and causal, forward and backward.

Features are computed one (rows x BLOCK_M features) tile at a time and never stored whole:

- key state: grid (batch*heads, feature blocks); each program streams every key once and keeps
  sum_j E_j v_j^T and sum_j E_j for its features with its own running max, rescaled by
  exp(c_old - c_new) when the max grows (E = exp part of phi). The eps part of phi needs only
  sum_j v_j and the count of valid keys. A few small torch ops merge the blocks onto the global
  key stabiliser: C = ratio (A + eps sum v), z = ratio (zE + eps n), per (batch, head) m x D.
- queries: grid (batch*heads, query tiles); the row max over all features first, then
  out = phi(q) C / (phi(q) . z) block by block.
- backward: a query kernel (dq, and the per-row denominator and stabiliser it saves), a
  (batch*heads, feature block) kernel for dC = phi(Q)^T dnum and dz (deterministic, no atomics),
  and a key kernel (dk, dv).
- causal: one program per (batch, head), a chunked prefix-sum sweep (see the causal section).
Matrix products use ``input_precision="ieee"`` so float32 stays float32 (no TF32) on GPUs.
"""

from __future__ import annotations

import triton
import triton.language as tl

import torch


@triton.jit
def _proj(x, w_ptr, f0, m, D, s, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """(rows, BLOCK_M) block of s x.W_f for features f0 .. f0 + BLOCK_M, and the W block."""
    offs_f = f0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    w = tl.load(w_ptr + offs_f[:, None] * D + offs_d[None, :], mask=(offs_f[:, None] < m) & (offs_d[None, :] < D),
                other=0.0)
    return tl.dot(x, tl.trans(w), input_precision="ieee") * s, w, offs_f < m


@triton.jit
def _key_state_kernel(k_ptr, v_ptr, w_ptr, pad_ptr, a_ptr, ze_ptr, c_ptr, sv_ptr, n_ptr,
                      H, L, D, m, skb, skh, skl, svb, svh, svl, s, NBLK,
                      HAS_PAD: tl.constexpr, RELU: tl.constexpr,
                      BLOCK_L: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    bh = tl.program_id(0)
    blk = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_d = tl.arange(0, BLOCK_D)
    f0 = blk * BLOCK_M
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    ze = tl.zeros((BLOCK_M,), dtype=tl.float32)
    sv = tl.zeros((BLOCK_D,), dtype=tl.float32)
    cnt = tl.zeros((BLOCK_L,), dtype=tl.float32)
    # a float32 scalar tensor from the start, so the loop-carried type never changes
    if RELU:
        c = tl.max(tl.zeros((BLOCK_M,), dtype=tl.float32))
    else:
        c = tl.max(tl.full((BLOCK_M,), -float("inf"), dtype=tl.float32))
    for l0 in range(0, L, BLOCK_L):
        offs_l = l0 + tl.arange(0, BLOCK_L)
        valid = offs_l < L
        if HAS_PAD:
            valid = valid & (tl.load(pad_ptr + b * L + offs_l, mask=offs_l < L, other=1) == 0)
        mask = valid[:, None] & (offs_d[None, :] < D)
        kk = tl.load(k_ptr + b * skb + h * skh + offs_l[:, None] * skl + offs_d[None, :], mask=mask, other=0.0)
        vv = tl.load(v_ptr + b * svb + h * svh + offs_l[:, None] * svl + offs_d[None, :], mask=mask, other=0.0)
        kk = kk.to(tl.float32)
        vv = vv.to(tl.float32)
        dd, w, fmask = _proj(kk, w_ptr, f0, m, D, s, BLOCK_M, BLOCK_D)
        emask = valid[:, None] & fmask[None, :]
        if RELU:
            e = tl.where(emask, tl.maximum(dd, 0.0), 0.0)
        else:
            diag = tl.sum(kk * kk, axis=1) * (s * s * 0.5)
            cm = tl.maximum(c, tl.max(tl.where(emask, dd, -float("inf"))))
            empty = cm == -float("inf")  # no valid key yet: avoid -inf - -inf
            scale = tl.exp(tl.where(empty, 0.0, c) - tl.where(empty, 0.0, cm))
            acc = acc * scale
            ze = ze * scale
            c = cm
            e = tl.where(emask, tl.exp(dd - diag[:, None] - c), 0.0)
        acc += tl.dot(tl.trans(e), vv, input_precision="ieee")
        ze += tl.sum(e, axis=0)
        sv += tl.sum(vv, axis=0)
        cnt += valid.to(tl.float32)
    offs_f = tl.arange(0, BLOCK_M)
    base = bh * NBLK + blk
    tl.store(a_ptr + base * BLOCK_M * BLOCK_D + offs_f[:, None] * BLOCK_D + offs_d[None, :], acc)
    tl.store(ze_ptr + base * BLOCK_M + offs_f, ze)
    tl.store(c_ptr + base, c)
    if blk == 0:
        tl.store(sv_ptr + bh * BLOCK_D + offs_d, sv)
        tl.store(n_ptr + bh, tl.sum(cnt))


@triton.jit
def _row_max(x, w_ptr, m, D, s, BLOCK_L: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    cq = tl.full((BLOCK_L,), -float("inf"), dtype=tl.float32)
    for f0 in range(0, m, BLOCK_M):
        dd, w, fmask = _proj(x, w_ptr, f0, m, D, s, BLOCK_M, BLOCK_D)
        cq = tl.maximum(cq, tl.max(tl.where(fmask[None, :], dd, -float("inf")), axis=1))
    return cq


@triton.jit
def _phi(dd, diag, c, fmask, ratio, eps, RELU: tl.constexpr):
    """(phi, its exp/relu part) of one block; c per row (queries) or a scalar (keys)."""
    if RELU:
        e = tl.maximum(dd, 0.0)
    else:
        e = tl.exp(dd - diag[:, None] - c)
    e = tl.where(fmask[None, :], e, 0.0)
    return tl.where(fmask[None, :], ratio * (e + eps), 0.0), e


@triton.jit
def _fwd_query_kernel(q_ptr, w_ptr, pad_ptr, c_state_ptr, z_ptr, o_ptr,
                      H, L, D, m, sqb, sqh, sql, s, ratio, eps, MP,
                      HAS_PAD: tl.constexpr, RELU: tl.constexpr,
                      BLOCK_L: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    offs_l = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_d = tl.arange(0, BLOCK_D)
    valid = offs_l < L
    if HAS_PAD:
        valid = valid & (tl.load(pad_ptr + b * L + offs_l, mask=offs_l < L, other=1) == 0)
    mask = valid[:, None] & (offs_d[None, :] < D)
    x = tl.load(q_ptr + b * sqb + h * sqh + offs_l[:, None] * sql + offs_d[None, :], mask=mask, other=0.0)
    x = x.to(tl.float32)
    diag = tl.sum(x * x, axis=1) * (s * s * 0.5)
    if RELU:
        cq = tl.zeros((BLOCK_L,), dtype=tl.float32)
    else:
        cq = _row_max(x, w_ptr, m, D, s, BLOCK_L, BLOCK_M, BLOCK_D)
    num = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32)
    den = tl.zeros((BLOCK_L,), dtype=tl.float32)
    for f0 in range(0, m, BLOCK_M):
        dd, w, fmask = _proj(x, w_ptr, f0, m, D, s, BLOCK_M, BLOCK_D)
        phi, e = _phi(dd, diag, cq[:, None], fmask, ratio, eps, RELU)
        offs_f = f0 + tl.arange(0, BLOCK_M)
        cblk = tl.load(c_state_ptr + bh * MP * BLOCK_D + offs_f[:, None] * BLOCK_D + offs_d[None, :])
        zblk = tl.load(z_ptr + bh * MP + offs_f)
        num += tl.dot(phi, cblk, input_precision="ieee")
        den += tl.sum(phi * zblk[None, :], axis=1)
    den = tl.where(valid, den, 1.0)
    out = tl.where(valid[:, None], num / den[:, None], 0.0)
    omask = (offs_l[:, None] < L) & (offs_d[None, :] < D)
    tl.store(o_ptr + (bh * L + offs_l[:, None]) * D + offs_d[None, :], out.to(o_ptr.dtype.element_ty), mask=omask)


@triton.jit
def _bwd_query_kernel(q_ptr, w_ptr, pad_ptr, c_state_ptr, z_ptr, o_ptr, go_ptr, dq_ptr, den_ptr, cq_ptr,
                      H, L, D, m, sqb, sqh, sql, sob, soh, sol, sgb, sgh, sgl, s, ratio, eps, MP,
                      HAS_PAD: tl.constexpr, RELU: tl.constexpr,
                      BLOCK_L: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    offs_l = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_d = tl.arange(0, BLOCK_D)
    valid = offs_l < L
    if HAS_PAD:
        valid = valid & (tl.load(pad_ptr + b * L + offs_l, mask=offs_l < L, other=1) == 0)
    mask = valid[:, None] & (offs_d[None, :] < D)
    x = tl.load(q_ptr + b * sqb + h * sqh + offs_l[:, None] * sql + offs_d[None, :], mask=mask, other=0.0)
    x = x.to(tl.float32)
    go = tl.load(go_ptr + b * sgb + h * sgh + offs_l[:, None] * sgl + offs_d[None, :], mask=mask, other=0.0)
    go = go.to(tl.float32)
    o = tl.load(o_ptr + b * sob + h * soh + offs_l[:, None] * sol + offs_d[None, :], mask=mask, other=0.0)
    o = o.to(tl.float32)
    diag = tl.sum(x * x, axis=1) * (s * s * 0.5)
    if RELU:
        cq = tl.zeros((BLOCK_L,), dtype=tl.float32)
    else:
        cq = _row_max(x, w_ptr, m, D, s, BLOCK_L, BLOCK_M, BLOCK_D)
    den = tl.zeros((BLOCK_L,), dtype=tl.float32)
    for f0 in range(0, m, BLOCK_M):
        dd, w, fmask = _proj(x, w_ptr, f0, m, D, s, BLOCK_M, BLOCK_D)
        phi, e = _phi(dd, diag, cq[:, None], fmask, ratio, eps, RELU)
        zblk = tl.load(z_ptr + bh * MP + f0 + tl.arange(0, BLOCK_M))
        den += tl.sum(phi * zblk[None, :], axis=1)
    den = tl.where(valid, den, 1.0)
    dnum = go / den[:, None]
    dden = -tl.sum(go * o, axis=1) / den
    dx = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32)
    gsum = tl.zeros((BLOCK_L,), dtype=tl.float32)
    for f0 in range(0, m, BLOCK_M):
        dd, w, fmask = _proj(x, w_ptr, f0, m, D, s, BLOCK_M, BLOCK_D)
        phi, e = _phi(dd, diag, cq[:, None], fmask, ratio, eps, RELU)
        offs_f = f0 + tl.arange(0, BLOCK_M)
        cblk = tl.load(c_state_ptr + bh * MP * BLOCK_D + offs_f[:, None] * BLOCK_D + offs_d[None, :])
        zblk = tl.load(z_ptr + bh * MP + offs_f)
        dphi = tl.dot(dnum, tl.trans(cblk), input_precision="ieee") + dden[:, None] * zblk[None, :]
        if RELU:
            g = tl.where(e > 0, dphi, 0.0)
        else:
            g = dphi * ratio * e
        g = tl.where(fmask[None, :], g, 0.0)
        dx += tl.dot(g, w, input_precision="ieee")
        gsum += tl.sum(g, axis=1)
    if RELU:
        dx = s * dx
    else:
        dx = s * dx - (s * s) * gsum[:, None] * x
    dx = tl.where(valid[:, None], dx, 0.0)
    omask = (offs_l[:, None] < L) & (offs_d[None, :] < D)
    tl.store(dq_ptr + (bh * L + offs_l[:, None]) * D + offs_d[None, :], dx, mask=omask)
    tl.store(den_ptr + bh * L + offs_l, den, mask=offs_l < L)
    tl.store(cq_ptr + bh * L + offs_l, cq, mask=offs_l < L)


@triton.jit
def _bwd_dc_kernel(q_ptr, w_ptr, pad_ptr, o_ptr, go_ptr, den_ptr, cq_ptr, dc_ptr, dz_ptr,
                   H, L, D, m, sqb, sqh, sql, sob, soh, sol, sgb, sgh, sgl, s, ratio, eps, MP,
                   HAS_PAD: tl.constexpr, RELU: tl.constexpr,
                   BLOCK_L: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    bh = tl.program_id(0)
    f0 = tl.program_id(1) * BLOCK_M
    b = bh // H
    h = bh % H
    offs_d = tl.arange(0, BLOCK_D)
    dc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    dz = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for l0 in range(0, L, BLOCK_L):
        offs_l = l0 + tl.arange(0, BLOCK_L)
        valid = offs_l < L
        if HAS_PAD:
            valid = valid & (tl.load(pad_ptr + b * L + offs_l, mask=offs_l < L, other=1) == 0)
        mask = valid[:, None] & (offs_d[None, :] < D)
        x = tl.load(q_ptr + b * sqb + h * sqh + offs_l[:, None] * sql + offs_d[None, :], mask=mask, other=0.0)
        x = x.to(tl.float32)
        go = tl.load(go_ptr + b * sgb + h * sgh + offs_l[:, None] * sgl + offs_d[None, :], mask=mask, other=0.0)
        go = go.to(tl.float32)
        o = tl.load(o_ptr + b * sob + h * soh + offs_l[:, None] * sol + offs_d[None, :], mask=mask, other=0.0)
        o = o.to(tl.float32)
        den = tl.load(den_ptr + bh * L + offs_l, mask=offs_l < L, other=1.0)
        cq = tl.load(cq_ptr + bh * L + offs_l, mask=offs_l < L, other=0.0)
        diag = tl.sum(x * x, axis=1) * (s * s * 0.5)
        dd, w, fmask = _proj(x, w_ptr, f0, m, D, s, BLOCK_M, BLOCK_D)
        phi, e = _phi(dd, diag, cq[:, None], fmask, ratio, eps, RELU)
        phi = tl.where(valid[:, None], phi, 0.0)
        dnum = go / den[:, None]
        dden = tl.where(valid, -tl.sum(go * o, axis=1) / den, 0.0)
        dc += tl.dot(tl.trans(phi), dnum, input_precision="ieee")
        dz += tl.sum(phi * dden[:, None], axis=0)
    offs_f = f0 + tl.arange(0, BLOCK_M)
    tl.store(dc_ptr + bh * MP * BLOCK_D + offs_f[:, None] * BLOCK_D + offs_d[None, :], dc)
    tl.store(dz_ptr + bh * MP + offs_f, dz)


@triton.jit
def _bwd_key_kernel(k_ptr, v_ptr, w_ptr, pad_ptr, ck_ptr, dc_ptr, dz_ptr, dk_ptr, dv_ptr,
                    H, L, D, m, skb, skh, skl, svb, svh, svl, s, ratio, eps, MP,
                    HAS_PAD: tl.constexpr, RELU: tl.constexpr,
                    BLOCK_L: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    offs_l = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_d = tl.arange(0, BLOCK_D)
    valid = offs_l < L
    if HAS_PAD:
        valid = valid & (tl.load(pad_ptr + b * L + offs_l, mask=offs_l < L, other=1) == 0)
    mask = valid[:, None] & (offs_d[None, :] < D)
    x = tl.load(k_ptr + b * skb + h * skh + offs_l[:, None] * skl + offs_d[None, :], mask=mask, other=0.0)
    x = x.to(tl.float32)
    vv = tl.load(v_ptr + b * svb + h * svh + offs_l[:, None] * svl + offs_d[None, :], mask=mask, other=0.0)
    vv = vv.to(tl.float32)
    diag = tl.sum(x * x, axis=1) * (s * s * 0.5)
    ck = tl.load(ck_ptr + bh)
    dx = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32)
    gsum = tl.zeros((BLOCK_L,), dtype=tl.float32)
    for f0 in range(0, m, BLOCK_M):
        dd, w, fmask = _proj(x, w_ptr, f0, m, D, s, BLOCK_M, BLOCK_D)
        phi, e = _phi(dd, diag, ck, fmask, ratio, eps, RELU)
        offs_f = f0 + tl.arange(0, BLOCK_M)
        dcb = tl.load(dc_ptr + bh * MP * BLOCK_D + offs_f[:, None] * BLOCK_D + offs_d[None, :])
        dzb = tl.load(dz_ptr + bh * MP + offs_f)
        dv += tl.dot(phi, dcb, input_precision="ieee")
        dphi = tl.dot(vv, tl.trans(dcb), input_precision="ieee") + dzb[None, :]
        if RELU:
            g = tl.where(e > 0, dphi, 0.0)
        else:
            g = dphi * ratio * e
        g = tl.where(fmask[None, :], g, 0.0)
        dx += tl.dot(g, w, input_precision="ieee")
        gsum += tl.sum(g, axis=1)
    if RELU:
        dx = s * dx
    else:
        dx = s * dx - (s * s) * gsum[:, None] * x
    dx = tl.where(valid[:, None], dx, 0.0)
    dv = tl.where(valid[:, None], dv, 0.0)
    omask = (offs_l[:, None] < L) & (offs_d[None, :] < D)
    tl.store(dk_ptr + (bh * L + offs_l[:, None]) * D + offs_d[None, :], dx, mask=omask)
    tl.store(dv_ptr + (bh * L + offs_l[:, None]) * D + offs_d[None, :], dv, mask=omask)


# ----------------------------------------------------------------------------- causal
#
# One program per (batch, head) walks the sequence in chunks of BLOCK_C rows, carrying the prefix
# state in float32 registers: S = sum phi(k_j) v_j^T (BLOCK_F x BLOCK_D, every feature at once) and
# z = sum phi(k_j). Per chunk, with A = tril(phi(Q_c) phi(K_c)^T):
#   out_c = (phi(Q_c) S + A V_c) / (phi(Q_c) (z + 1e-6) + rowsum(A)),  then S += phi(K_c)^T V_c.
# The backward runs the same sweep for dq and a reverse sweep (state R = sum phi(q_i) dnum_i^T,
# r = sum dden_i phi(q_i) over later chunks) for dk and dv; see csrc/cpu/performer.cpp.


@triton.jit
def _round_to_store(x, dtype: tl.constexpr):
    """Round-to-nearest-even before a bfloat16 store: Triton's interpreter truncates float32 ->
    bfloat16 casts (one ulp of error at causal outputs of size ~1); exact on GPUs, which round."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _causal_chunk(q_ptr, k_ptr, v_ptr, w, pad_ptr, ck, b, h, c0, L, D, m,
                  sqb, sqh, sql, skb, skh, skl, svb, svh, svl, s, ratio, eps,
                  HAS_PAD: tl.constexpr, RELU: tl.constexpr,
                  BLOCK_C: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr):
    """Inputs and features of one chunk; padded rows are zero everywhere (phi too)."""
    offs_l = c0 + tl.arange(0, BLOCK_C)
    offs_d = tl.arange(0, BLOCK_D)
    offs_f = tl.arange(0, BLOCK_F)
    fmask = offs_f < m
    valid = offs_l < L
    if HAS_PAD:
        valid = valid & (tl.load(pad_ptr + b * L + offs_l, mask=offs_l < L, other=1) == 0)
    mask = valid[:, None] & (offs_d[None, :] < D)
    xq = tl.load(q_ptr + b * sqb + h * sqh + offs_l[:, None] * sql + offs_d[None, :], mask=mask, other=0.0)
    xk = tl.load(k_ptr + b * skb + h * skh + offs_l[:, None] * skl + offs_d[None, :], mask=mask, other=0.0)
    vv = tl.load(v_ptr + b * svb + h * svh + offs_l[:, None] * svl + offs_d[None, :], mask=mask, other=0.0)
    xq = xq.to(tl.float32)
    xk = xk.to(tl.float32)
    vv = vv.to(tl.float32)
    ddq = tl.dot(xq, tl.trans(w), input_precision="ieee") * s
    ddk = tl.dot(xk, tl.trans(w), input_precision="ieee") * s
    diag_q = tl.sum(xq * xq, axis=1) * (s * s * 0.5)
    diag_k = tl.sum(xk * xk, axis=1) * (s * s * 0.5)
    if RELU:
        cq = tl.zeros((BLOCK_C,), dtype=tl.float32)
    else:
        cq = tl.max(tl.where(fmask[None, :], ddq, -float("inf")), axis=1)
    phq, eq = _phi(ddq, diag_q, cq[:, None], fmask, ratio, eps, RELU)
    phk, ek = _phi(ddk, diag_k, ck, fmask, ratio, eps, RELU)
    phq = tl.where(valid[:, None], phq, 0.0)
    phk = tl.where(valid[:, None], phk, 0.0)
    return offs_l, valid, xq, xk, vv, phq, eq, phk, ek


@triton.jit
def _through_features(dphi, e, x, w, fmask, s, ratio, RELU: tl.constexpr):
    """dx = s G W - s^2 x sum_f G (softmax) or s G W (relu), G = dphi * dphi/d(s x.W)."""
    if RELU:
        g = tl.where(e > 0, dphi, 0.0)
    else:
        g = dphi * ratio * e
    g = tl.where(fmask[None, :], g, 0.0)
    dx = tl.dot(g, w, input_precision="ieee") * s
    if not RELU:
        dx = dx - (s * s) * tl.sum(g, axis=1)[:, None] * x
    return dx


@triton.jit
def _causal_program(w_ptr, ck_ptr, H, D, m, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr):
    """What every causal program starts from: its (batch, head), the offsets, the projection tile and
    the key stabiliser."""
    bh = tl.program_id(0)
    offs_d = tl.arange(0, BLOCK_D)
    offs_f = tl.arange(0, BLOCK_F)
    fmask = offs_f < m
    w = tl.load(w_ptr + offs_f[:, None] * D + offs_d[None, :], mask=fmask[:, None] & (offs_d[None, :] < D),
                other=0.0)
    return bh, bh // H, bh % H, offs_d, offs_f, fmask, w, tl.load(ck_ptr + bh)


@triton.jit
def _causal_fwd_kernel(q_ptr, k_ptr, v_ptr, w_ptr, pad_ptr, ck_ptr, o_ptr,
                       H, L, D, m, sqb, sqh, sql, skb, skh, skl, svb, svh, svl, s, ratio, eps, ceps,
                       HAS_PAD: tl.constexpr, RELU: tl.constexpr,
                       BLOCK_C: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr):
    bh, b, h, offs_d, offs_f, fmask, w, ck = _causal_program(w_ptr, ck_ptr, H, D, m, BLOCK_F, BLOCK_D)
    causal_mask = tl.arange(0, BLOCK_C)[:, None] >= tl.arange(0, BLOCK_C)[None, :]
    S = tl.zeros((BLOCK_F, BLOCK_D), dtype=tl.float32)
    z = tl.zeros((BLOCK_F,), dtype=tl.float32)
    for c0 in range(0, L, BLOCK_C):
        offs_l, valid, xq, xk, vv, phq, eq, phk, ek = _causal_chunk(
            q_ptr, k_ptr, v_ptr, w, pad_ptr, ck, b, h, c0, L, D, m, sqb, sqh, sql, skb, skh, skl, svb, svh, svl,
            s, ratio, eps, HAS_PAD, RELU, BLOCK_C, BLOCK_F, BLOCK_D)
        a = tl.where(causal_mask, tl.dot(phq, tl.trans(phk), input_precision="ieee"), 0.0)
        num = tl.dot(phq, S, input_precision="ieee") + tl.dot(a, vv, input_precision="ieee")
        zc = tl.where(fmask, z + ceps, 0.0)
        den = tl.sum(phq * zc[None, :], axis=1) + tl.sum(a, axis=1)
        den = tl.where(valid, den, 1.0)
        out = tl.where(valid[:, None], num / den[:, None], 0.0)
        omask = (offs_l[:, None] < L) & (offs_d[None, :] < D)
        tl.store(o_ptr + (bh * L + offs_l[:, None]) * D + offs_d[None, :], _round_to_store(out, o_ptr.dtype.element_ty),
                 mask=omask)
        S += tl.dot(tl.trans(phk), vv, input_precision="ieee")
        z += tl.sum(phk, axis=0)


@triton.jit
def _causal_bwd_q_kernel(q_ptr, k_ptr, v_ptr, w_ptr, pad_ptr, ck_ptr, o_ptr, go_ptr, dq_ptr, den_ptr,
                         H, L, D, m, sqb, sqh, sql, skb, skh, skl, svb, svh, svl, sob, soh, sol, sgb, sgh, sgl,
                         s, ratio, eps, ceps,
                         HAS_PAD: tl.constexpr, RELU: tl.constexpr,
                         BLOCK_C: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr):
    """dq (forward sweep): dphi(Q_c) = dnum S^T + dden (z + 1e-6) + tril(dnum V_c^T + dden) phi(K_c);
    saves every row's denominator for the reverse sweep."""
    bh, b, h, offs_d, offs_f, fmask, w, ck = _causal_program(w_ptr, ck_ptr, H, D, m, BLOCK_F, BLOCK_D)
    causal_mask = tl.arange(0, BLOCK_C)[:, None] >= tl.arange(0, BLOCK_C)[None, :]
    S = tl.zeros((BLOCK_F, BLOCK_D), dtype=tl.float32)
    z = tl.zeros((BLOCK_F,), dtype=tl.float32)
    for c0 in range(0, L, BLOCK_C):
        offs_l, valid, xq, xk, vv, phq, eq, phk, ek = _causal_chunk(
            q_ptr, k_ptr, v_ptr, w, pad_ptr, ck, b, h, c0, L, D, m, sqb, sqh, sql, skb, skh, skl, svb, svh, svl,
            s, ratio, eps, HAS_PAD, RELU, BLOCK_C, BLOCK_F, BLOCK_D)
        mask = valid[:, None] & (offs_d[None, :] < D)
        go = tl.load(go_ptr + b * sgb + h * sgh + offs_l[:, None] * sgl + offs_d[None, :], mask=mask, other=0.0)
        o = tl.load(o_ptr + b * sob + h * soh + offs_l[:, None] * sol + offs_d[None, :], mask=mask, other=0.0)
        go = go.to(tl.float32)
        o = o.to(tl.float32)
        a = tl.where(causal_mask, tl.dot(phq, tl.trans(phk), input_precision="ieee"), 0.0)
        zc = tl.where(fmask, z + ceps, 0.0)
        den = tl.sum(phq * zc[None, :], axis=1) + tl.sum(a, axis=1)
        den = tl.where(valid, den, 1.0)
        dnum = go / den[:, None]
        dden = tl.where(valid, -tl.sum(go * o, axis=1) / den, 0.0)
        mm = tl.where(causal_mask, tl.dot(dnum, tl.trans(vv), input_precision="ieee") + dden[:, None], 0.0)
        dphi = (tl.dot(dnum, tl.trans(S), input_precision="ieee") + dden[:, None] * zc[None, :]
                + tl.dot(mm, phk, input_precision="ieee"))
        dx = _through_features(dphi, eq, xq, w, fmask, s, ratio, RELU)
        dx = tl.where(valid[:, None], dx, 0.0)
        omask = (offs_l[:, None] < L) & (offs_d[None, :] < D)
        tl.store(dq_ptr + (bh * L + offs_l[:, None]) * D + offs_d[None, :], dx, mask=omask)
        tl.store(den_ptr + bh * L + offs_l, den, mask=offs_l < L)
        S += tl.dot(tl.trans(phk), vv, input_precision="ieee")
        z += tl.sum(phk, axis=0)


@triton.jit
def _causal_bwd_kv_kernel(q_ptr, k_ptr, v_ptr, w_ptr, pad_ptr, ck_ptr, o_ptr, go_ptr, den_ptr, dk_ptr, dv_ptr,
                          H, L, D, m, sqb, sqh, sql, skb, skh, skl, svb, svh, svl, sob, soh, sol, sgb, sgh, sgl,
                          s, ratio, eps, NCHUNK,
                          HAS_PAD: tl.constexpr, RELU: tl.constexpr,
                          BLOCK_C: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr):
    """dk, dv (reverse sweep): dv_c = phi(K_c) R + triu(phi(K_c) phi(Q_c)^T) dnum_c,
    dphi(K_c) = V_c R^T + r + triu(V_c dnum_c^T + dden^T) phi(Q_c)."""
    bh, b, h, offs_d, offs_f, fmask, w, ck = _causal_program(w_ptr, ck_ptr, H, D, m, BLOCK_F, BLOCK_D)
    upper = tl.arange(0, BLOCK_C)[:, None] <= tl.arange(0, BLOCK_C)[None, :]  # key row j, query column i >= j
    R = tl.zeros((BLOCK_F, BLOCK_D), dtype=tl.float32)
    r = tl.zeros((BLOCK_F,), dtype=tl.float32)
    for ci in range(0, NCHUNK):
        c0 = (NCHUNK - 1 - ci) * BLOCK_C
        offs_l, valid, xq, xk, vv, phq, eq, phk, ek = _causal_chunk(
            q_ptr, k_ptr, v_ptr, w, pad_ptr, ck, b, h, c0, L, D, m, sqb, sqh, sql, skb, skh, skl, svb, svh, svl,
            s, ratio, eps, HAS_PAD, RELU, BLOCK_C, BLOCK_F, BLOCK_D)
        mask = valid[:, None] & (offs_d[None, :] < D)
        go = tl.load(go_ptr + b * sgb + h * sgh + offs_l[:, None] * sgl + offs_d[None, :], mask=mask, other=0.0)
        o = tl.load(o_ptr + b * sob + h * soh + offs_l[:, None] * sol + offs_d[None, :], mask=mask, other=0.0)
        go = go.to(tl.float32)
        o = o.to(tl.float32)
        den = tl.load(den_ptr + bh * L + offs_l, mask=offs_l < L, other=1.0)
        den = tl.where(valid, den, 1.0)
        dnum = go / den[:, None]
        dden = tl.where(valid, -tl.sum(go * o, axis=1) / den, 0.0)
        at = tl.where(upper, tl.dot(phk, tl.trans(phq), input_precision="ieee"), 0.0)
        dv = tl.dot(phk, R, input_precision="ieee") + tl.dot(at, dnum, input_precision="ieee")
        mt = tl.where(upper, tl.dot(vv, tl.trans(dnum), input_precision="ieee") + dden[None, :], 0.0)
        dphi = (tl.dot(vv, tl.trans(R), input_precision="ieee") + r[None, :]
                + tl.dot(mt, phq, input_precision="ieee"))
        dx = _through_features(dphi, ek, xk, w, fmask, s, ratio, RELU)
        dx = tl.where(valid[:, None], dx, 0.0)
        dv = tl.where(valid[:, None], dv, 0.0)
        omask = (offs_l[:, None] < L) & (offs_d[None, :] < D)
        tl.store(dk_ptr + (bh * L + offs_l[:, None]) * D + offs_d[None, :], dx, mask=omask)
        tl.store(dv_ptr + (bh * L + offs_l[:, None]) * D + offs_d[None, :], dv, mask=omask)
        R += tl.dot(tl.trans(phq), dnum, input_precision="ieee")
        r += tl.sum(phq * dden[:, None], axis=0)


# ----------------------------------------------------------------------------- launchers


def _blocks(L, D, m):
    block_d = max(16, triton.next_power_of_2(D))
    block_m = 32 if m <= 32 else 64
    block_l = 16 if L <= 16 else (32 if L <= 64 else 64)
    nblk = triton.cdiv(m, block_m)
    return block_l, block_m, block_d, nblk


def _last_dim_contiguous(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _key_state(k, v, w, kpm, relu, eps):
    """Per (batch, head): C (Mp, BLOCK_D), z (Mp) with the eps parts folded in, and the key stabiliser."""
    B, H, L, D = k.shape
    m = w.shape[0]
    BL, BM, BD, NBLK = _blocks(L, D, m)
    dev = k.device
    a = torch.empty(B * H, NBLK, BM, BD, device=dev, dtype=torch.float32)
    ze = torch.empty(B * H, NBLK, BM, device=dev, dtype=torch.float32)
    cb = torch.empty(B * H, NBLK, device=dev, dtype=torch.float32)
    sv = torch.empty(B * H, BD, device=dev, dtype=torch.float32)
    n = torch.empty(B * H, device=dev, dtype=torch.float32)
    pad = kpm.contiguous().view(torch.uint8) if kpm is not None else k
    s = D ** -0.25
    _key_state_kernel[(B * H, NBLK)](
        k, v, w, pad, a, ze, cb, sv, n, H, L, D, m, *k.stride()[:3], *v.stride()[:3], s, NBLK,
        HAS_PAD=kpm is not None, RELU=relu, BLOCK_L=BL, BLOCK_M=BM, BLOCK_D=BD,
    )
    ratio = 1.0 if relu else m ** -0.5
    # Merge the feature blocks onto the global key max (blocks with no valid key have c = -inf).
    c = cb.amax(dim=1)
    c = torch.where(torch.isfinite(c), c, torch.zeros_like(c))
    scale = torch.where(torch.isfinite(cb), torch.exp(cb - c[:, None]), torch.zeros_like(cb))
    fvalid = (torch.arange(NBLK * BM, device=dev) < m).view(NBLK, BM).to(torch.float32)
    C = ratio * (a * scale[..., None, None] + eps * sv[:, None, None, :] * fvalid[None, :, :, None])
    z = ratio * (ze * scale[..., None] + eps * n[:, None, None] * fvalid[None])
    return C.reshape(B * H, NBLK * BM, BD).contiguous(), z.reshape(B * H, NBLK * BM).contiguous(), c


# performer-pytorch's causal_linear_attention_noncuda adds this to every prefix sum of phi(k).
_CAUSAL_EPS = 1e-6


def _causal_blocks(L, D, m):
    return 16, max(16, triton.next_power_of_2(m)), max(16, triton.next_power_of_2(D))


def _causal_forward(q, k, v, w, kpm, relu, eps):
    B, H, L, D = q.shape
    m = w.shape[0]
    BC, BF, BD = _causal_blocks(L, D, m)
    _, _, c = _key_state(k, v, w, kpm, relu, eps)
    out = torch.empty((B, H, L, D), dtype=q.dtype, device=q.device)
    pad = kpm.contiguous().view(torch.uint8) if kpm is not None else q
    ratio = 1.0 if relu else m ** -0.5
    _causal_fwd_kernel[(B * H,)](
        q, k, v, w, pad, c.contiguous(), out, H, L, D, m, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
        D ** -0.25, ratio, eps, _CAUSAL_EPS, HAS_PAD=kpm is not None, RELU=relu, BLOCK_C=BC, BLOCK_F=BF, BLOCK_D=BD,
    )
    return out, c.view(B, H)


def _causal_backward(grad_out, q, k, v, w, out, kpm, relu, eps):
    B, H, L, D = q.shape
    m = w.shape[0]
    BC, BF, BD = _causal_blocks(L, D, m)
    _, _, c = _key_state(k, v, w, kpm, relu, eps)
    c = c.contiguous()
    dev = q.device
    dq = torch.empty((B, H, L, D), dtype=torch.float32, device=dev)
    dk, dv = torch.empty_like(dq), torch.empty_like(dq)
    den = torch.empty((B * H, L), dtype=torch.float32, device=dev)
    pad = kpm.contiguous().view(torch.uint8) if kpm is not None else q
    ratio = 1.0 if relu else m ** -0.5
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3], *grad_out.stride()[:3])
    meta = dict(HAS_PAD=kpm is not None, RELU=relu, BLOCK_C=BC, BLOCK_F=BF, BLOCK_D=BD)
    _causal_bwd_q_kernel[(B * H,)](q, k, v, w, pad, c, out, grad_out, dq, den, H, L, D, m, *strides, D ** -0.25,
                                   ratio, eps, _CAUSAL_EPS, **meta)
    _causal_bwd_kv_kernel[(B * H,)](q, k, v, w, pad, c, out, grad_out, den, dk, dv, H, L, D, m, *strides,
                                    D ** -0.25, ratio, eps, triton.cdiv(L, BC), **meta)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def forward(q, k, v, projection, kpm, causal, relu, eps):
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    B, H, L, D = q.shape
    w = projection.detach().to(torch.float32).contiguous()
    if causal:
        return _causal_forward(q, k, v, w, kpm, relu, eps)
    m = w.shape[0]
    BL, BM, BD, NBLK = _blocks(L, D, m)
    C, z, c = _key_state(k, v, w, kpm, relu, eps)
    out = torch.empty((B, H, L, D), dtype=q.dtype, device=q.device)
    pad = kpm.contiguous().view(torch.uint8) if kpm is not None else q
    ratio = 1.0 if relu else m ** -0.5
    _fwd_query_kernel[(B * H, triton.cdiv(L, BL))](
        q, w, pad, C, z, out, H, L, D, m, *q.stride()[:3], D ** -0.25, ratio, eps, NBLK * BM,
        HAS_PAD=kpm is not None, RELU=relu, BLOCK_L=BL, BLOCK_M=BM, BLOCK_D=BD,
    )
    return out, c.view(B, H)


def backward(grad_out, q, k, v, projection, out, kpm, causal, relu, eps):
    q, k, v, out, grad_out = (_last_dim_contiguous(t) for t in (q, k, v, out, grad_out))
    B, H, L, D = q.shape
    w = projection.detach().to(torch.float32).contiguous()
    if causal:
        return _causal_backward(grad_out, q, k, v, w, out, kpm, relu, eps)
    m = w.shape[0]
    BL, BM, BD, NBLK = _blocks(L, D, m)
    MP = NBLK * BM
    C, z, c = _key_state(k, v, w, kpm, relu, eps)
    dev = q.device
    dq = torch.empty((B, H, L, D), dtype=torch.float32, device=dev)
    dk, dv = torch.empty_like(dq), torch.empty_like(dq)
    den = torch.empty((B * H, L), dtype=torch.float32, device=dev)
    cq = torch.empty_like(den)
    dc = torch.empty((B * H, MP, BD), dtype=torch.float32, device=dev)
    dz = torch.empty((B * H, MP), dtype=torch.float32, device=dev)
    pad = kpm.contiguous().view(torch.uint8) if kpm is not None else q
    s = D ** -0.25
    ratio = 1.0 if relu else m ** -0.5
    meta = dict(HAS_PAD=kpm is not None, RELU=relu, BLOCK_L=BL, BLOCK_M=BM, BLOCK_D=BD)
    strides = (*q.stride()[:3], *out.stride()[:3], *grad_out.stride()[:3])
    _bwd_query_kernel[(B * H, triton.cdiv(L, BL))](
        q, w, pad, C, z, out, grad_out, dq, den, cq, H, L, D, m, *strides, s, ratio, eps, MP, **meta)
    _bwd_dc_kernel[(B * H, NBLK)](
        q, w, pad, out, grad_out, den, cq, dc, dz, H, L, D, m, *strides, s, ratio, eps, MP, **meta)
    _bwd_key_kernel[(B * H, triton.cdiv(L, BL))](
        k, v, w, pad, c.contiguous(), dc, dz, dk, dv, H, L, D, m, *k.stride()[:3], *v.stride()[:3], s, ratio, eps,
        MP, **meta)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
