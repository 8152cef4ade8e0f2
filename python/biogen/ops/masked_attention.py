"""Masked gene attention (scGPT): padding and the generative known/unknown mask, never as L x L.

Semantics (SPEC 1.1): query i attends key j iff j is not padding and (j is known or i == j).
Known queries see only known keys; an unknown query sees every known key and itself. With every
token known this is plain bidirectional attention with key padding. Padded query rows are zero.
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

MAX_HEAD_DIM = 128
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)

# On a GPU the tensor-core path first: the Triton kernel runs QK^T and PV as tl.dot (bf16/fp16 on
# tensor cores, fp32 accumulation); the CUDA kernel is SIMT fp32, kept as the fallback.
OP = KernelOp("masked_gene_attention", gpu_order=("triton", "cuda", "torch"), triton_module="masked_attention")


def _reasons_dtype_dim(dtype: torch.dtype, head_dim: int, **_) -> list[str]:
    r = []
    if dtype not in _FLOATS:
        r.append(f"supports float32, float16 and bfloat16, not {dtype}")
    if head_dim > MAX_HEAD_DIM:
        r.append(f"supports head dimension at most {MAX_HEAD_DIM}")
    return r


OP.reasons["torch"] = lambda **_: []  # float64 too: gradcheck runs on the reference backend
if _C is not None and hasattr(_C, "masked_attention_fwd_cpu"):
    OP.reasons["cpu"] = _reasons_dtype_dim
if _C is not None and hasattr(_C, "masked_attention_fwd_cuda"):
    OP.reasons["cuda"] = _reasons_dtype_dim


if has_triton_kernel("masked_attention"):
    OP.reasons["triton"] = _reasons_dtype_dim


# ----------------------------------------------------------------------------- per-backend kernels


def _masks_u8(kpm: Optional[torch.Tensor], known: Optional[torch.Tensor]):
    """Masks as contiguous uint8 views (bool is one byte), or None."""
    return (
        None if kpm is None else kpm.contiguous().view(torch.uint8),
        None if known is None else known.contiguous().view(torch.uint8),
    )


def _ptr(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _fwd_native(q, k, v, kpm, known, scale, device_kind):
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    B, H, L, D = q.shape
    out = torch.empty((B, H, L, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, L), dtype=torch.float32, device=q.device)
    pad_u8, known_u8 = _masks_u8(kpm, known)
    args = (
        DTYPE_CODES[q.dtype], q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), lse.data_ptr(),
        _ptr(pad_u8), _ptr(known_u8), B, H, L, D,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], float(scale),
    )
    if device_kind == "cpu":
        _C.masked_attention_fwd_cpu(*args, num_threads())
    else:
        _C.masked_attention_fwd_cuda(*args, cuda_stream(q))
    return out, lse


def _bwd_native(grad_out, q, k, v, out, lse, kpm, known, scale, device_kind):
    q, k, v, out, grad_out = (_last_dim_contiguous(t) for t in (q, k, v, out, grad_out))
    B, H, L, D = q.shape
    # Gradients accumulate in float32 and are cast once at the end.
    dq = torch.empty((B, H, L, D), dtype=torch.float32, device=q.device)
    dk = torch.empty_like(dq)
    dv = torch.empty_like(dq)
    pad_u8, known_u8 = _masks_u8(kpm, known)
    args = (
        DTYPE_CODES[q.dtype], q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(),
        grad_out.data_ptr(), lse.contiguous().data_ptr(), dq.data_ptr(), dk.data_ptr(), dv.data_ptr(),
        _ptr(pad_u8), _ptr(known_u8), B, H, L, D,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3], *grad_out.stride()[:3],
        float(scale),
    )
    if device_kind == "cpu":
        _C.masked_attention_bwd_cpu(*args, num_threads())
    else:
        _C.masked_attention_bwd_cuda(*args, cuda_stream(q))
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _fwd_torch(q, k, v, kpm, known, scale):
    return reference.masked_gene_attention_ref(q, k, v, kpm, known, scale)


def _bwd_torch(grad_out, q, k, v, out, lse, kpm, known, scale):
    return reference.masked_gene_attention_bwd_ref(grad_out, q, k, v, out, lse, kpm, known, scale)


def _run_fwd(backend, q, k, v, kpm, known, scale):
    if backend == "torch":
        return _fwd_torch(q, k, v, kpm, known, scale)
    if backend == "triton":
        return triton_kernel("masked_attention").forward(q, k, v, kpm, known, scale)
    return _fwd_native(q, k, v, kpm, known, scale, backend)


def _run_bwd(backend, grad_out, q, k, v, out, lse, kpm, known, scale):
    if backend == "torch":
        return _bwd_torch(grad_out, q, k, v, out, lse, kpm, known, scale)
    if backend == "triton":
        return triton_kernel("masked_attention").backward(grad_out, q, k, v, out, lse, kpm, known, scale)
    return _bwd_native(grad_out, q, k, v, out, lse, kpm, known, scale, backend)


# ------------------------------------------------------------------------------ custom ops


@torch.library.custom_op("biogen::masked_gene_attention_fwd", mutates_args=())
def _fwd_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: Optional[torch.Tensor],
    known: Optional[torch.Tensor],
    scale: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    with on_device(q):
        out, lse = _run_fwd(backend, q, k, v, key_padding_mask, known, scale)
    return out, lse


@_fwd_op.register_fake
def _(q, k, v, key_padding_mask, known, scale, backend):
    B, H, L, D = q.shape
    return q.new_empty((B, H, L, D)), q.new_empty((B, H, L), dtype=reference._lse_dtype(q.dtype))


@torch.library.custom_op("biogen::masked_gene_attention_bwd", mutates_args=())
def _bwd_op(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    key_padding_mask: Optional[torch.Tensor],
    known: Optional[torch.Tensor],
    scale: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    with on_device(q):
        dq, dk, dv = _run_bwd(backend, grad_out, q, k, v, out, lse, key_padding_mask, known, scale)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@_bwd_op.register_fake
def _(grad_out, q, k, v, out, lse, key_padding_mask, known, scale, backend):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, kpm, known, scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, kpm, known)
    ctx.scale, ctx.backend = scale, backend
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, kpm, known = ctx.saved_tensors
    dq, dk, dv = _bwd_op(grad_out.contiguous(), q, k, v, out, lse, kpm, known, ctx.scale, ctx.backend)
    return dq, dk, dv, None, None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------ public API


def _check(q, k, v, key_padding_mask, known):
    check_tensor("q", q, ndim=4, dtypes=_FLOATS + (torch.float64,))
    B, H, L, D = q.shape
    check_tensor("k", k, ndim=4, dtypes=(q.dtype,), shape=(B, H, L, D), device=q.device)
    check_tensor("v", v, ndim=4, dtypes=(q.dtype,), shape=(B, H, L, D), device=q.device)
    if D > MAX_HEAD_DIM:
        raise ValueError(f"masked_gene_attention supports head dimension at most {MAX_HEAD_DIM}, got {D}")
    if B == 0 or H == 0 or L == 0 or D == 0:
        raise ValueError(f"q has an empty dimension: shape {tuple(q.shape)}")
    for name, m in (("key_padding_mask", key_padding_mask), ("known", known)):
        if m is not None:
            check_tensor(name, m, ndim=2, dtypes=(torch.bool,), shape=(B, L), device=q.device)


def masked_gene_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    key_padding_mask: Optional[torch.Tensor] = None,
    known: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Attention over gene tokens with scGPT's padding and generative known/unknown mask.

    Parameters
    ----------
    q, k, v : (batch, heads, length, head_dim) float32 / float16 / bfloat16, head_dim <= 128.
    key_padding_mask : (batch, length) bool, True = padding (PyTorch's convention), optional.
    known : (batch, length) bool, True = known token (``<cls>`` and genes whose value is given);
        None means every token is known (plain bidirectional attention).
    scale : score scale, default ``head_dim ** -0.5``.
    backend : 'cuda', 'triton', 'cpu', 'torch' or 'auto'; see :mod:`biogen.ops`.

    Returns
    -------
    (batch, heads, length, head_dim) in q's dtype. Query i attends key j iff j is not padding and
    (j is known or i == j); padded query rows are zero, and no row is ever NaN.
    """
    _check(q, k, v, key_padding_mask, known)
    D = q.shape[-1]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    chosen = OP.select(backend, q.device, dtype=q.dtype, head_dim=D)
    out, _ = _fwd_op(q, k, v, key_padding_mask, known, scale, chosen)
    return out
