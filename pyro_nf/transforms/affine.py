"""Elementwise affine layer :math:`y = \\mu + \\sigma \\odot x`: the learnable base of a flow.

.. math::
    \\log|\\det J| = \\sum_i \\log \\sigma_i, \\qquad \\sigma = \\operatorname{softplus}(\\rho),

the same positive parametrization as Pyro's ``AutoNormal`` scale, so a flow whose other layers are
at the identity is exactly ``AutoNormal``'s distribution.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import FlowModule, FlowTransform, inverse_softplus

__all__ = ["Affine", "AffineTransform", "TriangularAffineTransform"]


class AffineTransform(FlowTransform):
    """Stateless elementwise affine map :math:`y = \\mu + \\sigma \\odot x` with :math:`\\sigma > 0`.

    Args:
        loc: :math:`\\mu`, shape ``(..., D)``.
        scale: :math:`\\sigma`, positive, shape ``(..., D)``.

    Example:
        >>> import torch
        >>> t = AffineTransform(torch.ones(2), torch.full((2,), 3.0))
        >>> t(torch.zeros(2)), t.log_abs_det_jacobian(torch.zeros(2), None)
        (tensor([1., 1.]), tensor(2.1972))
    """

    def __init__(self, loc: Tensor, scale: Tensor) -> None:
        super().__init__()
        self.loc = loc
        self.scale = scale

    def call_and_ladj(self, x: Tensor) -> tuple[Tensor, Tensor]:
        y = self.loc + self.scale * x
        ladj = self.scale.log().sum(-1)
        return y, ladj.expand(y.shape[:-1])

    def inverse_and_ladj(self, y: Tensor) -> tuple[Tensor, Tensor]:
        x = (y - self.loc) / self.scale
        return x, self.scale.log().sum(-1).expand(x.shape[:-1])

    def _inverse(self, y: Tensor) -> Tensor:
        return (y - self.loc) / self.scale


class TriangularAffineTransform(FlowTransform):
    """Stateless full-rank affine map :math:`y = \\mu + L x`, :math:`L` lower-triangular.

    .. math::
        \\log|\\det J| = \\sum_i \\log L_{ii}, \\qquad x = L^{-1}(y - \\mu)
        \\text{ (a triangular solve)}.

    It maps a standard Normal to :math:`\\mathcal N(\\mu, L L^\\top)`. The flow guides use it, with
    :math:`L` fixed, as the preconditioner of ``precondition="laplace"``
    (:meth:`pyro_nf.Flow.set_preconditioner`).

    Args:
        loc: :math:`\\mu`, shape ``(..., D)``.
        scale_tril: :math:`L`, shape ``(..., D, D)``, lower-triangular with a positive diagonal
            (only the lower triangle is read).

    Example:
        >>> import torch
        >>> L = torch.tensor([[2.0, 0.0], [1.0, 0.5]])
        >>> t = TriangularAffineTransform(torch.zeros(2), L)
        >>> y = t(torch.tensor([1.0, 1.0]))
        >>> y, t.inv(y), t.log_abs_det_jacobian(None, y)
        (tensor([2.0000, 1.5000]), tensor([1., 1.]), tensor(0.))
    """

    def __init__(self, loc: Tensor, scale_tril: Tensor) -> None:
        super().__init__()
        self.loc = loc
        self.scale_tril = scale_tril.tril()

    def _ladj(self, batch_shape: torch.Size) -> Tensor:
        ladj = self.scale_tril.diagonal(dim1=-2, dim2=-1).log().sum(-1)
        return ladj.expand(batch_shape)

    def call_and_ladj(self, x: Tensor) -> tuple[Tensor, Tensor]:
        y = self.loc + (self.scale_tril @ x.unsqueeze(-1)).squeeze(-1)
        return y, self._ladj(y.shape[:-1])

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        # constant in x: nothing to recompute (x may be None)
        ref = y if y is not None else x
        return self._ladj(ref.shape[:-1] if ref is not None else torch.Size())

    def _inverse(self, y: Tensor) -> Tensor:
        diff = (y - self.loc).unsqueeze(-1)
        tril = self.scale_tril.expand(diff.shape[:-2] + self.scale_tril.shape[-2:])
        return torch.linalg.solve_triangular(tril, diff, upper=False).squeeze(-1)

    def inverse_and_ladj(self, y: Tensor) -> tuple[Tensor, Tensor]:
        x = self._inverse(y)
        return x, self._ladj(x.shape[:-1])


class Affine(FlowModule):
    """Learnable elementwise affine layer; with a context, ``loc`` and ``scale`` come from a linear head.

    Args:
        dim: dimension :math:`D`.
        context_dim: size of the context vector; 0 for free parameters.
        init_loc: initial :math:`\\mu` (scalar or shape ``(D,)``).
        init_scale: initial :math:`\\sigma` (positive scalar or shape ``(D,)``).

    Example:
        >>> layer = Affine(2, init_loc=1.0, init_scale=0.5)
        >>> layer.loc, layer.scale
        (tensor([1., 1.]), tensor([0.5000, 0.5000]))
    """

    def __init__(
        self,
        dim: int,
        context_dim: int = 0,
        *,
        init_loc: Tensor | float = 0.0,
        init_scale: Tensor | float = 1.0,
    ) -> None:
        super().__init__(dim, context_dim)
        loc = torch.as_tensor(init_loc, dtype=torch.get_default_dtype()).detach().clone()
        scale = torch.as_tensor(init_scale, dtype=torch.get_default_dtype()).detach().clone()
        if not torch.isfinite(loc).all():
            raise ValueError("Affine: init_loc must be finite")
        if not (scale > 0).all() or not torch.isfinite(scale).all():
            raise ValueError(f"Affine: init_scale must be positive and finite, got {init_scale!r}")
        loc = loc.expand(dim).clone() if loc.dim() == 0 else loc
        scale = scale.expand(dim).clone() if scale.dim() == 0 else scale
        if loc.shape != (dim,) or scale.shape != (dim,):
            raise ValueError(
                f"Affine: init_loc and init_scale must be scalars or of shape ({dim},), "
                f"got {tuple(loc.shape)} and {tuple(scale.shape)}"
            )
        self._init_params(torch.cat([loc, inverse_softplus(scale)]))

    def _split(self, raw: Tensor) -> tuple[Tensor, Tensor]:
        return raw[..., : self.dim], F.softplus(raw[..., self.dim :])

    def _build(self, raw: Tensor) -> AffineTransform:
        return AffineTransform(*self._split(raw))

    def _free(self) -> tuple[Tensor, Tensor]:
        if self.context_dim:
            raise AttributeError(
                "Affine with a context has no single loc/scale: use layer.condition(h).loc / .scale"
            )
        return self._split(self.raw.detach())

    @torch.no_grad()
    def set_loc_scale(self, loc: Tensor | float, scale: Tensor | float) -> Affine:
        """Set :math:`\\mu` and :math:`\\sigma` in place (layers without context only).

        The parameter tensor stays the same object (an optimizer or Pyro's param store holding
        it sees the new values); ``loc`` and ``scale`` (positive) are scalars or of shape
        ``(D,)`` and are cast to the parameter's dtype and device. Returns the layer.

        Example:
            >>> layer = Affine(2).set_loc_scale(torch.tensor([1.0, -1.0]), 0.5)
            >>> layer.loc, layer.scale
            (tensor([ 1., -1.]), tensor([0.5000, 0.5000]))
        """
        self._free()  # refuses a layer with a context
        like = {"dtype": self.raw.dtype, "device": self.raw.device}
        scale = torch.as_tensor(scale, **like).expand(self.dim)
        if scale.device.type != "meta" and not bool((scale > 0).all()):  # meta: no values
            raise ValueError("Affine.set_loc_scale: scale must be positive")
        self.raw[: self.dim].copy_(torch.as_tensor(loc, **like).expand(self.dim))
        self.raw[self.dim :].copy_(inverse_softplus(scale))
        return self

    @property
    def loc(self) -> Tensor:
        """Current :math:`\\mu` (layers without context only)."""
        return self._free()[0]

    @property
    def scale(self) -> Tensor:
        """Current :math:`\\sigma` (layers without context only)."""
        return self._free()[1]
