"""AnnData preprocessing for the single-cell models (scanpy underneath).

``preprocess`` starts from raw counts (``adata.X`` or a named layer), refuses data that is not counts
(log-transformed, scaled, NaN), optionally filters cells / genes and selects highly variable genes,
then normalises each cell to ``target_sum`` counts and applies ``log1p``. The result has the
log-normalised values in ``X`` and the counts in ``layers[counts_layer]``. Like scanpy's ``copy``
argument, the user's AnnData is left untouched unless ``inplace=True``.
"""

from __future__ import annotations

import importlib.util
import warnings

import numpy as np
import scipy.sparse as sp

__all__ = ["check_counts", "preprocess"]

_BACKED_ROWS = 65536  # rows of a backed matrix checked at a time (bounded memory)


def _values(m) -> np.ndarray:
    if sp.issparse(m):
        return m.data
    return np.asarray(m).ravel()


def check_counts(adata_or_matrix, *, layer: str | None = None, what: str | None = None) -> None:
    """Raise ``ValueError`` unless the matrix holds raw counts (finite, non-negative integers).

    Parameters
    ----------
    adata_or_matrix: AnnData (checks ``X`` or ``layers[layer]``) or a (cells, genes) matrix.
    layer: AnnData layer to check.
    what: name used in messages (default ``adata.X`` / ``adata.layers[...]``).
    """
    if hasattr(adata_or_matrix, "var_names"):
        a = adata_or_matrix
        if a.n_obs == 0 or a.n_vars == 0:
            raise ValueError(f"AnnData is empty ({a.n_obs} cells x {a.n_vars} genes)")
        if layer is None:
            m, what = a.X, what or "adata.X"
        else:
            if layer not in a.layers:
                raise KeyError(f"layer {layer!r} not in adata.layers (available: {list(a.layers.keys())})")
            m, what = a.layers[layer], what or f"adata.layers[{layer!r}]"
        if m is None:
            raise ValueError(f"{what} is None; pass layer= naming the counts layer")
        if hasattr(m, "to_memory") or (not sp.issparse(m) and not isinstance(m, np.ndarray) and hasattr(m, "shape")):
            # backed (sparse dataset or h5py array): check row blocks, never the whole matrix in memory
            for start in range(0, m.shape[0], _BACKED_ROWS):
                block = m[start:start + _BACKED_ROWS]
                block = block.to_memory() if hasattr(block, "to_memory") else block
                _check_values(_values(block) if sp.issparse(block) else np.asarray(block).ravel(), what)
            return
    else:
        m, what = adata_or_matrix, what or "matrix"
        if 0 in m.shape:
            raise ValueError(f"{what} is empty (shape {m.shape})")
    _check_values(_values(m), what)


def _check_values(v: np.ndarray, what: str) -> None:
    if v.dtype.kind not in "fiub":
        raise TypeError(f"{what} must hold numbers, got dtype {v.dtype}")
    if v.size == 0:
        return
    if v.dtype.kind == "f":
        bad = ~np.isfinite(v)
        if bad.any():
            raise ValueError(f"{what} contains {int(bad.sum())} NaN/infinite values; expected raw counts")
    vmin = v.min()
    if vmin < 0:
        raise ValueError(f"{what} has negative values (min {vmin:g}): it looks scaled / centred, not raw counts. "
                         "Pass the raw counts (e.g. layer='counts' or adata.raw).")
    if v.dtype.kind == "f":
        frac = v != np.round(v)
        if frac.any():
            ex = v[frac][:3]
            raise ValueError(f"{int(frac.sum())} values of {what} are not integers (e.g. {ex.tolist()}): it looks "
                             "log-transformed or normalised, not raw counts. Pass the raw counts "
                             "(e.g. layer='counts').")


def _hvg_flavor(flavor: str) -> str:
    have_skmisc = importlib.util.find_spec("skmisc") is not None
    if flavor == "auto":
        return "seurat_v3" if have_skmisc else "cell_ranger"
    if flavor not in ("seurat_v3", "cell_ranger", "seurat"):
        raise ValueError(f"hvg_flavor must be 'auto', 'seurat_v3', 'cell_ranger' or 'seurat', got {flavor!r}")
    if flavor == "seurat_v3" and not have_skmisc:
        raise ImportError("hvg_flavor='seurat_v3' needs the scikit-misc package (pip install scikit-misc); "
                          "or use hvg_flavor='cell_ranger'")
    return flavor


def preprocess(adata, *, layer: str | None = None, target_sum: float = 1e4, log1p: bool = True,
               n_top_genes: int | None = None, hvg_flavor: str = "auto", batch_key: str | None = None,
               min_genes: int | None = None, min_cells: int | None = None, min_counts: int | None = None,
               counts_layer: str = "counts", inplace: bool = False):
    """Counts -> (filtered, HVG-subset) log1p(normalize_total) values in ``X``.

    Parameters
    ----------
    adata: AnnData with raw counts in ``X`` or ``layers[layer]`` (in memory or backed).
    layer: layer holding the counts (default ``X``).
    target_sum: counts per cell after ``scanpy.pp.normalize_total``.
    log1p: apply ``scanpy.pp.log1p`` after normalisation.
    n_top_genes: keep this many highly variable genes (None: keep all).
    hvg_flavor: "seurat_v3" (on counts, needs scikit-misc), "cell_ranger"/"seurat" (on log-normalised
        values) or "auto" (seurat_v3 when scikit-misc is installed, else cell_ranger). The flavor used is
        recorded in ``uns["biogen_preprocess"]``.
    batch_key: ``obs`` column for batch-aware HVG selection.
    min_genes, min_counts: drop cells with fewer detected genes / counts.
    min_cells: drop genes detected in fewer cells.
    counts_layer: layer of the result that keeps the (filtered) counts.
    inplace: modify ``adata`` and return None; default: return a new AnnData, ``adata`` untouched.

    Returns
    -------
    AnnData (cells, genes kept) or None when ``inplace``.
    """
    import scanpy as sc  # noqa: PLC0415  (heavy import, only when preprocessing)

    check_counts(adata, layer=layer)
    if not isinstance(target_sum, (int, float)) or isinstance(target_sum, bool) or target_sum <= 0:
        raise ValueError(f"target_sum must be a positive number, got {target_sum!r}")
    if n_top_genes is not None and (not isinstance(n_top_genes, (int, np.integer)) or n_top_genes < 1):
        raise ValueError(f"n_top_genes must be a positive integer or None, got {n_top_genes!r}")
    if batch_key is not None and batch_key not in adata.obs:
        raise KeyError(f"batch_key {batch_key!r} is not a column of adata.obs")
    flavor = _hvg_flavor(hvg_flavor) if n_top_genes else None
    if inplace and adata.isbacked:
        raise ValueError("inplace=True is not possible on a backed AnnData; use inplace=False")

    if inplace:
        work = adata
    else:
        work = adata.to_memory() if adata.isbacked else adata.copy()
    counts = work.X if layer is None else work.layers[layer]
    counts = counts.copy()
    work.X = counts.astype(np.float32) if counts.dtype != np.float32 else counts.copy()
    work.layers[counts_layer] = counts

    if min_genes is not None:
        sc.pp.filter_cells(work, min_genes=min_genes)
    if min_counts is not None:
        sc.pp.filter_cells(work, min_counts=min_counts)
    if min_cells is not None:
        sc.pp.filter_genes(work, min_cells=min_cells)
    if work.n_obs == 0 or work.n_vars == 0:
        raise ValueError(f"filtering left {work.n_obs} cells x {work.n_vars} genes; relax min_genes / "
                         "min_counts / min_cells")
    if n_top_genes is not None and n_top_genes > work.n_vars:
        warnings.warn(f"n_top_genes={n_top_genes} > {work.n_vars} genes; keeping all genes", stacklevel=2)
        n_top_genes = None
    if n_top_genes and flavor == "seurat_v3":
        sc.pp.highly_variable_genes(work, n_top_genes=n_top_genes, flavor="seurat_v3", layer=counts_layer,
                                    batch_key=batch_key, subset=True)
    sc.pp.normalize_total(work, target_sum=float(target_sum))
    if log1p:
        sc.pp.log1p(work)
    if n_top_genes and flavor != "seurat_v3":
        sc.pp.highly_variable_genes(work, n_top_genes=n_top_genes, flavor=flavor, batch_key=batch_key,
                                    subset=True)
    work.uns["biogen_preprocess"] = {
        "source": "X" if layer is None else f"layers/{layer}", "target_sum": float(target_sum),
        "log1p": bool(log1p), "n_top_genes": n_top_genes or 0, "hvg_flavor": flavor or "none",
        "min_genes": min_genes or 0, "min_cells": min_cells or 0, "min_counts": min_counts or 0,
        "counts_layer": counts_layer}
    return None if inplace else work
