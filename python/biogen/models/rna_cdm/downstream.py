"""Does synthetic pretraining help? A downstream test of RNA-CDM's generated tiles (seed claim).

A small CNN (:class:`biogen.metrics.generative.DomainCNN`) classifies tiles by a simulator label
(cancer type or dominant cell type of the sample), in three arms:

- ``scratch``: trained from a random initialisation on the real training tiles;
- ``pretrained``: trained on the generated tiles, then fine-tuned on the same real training tiles;
- ``synthetic``: trained on the generated tiles only (no real tile at all).

All arms are scored on the same k folds of real tiles, grouped by sample (a sample's tiles never
sit on both sides) and stratified by label. Within a fold, a fraction f of the training *samples*
is kept (10 %, 25 %, 100 % ...; nested: the 10 % subset lies inside the 25 % one; at least one sample
per class); the scratch and pretrained arms see the same subset, the synthetic arm none. Fold f's
pretrained network is the synthetic arm's network of that fold, so the arms differ only in what
they train on. Per arm and fraction: accuracy and macro F1 mean, sd and 95 % interval over the
folds, and paired comparisons over the same folds (:mod:`biogen.metrics.paired`, corrected for the
folds' overlapping training sets with n_test / n_train = 1 / (k - 1)).

Generated tiles must not come from samples whose real tiles are scored: the demo generates from
the cascade's training samples and scores real tiles of freshly simulated samples.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

__all__ = ["DownstreamConfig", "DownstreamResult", "make_folds", "nested_fractions", "evaluate_downstream",
           "plot_downstream", "downstream_markdown", "run_downstream", "simulator_labels", "ARMS"]

ARMS = ("scratch", "pretrained", "synthetic")


@dataclass
class DownstreamConfig:
    """folds: k of the cross-validation on real tiles; fractions: shares of each fold's training
    samples given to the real-data arms; epochs: training epochs on real tiles (scratch and
    fine-tuning); pretrain_epochs: epochs on generated tiles; width: the CNN's first conv width."""

    folds: int = 5
    fractions: tuple[float, ...] = (0.1, 0.25, 1.0)
    epochs: int = 15
    pretrain_epochs: int = 15
    batch_size: int = 32
    lr: float = 1e-3
    finetune_lr: Optional[float] = None  # None: lr
    width: int = 16
    seed: int = 0

    def __post_init__(self):
        if self.folds < 2:
            raise ValueError(f"folds must be >= 2, got {self.folds}")
        if not self.fractions or any(not 0 < f <= 1 for f in self.fractions):
            raise ValueError(f"fractions must be in (0, 1], got {self.fractions}")
        self.fractions = tuple(sorted(float(f) for f in self.fractions))
        for name in ("epochs", "pretrain_epochs", "batch_size", "width"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or (self.finetune_lr is not None and self.finetune_lr <= 0):
            raise ValueError("learning rates must be > 0")


@dataclass
class DownstreamResult:
    scores: list[dict]  # one row per fold, fraction and arm: accuracy, f1_macro, n_real_samples, n_real_tiles
    summary: list[dict]  # per arm and fraction: metric, mean, std, ci_low, ci_high
    comparisons: list[dict]  # per fraction and metric: paired comparisons between the arms
    folds: list[dict] = field(default_factory=list)  # per fold: test tile indices, training sample ids per fraction
    classes: list[str] = field(default_factory=list)
    config: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


def simulator_labels(adata, kind: str = "cancer_type") -> np.ndarray:
    """Per-sample class names: ``"cancer_type"`` (``obs["cancer_type"]``) or ``"dominant_cell_type"``
    (the largest of the simulator's true fractions, ``obsm["fractions"]``, named by ``uns["cell_types"]``
    or :data:`~biogen.data.toy_tissue.CELL_TYPES`); any other obs column is taken as is."""
    from ...data.toy_tissue import CELL_TYPES

    if kind == "dominant_cell_type":
        if "fractions" not in adata.obsm:
            raise KeyError("dominant_cell_type needs the simulator's obsm['fractions']; "
                           f"this AnnData has obsm keys {list(adata.obsm.keys())}")
        names = list(adata.uns.get("cell_types", CELL_TYPES))
        return np.asarray(names, dtype=object)[np.asarray(adata.obsm["fractions"]).argmax(1)].astype(str)
    if kind not in adata.obs:
        raise KeyError(f"label {kind!r} is neither 'dominant_cell_type' nor an obs column "
                       f"(columns: {list(adata.obs.columns)})")
    return adata.obs[kind].astype(str).to_numpy()


def make_folds(groups: np.ndarray, labels: np.ndarray, k: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """k (train, test) tile index pairs: grouped by ``groups`` (sample id per tile), stratified by
    ``labels``; every tile is in exactly one test set."""
    from sklearn.model_selection import StratifiedGroupKFold

    groups, labels = np.asarray(groups), np.asarray(labels)
    n_groups = len(np.unique(groups))
    if n_groups < k:
        raise ValueError(f"{k}-fold cross-validation needs at least {k} samples, got {n_groups}")
    cv = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    return [(np.sort(tr), np.sort(te)) for tr, te in cv.split(np.zeros(len(labels)), labels, groups)]


def nested_fractions(train_idx: np.ndarray, groups: np.ndarray, labels: np.ndarray, fractions: Sequence[float],
                     seed: int) -> dict[float, np.ndarray]:
    """Tile indices of ``ceil(f * n)`` training samples per fraction f, nested (smaller inside larger).

    Samples are ordered once per fold: one sample of each class first (so every subset holds every
    class the fold's training set has), then the rest in a seeded random order."""
    rng = np.random.default_rng(seed)
    g = np.asarray(groups)[train_idx]
    samples = np.unique(g)
    lab = {s: np.asarray(labels)[train_idx][g == s][0] for s in samples}
    order = list(rng.permutation(samples))
    first = {}
    for s in order:
        first.setdefault(lab[s], s)
    order = list(first.values()) + [s for s in order if s not in set(first.values())]
    out = {}
    for f in fractions:
        n = max(len(first), int(np.ceil(f * len(order))))
        keep = set(order[:n])
        out[f] = train_idx[np.isin(g, list(keep))]
    return out


def _train(x: np.ndarray, y: np.ndarray, n_classes: int, *, epochs: int, lr: float, batch_size: int, seed: int,
           width: int, init: Optional[dict] = None):
    """A DomainCNN trained (Adam, cross-entropy) on x: (n, 3, S, S), y: (n,); from ``init`` if given."""
    import torch

    from ...metrics.generative import DomainCNN

    torch.manual_seed(seed)
    model = DomainCNN(x.shape[1], n_classes, width=width)
    if init is not None:
        model.load_state_dict(init)
    xt, yt = torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.int64)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(xt), generator=g)
        for i in range(0, len(xt), batch_size):
            b = perm[i:i + batch_size]
            loss = torch.nn.functional.cross_entropy(model(xt[b]), yt[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def _predict(model, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    import torch

    xt = torch.as_tensor(x, dtype=torch.float32)
    with torch.no_grad():
        return torch.cat([model(xt[i:i + batch_size]).argmax(1) for i in range(0, len(xt), batch_size)]).numpy()


def _scores(y: np.ndarray, p: np.ndarray, n_classes: int) -> dict:
    from sklearn.metrics import accuracy_score, f1_score

    return {"accuracy": float(accuracy_score(y, p)),
            "f1_macro": float(f1_score(y, p, labels=list(range(n_classes)), average="macro", zero_division=0))}


def _check_tiles(x, y, what: str) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x, np.float32), np.asarray(y)
    if x.ndim != 4 or len(x) != len(y) or len(x) == 0:
        raise ValueError(f"{what}: need tiles (n, channels, S, S) and n labels, got {x.shape} and {y.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{what} tiles contain NaN or inf")
    return x, y


def evaluate_downstream(real_tiles, real_labels, real_groups, synth_tiles, synth_labels,
                        config: Optional[DownstreamConfig] = None, *, synth_groups=None,
                        log: Optional[Callable[[str], None]] = None) -> DownstreamResult:
    """Run the three arms on the same folds of real tiles (see the module docstring).

    real_tiles: (n, 3, S, S) float in [-1, 1]; real_labels: (n,) class names; real_groups: (n,)
    sample id per tile; synth_tiles: (m, 3, S, S); synth_labels: (m,) class names (a subset of the
    real classes' names is fine; a class unknown to the real data is an error); synth_groups:
    optional (m,) id of the sample whose RNA conditioned each generated tile: a fold then pretrains
    only on tiles generated from samples outside its test set (no test sample's RNA leaks in).
    """
    from ...metrics.paired import compare_all, mean_interval

    cfg = config or DownstreamConfig()
    log = log or (lambda msg: None)
    xr, yr_names = _check_tiles(real_tiles, real_labels, "real")
    xs, ys_names = _check_tiles(synth_tiles, synth_labels, "generated")
    groups = np.asarray(real_groups)
    if len(groups) != len(xr):
        raise ValueError(f"real_groups has {len(groups)} entries for {len(xr)} tiles")
    sg = None if synth_groups is None else np.asarray(synth_groups)
    if sg is not None and len(sg) != len(xs):
        raise ValueError(f"synth_groups has {len(sg)} entries for {len(xs)} generated tiles")
    if xr.shape[1:] != xs.shape[1:]:
        raise ValueError(f"real tiles are {xr.shape[1:]} but generated tiles {xs.shape[1:]}: resize one set")
    classes = sorted(set(map(str, yr_names)))
    unknown = sorted(set(map(str, ys_names)) - set(classes))
    if unknown:
        raise ValueError(f"generated tiles carry labels absent from the real tiles: {unknown}")
    if len(classes) < 2:
        raise ValueError("the real tiles need at least two classes")
    code = {c: i for i, c in enumerate(classes)}
    yr = np.array([code[str(v)] for v in yr_names])
    ys = np.array([code[str(v)] for v in ys_names])
    k = len(classes)
    folds = make_folds(groups, yr, cfg.folds, cfg.seed)
    ft_lr = cfg.finetune_lr or cfg.lr
    scores, fold_info = [], []
    for f, (tr, te) in enumerate(folds):
        seed = cfg.seed + 1000 * f
        subsets = nested_fractions(tr, groups, yr, cfg.fractions, seed)
        fold_info.append({"fold": f, "test_index": te.tolist(),
                          "train_samples": {str(fr): sorted(map(str, np.unique(groups[ix])))
                                            for fr, ix in subsets.items()}})
        use = np.ones(len(xs), bool) if sg is None else ~np.isin(sg, groups[te])
        if not use.any():
            raise ValueError(f"fold {f}: every generated tile comes from a test sample of the fold")
        synth = _train(xs[use], ys[use], k, epochs=cfg.pretrain_epochs, lr=cfg.lr, batch_size=cfg.batch_size, seed=seed,
                       width=cfg.width)
        fold_info[-1]["n_generated_tiles"] = int(use.sum())
        init = {n: v.clone() for n, v in synth.state_dict().items()}
        syn_scores = _scores(yr[te], _predict(synth, xr[te]), k)
        for frac, ix in subsets.items():
            n_samples = len(np.unique(groups[ix]))
            row = {"fold": f, "fraction": frac, "n_real_samples": n_samples, "n_real_tiles": int(len(ix)),
                   "n_test_tiles": int(len(te))}
            scratch = _train(xr[ix], yr[ix], k, epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size,
                             seed=seed + 1, width=cfg.width)
            tuned = _train(xr[ix], yr[ix], k, epochs=cfg.epochs, lr=ft_lr, batch_size=cfg.batch_size,
                           seed=seed + 1, width=cfg.width, init=init)
            scores.append({**row, "arm": "scratch", **_scores(yr[te], _predict(scratch, xr[te]), k)})
            scores.append({**row, "arm": "pretrained", **_scores(yr[te], _predict(tuned, xr[te]), k)})
            scores.append({**row, "arm": "synthetic", **syn_scores, "n_real_samples": 0, "n_real_tiles": 0})
            log(f"fold {f + 1}/{cfg.folds}, {frac:.0%} of real training samples ({n_samples}): macro F1 "
                + ", ".join(f"{r['arm']} {r['f1_macro']:.3f}" for r in scores[-3:]))
    ratio = 1.0 / (cfg.folds - 1)
    summary, comparisons = [], []
    for frac in cfg.fractions:
        for metric in ("accuracy", "f1_macro"):
            per_arm = {a: np.array([r[metric] for r in scores if r["arm"] == a and r["fraction"] == frac])
                       for a in ARMS}
            for a, v in per_arm.items():
                iv = mean_interval(v, test_train_ratio=ratio)
                summary.append({"arm": a, "fraction": frac, "metric": metric, **asdict(iv)})
            for c in compare_all(per_arm, test_train_ratio=ratio):
                comparisons.append({"fraction": frac, "metric": metric, **c.as_dict()})
    return DownstreamResult(scores, summary, comparisons, fold_info, classes, asdict(cfg))


def plot_downstream(result: DownstreamResult, path: str | Path, metric: str = "f1_macro") -> None:
    """Mean ``metric`` (95 % interval) per arm against the real-data fraction, folds as faint dots."""
    from ...sc.benchmark import _plt, _save

    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.2, 3.8))
    fr = sorted({r["fraction"] for r in result.scores})
    for i, arm in enumerate(ARMS):
        s = [next(x for x in result.summary if x["arm"] == arm and x["fraction"] == f and x["metric"] == metric)
             for f in fr]
        mean = np.array([x["mean"] for x in s])
        err = np.array([[x["mean"] - x["ci_low"] for x in s], [x["ci_high"] - x["mean"] for x in s]])
        ax.errorbar(np.array(fr) * (1 + 0.03 * (i - 1)), mean, yerr=err, marker="o", capsize=3, label=arm)
        pts = [(r["fraction"] * (1 + 0.03 * (i - 1)), r[metric]) for r in result.scores if r["arm"] == arm]
        ax.scatter(*zip(*pts), s=8, alpha=0.3, color=ax.lines[-1].get_color())
    ax.set_xscale("log")
    ax.set_xticks(fr, [f"{f:.0%}" for f in fr])
    ax.set(xlabel="real training samples used (share of each fold's)", ylabel=metric.replace("_", " "),
           ylim=(0, 1), title=f"tile classifier, {len(result.folds)}-fold CV on real tiles (mean, 95 % CI)")
    ax.title.set_fontsize(9)
    ax.legend(frameon=False, fontsize=8, title="trained on", title_fontsize=8)
    _save(fig, Path(path))


def downstream_markdown(result: DownstreamResult) -> str:
    """The report section: the table per arm and fraction, and the paired comparisons (macro F1)."""
    from ...sc.benchmark import _md_table
    import pandas as pd

    s = pd.DataFrame(result.summary)
    rows = []
    for (frac, arm), g in s.groupby(["fraction", "arm"], sort=False):
        if arm == "synthetic" and frac != s["fraction"].min():
            continue  # uses no real tile: the same scores at every fraction
        r = {"real data": f"{frac:.0%}" if arm != "synthetic" else "none", "arm": arm}
        for _, x in g.iterrows():
            r[x["metric"]] = f"{x['mean']:.3f} ± {x['std']:.3f} [{x['ci_low']:.3f}, {x['ci_high']:.3f}]"
        rows.append(r)
    c = pd.DataFrame(result.comparisons)
    c = c[c["metric"] == "f1_macro"]
    comp = pd.DataFrame({
        "real data": c["fraction"].map(lambda v: f"{v:.0%}"), "pair": c["a"] + " vs " + c["b"],
        "win rate": c["win_rate"].map(lambda v: f"{v:.2f}"),
        "mean diff [95 % CI]": [f"{m:+.3f} [{lo:+.3f}, {hi:+.3f}]" for m, lo, hi in
                                zip(c["mean_diff"], c["ci_low"], c["ci_high"])],
        "p (t, corrected)": c["p_ttest"].map(lambda v: f"{v:.3g}"), "p (Holm)": c["p_holm"].map(lambda v: f"{v:.3g}"),
        "p (Wilcoxon)": c["p_wilcoxon"].map(lambda v: f"{v:.3g}"),
        "significant": c["significant"].map({True: "**yes**", False: "no"})})
    k = len(result.folds)
    return "\n".join([
        f"Tile classifier ({', '.join(result.classes)}) scored by {k}-fold cross-validation on real tiles, the same "
        "folds for every arm; mean ± sd over the folds [95 % interval]:", "",
        _md_table(pd.DataFrame(rows)), "",
        "Paired comparisons over the folds (macro F1; corrected resampled t-test with n_test/n_train = "
        f"1/{k - 1}, Holm-adjusted over the three pairs of each fraction; Wilcoxon signed-rank beside it):", "",
        _md_table(comp), "", "![downstream](downstream.png)", ""])


def run_downstream(model, z, labels, groups, real_tiles, real_labels, real_groups, out: str | Path,
                   config: Optional[DownstreamConfig] = None, *, per_sample: int = 2, steps: int = 25,
                   sr_steps: Optional[int] = None, guidance_scale: float = 3.0, seed: int = 0,
                   log: Optional[Callable[[str], None]] = None) -> dict:
    """Generate ``per_sample`` tiles for each latent of ``z: (n_samples, latent_dim)`` with the
    cascade ``model``, label them with ``labels: (n_samples,)``, run :func:`evaluate_downstream`
    against the real tiles (pretraining of each fold skips tiles generated from its test samples,
    matched through ``groups: (n_samples,)`` and ``real_groups``), and write ``downstream.png`` and
    ``downstream.md`` into ``out``. Returns the JSON-ready result (for ``metrics.json``)."""
    import time

    from .cli import evaluate_generated

    log = log or (lambda msg: None)
    t0 = time.perf_counter()
    log(f"downstream: generating {per_sample} tiles for each of {len(z)} samples")
    gen = evaluate_generated(model, z, None, tiles_per_sample=per_sample, steps=steps, sr_steps=sr_steps,
                             guidance_scale=guidance_scale, seed=seed)["tiles"]
    gen_s = time.perf_counter() - t0
    cfg = config or DownstreamConfig(seed=seed)
    res = evaluate_downstream(real_tiles, real_labels, real_groups, gen, np.repeat(np.asarray(labels), per_sample),
                              cfg, synth_groups=np.repeat(np.asarray(groups), per_sample), log=log)
    out = Path(out)
    plot_downstream(res, out / "downstream.png")
    (out / "downstream.md").write_text("# Does pretraining on generated tiles help?\n\n" + downstream_markdown(res))
    d = res.as_dict()
    d["seconds"] = {"generate": gen_s, "total": time.perf_counter() - t0}
    d["generated_tiles"] = int(len(gen))
    return d
