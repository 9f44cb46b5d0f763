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

import torch
from pyro.infer import ELBO

from . import _particles
from ._checkpoint import rng_state
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
        model_trace = _particles.model_trace(model, values, n, nesting, args, kwargs)
        if first:

            def alone(i):  # particle i's latents, as the model sees them without the plate
                return guide.constrain_with_log_jacobian(latent[i].detach().reshape(-1))[0]

            _particles.check_not_mixed(model, model_trace, alone, nesting, rng_before, args, kwargs)
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


def _dtype_device(flow) -> dict:
    """The flow's dtype and device, as keywords for a new tensor (read off a parameter: no
    computation, since this runs at every step)."""
    p = next(flow.affine.parameters())
    return {"dtype": p.dtype, "device": p.device}
