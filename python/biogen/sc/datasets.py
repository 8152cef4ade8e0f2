"""Data sets available offline: scanpy's bundled pbmc68k_reduced with recovered counts, synthetic
negative-binomial AnnData with cell types, batches and donors, and arbitrarily large synthetic ``.h5ad``
files written chunk by chunk (for out-of-core training, :mod:`biogen.sc.streaming`)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

__all__ = ["pbmc68k", "synthetic", "synthetic_h5ad"]


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


def _gene_programs(rng, n_genes, n_types, n_batches, n_donors, n_markers, marker_fold, batch_sd, donor_sd):
    """Gene-level parameters shared by :func:`synthetic` and :func:`synthetic_h5ad` (same draw order)."""
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
    return base, type_fc, marker_of, batch_fc, donor_fc


def _check_sizes(**kw) -> None:
    for name, v in kw.items():
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")


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
    base, type_fc, marker_of, batch_fc, donor_fc = _gene_programs(rng, n_genes, n_types, n_batches, n_donors,
                                                                  n_markers, marker_fold, batch_sd, donor_sd)
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


def synthetic_h5ad(path, n_cells: int, n_genes: int, *, n_types: int = 5, n_batches: int = 2, n_donors: int = 4,
                   seed: int = 0, mean_counts: float = 1000.0, marker_fold: float = 8.0, batch_sd: float = 0.3,
                   donor_sd: float = 0.1, chunk_size: int = 8192, overwrite: bool = False) -> Path:
    """Write a large synthetic ``.h5ad`` (CSR counts) chunk by chunk, never holding the whole matrix.

    Cell types, batches and donors follow :func:`synthetic`'s gene programs (markers up by
    ``marker_fold``, log-normal batch and donor factors). Each cell's counts are a multinomial draw of
    its library size (Poisson around ``mean_counts``, log-normal spread) over its expression profile,
    sampled sparse-first, so the cost is proportional to the number of counts, not cells x genes:
    2 million cells x 20,000 genes at 1,000 counts per cell is about 0.7 billion non-zeros (~6 GB).
    Memory use is bounded by one chunk. Chunks are appended with ``anndata.io.sparse_dataset(...).append``
    to a temporary file beside ``path`` that replaces ``path`` only when complete.

    Parameters
    ----------
    path: the ``.h5ad`` to write (refused if it exists, unless ``overwrite``).
    n_cells, n_genes: matrix shape.
    chunk_size: cells generated and written at a time.

    Returns
    -------
    The path. The file holds ``X`` (CSR float32 counts, h5py-chunked for row-range reads), ``obs``
    (categorical ``cell_type``, ``batch``, ``donor``; index ``cell_<i>``), ``var`` (``GENE<i>`` index,
    ``marker_of``) and ``uns["synthetic"]`` (the parameters).
    """
    import h5py  # noqa: PLC0415
    from anndata.io import sparse_dataset, write_elem  # noqa: PLC0415

    _check_sizes(n_cells=n_cells, n_genes=n_genes, n_types=n_types, n_batches=n_batches, n_donors=n_donors,
                 chunk_size=chunk_size)
    if n_donors < n_batches:
        raise ValueError(f"n_donors ({n_donors}) must be >= n_batches ({n_batches}): donors are nested in batches")
    if not mean_counts >= 1:
        raise ValueError(f"mean_counts must be >= 1, got {mean_counts}")
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    n_markers = max(1, min(20, n_genes // (2 * n_types)))
    if n_markers * n_types > n_genes:
        raise ValueError(f"n_genes ({n_genes}) is too small for {n_types} cell types with marker genes")
    base, type_fc, marker_of, batch_fc, donor_fc = _gene_programs(
        np.random.default_rng(seed), n_genes, n_types, n_batches, n_donors, n_markers, marker_fold, batch_sd,
        donor_sd)
    # One cumulative distribution per (cell type, donor) (the donor fixes the batch), stacked with
    # offsets 0, 1, 2, ... so one searchsorted samples genes for every cell of a chunk at once.
    prof = base[None, None, :] * type_fc[:, None, :] * (batch_fc[np.arange(n_donors) % n_batches]
                                                        * donor_fc)[None, :, :]
    prof /= prof.sum(-1, keepdims=True)
    cdf = np.cumsum(prof.reshape(-1, n_genes), axis=1)
    cdf[:, -1] = 1.0
    cdf_flat = (cdf + np.arange(cdf.shape[0])[:, None]).ravel()
    del prof, cdf

    type_names = [f"type_{t}" for t in range(n_types)]
    batch_names = [f"batch_{b}" for b in range(n_batches)]
    donor_names = [f"donor_{d}" for d in range(n_donors)]
    var = pd.DataFrame({"marker_of": marker_of.astype(str)}, index=[f"GENE{i:05d}" for i in range(n_genes)])

    def chunk(k: int, s: int, e: int):
        rng = np.random.default_rng([seed, 0x5E7, k])
        m = e - s
        ct = rng.integers(n_types, size=m)
        donor = rng.integers(n_donors, size=m)
        lib = np.maximum(1, rng.poisson(rng.lognormal(np.log(mean_counts), 0.3, size=m)))
        combo = np.repeat(ct * n_donors + donor, lib)
        gene = np.searchsorted(cdf_flat, rng.random(combo.shape[0]) + combo, side="right") - combo * n_genes
        np.clip(gene, 0, n_genes - 1, out=gene)
        key, cnt = np.unique(np.repeat(np.arange(m, dtype=np.int64), lib) * n_genes + gene, return_counts=True)
        row = key // n_genes
        indptr = np.zeros(m + 1, dtype=np.int64)
        np.cumsum(np.bincount(row, minlength=m), out=indptr[1:])
        X = sp.csr_matrix((cnt.astype(np.float32), (key % n_genes).astype(np.int32), indptr), shape=(m, n_genes))
        obs = pd.DataFrame({
            "cell_type": pd.Categorical.from_codes(ct, type_names),
            "batch": pd.Categorical.from_codes(donor % n_batches, batch_names),
            "donor": pd.Categorical.from_codes(donor, donor_names),
        }, index=[f"cell_{i}" for i in range(s, e)])
        return X, obs

    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with h5py.File(tmp, "w") as f:
            f.attrs["encoding-type"] = "anndata"
            f.attrs["encoding-version"] = "0.1.0"
            X0, obs0 = chunk(0, 0, min(chunk_size, n_cells))
            # Unlimited, h5py-chunked datasets: appendable, and row ranges read without touching the rest.
            write_elem(f, "X", X0, dataset_kwargs={"chunks": (1 << 16,)})
            write_elem(f, "obs", obs0, dataset_kwargs={"maxshape": (None,), "chunks": (1 << 14,)})
            write_elem(f, "var", var)
            for key in ("layers", "obsm", "varm", "obsp", "varp"):
                write_elem(f, key, {})
            write_elem(f, "uns", {"synthetic": {"seed": int(seed), "n_markers": int(n_markers),
                                                "marker_fold": float(marker_fold), "batch_sd": float(batch_sd),
                                                "donor_sd": float(donor_sd), "mean_counts": float(mean_counts),
                                                "chunk_size": int(chunk_size)}})
            Xd = sparse_dataset(f["X"])
            for k, s in enumerate(range(chunk_size, n_cells, chunk_size), start=1):
                e = min(s + chunk_size, n_cells)
                Xk, obsk = chunk(k, s, e)
                Xd.append(Xk)
                for name, values in [("_index", obsk.index.to_numpy(dtype=object))] + [
                        (f"{c}/codes", obsk[c].cat.codes.to_numpy()) for c in obsk.columns]:
                    ds = f["obs"][name]
                    ds.resize((e,))
                    ds[s:e] = values
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
