"""PumaMedNet: a denoising beta-VAE for explainable, bias-aware medical image classification.

Seed 001 part 1 (SPEC 3.2). A convolutional beta-VAE learns a latent space of images from corrupted
inputs (random erasing, blur, noise, with rotation / flips / perspective as shared augmentation),
reconstructing the clean image; a spatial attention map weights the per-pixel reconstruction error;
a classifier runs on the latent mean. Explanations come from reconstructions, latent traversals, the
latent directions the classifier uses and the attention maps; the bias audit measures how much the
classifier's decision depends on an image region or a metadata attribute.

Layers: ``PumaMedNet`` is the network (tensors only) with ``save`` / ``load``; ``fit_vae`` and
``fit_classifier`` train it; ``explain`` and ``bias_audit`` analyse a trained model;
``make_synthetic_cxr`` makes chest-X-ray-like data with an optional planted shortcut.

Attention formulation
---------------------
A small dilated CNN on the (corrupted) input predicts logits ``l`` per pixel; the weight map is
``a = rho + (1 - rho) * H * W * softmax(l)`` over the pixels of each image, so ``mean(a) == 1`` and
``a >= rho`` everywhere (no region is ever ignored). The reconstruction loss uses ``a`` detached, and
the head is trained separately, by ``KL(q || softmax(l))``, towards the tempered error distribution
``q = softmax(e / (tau * mean(e)))`` where ``e`` is the detached per-pixel squared error, averaged over
channels and box-smoothed so that it marks regions rather than single pixels. ``q`` is the maximiser of
``sum(q * e) - tau * mean(e) * KL(q || uniform)``: the weights go to the regions the decoder finds
hard, with an entropy penalty that keeps them spread. Training the head to *minimise* the weighted
loss instead would collapse it onto the easiest pixels; the floor ``rho``, the temperature and the
stop-gradient rule that out.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import load_training_state, save_training_state

__all__ = [
    "PumaMedNetConfig", "PRESETS", "PumaMedNet", "VAELoss", "beta_vae_loss", "kl_diag_gaussian",
    "Corrupted", "corrupt", "random_geometry", "fit_vae", "fit_classifier", "latent_traversal",
    "classifier_directions", "explain", "AuditItem", "AuditReport", "bias_audit", "plot_audit",
    "grid_regions", "SyntheticCXR", "make_synthetic_cxr", "write_synthetic_folder", "load_images",
]


# --------------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class PumaMedNetConfig:
    """Architecture, corruption and training settings. Validated on construction.

    ``widths``: channels of the encoder stages; each stage halves the resolution, so ``image_size``
    must be divisible by ``2 ** len(widths)``. ``decoder_sigma``: std of the Gaussian decoder (the
    reconstruction term is ``sum(a * (x_hat - x) ** 2) / (2 sigma^2)``).
    """

    image_size: int = 64
    in_channels: int = 1
    widths: tuple[int, ...] = (32, 64, 128, 128)
    stage_convs: int = 2  # convolutions per resolution stage (the first one strided)
    latent_dim: int = 32
    beta: float = 4.0
    decoder_sigma: float = 0.1
    n_classes: int = 2
    clf_hidden: int = 0  # 0: linear head (its weights are the explainable latent directions)
    # attention
    attention: bool = True
    attention_floor: float = 0.3
    attention_temperature: float = 1.0
    attention_hidden: int = 16
    # corruption (input only) and augmentation (input and target)
    p_erase: float = 0.5
    erase_scale: tuple[float, float] = (0.02, 0.15)
    blur_sigma: float = 1.0
    noise_std: float = 0.05
    rotate_deg: float = 10.0
    p_hflip: float = 0.5
    p_vflip: float = 0.0
    perspective: float = 0.1
    # training
    epochs: int = 30
    batch_size: int = 64
    lr: float = 2e-3
    clf_epochs: int = 300
    clf_lr: float = 1e-2
    finetune_encoder: bool = False
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))
        object.__setattr__(self, "erase_scale", tuple(float(v) for v in self.erase_scale))
        if not 16 <= self.image_size <= 512:
            raise ValueError(f"image_size must be in [16, 512], got {self.image_size}")
        if self.in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 (grayscale) or 3 (RGB), got {self.in_channels}")
        if not self.widths or any(w < 1 for w in self.widths):
            raise ValueError(f"widths must be a non-empty tuple of positive ints, got {self.widths}")
        if self.image_size % (2 ** len(self.widths)):
            raise ValueError(f"image_size {self.image_size} must be divisible by 2**len(widths) = "
                             f"{2 ** len(self.widths)}")
        for name in ("latent_dim", "stage_convs", "attention_hidden", "epochs", "batch_size", "clf_epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.n_classes < 2:
            raise ValueError(f"n_classes must be >= 2, got {self.n_classes}")
        for name in ("beta", "clf_hidden", "blur_sigma", "noise_std", "rotate_deg", "perspective"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("decoder_sigma", "attention_temperature", "lr", "clf_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("p_erase", "p_hflip", "p_vflip", "attention_floor"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        lo, hi = self.erase_scale
        if not (len(self.erase_scale) == 2 and 0 < lo <= hi < 1):
            raise ValueError(f"erase_scale must be (lo, hi) with 0 < lo <= hi < 1, got {self.erase_scale}")
        if self.perspective >= 0.5:
            raise ValueError(f"perspective must be < 0.5, got {self.perspective}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "PumaMedNetConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown PumaMedNetConfig field(s): {sorted(unknown)}")
        return cls(**d)


# ``paper``: 256 px as used for ChestX-ray14 in the seed; widths and latent size are our choice
# (the seed gives no numbers).
PRESETS: dict[str, PumaMedNetConfig] = {
    "tiny": PumaMedNetConfig(image_size=32, widths=(8, 16, 32), stage_convs=1, latent_dim=16,
                             attention_hidden=8, epochs=8, batch_size=32, clf_epochs=300),
    # cpu: minutes on a laptop; one conv per stage and narrow early stages, where the pixels are
    "cpu": PumaMedNetConfig(image_size=64, widths=(16, 32, 64, 64), stage_convs=1, latent_dim=32,
                            attention_hidden=8, epochs=15, batch_size=32),
    "paper": PumaMedNetConfig(image_size=256, widths=(32, 64, 128, 256, 512, 512), latent_dim=128,
                              epochs=100, batch_size=64, lr=1e-3),
}


# ------------------------------------------------------------------------------------------ loss
def kl_diag_gaussian(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, diag(exp(logvar))) || N(0, I)) per sample.

    mu, logvar: (batch, latent) -> (batch,)
    """
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(-1)


@dataclass
class VAELoss:
    """Batch means of the terms: ``total = recon + beta * kl`` (+ the attention head's loss if any)."""

    total: torch.Tensor
    recon: torch.Tensor
    kl: torch.Tensor
    attention: Optional[torch.Tensor] = None


def beta_vae_loss(recon: torch.Tensor, target: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, *,
                  beta: float, decoder_sigma: float, weights: Optional[torch.Tensor] = None) -> VAELoss:
    """Negative beta-ELBO of a Gaussian decoder with optional per-pixel weights.

    recon, target: (batch, channels, h, w); mu, logvar: (batch, latent);
    weights: (batch, 1, h, w) or None (all ones). Returns batch means.
    """
    if recon.shape != target.shape:
        raise ValueError(f"recon shape {tuple(recon.shape)} != target shape {tuple(target.shape)}")
    if mu.shape != logvar.shape or mu.shape[0] != recon.shape[0]:
        raise ValueError(f"mu {tuple(mu.shape)} / logvar {tuple(logvar.shape)} must be (batch={recon.shape[0]}, latent)")
    err = (recon - target).pow(2)
    if weights is not None:
        err = err * weights
    rec = err.flatten(1).sum(-1) / (2.0 * decoder_sigma ** 2)
    kl = kl_diag_gaussian(mu, logvar)
    return VAELoss(total=(rec + beta * kl).mean(), recon=rec.mean(), kl=kl.mean())


# ------------------------------------------------------------------------------------ corruption
@dataclass
class Corrupted:
    """``inputs``: corrupted images fed to the encoder; ``targets``: the clean images to reconstruct.

    Both (batch, channels, h, w). The geometric augmentation (rotation, flips, perspective) is shared
    by both: a flipped input with an unflipped target would ask the decoder to undo an ambiguous flip.
    """

    inputs: torch.Tensor
    targets: torch.Tensor


def _rand(n: int, gen: torch.Generator, device, part: slice = slice(None)) -> torch.Tensor:
    return torch.rand(n, generator=gen)[part].to(device)


def _global_part(n: int, global_batch: Optional[int], rank_slice: Optional[slice]) -> tuple[int, slice]:
    """(size of the draws, this batch's part of them): the whole batch unless it is one rank's part."""
    if (global_batch is None) != (rank_slice is None):
        raise ValueError("pass global_batch and rank_slice together")
    if global_batch is None:
        return n, slice(None)
    if len(range(global_batch)[rank_slice]) != n:
        raise ValueError(f"rank_slice {rank_slice} of a global batch of {global_batch} does not hold {n} images")
    return global_batch, rank_slice


def random_geometry(x: torch.Tensor, cfg: PumaMedNetConfig, gen: torch.Generator, *,
                    global_batch: Optional[int] = None, rank_slice: Optional[slice] = None) -> torch.Tensor:
    """Random rotation, flips and perspective warp, one homography per image; outside fills with -1.

    x: (batch, channels, h, w) in [-1, 1] -> same shape. Draws its random numbers first from ``gen``,
    so ``corrupt`` with an equally seeded generator produces the same targets. With ``global_batch``
    and ``rank_slice``, x is that part of a global batch and the draws are the global batch's, sliced.
    """
    n, _, h, w = x.shape
    dev = x.device
    ng, part = _global_part(n, global_batch, rank_slice)
    ang = (_rand(ng, gen, dev, part) * 2 - 1) * math.radians(cfg.rotate_deg)
    fx = torch.where(_rand(ng, gen, dev, part) < cfg.p_hflip, -1.0, 1.0)
    fy = torch.where(_rand(ng, gen, dev, part) < cfg.p_vflip, -1.0, 1.0)
    px = (_rand(ng, gen, dev, part) * 2 - 1) * cfg.perspective
    py = (_rand(ng, gen, dev, part) * 2 - 1) * cfg.perspective
    if cfg.rotate_deg == 0 and cfg.p_hflip == 0 and cfg.p_vflip == 0 and cfg.perspective == 0:
        return x.clone()
    c, s = torch.cos(ang), torch.sin(ang)
    H = torch.zeros(n, 3, 3, device=dev)
    H[:, 0, 0], H[:, 0, 1] = c * fx, -s * fy
    H[:, 1, 0], H[:, 1, 1] = s * fx, c * fy
    H[:, 2, 0], H[:, 2, 1], H[:, 2, 2] = px, py, 1.0
    # output pixel centres in normalised coordinates (align_corners=False), mapped to source points
    ys = (torch.arange(h, device=dev) * 2 + 1) / h - 1
    xs = (torch.arange(w, device=dev) * 2 + 1) / w - 1
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    pts = torch.stack([gx, gy, torch.ones_like(gx)], -1).reshape(1, -1, 3)
    src = pts @ H.transpose(1, 2)
    src = src[..., :2] / src[..., 2:].clamp_min(1e-3)
    grid = src.reshape(n, h, w, 2).to(x.dtype)
    return F.grid_sample(x + 1.0, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1.0


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, sigma_max: Optional[float] = None) -> torch.Tensor:
    """Separable Gaussian blur with one sigma per image; sigma 0 leaves the image unchanged.

    The kernel radius is ``3 * sigma_max`` (default ``sigma.max()``), rounded up.
    """
    n, c, h, w = x.shape
    r = max(1, int(math.ceil(3 * float(sigma.max() if sigma_max is None else sigma_max))))
    t = torch.arange(-r, r + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-0.5 * (t[None] / sigma.clamp_min(1e-3)[:, None]) ** 2)
    k = k / k.sum(-1, keepdim=True)
    k = k.repeat_interleave(c, 0)  # (n*c, taps): per-image kernels as grouped convolution
    y = x.reshape(1, n * c, h, w)
    y = F.conv2d(F.pad(y, (r, r, 0, 0), mode="replicate"), k[:, None, None, :], groups=n * c)
    y = F.conv2d(F.pad(y, (0, 0, r, r), mode="replicate"), k[:, None, :, None], groups=n * c)
    return y.reshape(n, c, h, w)


def corrupt(x: torch.Tensor, cfg: PumaMedNetConfig, gen: torch.Generator, *,
            global_batch: Optional[int] = None, rank_slice: Optional[slice] = None) -> Corrupted:
    """Denoising pair: augmented clean target and its corrupted copy (blur, noise, random erasing).

    x: (batch, channels, h, w) in [-1, 1]. The random erasing fills a rectangle (area fraction in
    ``cfg.erase_scale``, aspect ratio in [0.3, 3.3]) with uniform noise, so the decoder must predict
    the missing patch from its context. With ``global_batch`` and ``rank_slice`` (the distributed
    trainer), x is that part of a global batch: every random number is drawn for the global batch
    and sliced, so the ranks' parts together equal one process's corruption of the whole batch.
    """
    n, c, h, w = x.shape
    ng, part = _global_part(n, global_batch, rank_slice)
    target = random_geometry(x, cfg, gen, global_batch=global_batch, rank_slice=rank_slice)
    dev = target.device
    y = target
    if cfg.blur_sigma > 0:
        sig = torch.rand(ng, generator=gen) * cfg.blur_sigma
        y = _gaussian_blur(y, sig[part].to(dev), float(sig.max()))  # the global batch's kernel radius
    if cfg.noise_std > 0:
        y = y + cfg.noise_std * torch.randn((ng,) + tuple(y.shape[1:]), generator=gen)[part].to(dev, y.dtype)
    if cfg.p_erase > 0:
        do = _rand(ng, gen, dev, part) < cfg.p_erase
        lo, hi = cfg.erase_scale
        area = (lo + (hi - lo) * _rand(ng, gen, dev, part)) * h * w
        ratio = torch.exp(math.log(0.3) + (math.log(3.3) - math.log(0.3)) * _rand(ng, gen, dev, part))
        eh = (area * ratio).sqrt().round().clamp(1, h)
        ew = (area / ratio).sqrt().round().clamp(1, w)
        y0 = ((h - eh) * _rand(ng, gen, dev, part)).floor()
        x0 = ((w - ew) * _rand(ng, gen, dev, part)).floor()
        rr = torch.arange(h, device=dev)[None, :, None]
        cc = torch.arange(w, device=dev)[None, None, :]
        m = ((rr >= y0[:, None, None]) & (rr < (y0 + eh)[:, None, None]) & (cc >= x0[:, None, None])
             & (cc < (x0 + ew)[:, None, None]) & do[:, None, None])[:, None]
        fill = torch.rand((ng,) + tuple(y.shape[1:]), generator=gen)[part].to(dev, y.dtype) * 2 - 1
        y = torch.where(m, fill, y)
    return Corrupted(inputs=y.clamp(-1, 1), targets=target)


# ---------------------------------------------------------------------------------------- network
def _gn(ch: int) -> nn.GroupNorm:
    # GroupNorm, not BatchNorm: no batch statistics, so outputs do not depend on batch composition
    return nn.GroupNorm(math.gcd(8, ch), ch)


class _Encoder(nn.Module):
    def __init__(self, cfg: PumaMedNetConfig):
        super().__init__()
        layers, cin = [], cfg.in_channels
        for w in cfg.widths:
            layers += [nn.Conv2d(cin, w, 4, 2, 1), _gn(w), nn.SiLU()]
            for _ in range(cfg.stage_convs - 1):
                layers += [nn.Conv2d(w, w, 3, 1, 1), _gn(w), nn.SiLU()]
            cin = w
        self.body = nn.Sequential(*layers)
        r = cfg.image_size // 2 ** len(cfg.widths)
        self.head = nn.Linear(cfg.widths[-1] * r * r, 2 * cfg.latent_dim)

    def forward(self, x):
        mu, logvar = self.head(self.body(x).flatten(1)).chunk(2, -1)
        return mu, logvar.clamp(-12.0, 8.0)


class _Decoder(nn.Module):
    def __init__(self, cfg: PumaMedNetConfig):
        super().__init__()
        self.r = cfg.image_size // 2 ** len(cfg.widths)
        self.w_last = cfg.widths[-1]
        self.fc = nn.Linear(cfg.latent_dim, self.w_last * self.r * self.r)
        ws = list(cfg.widths[::-1]) + [cfg.widths[0]]
        layers = []
        for a, b in zip(ws[:-1], ws[1:]):
            # nearest upsampling + conv: no checkerboard artefacts, and much faster than
            # ConvTranspose2d on CPU
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(a, b, 3, 1, 1), _gn(b), nn.SiLU()]
            for _ in range(cfg.stage_convs - 1):
                layers += [nn.Conv2d(b, b, 3, 1, 1), _gn(b), nn.SiLU()]
        layers += [nn.Conv2d(ws[-1], cfg.in_channels, 3, 1, 1)]
        self.body = nn.Sequential(*layers)

    def forward(self, z):
        return torch.tanh(self.body(self.fc(z).view(-1, self.w_last, self.r, self.r)))


class _AttentionHead(nn.Module):
    def __init__(self, cfg: PumaMedNetConfig):
        super().__init__()
        h = cfg.attention_hidden
        # dilations 1, 2, 4: a 15 px receptive field at full resolution for little compute
        self.net = nn.Sequential(
            nn.Conv2d(cfg.in_channels, h, 3, 1, 1), nn.SiLU(),
            nn.Conv2d(h, h, 3, 1, 2, dilation=2), nn.SiLU(),
            nn.Conv2d(h, h, 3, 1, 4, dilation=4), nn.SiLU(),
            nn.Conv2d(h, 1, 1),
        )

    def forward(self, x):
        return self.net(x)


class PumaMedNet(nn.Module):
    """Denoising beta-VAE with an attention head and a classifier on the latent mean.

    Images are (batch, in_channels, image_size, image_size) float in [-1, 1].
    """

    def __init__(self, cfg: PumaMedNetConfig, classes: Optional[Sequence[str]] = None):
        super().__init__()
        self.cfg = cfg
        self.classes = list(classes) if classes is not None else [str(i) for i in range(cfg.n_classes)]
        if len(self.classes) != cfg.n_classes:
            raise ValueError(f"classes has {len(self.classes)} names but n_classes is {cfg.n_classes}")
        self.encoder = _Encoder(cfg)
        self.decoder = _Decoder(cfg)
        self.attention_head = _AttentionHead(cfg) if cfg.attention else None
        if cfg.clf_hidden:
            self.classifier = nn.Sequential(nn.Linear(cfg.latent_dim, cfg.clf_hidden), nn.SiLU(),
                                            nn.Linear(cfg.clf_hidden, cfg.n_classes))
        else:
            self.classifier = nn.Linear(cfg.latent_dim, cfg.n_classes)

    # -- checks
    def check_images(self, x: torch.Tensor, name: str = "images") -> None:
        c, s = self.cfg.in_channels, self.cfg.image_size
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.ndim != 4 or x.shape[1:] != (c, s, s):
            raise ValueError(f"{name} must have shape (batch, {c}, {s}, {s}), got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got {x.dtype}")

    # -- pieces
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (batch, c, s, s) -> mu, logvar: (batch, latent)."""
        self.check_images(x)
        return self.encoder(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z: (batch, latent) -> images (batch, c, s, s) in [-1, 1]."""
        if z.ndim != 2 or z.shape[1] != self.cfg.latent_dim:
            raise ValueError(f"z must have shape (batch, {self.cfg.latent_dim}), got {tuple(z.shape)}")
        return self.decoder(z)

    def attention_logits(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        return None if self.attention_head is None else self.attention_head(x)

    def attention_weights(self, x: torch.Tensor) -> torch.Tensor:
        """Per-pixel reconstruction weights (batch, 1, s, s), mean 1 per image, >= attention_floor.

        Ones when the model has no attention head.
        """
        self.check_images(x)
        n, _, h, w = x.shape
        if self.attention_head is None:
            return torch.ones(n, 1, h, w, device=x.device, dtype=x.dtype)
        p = torch.softmax(self.attention_head(x).flatten(1), -1).view(n, 1, h, w)
        rho = self.cfg.attention_floor
        return rho + (1.0 - rho) * (h * w) * p

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits (batch, n_classes) from the latent mean of x."""
        mu, _ = self.encode(x)
        return self.classifier(mu)

    @torch.no_grad()
    def predict(self, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Predicted class indices (batch,)."""
        return torch.cat([self.logits(b).argmax(-1) for b in x.split(batch_size)])

    @torch.no_grad()
    def latent_mean(self, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """mu (batch, latent) in batches."""
        return torch.cat([self.encode(b)[0] for b in x.split(batch_size)])

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Decoder output at the latent mean (batch, c, s, s)."""
        return torch.cat([self.decoder(self.encode(b)[0]) for b in x.split(batch_size)])

    def forward(self, x: torch.Tensor, gen: Optional[torch.Generator] = None, eps: Optional[torch.Tensor] = None):
        """Returns (recon, mu, logvar); samples z with ``eps`` (batch, latent) when given, else with ``gen``."""
        mu, logvar = self.encode(x)
        if eps is not None:
            if eps.shape != mu.shape:
                raise ValueError(f"eps must have shape {tuple(mu.shape)}, got {tuple(eps.shape)}")
            eps = eps.to(mu)
        else:
            eps = torch.randn(mu.shape, generator=gen).to(mu) if gen is not None else torch.randn_like(mu)
        return self.decoder(mu + eps * (0.5 * logvar).exp()), mu, logvar

    def loss(self, inputs: torch.Tensor, targets: torch.Tensor, gen: Optional[torch.Generator] = None,
             eps: Optional[torch.Tensor] = None) -> VAELoss:
        """Denoising beta-VAE loss with attention-weighted reconstruction (see the module docstring).

        ``eps`` (batch, latent): the reparameterisation noise, else drawn from ``gen``.
        """
        self.check_images(targets, "targets")
        recon, mu, logvar = self(inputs, gen, eps)
        if self.attention_head is None:
            return beta_vae_loss(recon, targets, mu, logvar, beta=self.cfg.beta, decoder_sigma=self.cfg.decoder_sigma)
        n, _, h, w = inputs.shape
        logits = self.attention_head(inputs.detach()).flatten(1)
        rho = self.cfg.attention_floor
        a = rho + (1.0 - rho) * (h * w) * torch.softmax(logits, -1).view(n, 1, h, w)
        out = beta_vae_loss(recon, targets, mu, logvar, beta=self.cfg.beta, decoder_sigma=self.cfg.decoder_sigma,
                            weights=a.detach())
        with torch.no_grad():
            e = (recon - targets).pow(2).mean(1, keepdim=True)
            k = max(3, (h // 16) | 1)
            e = F.avg_pool2d(e, k, 1, k // 2, count_include_pad=False).flatten(1)
            q = torch.softmax(e / (self.cfg.attention_temperature * e.mean(-1, keepdim=True).clamp_min(1e-8)), -1)
        att = (q * (q.clamp_min(1e-12).log() - torch.log_softmax(logits, -1))).sum(-1).mean()
        out.attention = att
        out.total = out.total + att
        return out

    # -- persistence
    def save(self, path: str | Path) -> Path:
        """Write ``model.safetensors`` and ``config.json`` into folder ``path``, each atomically."""
        from safetensors.torch import save_file

        from ..utils import atomic_path, write_json

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        with atomic_path(path / "model.safetensors") as tmp:
            save_file(state, str(tmp))
        write_json(path / "config.json", {"model": "pumamednet", "config": self.cfg.to_dict(), "classes": self.classes})
        return path

    @classmethod
    def load(cls, path: str | Path, map_location: str | torch.device = "cpu") -> "PumaMedNet":
        """Inverse of ``save``."""
        from safetensors.torch import load_file

        path = Path(path)
        for f in ("config.json", "model.safetensors"):
            if not (path / f).is_file():
                raise FileNotFoundError(f"{path} is not a saved PumaMedNet: missing {f}")
        meta = json.loads((path / "config.json").read_text())
        if meta.get("model") != "pumamednet":
            raise ValueError(f"{path / 'config.json'} is not a PumaMedNet config (model={meta.get('model')!r})")
        model = cls(PumaMedNetConfig.from_dict(meta["config"]), meta["classes"])
        model.load_state_dict(load_file(str(path / "model.safetensors"), device=str(map_location)))
        return model.to(map_location).eval()


# --------------------------------------------------------------------------------------- training
def _check_data(model: PumaMedNet, images: torch.Tensor, labels: Optional[torch.Tensor] = None) -> None:
    model.check_images(images)
    if labels is not None:
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels must have shape ({images.shape[0]},), got {tuple(labels.shape)}")
        if labels.min() < 0 or labels.max() >= model.cfg.n_classes:
            raise ValueError(f"labels must be in [0, {model.cfg.n_classes}), got range "
                             f"[{int(labels.min())}, {int(labels.max())}]")


class _Parts(nn.Module):
    """A container of some of a model's submodules: DDP then synchronises exactly their parameters."""

    def __init__(self, **parts: Optional[nn.Module]) -> None:
        super().__init__()
        for k, m in parts.items():
            if m is not None:
                self.add_module(k, m)


def _resumable(cfg: PumaMedNetConfig) -> dict:
    """What a resumed run must share with its checkpoint: everything but the number of epochs."""
    return {k: v for k, v in cfg.to_dict().items() if k != "epochs"}


def fit_vae(model: PumaMedNet, images: torch.Tensor, *, epochs: Optional[int] = None,
            gen: Optional[torch.Generator] = None, log: Optional[list] = None,
            checkpoint_dir: Optional[str] = None, resume: bool = False) -> list[dict]:
    """Train the denoising beta-VAE (and attention head) on images (n, c, s, s) in [-1, 1].

    Returns one dict of mean losses per epoch (also appended to ``log`` if given).
    ``checkpoint_dir``: after every epoch write weights, optimizer, generator state and history there
    (see :mod:`biogen.checkpoint`); ``resume=True`` continues from it (with the same configuration)
    and repeats what the uninterrupted run would have done.

    Runs unchanged under ``torchrun --nproc_per_node N`` (see :mod:`biogen.distributed`): ``cfg.batch_size``
    is the *global* batch; every rank draws the same permutation and the corruption and latent
    noise of the whole global batch, and trains on its contiguous part under DistributedDataParallel
    (GroupNorm has no batch statistics), so a step on N ranks equals one single-process step up to
    floating-point reduction order. A last global batch smaller than N is skipped. The epoch losses
    are exact means over all ranks' images. The model must be on this rank's device.
    """
    from .. import distributed as bdist

    _check_data(model, images)
    cfg = model.cfg
    bdist.init()
    world = bdist.world_size()
    if cfg.batch_size < world or images.shape[0] < world:
        raise ValueError(f"batch_size ({cfg.batch_size}) is the global batch and must be >= the number of "
                         f"processes ({world}), and so must the number of images ({images.shape[0]})")
    gen = gen or torch.Generator().manual_seed(cfg.seed)
    params = [p for n, p in model.named_parameters() if not n.startswith("classifier.")]
    opt = torch.optim.Adam(params, lr=cfg.lr)
    dev = next(model.parameters()).device

    def vae_loss(_parts, inputs, targets, eps):
        out = model.loss(inputs, targets, gen) if eps is None else model.loss(inputs, targets, eps=eps)
        zero = out.total.new_zeros(())
        return out.total, out.recon, out.kl, zero if out.attention is None else out.attention

    loss_fn = bdist.wrap_loss(_Parts(encoder=model.encoder, decoder=model.decoder,
                                     attention_head=model.attention_head), vae_loss)
    history = log if log is not None else []
    start = 0
    if resume:
        if checkpoint_dir is None:
            raise ValueError("resume=True needs checkpoint_dir")
        state = load_training_state(checkpoint_dir, modules={"model": model}, optimizers={"opt": opt},
                                    generators={"gen": gen}, config=_resumable(cfg))
        start = state["epoch"]
        history.extend(state["history"])
    elif checkpoint_dir is not None and os.path.exists(os.path.join(checkpoint_dir, "trainer_state.json")):
        raise FileExistsError(f"{checkpoint_dir} already holds a checkpoint: pass resume=True or another folder")
    model.train()
    n = images.shape[0]
    for ep in range(start, epochs if epochs is not None else cfg.epochs):
        perm = torch.randperm(n, generator=gen)
        sums = np.zeros(5)  # loss, recon, kl, attention (each times the images), images
        for i in range(0, n, cfg.batch_size):
            n_glob = min(cfg.batch_size, n - i)
            if n_glob < world:  # ranks stay in lockstep: a tail too small to share is skipped by all
                break
            part, scale = bdist.rank_share(n_glob)
            x = images[perm[i:i + n_glob][part]].to(dev)
            eps = None
            if world > 1:
                pair = corrupt(x, cfg, gen, global_batch=n_glob, rank_slice=part)
                eps = torch.randn((n_glob, cfg.latent_dim), generator=gen)[part].to(dev)
            else:
                pair = corrupt(x, cfg, gen)
            total, recon, kl, att = loss_fn(pair.inputs, pair.targets, eps)
            opt.zero_grad(set_to_none=True)
            (total * scale if scale != 1.0 else total).backward()
            opt.step()
            b = x.shape[0]
            sums += [float(total.detach()) * b, float(recon.detach()) * b, float(kl.detach()) * b,
                     float(att.detach()) * b, b]
        sums = bdist.all_reduce_sum(sums)
        history.append({"epoch": ep + 1, **{k: float(v / sums[4]) for k, v in
                                            zip(("loss", "recon", "kl", "attention"), sums[:4])}})
        if checkpoint_dir is not None:
            save_training_state(checkpoint_dir, modules={"model": model}, optimizers={"opt": opt},
                                generators={"gen": gen},
                                state={"epoch": ep + 1, "history": history[-(ep + 1):], "config": _resumable(cfg)})
    model.eval()
    return history


def fit_classifier(model: PumaMedNet, images: torch.Tensor, labels: torch.Tensor, *,
                   finetune: Optional[bool] = None, epochs: Optional[int] = None,
                   gen: Optional[torch.Generator] = None) -> dict:
    """Train the classifier head on the latent mean of clean images.

    Frozen encoder (default): full-batch Adam on the cached latents, ``cfg.clf_epochs`` steps.
    ``finetune=True``: encoder and head trained together by minibatches, ``epochs`` (default
    ``max(1, cfg.epochs // 3)``) passes at a tenth of ``cfg.lr``. Returns the training accuracy and loss.

    Under ``torchrun`` (see :mod:`biogen.distributed`): frozen, each rank encodes only its contiguous
    shard of the images and the full-batch loss is the exact mean over all shards (DDP on the head);
    fine-tuned, each global minibatch is split across the ranks as in :func:`fit_vae`. Accuracy and
    loss are exact over all images.
    """
    from .. import distributed as bdist

    _check_data(model, images, labels)
    cfg = model.cfg
    finetune = cfg.finetune_encoder if finetune is None else finetune
    bdist.init()
    world = bdist.world_size()
    n = images.shape[0]
    if n < world:
        raise ValueError(f"{n} image(s) cannot be shared by {world} processes")
    gen = gen or torch.Generator().manual_seed(cfg.seed + 1)
    dev = next(model.parameters()).device
    y = labels.to(dev).long()
    shard, shard_scale = bdist.rank_share(n)  # the whole set in one process
    model.eval()
    if not finetune:
        mu = model.latent_mean(images[shard].to(dev))
        ys = y[shard]
        head = bdist.wrap_ddp(model.classifier)
        opt = torch.optim.Adam(model.classifier.parameters(), lr=cfg.clf_lr)
        for _ in range(epochs if epochs is not None else cfg.clf_epochs):
            loss = F.cross_entropy(head(mu), ys)
            opt.zero_grad(set_to_none=True)
            (loss * shard_scale if shard_scale != 1.0 else loss).backward()
            opt.step()
    else:
        if cfg.batch_size < world:
            raise ValueError(f"batch_size ({cfg.batch_size}) is the global batch and must be >= the number of "
                             f"processes ({world})")
        params = list(model.encoder.parameters()) + list(model.classifier.parameters())
        opt = torch.optim.Adam(params, lr=cfg.lr / 10)
        logits_fn = bdist.wrap_loss(_Parts(encoder=model.encoder, classifier=model.classifier),
                                    lambda _parts, xb: model.logits(xb))
        for _ in range(epochs if epochs is not None else max(1, cfg.epochs // 3)):
            perm = torch.randperm(n, generator=gen)
            for i in range(0, n, cfg.batch_size):
                n_glob = min(cfg.batch_size, n - i)
                if n_glob < world:
                    break
                part, scale = bdist.rank_share(n_glob)
                idx = perm[i:i + n_glob][part]
                loss = F.cross_entropy(logits_fn(images[idx].to(dev)), y[idx.to(dev)])
                opt.zero_grad(set_to_none=True)
                (loss * scale if scale != 1.0 else loss).backward()
                opt.step()
    model.eval()
    with torch.no_grad():
        if world == 1:
            logits = torch.cat([model.logits(b) for b in images.to(dev).split(256)])
            return {"train_accuracy": float((logits.argmax(-1) == y).float().mean()),
                    "train_loss": float(F.cross_entropy(logits, y))}
        logits = torch.cat([model.logits(b) for b in images[shard].to(dev).split(256)])
        ys = y[shard]
        s = bdist.all_reduce_sum(np.array([float((logits.argmax(-1) == ys).sum()),
                                           float(F.cross_entropy(logits.double(), ys, reduction="sum")), len(ys)]))
        return {"train_accuracy": float(s[0] / s[2]), "train_loss": float(s[1] / s[2])}


# --------------------------------------------------------------------------------- explainability
@torch.no_grad()
def latent_traversal(model: PumaMedNet, image: torch.Tensor, dims: Optional[Sequence[int]] = None, *,
                     n_steps: int = 7, span: float = 3.0) -> torch.Tensor:
    """Decode the latent mean of ``image`` with one latent moved along [-span, span].

    image: (c, s, s) or (1, c, s, s); dims: latent axes (default all) ->
    (len(dims), n_steps, c, s, s).
    """
    if image.ndim == 3:
        image = image[None]
    if image.shape[0] != 1:
        raise ValueError(f"image must be a single image (c, s, s), got {tuple(image.shape)}")
    if n_steps < 2:
        raise ValueError(f"n_steps must be >= 2, got {n_steps}")
    L = model.cfg.latent_dim
    dims = list(range(L)) if dims is None else [int(d) for d in dims]
    bad = [d for d in dims if not 0 <= d < L]
    if bad:
        raise ValueError(f"dims {bad} out of range for latent_dim {L}")
    mu = model.encode(image)[0][0]
    vals = torch.linspace(-span, span, n_steps, device=mu.device)
    z = mu.repeat(len(dims), n_steps, 1)
    for i, d in enumerate(dims):
        z[i, :, d] = vals
    out = model.decoder(z.reshape(-1, L))
    return out.reshape(len(dims), n_steps, *out.shape[1:])


def _margin_grad(model: PumaMedNet, mu: torch.Tensor) -> torch.Tensor:
    """d(top logit - runner-up logit)/d mu per sample: (n, latent), the local decision direction."""
    mu = mu.detach().requires_grad_(True)
    with torch.enable_grad():
        lg = model.classifier(mu)
        top2 = lg.topk(2, -1).indices
        margin = lg.gather(1, top2[:, :1]) - lg.gather(1, top2[:, 1:2])
        (g,) = torch.autograd.grad(margin.sum(), mu)
    return g


def _contrast_grad(model: PumaMedNet, mu: torch.Tensor, hi: int = 1, lo: int = 0) -> torch.Tensor:
    """d(logit[hi] - logit[lo])/d mu per sample: (n, latent); one sign for all samples, unlike the margin."""
    mu = mu.detach().requires_grad_(True)
    with torch.enable_grad():
        lg = model.classifier(mu)
        (g,) = torch.autograd.grad((lg[:, hi] - lg[:, lo]).sum(), mu)
    return g


def classifier_directions(model: PumaMedNet, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Latent axes ranked by how much the classifier's decision uses them.

    Importance of axis j = mean |d margin / d mu_j| * std(mu_j) over the images (for a linear head,
    |weight difference| times the axis's spread). Returns (dims sorted, importance of each), both (latent,).
    """
    mu = model.latent_mean(images)
    imp = (_margin_grad(model, mu).abs().mean(0) * mu.std(0)).cpu().numpy()
    order = np.argsort(-imp)
    return order, imp[order]


def _overlay(images: torch.Tensor, maps: torch.Tensor) -> np.ndarray:
    """Images (n, c, s, s) in [-1, 1] with maps (n, 1, s, s) as a colour overlay -> (n, 3, s, s) in [-1, 1]."""
    from matplotlib import colormaps

    g = ((images.mean(1) + 1) / 2).clamp(0, 1).cpu().numpy()
    m = maps[:, 0].cpu().numpy()
    m = (m - m.min(axis=(1, 2), keepdims=True)) / np.ptp(m, axis=(1, 2), keepdims=True).clip(1e-8)
    rgb = colormaps["inferno"](m)[..., :3]
    out = 0.5 * g[..., None] + 0.5 * rgb
    return out.transpose(0, 3, 1, 2) * 2 - 1


def _up(x, factor: int) -> np.ndarray:
    """Nearest-neighbour upscaling (n, c, s, s) so that small images stay legible in the PNG grids."""
    x = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x.detach().cpu())
    return (x if factor == 1 else x.repeat_interleave(factor, -1).repeat_interleave(factor, -2)).numpy()


def explain(model: PumaMedNet, images: torch.Tensor, out_dir: str | Path, *, n_images: int = 8,
            n_steps: int = 7, top_k: int = 6, gen: Optional[torch.Generator] = None) -> dict:
    """Write explanation PNG grids into ``out_dir`` and return what they show.

    - ``reconstructions.png``: rows of (clean, corrupted, reconstruction of the corrupted).
    - ``traversals.png``: the ``top_k`` latent axes most used by the classifier, one row each.
    - ``classifier_direction.png``: up to 4 images moved along the classifier's mean direction from
      class 0 to class 1 (the gradient of ``logit[1] - logit[0]``), one row each.
    - ``attention.png``: input images and their attention weight maps.

    Images smaller than 128 px are upscaled (nearest neighbour) by ``128 // image_size`` in the grids.
    """
    from ..data.images import save_grid

    model.check_images(images)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    f = max(1, 128 // model.cfg.image_size)
    model.eval()
    gen = gen or torch.Generator().manual_seed(model.cfg.seed + 2)
    x = images[:n_images]
    with torch.no_grad():
        pair = corrupt(x, replace(model.cfg, rotate_deg=0.0, p_hflip=0.0, p_vflip=0.0, perspective=0.0), gen)
        rec = model.reconstruct(pair.inputs)
    rows = torch.stack([x, pair.inputs, rec], 1).reshape(-1, *x.shape[1:])
    save_grid(_up(rows, f), out / "reconstructions.png", nrow=3)
    dims, imp = classifier_directions(model, images)
    k = min(top_k, model.cfg.latent_dim)
    trav = latent_traversal(model, images[0], dims[:k], n_steps=n_steps)
    save_grid(_up(trav.reshape(-1, *trav.shape[2:]), f), out / "traversals.png", nrow=n_steps)
    with torch.no_grad():
        mu = model.latent_mean(images)
        d = _contrast_grad(model, mu).mean(0)
        d = d / d.norm().clamp_min(1e-8)
        proj = (mu - mu.mean(0)) @ d
        t = torch.linspace(float(proj.min()), float(proj.max()), n_steps, device=mu.device)
        base = mu[:min(4, len(mu))]
        z = base[:, None, :] + (t[None, :, None] - (base @ d)[:, None, None]) * d
        dir_imgs = model.decoder(z.reshape(-1, z.shape[-1]))
        dir_pred = model.classifier(z.reshape(-1, z.shape[-1])).argmax(-1).reshape(len(base), n_steps)
        att = model.attention_weights(x)
    save_grid(_up(dir_imgs, f), out / "classifier_direction.png", nrow=n_steps)
    att_rows = np.concatenate([x.cpu().numpy().repeat(3 // x.shape[1], 1) if x.shape[1] == 1 else x.cpu().numpy(),
                               _overlay(x, att)], 0)
    save_grid(_up(att_rows, f), out / "attention.png", nrow=len(x))
    return {
        "top_latent_dims": [int(v) for v in dims[:k]],
        "importance": [float(v) for v in imp[:k]],
        "classifier_direction_predictions": [[model.classes[int(c)] for c in row] for row in dir_pred.cpu()],
        "attention_max_over_mean": [float(a.max()) for a in att],
        "upscale": f,
        "files": ["reconstructions.png", "traversals.png", "classifier_direction.png", "attention.png"],
    }


# ------------------------------------------------------------------------------------- bias audit
@dataclass
class AuditItem:
    """Dependence of the classifier's decision on one candidate (image region or metadata attribute).

    ``score``: fraction of decisions that flip when the candidate is swapped (region copied from an
    image the model classifies differently; latent moved to the other attribute group).
    ``acc_drop_remove`` / ``acc_drop_swap``: accuracy lost when it is removed (region filled with the
    data-set mean; attribute direction projected out) or swapped. ``alignment``: |cosine| between
    the latent change it causes and the classifier's decision direction. ``top_latents``: the latent
    axes it moves most (in units of each axis's spread).
    """

    name: str
    kind: str
    score: float
    acc_drop_remove: float
    acc_drop_swap: float
    alignment: float
    top_latents: list[int]
    detail: dict = field(default_factory=dict)


@dataclass
class AuditReport:
    baseline_accuracy: float
    items: list[AuditItem]  # sorted by score, highest first
    threshold: float

    @property
    def ranking(self) -> list[str]:
        return [it.name for it in self.items]

    @property
    def flagged(self) -> list[str]:
        return [it.name for it in self.items if it.score >= self.threshold]

    def to_dict(self) -> dict:
        return {"baseline_accuracy": self.baseline_accuracy, "threshold": self.threshold,
                "ranking": self.ranking, "flagged": self.flagged, "items": [asdict(i) for i in self.items]}


def grid_regions(image_size: int, grid: int) -> dict[str, tuple[int, int, int, int]]:
    """A grid x grid tiling as named regions ``r{row}c{col}`` -> (y0, y1, x0, x1)."""
    if not 1 <= grid <= image_size:
        raise ValueError(f"grid must be in [1, image_size={image_size}], got {grid}")
    edges = np.linspace(0, image_size, grid + 1).round().astype(int)
    return {f"r{i}c{j}": (int(edges[i]), int(edges[i + 1]), int(edges[j]), int(edges[j + 1]))
            for i in range(grid) for j in range(grid)}


def _top_latents(delta: torch.Tensor, spread: torch.Tensor, k: int = 3) -> list[int]:
    return [int(i) for i in (delta.abs().mean(0) / spread.clamp_min(1e-8)).argsort(descending=True)[:k]]


@torch.no_grad()
def bias_audit(model: PumaMedNet, images: torch.Tensor, labels: torch.Tensor, *,
               regions: Optional[dict[str, tuple[int, int, int, int]]] = None, grid: Optional[int] = 4,
               attributes: Optional[dict[str, np.ndarray]] = None, threshold: float = 0.2,
               gen: Optional[torch.Generator] = None) -> AuditReport:
    """Measure how much the classifier's decisions depend on image regions and metadata attributes.

    images: (n, c, s, s); labels: (n,); regions: name -> (y0, y1, x0, x1) (added to a ``grid`` x
    ``grid`` tiling unless ``grid`` is None); attributes: name -> (n,) values (categorical; numeric
    with more than 10 distinct values are split at the median). Use data where the candidate is NOT
    correlated with the label (a held-out set): there a dependence is a shortcut, not a signal.

    Region swap: each image receives the region from a random image the model assigns to another
    class. Attribute swap: the latent mean moves by the attribute's direction, estimated as the
    label-stratified difference of group means of mu, to the other group.
    """
    _check_data(model, images, labels)
    if len(torch.unique(labels)) < 2:
        raise ValueError("bias_audit needs images of at least two classes")
    model.eval()
    n, _, s, _ = images.shape
    gen = gen or torch.Generator().manual_seed(model.cfg.seed + 3)
    dev = next(model.parameters()).device
    images, y = images.to(dev), labels.to(dev)
    mu = model.latent_mean(images)
    spread = mu.std(0)
    pred = model.classifier(mu).argmax(-1)
    base_acc = float((pred == y).float().mean())
    gdir = _margin_grad(model, mu)
    acc = lambda p: float((p == y).float().mean())  # noqa: E731

    def alignment(delta):
        cos = F.cosine_similarity(delta, gdir, dim=-1, eps=1e-8).abs()
        keep = delta.norm(dim=-1) > 1e-6
        return float(cos[keep].mean()) if keep.any() else 0.0

    # donors: an image predicted as another class (else labelled as another class)
    key = pred if len(torch.unique(pred)) > 1 else y
    donors = torch.empty(n, dtype=torch.long, device=dev)
    for c in torch.unique(key):
        idx, pool = torch.nonzero(key == c).flatten(), torch.nonzero(key != c).flatten()
        donors[idx] = pool[torch.randint(len(pool), (len(idx),), generator=gen).to(dev)]
    mean_img = images.mean(0, keepdim=True)

    items = []
    cand = dict(grid_regions(s, grid)) if grid else {}
    for name, reg in (regions or {}).items():
        y0, y1, x0, x1 = (int(v) for v in reg)
        if not (0 <= y0 < y1 <= s and 0 <= x0 < x1 <= s):
            raise ValueError(f"region {name!r} = {reg} must satisfy 0 <= y0 < y1 <= {s}, 0 <= x0 < x1 <= {s}")
        cand[name] = (y0, y1, x0, x1)
    for name, (y0, y1, x0, x1) in cand.items():
        sw = images.clone()
        sw[:, :, y0:y1, x0:x1] = images[donors][:, :, y0:y1, x0:x1]
        rm = images.clone()
        rm[:, :, y0:y1, x0:x1] = mean_img[:, :, y0:y1, x0:x1]
        mu_sw, mu_rm = model.latent_mean(sw), model.latent_mean(rm)
        p_sw, p_rm = model.classifier(mu_sw).argmax(-1), model.classifier(mu_rm).argmax(-1)
        items.append(AuditItem(
            name=name, kind="region", score=float((p_sw != pred).float().mean()),
            acc_drop_remove=base_acc - acc(p_rm), acc_drop_swap=base_acc - acc(p_sw),
            alignment=alignment(mu_sw - mu), top_latents=_top_latents(mu_sw - mu, spread),
            detail={"region": [y0, y1, x0, x1], "flip_rate_remove": float((p_rm != pred).float().mean())}))

    for name, values in (attributes or {}).items():
        v = np.asarray(values)
        if v.shape != (n,):
            raise ValueError(f"attribute {name!r} must have shape ({n},), got {v.shape}")
        note = None
        if np.issubdtype(v.dtype, np.number) and len(np.unique(v)) > 10:
            v = v > np.median(v)
            note = "numeric: split at the median"
        vals, counts = np.unique(v.astype(str), return_counts=True)
        if len(vals) < 2:
            raise ValueError(f"attribute {name!r} has a single value {vals[0]!r}: nothing to audit")
        best = None
        # one group against the rest, for each value; the group the decision depends on most is reported
        for val in vals if len(vals) > 2 else vals[:1]:
            g = torch.as_tensor(v.astype(str) == val, device=dev)
            diffs, weights = [], []
            for c in torch.unique(y):
                a, b = g & (y == c), ~g & (y == c)
                if a.any() and b.any():
                    diffs.append(mu[a].mean(0) - mu[b].mean(0))
                    weights.append(float(min(a.sum(), b.sum())))
            if not diffs:
                continue
            w = torch.tensor(weights, device=dev)
            d = (torch.stack(diffs) * w[:, None]).sum(0) / w.sum()
            delta = torch.where(g[:, None], -d, d)  # move each sample to the other group
            p_sw = model.classifier(mu + delta).argmax(-1)
            dh = d / d.norm().clamp_min(1e-8)
            mu_rm = mu - ((mu - mu.mean(0)) @ dh)[:, None] * dh
            p_rm = model.classifier(mu_rm).argmax(-1)
            it = AuditItem(
                name=name if len(vals) <= 2 else f"{name}={val}", kind="attribute",
                score=float((p_sw != pred).float().mean()), acc_drop_remove=base_acc - acc(p_rm),
                acc_drop_swap=base_acc - acc(p_sw), alignment=alignment(delta),
                top_latents=_top_latents(delta, spread),
                detail={"groups": {str(a): int(b) for a, b in zip(vals, counts)},
                        "direction_norm": float(d.norm()), **({"note": note} if note else {})})
            if best is None or it.score > best.score:
                best = it
        if best is None:
            raise ValueError(f"attribute {name!r}: no class has both groups, the direction cannot be estimated")
        items.append(best)
    items.sort(key=lambda it: (-it.score, -it.acc_drop_swap, it.name))
    return AuditReport(baseline_accuracy=base_acc, items=items, threshold=threshold)


def plot_audit(report: AuditReport, path: str | Path, *, image: Optional[torch.Tensor] = None, max_items: int = 20) -> Path:
    """Bar chart of the candidates' scores (flagged ones in red) and, when ``image`` (c, s, s) is
    given and the report has regions, a heat map of the region scores over it. Written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..utils import atomic_path

    regs = [it for it in report.items if it.kind == "region"]
    show_map = image is not None and bool(regs)
    fig, axes = plt.subplots(1, 2 if show_map else 1, figsize=(11 if show_map else 6, 4.5), squeeze=False)
    ax = axes[0, 0]
    items = report.items[:max_items][::-1]
    colors = ["tab:red" if it.score >= report.threshold else "tab:gray" for it in items]
    ax.barh([f"{it.name} ({it.kind[0]})" for it in items], [it.score for it in items], color=colors)
    ax.axvline(report.threshold, color="k", ls="--", lw=0.8)
    ax.set_xlabel("decision flip rate when swapped")
    ax.set_title(f"bias audit (baseline accuracy {report.baseline_accuracy:.2f})")
    if show_map:
        s = image.shape[-1]
        heat = np.full((s, s), np.nan)
        for it in regs:
            y0, y1, x0, x1 = it.detail["region"]
            heat[y0:y1, x0:x1] = np.fmax(heat[y0:y1, x0:x1], it.score)
        ax2 = axes[0, 1]
        ax2.imshow(((image.mean(0).cpu().numpy() + 1) / 2), cmap="gray", vmin=0, vmax=1)
        im = ax2.imshow(heat, cmap="Reds", alpha=0.55, vmin=0, vmax=max(1e-6, np.nanmax(heat)))
        fig.colorbar(im, ax=ax2, fraction=0.046)
        ax2.set_title("region flip rate")
        ax2.axis("off")
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------- data
@dataclass
class SyntheticCXR:
    """Chest-X-ray-like images (n, 1, s, s) in [-1, 1]; label 1 = a focal opacity in a lung.

    ``marker``: whether the corner marker is burned in; ``scanner``: a global-contrast nuisance
    (independent of the label); ``marker_region``: (y0, y1, x0, x1) of the marker.
    """

    images: np.ndarray
    labels: np.ndarray
    marker: np.ndarray
    scanner: np.ndarray
    marker_region: tuple[int, int, int, int]
    classes: tuple[str, str] = ("normal", "opacity")


def make_synthetic_cxr(n: int, *, size: int = 64, shortcut: float = 0.0, seed: int = 0,
                       lesion_strength: float = 0.4) -> SyntheticCXR:
    """Two-class synthetic chest radiographs with an optional planted shortcut.

    A bright square marker is burned into the top-left corner with probability
    ``0.5 + 0.5 * shortcut * (2 * label - 1)``: ``shortcut=0`` makes it independent of the label,
    ``shortcut=1`` present exactly in the opacity class. Make the training split with a shortcut and
    the test split with ``shortcut=0`` to plant a bias that a held-out audit can find.
    """
    if not 0.0 <= shortcut <= 1.0:
        raise ValueError(f"shortcut must be in [0, 1], got {shortcut}")
    if n < 1 or size < 16:
        raise ValueError(f"need n >= 1 and size >= 16, got n={n}, size={size}")
    rng = np.random.default_rng(seed)
    yy, xx = np.meshgrid((np.arange(size) + 0.5) / size * 2 - 1, (np.arange(size) + 0.5) / size * 2 - 1, indexing="ij")
    labels = (rng.random(n) < 0.5).astype(np.int64)
    marker = rng.random(n) < 0.5 + 0.5 * shortcut * (2 * labels - 1)
    scanner = (rng.random(n) < 0.5).astype(np.int64)
    soft = lambda d, k=12.0: 1.0 / (1.0 + np.exp(np.clip(k * (d - 1.0), -50, 50)))  # noqa: E731
    ms, m0 = max(3, size // 8), max(1, size // 16)
    imgs = np.empty((n, 1, size, size), np.float32)
    for i in range(n):
        j = rng.normal(0, 0.03, 8)
        body = soft(((xx - j[0]) / (0.85 + j[1])) ** 2 + ((yy - 0.05) / 0.95) ** 2)
        img = 0.1 + 0.45 * body
        lungs = []
        for side in (-1, 1):
            cx, cy, rx, ry = side * (0.38 + j[2]), -0.05 + j[3], 0.26 + j[4], 0.55 + j[5]
            lung = soft(((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2)
            lungs.append((cx, cy, rx, ry))
            img = img - 0.3 * lung
            ribs = 0.5 + 0.5 * np.cos(2 * np.pi * (5.0 * (yy - 0.15 * (xx - cx) ** 2) + j[6]))
            img = img + 0.06 * ribs * lung
        img = img + 0.25 * soft((xx / 0.08) ** 2)  # spine / mediastinum
        img = img + 0.2 * soft(((xx - 0.12) / 0.22) ** 2 + ((yy - 0.3 - j[7]) / 0.2) ** 2)  # heart
        if labels[i]:
            cx, cy, rx, ry = lungs[rng.integers(2)]
            r, t = np.sqrt(rng.random()) * 0.6, rng.random() * 2 * np.pi
            lx, ly = cx + r * rx * np.cos(t), cy + r * ry * np.sin(t)
            sig = rng.uniform(0.08, 0.14)
            img = img + lesion_strength * rng.uniform(0.8, 1.2) * np.exp(-((xx - lx) ** 2 + (yy - ly) ** 2) / (2 * sig ** 2))
        img = img * (1.15 if scanner[i] else 0.9) + rng.normal(0, 0.02, img.shape)
        if marker[i]:
            img[m0:m0 + ms, m0:m0 + ms] = 1.0
        imgs[i, 0] = np.clip(img, 0, 1) * 2 - 1
    return SyntheticCXR(images=imgs, labels=labels, marker=marker.astype(np.int64), scanner=scanner,
                        marker_region=(m0, m0 + ms, m0, m0 + ms))


def write_synthetic_folder(data: SyntheticCXR, root: str | Path) -> Path:
    """Write ``data`` as ``root/<class>/<i>.png`` plus ``root/metadata.csv`` (path, marker, scanner)."""
    import csv

    from PIL import Image

    from ..utils import atomic_path

    root = Path(root)
    rows = []
    for i, (img, lab) in enumerate(zip(data.images, data.labels)):
        rel = Path(data.classes[lab]) / f"{i:05d}.png"
        (root / rel.parent).mkdir(parents=True, exist_ok=True)
        with atomic_path(root / rel) as tmp:
            Image.fromarray(((img[0] + 1) / 2 * 255).round().astype(np.uint8)).save(tmp, format="PNG")
        rows.append({"path": rel.as_posix(), "marker": int(data.marker[i]), "scanner": int(data.scanner[i])})
    with atomic_path(root / "metadata.csv") as tmp:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["path", "marker", "scanner"])
            w.writeheader()
            w.writerows(rows)
    return root


def _image_size_of(path: Path) -> Optional[tuple[int, int]]:
    """(height, width) from the file header without decoding the pixels; None if unreadable."""
    try:
        if path.suffix.lower() in (".dcm", ".dicom"):
            import pydicom

            ds = pydicom.dcmread(str(path), stop_before_pixels=True)
            return int(ds.Rows), int(ds.Columns)
        from PIL import Image

        with Image.open(path) as im:
            return im.size[1], im.size[0]
    except Exception:
        return None


def load_images(root: str | Path, *, size: int, grayscale: bool = True):
    """Read a class-per-sub-folder image folder (PNG / JPEG / DICOM) for PumaMedNet.

    Images of another size than ``size`` x ``size`` (or of mixed sizes) are resized, with one
    warning that lists the sizes found; unreadable files are skipped and listed (``skipped``); an
    empty class folder is an error. Returns ``biogen.data.images.ImageFolder``.
    """
    from ..data.images import read_image_folder

    folder = read_image_folder(root, size=size, grayscale=grayscale)
    sizes: dict[tuple[int, int], int] = {}
    for p in folder.paths:
        hw = _image_size_of(Path(p))
        if hw is not None:
            sizes[hw] = sizes.get(hw, 0) + 1
    other = {hw: c for hw, c in sizes.items() if hw != (size, size)}
    if other:
        desc = ", ".join(f"{h}x{w} ({c})" for (h, w), c in sorted(sizes.items(), key=lambda kv: -kv[1]))
        msg = f"{sum(other.values())} image(s) resized to {size}x{size}; sizes found (height x width): {desc}"
        warnings.warn(msg)
        folder.notes.append(msg)
    if len(folder.classes) < 2:
        raise ValueError(f"{root} must hold one sub-folder per class (at least two); found {len(folder.classes)}")
    return folder
