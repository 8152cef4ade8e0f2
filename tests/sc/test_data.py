import math

import anndata as ad
import numpy as np
import pytest
import torch

from biogen.sc.data import GENERATIVE_MASK_RATIOS, ScGPTDataset, collate
from biogen.sc.tokenize import ScGPTTokenizer
from biogen.sc.vocab import GeneVocab


def _round_half_up(x):
    return int(math.floor(x + 0.5))


@pytest.mark.parametrize("ratio", [0.0, 0.15, 0.4, 1.0])
def test_exact_mask_counts(small_adata, ratio):
    v = GeneVocab.from_adata(small_adata)
    ds = ScGPTDataset(small_adata, v, mask_ratio=ratio, max_seq_len=40, seed=1)
    for i in range(0, len(ds), 7):
        it = ds[i]
        n = len(it["gene_ids"]) - 1
        assert it["mlm_mask"].sum() == _round_half_up(ratio * n)
        assert not it["mlm_mask"][0] and it["known"].all()
        np.testing.assert_array_equal(it["values"][it["mlm_mask"]], -1.0)
        np.testing.assert_array_equal(it["values"][~it["mlm_mask"]], it["target_values"][~it["mlm_mask"]])


def test_generative_split(small_adata):
    v = GeneVocab.from_adata(small_adata)
    ds = ScGPTDataset(small_adata, v, mask_ratio="generative", max_seq_len=60, seed=2)
    seen = set()
    for i in range(len(ds)):
        it = ds[i]
        n = len(it["gene_ids"]) - 1
        n_unknown = int((~it["known"]).sum())
        ratios = [r for r in GENERATIVE_MASK_RATIOS if _round_half_up(r * n) == n_unknown]
        assert ratios, (n, n_unknown)
        seen.update(ratios)
        assert it["known"][0] and not it["mlm_mask"][0]
        np.testing.assert_array_equal(it["mlm_mask"], ~it["known"])
    assert seen == set(GENERATIVE_MASK_RATIOS)


def test_collate_contract(small_adata):
    v = GeneVocab.from_adata(small_adata)
    ds = ScGPTDataset(small_adata, v, label_key="cell_type", batch_key="batch", mask_ratio=0.3, max_seq_len=50)
    items = [ds[i] for i in range(6)]
    b = collate(items)
    B, L = 6, max(len(it["gene_ids"]) for it in items)
    for k in ("gene_ids", "values", "target_values", "padding_mask", "mlm_mask", "known"):
        assert b[k].shape == (B, L), k
    assert b["gene_ids"].dtype == torch.long and b["values"].dtype == torch.float32
    assert b["target_values"].dtype == torch.float32
    assert b["padding_mask"].dtype == torch.bool and b["mlm_mask"].dtype == torch.bool and b["known"].dtype == torch.bool
    assert b["labels"].dtype == torch.long and b["labels"].shape == (B,)
    assert b["batch_ids"].dtype == torch.long and b["batch_ids"].shape == (B,)
    assert (b["gene_ids"][:, 0] == v.cls_id).all() and (b["values"][:, 0] == 0).all()
    for r, it in enumerate(items):
        n = len(it["gene_ids"])
        assert not b["padding_mask"][r, :n].any() and b["padding_mask"][r, n:].all()
        assert (b["gene_ids"][r, n:] == v.pad_id).all()
        assert (b["values"][r, n:] == -2).all() and (b["target_values"][r, n:] == -2).all()
        assert not b["mlm_mask"][r, n:].any()
    codes = small_adata.obs["cell_type"].cat.codes.to_numpy()[:6]
    np.testing.assert_array_equal(b["labels"].numpy(), codes)
    np.testing.assert_array_equal(b["batch_ids"].numpy(), small_adata.obs["batch"].cat.codes.to_numpy()[:6])
    b2 = collate([ScGPTDataset(small_adata, v)[0]])
    assert "labels" not in b2 and "batch_ids" not in b2


def test_values_styles_match_tokenizer(small_adata):
    v = GeneVocab.from_adata(small_adata)
    t = ScGPTTokenizer(v, max_seq_len=30, seed=4).tokenize(small_adata)
    binned = ScGPTDataset(small_adata, v, max_seq_len=30, seed=4)
    cont = ScGPTDataset(small_adata, v, max_seq_len=30, seed=4, input_style="continuous")
    for i in (0, 11, 199):
        np.testing.assert_array_equal(binned[i]["gene_ids"], t.gene_ids[i])
        np.testing.assert_array_equal(binned[i]["target_values"], t.binned[i].astype(np.float32))
        np.testing.assert_array_equal(cont[i]["target_values"], t.values[i])


def test_backed_equals_in_memory(small_adata, tmp_path):
    v = GeneVocab.from_adata(small_adata)
    path = tmp_path / "cells.h5ad"
    small_adata.write_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")
    try:
        kw = dict(label_key="cell_type", mask_ratio="generative", max_seq_len=32, seed=5)
        mem_ds, backed_ds = ScGPTDataset(small_adata, v, **kw), ScGPTDataset(backed, v, **kw)
        idx = [0, 3, 100, 199, 42]
        bm, bb = collate([mem_ds[i] for i in idx]), collate([backed_ds[i] for i in idx])
        assert bm.keys() == bb.keys()
        for k in bm:
            assert torch.equal(bm[k], bb[k]), k
    finally:
        backed.file.close()


def test_epoch_changes_masks_not_tokens(small_adata):
    v = GeneVocab.from_adata(small_adata)
    ds = ScGPTDataset(small_adata, v, mask_ratio=0.5, seed=0)
    a = ds[10]
    ds.set_epoch(1)
    b = ds[10]
    np.testing.assert_array_equal(a["gene_ids"], b["gene_ids"])  # fits max_seq_len: no subsampling
    assert (a["mlm_mask"] != b["mlm_mask"]).any()
    ds.set_epoch(0)
    np.testing.assert_array_equal(ds[10]["mlm_mask"], a["mlm_mask"])


def test_dataloader(small_adata):
    v = GeneVocab.from_adata(small_adata)
    ds = ScGPTDataset(small_adata, v, mask_ratio=0.25, max_seq_len=20)
    batches = list(torch.utils.data.DataLoader(ds, batch_size=64, collate_fn=collate))
    assert sum(b["gene_ids"].shape[0] for b in batches) == 200
    assert torch.equal(torch.cat([b["cell_index"] for b in batches]), torch.arange(200))


def test_bad_args(small_adata):
    v = GeneVocab.from_adata(small_adata)
    with pytest.raises(ValueError, match="mask_ratio"):
        ScGPTDataset(small_adata, v, mask_ratio="random")
    with pytest.raises(ValueError, match="mask_ratio"):
        ScGPTDataset(small_adata, v, mask_ratio=1.5)
    with pytest.raises(KeyError, match="nope"):
        ScGPTDataset(small_adata, v, label_key="nope")
    with pytest.raises(KeyError, match="layer"):
        ScGPTDataset(small_adata, v, layer="counts")
    with pytest.raises(ValueError, match="input_style"):
        ScGPTDataset(small_adata, v, input_style="log")
    with pytest.raises(IndexError):
        ScGPTDataset(small_adata, v)[200]


def test_gene_mapping_and_low_overlap(small_adata):
    v = GeneVocab(list(small_adata.var_names[:90]))
    ds = ScGPTDataset(small_adata, v)
    assert ds.gene_mapping.n_known == 90 and len(ds.gene_mapping.missing) == 30
    assert set(ds[0]["gene_ids"][1:]) <= set(range(3, 93))
    with pytest.raises(ValueError, match="only 10 of 120"):
        ScGPTDataset(small_adata, GeneVocab(list(small_adata.var_names[:10])))
