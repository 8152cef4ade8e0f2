"""Fused GroupNorm + affine + FiLM + SiLU for diffusion UNets (SPEC 1.3).

``y = act(GN(x) * weight + bias) `` with optional FiLM from the time embedding in between:
``act((GN(x) * weight + bias) * (1 + scale) + shift)``. One statistics pass and one apply pass
over x instead of the four or five an unfused ``F.group_norm`` -> FiLM -> ``F.silu`` chain makes,
and a backward that recomputes the activation instead of storing the intermediates.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from . import reference
from ._runtime import (
    DTYPE_CODES,
    KernelOp,
    _C,
    check_tensor,
    cuda_stream,
    has_triton_kernel,
    num_threads,
    on_device,
    triton_kernel,
)

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
ACTS = {"none": 0, "silu": 1}

# Memory-bound (two reads and one write of x): the SIMT CUDA kernel first on a GPU, no matrix product
# for tensor cores to take.
OP = KernelOp("group_norm_silu", gpu_order=("cuda", "triton", "torch"), triton_module="group_norm")


def _reasons_dtype(dtype: torch.dtype, **_) -> list[str]:
    return [] if dtype in _FLOATS else [f"supports float32, float16 and bfloat16, not {dtype}"]


OP.reasons["torch"] = lambda **_: []  # float64 too: gradcheck runs on the reference backend
if _C is not None and hasattr(_C, "group_norm_fwd_cpu"):
    OP.reasons["cpu"] = _reasons_dtype
if _C is not None and hasattr(_C, "group_norm_fwd_cuda"):
    OP.reasons["cuda"] = _reasons_dtype


if has_triton_kernel("group_norm"):
    OP.reasons["triton"] = _reasons_dtype


# ----------------------------------------------------------------------------- memory layout


def channels_last_layout(x: torch.Tensor) -> bool:
    """True if x (B, C, *spatial) is stored channels-last (channel stride 1), not NCHW-contiguous."""
    if x.is_contiguous():
        return False
    if x.dim() == 4:
        return x.is_contiguous(memory_format=torch.channels_last)
    return x.dim() == 3 and x.transpose(1, 2).is_contiguous()


def layout_strides(x: torch.Tensor, channels_last: bool) -> tuple[int, int, int]:
    """(batch, channel, flattened-spatial) element strides of a tensor in the given dense layout."""
    C = x.shape[1]
    S = math.prod(x.shape[2:])
    return (S * C, 1, C) if channels_last else (C * S, S, 1)


def empty_in_layout(x: torch.Tensor, channels_last: bool, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    dtype = x.dtype if dtype is None else dtype
    if not channels_last:
        return torch.empty(x.shape, dtype=dtype, device=x.device)
    if x.dim() == 4:
        return torch.empty(x.shape, dtype=dtype, device=x.device, memory_format=torch.channels_last)
    B, C, N = x.shape
    return torch.empty((B, N, C), dtype=dtype, device=x.device).transpose(1, 2)


def to_layout(t: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """t in exactly the dense layout the kernels index with (copies only if it is not already)."""
    if channels_last_layout(t) == channels_last and (channels_last or t.is_contiguous()):
        return t
    out = empty_in_layout(t, channels_last)
    out.copy_(t)
    return out


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    return reference._lse_dtype(dtype)


def _f32(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.detach().to(torch.float32).contiguous()


def _ptr(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


# ----------------------------------------------------------------------------- per-backend kernels


def _fwd_native(x, weight, bias, scale, shift, G, eps, act, device_kind):
    cl = channels_last_layout(x)
    x = to_layout(x, cl)
    B, C = x.shape[:2]
    S = math.prod(x.shape[2:])
    y = empty_in_layout(x, cl)
    mean = torch.empty((B, G), dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    w, b, sc, sh = _f32(weight), _f32(bias), _f32(scale), _f32(shift)
    args = (DTYPE_CODES[x.dtype], x.data_ptr(), w.data_ptr(), b.data_ptr(), _ptr(sc), _ptr(sh),
            y.data_ptr(), mean.data_ptr(), rstd.data_ptr(), B, C, S, G, int(cl), float(eps), ACTS[act])
    if device_kind == "cpu":
        _C.group_norm_fwd_cpu(*args, num_threads())
    else:
        _C.group_norm_fwd_cuda(*args, cuda_stream(x))
    return y, mean, rstd


def _bwd_native(grad_y, x, weight, bias, scale, shift, mean, rstd, G, act, device_kind):
    cl = channels_last_layout(x)
    x = to_layout(x, cl)
    grad_y = to_layout(grad_y, cl)
    B, C = x.shape[:2]
    S = math.prod(x.shape[2:])
    dx = empty_in_layout(x, cl)
    # Per-(batch, channel) sums of dz and dz * xhat; the parameter grads are small reductions of these.
    sum_dz = torch.empty((B, C), dtype=torch.float32, device=x.device)
    sum_dzx = torch.empty_like(sum_dz)
    w, b, sc, sh = _f32(weight), _f32(bias), _f32(scale), _f32(shift)
    args = (DTYPE_CODES[x.dtype], grad_y.data_ptr(), x.data_ptr(), w.data_ptr(), b.data_ptr(), _ptr(sc),
            _ptr(sh), mean.contiguous().data_ptr(), rstd.contiguous().data_ptr(), dx.data_ptr(),
            sum_dz.data_ptr(), sum_dzx.data_ptr(), B, C, S, G, int(cl), ACTS[act])
    if device_kind == "cpu":
        _C.group_norm_bwd_cpu(*args, num_threads())
    else:
        _C.group_norm_bwd_cuda(*args, cuda_stream(x))
    return (dx, *param_grads(sum_dz, sum_dzx, w, b, sc))


def param_grads(sum_dz, sum_dzx, w, b, scale):
    """(dweight, dbias, dscale, dshift) from the per-(batch, channel) sums of dz and dz * xhat.

    Summed over the batch here, in a fixed order, so every backend is deterministic.
    """
    f = 1.0 if scale is None else 1.0 + scale
    dweight = (f * sum_dzx).sum(0)
    dbias = (f * sum_dz).sum(0)
    dscale = w * sum_dzx + b * sum_dz
    return dweight, dbias, dscale, sum_dz


def _run_fwd(backend, x, weight, bias, scale, shift, G, eps, act):
    if backend == "torch":
        return reference.group_norm_silu_ref(x, G, weight, bias, scale, shift, eps, act)
    if backend == "triton":
        return triton_kernel("group_norm").forward(x, weight, bias, scale, shift, G, eps, act)
    return _fwd_native(x, weight, bias, scale, shift, G, eps, act, backend)


def _run_bwd(backend, grad_y, x, weight, bias, scale, shift, mean, rstd, G, act):
    if backend == "torch":
        return reference.group_norm_silu_bwd_ref(grad_y, x, G, weight, bias, scale, shift, mean, rstd, act)
    if backend == "triton":
        return triton_kernel("group_norm").backward(grad_y, x, weight, bias, scale, shift, mean, rstd, G, act)
    return _bwd_native(grad_y, x, weight, bias, scale, shift, mean, rstd, G, act, backend)


# ------------------------------------------------------------------------------ custom ops


@torch.library.custom_op("biogen::group_norm_silu_fwd", mutates_args=())
def _fwd_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    scale: Optional[torch.Tensor],
    shift: Optional[torch.Tensor],
    num_groups: int,
    eps: float,
    act: str,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    with on_device(x):
        y, mean, rstd = _run_fwd(backend, x, weight, bias, scale, shift, num_groups, eps, act)
    return y, mean.to(_stat_dtype(x.dtype)), rstd.to(_stat_dtype(x.dtype))


@_fwd_op.register_fake
def _(x, weight, bias, scale, shift, num_groups, eps, act, backend):
    B = x.shape[0]
    st = _stat_dtype(x.dtype)
    return (empty_in_layout(x, channels_last_layout(x)), x.new_empty((B, num_groups), dtype=st),
            x.new_empty((B, num_groups), dtype=st))


@torch.library.custom_op("biogen::group_norm_silu_bwd", mutates_args=())
def _bwd_op(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    scale: Optional[torch.Tensor],
    shift: Optional[torch.Tensor],
    mean: torch.Tensor,
    rstd: torch.Tensor,
    num_groups: int,
    act: str,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    with on_device(x):
        dx, dw, db, dsc, dsh = _run_bwd(backend, grad_y, x, weight, bias, scale, shift, mean, rstd, num_groups,
                                        act)
    st = _stat_dtype(x.dtype)
    return dx, dw.to(st), db.to(st), dsc.to(st), dsh.to(st)


@_bwd_op.register_fake
def _(grad_y, x, weight, bias, scale, shift, mean, rstd, num_groups, act, backend):
    B, C = x.shape[:2]
    st = _stat_dtype(x.dtype)
    return (empty_in_layout(x, channels_last_layout(x)), x.new_empty((C,), dtype=st), x.new_empty((C,), dtype=st),
            x.new_empty((B, C), dtype=st), x.new_empty((B, C), dtype=st))


def _setup_context(ctx, inputs, output):
    x, weight, bias, scale, shift, G, eps, act, backend = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, scale, shift, mean, rstd)
    ctx.G, ctx.act, ctx.backend = G, act, backend
    ctx.mark_non_differentiable(mean, rstd)


def _backward(ctx, grad_y, grad_mean, grad_rstd):
    x, weight, bias, scale, shift, mean, rstd = ctx.saved_tensors
    dx, dw, db, dsc, dsh = _bwd_op(grad_y, x, weight, bias, scale, shift, mean, rstd, ctx.G, ctx.act, ctx.backend)
    return (
        dx,
        dw.to(weight.dtype),
        db.to(bias.dtype),
        None if scale is None else dsc.to(scale.dtype),
        None if shift is None else dsh.to(shift.dtype),
        None, None, None, None,
    )


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------ public API


def _check(x, num_groups, weight, bias, scale, shift, eps, act):
    check_tensor("x", x, dtypes=_FLOATS + (torch.float64,))
    if x.dim() not in (3, 4):
        raise ValueError(f"x must be (batch, channels, *spatial) with 3 or 4 dimensions, got shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"x has an empty dimension: shape {tuple(x.shape)}")
    B, C = x.shape[:2]
    if not isinstance(num_groups, int) or isinstance(num_groups, bool) or num_groups <= 0:
        raise ValueError(f"num_groups must be a positive int, got {num_groups!r}")
    if C % num_groups != 0:
        raise ValueError(f"channels ({C}) must be divisible by num_groups ({num_groups})")
    fl = _FLOATS + (torch.float64,)
    check_tensor("weight", weight, dtypes=fl, shape=(C,), device=x.device)
    check_tensor("bias", bias, dtypes=fl, shape=(C,), device=x.device)
    for name, t in (("scale", scale), ("shift", shift)):
        if t is not None:
            check_tensor(name, t, dtypes=fl, shape=(B, C), device=x.device)
    if act not in ACTS:
        raise ValueError(f"unknown act {act!r}; choose one of {', '.join(map(repr, ACTS))}")
    if not (eps > 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be positive and finite, got {eps}")


def group_norm_silu(
    x: torch.Tensor,
    num_groups: int,
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    *,
    scale: Optional[torch.Tensor] = None,
    shift: Optional[torch.Tensor] = None,
    eps: float = 1e-5,
    act: str = "silu",
    backend: Optional[str] = None,
) -> torch.Tensor:
    """GroupNorm, affine, optional FiLM and SiLU in one fused pass.

    ``y = act((GN(x) * weight + bias) * (1 + scale) + shift)``, GN over each (batch, group) block
    of ``channels / num_groups`` channels x all spatial positions, biased variance, statistics in
    float32 — the same as ``F.silu(F.group_norm(x, G, weight, bias, eps) * (1 + scale) + shift)``.

    Parameters
    ----------
    x : (batch, channels, height, width) or (batch, channels, length); float32, float16 or
        bfloat16 (float64 on the torch backend); NCHW-contiguous or channels-last (other strides
        are copied to NCHW first).
    num_groups : number of groups; must divide ``channels``.
    weight, bias : (channels,) affine parameters; None means ones / zeros.
    scale, shift : (batch, channels) FiLM from the time embedding, optional (each independently).
    eps : added to the variance.
    act : 'silu' or 'none'.
    backend : 'cuda', 'triton', 'cpu', 'torch' or 'auto'; see :mod:`biogen.ops`.

    Returns
    -------
    Tensor of x's shape, dtype and memory format. Differentiable in x, weight, bias, scale, shift.
    """
    if weight is None and isinstance(x, torch.Tensor) and x.dim() >= 2:
        weight = torch.ones(x.shape[1], dtype=_stat_dtype(x.dtype), device=x.device)
    if bias is None and isinstance(x, torch.Tensor) and x.dim() >= 2:
        bias = torch.zeros(x.shape[1], dtype=_stat_dtype(x.dtype), device=x.device)
    _check(x, num_groups, weight, bias, scale, shift, eps, act)
    chosen = OP.select(backend, x.device, dtype=x.dtype)
    y, _, _ = _fwd_op(x, weight, bias, scale, shift, num_groups, float(eps), act, chosen)
    return y
