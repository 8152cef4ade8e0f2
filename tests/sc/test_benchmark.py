"""The annotation benchmark protocol and its CLI (issue: cell annotation benchmark)."""

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_score, recall_score

from biogen.cli import main
from biogen.sc.benchmark import BenchmarkConfig, classification_metrics, filter_cells, run_benchmark, split_cells
from biogen.sc.datasets import synthetic


@pytest.fixture(scope="module")
def adata():
    a = synthetic(n_cells=360, n_genes=150, n_types=4, n_donors=6, seed=1)
    a.obs["cell_type"] = a.obs["cell_type"].astype(str)
    return a


def test_metrics_match_scikit_learn_on_hand_made_predictions():
    y = np.array(["a", "a", "b", "b", "b", "c", "c", "a", "c", "b"])
    p = np.array(["a", "b", "b", "b", "c", "c", "a", "a", "c", "d"])  # "d" is predicted but never true
    m, per_class, cm = classification_metrics(y, p)
    true_labels = ["a", "b", "c"]
    assert m["accuracy"] == pytest.approx(accuracy_score(y, p))
    for avg in ("macro", "weighted"):
        assert m[f"f1_{avg}"] == pytest.approx(f1_score(y, p, labels=true_labels, average=avg, zero_division=0))
        assert m[f"precision_{avg}"] == pytest.approx(precision_score(y, p, labels=true_labels, average=avg, zero_division=0))
        assert m[f"recall_{avg}"] == pytest.approx(recall_score(y, p, labels=true_labels, average=avg, zero_division=0))
    labels = ["a", "b", "c", "d"]
    assert np.array_equal(cm.to_numpy(), confusion_matrix(y, p, labels=labels))
    assert per_class.set_index("label").loc["b", "support"] == 4


def test_donor_split_never_shares_a_donor_and_puts_big_donors_in_reference(adata):
    cfg = BenchmarkConfig(label_key="cell_type", donor_key="donor", test_size=0.3)
    split, _ = split_cells(adata.obs, cfg)
    donors = adata.obs["donor"].astype(str).to_numpy()
    train_d, test_d = set(donors[split == "train"]), set(donors[split == "test"])
    assert train_d and test_d and not (train_d & test_d)
    sizes = pd.Series(donors).value_counts()
    assert sizes[list(train_d)].min() >= sizes[list(test_d)].max()


def test_stratified_split_keeps_proportions(adata):
    split, _ = split_cells(adata.obs, BenchmarkConfig(label_key="cell_type", test_size=0.25, seed=3))
    assert (split == "test").mean() == pytest.approx(0.25, abs=0.02)
    lab = adata.obs["cell_type"].to_numpy()
    for c in np.unique(lab):
        frac = (split[lab == c] == "test").mean()
        assert frac == pytest.approx(0.25, abs=0.1)


def test_class_only_in_test_split_warns_and_is_reported(adata):
    a = adata.copy()
    donors = a.obs["donor"].astype(str)
    smallest = donors.value_counts().index[-1]
    a.obs.loc[(donors == smallest).to_numpy(), "cell_type"] = "rare"
    with pytest.warns(UserWarning, match="only in the test split.*rare"):
        _, notes = split_cells(a.obs, BenchmarkConfig(label_key="cell_type", donor_key="donor"))
    assert any("rare" in n for n in notes)


def test_filters(adata):
    a = adata.copy()
    a.obs.loc[a.obs_names[:5], "cell_type"] = "Unknown"
    a.obs.loc[a.obs_names[5:8], "cell_type"] = "tiny"
    keep, notes = filter_cells(a, BenchmarkConfig(label_key="cell_type", drop_labels=("Unknown",), min_cells_per_class=4))
    kept = set(a.obs["cell_type"][keep])
    assert "Unknown" not in kept and "tiny" not in kept and keep.sum() == a.n_obs - 8
    keep, _ = filter_cells(a, BenchmarkConfig(label_key="cell_type", keep_labels=("type_0",)))
    assert set(a.obs["cell_type"][keep]) == {"type_0"}
    keep, _ = filter_cells(a, BenchmarkConfig(label_key="cell_type", subset={"batch": [a.obs["batch"].iloc[0]]}))
    assert a.obs["batch"][keep].nunique() == 1


def test_run_benchmark_baselines_learn_separable_types(adata, tmp_path):
    res = run_benchmark(adata, BenchmarkConfig(label_key="cell_type", donor_key="donor"), tmp_path / "out", progress=False)
    assert set(res.metrics["model"]) == {"logreg", "knn"}
    assert (res.metrics["accuracy"] > 0.9).all()  # marker genes at 8x: linearly separable


def test_cli_end_to_end_writes_every_output(adata, tmp_path):
    path = tmp_path / "ref.h5ad"
    adata.write_h5ad(path)
    out = tmp_path / "bench"
    rc = main(["annotate", "benchmark", "--h5ad", str(path), "--label-key", "cell_type", "--donor-key", "donor",
               "--models", "logreg,knn", "--out", str(out), "--no-progress"])
    assert rc == 0
    for f in ("metrics.csv", "per_class.csv", "split.csv", "confusion_logreg.png", "confusion_knn.png",
              "umap_labels.png", "umap_correct.png", "models.png", "predictions.h5ad", "report.md"):
        assert (out / f).is_file(), f
    m = pd.read_csv(out / "metrics.csv")
    for col in ("model", "accuracy", "precision_macro", "recall_macro", "f1_macro", "f1_weighted", "cells_per_s",
                "train_s", "peak_mem_mb"):
        assert col in m.columns
    assert ((m[["accuracy", "precision_macro", "recall_macro", "f1_macro", "f1_weighted"]] >= 0) &
            (m[["accuracy", "precision_macro", "recall_macro", "f1_macro", "f1_weighted"]] <= 1)).all().all()
    assert (m[["cells_per_s", "train_s", "peak_mem_mb"]] >= 0).all().all()
    import anndata as ad

    pred = ad.read_h5ad(out / "predictions.h5ad")
    assert "logreg_pred" in pred.obs and "knn_proba" in pred.obsm and "X_knn" in pred.obsm
    split = pd.read_csv(out / "split.csv")
    assert set(split["split"]) == {"train", "test"} and len(pred) == (split["split"] == "test").sum()
    # train + predict a single model
    model_dir = tmp_path / "model"
    assert main(["annotate", "train", "--h5ad", str(path), "--label-key", "cell_type", "--model", "logreg",
                 "--out", str(model_dir)]) == 0
    assert main(["annotate", "predict", "--model-dir", str(model_dir), "--h5ad", str(path),
                 "--out", str(tmp_path / "pred.h5ad")]) == 0
    assert "logreg_pred" in ad.read_h5ad(tmp_path / "pred.h5ad").obs
    assert main(["annotate", "predict", "--model-dir", str(model_dir), "--h5ad", str(path), "--out", str(path)]) == 2


def test_bad_input_clear_errors_and_nothing_half_written(adata, tmp_path, capsys):
    path = tmp_path / "ref.h5ad"
    adata.write_h5ad(path)
    txt = tmp_path / "cells.csv"
    txt.write_text("a,b\n")
    base = ["annotate", "benchmark", "--models", "logreg", "--no-progress"]
    assert main(base + ["--h5ad", str(txt), "--label-key", "cell_type", "--out", str(tmp_path / "o1")]) == 2
    assert "not an .h5ad" in capsys.readouterr().err
    assert main(base + ["--h5ad", str(path), "--label-key", "celltype", "--out", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err
    assert "'celltype' is not a column" in err and "cell_type" in err and "donor" in err
    one = adata.copy()
    one.obs["one"] = "x"
    one.write_h5ad(tmp_path / "one.h5ad")
    assert main(base + ["--h5ad", str(tmp_path / "one.h5ad"), "--label-key", "one", "--out", str(tmp_path / "o3")]) == 2
    assert "two or more" in capsys.readouterr().err
    logged = adata.copy()
    logged.X = np.log1p(logged.X)
    logged.write_h5ad(tmp_path / "log.h5ad")
    assert main(base + ["--h5ad", str(tmp_path / "log.h5ad"), "--label-key", "cell_type", "--out", str(tmp_path / "o4")]) == 2
    assert "count" in capsys.readouterr().err.lower()
    for o in ("o1", "o2", "o3", "o4"):
        assert not (tmp_path / o).exists()
    # a previous output folder is left alone: refused without --overwrite
    prev = tmp_path / "prev"
    prev.mkdir()
    (prev / "mine.txt").write_text("keep me")
    assert main(base + ["--h5ad", str(path), "--label-key", "cell_type", "--out", str(prev)]) == 2
    assert (prev / "mine.txt").read_text() == "keep me"
    assert not list(tmp_path.glob(".prev.tmp-*"))


def test_demo_help():
    r = subprocess.run([sys.executable, "-m", "biogen.cli", "demo", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "pbmc68k" in r.stdout and "--out" in r.stdout
