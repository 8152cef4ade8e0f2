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

from typing import Optional

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from ._common import (
    REDUCTION_SMEM, Arch, Config, KernelPlan, arch_of, device_guard,
    dot_precision, input_reasons, launch, mma, operand_dtype, plan,
)


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _fwd_kernel(
    Q, K, V, O, LSE, QIDX, QCNT, KIDX, KCNT, UNK,
    sqb, sqh, sql, sqd, skb, skh, skl, skd, svb, svh, svl, svd,
    H, L, D, NT, scale,
    BM: tl.constexpr, BN: tl.constexpr, DP: tl.constexpr,
    HAS_UNKNOWN: tl.constexpr, PREC: tl.constexpr, OPDT: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)  # (batch*head) x tiles on grid x: no 65,535 limit
    bh = pid // NT
    pid_m = (pid % NT).to(tl.int32)
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
            s = mma(q, tl.trans(k), PREC, OPDT) * scale
            s = tl.where(ncol[None, :], s, float("-inf"))
            # at least one column is in range, so m_new is finite
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + mma(p.to(v.dtype), v, PREC, OPDT)
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
    H, L, D, NT,
    BM: tl.constexpr, DP: tl.constexpr,
):
    """Delta_i = rowsum(dO_i * O_i) for the valid queries."""
    pid = tl.program_id(0).to(tl.int64)  # (batch*head) x tiles on grid x: no 65,535 limit
    bh = pid // NT
    pid_m = (pid % NT).to(tl.int32)
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
    H, L, D, NT, scale,
    BM: tl.constexpr, BN: tl.constexpr, DP: tl.constexpr, PREC: tl.constexpr, OPDT: tl.constexpr,
):
    """dK, dV of the known keys: one program per tile of the compacted known keys."""
    pid = tl.program_id(0).to(tl.int64)
    bh = pid // NT
    pid_n = (pid % NT).to(tl.int32)
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
            s = mma(q, tl.trans(k), PREC, OPDT) * scale
            p = tl.where(mrow[:, None] & ncol[None, :], tl.exp(s - lse[:, None]), 0.0)
            dv += mma(tl.trans(p.to(do.dtype)), do, PREC, OPDT)
            dp = mma(do, tl.trans(v), PREC, OPDT)
            ds = p * (dp - delta[:, None])
            dk += mma(tl.trans(ds.to(q.dtype)), q, PREC, OPDT)
        row = bh * L + kj
        ptrs = row[:, None] * D + offs_d[None, :]
        tl.store(DK + ptrs, dk * scale, mask=kv_mask)
        tl.store(DV + ptrs, dv, mask=kv_mask)


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, DK, DV, QIDX, QCNT, KIDX, KCNT, UNK,
    sqb, sqh, sql, sqd, skb, skh, skl, skd, svb, svh, svl, svd, sgb, sgh, sgl, sgd,
    H, L, D, NT, scale,
    BM: tl.constexpr, BN: tl.constexpr, DP: tl.constexpr,
    HAS_UNKNOWN: tl.constexpr, PREC: tl.constexpr, OPDT: tl.constexpr,
):
    """dQ of the valid queries, plus dK/dV of unknown tokens (their only score is the self term)."""
    pid = tl.program_id(0).to(tl.int64)  # (batch*head) x tiles on grid x: no 65,535 limit
    bh = pid // NT
    pid_m = (pid % NT).to(tl.int32)
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
            s = mma(q, tl.trans(k), PREC, OPDT) * scale
            p = tl.where(mrow[:, None] & ncol[None, :], tl.exp(s - lse[:, None]), 0.0)
            dp = mma(do, tl.trans(v), PREC, OPDT)
            ds = p * (dp - delta[:, None])
            dq += mma(ds.to(k.dtype), k, PREC, OPDT)
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




def _configs(kernel: str, dtype: torch.dtype, dp: int, arch: Arch) -> list[Config]:
    """Candidate (query tile BM, key tile BN, warps, stages), preferred first; the later ones are
    the fallback for GPUs with less shared memory. float32 tiles are smaller: a float32 tile holds
    twice the registers and 3xTF32 splits every operand in two (larger float32 tiles spill)."""
    if arch.interpreter:  # numpy per tile: the smallest legal tiles are the fastest
        return [Config.of(1, 1, BM=16, BN=16)]
    # Measured with tests/gpu_compile (sm_80 and sm_90): the first config of each row spills at
    # most a few bytes; (BM, BN, warps, stages) per (kernel, 16-bit?, head_dim <= 64?).
    best = {
        ("fwd", True, True): (64, 64, 4, 3), ("fwd", True, False): (64, 64, 8, 2),
        ("dkdv", True, True): (64, 64, 8, 2), ("dkdv", True, False): (32, 64, 8, 2),
        ("dq", True, True): (64, 64, 8, 2), ("dq", True, False): (64, 32, 8, 2),
        ("fwd", False, True): (32, 32, 4, 2), ("fwd", False, False): (16, 32, 4, 2),
        ("dkdv", False, True): (32, 32, 8, 1), ("dkdv", False, False): (32, 16, 8, 1),
        ("dq", False, True): (16, 32, 8, 1), ("dq", False, False): (16, 32, 8, 1),
    }[kernel, dtype != torch.float32, dp <= 64]
    big = [Config.of(best[2], best[3], BM=best[0], BN=best[1])]
    # float32 at 32 x 32 spills heavily at head_dim 128 (3xTF32 holds every operand twice)
    small = [Config.of(4, 1, BM=32, BN=32)] if dtype != torch.float32 else []
    return big + [c for c in small + [Config.of(4, 1, BM=16, BN=16)] if c != big[0]]


def _smem(kernel: str, dtype: torch.dtype, dp: int):
    """Estimated shared memory of a config: every tl.dot operand tile (streamed ones once per
    pipeline stage), twice over for float32 (3xTF32 keeps a high and a low part). An upper bound of
    what Triton allocates, checked against the compiled kernels in tests/gpu_compile."""
    e = 2 if dtype != torch.float32 else 8

    def est(c: Config) -> int:
        bm, bn, st = c["BM"], c["BN"], max(1, c.num_stages)
        # (rows, cols, streamed) of each dot operand
        ops = {"fwd": [(bm, dp, 0), (bn, dp, 1), (bm, bn, 0), (bn, dp, 1)],
               "dkdv": [(bm, dp, 1), (bn, dp, 0), (bn, bm, 0), (bm, dp, 1)] * 2,
               "dq": [(bm, dp, 0), (bn, dp, 1), (bm, dp, 0), (bn, dp, 1), (bm, bn, 0), (bn, dp, 1)]}[kernel]
        return e * sum(r * c_ * (st if streamed else 1) for r, c_, streamed in ops)

    return est


def plans(dtype: torch.dtype, head_dim: int, arch: Arch) -> dict[str, KernelPlan]:
    """The plan of each kernel (forward, dK/dV, dQ) for inputs of ``dtype`` and ``head_dim``."""
    dp = _head_pad(head_dim)
    return {k: plan(f"masked_attention {k}", arch, _configs(k, dtype, dp, arch), _smem(k, dtype, dp))
            for k in ("fwd", "dkdv", "dq")}


def unsupported_reasons(*, dtype: torch.dtype = torch.float32, head_dim: int = 64, device=None, **_) -> list[str]:
    """Why the Triton kernels cannot run these inputs on ``device`` (an empty list: they can).
    ``device``: a torch device, a compute capability or an :class:`Arch`."""
    r = input_reasons(dtype, head_dim)
    if r:
        return r
    return [p.reason() for p in plans(dtype, head_dim, arch_of(device)).values() if p.reason()]


_CHOSEN: dict = {}


def _launch(kernel, grid, args, consts, kplan: KernelPlan, device) -> None:
    # grid and args are functions of the config (the tile count depends on it)
    """Launch with the first fitting config; if the GPU still refuses it (the estimate was short),
    the next one. The config that ran is remembered per (kernel, constants, device)."""
    key = (kplan.kernel, kplan.arch, tuple(sorted(consts.items())), device)
    if key in _CHOSEN:
        launch(kernel, grid(_CHOSEN[key]), args(_CHOSEN[key]), consts, kplan, _CHOSEN[key])
        return
    fitting = kplan.fitting
    if not fitting:
        raise RuntimeError(kplan.reason())
    for i, cfg in enumerate(fitting):
        try:
            launch(kernel, grid(cfg), args(cfg), consts, kplan, cfg)
        except OutOfResources:
            if i == len(fitting) - 1:
                raise
            continue
        _CHOSEN[key] = cfg
        return


def _head_pad(D: int) -> int:
    return max(16, triton.next_power_of_2(D))


def _consts(q: torch.Tensor, arch: Arch, dp: int) -> dict:
    return dict(DP=dp, PREC=dot_precision(q.dtype, arch), OPDT=operand_dtype(q.dtype))


def forward(q, k, v, key_padding_mask, known, scale):
    """Returns ``(out, lse)``: out (B, H, L, D) in q's dtype, contiguous; lse (B, H, L) float32."""
    B, H, L, D = q.shape
    qidx, qcnt, kidx, kcnt, unk = _plan(q, key_padding_mask, known)
    out = torch.zeros((B, H, L, D), dtype=q.dtype, device=q.device)
    lse = torch.full((B, H, L), float("-inf"), dtype=torch.float32, device=q.device)
    DP = _head_pad(D)
    arch = arch_of(q.device)
    p = plans(q.dtype, D, arch)["fwd"]
    consts = dict(_consts(q, arch, DP), HAS_UNKNOWN=unk is not None)
    with device_guard(q):
        _launch(_fwd_kernel, lambda c: (B * H * triton.cdiv(L, c["BM"]),),
                lambda c: (q, k, v, out, lse, qidx, qcnt, kidx, kcnt, qcnt if unk is None else unk,
                           *q.stride(), *k.stride(), *v.stride(), H, L, D, triton.cdiv(L, c["BM"]), float(scale)),
                consts, p, q.device)
    return out, lse


def backward(grad_out, q, k, v, out, lse, key_padding_mask, known, scale):
    """Returns ``(dq, dk, dv)``, (B, H, L, D) contiguous in q's dtype; zero rows at padding."""
    B, H, L, D = q.shape
    qidx, qcnt, kidx, kcnt, unk = _plan(q, key_padding_mask, known)
    lse = lse.contiguous()
    DP = _head_pad(D)
    arch = arch_of(q.device)
    ps = plans(q.dtype, D, arch)
    delta = torch.zeros((B, H, L), dtype=torch.float32, device=q.device)
    dplan = plan("masked_attention delta", arch,
                 [Config.of(1, 1, BM=16)] if arch.interpreter else [Config.of(4, 1, BM=64)], lambda c: REDUCTION_SMEM)
    nt = triton.cdiv(L, dplan.require()["BM"])
    # Rows nobody writes (padding) stay zero.
    dq = torch.zeros((B, H, L, D), dtype=torch.float32, device=q.device)
    dk = torch.zeros_like(dq)
    dv = torch.zeros_like(dq)
    strides = (*q.stride(), *k.stride(), *v.stride(), *grad_out.stride())
    consts = _consts(q, arch, DP)
    with device_guard(q):
        launch(_bwd_delta_kernel, (B * H * nt,),
               (out, grad_out, delta, qidx, qcnt, *out.stride(), *grad_out.stride(), H, L, D, nt), dict(DP=DP), dplan)
        # dk/dv rows of known keys come from the dK/dV kernel, those of unknown keys from the dQ kernel.
        _launch(_bwd_dkdv_kernel, lambda c: (B * H * triton.cdiv(L, c["BN"]),),
                lambda c: (q, k, v, grad_out, lse, delta, dk, dv, qidx, qcnt, kidx, kcnt,
                           *strides, H, L, D, triton.cdiv(L, c["BN"]), float(scale)),
                consts, ps["dkdv"], q.device)
        _launch(_bwd_dq_kernel, lambda c: (B * H * triton.cdiv(L, c["BM"]),),
                lambda c: (q, k, v, grad_out, lse, delta, dq, dk, dv, qidx, qcnt, kidx, kcnt,
                           qcnt if unk is None else unk, *strides, H, L, D, triton.cdiv(L, c["BM"]), float(scale)),
                dict(consts, HAS_UNKNOWN=unk is not None), ps["dq"], q.device)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
