"""Factor analysis of a block of indices (scikit-learn ``FactorAnalysis`` with varimax rotation)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import pandas as pd
from scipy.optimize import linear_sum_assignment
from sklearn.decomposition import FactorAnalysis

from .data import TabularInputError

__all__ = ["FactorResult", "fit_factors", "factor_congruence"]


@dataclass
class FactorResult:
    """A fitted factor model of standardised indices.

    columns: the p index columns. loadings: (p, k) DataFrame, rows = indices, columns F1..Fk,
    each factor signed so its largest loading is positive and ordered by variance explained.
    eigenvalues: (p,) eigenvalues of the indices' correlation matrix, descending (the scree plot).
    scores: (n_rows, k) DataFrame of factor scores (features for the models).
    uniqueness: (p,) Series, noise variance of each standardised index.
    explained: (k,) share of the total standardised variance each factor explains.
    """

    columns: list
    loadings: pd.DataFrame
    eigenvalues: np.ndarray
    scores: pd.DataFrame
    uniqueness: pd.Series
    explained: np.ndarray
    n_factors_rule: str
    model: FactorAnalysis = field(repr=False)


def fit_factors(
    df: pd.DataFrame,
    columns: Sequence[str],
    *,
    n_factors: Optional[int] = None,
    rotation: Optional[str] = "varimax",
    prefix: str = "F",
    random_state: int = 0,
) -> FactorResult:
    """Fit a factor model to ``columns`` of ``df`` (standardised first) and score every row.

    Parameters
    ----------
    df: (n_rows, ...) table holding the index columns (numeric, no missing values).
    columns: p >= 3 index columns.
    n_factors: number of factors; ``None`` uses the Kaiser rule (correlation eigenvalues > 1).
    rotation: ``"varimax"`` (default: simple structure, each index loads mostly on one factor),
        ``"quartimax"`` or ``None``.
    prefix: factor names are ``f"{prefix}{i}"``.
    """
    columns = list(columns)
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise TabularInputError(f"factor column(s) {missing} not found; available columns: "
                                f"{', '.join(map(str, df.columns))}")
    if len(columns) < 3:
        raise TabularInputError(f"factor analysis needs at least 3 index columns, got {len(columns)}")
    if len(set(columns)) != len(columns):
        raise TabularInputError(f"factor columns are repeated: {columns}")
    X = df[columns]
    non_num = [c for c in columns if not pd.api.types.is_numeric_dtype(X[c])]
    if non_num:
        raise TabularInputError(f"factor column(s) {non_num} are not numeric")
    Z = X.to_numpy(dtype=float)
    if np.isnan(Z).any():
        raise TabularInputError("factor columns have missing values; impute or remove them first")
    sd = Z.std(axis=0)
    if (sd == 0).any():
        raise TabularInputError(f"factor column(s) {[c for c, s in zip(columns, sd) if s == 0]} are constant")
    if len(Z) <= len(columns):
        raise TabularInputError(f"factor analysis needs more rows ({len(Z)}) than index columns ({len(columns)})")
    Z = (Z - Z.mean(axis=0)) / sd
    eig = np.sort(np.linalg.eigvalsh(np.corrcoef(Z, rowvar=False)))[::-1]
    if n_factors is None:
        n_factors = max(1, int((eig > 1.0).sum()))
        rule = "Kaiser rule (correlation eigenvalues > 1)"
    else:
        rule = "given"
    if not 1 <= n_factors < len(columns):
        raise TabularInputError(f"n_factors must be in [1, {len(columns) - 1}], got {n_factors}")

    fa = FactorAnalysis(n_components=n_factors, rotation=rotation, random_state=random_state)
    scores = fa.fit_transform(Z)
    L = fa.components_.T.copy()  # (p, k); transform() uses the rotated components, so scores match
    ssl = (L**2).sum(axis=0)
    order = np.argsort(-ssl)
    L, scores, ssl = L[:, order], scores[:, order], ssl[order]
    sign = np.sign(L[np.abs(L).argmax(axis=0), np.arange(L.shape[1])])
    sign[sign == 0] = 1.0
    L, scores = L * sign, scores * sign
    names = [f"{prefix}{i + 1}" for i in range(n_factors)]
    return FactorResult(
        columns=columns,
        loadings=pd.DataFrame(L, index=columns, columns=names),
        eigenvalues=eig,
        scores=pd.DataFrame(scores, columns=names, index=df.index),
        uniqueness=pd.Series(fa.noise_variance_, index=columns),
        explained=ssl / len(columns),
        n_factors_rule=rule,
        model=fa,
    )


def factor_congruence(estimated, true) -> tuple[np.ndarray, np.ndarray]:
    """Tucker congruence between matched factors, invariant to factor order and sign.

    estimated, true: (p, k) loading matrices. Returns (congruence (k,), match (k,)) where
    ``estimated[:, match[j]]`` is the factor matched to ``true[:, j]`` and ``congruence[j]`` is the
    absolute Tucker coefficient of that pair (1 = same loading pattern up to scale).
    """
    A, B = np.asarray(estimated, dtype=float), np.asarray(true, dtype=float)
    if A.shape != B.shape or A.ndim != 2:
        raise ValueError(f"loading matrices must have the same 2-D shape, got {A.shape} and {B.shape}")
    C = np.abs(A.T @ B) / np.outer(np.linalg.norm(A, axis=0), np.linalg.norm(B, axis=0))
    rows, cols = linear_sum_assignment(-C)
    match = np.empty(B.shape[1], dtype=int)
    match[cols] = rows
    return C[match, np.arange(B.shape[1])], match
