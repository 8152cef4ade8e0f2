"""Synthetic brain MRI phantoms for TumorSynth tests and the demo (no MRI ships in any package).

Each phantom is an axial-slice-like image: a bright skull ring around a head ellipse, brain tissue with
smooth texture, two dark lateral ventricles, and (optionally) a bright irregular tumour blob with a
darker oedema halo. Shapes, positions and intensities vary per sample; labels say whether a tumour
was drawn. Images are float32 in [-1, 1], shape (n, 1, size, size).
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter


def _ellipse(yy, xx, cy, cx, ry, rx, angle=0.0):
    c, s = np.cos(angle), np.sin(angle)
    y, x = yy - cy, xx - cx
    u, v = x * c + y * s, -x * s + y * c
    return (u / rx) ** 2 + (v / ry) ** 2


def brain_phantoms(
    n: int,
    *,
    size: int = 128,
    tumour_fraction: float = 0.6,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Generate ``n`` phantoms.

    Parameters
    ----------
    n : number of images.
    size : height and width in pixels.
    tumour_fraction : probability that an image contains a tumour (SPEC 3.3: 155 of 253 do).
    seed : RNG seed; the same seed gives the same images.

    Returns
    -------
    images : (n, 1, size, size) float32 in [-1, 1].
    labels : (n,) int64, 1 = tumour.
    """
    if n < 0 or size < 16:
        raise ValueError(f"need n >= 0 and size >= 16, got n={n}, size={size}")
    if not 0.0 <= tumour_fraction <= 1.0:
        raise ValueError(f"tumour_fraction must be in [0, 1], got {tumour_fraction}")
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    images = np.empty((n, 1, size, size), dtype=np.float32)
    labels = (rng.random(n) < tumour_fraction).astype(np.int64)
    for i in range(n):
        cy, cx = 0.5 + rng.normal(0, 0.02, 2)
        ry, rx = rng.uniform(0.36, 0.42), rng.uniform(0.28, 0.34)
        ang = rng.normal(0, 0.08)
        head = _ellipse(yy, xx, cy, cx, ry, rx, ang)
        img = np.zeros((size, size), np.float32)
        skull = (head <= 1.0) & (head > 0.86)
        brain = head <= 0.86
        texture = gaussian_filter(rng.normal(0, 1, (size, size)), sigma=size / 40)
        texture /= texture.std() + 1e-8
        img[brain] = 0.45 + 0.05 * texture[brain] + rng.normal(0, 0.01)
        # grey/white matter contrast: a smaller inner ellipse slightly brighter
        inner = _ellipse(yy, xx, cy, cx, ry * 0.7, rx * 0.7, ang) <= 1.0
        img[inner & brain] += 0.08
        img[skull] = 0.9 + 0.05 * rng.normal(0, 1)
        for side in (-1, 1):  # lateral ventricles
            vent = _ellipse(yy, xx, cy - 0.02, cx + side * rx * 0.22, ry * 0.28, rx * 0.11, side * 0.35 + ang)
            img[vent <= 1.0] = 0.12
        if labels[i]:
            r = rng.uniform(0.05, 0.12)
            ty = cy + rng.uniform(-0.5, 0.5) * ry
            tx = cx + rng.uniform(-0.5, 0.5) * rx
            blob = np.zeros_like(img)
            for _ in range(rng.integers(2, 5)):  # lobulated: a few overlapping gaussians
                oy, ox = rng.normal(0, r * 0.4, 2)
                blob += np.exp(-(((yy - ty - oy) ** 2 + (xx - tx - ox) ** 2) / (2 * (r * 0.6) ** 2)))
            blob /= blob.max()
            halo = (blob > 0.2) & (blob <= 0.5) & brain
            core = (blob > 0.5) & brain
            img[halo] -= 0.15
            img[core] = 0.8 + 0.1 * blob[core] + 0.03 * texture[core]
        img = gaussian_filter(img, 0.6) + rng.normal(0, 0.015, img.shape)
        images[i, 0] = np.clip(img, 0.0, 1.0) * 2.0 - 1.0
    return images, labels
