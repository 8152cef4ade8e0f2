"""Independent references for the sc tests."""

import numpy as np

from biogen.sc.binning import binning_uniforms


def scgpt_binning_reference(X, n_bins, seed, cell_offset=0):
    """scGPT's per-cell loop (preprocess.binning + _digitize(side="both")) on a dense array, fed the
    same tie uniforms as biogen (scGPT itself draws them from np.random's global stream)."""
    X = np.asarray(X)
    out = np.zeros(X.shape, dtype=np.int64)
    for i, row in enumerate(X):
        nz = row.nonzero()[0]
        if nz.size == 0:
            continue
        x = row[nz].astype(np.float64)
        edges = np.quantile(x, np.linspace(0, 1, n_bins - 1))
        left = np.digitize(x, edges)
        right = np.digitize(x, edges, right=True)
        u = binning_uniforms(seed, np.full(x.size, i + cell_offset), np.arange(x.size))
        digits = np.ceil(u * (right - left) + left).astype(np.int64)
        out[i, nz] = digits
    return out


def have_cpu_kernel():
    try:
        from biogen import _C
    except ImportError:
        return False
    return hasattr(_C, "bin_csr")
