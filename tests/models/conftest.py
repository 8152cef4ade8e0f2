import pytest


@pytest.fixture
def backed(tmp_path, monkeypatch):
    """``backed(adata)``: write ``adata`` (X made CSR in place) to an .h5ad and open it backed, with the
    matrix's ``to_memory`` patched to fail: a test using it proves X is never loaded whole."""
    import anndata as ad
    import scipy.sparse as sp

    def open_backed(adata, name="cells.h5ad"):
        adata.X = sp.csr_matrix(adata.X)
        adata.write_h5ad(tmp_path / name)
        out = ad.read_h5ad(tmp_path / name, backed="r")

        def no_full_load(self, *args, **kwargs):
            raise AssertionError("the whole backed matrix was loaded into memory")

        monkeypatch.setattr(type(out.X), "to_memory", no_full_load)
        return out

    return open_backed
