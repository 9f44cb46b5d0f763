"""Posterior summaries of the flow autoguides: ``median()`` and ``quantiles()`` from fixed,
stratified draws of the flow."""

from __future__ import annotations

import numbers

import torch
from torch import Tensor
from torch.distributions import biject_to

from . import _checks

#: seed of the fixed base draws behind ``median()`` and ``quantiles()`` (any fixed number)
_QUANTILE_SEED = 20240917


class PosteriorSummaries:
    """Mixin of :class:`~pyro_nf.AutoFlow`: quantiles of the flow from fixed draws."""

    def _summary_quantiles(self, probs: list[float], num_samples: int) -> dict[str, Tensor]:
        """Each site's quantiles ``probs`` (first dimension), from ``num_samples`` fixed draws."""
        draws = self._unconstrained_draws(num_samples)
        q = torch.tensor(probs, dtype=draws.dtype, device=draws.device)
        per_q = [self._constrain(row) for row in torch.quantile(draws, q, dim=0)]
        return {name: torch.stack([d[name] for d in per_q]) for name in per_q[0]}

    def _base_draws(self, num_samples: int) -> Tensor:
        """``num_samples`` fixed draws of the base :math:`\\mathcal N(0, I_D)`, shape ``(n, D)``.

        Every coordinate takes each value of the grid :math:`\\Phi^{-1}((k + 1/2) / n)`,
        :math:`k = 0, \\dots, n - 1`, exactly once, in an order drawn independently per
        coordinate (a Latin hypercube): the marginals are stratified, which makes the
        coordinatewise quantiles of the pushed draws far less noisy than plain Monte Carlo. The
        order comes from a private generator with a fixed seed on the flow's device, so the draws
        are the same at every call and the global random state is not touched.
        """
        ref = self._modules["flow"].base_loc_scale()[0]
        dtype, device = ref.dtype, ref.device
        gen = torch.Generator(device=device)
        gen.manual_seed(_QUANTILE_SEED)
        grid = torch.special.ndtri(
            (torch.arange(num_samples, dtype=dtype, device=device) + 0.5) / num_samples
        )
        keys = torch.rand(self.latent_dim, num_samples, generator=gen, dtype=dtype, device=device)
        return grid[keys.argsort(-1)].T

    def _unconstrained_draws(self, num_samples: int) -> Tensor:
        """The flow's pushforward of :meth:`_base_draws`: fixed draws of the latent vector."""
        self._require_setup()
        _checks.integer(num_samples, "num_samples", minimum=2)
        with torch.no_grad():
            return self._modules["flow"]().push_and_log_prob(self._base_draws(num_samples))[0]

    def _constrain(self, latent: Tensor) -> dict[str, Tensor]:
        return {
            site["name"]: biject_to(site["fn"].support)(value)
            for site, value in self._unpack_latent(latent)
        }


def check_quantiles(quantiles) -> list[float]:
    """The probabilities in ``quantiles`` as floats; a ``ValueError`` unless each is in [0, 1]."""
    if torch.is_tensor(quantiles):
        values = quantiles.detach().reshape(-1).tolist()
    elif isinstance(quantiles, numbers.Real):
        values = [quantiles]
    else:
        try:
            values = list(quantiles)
        except TypeError:
            raise TypeError(
                f"quantiles must be a sequence of probabilities, got {quantiles!r}"
            ) from None
    if not values:
        raise ValueError("quantiles must hold at least one probability in [0, 1], got none")
    if any(isinstance(v, bool) or not isinstance(v, numbers.Real) for v in values):
        raise TypeError(f"quantiles must be numbers in [0, 1], got {values!r}")
    values = [float(v) for v in values]
    if not all(0.0 <= v <= 1.0 for v in values):  # also refuses NaN
        raise ValueError(f"quantiles must lie in [0, 1], got {values}")
    return values
