"""``pyro_nf.to_inference_data``: guide draws as an :class:`arviz.InferenceData`."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable

import numpy as np

from .diagnostics import _draw, _psis

__all__ = ["to_inference_data"]


def _dims(name: str, site: dict) -> list[str]:
    """Dimension names of a site's value: plate names where plates index it, else ``name_dim_i``."""
    value = site["value"]
    # pyro.deterministic gives its Delta every dimension as an event dimension; plates still index
    # its leading ones, counted from the right as for a batch dimension.
    event_dim = 0 if site["infer"].get("_deterministic") else site["fn"].event_dim
    names = [f"{name}_dim_{i}" for i in range(value.dim())]
    for frame in site["cond_indep_stack"]:
        if not frame.vectorized:
            continue
        axis = value.dim() - event_dim + frame.dim
        if 0 <= axis < value.dim() and value.shape[axis] == frame.size:
            names[axis] = frame.name
    return names


def to_inference_data(
    model: Callable,
    guide: Callable,
    *args,
    num_samples: int = 1000,
    resample: bool = False,
    seed: int | None = None,
    chunk_size: int = 500,
    vectorize: bool | None = None,
    **kwargs,
):
    """Draws from ``guide`` as an :class:`arviz.InferenceData` (one chain).

    Groups:
        * ``posterior``: every latent site in its constrained space and every
          ``pyro.deterministic`` site; dimensions are named after the plates that index them.
        * ``sample_stats``: ``log_q`` (guide log-density), ``log_p`` (model joint log-density)
          and ``log_weight = log_p - log_q`` of each draw.
        * ``observed_data``: the observed sites.

    With ``resample=True`` the draws are importance-resampled (with replacement) by their
    Pareto-smoothed weights, which corrects the guide towards the posterior when PSIS k-hat is
    small; ``sample_stats`` then describes the resampled draws.

    ``arviz.summary`` and ``arviz.plot_pair`` work on the result unchanged.

    Example:
        >>> import pyro, pyro.distributions as dist, torch, pyro_nf
        >>> def model(y):
        ...     mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        ...     with pyro.plate("obs", len(y)):
        ...         pyro.sample("y", dist.Normal(mu, 1.0), obs=y)
        >>> guide = pyro_nf.AutoPlanarFlow(model, num_transforms=2)
        >>> idata = pyro_nf.to_inference_data(model, guide, torch.zeros(3), num_samples=100)
        >>> idata.posterior["mu"].shape, list(idata.observed_data["y"].dims)
        ((1, 100), ['obs'])
    """
    import arviz as az

    if resample and not (isinstance(num_samples, int) and num_samples >= 2):
        raise ValueError(
            f"to_inference_data(resample=True) needs num_samples >= 2 to resample from (Pareto "
            f"smoothing of the importance weights needs several draws), got {num_samples!r}"
        )
    draws = _draw(
        model, guide, args, kwargs, num_samples, chunk_size, keep_values=True, vectorize=vectorize
    )
    log_weight = (draws.log_p - draws.log_q).double().cpu().numpy()
    index = np.arange(num_samples)
    if resample:
        if not np.isfinite(log_weight).all():
            raise ValueError("cannot resample: some importance weights are not finite")
        smoothed, _ = _psis(log_weight)
        p = np.exp(smoothed - smoothed.max())
        index = np.random.default_rng(seed).choice(num_samples, size=num_samples, p=p / p.sum())

    posterior, observed, dims = {}, {}, {}
    for name, site in draws.sites.items():
        value = draws.values[name].detach().cpu().numpy()
        if site["is_observed"] and not site["infer"].get("_deterministic"):
            observed[name] = value[0]
        else:
            posterior[name] = value[index][None]
        dims[name] = _dims(name, site)

    def stat(x):
        return x.detach().double().cpu().numpy()[index][None]

    logger = logging.getLogger("arviz")
    level = logger.level
    logger.setLevel(logging.ERROR)  # one chain is not an error here: silence "shape validation"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            idata = az.from_dict(
                posterior=posterior,
                sample_stats={
                    "log_q": stat(draws.log_q),
                    "log_p": stat(draws.log_p),
                    "log_weight": log_weight[index][None],
                },
                observed_data=observed,
                dims=dims,
                attrs={"inference_library": "pyro_nf", "resampled": int(resample)},
            )
    finally:
        logger.setLevel(level)
    return idata
