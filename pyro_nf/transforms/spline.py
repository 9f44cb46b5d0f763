"""Rational-quadratic spline autoregressive flow (neural spline flow, Durkan et al. 2019).

Each coordinate goes through a monotone rational-quadratic spline on :math:`[-B, B]` with
:math:`K` bins (Gregory & Delbourgo 1982; Durkan et al. 2019, eqs. 4-8), the identity outside,
whose bin widths, heights and inner knot derivatives come from a MADE pass over the earlier
coordinates: :class:`SplineAutoregressive` is :class:`~pyro_nf.transforms.MaskedAutoregressive`
with :class:`RationalQuadraticMap`. The formulas, the closed-form inverse in a bin and the choice
of :math:`B` are on the docs page ``docs/flows/spline.rst``.

Parameterization: widths and heights are ``min_bin_width + (1 - K min_bin_width) softmax(raw)``
(times :math:`2B`), the inner derivatives ``min_derivative + softplus(raw + c)`` with :math:`c` set
so that a zero ``raw`` gives derivative 1, and the two boundary derivatives are 1, so the map is
continuously differentiable at :math:`\\pm B`. A fresh network outputs zeros: equal bins, every
derivative 1, which is exactly the identity.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import integer, number
from .autoregressive import (
    DEFAULT_ACTIVATION,
    FAN_IN_REF,
    AutoregressiveTransform,
    MaskedAutoregressive,
)
from .elementwise import ElementwiseMap

__all__ = [
    "RationalQuadraticMap",
    "SplineAutoregressive",
    "SplineAutoregressiveTransform",
    "rational_quadratic_spline",
]


def _knots(raw: Tensor, bound: float, min_size: float) -> tuple[Tensor, Tensor]:
    """Bin sizes (summing to 2B) and the K + 1 knot positions, exactly -B and B at the ends."""
    k = raw.shape[-1]
    size = min_size + (1.0 - k * min_size) * torch.softmax(raw, dim=-1)
    inner = torch.cumsum(size[..., :-1], dim=-1) * (2 * bound) - bound
    end = torch.full_like(inner[..., :1], bound)
    knots = torch.cat([-end, inner, end], dim=-1)
    return knots[..., 1:] - knots[..., :-1], knots


def _gather(t: Tensor, idx: Tensor) -> Tensor:
    return torch.gather(t, -1, idx.unsqueeze(-1)).squeeze(-1)


def _check_spline_args(
    num_bins: int | None, bound: float, min_bin_width: float, min_bin_height: float,
    min_derivative: float,
) -> None:  # fmt: skip
    """Refuse spline settings that would give a wrong or undefined map, naming the argument."""
    number(bound, "bound")
    if num_bins is not None:
        for name, v in [("min_bin_width", min_bin_width), ("min_bin_height", min_bin_height)]:
            if not 0 < v * num_bins < 1:
                raise ValueError(f"{name} must be in (0, 1 / num_bins), got {v!r}")
    # the inner derivatives are min_derivative + softplus(raw + c), with c = log(e^(1 - min) - 1)
    if not 0 < min_derivative < 1:
        raise ValueError(f"min_derivative must be in (0, 1), got {min_derivative!r}")


def _bins(x: Tensor, raw: tuple[Tensor, Tensor, Tensor], bound: float, inverse: bool, mins):
    """Per element of ``x``: the width, height, left knot ``(x_k, y_k)`` and knot derivatives
    ``d_k, d_{k+1}`` of the bin ``x`` falls in (searched among the y-knots when ``inverse``)."""
    min_bin_width, min_bin_height, min_derivative = mins
    k = raw[0].shape[-1]
    widths, xk = _knots(raw[0], bound, min_bin_width)
    heights, yk = _knots(raw[1], bound, min_bin_height)
    shift = math.log(math.expm1(1.0 - min_derivative))  # softplus(0 + shift) + min_d = 1
    inner = min_derivative + F.softplus(raw[2] + shift)
    one = torch.ones_like(inner[..., :1])
    derivs = torch.cat([one, inner, one], dim=-1)
    xc_b, knots = torch.broadcast_tensors(x.unsqueeze(-1), yk if inverse else xk)
    idx = (xc_b[..., :1] >= knots[..., 1:-1]).sum(-1)
    shape = idx.shape
    w, h = _gather(widths.expand(*shape, k), idx), _gather(heights.expand(*shape, k), idx)
    x0, y0 = _gather(xk.expand(*shape, k + 1), idx), _gather(yk.expand(*shape, k + 1), idx)
    d0 = _gather(derivs.expand(*shape, k + 1), idx)
    d1 = _gather(derivs.expand(*shape, k + 1), idx + 1)
    return w, h, x0, y0, d0, d1


def _inverse_xi(dy: Tensor, h: Tensor, s: Tensor, d0: Tensor, curv: Tensor) -> Tensor:
    """The root in [0, 1] of the bin's quadratic for the height ``dy`` above its left knot."""
    a = h * (s - d0) + dy * curv
    b = h * d0 - dy * curv
    c = -s * dy
    sq = torch.sqrt((b * b - 4 * a * c).clamp_min(0.0))
    # The root in whichever of its two equal forms does not cancel: 2c / (-b - sq) for b >= 0,
    # (-b + sq) / (2a) for b < 0 (then a > 0). The unused branch gets a harmless denominator, so
    # that no inf or nan reaches the gradient.
    pos = b >= 0
    den = torch.where(pos, -b - sq, 2 * a)
    den = torch.where(den == 0, torch.ones_like(den), den)
    return (torch.where(pos, 2 * c, -b + sq) / den).clamp(0.0, 1.0)


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
    """Elementwise monotone rational-quadratic spline on ``[-bound, bound]``, identity outside.

    Args:
        x: input, shape ``(...)`` (the output when ``inverse=True``).
        raw_widths, raw_heights: unnormalized bin sizes, shape ``(..., K)``.
        raw_derivatives: inner knot derivatives before the positive map, shape ``(..., K - 1)``.
        bound: the spline acts on ``[-bound, bound]``.
        inverse: evaluate the inverse map instead.
        min_bin_width, min_bin_height, min_derivative: lower bounds that keep the map well
            conditioned; the bin floors in ``(0, 1 / K)``, the derivative floor in ``(0, 1)``.

    Returns:
        ``(y, log|dy/dx|)``, each of shape ``x.shape``; with ``inverse=True``, ``(x, log|dy/dx|)``
        at the recovered ``x`` (the *forward* log-derivative, as :meth:`FlowTransform.inverse_and_ladj`
        reports it).

    Example:
        >>> import torch
        >>> x = torch.linspace(-6, 6, 7)
        >>> zero = torch.zeros(7, 4)
        >>> y, ladj = rational_quadratic_spline(x, zero, zero, zero[:, :3])
        >>> torch.allclose(y, x), torch.allclose(ladj, torch.zeros(7), atol=1e-6)  # the identity
        (True, True)
    """
    k = raw_widths.shape[-1]
    if raw_heights.shape[-1] != k or raw_derivatives.shape[-1] != k - 1:
        raise ValueError(
            f"need K widths, K heights and K - 1 derivatives, got {raw_widths.shape[-1]}, "
            f"{raw_heights.shape[-1]} and {raw_derivatives.shape[-1]}"
        )
    _check_spline_args(k, bound, min_bin_width, min_bin_height, min_derivative)
    inside = (x >= -bound) & (x <= bound)
    xc = x.clamp(-bound, bound)
    mins = (min_bin_width, min_bin_height, min_derivative)
    w, h, x0, y0, d0, d1 = _bins(
        xc, (raw_widths, raw_heights, raw_derivatives), bound, inverse, mins
    )
    shape = w.shape
    s = h / w
    curv = d1 + d0 - 2 * s
    xc = xc.expand(shape)
    if inverse:
        xi = _inverse_xi(xc - y0, h, s, d0, curv)
    else:
        xi = ((xc - x0) / w).clamp(0.0, 1.0)
    t = xi * (1 - xi)
    denom = s + curv * t
    out = x0 + xi * w if inverse else y0 + h * (s * xi * xi + d0 * t) / denom
    ladj = (
        2 * torch.log(s)
        + torch.log(d1 * xi * xi + 2 * s * t + d0 * (1 - xi) ** 2)
        - 2 * torch.log(denom)
    )
    x_full = x.expand(shape)
    return torch.where(inside, out, x_full), torch.where(inside, ladj, torch.zeros_like(ladj))


class RationalQuadraticMap(ElementwiseMap):
    """The rational-quadratic spline as an :class:`~pyro_nf.transforms.elementwise.ElementwiseMap`.

    Its ``3K - 1`` parameters per coordinate are ``K`` raw widths, ``K`` raw heights and ``K - 1``
    raw inner derivatives (see :func:`rational_quadratic_spline`); all zero is the identity.

    Args:
        num_bins: :math:`K`, an integer >= 2; ``None`` to take it from the parameters' number
            (then ``num_params`` is unknown, which only a layer that builds a MADE needs).
        bound, min_bin_width, min_bin_height, min_derivative: see
            :func:`rational_quadratic_spline`.

    Example:
        >>> import torch
        >>> rq = RationalQuadraticMap(num_bins=2, bound=1.0)
        >>> raw = tuple(torch.tensor([v]) for v in (0.5, 0.0, 0.0, 0.0, 1.0))
        >>> y, ladj = rq.forward(torch.tensor([0.3]), raw)
        >>> torch.allclose(rq.inverse(y, raw)[0], torch.tensor([0.3]))
        True
    """

    def __init__(
        self,
        num_bins: int | None = 8,
        bound: float = 5.0,
        *,
        min_bin_width: float = 1e-3,
        min_bin_height: float = 1e-3,
        min_derivative: float = 1e-3,
    ) -> None:
        if num_bins is not None:  # a Python int (a numpy integer would break the options' record)
            num_bins = integer(num_bins, "num_bins", minimum=2)
        _check_spline_args(num_bins, bound, min_bin_width, min_bin_height, min_derivative)
        self.num_bins = num_bins
        self.num_params = None if num_bins is None else 3 * num_bins - 1
        self.bound = float(bound)
        self.mins = dict(
            min_bin_width=float(min_bin_width), min_bin_height=float(min_bin_height),
            min_derivative=float(min_derivative),
        )  # fmt: skip

    def _spline(self, x: Tensor, params, inverse: bool) -> tuple[Tensor, Tensor]:
        raw = torch.stack(params, -1)
        k = (raw.shape[-1] + 1) // 3
        w, h, d = raw[..., :k], raw[..., k : 2 * k], raw[..., 2 * k :]
        return rational_quadratic_spline(x, w, h, d, bound=self.bound, inverse=inverse, **self.mins)

    def forward(self, x: Tensor, params) -> tuple[Tensor, Tensor]:
        return self._spline(x, params, inverse=False)

    def inverse(self, y: Tensor, params) -> tuple[Tensor, Tensor]:
        return self._spline(y, params, inverse=True)

    def options(self) -> dict:
        return {"num_bins": self.num_bins, "bound": self.bound, **self.mins}


class SplineAutoregressiveTransform(AutoregressiveTransform):
    """Stateless autoregressive spline map given a conditioner.

    Args:
        conditioner: callable ``x -> raw`` with ``raw`` of shape ``(..., D, 3K - 1)`` (``K``
            widths, ``K`` heights, ``K - 1`` inner derivatives per coordinate), autoregressive
            in some order.
        bound: the splines act on ``[-bound, bound]``; the identity outside.
        min_bin_width, min_bin_height, min_derivative: see :func:`rational_quadratic_spline`.

    Example:
        >>> import torch
        >>> def conditioner(x):  # coordinate 1's bins depend on x_0; coordinate 0's are fixed
        ...     raw = torch.zeros(*x.shape, 11)
        ...     raw[..., 1, 0] = 2 * x[..., 0]
        ...     return raw
        >>> t = SplineAutoregressiveTransform(conditioner)
        >>> x = torch.tensor([1.0, 0.5])
        >>> y, ladj = t.call_and_ladj(x)
        >>> torch.allclose(t.inv(y), x, atol=1e-5)  # two sequential passes
        True
    """

    def __init__(
        self,
        conditioner: Callable[[Tensor], Tensor],
        bound: float = 5.0,
        *,
        min_bin_width: float = 1e-3,
        min_bin_height: float = 1e-3,
        min_derivative: float = 1e-3,
    ) -> None:
        rq = RationalQuadraticMap(
            None, bound, min_bin_width=min_bin_width, min_bin_height=min_bin_height,
            min_derivative=min_derivative,
        )  # fmt: skip
        super().__init__(lambda x: conditioner(x).unbind(-1), elementwise=rq)


class SplineAutoregressive(MaskedAutoregressive):
    """Rational-quadratic spline autoregressive layer (Durkan et al. 2019) on a MADE conditioner.

    Sampling and scoring its own samples cost one network pass; scoring another value costs
    :math:`D` passes (exact, closed-form per coordinate). A fresh layer is exactly the identity.

    Args:
        dim, context_dim, hidden_dims, order, activation, fan_in_ref: see
            :class:`~pyro_nf.transforms.MaskedAutoregressive`.
        num_bins: number of spline bins :math:`K` (the MADE outputs :math:`3K - 1` numbers per
            variable).
        bound: the splines act on ``[-bound, bound]`` and are the identity outside.
        min_bin_width, min_bin_height, min_derivative: see :func:`rational_quadratic_spline`.

    Example:
        >>> import torch
        >>> layer = SplineAutoregressive(3, num_bins=4)
        >>> x = torch.randn(5, 3)
        >>> torch.allclose(layer(x), x, atol=1e-6)   # identity at initialization
        True
    """

    def __init__(
        self,
        dim: int,
        context_dim: int = 0,
        *,
        hidden_dims: Sequence[int] | None = None,
        order: Sequence[int] | Tensor | None = None,
        num_bins: int = 8,
        bound: float = 5.0,
        activation: str | Callable[[], nn.Module] = DEFAULT_ACTIVATION,
        min_bin_width: float = 1e-3,
        min_bin_height: float = 1e-3,
        min_derivative: float = 1e-3,
        fan_in_ref: int | None = FAN_IN_REF,
    ) -> None:
        super().__init__(
            dim, context_dim, elementwise=RationalQuadraticMap, hidden_dims=hidden_dims,
            order=order, activation=activation, fan_in_ref=fan_in_ref, num_bins=num_bins,
            bound=bound, min_bin_width=min_bin_width, min_bin_height=min_bin_height,
            min_derivative=min_derivative,
        )  # fmt: skip
        self.num_bins, self.bound = num_bins, float(bound)
