"""Small reference models used by the examples, tests and benchmarks.

Every prior is built on the data's device (``y.new_tensor``), so the models run on a GPU with
vectorized particles (see the docs' "Running on a GPU").

Eight schools (Rubin 1981; Gelman et al., *Bayesian Data Analysis*, section 5.5): the effect of
coaching in eight schools, with standard errors ``sigma``. The centred parameterization has a
funnel between ``tau`` and ``theta`` (Neal 2003) that Gaussian guides cannot follow; the
non-centred one removes it.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch

__all__ = ["eight_schools_data", "eight_schools_centered", "eight_schools_noncentered"]


def eight_schools_data(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """The observed effects ``y`` and their standard errors ``sigma``."""
    y = torch.tensor([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0], dtype=dtype)
    sigma = torch.tensor([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0], dtype=dtype)
    return y, sigma


def eight_schools_centered(y: torch.Tensor, sigma: torch.Tensor) -> None:
    """mu ~ N(0, 5), tau ~ HalfCauchy(5), theta_j ~ N(mu, tau), y_j ~ N(theta_j, sigma_j)."""
    mu = pyro.sample("mu", dist.Normal(y.new_tensor(0.0), 5.0))  # priors on the data's device
    tau = pyro.sample("tau", dist.HalfCauchy(y.new_tensor(5.0)))
    with pyro.plate("school", len(y)):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        pyro.sample("y", dist.Normal(theta, sigma), obs=y)


def eight_schools_noncentered(y: torch.Tensor, sigma: torch.Tensor) -> None:
    """As :func:`eight_schools_centered` with theta = mu + tau * theta_trans, theta_trans ~ N(0, 1)."""
    mu = pyro.sample("mu", dist.Normal(y.new_tensor(0.0), 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(y.new_tensor(5.0)))
    with pyro.plate("school", len(y)):
        theta_trans = pyro.sample("theta_trans", dist.Normal(y.new_tensor(0.0), 1.0))
        theta = pyro.deterministic("theta", mu + tau * theta_trans)
        pyro.sample("y", dist.Normal(theta, sigma), obs=y)
