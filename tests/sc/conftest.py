import pytest

from biogen.sc.datasets import synthetic


@pytest.fixture(scope="session")
def small_adata():
    """200 cells x 120 genes of NB counts with types, batches, donors (never modified by tests)."""
    return synthetic(n_cells=200, n_genes=120, n_types=3, n_batches=2, n_donors=4, seed=0)
