"""The user-facing ScGPT class on AnnData: fine-tuning, prediction, save/load, resume, bad inputs."""

import json
import os

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from biogen.models.scgpt import ScGPT, ScGPTConfig
from biogen.sc.datasets import synthetic

TINY = dict(config="tiny", max_seq_len=48)


@pytest.fixture(scope="module")
def data():
    # Separable types: strong disjoint marker genes. 160 cells x 60 genes keeps every run fast.
    a = synthetic(n_cells=160, n_genes=60, n_types=3, n_batches=1, n_donors=1, seed=1, n_markers=8,
                  marker_fold=30.0, mean_library=600.0)
    return a


def _small(a, n=24):
    return a[:n].copy()


def test_finetune_reaches_near_perfect_accuracy(data):
    train = data[:120].copy()
    test = data[120:].copy()
    # Category value embeddings learn the marker bins fastest from scratch (continuous works too,
    # given twice the epochs).
    m = ScGPT(train, label_key="cell_type", config="tiny", max_seq_len=64, input_style="category", device="cpu")
    hist = m.fit(epochs=6, batch_size=8, lr=1e-3, validation_fraction=0.15, progress=False)
    assert len(hist) == 6 and hist[-1]["train_loss"] < hist[0]["train_loss"]
    out = m.predict(test)
    assert out is test  # copy=False: written in place and returned
    acc = float((test.obs["scgpt_pred"].astype(str) == test.obs["cell_type"].astype(str)).mean())
    assert acc >= 0.95, acc
    proba = test.obsm["scgpt_proba"]
    assert proba.shape == (40, 3)
    np.testing.assert_allclose(proba.sum(1), 1.0, rtol=1e-5)
    assert test.uns["scgpt"]["classes"] == list(train.obs["cell_type"].cat.categories)
    emb = test.obsm["X_scgpt"]
    assert emb.shape == (40, 32)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(m.get_latent_representation(test), emb, rtol=1e-5, atol=1e-6)


def test_predict_copy_policy_and_overwrite(data):
    a = _small(data)
    m = ScGPT(a, label_key="cell_type", **TINY, device="cpu")
    before = set(a.obs.columns)
    out = m.predict(a, copy=True)
    assert out is not a and set(a.obs.columns) == before and "scgpt_pred" in out.obs
    m.predict(a)
    m.predict(a)  # re-running replaces its own results
    a.obs["mine_pred"] = "user data"
    with pytest.raises(ValueError, match="overwrite=True"):
        m.predict(a, prefix="mine")
    assert (a.obs["mine_pred"] == "user data").all()


def test_save_load_gives_identical_predictions(data, tmp_path):
    a = _small(data, 40)
    m = ScGPT(a, label_key="cell_type", **TINY, device="cpu")
    m.fit(epochs=1, batch_size=16, validation_fraction=0, progress=False)
    p1 = m.predict(a, copy=True)
    m.save(tmp_path / "model")
    assert sorted(os.listdir(tmp_path / "model")) == ["config.json", "model.safetensors", "vocab.json"]
    with pytest.raises(FileExistsError):
        m.save(tmp_path / "model")
    m2 = ScGPT.load(tmp_path / "model")
    assert m2.label_categories == m.label_categories and m2.vocab == m.vocab
    p2 = m2.predict(a, copy=True)
    np.testing.assert_array_equal(p1.obsm["scgpt_proba"], p2.obsm["scgpt_proba"])
    np.testing.assert_array_equal(p1.obsm["X_scgpt"], p2.obsm["X_scgpt"])
    assert (p1.obs["scgpt_pred"] == p2.obs["scgpt_pred"]).all()


def test_resume_continues_from_saved_step(data, tmp_path):
    a = _small(data, 48)
    kw = dict(batch_size=16, validation_fraction=0.25, progress=False, lr=1e-3)
    full = ScGPT(a, label_key="cell_type", **TINY, device="cpu")
    torch.manual_seed(0)
    h_full = full.fit(epochs=3, **kw)

    torch.manual_seed(0)
    part = ScGPT(a, label_key="cell_type", **TINY, device="cpu")
    part.fit(epochs=2, checkpoint_dir=str(tmp_path / "ck"), **kw)
    state = json.loads((tmp_path / "ck" / "trainer_state.json").read_text())
    assert state["epoch"] == 2 and state["step"] == 2 * 3  # 36 training cells / 16 -> 3 steps
    with pytest.raises(FileExistsError, match="resume=True"):
        part.fit(epochs=3, checkpoint_dir=str(tmp_path / "ck"), **kw)

    torch.manual_seed(123)  # a fresh model with other initial weights: resume must overwrite them
    again = ScGPT(a, label_key="cell_type", **TINY, device="cpu")
    h = again.fit(epochs=3, checkpoint_dir=str(tmp_path / "ck"), resume=True, **kw)
    assert [r["step"] for r in h] == [3, 6, 9]
    # Same data order, masks, dropout and optimizer state as the uninterrupted run.
    for k, v in full.module.state_dict().items():
        torch.testing.assert_close(again.module.state_dict()[k], v, rtol=1e-5, atol=1e-6)
    assert h[-1]["val_loss"] == pytest.approx(h_full[-1]["val_loss"], rel=1e-5)


def test_resume_refuses_a_checkpoint_of_another_configuration(data, tmp_path):
    a = _small(data, 24)
    ScGPT(a, label_key="cell_type", **TINY, device="cpu").fit(
        epochs=1, batch_size=8, validation_fraction=0, checkpoint_dir=str(tmp_path / "ck"), progress=False)
    other = ScGPT(a, label_key="cell_type", config="tiny", max_seq_len=48, nlayers=3, device="cpu")
    with pytest.raises(ValueError, match=r"trained with another model configuration .*nlayers: 2 vs 3"):
        other.fit(epochs=2, batch_size=8, validation_fraction=0, checkpoint_dir=str(tmp_path / "ck"), resume=True,
                  progress=False)
    with pytest.raises(ValueError, match=r"batch_size must be an integer >= 1"):
        other.fit(batch_size=0)


def test_early_stopping_restores_best_epoch(data):
    a = _small(data, 48)
    m = ScGPT(a, label_key="cell_type", **TINY, device="cpu")
    # lr so large that validation loss will get worse: early stopping must stop and restore
    hist = m.fit(epochs=8, batch_size=16, lr=0.5, validation_fraction=0.25, early_stopping_patience=1,
                 progress=False)
    vals = [r["val_loss"] for r in hist]
    best = int(np.argmin(vals))
    assert len(hist) == best + 2 < 8  # stopped one epoch after the last improvement
    assert vals[-1] > vals[best]  # so the final weights are not the best ones: restoring matters
    # The restored weights reproduce the best validation loss.
    from biogen.models.singlecell.training import validation_split
    from biogen.sc.data import collate

    ds = m._dataset(a, mask_ratio=0.0, labels=True, seed=0)
    _, va = validation_split(len(ds), ds.labels, 0.25, 0)
    with torch.no_grad():
        got = float(m.module.loss(m._to_device(collate([ds[int(i)] for i in va])), "classify")["loss"])
    assert got == pytest.approx(vals[best], rel=1e-5)


@pytest.mark.parametrize("mode", ["mlm", "generative", "both"])
def test_pretrain_modes_lower_the_loss(data, mode):
    a = _small(data, 32)
    m = ScGPT(a, **TINY, device="cpu")
    hist = m.pretrain(epochs=3, mode=mode, batch_size=16, lr=3e-3, validation_fraction=0, progress=False)
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]
    emb = m.get_latent_representation(a)
    assert emb.shape == (32, 32) and np.isfinite(emb).all()
    with pytest.raises(ValueError, match="label_key"):
        m.fit(epochs=1)


def test_generate_through_api(data):
    a = _small(data, 8)
    m = ScGPT(a, **TINY, device="cpu")
    res = m.generate(a, unknown_fraction=0.5, n_iters=2, batch_size=8)
    r = res[0]
    assert set(r.step.unique().tolist()) <= {-1, 0, 1} and (r.step >= 0).any()
    assert torch.isfinite(r.values).all()
    # the genes not hidden keep their true bins; about half the expressed genes were generated
    kept = r.step < 0
    torch.testing.assert_close(r.values[kept], r.target_values[kept], rtol=0, atol=0)
    for res_b in res:
        expressed = (res_b.target_values > 0).sum()
        assert 0.3 < float((res_b.step >= 0).sum() / expressed) < 0.7
    # the API's result is the network's generate() on the same tokenised batch
    from biogen.sc.data import collate

    batch = collate([m._dataset(a, mask_ratio=0.5, labels=False, seed=0)[i] for i in range(8)])
    again = m.module.generate(batch["gene_ids"], batch["values"], batch["padding_mask"], ~batch["mlm_mask"],
                              n_iters=2)
    assert torch.equal(again.step, r.step)
    torch.testing.assert_close(again.values, r.values, rtol=0, atol=0)


def test_batch_key_and_mixed_precision(data):
    a = synthetic(n_cells=32, n_genes=40, n_types=2, n_batches=2, n_donors=2, seed=2)
    m = ScGPT(a, label_key="cell_type", batch_key="batch", **TINY, device="cpu")
    assert m.config.n_batches == 2
    h = m.fit(epochs=1, batch_size=16, validation_fraction=0, progress=False, mixed_precision=True)
    assert np.isfinite(h[0]["train_loss"])
    q = a.copy()
    q.obs["batch"] = q.obs["batch"].cat.add_categories(["batch_9"])
    q.obs.loc[q.obs_names[0], "batch"] = "batch_9"
    with pytest.raises(ValueError, match="batch_9"):
        m.predict(q)


# ------------------------------------------------------------------------------------ bad inputs


def _ad(X, **obs):
    return ad.AnnData(X=X, obs=pd.DataFrame(obs, index=[f"c{i}" for i in range(X.shape[0])]),
                      var=pd.DataFrame(index=[f"g{i}" for i in range(X.shape[1])]))


@pytest.mark.parametrize("X,msg", [
    (np.array([[1.0, np.nan], [2.0, 3.0]], dtype=np.float32), "NaN"),
    (np.array([[1.0, -1.0], [2.0, 3.0]], dtype=np.float32), "negative"),
    (np.array([[1.5, 1.0], [2.0, 3.0]], dtype=np.float32), "not integers"),
    (np.zeros((0, 2), dtype=np.float32), "empty"),
])
def test_bad_counts_rejected(X, msg):
    with pytest.raises(ValueError, match=msg):
        ScGPT(_ad(X), **TINY)


def test_missing_label_column_lists_columns(data):
    with pytest.raises(KeyError, match="available columns.*cell_type"):
        ScGPT(_small(data), label_key="celltype", **TINY)


def test_single_class_rejected(data):
    a = _small(data)
    a.obs["one"] = "x"
    with pytest.raises(ValueError, match="at least 2"):
        ScGPT(a, label_key="one", **TINY)


def test_query_without_gene_overlap(data):
    a = _small(data)
    m = ScGPT(a, label_key="cell_type", **TINY, device="cpu")
    q = a.copy()
    q.var_names = [f"OTHER{i}" for i in range(q.n_vars)]
    with pytest.raises(ValueError, match="only 0 of 60 query genes"):
        m.predict(q)


def test_max_seq_len_too_small(data):
    with pytest.raises(ValueError, match="max_seq_len"):
        ScGPT(_small(data), config="tiny", max_seq_len=1)
    with pytest.raises(ValueError, match="max_seq_len"):
        ScGPT(_small(data), config=ScGPTConfig(max_seq_len=1))


def test_bad_training_arguments(data):
    m = ScGPT(_small(data), label_key="cell_type", **TINY, device="cpu")
    with pytest.raises(ValueError, match="validation_fraction"):
        m.fit(epochs=1, validation_fraction=1.0)
    with pytest.raises(ValueError, match="checkpoint_dir"):
        m.fit(epochs=1, resume=True)
    with pytest.raises(ValueError, match="mode"):
        m.pretrain(mode="causal")


def test_cells_without_expressed_genes_still_predict(data):
    a = _small(data, 6)
    a.X = sp.csr_matrix(a.X)
    m = ScGPT(a, label_key="cell_type", **TINY, device="cpu")
    q = a.copy()
    q.X = sp.csr_matrix(q.X.shape, dtype=np.float32)  # every cell all-zero
    out = m.predict(q, copy=True)
    assert out.obsm["scgpt_proba"].shape == (6, 3)


def _write_shards(a, folder):
    import scipy.sparse as sp

    folder.mkdir()
    first, second = a[:18].copy(), a[18:].copy()
    for name, part in (("part0.h5ad", first), ("part1.h5ad", second)):
        part.X = sp.csr_matrix(part.X)
        part.write_h5ad(folder / name)


def test_from_h5ad_streams_shards_like_in_memory_training(data, tmp_path):
    a = _small(data, 30)
    _write_shards(a, tmp_path / "shards")
    # One global batch of every cell per epoch: the order cannot matter, and masks depend only on
    # (seed, epoch, cell), so streaming and in-memory training must take the same steps.
    kw = dict(epochs=2, batch_size=30, lr=1e-3, validation_fraction=0, progress=False)
    torch.manual_seed(0)
    stream = ScGPT.from_h5ad(tmp_path / "shards", label_key="cell_type", chunk_size=4, buffer_size=8, **TINY,
                             device="cpu")
    torch.manual_seed(0)
    mem = ScGPT(a, label_key="cell_type", vocab=stream.vocab, **TINY, device="cpu")
    assert stream.label_categories == mem.label_categories
    h_s = stream.pretrain(mode="both", **kw)
    h_m = mem.pretrain(mode="both", **kw)
    assert [h["step"] for h in h_s] == [1, 2]
    assert h_s[-1]["train_loss"] == pytest.approx(h_m[-1]["train_loss"], rel=1e-4)
    h_s = stream.fit(checkpoint_dir=str(tmp_path / "ck"), **kw)
    h_m = mem.fit(**kw)
    assert h_s[-1]["train_loss"] == pytest.approx(h_m[-1]["train_loss"], rel=1e-4)
    for k, v in mem.module.state_dict().items():
        torch.testing.assert_close(stream.module.state_dict()[k], v, rtol=0, atol=1e-4, msg=lambda m: f"{k}: {m}")
    # the streaming checkpoint resumes
    again = ScGPT.from_h5ad(tmp_path / "shards", label_key="cell_type", **TINY, device="cpu")
    assert [h["epoch"] for h in again.fit(checkpoint_dir=str(tmp_path / "ck"), resume=True,
                                          **{**kw, "epochs": 3})] == [1, 2, 3]


def test_from_h5ad_bad_input(data, tmp_path):
    a = _small(data, 30)
    _write_shards(a, tmp_path / "shards")
    m = ScGPT.from_h5ad(tmp_path / "shards", label_key="cell_type", **TINY, device="cpu")
    with pytest.raises(ValueError, match="no validation split"):
        m.fit(epochs=1, progress=False)
    with pytest.raises(KeyError, match="nope"):
        ScGPT.from_h5ad(tmp_path / "shards", label_key="nope", **TINY, device="cpu")
    bad = a[:10].copy()
    import scipy.sparse as sp

    bad.X = sp.csr_matrix(bad.X)
    bad.X.data[3] = np.nan
    bad.write_h5ad(tmp_path / "bad.h5ad")
    m = ScGPT.from_h5ad(tmp_path / "bad.h5ad", **TINY, device="cpu")
    with pytest.raises(ValueError, match=r"bad\.h5ad \(X rows 0:10\) contains 1 NaN"):
        m.pretrain(epochs=1, validation_fraction=0, progress=False)
