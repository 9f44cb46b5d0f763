"""A faster ELBO for the flattening flow autoguides: sample, score and evaluate the model directly.

``Trace_ELBO`` runs the guide under Pyro's effect handlers (an auxiliary latent site, one
``Delta`` site per latent, plates), replays the model against that trace, and then walks both
traces to sum log-densities. For a :class:`~pyro_nf.AutoFlow` guide all of that computes

.. math::
    \\operatorname{ELBO} = \\mathbb{E}_{\\varepsilon}\\Big[\\log p\\big(x, T(z)\\big)
    + \\log\\big|\\det J_{T}(z)\\big| - \\log q(z)\\Big], \\qquad z = F(\\varepsilon),

where :math:`F` is the flow (one pass gives :math:`z` and :math:`\\log q(z)`) and :math:`T` maps
the flattened unconstrained vector to each site's support. :class:`FastELBO` evaluates exactly
this: one flow pass, the support transforms, and one conditioned trace of the model. With the same
random numbers its loss equals ``Trace_ELBO``'s (tested), so results are identical in
distribution. With ``compile=True`` the flow's sample-and-score is compiled by
:func:`torch.compile`; if compilation fails the eager code is used (with a warning), which computes
the same numbers.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pyro
import pyro.poutine as poutine
import torch
from pyro.distributions.util import scale_and_mask
from pyro.infer import ELBO
from pyro.poutine.util import site_is_subsample

from ._checkpoint import rng_state, set_rng_state
from .guides import AutoFlow

__all__ = ["FastELBO"]


class FastELBO(ELBO):
    """ELBO for :class:`~pyro_nf.AutoFlow` guides without tracing the guide.

    Use it like any Pyro ELBO (``SVI(model, guide, optim, FastELBO(num_particles=4))``); the guide
    must be a pyro_nf flow autoguide built for ``model``. With ``num_particles > 1`` the particles
    are vectorized (the model must broadcast over a leading plate, as with Pyro's
    ``vectorize_particles=True``).

    Args:
        num_particles: Monte Carlo particles per estimate.
        compile: compile the flow's sample-and-score with :func:`torch.compile` (opt-in: it
            costs tens of seconds once, and pays off on long fits with deep flows).
        stl: "sticking the landing" gradients (Roeder et al. 2017): :math:`\\log q(z)` is
            evaluated with the flow's parameters detached, so the score-function term, whose
            expectation is zero, is dropped from the gradient. Same loss value, lower-variance
            gradients that vanish when :math:`q` equals the posterior. It scores :math:`z`
            through the exact inverse, so it costs an inverse pass per step (``D`` network passes
            per autoregressive layer).
        max_plate_nesting: as for Pyro's ELBOs; found from the model when None.

    Example:
        >>> import pyro, pyro.distributions as dist, torch, pyro_nf
        >>> def model():
        ...     pyro.sample("x", dist.Normal(0.0, 1.0))
        >>> guide = pyro_nf.AutoPlanarFlow(model, num_transforms=4)
        >>> svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), FastELBO())
        >>> isinstance(svi.step(), float)
        True
    """

    def __init__(
        self,
        num_particles: int = 1,
        *,
        compile: bool = False,
        stl: bool = False,
        max_plate_nesting: int | None = None,
    ) -> None:
        super().__init__(
            num_particles=num_particles,
            max_plate_nesting=float("inf") if max_plate_nesting is None else max_plate_nesting,
            vectorize_particles=True,
        )
        self.compile = compile
        self.stl = stl
        self._compiled: dict[int, Callable] = {}
        self._nesting: dict[int, int] = {}
        self._particles_checked: set[int] = set()

    # -- pieces --------------------------------------------------------------------------
    def _check(self, guide) -> None:
        if not isinstance(guide, AutoFlow):
            raise TypeError(
                f"FastELBO works with pyro_nf flow autoguides, got {type(guide).__name__}; "
                "use pyro.infer.Trace_ELBO for other guides"
            )

    def _plate_nesting(self, model, guide, args, kwargs) -> int:
        key = id(guide)
        if key not in self._nesting:
            if self.max_plate_nesting != float("inf"):
                self._nesting[key] = int(self.max_plate_nesting)
            else:
                self._nesting[key] = guide.plate_nesting(args, kwargs, model)
        return self._nesting[key]

    def _sample_and_score(self, guide) -> Callable:
        flow = guide.registered_flow()  # as inside guide(...): parameters registered with Pyro
        like = _dtype_device(flow)

        def push(eps):
            return flow().push_and_log_prob(eps)

        if self.compile:
            key = id(flow)
            if key not in self._compiled:
                self._compiled[key] = self._try_compile(push, flow)
            push = self._compiled[key]

        def sample_and_score(n: int):
            # The noise is drawn eagerly, so compiled or not the same random numbers are used.
            return push(torch.randn((n, flow.dim), **like))

        return sample_and_score

    @staticmethod
    def _log_q_at_stopped_parameters(guide, latent: torch.Tensor) -> torch.Tensor:
        """log q(z) with the flow's parameters detached: gradients reach them through z only."""
        flow = guide.flow
        detached = {name: p.detach() for name, p in flow.named_parameters()}
        return torch.func.functional_call(flow, detached, ()).log_prob(latent)

    def _try_compile(self, push: Callable, flow) -> Callable:
        try:
            compiled = torch.compile(push, dynamic=False)
            compiled(torch.zeros((self.num_particles, flow.dim), **_dtype_device(flow)))
            return compiled
        except Exception as e:  # noqa: BLE001 - any compiler failure: eager is always right
            warnings.warn(
                f"torch.compile failed ({type(e).__name__}: {e}); FastELBO uses eager mode",
                stacklevel=4,
            )
            return push

    # -- ELBO API ------------------------------------------------------------------------
    def _get_trace(self, model, guide, args, kwargs):
        raise NotImplementedError("FastELBO does not build guide traces")

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        """Negative ELBO estimate (a differentiable tensor), averaged over particles."""
        self._check(guide)
        guide.setup(*args, **kwargs)
        nesting = self._plate_nesting(model, guide, args, kwargs)
        guide.remember_args(args, kwargs)  # for the noncentered=True map, if any
        n = self.num_particles
        latent, log_q = self._sample_and_score(guide)(n)  # (n, D), (n,)
        if self.stl:
            log_q = self._log_q_at_stopped_parameters(guide, latent)
        if n == 1:  # no particle plate, as in Trace_ELBO: models need not broadcast
            latent = latent[0]
        else:  # as under Trace_ELBO(vectorize_particles=True): a particle plate outermost
            latent = latent.reshape((n,) + (1,) * nesting + latent.shape[-1:])
        # log-Jacobians summed over particles and plates, like Delta sites
        values, log_jac = guide.constrain_with_log_jacobian(latent)
        first = n > 1 and id(guide) not in self._particles_checked
        rng_before = rng_state() if first else None
        model_trace = _model_trace(model, values, n, nesting, latent.device, args, kwargs)
        if first:
            _check_particles(model, guide, model_trace, latent, nesting, rng_before, args, kwargs)
            self._particles_checked.add(id(guide))
        log_p = model_trace.log_prob_sum()
        return -(log_p + log_jac - log_q.sum()) / n

    def loss(self, model, guide, *args, **kwargs) -> float:
        with torch.no_grad():
            return float(self.differentiable_loss(model, guide, *args, **kwargs))

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        loss.backward()
        return float(loss.detach())


def _model_trace(model, values: dict, n: int, nesting: int, device, args, kwargs):
    """The model's trace with its latents set to ``values``; ``n > 1`` particles in a plate
    outermost, as under ``Trace_ELBO(vectorize_particles=True)``."""
    conditioned = poutine.trace(poutine.condition(model, data=values))
    if n == 1:
        return conditioned.get_trace(*args, **kwargs)
    with pyro.plate("num_particles_vectorized", n, dim=-(nesting + 1), device=device):
        return conditioned.get_trace(*args, **kwargs)


def _check_particles(model, guide, vectorized, latent, nesting, rng_before, args, kwargs) -> None:
    """Refuse a model that does not broadcast over the particle plate but runs anyway.

    A model that, say, flattens a latent (``mu.reshape(-1)``) can still match the shapes of its
    plates, and then mixes the particles: every log-density has the right shape and the loss is
    silently wrong. Once per guide, each particle's log-density from the vectorized trace is
    compared with that of the model run on that particle alone, with the same random numbers for
    the model's own draws (a subsample, say); the random-number state is left as it was.
    """
    n = latent.shape[0]
    with torch.no_grad():
        together = _per_particle_log_prob(vectorized, n, nesting, latent.detach())
        rng_after = rng_state()
        alone = []
        for i in range(n):
            set_rng_state(rng_before)
            values, _ = guide.constrain_with_log_jacobian(latent[i].detach().reshape(-1))
            trace = _model_trace(model, values, 1, nesting, latent.device, args, kwargs)
            alone.append(trace.log_prob_sum().detach().to(together))
        set_rng_state(rng_after)
    alone = torch.stack(alone)
    tolerance = 1e-3 * torch.maximum(together.abs(), alone.abs()).clamp(min=1.0)
    if not bool(((together - alone).abs() <= tolerance).all()):
        i = int(((together - alone).abs() - tolerance).argmax())
        raise ValueError(
            f"the model does not broadcast over the particle plate: with {n} vectorized "
            f"particles, particle {i}'s log-density is {float(together[i]):.6g}, but the model "
            f"run on that particle alone gives {float(alone[i]):.6g}. A latent is probably "
            "reshaped or indexed so that particles and data are mixed (e.g. .reshape(-1), "
            ".squeeze(), x @ w with a batch of w); index from the right (w[..., 0], "
            "(x * w).sum(-1)) or use num_particles=1 / vectorize_particles=False"
        )


def _per_particle_log_prob(trace, n: int, nesting: int, like: torch.Tensor) -> torch.Tensor:
    """Each particle's summed log-density in a vectorized trace (particle plate at
    ``dim=-(nesting + 1)``); a site without that dimension counts for every particle."""
    total, dim = like.new_zeros(n), -(nesting + 1)
    for site in trace.nodes.values():
        if site["type"] != "sample" or site_is_subsample(site):
            continue
        # computed here, not cached in the trace: the loss takes its own, differentiable, sums
        lp = scale_and_mask(site["fn"].log_prob(site["value"]), site["scale"], site["mask"])
        lp = lp.detach().to(like) if torch.is_tensor(lp) else like.new_tensor(float(lp))
        if lp.dim() >= -dim and lp.shape[dim] == n:
            total = total + lp.movedim(dim, 0).reshape(n, -1).sum(-1)
        else:
            total = total + lp.sum()
    return total


def _dtype_device(flow) -> dict:
    """The flow's dtype and device, as keywords for a new tensor."""
    loc = flow.base_loc_scale()[0]
    return {"dtype": loc.dtype, "device": loc.device}
