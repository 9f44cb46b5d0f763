"""Shared test set-up: every test starts with an empty param store, a fixed seed, no open figures."""

import matplotlib
import pyro
import pytest

matplotlib.use("Agg")


@pytest.fixture(autouse=True)
def _fresh_pyro_state():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    yield
    pyro.clear_param_store()
    import matplotlib.pyplot as plt

    plt.close("all")
