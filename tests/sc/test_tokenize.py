import numpy as np
import pytest
import scipy.sparse as sp

from biogen.sc.binning import bin_values
from biogen.sc.tokenize import ScGPTTokenizer
from biogen.sc.vocab import GeneVocab


def test_tokens_match_matrix(small_adata):
    v = GeneVocab.from_adata(small_adata)
    tok = ScGPTTokenizer(v, max_seq_len=1000, seed=3)
    t = tok.tokenize(small_adata)
    X = small_adata.X.toarray()
    B = bin_values(X, 51, seed=3)
    # vocabulary built from this adata: column j has id j + 3
    assert [v[g] for g in small_adata.var_names] == list(range(3, 3 + small_adata.n_vars))
    assert len(t) == small_adata.n_obs
    for i in range(small_adata.n_obs):
        g, val, b = t.gene_ids[i], t.values[i], t.binned[i]
        assert g[0] == v.cls_id and val[0] == 0 and b[0] == 0
        col = g[1:] - 3
        np.testing.assert_array_equal(col, np.flatnonzero(X[i]))
        np.testing.assert_array_equal(val[1:], X[i, col])
        np.testing.assert_array_equal(b[1:], B[i, col])
        assert g.dtype == np.int64 and val.dtype == np.float32 and b.dtype == np.int64


def test_subsampling_keeps_cls_and_subset(small_adata):
    v = GeneVocab.from_adata(small_adata)
    full = ScGPTTokenizer(v, max_seq_len=10_000).tokenize(small_adata)
    short = ScGPTTokenizer(v, max_seq_len=16).tokenize(small_adata)
    again = ScGPTTokenizer(v, max_seq_len=16).tokenize(small_adata)
    for i in range(small_adata.n_obs):
        n = len(full.gene_ids[i])
        g = short.gene_ids[i]
        assert len(g) == min(n, 16) and g[0] == v.cls_id
        assert len(np.unique(g)) == len(g)
        # the kept genes carry the same values and bins as in the full tokenisation
        pos = np.searchsorted(full.gene_ids[i][1:], g[1:]) + 1
        np.testing.assert_array_equal(full.gene_ids[i][pos], g[1:])
        np.testing.assert_array_equal(full.binned[i][pos], short.binned[i][1:])
        np.testing.assert_array_equal(again.gene_ids[i], g)


def test_unknown_genes_dropped_and_zero_genes(small_adata):
    v = GeneVocab(list(small_adata.var_names[::2]))  # every other gene known
    t = ScGPTTokenizer(v, include_zero_genes=True).tokenize(small_adata)
    known_cols = np.arange(0, small_adata.n_vars, 2)
    X = small_adata.X.toarray()
    for i in (0, 5):
        assert len(t.gene_ids[i]) == 1 + known_cols.size
        np.testing.assert_array_equal(t.values[i][1:], X[i, known_cols])
        # binning over the known genes only
        np.testing.assert_array_equal(t.binned[i][1:], bin_values(X[:, known_cols], 51, seed=0)[i])


def test_matrix_input():
    v = GeneVocab(["a", "b", "c", "d"])
    m = sp.csr_matrix(np.array([[0, 2, 0, 1], [3, 0, 0, 0]], dtype=np.float32))
    t = ScGPTTokenizer(v).tokenize(m)
    np.testing.assert_array_equal(t.gene_ids[0], [1, 4, 6])
    np.testing.assert_array_equal(t.gene_ids[1], [1, 3])
    t2 = ScGPTTokenizer(v).tokenize(m.toarray()[:, ::-1], gene_names=["d", "c", "b", "a"])
    np.testing.assert_array_equal(np.sort(t2.gene_ids[0]), [1, 4, 6])
    with pytest.raises(ValueError, match="columns"):
        ScGPTTokenizer(v).tokenize(m[:, :3])


def test_bad_args():
    v = GeneVocab(["a"])
    with pytest.raises(ValueError, match="max_seq_len"):
        ScGPTTokenizer(v, max_seq_len=1)
    with pytest.raises(ValueError, match="pad_value"):
        ScGPTTokenizer(v, pad_value=-1, mask_value=-1)
    with pytest.raises(TypeError, match="GeneVocab"):
        ScGPTTokenizer(["a"])
    with pytest.raises(ValueError, match="non-negative"):
        ScGPTTokenizer(v).tokenize(np.array([[-1.0]]))
