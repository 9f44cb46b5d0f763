"""Importance sampling from a guide: draw, score under the model, Pareto-smooth the weights.

The shared machinery of :func:`pyro_nf.diagnose`, :func:`pyro_nf.log_marginal_likelihood` and
:func:`pyro_nf.to_inference_data`:

* :func:`draw` takes draws :math:`z_s \\sim q` in chunks vectorized through a ``pyro.plate`` (or
  one at a time for models that do not vectorize) and returns :math:`\\log p(x, z_s)`,
  :math:`\\log q(z_s)` and, on request, every model site's value;
* :func:`psis` Pareto-smooths the log-weights :math:`\\log w_s = \\log p(x, z_s) - \\log q(z_s)`
  and estimates the tail shape :math:`\\hat k`, with the installed ArviZ (:mod:`pyro_nf._arviz`)
  or, without one, with :func:`pareto_smooth`.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import numpy as np
import pyro
import pyro.poutine as poutine
import torch
from pyro.ops.stats import fit_generalized_pareto
from pyro.poutine.util import site_is_subsample

from . import _checks
from ._arviz import ARVIZ_0, ARVIZ_1, arviz_line
from ._devices import model_device, site_values

DRAWS_PLATE = "_pyro_nf_draws"


# --------------------------------------------------------------------------------------------
# Drawing from the guide and scoring under the model
# --------------------------------------------------------------------------------------------
@dataclass
class Draws:
    """Draws from a guide scored under the model."""

    log_p: torch.Tensor  # (S,) or (S, B) with a data plate
    log_q: torch.Tensor
    values: dict[str, torch.Tensor] = field(default_factory=dict)  # model sites, (S, *shape)
    sites: dict[str, dict] = field(default_factory=dict)  # prototype model sites

    @property
    def log_weight(self) -> torch.Tensor:
        """``log_p - log_q`` in double precision."""
        return (self.log_p - self.log_q).double()


@dataclass
class _Setup:
    """What one traced draw tells about the model and guide, for the chunks that follow."""

    nesting: int  # plate dims in use: the draws plate goes left of them
    device: torch.device | None
    keep_dim: int | None  # the data plate's dim, kept apart from the sum (per-datapoint)
    sites: dict[str, dict]  # model sample sites whose values are kept
    unscaled: bool  # per-datapoint estimates ignore subsampling scales


def _trace_pair(model, guide, args, kwargs):
    guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
    return guide_trace, model_trace


def _setup(model, guide, args, kwargs, data_plate: str | None) -> _Setup:
    with torch.no_grad(), poutine.block():
        guide_trace, model_trace = _trace_pair(model, guide, args, kwargs)
    nesting = 0
    for tr in (guide_trace, model_trace):
        for site in tr.nodes.values():
            if site["type"] == "sample":
                for frame in site["cond_indep_stack"]:
                    if frame.vectorized:
                        nesting = max(nesting, -frame.dim)
    device = model_device(
        "pyro_nf's diagnostics",
        site_values(model_trace, observed=True),
        args,
        kwargs,
        site_values(model_trace, observed=False),
    )
    keep_dim = None
    if data_plate is not None:
        keep_dim = data_plate_dim(guide_trace, model_trace, data_plate)
    sites = {
        name: site
        for name, site in model_trace.nodes.items()
        if site["type"] == "sample" and not site_is_subsample(site) and not name.startswith("_")
    }
    return _Setup(nesting, device, keep_dim, sites, unscaled=data_plate is not None)


def data_plate_dim(guide_trace, model_trace, data_plate: str) -> int:
    """The dim of plate ``data_plate``, which must hold every guide latent."""
    dim = None
    for tr in (guide_trace, model_trace):
        for site in tr.nodes.values():
            if site["type"] != "sample" or site_is_subsample(site):
                continue
            frames = {f.name: f for f in site["cond_indep_stack"]}
            if data_plate in frames:
                dim = frames[data_plate].dim
            elif tr is guide_trace and not site["infer"].get("is_auxiliary"):
                raise ValueError(
                    f"per-datapoint estimates need every guide latent inside plate {data_plate!r}, "
                    f"but site {site['name']!r} is not (a global latent couples the datapoints); "
                    "use data_plate=None for the joint estimate"
                )
    if dim is None:
        raise ValueError(f"no sample site is inside a plate named {data_plate!r}")
    return dim


def site_sums(
    trace, n: int, nesting: int, keep_dim: int | None, unscaled: bool, device=None
) -> torch.Tensor | None:
    """Sum each site's log-prob over everything but the draws dim (and ``keep_dim``), on
    ``device`` (a prior written with Python numbers can give a CPU log-density in a CUDA model).

    ``None`` when the trace holds no log-density at all (e.g. an empty guide).
    """
    total = None
    for site in trace.nodes.values():
        if site["type"] != "sample" or site_is_subsample(site):  # (a plate's indices: no density)
            continue
        lp = site["unscaled_log_prob"] if unscaled else site["log_prob"]
        if unscaled and site["mask"] is not None:
            lp = lp * site["mask"]
        if not torch.is_tensor(lp):
            continue
        if device is not None:
            lp = lp.to(device)
        lp = lp.reshape((1,) * max(0, nesting + 1 - lp.dim()) + lp.shape)  # pad to draws dim
        dims = [d for d in range(-nesting, 0) if d != keep_dim]
        lp = lp.sum(dims, keepdim=keep_dim is not None) if dims else lp
        if keep_dim is not None:
            lp = lp.reshape(lp.shape[0], -1)
        total = lp if total is None else total + lp
    if total is None:
        return None
    return total.expand((n,) + total.shape[1:]) if total.shape[0] == 1 else total


def _log_densities(guide_trace, model_trace, n: int, setup: _Setup):
    """Per-draw ``(log_p, log_q)``, shape ``(n,)`` (or ``(n, B)`` with a data plate)."""
    guide_trace.compute_log_prob()
    model_trace.compute_log_prob()
    args = (n, setup.nesting, setup.keep_dim, setup.unscaled, setup.device)
    log_q, log_p = site_sums(guide_trace, *args), site_sums(model_trace, *args)
    # a side with no log-density contributes zeros of the other's dtype and device
    if log_q is None or log_p is None:
        other = log_p if log_q is None else log_q
        zeros = torch.zeros(n, device=setup.device) if other is None else torch.zeros_like(other)
        log_q = zeros if log_q is None else log_q
        log_p = zeros if log_p is None else log_p
    expected = (n,) if setup.keep_dim is None else (n, log_p.shape[-1])
    if log_p.shape != expected or log_q.shape != log_p.shape:
        # e.g. a model whose sites broadcast against the draws plate in the wrong dims
        raise ValueError(
            f"per-draw log densities have shapes {tuple(log_p.shape)} (model) and "
            f"{tuple(log_q.shape)} (guide), expected {expected}"
        )
    return log_p, log_q


def _site_values(model_trace, n: int, sites: dict[str, dict]) -> dict[str, torch.Tensor]:
    values = {}
    for name, proto in sites.items():
        shape, v = proto["value"].shape, model_trace.nodes[name]["value"]
        # a value that does not depend on the draws (observed data) is repeated
        v = v.expand((n,) + shape) if v.numel() == shape.numel() else v
        values[name] = v.reshape((n,) + shape)
    return values


def _chunk(model, guide, args, kwargs, n: int, setup: _Setup, vectorized: bool, keep_values):
    with torch.no_grad(), poutine.block():
        if vectorized:
            with pyro.plate(DRAWS_PLATE, n, dim=-(setup.nesting + 1), device=setup.device):
                guide_trace, model_trace = _trace_pair(model, guide, args, kwargs)
        else:
            guide_trace, model_trace = _trace_pair(model, guide, args, kwargs)
        log_p, log_q = _log_densities(guide_trace, model_trace, n, setup)
        values = _site_values(model_trace, n, setup.sites) if keep_values else {}
    return log_p, log_q, values


def draw(
    model,
    guide,
    args,
    kwargs,
    num_samples: int,
    chunk_size: int,
    *,
    keep_values: bool = False,
    data_plate: str | None = None,
    vectorize: bool | None = None,
) -> Draws:
    """``num_samples`` draws from ``guide`` scored under ``model``, ``chunk_size`` at a time.

    ``vectorize=None`` tries a plate over the draws and, if the model or guide fails under it,
    warns and draws one at a time; ``True`` raises that failure, ``False`` never vectorizes.
    """
    _checks.integer(num_samples, "num_samples")
    _checks.integer(chunk_size, "chunk_size")
    if vectorize is None and getattr(guide, "_draws_one_at_a_time", False):
        vectorize = False  # a guide that does not vectorize over draws (AutoHierarchicalFlow)
    setup = _setup(model, guide, args, kwargs, data_plate)
    chunks = []
    vectorized = vectorize is not False
    done = 0
    while done < num_samples:
        n = min(chunk_size, num_samples - done) if vectorized else 1
        try:
            chunks.append(_chunk(model, guide, args, kwargs, n, setup, vectorized, keep_values))
        except Exception as e:  # noqa: BLE001 - any failure of the vectorized trace: go one by one
            if not vectorized or vectorize is True:
                raise
            warnings.warn(
                f"the model/guide did not vectorize over draws ({type(e).__name__}: {e}); "
                "drawing one at a time (slower). Pass vectorize=False to skip this attempt.",
                stacklevel=4,
            )
            vectorized = False
            continue
        done += n
    log_p = torch.cat([c[0] for c in chunks])
    log_q = torch.cat([c[1] for c in chunks])
    values = {k: torch.cat([c[2][k] for c in chunks]) for k in chunks[0][2]}
    return Draws(log_p, log_q, values, setup.sites)


# --------------------------------------------------------------------------------------------
# Pareto-smoothed importance sampling
# --------------------------------------------------------------------------------------------
def _logsumexp(x: np.ndarray) -> float:
    m = x.max()
    return float(m + np.log(np.exp(x - m).sum()))


def _gpd_quantile(p: np.ndarray, k: float, sigma: float) -> np.ndarray:
    """Quantile function of the generalized Pareto distribution (location 0)."""
    if abs(k) < 1e-12:
        return -sigma * np.log1p(-p)
    return sigma * np.expm1(-k * np.log1p(-p)) / k


def pareto_smooth(log_weights: np.ndarray, r_eff: float = 1.0) -> tuple[np.ndarray, float]:
    """PSIS of one vector of log-weights, without ArviZ: ``(smoothed log-weights, k_hat)``.

    Pareto-smoothed importance sampling as in Vehtari, Simpson, Gelman, Yao and Gabry, "Pareto
    smoothed importance sampling", JMLR 25(72), 2024 (arXiv:1507.02646): the
    :math:`M = \\lceil \\min(S/5,\\ 3\\sqrt{S / r_{\\mathrm{eff}}}) \\rceil` largest of the
    :math:`S` weights are the tail; a generalized Pareto distribution is fitted to their excess
    over the next largest weight :math:`u` (the Zhang and Stephens 2009 estimate with Vehtari et
    al.'s weak prior on :math:`k`, :func:`pyro.ops.stats.fit_generalized_pareto`); the tail
    weights are replaced, in the same order, by :math:`u + F^{-1}((j - 1/2) / M)`,
    :math:`j = 1..M`, and capped at the largest raw weight. Fewer than five tail weights give
    :math:`\\hat k = \\infty` and no smoothing. The result is normalized to sum to one
    (``logsumexp == 0``), as ArviZ's ``psislw`` returns it.
    """
    lw = np.array(log_weights, dtype=float).reshape(-1)
    if lw.size < 2:
        raise ValueError(f"Pareto smoothing needs at least 2 weights, got {lw.size}")
    lw -= lw.max()  # the largest raw weight is now exp(0) = 1
    tail_size = min(lw.size - 1, math.ceil(min(lw.size / 5, 3 * math.sqrt(lw.size / r_eff))))
    ascending = np.argsort(lw)
    cutoff = max(lw[ascending[-tail_size - 1]], math.log(np.finfo(float).tiny))
    tail = ascending[lw[ascending] > cutoff]  # tail indices, smallest weight first
    k_hat = math.inf
    if tail.size > 4:
        excess = np.exp(lw[tail]) - math.exp(cutoff)
        k_hat, sigma = fit_generalized_pareto(torch.as_tensor(excess, dtype=torch.float64))
        if math.isfinite(k_hat):
            probs = (np.arange(tail.size) + 0.5) / tail.size
            lw[tail] = np.log(math.exp(cutoff) + _gpd_quantile(probs, k_hat, sigma))
            np.minimum(lw, 0.0, out=lw)
    return lw - _logsumexp(lw), float(k_hat)


def psis(log_weights: np.ndarray) -> tuple[np.ndarray, float]:
    """PSIS of one vector of log-weights: ``(smoothed log-weights normalized to sum to one,
    k_hat)``, by the installed ArviZ (0.x: ``arviz.psislw``; 1.x: ``arviz_stats``, see
    :func:`_arviz_stats_psislw`) or, with neither, :func:`pareto_smooth`. ArviZ's warnings on small samples and large
    :math:`\\hat k` are silenced: the caller reports :math:`\\hat k` itself."""
    lw = np.array(log_weights, dtype=float).reshape(-1)
    line = arviz_line()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if line == ARVIZ_0:
            import arviz

            smoothed, k_hat = arviz.psislw(lw)
        elif line == ARVIZ_1:
            smoothed, k_hat = _arviz_stats_psislw(lw)
        else:
            smoothed, k_hat = pareto_smooth(lw)
    return np.asarray(smoothed, dtype=float), float(np.asarray(k_hat))


def _arviz_stats_psislw(lw: np.ndarray) -> tuple[np.ndarray, float]:
    """ArviZ 1.x PSIS of log-weights ``lw``.

    ``arviz_stats.base.array_stats.psislw`` is written for PSIS-LOO: it takes log-likelihood
    values and smooths their negation (the LOO log-ratios), so log-weights go in negated. It
    refuses a tail of fewer than five draws (fewer than 25 draws in all) or a tail of equal
    weights with a ValueError, where ArviZ 0.x and :func:`pareto_smooth` report
    :math:`\\hat k = \\infty` and leave the weights unsmoothed; that is what is returned here too.
    """
    from arviz_stats.base import array_stats

    try:
        smoothed, k_hat = array_stats.psislw(-lw)
    except ValueError as e:
        if "at least 5" not in str(e) and "are the same" not in str(e):
            raise
        return lw - _logsumexp(lw), math.inf
    return smoothed, k_hat
