"""Whether a model really broadcasts over a plate of vectorized Monte Carlo particles.

``Trace_ELBO(vectorize_particles=True)`` and :class:`~pyro_nf.FastELBO` evaluate the particles
in one pass, with a plate outermost. A model that does not broadcast over it usually fails, but
one that mixes the particles can run: a latent flattened with ``.reshape(-1)``, or indexed so that
a dimension lands left of another latent's (``p[..., :1]`` of a Dirichlet), gives every site the
shape its plates ask for, and the loss is silently wrong. :func:`check_not_mixed` compares each
particle's log-density in the vectorized run with the model run on that particle alone.
"""

from __future__ import annotations

from collections.abc import Callable

import pyro
import pyro.poutine as poutine
import torch
from pyro.distributions.util import scale_and_mask
from pyro.poutine.util import site_is_subsample

from ._checkpoint import rng_state, set_rng_state

PLATE = "num_particles_vectorized"  # the name Pyro's ELBOs give the particle plate


def model_trace(model, values: dict, n: int, nesting: int, args, kwargs):
    """The model's trace with its latents set to ``values``; ``n > 1`` particles in a plate
    outermost (at ``dim=-(nesting + 1)``), as under ``Trace_ELBO(vectorize_particles=True)``."""
    conditioned = poutine.trace(poutine.condition(model, data=values))
    if n == 1:
        return conditioned.get_trace(*args, **kwargs)
    device = next((v.device for v in values.values() if torch.is_tensor(v)), None)
    with pyro.plate(PLATE, n, dim=-(nesting + 1), device=device):
        return conditioned.get_trace(*args, **kwargs)


def check_not_mixed(
    model,
    vectorized,
    alone: Callable[[int], dict],
    nesting: int,
    rng_before: dict,
    args,
    kwargs,
) -> None:
    """Raise ``ValueError`` unless every particle of the ``vectorized`` model trace has the
    log-density of the model run on that particle's latents (``alone(i)``) without the plate.

    ``rng_before`` is the random-number state from just before the vectorized model ran: each
    lone run starts from it, so a model that draws its own random numbers (a subsample) draws the
    same ones; the state after the vectorized run is restored at the end.
    """
    n = _particle_count(vectorized)
    with torch.no_grad():
        together = _per_particle_log_prob(vectorized, n, nesting)
        rng_after = rng_state()
        lone = []
        try:
            for i in range(n):
                set_rng_state(rng_before)
                trace = model_trace(model, alone(i), 1, nesting, args, kwargs)
                lone.append(trace.log_prob_sum().detach().to(together))
        finally:
            set_rng_state(rng_after)
    lone = torch.stack(lone)
    tolerance = 1e-3 * torch.maximum(together.abs(), lone.abs()).clamp(min=1.0)
    excess = (together - lone).abs() - tolerance
    if bool((excess > 0).any()):
        i = int(excess.argmax())
        raise ValueError(
            f"the model does not broadcast over the particle plate: with {n} vectorized "
            f"particles, particle {i}'s log-density is {float(together[i]):.6g}, but the model "
            f"run on that particle alone gives {float(lone[i]):.6g}. A latent is probably "
            "reshaped or indexed so that particles and data are mixed (e.g. .reshape(-1), "
            ".squeeze(), x @ w with a batch of w, p[..., :1] of a vector latent); index from the "
            "right (w[..., 0], (x * w).sum(-1)), or use num_particles=1 or "
            "vectorize_particles=False"
        )


def _particle_count(trace) -> int:
    for site in trace.nodes.values():
        for frame in site.get("cond_indep_stack", ()):
            if frame.name == PLATE:
                return frame.size
    raise ValueError("the trace has no particle plate")


def _per_particle_log_prob(trace, n: int, nesting: int) -> torch.Tensor:
    """Each particle's summed log-density in a vectorized trace (particle plate at
    ``dim=-(nesting + 1)``); a site without that dimension counts for every particle."""
    total, dim = None, -(nesting + 1)
    for site in trace.nodes.values():
        if site["type"] != "sample" or site_is_subsample(site):
            continue
        # computed here, not cached in the trace: a loss takes its own, differentiable, sums
        lp = scale_and_mask(site["fn"].log_prob(site["value"]), site["scale"], site["mask"])
        if not torch.is_tensor(lp):
            lp = site["value"].new_tensor(float(lp))
        lp = lp.detach()
        if total is None:
            total = lp.new_zeros(n)
        if lp.dim() >= -dim and lp.shape[dim] == n:
            total = total + lp.movedim(dim, 0).reshape(n, -1).sum(-1).to(total)
        else:
            total = total + lp.sum().to(total)
    return total if total is not None else torch.zeros(n)


def check_vectorized_elbo(loss, model, guide, args, kwargs) -> None:
    """:func:`check_not_mixed` for ``Trace_ELBO(vectorize_particles=True)`` with any guide, after
    its first evaluation (which set its ``max_plate_nesting``, particle plate included): one
    vectorized guide draw, the model replayed on it, and the model on each particle alone. Every
    random-number state is restored, so the fit draws what it would have drawn without it."""
    n, nesting = loss.num_particles, int(loss.max_plate_nesting) - 1
    state = rng_state()
    try:
        with torch.no_grad():
            with pyro.plate(PLATE, n, dim=-(nesting + 1)):
                guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
            rng_before = rng_state()
            with pyro.plate(PLATE, n, dim=-(nesting + 1)):
                replayed = poutine.trace(poutine.replay(model, trace=guide_trace))
                vectorized = replayed.get_trace(*args, **kwargs)
            latents = [
                site
                for site in vectorized.nodes.values()
                if site["type"] == "sample"
                and not site["is_observed"]
                and not site_is_subsample(site)
            ]

            def alone(i):
                return {site["name"]: _one_particle(site, i, n, nesting) for site in latents}

            check_not_mixed(model, vectorized, alone, nesting, rng_before, args, kwargs)
    finally:
        set_rng_state(state)


def _one_particle(site, i: int, n: int, nesting: int) -> torch.Tensor:
    """Particle ``i``'s value of a latent site, with the leading size-1 dimensions that only the
    particle plate put there removed (what the site's value is without that plate)."""
    value, event_dim = site["value"], site["fn"].event_dim
    dim = -(nesting + 1) - event_dim
    if value.dim() >= -dim:
        value = value.select(dim, i if value.shape[dim] == n else 0)
    own = [-f.dim for f in site["cond_indep_stack"] if f.name != PLATE and f.dim is not None]
    keep = event_dim + max(own, default=0)
    while value.dim() > keep and value.shape[0] == 1:
        value = value[0]
    return value
