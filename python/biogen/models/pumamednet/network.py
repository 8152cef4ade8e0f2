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
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn


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

        from ...utils import atomic_path, write_json

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
