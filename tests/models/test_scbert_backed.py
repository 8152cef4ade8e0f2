"""ScBERT on a backed .h5ad: tokens read from the file per batch, never the whole matrix in memory."""

import numpy as np
import pytest
import torch

from biogen.models.scbert import ScBERT, scbert_tokens
from biogen.sc import GeneVocab
from biogen.sc.datasets import synthetic


def test_backed_h5ad_trains_and_predicts_like_in_memory(backed):
    a = synthetic(n_cells=40, n_genes=30, n_types=2, n_batches=1, n_donors=1, seed=4, n_markers=5,
                  marker_fold=20.0, mean_library=500.0)
    on_file = backed(a)
    # the same tokens, rows in any order, whether read lazily from the file or held in memory
    vocab = GeneVocab(list(a.var_names[::-1]))
    rows = np.array([7, 0, 39, 12])
    lazy, mem = scbert_tokens(on_file, vocab), scbert_tokens(a, vocab)
    assert lazy.tokens is None and mem.tokens is not None
    torch.testing.assert_close(lazy.dense(rows), mem.dense(rows), rtol=0, atol=0)

    kw = dict(epochs=1, batch_size=8, validation_fraction=0.25, progress=False)
    torch.manual_seed(0)
    on_disk = ScBERT(on_file, label_key="cell_type", config="tiny", device="cpu")
    torch.manual_seed(0)
    in_mem = ScBERT(a, label_key="cell_type", config="tiny", device="cpu")
    h_disk, h_mem = on_disk.fit(**kw), in_mem.fit(**kw)
    assert h_disk[0] == pytest.approx(h_mem[0])
    for k, v in in_mem.module.state_dict().items():
        torch.testing.assert_close(on_disk.module.state_dict()[k], v, rtol=0, atol=0)
    on_disk.predict(on_file)
    in_mem.predict(a)
    np.testing.assert_allclose(on_file.obsm["scbert_proba"], a.obsm["scbert_proba"], rtol=1e-5, atol=1e-6)
