"""``pyro_nf.to_inference_data``: guide draws as ArviZ data.

ArviZ 0.x gets an :class:`arviz.InferenceData` (:func:`arviz.from_dict`), ArviZ 1.x an
:class:`xarray.DataTree` (:func:`arviz_base.from_dict`); :mod:`pyro_nf._arviz` decides which.
Both have the same groups, variables and dimension names.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from . import _checks
from ._arviz import ARVIZ_0, ARVIZ_1, arviz_line, missing_arviz_message
from ._importance import Draws, draw, psis

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


def _num_chains(num_samples: int, num_chains: int | None) -> int:
    """``num_chains`` checked against ``num_samples``; ``None``: 4 or 2 chains when that divides
    ``num_samples`` into chains of at least 4 draws (the fewest ArviZ's R-hat accepts), else 1."""
    if num_chains is None:
        return next((c for c in (4, 2) if num_samples % c == 0 and num_samples >= 4 * c), 1)
    _checks.integer(num_chains, "num_chains")
    if num_samples % num_chains:
        raise ValueError(
            f"num_samples ({num_samples}) must be a multiple of num_chains ({num_chains}): the "
            "draws are split into chains of equal length"
        )
    return num_chains


def _resample_index(log_weight: np.ndarray, seed: int | None) -> np.ndarray:
    """Indices of ``len(log_weight)`` draws resampled (with replacement) by PSIS weights."""
    if not np.isfinite(log_weight).all():
        raise ValueError("cannot resample: some importance weights are not finite")
    smoothed, _ = psis(log_weight)
    p = np.exp(smoothed - smoothed.max())
    return np.random.default_rng(seed).choice(log_weight.size, size=log_weight.size, p=p / p.sum())


def _groups(draws: Draws, index: np.ndarray, num_chains: int) -> tuple[dict, dict]:
    """``({group: {name: array}}, {name: dims})``; sampled arrays are laid out (chain, draw, ...)."""

    def chains(x: np.ndarray) -> np.ndarray:
        x = x[index]
        return x.reshape((num_chains, -1) + x.shape[1:])

    posterior, observed, dims = {}, {}, {}
    for name, site in draws.sites.items():
        value = draws.values[name].detach().cpu().numpy()
        if site["is_observed"] and not site["infer"].get("_deterministic"):
            observed[name] = value[0]
        else:
            posterior[name] = chains(value)
        dims[name] = _dims(name, site)
    sample_stats = {
        "log_q": chains(draws.log_q.detach().double().cpu().numpy()),
        "log_p": chains(draws.log_p.detach().double().cpu().numpy()),
        "log_weight": chains(draws.log_weight.cpu().numpy()),
    }
    groups = {"posterior": posterior, "sample_stats": sample_stats, "observed_data": observed}
    return groups, dims


def _from_dict(groups: dict, dims: dict, attrs: dict):
    """The ArviZ object of the installed line (:mod:`pyro_nf._arviz`)."""
    line = arviz_line()
    if line == ARVIZ_0:
        import arviz

        idata = arviz.from_dict(**groups, dims=dims)
        for name in idata.groups():  # (from_dict's attrs= would land in observed_data only)
            idata[name].attrs.update(attrs)
        return idata
    if line == ARVIZ_1:
        import arviz_base

        data = {name: group for name, group in groups.items() if group}
        return arviz_base.from_dict(
            data, dims=dims, attrs={"/": attrs} | dict.fromkeys(data, attrs)
        )
    raise ImportError(missing_arviz_message("pyro_nf.to_inference_data"))


def to_inference_data(
    model: Callable,
    guide: Callable,
    *args,
    num_samples: int = 1000,
    num_chains: int | None = None,
    resample: bool = False,
    seed: int | None = None,
    chunk_size: int = 500,
    vectorize: bool | None = None,
    **kwargs,
):
    """Draws from ``guide`` as ArviZ data: an :class:`arviz.InferenceData` with ArviZ 0.x, an
    :class:`xarray.DataTree` with ArviZ 1.x (same groups, variables and dimensions).

    Groups:
        * ``posterior``: every latent site in its constrained space and every
          ``pyro.deterministic`` site; dimensions are named after the plates that index them.
        * ``sample_stats``: ``log_q`` (guide log-density), ``log_p`` (model joint log-density)
          and ``log_weight = log_p - log_q`` of each draw.
        * ``observed_data``: the observed sites.

    Chains: the ``num_samples`` draws are independent, and they are split, in the order drawn,
    into ``num_chains`` "chains" of equal length (``chain`` x ``draw`` = ``num_samples``). By
    default that is 4 chains, or 2 when ``num_samples`` is not a multiple of 4 (each of at least
    4 draws; else 1 chain), so ArviZ's multi-chain checks apply: ``arviz.summary`` reports ESS and an R-hat near 1 instead of
    warning about a single chain. ``num_chains`` must divide ``num_samples``.

    With ``resample=True`` the draws are importance-resampled (with replacement) by their
    Pareto-smoothed weights, which corrects the guide towards the posterior when PSIS k-hat is
    small; ``sample_stats`` then describes the resampled draws.

    ``arviz.summary`` and ArviZ's plots work on the result unchanged.

    Example:
        >>> import pyro, pyro.distributions as dist, torch, pyro_nf
        >>> def model(y):
        ...     mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        ...     with pyro.plate("obs", len(y)):
        ...         pyro.sample("y", dist.Normal(mu, 1.0), obs=y)
        >>> guide = pyro_nf.AutoPlanarFlow(model, num_transforms=2)
        >>> idata = pyro_nf.to_inference_data(model, guide, torch.zeros(3), num_samples=100)
        >>> idata.posterior["mu"].shape, list(idata.observed_data["y"].dims)
        ((4, 25), ['obs'])
    """
    if resample and not (isinstance(num_samples, int) and num_samples >= 2):
        raise ValueError(
            f"to_inference_data(resample=True) needs num_samples >= 2 to resample from (Pareto "
            f"smoothing of the importance weights needs several draws), got {num_samples!r}"
        )
    _checks.integer(num_samples, "num_samples")
    num_chains = _num_chains(num_samples, num_chains)
    draws = draw(
        model, guide, args, kwargs, num_samples, chunk_size, keep_values=True, vectorize=vectorize
    )
    index = np.arange(num_samples)
    if resample:
        index = _resample_index(draws.log_weight.cpu().numpy(), seed)
    groups, dims = _groups(draws, index, num_chains)
    return _from_dict(groups, dims, {"inference_library": "pyro_nf", "resampled": int(resample)})
