"""Shared machinery of the flow layers.

Every flow family comes in two pieces:

* a *stateless* :class:`FlowTransform` whose parameters are plain tensors (they may carry batch
  dimensions, one set per datapoint, which broadcast against the input), and
* a parameter-owning :class:`FlowModule` that builds that transform on each call, from free
  parameters or, when ``context_dim > 0``, from a context vector through a small linear head.

The transform computes :math:`y = f(x)` and :math:`\\log|\\det J_f(x)|` in one pass
(:meth:`FlowTransform.call_and_ladj`) and inverts exactly (:meth:`FlowTransform.inverse_and_ladj`),
so no cache is ever needed to score a value.
"""

from __future__ import annotations

import torch
from pyro.distributions.torch_transform import TransformModule
from torch import Tensor, nn
from torch.distributions import Transform, constraints

from .._checks import integer

__all__ = ["ChainTransform", "FlowTransform", "FlowModule", "inverse_softplus"]


def inverse_softplus(y: Tensor | float) -> Tensor:
    """Inverse of :func:`torch.nn.functional.softplus`, :math:`x = y + \\log(-\\operatorname{expm1}(-y))`."""
    if not torch.is_tensor(y):  # (as_tensor of a tensor would move it to the default device)
        y = torch.as_tensor(y, dtype=torch.get_default_dtype())
    return y + torch.log(-torch.expm1(-y))


class FlowTransform(Transform):
    """A stateless bijection of :math:`\\mathbb{R}^D` with a log-det computed alongside the map.

    Subclasses implement :meth:`call_and_ladj` and :meth:`_inverse`; they may override
    :meth:`inverse_and_ladj` when the inverse yields the log-det for free. No result is cached:
    ``log_abs_det_jacobian(x, y)`` recomputes from ``x``, and the inverse works on any value.

    Example:
        >>> import torch
        >>> class Shift(FlowTransform):  # the smallest subclass: y = x + c
        ...     def __init__(self, c):
        ...         super().__init__()
        ...         self.c = c
        ...     def call_and_ladj(self, x):
        ...         return x + self.c, x.new_zeros(x.shape[:-1])
        ...     def _inverse(self, y):
        ...         return y - self.c
        >>> t = Shift(torch.tensor([1.0, -1.0]))
        >>> t.inv(torch.zeros(2)), t.inverse_and_ladj(torch.zeros(2))[1]
        (tensor([-1.,  1.]), tensor(0.))
    """

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True
    sign = 1

    def __init__(self) -> None:
        super().__init__(cache_size=0)

    def call_and_ladj(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``(f(x), log|det df/dx|)``; the log-det has shape ``x.shape[:-1]`` (broadcast)."""
        raise NotImplementedError

    def inverse_and_ladj(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``(x, log|det df/dx|(x))`` for ``x = f^{-1}(y)`` (the *forward* log-det at ``x``)."""
        x = self._inverse(y)
        return x, self.call_and_ladj(x)[1]

    def _call(self, x: Tensor) -> Tensor:
        return self.call_and_ladj(x)[0]

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        return self.call_and_ladj(x)[1]

    def with_cache(self, cache_size: int = 1) -> Transform:
        # Stateless by design: a cache would only hide the exact inverse.
        return self


def invert_in_reverse(transforms, y: Tensor) -> tuple[Tensor, Tensor | float]:
    """Invert a sequence of transforms (last first): ``(x, sum of their forward log-dets at x)``."""
    ladj = 0.0
    for t in reversed(transforms):
        y, ladj_t = t.inverse_and_ladj(y)
        ladj = ladj + ladj_t
    return y, ladj


class ChainTransform(FlowTransform):
    """Several flow transforms applied in order, as one :class:`FlowTransform`.

    Unlike :class:`torch.distributions.ComposeTransform`, the log-det is summed in the same pass
    as the map, and the inverse goes through each part's exact inverse.

    Example:
        >>> import torch
        >>> from pyro_nf.transforms import AffineTransform, PlanarTransform
        >>> t = ChainTransform([PlanarTransform(torch.ones(2), torch.ones(2), torch.tensor(0.0)),
        ...                     AffineTransform(torch.zeros(2), torch.full((2,), 2.0))])
        >>> x = torch.randn(4, 2)
        >>> torch.allclose(t.inv(t(x)), x, atol=1e-5)
        True
    """

    def __init__(self, parts) -> None:
        super().__init__()
        self.parts = list(parts)

    def call_and_ladj(self, x: Tensor) -> tuple[Tensor, Tensor]:
        ladj = 0.0
        for t in self.parts:
            x, ladj_t = t.call_and_ladj(x)
            ladj = ladj + ladj_t
        return x, _as_batch_tensor(ladj, x)

    def inverse_and_ladj(self, y: Tensor) -> tuple[Tensor, Tensor]:
        x, ladj = invert_in_reverse(self.parts, y)
        return x, _as_batch_tensor(ladj, x)

    def _inverse(self, y: Tensor) -> Tensor:
        return self.inverse_and_ladj(y)[0]


def _as_batch_tensor(ladj: Tensor | float, x: Tensor) -> Tensor:
    """A summed log-det as a tensor over ``x``'s batch shape (zeros for an empty chain)."""
    if not torch.is_tensor(ladj):
        return torch.zeros(x.shape[:-1], dtype=x.dtype, device=x.device)
    return ladj.expand(x.shape[:-1]) if ladj.dim() == 0 else ladj


def _check_dim(dim: int, name: str = "dim") -> int:
    return int(integer(dim, name))


class FlowModule(TransformModule):
    """Base class of the parameter-owning flow layers.

    A subclass declares how many raw parameters one layer needs (:meth:`_raw_init`) and how to turn
    them into a :class:`FlowTransform` (:meth:`_build`). With ``context_dim == 0`` the raw parameters
    are free ``nn.Parameter`` s and the module itself acts as that transform (so it can be used
    directly in :class:`pyro.distributions.TransformedDistribution`). With ``context_dim > 0`` a
    linear head maps a context of shape ``(..., context_dim)`` to one set of parameters per
    datapoint; call :meth:`condition` to get the transform. The head's weight starts at zero and its
    bias at the free initial value, so a conditioned layer starts at the same map for every context.

    Example:
        >>> import torch
        >>> from pyro_nf.transforms import Planar
        >>> layer = Planar(3, context_dim=5)
        >>> t = layer.condition(torch.randn(10, 5))  # one set of parameters per datapoint
        >>> t.w.shape, t(torch.randn(10, 3)).shape
        (torch.Size([10, 3]), torch.Size([10, 3]))
    """

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True
    sign = 1
    #: the family implements ``_build(raw, stacked=True)``, so :class:`pyro_nf.Flow` can run a
    #: stack of its layers as one transform (``fused=True``)
    fusable = False
    #: the family takes a MADE's ``hidden_dims`` and a variable ``order`` (:class:`pyro_nf.Flow`
    #: reverses the order on every other layer)
    autoregressive = False

    def __init__(self, dim: int, context_dim: int = 0) -> None:
        super().__init__(cache_size=0)
        self.dim = _check_dim(dim)
        self.context_dim = int(integer(context_dim, "context_dim", minimum=0))

    # -- to be provided by subclasses -------------------------------------------------------
    def _build(self, raw: Tensor, stacked: bool = False) -> FlowTransform:
        """The transform for raw parameters ``raw``; with ``stacked=True``, ``raw`` has an extra
        layer dimension at -2 and the result applies those layers in order (families with
        :attr:`fusable` set)."""
        raise NotImplementedError

    def options(self) -> dict:
        """The settings that change this layer's map for given parameters, as plain values
        (recorded by :meth:`pyro_nf.Flow.record`); none by default."""
        return {}

    # -- helpers for the common "raw vector or linear head" layout -------------------------
    def _init_params(self, raw_init: Tensor) -> None:
        if self.context_dim == 0:
            self.raw = nn.Parameter(raw_init)
        else:
            self.head = nn.Linear(self.context_dim, raw_init.numel())
            with torch.no_grad():
                self.head.weight.zero_()
                self.head.bias.copy_(raw_init)

    def _raw(self, context: Tensor | None) -> Tensor:
        if self.context_dim == 0:
            return self.raw
        return self.head(context)

    # -- public API -------------------------------------------------------------------------
    def condition(self, context: Tensor | None = None) -> FlowTransform:
        """The stateless transform of this layer, for ``context`` when the layer takes one.

        Args:
            context: tensor of shape ``(..., context_dim)``; must be ``None`` when
                ``context_dim == 0``. The leading dimensions become batch dimensions of the
                layer's parameters and broadcast against the input.
        """
        self._validate(context)
        return self._transform(context)

    def _validate(self, context: Tensor | None) -> None:
        check_context(context, self.context_dim, type(self).__name__)
        if context is not None:
            dtype = next(self.parameters()).dtype
            if context.dtype != dtype:
                raise TypeError(
                    f"{type(self).__name__}: context has dtype {context.dtype} but the layer's "
                    f"parameters are {dtype}; cast one to the other"
                )

    def _transform(self, context: Tensor | None) -> FlowTransform:
        return self._build(self._raw(context))

    def call_and_ladj(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.condition().call_and_ladj(x)

    def inverse_and_ladj(self, y: Tensor) -> tuple[Tensor, Tensor]:
        return self.condition().inverse_and_ladj(y)

    def _call(self, x: Tensor) -> Tensor:
        return self.condition().call_and_ladj(x)[0]

    def _inverse(self, y: Tensor) -> Tensor:
        return self.condition().inverse_and_ladj(y)[0]

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        return self.condition().call_and_ladj(x)[1]

    def with_cache(self, cache_size: int = 1) -> Transform:
        return self

    def extra_repr(self) -> str:
        return f"dim={self.dim}, context_dim={self.context_dim}"


def check_context(context: Tensor | None, context_dim: int, owner: str) -> None:
    """Raise a ``ValueError`` that says what is wrong when ``context`` does not fit ``context_dim``."""
    if context_dim == 0:
        if context is not None:
            raise ValueError(
                f"{owner} was built with context_dim=0 and takes no context; "
                "build it with context_dim=H to condition on a context of size H"
            )
        return
    if context is None:
        raise ValueError(
            f"{owner} was built with context_dim={context_dim} and needs a context: "
            f"call it with a tensor of shape (..., {context_dim})"
        )
    if not torch.is_tensor(context):
        raise TypeError(f"{owner}: context must be a torch.Tensor, got {type(context).__name__}")
    if context.dim() == 0 or context.shape[-1] != context_dim:
        raise ValueError(
            f"{owner} expects a context of shape (..., {context_dim}), got {tuple(context.shape)}"
        )
    if not context.is_floating_point():
        raise TypeError(f"{owner}: context must be a floating-point tensor, got {context.dtype}")
