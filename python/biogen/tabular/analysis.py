"""The whole workflow: join -> check -> factor analysis -> L1 Poisson -> gradient boosting -> files.

Every output file is written to a temporary name in the output folder and renamed into place, so a
crash never leaves half a file; an existing non-empty output folder is refused unless
``overwrite=True`` (then only the files this analysis writes are replaced; nothing else is deleted).
"""

from __future__ import annotations

import io
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Union

import numpy as np
import pandas as pd

from .boosting import BoostingResult, fit_boosting
from .data import JoinReport, PreparedData, TabularInputError, join_sources, prepare_table
from .factors import FactorResult, fit_factors
from .penalized import L1PoissonResult, l1_poisson_cv

__all__ = ["AnalysisConfig", "AnalysisResult", "run_analysis", "check_output_dir"]


@dataclass(frozen=True)
class AnalysisConfig:
    """Settings of :func:`run_analysis` (validated on construction).

    outcome: count column. keys: key columns (join and grouping; the first groups CV/bootstrap).
    exposure: population-at-risk column (offset). factor_cols: index block to factor-analyse (its
    columns are replaced by the factor scores F1..Fk). n_factors: None = Kaiser rule.
    exclude: columns left out. impute: None or "median". rule: "1se" or "min" penalty choice.
    """

    outcome: str
    keys: tuple = ()
    exposure: Optional[str] = None
    factor_cols: tuple = ()
    n_factors: Optional[int] = None
    exclude: tuple = ()
    impute: Optional[str] = None
    rule: str = "1se"
    n_folds: int = 5
    n_bootstrap: int = 100
    top_k: int = 4
    strict_join: bool = False
    random_state: int = 0

    def __post_init__(self):
        for name in ("keys", "factor_cols", "exclude"):
            object.__setattr__(self, name, tuple(getattr(self, name) or ()))
        if not self.outcome:
            raise TabularInputError("outcome must be a column name")
        if self.impute not in (None, "median"):
            raise TabularInputError(f"impute must be None or 'median', got {self.impute!r}")
        if self.rule not in ("1se", "min"):
            raise TabularInputError(f"rule must be '1se' or 'min', got {self.rule!r}")
        if self.n_folds < 2:
            raise TabularInputError(f"n_folds must be >= 2, got {self.n_folds}")
        if self.n_bootstrap < 0:
            raise TabularInputError(f"n_bootstrap must be >= 0, got {self.n_bootstrap}")
        if self.top_k < 1:
            raise TabularInputError(f"top_k must be >= 1, got {self.top_k}")
        if self.n_factors is not None and self.n_factors < 1:
            raise TabularInputError(f"n_factors must be >= 1, got {self.n_factors}")
        if self.n_factors is not None and not self.factor_cols:
            raise TabularInputError("n_factors given without factor_cols (--factor-cols)")
        overlap = set(self.factor_cols) & ({self.outcome, self.exposure} | set(self.keys) | set(self.exclude))
        if overlap:
            raise TabularInputError(f"factor columns {sorted(map(str, overlap))} are also outcome/exposure/key/excluded")


@dataclass
class AnalysisResult:
    """Everything computed; ``files`` lists the paths written."""

    config: AnalysisConfig
    join: Optional[JoinReport]
    data: PreparedData
    factors: Optional[FactorResult]
    l1: L1PoissonResult
    boosting: BoostingResult
    files: list = field(default_factory=list)


def check_output_dir(out_dir: Union[str, Path], overwrite: bool) -> Path:
    """Refuse a non-empty existing folder unless ``overwrite``; refuse a path that is a file."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise TabularInputError(f"output path {str(out)!r} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise TabularInputError(f"output folder {str(out)!r} is not empty; pass --overwrite (overwrite=True) "
                                "to replace the files this analysis writes")
    return out


class _Writer:
    def __init__(self, out: Path):
        self.out = out
        self.files: list[Path] = []

    def bytes(self, name: str, data: bytes) -> Path:
        self.out.mkdir(parents=True, exist_ok=True)
        target = self.out / name
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=self.out)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, target)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        self.files.append(target)
        return target

    def csv(self, name: str, df: pd.DataFrame) -> Path:
        return self.bytes(name, df.to_csv(index=False).encode())

    def text(self, name: str, s: str) -> Path:
        return self.bytes(name, s.encode())

    def figure(self, name: str, fig) -> Path:
        import matplotlib.pyplot as plt

        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        return self.bytes(name, buf.getvalue())


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)  # headless: never needs a display
    import matplotlib.pyplot as plt

    return plt


def _scree_plot(fr: FactorResult):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    k = np.arange(1, len(fr.eigenvalues) + 1)
    ax.plot(k, fr.eigenvalues, "o-")
    ax.axhline(1.0, ls="--", c="grey", lw=1, label="Kaiser threshold")
    ax.axvline(fr.loadings.shape[1] + 0.5, ls=":", c="C3", lw=1, label=f"{fr.loadings.shape[1]} factor(s) kept")
    ax.set(xlabel="component", ylabel="eigenvalue of correlation matrix", title="Scree plot of the indices")
    ax.legend()
    return fig


def _l1_plots(res: L1PoissonResult):
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    ll = np.log10(res.lambdas)
    a1.errorbar(ll, res.cv_mean, yerr=res.cv_se, fmt="o-", ms=3, capsize=2)
    a1.axvline(np.log10(res.lambda_min), ls=":", c="grey", label="min")
    a1.axvline(np.log10(res.lambda_1se), ls="--", c="C3", label="1 SE")
    a1.set(xlabel="log10(lambda)", ylabel="held-out Poisson deviance", title="Cross-validation")
    a1.legend()
    for j, name in enumerate(res.features):
        a2.plot(ll, res.path[:, j], label=name)
    a2.axvline(np.log10(res.lam), ls="--", c="C3")
    a2.set(xlabel="log10(lambda)", ylabel="coefficient per SD", title="L1 path")
    a2.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    t = res.table()
    fig2, ax = plt.subplots(figsize=(6, 0.35 * len(t) + 1.2))
    yy = np.arange(len(t))[::-1]
    ax.scatter(t["rate_ratio_per_sd"], yy, c=np.where(t["selected"], "C0", "lightgrey"), zorder=3)
    if "rr_per_sd_boot_low" in t:
        ax.hlines(yy, t["rr_per_sd_boot_low"], t["rr_per_sd_boot_high"], color="C0", lw=1.5)
        labels = [f"{v} ({f:.0%})" for v, f in zip(t["variable"], t["selection_frequency"])]
    else:
        labels = list(t["variable"])
    ax.axvline(1.0, c="grey", lw=1)
    ax.set_yticks(yy, labels)
    ax.set(xlabel="rate ratio per SD (bootstrap 95% interval)",
           title="L1 Poisson: rate ratios (selection frequency)")
    return fig, fig2


def _pd_plot(b: BoostingResult):
    plt = _plt()
    names = list(b.partial_dependence)
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.2), squeeze=False)
    for ax, name in zip(axes[0], names):
        d = b.partial_dependence[name]
        ax.plot(d["value"], np.exp(d["log_rate_centred"]))
        ax.axhline(1.0, c="grey", lw=1)
        ax.set(xlabel=name, title=name)
    axes[0, 0].set_ylabel("partial dependence (rate ratio)")
    fig.suptitle("Gradient boosting: partial dependence of the rate")
    fig.tight_layout()
    return fig


def _fmt_table(df: pd.DataFrame, floatfmt: str = "{:.3g}") -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, row in df.iterrows():
        cells = [floatfmt.format(v) if isinstance(v, (float, np.floating)) else str(v) for v in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_analysis(
    sources: Union[pd.DataFrame, Mapping[str, pd.DataFrame]],
    config: AnalysisConfig,
    out_dir: Union[str, Path, None] = None,
    *,
    overwrite: bool = False,
) -> AnalysisResult:
    """Run the multifactorial workflow and (if ``out_dir``) write tables, plots and ``report.md``.

    Parameters
    ----------
    sources: one table, or name -> table to be joined on ``config.keys``.
    config: :class:`AnalysisConfig`.
    out_dir: output folder (created; must be empty or absent unless ``overwrite``), or None.
    """
    out = check_output_dir(out_dir, overwrite) if out_dir is not None else None
    cfg = config
    join_report = None
    if isinstance(sources, pd.DataFrame):
        table = sources.reset_index(drop=True)
    elif len(sources) == 1:
        table = next(iter(sources.values())).reset_index(drop=True)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # unmatched keys go to the report and the CSV instead
            table, join_report = join_sources(sources, cfg.keys, strict=cfg.strict_join)
    # Checks on the whole table first, so that bad input fails before any model work.
    data = prepare_table(table, cfg.outcome, keys=cfg.keys, exposure=cfg.exposure, exclude=cfg.exclude,
                         impute=cfg.impute)
    fr = None
    X = data.X
    if cfg.factor_cols:
        missing = [c for c in cfg.factor_cols if c not in X.columns and c not in data.dropped_constant]
        if missing:
            raise TabularInputError(f"factor column(s) {missing} not found among the features; "
                                    f"available columns: {', '.join(map(str, table.columns))}")
        fr = fit_factors(X, [c for c in cfg.factor_cols if c in X.columns], n_factors=cfg.n_factors,
                         random_state=cfg.random_state)
        X = pd.concat([X.drop(columns=fr.columns), fr.scores], axis=1)
    l1 = l1_poisson_cv(X, data.y, data.exposure, groups=data.groups, n_folds=cfg.n_folds, rule=cfg.rule,
                       n_bootstrap=cfg.n_bootstrap, random_state=cfg.random_state)
    gb = fit_boosting(X, data.y, data.exposure, groups=data.groups, top_k=min(cfg.top_k, X.shape[1]),
                      random_state=cfg.random_state)
    result = AnalysisResult(config=cfg, join=join_report, data=data, factors=fr, l1=l1, boosting=gb)
    if out is not None:
        result.files = _write_outputs(result, out)
    return result


def _write_outputs(r: AnalysisResult, out: Path) -> list:
    w = _Writer(out)
    cfg = r.config
    md = [f"# Multifactorial analysis of `{cfg.outcome}`", ""]
    n, p = r.data.X.shape
    n_model = len(r.l1.features)
    md += [f"{n} rows, {p} explanatory columns ({n_model} model variables after the factor analysis)"
           + (f", exposure `{cfg.exposure}` (models the rate per unit exposure)" if cfg.exposure else "") + ".", ""]
    if r.join is not None:
        w.csv("join_unmatched.csv", r.join.unmatched)
        md += ["## Join", "", r.join.summary() + ".", ""]
        if len(r.join.unmatched):
            md += ["Unmatched keys (also in `join_unmatched.csv`):", "",
                   _fmt_table(r.join.unmatched.head(20)), ""]
    if r.data.missing or r.data.notes:
        md += ["## Data checks", ""] + [f"- {s}" for s in r.data.notes] + [""]
        if r.data.missing:
            w.csv("missing_values.csv", pd.DataFrame({
                "column": list(r.data.missing), "n_missing": list(r.data.missing.values()),
                "imputed_median": [r.data.imputed.get(c, np.nan) for c in r.data.missing]}))
    if r.factors is not None:
        fr = r.factors
        load = fr.loadings.copy()
        load["uniqueness"] = fr.uniqueness
        w.csv("factor_loadings.csv", load.reset_index(names="index"))
        w.csv("factor_eigenvalues.csv", pd.DataFrame({"component": np.arange(1, len(fr.eigenvalues) + 1),
                                                      "eigenvalue": fr.eigenvalues}))
        w.csv("factor_scores.csv", fr.scores)
        w.figure("factor_scree.png", _scree_plot(fr))
        md += ["## Factor analysis of the indices", "",
               f"{fr.loadings.shape[1]} factor(s) ({fr.n_factors_rule}), varimax rotation, explaining "
               + ", ".join(f"{c} {e:.0%}" for c, e in zip(fr.loadings.columns, fr.explained))
               + " of the standardised variance. Loadings (`factor_loadings.csv`, `factor_scree.png`):", "",
               _fmt_table(load.reset_index(names="index"), "{:.2f}"), ""]
    l1 = r.l1
    t = l1.table()
    w.csv("l1_poisson_coefficients.csv", t)
    w.csv("l1_poisson_cv.csv", pd.DataFrame({"lambda": l1.lambdas, "cv_deviance": l1.cv_mean,
                                             "cv_se": l1.cv_se, "n_nonzero": (l1.path != 0).sum(axis=1)}))
    f1, f2 = _l1_plots(l1)
    w.figure("l1_poisson_path.png", f1)
    w.figure("l1_poisson_rate_ratios.png", f2)
    sel = ", ".join(f"`{v}`" for v in l1.selected) or "none"
    md += ["## L1-penalised Poisson regression", "",
           f"Penalty chosen by {cfg.n_folds}-fold cross-validation"
           + (f" grouped by `{cfg.keys[0]}`" if cfg.keys else "")
           + f", rule `{l1.rule}` (lambda = {l1.lam:.3g}; best {l1.lambda_min:.3g}). Selected: {sel}.",
           "Rate ratios are per standard deviation of each variable; intervals and selection "
           f"frequency from {cfg.n_bootstrap} bootstrap refits"
           + (f" resampling whole `{cfg.keys[0]}` groups" if cfg.keys else "") + ".", "",
           _fmt_table(t), ""]
    gb = r.boosting
    w.csv("gbm_importance.csv", gb.importance)
    w.csv("gbm_partial_dependence.csv", pd.concat(
        [d.assign(feature=k) for k, d in gb.partial_dependence.items()], ignore_index=True))
    w.figure("gbm_partial_dependence.png", _pd_plot(gb))
    md += ["## Gradient boosting (Poisson loss)", "",
           f"Held-out share of Poisson deviance explained: {gb.heldout_d2:.3f}. Permutation importance "
           "on the held-out split (`gbm_importance.csv`); partial dependence of the top variables in "
           "`gbm_partial_dependence.png` (a curve that bends shows a non-linear effect the linear model "
           "cannot represent).", "", _fmt_table(gb.importance), ""]
    md += ["## Files", ""] + [f"- `{f.name}`" for f in w.files] + ["- `report.md`", ""]
    w.text("report.md", "\n".join(md))
    return w.files
