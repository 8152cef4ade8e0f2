"""scBERT-style model: tokens, network, redraws, training, persistence, gene panel, checkpoints, bad input."""

import json
import os
from dataclasses import replace

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from biogen.models.scbert import (MASK_TOKEN, ScBERT, ScBERTConfig, ScBERTModel, load_gene_vectors,
                                  load_scbert_checkpoint, map_scbert_keys, scbert_tokens)
from biogen.sc import GeneVocab
from biogen.sc.datasets import synthetic

DATA = os.path.join(os.path.dirname(__file__), "..", "..", "data")


@pytest.fixture(scope="module")
def data():
    # separable types: strong disjoint markers; 150 cells x 40 genes keeps every run fast
    return synthetic(n_cells=150, n_genes=40, n_types=3, n_batches=1, n_donors=1, seed=1, n_markers=6,
                     marker_fold=30.0, mean_library=600.0)


def _numpy_tokens(X, query_genes, panel):
    """Independent dense computation: panel matrix (zero fill), scale to 1e4, log2(1+x), clip 5, floor."""
    X = np.asarray(X.todense() if sp.issparse(X) else X, dtype=np.float64)
    P = np.zeros((X.shape[0], len(panel)))
    where = {g: i for i, g in enumerate(query_genes)}
    for j, g in enumerate(panel):
        if g in where:
            P[:, j] = X[:, where[g]]
    tot = P.sum(1, keepdims=True)
    norm = np.divide(P * 1e4, tot, out=np.zeros_like(P), where=tot > 0)
    return np.floor(np.clip(np.log2(1 + norm), 0, 5)).astype(np.int64)


# ---------------------------------------------------------------------------- tokens


def test_tokens_match_numpy(data):
    vocab = GeneVocab.from_adata(data)
    t = scbert_tokens(data, vocab)
    dense = t.dense(np.arange(data.n_obs)).numpy()
    assert dense.shape == (data.n_obs, data.n_vars + 1)
    assert (dense[:, -1] == 0).all()
    np.testing.assert_array_equal(dense[:, :-1], _numpy_tokens(data.X, list(data.var_names), vocab.genes))
    assert dense.max() == 5 and set(np.unique(dense)) <= set(range(6))


def test_query_with_other_gene_order_and_missing_genes_maps_onto_panel(data):
    ref = data.copy()
    vocab = GeneVocab.from_adata(ref)
    drop = ["GENE00003", "GENE00017", "GENE00030"]
    X = ref.X.toarray()
    X[:, [ref.var_names.get_loc(g) for g in drop]] = 0  # absent in the query == zero counts on the panel
    ref.X = sp.csr_matrix(X)
    keep = [g for g in ref.var_names if g not in drop]
    rng = np.random.default_rng(0)
    order = list(rng.permutation(keep))
    q = ref[:, order].copy()
    extra = ad.AnnData(X=sp.csr_matrix(rng.poisson(5.0, size=(q.n_obs, 2)).astype(np.float32)), obs=q.obs,
                       var=pd.DataFrame(index=["NOTPANEL1", "NOTPANEL2"]))
    q = ad.concat([q, extra], axis=1, merge="same")
    tq = scbert_tokens(q, vocab).dense(np.arange(q.n_obs)).numpy()
    tr = scbert_tokens(ref, vocab).dense(np.arange(ref.n_obs)).numpy()
    np.testing.assert_array_equal(tq, tr)
    # and each value sits on its gene: the token of panel gene g is computed from the query column g
    np.testing.assert_array_equal(tq[:, :-1], _numpy_tokens(q.X, list(q.var_names), vocab.genes))
    for g in drop:
        assert (tq[:, vocab.genes.index(g)] == 0).all()


def test_too_little_overlap_is_refused(data):
    vocab = GeneVocab.from_adata(data)
    q = data[:, :5].copy()
    q.var_names = [f"OTHER{i}" for i in range(4)] + [data.var_names[0]]
    with pytest.raises(ValueError, match="vocabulary"):
        scbert_tokens(q, vocab)


# ---------------------------------------------------------------------------- network


def test_forward_backward_tiny():
    cfg = ScBERTConfig.preset("tiny")
    m = ScBERTModel(cfg, n_genes=30, n_classes=4)
    tokens = torch.randint(0, 6, (3, 31))
    out = m(tokens)
    assert out.encodings.shape == (3, 31, cfg.dim) and out.cell_emb.shape == (3, cfg.dim)
    assert out.logits.shape == (3, 4)
    torch.testing.assert_close(out.cell_emb, out.encodings[:, :-1].mean(1))
    out.logits.sum().backward()
    for name, p in m.named_parameters():
        if name.startswith("mlm_head"):
            assert p.grad is None
        else:
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    loss = m.mlm_loss(torch.randint(1, 6, (2, 31)), generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss) and m.mlm_head.weight.grad.abs().sum() > 0


def test_gradient_checkpointing_same_gradients():
    cfg = ScBERTConfig.preset("tiny", depth=2, ff_dropout=0.2)
    a, b = ScBERTModel(cfg, 20, n_classes=3), ScBERTModel(replace(cfg, gradient_checkpointing=True), 20, n_classes=3)
    b.load_state_dict(a.state_dict())
    tokens = torch.randint(0, 6, (3, 21))
    for m in (a, b):
        torch.manual_seed(1)  # same dropout draws; the checkpoint replays them in the recompute
        m(tokens).logits.square().sum().backward()
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6, msg=n)


def test_mlm_mask_statistics():
    m = ScBERTModel(ScBERTConfig.preset("tiny"), n_genes=999)
    tokens = torch.randint(0, 6, (40, 1000))
    masked, chosen = m.mlm_mask(tokens, torch.Generator().manual_seed(0))
    assert not chosen[tokens == 0].any() and not chosen[:, -1].any()
    assert (masked[~chosen] == tokens[~chosen]).all()
    nz = int(((tokens > 0)[:, :-1]).sum())
    assert abs(int(chosen.sum()) / nz - 0.15) < 0.01
    replaced = (masked[chosen] == MASK_TOKEN).float().mean().item()
    assert abs(replaced - 0.9) < 0.02
    assert (masked[chosen & (masked != MASK_TOKEN)] == tokens[chosen & (masked != MASK_TOKEN)]).all()


@pytest.mark.parametrize("ckpt", [False, True])
def test_feature_redraw_at_interval_never_in_eval(ckpt):
    m = ScBERTModel(ScBERTConfig.preset("tiny", depth=2, redraw_interval=3, gradient_checkpointing=ckpt), n_genes=10)
    tokens = torch.randint(0, 6, (2, 11))
    projs = lambda: [l.attn.projection.clone() for l in m.layers]  # noqa: E731
    p0 = projs()
    m.eval()
    for _ in range(7):
        m(tokens)
    assert all(torch.equal(a, b) for a, b in zip(p0, projs()))
    m.train()
    for _ in range(3):  # calls 1..3 use the current projection (a checkpointed backward adds no call)
        m(tokens).cell_emb.sum().backward()
        assert all(torch.equal(a, b) for a, b in zip(p0, projs()))
    m(tokens)  # call 4: interval reached, every layer redraws
    p1 = projs()
    assert all(not torch.equal(a, b) for a, b in zip(p0, p1))
    for _ in range(2):
        m(tokens)
    assert all(torch.equal(a, b) for a, b in zip(p1, projs()))


# ---------------------------------------------------------------------------- user class


def test_finetune_separates_types_and_predict_writes(data):
    train, test = data[:110].copy(), data[110:].copy()
    torch.manual_seed(0)
    m = ScBERT(train, label_key="cell_type", config="tiny", device="cpu")
    hist = m.fit(epochs=8, batch_size=8, lr=2e-3, validation_fraction=0.1, progress=False)
    assert len(hist) == 8 and hist[-1]["train_loss"] < hist[0]["train_loss"]
    out = m.predict(test, unassigned_threshold=None)
    assert out is test
    acc = float((test.obs["scbert_pred"].astype(str) == test.obs["cell_type"].astype(str)).mean())
    assert acc >= 0.9, acc
    proba = test.obsm["scbert_proba"]
    assert proba.shape == (40, 3)
    np.testing.assert_allclose(proba.sum(1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(test.obs["scbert_pred"].cat.codes), proba.argmax(1))
    emb = test.obsm["X_scbert"]
    assert emb.shape == (40, 16)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(m.get_latent_representation(test), emb, rtol=1e-5, atol=1e-6)
    # "Unassigned": exactly the cells whose max probability is below the threshold
    thr = float(np.median(proba.max(1)))
    m.predict(test, unassigned_threshold=thr)
    pred = test.obs["scbert_pred"].astype(str).to_numpy()
    np.testing.assert_array_equal(pred == "Unassigned", proba.max(1) < thr)


def test_save_load_identical_predictions(data, tmp_path):
    a = data[:40].copy()
    m = ScBERT(a, label_key="cell_type", config="tiny", device="cpu")
    m.fit(epochs=1, batch_size=8, validation_fraction=0, progress=False)
    p1 = m.predict(a, copy=True)
    m.save(tmp_path / "m")
    with pytest.raises(FileExistsError):
        m.save(tmp_path / "m")
    m2 = ScBERT.load(tmp_path / "m")
    p2 = m2.predict(a, copy=True)
    np.testing.assert_array_equal(p1.obsm["scbert_proba"], p2.obsm["scbert_proba"])
    np.testing.assert_array_equal(p1.obsm["X_scbert"], p2.obsm["X_scbert"])
    assert m2.label_categories == m.label_categories and m2.vocab == m.vocab


def test_resume_repeats_uninterrupted_run(data, tmp_path):
    a = data[:48].copy()
    kw = dict(batch_size=8, lr=1e-3, validation_fraction=0.2, progress=False, seed=3)

    def fresh():
        torch.manual_seed(0)
        return ScBERT(a, label_key="cell_type", config="tiny", device="cpu", redraw_interval=2)

    full = fresh()
    h_full = full.fit(epochs=2, checkpoint_dir=str(tmp_path / "a"), **kw)
    part = fresh()
    part.fit(epochs=1, checkpoint_dir=str(tmp_path / "b"), **kw)
    with pytest.raises(FileExistsError):
        part.fit(epochs=2, checkpoint_dir=str(tmp_path / "b"), **kw)
    resumed = fresh()
    h_res = resumed.fit(epochs=2, checkpoint_dir=str(tmp_path / "b"), resume=True, **kw)
    assert [h["epoch"] for h in h_res] == [1, 2]
    assert h_res[-1]["train_loss"] == pytest.approx(h_full[-1]["train_loss"], rel=1e-6)
    for (k, v), (k2, v2) in zip(full.module.state_dict().items(), resumed.module.state_dict().items()):
        torch.testing.assert_close(v, v2, rtol=1e-6, atol=1e-7, msg=k)


def test_pretrain_then_finetune_and_freezing(data):
    a = data[:40].copy()
    m = ScBERT(a, label_key="cell_type", config="tiny", device="cpu", depth=2, trainable_layers=1)
    h = m.pretrain(epochs=1, batch_size=8, validation_fraction=0.2, progress=False)
    assert np.isfinite(h[0]["train_loss"]) and np.isfinite(h[0]["val_loss"])
    before = {k: v.detach().clone() for k, v in m.module.named_parameters()}
    m.fit(epochs=1, batch_size=8, lr=1e-2, validation_fraction=0, progress=False)
    after = dict(m.module.named_parameters())
    for k in before:
        changed = not torch.equal(before[k], after[k].detach())
        # trainable_layers=1: only the last layer, the final norm and the head learn
        assert changed == k.startswith(("layers.1.", "norm.", "cls_head.")), k


def test_class_weights_are_used(data):
    a = data[:40].copy()
    torch.manual_seed(0)
    m1 = ScBERT(a, label_key="cell_type", config="tiny", device="cpu")
    torch.manual_seed(0)
    m2 = ScBERT(a, label_key="cell_type", config="tiny", device="cpu")
    a.obs["cell_type"] = a.obs["cell_type"].astype(str)
    a.obs.loc[a.obs_names[:30], "cell_type"] = "type_0"  # imbalance makes the weights differ from 1
    h1 = m1.fit(epochs=1, batch_size=40, validation_fraction=0, progress=False)
    h2 = m2.fit(epochs=1, batch_size=40, validation_fraction=0, progress=False, class_weights=True)
    toks = scbert_tokens(a, m1.vocab).dense(np.arange(40))
    lab = torch.tensor(m1._labels(a))
    counts = torch.bincount(lab, minlength=3).double()
    w = (counts.sum() / (3 * counts)).float()
    torch.manual_seed(0)
    ref = ScBERT(a, label_key="cell_type", config="tiny", device="cpu").module.train()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        logits = ref(toks).logits
    expect_w = torch.nn.functional.cross_entropy(logits, lab, weight=w).item()
    expect_u = torch.nn.functional.cross_entropy(logits, lab).item()
    assert h2[0]["train_loss"] == pytest.approx(expect_w, rel=1e-4)
    assert h1[0]["train_loss"] == pytest.approx(expect_u, rel=1e-4)


def test_gene_vectors_initialise_and_freeze(data, tmp_path):
    a = data[:30].copy()
    genes = list(a.var_names[:25]) + ["NOT_A_GENE"]
    vec = np.random.default_rng(0).normal(size=(26, 16)).astype(np.float32)
    path = tmp_path / "g2v.txt"
    with open(path, "w") as f:
        f.write("26 16\n")
        for g, v in zip(genes, vec):
            f.write(g + " " + " ".join(f"{x:.6f}" for x in v) + "\n")
    g2, v2 = load_gene_vectors(str(path))
    assert g2 == genes
    np.testing.assert_allclose(v2, vec, atol=1e-6)
    m = ScBERT(a, label_key="cell_type", config="tiny", device="cpu", gene_vectors=str(path), freeze_gene_emb=True)
    w = m.module.gene_emb.weight.detach().clone()
    np.testing.assert_allclose(w[:25].numpy(), v2[:25], atol=1e-6)
    assert (w[-1] == 0).all()
    m.fit(epochs=1, batch_size=8, validation_fraction=0, progress=False)
    assert torch.equal(m.module.gene_emb.weight.detach(), w)
    np.savez(tmp_path / "bad.npz", genes=np.array(genes), vectors=vec[:, :8])
    with pytest.raises(ValueError, match="dimension 8.*dim is 16"):
        ScBERT(a, config="tiny", gene_vectors=str(tmp_path / "bad.npz"))
    np.savez(tmp_path / "none.npz", genes=np.array(["X1", "X2"]), vectors=vec[:2])
    with pytest.raises(ValueError, match="none of the 40 panel genes"):
        ScBERT(a, config="tiny", gene_vectors=str(tmp_path / "none.npz"))


# ---------------------------------------------------------------------------- bad input


def _with_X(a, X):
    b = a.copy()
    b.X = X
    return b


def test_bad_input(data):
    a = data[:20].copy()
    X = a.X.toarray()
    bad = X.copy(); bad[0, 0] = np.nan  # noqa: E702
    with pytest.raises(ValueError, match="NaN"):
        ScBERT(_with_X(a, bad), config="tiny")
    bad = X.copy(); bad[0, 0] = -1  # noqa: E702
    with pytest.raises(ValueError, match="negative"):
        ScBERT(_with_X(a, bad), config="tiny")
    bad = X.copy(); bad[0, 0] = 0.5  # noqa: E702
    with pytest.raises(ValueError, match="not integers"):
        ScBERT(_with_X(a, bad), config="tiny")
    with pytest.raises(ValueError, match="empty"):
        ScBERT(a[:0].copy(), config="tiny")
    with pytest.raises(KeyError, match="available columns.*cell_type"):
        ScBERT(a, label_key="celltype", config="tiny")
    with pytest.raises(ValueError, match="batch_key"):
        ScBERT(a, batch_key="batch", config="tiny")
    with pytest.raises(ValueError, match="dim_head"):
        ScBERT(a, config="tiny", dim_head=256)
    other = GeneVocab([f"X{i}" for i in range(40)])
    with pytest.raises(ValueError, match="only 0 of 40"):
        ScBERT(a, config="tiny", vocab=other)
    m = ScBERT(a, label_key="cell_type", config="tiny")
    q = a.copy()
    q.var_names = [f"Y{i}" for i in range(a.n_vars)]
    with pytest.raises(ValueError, match="vocabulary"):
        m.predict(q)
    with pytest.raises(ValueError, match="unassigned_threshold"):
        m.predict(a, unassigned_threshold=2.0)


# ---------------------------------------------------------------------------- original checkpoints


def test_key_mapping_on_stored_scbert_layout():
    with open(os.path.join(DATA, "scbert_panglao_keys.json")) as f:
        ref = json.load(f)
    model = ScBERTModel(ScBERTConfig.preset("paper"), n_genes=16906, n_classes=11)
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for part, expect_missing in (("pretrain", {"cls_head."}), ("finetune_head", None)):
        rows = ref["pretrain"] + (ref["finetune_head"] if part == "finetune_head" else [])
        if part == "finetune_head":
            rows = [r for r in rows if r[0] not in ("to_out.weight", "to_out.bias")]
        names = map_scbert_keys([k for k, _ in rows])
        for k, shape in rows:
            if names[k]:
                assert own[names[k]] == tuple(shape), (k, names[k])
        covered = {v for v in names.values() if v}
        left = {k for k in own if k not in covered and "calls_since_redraw" not in k}
        if part == "pretrain":
            assert left == {k for k in own if k.startswith("cls_head.")}
        else:
            assert left == {"mlm_head.weight", "mlm_head.bias"}
    with pytest.raises(ValueError, match="unsupported"):
        map_scbert_keys(["performer.net.layers.0.0.fn.local_attn.rel_pos.weights"])


def _original_head(dim, seq_len, n_classes, hidden=(24, 12)):
    """finetune.py's head, written the original way (Conv2d on (B, 1, L, dim))."""
    class Identity(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = torch.nn.Conv2d(1, 1, (1, dim))
            self.act = torch.nn.ReLU()
            self.fc1 = torch.nn.Linear(seq_len, hidden[0])
            self.fc2 = torch.nn.Linear(hidden[0], hidden[1])
            self.fc3 = torch.nn.Linear(hidden[1], n_classes)

        def forward(self, x):
            x = self.act(self.conv1(x[:, None])).view(x.shape[0], -1)
            return self.fc3(self.act(self.fc2(self.act(self.fc1(x)))))
    return Identity()


def test_matches_performer_pytorch_performerlm(tmp_path):
    pp = pytest.importorskip("performer_pytorch")
    n_genes, L = 40, 41
    torch.manual_seed(0)
    lm = pp.PerformerLM(num_tokens=7, max_seq_len=L, dim=16, depth=2, heads=2, dim_head=8, nb_features=12,
                        ff_mult=2, rotary_position_emb=False, axial_position_emb=False, attn_out_bias=True,
                        qkv_bias=False)
    with torch.no_grad():
        for n, p in lm.named_parameters():
            if "norm" in n:
                p.add_(0.1 * torch.randn_like(p))  # non-trivial LayerNorm affine parameters
    lm.eval()
    torch.save({"epoch": 1, "model_state_dict": lm.state_dict()}, tmp_path / "pre.pth")
    model = load_scbert_checkpoint(str(tmp_path / "pre.pth"), heads=2)
    assert model.n_genes == n_genes and model.config.nb_features == 12 and model.config.ff_mult == 2
    x = torch.randint(0, 7, (3, L))
    with torch.no_grad():
        expect = lm(x)
        got = model.mlm_head(model.encode(x))
    torch.testing.assert_close(got, expect, rtol=1e-4, atol=1e-5)
    # fine-tuned layout: to_out replaced by the original classification head
    lm.to_out = _original_head(16, L, 5)
    torch.save({"model_state_dict": lm.state_dict()}, tmp_path / "ft.pth")
    ft = load_scbert_checkpoint(str(tmp_path / "ft.pth"), heads=2)
    assert ft.n_classes == 5 and ft.config.head_hidden == (24, 12)
    with torch.no_grad():
        torch.testing.assert_close(ft(x).logits, lm(x), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------- benchmark adapter


def test_annotator_fit_predict_save_load(data, tmp_path):
    from biogen.models.scbert.annotator import ScBERTAnnotator

    train, test = data[:60].copy(), data[60:80].copy()
    train.layers["counts"] = train.X.copy()
    test.layers["counts"] = test.X.copy()
    ann = ScBERTAnnotator("tiny", epochs=2, pretrain_epochs=1, seed=0, batch_size=8)
    ann.fit(train, "cell_type", layer="counts", batch_key="batch")
    p = ann.predict(test)
    assert p.labels.shape == (20,) and p.proba.shape == (20, 3) and p.embedding.shape == (20, 16)
    assert p.classes == ["type_0", "type_1", "type_2"]
    np.testing.assert_array_equal(p.labels, np.array(p.classes)[p.proba.argmax(1)])  # no "Unassigned" by default
    assert "scbert_pred" not in test.obs  # the query is not modified
    ann.save(str(tmp_path / "ann"))
    p2 = type(ann).load(str(tmp_path / "ann")).predict(test)
    np.testing.assert_array_equal(p.proba, p2.proba)
    np.testing.assert_array_equal(p.labels, p2.labels)


def test_original_layout_round_trip_and_from_checkpoint(data, tmp_path):
    """A biogen model written in the original key layout loads back with identical outputs."""
    with open(os.path.join(DATA, "scbert_panglao_keys.json")) as f:
        layout = [k for k, _ in json.load(f)["pretrain"]]
    src = ScBERTModel(ScBERTConfig.preset("tiny", depth=2), n_genes=data.n_vars).eval()
    own = src.state_dict()
    pattern = {k: v for k, v in map_scbert_keys(layout).items() if v}
    sd = {}
    for k, v in pattern.items():
        m = __import__("re").match(r"performer\.net\.layers\.(\d+)\.", k)
        if m and int(m.group(1)) >= 2:
            continue
        sd["module." + k] = own[v].double() if v == "gene_emb.weight" else own[v]  # gene2vec is float64 there
    sd["module.performer.calls_since_last_redraw"] = torch.tensor(5)
    torch.save({"epoch": 3, "model_state_dict": sd}, tmp_path / "orig.pth")
    loaded = load_scbert_checkpoint(str(tmp_path / "orig.pth"), heads=2)
    x = torch.randint(0, 7, (2, data.n_vars + 1))
    with torch.no_grad():
        torch.testing.assert_close(loaded.mlm_head(loaded.encode(x)), src.mlm_head(src.encode(x)))
    assert int(loaded.layers[0].attn.calls_since_redraw) == 5
    genes = tmp_path / "genes.txt"
    genes.write_text("\n".join(data.var_names) + "\n")
    m = ScBERT.from_scbert_checkpoint(str(tmp_path / "orig.pth"), data[:30].copy(), str(genes),
                                      label_key="cell_type", heads=2)
    assert m.module.n_classes == 3 and m.vocab.genes == list(data.var_names)
    with pytest.raises(ValueError, match="panel of 40 genes"):
        ScBERT.from_scbert_checkpoint(str(tmp_path / "orig.pth"), data[:30].copy(), list(data.var_names[:5]), heads=2)
