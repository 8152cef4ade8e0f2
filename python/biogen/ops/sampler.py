"""One fused elementwise op per diffusion sampler step (SPEC 1.3): guidance, x0, clipping, update.

The general linear update of variance-preserving diffusion, ``x_t = alpha_t x0 + sigma_t eps``::

    m     = m_uncond + w (m_cond - m_uncond)             classifier-free guidance (optional)
    x0    = (x - sigma_t m) / alpha_t                    prediction_type='epsilon'
          = m                                            'sample'
          = alpha_t x - sigma_t m                        'v_prediction'
    x0    = clamp(x0, -clip, clip)                       clip_sample (optional), or
    x0    = clamp(x0, -s, s) / s, s = clamp(quantile(|x0|, p), 1, max)   dynamic_threshold=p
    eps   = the network's eps (from m, before clipping)  as diffusers' DDIM, or
    eps   = (x - alpha_t x0) / sigma_t                   from the clipped x0 (use_clipped_model_output)
    prev  = c_sample x + c_x0 x0 + c_eps eps + c_prev_x0 prev_x0 + c_noise noise

Every coefficient is per sample, a (batch,) float32 tensor (or a Python float for all samples).
"""

from __future__ import annotations

import math
from typing import Optional, Union

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
PREDICTION_TYPES = {"epsilon": 0, "sample": 1, "v_prediction": 2}

# Elementwise and memory-bound: the SIMT CUDA kernel first on a GPU.
OP = KernelOp("sampler_step", gpu_order=("cuda", "triton", "torch"), triton_module="sampler")


def _reasons_dtype(dtype: torch.dtype, **_) -> list[str]:
    return [] if dtype in _FLOATS else [f"supports float32, float16 and bfloat16, not {dtype}"]


OP.reasons["torch"] = lambda **_: []
if _C is not None and hasattr(_C, "sampler_step_cpu"):
    OP.reasons["cpu"] = _reasons_dtype
if _C is not None and hasattr(_C, "sampler_step_cuda"):
    OP.reasons["cuda"] = _reasons_dtype


if has_triton_kernel("sampler"):
    OP.reasons["triton"] = _reasons_dtype


# ----------------------------------------------------------------------------- per-backend kernels


def _ptr(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


def _contig(t: Optional[torch.Tensor], dtype: Optional[torch.dtype] = None) -> Optional[torch.Tensor]:
    if t is None:
        return None
    return (t if dtype is None else t.to(dtype)).contiguous()


def _native(backend, sample, model_output, alpha_t, sigma_t, c_sample, c_x0, c_eps, c_noise, prediction_type,
            model_output_uncond, guidance_scale, prev_x0, c_prev_x0, noise, clip_sample, dynamic_threshold,
            sample_max_value, use_clipped_model_output):
    dt = sample.dtype
    x, m, mu, px0, nz = (_contig(t, dt) for t in (sample, model_output, model_output_uncond, prev_x0, noise))
    coef = [_contig(c, torch.float32) for c in (alpha_t, sigma_t, c_sample, c_x0, c_eps, c_noise, c_prev_x0)]
    B = x.shape[0]
    N = x.numel() // B
    prev = torch.empty_like(x)
    x0 = torch.empty_like(x)
    if px0 is None or coef[6] is None:
        px0, coef[6] = None, None
    if nz is None or coef[5] is None:
        nz, coef[5] = None, None
    tensors = (DTYPE_CODES[dt], x.data_ptr(), m.data_ptr(), _ptr(mu), _ptr(px0), _ptr(nz), prev.data_ptr(),
               x0.data_ptr())
    coef_ptrs = tuple(_ptr(c) for c in coef)
    pred = PREDICTION_TYPES[prediction_type]
    clip = -1.0 if clip_sample is None or dynamic_threshold is not None else float(clip_sample)
    if backend == "cpu":  # the quantile of dynamic thresholding is done inside the kernel
        _C.sampler_step_cpu(*tensors, *coef_ptrs, B, N, pred, float(guidance_scale), clip,
                            -1.0 if dynamic_threshold is None else float(dynamic_threshold), float(sample_max_value),
                            int(use_clipped_model_output), num_threads())
        return prev, x0
    stream = cuda_stream(x)
    ce = int(use_clipped_model_output)
    if dynamic_threshold is None:
        _C.sampler_step_cuda(*tensors, 0, 0, *coef_ptrs, B, N, pred, float(guidance_scale), clip, 0, ce, stream)
        return prev, x0
    # two launches around torch.quantile of the float32 x0 (a selection kernel is not worth it here)
    x0f = torch.empty((B, N), dtype=torch.float32, device=x.device)
    _C.sampler_step_cuda(*tensors, x0f.data_ptr(), 0, *coef_ptrs, B, N, pred, float(guidance_scale), clip, 1, ce, stream)
    th = reference.threshold_scales_ref(x0f, float(dynamic_threshold), float(sample_max_value)).contiguous()
    _C.sampler_step_cuda(*tensors, x0f.data_ptr(), th.data_ptr(), *coef_ptrs, B, N, pred, float(guidance_scale),
                         clip, 2, ce, stream)
    return prev, x0


@torch.library.custom_op("biogen::sampler_step_fwd", mutates_args=())
def _fwd_op(
    sample: torch.Tensor,
    model_output: torch.Tensor,
    alpha_t: torch.Tensor,
    sigma_t: torch.Tensor,
    c_sample: torch.Tensor,
    c_x0: torch.Tensor,
    c_eps: Optional[torch.Tensor],
    c_noise: Optional[torch.Tensor],
    prediction_type: str,
    model_output_uncond: Optional[torch.Tensor],
    guidance_scale: float,
    prev_x0: Optional[torch.Tensor],
    c_prev_x0: Optional[torch.Tensor],
    noise: Optional[torch.Tensor],
    clip_sample: Optional[float],
    dynamic_threshold: Optional[float],
    sample_max_value: float,
    backend: str,
    use_clipped_model_output: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    args = (sample, model_output, alpha_t, sigma_t, c_sample, c_x0, c_eps, c_noise, prediction_type,
            model_output_uncond, guidance_scale, prev_x0, c_prev_x0, noise, clip_sample, dynamic_threshold,
            sample_max_value, use_clipped_model_output)
    if backend == "torch":
        prev, x0 = reference.sampler_step_ref(*args)
        return prev.contiguous(), x0.contiguous()
    with on_device(sample):
        if backend == "triton":
            return triton_kernel("sampler").sampler_step(*args)
        return _native(backend, *args)


@_fwd_op.register_fake
def _(sample, *args):
    return torch.empty(sample.shape, dtype=sample.dtype, device=sample.device), torch.empty(
        sample.shape, dtype=sample.dtype, device=sample.device)


# ------------------------------------------------------------------------------ public API

Coef = Union[torch.Tensor, float]


def _coef(name: str, c: Optional[Coef], B: int, device: torch.device) -> Optional[torch.Tensor]:
    if c is None:
        return None
    if isinstance(c, (int, float)) and not isinstance(c, bool):
        return torch.full((B,), float(c), dtype=torch.float32, device=device)
    check_tensor(name, c, dtypes=(torch.float32,), shape=(B,), device=device)
    return c


def sampler_step(
    sample: torch.Tensor,
    model_output: torch.Tensor,
    *,
    alpha_t: Coef,
    sigma_t: Coef,
    c_sample: Coef,
    c_x0: Coef,
    c_eps: Optional[Coef] = None,
    c_noise: Optional[Coef] = None,
    prediction_type: str = "epsilon",
    model_output_uncond: Optional[torch.Tensor] = None,
    guidance_scale: float = 1.0,
    prev_x0: Optional[torch.Tensor] = None,
    c_prev_x0: Optional[Coef] = None,
    noise: Optional[torch.Tensor] = None,
    clip_sample: Optional[float] = None,
    dynamic_threshold: Optional[float] = None,
    sample_max_value: float = 1.0,
    use_clipped_model_output: bool = False,
    backend: Optional[str] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One fused sampler step of VP diffusion ``x_t = alpha_t x0 + sigma_t eps``.

    Per element: guided output ``m = m_uncond + w (m_cond - m_uncond)`` (if ``model_output_uncond``
    is given; ``model_output`` is the conditional one); ``x0`` from ``prediction_type`` ('epsilon':
    ``(x - sigma_t m) / alpha_t``; 'sample': ``m``; 'v_prediction': ``alpha_t x - sigma_t m``);
    optional clipping of x0 to ``[-clip_sample, clip_sample]`` or Imagen dynamic thresholding
    (per sample ``s = clamp(quantile(|x0|, dynamic_threshold), 1, sample_max_value)``,
    ``x0 = clamp(x0, -s, s) / s``, as diffusers' ``_threshold_sample``); for the ``c_eps`` term the
    network's eps (what ``m`` implies before clipping, as diffusers' ``DDIMScheduler.step``), or with
    ``use_clipped_model_output`` ``eps = (x - alpha_t x0) / sigma_t`` re-derived from the clipped x0
    (GLIDE; diffusers' option of that name); and::

        prev = c_sample x + c_x0 x0 + c_eps eps + c_prev_x0 prev_x0 + c_noise noise

    (terms whose coefficient or tensor is None are skipped). Schedulers map onto it as follows,
    with ``abar`` the cumulative alpha product, ``alpha_t = sqrt(abar_t)``, ``sigma_t =
    sqrt(1 - abar_t)`` and ``s`` the previous timestep:

    - DDPM ancestral (posterior mean + sigma noise): ``c_x0 = sqrt(abar_s) beta_t / (1 - abar_t)``,
      ``c_sample = sqrt(alpha_t') (1 - abar_s) / (1 - abar_t)`` with ``alpha_t' = abar_t / abar_s``,
      ``c_noise = sqrt(posterior variance)``, no ``c_eps``.
    - DDIM (eta): ``c_x0 = sqrt(abar_s)``, ``c_eps = sqrt(1 - abar_s - std^2)``, ``c_noise = std``
      with ``std = eta sqrt((1 - abar_s)/(1 - abar_t)) sqrt(1 - abar_t/abar_s)``, ``c_sample = 0``.
    - DPM-Solver++(2M) (data prediction, lambda = log(alpha/sigma), h = lambda_s - lambda_t,
      r = h_prev / h): ``c_sample = sigma_s / sigma_t``, ``c_x0 = -alpha_s expm1(-h) (1 + 1/(2r))``,
      ``c_prev_x0 = alpha_s expm1(-h) / (2r)`` (first step: ``c_x0 = -alpha_s expm1(-h)``, no
      prev_x0).

    Parameters
    ----------
    sample, model_output : (batch, ...) float32 / float16 / bfloat16 (float64 on the torch backend).
    alpha_t, sigma_t, c_sample, c_x0, c_eps, c_noise, c_prev_x0 : (batch,) float32 tensors or
        Python floats (the same for every sample).
    prediction_type : 'epsilon', 'sample' or 'v_prediction'.
    model_output_uncond : unconditional model output of sample's shape, for classifier-free guidance.
    guidance_scale : w.
    prev_x0 : the previous step's x0 (multistep solvers), sample's shape.
    noise : fresh Gaussian noise of sample's shape (ancestral / stochastic samplers).
    clip_sample : clip x0 to [-clip_sample, clip_sample]; ignored when ``dynamic_threshold`` is set.
    dynamic_threshold : quantile ratio p in (0, 1] of Imagen's dynamic thresholding.
    sample_max_value : upper clamp of the dynamic threshold.
    use_clipped_model_output : the ``c_eps`` term uses the eps of the clipped x0, not the network's
        (the two differ only where x0 was clipped or thresholded).
    backend : 'cuda', 'triton', 'cpu', 'torch' or 'auto'; see :mod:`biogen.ops`.

    Returns
    -------
    (prev_sample, pred_x0), both contiguous, sample's shape and dtype; maths in float32.
    """
    check_tensor("sample", sample, dtypes=_FLOATS + (torch.float64,))
    if sample.dim() < 1 or sample.numel() == 0:
        raise ValueError(f"sample must be a non-empty (batch, ...) tensor, got shape {tuple(sample.shape)}")
    B, dev, shp = sample.shape[0], sample.device, tuple(sample.shape)
    check_tensor("model_output", model_output, dtypes=(sample.dtype,), shape=shp, device=dev)
    for name, t in (("model_output_uncond", model_output_uncond), ("prev_x0", prev_x0), ("noise", noise)):
        if t is not None:
            check_tensor(name, t, dtypes=(sample.dtype,), shape=shp, device=dev)
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction_type {prediction_type!r}; choose one of "
                         f"{', '.join(map(repr, PREDICTION_TYPES))}")
    if dynamic_threshold is not None and not 0.0 < float(dynamic_threshold) <= 1.0:
        raise ValueError(f"dynamic_threshold must be a quantile ratio in (0, 1], got {dynamic_threshold}")
    if dynamic_threshold is not None and not float(sample_max_value) >= 1.0:
        raise ValueError(f"sample_max_value must be >= 1, got {sample_max_value}")
    if clip_sample is not None and not float(clip_sample) > 0:
        raise ValueError(f"clip_sample must be positive, got {clip_sample}")
    if not math.isfinite(float(guidance_scale)):
        raise ValueError(f"guidance_scale must be finite, got {guidance_scale}")
    coefs = {n: _coef(n, c, B, dev) for n, c in (("alpha_t", alpha_t), ("sigma_t", sigma_t), ("c_sample", c_sample),
                                                  ("c_x0", c_x0), ("c_eps", c_eps), ("c_noise", c_noise),
                                                  ("c_prev_x0", c_prev_x0))}
    for n in ("alpha_t", "sigma_t", "c_sample", "c_x0"):
        if coefs[n] is None:
            raise ValueError(f"{n} is required")
    if (noise is None) != (coefs["c_noise"] is None):
        raise ValueError("noise and c_noise must be given together")
    if (prev_x0 is None) != (coefs["c_prev_x0"] is None):
        raise ValueError("prev_x0 and c_prev_x0 must be given together")
    chosen = OP.select(backend, dev, dtype=sample.dtype)
    return _fwd_op(
        sample, model_output, coefs["alpha_t"], coefs["sigma_t"], coefs["c_sample"], coefs["c_x0"],
        coefs["c_eps"], coefs["c_noise"], prediction_type, model_output_uncond, float(guidance_scale), prev_x0,
        coefs["c_prev_x0"], noise, None if clip_sample is None else float(clip_sample),
        None if dynamic_threshold is None else float(dynamic_threshold), float(sample_max_value), chosen,
        bool(use_clipped_model_output))
