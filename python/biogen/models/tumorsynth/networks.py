"""TumorSynth: GANs for 128 x 128 grayscale brain MRI (seed 003, SPEC 3.3).

Layer lists follow the slides; with 'same' padding and biases the parameter counts are:
- Discriminator: 582,785; Generator 1: 27,265,281; G1 + D = 27,848,066 (the slides' number).
- Generator 2 (encoder-decoder): 427,009,793; G2 + D = 427,592,578. This is what the slides' layer
  list gives; the slides also report 427,362,946 (229,632 fewer), which no reading of the listed
  layers reproduces, so biogen implements the layer list.
The discriminator ends in a Dense(1) logit; the sigmoid lives in the loss (BCE with logits), which
is the same model and numerically safer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn


@dataclass
class TumorSynthConfig:
    """Training configuration; defaults are the seed's (SPEC 3.3)."""

    generator: str = "g1"  # "g1" (dense + transposed convs) or "g2" (dense + encoder-decoder)
    image_size: int = 128
    noise_dim: int = 100
    batch_size: int = 4
    lr: float = 2e-4
    beta1: float = 0.5
    epochs: int = 10
    conditional: bool = False  # condition G and D on the class (tumour / no tumour)
    n_classes: int = 2
    leaky_slope: float = 0.2
    dropout: float = 0.4
    heldout_fraction: float = 0.2  # real images kept out of training to score KID per epoch
    n_eval_samples: int = 64
    seed: int = 0

    def __post_init__(self):
        if self.generator not in ("g1", "g2"):
            raise ValueError(f"generator must be 'g1' or 'g2', got {self.generator!r}")
        if self.image_size % 8 or self.image_size < 16:
            raise ValueError(f"image_size must be a multiple of 8 and >= 16, got {self.image_size}")
        for name in ("noise_dim", "batch_size", "epochs", "n_classes", "n_eval_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.heldout_fraction < 1:
            raise ValueError(f"heldout_fraction must be in (0, 1), got {self.heldout_fraction}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


_EMB = 50  # label embedding width of the conditional variants (Keras cGAN convention)


def _same_conv_k4(cin: int, cout: int) -> nn.Sequential:
    """Keras Conv2D(k=4, padding='same'): pad 1 before and 2 after, as TensorFlow does for even kernels."""
    return nn.Sequential(nn.ZeroPad2d((1, 2, 1, 2)), nn.Conv2d(cin, cout, 4))


class Discriminator(nn.Module):
    """Conv(64,k3) -> Conv(128,k3,s2) -> Conv(128,k3,s2) -> Conv(256,k3,s2), LeakyReLU after each,
    Flatten, Dropout(0.4), Dense(1). Input (B, 1, S, S) in [-1, 1]; output (B, 1) logits."""

    def __init__(self, image_size: int = 128, channels: int = 1, n_classes: int = 0,
                 slope: float = 0.2, dropout: float = 0.4):
        super().__init__()
        self.n_classes = n_classes
        cin = channels + (1 if n_classes else 0)
        if n_classes:
            self.label_emb = nn.Embedding(n_classes, _EMB)
            self.label_map = nn.Linear(_EMB, image_size * image_size)
        self.image_size = image_size
        act = lambda: nn.LeakyReLU(slope)  # noqa: E731
        self.net = nn.Sequential(
            nn.Conv2d(cin, 64, 3, padding=1), act(),
            nn.Conv2d(64, 128, 3, stride=2, padding=1), act(),
            nn.Conv2d(128, 128, 3, stride=2, padding=1), act(),
            nn.Conv2d(128, 256, 3, stride=2, padding=1), act(),
            nn.Flatten(), nn.Dropout(dropout),
            nn.Linear(256 * (image_size // 8) ** 2, 1),
        )

    def forward(self, x: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.n_classes:
            if labels is None:
                raise ValueError("this discriminator is conditional: pass labels")
            lab = self.label_map(self.label_emb(labels)).view(-1, 1, self.image_size, self.image_size)
            x = torch.cat([x, lab], 1)
        return self.net(x)


class _GeneratorBase(nn.Module):
    def __init__(self, noise_dim: int, n_classes: int):
        super().__init__()
        self.noise_dim, self.n_classes = noise_dim, n_classes
        if n_classes:
            self.label_emb = nn.Embedding(n_classes, _EMB)

    def _input(self, z: torch.Tensor, labels: Optional[torch.Tensor]) -> torch.Tensor:
        if z.dim() != 2 or z.shape[1] != self.noise_dim:
            raise ValueError(f"z must have shape (batch, {self.noise_dim}), got {tuple(z.shape)}")
        if self.n_classes:
            if labels is None:
                raise ValueError("this generator is conditional: pass labels")
            z = torch.cat([z, self.label_emb(labels)], 1)
        return z


class Generator1(_GeneratorBase):
    """Dense(S/4 * S/4 * 256) + LeakyReLU -> ConvT(128,k4,s2) -> ConvT(128,k4,s2) (LeakyReLU) ->
    Conv(1,k4,'same',tanh). (B, noise_dim) -> (B, 1, S, S) in [-1, 1]."""

    def __init__(self, image_size: int = 128, noise_dim: int = 100, n_classes: int = 0, slope: float = 0.2):
        super().__init__(noise_dim, n_classes)
        self.s0 = image_size // 4
        self.fc = nn.Linear(noise_dim + (_EMB if n_classes else 0), self.s0 * self.s0 * 256)
        self.act = nn.LeakyReLU(slope)
        self.net = nn.Sequential(
            nn.ConvTranspose2d(256, 128, 4, stride=2, padding=1), nn.LeakyReLU(slope),
            nn.ConvTranspose2d(128, 128, 4, stride=2, padding=1), nn.LeakyReLU(slope),
            _same_conv_k4(128, 1), nn.Tanh(),
        )

    def forward(self, z: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        h = self.act(self.fc(self._input(z, labels))).view(-1, 256, self.s0, self.s0)
        return self.net(h)


class Generator2(_GeneratorBase):
    """Dense(S * S * 256) + LeakyReLU -> Conv 512/256/128 (k3, s2) -> ConvT 128/256/512 (k2, s2) ->
    Conv(1,k4,'same',tanh), LeakyReLU between. (B, noise_dim) -> (B, 1, S, S)."""

    def __init__(self, image_size: int = 128, noise_dim: int = 100, n_classes: int = 0, slope: float = 0.2):
        super().__init__(noise_dim, n_classes)
        self.s0 = image_size
        self.fc = nn.Linear(noise_dim + (_EMB if n_classes else 0), image_size * image_size * 256)
        a = lambda: nn.LeakyReLU(slope)  # noqa: E731
        self.act = a()
        self.net = nn.Sequential(
            nn.Conv2d(256, 512, 3, stride=2, padding=1), a(),
            nn.Conv2d(512, 256, 3, stride=2, padding=1), a(),
            nn.Conv2d(256, 128, 3, stride=2, padding=1), a(),
            nn.ConvTranspose2d(128, 128, 2, stride=2), a(),
            nn.ConvTranspose2d(128, 256, 2, stride=2), a(),
            nn.ConvTranspose2d(256, 512, 2, stride=2), a(),
            _same_conv_k4(512, 1), nn.Tanh(),
        )

    def forward(self, z: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        h = self.act(self.fc(self._input(z, labels))).view(-1, 256, self.s0, self.s0)
        return self.net(h)


def build_models(config: TumorSynthConfig, device: str | torch.device = "cpu") -> tuple[nn.Module, Discriminator]:
    n_cls = config.n_classes if config.conditional else 0
    G = (Generator1 if config.generator == "g1" else Generator2)(
        config.image_size, config.noise_dim, n_cls, config.leaky_slope)
    D = Discriminator(config.image_size, 1, n_cls, config.leaky_slope, config.dropout)
    return G.to(device), D.to(device)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
