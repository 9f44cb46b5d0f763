"""pytest set-up for the docstring examples of ``pyro_nf`` (run by ``--doctest-modules``).

``python -m pytest`` collects ``tests/`` and ``pyro_nf/`` (``testpaths`` in pyproject.toml). Every
docstring example starts like every test in ``tests/conftest.py``: an empty param store, seed 0,
matplotlib without a display; and it runs on one torch thread (the examples' tensors are tiny, and
on a loaded machine extra threads only wait for each other), with no figure left open afterwards.
"""

import matplotlib
import pyro
import pytest
import torch

matplotlib.use("Agg")


@pytest.fixture(autouse=True)
def _fresh_state_for_doctests(request):
    if type(request.node).__name__ != "DoctestItem":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    try:
        yield
    finally:
        pyro.clear_param_store()
        torch.set_num_threads(threads)
        import matplotlib.pyplot as plt

        plt.close("all")
