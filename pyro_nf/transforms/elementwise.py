"""Elementwise maps for :class:`~pyro_nf.transforms.MaskedAutoregressive`: the part of an
autoregressive layer that differs between families (see :class:`ElementwiseMap`). A new
autoregressive family is one subclass here and one entry in :class:`pyro_nf.Flow`'s registry
(``pyro_nf.flow._LAYERS``).
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import Tensor

from .._checks import number

__all__ = ["AffineMap", "ElementwiseMap", "GatedAffineMap", "SoftplusAffineMap"]

Params = tuple[Tensor, ...]


class ElementwiseMap:
    """A strictly increasing map of each coordinate, given ``num_params`` parameter tensors.

    Subclasses set :attr:`num_params` and implement :meth:`forward` and :meth:`inverse`; both get
    ``params``, a tuple of ``num_params`` tensors that broadcast against the input (the MADE's
    raw outputs), and return the per-coordinate :math:`\\log g'(x)`, which the layer sums. They
    may override :meth:`identity_params` (zeros by default) and :meth:`options`.

    Example:
        >>> import torch
        >>> class Shift(ElementwiseMap):  # y = x + m
        ...     num_params = 1
        ...     def forward(self, x, params):
        ...         return x + params[0], torch.zeros_like(x)
        ...     def inverse(self, y, params):
        ...         return y - params[0], torch.zeros_like(y)
        >>> Shift().forward(torch.ones(2), (torch.tensor([1.0, -1.0]),))[0]
        tensor([2., 0.])
    """

    #: number of raw parameters per coordinate
    num_params: int = 2

    def forward(self, x: Tensor, params: Params) -> tuple[Tensor, Tensor]:
        """``(g(x), log g'(x))``, elementwise."""
        raise NotImplementedError

    def inverse(self, y: Tensor, params: Params) -> tuple[Tensor, Tensor]:
        """``(x, log g'(x))`` for ``x = g^{-1}(y)`` (the *forward* log-derivative at ``x``)."""
        raise NotImplementedError

    def identity_params(self) -> tuple[float, ...]:
        """The raw parameters at which :math:`g` is the identity: the MADE's initial output bias
        (its output weights start at zero). Zeros unless a subclass says otherwise."""
        return (0.0,) * self.num_params

    def options(self) -> dict:
        """The settings that change the map for given parameters, as plain values (they go into
        :meth:`pyro_nf.Flow.record`)."""
        return {}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}({args})"


class _ShiftScaleMap(ElementwiseMap):
    """:math:`y = x e^{s} + m` for the ``(m, s)`` a subclass's ``_shift_log_scale`` makes."""

    def _shift_log_scale(self, params: Params) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def forward(self, x: Tensor, params: Params) -> tuple[Tensor, Tensor]:
        m, s = self._shift_log_scale(params)
        return x * torch.exp(s) + m, s

    def inverse(self, y: Tensor, params: Params) -> tuple[Tensor, Tensor]:
        m, s = self._shift_log_scale(params)
        return (y - m) * torch.exp(-s), s


class AffineMap(_ShiftScaleMap):
    """:math:`y = x e^{s} + m` with the log-scale :math:`s` smoothly bounded (Kingma et al. 2016).

    The parameters are ``(m, a)``; :math:`s = c \\tanh(a / c)` with :math:`c` = ``log_scale_max``
    for :math:`a \\ge 0` and ``-log_scale_min`` below, so ``a = 0`` is the identity with slope 1
    there and no hard clamp cuts the gradient.

    Example:
        >>> import torch
        >>> m, a = torch.tensor([1.0]), torch.tensor([0.5])
        >>> AffineMap().forward(torch.tensor([2.0]), (m, a))  # s = 3 tanh(0.5 / 3)
        (tensor([4.2824]), tensor([0.4954]))
    """

    def __init__(self, log_scale_min: float = -5.0, log_scale_max: float = 3.0) -> None:
        if not log_scale_min < 0.0 < log_scale_max:
            raise ValueError(
                f"need log_scale_min < 0 < log_scale_max, got {log_scale_min}, {log_scale_max}"
            )
        self.lo, self.hi = float(log_scale_min), float(log_scale_max)

    def _shift_log_scale(self, params: Params) -> tuple[Tensor, Tensor]:
        m, a = params[:2]
        c = torch.where(a >= 0, self.hi, -self.lo).to(a.dtype)
        return m, c * torch.tanh(a / c)

    def options(self) -> dict:
        return {"log_scale_min": self.lo, "log_scale_max": self.hi, "gate_bias": None}


class GatedAffineMap(AffineMap):
    """The gated update of Kingma et al. (2016, eqs. 11-12), exactly the identity at ``a = 0``.

    :math:`\\sigma = \\operatorname{sigmoid}(a + c)`,
    :math:`y = x \\sigma / \\operatorname{sigmoid}(c) + (1 - \\sigma) m`: the scale is at most
    :math:`1 / \\operatorname{sigmoid}(c)`. The log-scale bounds are checked and recorded (they are
    the affine layer's arguments) but the gate bounds the scale instead.

    Example:
        >>> import torch
        >>> g = GatedAffineMap(2.0)
        >>> y, ladj = g.forward(torch.tensor([1.0]), (torch.tensor([0.0]), torch.tensor([50.0])))
        >>> torch.allclose(y, 1 / torch.sigmoid(torch.tensor(2.0)))  # the largest scale
        True
    """

    def __init__(
        self, gate_bias: float, log_scale_min: float = -5.0, log_scale_max: float = 3.0
    ) -> None:
        super().__init__(log_scale_min, log_scale_max)
        if (
            isinstance(gate_bias, bool) or not isinstance(gate_bias, numbers.Real)
            or not math.isfinite(gate_bias)
        ):  # fmt: skip
            raise ValueError(f"gate_bias must be None or a finite number, got {gate_bias!r}")
        self.gate_bias = float(gate_bias)

    def _shift_log_scale(self, params: Params) -> tuple[Tensor, Tensor]:
        m, a = params[:2]
        g = a + self.gate_bias
        s = F.logsigmoid(g) - F.logsigmoid(a.new_tensor(self.gate_bias))
        return torch.sigmoid(-g) * m, s

    def options(self) -> dict:
        return {**super().options(), "gate_bias": self.gate_bias}


class SoftplusAffineMap(_ShiftScaleMap):
    """Affine with a softplus scale: :math:`y = x \\sigma + m`, :math:`\\sigma = \\sigma_{\\min} +
    \\operatorname{softplus}(a)`.

    Another bound on the scale than :class:`AffineMap`'s: below by ``min_scale``, above by nothing,
    and it grows only linearly in the raw ``a`` (no :math:`e^{a}` blow-up, no saturation). The
    identity is at :math:`a_0 = \\operatorname{softplus}^{-1}(1 - \\sigma_{\\min})`, not 0, so
    :meth:`identity_params` is ``(0, a_0)``: the MADE's output bias starts there.

    Args:
        min_scale: :math:`\\sigma_{\\min}`, in ``(0, 1)``.

    Example:
        >>> import torch
        >>> sp = SoftplusAffineMap(min_scale=0.1)
        >>> m, a = (torch.tensor([v]) for v in sp.identity_params())
        >>> sp.forward(torch.tensor([2.5]), (m, a))  # the identity
        (tensor([2.5000]), tensor([0.]))
    """

    def __init__(self, min_scale: float = 1e-3) -> None:
        if not number(min_scale, "min_scale") < 1:
            raise ValueError(f"min_scale must be in (0, 1), got {min_scale!r}")
        self.min_scale = float(min_scale)

    def identity_params(self) -> tuple[float, ...]:
        return (0.0, math.log(math.expm1(1.0 - self.min_scale)))

    def _shift_log_scale(self, params: Params) -> tuple[Tensor, Tensor]:
        m, a = params
        return m, torch.log(self.min_scale + F.softplus(a))

    def options(self) -> dict:
        return {"min_scale": self.min_scale}
