"""Data sets available offline: scanpy's bundled pbmc68k_reduced with recovered counts, and synthetic
negative-binomial AnnData with cell types, batches and donors."""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp

__all__ = ["pbmc68k", "synthetic"]


def pbmc68k():
    """scanpy's ``pbmc68k_reduced`` (700 cells x 765 genes, 10 ``bulk_labels``) with counts.

    The bundled object stores scaled values in ``X`` and log1p(counts per 10k) in ``.raw.X``, where
    "per 10k" used each cell's total over the *full* gene set, ``obs["n_counts"]``. Counts are recovered
    as ``round(expm1(raw.X) * n_counts / 1e4)``. ``.raw`` and ``X`` hold the same 765 genes here;
    the returned object uses ``.raw``'s genes and order.

    Returns
    -------
    AnnData: ``X`` and ``layers["counts"]`` = recovered counts (CSR float32), ``layers["log1p_raw"]`` =
    the bundled ``.raw.X``; ``obs`` (``bulk_labels``, ``n_counts``, ``louvain``, ...), ``obsm``
    (``X_pca``, ``X_umap``); ``uns["counts_recovery_max_residual"]`` = max |x - round(x)| before
    rounding (about 0.08: float32 storage of the log values).
    """
    import anndata as ad  # noqa: PLC0415
    import scanpy as sc  # noqa: PLC0415

    src = sc.datasets.pbmc68k_reduced()
    raw = src.raw
    logv = sp.csr_matrix(raw.X, dtype=np.float64)
    size = src.obs["n_counts"].to_numpy(np.float64)
    est = logv.copy()
    est.data = np.expm1(est.data)
    est = sp.csr_matrix(sp.diags(size / 1e4) @ est)
    residual = float(np.abs(est.data - np.round(est.data)).max()) if est.nnz else 0.0
    counts = est.copy()
    counts.data = np.round(counts.data)
    if residual > 0.25 or (counts.data < 1).any():
        raise RuntimeError(f"pbmc68k_reduced counts recovery is inconsistent (max residual {residual:.3f}); "
                           "the bundled data set may have changed")
    counts = counts.astype(np.float32)
    counts.eliminate_zeros()
    out = ad.AnnData(X=counts, obs=src.obs.copy(), var=pd.DataFrame(index=raw.var_names.copy()),
                     obsm={k: np.asarray(v).copy() for k, v in src.obsm.items()})
    out.layers["counts"] = counts.copy()
    out.layers["log1p_raw"] = sp.csr_matrix(raw.X, dtype=np.float32)
    out.uns["counts_recovery_max_residual"] = residual
    if "bulk_labels_colors" in src.uns:
        out.uns["bulk_labels_colors"] = list(src.uns["bulk_labels_colors"])
    return out


def synthetic(n_cells: int = 1000, n_genes: int = 500, n_types: int = 5, n_batches: int = 2, n_donors: int = 4,
              seed: int = 0, *, n_markers: int | None = None, marker_fold: float = 8.0, batch_sd: float = 0.3,
              donor_sd: float = 0.1, dispersion: float = 2.0, mean_library: float = 2000.0, chunk_size: int = 8192):
    """Negative-binomial counts with marker-gene cell types, batch and donor effects.

    Gene base means are log-normal; each cell type up-regulates its own ``n_markers`` genes (disjoint
    sets) by ``marker_fold``; each batch multiplies every gene by a log-normal factor (sd
    ``batch_sd``), each donor by another (sd ``donor_sd``); donors are nested in batches (donor d in
    batch d % n_batches); library sizes are log-normal around ``mean_library``. Counts are
    Gamma-Poisson (NB with ``dispersion`` = inverse overdispersion), generated in chunks of cells
    straight into CSR so million-cell data fits in memory.

    Returns
    -------
    AnnData (n_cells, n_genes): ``X`` counts (CSR float32); ``obs`` categorical ``cell_type``,
    ``batch``, ``donor``; ``var["marker_of"]`` (cell type or "") ; ``uns["synthetic"]`` parameters.
    """
    import anndata as ad  # noqa: PLC0415

    for name, v, lo in (("n_cells", n_cells, 1), ("n_genes", n_genes, 1), ("n_types", n_types, 1),
                        ("n_batches", n_batches, 1), ("n_donors", n_donors, 1)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
            raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
    if n_donors < n_batches:
        raise ValueError(f"n_donors ({n_donors}) must be >= n_batches ({n_batches}): donors are nested in batches")
    if n_markers is None:
        n_markers = max(1, min(20, n_genes // (2 * n_types)))
    if n_markers * n_types > n_genes:
        raise ValueError(f"n_markers * n_types = {n_markers * n_types} exceeds n_genes = {n_genes}")
    rng = np.random.default_rng(seed)
    base = rng.lognormal(mean=0.0, sigma=1.2, size=n_genes)
    base /= base.sum()
    type_fc = np.ones((n_types, n_genes))
    perm = rng.permutation(n_genes)
    marker_of = np.full(n_genes, "", dtype=object)
    for t in range(n_types):
        genes = perm[t * n_markers:(t + 1) * n_markers]
        type_fc[t, genes] = marker_fold
        marker_of[genes] = f"type_{t}"
    batch_fc = rng.lognormal(0.0, batch_sd, size=(n_batches, n_genes))
    donor_fc = rng.lognormal(0.0, donor_sd, size=(n_donors, n_genes))
    cell_type = rng.integers(n_types, size=n_cells)
    donor = rng.integers(n_donors, size=n_cells)
    batch = donor % n_batches
    library = rng.lognormal(np.log(mean_library), 0.3, size=n_cells)

    blocks = []
    for s in range(0, n_cells, chunk_size):
        e = min(s + chunk_size, n_cells)
        prof = base[None, :] * type_fc[cell_type[s:e]] * batch_fc[batch[s:e]] * donor_fc[donor[s:e]]
        prof /= prof.sum(axis=1, keepdims=True)
        mu = prof * library[s:e, None]
        lam = rng.gamma(dispersion, mu / dispersion)
        blocks.append(sp.csr_matrix(rng.poisson(lam).astype(np.float32)))
    X = sp.vstack(blocks, format="csr")
    obs = pd.DataFrame({
        "cell_type": pd.Categorical([f"type_{t}" for t in cell_type], categories=[f"type_{t}" for t in range(n_types)]),
        "batch": pd.Categorical([f"batch_{b}" for b in batch], categories=[f"batch_{b}" for b in range(n_batches)]),
        "donor": pd.Categorical([f"donor_{d}" for d in donor], categories=[f"donor_{d}" for d in range(n_donors)]),
    }, index=[f"cell_{i}" for i in range(n_cells)])
    var = pd.DataFrame({"marker_of": marker_of.astype(str)}, index=[f"GENE{i:05d}" for i in range(n_genes)])
    a = ad.AnnData(X=X, obs=obs, var=var)
    a.uns["synthetic"] = {"seed": int(seed), "n_markers": int(n_markers), "marker_fold": float(marker_fold),
                          "batch_sd": float(batch_sd), "donor_sd": float(donor_sd),
                          "dispersion": float(dispersion), "mean_library": float(mean_library)}
    return a
