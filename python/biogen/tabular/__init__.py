"""Multifactorial analysis of health outcomes (seed 001, part 2).

Counts (e.g. diabetes hospitalisations per region and year) against socio-economic indices and air
pollutants: :func:`join_sources` (checked joins), :func:`prepare_table` (bad-input policy),
:func:`fit_factors` (factor analysis with varimax), :func:`l1_poisson_cv` (L1-penalised Poisson
with cross-validated strength and bootstrap selection frequency), :func:`fit_boosting` (Poisson
gradient boosting, permutation importance, partial dependence), :func:`run_analysis` (all of it, with
tables, plots and a report) and :func:`make_synthetic_health_data` (planted effects).
"""

from .analysis import AnalysisConfig, AnalysisResult, run_analysis
from .boosting import BoostingResult, fit_boosting
from .data import JoinReport, PreparedData, TabularInputError, join_sources, prepare_table
from .factors import FactorResult, factor_congruence, fit_factors
from .penalized import L1PoissonResult, fit_l1_poisson, l1_poisson_cv, poisson_deviance
from .synthetic import SyntheticData, SyntheticTruth, make_synthetic_health_data

__all__ = [
    "AnalysisConfig", "AnalysisResult", "run_analysis",
    "BoostingResult", "fit_boosting",
    "JoinReport", "PreparedData", "TabularInputError", "join_sources", "prepare_table",
    "FactorResult", "factor_congruence", "fit_factors",
    "L1PoissonResult", "fit_l1_poisson", "l1_poisson_cv", "poisson_deviance",
    "SyntheticData", "SyntheticTruth", "make_synthetic_health_data",
]
