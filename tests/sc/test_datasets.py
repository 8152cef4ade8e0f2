import numpy as np
import pytest

from biogen.sc.datasets import pbmc68k, synthetic


@pytest.fixture(scope="module")
def pbmc():
    return pbmc68k()


def test_pbmc68k_counts(pbmc):
    import scanpy as sc

    src = sc.datasets.pbmc68k_reduced()
    assert pbmc.shape == (700, src.raw.n_vars)
    assert list(pbmc.var_names) == list(src.raw.var_names)
    C = pbmc.layers["counts"].toarray()
    assert (C == np.round(C)).all() and C.min() == 0
    np.testing.assert_array_equal(C, pbmc.X.toarray())
    # the recovered counts renormalised with the stored size factors reproduce .raw.X
    raw = src.raw.X.toarray()
    renorm = np.log1p(C * 1e4 / src.obs["n_counts"].to_numpy()[:, None])
    np.testing.assert_allclose(renorm, raw, atol=5e-3)
    assert ((C > 0) == (raw > 0)).all()
    assert pbmc.obs["bulk_labels"].nunique() == 10
    assert pbmc.uns["counts_recovery_max_residual"] < 0.25


def test_synthetic_structure():
    a = synthetic(n_cells=600, n_genes=200, n_types=4, n_batches=2, n_donors=4, seed=3)
    b = synthetic(n_cells=600, n_genes=200, n_types=4, n_batches=2, n_donors=4, seed=3)
    assert a.shape == (600, 200)
    assert (a.X != b.X).nnz == 0  # seeded
    X = a.X.toarray()
    assert (X == np.round(X)).all() and X.min() >= 0
    assert set(a.obs.columns) >= {"cell_type", "batch", "donor"}
    assert a.obs["cell_type"].nunique() == 4 and a.obs["batch"].nunique() == 2 and a.obs["donor"].nunique() == 4
    # donors nested in batches
    assert (a.obs.groupby("donor", observed=True)["batch"].nunique() == 1).all()
    # markers: higher normalised expression in their own type than elsewhere
    norm = X / X.sum(1, keepdims=True)
    for t in a.obs["cell_type"].cat.categories:
        genes = (a.var["marker_of"] == t).to_numpy()
        own = (a.obs["cell_type"] == t).to_numpy()
        assert genes.sum() > 0
        assert norm[own][:, genes].mean() > 3 * norm[~own][:, genes].mean()


def test_synthetic_bad_args():
    with pytest.raises(ValueError, match="n_donors"):
        synthetic(n_batches=3, n_donors=2)
    with pytest.raises(ValueError, match="n_cells"):
        synthetic(n_cells=0)
