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
Matrix products run on the tensor cores (``_common.mma``): float16 / bfloat16 operands (inputs,
features and states rounded to the input dtype, float32 accumulation), float32 as 3xTF32, or TF32
when torch allows it. Every launch takes its tile sizes from a plan (``plans``) that fits the
GPU's shared memory; grids are flat on x and (batch*head) offsets are int64.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import (
    Arch, Config, KernelPlan, arch_of, device_guard, dot_precision,
    input_reasons, launch, mma, operand_dtype, plan, round_bf16,
)


@triton.jit
def _proj(x, w_ptr, f0, m, D, s, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr,
          OPDT: tl.constexpr):
    """(rows, BLOCK_M) block of s x.W_f for features f0 .. f0 + BLOCK_M, and the W block."""
    offs_f = f0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    w = tl.load(w_ptr + offs_f[:, None] * D + offs_d[None, :], mask=(offs_f[:, None] < m) & (offs_d[None, :] < D),
                other=0.0)
    return mma(x, tl.trans(w), PREC, OPDT) * s, w, offs_f < m


@triton.jit
def _key_state_kernel(k_ptr, v_ptr, w_ptr, pad_ptr, a_ptr, ze_ptr, c_ptr, sv_ptr, n_ptr,
                      H, L, D, m, skb, skh, skl, svb, svh, svl, s, NBLK,
                      HAS_PAD: tl.constexpr, RELU: tl.constexpr,
                      BLOCK_L: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                      PREC: tl.constexpr, OPDT: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)  # (batch*head, feature block) flattened onto grid x
    bh = pid // NBLK
    blk = pid % NBLK
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
        dd, w, fmask = _proj(kk, w_ptr, f0, m, D, s, BLOCK_M, BLOCK_D, PREC, OPDT)
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
        acc += mma(tl.trans(e), vv, PREC, OPDT)
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
def _row_max(x, w_ptr, m, D, s, BLOCK_L: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
             PREC: tl.constexpr, OPDT: tl.constexpr):
    cq = tl.full((BLOCK_L,), -float("inf"), dtype=tl.float32)
    for f0 in range(0, m, BLOCK_M):
        dd, w, fmask = _proj(x, w_ptr, f0, m, D, s, BLOCK_M, BLOCK_D, PREC, OPDT)
        cq = tl.maximum(cq, tl.max(tl.where(fmask[None, :], dd, -float("inf")), axis=1))
    return cq


@triton.jit
def _row_tile(pad_ptr, H, L, D, NT, HAS_PAD: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    """A row-tile program's (batch*head) (int64), batch, head, rows, columns, valid rows and load mask;
    programs are (batch*head, row tile) flattened onto grid x."""
    pid = tl.program_id(0).to(tl.int64)
    bh = pid // NT
    b = bh // H
    offs_l = (pid % NT).to(tl.int32) * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_d = tl.arange(0, BLOCK_D)
    valid = offs_l < L
    if HAS_PAD:
        valid = valid & (tl.load(pad_ptr + b * L + offs_l, mask=offs_l < L, other=1) == 0)
    return bh, b, bh % H, offs_l, offs_d, valid, valid[:, None] & (offs_d[None, :] < D)


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
                      H, L, D, m, sqb, sqh, sql, s, ratio, eps, MP, NT,
                      HAS_PAD: tl.constexpr, RELU: tl.constexpr,
                      BLOCK_L: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                      PREC: tl.constexpr, OPDT: tl.constexpr):
    bh, b, h, offs_l, offs_d, valid, mask = _row_tile(pad_ptr, H, L, D, NT, HAS_PAD, BLOCK_L, BLOCK_D)
    x = tl.load(q_ptr + b * sqb + h * sqh + offs_l[:, None] * sql + offs_d[None, :], mask=mask, other=0.0)
    x = x.to(tl.float32)
    diag = tl.sum(x * x, axis=1) * (s * s * 0.5)
    if RELU:
        cq = tl.zeros((BLOCK_L,), dtype=tl.float32)
    else:
        cq = _row_max(x, w_ptr, m, D, s, BLOCK_L, BLOCK_M, BLOCK_D, PREC, OPDT)
    num = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32)
    den = tl.zeros((BLOCK_L,), dtype=tl.float32)
    for f0 in range(0, m, BLOCK_M):
        dd, w, fmask = _proj(x, w_ptr, f0, m, D, s, BLOCK_M, BLOCK_D, PREC, OPDT)
        phi, e = _phi(dd, diag, cq[:, None], fmask, ratio, eps, RELU)
        offs_f = f0 + tl.arange(0, BLOCK_M)
        cblk = tl.load(c_state_ptr + bh * MP * BLOCK_D + offs_f[:, None] * BLOCK_D + offs_d[None, :])
        zblk = tl.load(z_ptr + bh * MP + offs_f)
        num += mma(phi, cblk, PREC, OPDT)
        den += tl.sum(phi * zblk[None, :], axis=1)
    den = tl.where(valid, den, 1.0)
    out = tl.where(valid[:, None], num / den[:, None], 0.0)
    omask = (offs_l[:, None] < L) & (offs_d[None, :] < D)
    tl.store(o_ptr + (bh * L + offs_l[:, None]) * D + offs_d[None, :], out.to(o_ptr.dtype.element_ty), mask=omask)


@triton.jit
def _bwd_query_kernel(q_ptr, w_ptr, pad_ptr, c_state_ptr, z_ptr, o_ptr, go_ptr, dq_ptr, den_ptr, cq_ptr,
                      H, L, D, m, sqb, sqh, sql, sob, soh, sol, sgb, sgh, sgl, s, ratio, eps, MP, NT,
                      HAS_PAD: tl.constexpr, RELU: tl.constexpr,
                      BLOCK_L: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                      PREC: tl.constexpr, OPDT: tl.constexpr):
    bh, b, h, offs_l, offs_d, valid, mask = _row_tile(pad_ptr, H, L, D, NT, HAS_PAD, BLOCK_L, BLOCK_D)
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
        cq = _row_max(x, w_ptr, m, D, s, BLOCK_L, BLOCK_M, BLOCK_D, PREC, OPDT)
    den = tl.zeros((BLOCK_L,), dtype=tl.float32)
    for f0 in range(0, m, BLOCK_M):
        dd, w, fmask = _proj(x, w_ptr, f0, m, D, s, BLOCK_M, BLOCK_D, PREC, OPDT)
        phi, e = _phi(dd, diag, cq[:, None], fmask, ratio, eps, RELU)
        zblk = tl.load(z_ptr + bh * MP + f0 + tl.arange(0, BLOCK_M))
        den += tl.sum(phi * zblk[None, :], axis=1)
    den = tl.where(valid, den, 1.0)
    dnum = go / den[:, None]
    dden = -tl.sum(go * o, axis=1) / den
    dx = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32)
    gsum = tl.zeros((BLOCK_L,), dtype=tl.float32)
    for f0 in range(0, m, BLOCK_M):
        dd, w, fmask = _proj(x, w_ptr, f0, m, D, s, BLOCK_M, BLOCK_D, PREC, OPDT)
        phi, e = _phi(dd, diag, cq[:, None], fmask, ratio, eps, RELU)
        offs_f = f0 + tl.arange(0, BLOCK_M)
        cblk = tl.load(c_state_ptr + bh * MP * BLOCK_D + offs_f[:, None] * BLOCK_D + offs_d[None, :])
        zblk = tl.load(z_ptr + bh * MP + offs_f)
        dphi = mma(dnum, tl.trans(cblk), PREC, OPDT) + dden[:, None] * zblk[None, :]
        if RELU:
            g = tl.where(e > 0, dphi, 0.0)
        else:
            g = dphi * ratio * e
        g = tl.where(fmask[None, :], g, 0.0)
        dx += mma(g, w, PREC, OPDT)
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
                   H, L, D, m, sqb, sqh, sql, sob, soh, sol, sgb, sgh, sgl, s, ratio, eps, MP, NT,
                   HAS_PAD: tl.constexpr, RELU: tl.constexpr,
                   BLOCK_L: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                      PREC: tl.constexpr, OPDT: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    bh = pid // NT
    f0 = (pid % NT).to(tl.int32) * BLOCK_M
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
        dd, w, fmask = _proj(x, w_ptr, f0, m, D, s, BLOCK_M, BLOCK_D, PREC, OPDT)
        phi, e = _phi(dd, diag, cq[:, None], fmask, ratio, eps, RELU)
        phi = tl.where(valid[:, None], phi, 0.0)
        dnum = go / den[:, None]
        dden = tl.where(valid, -tl.sum(go * o, axis=1) / den, 0.0)
        dc += mma(tl.trans(phi), dnum, PREC, OPDT)
        dz += tl.sum(phi * dden[:, None], axis=0)
    offs_f = f0 + tl.arange(0, BLOCK_M)
    tl.store(dc_ptr + bh * MP * BLOCK_D + offs_f[:, None] * BLOCK_D + offs_d[None, :], dc)
    tl.store(dz_ptr + bh * MP + offs_f, dz)


@triton.jit
def _bwd_key_kernel(k_ptr, v_ptr, w_ptr, pad_ptr, ck_ptr, dc_ptr, dz_ptr, dk_ptr, dv_ptr,
                    H, L, D, m, skb, skh, skl, svb, svh, svl, s, ratio, eps, MP, NT,
                    HAS_PAD: tl.constexpr, RELU: tl.constexpr,
                    BLOCK_L: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                      PREC: tl.constexpr, OPDT: tl.constexpr):
    bh, b, h, offs_l, offs_d, valid, mask = _row_tile(pad_ptr, H, L, D, NT, HAS_PAD, BLOCK_L, BLOCK_D)
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
        dd, w, fmask = _proj(x, w_ptr, f0, m, D, s, BLOCK_M, BLOCK_D, PREC, OPDT)
        phi, e = _phi(dd, diag, ck, fmask, ratio, eps, RELU)
        offs_f = f0 + tl.arange(0, BLOCK_M)
        dcb = tl.load(dc_ptr + bh * MP * BLOCK_D + offs_f[:, None] * BLOCK_D + offs_d[None, :])
        dzb = tl.load(dz_ptr + bh * MP + offs_f)
        dv += mma(phi, dcb, PREC, OPDT)
        dphi = mma(vv, tl.trans(dcb), PREC, OPDT) + dzb[None, :]
        if RELU:
            g = tl.where(e > 0, dphi, 0.0)
        else:
            g = dphi * ratio * e
        g = tl.where(fmask[None, :], g, 0.0)
        dx += mma(g, w, PREC, OPDT)
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
# Programs are (batch*head, feature block): each walks the sequence in chunks of BLOCK_C rows,
# carrying its block of the prefix state in float32 registers: S_f = sum phi_f(k_j) v_j^T
# (BLOCK_F x BLOCK_D) and z_f = sum phi_f(k_j). Every quantity below is a sum over feature blocks,
# so each program writes its partial and torch adds the blocks (deterministic, no atomics); only
# the query stabiliser (a row max over all features) couples blocks, and a small kernel computes
# it first. Per chunk, with A_f = tril(phi_f(Q_c) phi_f(K_c)^T):
#   num_c = sum_f phi_f(Q_c) S_f + A_f V_c,  den_c = sum_f phi_f(Q_c) (z_f + 1e-6) + rowsum(A_f),
# out = num / den; then S_f += phi_f(K_c)^T V_c. The backward runs the same sweep for dq and a
# reverse sweep (state R_f = sum phi_f(q_i) dnum_i^T, r_f = sum dden_i phi_f(q_i) over later
# chunks) for dk and dv; see csrc/cpu/performer.cpp.


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
def _row_max_kernel(q_ptr, w_ptr, pad_ptr, cq_ptr, H, L, D, m, sqb, sqh, sql, s, NT,
                    HAS_PAD: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                    PREC: tl.constexpr, OPDT: tl.constexpr):
    """Query stabiliser of the causal softmax kernel: max over all features of s q.W_f, per row."""
    bh, b, h, offs_l, offs_d, valid, mask = _row_tile(pad_ptr, H, L, D, NT, HAS_PAD, BLOCK_L, BLOCK_D)
    x = tl.load(q_ptr + b * sqb + h * sqh + offs_l[:, None] * sql + offs_d[None, :], mask=mask, other=0.0)
    x = x.to(tl.float32)
    cq = _row_max(x, w_ptr, m, D, s, BLOCK_L, BLOCK_M, BLOCK_D, PREC, OPDT)
    tl.store(cq_ptr + bh * L + offs_l, cq, mask=offs_l < L)


@triton.jit
def _round_to(x, PREC: tl.constexpr, OPDT: tl.constexpr):
    if PREC == "f32":
        x = round_bf16(x)
    else:
        x = x.to(OPDT).to(tl.float32)
    return x


@triton.jit
def _mma_scaled(a, b, PREC: tl.constexpr, OPDT: tl.constexpr, ROWS: tl.constexpr):
    """a @ b with float16 operands scaled first (rows of a if ROWS, else columns of b) to a max of 1:
    causal scores and states can be ~1e-6, where float16 is subnormal and loses most of its bits
    (10x the reference's error). bfloat16 and float32 have float32's range and skip the scaling."""
    if OPDT == tl.float16:
        if ROWS:
            sc = tl.max(tl.abs(a), axis=1)
            sc = tl.where(sc > 0, sc, 1.0)
            c = mma(a / sc[:, None], b, PREC, OPDT) * sc[:, None]
        else:
            sc = tl.max(tl.abs(b), axis=0)
            sc = tl.where(sc > 0, sc, 1.0)
            c = mma(a, b / sc[None, :], PREC, OPDT) * sc[None, :]
    else:
        c = mma(a, b, PREC, OPDT)
    return c


@triton.jit
def _causal_chunk(q_ptr, k_ptr, v_ptr, w, fmask, pad_ptr, cq_ptr, ck, bh, b, h, c0, L, D,
                  sqb, sqh, sql, skb, skh, skl, svb, svh, svl, s, ratio, eps,
                  HAS_PAD: tl.constexpr, RELU: tl.constexpr,
                  BLOCK_C: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr,
                  PREC: tl.constexpr, OPDT: tl.constexpr):
    """Inputs and this program's feature block of one chunk; padded rows are zero everywhere."""
    offs_l = c0 + tl.arange(0, BLOCK_C)
    offs_d = tl.arange(0, BLOCK_D)
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
    ddq = mma(xq, tl.trans(w), PREC, OPDT) * s
    ddk = mma(xk, tl.trans(w), PREC, OPDT) * s
    diag_q = tl.sum(xq * xq, axis=1) * (s * s * 0.5)
    diag_k = tl.sum(xk * xk, axis=1) * (s * s * 0.5)
    if RELU:
        cq = tl.zeros((BLOCK_C,), dtype=tl.float32)
    else:
        cq = tl.load(cq_ptr + bh * L + offs_l, mask=valid, other=0.0)
    phq, eq = _phi(ddq, diag_q, cq[:, None], fmask, ratio, eps, RELU)
    phk, ek = _phi(ddk, diag_k, ck, fmask, ratio, eps, RELU)
    # Features rounded once to the operand type (performer-pytorch's ``type_as``): the numerator's
    # products and the denominator's sums then see the same features, and out stays a convex
    # combination of values (rounding only inside the products breaks that by ~10x in float16).
    phq = _round_to(tl.where(valid[:, None], phq, 0.0), PREC, OPDT)
    phk = _round_to(tl.where(valid[:, None], phk, 0.0), PREC, OPDT)
    return offs_l, valid, xq, xk, vv, phq, eq, phk, ek


@triton.jit
def _through_features(dphi, e, x, w, fmask, s, ratio, RELU: tl.constexpr, PREC: tl.constexpr, OPDT: tl.constexpr):
    """dx = s G W - s^2 x sum_f G (softmax) or s G W (relu), G = dphi * dphi/d(s x.W)."""
    if RELU:
        g = tl.where(e > 0, dphi, 0.0)
    else:
        g = dphi * ratio * e
    g = tl.where(fmask[None, :], g, 0.0)
    dx = mma(g, w, PREC, OPDT) * s
    if not RELU:
        dx = dx - (s * s) * tl.sum(g, axis=1)[:, None] * x
    return dx


@triton.jit
def _causal_program(w_ptr, ck_ptr, H, D, m, NFB, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr):
    """What every causal program starts from: its (batch, head), feature block, offsets, projection
    block and the key stabiliser."""
    pid = tl.program_id(0).to(tl.int64)
    bh = pid // NFB
    fb = pid % NFB
    offs_d = tl.arange(0, BLOCK_D)
    offs_f = fb * BLOCK_F + tl.arange(0, BLOCK_F)
    fmask = offs_f < m
    w = tl.load(w_ptr + offs_f[:, None] * D + offs_d[None, :], mask=fmask[:, None] & (offs_d[None, :] < D),
                other=0.0)
    return bh, fb, bh // H, bh % H, offs_d, fmask, w, tl.load(ck_ptr + bh)


@triton.jit
def _causal_fwd_kernel(q_ptr, k_ptr, v_ptr, w_ptr, pad_ptr, cq_ptr, ck_ptr, num_ptr, den_ptr,
                       H, L, D, m, sqb, sqh, sql, skb, skh, skl, svb, svh, svl, s, ratio, eps, ceps, NFB, BHL,
                       HAS_PAD: tl.constexpr, RELU: tl.constexpr, DEN_ONLY: tl.constexpr,
                       BLOCK_C: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr,
                       PREC: tl.constexpr, OPDT: tl.constexpr):
    """This feature block's partial numerator (skipped with DEN_ONLY) and denominator."""
    bh, fb, b, h, offs_d, fmask, w, ck = _causal_program(w_ptr, ck_ptr, H, D, m, NFB, BLOCK_F, BLOCK_D)
    causal_mask = tl.arange(0, BLOCK_C)[:, None] >= tl.arange(0, BLOCK_C)[None, :]
    S = tl.zeros((BLOCK_F, BLOCK_D), dtype=tl.float32)
    z = tl.zeros((BLOCK_F,), dtype=tl.float32)
    for c0 in range(0, L, BLOCK_C):
        offs_l, valid, xq, xk, vv, phq, eq, phk, ek = _causal_chunk(
            q_ptr, k_ptr, v_ptr, w, fmask, pad_ptr, cq_ptr, ck, bh, b, h, c0, L, D, sqb, sqh, sql, skb, skh, skl,
            svb, svh, svl, s, ratio, eps, HAS_PAD, RELU, BLOCK_C, BLOCK_F, BLOCK_D, PREC, OPDT)
        a = tl.where(causal_mask, mma(phq, tl.trans(phk), PREC, OPDT), 0.0)
        zc = tl.where(fmask, z + ceps, 0.0)
        den = tl.sum(phq * zc[None, :], axis=1) + tl.sum(a, axis=1)
        row = fb * BHL + bh * L + offs_l
        tl.store(den_ptr + row, den, mask=offs_l < L)
        if not DEN_ONLY:
            num = _mma_scaled(phq, S, PREC, OPDT, False) + _mma_scaled(a, vv, PREC, OPDT, True)
            omask = (offs_l[:, None] < L) & (offs_d[None, :] < D)
            tl.store(num_ptr + row[:, None] * D + offs_d[None, :], num, mask=omask)
            S += mma(tl.trans(phk), vv, PREC, OPDT)
        z += tl.sum(phk, axis=0)


@triton.jit
def _causal_bwd_q_kernel(q_ptr, k_ptr, v_ptr, w_ptr, pad_ptr, cq_ptr, ck_ptr, o_ptr, go_ptr, den_ptr, dq_ptr,
                         H, L, D, m, sqb, sqh, sql, skb, skh, skl, svb, svh, svl, sob, soh, sol, sgb, sgh, sgl,
                         s, ratio, eps, ceps, NFB, BHL,
                         HAS_PAD: tl.constexpr, RELU: tl.constexpr,
                         BLOCK_C: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr,
                         PREC: tl.constexpr, OPDT: tl.constexpr):
    """This block's part of dq (forward sweep): dphi_f(Q_c) = dnum S_f^T + dden (z_f + 1e-6)
    + tril(dnum V_c^T + dden) phi_f(K_c); den is the whole denominator (all blocks)."""
    bh, fb, b, h, offs_d, fmask, w, ck = _causal_program(w_ptr, ck_ptr, H, D, m, NFB, BLOCK_F, BLOCK_D)
    causal_mask = tl.arange(0, BLOCK_C)[:, None] >= tl.arange(0, BLOCK_C)[None, :]
    S = tl.zeros((BLOCK_F, BLOCK_D), dtype=tl.float32)
    z = tl.zeros((BLOCK_F,), dtype=tl.float32)
    for c0 in range(0, L, BLOCK_C):
        offs_l, valid, xq, xk, vv, phq, eq, phk, ek = _causal_chunk(
            q_ptr, k_ptr, v_ptr, w, fmask, pad_ptr, cq_ptr, ck, bh, b, h, c0, L, D, sqb, sqh, sql, skb, skh, skl,
            svb, svh, svl, s, ratio, eps, HAS_PAD, RELU, BLOCK_C, BLOCK_F, BLOCK_D, PREC, OPDT)
        mask = valid[:, None] & (offs_d[None, :] < D)
        go = tl.load(go_ptr + b * sgb + h * sgh + offs_l[:, None] * sgl + offs_d[None, :], mask=mask, other=0.0)
        o = tl.load(o_ptr + b * sob + h * soh + offs_l[:, None] * sol + offs_d[None, :], mask=mask, other=0.0)
        go = go.to(tl.float32)
        o = o.to(tl.float32)
        den = tl.load(den_ptr + bh * L + offs_l, mask=valid, other=1.0)
        zc = tl.where(fmask, z + ceps, 0.0)
        dnum = go / den[:, None]
        dden = tl.where(valid, -tl.sum(go * o, axis=1) / den, 0.0)
        mm = tl.where(causal_mask, mma(dnum, tl.trans(vv), PREC, OPDT) + dden[:, None], 0.0)
        dphi = (_mma_scaled(dnum, tl.trans(S), PREC, OPDT, False) + dden[:, None] * zc[None, :]
                + _mma_scaled(mm, phk, PREC, OPDT, True))
        dx = _through_features(dphi, eq, xq, w, fmask, s, ratio, RELU, PREC, OPDT)
        dx = tl.where(valid[:, None], dx, 0.0)
        omask = (offs_l[:, None] < L) & (offs_d[None, :] < D)
        tl.store(dq_ptr + (fb * BHL + bh * L + offs_l[:, None]) * D + offs_d[None, :], dx, mask=omask)
        S += mma(tl.trans(phk), vv, PREC, OPDT)
        z += tl.sum(phk, axis=0)


@triton.jit
def _causal_bwd_kv_kernel(q_ptr, k_ptr, v_ptr, w_ptr, pad_ptr, cq_ptr, ck_ptr, o_ptr, go_ptr, den_ptr, dk_ptr,
                          dv_ptr, H, L, D, m, sqb, sqh, sql, skb, skh, skl, svb, svh, svl, sob, soh, sol, sgb, sgh,
                          sgl, s, ratio, eps, NCHUNK, NFB, BHL,
                          HAS_PAD: tl.constexpr, RELU: tl.constexpr,
                          BLOCK_C: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr,
                          PREC: tl.constexpr, OPDT: tl.constexpr):
    """This block's part of dk, dv (reverse sweep): dv_c = phi_f(K_c) R_f + triu(phi_f(K_c)
    phi_f(Q_c)^T) dnum_c, dphi_f(K_c) = V_c R_f^T + r_f + triu(V_c dnum_c^T + dden^T) phi_f(Q_c)."""
    bh, fb, b, h, offs_d, fmask, w, ck = _causal_program(w_ptr, ck_ptr, H, D, m, NFB, BLOCK_F, BLOCK_D)
    upper = tl.arange(0, BLOCK_C)[:, None] <= tl.arange(0, BLOCK_C)[None, :]  # key row j, query column i >= j
    R = tl.zeros((BLOCK_F, BLOCK_D), dtype=tl.float32)
    r = tl.zeros((BLOCK_F,), dtype=tl.float32)
    for ci in range(0, NCHUNK):
        c0 = (NCHUNK - 1 - ci) * BLOCK_C
        offs_l, valid, xq, xk, vv, phq, eq, phk, ek = _causal_chunk(
            q_ptr, k_ptr, v_ptr, w, fmask, pad_ptr, cq_ptr, ck, bh, b, h, c0, L, D, sqb, sqh, sql, skb, skh, skl,
            svb, svh, svl, s, ratio, eps, HAS_PAD, RELU, BLOCK_C, BLOCK_F, BLOCK_D, PREC, OPDT)
        mask = valid[:, None] & (offs_d[None, :] < D)
        go = tl.load(go_ptr + b * sgb + h * sgh + offs_l[:, None] * sgl + offs_d[None, :], mask=mask, other=0.0)
        o = tl.load(o_ptr + b * sob + h * soh + offs_l[:, None] * sol + offs_d[None, :], mask=mask, other=0.0)
        go = go.to(tl.float32)
        o = o.to(tl.float32)
        den = tl.load(den_ptr + bh * L + offs_l, mask=valid, other=1.0)
        dnum = go / den[:, None]
        dden = tl.where(valid, -tl.sum(go * o, axis=1) / den, 0.0)
        at = tl.where(upper, mma(phk, tl.trans(phq), PREC, OPDT), 0.0)
        dv = _mma_scaled(phk, R, PREC, OPDT, False) + _mma_scaled(at, dnum, PREC, OPDT, True)
        mt = tl.where(upper, mma(vv, tl.trans(dnum), PREC, OPDT) + dden[None, :], 0.0)
        dphi = (_mma_scaled(vv, tl.trans(R), PREC, OPDT, False) + r[None, :]
                + _mma_scaled(mt, phq, PREC, OPDT, True))
        dx = _through_features(dphi, ek, xk, w, fmask, s, ratio, RELU, PREC, OPDT)
        dx = tl.where(valid[:, None], dx, 0.0)
        dv = tl.where(valid[:, None], dv, 0.0)
        omask = (offs_l[:, None] < L) & (offs_d[None, :] < D)
        ptrs = (fb * BHL + bh * L + offs_l[:, None]) * D + offs_d[None, :]
        tl.store(dk_ptr + ptrs, dx, mask=omask)
        tl.store(dv_ptr + ptrs, dv, mask=omask)
        R += mma(tl.trans(phq), dnum, PREC, OPDT)
        r += tl.sum(phq * dden[:, None], axis=0)


# ----------------------------------------------------------------------------- plans and launchers

# C, z, dC, dz are stored with this many feature rows (zero past m), so kernels whose feature block
# differs still read inside the buffer.
_MP_ALIGN = 128

NONCAUSAL_KERNELS = ("key_state", "fwd_query", "bwd_query", "bwd_dc", "bwd_key")
CAUSAL_KERNELS = ("row_max", "causal_fwd", "causal_bwd_q", "causal_bwd_kv")


def _bd(D: int) -> int:
    return max(16, triton.next_power_of_2(D))


def _configs(kernel: str, dtype: torch.dtype, D: int, m: int, L: int, arch: Arch) -> list[Config]:
    """Candidate configs, preferred first. Non-causal kernels tile rows (BLOCK_L) and features
    (BLOCK_M); causal ones chunk rows (BLOCK_C) and give each program one block of BLOCK_F
    features. Measured with tests/gpu_compile: larger float32 tiles spill (3xTF32 holds each
    operand twice), and the state of a causal program is BLOCK_F x head_dim float32 registers."""
    fmax = max(16, triton.next_power_of_2(m))
    lmax = max(16, triton.next_power_of_2(L)) if L else 64
    if kernel in CAUSAL_KERNELS and kernel != "row_max":
        if arch.interpreter:
            return [Config.of(1, 1, BLOCK_C=16, BLOCK_F=min(fmax, 64))]
        wide = dtype != torch.float32
        if wide:
            # float16 adds the operand scaling of _mma_scaled: at head_dim 128 it needs eight warps
            # (the backward sweeps carry more live tiles: 64 features spill there on sm_80)
            if D <= 64 and kernel == "causal_fwd":
                cands = [(16, 64, 4), (16, 32, 4), (16, 16, 4)]
            else:
                cands = [(16, 32, 8 if dtype == torch.float16 else 4), (16, 16, 4)]
        else:  # 3xTF32 holds every operand twice: eight warps share the register load
            cands = [(16, 32, 8), (16, 16, 8), (16, 16, 4)] if D <= 64 else [(16, 16, 8), (16, 16, 4)]
        return list(dict.fromkeys(Config.of(w, 1, BLOCK_C=c, BLOCK_F=min(f, fmax)) for c, f, w in cands))
    if arch.interpreter:
        return [Config.of(1, 1, BLOCK_L=min(lmax, 32 if L > 16 else 16), BLOCK_M=min(32 if m <= 32 else 64, fmax))]
    wide = dtype != torch.float32
    if kernel in ("key_state", "fwd_query", "row_max"):
        cands = [(64, 64, 4, 2), (32, 64, 4, 1), (16, 32, 4, 1)] if wide else [(16, 32, 4, 1), (16, 16, 4, 1)]
    else:  # the backward kernels keep three float32 row tiles (x, dout, out) and a gradient tile live
        cands = ([(32, 64, 8, 1), (16, 64, 4, 1), (16, 32, 4, 1)] if wide
                 else [(16, 32, 4, 1), (16, 16, 4, 1)])
    return list(dict.fromkeys(Config.of(w, st, BLOCK_L=min(bl, lmax), BLOCK_M=min(bm, fmax))
                              for bl, bm, w, st in cands))


def _smem(kernel: str, dtype: torch.dtype, D: int):
    """Estimated shared memory: every tl.dot operand tile, times the pipeline stages (an upper bound
    of Triton's allocation, checked against the compiled kernels in tests/gpu_compile)."""
    e = 2 if dtype != torch.float32 else 4
    bd = _bd(D)

    def est(c: Config) -> int:
        b = dict(c.blocks)
        if "BLOCK_C" in b:
            C, F = b["BLOCK_C"], b["BLOCK_F"]
            # per chunk: two projections, then (fwd) A, phq S, A V, phk^T V; (bwd) about twice that
            ops = 2 * (C * bd + bd * F) + (C * F + F * C) + (C * F + F * bd) + (C * C + C * bd) + (F * C + C * bd)
            if kernel != "causal_fwd":
                ops *= 2
            return e * ops
        Lb, M = b["BLOCK_L"], b["BLOCK_M"]
        proj = Lb * bd + bd * M
        ops = {"key_state": proj + M * Lb + Lb * bd, "fwd_query": proj + Lb * M + M * bd, "row_max": proj,
               "bwd_dc": proj + M * Lb + Lb * bd,
               "bwd_query": proj + (Lb * bd + bd * M) + (Lb * M + M * bd),
               "bwd_key": proj + (Lb * M + M * bd) + (Lb * bd + bd * M) + (Lb * M + M * bd)}[kernel]
        # Triton keeps converted copies of some operands (float32 layouts): 1.5x covers them, 2x for
        # the projection-only row max (measured)
        return int((2.0 if kernel == "row_max" else 1.5) * e * ops * max(1, c.num_stages))

    return est


def plans(dtype: torch.dtype, head_dim: int, nb_features: int, causal: bool, arch: Arch,
          length: int = 0) -> dict[str, KernelPlan]:
    """The plan of every kernel a call with these inputs launches (forward and backward)."""
    names = NONCAUSAL_KERNELS[:1] + (CAUSAL_KERNELS if causal else NONCAUSAL_KERNELS[1:])
    return {k: plan(f"performer {k}", arch, _configs(k, dtype, head_dim, nb_features, length, arch),
                    _smem(k, dtype, head_dim)) for k in names}


def unsupported_reasons(*, dtype: torch.dtype = torch.float32, head_dim: int = 64, nb_features: int = 256,
                        causal: bool = False, device=None, **_) -> list[str]:
    """Why the Triton kernels cannot run these inputs on ``device`` (an empty list: they can).
    ``device``: a torch device, a compute capability or an :class:`Arch`."""
    r = input_reasons(dtype, head_dim)
    if r:
        return r
    return [p.reason() for p in plans(dtype, head_dim, nb_features, causal, arch_of(device)).values() if p.reason()]


class _Call:
    """One call's plans, matmul precision and the constants every kernel shares."""

    def __init__(self, q, m, causal, relu, kpm):
        B, H, L, D = q.shape
        self.arch = arch_of(q.device)
        self.plans = plans(q.dtype, D, m, causal, self.arch, L)
        self.cfg = {k: p.require() for k, p in self.plans.items()}
        self.consts = dict(HAS_PAD=kpm is not None, RELU=relu, BLOCK_D=_bd(D),
                           PREC=dot_precision(q.dtype, self.arch), OPDT=operand_dtype(q.dtype))
        self.BH, self.L, self.m = B * H, L, m

    def go(self, kernel, name, args_fn, rows: Optional[int] = None, extra: Optional[dict] = None):
        """Launch ``kernel`` with its plan's config; ``rows``: the tiled extent (L) or None for one
        program per feature block (``args_fn(config)`` gives the arguments)."""
        c = self.cfg[name]
        b = dict(c.blocks)
        if "BLOCK_C" in b:
            grid = self.BH * triton.cdiv(self.m, b["BLOCK_F"])
        elif rows is None:
            grid = self.BH * triton.cdiv(self.m, b["BLOCK_M"])
        else:
            grid = self.BH * triton.cdiv(rows, b["BLOCK_L"])
        consts = dict(self.consts, **(extra or {}))
        if name == "row_max":
            consts.pop("RELU")
        launch(kernel, (grid,), args_fn(c), consts, self.plans[name], c)


def _last_dim_contiguous(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _mp(m: int) -> int:
    return triton.cdiv(m, _MP_ALIGN) * _MP_ALIGN


def _key_state(call: _Call, k, v, w, kpm, relu, eps):
    """Per (batch, head): C (MP, BLOCK_D), z (MP) with the eps parts folded in (zero past m), and
    the key stabiliser."""
    B, H, L, D = k.shape
    m = w.shape[0]
    cfg = call.cfg["key_state"]
    BM, BD = cfg["BLOCK_M"], _bd(D)
    NBLK = triton.cdiv(m, BM)
    dev = k.device
    a = torch.empty(B * H, NBLK, BM, BD, device=dev, dtype=torch.float32)
    ze = torch.empty(B * H, NBLK, BM, device=dev, dtype=torch.float32)
    cb = torch.empty(B * H, NBLK, device=dev, dtype=torch.float32)
    sv = torch.empty(B * H, BD, device=dev, dtype=torch.float32)
    n = torch.empty(B * H, device=dev, dtype=torch.float32)
    pad = kpm.contiguous().view(torch.uint8) if kpm is not None else k
    s = D ** -0.25
    call.go(_key_state_kernel, "key_state",
            lambda c: (k, v, w, pad, a, ze, cb, sv, n, H, L, D, m, *k.stride()[:3], *v.stride()[:3], s, NBLK))
    ratio = 1.0 if relu else m ** -0.5
    # Merge the feature blocks onto the global key max (blocks with no valid key have c = -inf).
    c = cb.amax(dim=1)
    c = torch.where(torch.isfinite(c), c, torch.zeros_like(c))
    scale = torch.where(torch.isfinite(cb), torch.exp(cb - c[:, None]), torch.zeros_like(cb))
    fvalid = (torch.arange(NBLK * BM, device=dev) < m).view(NBLK, BM).to(torch.float32)
    C = ratio * (a * scale[..., None, None] + eps * sv[:, None, None, :] * fvalid[None, :, :, None])
    z = ratio * (ze * scale[..., None] + eps * n[:, None, None] * fvalid[None])
    C = C.reshape(B * H, NBLK * BM, BD)
    z = z.reshape(B * H, NBLK * BM)
    MP = _mp(m)
    Cp = torch.zeros(B * H, MP, BD, device=dev, dtype=torch.float32)
    zp = torch.zeros(B * H, MP, device=dev, dtype=torch.float32)
    rows = min(MP, NBLK * BM)
    Cp[:, :rows] = C[:, :rows]
    zp[:, :rows] = z[:, :rows]
    return Cp, zp, c


# performer-pytorch's causal_linear_attention_noncuda adds this to every prefix sum of phi(k).
_CAUSAL_EPS = 1e-6


def _causal_setup(call: _Call, q, k, v, w, kpm, relu, eps):
    """Key stabiliser, query stabilisers, and the per-block partial denominator (and numerator)."""
    B, H, L, D = q.shape
    m = w.shape[0]
    _, _, c = _key_state(call, k, v, w, kpm, relu, eps)
    c = c.contiguous()
    pad = kpm.contiguous().view(torch.uint8) if kpm is not None else q
    cq = torch.zeros((B * H, L), dtype=torch.float32, device=q.device)
    if not relu:
        call.go(_row_max_kernel, "row_max",
                lambda cfg: (q, w, pad, cq, H, L, D, m, *q.stride()[:3], D ** -0.25, triton.cdiv(L, cfg["BLOCK_L"])),
                rows=L)
    return c, cq, pad


def _causal_partials(call, q, k, v, w, pad, cq, c, eps, den_only):
    B, H, L, D = q.shape
    m = w.shape[0]
    NFB = triton.cdiv(m, call.cfg["causal_fwd"]["BLOCK_F"])
    num = (torch.empty((NFB, B * H, L, D), dtype=torch.float32, device=q.device) if not den_only
           else torch.empty((1,), dtype=torch.float32, device=q.device))
    den = torch.empty((NFB, B * H, L), dtype=torch.float32, device=q.device)
    ratio = 1.0 if call.consts["RELU"] else m ** -0.5
    call.go(_causal_fwd_kernel, "causal_fwd",
            lambda cfg: (q, k, v, w, pad, cq, c, num, den, H, L, D, m, *q.stride()[:3], *k.stride()[:3],
                         *v.stride()[:3], D ** -0.25, ratio, eps, _CAUSAL_EPS, NFB, B * H * L),
            extra=dict(DEN_ONLY=den_only))
    return num, den


def _valid_rows(kpm, B, H, L, device):
    if kpm is None:
        return torch.ones((B * H, L), dtype=torch.bool, device=device)
    return (~kpm)[:, None, :].expand(B, H, L).reshape(B * H, L)


def _causal_forward(call, q, k, v, w, kpm, relu, eps):
    B, H, L, D = q.shape
    c, cq, pad = _causal_setup(call, q, k, v, w, kpm, relu, eps)
    num, den = _causal_partials(call, q, k, v, w, pad, cq, c, eps, False)
    valid = _valid_rows(kpm, B, H, L, q.device)
    den = torch.where(valid, den.sum(0), 1.0)
    out = torch.where(valid[..., None], num.sum(0) / den[..., None], 0.0)
    return out.view(B, H, L, D).to(q.dtype), c.view(B, H)


def _causal_backward(call, grad_out, q, k, v, w, out, kpm, relu, eps):
    B, H, L, D = q.shape
    m = w.shape[0]
    c, cq, pad = _causal_setup(call, q, k, v, w, kpm, relu, eps)
    _, den = _causal_partials(call, q, k, v, w, pad, cq, c, eps, True)
    valid = _valid_rows(kpm, B, H, L, q.device)
    den = torch.where(valid, den.sum(0), 1.0).contiguous()
    dev = q.device
    ratio = 1.0 if relu else m ** -0.5
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3], *grad_out.stride()[:3])
    nfb = {n: triton.cdiv(m, call.cfg[n]["BLOCK_F"]) for n in ("causal_bwd_q", "causal_bwd_kv")}
    dq = torch.empty((nfb["causal_bwd_q"], B * H, L, D), dtype=torch.float32, device=dev)
    dk = torch.empty((nfb["causal_bwd_kv"], B * H, L, D), dtype=torch.float32, device=dev)
    dv = torch.empty_like(dk)
    call.go(_causal_bwd_q_kernel, "causal_bwd_q",
            lambda cfg: (q, k, v, w, pad, cq, c, out, grad_out, den, dq, H, L, D, m, *strides, D ** -0.25, ratio, eps,
                         _CAUSAL_EPS, nfb["causal_bwd_q"], B * H * L))
    call.go(_causal_bwd_kv_kernel, "causal_bwd_kv",
            lambda cfg: (q, k, v, w, pad, cq, c, out, grad_out, den, dk, dv, H, L, D, m, *strides, D ** -0.25, ratio,
                         eps, triton.cdiv(L, cfg["BLOCK_C"]), nfb["causal_bwd_kv"], B * H * L))
    shape = (B, H, L, D)
    return dq.sum(0).view(shape).to(q.dtype), dk.sum(0).view(shape).to(k.dtype), dv.sum(0).view(shape).to(v.dtype)


def forward(q, k, v, projection, kpm, causal, relu, eps):
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    B, H, L, D = q.shape
    w = projection.detach().to(torch.float32).contiguous()
    m = w.shape[0]
    call = _Call(q, m, causal, relu, kpm)
    with device_guard(q):
        if causal:
            return _causal_forward(call, q, k, v, w, kpm, relu, eps)
        C, z, c = _key_state(call, k, v, w, kpm, relu, eps)
        out = torch.empty((B, H, L, D), dtype=q.dtype, device=q.device)
        pad = kpm.contiguous().view(torch.uint8) if kpm is not None else q
        ratio = 1.0 if relu else m ** -0.5
        call.go(_fwd_query_kernel, "fwd_query",
                lambda cfg: (q, w, pad, C, z, out, H, L, D, m, *q.stride()[:3], D ** -0.25, ratio, eps, C.shape[1],
                             triton.cdiv(L, cfg["BLOCK_L"])), rows=L)
    return out, c.view(B, H)


def backward(grad_out, q, k, v, projection, out, kpm, causal, relu, eps):
    q, k, v, out, grad_out = (_last_dim_contiguous(t) for t in (q, k, v, out, grad_out))
    B, H, L, D = q.shape
    w = projection.detach().to(torch.float32).contiguous()
    m = w.shape[0]
    call = _Call(q, m, causal, relu, kpm)
    with device_guard(q):
        if causal:
            return _causal_backward(call, grad_out, q, k, v, w, out, kpm, relu, eps)
        C, z, c = _key_state(call, k, v, w, kpm, relu, eps)
        MP, BD = C.shape[1], C.shape[2]
        dev = q.device
        dq = torch.empty((B, H, L, D), dtype=torch.float32, device=dev)
        dk, dv = torch.empty_like(dq), torch.empty_like(dq)
        den = torch.empty((B * H, L), dtype=torch.float32, device=dev)
        cq = torch.empty_like(den)
        dc = torch.zeros((B * H, MP, BD), dtype=torch.float32, device=dev)
        dz = torch.zeros((B * H, MP), dtype=torch.float32, device=dev)
        pad = kpm.contiguous().view(torch.uint8) if kpm is not None else q
        s = D ** -0.25
        ratio = 1.0 if relu else m ** -0.5
        strides = (*q.stride()[:3], *out.stride()[:3], *grad_out.stride()[:3])
        call.go(_bwd_query_kernel, "bwd_query",
                lambda cfg: (q, w, pad, C, z, out, grad_out, dq, den, cq, H, L, D, m, *strides, s, ratio, eps, MP,
                             triton.cdiv(L, cfg["BLOCK_L"])), rows=L)
        call.go(_bwd_dc_kernel, "bwd_dc",
                lambda cfg: (q, w, pad, out, grad_out, den, cq, dc, dz, H, L, D, m, *strides, s, ratio, eps, MP,
                             triton.cdiv(m, cfg["BLOCK_M"])))
        call.go(_bwd_key_kernel, "bwd_key",
                lambda cfg: (k, v, w, pad, c.contiguous(), dc, dz, dk, dv, H, L, D, m, *k.stride()[:3],
                             *v.stride()[:3], s, ratio, eps, MP, triton.cdiv(L, cfg["BLOCK_L"])), rows=L)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
