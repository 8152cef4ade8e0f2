"""Out-of-core streaming from backed .h5ad files, and the chunked synthetic writer."""

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
from torch.utils.data import DataLoader

from biogen.sc.data import ScGPTDataset, collate
from biogen.sc.datasets import synthetic_h5ad
from biogen.sc.streaming import StreamingScGPTDataset
from biogen.sc.vocab import GeneVocab

N_CELLS, N_GENES = 600, 80


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """One 600-cell file written in 7 chunks of 90 cells, and the same cells as 2 shards."""
    root = tmp_path_factory.mktemp("stream")
    path = synthetic_h5ad(root / "cells.h5ad", N_CELLS, N_GENES, chunk_size=90, mean_counts=200, seed=3)
    a = ad.read_h5ad(path)
    shards = root / "shards"
    shards.mkdir()
    a[:250].copy().write_h5ad(shards / "part0.h5ad")
    a[250:].copy().write_h5ad(shards / "part1.h5ad")
    return path, shards, a, GeneVocab.from_adata(a)


def test_synthetic_h5ad_is_a_valid_chunked_anndata(big, tmp_path):
    path, _, a, _ = big
    assert a.shape == (N_CELLS, N_GENES)
    assert isinstance(a.X, sp.csr_matrix) and a.X.dtype == np.float32 and a.X.nnz > 0
    assert np.all(a.X.data >= 1) and np.all(a.X.data == np.round(a.X.data))  # counts
    assert a.obs_names[0] == "cell_0" and a.obs_names[-1] == f"cell_{N_CELLS - 1}" and a.obs_names.is_unique
    assert list(a.obs.columns) == ["cell_type", "batch", "donor"]
    # donors are nested in batches, as in synthetic()
    d = a.obs["donor"].str.replace("donor_", "").astype(int)
    b = a.obs["batch"].str.replace("batch_", "").astype(int)
    assert (d % 2 == b).all()
    # library sizes around mean_counts; marker genes are up in their own cell type
    lib = np.asarray(a.X.sum(1)).ravel()
    assert 150 < lib.mean() < 260
    t0 = (a.obs["cell_type"] == "type_0").to_numpy()
    markers = (a.var["marker_of"] == "type_0").to_numpy()
    frac = np.asarray(a.X[:, markers].sum(1)).ravel() / lib
    assert frac[t0].mean() > 3 * frac[~t0].mean()
    # written in chunks yet identical to writing it again; refuses to overwrite
    again = synthetic_h5ad(tmp_path / "again.h5ad", N_CELLS, N_GENES, chunk_size=90, mean_counts=200, seed=3)
    assert (ad.read_h5ad(again).X != a.X).nnz == 0
    with pytest.raises(FileExistsError, match="exists"):
        synthetic_h5ad(again, 10, N_GENES)
    assert not list(tmp_path.glob(".*.tmp"))


def _cells(ds, num_workers=0, batch_size=32):
    dl = DataLoader(ds, batch_size=batch_size, collate_fn=collate, num_workers=num_workers)
    return np.concatenate([b["cell_index"].numpy() for b in dl])


@pytest.mark.parametrize("use_shards", [False, True])
def test_every_cell_exactly_once_across_ranks_and_workers(big, use_shards):
    path, shards, _, vocab = big
    src = shards if use_shards else path
    seen = {}
    for epoch in (0, 1):
        per_rank = []
        for rank in range(2):
            ds = StreamingScGPTDataset(src, vocab, chunk_size=64, buffer_size=128, rank=rank, world_size=2,
                                       max_seq_len=32, seed=5)
            ds.set_epoch(epoch)
            cells = _cells(ds, num_workers=2)
            assert len(cells) == len(ds)
            per_rank.append(cells)
        allc = np.concatenate(per_rank)
        np.testing.assert_array_equal(np.sort(allc), np.arange(N_CELLS))
        assert not np.array_equal(allc, np.sort(allc))  # shuffled
        seen[epoch] = allc
    assert not np.array_equal(seen[0], seen[1])  # a new order each epoch


def test_even_gives_equal_rank_lengths_without_duplicates(big):
    path, _, _, vocab = big
    lens, cells = [], []
    for rank in range(3):
        ds = StreamingScGPTDataset(path, vocab, chunk_size=64, rank=rank, world_size=3, even=True, max_seq_len=16)
        c = _cells(ds)
        lens.append(len(c))
        cells.append(c)
    assert len(set(lens)) == 1
    allc = np.concatenate(cells)
    assert len(np.unique(allc)) == len(allc) > N_CELLS - 3 * 64


def test_items_equal_the_in_memory_dataset(big):
    """Streaming reuses ScGPTDataset's tokeniser and masks: cell i gives the same item either way."""
    path, shards, a, vocab = big
    kw = dict(label_key="cell_type", batch_key="batch", mask_ratio=0.4, max_seq_len=24, seed=7)
    ref = ScGPTDataset(a, vocab, **kw)
    ref.set_epoch(2)
    for src in (path, shards):
        ds = StreamingScGPTDataset(src, vocab, chunk_size=50, buffer_size=100, rank=0, world_size=1, **kw)
        ds.set_epoch(2)
        assert ds.label_categories == ref.label_categories
        n = 0
        for item in ds:
            want = ref[item["cell_index"]]
            for key in ("gene_ids", "values", "target_values", "mlm_mask", "known"):
                np.testing.assert_array_equal(item[key], want[key], err_msg=key)
            assert (item["label"], item["batch_id"]) == (want["label"], want["batch_id"])
            n += 1
        assert n == N_CELLS


def test_buffer_is_bounded_independently_of_the_number_of_cells(big, tmp_path):
    _, _, a, vocab = big
    small = tmp_path / "small.h5ad"
    a[:200].copy().write_h5ad(small)
    peaks = []
    for src, n in ((small, 200), (big[0], N_CELLS)):
        ds = StreamingScGPTDataset(src, vocab, chunk_size=30, buffer_size=70, rank=0, world_size=1, max_seq_len=8)
        assert sum(1 for _ in ds) == n
        assert ds.peak_buffered <= 70 + 30 - 1
        peaks.append(ds.peak_buffered)
    assert peaks[0] == peaks[1]


def test_file_order_without_shuffle(big):
    path, _, _, vocab = big
    ds = StreamingScGPTDataset(path, vocab, shuffle=False, chunk_size=100, rank=0, world_size=1, max_seq_len=8)
    np.testing.assert_array_equal(_cells(ds), np.arange(N_CELLS))


def test_bad_input(big, tmp_path):
    path, _, a, vocab = big
    csc = tmp_path / "csc.h5ad"
    b = a[:50].copy()
    b.X = sp.csc_matrix(b.X)
    b.write_h5ad(csc)
    with pytest.raises(ValueError, match="stored as sparse CSC; streaming .* needs sparse CSR"):
        StreamingScGPTDataset(csc, vocab)
    dense = tmp_path / "dense.h5ad"
    b.X = b.X.toarray()
    b.write_h5ad(dense)
    with pytest.raises(ValueError, match="dense array"):
        StreamingScGPTDataset(dense, vocab)
    with pytest.raises(ValueError, match=r"world size 8 is larger than the number of chunks \(6"):
        StreamingScGPTDataset(path, vocab, chunk_size=100, rank=0, world_size=8)
    with pytest.raises(KeyError, match="'tissue' is not a column of obs"):
        StreamingScGPTDataset(path, vocab, label_key="tissue")
    with pytest.raises(KeyError, match="no layers\\['counts'\\]"):
        StreamingScGPTDataset(path, vocab, layer="counts")
    with pytest.raises(ValueError, match="mask_ratio"):
        StreamingScGPTDataset(path, vocab, mask_ratio=2.0)
    with pytest.raises(FileNotFoundError, match="no .h5ad files"):
        StreamingScGPTDataset(tmp_path / "empty", vocab) if (tmp_path / "empty").mkdir() is None else None
