"""PumaMedNet data: synthetic chest-X-ray-like images with a plantable shortcut, and image-folder loading."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np


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

    from ...utils import atomic_path

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
    from ...data.images import read_image_folder

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
