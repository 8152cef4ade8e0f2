"""Paired bulk RNA + histology tiles: an ``.h5ad`` (one row per sample) and ``tiles/<sample_id>/*.png``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

__all__ = ["PairedTiles", "load_paired", "read_tiles"]

TILE_SUFFIXES = {".png", ".jpg", ".jpeg"}


@dataclass
class PairedTiles:
    """Tiles matched to their sample's RNA.

    ``adata``: the samples that have tiles (rows in the original order); ``tiles``: (n_tiles, 3, S, S)
    float32 in [-1, 1]; ``sample_index``: (n_tiles,) row of ``adata`` each tile belongs to;
    ``paths``: the file of each tile.
    """

    adata: "object"
    tiles: np.ndarray
    sample_index: np.ndarray
    paths: list

    @property
    def sample_ids(self) -> list[str]:
        return list(self.adata.obs_names)


def read_tiles(files: list[Path], size: Optional[int] = None) -> np.ndarray:
    """Read RGB tiles as (n, 3, S, S) float32 in [-1, 1].

    All files must share one size and one colour mode (a mixture usually means tiles from different
    pipelines); with ``size`` they are resized to ``size`` x ``size`` (bilinear).
    """
    from PIL import Image

    if not files:
        raise ValueError("no tile files given")
    infos = []
    for f in files:
        try:
            with Image.open(f) as im:
                infos.append((im.size, im.mode))
        except Exception as exc:
            raise ValueError(f"cannot read tile {f}: {type(exc).__name__}: {exc}") from exc
    sizes = {s for s, _ in infos}
    modes = {m for _, m in infos}
    if len(sizes) > 1:
        ex = {s: str(f) for f, (s, _) in zip(files, infos)}
        raise ValueError(f"tiles have mixed sizes {sorted(sizes)} (e.g. {list(ex.values())[:3]}); "
                         "resize them to one size or pass size=")
    if len(modes) > 1:
        ex = {m: str(f) for f, (_, m) in zip(files, infos)}
        raise ValueError(f"tiles have mixed colour modes {sorted(modes)} (e.g. {ex}); convert them all to RGB")
    (w, h), mode = infos[0]
    if mode not in ("RGB", "RGBA", "L"):
        raise ValueError(f"tiles are in colour mode {mode!r}; expected RGB (or RGBA / L, converted)")
    if w != h:
        raise ValueError(f"tiles must be square, got {w}x{h} ({files[0]})")
    out = np.empty((len(files), 3, size or h, size or w), np.float32)
    for i, f in enumerate(files):
        with Image.open(f) as im:
            im = im.convert("RGB")
            if size and im.size != (size, size):
                im = im.resize((size, size), Image.BILINEAR)
            out[i] = np.asarray(im, np.float32).transpose(2, 0, 1) / 127.5 - 1.0
    return out


def load_paired(h5ad, tile_root, *, sample_key: Optional[str] = None, size: Optional[int] = None,
                allow_unmatched: bool = False) -> PairedTiles:
    """Load paired RNA and tiles.

    Parameters
    ----------
    h5ad : path of an ``.h5ad`` or an AnnData; one row per sample, X = (log) expression.
    tile_root : folder with one sub-folder of tiles (PNG/JPEG) per sample, named by sample id.
    sample_key : obs column holding the sample ids (default: ``obs_names``).
    size : resize tiles to this size (default: keep; all tiles must share one size).
    allow_unmatched : drop samples without a tile folder and ignore folders without a sample
        instead of raising.

    Raises
    ------
    ValueError for NaN/inf in the RNA, duplicated sample ids, unmatched ids (unless allowed), an
    empty tile folder, tiles of mixed sizes or modes.
    """
    import anndata as ad

    adata = h5ad if hasattr(h5ad, "obs") else ad.read_h5ad(str(h5ad))
    X = adata.X.toarray() if hasattr(adata.X, "toarray") else np.asarray(adata.X)
    bad = ~np.isfinite(X)
    if bad.any():
        rows = np.unique(np.nonzero(bad)[0])
        raise ValueError(f"RNA has {int(bad.sum())} NaN/inf value(s) in sample(s) "
                         f"{[str(adata.obs_names[r]) for r in rows[:5]]}; impute or drop them first")
    if sample_key is not None:
        if sample_key not in adata.obs:
            raise KeyError(f"sample_key {sample_key!r} is not an obs column (have: {list(adata.obs.columns)})")
        ids = adata.obs[sample_key].astype(str).tolist()
    else:
        ids = list(map(str, adata.obs_names))
    dup = sorted({i for i in ids if ids.count(i) > 1}) if len(set(ids)) != len(ids) else []
    if dup:
        raise ValueError(f"duplicated sample ids in the RNA table: {dup[:5]}")
    root = Path(tile_root)
    if not root.is_dir():
        raise FileNotFoundError(f"tile folder {root} does not exist or is not a folder")
    folders = {p.name: p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")}
    no_tiles = [i for i in ids if i not in folders]
    no_rna = sorted(set(folders) - set(ids))
    if (no_tiles or no_rna) and not allow_unmatched:
        raise ValueError(
            f"sample ids do not match: {len(no_tiles)} RNA sample(s) without a tile folder under {root} "
            f"(first: {no_tiles[:5]}), {len(no_rna)} tile folder(s) without an RNA sample (first: {no_rna[:5]}); "
            "fix the names or pass allow_unmatched=True"
        )
    keep = [r for r, i in enumerate(ids) if i in folders]
    if not keep:
        raise ValueError(f"no RNA sample has a tile folder under {root}")
    files, index = [], []
    for j, r in enumerate(keep):
        d = folders[ids[r]]
        fs = sorted(f for f in d.iterdir() if f.is_file() and f.suffix.lower() in TILE_SUFFIXES)
        if not fs:
            raise ValueError(f"tile folder {d} (sample {ids[r]!r}) has no PNG/JPEG tile")
        files += fs
        index += [j] * len(fs)
    tiles = read_tiles(files, size)
    sub = adata[keep].copy()
    return PairedTiles(sub, tiles, np.asarray(index, np.int64), files)
