"""Triton kernels of masked gene attention (SPEC 1.1), forward and backward.

The generative mask is handled exactly, without any per-element mask inside the tiles:

* per cell, the positions of the keys that are valid AND known are compacted into an index list
  (a stable sort of the mask in torch before launch), and likewise the valid queries;
* every valid query attends the known keys with dense FlashAttention-2 tiles (only the tail tile
  of the index list is masked), keeping the running max and sum;
* an unknown query's only other allowed key is itself, so its self term is folded in at the end:
  ``o = (e^{L-M} o_known + e^{s_ii-M} v_i) / (e^{L-M} + e^{s_ii-M})``.

Tiles past the end of an index list are never launched into work, so padding and unknown keys cost
nothing. Padded positions are never loaded (masked loads), so NaN written there cannot leak.

The backward is FlashAttention-2 without atomics (deterministic): one kernel accumulates dK/dV per
tile of known keys over all valid queries, another accumulates dQ per tile of valid queries over the
known keys and also writes the self-term gradients of unknown tokens (an unknown key receives
gradient from its own query only, so no other program touches those rows).
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from .._runtime import triton_interpret


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _mm(a, b, PREC: tl.constexpr):
    # PREC "f32" is the interpreter's bfloat16 path: its numpy tl.dot mis-reads bfloat16 operands,
    # so they are widened first (after any rounding to bfloat16, so the maths matches the GPU's).
    if PREC == "f32":
        c = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        c = tl.dot(a, b, input_precision=PREC)
    return c


@triton.jit
def _fwd_kernel(
    Q, K, V, O, LSE, QIDX, QCNT, KIDX, KCNT, UNK,
    sqb, sqh, sql, sqd, skb, skh, skl, skd, svb, svh, svl, svd,
    H, L, D, scale,
    BM: tl.constexpr, BN: tl.constexpr, DP: tl.constexpr,
    HAS_UNKNOWN: tl.constexpr, PREC: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    qcnt = tl.load(QCNT + b)
    start_m = pid_m * BM
    if start_m < qcnt:  # tiles past the last valid query have no work
        offs_m = start_m + tl.arange(0, BM)
        mrow = offs_m < qcnt
        qi = tl.load(QIDX + b * L + offs_m, mask=mrow, other=0).to(tl.int64)
        offs_d = tl.arange(0, DP)
        dmask = offs_d < D
        qbase = Q + b * sqb + h * sqh
        kbase = K + b * skb + h * skh
        vbase = V + b * svb + h * svh
        q = tl.load(qbase + qi[:, None] * sql + offs_d[None, :] * sqd,
                    mask=mrow[:, None] & dmask[None, :], other=0.0)

        m_i = tl.full([BM], float("-inf"), tl.float32)
        l_i = tl.zeros([BM], tl.float32)
        acc = tl.zeros([BM, DP], tl.float32)
        kcnt = tl.load(KCNT + b)
        for start_n in range(0, kcnt, BN):
            offs_n = start_n + tl.arange(0, BN)
            ncol = offs_n < kcnt
            kj = tl.load(KIDX + b * L + offs_n, mask=ncol, other=0).to(tl.int64)
            kv_mask = ncol[:, None] & dmask[None, :]
            k = tl.load(kbase + kj[:, None] * skl + offs_d[None, :] * skd, mask=kv_mask, other=0.0)
            v = tl.load(vbase + kj[:, None] * svl + offs_d[None, :] * svd, mask=kv_mask, other=0.0)
            s = _mm(q, tl.trans(k), PREC) * scale
            s = tl.where(ncol[None, :], s, float("-inf"))
            # at least one column is in range, so m_new is finite
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + _mm(p.to(v.dtype), v, PREC)
            m_i = m_new

        if HAS_UNKNOWN:
            unk = tl.load(UNK + b * L + qi, mask=mrow, other=0) != 0
            self_mask = unk[:, None] & dmask[None, :]
            ks = tl.load(kbase + qi[:, None] * skl + offs_d[None, :] * skd, mask=self_mask, other=0.0)
            vs = tl.load(vbase + qi[:, None] * svl + offs_d[None, :] * svd, mask=self_mask, other=0.0)
            s_self = tl.sum(q.to(tl.float32) * ks.to(tl.float32), 1) * scale
            s_self = tl.where(unk, s_self, float("-inf"))
            m_new = tl.maximum(m_i, s_self)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m_i - m_safe)
            p_self = tl.exp(s_self - m_safe)
            l_i = l_i * alpha + p_self
            acc = acc * alpha[:, None] + p_self[:, None] * vs.to(tl.float32)
            m_i = m_new

        has = l_i > 0.0
        out = acc / tl.where(has, l_i, 1.0)[:, None]
        lse = tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), float("-inf"))
        row = bh * L + qi
        tl.store(O + row[:, None] * D + offs_d[None, :], out.to(O.dtype.element_ty),
                 mask=mrow[:, None] & dmask[None, :])
        tl.store(LSE + row, lse, mask=mrow)


@triton.jit
def _bwd_delta_kernel(
    O, DO, DELTA, QIDX, QCNT,
    sob, soh, sol, sod, sgb, sgh, sgl, sgd,
    H, L, D,
    BM: tl.constexpr, DP: tl.constexpr,
):
    """Delta_i = rowsum(dO_i * O_i) for the valid queries."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    qcnt = tl.load(QCNT + b)
    start_m = pid_m * BM
    if start_m < qcnt:
        offs_m = start_m + tl.arange(0, BM)
        mrow = offs_m < qcnt
        qi = tl.load(QIDX + b * L + offs_m, mask=mrow, other=0).to(tl.int64)
        offs_d = tl.arange(0, DP)
        msk = mrow[:, None] & (offs_d < D)[None, :]
        o = tl.load(O + b * sob + h * soh + qi[:, None] * sol + offs_d[None, :] * sod, mask=msk, other=0.0)
        do = tl.load(DO + b * sgb + h * sgh + qi[:, None] * sgl + offs_d[None, :] * sgd, mask=msk, other=0.0)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        tl.store(DELTA + bh * L + qi, delta, mask=mrow)


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, QIDX, QCNT, KIDX, KCNT,
    sqb, sqh, sql, sqd, skb, skh, skl, skd, svb, svh, svl, svd, sgb, sgh, sgl, sgd,
    H, L, D, scale,
    BM: tl.constexpr, BN: tl.constexpr, DP: tl.constexpr, PREC: tl.constexpr,
):
    """dK, dV of the known keys: one program per tile of the compacted known keys."""
    pid_n = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    kcnt = tl.load(KCNT + b)
    start_n = pid_n * BN
    if start_n < kcnt:
        offs_n = start_n + tl.arange(0, BN)
        ncol = offs_n < kcnt
        kj = tl.load(KIDX + b * L + offs_n, mask=ncol, other=0).to(tl.int64)
        offs_d = tl.arange(0, DP)
        dmask = offs_d < D
        kv_mask = ncol[:, None] & dmask[None, :]
        k = tl.load(K + b * skb + h * skh + kj[:, None] * skl + offs_d[None, :] * skd, mask=kv_mask, other=0.0)
        v = tl.load(V + b * svb + h * svh + kj[:, None] * svl + offs_d[None, :] * svd, mask=kv_mask, other=0.0)
        dk = tl.zeros([BN, DP], tl.float32)
        dv = tl.zeros([BN, DP], tl.float32)
        qbase = Q + b * sqb + h * sqh
        gbase = DO + b * sgb + h * sgh
        qcnt = tl.load(QCNT + b)
        for start_m in range(0, qcnt, BM):
            offs_m = start_m + tl.arange(0, BM)
            mrow = offs_m < qcnt
            qi = tl.load(QIDX + b * L + offs_m, mask=mrow, other=0).to(tl.int64)
            q_mask = mrow[:, None] & dmask[None, :]
            q = tl.load(qbase + qi[:, None] * sql + offs_d[None, :] * sqd, mask=q_mask, other=0.0)
            do = tl.load(gbase + qi[:, None] * sgl + offs_d[None, :] * sgd, mask=q_mask, other=0.0)
            lse = tl.load(LSE + bh * L + qi, mask=mrow, other=0.0)
            delta = tl.load(DELTA + bh * L + qi, mask=mrow, other=0.0)
            s = _mm(q, tl.trans(k), PREC) * scale
            p = tl.where(mrow[:, None] & ncol[None, :], tl.exp(s - lse[:, None]), 0.0)
            dv += _mm(tl.trans(p.to(do.dtype)), do, PREC)
            dp = _mm(do, tl.trans(v), PREC)
            ds = p * (dp - delta[:, None])
            dk += _mm(tl.trans(ds.to(q.dtype)), q, PREC)
        row = bh * L + kj
        ptrs = row[:, None] * D + offs_d[None, :]
        tl.store(DK + ptrs, dk * scale, mask=kv_mask)
        tl.store(DV + ptrs, dv, mask=kv_mask)


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, DK, DV, QIDX, QCNT, KIDX, KCNT, UNK,
    sqb, sqh, sql, sqd, skb, skh, skl, skd, svb, svh, svl, svd, sgb, sgh, sgl, sgd,
    H, L, D, scale,
    BM: tl.constexpr, BN: tl.constexpr, DP: tl.constexpr,
    HAS_UNKNOWN: tl.constexpr, PREC: tl.constexpr,
):
    """dQ of the valid queries, plus dK/dV of unknown tokens (their only score is the self term)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    qcnt = tl.load(QCNT + b)
    start_m = pid_m * BM
    if start_m < qcnt:
        offs_m = start_m + tl.arange(0, BM)
        mrow = offs_m < qcnt
        qi = tl.load(QIDX + b * L + offs_m, mask=mrow, other=0).to(tl.int64)
        offs_d = tl.arange(0, DP)
        dmask = offs_d < D
        q_mask = mrow[:, None] & dmask[None, :]
        q = tl.load(Q + b * sqb + h * sqh + qi[:, None] * sql + offs_d[None, :] * sqd, mask=q_mask, other=0.0)
        do = tl.load(DO + b * sgb + h * sgh + qi[:, None] * sgl + offs_d[None, :] * sgd, mask=q_mask, other=0.0)
        lse = tl.load(LSE + bh * L + qi, mask=mrow, other=0.0)
        delta = tl.load(DELTA + bh * L + qi, mask=mrow, other=0.0)
        kbase = K + b * skb + h * skh
        vbase = V + b * svb + h * svh
        dq = tl.zeros([BM, DP], tl.float32)
        kcnt = tl.load(KCNT + b)
        for start_n in range(0, kcnt, BN):
            offs_n = start_n + tl.arange(0, BN)
            ncol = offs_n < kcnt
            kj = tl.load(KIDX + b * L + offs_n, mask=ncol, other=0).to(tl.int64)
            kv_mask = ncol[:, None] & dmask[None, :]
            k = tl.load(kbase + kj[:, None] * skl + offs_d[None, :] * skd, mask=kv_mask, other=0.0)
            v = tl.load(vbase + kj[:, None] * svl + offs_d[None, :] * svd, mask=kv_mask, other=0.0)
            s = _mm(q, tl.trans(k), PREC) * scale
            p = tl.where(mrow[:, None] & ncol[None, :], tl.exp(s - lse[:, None]), 0.0)
            dp = _mm(do, tl.trans(v), PREC)
            ds = p * (dp - delta[:, None])
            dq += _mm(ds.to(k.dtype), k, PREC)
        row = bh * L + qi
        ptrs = row[:, None] * D + offs_d[None, :]
        if HAS_UNKNOWN:
            unk = tl.load(UNK + b * L + qi, mask=mrow, other=0) != 0
            self_mask = unk[:, None] & dmask[None, :]
            ks = tl.load(kbase + qi[:, None] * skl + offs_d[None, :] * skd, mask=self_mask, other=0.0)
            vs = tl.load(vbase + qi[:, None] * svl + offs_d[None, :] * svd, mask=self_mask, other=0.0)
            ks = ks.to(tl.float32)
            qf = q.to(tl.float32)
            dof = do.to(tl.float32)
            s_self = tl.sum(qf * ks, 1) * scale
            p_self = tl.where(unk, tl.exp(s_self - lse), 0.0)
            ds_self = p_self * (tl.sum(dof * vs.to(tl.float32), 1) - delta)
            dq += ds_self[:, None] * ks
            tl.store(DK + ptrs, (scale * ds_self)[:, None] * qf, mask=self_mask)
            tl.store(DV + ptrs, p_self[:, None] * dof, mask=self_mask)
        tl.store(DQ + ptrs, dq * scale, mask=q_mask)


# ----------------------------------------------------------------------------- launchers


def _compact(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) bool -> (positions of the True entries first, in order, as int32 (B, L); counts (B,))."""
    order = torch.sort((~mask).to(torch.uint8), dim=1, stable=True).indices
    return order.to(torch.int32).contiguous(), mask.sum(1, dtype=torch.int32)


def _plan(q: torch.Tensor, kpm: Optional[torch.Tensor], known: Optional[torch.Tensor]):
    """Index lists of valid queries and of valid-and-known keys, and the valid-and-unknown flags."""
    B, _, L, _ = q.shape
    if kpm is None:
        valid = None
        qidx = torch.arange(L, dtype=torch.int32, device=q.device).expand(B, L).contiguous()
        qcnt = torch.full((B,), L, dtype=torch.int32, device=q.device)
    else:
        valid = ~kpm
        qidx, qcnt = _compact(valid)
    if known is None:
        return qidx, qcnt, qidx, qcnt, None
    allowed = known if valid is None else valid & known
    kidx, kcnt = _compact(allowed)
    unk = (~known if valid is None else valid & ~known).to(torch.uint8).contiguous()
    return qidx, qcnt, kidx, kcnt, unk


def _configs(dp: int, backward: bool) -> list[tuple[int, int, int, int]]:
    """(query tile, key tile, warps, stages), preferred first; smaller ones are the fallback when a
    GPU has too little shared memory. The interpreter runs numpy per tile: smallest legal tiles."""
    if triton_interpret():
        return [(16, 16, 1, 1)]
    if backward:
        big = [(64, 64, 4, 2)] if dp <= 64 else [(32, 32, 4, 2)]
    else:
        big = [(64, 64, 4, 3)] if dp <= 64 else [(64, 32, 4, 3)]
    return big + [(32, 32, 4, 1), (16, 16, 4, 1)]


_CHOSEN: dict = {}


def _launch(name: str, dp: int, t: torch.Tensor, backward: bool, run) -> None:
    """Calls ``run(BM, BN, warps, stages)`` with the first config t's GPU can hold, remembered."""
    key = (name, dp, t.dtype, t.device)
    if key in _CHOSEN:
        run(*_CHOSEN[key])
        return
    configs = _configs(dp, backward)
    for i, cfg in enumerate(configs):
        try:
            run(*cfg)
        except OutOfResources:
            if i == len(configs) - 1:
                raise
            continue
        _CHOSEN[key] = cfg
        return


def _device_of(t: torch.Tensor):
    """Triton launches on the current CUDA device: make it the tensors' one."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _head_pad(D: int) -> int:
    return max(16, triton.next_power_of_2(D))


def _prec(dtype: torch.dtype) -> str:
    # float32 inputs must not be rounded to TF32 in tl.dot: the op promises float32 accuracy.
    if dtype == torch.bfloat16 and triton_interpret():
        return "f32"
    return "ieee" if dtype == torch.float32 else "tf32"


def forward(q, k, v, key_padding_mask, known, scale):
    """Returns ``(out, lse)``: out (B, H, L, D) in q's dtype, contiguous; lse (B, H, L) float32."""
    B, H, L, D = q.shape
    qidx, qcnt, kidx, kcnt, unk = _plan(q, key_padding_mask, known)
    out = torch.zeros((B, H, L, D), dtype=q.dtype, device=q.device)
    lse = torch.full((B, H, L), float("-inf"), dtype=torch.float32, device=q.device)
    DP = _head_pad(D)

    def run(BM, BN, warps, stages):
        _fwd_kernel[(triton.cdiv(L, BM), B * H)](
            q, k, v, out, lse, qidx, qcnt, kidx, kcnt, qcnt if unk is None else unk,
            *q.stride(), *k.stride(), *v.stride(), H, L, D, float(scale),
            BM=BM, BN=BN, DP=DP, HAS_UNKNOWN=unk is not None, PREC=_prec(q.dtype),
            num_warps=warps, num_stages=stages,
        )

    with _device_of(q):
        _launch("fwd", DP, q, False, run)
    return out, lse


def backward(grad_out, q, k, v, out, lse, key_padding_mask, known, scale):
    """Returns ``(dq, dk, dv)``, (B, H, L, D) contiguous in q's dtype; zero rows at padding."""
    B, H, L, D = q.shape
    qidx, qcnt, kidx, kcnt, unk = _plan(q, key_padding_mask, known)
    lse = lse.contiguous()
    DP = _head_pad(D)
    delta = torch.zeros((B, H, L), dtype=torch.float32, device=q.device)
    BMD = 16 if triton_interpret() else 64
    with _device_of(q):
        _bwd_delta_kernel[(triton.cdiv(L, BMD), B * H)](
            out, grad_out, delta, qidx, qcnt, *out.stride(), *grad_out.stride(), H, L, D,
            BM=BMD, DP=DP, num_warps=1 if triton_interpret() else 4,
        )
    # Rows nobody writes (padding) stay zero.
    dq = torch.zeros((B, H, L, D), dtype=torch.float32, device=q.device)
    dk = torch.zeros_like(dq)
    dv = torch.zeros_like(dq)
    strides = (*q.stride(), *k.stride(), *v.stride(), *grad_out.stride())
    prec = _prec(q.dtype)

    def run_dkdv(BM, BN, warps, stages):
        _bwd_dkdv_kernel[(triton.cdiv(L, BN), B * H)](
            q, k, v, grad_out, lse, delta, dk, dv, qidx, qcnt, kidx, kcnt,
            *strides, H, L, D, float(scale), BM=BM, BN=BN, DP=DP, PREC=prec,
            num_warps=warps, num_stages=stages,
        )

    def run_dq(BM, BN, warps, stages):
        _bwd_dq_kernel[(triton.cdiv(L, BM), B * H)](
            q, k, v, grad_out, lse, delta, dq, dk, dv, qidx, qcnt, kidx, kcnt, qcnt if unk is None else unk,
            *strides, H, L, D, float(scale), BM=BM, BN=BN, DP=DP, HAS_UNKNOWN=unk is not None, PREC=prec,
            num_warps=warps, num_stages=stages,
        )

    # dk/dv rows of known keys come from the dK/dV kernel, those of unknown keys from the dQ kernel.
    with _device_of(q):
        _launch("dkdv", DP, q, True, run_dkdv)
        _launch("dq", DP, q, True, run_dq)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
