"""Pyro versions of posteriordb's development posteriors, and how to compare them with its draws.

Each entry of :data:`POSTERIORS` says, for one posteriordb posterior name:

* ``model(data)``: the Pyro model, the math of ``shared/posteriordb/MODELS.md``;
* ``convert(values)``: posteriordb's data dict (``posterior.data.values()``) -> the model's
  argument, a dict of float64 tensors;
* ``to_reference(samples, data)``: draws of the model's latent sites (``{site: array (S, *shape)}``,
  constrained space) -> ``{reference name: array (S,)}``, with the reference draws' parameter names
  (e.g. ``theta[1]``; for the non-centred eight schools, ``theta = mu + tau * theta_trans``).

Conventions that keep every model vectorizable (``pyro_nf.diagnose`` and vectorized ELBO particles
put draws in a leading plate): the models use no plates; every latent is one site whose vector
part is an event dimension (``.to_event(1)``); the likelihood is one ``.to_event(1)`` site; the
code indexes from the right (``x[..., None]``), so any number of leading batch dimensions works.
A flat prior on a bounded parameter is ``dist.ImproperUniform``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from torch import Tensor

__all__ = ["POSTERIORS", "PosteriorSpec", "OrderedNormal", "load_posterior", "reference_draws"]

DTYPE = torch.float64


def _t(x) -> Tensor:
    return torch.as_tensor(np.asarray(x, dtype=float), dtype=DTYPE)


def _names(name: str, n: int) -> list[str]:
    return [f"{name}[{i + 1}]" for i in range(n)]


def _vector(samples: dict, site: str, ref: str) -> dict[str, np.ndarray]:
    x = np.asarray(samples[site])
    return {k: x[:, i] for i, k in enumerate(_names(ref, x.shape[-1]))}


def _scalars(samples: dict, *sites: str) -> dict[str, np.ndarray]:
    return {s: np.asarray(samples[s]).reshape(-1) for s in sites}


class OrderedNormal(dist.TorchDistribution):
    """iid :math:`\\mathcal N(\\mu, \\sigma)` restricted to increasing vectors (Stan's
    ``ordered[K] x; x ~ normal(mu, sigma)``).

    The density is :math:`K! \\prod_i \\mathcal N(x_i; \\mu, \\sigma)` on :math:`x_1 < \\dots < x_K`:
    exactly the law of the sorted iid draws, which is how it samples.
    """

    arg_constraints: dict = {}  # loc and scale are plain floats
    support = constraints.ordered_vector

    def __init__(self, loc: float, scale: float, size: int, validate_args=None) -> None:
        self.loc, self.scale, self.size = float(loc), float(scale), int(size)
        super().__init__(torch.Size(), torch.Size((size,)), validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        return dist.ExpandedDistribution(self, batch_shape)

    def sample(self, sample_shape=()) -> Tensor:
        x = torch.randn(tuple(sample_shape) + (self.size,), dtype=DTYPE)
        return (self.loc + self.scale * x).sort(-1).values

    def log_prob(self, value: Tensor) -> Tensor:
        lp = dist.Normal(self.loc, self.scale).log_prob(value).sum(-1)
        return lp + math.lgamma(self.size + 1)


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------
def eight_schools_noncentered(data: dict) -> None:
    y, sigma = data["y"], data["sigma"]
    mu = pyro.sample("mu", dist.Normal(_t(0.0), 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(_t(5.0)))
    theta_trans = pyro.sample("theta_trans", dist.Normal(_t(0.0), 1.0).expand([len(y)]).to_event(1))
    theta = mu[..., None] + tau[..., None] * theta_trans
    pyro.sample("y", dist.Normal(theta, sigma).to_event(1), obs=y)


def eight_schools_centered(data: dict) -> None:
    y, sigma = data["y"], data["sigma"]
    mu = pyro.sample("mu", dist.Normal(_t(0.0), 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(_t(5.0)))
    theta = pyro.sample(
        "theta", dist.Normal(mu[..., None], tau[..., None]).expand(mu.shape + y.shape).to_event(1)
    )
    pyro.sample("y", dist.Normal(theta, sigma).to_event(1), obs=y)


def _eight_schools_ncp_reference(samples: dict, data: dict) -> dict[str, np.ndarray]:
    mu, tau = (np.asarray(samples[s]).reshape(-1, 1) for s in ("mu", "tau"))
    theta = mu + tau * np.asarray(samples["theta_trans"])
    return {**_vector({"theta": theta}, "theta", "theta"), **_scalars(samples, "mu", "tau")}


def _eight_schools_cp_reference(samples: dict, data: dict) -> dict[str, np.ndarray]:
    return {**_vector(samples, "theta", "theta"), **_scalars(samples, "mu", "tau")}


def _diamonds_data(values: dict) -> dict:
    X = _t(values["X"])
    Xc = X[:, 1:] - X[:, 1:].mean(0)
    return {"Xc": Xc, "Y": _t(values["Y"])}


def diamonds(data: dict) -> None:
    Xc, Y = data["Xc"], data["Y"]
    k = Xc.shape[1]
    b = pyro.sample("b", dist.Normal(_t(0.0), 1.0).expand([k]).to_event(1))
    intercept = pyro.sample("Intercept", dist.StudentT(3.0, _t(8.0), 10.0))
    sigma = pyro.sample("sigma", dist.FoldedDistribution(dist.StudentT(3.0, _t(0.0), 10.0)))
    mean = intercept[..., None] + b @ Xc.T
    pyro.sample("Y", dist.Normal(mean, sigma[..., None]).to_event(1), obs=Y)


def _diamonds_reference(samples: dict, data: dict) -> dict[str, np.ndarray]:
    return {**_vector(samples, "b", "b"), **_scalars(samples, "Intercept", "sigma")}


def _gp_data(values: dict) -> dict:
    return {"x": _t(values["x"]), "k": _t(values["k"])}


def gp_latent(x: Tensor, rho: Tensor, alpha: Tensor, f_tilde: Tensor) -> Tensor:
    """:math:`f = \\operatorname{chol}(K) \\tilde f`, with the squared-exponential kernel ``K``."""
    d2 = (x[:, None] - x[None, :]) ** 2
    cov = alpha[..., None, None] ** 2 * torch.exp(-d2 / (2 * rho[..., None, None] ** 2))
    cov = cov + 1e-10 * torch.eye(len(x), dtype=cov.dtype)
    return (torch.linalg.cholesky(cov) @ f_tilde[..., None])[..., 0]


def gp_pois_regr(data: dict) -> None:
    x, k = data["x"], data["k"]
    rho = pyro.sample("rho", dist.Gamma(_t(25.0), 4.0))
    alpha = pyro.sample("alpha", dist.HalfNormal(_t(2.0)))
    f_tilde = pyro.sample("f_tilde", dist.Normal(_t(0.0), 1.0).expand([len(x)]).to_event(1))
    f = gp_latent(x, rho, alpha, f_tilde)
    pyro.sample("k", dist.Poisson(f.exp()).to_event(1), obs=k)


def _gp_reference(samples: dict, data: dict) -> dict[str, np.ndarray]:
    rho, alpha, f_tilde = (_t(samples[s]) for s in ("rho", "alpha", "f_tilde"))
    f = gp_latent(data["x"], rho.reshape(-1), alpha.reshape(-1), f_tilde).numpy()
    return {**_scalars(samples, "rho", "alpha"), **_vector({"f": f}, "f", "f")}


def _kilpisjarvi_data(values: dict) -> dict:
    keys = ("pmualpha", "psalpha", "pmubeta", "psbeta")
    return {"x": _t(values["x"]), "y": _t(values["y"]), **{k: float(values[k]) for k in keys}}


def kilpisjarvi(data: dict) -> None:
    x, y = data["x"], data["y"]
    alpha = pyro.sample("alpha", dist.Normal(_t(data["pmualpha"]), data["psalpha"]))
    beta = pyro.sample("beta", dist.Normal(_t(data["pmubeta"]), data["psbeta"]))
    sigma = pyro.sample("sigma", dist.ImproperUniform(constraints.positive, (), ()))
    mean = alpha[..., None] + beta[..., None] * x
    pyro.sample("y", dist.Normal(mean, sigma[..., None]).to_event(1), obs=y)


def _kilpisjarvi_reference(samples: dict, data: dict) -> dict[str, np.ndarray]:
    return _scalars(samples, "alpha", "beta", "sigma")


def _y_data(values: dict) -> dict:
    return {"y": _t(values["y"])}


def low_dim_gauss_mix(data: dict) -> None:
    y = data["y"]
    mu = pyro.sample("mu", OrderedNormal(0.0, 2.0, 2))
    sigma = pyro.sample("sigma", dist.HalfNormal(_t(2.0)).expand([2]).to_event(1))
    theta = pyro.sample("theta", dist.Beta(_t(5.0), 5.0))
    shape = theta.shape + y.shape + (2,)
    logits = torch.stack([theta.log(), torch.log1p(-theta)], -1)[..., None, :].expand(shape)
    comps = dist.Normal(mu[..., None, :], sigma[..., None, :]).expand(shape)
    pyro.sample(
        "y", dist.MixtureSameFamily(dist.Categorical(logits=logits), comps).to_event(1), obs=y
    )


def _gauss_mix_reference(samples: dict, data: dict) -> dict[str, np.ndarray]:
    return {
        **_vector(samples, "mu", "mu"),
        **_vector(samples, "sigma", "sigma"),
        **_scalars(samples, "theta"),
    }


def _ark_data(values: dict) -> dict:
    y, K = _t(values["y"]), int(values["K"])
    T = len(y)
    # lags[t, k] = y[t - k - 1] for t = K .. T-1 (0-based), i.e. beta[k+1] multiplies y[t-(k+1)]
    lags = torch.stack([y[K - k - 1 : T - k - 1] for k in range(K)], -1)
    return {"y": y[K:], "lags": lags}


def ark(data: dict) -> None:
    y, lags = data["y"], data["lags"]
    alpha = pyro.sample("alpha", dist.Normal(_t(0.0), 10.0))
    beta = pyro.sample("beta", dist.Normal(_t(0.0), 10.0).expand([lags.shape[1]]).to_event(1))
    sigma = pyro.sample("sigma", dist.HalfCauchy(_t(2.5)))
    mean = alpha[..., None] + beta @ lags.T
    pyro.sample("y", dist.Normal(mean, sigma[..., None]).to_event(1), obs=y)


def _ark_reference(samples: dict, data: dict) -> dict[str, np.ndarray]:
    return {
        **_scalars(samples, "alpha"),
        **_vector(samples, "beta", "beta"),
        **_scalars(samples, "sigma"),
    }


def _blr_data(values: dict) -> dict:
    return {"X": _t(values["X"]), "y": _t(values["y"])}


def blr(data: dict) -> None:
    X, y = data["X"], data["y"]
    beta = pyro.sample("beta", dist.Normal(_t(0.0), 10.0).expand([X.shape[1]]).to_event(1))
    sigma = pyro.sample("sigma", dist.HalfNormal(_t(10.0)))
    pyro.sample("y", dist.Normal(beta @ X.T, sigma[..., None]).to_event(1), obs=y)


def _blr_reference(samples: dict, data: dict) -> dict[str, np.ndarray]:
    return {**_vector(samples, "beta", "beta"), **_scalars(samples, "sigma")}


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PosteriorSpec:
    """One posterior: Pyro model, data conversion, and the map to the reference's names."""

    model: Callable[[dict], None]
    convert: Callable[[dict], dict]
    to_reference: Callable[[dict, dict], dict[str, np.ndarray]]
    note: str = ""


POSTERIORS: dict[str, PosteriorSpec] = {
    "eight_schools-eight_schools_noncentered": PosteriorSpec(
        eight_schools_noncentered,
        lambda v: {"y": _t(v["y"]), "sigma": _t(v["sigma"])},
        _eight_schools_ncp_reference,
        "theta = mu + tau * theta_trans",
    ),
    "eight_schools-eight_schools_centered": PosteriorSpec(
        eight_schools_centered,
        lambda v: {"y": _t(v["y"]), "sigma": _t(v["sigma"])},
        _eight_schools_cp_reference,
        "funnel between tau and theta",
    ),
    "diamonds-diamonds": PosteriorSpec(
        diamonds, _diamonds_data, _diamonds_reference, "N=5000 regression, cond(cov) ~ 3e5"
    ),
    "gp_pois_regr-gp_pois_regr": PosteriorSpec(
        gp_pois_regr, _gp_data, _gp_reference, "f = chol(K(rho, alpha)) f_tilde"
    ),
    "kilpisjarvi_mod-kilpisjarvi": PosteriorSpec(
        kilpisjarvi, _kilpisjarvi_data, _kilpisjarvi_reference, "corr(alpha, beta) = 1.000"
    ),
    "low_dim_gauss_mix-low_dim_gauss_mix": PosteriorSpec(
        low_dim_gauss_mix, _y_data, _gauss_mix_reference, "ordered mu, N=1000 mixture"
    ),
    "arK-arK": PosteriorSpec(ark, _ark_data, _ark_reference, "AR(5), T=200"),
    "sblrc-blr": PosteriorSpec(blr, _blr_data, _blr_reference, "linear regression, N=100"),
}


def reference_draws(posterior) -> dict[str, np.ndarray]:
    """A posteriordb posterior's reference draws, chains pooled: ``{name: array (n,)}``."""
    chains = posterior.reference_draws()
    return {k: np.concatenate([np.asarray(c[k], dtype=float) for c in chains]) for k in chains[0]}


def load_posterior(db, name: str) -> tuple[PosteriorSpec, dict, dict[str, np.ndarray]]:
    """``(spec, model data, pooled reference draws)`` for ``name`` from a ``PosteriorDatabase``."""
    if name not in POSTERIORS:
        raise KeyError(f"no Pyro model for {name!r}; known: {', '.join(POSTERIORS)}")
    posterior = db.posterior(name)
    spec = POSTERIORS[name]
    return spec, spec.convert(posterior.data.values()), reference_draws(posterior)
