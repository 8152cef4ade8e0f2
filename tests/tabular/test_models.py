"""Factor analysis, L1 Poisson and boosting recover what the synthetic generator planted."""

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment
from sklearn.linear_model import PoissonRegressor

from biogen.tabular import (factor_congruence, fit_boosting, fit_factors, fit_l1_poisson, l1_poisson_cv,
                            prepare_table)


def _tucker_matched(est, true):
    """Independent of the module: |Tucker congruence| after best order matching."""
    c = np.abs(est.T @ true) / np.outer(np.linalg.norm(est, axis=0), np.linalg.norm(true, axis=0))
    r, k = linear_sum_assignment(-c)
    return c[r, k], dict(zip(k, r))


@pytest.fixture(scope="module")
def factor_fit(synth):
    return fit_factors(synth.merged, list(synth.truth.loadings.index))


def test_factor_analysis_recovers_planted_loadings(synth, factor_fit):
    fr = factor_fit
    assert fr.loadings.shape == (8, 2)  # Kaiser rule finds the two planted factors
    cong, match = _tucker_matched(fr.loadings.to_numpy(), synth.truth.loadings.to_numpy())
    assert cong.min() > 0.95, cong
    # Scores track the latent factors they were generated from (up to sign).
    for j_true, j_est in match.items():
        r = np.corrcoef(fr.scores.iloc[:, j_est], synth.truth.latent[:, j_true])[0, 1]
        assert abs(r) > 0.9
    # Scree: eigenvalues descending and the first two above 1, the third below.
    assert np.all(np.diff(fr.eigenvalues) <= 1e-12)
    assert fr.eigenvalues[1] > 1 > fr.eigenvalues[2]


def test_factor_congruence_helper_is_order_and_sign_invariant():
    rng = np.random.default_rng(1)
    A = rng.standard_normal((9, 3))
    B = A[:, [2, 0, 1]] * np.array([-1.0, 1.0, -2.0])
    cong, match = factor_congruence(B, A)
    np.testing.assert_allclose(cong, 1.0, atol=1e-12)
    np.testing.assert_array_equal(match, [1, 2, 0])


def _poisson_data(seed=0, n=300, p=6):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, p))
    X[:, 1] = 0.7 * X[:, 0] + 0.7 * X[:, 1]
    expo = np.exp(rng.normal(3, 0.5, n))
    beta = np.array([0.4, 0.0, -0.3, 0.0, 0.1, 0.0])
    y = rng.poisson(expo * np.exp(-2 + X @ beta))
    return X, y.astype(float), expo


def test_l1_poisson_satisfies_kkt_conditions():
    X, y, expo = _poisson_data()
    off = np.log(expo)
    mu0 = expo * y.sum() / expo.sum()
    lam_max = np.max(np.abs(X.T @ (y - mu0))) / len(y)  # smallest penalty with all coefficients 0
    for lam in (0.05 * lam_max, 0.3 * lam_max):
        b0, b, _ = fit_l1_poisson(X, y, lam, offset=off, tol=1e-11)
        mu = np.exp(off + b0 + X @ b)
        g = X.T @ (mu - y) / len(y)  # gradient of the mean Poisson loss, computed here independently
        assert abs(np.mean(mu - y)) < 1e-6  # unpenalised intercept
        nz = b != 0
        assert nz.any()
        if lam > 0.1 * lam_max:
            assert (~nz).any()
        np.testing.assert_allclose(g[nz], -lam * np.sign(b[nz]), atol=1e-6)
        assert np.all(np.abs(g[~nz]) <= lam + 1e-6)


def test_unpenalised_fit_matches_sklearn_with_exposure():
    X, y, expo = _poisson_data(seed=2)
    b0, b, _ = fit_l1_poisson(X, y, 0.0, offset=np.log(expo), tol=1e-11)
    # sklearn has no offset: rate with exposure weights is the same Poisson likelihood.
    ref = PoissonRegressor(alpha=0.0, tol=1e-12, max_iter=1000).fit(X, y / expo, sample_weight=expo)
    np.testing.assert_allclose(b, ref.coef_, atol=1e-5)
    assert abs(b0 - ref.intercept_) < 1e-5


def test_l1_poisson_keeps_true_variables_drops_noise(synth, factor_fit):
    idx = list(synth.truth.loadings.index)
    df = synth.merged.drop(columns=idx).join(factor_fit.scores)
    data = prepare_table(df, "hospitalizations", keys=["region", "year"], exposure="population")
    res = l1_poisson_cv(data.X, data.y, data.exposure, groups=data.groups, n_bootstrap=30)
    _, match = _tucker_matched(factor_fit.loadings.to_numpy(), synth.truth.loadings.to_numpy())
    socio = factor_fit.loadings.columns[match[0]]  # fitted factor of the planted "education_health"
    housing = factor_fit.loadings.columns[match[1]]
    assert set(res.selected) == {socio, "pm25"}
    freq = dict(zip(res.features, res.selection_frequency))
    assert freq[socio] >= 0.9 and freq["pm25"] >= 0.9
    for noise in ("no2", "co", "so2", housing):
        assert freq[noise] < 0.5
    # Shrunk towards 0 but same sign and order of magnitude as planted (0.30 per latent SD, 0.20 per SD).
    coef = dict(zip(res.features, res.coef))
    assert 0.1 < coef["pm25"] <= 0.25 and 0.1 < coef[socio] <= 0.35
    # The path starts empty at lambda_max and the chosen strength is the 1-SE one.
    assert np.all(res.path[0] == 0) and np.any(res.path[1] != 0)
    assert res.lam == res.lambda_1se >= res.lambda_min
    t = res.table()
    np.testing.assert_allclose(t["rate_ratio_per_sd"], np.exp(t["coef_per_sd"]))


def test_partial_dependence_recovers_planted_u_shape(synth):
    data = prepare_table(synth.merged, "hospitalizations", keys=["region", "year"], exposure="population")
    res = fit_boosting(data.X, data.y, data.exposure, groups=data.groups, pd_features=["temperature"],
                       n_repeats=2)
    pdp = res.partial_dependence["temperature"]
    truth = synth.truth.nonlinear_effect(pdp["value"])
    r_true = np.corrcoef(pdp["log_rate_centred"], truth)[0, 1]
    r_lin = abs(np.corrcoef(pdp["log_rate_centred"], pdp["value"])[0, 1])
    assert r_true > 0.85, r_true
    assert r_lin < 0.5  # a U, not a line
    assert res.heldout_d2 > 0.3
    assert set(res.importance["feature"].head(2)) >= {"pm25"}
