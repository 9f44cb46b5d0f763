"""Autoregressive flow layers on a MADE conditioner: one layer, pluggable elementwise maps.

:class:`MaskedAutoregressive` computes, in a variable order ``order``, :math:`y_i = g(x_i;
\\theta_i(x_{<i}))` with all :math:`\\theta_i` from one MADE pass (Germain et al. 2015) and a
strictly increasing map :math:`g` (an :class:`~pyro_nf.transforms.elementwise.ElementwiseMap`):
affine (IAF, Kingma et al. 2016), gated affine, softplus-scaled affine or rational-quadratic
spline (Durkan et al. 2019). The Jacobian is triangular in that order, so
:math:`\\log|\\det J| = \\sum_i \\log g'(x_i)`, computed in the same pass. The forward map
(sampling, as in IAF) costs one network pass; the inverse (scoring, as in MAF, Papamakarios et al.
2017) is exact and costs :math:`D` passes: after pass :math:`k` the first :math:`k` coordinates in
``order`` are exact, because each :math:`\\theta_i` depends only on earlier ones. Use
``layer.inv`` for the MAF direction (fast scoring, sequential sampling).

With ``context_dim > 0`` the context enters the first hidden layer of the MADE through an unmasked
linear map (Kingma et al. 2016, section 4), so the layer is conditional on it.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import integer
from .base import FlowModule, FlowTransform
from .elementwise import AffineMap, ElementwiseMap, GatedAffineMap, SoftplusAffineMap  # noqa: F401

__all__ = [
    "DEFAULT_ACTIVATION",
    "AffineAutoregressive",
    "AutoregressiveTransform",
    "MADE",
    "MaskedAutoregressive",
]

#: a MADE unit with more unmasked inputs than this takes the steps of a unit with this many
#: (see :class:`MADE`); a MADE whose layers have at most 64 units is unaffected
FAN_IN_REF = 64
#: the same reference for the autoregressive autoguides (``AutoIAFFlow``, ``AutoSplineFlow``):
#: from D = 100 on, under ``fit``'s lr 0.01, their fits end closer to the optimum with 16 than
#: with 64, and three IAF layers no longer spike early at D = 300 (docs/benchmarks.rst); the
#: layers' own default (amortized flows in a VAE, not measured with 16) stays :data:`FAN_IN_REF`
AUTOGUIDE_FAN_IN_REF = 16
#: the widest default MADE hidden layer: the default is ``min(max(2 * D, 16), MAX_DEFAULT_WIDTH)``
MAX_DEFAULT_WIDTH = 128


def default_hidden_size(dim: int) -> int:
    """The default MADE hidden size for ``dim`` variables: :math:`\\min(\\max(2D, 16), 128)`.

    Twice the number of variables and at least 16, but at most 128: a MADE's parameters grow as
    :math:`D \\times` width, so an uncapped ``2 D`` gives an IAF layer :math:`6 D^2` of them (150
    million at :math:`D = 5000`, 300 million for two ``AutoIAFFlow`` layers), while with the
    cap it has about :math:`3 \\cdot 128\\, D`. Below :math:`D = 64` nothing changed.

    Example:
        >>> [default_hidden_size(d) for d in (1, 10, 64, 1000)]
        [16, 20, 128, 128]
    """
    return min(max(2 * dim, 16), MAX_DEFAULT_WIDTH)


#: the hidden nonlinearity of every MADE (IAF, spline and their guides) unless one is given: the
#: one place this default is set
DEFAULT_ACTIVATION = "elu"

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
        if issubclass(spec, nn.Module):
            return spec
        raise TypeError(
            f"activation must be a name or a torch.nn.Module class, got the class {spec!r}"
        )
    # Any other callable must build a module when called with no argument (e.g. a
    # functools.partial of a module class); a tensor function such as torch.tanh does not.
    try:
        made = spec()
    except TypeError:
        made = None
    if isinstance(made, nn.Module):
        return spec
    name = getattr(spec, "__name__", None)
    known = isinstance(name, str) and name.lower() in ACTIVATIONS
    raise TypeError(
        "activation must be a name, a torch.nn.Module class or a function that returns a module "
        "when called with no argument; got "
        + (f"the function {name}" if isinstance(name, str) else repr(spec))
        + ", which does not build a module: "
        + (f"pass activation={name.lower()!r} or the module class" if known else
           "pass a module class such as torch.nn.Tanh, or a function returning a module")
    )  # fmt: skip


class _MaskedLinear(nn.Linear):
    """A linear map with a fixed 0/1 connectivity mask; row :math:`k`, with :math:`n_k` unmasked
    inputs, computes :math:`c_k \\sum_j M_{kj} W_{kj} x_j + b_k` with
    :math:`c_k = \\min(1, n_{\\text{ref}} / n_k)` and :math:`W` initialized divided by :math:`c_k`
    (see :class:`MADE`); a layer with no row wider than :math:`n_{\\text{ref}}` stores no scale."""

    def __init__(self, mask: Tensor, fan_in_ref: int | None = None) -> None:
        super().__init__(mask.shape[1], mask.shape[0])
        self.register_buffer("mask", mask.to(self.weight.dtype))
        n = mask.sum(1, dtype=torch.float64)
        scale = (fan_in_ref / n.clamp(min=1)).clamp(max=1) if fan_in_ref else torch.ones_like(n)
        if bool((scale < 1).any()):
            with torch.no_grad():
                self.weight.div_(scale.to(self.weight.dtype)[:, None])
            self.register_buffer("scale", scale.to(self.weight.dtype))
        else:
            self.register_buffer("scale", None)

    def forward(self, x: Tensor) -> Tensor:
        if self.scale is None:
            return F.linear(x, self.weight * self.mask, self.bias)
        return torch.addcmul(self.bias, F.linear(x, self.weight * self.mask), self.scale)


def _hidden_degrees(dim: int, width: int) -> Tensor:
    """MADE degrees of ``width`` hidden units: every degree ``1..dim-1`` in turn when there is room,
    else ``width`` degrees spread evenly over ``1..dim-1`` (so that late coordinates condition on
    recent ones, not only on the first ``width``)."""
    if width >= dim - 1:
        return torch.arange(width) % max(dim - 1, 1) + 1
    return torch.linspace(1, dim - 1, width, dtype=torch.float64).round().long()


class MADE(nn.Module):
    """Masked autoencoder (Germain et al. 2015) returning ``num_params`` tensors of shape ``(..., D)``.

    With the default ``num_params=2`` these are ``(m, a)``, the shift and log-scale of
    :class:`AffineAutoregressive`. Output ``i`` of every one depends only on inputs that come before
    ``i`` in ``order``. The output layer starts at zero, so a fresh network returns zeros.

    Steps that do not grow with the width: Adam moves every weight by about ``lr`` per step, so a
    unit with :math:`n` inputs can move by :math:`O(n \\cdot \\mathrm{lr})`, for the output layer
    the log-scale of every coordinate. A unit with :math:`n > n_{\\text{ref}}` (``fan_in_ref``)
    unmasked inputs therefore computes :math:`(n_{\\text{ref}} / n) \\sum_j W_j x_j + b`, with
    :math:`W` initialized :math:`n / n_{\\text{ref}}` times larger: the same function at the start,
    steps no larger than those of a unit with :math:`n_{\\text{ref}}` inputs (a scaling like Yang
    et al. 2021's maximal-update parametrization for Adam). A hidden layer narrower than
    :math:`D - 1` gets degrees spread evenly over ``1..D-1``, so that every coordinate conditions
    on some recent ones, not only on the first few.

    Args:
        dim: number of variables :math:`D`.
        hidden_dims: sizes of the hidden layers (at least one).
        order: a permutation of ``range(dim)``; ``order[k]`` is the variable at position ``k``.
        context_dim: size of an optional context added to the first hidden layer.
        activation: the hidden nonlinearity: a module class such as :class:`torch.nn.GELU`, or
            one of the names ``"elu"``, ``"gelu"``, ``"silu"``, ``"tanh"``, ``"relu"``; default
            :data:`DEFAULT_ACTIVATION`.
        num_params: number of outputs per variable (the elementwise map's ``num_params``: 2
            for the affine layer, ``3 * num_bins - 1`` for the spline layer).
        fan_in_ref: the number of inputs above which a unit's steps are scaled down (see
            above); default :data:`FAN_IN_REF` (64), the autoregressive autoguides pass
            :data:`AUTOGUIDE_FAN_IN_REF` (16); ``None`` for plain masked layers at any width
            (pyro_nf 0.1.0's MADE).

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
        activation: str | Callable[[], nn.Module] = DEFAULT_ACTIVATION,
        num_params: int = 2,
        fan_in_ref: int | None = FAN_IN_REF,
    ) -> None:
        super().__init__()
        activation = _activation(activation)
        self.fan_in_ref = integer(fan_in_ref, "fan_in_ref", allow_none=True)
        self.num_params = integer(num_params, "num_params")
        hidden_dims = _check_hidden_dims(hidden_dims)
        self.dim = dim
        deg_in = torch.empty(dim, dtype=torch.long)
        deg_in[order] = torch.arange(1, dim + 1)
        degrees = [deg_in]
        layers: list[nn.Module] = []
        for h in hidden_dims:
            deg_h = _hidden_degrees(dim, int(h))
            layers.append(_MaskedLinear(deg_h[:, None] >= degrees[-1][None, :], fan_in_ref))
            degrees.append(deg_h)
        self.hidden = nn.ModuleList(layers)
        deg_out = deg_in.repeat(num_params)
        self.out = _MaskedLinear(deg_out[:, None] > degrees[-1][None, :], fan_in_ref)
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

    ``hidden_dims`` defaults to ``(default_hidden_size(dim),)``, i.e. ``(min(max(2 * dim, 16),
    128),)``, and ``order`` to ``range(dim)``; an int for ``hidden_dims``, sizes that are not
    positive integers and an ``order`` that is not a permutation are refused.
    """
    hidden_dims = (
        (default_hidden_size(dim),) if hidden_dims is None else _check_hidden_dims(hidden_dims)
    )
    order = torch.arange(dim) if order is None else torch.as_tensor(order, dtype=torch.long)
    if order.shape != (dim,) or not torch.equal(order.sort().values, torch.arange(dim)):
        raise ValueError(f"order must be a permutation of range({dim}), got {order.tolist()}")
    return hidden_dims, order


class AutoregressiveTransform(FlowTransform):
    """Stateless autoregressive map: an :class:`ElementwiseMap` whose parameters come from a
    conditioner. Forward (and its log-det) in one conditioner pass, the exact inverse in :math:`D`.

    Args:
        conditioner: callable ``x -> params``, a tuple of the map's ``num_params`` tensors (each of
            the input's shape), autoregressive in some order.
        log_scale_min, log_scale_max: bounds of the log-scale of the default affine map;
            ``log_scale_min < 0 < log_scale_max``.
        gate_bias: ``None`` (default) for the affine map, a number :math:`c` for the gated one
            (see :class:`AffineAutoregressive`).
        elementwise: the map of each coordinate; by default the affine map the three arguments
            above describe (they cannot be combined with it).

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
        conditioner: Callable[[Tensor], tuple[Tensor, ...]],
        log_scale_min: float = -5.0,
        log_scale_max: float = 3.0,
        gate_bias: float | None = None,
        *,
        elementwise: ElementwiseMap | None = None,
    ) -> None:
        super().__init__()
        if elementwise is None:
            elementwise = affine_map(log_scale_min, log_scale_max, gate_bias)
        elif (log_scale_min, log_scale_max, gate_bias) != (-5.0, 3.0, None):
            raise TypeError(
                "AutoregressiveTransform: pass either elementwise or the affine map's "
                "log_scale_min, log_scale_max and gate_bias, not both"
            )
        self.conditioner = conditioner
        self.elementwise = elementwise

    def call_and_ladj(self, x: Tensor) -> tuple[Tensor, Tensor]:
        y, ladj = self.elementwise.forward(x, self.conditioner(x))
        return y, ladj.sum(-1)

    def inverse_and_ladj(self, y: Tensor) -> tuple[Tensor, Tensor]:
        # After pass k the first k coordinates in order are exact, since each one's parameters
        # depend only on earlier ones; the last pass saw every coordinate but the last in order,
        # which none depends on, so its log-derivatives are those at the returned x.
        x = y
        for _ in range(y.shape[-1]):
            x, ladj = self.elementwise.inverse(y, self.conditioner(x))
        return x, ladj.sum(-1)

    def _inverse(self, y: Tensor) -> Tensor:
        return self.inverse_and_ladj(y)[0]


def affine_map(
    log_scale_min: float = -5.0, log_scale_max: float = 3.0, gate_bias: float | None = None
) -> AffineMap:
    """The affine elementwise map: :class:`GatedAffineMap` when ``gate_bias`` is a number, else
    :class:`AffineMap`."""
    if gate_bias is None:
        return AffineMap(log_scale_min, log_scale_max)
    return GatedAffineMap(gate_bias, log_scale_min, log_scale_max)


class MaskedAutoregressive(FlowModule):
    """Autoregressive layer (IAF direction): a MADE conditioner and a pluggable elementwise map.

    Owns the MADE, the variable order and, through :class:`AutoregressiveTransform`, the one-pass
    forward and the :math:`D`-pass inverse; the :class:`ElementwiseMap` says what happens to each
    coordinate. The MADE outputs the map's ``num_params`` numbers per coordinate and starts at its
    :meth:`~ElementwiseMap.identity_params`, so a fresh layer is the identity.
    :class:`AffineAutoregressive` and :class:`SplineAutoregressive` are this layer with their maps.

    Args:
        dim: number of variables :math:`D`.
        context_dim: size of the context; 0 for none.
        elementwise: an :class:`ElementwiseMap`, or an :class:`ElementwiseMap` subclass built
            with ``**options``.
        hidden_dims: MADE hidden sizes; default ``(min(max(2 * dim, 16), 128),)``.
        order: permutation of ``range(dim)``, the autoregressive order; default ``range(dim)``.
            :class:`pyro_nf.Flow` reverses it on every other layer, so that in a stack of two or
            more layers every coordinate conditions on every other.
        activation: hidden nonlinearity of the MADE, a module class or a name (see :class:`MADE`).
        fan_in_ref: MADE units with more inputs than this take the steps of a unit with this
            many (see :class:`MADE`); ``None`` for plain masked layers at any width.
        **options: the map's arguments when ``elementwise`` is a class.

    Example:
        >>> import torch
        >>> layer = MaskedAutoregressive(3, elementwise=SoftplusAffineMap, min_scale=0.1)
        >>> x = torch.randn(5, 3)
        >>> torch.allclose(layer(x), x, atol=1e-6)  # identity at initialization
        True
    """

    autoregressive = True

    def __init__(
        self,
        dim: int,
        context_dim: int = 0,
        *,
        elementwise: ElementwiseMap | type[ElementwiseMap],
        hidden_dims: Sequence[int] | None = None,
        order: Sequence[int] | Tensor | None = None,
        activation: str | Callable[[], nn.Module] = DEFAULT_ACTIVATION,
        fan_in_ref: int | None = FAN_IN_REF,
        **options,
    ) -> None:
        super().__init__(dim, context_dim)
        hidden_dims, order = made_layout(dim, hidden_dims, order)
        if isinstance(elementwise, type):
            elementwise = elementwise(**options)
        elif options:
            raise TypeError(f"unexpected arguments {sorted(options)} with a built elementwise map")
        if not isinstance(elementwise, ElementwiseMap):
            raise TypeError(f"elementwise must be an ElementwiseMap, got {elementwise!r}")
        self.elementwise = elementwise
        self.register_buffer("order", order)
        self.made = MADE(
            dim, hidden_dims, order, context_dim, activation,
            num_params=elementwise.num_params, fan_in_ref=fan_in_ref,
        )  # fmt: skip
        identity = torch.tensor(elementwise.identity_params(), dtype=self.made.out.bias.dtype)
        with torch.no_grad():
            self.made.out.bias.copy_(identity.repeat_interleave(dim))

    def _transform(self, context: Tensor | None) -> AutoregressiveTransform:
        if context is None:
            conditioner = self.made
        else:

            def conditioner(x: Tensor) -> tuple[Tensor, ...]:
                return self.made(x, context)

        return AutoregressiveTransform(conditioner, elementwise=self.elementwise)

    def options(self) -> dict:
        return {
            **self.elementwise.options(),
            "hidden_dims": [int(h.out_features) for h in self.made.hidden],
            "activation": repr(self.made.activation),
            "fan_in_ref": self.made.fan_in_ref,  # (scales each unit's map for given weights)
        }

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, elementwise={self.elementwise!r}"


class AffineAutoregressive(MaskedAutoregressive):
    """Affine autoregressive layer (IAF, Kingma et al. 2016; ``layer.inv`` is MAF, Papamakarios
    et al. 2017): :class:`MaskedAutoregressive` with :class:`AffineMap`, or with
    :class:`GatedAffineMap` when ``gate_bias`` is a number.

    .. math::
        y_i = x_i \\exp(s_i(x_{<i})) + m_i(x_{<i}), \\qquad \\log|\\det J| = \\sum_i s_i(x_{<i}).

    Args:
        dim: number of variables :math:`D`.
        context_dim: size of the context fed into the first hidden layer; 0 for none.
        hidden_dims, order, activation, fan_in_ref: see :class:`MaskedAutoregressive`.
        log_scale_min, log_scale_max: smooth bounds of the log-scale (see :class:`AffineMap`).
        gate_bias: ``None`` (default) for the update :math:`y = x e^{s} + m`; a number :math:`c`
            for the gated update of Kingma et al. (2016, eqs. 11-12), whose scale is at most
            :math:`1 / \\operatorname{sigmoid}(c)` (:class:`GatedAffineMap`; the paper uses
            :math:`c` of 1 or 2). The log-scale bounds are then unused.

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
        activation: str | Callable[[], nn.Module] = DEFAULT_ACTIVATION,
        gate_bias: float | None = None,
        fan_in_ref: int | None = FAN_IN_REF,
    ) -> None:
        super().__init__(
            dim, context_dim, elementwise=affine_map(log_scale_min, log_scale_max, gate_bias),
            hidden_dims=hidden_dims, order=order, activation=activation, fan_in_ref=fan_in_ref,
        )  # fmt: skip
        self.log_scale_min, self.log_scale_max = float(log_scale_min), float(log_scale_max)
        self.gate_bias = None if gate_bias is None else float(gate_bias)
