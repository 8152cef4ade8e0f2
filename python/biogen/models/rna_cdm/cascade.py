"""RNA-CDM cascade (SPEC 3.1): RNA latent -> 64x64 base tile -> 256x256 super-resolution tile.

Two diffusion stages, each a :class:`biogen.nn.UNet` (fused GroupNorm+FiLM+SiLU, attention,
cross-attention) predicting v (or epsilon) on a cosine schedule:

- base: noise -> ``base_size`` tile, conditioned on the RNA latent;
- sr: noise -> ``sr_size`` tile, conditioned on the RNA latent and on the base tile, upsampled
  (bilinear) and concatenated to the input channels. The low-res input is noise-augmented in
  training (a random forward-process level in ``[0, noise_aug_max]`` of the schedule) and the level
  is given to the network as one extra constant input channel, so at sampling a small fixed level
  can hide the base stage's artefacts (Imagen / CDM "conditioning augmentation").

The RNA latent (standardised with statistics fitted on the training latents) is projected to
``cond_tokens`` tokens of width ``cond_dim`` (Linear + LayerNorm) per stage; the UNet attends to
them with cross-attention and adds their pooled projection to the time embedding. In training the
condition is replaced by the UNet's learned null condition with probability ``cond_drop_prob``;
sampling mixes both with classifier-free guidance inside the fused sampler step.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...diffusion import make_scheduler, sample as diffusion_sample
from ...nn.unet import UNet, UNetConfig, UNET_PRESETS

__all__ = ["CASCADE_PRESETS", "CascadeConfig", "CascadeTrainConfig", "LatentTokens", "RNACDM", "cascade_preset",
           "train_cascade"]

STAGES = ("base", "sr")
SCHEDULER_NAMES = ("ddpm", "ddim", "dpmsolver++")


@dataclass
class CascadeConfig:
    """Sizes and diffusion settings of the cascade.

    Parameters
    ----------
    latent_dim : width of the RNA latent (the beta-VAE's ``latent_dim``).
    base_size, sr_size : tile sizes of the two stages (``sr_size`` a multiple of ``base_size``).
    base_unet, sr_unet : UNet settings (dicts of :class:`UNetConfig` fields); the channels and the
        conditioning width are filled in here (base: 3 -> 3, sr: 3 + 3 + 1 -> 3).
    cond_tokens, cond_dim : condition tokens per latent and their width.
    cond_drop_prob : probability of training with the null condition (classifier-free guidance).
    noise_aug_max : largest low-res augmentation level in training, as a fraction of the schedule.
    num_train_timesteps, beta_schedule : the training noise schedule (cosine by default).
    prediction_type : network target, 'v_prediction' (default: ``alpha eps - sigma x0``) or 'epsilon'.
        v is used because with the cosine schedule alpha is ~0 at the noisiest steps, where an
        epsilon model's x0 estimate ``(x - sigma eps) / alpha`` amplifies its errors; a briefly
        trained epsilon model (the CPU demo) then samples noise, a v model does not.
    preset : the preset name the config came from (checked when loading a checkpoint).
    """

    latent_dim: int
    base_size: int = 64
    sr_size: int = 256
    base_unet: dict = field(default_factory=dict)
    sr_unet: dict = field(default_factory=dict)
    cond_tokens: int = 4
    cond_dim: int = 256
    cond_drop_prob: float = 0.1
    noise_aug_max: float = 0.3
    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    prediction_type: str = "v_prediction"
    preset: str = "custom"

    def __post_init__(self) -> None:
        for name in ("latent_dim", "base_size", "sr_size", "cond_tokens", "cond_dim", "num_train_timesteps"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.sr_size % self.base_size or self.sr_size < self.base_size:
            raise ValueError(f"sr_size ({self.sr_size}) must be a multiple of base_size ({self.base_size})")
        if not 0 <= self.cond_drop_prob < 1:
            raise ValueError(f"cond_drop_prob must be in [0, 1), got {self.cond_drop_prob}")
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {self.prediction_type!r}")
        if not 0 <= self.noise_aug_max < 1:
            raise ValueError(f"noise_aug_max must be in [0, 1), got {self.noise_aug_max}")
        # building the UNet configs validates widths/groups/heads now, not at first use
        self.unet_config("base")
        self.unet_config("sr")
        for stage, size in (("base", self.base_size), ("sr", self.sr_size)):
            f = self.unet_config(stage).downsample_factor
            if size % f:
                raise ValueError(f"{stage} size {size} must be divisible by {f} (its UNet has "
                                 f"{len(self.unet_config(stage).channel_mult)} levels)")

    def unet_config(self, stage: str) -> UNetConfig:
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
        d = dict(self.base_unet if stage == "base" else self.sr_unet)
        d.update(in_channels=3 if stage == "base" else 7, out_channels=3, cond_dim=self.cond_dim,
                 cond_tokens=self.cond_tokens)
        return UNetConfig(**d)

    def size(self, stage: str) -> int:
        return self.base_size if stage == "base" else self.sr_size


_TINY_UNET = dict(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,), num_heads=2,
                  num_groups=4)
_BASE_PAPER = {k: v for k, v in UNET_PRESETS["rnacdm_base"].items()
               if k not in ("in_channels", "out_channels", "cond_dim", "cond_tokens")}

# tiny: unit tests (16 -> 32 px). cpu: the demo, sized to train in minutes on 2 CPU cores
# (32 -> 64 px; base widths 16/32/64 with attention at 8x8, SR widths 8/16/32 with attention only in
# the middle at 16x16). paper: 64 -> 256 px as in SPEC 3.1 (GPU-sized).
CASCADE_PRESETS: dict[str, dict] = {
    "tiny": dict(base_size=16, sr_size=32, base_unet=_TINY_UNET, sr_unet=dict(_TINY_UNET, attention_levels=()),
                 cond_tokens=2, cond_dim=16),
    "cpu": dict(base_size=32, sr_size=64,
                base_unet=dict(base_channels=16, channel_mult=(1, 2, 4), num_res_blocks=1, attention_levels=(2,),
                               num_heads=4, num_groups=8),
                sr_unet=dict(base_channels=8, channel_mult=(1, 2, 4), num_res_blocks=1, attention_levels=(),
                             num_heads=4, num_groups=4),
                cond_tokens=4, cond_dim=32),
    "paper": dict(base_size=64, sr_size=256, base_unet=_BASE_PAPER,
                  sr_unet=dict(base_channels=64, channel_mult=(1, 2, 4, 4), num_res_blocks=2, attention_levels=(3,),
                               num_heads=4, num_groups=32, dropout=0.1),
                  cond_tokens=4, cond_dim=256),
}


def cascade_preset(name: str, latent_dim: int, **overrides) -> CascadeConfig:
    """A :class:`CascadeConfig` from :data:`CASCADE_PRESETS` for latents of ``latent_dim``."""
    if name not in CASCADE_PRESETS:
        raise ValueError(f"unknown RNA-CDM preset {name!r}; choose one of {', '.join(CASCADE_PRESETS)}")
    d = copy.deepcopy(CASCADE_PRESETS[name])
    d.update(overrides)
    return CascadeConfig(latent_dim=latent_dim, preset=name, **d)


class LatentTokens(nn.Module):
    """RNA latent (batch, latent_dim) -> condition tokens (batch, tokens, cond_dim)."""

    def __init__(self, latent_dim: int, tokens: int, cond_dim: int) -> None:
        super().__init__()
        self.tokens, self.cond_dim = tokens, cond_dim
        self.proj = nn.Sequential(nn.Linear(latent_dim, cond_dim), nn.SiLU(), nn.Linear(cond_dim, tokens * cond_dim))
        self.norm = nn.LayerNorm(cond_dim)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(z).view(z.shape[0], self.tokens, self.cond_dim))


class _Denoiser(nn.Module):
    """``unet(x, t, cond=tokens, cond_drop_mask)`` with the SR stage's low-res channels appended.

    The interface :func:`biogen.diffusion.sample` expects; when it stacks the conditional and null
    passes (batch doubled), the low-res input is repeated to match.
    """

    def __init__(self, unet: UNet, extra: Optional[torch.Tensor] = None) -> None:
        super().__init__()
        self.unet, self.extra = unet, extra

    def forward(self, x, t, cond=None, cond_drop_mask=None):
        if self.extra is not None:
            e = self.extra
            if x.shape[0] != e.shape[0]:
                e = e.repeat(x.shape[0] // e.shape[0], 1, 1, 1)
            x = torch.cat([x, e.to(x.dtype)], dim=1)
        return self.unet(x, t, cond=cond, cond_drop_mask=cond_drop_mask)


class RNACDM(nn.Module):
    """The two-stage RNA-to-tile cascade.

    Holds per stage a :class:`LatentTokens` and a :class:`UNet`, plus buffers ``latent_mean`` /
    ``latent_std`` (latent standardisation fitted by :func:`train_cascade`).
    """

    def __init__(self, config: CascadeConfig) -> None:
        super().__init__()
        self.config = c = config
        self.tokens = nn.ModuleDict({s: LatentTokens(c.latent_dim, c.cond_tokens, c.cond_dim) for s in STAGES})
        self.unets = nn.ModuleDict({s: UNet(c.unet_config(s)) for s in STAGES})
        self.register_buffer("latent_mean", torch.zeros(c.latent_dim))
        self.register_buffer("latent_std", torch.ones(c.latent_dim))
        self.train_scheduler = make_scheduler("ddpm", num_train_timesteps=c.num_train_timesteps,
                                              beta_schedule=c.beta_schedule)

    # ------------------------------------------------------------------ pieces

    def _check_latent(self, z) -> torch.Tensor:
        z = torch.as_tensor(z)
        if z.dim() != 2 or z.shape[1] != self.config.latent_dim:
            raise ValueError(f"z must be (batch, latent_dim={self.config.latent_dim}), got {tuple(z.shape)}")
        if not torch.isfinite(z).all():
            raise ValueError("z contains NaN or inf")
        return z.to(self.latent_mean.device, torch.float32)

    def cond_tokens(self, stage: str, z: torch.Tensor) -> torch.Tensor:
        """z: (batch, latent_dim) raw latents -> (batch, cond_tokens, cond_dim)."""
        z = self._check_latent(z)
        return self.tokens[stage]((z - self.latent_mean) / self.latent_std)

    def low_res_input(self, low: torch.Tensor, aug_t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Noise-augment the base-size image at levels ``aug_t`` (batch,), upsample, add the level channel.

        low: (batch, 3, base, base) in [-1, 1] -> (batch, 4, sr, sr).
        """
        c = self.config
        aug = self.train_scheduler.add_noise(low, noise, aug_t)
        aug = torch.where((aug_t > 0).view(-1, 1, 1, 1).to(low.device), aug, low)  # level 0 = clean
        up = F.interpolate(aug, size=(c.sr_size, c.sr_size), mode="bilinear", align_corners=False)
        level = (aug_t.float() / c.num_train_timesteps).to(low.device).view(-1, 1, 1, 1).expand(-1, 1, c.sr_size, c.sr_size)
        return torch.cat([up, level.to(up.dtype)], dim=1)

    def predict(self, stage: str, x_t: torch.Tensor, t: torch.Tensor, z: torch.Tensor,
                low_res: Optional[torch.Tensor] = None, cond_drop_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Network output (v or epsilon, per ``config.prediction_type``) of one stage.

        x_t: (batch, 3, size, size); t: (batch,); z: (batch, latent_dim); low_res (sr only):
        (batch, 4, sr, sr) from :meth:`low_res_input`; cond_drop_mask: (batch,) bool, True = null.
        """
        if stage == "sr" and low_res is None:
            raise ValueError("the sr stage needs low_res (see RNACDM.low_res_input)")
        return _Denoiser(self.unets[stage], low_res if stage == "sr" else None)(
            x_t, t, cond=self.cond_tokens(stage, z), cond_drop_mask=cond_drop_mask)

    def guided_eps(self, stage: str, x_t, t, z, guidance_scale: float, low_res=None) -> torch.Tensor:
        """Classifier-free guided output ``out_null + w (out_cond - out_null)`` (one batched forward)."""
        B = x_t.shape[0]
        drop = torch.cat([torch.zeros(B, dtype=torch.bool), torch.ones(B, dtype=torch.bool)]).to(x_t.device)
        lr = None if low_res is None else torch.cat([low_res, low_res])
        out = self.predict(stage, torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([z, z]), lr, drop)
        e_c, e_u = out[:B], out[B:]
        return e_u + guidance_scale * (e_c - e_u)

    def loss(self, stage: str, x0: torch.Tensor, z: torch.Tensor, generator: Optional[torch.Generator] = None,
             *, global_batch: Optional[int] = None, rank_slice: Optional[slice] = None) -> torch.Tensor:
        """Denoising loss (MSE on v or epsilon) of one stage on clean tiles ``x0`` (batch, 3, S, S) in [-1, 1].

        Tiles of another size are resized (area) to the stage size; the SR stage builds its low-res
        input by downsampling x0 to ``base_size``. With ``global_batch`` and ``rank_slice`` (the
        distributed trainer), ``x0`` is part ``rank_slice`` of a global batch of ``global_batch`` tiles:
        the timesteps and noise are drawn for the whole global batch and sliced, so the ranks together
        use exactly the draws of one process.
        """
        c = self.config
        if x0.dim() != 4 or x0.shape[1] != 3:
            raise ValueError(f"x0 must be (batch, 3, H, W), got {tuple(x0.shape)}")
        B, dev = x0.shape[0], x0.device
        if (global_batch is None) != (rank_slice is None):
            raise ValueError("pass global_batch and rank_slice together")
        Bg, part = (B, slice(None)) if global_batch is None else (global_batch, rank_slice)
        if len(range(Bg)[part]) != B:
            raise ValueError(f"rank_slice {rank_slice} of a global batch of {Bg} does not hold {B} tiles")
        size = c.size(stage)
        if x0.shape[-1] != size or x0.shape[-2] != size:
            x0 = F.interpolate(x0, size=(size, size), mode="area")
        T = c.num_train_timesteps

        def rand():
            return torch.rand((Bg,), generator=generator)[part].to(dev)

        def randn(shape):
            return torch.randn((Bg,) + tuple(shape[1:]), generator=generator)[part].to(dev)

        t = (rand() * T).long().clamp_max(T - 1)
        noise = randn(x0.shape)
        x_t = self.train_scheduler.add_noise(x0, noise, t)
        low = None
        if stage == "sr":
            lo = F.interpolate(x0, size=(c.base_size, c.base_size), mode="area")
            aug_t = (rand() * c.noise_aug_max * T).long()
            low = self.low_res_input(lo, aug_t, randn(lo.shape))
        drop = rand() < c.cond_drop_prob
        if c.prediction_type == "epsilon":
            target = noise
        else:
            acp = self.train_scheduler.alphas_cumprod.to(dev)[t].view(-1, 1, 1, 1)
            target = acp.sqrt() * noise - (1 - acp).sqrt() * x0
        return F.mse_loss(self.predict(stage, x_t, t, z, low, drop), target)

    # ------------------------------------------------------------------ sampling

    def make_scheduler(self, name: str = "dpmsolver++"):
        """A sampler on the training schedule: 'ddpm', 'ddim' or 'dpmsolver++' (x0 clipped to [-1, 1])."""
        if name not in SCHEDULER_NAMES:
            raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULER_NAMES)}")
        return make_scheduler(name, num_train_timesteps=self.config.num_train_timesteps,
                              beta_schedule=self.config.beta_schedule, clip_sample=True,
                              prediction_type=self.config.prediction_type)

    @torch.no_grad()
    def sample(self, z, *, scheduler: str = "dpmsolver++", steps: int = 25, sr_steps: Optional[int] = None,
               guidance_scale: float = 3.0, sr_guidance_scale: Optional[float] = None, sr_aug_level: float = 0.05,
               generator: Optional[torch.Generator] = None, stages: Sequence[str] = STAGES,
               progress: bool = False, return_low_res: bool = False):
        """Generate one tile per latent.

        Parameters
        ----------
        z : (batch, latent_dim) RNA latents.
        scheduler, steps : sampler ('ddpm', 'ddim', 'dpmsolver++') and its steps for the base stage;
            ``sr_steps`` for the SR stage (default ``steps``).
        guidance_scale : classifier-free guidance w (1 = conditional only); ``sr_guidance_scale``
            for the SR stage (default the same).
        sr_aug_level : noise-augmentation level of the base output fed to the SR stage (fraction of
            the schedule, within the trained ``[0, noise_aug_max]``).
        generator : seeds all noise; the same seed gives the same tiles.
        stages : ('base',) to stop at the base size, or ('base', 'sr').

        Returns
        -------
        (batch, 3, size, size) tiles in [-1, 1] at the last stage's size; with ``return_low_res``
        also the base tiles.
        """
        stages = tuple(stages)
        if stages not in (("base",), ("base", "sr")):
            raise ValueError(f"stages must be ('base',) or ('base', 'sr'), got {stages}")
        if not 0 <= sr_aug_level <= max(self.config.noise_aug_max, 0.0) + 1e-9:
            raise ValueError(f"sr_aug_level must be in [0, noise_aug_max={self.config.noise_aug_max}], got {sr_aug_level}")
        z = self._check_latent(z)
        B, dev = z.shape[0], self.latent_mean.device
        c = self.config
        sched = self.make_scheduler(scheduler)
        base = diffusion_sample(_Denoiser(self.unets["base"]), sched, (B, 3, c.base_size, c.base_size),
                                cond=self.cond_tokens("base", z), guidance_scale=guidance_scale, steps=steps,
                                generator=generator, progress=progress, device=dev).clamp(-1, 1)
        if stages == ("base",):
            return (base, base) if return_low_res else base
        aug_t = torch.full((B,), int(round(sr_aug_level * c.num_train_timesteps)), dtype=torch.long)
        gdev = generator.device if generator is not None else dev
        noise = torch.randn(base.shape, generator=generator, device=gdev).to(dev)
        low = self.low_res_input(base, aug_t, noise)
        sched = self.make_scheduler(scheduler)
        out = diffusion_sample(_Denoiser(self.unets["sr"], low), sched, (B, 3, c.sr_size, c.sr_size),
                               cond=self.cond_tokens("sr", z),
                               guidance_scale=guidance_scale if sr_guidance_scale is None else sr_guidance_scale,
                               steps=sr_steps or steps, generator=generator, progress=progress, device=dev).clamp(-1, 1)
        return (out, base) if return_low_res else out

    # ------------------------------------------------------------------ checkpoints

    FORMAT, FORMAT_VERSION = "biogen.rna_cdm", 1

    def save(self, path: str | Path, extra: Optional[dict] = None) -> Path:
        """Weights (safetensors) with the config (and its preset name) as metadata, the format version and
        a checksum of the tensors; atomic."""
        from ..._io import save_safetensors

        meta = {"config": json.dumps(asdict(self.config)), "extra": json.dumps(extra or {})}
        return save_safetensors(self.state_dict(), path, fmt=self.FORMAT, version=self.FORMAT_VERSION, metadata=meta)

    @classmethod
    def load(cls, path: str | Path, preset: Optional[str] = None, map_location: str = "cpu") -> "RNACDM":
        """Load a checkpoint; with ``preset`` it must have been saved from that preset. A truncated,
        corrupt or foreign file is refused by name."""
        from ..._io import load_safetensors_verified
        from ...errors import IncompatibleError

        state, meta = load_safetensors_verified(path, fmt=cls.FORMAT, version=cls.FORMAT_VERSION,
                                                what="RNA-CDM checkpoint", device=map_location,
                                                redo="train it again with 'biogen rnacdm train'")
        cfg = CascadeConfig(**json.loads(meta["config"]))
        if preset is not None and cfg.preset != preset:
            raise IncompatibleError(f"holds preset {cfg.preset!r}, not the requested {preset!r}", path=path,
                                    hint=f"pass --preset {cfg.preset} or another checkpoint")
        model = cls(cfg)
        model.load_checked(state, source=str(path))
        model.extra = json.loads(meta.get("extra", "{}"))
        return model.eval()

    def load_checked(self, state: dict, source: str = "state dict") -> None:
        """load_state_dict with an error naming missing, unexpected and mis-shaped keys."""
        own = self.state_dict()
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        shapes = [f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
                  if k in state and state[k].shape != v.shape]
        if missing or unexpected or shapes:
            raise ValueError(
                f"{source} does not fit this RNA-CDM ({self.config.preset!r}, latent_dim {self.config.latent_dim}): "
                f"{len(missing)} missing, {len(unexpected)} unexpected, {len(shapes)} mis-shaped tensors "
                f"(e.g. {(missing + unexpected + shapes)[:3]}); was it saved from another preset?"
            )
        self.load_state_dict(state)


@dataclass
class CascadeTrainConfig:
    """Training of the cascade: AdamW, warm-up + cosine LR, optional EMA of the weights.

    ``steps``: optimiser steps; ``max_seconds``: optional wall-clock budget (training stops at
    whichever comes first, and the cosine decay follows whichever is further along).
    """

    steps: int = 2000
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 50
    ema_decay: float = 0.0
    grad_clip: float = 1.0
    max_seconds: Optional[float] = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("steps and batch_size must be >= 1 and lr > 0")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.max_seconds is not None and self.max_seconds <= 0:
            raise ValueError("max_seconds must be > 0")


class _Trainable(nn.Module):
    """The trained stages' modules only: DDP synchronises exactly the parameters that get gradients."""

    def __init__(self, model: "RNACDM", stages: Sequence[str]) -> None:
        super().__init__()
        self.tokens = nn.ModuleDict({s: model.tokens[s] for s in stages})
        self.unets = nn.ModuleDict({s: model.unets[s] for s in stages})


def train_cascade(model: RNACDM, tiles, latents, config: Optional[CascadeTrainConfig] = None,
                  stages: Sequence[str] = STAGES, log: Optional[Callable[[str], None]] = None, *,
                  checkpoint_dir=None, checkpoint_every: int = 100, resume: bool = False) -> dict:
    """Train the given stages of ``model`` on paired tiles and latents.

    tiles: (n, 3, S, S) float in [-1, 1] with S = ``sr_size`` (or ``base_size`` when training only
    the base stage); latents: (n, latent_dim), the RNA latent of each tile's sample. Stages listed
    together are trained in one loop (one step of each per iteration); listed alone, separately.
    The latent standardisation is fitted on ``latents`` when the model has not seen any yet.
    Returns ``{stage: [loss per step]}`` plus ``seconds``.

    Runs unchanged under ``torchrun --nproc_per_node N`` (see :mod:`biogen.distributed`): every rank
    holds the data, draws the same global batch of ``config.batch_size`` indices, flips, timesteps
    and noise (one process's draws; each rank draws them for the whole global batch, a CPU cost that
    grows with N) and trains on its contiguous part under DistributedDataParallel, so a step on N
    ranks equals one single-process step up to floating-point reduction order. Gradients are clipped
    after synchronisation, so parameters and the EMA stay identical on all ranks. The losses in the
    history are global-batch means; ``log`` runs on rank 0 only; the ``max_seconds`` budget and the
    clock-driven learning rate use the ranks' mean elapsed time, so all ranks stop together. Under
    NCCL the model is moved to this rank's GPU.

    ``checkpoint_dir``: every ``checkpoint_every`` steps and at the end, write the weights, the EMA,
    the optimiser, the generator, the clock and the history there (:mod:`biogen.checkpoint`);
    ``resume=True`` continues from it (same data, config and stages; ``steps`` may grow), giving the
    parameters an uninterrupted run reaches (with a ``max_seconds`` budget, the clock also continues from the save).
    """
    from ... import distributed as bdist

    tc = config or CascadeTrainConfig()
    c = model.config
    stages = tuple(stages)
    if not stages or any(s not in STAGES for s in stages):
        raise ValueError(f"stages must be a non-empty subset of {STAGES}, got {stages}")
    x = torch.as_tensor(np.asarray(tiles, np.float32))
    zz = torch.as_tensor(np.asarray(latents, np.float32))
    need = c.sr_size if "sr" in stages else c.base_size
    if x.dim() != 4 or x.shape[1] != 3 or x.shape[2] != x.shape[3]:
        raise ValueError(f"tiles must be (n, 3, S, S), got {tuple(x.shape)}")
    if x.shape[-1] not in (need, c.sr_size):
        raise ValueError(f"tiles are {x.shape[-1]} px but training {stages} of preset {c.preset!r} needs {need} px")
    if len(zz) != len(x):
        raise ValueError(f"need one latent per tile: {len(x)} tiles, {len(zz)} latents")
    bdist.init()
    world = bdist.world_size()
    n_glob = min(tc.batch_size, len(x))
    if n_glob < world:
        raise ValueError(f"the global batch ({n_glob} tiles: batch_size {tc.batch_size}, {len(x)} tiles) is smaller "
                         f"than the number of processes ({world}): every process needs at least one tile")
    part, scale = bdist.rank_share(n_glob)
    if world > 1 and bdist.device().type == "cuda" and model.latent_mean.device != bdist.device():
        model.to(bdist.device())
    zz = model._check_latent(zz)
    if bool((model.latent_std == 1).all() and (model.latent_mean == 0).all()):
        model.latent_mean.copy_(zz.mean(0))
        model.latent_std.copy_(zz.std(0).clamp_min(1e-4) if len(zz) > 1 else torch.ones_like(model.latent_std))
    params = [p for s in stages for p in list(model.tokens[s].parameters()) + list(model.unets[s].parameters())]
    opt = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)

    def lr_factor(step: int, elapsed: float) -> float:
        # with a time budget, progress is whichever of steps and seconds is further along, so the
        # cosine decay finishes when training stops even if the machine is slower than expected
        if step < tc.warmup_steps:
            return (step + 1) / tc.warmup_steps
        p = (step - tc.warmup_steps) / max(1, tc.steps - tc.warmup_steps)
        if tc.max_seconds is not None:
            p = max(p, elapsed / tc.max_seconds)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, p)))

    def stage_losses(_trainable, xb, zb):
        ls = [model.loss(s, xb, zb, generator=g, **split) for s in stages]
        return sum(ls[1:], ls[0]), ls

    split = {} if world == 1 else {"global_batch": n_glob, "rank_slice": part}
    loss_fn = bdist.wrap_loss(_Trainable(model, stages), stage_losses)
    ema = copy.deepcopy({s: (model.tokens[s].state_dict(), model.unets[s].state_dict()) for s in stages}) if tc.ema_decay else None
    g = torch.Generator().manual_seed(tc.seed)
    hist: dict = {s: [] for s in stages}
    hist["step_seconds"] = []
    start, elapsed = 0, 0.0  # elapsed: the clock the LR schedule and the budget follow (ranks' mean)
    resumable = {"model": asdict(c), "train": {k: v for k, v in asdict(tc).items() if k != "steps"},  # may grow
                 "stages": list(stages), "tiles": list(x.shape)}
    if resume:
        if checkpoint_dir is None:
            raise ValueError("resume=True needs checkpoint_dir")
        from ...checkpoint import load_training_state

        flat_ema: dict = {}
        state = load_training_state(checkpoint_dir, modules={"model": model, "ema": flat_ema}, optimizers={"opt": opt},
                                    generators={"g": g}, config=resumable)
        start, elapsed, hist = state["step"], state["elapsed"], state["history"]
        if ema is not None:
            for s in stages:
                for part_name, tgt in zip(("tokens", "unets"), ema[s]):
                    for k in tgt:
                        tgt[k].copy_(flat_ema[f"{s}.{part_name}.{k}"])
    elif checkpoint_dir is not None and (Path(checkpoint_dir) / "trainer_state.json").exists():
        raise FileExistsError(f"{checkpoint_dir} already holds a checkpoint: pass resume=True or another folder")

    def save_checkpoint(step_done: int) -> None:
        from ...checkpoint import save_training_state

        flat = {} if ema is None else {f"{s}.{n}.{k}": v for s in stages
                                       for n, sd in zip(("tokens", "unets"), ema[s]) for k, v in sd.items()}
        save_training_state(checkpoint_dir, modules={"model": model, "ema": flat}, optimizers={"opt": opt},
                            generators={"g": g},
                            state={"step": step_done, "elapsed": elapsed, "history": hist, "config": resumable})

    t0 = time.perf_counter() - elapsed
    model.train()
    dev = model.latent_mean.device
    for step in range(start, tc.steps):
        ts = time.perf_counter()
        if world == 1:
            elapsed = ts - t0
        for group in opt.param_groups:
            group["lr"] = tc.lr * lr_factor(step, elapsed)
        idx = torch.randint(0, len(x), (n_glob,), generator=g)[part]
        xb, zb = x[idx].to(dev), zz[idx]
        if torch.rand((), generator=g) < 0.5:  # flips are label-preserving for tissue tiles
            xb = xb.flip(-1)
        if torch.rand((), generator=g) < 0.5:
            xb = xb.flip(-2)
        total, ls = loss_fn(xb, zb)
        opt.zero_grad(set_to_none=True)
        (total * scale if scale != 1.0 else total).backward()
        if tc.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
        opt.step()
        if ema is not None:
            with torch.no_grad():
                for s in stages:
                    for tgt, mod in zip(ema[s], (model.tokens[s], model.unets[s])):
                        for k, v in mod.state_dict().items():
                            if v.dtype.is_floating_point:
                                tgt[k].mul_(tc.ema_decay).add_(v.detach(), alpha=1 - tc.ema_decay)
                            else:
                                tgt[k].copy_(v)
        # one collective per step: the global-batch losses and the ranks' mean clock
        red = bdist.all_reduce_mean(np.array([float(l.detach()) * scale for l in ls] + [time.perf_counter() - t0]))
        for s, v in zip(stages, red[:-1]):
            hist[s].append(float(v))
        if world > 1:
            elapsed = float(red[-1])
        hist["step_seconds"].append(time.perf_counter() - ts)
        if log and bdist.is_main() and (step % 50 == 0 or step == tc.steps - 1):
            log(f"step {step + 1}/{tc.steps} " + " ".join(f"{s} {np.mean(hist[s][-50:]):.4f}" for s in stages)
                + f" ({time.perf_counter() - t0:.0f}s)")
        out_of_time = tc.max_seconds is not None and (elapsed if world > 1 else time.perf_counter() - t0) > tc.max_seconds
        if checkpoint_dir is not None and ((step + 1) % checkpoint_every == 0 or out_of_time or step == tc.steps - 1):
            elapsed = elapsed if world > 1 else time.perf_counter() - t0
            save_checkpoint(step + 1)
        if out_of_time:
            if log and bdist.is_main():
                log(f"stopping after {step + 1} steps: time budget of {tc.max_seconds:.0f}s reached")
            break
    if ema is not None:
        for s in stages:
            model.tokens[s].load_state_dict(ema[s][0])
            model.unets[s].load_state_dict(ema[s][1])
    model.eval()
    hist["seconds"] = time.perf_counter() - t0
    return hist
