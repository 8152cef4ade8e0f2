"""The synthetic-pretraining downstream test of RNA-CDM (issue 19, part 2), at tiny sizes."""

import numpy as np
import pytest

from biogen.models.rna_cdm.downstream import (
    DownstreamConfig,
    downstream_markdown,
    evaluate_downstream,
    make_folds,
    nested_fractions,
    plot_downstream,
)

CLASSES = ("A", "B", "C")


def planted(n_samples, tiles_per, amp, noise, seed, size=16):
    """Tiles whose class is a bright band in one of three horizontal thirds, under Gaussian noise."""
    rng = np.random.default_rng(seed)
    labels = np.repeat([CLASSES[i % 3] for i in range(n_samples)], tiles_per)
    groups = np.repeat([f"s{seed}_{i}" for i in range(n_samples)], tiles_per)
    x = rng.normal(0, noise, (len(labels), 3, size, size)).astype(np.float32)
    band = size // 3
    for i, lab in enumerate(labels):
        k = CLASSES.index(lab)
        x[i, :, k * band:(k + 1) * band, :] += amp
    return np.clip(x, -1, 1), labels, groups


CFG = dict(folds=3, fractions=(0.1, 1.0), epochs=3, pretrain_epochs=8, batch_size=16, width=8, seed=0)


def test_folds_are_grouped_disjoint_and_cover_every_tile():
    _, labels, groups = planted(24, 3, 0.5, 0.3, 0)
    folds = make_folds(groups, labels, 4, seed=1)
    tests = np.concatenate([te for _, te in folds])
    assert sorted(tests) == list(range(len(labels)))  # each tile in exactly one test set
    for tr, te in folds:
        assert not set(groups[tr]) & set(groups[te])
        assert set(labels[te]) == set(CLASSES)  # stratified: 6 samples per fold, 2 of each class
    sub = nested_fractions(folds[0][0], groups, labels, (0.1, 0.5, 1.0), seed=3)
    s = {f: set(groups[ix]) for f, ix in sub.items()}
    assert s[0.1] <= s[0.5] <= s[1.0] == set(groups[folds[0][0]])
    assert {labels[groups == g][0] for g in s[0.1]} == set(CLASSES)  # every class kept
    assert len(s[0.5]) == 9  # ceil(0.5 * 18 training samples)


def test_planted_signal_in_generated_tiles_is_recovered(tmp_path):
    real_x, real_y, real_g = planted(30, 2, amp=0.6, noise=0.6, seed=1)
    syn_x, syn_y, _ = planted(45, 2, amp=0.6, noise=0.6, seed=2)
    res = evaluate_downstream(real_x, real_y, real_g, syn_x, syn_y, DownstreamConfig(**CFG))
    # the same folds for every arm, each fold's test tiles disjoint from the others
    tests = [set(f["test_index"]) for f in res.folds]
    assert sum(map(len, tests)) == len(real_y) and set().union(*tests) == set(range(len(real_y)))
    assert len(res.scores) == 3 * 2 * 3  # folds x fractions x arms
    for f in res.folds:
        test_samples = set(real_g[f["test_index"]])
        assert all(not set(v) & test_samples for v in f["train_samples"].values())
    mean = {(s["arm"], s["fraction"]): s["mean"] for s in res.summary if s["metric"] == "f1_macro"}
    assert mean[("synthetic", 0.1)] > 0.8  # generated tiles alone carry the label onto real tiles
    assert mean[("pretrained", 0.1)] > mean[("scratch", 0.1)]  # with 1-2 real samples per class
    # summaries equal the fold scores they summarise
    f1 = [s["f1_macro"] for s in res.scores if s["arm"] == "scratch" and s["fraction"] == 1.0]
    assert mean[("scratch", 1.0)] == pytest.approx(np.mean(f1))
    comp = [c for c in res.comparisons if c["fraction"] == 0.1 and c["metric"] == "f1_macro"]
    assert {(c["a"], c["b"]) for c in comp} == {("scratch", "pretrained"), ("scratch", "synthetic"),
                                               ("pretrained", "synthetic")}
    plot_downstream(res, tmp_path / "downstream.png")
    assert (tmp_path / "downstream.png").stat().st_size > 1000
    assert "pretrained vs synthetic" in downstream_markdown(res)


def test_generated_tiles_without_the_label_teach_nothing():
    real_x, real_y, real_g = planted(30, 2, amp=0.6, noise=0.6, seed=1)
    syn_x, syn_y, _ = planted(45, 2, amp=0.6, noise=0.6, seed=2)
    shuffled = np.random.default_rng(0).permutation(syn_y)
    res = evaluate_downstream(real_x, real_y, real_g, syn_x, shuffled, DownstreamConfig(**CFG))
    acc = [s["mean"] for s in res.summary if s["arm"] == "synthetic" and s["metric"] == "accuracy"]
    assert max(acc) < 0.6  # chance is 1/3


def test_reproducible_and_bad_input_refused():
    real_x, real_y, real_g = planted(12, 2, amp=0.6, noise=0.3, seed=1)
    cfg = DownstreamConfig(folds=2, fractions=(1.0,), epochs=1, pretrain_epochs=1, width=4)
    a = evaluate_downstream(real_x, real_y, real_g, real_x[:6], real_y[:6], cfg)
    b = evaluate_downstream(real_x, real_y, real_g, real_x[:6], real_y[:6], cfg)
    assert a.scores == b.scores
    # generated tiles conditioned on a fold's test samples never pretrain that fold
    c = evaluate_downstream(real_x, real_y, real_g, real_x, real_y, cfg, synth_groups=real_g)
    for f in c.folds:
        assert f["n_generated_tiles"] == len(real_y) - len(f["test_index"])
    with pytest.raises(ValueError, match="absent from the real"):
        evaluate_downstream(real_x, real_y, real_g, real_x[:2], np.array(["A", "Z"]), cfg)
    with pytest.raises(ValueError, match="resize"):
        evaluate_downstream(real_x, real_y, real_g, real_x[:2, :, :8, :8], real_y[:2], cfg)
    with pytest.raises(ValueError, match="at least 5 samples, got 4"):
        make_folds(real_g[:8], real_y[:8], 5, 0)
    with pytest.raises(ValueError, match="fractions"):
        DownstreamConfig(fractions=(0.0, 1.0))


def test_run_downstream_with_a_tiny_cascade_on_toy_tissue(tmp_path):
    """The wiring the demo and `rnacdm evaluate --downstream` use: generate, label, evaluate, write."""
    import torch

    from biogen.data.toy_tissue import CELL_TYPES, ToyTissueConfig, simulate_toy_tissue
    from biogen.models.rna_cdm import RNACDM, cascade_preset
    from biogen.models.rna_cdm.downstream import run_downstream, simulator_labels

    toy = simulate_toy_tissue(9, 2, ToyTissueConfig(tile_size=32), seed=0)
    dom = simulator_labels(toy.adata, "dominant_cell_type")
    assert list(dom) == [CELL_TYPES[i] for i in toy.adata.obsm["fractions"].argmax(1)]
    with pytest.raises(KeyError, match="neither"):
        simulator_labels(toy.adata, "tissue")
    labels = simulator_labels(toy.adata, "cancer_type")
    real = toy.tiles.reshape(-1, 32, 32, 3).transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1
    groups = np.repeat(toy.sample_ids, 2)
    torch.manual_seed(0)
    model = RNACDM(cascade_preset("tiny", 4))
    z = np.random.default_rng(0).normal(size=(9, 4)).astype(np.float32)
    cfg = DownstreamConfig(folds=3, fractions=(0.5, 1.0), epochs=1, pretrain_epochs=1, width=4)
    d = run_downstream(model, z, labels, toy.sample_ids, real, np.repeat(labels, 2), groups, tmp_path, cfg,
                       per_sample=1, steps=2, sr_steps=2)
    assert d["generated_tiles"] == 9 and len(d["scores"]) == 3 * 2 * 3
    # tiles generated from a fold's test samples (same ids as the real ones here) are left out
    assert all(f["n_generated_tiles"] == 9 - len(f["test_index"]) // 2 for f in d["folds"])
    assert (tmp_path / "downstream.png").is_file() and "scratch" in (tmp_path / "downstream.md").read_text()


def test_cli_evaluate_downstream(tmp_path, capsys):
    import json

    from biogen.cli import main
    from biogen.data.toy_tissue import ToyTissueConfig, simulate_toy_tissue

    toy = simulate_toy_tissue(12, 2, ToyTissueConfig(n_genes=60, markers_per_type=4, tile_size=32), seed=0)
    toy.write(tmp_path / "rna.h5ad", tmp_path / "tiles")
    rna, tiles = str(tmp_path / "rna.h5ad"), str(tmp_path / "tiles")
    assert main(["rnacdm", "train-vae", "--rna", rna, "--out", str(tmp_path / "vae"), "--hidden", "16", "--latent",
                 "4", "--epochs", "2", "--batch-size", "8", "--plot", "none"]) == 0
    vae = str(tmp_path / "vae" / "vae.safetensors")
    assert main(["rnacdm", "train", "--rna", rna, "--tiles", tiles, "--vae", vae, "--preset", "tiny", "--steps", "1",
                 "--batch-size", "4", "--out", str(tmp_path / "cdm")]) == 0
    model = str(tmp_path / "cdm" / "cascade.safetensors")
    ev = ["rnacdm", "evaluate", "--model", model, "--vae", vae, "--rna", rna, "--tiles", tiles, "--steps", "2",
          "--per-sample", "1", "--downstream", "--folds", "3", "--fractions", "0.5", "1", "--downstream-epochs", "1",
          "--downstream-label", "dominant_cell_type"]
    # bad options are refused before any work
    assert main(ev + ["--fractions", "0", "--out", str(tmp_path / "bad")]) == 2
    assert "fractions" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    assert main(ev + ["--out", str(tmp_path / "ev")]) == 0
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    d = m["downstream"]
    assert len(d["scores"]) == 3 * 2 * 3 and d["generated_tiles"] == 12
    assert set(d["classes"]) <= {"tumour", "lymphocyte", "connective", "dead", "normal"}
    assert (tmp_path / "ev" / "downstream.png").is_file() and (tmp_path / "ev" / "downstream.md").is_file()
