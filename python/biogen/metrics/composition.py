"""Cell-composition fidelity of generated tiles (RNA-CDM evaluation, SPEC 3.1).

For each generated tile, the cell-type fractions counted in it are compared with the fractions the
conditioning RNA implies. Two correlations are reported:

- ``pooled_r``: Pearson r over all (tile, type) pairs. It rewards getting the average composition
  right (tumour common, dead rare) even for a generator that ignores the condition;
- ``within_type_r``: Pearson r after subtracting each type's mean over tiles (from both sides), i.e.
  whether tiles whose RNA implies *more* of a type show more of it. It is ~0 for an unconditional
  generator, so it is the headline measure of conditioning.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

__all__ = ["CompositionFidelity", "PerturbationEffect", "composition_fidelity", "perturbation_effect",
           "plot_composition"]


@dataclass
class CompositionFidelity:
    pooled_r: float
    within_type_r: float
    per_type_r: dict
    mae: float
    n_tiles: int


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    d = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / d) if d > 0 else float("nan")


def composition_fidelity(counted: np.ndarray, intended: np.ndarray,
                         cell_types: Optional[Sequence[str]] = None) -> CompositionFidelity:
    """Compare counted fractions (n_tiles, n_types) with intended fractions (n_tiles, n_types).

    Tiles where nothing was counted (all-zero rows) are excluded. ``per_type_r`` is NaN for a type
    constant on either side.
    """
    c = np.asarray(counted, np.float64)
    t = np.asarray(intended, np.float64)
    if c.shape != t.shape or c.ndim != 2:
        raise ValueError(f"counted and intended must be equal (n_tiles, n_types) arrays, got {c.shape} and {t.shape}")
    keep = c.sum(1) > 0
    c, t = c[keep], t[keep]
    names = list(cell_types) if cell_types is not None else [str(k) for k in range(c.shape[1])]
    if len(c) < 2:
        return CompositionFidelity(float("nan"), float("nan"), {n: float("nan") for n in names}, float("nan"), len(c))
    per = {n: _pearson(c[:, k], t[:, k]) for k, n in enumerate(names)}
    return CompositionFidelity(
        pooled_r=_pearson(c.ravel(), t.ravel()),
        within_type_r=_pearson((c - c.mean(0)).ravel(), (t - t.mean(0)).ravel()),
        per_type_r=per,
        mae=float(np.abs(c - t).mean()),
        n_tiles=int(len(c)),
    )


@dataclass
class PerturbationEffect:
    cell_type: str
    mean_before: float
    mean_after: float
    delta: float
    frac_increased: float
    p_value: float
    n: int


def perturbation_effect(before: np.ndarray, after: np.ndarray, type_index: int, cell_type: str = "") -> PerturbationEffect:
    """Paired change of one type's counted fraction: tiles generated from the same seeds before and
    after perturbing the RNA. ``p_value``: one-sided Wilcoxon signed-rank (after > before)."""
    from scipy.stats import wilcoxon

    b = np.asarray(before, np.float64)[:, type_index]
    a = np.asarray(after, np.float64)[:, type_index]
    if b.shape != a.shape:
        raise ValueError(f"before and after must have the same number of tiles, got {len(b)} and {len(a)}")
    d = a - b
    try:
        p = float(wilcoxon(a, b, alternative="greater").pvalue) if np.any(d != 0) else 1.0
    except ValueError:
        p = float("nan")
    return PerturbationEffect(cell_type, float(b.mean()), float(a.mean()), float(d.mean()),
                              float((d > 0).mean()), p, int(len(b)))


def plot_composition(counted: np.ndarray, intended: np.ndarray, cell_types: Sequence[str], path: str | Path,
                     title: str = "Composition fidelity") -> Path:
    """One scatter panel per type: intended (from RNA) vs counted (in generated tiles) fractions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..utils import save_figure

    c, t = np.asarray(counted), np.asarray(intended)
    k = len(cell_types)
    fig, axes = plt.subplots(1, k, figsize=(2.6 * k, 2.8), squeeze=False)
    for j, (ax, name) in enumerate(zip(axes[0], cell_types)):
        ax.scatter(t[:, j], c[:, j], s=8, alpha=0.6)
        hi = max(float(t[:, j].max(initial=0)), float(c[:, j].max(initial=0)), 0.05)
        ax.plot([0, hi], [0, hi], "k--", lw=0.8)
        ax.set_title(f"{name} r={_pearson(c[:, j], t[:, j]):.2f}", fontsize=9)
        ax.set_xlabel("intended (RNA)", fontsize=8)
        if j == 0:
            ax.set_ylabel("counted (tile)", fontsize=8)
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path, dpi=110)
