"""Image folders (PNG / JPEG / DICOM) as float tensors, with bad files skipped and reported."""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

log = logging.getLogger("biogen.data")

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}
DICOM_SUFFIXES = {".dcm", ".dicom"}


@dataclass
class ImageFolder:
    """Images read from a folder, all resized to one size and scaled to [-1, 1].

    ``images``: (n, channels, size, size) float32; ``labels``: (n,) int64 (sub-folder index when the
    folder has one sub-folder per class, else zeros); ``classes``: the sub-folder names;
    ``paths``: the file of each image; ``skipped``: (path, reason) of files that could not be read;
    ``notes``: conversions that were applied (e.g. colour images converted to grayscale).
    """

    images: np.ndarray
    labels: np.ndarray
    classes: list[str]
    paths: list[Path]
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _read_dicom(path: Path) -> np.ndarray:
    try:
        import pydicom
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise RuntimeError("reading DICOM needs pydicom: pip install pydicom") from exc
    ds = pydicom.dcmread(str(path))
    arr = ds.pixel_array.astype(np.float32)
    if arr.ndim == 3 and arr.shape[-1] not in (3, 4):  # a multi-frame file: take the middle slice
        arr = arr[arr.shape[0] // 2]
    return arr


def _to_unit(arr: np.ndarray) -> np.ndarray:
    lo, hi = float(arr.min()), float(arr.max())
    return np.zeros_like(arr, dtype=np.float32) if hi <= lo else ((arr - lo) / (hi - lo)).astype(np.float32)


def load_image(path: Path, size: int, grayscale: bool = True) -> tuple[np.ndarray, Optional[str]]:
    """One image as (channels, size, size) float32 in [-1, 1] and a note if it was converted."""
    from PIL import Image

    note = None
    if path.suffix.lower() in DICOM_SUFFIXES:
        arr = _to_unit(_read_dicom(path))
        if arr.ndim == 3:
            arr = arr.mean(-1) if grayscale else arr
        img = Image.fromarray((arr * 255).round().astype(np.uint8))
    else:
        with Image.open(path) as im:
            im.load()
            img = im
            if grayscale and im.mode not in ("L", "I", "I;16", "F"):
                note = f"{path.name}: {im.mode} image converted to grayscale"
                img = im.convert("L")
            elif not grayscale and im.mode != "RGB":
                img = im.convert("RGB")
            if img.mode in ("I", "I;16", "F"):
                img = Image.fromarray((_to_unit(np.asarray(img, dtype=np.float32)) * 255).astype(np.uint8))
    if img.size != (size, size):
        img = img.resize((size, size), Image.BILINEAR)
    arr = np.asarray(img, dtype=np.float32) / 255.0
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return arr * 2.0 - 1.0, note


def read_image_folder(root: str | Path, *, size: int = 128, grayscale: bool = True) -> ImageFolder:
    """Read every image under ``root`` (one sub-folder per class, or a flat folder).

    Files that fail to decode are skipped and listed in ``skipped`` (with a warning), never a crash;
    colour images are converted to grayscale with a note when ``grayscale``.

    Raises
    ------
    FileNotFoundError if ``root`` does not exist; ValueError if it holds no readable image or a
    class sub-folder is empty.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist or is not a folder")
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    suffixes = IMAGE_SUFFIXES | DICOM_SUFFIXES
    if subdirs:
        groups = [(d.name, sorted(f for f in d.rglob("*") if f.is_file() and f.suffix.lower() in suffixes)) for d in subdirs]
        empty = [name for name, files in groups if not files]
        if empty:
            raise ValueError(f"class folder(s) with no image files under {root}: {', '.join(empty)}")
    else:
        groups = [("", sorted(f for f in root.iterdir() if f.is_file() and f.suffix.lower() in suffixes))]
    images, labels, paths, skipped, notes = [], [], [], [], []
    for label, (_, files) in enumerate(groups):
        for f in files:
            try:
                arr, note = load_image(f, size, grayscale)
            except Exception as exc:  # any decoder error: skip and report the file
                skipped.append((f, f"{type(exc).__name__}: {exc}"))
                continue
            images.append(arr)
            labels.append(label)
            paths.append(f)
            if note:
                notes.append(note)
    if skipped:
        warnings.warn(f"skipped {len(skipped)} unreadable file(s) under {root}: "
                      + ", ".join(str(p.name) for p, _ in skipped[:5]) + (" ..." if len(skipped) > 5 else ""))
    if notes:
        log.info("%d image(s) converted to grayscale", len(notes))
    if not images:
        raise ValueError(f"no readable image in {root} (supported: {', '.join(sorted(suffixes))})")
    return ImageFolder(
        images=np.stack(images).astype(np.float32),
        labels=np.asarray(labels, dtype=np.int64),
        classes=[name for name, _ in groups] if subdirs else [],
        paths=paths,
        skipped=skipped,
        notes=notes,
    )


def save_grid(images: np.ndarray, path: str | Path, *, nrow: int = 8, padding: int = 2) -> Path:
    """Write images (n, c, h, w) in [-1, 1] as one PNG grid, atomically."""
    from PIL import Image

    from ..utils import atomic_path

    imgs = np.clip((np.asarray(images) + 1.0) / 2.0, 0, 1)
    n, c, h, w = imgs.shape
    ncol = min(nrow, n)
    nrows = (n + ncol - 1) // ncol
    grid = np.ones((c, nrows * (h + padding) + padding, ncol * (w + padding) + padding), np.float32)
    for i in range(n):
        r, col = divmod(i, ncol)
        y, x = padding + r * (h + padding), padding + col * (w + padding)
        grid[:, y:y + h, x:x + w] = imgs[i]
    arr = (grid * 255).round().astype(np.uint8)
    img = Image.fromarray(arr[0] if c == 1 else arr.transpose(1, 2, 0))
    path = Path(path)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
    return path
