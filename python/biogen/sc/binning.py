"""scGPT value binning (SPEC 2.1), per cell, on dense arrays or scipy CSR matrices.

For each cell (row): zeros stay bin 0; the bin edges are the quantiles of the cell's non-zero values at
``np.linspace(0, 1, n_bins - 1)`` (numpy's default "linear" quantile); each non-zero value ``x`` gets
``left = #edges <= x`` and ``right = #edges < x`` (``np.digitize`` with ``right=False`` / ``True``) and
its bin is ``ceil(u * (right - left) + left)`` with ``u ~ U[0, 1)``: a value that sits on one edge keeps
that bin, a value equal to several (tied) edges gets one of those bins at random. This is scGPT's
``preprocess._digitize(side="both")`` + ``binning``. Non-zero values always land in ``1..n_bins-1``.

Two implementations give bit-identical results: a C++ kernel (``csrc/cpu/binning.cpp``, OpenMP over
cells) and a vectorised numpy fallback. Both compare values in float64 and reproduce numpy's quantile
arithmetic exactly (virtual index, floor, lerp with the ``t >= 0.5`` branch), so they also equal a
per-cell ``np.quantile`` / ``np.digitize`` loop fed the same uniforms.

Randomness. scGPT draws ``np.random.rand(n_nonzero)`` from numpy's global stream, cell after cell,
which makes a cell's bins depend on every cell before it (no parallelism, a dataset item could not be
binned alone). Here the uniform for the ``j``-th non-zero (in column order) of global cell ``c`` is a
counter-based hash of ``(seed, c, j)`` (:func:`binning_uniforms`), so results do not depend on thread
count, chunking, or whether a cell is binned alone (``cell_offset``) or inside its matrix.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

__all__ = ["bin_values", "binning_uniforms", "quantile_levels"]

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_ODD2 = np.uint64(0xD1B54A32D192ED03)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _mix64(z: np.ndarray) -> np.ndarray:
    # splitmix64 finaliser; uint64 array arithmetic wraps modulo 2**64 as in C++
    z = z ^ (z >> np.uint64(30))
    z = z * _M1
    z = z ^ (z >> np.uint64(27))
    z = z * _M2
    return z ^ (z >> np.uint64(31))


def binning_uniforms(seed: int, cells, positions) -> np.ndarray:
    """Uniforms in [0, 1) used to spread ties: one per (global cell index, non-zero position).

    Parameters
    ----------
    seed: int, >= 0
    cells: (n,) integer array of global cell (row) indices
    positions: (n,) integer array, index of the value among its cell's non-zeros (column order)

    Returns
    -------
    (n,) float64 array; the C++ kernel computes the same numbers.
    """
    cells = np.asarray(cells, dtype=np.int64).astype(np.uint64)
    positions = np.asarray(positions, dtype=np.int64).astype(np.uint64)
    with np.errstate(over="ignore"):
        s = _mix64(np.uint64(seed) + _GOLDEN * (cells + np.uint64(1)))
        z = _mix64(s ^ (_ODD2 * (positions + np.uint64(1))))
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / 9007199254740992.0)


def quantile_levels(n_bins: int) -> np.ndarray:
    """The quantile levels of the bin edges, ``np.linspace(0, 1, n_bins - 1)``: (n_bins - 1,) float64."""
    return np.linspace(0, 1, n_bins - 1)


def _check_args(x, n_bins, seed, cell_offset):
    if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or n_bins < 3:
        raise ValueError(f"n_bins must be an integer >= 3 (bin 0 is zeros), got {n_bins!r}")
    if n_bins > 2**31 - 1:
        raise ValueError(f"n_bins must fit in int32, got {n_bins}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if isinstance(cell_offset, bool) or not isinstance(cell_offset, (int, np.integer)) or cell_offset < 0:
        raise ValueError(f"cell_offset must be a non-negative integer, got {cell_offset!r}")
    if x.ndim != 2:
        raise ValueError(f"x must be 2-D (cells, genes), got shape {x.shape}")


def _check_values(data: np.ndarray) -> None:
    if data.dtype.kind not in "fiub":
        raise TypeError(f"x must hold real numbers, got dtype {data.dtype}")
    if data.size == 0:
        return
    if data.dtype.kind == "f" and not np.isfinite(data).all():
        raise ValueError("x contains NaN or infinite values; binning needs finite non-negative values")
    if data.min() < 0:
        raise ValueError(f"x must be non-negative for binning, got minimum {data.min()}")


def bin_values(x, n_bins: int = 51, *, seed: int = 0, cell_offset: int = 0, backend: str = "auto",
               num_threads: int | None = None):
    """Bin each cell's values into ``0..n_bins-1`` the scGPT way.

    Parameters
    ----------
    x: (cells, genes) dense array or scipy sparse matrix of non-negative finite values (counts or
        normalised / log values: binning only depends on the order of a cell's values).
    n_bins: number of bins including bin 0 for zeros (scGPT: 51).
    seed: seeds the tie-spreading uniforms.
    cell_offset: global index of row 0 of ``x`` (bin a slice of a larger matrix, or one dataset item,
        exactly as inside the full matrix).
    backend: "auto" (C++ when built), "cpu" (C++ kernel, error if not built) or "numpy".
    num_threads: OpenMP threads for the C++ kernel (default: ``biogen.ops._runtime.num_threads()``).

    Returns
    -------
    Sparse input: CSR matrix of the same shape and sparsity pattern with int32 bins (explicitly stored
    zeros get bin 0). Dense input: (cells, genes) int64 array.
    """
    dense = not sp.issparse(x)
    if dense:
        x = np.asarray(x)
    _check_args(x, n_bins, seed, cell_offset)
    if backend not in ("auto", "cpu", "numpy"):
        raise ValueError(f"backend must be 'auto', 'cpu' or 'numpy', got {backend!r}")
    csr = sp.csr_matrix(x) if dense else x.tocsr()
    if not csr.has_sorted_indices:
        # tie uniforms are indexed by the position among the cell's non-zeros in column order
        csr = csr.copy()
        csr.sort_indices()
    _check_values(csr.data)
    out = _bin_csr_arrays(csr.indptr, csr.data, n_bins, seed, cell_offset, backend, num_threads)
    result = sp.csr_matrix((out, csr.indices.copy(), csr.indptr.copy()), shape=csr.shape)
    if dense:
        return result.toarray().astype(np.int64)
    return result


def _bin_csr_arrays(indptr, data, n_bins, seed, cell_offset, backend="auto", num_threads=None):
    """Bins of CSR ``data`` (column-sorted rows, checked values): (nnz,) int32."""
    if data.dtype not in (np.float32, np.float64):
        data = data.astype(np.float64)
    indptr = np.ascontiguousarray(indptr, dtype=np.int64)
    q = quantile_levels(n_bins)
    kernel = None
    if backend in ("auto", "cpu"):
        kernel = _cpp_kernel()
        if kernel is None and backend == "cpu":
            raise RuntimeError("backend='cpu' needs the compiled extension biogen._C with bin_csr "
                               "(build it, see README), or use backend='numpy'")
    if kernel is None:
        return _bin_csr_numpy(indptr, data, q, int(seed), int(cell_offset))
    out = np.empty(data.shape[0], dtype=np.int32)
    if num_threads is None:
        from biogen.ops._runtime import num_threads as _nt  # noqa: PLC0415
        num_threads = _nt()
    data = np.ascontiguousarray(data)
    kernel(indptr.ctypes.data, data.ctypes.data, 1 if data.dtype == np.float64 else 0,
           indptr.shape[0] - 1, q.ctypes.data, q.shape[0], int(seed), int(cell_offset),
           out.ctypes.data, int(num_threads))
    return out


def _cpp_kernel():
    try:
        from biogen import _C  # noqa: PLC0415
    except ImportError:
        return None
    return getattr(_C, "bin_csr", None)


def _virtual_index_table(counts: np.ndarray, q: np.ndarray):
    """numpy's linear-quantile indices and weights for samples of size ``counts``: (R, E) each."""
    n = counts[:, None].astype(np.int64)
    # numpy's "linear" method (numpy >= 1.22): virtual index (n - 1) * q, in float64
    vi = (n - 1).astype(np.float64) * q[None, :]
    prev = np.floor(vi)
    gamma = vi - prev
    prev = prev.astype(np.int64)
    nxt = prev + 1
    above = vi >= (n - 1)
    prev = np.where(above, n - 1, prev)
    nxt = np.where(above, n - 1, nxt)
    below = vi < 0
    prev = np.where(below, 0, prev)
    nxt = np.where(below, 0, nxt)
    return prev, nxt, gamma


def _lerp(a, b, t):
    diff = b - a
    lo = a + diff * t
    hi = b - diff * (1 - t)
    return np.where(t >= 0.5, hi, lo)


def _bin_csr_numpy(indptr, data, q, seed, cell_offset, chunk_nnz: int = 1 << 16):
    n_rows = indptr.shape[0] - 1
    out = np.zeros(data.shape[0], dtype=np.int32)
    row0 = 0
    while row0 < n_rows:
        # whole rows per chunk, about chunk_nnz stored values (at least one row)
        row1 = int(np.searchsorted(indptr, indptr[row0] + chunk_nnz, side="right")) - 1
        row1 = min(max(row1, row0 + 1), n_rows)
        lo, hi = int(indptr[row0]), int(indptr[row1])
        vals = data[lo:hi].astype(np.float64)
        rows = np.repeat(np.arange(row1 - row0), np.diff(indptr[row0:row1 + 1]))
        nz = vals != 0
        v, r = vals[nz], rows[nz]
        counts = np.bincount(r, minlength=row1 - row0)
        starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
        pos = np.arange(v.shape[0]) - starts[r]
        sorted_v = v[np.lexsort((v, r))]
        has = counts > 0
        prev, nxt, gamma = _virtual_index_table(np.maximum(counts, 1), q)
        base = starts[:, None]
        safe_prev = np.where(has[:, None], base + prev, 0)
        safe_next = np.where(has[:, None], base + nxt, 0)
        if sorted_v.shape[0]:
            edges = _lerp(sorted_v[safe_prev], sorted_v[safe_next], gamma)
            e = edges[r]  # (nnz, E)
            left = (e <= v[:, None]).sum(axis=1)
            right = (e < v[:, None]).sum(axis=1)
            bins = left.astype(np.int64)
            tied = right != left
            if tied.any():
                u = binning_uniforms(seed, r[tied] + row0 + cell_offset, pos[tied])
                d = u * (right[tied] - left[tied]).astype(np.float64) + left[tied].astype(np.float64)
                bins[tied] = np.maximum(np.ceil(d), 1).astype(np.int64)
            chunk_out = np.zeros(hi - lo, dtype=np.int32)
            chunk_out[nz] = bins
            out[lo:hi] = chunk_out
        row0 = row1
    return out
