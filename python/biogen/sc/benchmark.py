"""The cell-annotation benchmark of the thesis (seed 004, SPEC 2.4) on any AnnData.

Filter the data set as the thesis does, split it (by donor when a donor column exists, stratified
otherwise), train each annotator on the reference split, predict the held-out split, and write
metrics, per-class reports, confusion matrices, UMAPs, predictions and a report.

Annotators share one small interface (:class:`Annotator`): ``fit(train, label_key)`` and
``predict(test) -> Prediction``; ``save(folder)`` / ``load(folder)`` for ``biogen annotate train`` and
``predict`` (the scikit-learn baselines are saved with skops, which loads only the allow-listed
types of :func:`baseline_trusted_types`: no pickle, no code runs). Built in: ``logreg`` (logistic regression on log-normalised HVGs,
the strong simple baseline) and ``knn`` (kNN label transfer in a PCA space fitted on the
reference, in the spirit of Azimuth's reference mapping). The transformer models register
themselves in :data:`ANNOTATORS` from their own modules.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Protocol

import numpy as np
import pandas as pd

log = logging.getLogger("biogen.benchmark")

# SPEC 2.4: the thesis's results (TCCA, 19 classes, 1.48M train / 356k test cells), for context.
THESIS_RESULTS = pd.DataFrame(
    [
        ("all cell types", "0.9014 / 0.7525", "0.8893 / 0.6894", ""),
        ("non-malignant only", "0.8795 / 0.7825", "0.8496 / 0.7172", ""),
        ("tumour type of malignant cells", "0.9351 / 0.8577", "0.9337 / 0.8086", ""),
        ("lung TME", "0.8845 / 0.5805", "", "0.6043 / 0.2804"),
    ],
    columns=["task", "scGPT acc / F1", "scBERT acc / F1", "Azimuth acc / F1"],
)

METRIC_COLUMNS = ["model", "repeat", "seed", "accuracy", "precision_macro", "recall_macro", "f1_macro", "precision_weighted",
                  "recall_weighted", "f1_weighted", "cells_per_s", "train_s", "predict_s", "peak_mem_mb",
                  "n_train", "n_test"]


@dataclass
class BenchmarkConfig:
    """What to filter, how to split, which annotators to run.

    min_cells_per_class: drop classes with fewer cells (the thesis uses 100; 0 keeps all).
    drop_labels: labels whose cells are removed (e.g. "Unknown").
    keep_labels: if given, only these labels are kept (e.g. the malignant subset).
    subset: {obs column: [values]} keeps cells whose column has one of the values.
    donor_key: split by donor: the donors with the most cells go to the reference split until it
        holds ``1 - test_size`` of the cells (the thesis's protocol); else a stratified split.
    """

    label_key: str
    donor_key: Optional[str] = None
    batch_key: Optional[str] = None
    layer: Optional[str] = None
    models: tuple[str, ...] = ("logreg", "knn")
    min_cells_per_class: int = 0
    drop_labels: tuple[str, ...] = ()
    keep_labels: Optional[tuple[str, ...]] = None
    subset: Optional[dict[str, list]] = None
    test_size: float = 0.2
    seed: int = 0
    n_top_genes: int = 2000
    model_options: dict[str, dict] = field(default_factory=dict)

    def __post_init__(self):
        if not 0 < self.test_size < 1:
            raise ValueError(f"test_size must be in (0, 1), got {self.test_size}")
        if self.min_cells_per_class < 0:
            raise ValueError(f"min_cells_per_class must be >= 0, got {self.min_cells_per_class}")
        if not self.models:
            raise ValueError("select at least one model")
        unknown = [m for m in self.models if m not in ANNOTATORS]
        if unknown:
            raise ValueError(f"unknown model(s) {unknown}; available: {sorted(ANNOTATORS)}")


@dataclass
class Prediction:
    labels: np.ndarray  # (n,) predicted label strings
    proba: Optional[np.ndarray] = None  # (n, classes) class probabilities
    classes: Optional[list[str]] = None  # column order of proba
    embedding: Optional[np.ndarray] = None  # (n, d) cell embedding of the model


class Annotator(Protocol):
    name: str

    def fit(self, train, label_key: str, *, layer: Optional[str] = None, batch_key: Optional[str] = None) -> None: ...

    def predict(self, test) -> Prediction: ...


# name -> factory(**options) returning an Annotator; models add themselves (see register_annotator)
ANNOTATORS: dict[str, Callable[..., Annotator]] = {}


def register_annotator(name: str, factory: Callable[..., Annotator]) -> None:
    ANNOTATORS[name] = factory


# ------------------------------------------------------------------------------------ baselines


class _LogNormHVG:
    """Log-normalised expression of the reference's highly variable genes, scaled on the reference."""

    def __init__(self, n_top_genes: int):
        self.n_top_genes = n_top_genes

    def fit_transform(self, adata, layer):
        from sklearn.preprocessing import StandardScaler

        from .preprocess import preprocess

        check_unique_genes(adata, "reference")
        n_top = min(self.n_top_genes, adata.n_vars)
        work = preprocess(adata, layer=layer, n_top_genes=n_top if n_top < adata.n_vars else None,
                          hvg_flavor="cell_ranger")
        self.genes = list(work.var_names)
        self.scaler = StandardScaler(with_mean=True)
        return self.scaler.fit_transform(_dense(work.X)).clip(-10, 10)

    def transform(self, adata, layer):
        from .preprocess import preprocess

        check_unique_genes(adata, "query")
        missing = [g for g in self.genes if g not in adata.var_names]
        if missing:
            raise ValueError(f"{len(missing)} reference genes are missing from the query, e.g. {missing[:5]}")
        work = preprocess(adata[:, self.genes], layer=layer)
        return self.scaler.transform(_dense(work.X)).clip(-10, 10)


def check_unique_genes(adata, what: str, path=None) -> None:
    """Refuse duplicated gene names (``path``: the file they came from, for the message)."""
    from ..errors import InputError

    if not adata.var_names.is_unique:
        dup = adata.var_names[adata.var_names.duplicated()].unique()
        raise InputError(f"{len(dup)} {what} gene names occur more than once in var_names (e.g. {list(dup[:5])})",
                         path=path, hint="sum or drop the duplicated genes so that each name is one column, "
                         "then run again")


def _dense(x) -> np.ndarray:
    return np.asarray(x.toarray() if hasattr(x, "toarray") else x, dtype=np.float32)


# Types a saved baseline may hold beyond those skops trusts by default (scikit-learn estimators,
# numpy): the fitted helper objects of the estimators the baselines use. Anything else in a file is
# refused before it is loaded.
_SKLEARN_HELPER_TYPES = (
    "sklearn.tree._tree.Tree",
    "sklearn.neighbors._kd_tree.KDTree", "sklearn.neighbors._ball_tree.BallTree",
    "sklearn.metrics._dist_metrics.EuclideanDistance64", "sklearn.metrics._dist_metrics.EuclideanDistance32",
    "sklearn.calibration._CalibratedClassifier", "sklearn.calibration._SigmoidCalibration",
)
_BASELINE_FILE = "annotator.skops"


def baseline_trusted_types() -> set[str]:
    """The types a saved baseline may hold: the baseline annotator classes registered in
    :data:`ANNOTATORS` (and their feature transform) and the scikit-learn helpers they use."""
    ours = {c for c in ANNOTATORS.values() if isinstance(c, type)} | {_LogNormHVG}
    return {f"{c.__module__}.{c.__qualname__}" for c in ours} | set(_SKLEARN_HELPER_TYPES)


def save_baseline(annotator, folder) -> Path:
    """Write a fitted scikit-learn baseline to ``folder/annotator.skops`` (atomically), without pickle."""
    import skops.io as sio

    from ..utils import atomic_path

    folder = Path(folder)
    with atomic_path(folder / _BASELINE_FILE) as tmp:
        sio.dump(annotator, tmp)
    return folder


def load_baseline(folder, expected: Optional[type] = None):
    """Load what :func:`save_baseline` wrote, refusing any type outside :func:`baseline_trusted_types`
    (so a file from elsewhere cannot run code) and, with ``expected``, an annotator of another class."""
    import skops.io as sio

    from .._io import check_file
    from ..errors import CorruptFileError, IncompatibleError

    path = Path(folder) / _BASELINE_FILE
    check_file(path, "saved baseline model")
    try:
        found = sio.get_untrusted_types(file=path)
    except Exception as exc:  # zip / JSON errors of a damaged file, raised in many types by skops
        raise CorruptFileError(f"could not be read as a skops file ({type(exc).__name__}: {exc})", path=path,
                               hint="restore it or train the model again") from exc
    refused = sorted(set(found) - baseline_trusted_types())
    if refused:
        raise IncompatibleError(f"holds types biogen does not load: {refused[:5]}", path=path,
                                hint="load only model folders written by 'biogen annotate train'")
    try:
        obj = sio.load(path, trusted=found)
    except Exception as exc:
        raise CorruptFileError(f"could not be loaded ({type(exc).__name__}: {exc})", path=path,
                               hint="restore it or train the model again") from exc
    if expected is not None and not isinstance(obj, expected):
        raise IncompatibleError(f"holds a {type(obj).__name__}, not a {expected.__name__}", path=path,
                                hint="pass the model folder of the model you meant")
    return obj


class _SavedWithSkops:
    """``save`` / ``load`` of the scikit-learn baselines (:func:`save_baseline`, :func:`load_baseline`)."""

    def save(self, folder) -> Path:
        return save_baseline(self, folder)

    @classmethod
    def load(cls, folder):
        return load_baseline(folder, cls)


class LogRegAnnotator(_SavedWithSkops):
    """Logistic regression on log-normalised, scaled HVGs: the strong simple baseline. C = 1: the
    choice of ``benchmarks/sweep_annotation_recipe.py`` among 0.01, 0.1 and 1."""

    name = "logreg"

    def __init__(self, n_top_genes: int = 2000, C: float = 1.0, max_iter: int = 2000, seed: int = 0):
        self.features = _LogNormHVG(n_top_genes)
        self.C, self.max_iter, self.seed = C, max_iter, seed

    def fit(self, train, label_key, *, layer=None, batch_key=None):
        from sklearn.linear_model import LogisticRegression

        x = self.features.fit_transform(train, layer)
        self.layer = layer
        self.model = LogisticRegression(C=self.C, max_iter=self.max_iter, random_state=self.seed)
        self.model.fit(x, train.obs[label_key].astype(str).to_numpy())

    def predict(self, test):
        x = self.features.transform(test, self.layer)
        proba = self.model.predict_proba(x)
        classes = list(self.model.classes_)
        return Prediction(np.asarray(classes)[proba.argmax(1)], proba, classes, None)


class KNNAnnotator(_SavedWithSkops):
    """Reference mapping: project the query into the reference's PCA space, transfer labels from the
    k nearest reference cells (distance-weighted vote), as Azimuth-style tools do."""

    name = "knn"

    def __init__(self, n_top_genes: int = 2000, n_comps: int = 50, k: int = 15, seed: int = 0):
        self.features = _LogNormHVG(n_top_genes)
        self.n_comps, self.k, self.seed = n_comps, k, seed

    def fit(self, train, label_key, *, layer=None, batch_key=None):
        from sklearn.decomposition import PCA
        from sklearn.neighbors import KNeighborsClassifier

        x = self.features.fit_transform(train, layer)
        self.layer = layer
        self.pca = PCA(n_components=min(self.n_comps, x.shape[0] - 1, x.shape[1]), random_state=self.seed)
        z = self.pca.fit_transform(x)
        self.model = KNeighborsClassifier(n_neighbors=min(self.k, len(z)), weights="distance")
        self.model.fit(z, train.obs[label_key].astype(str).to_numpy())

    def predict(self, test):
        z = self.pca.transform(self.features.transform(test, self.layer))
        proba = self.model.predict_proba(z)
        classes = list(self.model.classes_)
        return Prediction(np.asarray(classes)[proba.argmax(1)], proba, classes, z.astype(np.float32))


class _SklearnOnHVG:
    """A scikit-learn classifier on the logistic regression's features (log-normalised, scaled HVGs):
    the same preprocessing step (``features``) and a fitted estimator (``model``), as LogRegAnnotator."""

    def __init__(self, n_top_genes: int, seed: int):
        self.features = _LogNormHVG(n_top_genes)
        self.seed = seed

    def fit(self, train, label_key, *, layer=None, batch_key=None):
        x = self.features.fit_transform(train, layer)
        self.layer = layer
        self.model = self._estimator()
        self.model.fit(x, train.obs[label_key].astype(str).to_numpy())

    def predict(self, test):
        x = self.features.transform(test, self.layer)
        classes = list(self.model.classes_)
        if hasattr(self.model, "predict_proba"):
            proba = self.model.predict_proba(x)
            return Prediction(np.asarray(classes)[proba.argmax(1)], proba, classes, None)
        return Prediction(np.asarray(self.model.predict(x)).astype(str), None, classes, None)


class RandomForestAnnotator(_SklearnOnHVG):
    """Random forest on the logistic regression's features (seed 004's other baseline)."""

    name = "rf"

    def __init__(self, n_top_genes: int = 2000, n_estimators: int = 300, max_features: str | float = "sqrt",
                 seed: int = 0):
        super().__init__(n_top_genes, seed)
        self.n_estimators, self.max_features = n_estimators, max_features

    def _estimator(self):
        from sklearn.ensemble import RandomForestClassifier

        # one job: the forest is seeded, and threads would compete with the other models' timings
        return RandomForestClassifier(n_estimators=self.n_estimators, max_features=self.max_features,
                                      random_state=self.seed, n_jobs=1)


class LinearSVMAnnotator(_SklearnOnHVG):
    """Linear support-vector machine (one-vs-rest, squared hinge) on the logistic regression's
    features. It gives labels, not probabilities (``Prediction.proba`` is None). C = 0.001: a thousand
    standardised genes and a few hundred cells want strong regularisation; the choice of
    ``benchmarks/sweep_annotation_recipe.py`` among 0.001 to 1."""

    name = "svm"

    def __init__(self, n_top_genes: int = 2000, C: float = 0.001, max_iter: int = 5000, seed: int = 0):
        super().__init__(n_top_genes, seed)
        self.C, self.max_iter = C, max_iter

    def _estimator(self):
        from sklearn.svm import LinearSVC

        return LinearSVC(C=self.C, max_iter=self.max_iter, random_state=self.seed)


register_annotator("logreg", LogRegAnnotator)
register_annotator("knn", KNNAnnotator)
register_annotator("rf", RandomForestAnnotator)
register_annotator("svm", LinearSVMAnnotator)
#: the annotators that need no torch: fast, deterministic, share the HVG features
BASELINES = ("logreg", "knn", "rf", "svm")


def _lazy(module: str, cls: str) -> Callable[..., Annotator]:
    """A factory importing the model only when used (torch models are heavy to import)."""
    import importlib

    def factory(**kw):
        return getattr(importlib.import_module(module), cls)(**kw)

    factory.load = lambda path, **kw: getattr(importlib.import_module(module), cls).load(path, **kw)
    return factory


register_annotator("scgpt", _lazy("biogen.models.scgpt.annotator", "ScGPTAnnotator"))
register_annotator("scbert", _lazy("biogen.models.scbert.annotator", "ScBERTAnnotator"))


# ------------------------------------------------------------------------------- filters, split


def check_label_key(adata, key: str, what: str = "label_key") -> None:
    if key not in adata.obs.columns:
        raise KeyError(f"{what} {key!r} is not a column of adata.obs; available columns: "
                       + ", ".join(map(str, adata.obs.columns)))


def filter_cells(adata, config: BenchmarkConfig) -> tuple[np.ndarray, list[str]]:
    """Boolean mask of the cells kept by the thesis's filters, and a note per filter applied."""
    labels = adata.obs[config.label_key].astype(str)
    keep = np.ones(adata.n_obs, dtype=bool)
    notes = []
    if config.subset:
        for col, values in config.subset.items():
            check_label_key(adata, col, "subset column")
            m = adata.obs[col].astype(str).isin([str(v) for v in values]).to_numpy()
            notes.append(f"subset {col} in {list(values)}: kept {int((keep & m).sum())} of {int(keep.sum())} cells")
            keep &= m
    if config.drop_labels:
        m = ~labels.isin(config.drop_labels).to_numpy()
        notes.append(f"dropped labels {list(config.drop_labels)}: {int((keep & ~m).sum())} cells")
        keep &= m
    if config.keep_labels is not None:
        m = labels.isin(config.keep_labels).to_numpy()
        notes.append(f"kept labels {list(config.keep_labels)}: dropped {int((keep & ~m).sum())} cells")
        keep &= m
    if config.min_cells_per_class:
        counts = labels[keep].value_counts()
        small = counts[counts < config.min_cells_per_class].index.tolist()
        if small:
            m = ~labels.isin(small).to_numpy()
            notes.append(f"dropped classes with < {config.min_cells_per_class} cells: {small}")
            keep &= m
    return keep, notes


def split_cells(obs: pd.DataFrame, config: BenchmarkConfig, *, shuffle_donors: bool = False
                ) -> tuple[np.ndarray, list[str]]:
    """'train' / 'test' per cell, and warnings (e.g. classes present only in the test split).

    With a donor key the reference takes whole donors until it holds ``1 - test_size`` of the cells:
    the largest donors first (the thesis's one split), or with ``shuffle_donors`` in an order drawn
    from ``config.seed`` (a different donor-grouped split per seed, for repeated benchmarks).
    """
    n = len(obs)
    labels = obs[config.label_key].astype(str).to_numpy()
    rng = np.random.default_rng(config.seed)
    notes: list[str] = []
    if config.donor_key:
        donors = obs[config.donor_key].astype(str)
        sizes = donors.value_counts()
        if len(sizes) < 2:
            raise ValueError(f"donor_key {config.donor_key!r} has only one donor: a donor split needs two or more")
        # the thesis: donors with the most cells form the reference until it holds 1 - test_size
        order = sorted(sizes.index, key=lambda d: (-sizes[d], d))
        if shuffle_donors:
            order = list(rng.permutation(sorted(sizes.index)))
        train_donors, total = [], 0
        for d in order[:-1]:  # at least one donor stays in the test split
            if total >= (1 - config.test_size) * n:
                break
            train_donors.append(d)
            total += sizes[d]
        split = np.where(donors.isin(train_donors), "train", "test")
    else:
        from sklearn.model_selection import train_test_split

        idx = np.arange(n)
        counts = pd.Series(labels).value_counts()
        rare = counts[counts < 2].index
        strat_idx = idx[~np.isin(labels, rare)]
        tr, te = train_test_split(strat_idx, test_size=config.test_size, random_state=config.seed,
                                  stratify=labels[strat_idx])
        split = np.full(n, "test", dtype=object)
        split[tr] = "train"
        split[idx[np.isin(labels, rare)]] = "train"
        if len(rare):
            notes.append(f"classes with a single cell kept in the reference only: {list(rare)}")
    split = np.asarray(split, dtype=object)
    only_test = sorted(set(labels[split == "test"]) - set(labels[split == "train"]))
    if only_test:
        msg = (f"classes present only in the test split (no model can predict them; they count as errors): "
               f"{only_test}")
        warnings.warn(msg)
        notes.append(msg)
    return split, notes


# ----------------------------------------------------------------------------------- measuring


class PeakMemory:
    """Peak resident memory growth (MB) during a block, sampled every 5 ms from /proc/self/statm.

    Where /proc is unavailable it falls back to the growth of ru_maxrss (a lower bound).
    """

    def __enter__(self):
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
        self.start = self._rss()
        self.peak = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _rss(self) -> float:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * self._page / 2**20
        except OSError:
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def _run(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())
        self.mb = max(0.0, self.peak - self.start)


def classification_metrics(y_true, y_pred) -> tuple[dict, pd.DataFrame, pd.DataFrame]:
    """Accuracy, macro/weighted precision-recall-F1, per-class report and confusion matrix.

    Labels are the union of true and predicted labels; classes never predicted count as 0 precision.
    """
    from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

    y_true, y_pred = np.asarray(y_true, str), np.asarray(y_pred, str)
    labels = sorted(set(y_true) | set(y_pred))
    out = {"accuracy": accuracy_score(y_true, y_pred)}
    for avg in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, labels=sorted(set(y_true)), average=avg,
                                                     zero_division=0)
        out.update({f"precision_{avg}": p, f"recall_{avg}": r, f"f1_{avg}": f})
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    per_class = pd.DataFrame({"label": labels, "precision": p, "recall": r, "f1": f, "support": s})
    cm = pd.DataFrame(confusion_matrix(y_true, y_pred, labels=labels), index=labels, columns=labels)
    return out, per_class, cm


# ------------------------------------------------------------------------------------------ plots


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    fig.savefig(path, dpi=110, bbox_inches="tight")
    _plt().close(fig)


def plot_confusion(cm: pd.DataFrame, title: str, path: Path) -> None:
    plt = _plt()
    norm = cm.to_numpy().astype(float)
    norm = norm / np.clip(norm.sum(1, keepdims=True), 1, None)
    n = len(cm)
    fig, ax = plt.subplots(figsize=(1.2 + 0.5 * n, 1.0 + 0.45 * n))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), cm.columns, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(n), cm.index, fontsize=8)
    for i in range(n):
        for j in range(n):
            if cm.iat[i, j]:
                ax.text(j, i, f"{norm[i, j]:.2f}", ha="center", va="center", fontsize=6,
                        color="white" if norm[i, j] > 0.5 else "black")
    ax.set(xlabel="predicted", ylabel="true", title=f"{title} (row-normalised)")
    fig.colorbar(im, ax=ax, fraction=0.04)
    _save(fig, path)


def _scatter_cat(ax, xy, labels, title, palette):
    for lab in sorted(set(labels)):
        m = labels == lab
        ax.scatter(xy[m, 0], xy[m, 1], s=6, color=palette.get(lab, "lightgray"), label=lab, linewidths=0)
    ax.set(title=title, xticks=[], yticks=[])


def plot_umaps(xy: np.ndarray, y_true: np.ndarray, preds: dict[str, np.ndarray], out: Path) -> None:
    plt = _plt()
    cats = sorted(set(y_true) | {p for v in preds.values() for p in v})
    cmap = plt.get_cmap("tab20")
    palette = {c: cmap(i % 20) for i, c in enumerate(cats)}
    n = 1 + len(preds)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 4.2), squeeze=False)
    _scatter_cat(axes[0, 0], xy, y_true, "true labels", palette)
    for ax, (name, p) in zip(axes[0, 1:], preds.items()):
        _scatter_cat(ax, xy, p, f"{name}: predicted", palette)
    handles = [plt.Line2D([], [], marker="o", ls="", color=palette[c], label=c) for c in cats]
    fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False)
    _save(fig, out / "umap_labels.png")
    fig, axes = plt.subplots(1, len(preds), figsize=(4.2 * len(preds), 4.2), squeeze=False)
    for ax, (name, p) in zip(axes[0], preds.items()):
        ok = p == y_true
        ax.scatter(xy[ok, 0], xy[ok, 1], s=6, color="tab:green", label="correct", linewidths=0)
        ax.scatter(xy[~ok, 0], xy[~ok, 1], s=8, color="tab:red", label="wrong", linewidths=0)
        ax.set(title=f"{name}: {ok.mean():.1%} correct", xticks=[], yticks=[])
    axes[0, -1].legend(loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    _save(fig, out / "umap_correct.png")


def plot_model_bars(metrics: pd.DataFrame, path: Path) -> None:
    plt = _plt()
    cols = ["accuracy", "precision_macro", "recall_macro", "f1_macro", "f1_weighted"]
    fig, ax = plt.subplots(figsize=(1.5 + 1.6 * len(cols), 3.6))
    w = 0.8 / len(metrics)
    for i, (_, row) in enumerate(metrics.iterrows()):
        ax.bar(np.arange(len(cols)) + i * w, [row[c] for c in cols], w, label=row["model"])
    ax.set_xticks(np.arange(len(cols)) + 0.4 - w / 2, cols)
    ax.set(ylim=(0, 1), title="annotation quality on the held-out split")
    ax.legend(frameon=False, fontsize=8)
    _save(fig, path)


def _umap_coords(test, layer, seed) -> np.ndarray:
    import scanpy as sc

    from .preprocess import preprocess

    work = preprocess(test, layer=layer, n_top_genes=min(2000, test.n_vars) if test.n_vars > 2000 else None,
                      hvg_flavor="cell_ranger")
    sc.pp.pca(work, n_comps=min(30, work.n_obs - 1, work.n_vars - 1), random_state=seed)
    sc.pp.neighbors(work, n_neighbors=min(15, work.n_obs - 1), random_state=seed)
    sc.tl.umap(work, random_state=seed)
    return np.asarray(work.obsm["X_umap"])


# ------------------------------------------------------------------------------------- the run

#: metrics summarised over repeats (mean, sd, 95 % interval) in summary.csv
SUMMARY_METRICS = ("accuracy", "precision_macro", "recall_macro", "f1_macro", "f1_weighted", "cells_per_s",
                   "train_s", "peak_mem_mb")
#: metrics on which models are compared pair by pair over the shared splits
COMPARED_METRICS = ("f1_macro", "accuracy")


@dataclass
class BenchmarkResult:
    metrics: pd.DataFrame  # one row per model and repeat
    per_class: pd.DataFrame
    split: pd.DataFrame  # column "split" (repeat 0) and "split_<r>" for each further repeat
    notes: list[str]
    out_dir: Optional[Path]
    summary: Optional[pd.DataFrame] = None  # repeats >= 2: model, metric, n, mean, std, ci_low, ci_high
    comparisons: Optional[pd.DataFrame] = None  # repeats >= 2: one row per metric and pair of models
    run_info: dict = field(default_factory=dict)


def _md_table(df: pd.DataFrame, digits: int = 4) -> str:
    """A GitHub markdown table (pandas' to_markdown needs the optional tabulate package)."""
    fmt = lambda v: f"{v:.{digits}f}" if isinstance(v, (float, np.floating)) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def _test_train_ratio(metrics: pd.DataFrame) -> float:
    return float((metrics["n_test"] / metrics["n_train"]).mean())


def summarise_repeats(metrics: pd.DataFrame, level: float = 0.95) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``summary`` (per model and metric: n, mean, std, interval) and ``comparisons`` (per compared
    metric and pair of models: win rate, mean difference with its interval, corrected resampled
    paired t-test, Wilcoxon signed-rank, Holm-adjusted p, significance) from per-repeat ``metrics``.

    Intervals and the t-test use Nadeau & Bengio's correction for overlapping training sets
    (:mod:`biogen.metrics.paired`) with the mean test/train size ratio of the splits.
    """
    from ..metrics.paired import compare_all, mean_interval

    ratio = _test_train_ratio(metrics)
    models = list(dict.fromkeys(metrics["model"]))
    rows = []
    for name in models:
        m = metrics[metrics["model"] == name].sort_values("repeat")
        for col in SUMMARY_METRICS:
            iv = mean_interval(m[col].to_numpy(), level=level, test_train_ratio=ratio)
            rows.append({"model": name, "metric": col, "n": iv.n, "mean": iv.mean, "std": iv.std,
                         "ci_low": iv.ci_low, "ci_high": iv.ci_high})
    comps = []
    for col in COMPARED_METRICS:
        wide = metrics.pivot(index="repeat", columns="model", values=col)
        for c in compare_all({n: wide[n].to_numpy() for n in models}, level=level, test_train_ratio=ratio):
            comps.append({"metric": col, **c.as_dict()})
    return pd.DataFrame(rows), pd.DataFrame(comps)


def plot_repeats(metrics: pd.DataFrame, summary: pd.DataFrame, path: Path, metric: str = "f1_macro") -> None:
    """Per-repeat ``metric`` per model, one grey line per split (the pairing), mean with its interval."""
    plt = _plt()
    models = list(dict.fromkeys(metrics["model"]))
    wide = metrics.pivot(index="repeat", columns="model", values=metric)[models]
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(models), 3.8))
    x = np.arange(len(models))
    for _, row in wide.iterrows():
        ax.plot(x, row.to_numpy(), color="0.75", lw=0.8, zorder=1)
    for i, name in enumerate(models):
        ax.scatter(np.full(len(wide), i), wide[name], s=18, zorder=2)
        s = summary[(summary["model"] == name) & (summary["metric"] == metric)].iloc[0]
        ax.errorbar(i + 0.18, s["mean"], yerr=[[s["mean"] - s["ci_low"]], [s["ci_high"] - s["mean"]]], fmt="D",
                    color="black", ms=5, capsize=3, zorder=3)
    ax.set_xticks(x, models)
    ax.set(ylabel=metric.replace("_", " "), ylim=(0, 1),
           title=f"{metric} per split ({len(wide)} repeats; lines join the same split; diamond: mean, 95 % CI)")
    ax.title.set_fontsize(9)
    _save(fig, path)


def _report(metrics: pd.DataFrame, notes: list[str], config: BenchmarkConfig, n_cells: int, n_classes: int,
            repeats: int, summary: Optional[pd.DataFrame], comparisons: Optional[pd.DataFrame],
            run_md: str) -> str:
    split_desc = ((f"by donor (`{config.donor_key}`, "
                   + ("a random donor order per seed" if repeats > 1 else "donors with most cells to the reference")
                   + ")") if config.donor_key else f"stratified, {config.test_size:.0%} held out")
    lines = ["# Cell annotation benchmark", "",
             f"Label `{config.label_key}`: {n_cells} cells after filtering, {n_classes} classes; split {split_desc}; "
             + (f"{repeats} repeats with seeds {config.seed}..{config.seed + repeats - 1} (each seed draws the "
                "split and seeds the models; every model sees the same splits)." if repeats > 1
                else f"seed {config.seed}."), ""]
    if summary is None:
        show = metrics[["model", "accuracy", "precision_macro", "recall_macro", "f1_macro", "f1_weighted",
                        "cells_per_s", "train_s", "peak_mem_mb"]]
        best = metrics.loc[metrics["f1_macro"].idxmax(), "model"]
        lines += [_md_table(show), "", f"Best macro F1: **{best}** (one split: differences of a few points are "
                  "within split-to-split noise; use `--repeats` to test them).", ""]
    else:
        wide = summary.set_index(["model", "metric"])
        rows = []
        for name in dict.fromkeys(metrics["model"]):
            r = {"model": name}
            for col in ("accuracy", "f1_macro", "f1_weighted"):
                s = wide.loc[(name, col)]
                r[col] = f"{s['mean']:.3f} ± {s['std']:.3f} [{s['ci_low']:.3f}, {s['ci_high']:.3f}]"
            r["train_s"] = f"{wide.loc[(name, 'train_s')]['mean']:.1f}"
            r["cells_per_s"] = f"{wide.loc[(name, 'cells_per_s')]['mean']:.0f}"
            rows.append(r)
        lines += ["Mean ± standard deviation over the repeats [95 % interval of the mean]:", "",
                  _md_table(pd.DataFrame(rows)), "",
                  "## Paired comparisons (macro F1)", "",
                  "Each pair of models on the same splits: win rate of the first, mean difference (first − second) "
                  "with its 95 % interval, the corrected resampled paired t-test (Nadeau & Bengio 2003: the variance "
                  "of the differences is inflated by 1/N + n_test/n_train because the splits' training sets "
                  "overlap), its p-value adjusted over all pairs (Holm), and the uncorrected Wilcoxon signed-rank "
                  "p-value as a distribution-free check"
                  + (" (with N ≤ 5 repeats it cannot go below 0.05)" if repeats <= 5 else "") + ". Significant: "
                  "Holm-adjusted t-test p < 0.05.", ""]
        f1 = comparisons[comparisons["metric"] == "f1_macro"]
        show = pd.DataFrame({
            "pair": f1["a"] + " vs " + f1["b"], "win rate": f1["win_rate"].map(lambda v: f"{v:.2f}"),
            "mean diff [95 % CI]": [f"{m:+.3f} [{lo:+.3f}, {hi:+.3f}]" for m, lo, hi in
                                    zip(f1["mean_diff"], f1["ci_low"], f1["ci_high"])],
            "p (t, corrected)": f1["p_ttest"].map(lambda v: f"{v:.3g}"),
            "p (Holm)": f1["p_holm"].map(lambda v: f"{v:.3g}"),
            "p (Wilcoxon)": f1["p_wilcoxon"].map(lambda v: f"{v:.3g}"),
            "significant": f1["significant"].map({True: "**yes**", False: "no"})})
        lines += [_md_table(show), ""]
        sig = f1[f1["significant"]]
        if len(sig):
            lines += ["Significant differences in macro F1:", ""]
            lines += [f"- **{(r.a if r.mean_diff > 0 else r.b)}** beats {(r.b if r.mean_diff > 0 else r.a)} by "
                      f"{abs(r.mean_diff):.3f} (Holm p = {r.p_holm:.3g})" for r in sig.itertuples()]
        else:
            lines.append(f"No difference in macro F1 is significant over these {repeats} repeats.")
        lines += ["", "![macro F1 per repeat](f1_repeats.png)", ""]
    base = [m for m in dict.fromkeys(metrics["model"]) if m in BASELINES]
    if base and summary is None:
        b = metrics[metrics["model"].isin(base)]
        b = b.loc[b["f1_macro"].idxmax()]
        for _, row in metrics[~metrics["model"].isin(BASELINES)].iterrows():
            verdict = "beats" if row["f1_macro"] > b["f1_macro"] else "does NOT beat"
            lines.append(f"- {row['model']} {verdict} the best baseline ({b['model']}) on macro F1: "
                         f"{row['f1_macro']:.4f} vs {b['f1_macro']:.4f}.")
    lines += ["", "## Run", "", run_md]
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes]
    first = " (the first repeat's split)" if repeats > 1 else ""
    lines += ["", f"## Plots{first}", "", "![models](models.png)", "", "![UMAP labels](umap_labels.png)", "",
              "![UMAP correct](umap_correct.png)", ""]
    lines += [f"![{m}](confusion_{m}.png)" for m in dict.fromkeys(metrics["model"])]
    lines += ["", "## For context: the thesis's numbers (TCCA, 19 classes, 1.48M / 356k cells)", "",
              _md_table(THESIS_RESULTS), "",
              "scGPT annotated 18,621 cells in 6.9 s on a GPU; Azimuth ~10,000 cells/min. These come from "
              "a different data set and hardware and are not comparable number for number.", ""]
    return "\n".join(lines)


def _fit_predict(name: str, config: BenchmarkConfig, train, test, progress: bool) -> tuple[dict, Prediction]:
    opts = dict(config.model_options.get(name, {}))
    if name in BASELINES:
        opts.setdefault("n_top_genes", config.n_top_genes)
    else:
        opts.setdefault("progress", progress)
    opts.setdefault("seed", config.seed)
    model = ANNOTATORS[name](**opts)
    with PeakMemory() as mem_fit:
        t0 = time.perf_counter()
        model.fit(train, config.label_key, layer=config.layer, batch_key=config.batch_key)
        train_s = time.perf_counter() - t0
    with PeakMemory() as mem_pred:
        t0 = time.perf_counter()
        pred = model.predict(test)
        predict_s = time.perf_counter() - t0
    return {"cells_per_s": test.n_obs / max(predict_s, 1e-9), "train_s": train_s, "predict_s": predict_s,
            "peak_mem_mb": max(mem_fit.mb, mem_pred.mb), "n_train": train.n_obs, "n_test": test.n_obs}, pred


def run_benchmark(adata, config: BenchmarkConfig, out_dir: Optional[str | Path] = None, *, repeats: int = 1,
                  overwrite: bool = False, progress: bool = True) -> BenchmarkResult:
    """Filter, split, fit and evaluate every selected annotator; write the outputs to ``out_dir``.

    With ``repeats`` N >= 2 the whole protocol runs N times with seeds ``config.seed + r``: each
    seed draws a new split (stratified, or donor-grouped with a random donor order when a donor key
    is given) and seeds the models; every model sees the same N splits, so the models are compared
    pair by pair over them (:func:`summarise_repeats`).

    Everything is checked before any model trains; the output folder is written as a whole (a
    temporary sibling renamed into place), so a failure never leaves a half-written folder over a
    previous one.

    Outputs: ``metrics.csv`` (one row per model and repeat: ``model, repeat, seed, accuracy,
    precision_macro, recall_macro, f1_macro, f1_weighted, cells_per_s, train_s, peak_mem_mb`` and more),
    ``per_class.csv``, ``split.csv``, ``run.json`` (seed, hardware, threads, versions, wall time, peak
    memory); with N >= 2 also ``summary.csv`` (mean, std, 95 % interval per model and metric),
    ``comparisons.csv`` (paired comparisons) and ``f1_repeats.png``; for the first split:
    ``confusion_<model>.png``, ``umap_labels.png``, ``umap_correct.png``, ``models.png``,
    ``predictions.h5ad`` (test cells; ``obs["<model>_pred"]``, ``obsm["<model>_proba"]``,
    ``obsm["X_<model>"]``); and ``report.md``.
    """
    import json
    from dataclasses import replace

    from tqdm.auto import tqdm

    from ..metrics.run_record import RunRecord
    from .preprocess import check_counts

    if isinstance(repeats, bool) or not isinstance(repeats, (int, np.integer)) or repeats < 1:
        raise ValueError(f"repeats must be an integer >= 1, got {repeats!r}")
    check_label_key(adata, config.label_key)
    for key, what in ((config.donor_key, "donor_key"), (config.batch_key, "batch_key")):
        if key is not None:
            check_label_key(adata, key, what)
    check_counts(adata, layer=config.layer)
    out_dir = Path(out_dir) if out_dir is not None else None
    if out_dir is not None and out_dir.exists():
        if not out_dir.is_dir():
            raise FileExistsError(f"output path {out_dir} exists and is not a folder")
        if any(out_dir.iterdir()) and not overwrite:
            raise FileExistsError(f"output folder {out_dir} is not empty; choose another or pass overwrite")
    keep, notes = filter_cells(adata, config)
    data = adata[keep].copy() if not adata.isbacked else adata[keep].to_memory()
    labels = data.obs[config.label_key].astype(str).to_numpy()
    n_classes = len(set(labels))
    if data.n_obs == 0:
        raise ValueError("no cells left after filtering")
    if n_classes < 2:
        raise ValueError(f"label {config.label_key!r} has {n_classes} class after filtering; annotation needs two or more")
    split_df = pd.DataFrame({"cell": data.obs_names, "label": labels})
    if config.donor_key:
        split_df["donor"] = data.obs[config.donor_key].astype(str).to_numpy()
    rows, per_class_rows, preds, cms = [], [], {}, {}
    with RunRecord(seed=config.seed, repeats=repeats) as record:
        for r in range(repeats):
            cfg = replace(config, seed=config.seed + r)
            split, split_notes = split_cells(data.obs, cfg, shuffle_donors=repeats > 1)
            notes += [f"repeat {r}: {n}" for n in split_notes] if repeats > 1 else split_notes
            split_df["split" if r == 0 else f"split_{r}"] = split
            train, test = data[split == "train"].copy(), data[split == "test"].copy()
            y_true = test.obs[config.label_key].astype(str).to_numpy()
            desc = f"repeat {r + 1}/{repeats}" if repeats > 1 else "models"
            for name in tqdm(config.models, desc=desc, disable=not progress):
                cost, pred = _fit_predict(name, cfg, train, test, progress)
                m, per_class, cm = classification_metrics(y_true, pred.labels)
                rows.append({"model": name, "repeat": r, "seed": cfg.seed, **m, **cost})
                per_class_rows.append(per_class.assign(model=name, repeat=r))
                if r:
                    continue
                # the first split keeps everything for the confusion matrices, UMAPs and predictions
                preds[name], cms[name] = pred, cm
                test.obs[f"{name}_pred"] = pd.Categorical(pred.labels)
                if pred.proba is not None:
                    test.obsm[f"{name}_proba"] = np.asarray(pred.proba, np.float32)
                    test.uns[f"{name}_proba_classes"] = list(pred.classes)
                if pred.embedding is not None:
                    test.obsm[f"X_{name}"] = np.asarray(pred.embedding, np.float32)
            if r == 0:
                test0, y_true0 = test, y_true
    metrics = pd.DataFrame(rows, columns=METRIC_COLUMNS)
    per_class = pd.concat(per_class_rows, ignore_index=True)[["model", "repeat", "label", "precision", "recall",
                                                              "f1", "support"]]
    summary = comparisons = None
    if repeats > 1:
        summary, comparisons = summarise_repeats(metrics)
    run_info = record.as_dict()
    result = BenchmarkResult(metrics, per_class, split_df, notes, out_dir, summary, comparisons, run_info)
    if out_dir is None:
        return result

    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        metrics.to_csv(tmp / "metrics.csv", index=False)
        per_class.to_csv(tmp / "per_class.csv", index=False)
        split_df.to_csv(tmp / "split.csv", index=False)
        if summary is not None:
            summary.to_csv(tmp / "summary.csv", index=False)
            comparisons.to_csv(tmp / "comparisons.csv", index=False)
            plot_repeats(metrics, summary, tmp / "f1_repeats.png")
        for name, cm in cms.items():
            plot_confusion(cm, name, tmp / f"confusion_{name}.png")
        try:
            xy = _umap_coords(test0, config.layer, config.seed)
            test0.obsm["X_umap"] = xy
            plot_umaps(xy, y_true0, {n: p.labels for n, p in preds.items()}, tmp)
        except Exception as exc:  # UMAP needs enough cells; the metrics stand without it
            notes.append(f"UMAP skipped: {type(exc).__name__}: {exc}")
        plot_model_bars(metrics[metrics["repeat"] == 0], tmp / "models.png")
        test0.uns["biogen_benchmark"] = {k: (str(v) if v is not None else "") for k, v in asdict(config).items()}
        test0.write_h5ad(tmp / "predictions.h5ad")
        run_info = result.run_info = record.as_dict()  # wall time and peak memory now, outputs included
        (tmp / "run.json").write_text(json.dumps(run_info, indent=1))
        (tmp / "report.md").write_text(_report(metrics, notes, config, data.n_obs, n_classes, repeats, summary,
                                               comparisons, record.markdown()))
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
        if out_dir.exists():
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return result
