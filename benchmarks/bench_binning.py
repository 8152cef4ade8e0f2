"""scGPT binning throughput: C++ kernel and vectorised numpy vs a per-cell numpy loop (scGPT style).

Run:  PYTHONPATH=python python -m pytest benchmarks/bench_binning.py --benchmark-only
      BIOGEN_BENCH_CELLS=1000000 ... for the full 1M x 2k target (the baseline loop then takes minutes a round).

Shape: cells x 2000 genes at 10% non-zero (~200 genes per cell), count-like float32 values, 51 bins
(scGPT). The four sides (the per-cell loop, vectorised numpy, the C++ kernel on one thread and on all)
run interleaved in the same rounds after a warm-up (``conftest.compare``); ``extra_info`` holds each
one's cells/s, the C++ kernel's speed-up over the others, numpy's and the one-thread kernel's over
the loop (ranges and IQR over the rounds), and the peak Python-side memory (tracemalloc). Every side's
bins are first checked equal to the loop's.
"""

import os
import tracemalloc

import numpy as np
import pytest
import scipy.sparse as sp

from biogen.sc.binning import bin_values, binning_uniforms
from conftest import compare

N_CELLS = int(os.environ.get("BIOGEN_BENCH_CELLS", "20000"))
N_GENES = 2000
DENSITY = 0.1
N_BINS = 51
ROUNDS = int(os.environ.get("BIOGEN_BENCH_ROUNDS", "3"))


def _have_cpu():
    try:
        from biogen import _C
    except ImportError:
        return False
    return hasattr(_C, "bin_csr")


@pytest.fixture(scope="module")
def matrix():
    rng = np.random.default_rng(0)
    X = sp.random(N_CELLS, N_GENES, density=DENSITY, format="csr", random_state=0, dtype=np.float32)
    # count-like values with many ties, as in real data
    X.data = rng.negative_binomial(1, 0.3, size=X.nnz).astype(np.float32) + 1
    return X


def per_cell_loop(X, n_bins=N_BINS, seed=0):
    """scGPT's algorithm cell by cell (np.quantile, two np.digitize, random tie spreading)."""
    out = np.zeros(X.nnz, dtype=np.int32)
    q = np.linspace(0, 1, n_bins - 1)
    for i in range(X.shape[0]):
        lo, hi = X.indptr[i], X.indptr[i + 1]
        x = X.data[lo:hi].astype(np.float64)
        nz = np.flatnonzero(x)
        if nz.size == 0:
            continue
        v = x[nz]
        edges = np.quantile(v, q)
        left = np.digitize(v, edges)
        right = np.digitize(v, edges, right=True)
        u = binning_uniforms(seed, np.full(v.size, i), np.arange(v.size))
        out[lo + nz] = np.ceil(u * (right - left) + left).astype(np.int32)
    return out


def _peak(fn):
    tracemalloc.start()
    fn()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


@pytest.mark.skipif(not _have_cpu(), reason="biogen._C with bin_csr not built")
def test_binning(benchmark, matrix):
    from biogen.ops._runtime import num_threads

    nt = num_threads()
    sides = {
        "per-cell-loop": lambda: per_cell_loop(matrix),
        "numpy": lambda: bin_values(matrix, N_BINS, backend="numpy"),
        "cpu-1-thread": lambda: bin_values(matrix, N_BINS, backend="cpu", num_threads=1),
        "cpu": lambda: bin_values(matrix, N_BINS, backend="cpu", num_threads=nt),
    }
    expected = sides["per-cell-loop"]()
    for name in ("numpy", "cpu-1-thread", "cpu"):  # every side computes scGPT's bins exactly
        np.testing.assert_array_equal(sides[name]().data, expected, err_msg=name)
    benchmark.group = f"binning {N_CELLS} cells x {N_GENES} genes"
    res = compare(benchmark, sides, ours="cpu", rounds=ROUNDS)
    for ours in ("numpy", "cpu-1-thread"):
        res.record(benchmark, "per-cell-loop", ours)
    info = benchmark.extra_info
    info.update(cells=N_CELLS, genes=N_GENES, density=DENSITY, n_bins=N_BINS, cpu_threads=nt)
    for name in sides:
        info[f"{name}_cells_per_s"] = N_CELLS / res.median(name)
    # tracemalloc slows Python-level loops several-fold: the loop's peak from its first 2000 cells plus
    # the full output array, which is what grows with the cell count
    sub = matrix[:2000]
    info["per-cell-loop_peak_python_mem_bytes_estimate"] = _peak(lambda: per_cell_loop(sub)) - 4 * sub.nnz + 4 * matrix.nnz
    for name in ("numpy", "cpu-1-thread", "cpu"):
        info[f"{name}_peak_python_mem_bytes"] = _peak(sides[name])
