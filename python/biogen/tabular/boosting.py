"""Gradient boosting (Poisson loss) with permutation importance and partial dependence.

The counts are modelled as rates: the booster is fitted to ``y / exposure`` with ``sample_weight =
exposure``, which for the Poisson loss is the same fit as a model of ``y`` with offset
``log(exposure)``. Importance is measured on a held-out split (grouped by region when groups are
given), so a variable the model memorised does not look important.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import pandas as pd
from sklearn.ensemble import HistGradientBoostingRegressor
from sklearn.inspection import partial_dependence, permutation_importance
from sklearn.metrics import d2_tweedie_score
from sklearn.model_selection import GroupShuffleSplit, ShuffleSplit

__all__ = ["BoostingResult", "fit_boosting"]


@dataclass
class BoostingResult:
    """features: p names. importance: DataFrame (feature, importance_mean, importance_std), the
    held-out increase in mean Poisson deviance when a feature is permuted, sorted descending.
    heldout_d2: fraction of Poisson deviance explained on the held-out split.
    partial_dependence: feature -> DataFrame (value, rate, log_rate_centred) for the top features;
    ``log_rate_centred`` is the log of the average predicted rate minus its mean over the grid.
    """

    features: list
    importance: pd.DataFrame
    heldout_d2: float
    partial_dependence: dict
    model: HistGradientBoostingRegressor = field(repr=False)


def fit_boosting(
    X: pd.DataFrame,
    y,
    exposure=None,
    *,
    groups=None,
    top_k: int = 4,
    pd_features: Optional[list] = None,
    test_size: float = 0.25,
    grid_resolution: int = 30,
    n_repeats: int = 5,
    max_iter: int = 200,
    learning_rate: float = 0.05,
    random_state: int = 0,
) -> BoostingResult:
    """Fit ``HistGradientBoostingRegressor(loss="poisson")`` and explain it.

    Parameters
    ----------
    X: (n, p) DataFrame of features. y: (n,) counts. exposure: (n,) population at risk or None.
    groups: (n,) labels kept together in the train/held-out split.
    top_k: partial dependence is computed for the ``top_k`` most important features ...
    pd_features: ... or for these features, when given.
    """
    if not isinstance(X, pd.DataFrame):
        X = pd.DataFrame(np.asarray(X, dtype=float), columns=[f"x{i}" for i in range(np.shape(X)[1])])
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    y = np.asarray(y, dtype=float)
    expo = np.ones(len(y)) if exposure is None else np.asarray(exposure, dtype=float)
    rate = y / expo
    if groups is not None:
        split = GroupShuffleSplit(n_splits=1, test_size=test_size, random_state=random_state)
        tr, te = next(split.split(X, y, groups))
    else:
        tr, te = next(ShuffleSplit(n_splits=1, test_size=test_size, random_state=random_state).split(X))
    model = HistGradientBoostingRegressor(
        loss="poisson", max_iter=max_iter, learning_rate=learning_rate, max_leaf_nodes=15,
        min_samples_leaf=20, l2_regularization=1.0, early_stopping=False, random_state=random_state,
    )
    model.fit(X.iloc[tr], rate[tr], sample_weight=expo[tr])
    d2 = float(d2_tweedie_score(rate[te], model.predict(X.iloc[te]), sample_weight=expo[te], power=1))
    pi = permutation_importance(
        model, X.iloc[te], rate[te], sample_weight=expo[te], scoring="neg_mean_poisson_deviance",
        n_repeats=n_repeats, random_state=random_state,
    )
    # The scorer averages the rate deviance with exposure weights; times the mean exposure it is the
    # mean Poisson deviance of the counts per row, a unit a reader can compare across data sets.
    unit = float(expo[te].mean())
    imp = pd.DataFrame({"feature": list(X.columns), "importance_mean": pi.importances_mean * unit,
                        "importance_std": pi.importances_std * unit})
    imp = imp.sort_values("importance_mean", ascending=False, kind="stable").reset_index(drop=True)
    pds = {}
    if pd_features is not None:
        bad = [f for f in pd_features if f not in X.columns]
        if bad:
            raise ValueError(f"pd_features {bad} are not features; features: {list(X.columns)}")
    for name in (pd_features if pd_features is not None else imp["feature"].head(top_k)):
        r = partial_dependence(model, X, [name], kind="average", grid_resolution=grid_resolution,
                               method="brute")  # sklearn's fast 'recursion' refuses weighted fits
        avg = np.asarray(r["average"][0], dtype=float)
        log_avg = np.log(avg)
        pds[name] = pd.DataFrame({"value": np.asarray(r["grid_values"][0], dtype=float), "rate": avg,
                                  "log_rate_centred": log_avg - log_avg.mean()})
    return BoostingResult(features=list(X.columns), importance=imp, heldout_d2=d2,
                          partial_dependence=pds, model=model)
