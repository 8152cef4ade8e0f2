"""ScGPT and ScBERT on a backed .h5ad: the cells of each batch are read from the file when needed,
never the whole matrix, and training / prediction equal the in-memory ones."""

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch

from biogen.models.scbert import ScBERT, scbert_tokens
from biogen.models.scgpt import ScGPT
from biogen.sc import GeneVocab
from biogen.sc.datasets import synthetic


def _cells(n=40):
    return synthetic(n_cells=n, n_genes=30, n_types=2, n_batches=1, n_donors=1, seed=4, n_markers=5,
                     marker_fold=20.0, mean_library=500.0)


@pytest.fixture
def backed(tmp_path, monkeypatch):
    """``backed(adata)``: write ``adata`` (X made CSR in place) and open it backed, with the matrix's
    ``to_memory`` patched to fail: a test using it proves X is never loaded whole."""

    def open_backed(adata, name="cells.h5ad"):
        adata.X = sp.csr_matrix(adata.X)
        adata.write_h5ad(tmp_path / name)
        out = ad.read_h5ad(tmp_path / name, backed="r")

        def no_full_load(self, *args, **kwargs):
            raise AssertionError("the whole backed matrix was loaded into memory")

        monkeypatch.setattr(type(out.X), "to_memory", no_full_load)
        return out

    return open_backed


@pytest.mark.parametrize("cls,kw,prefix", [(ScGPT, {"max_seq_len": 48}, "scgpt"), (ScBERT, {}, "scbert")],
                         ids=["scgpt", "scbert"])
def test_backed_h5ad_trains_and_predicts_like_in_memory(backed, cls, kw, prefix):
    a = _cells()
    on_file = backed(a)
    fit = dict(epochs=1, batch_size=8, validation_fraction=0.25, progress=False)
    torch.manual_seed(0)
    on_disk = cls(on_file, label_key="cell_type", config="tiny", device="cpu", **kw)
    torch.manual_seed(0)
    in_mem = cls(a, label_key="cell_type", config="tiny", device="cpu", **kw)
    assert on_disk.fit(**fit)[0] == pytest.approx(in_mem.fit(**fit)[0])
    for k, v in in_mem.module.state_dict().items():
        torch.testing.assert_close(on_disk.module.state_dict()[k], v, rtol=0, atol=0)
    on_disk.predict(on_file)
    in_mem.predict(a)
    np.testing.assert_allclose(on_file.obsm[f"{prefix}_proba"], a.obsm[f"{prefix}_proba"], rtol=1e-5, atol=1e-6)


def test_scbert_tokens_read_lazily_equal_in_memory(backed):
    a = _cells()
    on_file = backed(a)
    vocab = GeneVocab(list(a.var_names[::-1]))
    rows = np.array([7, 0, 39, 12])  # any order
    lazy, mem = scbert_tokens(on_file, vocab), scbert_tokens(a, vocab)
    assert lazy.tokens is None and mem.tokens is not None
    torch.testing.assert_close(lazy.dense(rows), mem.dense(rows), rtol=0, atol=0)


def test_negative_count_in_a_backed_file_is_found_before_any_work(backed):
    a = _cells(20)
    a.X = sp.csr_matrix(a.X)
    a.X.data[7] = -1
    for cls in (ScGPT, ScBERT):
        with pytest.raises(ValueError, match="negative values"):
            cls(backed(a.copy(), f"bad_{cls.__name__}.h5ad"), label_key="cell_type", config="tiny", device="cpu")
