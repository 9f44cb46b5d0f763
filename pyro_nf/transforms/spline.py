"""Rational-quadratic spline autoregressive flow (Durkan et al. 2019, "Neural Spline Flows").

Each coordinate goes through a monotone rational-quadratic spline on :math:`[-B, B]` with
:math:`K` bins, whose knots and derivatives come from a MADE over the earlier coordinates (in
``order``); outside :math:`[-B, B]` the map is the identity. In bin :math:`k`, with
:math:`\\xi = (x - x_k) / w_k \\in [0, 1]`, bin slope :math:`s_k = h_k / w_k` and knot derivatives
:math:`d_k, d_{k+1}` (Durkan et al. 2019, eqs. 4 and 5, after Gregory & Delbourgo 1982):

.. math::
    y = y_k + \\frac{h_k\\,[s_k \\xi^2 + d_k \\xi(1-\\xi)]}{s_k + (d_{k+1} + d_k - 2 s_k)\\,\\xi(1-\\xi)},
    \\qquad
    \\frac{dy}{dx} = \\frac{s_k^2\\,[d_{k+1}\\xi^2 + 2 s_k \\xi(1-\\xi) + d_k (1-\\xi)^2]}
    {[s_k + (d_{k+1} + d_k - 2 s_k)\\,\\xi(1-\\xi)]^2},

and :math:`\\log|\\det J| = \\sum_i \\log(dy_i/dx_i)`. The inverse in a bin is the root in
:math:`[0, 1]` of a quadratic (Durkan et al. 2019, appendix A), taken in the form
:math:`\\xi = 2c / (-b - \\sqrt{b^2 - 4ac})` that does not cancel. Bin widths and heights are a
softmax with a floor (``min_bin_width``, ``min_bin_height``), the :math:`K - 1` inner derivatives a
shifted softplus with a floor (``min_derivative``); the derivatives at :math:`\\pm B` are 1, so the
map and its derivative are continuous at the boundary. A zero network output gives equal bins and
unit derivatives: the identity, so a fresh layer is the identity.

The forward map costs one MADE pass (IAF direction: sampling and scoring one's own samples); the
inverse is exact and costs :math:`D` passes, as for :class:`~pyro_nf.transforms.AffineAutoregressive`.
Unlike an affine layer, one spline layer can change the *shape* of every marginal (e.g. make a
Gaussian coordinate uniform or bimodal), which affine autoregressive layers cannot do for the first
coordinate in their order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .autoregressive import MADE
from .base import FlowModule, FlowTransform

__all__ = ["SplineAutoregressive", "SplineAutoregressiveTransform", "rational_quadratic_spline"]


def _knots(raw: Tensor, bound: float, min_size: float) -> tuple[Tensor, Tensor]:
    """Knot positions (..., K+1) from -bound to bound and bin sizes (..., K) from raw (..., K)."""
    k = raw.shape[-1]
    frac = min_size + (1.0 - min_size * k) * torch.softmax(raw, -1)
    knots = F.pad(torch.cumsum(frac, -1), (1, 0)) * (2 * bound) - bound
    knots = torch.cat([knots[..., :1].clamp(min=-bound, max=-bound), knots[..., 1:-1],
                       knots[..., -1:].clamp(min=bound, max=bound)], -1)  # fmt: skip
    return knots, knots[..., 1:] - knots[..., :-1]


def _gather(t: Tensor, idx: Tensor) -> Tensor:
    return torch.gather(t, -1, idx.unsqueeze(-1)).squeeze(-1)


def rational_quadratic_spline(
    x: Tensor,
    raw_widths: Tensor,
    raw_heights: Tensor,
    raw_derivatives: Tensor,
    *,
    bound: float = 5.0,
    inverse: bool = False,
    min_bin_width: float = 1e-3,
    min_bin_height: float = 1e-3,
    min_derivative: float = 1e-3,
) -> tuple[Tensor, Tensor]:
    """Elementwise monotone rational-quadratic spline, identity outside ``[-bound, bound]``.

    Args:
        x: input, shape ``(..., D)`` (the output ``y`` when ``inverse=True``).
        raw_widths, raw_heights: unnormalized bin sizes, shape ``(..., D, K)``.
        raw_derivatives: unconstrained inner-knot derivatives, shape ``(..., D, K - 1)``; zero
            gives derivative 1.

    Returns:
        ``(y, log dy/dx)`` elementwise (for ``inverse=True``: ``(x, log dy/dx at x)``, the forward
        log-derivative), each of the broadcast shape of ``x`` and the parameters' ``(..., D)``.

    Example:
        >>> import torch
        >>> x = torch.tensor([-6.0, -1.0, 0.5, 2.0])
        >>> zeros = torch.zeros(4, 8)
        >>> y, logd = rational_quadratic_spline(x, zeros, zeros, torch.zeros(4, 7))
        >>> torch.allclose(y, x), torch.allclose(logd, torch.zeros(4))  # zero parameters: identity
        (True, True)
    """
    shape = torch.broadcast_shapes(x.shape, raw_widths.shape[:-1])
    x = x.expand(shape)
    k = raw_widths.shape[-1]
    if k * min_bin_width >= 1 or k * min_bin_height >= 1:
        raise ValueError(f"{k} bins cannot all be wider than min_bin_width/min_bin_height")
    raw_widths = raw_widths.expand(shape + (k,))
    raw_heights = raw_heights.expand(shape + (k,))
    raw_derivatives = raw_derivatives.expand(shape + (k - 1,))

    knots_x, widths = _knots(raw_widths, bound, min_bin_width)
    knots_y, heights = _knots(raw_heights, bound, min_bin_height)
    shift = math.log(math.expm1(1.0 - min_derivative))  # softplus(0 + shift) + min = 1
    inner = min_derivative + F.softplus(raw_derivatives + shift)
    ones = torch.ones_like(inner[..., :1])
    derivs = torch.cat([ones, inner, ones], -1)  # (..., K + 1): 1 at both ends

    inside = (x > -bound) & (x < bound)
    xc = torch.where(inside, x, torch.zeros_like(x))  # keeps the formulas finite outside
    knots = knots_y if inverse else knots_x
    idx = (xc.unsqueeze(-1) >= knots[..., 1:-1]).sum(-1)  # bin index in 0..K-1
    xk, wk = _gather(knots_x, idx), _gather(widths, idx)
    yk, hk = _gather(knots_y, idx), _gather(heights, idx)
    dk, dk1 = _gather(derivs, idx), _gather(derivs, idx + 1)
    sk = hk / wk
    if not inverse:
        xi = ((xc - xk) / wk).clamp(0.0, 1.0)
    else:
        dy = xc - yk
        a = hk * (sk - dk) + dy * (dk1 + dk - 2 * sk)
        b = hk * dk - dy * (dk1 + dk - 2 * sk)
        c = -sk * dy
        disc = (b * b - 4 * a * c).clamp(min=0.0)
        xi = ((2 * c) / (-b - disc.sqrt())).clamp(0.0, 1.0)
    t = xi * (1 - xi)
    den = sk + (dk1 + dk - 2 * sk) * t
    logd = (
        2 * sk.log()
        + (dk1 * xi * xi + 2 * sk * t + dk * (1 - xi) * (1 - xi)).log()
        - 2 * den.log()
    )
    out = yk + hk * (sk * xi * xi + dk * t) / den if not inverse else xk + xi * wk
    out = torch.where(inside, out, x)
    logd = torch.where(inside, logd, torch.zeros_like(logd))
    return out, logd


class SplineAutoregressiveTransform(FlowTransform):
    """Stateless spline autoregressive map given a conditioner ``x -> raw parameters``.

    Args:
        conditioner: callable returning raw spline parameters of shape ``(..., D, 3K - 1)``
            (widths, heights, inner derivatives), autoregressive in some order.
        bound: half-width :math:`B` of the spline's interval; identity outside.
        min_bin_width, min_bin_height, min_derivative: floors, as in
            :func:`rational_quadratic_spline`.

    Example:
        >>> import torch
        >>> def conditioner(x):  # coordinate 1's spline depends on x_0; coordinate 0's is fixed
        ...     raw = torch.zeros(x.shape + (3 * 4 - 1,))
        ...     raw[..., 1, :4] = x[..., :1]          # bin widths of coordinate 1 from x_0
        ...     return raw
        >>> t = SplineAutoregressiveTransform(conditioner, bound=3.0)
        >>> x = torch.tensor([2.0, 0.7])
        >>> torch.allclose(t.inv(t(x)), x, atol=1e-6)
        True
    """

    def __init__(
        self,
        conditioner: Callable[[Tensor], Tensor],
        bound: float = 5.0,
        min_bin_width: float = 1e-3,
        min_bin_height: float = 1e-3,
        min_derivative: float = 1e-3,
    ) -> None:
        super().__init__()
        self.conditioner = conditioner
        self.bound = float(bound)
        self.kw = dict(
            min_bin_width=min_bin_width, min_bin_height=min_bin_height,
            min_derivative=min_derivative,
        )  # fmt: skip

    def _spline(self, x: Tensor, params: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        k = (params.shape[-1] + 1) // 3
        w, h, d = params[..., :k], params[..., k : 2 * k], params[..., 2 * k :]
        return rational_quadratic_spline(
            x, w, h, d, bound=self.bound, inverse=inverse, **self.kw
        )

    def call_and_ladj(self, x: Tensor) -> tuple[Tensor, Tensor]:
        y, logd = self._spline(x, self.conditioner(x), inverse=False)
        return y, logd.sum(-1)

    def inverse_and_ladj(self, y: Tensor) -> tuple[Tensor, Tensor]:
        x = y
        for _ in range(y.shape[-1]):  # after pass k the first k coordinates in order are exact
            x, logd = self._spline(y, self.conditioner(x), inverse=True)
        return x, logd.sum(-1)

    def _inverse(self, y: Tensor) -> Tensor:
        return self.inverse_and_ladj(y)[0]


class SplineAutoregressive(FlowModule):
    """Rational-quadratic spline autoregressive layer (IAF direction) with a MADE conditioner.

    Args:
        dim: number of variables :math:`D`.
        context_dim: size of the context fed into the MADE's first hidden layer; 0 for none.
        num_bins: number of spline bins :math:`K` (``3K - 1`` parameters per coordinate).
        bound: half-width :math:`B` of the interval the spline acts on (identity outside).
        hidden_dims: MADE hidden sizes; default ``(max(4 * dim, 32),)``.
        order: the autoregressive order (a permutation of ``range(dim)``); default ``range(dim)``.
            :class:`pyro_nf.Flow` reverses it on every other layer.
        activation: hidden nonlinearity class, default :class:`torch.nn.ELU`.
        min_bin_width, min_bin_height, min_derivative: floors that keep the spline well
            conditioned (Durkan et al. 2019 use 1e-3).

    Example:
        >>> import torch
        >>> layer = SplineAutoregressive(3, num_bins=8)
        >>> x = torch.randn(5, 3)
        >>> torch.allclose(layer(x), x, atol=1e-6)   # identity at initialization
        True
    """

    def __init__(
        self,
        dim: int,
        context_dim: int = 0,
        *,
        num_bins: int = 8,
        bound: float = 5.0,
        hidden_dims: Sequence[int] | None = None,
        order: Sequence[int] | Tensor | None = None,
        activation: Callable[[], nn.Module] = nn.ELU,
        min_bin_width: float = 1e-3,
        min_bin_height: float = 1e-3,
        min_derivative: float = 1e-3,
    ) -> None:
        super().__init__(dim, context_dim)
        if isinstance(num_bins, bool) or not isinstance(num_bins, int) or num_bins < 2:
            raise ValueError(f"num_bins must be an integer >= 2, got {num_bins!r}")
        if not (isinstance(bound, (int, float)) and 0 < bound < math.inf):
            raise ValueError(f"bound must be a positive finite number, got {bound!r}")
        if num_bins * max(min_bin_width, min_bin_height) >= 1:
            raise ValueError("num_bins * min_bin_width (and min_bin_height) must be below 1")
        if not 0 < min_derivative < 1:
            raise ValueError(f"min_derivative must lie in (0, 1), got {min_derivative!r}")
        if isinstance(hidden_dims, int):
            raise TypeError(
                f"hidden_dims must be a sequence of layer sizes, e.g. ({hidden_dims},); "
                f"got the int {hidden_dims}"
            )
        hidden_dims = tuple(hidden_dims) if hidden_dims is not None else (max(4 * dim, 32),)
        order = torch.arange(dim) if order is None else torch.as_tensor(order, dtype=torch.long)
        if order.shape != (dim,) or not torch.equal(order.sort().values, torch.arange(dim)):
            raise ValueError(f"order must be a permutation of range({dim}), got {order.tolist()}")
        self.register_buffer("order", order)
        self.num_bins = num_bins
        self.bound = float(bound)
        self._floors = dict(
            min_bin_width=min_bin_width, min_bin_height=min_bin_height,
            min_derivative=min_derivative,
        )  # fmt: skip
        self.made = MADE(
            dim, hidden_dims, order, context_dim, activation, num_outputs=3 * num_bins - 1
        )

    def _params(self, x: Tensor, context: Tensor | None) -> Tensor:
        out = self.made.raw(x, context)  # (..., (3K - 1) * D), parameter-major
        out = out.reshape(out.shape[:-1] + (3 * self.num_bins - 1, self.dim))
        return out.transpose(-1, -2)

    def _transform(self, context: Tensor | None) -> SplineAutoregressiveTransform:
        def conditioner(x: Tensor) -> Tensor:
            return self._params(x, context)

        return SplineAutoregressiveTransform(conditioner, self.bound, **self._floors)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, context_dim={self.context_dim}, num_bins={self.num_bins}, "
            f"bound={self.bound}"
        )
