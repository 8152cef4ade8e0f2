"""Repeated benchmarks (seeds x splits), the RF / SVM baselines and the run record (issue 19)."""

import json

import numpy as np
import pandas as pd
import pytest

from biogen.cli import main
from biogen.sc import benchmark as bm
from biogen.sc.benchmark import BenchmarkConfig, Prediction, run_benchmark, split_cells
from biogen.sc.datasets import synthetic


@pytest.fixture(scope="module")
def adata():
    a = synthetic(n_cells=240, n_genes=120, n_types=3, n_donors=6, seed=4, marker_fold=2.5)
    a.obs["cell_type"] = a.obs["cell_type"].astype(str)
    return a


class MajorityAnnotator:
    """Predicts the reference's most frequent label: a model any real one must beat."""

    name = "majority"

    def __init__(self, seed=0, n_top_genes=None):
        pass

    def fit(self, train, label_key, *, layer=None, batch_key=None):
        self.label = train.obs[label_key].astype(str).value_counts().index[0]

    def predict(self, test):
        return Prediction(np.full(test.n_obs, self.label, dtype=object))


@pytest.fixture
def with_majority(monkeypatch):
    monkeypatch.setitem(bm.ANNOTATORS, "majority", MajorityAnnotator)
    monkeypatch.setattr(bm, "BASELINES", bm.BASELINES + ("majority",))


def test_rf_and_svm_are_scikit_learn_on_the_logreg_features(adata):
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.svm import LinearSVC

    train, test = adata[:180].copy(), adata[180:].copy()
    y = train.obs["cell_type"].to_numpy()
    for ann, est in ((bm.RandomForestAnnotator(n_estimators=20, seed=3),
                      RandomForestClassifier(n_estimators=20, max_features="sqrt", random_state=3, n_jobs=1)),
                     (bm.LinearSVMAnnotator(C=0.05), LinearSVC(C=0.05, max_iter=5000, random_state=0))):
        ann.fit(train, "cell_type")
        feats = bm._LogNormHVG(2000)
        est.fit(feats.fit_transform(train, None), y)
        expected = est.predict(feats.transform(test, None))
        got = ann.predict(test)
        assert np.array_equal(got.labels, expected)
        assert (got.labels == test.obs["cell_type"].to_numpy()).mean() > 0.8
    assert got.proba is None  # the SVM gives labels only


def test_donor_splits_differ_per_seed_and_never_share_a_donor(adata):
    donors = adata.obs["donor"].astype(str).to_numpy()
    seen = set()
    for seed in range(4):
        split, _ = split_cells(adata.obs, BenchmarkConfig(label_key="cell_type", donor_key="donor", seed=seed),
                               shuffle_donors=True)
        train_d, test_d = set(donors[split == "train"]), set(donors[split == "test"])
        assert train_d and test_d and not train_d & test_d
        seen.add(frozenset(test_d))
    assert len(seen) > 1
    # without shuffling: the thesis's one split, whatever the seed
    a, _ = split_cells(adata.obs, BenchmarkConfig(label_key="cell_type", donor_key="donor", seed=0))
    b, _ = split_cells(adata.obs, BenchmarkConfig(label_key="cell_type", donor_key="donor", seed=5))
    assert np.array_equal(a, b)


def test_repeats_share_splits_across_models_and_summaries_match(adata, tmp_path, with_majority):
    cfg = BenchmarkConfig(label_key="cell_type", models=("logreg", "svm", "majority"), seed=7)
    res = run_benchmark(adata, cfg, repeats=4, progress=False)
    m = res.metrics
    assert len(m) == 12 and sorted(set(m["repeat"])) == [0, 1, 2, 3] and set(m["seed"]) == {7, 8, 9, 10}
    # every model of a repeat saw the same split; the splits differ between repeats
    assert (m.groupby("repeat")[["n_train", "n_test"]].nunique() == 1).all().all()
    cols = ["split"] + [f"split_{r}" for r in (1, 2, 3)]
    assert len({tuple(res.split[c]) for c in cols}) == 4
    for c in cols:  # the split of repeat r is the stratified split of seed 7 + r
        exp, _ = split_cells(adata.obs, BenchmarkConfig(label_key="cell_type", seed=7 + cols.index(c)))
        assert np.array_equal(res.split[c].to_numpy(), exp)
    s = res.summary.set_index(["model", "metric"])
    for name, g in m.groupby("model"):
        assert s.loc[(name, "f1_macro"), "mean"] == pytest.approx(g["f1_macro"].mean())
        assert s.loc[(name, "f1_macro"), "std"] == pytest.approx(g["f1_macro"].std(ddof=1))
        assert s.loc[(name, "f1_macro"), "ci_low"] <= g["f1_macro"].mean() <= s.loc[(name, "f1_macro"), "ci_high"]
    c = res.comparisons[res.comparisons["metric"] == "f1_macro"].set_index(["a", "b"])
    wide = m.pivot(index="repeat", columns="model", values="f1_macro")
    d = wide["logreg"] - wide["majority"]
    assert c.loc[("logreg", "majority"), "mean_diff"] == pytest.approx(d.mean())
    assert c.loc[("logreg", "majority"), "win_rate"] == 1.0
    # the planted difference (a real model vs the majority label) is significant
    assert c.loc[("logreg", "majority"), "significant"]
    assert res.run_info["seed"] == 7 and res.run_info["repeats"] == 4


def test_repeated_runs_are_reproducible(adata):
    cfg = BenchmarkConfig(label_key="cell_type", donor_key="donor", models=("logreg", "rf"), seed=1,
                          model_options={"rf": {"n_estimators": 20}})
    a = run_benchmark(adata, cfg, repeats=2, progress=False)
    b = run_benchmark(adata, cfg, repeats=2, progress=False)
    cols = ["model", "repeat", "seed", "accuracy", "f1_macro", "n_train", "n_test"]
    pd.testing.assert_frame_equal(a.metrics[cols], b.metrics[cols])
    pd.testing.assert_frame_equal(a.split, b.split)


def test_cli_repeats_writes_the_report(adata, tmp_path, capsys, with_majority):
    path = tmp_path / "ref.h5ad"
    adata.write_h5ad(path)
    base = ["annotate", "benchmark", "--h5ad", str(path), "--label-key", "cell_type", "--no-progress"]
    with pytest.raises(SystemExit):
        main(base + ["--models", "logreg", "--repeats", "0", "--out", str(tmp_path / "o0")])
    assert "--repeats: expected an integer >= 1" in capsys.readouterr().err
    assert not (tmp_path / "o0").exists()
    out = tmp_path / "o"
    assert main(base + ["--models", "logreg,svm,majority", "--repeats", "3", "--seed", "5", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "mean over 3 repeats" in printed and "logreg > majority" in printed
    for f in ("metrics.csv", "summary.csv", "comparisons.csv", "f1_repeats.png", "run.json", "per_class.csv",
              "predictions.h5ad", "confusion_svm.png", "report.md"):
        assert (out / f).is_file(), f
    m = pd.read_csv(out / "metrics.csv")
    assert len(m) == 9 and set(m["repeat"]) == {0, 1, 2}
    comps = pd.read_csv(out / "comparisons.csv")
    sig = comps[(comps["metric"] == "f1_macro") & comps["significant"]]
    report = (out / "report.md").read_text()
    assert "**logreg** beats majority" in report
    for r in sig.itertuples():  # the report names exactly the significant pairs
        winner, loser = (r.a, r.b) if r.mean_diff > 0 else (r.b, r.a)
        assert f"**{winner}** beats {loser}" in report
    assert report.count(" beats ") == len(sig)
    run = json.loads((out / "run.json").read_text())
    assert run["seed"] == 5 and run["repeats"] == 3 and run["wall_s"] > 0 and run["peak_rss_mb"] > 0
    assert 0 < run["cpu_s"] and "start" in run["load_avg_1min"]
    assert {"python", "numpy", "scikit-learn", "biogen"} <= set(run["versions"]) and run["cpu_count"] >= 1
    for key in ("seed: 5", "hardware:", "threads:", "versions:", "wall time:", "peak memory"):
        assert key in report
