import matplotlib

matplotlib.use("Agg")

import pytest

from biogen.tabular import make_synthetic_health_data


@pytest.fixture(scope="session")
def synth():
    """Default generator settings and seed: the planted structure the tests recover."""
    return make_synthetic_health_data(seed=0)
