"""Affine autoregressive flow built on MADE: IAF (Kingma et al. 2016) / MAF (Papamakarios et al. 2017).

.. math::
    y_i = x_i \\exp(s_i(x_{<i})) + m_i(x_{<i}), \\qquad \\log|\\det J| = \\sum_i s_i(x_{<i}),

where :math:`(m, s)` come from one MADE pass (Germain et al. 2015) over :math:`x`, in the variable
order ``order``. The forward map (sampling, as in IAF) costs one network pass; the inverse
(scoring, as in MAF) is exact and costs :math:`D` passes: after pass :math:`k` the first :math:`k`
coordinates in ``order`` are exact, because each :math:`(m_i, s_i)` depends only on earlier ones.
Use ``layer.inv`` for the MAF direction (fast scoring, sequential sampling).

The log-scale is kept in ``(log_scale_min, log_scale_max) = (l, h)`` by a smooth clamp,
:math:`s = c \\tanh(a / c)` with :math:`c = h` for :math:`a \\ge 0` and :math:`c = -l` for
:math:`a < 0`: a zero network output is exactly :math:`s = 0` (the identity), the slope there is 1,
and unlike a hard clamp the gradient never vanishes abruptly.

With ``context_dim > 0`` the context enters the first hidden layer of the MADE through an unmasked
linear map (Kingma et al. 2016, section 4), so the layer is conditional on it.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import FlowModule, FlowTransform

__all__ = ["AffineAutoregressive", "AutoregressiveTransform", "MADE"]

#: the hidden nonlinearities a MADE takes by name
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "elu": nn.ELU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
}


def _activation(spec: str | Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    """A module factory from a name in :data:`ACTIVATIONS` or a callable (e.g. ``nn.GELU``)."""
    if isinstance(spec, str):
        if spec.lower() not in ACTIVATIONS:
            raise ValueError(
                f"activation must be one of {sorted(ACTIVATIONS)} or a module class, got {spec!r}"
            )
        return ACTIVATIONS[spec.lower()]
    if isinstance(spec, nn.Module):  # an instance would be shared by the layers, and called
        raise TypeError(
            f"activation must be a name or a module class, got the instance {spec!r}; "
            f"pass the class, e.g. activation={type(spec).__name__}"
        )
    if not callable(spec):
        raise TypeError(f"activation must be a name or a module class, got {spec!r}")
    if isinstance(spec, type):
        if not issubclass(spec, nn.Module):
            raise TypeError(
                f"activation must be a name or a torch.nn.Module class, got the class {spec!r}"
            )
        return spec
    # Any other callable must build a module when called with no argument (e.g. a
    # functools.partial of a module class); a tensor function such as torch.tanh does not.
    try:
        made = spec()
    except TypeError:
        made = None
    if not isinstance(made, nn.Module):
        name = getattr(spec, "__name__", None)
        hint = (
            f"pass activation={name.lower()!r} or the module class"
            if isinstance(name, str) and name.lower() in ACTIVATIONS
            else "pass a module class such as torch.nn.Tanh, or a function returning a module"
        )
        what = f"the function {name}" if isinstance(name, str) else repr(spec)
        raise TypeError(
            f"activation must be a name, a torch.nn.Module class or a function that returns a "
            f"module when called with no argument; got {what}, which does not build a module: "
            f"{hint}"
        )
    return spec


class _MaskedLinear(nn.Linear):
    def __init__(self, mask: Tensor) -> None:
        super().__init__(mask.shape[1], mask.shape[0])
        self.register_buffer("mask", mask.to(self.weight.dtype))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight * self.mask, self.bias)


class MADE(nn.Module):
    """Masked autoencoder (Germain et al. 2015) returning ``num_params`` tensors of shape ``(..., D)``.

    With the default ``num_params=2`` these are ``(m, a)``, the shift and log-scale of
    :class:`AffineAutoregressive`. Output ``i`` of every one depends only on inputs that come before
    ``i`` in ``order``. The output layer starts at zero, so a fresh network returns zeros.

    Args:
        dim: number of variables :math:`D`.
        hidden_dims: sizes of the hidden layers (at least one).
        order: a permutation of ``range(dim)``; ``order[k]`` is the variable at position ``k``.
        context_dim: size of an optional context added to the first hidden layer.
        activation: the hidden nonlinearity: a module class such as :class:`torch.nn.GELU`, or
            one of the names ``"elu"`` (default), ``"gelu"``, ``"silu"``, ``"tanh"``, ``"relu"``.
        num_params: number of outputs per variable (2 for the affine layer; the spline layer
            uses ``3 * num_bins - 1``).

    Example:
        >>> import torch
        >>> made = MADE(3, hidden_dims=(8,), order=torch.tensor([2, 0, 1]))  # x_2 first, x_1 last
        >>> m, a = made(torch.randn(4, 3))
        >>> m.shape, bool((m == 0).all() and (a == 0).all())  # a fresh MADE outputs zeros
        (torch.Size([4, 3]), True)
        >>> with torch.no_grad():
        ...     _ = made.out.weight.normal_()
        >>> jac = torch.autograd.functional.jacobian(lambda x: made(x)[0], torch.randn(3))
        >>> (jac != 0).int()  # row i: the inputs m_i depends on
        tensor([[0, 0, 1],
                [1, 0, 1],
                [0, 0, 0]], dtype=torch.int32)
    """

    def __init__(
        self,
        dim: int,
        hidden_dims: Sequence[int],
        order: Tensor,
        context_dim: int = 0,
        activation: str | Callable[[], nn.Module] = nn.ELU,
        num_params: int = 2,
    ) -> None:
        super().__init__()
        activation = _activation(activation)
        if isinstance(num_params, bool) or not isinstance(num_params, int) or num_params < 1:
            raise ValueError(f"num_params must be a positive integer, got {num_params!r}")
        self.num_params = num_params
        hidden_dims = _check_hidden_dims(hidden_dims)
        self.dim = dim
        deg_in = torch.empty(dim, dtype=torch.long)
        deg_in[order] = torch.arange(1, dim + 1)
        degrees = [deg_in]
        layers: list[nn.Module] = []
        for h in hidden_dims:
            deg_h = torch.arange(int(h)) % max(dim - 1, 1) + 1
            layers.append(_MaskedLinear(deg_h[:, None] >= degrees[-1][None, :]))
            degrees.append(deg_h)
        self.hidden = nn.ModuleList(layers)
        deg_out = deg_in.repeat(num_params)
        self.out = _MaskedLinear(deg_out[:, None] > degrees[-1][None, :])
        with torch.no_grad():
            self.out.weight.zero_()
            self.out.bias.zero_()
        self.context = (
            nn.Linear(context_dim, int(hidden_dims[0]), bias=False) if context_dim else None
        )
        self.activation = activation()

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, ...]:
        h = self.hidden[0](x)
        if self.context is not None:
            h = h + self.context(context)
        h = self.activation(h)
        for layer in self.hidden[1:]:
            h = self.activation(layer(h))
        out = self.out(h)
        if self.num_params == 2:
            return out[..., : self.dim], out[..., self.dim :]
        return out.unflatten(-1, (self.num_params, self.dim)).unbind(-2)


class AutoregressiveTransform(FlowTransform):
    """Stateless affine autoregressive map given a conditioner ``x -> (m, a)``.

    Args:
        conditioner: callable returning the shift ``m`` and the unbounded log-scale ``a`` (each of
            the input's shape), autoregressive in some order.
        log_scale_min, log_scale_max: bounds of the log-scale; ``log_scale_min < 0 < log_scale_max``.
        gate_bias: ``None`` (default) for the update above; a number :math:`c` for the gated
            update (see :class:`AffineAutoregressive`).

    Example:
        >>> import torch
        >>> def conditioner(x):  # m_1 and a_1 depend on x_0; m_0 = a_0 = 0
        ...     zero = torch.zeros_like(x[..., 0])
        ...     return torch.stack([zero, x[..., 0]], -1), torch.stack([zero, 0.5 * x[..., 0]], -1)
        >>> t = AutoregressiveTransform(conditioner)
        >>> y, ladj = t.call_and_ladj(torch.tensor([1.0, 2.0]))
        >>> y, ladj  # y_1 = 2 exp(s) + 1 with s = 3 tanh(0.5 / 3), the smoothly bounded 0.5
        (tensor([1.0000, 4.2824]), tensor(0.4954))
        >>> torch.allclose(t.inv(y), torch.tensor([1.0, 2.0]))  # two sequential passes
        True
    """

    def __init__(
        self,
        conditioner: Callable[[Tensor], tuple[Tensor, Tensor]],
        log_scale_min: float = -5.0,
        log_scale_max: float = 3.0,
        gate_bias: float | None = None,
    ) -> None:
        super().__init__()
        if not log_scale_min < 0.0 < log_scale_max:
            raise ValueError(
                f"need log_scale_min < 0 < log_scale_max, got {log_scale_min}, {log_scale_max}"
            )
        self.conditioner = conditioner
        self.lo = float(log_scale_min)
        self.hi = float(log_scale_max)
        if gate_bias is not None and (
            isinstance(gate_bias, bool) or not isinstance(gate_bias, (int, float))
            or not math.isfinite(gate_bias)
        ):  # fmt: skip
            raise ValueError(f"gate_bias must be None or a finite number, got {gate_bias!r}")
        self.gate_bias = None if gate_bias is None else float(gate_bias)

    def _mls(self, x: Tensor) -> tuple[Tensor, Tensor]:
        m, a = self.conditioner(x)
        if self.gate_bias is not None:
            g = a + self.gate_bias  # y = x sigmoid(g) / sigmoid(c) + (1 - sigmoid(g)) m
            s = F.logsigmoid(g) - F.logsigmoid(torch.tensor(self.gate_bias, dtype=a.dtype))
            return torch.sigmoid(-g) * m, s
        c = torch.where(a >= 0, self.hi, -self.lo).to(a.dtype)
        return m, c * torch.tanh(a / c)

    def call_and_ladj(self, x: Tensor) -> tuple[Tensor, Tensor]:
        m, s = self._mls(x)
        return x * torch.exp(s) + m, s.sum(-1)

    def inverse_and_ladj(self, y: Tensor) -> tuple[Tensor, Tensor]:
        x = y
        for _ in range(y.shape[-1]):
            m, s = self._mls(x)
            x = (y - m) * torch.exp(-s)
        # (m, s) of the last pass saw every coordinate but the last in order, which none depends on.
        return x, s.sum(-1)

    def _inverse(self, y: Tensor) -> Tensor:
        return self.inverse_and_ladj(y)[0]


def _check_hidden_dims(hidden_dims) -> tuple[int, ...]:
    """``hidden_dims`` as a tuple of ints; refuses an int, an empty sequence and sizes that are
    not positive integers (a float such as 2.7 or a bool)."""
    if isinstance(hidden_dims, int):
        raise TypeError(
            f"hidden_dims must be a sequence of layer sizes, e.g. ({hidden_dims},) for one "
            f"hidden layer of {hidden_dims} units; got the int {hidden_dims}"
        )
    try:
        dims = tuple(hidden_dims)
    except TypeError:
        raise TypeError(
            f"hidden_dims must be a sequence of layer sizes, got {hidden_dims!r}"
        ) from None
    if not dims or any(
        isinstance(h, bool) or not isinstance(h, numbers.Integral) or h < 1 for h in dims
    ):
        raise ValueError(
            f"hidden_dims must be a non-empty sequence of positive integers, got {hidden_dims!r}"
        )
    return tuple(int(h) for h in dims)


def made_layout(
    dim: int, hidden_dims: Sequence[int] | None, order: Sequence[int] | Tensor | None
) -> tuple[tuple[int, ...], Tensor]:
    """Checked MADE hidden sizes and variable order of an autoregressive layer, with defaults.

    ``hidden_dims`` defaults to ``(max(2 * dim, 16),)`` and ``order`` to ``range(dim)``; an int
    for ``hidden_dims``, sizes that are not positive integers and an ``order`` that is not a
    permutation are refused.
    """
    hidden_dims = (max(2 * dim, 16),) if hidden_dims is None else _check_hidden_dims(hidden_dims)
    order = torch.arange(dim) if order is None else torch.as_tensor(order, dtype=torch.long)
    if order.shape != (dim,) or not torch.equal(order.sort().values, torch.arange(dim)):
        raise ValueError(f"order must be a permutation of range({dim}), got {order.tolist()}")
    return hidden_dims, order


class AffineAutoregressive(FlowModule):
    """Affine autoregressive layer (IAF direction) with a MADE conditioner, optionally conditional.

    Args:
        dim: number of variables :math:`D`.
        context_dim: size of the context fed into the first hidden layer; 0 for none.
        hidden_dims: MADE hidden sizes; default ``(max(2 * dim, 16),)``.
        order: permutation of ``range(dim)`` giving the autoregressive order; default
            ``range(dim)``. :class:`pyro_nf.Flow` reverses it on every other layer, so that in a
            stack of two or more layers every coordinate conditions on every other.
        log_scale_min, log_scale_max: smooth bounds of the log-scale.
        activation: hidden nonlinearity of the MADE, a module class or a name (see :class:`MADE`);
            default :class:`torch.nn.ELU`. On the 2-D toy densities a smooth one (``"gelu"``)
            fits far better (``docs/benchmarks``).
        gate_bias: ``None`` (default) for the update :math:`y = x e^{s} + m`. A number :math:`c`
            for the gated update of Kingma et al. (2016, eqs. 11-12),
            :math:`\\sigma = \\operatorname{sigmoid}(a + c)`,
            :math:`y = x \\sigma / \\operatorname{sigmoid}(c) + (1 - \\sigma) m`, whose scale is
            at most :math:`1 / \\operatorname{sigmoid}(c)` (no exponential blow-up). Dividing by
            :math:`\\operatorname{sigmoid}(c)` keeps the fresh layer exactly the identity; the
            paper uses :math:`c` of 1 or 2. The log-scale bounds are then unused.

    Example:
        >>> import torch
        >>> layer = AffineAutoregressive(3)
        >>> x = torch.randn(5, 3)
        >>> torch.allclose(layer(x), x)   # identity at initialization
        True
    """

    def __init__(
        self,
        dim: int,
        context_dim: int = 0,
        *,
        hidden_dims: Sequence[int] | None = None,
        order: Sequence[int] | Tensor | None = None,
        log_scale_min: float = -5.0,
        log_scale_max: float = 3.0,
        activation: str | Callable[[], nn.Module] = nn.ELU,
        gate_bias: float | None = None,
    ) -> None:
        super().__init__(dim, context_dim)
        hidden_dims, order = made_layout(dim, hidden_dims, order)
        self.register_buffer("order", order)
        self.made = MADE(dim, hidden_dims, order, context_dim, activation)
        # validates the bounds once, at construction
        AutoregressiveTransform(self.made, log_scale_min, log_scale_max, gate_bias)
        self.log_scale_min = float(log_scale_min)
        self.log_scale_max = float(log_scale_max)
        self.gate_bias = None if gate_bias is None else float(gate_bias)

    def _transform(self, context: Tensor | None) -> AutoregressiveTransform:
        if context is None:
            conditioner = self.made
        else:

            def conditioner(x: Tensor) -> tuple[Tensor, Tensor]:
                return self.made(x, context)

        return AutoregressiveTransform(
            conditioner, self.log_scale_min, self.log_scale_max, self.gate_bias
        )
