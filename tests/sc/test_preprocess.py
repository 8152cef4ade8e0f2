import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

from biogen.sc.preprocess import check_counts, preprocess


def _snapshot(a):
    return {"X": a.X.toarray().copy() if sp.issparse(a.X) else np.array(a.X), "obs": a.obs.copy(),
            "var": a.var.copy(), "layers": sorted(a.layers.keys()), "uns": sorted(a.uns.keys()),
            "shape": a.shape}


def _assert_same(a, snap):
    assert a.shape == snap["shape"]
    X = a.X.toarray() if sp.issparse(a.X) else np.asarray(a.X)
    np.testing.assert_array_equal(X, snap["X"])
    assert a.obs.equals(snap["obs"]) and a.var.equals(snap["var"])
    assert sorted(a.layers.keys()) == snap["layers"] and sorted(a.uns.keys()) == snap["uns"]


def test_normalise_log1p_matches_manual_and_leaves_input(small_adata):
    a = small_adata.copy()
    snap = _snapshot(a)
    out = preprocess(a)
    _assert_same(a, snap)
    counts = snap["X"].astype(np.float64)
    expected = np.log1p(counts / counts.sum(1, keepdims=True) * 1e4)
    np.testing.assert_allclose(out.X.toarray(), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out.layers["counts"].toarray(), snap["X"])
    assert out.uns["biogen_preprocess"]["target_sum"] == 1e4


def test_layer_input_hvg_and_filters(small_adata):
    a = small_adata.copy()
    a.layers["raw"] = a.X.copy()
    a.X = a.X * 0.5  # X is not counts; the layer is
    snap = _snapshot(a)
    out = preprocess(a, layer="raw", n_top_genes=30, min_cells=5, hvg_flavor="cell_ranger")
    _assert_same(a, snap)
    assert out.n_vars == 30 and out.uns["biogen_preprocess"]["hvg_flavor"] == "cell_ranger"
    kept = small_adata[:, out.var_names].X.toarray()
    np.testing.assert_array_equal(out.layers["counts"].toarray(), kept)
    detected = (small_adata.X.toarray() > 0).sum(0)
    assert (detected[small_adata.var_names.get_indexer(out.var_names)] >= 5).all()


def test_inplace(small_adata):
    a = small_adata.copy()
    assert preprocess(a, inplace=True) is None
    assert "counts" in a.layers and "biogen_preprocess" in a.uns
    np.testing.assert_array_equal(a.layers["counts"].toarray(), small_adata.X.toarray())


def test_min_genes_filter(small_adata):
    n_genes = (small_adata.X.toarray() > 0).sum(1)
    cut = int(np.median(n_genes))
    out = preprocess(small_adata, min_genes=cut)
    assert out.n_obs == int((n_genes >= cut).sum()) and 0 < out.n_obs < small_adata.n_obs


@pytest.mark.parametrize("transform, match", [
    (lambda X: np.log1p(X), "not integers"),
    (lambda X: X - X.mean(0), "negative"),
    (lambda X: np.where(X > 5, np.nan, X), "NaN"),
    (lambda X: X / 3.0, "not integers"),
])
def test_refuses_non_counts(small_adata, transform, match):
    a = ad.AnnData(transform(small_adata.X.toarray().astype(np.float64)))
    snap = _snapshot(a)
    with pytest.raises(ValueError, match=match):
        preprocess(a)
    _assert_same(a, snap)


def test_refuses_empty_and_missing_layer(small_adata):
    with pytest.raises(ValueError, match="empty"):
        preprocess(small_adata[:0].copy())
    with pytest.raises(KeyError, match="counts"):
        preprocess(small_adata, layer="counts")
    with pytest.raises(ValueError, match="empty"):
        check_counts(np.zeros((0, 3)))
    check_counts(small_adata)  # counts pass


def test_backed_input_not_modified(small_adata, tmp_path):
    path = tmp_path / "c.h5ad"
    small_adata.write_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")
    try:
        out = preprocess(backed)
        np.testing.assert_allclose(out.layers["counts"].toarray(), small_adata.X.toarray())
        with pytest.raises(ValueError, match="backed"):
            preprocess(backed, inplace=True)
    finally:
        backed.file.close()
    np.testing.assert_array_equal(ad.read_h5ad(path).X.toarray(), small_adata.X.toarray())


def test_seurat_v3_on_counts(small_adata):
    import importlib.util

    if importlib.util.find_spec("skmisc") is None:
        with pytest.raises(ImportError, match="scikit-misc"):
            preprocess(small_adata, n_top_genes=20, hvg_flavor="seurat_v3")
        assert preprocess(small_adata, n_top_genes=20).uns["biogen_preprocess"]["hvg_flavor"] == "cell_ranger"
    else:
        out = preprocess(small_adata, n_top_genes=20, hvg_flavor="seurat_v3")
        assert out.n_vars == 20 and out.uns["biogen_preprocess"]["hvg_flavor"] == "seurat_v3"
