"""Planar flow (Rezende & Mohamed, 2015), with an exact inverse.

.. math::
    f(z) = z + \\hat u \\tanh(w^\\top z + b), \\qquad
    \\log|\\det J_f(z)| = \\log\\left|1 + (1 - \\tanh^2(w^\\top z + b))\\, w^\\top \\hat u\\right|.

The map is invertible when :math:`w^\\top \\hat u > -1` (Rezende & Mohamed 2015, appendix A).
The free vector :math:`u` is mapped to

.. math::
    \\hat u = u + \\big(m(w^\\top u) - w^\\top u\\big) \\frac{w}{\\lVert w\\rVert^2}, \\qquad
    m(x) = \\operatorname{softplus}(x + \\log(e - 1)) - 1,

so that :math:`w^\\top \\hat u = m(w^\\top u) > -1`. The paper uses :math:`m(x) = -1 +
\\log(1 + e^x)`; the shift by :math:`\\log(e-1)` makes :math:`m(0) = 0`, so ``u = 0`` gives
:math:`\\hat u = 0`, the identity map (the paper's choice gives a non-zero :math:`\\hat u` at
``u = 0``).

Inverse: writing :math:`\\alpha = w^\\top z`, the scalar :math:`\\alpha` solves
:math:`\\alpha + m \\tanh(\\alpha + b) = w^\\top y` (with :math:`m = w^\\top\\hat u`), a strictly
increasing function of :math:`\\alpha` whose root lies in :math:`[w^\\top y - |m|, w^\\top y + |m|]`.
It is found by Newton's method safeguarded by bisection on that bracket (a Newton step is
taken only when it stays inside the bracket and moves less than half its width, so the iteration
cannot cycle); then
:math:`z = y - \\hat u \\tanh(\\alpha + b)`. Gradients through the inverse come from one Newton step
taken with autograd on from the converged root (the implicit-function theorem), so they are exact
at convergence.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import FlowModule, FlowTransform, invert_in_reverse

__all__ = ["Planar", "PlanarStackTransform", "PlanarTransform"]

_LOG_E_MINUS_1 = math.log(math.e - 1.0)


def _check_inverse_tol(inverse_tol: float | None) -> float | None:
    """``inverse_tol`` if it is ``None`` or a positive finite number; else a ``ValueError``."""
    if inverse_tol is None:
        return None
    if (
        isinstance(inverse_tol, bool)
        or not isinstance(inverse_tol, numbers.Real)
        or not (math.isfinite(inverse_tol) and inverse_tol > 0)
    ):
        raise ValueError(
            f"inverse_tol must be None (the default, 8 * eps of the dtype) or a positive finite "
            f"number, got {inverse_tol!r}"
        )
    return float(inverse_tol)


class PlanarTransform(FlowTransform):
    """Stateless planar map :math:`f(z) = z + \\hat u \\tanh(w^\\top z + b)`.

    Args:
        u: free vector, shape ``(..., D)``; mapped to :math:`\\hat u` with :math:`w^\\top\\hat u > -1`.
        w: shape ``(..., D)``, must be non-zero.
        b: shape ``(...)``.
        inverse_tol: tolerance of the 1-D root solve of the inverse (relative to ``1 + |alpha|``);
            default ``8 * eps`` of the dtype.
        inverse_max_iter: cap on the safeguarded Newton iterations.

    Example:
        >>> import torch
        >>> t = PlanarTransform(torch.randn(3), torch.randn(3), torch.tensor(0.5))
        >>> y = torch.randn(10, 3)
        >>> torch.allclose(t(t.inv(y)), y, atol=1e-5)
        True
    """

    def __init__(
        self,
        u: Tensor,
        w: Tensor,
        b: Tensor,
        *,
        inverse_tol: float | None = None,
        inverse_max_iter: int = 100,
    ) -> None:
        super().__init__()
        wu = (w * u).sum(-1)
        # 1 + w^T u_hat > 0, kept apart from w^T u_hat itself so that neither the log-det nor the
        # inverse loses it to rounding when w^T u_hat is close to -1.
        self.one_plus_wu_hat = F.softplus(wu + _LOG_E_MINUS_1).clamp_min(torch.finfo(wu.dtype).tiny)
        self.wu_hat = self.one_plus_wu_hat - 1.0
        w_sq = (w * w).sum(-1).clamp_min(torch.finfo(w.dtype).tiny)
        self.u_hat = u + ((self.wu_hat - wu) / w_sq).unsqueeze(-1) * w
        self.w = w
        self.b = b
        self.inverse_tol = _check_inverse_tol(inverse_tol) if inverse_tol is not None else None
        self.inverse_max_iter = inverse_max_iter

    def call_and_ladj(self, x: Tensor) -> tuple[Tensor, Tensor]:
        a = (x * self.w).sum(-1) + self.b
        t = torch.tanh(a)
        return torch.addcmul(x, t.unsqueeze(-1), self.u_hat), self._ladj(t)

    def _ladj(self, t: Tensor) -> Tensor:
        # log(1 + sech^2(a) w.u_hat) = log(tanh^2(a) + sech^2(a) (1 + w.u_hat)), positive inside
        return torch.log(t * t + (1.0 - t * t) * self.one_plus_wu_hat)

    def _solve_alpha(self, c: Tensor) -> Tensor:
        """Root of ``g(a) = a + m tanh(a + b) - c`` (strictly increasing, bracketed by ``c -+ |m|``)."""
        tol = self.inverse_tol if self.inverse_tol is not None else 8 * torch.finfo(c.dtype).eps
        with torch.no_grad():
            m, b, target = torch.broadcast_tensors(
                self.wu_hat.detach(), self.b.detach(), c.detach()
            )
            m1 = self.one_plus_wu_hat.detach()
            lo, hi = target - m.abs(), target + m.abs()
            a = target - m * torch.tanh(target + b)  # one fixed-point step as the first guess
            a = torch.minimum(torch.maximum(a, lo), hi)
            for _ in range(self.inverse_max_iter):
                t = torch.tanh(a + b)
                g = a + m * t - target
                lo = torch.where(g < 0, a, lo)
                hi = torch.where(g > 0, a, hi)
                a_new = a - g / (t * t + (1.0 - t * t) * m1)
                # Newton can cycle across the bend of tanh; take it only when it lands inside
                # the bracket and moves less than half its width, else bisect (always progress).
                reject = (a_new <= lo) | (a_new >= hi) | ((a_new - a).abs() > 0.5 * (hi - lo))
                a_new = torch.where(reject & (g != 0), 0.5 * (lo + hi), a_new)
                converged = (a_new - a).abs() <= tol * (1.0 + a.abs())
                a = a_new
                if bool(converged.all()):
                    break
        # One Newton step with autograd on: exact first-order gradients at the root.
        m, m1, b = self.wu_hat, self.one_plus_wu_hat, self.b
        t = torch.tanh(a + b)
        return a - (a + m * t - c) / (t * t + (1.0 - t * t) * m1)

    def inverse_and_ladj(self, y: Tensor) -> tuple[Tensor, Tensor]:
        alpha = self._solve_alpha((y * self.w).sum(-1))
        t = torch.tanh(alpha + self.b)
        x = y - self.u_hat * t.unsqueeze(-1)
        return x, self._ladj(t)

    def _inverse(self, y: Tensor) -> Tensor:
        return self.inverse_and_ladj(y)[0]


class PlanarStackTransform(PlanarTransform):
    """``K`` planar maps applied in order, parameters stacked: one transform, one Python loop.

    Same arguments as :class:`PlanarTransform` with an extra layer dimension: ``u, w`` of shape
    ``(..., K, D)`` and ``b`` of shape ``(..., K)``; layer 0 acts first. The constraint and the
    log-dets of all layers are evaluated in one vectorized step each, so a layer costs a handful
    of tensor operations. The numbers equal those of ``K`` separate :class:`PlanarTransform` s.

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> u, w, b = torch.randn(4, 2, generator=g), torch.randn(4, 2, generator=g), torch.randn(4)
        >>> x = torch.randn(5, 2, generator=g)
        >>> y, ladj = x, 0.0
        >>> for k in range(4):  # four separate layers, layer 0 first
        ...     y, ladj_k = PlanarTransform(u[k], w[k], b[k]).call_and_ladj(y)
        ...     ladj = ladj + ladj_k
        >>> y_stack, ladj_stack = PlanarStackTransform(u, w, b).call_and_ladj(x)
        >>> torch.allclose(y_stack, y, atol=1e-6), torch.allclose(ladj_stack, ladj, atol=1e-5)
        (True, True)
    """

    def _layer(self, k: int) -> PlanarTransform:
        layer = PlanarTransform.__new__(PlanarTransform)
        FlowTransform.__init__(layer)
        layer.u_hat, layer.w, layer.b = self.u_hat[..., k, :], self.w[..., k, :], self.b[..., k]
        layer.wu_hat, layer.one_plus_wu_hat = self.wu_hat[..., k], self.one_plus_wu_hat[..., k]
        layer.inverse_tol, layer.inverse_max_iter = self.inverse_tol, self.inverse_max_iter
        return layer

    def call_and_ladj(self, x: Tensor) -> tuple[Tensor, Tensor]:
        ts = []
        us = self.u_hat.unbind(-2)
        if self.w.dim() == 2:  # shared parameters: w.x + b as one fused linear op per layer
            for w, b, u in zip(self.w.unbind(0), self.b.unbind(0), us):
                t = torch.tanh(F.linear(x, w[None], b[None]))
                x = torch.addcmul(x, t, u)
                ts.append(t)
        else:  # per-datapoint parameters
            for w, b, u in zip(self.w.unbind(-2), self.b.unbind(-1), us):
                t = torch.tanh((x * w).sum(-1, keepdim=True) + b.unsqueeze(-1))
                x = torch.addcmul(x, t, u)
                ts.append(t)
        return x, self._ladj(torch.cat(ts, -1)).sum(-1)

    def inverse_and_ladj(self, y: Tensor) -> tuple[Tensor, Tensor]:
        return invert_in_reverse([self._layer(k) for k in range(self.w.shape[-2])], y)


class Planar(FlowModule):
    """Planar flow layer owning its parameters, free or produced from a context.

    The layer starts at the identity (:math:`u = 0`). With ``context_dim > 0``, ``u, w, b`` are a
    linear function of the context (Rezende & Mohamed's amortized flow): call
    ``layer.condition(h)`` to get the per-datapoint :class:`PlanarTransform`.

    Args:
        dim: dimension :math:`D` of the variable.
        context_dim: size of the context vector; 0 for an unconditional layer.
        inverse_tol: tolerance of the inverse's root solve (see :class:`PlanarTransform`).

    Example:
        >>> import torch, pyro.distributions as dist
        >>> layer = Planar(2)
        >>> d = dist.TransformedDistribution(dist.Normal(torch.zeros(2), 1.0).to_event(1), [layer])
        >>> d.log_prob(torch.tensor([0.3, -1.0])).shape   # any value can be scored
        torch.Size([])
    """

    fusable = True

    def __init__(self, dim: int, context_dim: int = 0, *, inverse_tol: float | None = None) -> None:
        super().__init__(dim, context_dim)
        self.inverse_tol = _check_inverse_tol(inverse_tol)
        w = torch.randn(dim) / math.sqrt(dim)
        self._init_params(torch.cat([torch.zeros(dim), w, torch.zeros(1)]))

    def _build(self, raw: Tensor, stacked: bool = False) -> PlanarTransform:
        d = self.dim
        cls = PlanarStackTransform if stacked else PlanarTransform
        return cls(raw[..., :d], raw[..., d : 2 * d], raw[..., 2 * d], inverse_tol=self.inverse_tol)
