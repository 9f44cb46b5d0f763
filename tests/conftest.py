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


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module of tiny-tensor tests (extra threads only wait for each other),
    restored afterwards so that other modules run as they would alone."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
