"""Radial flow (Rezende & Mohamed, 2015), with a closed-form inverse.

.. math::
    f(z) = z + \\beta\\, h(r) (z - z_0), \\quad r = \\lVert z - z_0\\rVert, \\quad h(r) = \\frac{1}{\\alpha + r},

.. math::
    \\log|\\det J_f(z)| = (D - 1) \\log(1 + \\beta h(r)) + \\log(1 + \\alpha\\beta h(r)^2).

It is invertible when :math:`\\alpha > 0` and :math:`\\beta \\ge -\\alpha`. Both are kept by the
parametrization :math:`\\alpha = \\operatorname{softplus}(a)`,
:math:`\\beta = \\operatorname{softplus}(a + c) - \\operatorname{softplus}(a)`, which gives
:math:`\\beta > -\\alpha` for every real ``a, c`` and :math:`\\beta = 0` (the identity) at ``c = 0``.

Inverse: :math:`y - z_0` is parallel to :math:`z - z_0`, and :math:`s = \\lVert y - z_0\\rVert` satisfies
:math:`s = r (1 + \\beta/(\\alpha + r))`, i.e. :math:`r^2 + (\\alpha + \\beta - s) r - \\alpha s = 0`, whose
non-negative root is taken in the cancellation-free form.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import FlowModule, FlowTransform, inverse_softplus, invert_in_reverse

__all__ = ["Radial", "RadialStackTransform", "RadialTransform"]


def _norm(v: Tensor) -> Tensor:
    # Euclidean norm over the last dim; torch gives it a zero (finite) gradient at v == 0.
    return torch.linalg.vector_norm(v, dim=-1)


class RadialTransform(FlowTransform):
    """Stateless radial map :math:`f(z) = z + \\beta (z - z_0) / (\\alpha + \\lVert z - z_0\\rVert)`.

    Args:
        z0: reference point, shape ``(..., D)``.
        alpha_raw: shape ``(...)``; :math:`\\alpha = \\operatorname{softplus}(\\text{alpha\\_raw})`.
        beta_raw: shape ``(...)``; :math:`\\beta = \\operatorname{softplus}(\\text{alpha\\_raw} +
            \\text{beta\\_raw}) - \\alpha`, so ``beta_raw = 0`` is the identity.

    Example:
        >>> import torch
        >>> t = RadialTransform(torch.zeros(2), torch.tensor(0.0), torch.tensor(1.0))
        >>> y = torch.randn(5, 2)
        >>> torch.allclose(t(t.inv(y)), y, atol=1e-6)
        True
    """

    def __init__(self, z0: Tensor, alpha_raw: Tensor, beta_raw: Tensor) -> None:
        super().__init__()
        self.z0 = z0
        self.alpha = F.softplus(alpha_raw)
        self.beta = F.softplus(alpha_raw + beta_raw) - self.alpha

    def _ladj(self, r: Tensor, dim: int) -> Tensor:
        h = 1.0 / (self.alpha + r)
        bh = self.beta * h
        return (dim - 1) * torch.log1p(bh) + torch.log1p(self.alpha * bh * h)

    def call_and_ladj(self, x: Tensor) -> tuple[Tensor, Tensor]:
        diff = x - self.z0
        r = _norm(diff)
        y = x + (self.beta / (self.alpha + r)).unsqueeze(-1) * diff
        return y, self._ladj(r, x.shape[-1])

    def inverse_and_ladj(self, y: Tensor) -> tuple[Tensor, Tensor]:
        diff = y - self.z0
        s = _norm(diff)
        alpha, beta = self.alpha, self.beta
        c = alpha + beta - s
        root = torch.sqrt(c * c + 4.0 * alpha * s)
        # r = (-c + root) / 2 written without cancellation for c >= 0.
        r = torch.where(c >= 0, 2.0 * alpha * s / (c + root), 0.5 * (root - c))
        x = self.z0 + diff * ((alpha + r) / (alpha + r + beta)).unsqueeze(-1)
        return x, self._ladj(r, y.shape[-1])

    def _inverse(self, y: Tensor) -> Tensor:
        return self.inverse_and_ladj(y)[0]


class RadialStackTransform(RadialTransform):
    """``K`` radial maps applied in order, parameters stacked: one transform, one Python loop.

    Same arguments as :class:`RadialTransform` with an extra layer dimension: ``z0`` of shape
    ``(..., K, D)``, ``alpha_raw`` and ``beta_raw`` of shape ``(..., K)``; layer 0 acts first. The
    log-dets of all layers are evaluated in one vectorized step after the loop.

    Example:
        >>> import torch
        >>> stack = RadialStackTransform(torch.randn(3, 2), torch.zeros(3), torch.ones(3))
        >>> y = torch.randn(5, 2)
        >>> x, ladj = stack.inverse_and_ladj(y)  # closed form, one layer after the other
        >>> torch.allclose(stack(x), y, atol=1e-5), torch.allclose(ladj, stack.call_and_ladj(x)[1])
        (True, True)
    """

    def _layer(self, k: int) -> RadialTransform:
        layer = RadialTransform.__new__(RadialTransform)
        FlowTransform.__init__(layer)
        layer.z0, layer.alpha, layer.beta = (
            self.z0[..., k, :],
            self.alpha[..., k],
            self.beta[..., k],
        )
        return layer

    def call_and_ladj(self, x: Tensor) -> tuple[Tensor, Tensor]:
        rs = []
        for k in range(self.z0.shape[-2]):
            diff = x - self.z0[..., k, :]
            r = _norm(diff)
            x = torch.addcmul(x, (self.beta[..., k] / (self.alpha[..., k] + r)).unsqueeze(-1), diff)
            rs.append(r)
        return x, self._ladj(torch.stack(rs, -1), x.shape[-1]).sum(-1)

    def inverse_and_ladj(self, y: Tensor) -> tuple[Tensor, Tensor]:
        return invert_in_reverse([self._layer(k) for k in range(self.z0.shape[-2])], y)


class Radial(FlowModule):
    """Radial flow layer owning its parameters, free or produced from a context.

    Starts at the identity (:math:`\\beta = 0`), centred at ``z0 = 0`` with :math:`\\alpha = 1`. With
    ``context_dim > 0``, ``z0, alpha, beta`` are a linear function of the context.

    Args:
        dim: dimension :math:`D` of the variable.
        context_dim: size of the context vector; 0 for an unconditional layer.

    Example:
        >>> import torch
        >>> layer = Radial(3)
        >>> x = torch.randn(4, 3)
        >>> torch.allclose(layer(x), x)   # identity at initialization
        True
    """

    fusable = True

    def __init__(self, dim: int, context_dim: int = 0) -> None:
        super().__init__(dim, context_dim)
        alpha_raw = inverse_softplus(torch.tensor([1.0]))
        self._init_params(torch.cat([torch.zeros(dim), alpha_raw, torch.zeros(1)]))

    def _build(self, raw: Tensor, stacked: bool = False) -> RadialTransform:
        d = self.dim
        cls = RadialStackTransform if stacked else RadialTransform
        return cls(raw[..., :d], raw[..., d], raw[..., d + 1])
