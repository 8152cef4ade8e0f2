"""Triton group_norm_silu: one program per (batch, group), stats then apply (forward) or sums then dx
(backward), looping over the group's channels and spatial blocks. Strided indexing, so one kernel
serves NCHW and channels-last. Statistics are shifted sums in float32 lanes (shift = the group's
first value), reduced once per channel.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..group_norm import ACTS, channels_last_layout, empty_in_layout, layout_strides, param_grads, to_layout
from ._common import REDUCTION_SMEM, Config, arch_of, device_guard, launch, plan

BLOCK = 256


@triton.jit
def _silu_and_grad(z):
    sig = 1.0 / (1.0 + tl.exp(-z))
    return z * sig, sig * (1.0 + z * (1.0 - sig))


@triton.jit
def _fwd_kernel(x_ptr, w_ptr, b_ptr, sc_ptr, sh_ptr, y_ptr, mean_ptr, rstd_ptr,
                C, S, G, CPG, sB, sC, sS, eps,
                HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, ACT: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // G
    g = pid % G
    base = b.to(tl.int64) * sB
    offs = tl.arange(0, BLOCK)
    K = tl.load(x_ptr + base + (g * CPG).to(tl.int64) * sC).to(tl.float32)
    a1 = tl.zeros([BLOCK], dtype=tl.float32)
    a2 = tl.zeros([BLOCK], dtype=tl.float32)
    for c in range(0, CPG):
        row = base + (g * CPG + c).to(tl.int64) * sC
        for s0 in range(0, S, BLOCK):
            s = s0 + offs
            msk = s < S
            v = tl.load(x_ptr + row + s.to(tl.int64) * sS, mask=msk, other=0.0).to(tl.float32)
            d = tl.where(msk, v - K, 0.0)
            a1 += d
            a2 += d * d
    n = (CPG * S).to(tl.float32)
    m1 = tl.sum(a1, axis=0) / n
    var = tl.maximum(tl.sum(a2, axis=0) / n - m1 * m1, 0.0)
    mean = K + m1
    rstd = 1.0 / tl.sqrt(var + eps)
    tl.store(mean_ptr + pid, mean)
    tl.store(rstd_ptr + pid, rstd)
    for c in range(0, CPG):
        ch = g * CPG + c
        ws = tl.load(w_ptr + ch) * rstd
        f = 1.0
        t = 0.0
        if HAS_SCALE:
            f = 1.0 + tl.load(sc_ptr + b * C + ch)
        if HAS_SHIFT:
            t = tl.load(sh_ptr + b * C + ch)
        A = ws * f
        Bc = (tl.load(b_ptr + ch) - mean * ws) * f + t
        row = base + ch.to(tl.int64) * sC
        for s0 in range(0, S, BLOCK):
            s = s0 + offs
            msk = s < S
            ptr = row + s.to(tl.int64) * sS
            z = tl.load(x_ptr + ptr, mask=msk, other=0.0).to(tl.float32) * A + Bc
            if ACT == 1:
                z, _ = _silu_and_grad(z)
            tl.store(y_ptr + ptr, z.to(y_ptr.dtype.element_ty), mask=msk)


@triton.jit
def _bwd_kernel(dy_ptr, x_ptr, w_ptr, b_ptr, sc_ptr, sh_ptr, mean_ptr, rstd_ptr, dx_ptr, sdz_ptr, sdzx_ptr,
                C, S, G, CPG, sB, sC, sS,
                HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, ACT: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // G
    g = pid % G
    base = b.to(tl.int64) * sB
    offs = tl.arange(0, BLOCK)
    mean = tl.load(mean_ptr + pid)
    rstd = tl.load(rstd_ptr + pid)
    G1 = 0.0
    G2 = 0.0
    for c in range(0, CPG):
        ch = g * CPG + c
        w = tl.load(w_ptr + ch)
        f = 1.0
        t = 0.0
        if HAS_SCALE:
            f = 1.0 + tl.load(sc_ptr + b * C + ch)
        if HAS_SHIFT:
            t = tl.load(sh_ptr + b * C + ch)
        A = w * rstd * f
        Bc = (tl.load(b_ptr + ch) - mean * w * rstd) * f + t
        row = base + ch.to(tl.int64) * sC
        a1 = tl.zeros([BLOCK], dtype=tl.float32)
        a2 = tl.zeros([BLOCK], dtype=tl.float32)
        for s0 in range(0, S, BLOCK):
            s = s0 + offs
            msk = s < S
            ptr = row + s.to(tl.int64) * sS
            xv = tl.load(x_ptr + ptr, mask=msk, other=0.0).to(tl.float32)
            dz = tl.load(dy_ptr + ptr, mask=msk, other=0.0).to(tl.float32)
            if ACT == 1:
                _, dact = _silu_and_grad(xv * A + Bc)
                dz = dz * dact
            a1 += dz
            a2 += dz * (xv - mean) * rstd
        s1 = tl.sum(a1, axis=0)
        s2 = tl.sum(a2, axis=0)
        tl.store(sdz_ptr + b * C + ch, s1)
        tl.store(sdzx_ptr + b * C + ch, s2)
        G1 += f * w * s1
        G2 += f * w * s2
    n = (CPG * S).to(tl.float32)
    Q = -rstd * rstd * G2 / n
    R = -rstd * G1 / n
    for c in range(0, CPG):
        ch = g * CPG + c
        w = tl.load(w_ptr + ch)
        f = 1.0
        t = 0.0
        if HAS_SCALE:
            f = 1.0 + tl.load(sc_ptr + b * C + ch)
        if HAS_SHIFT:
            t = tl.load(sh_ptr + b * C + ch)
        A = w * rstd * f
        Bc = (tl.load(b_ptr + ch) - mean * w * rstd) * f + t
        P = rstd * f * w
        row = base + ch.to(tl.int64) * sC
        for s0 in range(0, S, BLOCK):
            s = s0 + offs
            msk = s < S
            ptr = row + s.to(tl.int64) * sS
            xv = tl.load(x_ptr + ptr, mask=msk, other=0.0).to(tl.float32)
            dz = tl.load(dy_ptr + ptr, mask=msk, other=0.0).to(tl.float32)
            if ACT == 1:
                _, dact = _silu_and_grad(xv * A + Bc)
                dz = dz * dact
            dx = dz * P + (xv - mean) * Q + R
            tl.store(dx_ptr + ptr, dx.to(dx_ptr.dtype.element_ty), mask=msk)


def _f32(t):
    return None if t is None else t.detach().to(torch.float32).contiguous()


def _block(S: int) -> int:
    return max(16, min(BLOCK, triton.next_power_of_2(S)))


def _plan(x, name):
    # memory-bound, no tl.dot: one config, no shared memory beyond the reductions' scratch
    return plan(f"group_norm {name}", arch_of(x.device), [Config.of(4, 1)], lambda c: REDUCTION_SMEM)


def forward(x, weight, bias, scale, shift, G, eps, act):
    cl = channels_last_layout(x)
    x = to_layout(x, cl)
    B, C = x.shape[:2]
    S = math.prod(x.shape[2:])
    sB, sC, sS = layout_strides(x, cl)
    y = empty_in_layout(x, cl)
    mean = torch.empty((B, G), dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    w, b, sc, sh = _f32(weight), _f32(bias), _f32(scale), _f32(shift)
    with device_guard(x):
        launch(_fwd_kernel, (B * G,), (x, w, b, w if sc is None else sc, w if sh is None else sh, y, mean, rstd,
                                       C, S, G, C // G, sB, sC, sS, float(eps)),
               dict(HAS_SCALE=sc is not None, HAS_SHIFT=sh is not None, ACT=ACTS[act], BLOCK=_block(S)),
               _plan(x, "fwd"))
    return y, mean, rstd


def backward(grad_y, x, weight, bias, scale, shift, mean, rstd, G, act):
    cl = channels_last_layout(x)
    x = to_layout(x, cl)
    grad_y = to_layout(grad_y, cl)
    B, C = x.shape[:2]
    S = math.prod(x.shape[2:])
    sB, sC, sS = layout_strides(x, cl)
    dx = empty_in_layout(x, cl)
    sdz = torch.empty((B, C), dtype=torch.float32, device=x.device)
    sdzx = torch.empty_like(sdz)
    w, b, sc, sh = _f32(weight), _f32(bias), _f32(scale), _f32(shift)
    with device_guard(x):
        launch(_bwd_kernel, (B * G,), (grad_y, x, w, b, w if sc is None else sc, w if sh is None else sh,
                                       mean.float().contiguous(), rstd.float().contiguous(), dx, sdz, sdzx,
                                       C, S, G, C // G, sB, sC, sS),
               dict(HAS_SCALE=sc is not None, HAS_SHIFT=sh is not None, ACT=ACTS[act], BLOCK=_block(S)),
               _plan(x, "bwd"))
    return (dx, *param_grads(sdz, sdzx, w, b, sc))
