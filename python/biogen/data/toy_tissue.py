"""Toy tissue: a procedural stand-in for paired bulk RNA-seq + H&E tiles (SPEC 3.1).

Each sample has cell-type fractions ``f`` over :data:`CELL_TYPES` (drawn per cancer type from a
Dirichlet). Its bulk RNA is ``log1p(Poisson(library * f @ signatures) * lognormal noise)``: a
mixture of per-type expression signatures. Its tiles render nuclei of each type in the same
fractions (multinomial counts), each type with its own size, shape and colour on an H&E-like
palette (pink eosin background, purple/blue haematoxylin nuclei). So the RNA determines what the
tiles should show, and a generator conditioned on the RNA can be checked quantitatively with
:class:`NucleusCounter` (which counts nuclei per type) and :func:`deconvolve` (which recovers the
fractions implied by an RNA profile).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

__all__ = [
    "CELL_TYPES",
    "NUCLEUS_STYLES",
    "NucleusCounter",
    "ToyTissue",
    "ToyTissueConfig",
    "deconvolve",
    "make_signatures",
    "perturb_rna",
    "render_tile",
    "simulate_toy_tissue",
]

CELL_TYPES: tuple[str, ...] = ("tumour", "lymphocyte", "connective", "dead", "normal")

# Per type at a 64-px tile: semi-axes (long, short) in px, irregularity, RGB colour. Colours are far
# apart in RGB (and from the background) so that a nearest-colour rule can classify pixels; sizes
# and shapes differ as in H&E (large irregular tumour nuclei, small round dense lymphocytes,
# spindle-shaped fibroblasts, tiny pyknotic dead cells, medium pale normal nuclei).
NUCLEUS_STYLES: dict[str, dict] = {
    "tumour": dict(axes=(4.6, 3.6), irregular=0.25, color=(95, 35, 125)),
    "lymphocyte": dict(axes=(2.2, 2.2), irregular=0.0, color=(25, 25, 95)),
    "connective": dict(axes=(5.0, 1.6), irregular=0.0, color=(200, 80, 160)),
    "dead": dict(axes=(1.7, 1.7), irregular=0.0, color=(40, 5, 15)),
    "normal": dict(axes=(3.0, 3.0), irregular=0.05, color=(120, 130, 215)),
}
BACKGROUND = (238, 200, 216)

# Cancer types of the toy cohort: Dirichlet concentrations over CELL_TYPES (means differ per type,
# so latents separate by cancer type as TCGA cohorts do).
DEFAULT_COHORTS: dict[str, tuple[float, ...]] = {
    "LUAD": (4.0, 2.0, 1.5, 0.7, 1.0),
    "GBM": (3.0, 0.7, 0.7, 2.0, 2.0),
    "COAD": (2.5, 3.0, 2.0, 0.7, 1.0),
}


@dataclass
class ToyTissueConfig:
    """Simulator settings.

    Parameters
    ----------
    n_genes : genes of the bulk profile (the first ``markers_per_type * 5`` are type markers).
    markers_per_type : marker genes per cell type (expressed ~10x higher in that type).
    tile_size : tile height = width in pixels; nucleus sizes scale with ``tile_size / 64``.
    nuclei_per_tile : mean number of nuclei per tile (the count varies +-20%).
    library_size : mean counts per sample; lower = noisier RNA.
    rna_noise : sd of the per-gene lognormal noise on the expected counts.
    cohorts : cancer type -> Dirichlet concentration over :data:`CELL_TYPES`.
    seed : seeds the signatures (the same seed gives the same genes' meaning).
    """

    n_genes: int = 300
    markers_per_type: int = 20
    tile_size: int = 64
    nuclei_per_tile: int = 22
    library_size: float = 2e5
    rna_noise: float = 0.1
    cohorts: dict = field(default_factory=lambda: dict(DEFAULT_COHORTS))
    seed: int = 0

    def __post_init__(self) -> None:
        if self.markers_per_type < 1 or self.n_genes < self.markers_per_type * len(CELL_TYPES):
            raise ValueError(
                f"n_genes ({self.n_genes}) must be >= markers_per_type x {len(CELL_TYPES)} "
                f"({self.markers_per_type * len(CELL_TYPES)}) and markers_per_type >= 1"
            )
        if self.tile_size < 16:
            raise ValueError(f"tile_size must be >= 16 px, got {self.tile_size}")
        if self.nuclei_per_tile < 1:
            raise ValueError(f"nuclei_per_tile must be >= 1, got {self.nuclei_per_tile}")
        if self.library_size <= 0 or self.rna_noise < 0:
            raise ValueError("library_size must be > 0 and rna_noise >= 0")
        for name, alpha in self.cohorts.items():
            if len(alpha) != len(CELL_TYPES) or min(alpha) <= 0:
                raise ValueError(f"cohort {name!r}: need {len(CELL_TYPES)} positive Dirichlet concentrations, got {alpha}")


def make_signatures(n_genes: int, markers_per_type: int, seed: int = 0) -> np.ndarray:
    """Per-type expression signatures ``(n_types, n_genes)``, each row summing to 1.

    Shared background expression (lognormal) plus ``markers_per_type`` genes per type at ~10x.
    """
    rng = np.random.default_rng(seed)
    base = rng.lognormal(0.0, 1.0, size=n_genes)
    sig = np.tile(base, (len(CELL_TYPES), 1)) * rng.lognormal(0.0, 0.2, size=(len(CELL_TYPES), n_genes))
    for k in range(len(CELL_TYPES)):
        idx = slice(k * markers_per_type, (k + 1) * markers_per_type)
        sig[k, idx] *= 10.0 * rng.lognormal(0.0, 0.2, size=markers_per_type) + base.mean() / base[idx]
    return sig / sig.sum(1, keepdims=True)


def deconvolve(rna_log: np.ndarray, signatures: np.ndarray) -> np.ndarray:
    """Cell-type fractions implied by bulk RNA: non-negative least squares on the signatures.

    rna_log: (n_samples, n_genes) ``log1p`` expression; signatures: (n_types, n_genes).
    Returns (n_samples, n_types) fractions summing to 1.
    """
    from scipy.optimize import nnls

    x = np.expm1(np.asarray(rna_log, np.float64))
    if x.ndim != 2 or x.shape[1] != signatures.shape[1]:
        raise ValueError(f"rna_log must be (n_samples, {signatures.shape[1]}), got {x.shape}")
    x = x / x.sum(1, keepdims=True)
    out = np.stack([nnls(signatures.T, row)[0] for row in x])
    return out / np.clip(out.sum(1, keepdims=True), 1e-12, None)


def perturb_rna(rna_log: np.ndarray, signatures: np.ndarray, cell_type: str, amount: float) -> np.ndarray:
    """Raise one type's signature in bulk RNA: ``log1p(expm1(x) + amount * lib * signature)``.

    rna_log: (n, n_genes) log1p expression; ``amount`` is in units of the sample's library size
    (0.5 adds half a library of that type's expression).
    """
    if cell_type not in CELL_TYPES:
        raise ValueError(f"unknown cell_type {cell_type!r}; choose one of {', '.join(CELL_TYPES)}")
    x = np.expm1(np.asarray(rna_log, np.float64))
    lib = x.sum(1, keepdims=True)
    x = x + amount * lib * signatures[CELL_TYPES.index(cell_type)][None]
    return np.log1p(x).astype(np.float32)


def _ellipse_mask(h: int, w: int, cy: float, cx: float, a: float, b: float, theta: float,
                  irregular: float, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    dy, dx = yy - cy, xx - cx
    c, s = np.cos(theta), np.sin(theta)
    u, v = c * dx + s * dy, -s * dx + c * dy
    r = (u / a) ** 2 + (v / b) ** 2
    if irregular > 0:  # a wobbly outline: radius modulated by a few random harmonics of the angle
        ang = np.arctan2(v, u)
        k = rng.uniform(0, 2 * np.pi, size=3)
        wob = 1 + irregular * (0.5 * np.sin(2 * ang + k[0]) + 0.3 * np.sin(3 * ang + k[1]) + 0.2 * np.sin(5 * ang + k[2]))
        r = r / wob**2
    return r <= 1.0


def render_tile(counts: Sequence[int], tile_size: int = 64, rng: Optional[np.random.Generator] = None) -> tuple[np.ndarray, np.ndarray]:
    """Render one tile with ``counts[k]`` nuclei of type ``CELL_TYPES[k]``.

    Returns (image (tile_size, tile_size, 3) uint8, placed (n_types,) int: nuclei actually placed;
    a nucleus that finds no free spot after many tries is dropped, rare at default densities).
    """
    rng = rng or np.random.default_rng()
    H = W = tile_size
    scale = tile_size / 64.0
    img = np.empty((H, W, 3), np.float32)
    img[:] = BACKGROUND
    # eosin texture: smooth low-amplitude variation so the background is not flat
    tex = rng.normal(0, 1, size=(H // 8 + 2, W // 8 + 2, 1)).astype(np.float32)
    tex = np.kron(tex, np.ones((8, 8, 1), np.float32))[:H, :W]
    img += 6.0 * tex + rng.normal(0, 2.0, size=(H, W, 1)).astype(np.float32)
    occupied = np.zeros((H, W), bool)
    order = [k for k, n in enumerate(counts) for _ in range(int(n))]
    rng.shuffle(order)
    placed = np.zeros(len(CELL_TYPES), np.int64)
    for k in order:
        st = NUCLEUS_STYLES[CELL_TYPES[k]]
        a, b = (ax * scale * rng.uniform(0.9, 1.1) for ax in st["axes"])
        R = int(np.ceil(a * (1 + st["irregular"]))) + 2  # half-size of the local window
        for _ in range(60):
            cy, cx = rng.uniform(a, H - a), rng.uniform(a, W - a)
            y0, x0 = max(int(cy) - R, 0), max(int(cx) - R, 0)
            y1, x1 = min(int(cy) + R + 1, H), min(int(cx) + R + 1, W)
            m = _ellipse_mask(y1 - y0, x1 - x0, cy - y0, cx - x0, a, b, rng.uniform(0, np.pi), st["irregular"], rng)
            # keep a 1-px gap to every other nucleus, so each one is its own connected component
            occ = occupied[max(y0 - 1, 0):y1 + 1, max(x0 - 1, 0):x1 + 1]
            oy, ox = y0 - max(y0 - 1, 0), x0 - max(x0 - 1, 0)
            grown = np.zeros_like(occ)
            for dy, dx in ((0, 0), (1, 0), (-1, 0), (0, 1), (0, -1)):
                ys, xs = oy + dy, ox + dx
                if 0 <= ys and 0 <= xs:
                    sub = grown[ys:ys + m.shape[0], xs:xs + m.shape[1]]
                    sub |= m[:sub.shape[0], :sub.shape[1]]
            if m.sum() >= 2 and not (grown & occ).any():
                break
        else:
            continue
        win = (slice(y0, y1), slice(x0, x1))
        occupied[win] |= m
        col = np.asarray(st["color"], np.float32) + rng.normal(0, 6.0, size=3).astype(np.float32)
        img[win][m] = col + rng.normal(0, 4.0, size=(int(m.sum()), 3)).astype(np.float32)
        placed[k] += 1
    return np.clip(img, 0, 255).round().astype(np.uint8), placed


@dataclass
class ToyTissue:
    """A simulated cohort.

    ``adata``: AnnData (n_samples x n_genes), X = log1p expression, ``obs['cancer_type']``,
    ``obsm['fractions']`` (n_samples, n_types) true fractions; ``tiles``: (n_samples,
    tiles_per_sample, tile_size, tile_size, 3) uint8; ``tile_counts``: (n_samples, tiles_per_sample,
    n_types) nuclei rendered per tile; ``signatures``: (n_types, n_genes).
    """

    adata: "object"
    tiles: np.ndarray
    tile_counts: np.ndarray
    signatures: np.ndarray
    config: ToyTissueConfig

    @property
    def sample_ids(self) -> list[str]:
        return list(self.adata.obs_names)

    def write(self, h5ad_path, tile_root) -> None:
        """Write the RNA as ``h5ad_path`` and tiles as ``tile_root/<sample_id>/tile_<j>.png`` (atomic)."""
        from pathlib import Path

        from PIL import Image

        from ..utils import atomic_path

        with atomic_path(Path(h5ad_path)) as tmp:
            self.adata.write_h5ad(tmp)
        for sid, tiles in zip(self.sample_ids, self.tiles):
            d = Path(tile_root) / sid
            d.mkdir(parents=True, exist_ok=True)
            for j, t in enumerate(tiles):
                with atomic_path(d / f"tile_{j:03d}.png") as tmp:
                    Image.fromarray(t).save(tmp, format="PNG")


def simulate_toy_tissue(n_samples: int, tiles_per_sample: int = 4, config: Optional[ToyTissueConfig] = None,
                        seed: int = 0, fractions: Optional[np.ndarray] = None) -> ToyTissue:
    """Simulate ``n_samples`` patients with bulk RNA and ``tiles_per_sample`` tiles each.

    ``fractions``: optional (n_samples, n_types) fractions to use instead of the cohort Dirichlets.
    Cancer types are assigned round-robin over ``config.cohorts`` (balanced, for stratified splits).
    """
    import anndata as ad
    import pandas as pd

    cfg = config or ToyTissueConfig()
    if n_samples < 1 or tiles_per_sample < 1:
        raise ValueError(f"n_samples and tiles_per_sample must be >= 1, got {n_samples}, {tiles_per_sample}")
    rng = np.random.default_rng(seed)
    sig = make_signatures(cfg.n_genes, cfg.markers_per_type, cfg.seed)
    names = list(cfg.cohorts)
    cancer = [names[i % len(names)] for i in range(n_samples)]
    if fractions is None:
        fr = np.stack([rng.dirichlet(cfg.cohorts[c]) for c in cancer])
    else:
        fr = np.asarray(fractions, np.float64)
        if fr.shape != (n_samples, len(CELL_TYPES)) or (fr < 0).any():
            raise ValueError(f"fractions must be non-negative (n_samples={n_samples}, {len(CELL_TYPES)}), got {fr.shape}")
        fr = fr / fr.sum(1, keepdims=True)
    lib = cfg.library_size * rng.lognormal(0, 0.2, size=(n_samples, 1))
    mean = lib * (fr @ sig) * rng.lognormal(0, cfg.rna_noise, size=(n_samples, cfg.n_genes))
    X = np.log1p(rng.poisson(mean)).astype(np.float32)

    tiles = np.empty((n_samples, tiles_per_sample, cfg.tile_size, cfg.tile_size, 3), np.uint8)
    counts = np.empty((n_samples, tiles_per_sample, len(CELL_TYPES)), np.int64)
    for i in range(n_samples):
        for j in range(tiles_per_sample):
            n = max(1, int(round(cfg.nuclei_per_tile * rng.uniform(0.8, 1.2))))
            tiles[i, j], counts[i, j] = render_tile(rng.multinomial(n, fr[i]), cfg.tile_size, rng)
    obs = pd.DataFrame({"cancer_type": pd.Categorical(cancer, categories=names)},
                       index=[f"S{i:04d}" for i in range(n_samples)])
    var = pd.DataFrame(index=[f"G{g:04d}" for g in range(cfg.n_genes)])
    adata = ad.AnnData(X=X, obs=obs, var=var)
    adata.obsm["fractions"] = fr.astype(np.float32)
    adata.uns["cell_types"] = list(CELL_TYPES)
    adata.uns["signatures"] = sig.astype(np.float64)  # lets evaluation deconvolve the RNA later
    return ToyTissue(adata, tiles, counts, sig, cfg)


class NucleusCounter:
    """Counts nuclei per type in a tile: nearest-palette pixel classes, then connected components.

    A pixel is assigned to the nucleus type whose colour is nearest in RGB when that distance is
    below ``max_dist`` and smaller than the distance to the background; each connected component
    (4-connectivity) of a class with at least ``min_area`` pixels (scaled with the tile size) counts
    as one nucleus. The simulator leaves a gap between nuclei, so on real simulator tiles the counts
    match what was rendered; tests measure the error.
    """

    def __init__(self, max_dist: float = 60.0, min_area: float = 3.0) -> None:
        self.max_dist = max_dist
        self.min_area = min_area
        self.palette = np.asarray([NUCLEUS_STYLES[t]["color"] for t in CELL_TYPES], np.float32)

    def pixel_classes(self, tile: np.ndarray) -> np.ndarray:
        """tile: (H, W, 3) uint8 (or float in [-1, 1], channels first or last) -> (H, W) int, -1 = background."""
        img = self._as_hwc_uint8(tile).astype(np.float32)
        d = np.linalg.norm(img[:, :, None, :] - self.palette[None, None], axis=-1)  # (H, W, types)
        d_bg = np.linalg.norm(img - np.asarray(BACKGROUND, np.float32), axis=-1)
        k = d.argmin(-1)
        dmin = d.min(-1)
        return np.where((dmin < self.max_dist) & (dmin < d_bg), k, -1)

    def count(self, tile: np.ndarray) -> np.ndarray:
        """Nuclei per type in one tile: (n_types,) int."""
        from scipy import ndimage

        cls = self.pixel_classes(tile)
        min_area = self.min_area * (cls.shape[0] / 64.0) ** 2
        out = np.zeros(len(CELL_TYPES), np.int64)
        for k in range(len(CELL_TYPES)):
            lab, n = ndimage.label(cls == k)
            if n:
                areas = np.bincount(lab.ravel())[1:]
                out[k] = int((areas >= min_area).sum())
        return out

    def count_many(self, tiles: np.ndarray) -> np.ndarray:
        """tiles: (n, ...) -> (n, n_types) counts."""
        return np.stack([self.count(t) for t in tiles]) if len(tiles) else np.zeros((0, len(CELL_TYPES)), np.int64)

    @staticmethod
    def fractions(counts: np.ndarray) -> np.ndarray:
        """Counts (n, n_types) -> fractions; a tile with no nucleus gets all zeros."""
        c = np.asarray(counts, np.float64)
        s = c.sum(-1, keepdims=True)
        return np.where(s > 0, c / np.clip(s, 1, None), 0.0)

    @staticmethod
    def _as_hwc_uint8(tile: np.ndarray) -> np.ndarray:
        t = np.asarray(tile)
        if t.ndim != 3:
            raise ValueError(f"tile must be (H, W, 3) or (3, H, W), got shape {t.shape}")
        if t.shape[0] == 3 and t.shape[-1] != 3:
            t = t.transpose(1, 2, 0)
        if t.shape[-1] != 3:
            raise ValueError(f"tile must have 3 colour channels, got shape {t.shape}")
        if t.dtype != np.uint8:  # model space [-1, 1]
            t = np.clip((t.astype(np.float32) + 1) * 127.5, 0, 255).round().astype(np.uint8)
        return t
