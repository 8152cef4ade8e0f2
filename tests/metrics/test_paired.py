"""Interval and paired-comparison statistics over repeated splits (biogen.metrics.paired)."""

import itertools

import numpy as np
import pytest
from scipy import stats

from biogen.metrics.paired import compare_all, holm, mean_interval, paired_comparison


def test_uncorrected_interval_and_test_equal_scipy():
    rng = np.random.default_rng(0)
    a, b = rng.normal(0.7, 0.05, 7), rng.normal(0.65, 0.05, 7)
    iv = mean_interval(a, level=0.9)
    lo, hi = stats.t.interval(0.9, len(a) - 1, loc=a.mean(), scale=stats.sem(a))
    assert (iv.ci_low, iv.ci_high) == pytest.approx((lo, hi), rel=1e-12)
    assert iv.std == pytest.approx(np.std(a, ddof=1))
    c = paired_comparison(a, b)
    assert c.p_ttest == pytest.approx(stats.ttest_rel(a, b).pvalue, rel=1e-10)
    assert c.p_wilcoxon == pytest.approx(stats.wilcoxon(a, b).pvalue, rel=1e-12)
    assert c.mean_diff == pytest.approx(float(np.mean(a - b)))


def test_corrected_resampled_t_test_by_hand():
    """Nadeau & Bengio: t = mean(d) / sqrt((1/n + n_test/n_train) * var(d)), n - 1 degrees of freedom."""
    d = [0.031, 0.012, -0.004, 0.027, 0.018, 0.009]
    a = np.array([0.70, 0.71, 0.69, 0.72, 0.70, 0.68])
    b = a - np.array(d)
    n, ratio = len(d), 0.25
    mean = sum(d) / n
    var = sum((x - mean) ** 2 for x in d) / (n - 1)
    t = mean / ((1 / n + ratio) * var) ** 0.5
    c = paired_comparison(a, b, test_train_ratio=ratio)
    assert c.p_ttest == pytest.approx(2 * stats.t.sf(abs(t), n - 1), rel=1e-9)
    half = stats.t.ppf(0.975, n - 1) * ((1 / n + ratio) * var) ** 0.5
    assert (c.ci_low, c.ci_high) == pytest.approx((mean - half, mean + half), rel=1e-9)
    # the correction can only widen the interval and raise p
    plain = paired_comparison(a, b)
    assert c.p_ttest > plain.p_ttest and c.ci_high - c.ci_low > plain.ci_high - plain.ci_low


def test_win_rate_counts_ties_as_half_and_constant_differences():
    a = np.array([0.5, 0.6, 0.7, 0.8])
    b = np.array([0.4, 0.6, 0.75, 0.7])
    assert paired_comparison(a, b).win_rate == pytest.approx((1 + 0.5 + 0 + 1) / 4)
    same = paired_comparison(a, a)
    assert same.p_ttest == 1.0 and same.p_wilcoxon == 1.0 and same.mean_diff == 0 and same.win_rate == 0.5
    shifted = paired_comparison(a + 0.1, a)
    assert shifted.p_ttest == 0.0 and shifted.ci_low == pytest.approx(0.1)


def test_holm_matches_step_down_definition():
    p = np.array([0.01, 0.04, 0.03, 0.005, 0.5])
    k = len(p)
    ref = np.empty(k)
    for i in range(k):  # adjusted p_i = max over j ranked at or before i of min(1, (k - rank_j) * p_j)
        rank_i = sorted(range(k), key=lambda j: p[j]).index(i)
        before = sorted(range(k), key=lambda j: p[j])[:rank_i + 1]
        ref[i] = max(min(1.0, (k - sorted(range(k), key=lambda j: p[j]).index(j)) * p[j]) for j in before)
    assert np.allclose(holm(p), ref)


def test_compare_all_covers_each_pair_once_and_flags_a_planted_difference():
    rng = np.random.default_rng(3)
    noise = rng.normal(0, 0.01, 8)
    scores = {"good": 0.8 + noise + rng.normal(0, 0.005, 8), "mid": 0.8 + noise + rng.normal(0, 0.005, 8),
              "bad": 0.6 + noise + rng.normal(0, 0.005, 8)}
    comps = compare_all(scores, test_train_ratio=0.25)
    assert [(c.a, c.b) for c in comps] == list(itertools.combinations(scores, 2))
    sig = {(c.a, c.b): c.significant for c in comps}
    assert sig == {("good", "mid"): False, ("good", "bad"): True, ("mid", "bad"): True}
    assert all(c.p_holm >= c.p_ttest for c in comps)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="same splits"):
        paired_comparison([0.1, 0.2, 0.3], [0.1, 0.2])
    with pytest.raises(ValueError, match="at least 2"):
        mean_interval([0.5])
    with pytest.raises(ValueError, match="NaN"):
        mean_interval([0.5, np.nan])
