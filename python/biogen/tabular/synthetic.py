"""Synthetic region x year health data with planted effects, for tests and ``biogen tabular demo``.

The design mirrors seed 001 (part 2): hospitalisation counts per region and year, the population at
risk, a block of socio-economic indices generated from a few latent factors, and air pollutants /
weather. The log hospitalisation rate is

    log(rate) = base + sum_k factor_effects[k] * latent_k + sum_v linear_effects[v] * z(v)
                + nonlinear(temperature) + overdispersion

where ``z(v)`` is the standardised variable. Some variables have no effect at all (noise), and some
of those are strongly correlated with a variable that does (collinear noise), which is what makes the
L1 penalty necessary.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

__all__ = ["SyntheticTruth", "SyntheticData", "make_synthetic_health_data"]

# Index names follow the census-style marginalisation indices the seed analyses; two latent factors:
# "education_health" loads on the first four, "housing" on the last four.
_INDEX_NAMES = (
    "illiteracy", "no_primary_school", "no_health_insurance", "informal_work",
    "dirt_floor", "no_drainage", "no_piped_water", "overcrowding",
)
_TRUE_LOADINGS = np.array([
    [0.85, 0.10], [0.80, 0.05], [0.75, 0.15], [0.70, 0.00],
    [0.10, 0.85], [0.05, 0.80], [0.15, 0.75], [0.00, 0.70],
])
_FACTOR_NAMES = ("education_health", "housing")
_TEMP_MEAN, _TEMP_SD = 18.0, 5.0


@dataclass(frozen=True)
class SyntheticTruth:
    """What was planted.

    loadings: (n_indices, n_factors) DataFrame, true loadings of the standardised indices.
    factor_effects: latent factor -> log-rate change per SD of the latent factor.
    linear_effects: column -> log-rate change per SD of that column.
    noise: columns with no effect (some collinear with ``pm25``).
    nonlinear: the column with the non-linear (U-shaped) effect; see :meth:`nonlinear_effect`.
    latent: (n_rows, n_factors) the latent factor values of the merged table's rows.
    """

    loadings: pd.DataFrame
    factor_effects: dict
    linear_effects: dict
    noise: tuple
    nonlinear: str
    latent: np.ndarray = field(repr=False)

    @staticmethod
    def nonlinear_effect(temperature) -> np.ndarray:
        """Planted log-rate effect of temperature: a saturating U, lowest at 18 degrees (cold and heat
        both raise it, up to +0.3 on the log scale).

        temperature: (n,) degrees. Returns (n,) log-rate change, mean 0 over the generated data.
        """
        t = (np.asarray(temperature, dtype=float) - _TEMP_MEAN) / _TEMP_SD
        # 1 - 1/sqrt(2) is E[1 - exp(-t^2 / 2)] for standard normal t: centres the effect.
        return 0.3 * ((1.0 - np.exp(-0.5 * t**2)) - (1.0 - 1.0 / np.sqrt(2.0)))


@dataclass(frozen=True)
class SyntheticData:
    """sources: name -> table keyed by (region, year), as separate files would arrive;
    merged: the rows whose key is in every source, joined; truth: what was planted;
    unmatched: the keys planted to be missing from some source."""

    sources: dict
    merged: pd.DataFrame
    truth: SyntheticTruth
    unmatched: pd.DataFrame


def make_synthetic_health_data(
    n_regions: int = 80,
    n_years: int = 5,
    *,
    n_unmatched: int = 3,
    overdispersion: float = 0.05,
    base_rate: float = 5e-4,
    seed: int = 0,
) -> SyntheticData:
    """Generate hospitalisations, population, socio-economic indices and pollutants per region and year.

    Parameters
    ----------
    n_regions, n_years: the table has ``n_regions * n_years`` keys (region, year).
    n_unmatched: keys removed from the pollution source (and as many extra keys added to the census
        source), so that joining the sources has unmatched keys to report.
    overdispersion: SD of a log-normal region-year noise on the rate (real counts are overdispersed).
    base_rate: hospitalisations per inhabitant at the mean of everything.
    seed: the generator seed; equal seeds give equal data.
    """
    if n_regions < 4 or n_years < 1:
        raise ValueError(f"need n_regions >= 4 and n_years >= 1, got {n_regions} and {n_years}")
    if not 0 <= n_unmatched < n_regions * n_years // 2:
        raise ValueError(f"n_unmatched must be in [0, {n_regions * n_years // 2}), got {n_unmatched}")
    rng = np.random.default_rng(seed)
    n = n_regions * n_years
    region = np.repeat([f"R{i:03d}" for i in range(n_regions)], n_years)
    year = np.tile(np.arange(2015, 2015 + n_years), n_regions)

    # Socio-economic structure is mostly regional and drifts a little from year to year.
    latent_region = rng.standard_normal((n_regions, 2))
    latent = np.repeat(latent_region, n_years, axis=0) * np.sqrt(0.9) + np.sqrt(0.1) * rng.standard_normal((n, 2))
    unique_sd = np.sqrt(1.0 - (_TRUE_LOADINGS**2).sum(axis=1))
    z_idx = latent @ _TRUE_LOADINGS.T + rng.standard_normal((n, len(_INDEX_NAMES))) * unique_sd
    indices = 20.0 + 8.0 * z_idx  # percent-like scale, as census indices are published

    z_pm25 = rng.standard_normal(n)
    z_no2 = 0.8 * z_pm25 + 0.6 * rng.standard_normal(n)  # collinear with pm25, no effect
    z_co = 0.6 * z_no2 + 0.8 * rng.standard_normal(n)  # collinear with no2, no effect
    z_so2 = rng.standard_normal(n)
    temperature = _TEMP_MEAN + _TEMP_SD * rng.standard_normal(n)

    factor_effects = {"education_health": 0.30, "housing": 0.0}
    linear_effects = {"pm25": 0.20}
    log_rate = (
        np.log(base_rate)
        + factor_effects["education_health"] * latent[:, 0]
        + linear_effects["pm25"] * z_pm25
        + SyntheticTruth.nonlinear_effect(temperature)
        + overdispersion * rng.standard_normal(n)
    )
    population = np.round(np.exp(rng.normal(np.log(60_000), 0.7, n))).astype(np.int64)
    cases = rng.poisson(population * np.exp(log_rate))

    key = pd.DataFrame({"region": region, "year": year})
    hospital = key.assign(hospitalizations=cases, population=population)
    census = pd.concat([key, pd.DataFrame(np.round(indices, 2), columns=list(_INDEX_NAMES))], axis=1)
    pollution = key.assign(
        pm25=np.round(25 + 8 * z_pm25, 2), no2=np.round(30 + 10 * z_no2, 2),
        co=np.round(1.2 + 0.3 * z_co, 3), so2=np.round(8 + 3 * z_so2, 2),
        temperature=np.round(temperature, 2),
    )

    drop = np.sort(rng.choice(n, size=n_unmatched, replace=False))
    pollution = pollution.drop(index=drop).reset_index(drop=True)
    extra = pd.DataFrame({"region": [f"R{n_regions + i:03d}" for i in range(n_unmatched)], "year": year[0]})
    extra_idx = pd.DataFrame(np.round(20 + 8 * rng.standard_normal((n_unmatched, 8)), 2), columns=list(_INDEX_NAMES))
    census = pd.concat([census, pd.concat([extra, extra_idx], axis=1)], ignore_index=True)

    keep = np.setdiff1d(np.arange(n), drop)
    merged = hospital.merge(census, on=["region", "year"]).merge(pollution, on=["region", "year"])
    unmatched = pd.concat([key.iloc[drop], extra], ignore_index=True)
    truth = SyntheticTruth(
        loadings=pd.DataFrame(_TRUE_LOADINGS, index=list(_INDEX_NAMES), columns=list(_FACTOR_NAMES)),
        factor_effects=factor_effects,
        linear_effects=linear_effects,
        noise=("no2", "co", "so2"),
        nonlinear="temperature",
        latent=latent[keep],
    )
    return SyntheticData(
        sources={"hospital": hospital, "census": census, "pollution": pollution},
        merged=merged, truth=truth, unmatched=unmatched,
    )
