import numpy as np
import pytest
import scipy.sparse as sp

from biogen.sc.binning import _lerp, _virtual_index_table, bin_values, binning_uniforms, quantile_levels

from .helpers import have_cpu_kernel, scgpt_binning_reference

BACKENDS = [
    "numpy",
    pytest.param("cpu", marks=pytest.mark.skipif(not have_cpu_kernel(), reason="biogen._C with bin_csr not built")),
]


def _counts(n_cells=120, n_genes=300, density=0.2, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.negative_binomial(2, 0.4, size=(n_cells, n_genes)) * (rng.random((n_cells, n_genes)) < density)
    X[3] = 0  # an all-zero cell
    X[4] = 0
    X[4, 7] = 5  # a single non-zero
    X[5] = 0
    X[5, :40] = 3  # all non-zeros tied
    return X


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64])
@pytest.mark.parametrize("n_bins", [51, 52, 7])
def test_equals_scgpt_loop(backend, dtype, n_bins):
    X = _counts().astype(dtype)
    if n_bins == 52:  # n_bins - 2 even: numpy's quantile hits virtual indices with fraction exactly 0.5
        counts = np.maximum((X != 0).sum(1), 1)
        assert (_virtual_index_table(counts, quantile_levels(n_bins))[2] == 0.5).any()
    expected = scgpt_binning_reference(X, n_bins, seed=11)
    got_dense = bin_values(X, n_bins, seed=11, backend=backend)
    got_sparse = bin_values(sp.csr_matrix(X), n_bins, seed=11, backend=backend)
    np.testing.assert_array_equal(got_dense, expected)
    np.testing.assert_array_equal(got_sparse.toarray(), expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_equals_scgpt_loop_continuous(backend):
    # log-normalised float32 values: edges fall between values and quantile rounding matters
    X = _counts(seed=1).astype(np.float64)
    X = np.log1p(X * 1e4 / np.maximum(X.sum(1, keepdims=True), 1)).astype(np.float32)
    np.testing.assert_array_equal(bin_values(X, 51, seed=2, backend=backend), scgpt_binning_reference(X, 51, 2))


@pytest.mark.parametrize("n", [6, 26, 76])
def test_numpy_edges_equal_np_quantile_bitwise_at_exact_halves(n):
    """The fallback's edges are np.quantile's bit for bit, also where the virtual index has fraction
    exactly 0.5 (numpy's lerp switches formula at t >= 0.5) and values span many magnitudes (so
    b - a rounds and the two formulas differ by an ulp). A bin cannot show that ulp (no value lies
    strictly between two consecutive order statistics), so the edges are compared directly."""
    q = quantile_levels(52)
    prev, nxt, gamma = _virtual_index_table(np.array([n]), q)
    half = gamma[0] == 0.5
    assert half.any()
    decided = 0
    for seed in range(8):
        rng = np.random.default_rng(seed)
        x = np.sort(rng.random(n) * 10.0 ** rng.integers(-3, 9, n))
        lo_formula = x[prev[0]] + (x[nxt[0]] - x[prev[0]]) * gamma[0]
        edges = _lerp(x[prev], x[nxt], gamma)[0]
        decided += int((edges[half] != lo_formula[half]).sum())
        np.testing.assert_array_equal(edges, np.quantile(x, q))
    assert decided > 0  # the t >= 0.5 branch decided some edges


@pytest.mark.parametrize("backend", BACKENDS)
def test_properties(backend):
    X = _counts(seed=2).astype(np.float32)
    B = bin_values(X, 51, seed=0, backend=backend)
    assert (B[X == 0] == 0).all()
    assert B[X > 0].min() >= 1 and B[X > 0].max() <= 50
    for i in range(X.shape[0]):
        nz = X[i] > 0
        x, b = X[i, nz], B[i, nz]
        order = np.argsort(x, kind="stable")
        xs, bs = x[order], b[order]
        # monotone up to ties: a strictly larger value never gets a smaller bin
        strictly = xs[1:] > xs[:-1]
        assert (bs[1:][strictly] >= bs[:-1][strictly]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_equal_count_bins_on_distinct_values(backend):
    rng = np.random.default_rng(3)
    n, n_bins = 4000, 11
    x = rng.gamma(2.0, 1.0, size=(1, n)) + 1e-3
    b = bin_values(x, n_bins, backend=backend)[0]
    counts = np.bincount(b, minlength=n_bins)
    assert counts[0] == 0
    # scGPT edges: bins 1..n_bins-2 each hold ~n/(n_bins-2) values, the last bin only the maximum
    expected = n / (n_bins - 2)
    assert np.all(np.abs(counts[1:-1] - expected) <= 2)
    assert counts[-1] == 1 and b[np.argmax(x)] == n_bins - 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_spread_uniformly(backend):
    x = np.full((1, 5000), 7.0)
    b = bin_values(x, 11, seed=4, backend=backend)[0]
    counts = np.bincount(b, minlength=11)[1:]
    assert counts.sum() == 5000
    assert counts.min() > 400 and counts.max() < 600  # 500 expected per bin, sd ~21


@pytest.mark.parametrize("backend", BACKENDS)
def test_cell_offset_and_slicing(backend):
    X = sp.csr_matrix(_counts(seed=5).astype(np.float32))
    full = bin_values(X, 51, seed=9, backend=backend).toarray()
    part = bin_values(X[37:41], 51, seed=9, cell_offset=37, backend=backend).toarray()
    np.testing.assert_array_equal(part, full[37:41])
    other_seed = bin_values(X, 51, seed=10, backend=backend).toarray()
    assert (other_seed != full).any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_unsorted_indices_and_explicit_zeros(backend):
    X = sp.csr_matrix(_counts(seed=6).astype(np.float32))
    expected = bin_values(X, 51, backend=backend).toarray()
    Y = X.copy()
    Y.data[::5] = 0.0  # explicit zeros stored in the structure
    expected_zeros = scgpt_binning_reference(Y.toarray(), 51, 0)
    got = bin_values(Y, 51, backend=backend)
    assert got.nnz == Y.nnz
    np.testing.assert_array_equal(got.toarray(), expected_zeros)
    # reverse the column order inside each row
    Z = X.copy()
    for r in range(Z.shape[0]):
        s, e = Z.indptr[r], Z.indptr[r + 1]
        Z.indices[s:e] = Z.indices[s:e][::-1].copy()
        Z.data[s:e] = Z.data[s:e][::-1].copy()
    Z.has_sorted_indices = False
    np.testing.assert_array_equal(bin_values(Z, 51, backend=backend).toarray(), expected)


@pytest.mark.skipif(not have_cpu_kernel(), reason="biogen._C with bin_csr not built")
def test_cpu_threads_deterministic():
    X = sp.random(2000, 300, density=0.1, format="csr", random_state=0, dtype=np.float32)
    a = bin_values(X, backend="cpu", num_threads=1)
    b = bin_values(X, backend="cpu", num_threads=2)
    np.testing.assert_array_equal(a.data, b.data)


def test_uniforms_in_range_and_distinct():
    u = binning_uniforms(0, np.repeat(np.arange(100), 100), np.tile(np.arange(100), 100))
    assert u.min() >= 0 and u.max() < 1
    assert np.unique(u).size == u.size
    assert abs(u.mean() - 0.5) < 0.01


@pytest.mark.parametrize("bad, match", [
    (np.array([[1.0, -1.0]]), "non-negative"),
    (np.array([[1.0, np.nan]]), "NaN"),
    (np.array([1.0, 2.0]), "2-D"),
])
def test_bad_input(bad, match):
    with pytest.raises(ValueError, match=match):
        bin_values(bad)


def test_bad_args():
    x = np.ones((2, 3))
    with pytest.raises(ValueError, match="n_bins"):
        bin_values(x, 2)
    with pytest.raises(ValueError, match="seed"):
        bin_values(x, seed=-1)
    with pytest.raises(ValueError, match="backend"):
        bin_values(x, backend="gpu")
