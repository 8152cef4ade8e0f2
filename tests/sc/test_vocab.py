import json
import os

import numpy as np
import pytest

from biogen.sc.vocab import SPECIAL_TOKENS, GeneVocab


def test_special_ids_and_lookup():
    v = GeneVocab(["A", "B", "C"])
    assert (v.pad_id, v.cls_id, v.mask_id) == (0, 1, 2)
    assert [v[t] for t in SPECIAL_TOKENS] == [0, 1, 2]
    assert [v[g] for g in "ABC"] == [3, 4, 5]
    assert v.token(4) == "B" and len(v) == 6 and v.genes == ["A", "B", "C"]
    with pytest.raises(KeyError, match="'Z'"):
        v["Z"]


def test_rejects_duplicates_and_special_names():
    with pytest.raises(ValueError, match="unique"):
        GeneVocab(["A", "B", "A"])
    with pytest.raises(ValueError, match="special token"):
        GeneVocab(["A", "<cls>"])


def test_save_load_round_trip(tmp_path):
    v = GeneVocab([f"G{i}" for i in range(50)])
    p = tmp_path / "vocab.json"
    v.save(p)
    assert GeneVocab.load(p) == v
    assert json.loads(p.read_text())["genes"][:2] == ["G0", "G1"]
    assert os.listdir(tmp_path) == ["vocab.json"]  # no temporary file left behind
    v2 = GeneVocab(["X"])
    v2.save(p)  # replaces atomically
    assert GeneVocab.load(p) == v2


def test_load_rejects_other_json(tmp_path):
    p = tmp_path / "x.json"
    p.write_text(json.dumps({"genes": ["A"]}))
    with pytest.raises(ValueError, match="not a biogen gene vocabulary"):
        GeneVocab.load(p)


def test_from_adata_union(small_adata):
    a = small_adata[:, :80]
    b = small_adata[:, 40:]
    v = GeneVocab.from_adata(a, b)
    assert v.genes == list(small_adata.var_names)
    assert GeneVocab.from_adata(b, a, sort=True).genes == sorted(small_adata.var_names)


def test_map_is_order_independent(small_adata):
    v = GeneVocab.from_adata(small_adata)
    names = list(small_adata.var_names[:60]) + ["NOT_A_GENE"]
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(names))
    m1 = v.map_genes(names)
    m2 = v.map_genes([names[i] for i in perm])
    np.testing.assert_array_equal(m1.ids[perm], m2.ids)
    assert m1.n_known == 60 and m1.missing == ("NOT_A_GENE",)
    for g, i in zip(names[:60], m1.ids[:60]):
        assert v.token(int(i)) == g


def test_low_overlap_error_lists_missing(small_adata):
    v = GeneVocab.from_adata(small_adata[:, :10])
    query = list(small_adata.var_names[:5]) + [f"NEW{i}" for i in range(20)]
    with pytest.raises(ValueError, match=r"only 5 of 25 .*NEW0, NEW1"):
        v.map_genes(query, min_overlap=0.5)
    assert v.map_genes(query, min_overlap=5).n_known == 5
    with pytest.raises(ValueError, match="need at least 6"):
        v.map_genes(query, min_overlap=6)
    with pytest.raises(ValueError, match="unique"):
        v.map_genes(["A", "A"], min_overlap=0)
