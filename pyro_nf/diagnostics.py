"""Checking a fitted guide: importance weights, PSIS k-hat, ESS, ELBO and IW-ELBO, log p(x).

Every check here starts from the importance log-weights of draws from the guide,

.. math::
    \\log w_s = \\log p(x, z_s) - \\log q(z_s), \\qquad z_s \\sim q,

computed in chunks of draws vectorized through a ``pyro.plate`` (falling back to one draw at a
time for models that do not vectorize; the machinery is in :mod:`pyro_nf._importance`). From them:

* the ELBO :math:`\\frac1S \\sum_s \\log w_s` and the importance-weighted bound (IWAE, Burda et
  al. 2016) :math:`\\log \\frac1S \\sum_s w_s`, each with a standard error;
* the Pareto-smoothed importance sampling shape :math:`\\hat k` (Vehtari et al. 2024, by
  ArviZ's PSIS -- ``arviz.psislw`` on ArviZ 0.x, ``arviz_stats``' ``psislw`` on 1.x --
  or, without ArviZ, by pyro_nf's own smoothing on :func:`pyro.ops.stats.fit_generalized_pareto`),
  read with the thresholds of Yao et al. (2018): :math:`\\hat k < 0.5` good,
  :math:`0.5 \\le \\hat k \\le 0.7` use with care, :math:`\\hat k > 0.7` do not trust;
* the importance-sampling effective sample size :math:`(\\sum w)^2 / \\sum w^2`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from . import _checks
from ._importance import draw, psis

__all__ = [
    "diagnose",
    "Diagnostics",
    "log_marginal_likelihood",
    "LogMarginalLikelihood",
    "psis_verdict",
]


# --------------------------------------------------------------------------------------------
# Estimators
# --------------------------------------------------------------------------------------------
def _logmeanexp_and_se(lw: torch.Tensor, dim: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """log mean exp(lw) along dim and its delta-method standard error."""
    n = lw.shape[dim]
    m = lw.max(dim, keepdim=True).values
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    w = (lw - m).exp()
    mean = w.mean(dim)
    value = mean.log() + m.squeeze(dim)
    se = w.std(dim) / (mean * math.sqrt(n)) if n > 1 else torch.full_like(mean, float("nan"))
    return value, se


def psis_verdict(k_hat: float) -> str:
    """Plain-words reading of a PSIS :math:`\\hat k` (Yao et al. 2018 thresholds).

    Example:
        >>> [psis_verdict(k).split(":")[0] for k in (0.3, 0.6, 0.9, float("nan"))]
        ['good', 'use with care', 'do not trust', 'do not trust']
    """
    if not math.isfinite(k_hat):
        return "do not trust: k-hat could not be estimated (non-finite importance weights)"
    if k_hat < 0.5:
        return "good: k-hat < 0.5, the guide covers the posterior and importance-weighted estimates are reliable"
    if k_hat <= 0.7:
        return (
            "use with care: 0.5 <= k-hat <= 0.7, the guide misses part of the posterior; "
            "importance weighting helps but needs many draws"
        )
    return (
        "do not trust: k-hat > 0.7, the guide misses important parts of the posterior "
        "(too narrow or wrong shape); a richer guide, a reparameterized model or MCMC is needed"
    )


@dataclass
class Diagnostics:
    """What :func:`diagnose` returns; ``print(d)`` shows a table.

    Attributes:
        k_hat: PSIS Pareto shape estimate.
        ess: importance-sampling effective sample size of the raw weights.
        elbo, elbo_se: the ELBO estimate and its standard error.
        iw_elbo, iw_elbo_se: the importance-weighted ELBO (IWAE bound) and its standard error.
        num_samples: number of draws.
        log_weights: the raw log importance weights (numpy array).
        verdict: the plain-words reading of ``k_hat``.

    Example:
        >>> import pyro, pyro.distributions as dist, pyro_nf
        >>> def model():
        ...     pyro.sample("x", dist.Normal(0.0, 1.0))
        >>> def guide():  # a little too wide: every draw is usable
        ...     pyro.sample("x", dist.Normal(0.0, 1.2))
        >>> d = pyro_nf.diagnose(model, guide, num_samples=500)
        >>> d.num_samples, d.log_weights.shape, d.ess_fraction > 0.8, d.iw_elbo >= d.elbo
        (500, (500,), True, True)
    """

    k_hat: float
    ess: float
    elbo: float
    elbo_se: float
    iw_elbo: float
    iw_elbo_se: float
    num_samples: int
    log_weights: np.ndarray
    verdict: str

    @property
    def ess_fraction(self) -> float:
        """``ess / num_samples``, in (0, 1]."""
        return self.ess / self.num_samples

    def as_dict(self) -> dict:
        """The numbers and the verdict (not the log-weights) as a plain dict."""
        return {
            "k_hat": self.k_hat,
            "ess": self.ess,
            "ess_fraction": self.ess_fraction,
            "elbo": self.elbo,
            "elbo_se": self.elbo_se,
            "iw_elbo": self.iw_elbo,
            "iw_elbo_se": self.iw_elbo_se,
            "num_samples": self.num_samples,
            "verdict": self.verdict,
        }

    def __str__(self) -> str:
        return (
            f"PSIS k-hat   {self.k_hat:10.3f}\n"
            f"IS ESS       {self.ess:10.1f}  ({100 * self.ess_fraction:.1f}% of {self.num_samples})\n"
            f"ELBO         {self.elbo:10.3f} +- {self.elbo_se:.3f}\n"
            f"IW-ELBO      {self.iw_elbo:10.3f} +- {self.iw_elbo_se:.3f}\n"
            f"verdict      {self.verdict}"
        )


def diagnose(
    model: Callable,
    guide: Callable,
    *args,
    num_samples: int = 1000,
    chunk_size: int = 500,
    vectorize: bool | None = None,
    **kwargs,
) -> Diagnostics:
    """Importance-sampling diagnostics of a fitted guide against its model.

    Draws ``num_samples`` latents from ``guide`` (vectorized in chunks of ``chunk_size`` through a
    plate; ``vectorize=None`` falls back to one draw at a time if the model does not vectorize),
    scores them under ``model``, and summarises the log-weights (module docs). Works for any guide,
    Pyro's autoguides included. For :class:`~pyro_nf.AutoHierarchicalFlow` the weights are over
    the globals with the locals integrated out by importance sampling
    (:meth:`~pyro_nf.AutoHierarchicalFlow.global_log_weights`; call it with the model on the
    full data).

    Example:
        >>> import pyro, pyro.distributions as dist, torch, pyro_nf
        >>> def model():
        ...     pyro.sample("x", dist.Normal(0.0, 1.0))
        >>> def guide():
        ...     pyro.sample("x", dist.Normal(0.0, 1.2))
        >>> d = pyro_nf.diagnose(model, guide, num_samples=2000)
        >>> d.k_hat < 0.5, d.verdict.split(":")[0]
        (True, 'good')
    """
    if hasattr(guide, "global_log_weights"):  # AutoHierarchicalFlow: locals integrated out
        _checks.integer(num_samples, "num_samples")
        lw = guide.global_log_weights(model, *args, num_samples=num_samples, **kwargs).double()
    else:
        lw = draw(
            model, guide, args, kwargs, num_samples, chunk_size, vectorize=vectorize
        ).log_weight
    elbo = lw.mean().item()
    elbo_se = (lw.std() / math.sqrt(num_samples)).item() if num_samples > 1 else float("nan")
    iw, iw_se = _logmeanexp_and_se(lw)
    lw_np = lw.cpu().numpy()
    if np.isfinite(lw_np).all() and num_samples > 1:
        _, k_hat = psis(lw_np)
    else:
        k_hat = float("nan")
    ess = math.exp(2 * torch.logsumexp(lw, 0).item() - torch.logsumexp(2 * lw, 0).item())
    return Diagnostics(
        k_hat=k_hat,
        ess=ess,
        elbo=elbo,
        elbo_se=elbo_se,
        iw_elbo=iw.item(),
        iw_elbo_se=iw_se.item(),
        num_samples=num_samples,
        log_weights=lw_np,
        verdict=psis_verdict(k_hat),
    )


@dataclass
class LogMarginalLikelihood:
    """What :func:`log_marginal_likelihood` returns; ``float(result)`` is the estimate.

    Attributes:
        value: the IWAE estimate of :math:`\\log p(x)` (summed over datapoints when
            ``data_plate`` is given).
        se: its standard error (delta method).
        num_samples: draws per estimate.
        per_datapoint, per_datapoint_se: with ``data_plate``, one estimate per datapoint.

    Example:
        >>> import pyro, pyro.distributions as dist, torch, pyro_nf
        >>> def model(x):
        ...     with pyro.plate("data", len(x)):
        ...         z = pyro.sample("z", dist.Normal(0.0, 1.0))
        ...         pyro.sample("x", dist.Normal(z, 1.0), obs=x)
        >>> def guide(x):  # each datapoint's exact posterior N(x / 2, 1 / 2)
        ...     with pyro.plate("data", len(x)):
        ...         pyro.sample("z", dist.Normal(x / 2, 0.5**0.5))
        >>> x = torch.tensor([0.0, 1.0])
        >>> est = pyro_nf.log_marginal_likelihood(model, guide, x, num_samples=10, data_plate="data")
        >>> exact = dist.Normal(0.0, 2**0.5).log_prob(x).double()
        >>> est.per_datapoint.shape, torch.allclose(est.per_datapoint, exact, atol=1e-5)
        (torch.Size([2]), True)
        >>> abs(float(est) - exact.sum().item()) < 1e-5
        True
    """

    value: float
    se: float
    num_samples: int
    per_datapoint: torch.Tensor | None = None
    per_datapoint_se: torch.Tensor | None = None

    def __float__(self) -> float:
        return self.value

    def __repr__(self) -> str:
        return f"LogMarginalLikelihood({self.value:.4f} +- {self.se:.4f}, num_samples={self.num_samples})"


def log_marginal_likelihood(
    model: Callable,
    guide: Callable,
    *args,
    num_samples: int = 5000,
    chunk_size: int = 100,
    data_plate: str | None = None,
    vectorize: bool | None = None,
    **kwargs,
) -> LogMarginalLikelihood:
    """Importance-weighted (IWAE) estimate of :math:`\\log p(x)` with its standard error.

    .. math::
        \\log p(x) \\approx \\log \\frac{1}{S} \\sum_{s=1}^S \\frac{p(x, z_s)}{q(z_s)}, \\quad z_s \\sim q,

    a stochastic lower bound that tightens as ``num_samples`` grows (Burda et al. 2016). Draws are
    taken ``chunk_size`` at a time, so memory stays bounded whatever ``num_samples``.

    For a VAE, pass ``data_plate="data"`` (the name of the plate over datapoints): each
    datapoint's latent is independent given its data, so :math:`\\log p(x_i)` is estimated
    separately for every datapoint with ``num_samples`` draws each, and ``value`` is their sum
    (``per_datapoint`` holds each; the log-densities are not rescaled by subsampling).

    Example:
        >>> import pyro, pyro.distributions as dist, torch, pyro_nf
        >>> def model():
        ...     z = pyro.sample("z", dist.Normal(0.0, 1.0))
        ...     pyro.sample("x", dist.Normal(z, 1.0), obs=torch.tensor(0.5))
        >>> def guide():  # the exact posterior N(0.25, 1/2): every weight equals p(x)
        ...     pyro.sample("z", dist.Normal(0.25, 0.5**0.5))
        >>> est = pyro_nf.log_marginal_likelihood(model, guide, num_samples=100)
        >>> exact = dist.Normal(0.0, 2**0.5).log_prob(torch.tensor(0.5)).item()
        >>> abs(est.value - exact) < 1e-5
        True
    """
    draws = draw(
        model,
        guide,
        args,
        kwargs,
        num_samples,
        chunk_size,
        data_plate=data_plate,
        vectorize=vectorize,
    )
    lw = draws.log_weight
    value, se = _logmeanexp_and_se(lw)
    if data_plate is None:
        return LogMarginalLikelihood(value.item(), se.item(), num_samples)
    return LogMarginalLikelihood(
        value.sum().item(),
        se.pow(2).sum().sqrt().item(),
        num_samples,
        per_datapoint=value,
        per_datapoint_se=se,
    )
