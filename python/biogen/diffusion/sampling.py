"""Sampling loops: a denoising network + a scheduler -> images."""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import torch
from torch import nn

from .schedulers import _Scheduler


def cfg_forward(unet: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor):
    """Conditional and unconditional outputs from ONE batched forward (cond and null cond stacked).

    x: (batch, C, H, W); t: scalar or (batch,); cond: (batch, ...) -> (out_cond, out_uncond).
    """
    B = x.shape[0]
    t = torch.as_tensor(t, device=x.device)
    t = t.expand(B) if t.dim() == 0 else t
    drop = torch.cat([torch.zeros(B, dtype=torch.bool), torch.ones(B, dtype=torch.bool)]).to(x.device)
    out = unet(torch.cat([x, x]), torch.cat([t, t]), cond=torch.cat([cond, cond]), cond_drop_mask=drop)
    return out[:B], out[B:]


@torch.no_grad()
def sample(
    unet: nn.Module,
    scheduler: _Scheduler,
    shape: Sequence[int],
    cond: Optional[torch.Tensor] = None,
    guidance_scale: float = 1.0,
    steps: int = 50,
    generator: Optional[torch.Generator] = None,
    progress: bool = True,
    dynamic_threshold: Optional[float] = None,
    eta: Optional[float] = None,
    device: Optional[torch.device | str] = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Run the reverse process from pure noise.

    Parameters
    ----------
    unet : called as ``unet(x, t, cond=..., cond_drop_mask=...)`` (e.g. :class:`biogen.nn.unet.UNet`).
    scheduler : a biogen scheduler (DDPM, DDIM, DPM-Solver++); its timesteps are reset to ``steps``.
    shape : (batch, channels, H, W) of the images.
    cond : (batch, cond_tokens, cond_dim) or (batch, cond_dim) condition, or None (unconditional).
    guidance_scale : classifier-free guidance w; with ``cond`` and w != 1 the conditional and null
        condition passes run as one batched forward and are combined inside the fused step.
    generator : seeds the initial noise and every stochastic step; same seed, same images.
    progress : show a tqdm progress bar.
    dynamic_threshold : if set, Imagen dynamic thresholding of x0 with this quantile ratio for this
        run (overrides the scheduler's ``thresholding``); None keeps the scheduler's setting.
    eta : DDIM stochasticity (DDIM only; default 0).
    device, dtype : where and in what precision to sample (default: the UNet's device).

    Returns
    -------
    (batch, channels, H, W) tensor of samples (in the data range the model was trained on).
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) < 2:
        raise ValueError(f"shape must be (batch, channels, ...), got {shape}")
    if not isinstance(scheduler, _Scheduler):
        raise TypeError(f"scheduler must be a biogen scheduler, got {type(scheduler).__name__}")
    if cond is not None and cond.shape[0] != shape[0]:
        raise ValueError(f"cond has batch {cond.shape[0]} but shape asks for {shape[0]} samples")
    if guidance_scale != 1.0 and cond is None:
        raise ValueError("guidance_scale != 1 needs cond (classifier-free guidance mixes cond and null cond)")
    if eta is not None and not hasattr(scheduler.config, "set_alpha_to_one"):
        raise ValueError("eta is a DDIM option; this scheduler is " + type(scheduler).__name__)
    if dynamic_threshold is not None:
        if not 0 < dynamic_threshold <= 1:
            raise ValueError(f"dynamic_threshold must be a quantile ratio in (0, 1], got {dynamic_threshold}")
        # a private copy, so the caller's scheduler keeps its own setting
        cfg = dataclasses.replace(scheduler.config, thresholding=True, dynamic_thresholding_ratio=dynamic_threshold)
        scheduler = type(scheduler)(cfg)
    if device is None:
        p = next(iter(unet.parameters()), None)
        device = p.device if p is not None else torch.device("cpu")
    device = torch.device(device)
    scheduler.set_timesteps(steps)

    gen_device = generator.device if generator is not None else device
    x = torch.randn(shape, generator=generator, device=gen_device, dtype=dtype).to(device)
    if cond is not None:
        cond = cond.to(device=device, dtype=dtype)
    step_kw = {} if eta is None else {"eta": float(eta)}
    guided = cond is not None and guidance_scale != 1.0

    was_training = unet.training
    unet.eval()
    try:
        from tqdm.auto import tqdm

        for t in tqdm(scheduler.timesteps, disable=not progress, desc="sampling", leave=False):
            tt = t.to(device).expand(shape[0])
            x_in = scheduler.scale_model_input(x, t)
            if guided:
                m_c, m_u = cfg_forward(unet, x_in, tt, cond)
                x = scheduler.step(m_c, t, x, generator=generator, model_output_uncond=m_u,
                                   guidance_scale=guidance_scale, **step_kw).prev_sample
            else:
                m = unet(x_in, tt, cond=cond) if cond is not None else unet(x_in, tt)
                x = scheduler.step(m, t, x, generator=generator, **step_kw).prev_sample
    finally:
        unet.train(was_training)
    return x
