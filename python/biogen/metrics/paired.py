"""Scores over repeated splits: a mean with its interval, and paired comparisons between methods.

Two methods scored on the same N splits give N paired differences. Their test sets are disjoint
within one k-fold run but the *training* sets overlap (and repeated random splits overlap in both),
so the N scores are positively correlated and the naive standard error sd / sqrt(N) is too small:
a plain paired t-test then declares differences significant far too often (Dietterich 1998;
Nadeau & Bengio 2003). Both the interval and the test here therefore use Nadeau & Bengio's corrected
resampled variance, ``(1/N + n_test/n_train) * s^2``, with N - 1 degrees of freedom; pass
``test_train_ratio=0`` for independent samples (the textbook t-interval and paired t-test). The
Wilcoxon signed-rank p-value (scipy, exact for small N, uncorrected) is reported beside it as a
distribution-free check; note that with N <= 5 its two-sided p can never fall below 0.05.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["Interval", "PairedComparison", "mean_interval", "paired_comparison", "holm", "compare_all"]


@dataclass
class Interval:
    n: int
    mean: float
    std: float  # sample standard deviation (ddof 1) of the N scores
    ci_low: float
    ci_high: float


@dataclass
class PairedComparison:
    a: str
    b: str
    n: int
    win_rate: float  # fraction of splits where a scores higher than b (ties count one half)
    mean_diff: float  # mean of a - b
    ci_low: float
    ci_high: float
    p_ttest: float  # corrected resampled paired t-test, two-sided
    p_wilcoxon: float  # Wilcoxon signed-rank, two-sided (uncorrected)
    p_holm: float = float("nan")  # p_ttest adjusted over all pairs of a comparison (Holm)
    significant: bool = False  # p_holm < alpha

    def as_dict(self) -> dict:
        return asdict(self)


def _corrected_se(x: np.ndarray, test_train_ratio: float) -> float:
    n = len(x)
    return float(np.sqrt((1.0 / n + test_train_ratio) * x.var(ddof=1)))


def _check(x, name="scores") -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 1 or len(x) < 2:
        raise ValueError(f"{name} needs a 1-d array of at least 2 values, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or inf")
    return x


def mean_interval(x, level: float = 0.95, test_train_ratio: float = 0.0) -> Interval:
    """Mean, sample sd and a ``level`` t-interval of the mean of ``x: (N,)`` with the corrected
    variance (see the module docstring; ``test_train_ratio=0`` gives the textbook interval)."""
    from scipy import stats

    x = _check(x)
    n, m = len(x), float(x.mean())
    half = stats.t.ppf(0.5 + level / 2, n - 1) * _corrected_se(x, test_train_ratio)
    return Interval(n, m, float(x.std(ddof=1)), m - half, m + half)


def paired_comparison(a, b, *, names: tuple[str, str] = ("a", "b"), level: float = 0.95,
                      test_train_ratio: float = 0.0) -> PairedComparison:
    """Compare scores ``a: (N,)`` and ``b: (N,)`` measured on the same N splits (index i = split i)."""
    from scipy import stats

    a, b = _check(a, names[0]), _check(b, names[1])
    if a.shape != b.shape:
        raise ValueError(f"paired scores need the same splits: {names[0]} has {len(a)}, {names[1]} {len(b)}")
    d = a - b
    n, m = len(d), float(d.mean())
    se = _corrected_se(d, test_train_ratio)
    if se > 0:
        t = m / se
        p_t = float(2 * stats.t.sf(abs(t), n - 1))
        half = stats.t.ppf(0.5 + level / 2, n - 1) * se
    else:  # every split gives the same difference: certain if it is non-zero, nothing to test if zero
        p_t, half = (1.0 if m == 0 else 0.0), 0.0
    if np.any(d != 0):
        p_w = float(stats.wilcoxon(a, b, zero_method="wilcox", alternative="two-sided").pvalue)
    else:
        p_w = 1.0
    win = float(np.mean((d > 0) + 0.5 * (d == 0)))
    return PairedComparison(names[0], names[1], n, win, m, m - half, m + half, p_t, p_w)


def holm(p) -> np.ndarray:
    """Holm's step-down adjustment of the p-values ``p: (k,)`` (family-wise error control)."""
    p = np.asarray(p, dtype=np.float64)
    k = len(p)
    order = np.argsort(p, kind="stable")
    adj = np.empty(k)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (k - rank) * p[i]))
        adj[i] = running
    return adj


def compare_all(scores: dict[str, np.ndarray], *, alpha: float = 0.05, level: float = 0.95,
                test_train_ratio: float = 0.0) -> list[PairedComparison]:
    """Every pair of methods in ``scores`` ({name: (N,) scores on shared splits}), in insertion
    order (a before b), with Holm-adjusted p-values over all pairs and a significance flag."""
    names = list(scores)
    out = [paired_comparison(scores[x], scores[y], names=(x, y), level=level, test_train_ratio=test_train_ratio)
           for i, x in enumerate(names) for y in names[i + 1:]]
    if out:
        for c, p in zip(out, holm([c.p_ttest for c in out])):
            c.p_holm = float(p)
            c.significant = bool(p < alpha)
    return out
