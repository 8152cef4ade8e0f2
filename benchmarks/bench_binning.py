"""scGPT binning throughput: C++ kernel and vectorised numpy vs a per-cell numpy loop (scGPT style).

Run:  PYTHONPATH=python python -m pytest benchmarks/bench_binning.py --benchmark-only
      BIOGEN_BENCH_CELLS=1000000 ... for the full 1M x 2k target (the baseline loop then takes minutes).

Shape: cells x 2000 genes at 10% non-zero (~200 genes per cell), count-like float32 values, 51 bins
(scGPT). Every test records cells/s, the baseline time measured in the same run, the speed-up, and the
peak Python-side memory (tracemalloc) in ``extra_info``; results are checked equal to the baseline.
"""

import os
import time
import tracemalloc

import numpy as np
import pytest
import scipy.sparse as sp

from biogen.sc.binning import bin_values, binning_uniforms

N_CELLS = int(os.environ.get("BIOGEN_BENCH_CELLS", "20000"))
N_GENES = 2000
DENSITY = 0.1
N_BINS = 51


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


@pytest.fixture(scope="module")
def baseline(matrix):
    # timed without tracemalloc (it slows Python-level loops several-fold); memory from a traced run on
    # the first 2000 cells plus the full output array, which is what grows with the cell count
    t0 = time.perf_counter()
    out = per_cell_loop(matrix)
    seconds = time.perf_counter() - t0
    peak = _peak(lambda: per_cell_loop(matrix[:2000])) - 4 * matrix[:2000].nnz + 4 * matrix.nnz
    return {"seconds": seconds, "out": out, "peak_bytes": peak}


def _peak(fn):
    tracemalloc.start()
    fn()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def _record(benchmark, baseline, result):
    np.testing.assert_array_equal(result.data, baseline["out"])
    mean = benchmark.stats.stats.mean
    benchmark.extra_info.update({
        "cells": N_CELLS, "genes": N_GENES, "density": DENSITY, "n_bins": N_BINS,
        "cells_per_s": N_CELLS / mean,
        "baseline_per_cell_loop_s": baseline["seconds"],
        "baseline_cells_per_s": N_CELLS / baseline["seconds"],
        "speedup_vs_per_cell_loop": baseline["seconds"] / mean,
        "baseline_peak_python_mem_bytes": baseline["peak_bytes"],
    })


def test_bin_per_cell_loop(benchmark, matrix, baseline):
    result = benchmark.pedantic(per_cell_loop, args=(matrix,), rounds=1, iterations=1)
    np.testing.assert_array_equal(result, baseline["out"])
    benchmark.extra_info.update({"cells": N_CELLS, "cells_per_s": N_CELLS / benchmark.stats.stats.mean,
                                 "peak_python_mem_bytes_estimate": baseline["peak_bytes"]})


def test_bin_numpy_vectorised(benchmark, matrix, baseline):
    result = benchmark.pedantic(bin_values, args=(matrix, N_BINS), kwargs={"backend": "numpy"}, rounds=2,
                                iterations=1)
    _record(benchmark, baseline, result)
    benchmark.extra_info["peak_python_mem_bytes"] = _peak(lambda: bin_values(matrix, N_BINS, backend="numpy"))


@pytest.mark.skipif(not _have_cpu(), reason="biogen._C with bin_csr not built")
@pytest.mark.parametrize("threads", ["1", "all"])
def test_bin_cpp(benchmark, matrix, baseline, threads):
    from biogen.ops._runtime import num_threads

    nt = 1 if threads == "1" else num_threads()
    result = benchmark.pedantic(bin_values, args=(matrix, N_BINS), kwargs={"backend": "cpu", "num_threads": nt},
                                rounds=3, iterations=1)
    _record(benchmark, baseline, result)
    benchmark.extra_info["threads"] = nt
    benchmark.extra_info["peak_python_mem_bytes"] = _peak(lambda: bin_values(matrix, N_BINS, backend="cpu",
                                                                             num_threads=nt))
