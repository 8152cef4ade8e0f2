"""Performer FAVOR+ linear attention (scBERT), fused: phi(K) and phi(Q) are never stored whole.

Semantics (SPEC 1.2) are those of performer-pytorch's ``FastAttention`` for the same projection
matrix W (nb_features x head_dim), with key padding added:

- data scaled by s = head_dim^-0.25; softmax kernel
  phi(x) = m^-0.5 * (exp(s x.W_f - s^2 |x|^2 / 2 - c) + eps), c the query row max (over features) or
  the key max over all valid keys and features of one (batch, head), both treated as constants;
- relu kernel (performer-pytorch's ``generalized_attention``): phi(x) = relu(s x.W_f) + eps;
- non-causal out_i = phi(q_i) (sum_j phi(k_j) v_j^T) / (phi(q_i) . sum_j phi(k_j)); causal sums run
  over j <= i and the denominator gets performer-pytorch's 1e-6 added to each prefix sum;
- padded keys contribute nothing (and do not enter the key stabiliser); padded query rows are 0.

Autograd gives gradients for q, k and v, never for ``projection`` (a random, redrawn buffer in
Performer; see :class:`biogen.nn.PerformerAttention`).
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
KERNELS = ("softmax", "relu")
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)

# On a GPU the tensor-core path first (Triton tl.dot for the feature maps and the state / query
# products); the CUDA kernels are SIMT fp32, kept as the fallback.
OP = KernelOp("performer_attention", gpu_order=("triton", "cuda", "torch"), triton_module="performer")


def _reasons_dtype_dim(dtype: torch.dtype = torch.float32, head_dim: int = 64, **_) -> list[str]:
    r = []
    if dtype not in _FLOATS:
        r.append(f"supports float32, float16 and bfloat16, not {dtype}")
    if head_dim > MAX_HEAD_DIM:
        r.append(f"supports head dimension at most {MAX_HEAD_DIM}")
    return r


# The Triton causal sweep keeps its prefix state (nb_features x head_dim, float32) in one program's
# registers: past this it would spill or run out of shared memory.
TRITON_CAUSAL_MAX_FEATURES = 256


def _reasons_triton(dtype: torch.dtype = torch.float32, head_dim: int = 64, causal: bool = False,
                    nb_features: int = 0, **_) -> list[str]:
    r = _reasons_dtype_dim(dtype, head_dim)
    if causal and nb_features > TRITON_CAUSAL_MAX_FEATURES:
        r.append(f"supports causal=True with at most {TRITON_CAUSAL_MAX_FEATURES} random features "
                 f"(nb_features={nb_features})")
    return r


# The CUDA causal kernel keeps one chunk's inputs and features (6 D + 4 m + 6 floats a row, at least
# one row) in 46 KB of shared memory (csrc/cuda/performer.cu, causal_chunk).
_CUDA_CAUSAL_SMEM = 46 * 1024


# The non-causal CUDA kernels keep two rows of 128 floats and two of nb_features floats in dynamic
# shared memory (opting in past 48 KB), plus ~2 KB of static reduction buffers, within 99 KB per
# block: the smallest opt-in limit of the architectures the build runs on (sm_86 / sm_89 / sm_120).
_CUDA_SMEM_PER_BLOCK = 101376
_CUDA_MAX_FEATURES = (_CUDA_SMEM_PER_BLOCK - 2048 - 4 * 2 * 128) // (4 * 2)


def _reasons_cuda(dtype: torch.dtype = torch.float32, head_dim: int = 64, causal: bool = False,
                  nb_features: int = 0, **_) -> list[str]:
    r = _reasons_dtype_dim(dtype, head_dim)
    if not causal and nb_features > _CUDA_MAX_FEATURES:
        r.append(f"supports at most {_CUDA_MAX_FEATURES} random features (99 KB of shared memory per block; "
                 f"nb_features={nb_features})")
    if causal and 4 * (6 * head_dim + 4 * nb_features + 6) > _CUDA_CAUSAL_SMEM:
        r.append(f"supports causal=True with at most {(_CUDA_CAUSAL_SMEM // 4 - 6 * head_dim - 6) // 4} random "
                 f"features at head_dim {head_dim} (nb_features={nb_features})")
    return r


OP.reasons["torch"] = lambda **_: []  # float64 too: gradcheck runs on the reference backend
if _C is not None and hasattr(_C, "performer_fwd_cpu"):
    OP.reasons["cpu"] = _reasons_dtype_dim
if _C is not None and hasattr(_C, "performer_fwd_cuda"):
    OP.reasons["cuda"] = _reasons_cuda


# ----------------------------------------------------------------------------- random features


def gaussian_orthogonal_random_matrix(
    nb_features: int,
    dim: int,
    *,
    scaling: int = 0,
    generator: Optional[torch.Generator] = None,
    device: Optional[torch.device] = None,
    dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """FAVOR+ projection: blocks of ``dim`` orthonormal rows (QR of gaussian matrices), rescaled.

    Returns (nb_features, dim). Rows within one block of ``dim`` rows are orthogonal. ``scaling=0``:
    each row's norm is that of an independent gaussian vector in R^dim (chi distributed), so rows are
    marginally gaussian; ``scaling=1``: every row has norm sqrt(dim). Drawn on the CPU in float64
    from ``generator`` (reproducible), then moved to ``device`` / ``dtype`` (default float32).
    """
    if nb_features < 1 or dim < 1:
        raise ValueError(f"nb_features and dim must be positive, got {nb_features} and {dim}")
    if scaling not in (0, 1):
        raise ValueError(f"scaling must be 0 or 1, got {scaling!r}")
    blocks = []
    for _ in range(math.ceil(nb_features / dim)):
        g = torch.randn(dim, dim, generator=generator, dtype=torch.float64)
        qmat, r = torch.linalg.qr(g)
        # sign fix makes the distribution Haar (QR alone is biased by LAPACK's sign convention)
        qmat = qmat * torch.sign(torch.diagonal(r))[None, :]
        blocks.append(qmat.t())
    w = torch.cat(blocks)[:nb_features]
    if scaling == 0:
        norms = torch.randn(nb_features, dim, generator=generator, dtype=torch.float64).norm(dim=1)
    else:
        norms = torch.full((nb_features,), math.sqrt(dim), dtype=torch.float64)
    return (norms[:, None] * w).to(device=device, dtype=dtype or torch.float32)


# ----------------------------------------------------------------------------- per-backend kernels


if has_triton_kernel("performer"):
    OP.reasons["triton"] = _reasons_triton


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _pad_u8(kpm: Optional[torch.Tensor]) -> int:
    return 0 if kpm is None else kpm.data_ptr()


def _rows_finite(t: torch.Tensor) -> torch.Tensor:
    """(batch, heads, length) True where a row of t has no NaN / infinity: one reduction pass and no
    full-size temporary (the check runs on every call, on tensors of millions of values). A row sum
    is non-finite iff a value is (bar overflow: float16 uses max and min instead)."""
    if t.dtype == torch.float16:
        return torch.isfinite(t.amax(-1)) & torch.isfinite(t.amin(-1))
    return torch.isfinite(t.sum(-1))


def _check_finite(q, k, v, projection, kpm):
    """Non-finite values in valid positions would poison a whole (batch, head) through the key sums;
    refuse them with a clear error instead (padding may hold anything)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        ok = _rows_finite(t)
        if kpm is not None:
            ok = ok | kpm[:, None, :]
        if not bool(ok.all()):
            raise ValueError(f"performer_attention: {name} contains NaN or infinity outside the padding")
    if not bool(torch.isfinite(projection).all()):
        raise ValueError("performer_attention: projection contains NaN or infinity")


def _cuda_flags(relu, causal):
    """csrc/cuda/performer.cu takes the kernel choices as one int: bit 0 relu, bit 1 causal."""
    return int(bool(relu)) | (int(bool(causal)) << 1)


def _fwd_native(q, k, v, projection, kpm, causal, relu, eps):
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    B, H, L, D = q.shape
    w = projection.detach().to(torch.float32).contiguous()
    out = torch.empty((B, H, L, D), dtype=q.dtype, device=q.device)
    ck = torch.empty((B, H), dtype=torch.float32, device=q.device)
    state = _empty_state(q.device, B, H, D, w.shape[0], "cuda" if q.device.type == "cuda" else "cpu", causal)
    kpm_u8 = None if kpm is None else kpm.contiguous().view(torch.uint8)
    if q.device.type == "cuda":
        m = w.shape[0]
        ws_c = torch.empty((B, H, m, D), dtype=torch.float32, device=q.device)
        ws_z = torch.empty((B, H, m), dtype=torch.float32, device=q.device)
        strides = [*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], 0, 0, 0, 0, 0, 0]
        _C.performer_fwd_cuda(DTYPE_CODES[q.dtype], q.data_ptr(), k.data_ptr(), v.data_ptr(), w.data_ptr(),
                              out.data_ptr(), ck.data_ptr(), _pad_u8(kpm_u8), ws_c.data_ptr(), ws_z.data_ptr(),
                              B, H, L, D, m, strides, _cuda_flags(relu, causal), float(eps), cuda_stream(q))
        return out, ck, state
    _C.performer_fwd_cpu(
        DTYPE_CODES[q.dtype], q.data_ptr(), k.data_ptr(), v.data_ptr(), w.data_ptr(), out.data_ptr(),
        ck.data_ptr(), state.data_ptr() if state.numel() else 0, _pad_u8(kpm_u8), B, H, L, D, w.shape[0], *q.stride()[:3], *k.stride()[:3],
        *v.stride()[:3], int(causal), int(relu), float(eps), num_threads(),
    )
    return out, ck, state


def _bwd_native(grad_out, q, k, v, projection, out, kpm, causal, relu, eps, state):
    q, k, v, out, grad_out = (_last_dim_contiguous(t) for t in (q, k, v, out, grad_out))
    B, H, L, D = q.shape
    w = projection.detach().to(torch.float32).contiguous()
    kpm_u8 = None if kpm is None else kpm.contiguous().view(torch.uint8)
    if q.device.type == "cuda":
        # Gradients accumulate in float32 and are cast once at the end.
        dq = torch.empty((B, H, L, D), dtype=torch.float32, device=q.device)
        dk, dv = torch.empty_like(dq), torch.empty_like(dq)
        m = w.shape[0]
        f32 = dict(dtype=torch.float32, device=q.device)
        ws = [torch.empty((B, H, m, D), **f32), torch.empty((B, H, m), **f32), torch.empty((B, H, m, D), **f32),
              torch.empty((B, H, m), **f32), torch.empty((B, H, L), **f32), torch.empty((B, H, L), **f32),
              torch.empty((B, H), **f32)]
        strides = [*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3], *grad_out.stride()[:3]]
        _C.performer_bwd_cuda(DTYPE_CODES[q.dtype], q.data_ptr(), k.data_ptr(), v.data_ptr(), w.data_ptr(),
                              out.data_ptr(), grad_out.data_ptr(), dq.data_ptr(), dk.data_ptr(), dv.data_ptr(),
                              _pad_u8(kpm_u8), *(t.data_ptr() for t in ws), B, H, L, D, m, strides,
                              _cuda_flags(relu, causal), float(eps), cuda_stream(q))
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
    # The C++ backward sums in float32 and writes each gradient row once, in the input dtype.
    dq, dk, dv = (torch.empty((B, H, L, D), dtype=q.dtype, device=q.device) for _ in range(3))
    _C.performer_bwd_cpu(
        DTYPE_CODES[q.dtype], q.data_ptr(), k.data_ptr(), v.data_ptr(), w.data_ptr(), out.data_ptr(),
        grad_out.data_ptr(), dq.data_ptr(), dk.data_ptr(), dv.data_ptr(), _pad_u8(kpm_u8),
        state.data_ptr() if state.numel() else 0, B, H, L, D,
        w.shape[0], *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
        *grad_out.stride()[:3], int(causal), int(relu), float(eps), num_threads(),
    )
    return dq, dk, dv


def _state_size(D: int, m: int) -> int:
    """Floats per (batch, head) of the key state the C++ forward keeps for its backward: C (Mp x Dp),
    z (Mp) and the stabiliser, with the kernel's padding (Dp: multiple of 16, Mp: of 32)."""
    dp, mp = -(-D // 16) * 16, -(-m // 32) * 32
    return mp * dp + mp + 1


def _empty_state(device, B, H, D, m, backend, causal) -> torch.Tensor:
    """The key state output: filled by the C++ non-causal forward, empty (nothing saved, the backward
    recomputes) for every other backend and for causal attention."""
    n = _state_size(D, m) if backend == "cpu" and not causal else 0
    return torch.empty((B, H, n) if n else (0,), dtype=torch.float32, device=device)


def _run_fwd(backend, q, k, v, projection, kpm, causal, relu, eps):
    if backend in ("torch", "triton"):
        if backend == "torch":
            out, ck = reference.performer_attention_ref(q, k, v, projection, kpm, causal,
                                                        "relu" if relu else "softmax", eps)
        else:
            out, ck = triton_kernel("performer").forward(q, k, v, projection, kpm, causal, relu, eps)
        return out, ck, _empty_state(q.device, *q.shape[:2], q.shape[3], projection.shape[0], backend, causal)
    return _fwd_native(q, k, v, projection, kpm, causal, relu, eps)


def _run_bwd(backend, grad_out, q, k, v, projection, out, kpm, causal, relu, eps, state):
    if backend == "torch":
        return reference.performer_attention_bwd_ref(grad_out, q, k, v, projection, kpm, causal,
                                                     "relu" if relu else "softmax", eps)
    if backend == "triton":
        return triton_kernel("performer").backward(grad_out, q, k, v, projection, out, kpm, causal, relu, eps)
    return _bwd_native(grad_out, q, k, v, projection, out, kpm, causal, relu, eps, state)


# ------------------------------------------------------------------------------ custom ops


@torch.library.custom_op("biogen::performer_attention_fwd", mutates_args=())
def _fwd_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    projection: torch.Tensor,
    key_padding_mask: Optional[torch.Tensor],
    causal: bool,
    relu: bool,
    eps: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (out, key_stabiliser (batch, heads) float32 (float64 for float64 inputs), key_state
    (see :func:`_empty_state`))."""
    _check_finite(q, k, v, projection, key_padding_mask)
    with on_device(q):
        return _run_fwd(backend, q, k, v, projection, key_padding_mask, causal, relu, eps)


@_fwd_op.register_fake
def _(q, k, v, projection, key_padding_mask, causal, relu, eps, backend):
    B, H, L, D = q.shape
    return (q.new_empty((B, H, L, D)), q.new_empty((B, H), dtype=reference._lse_dtype(q.dtype)),
            _empty_state(q.device, B, H, D, projection.shape[0], backend, causal))


@torch.library.custom_op("biogen::performer_attention_bwd", mutates_args=())
def _bwd_op(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    projection: torch.Tensor,
    out: torch.Tensor,
    key_state: torch.Tensor,
    key_padding_mask: Optional[torch.Tensor],
    causal: bool,
    relu: bool,
    eps: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    with on_device(q):
        dq, dk, dv = _run_bwd(backend, grad_out, q, k, v, projection, out, key_padding_mask, causal, relu, eps,
                              key_state)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@_bwd_op.register_fake
def _(grad_out, q, k, v, projection, out, key_state, key_padding_mask, causal, relu, eps, backend):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, projection, kpm, causal, relu, eps, backend = inputs
    out, ck, state = output
    ctx.save_for_backward(q, k, v, projection, out, state, kpm)
    ctx.causal, ctx.relu, ctx.eps, ctx.backend = causal, relu, eps, backend
    ctx.mark_non_differentiable(ck, state)


def _backward(ctx, grad_out, grad_ck, grad_state):
    q, k, v, projection, out, state, kpm = ctx.saved_tensors
    dq, dk, dv = _bwd_op(grad_out.contiguous(), q, k, v, projection, out, state, kpm, ctx.causal, ctx.relu,
                         ctx.eps, ctx.backend)
    # No gradient for the projection: it is a random feature draw, not a parameter.
    return dq, dk, dv, None, None, None, None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------ public API


def _check(q, k, v, projection, key_padding_mask, kernel, eps):
    check_tensor("q", q, ndim=4, dtypes=_FLOATS + (torch.float64,))
    B, H, L, D = q.shape
    check_tensor("k", k, ndim=4, dtypes=(q.dtype,), shape=(B, H, L, D), device=q.device)
    check_tensor("v", v, ndim=4, dtypes=(q.dtype,), shape=(B, H, L, D), device=q.device)
    check_tensor("projection", projection, ndim=2, dtypes=_FLOATS + (torch.float64,), shape=(None, D),
                 device=q.device)
    if D > MAX_HEAD_DIM:
        raise ValueError(f"performer_attention supports head dimension at most {MAX_HEAD_DIM}, got {D}")
    if B == 0 or H == 0 or L == 0 or D == 0:
        raise ValueError(f"q has an empty dimension: shape {tuple(q.shape)}")
    if projection.shape[0] == 0:
        raise ValueError("projection must have at least one row (nb_features >= 1)")
    if key_padding_mask is not None:
        check_tensor("key_padding_mask", key_padding_mask, ndim=2, dtypes=(torch.bool,), shape=(B, L),
                     device=q.device)
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if eps is not None and not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")


def performer_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    projection: torch.Tensor,
    *,
    key_padding_mask: Optional[torch.Tensor] = None,
    causal: bool = False,
    kernel: str = "softmax",
    eps: Optional[float] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """FAVOR+ linear attention, exactly performer-pytorch's ``FastAttention`` for the same projection.

    Parameters
    ----------
    q, k, v : (batch, heads, length, head_dim) float32 / float16 / bfloat16 (float64 on the torch
        backend), head_dim <= 128. Low precision is read and written as given, with float32 sums;
        on a CPU with AVX512-BF16, non-causal bfloat16 inputs take the feature and state products
        as bf16 dot products (operands rounded to bf16, as torch.autocast does to a matmul;
        ``BIOGEN_CPU_CAPABILITY=avx512`` keeps them in float32).
    projection : (nb_features, head_dim) random feature matrix, e.g. from
        :func:`gaussian_orthogonal_random_matrix`. Receives no gradient.
    key_padding_mask : (batch, length) bool, True = padding, optional.
    causal : prefix attention (query i sees keys j <= i), on every backend as chunked prefix sums
        (Triton: at most 256 random features; CUDA: one chunk row must fit 46 KB of shared memory).
    kernel : 'softmax' (positive random features, FAVOR+) or 'relu' (generalized attention).
    eps : feature epsilon; default as performer-pytorch: 1e-4 for softmax, 1e-3 for relu.
    backend : 'cuda', 'triton', 'cpu', 'torch' or 'auto'; see :mod:`biogen.ops`.

    Returns
    -------
    (batch, heads, length, head_dim) in q's dtype; padded query rows are zero.

    Raises
    ------
    ValueError
        On mismatched shapes, a projection whose width is not head_dim, or NaN / infinity in q, k,
        v outside the padding (checked before any kernel runs).
    """
    _check(q, k, v, projection, key_padding_mask, kernel, eps)
    eps = reference.performer_eps(kernel, eps)
    chosen = OP.select(backend, q.device, dtype=q.dtype, head_dim=q.shape[-1], causal=bool(causal),
                       nb_features=projection.shape[0])
    out, _, _ = _fwd_op(q, k, v, projection, key_padding_mask, bool(causal), kernel == "relu", eps, chosen)
    return out
