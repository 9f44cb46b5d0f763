"""The flow distribution: a standard Normal pushed through K flow layers and an affine base layer.

.. math::
    z = \\mu + \\sigma \\odot f_K \\circ \\dots \\circ f_1(\\varepsilon), \\quad
    \\varepsilon \\sim \\mathcal N(0, I_D), \\qquad
    \\log q(z) = \\log \\mathcal N(\\varepsilon; 0, I) - \\sum_k \\log|\\det J_{f_k}| - \\sum_i \\log\\sigma_i.

Without a context the flow layers act on the standardized variable and the affine layer
(location ``init_loc``, scale ``init_scale``) comes last, so the layers see a well-scaled input
whatever the scale of the posterior (the autoguides' case). With a context (amortized posteriors)
the affine layer comes first by default,
:math:`z = f_K \\circ \\dots \\circ f_1(\\mu(h) + \\sigma(h) \\odot \\varepsilon)`: the order of Rezende
& Mohamed (2015) and Kingma et al. (2016), where the layers act on the latent itself (how the
two orders compare in a VAE: ``docs/vae.rst`` and ``docs/benchmarks.rst``).
``affine_first`` chooses either order explicitly. Every layer starts at the identity: an untrained
flow is exactly :math:`\\mathcal N(\\mu, \\operatorname{diag}\\sigma^2)` in either order.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence

import torch
from pyro.distributions import TorchDistribution
from pyro.poutine.runtime import am_i_wrapped
from torch import Tensor, nn
from torch.distributions import constraints

from ._autoregister import register_flow
from ._checks import integer
from ._compat import is_compiling
from .transforms import (
    Affine,
    AffineAutoregressive,
    ElementwiseMap,
    MaskedAutoregressive,
    Planar,
    Radial,
    SoftplusAffineMap,
    SplineAutoregressive,
    TriangularAffineTransform,
)
from .transforms.base import ChainTransform, FlowModule, FlowTransform, _check_dim, check_context

__all__ = ["Flow", "FlowDistribution", "TRANSFORMS"]

#: format tag of the record a Flow puts in its state dict
_FLOW_RECORD = "pyro_nf.Flow/1"

_HALF_LOG_2PI = 0.9189385332046727


class FlowDistribution(TorchDistribution):
    """A reparameterized distribution :math:`z = T(\\varepsilon)`, :math:`\\varepsilon \\sim \\mathcal N(0, I)`.

    ``rsample`` computes :math:`z` and :math:`\\log q(z)` in one pass; the distribution object
    remembers the log-density of the last sample it drew, so Pyro's ``log_prob(value)`` on that very
    tensor costs nothing more. Any other value is scored exactly through the inverse of every layer.

    Args:
        transforms: stateless :class:`~pyro_nf.transforms.FlowTransform` s, applied in order.
        dim: event size :math:`D`.
        batch_shape: batch shape; the transforms' parameters must broadcast to it.
        dtype, device: of the base noise; by default those of the first tensor the transforms
            hold (their parameters), else torch's defaults.

    Example:
        >>> import torch
        >>> from pyro_nf.transforms import AffineTransform, RadialTransform
        >>> radial = RadialTransform(torch.zeros(2), torch.tensor(0.0), torch.tensor(1.0))
        >>> d = FlowDistribution([radial, AffineTransform(torch.ones(2), torch.full((2,), 0.5))], 2)
        >>> z, log_q = d.rsample_and_log_prob((5,))
        >>> torch.allclose(d.log_prob(z.clone()), log_q, atol=1e-5)  # a copy: scored by the inverse
        True
    """

    arg_constraints: dict = {}
    support = constraints.real_vector
    has_rsample = True

    def __init__(
        self,
        transforms: Sequence[FlowTransform],
        dim: int,
        batch_shape: torch.Size | tuple = (),
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        validate_args: bool | None = None,
    ) -> None:
        self.transforms = list(transforms)
        self.dim = dim
        if dtype is None or device is None:
            ref = _first_tensor(self.transforms)
            if ref is None:
                ref = torch.empty(0)
            dtype = ref.dtype if dtype is None else dtype
            device = ref.device if device is None else device
        self._dtype = dtype
        self._device = torch.device(device)
        self._memo: tuple[Tensor, int, Tensor] | None = None
        super().__init__(torch.Size(batch_shape), torch.Size((dim,)), validate_args=validate_args)

    def expand(self, batch_shape, _instance=None) -> FlowDistribution:
        batch_shape = torch.Size(batch_shape)
        try:
            ok = torch.broadcast_shapes(batch_shape, self.batch_shape) == batch_shape
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(
                f"cannot expand batch_shape {tuple(self.batch_shape)} to {tuple(batch_shape)}"
            )
        return FlowDistribution(
            self.transforms, self.dim, batch_shape, dtype=self._dtype, device=self._device,
            validate_args=self._validate_args,
        )  # fmt: skip

    def _base_log_prob(self, eps: Tensor) -> Tensor:
        return -0.5 * (eps * eps).sum(-1) - self.dim * _HALF_LOG_2PI

    def rsample_and_log_prob(self, sample_shape: torch.Size | tuple = ()) -> tuple[Tensor, Tensor]:
        """Draw :math:`z` and return it with :math:`\\log q(z)`, in one pass through the layers."""
        shape = self._extended_shape(torch.Size(sample_shape))
        return self.push_and_log_prob(torch.randn(shape, dtype=self._dtype, device=self._device))

    def push_and_log_prob(self, eps: Tensor) -> tuple[Tensor, Tensor]:
        """Push base noise ``eps`` through the layers: ``(z, log q(z))`` in one pass."""
        z, ladj = ChainTransform(self.transforms).call_and_ladj(eps)
        return z, (self._base_log_prob(eps) - ladj).expand(eps.shape[:-1])

    def rsample(self, sample_shape: torch.Size | tuple = ()) -> Tensor:
        z, log_q = self.rsample_and_log_prob(sample_shape)
        self._memo = (z, z._version, log_q)
        return z

    def sample(self, sample_shape: torch.Size | tuple = ()) -> Tensor:
        with torch.no_grad():
            return self.rsample_and_log_prob(sample_shape)[0]

    def log_prob(self, value: Tensor) -> Tensor:
        memo = self._memo
        if memo is not None and value is memo[0] and value._version == memo[1]:
            return memo[2]
        if self._validate_args:
            if value.numel() == 0:  # torch's support check cannot reshape an empty batch
                _check_empty_value(value, self.batch_shape, self.event_shape)
            else:
                self._validate_sample(value)
        if value.numel() == 0:
            shape = torch.broadcast_shapes(value.shape[:-1], self.batch_shape)
            return torch.zeros(shape, dtype=value.dtype, device=value.device)
        x, ladj = ChainTransform(self.transforms).inverse_and_ladj(value)
        log_q = self._base_log_prob(x) - ladj
        return log_q.expand(torch.broadcast_shapes(value.shape[:-1], self.batch_shape))


def _first_tensor(obj, depth: int = 0) -> Tensor | None:
    """The first floating-point tensor held by a transform (or a list of them), if any."""
    if torch.is_tensor(obj):
        return obj if obj.is_floating_point() else None
    if depth > 3:
        return None
    items = (
        obj
        if isinstance(obj, (list, tuple))
        else vars(obj).values()
        if hasattr(obj, "__dict__")
        else ()
    )
    for item in items:
        if torch.is_tensor(item) or isinstance(item, (list, tuple, FlowTransform)):
            found = _first_tensor(item, depth + 1)
            if found is not None:
                return found
    return None


def encode_record(record: dict) -> Tensor:
    """A record of plain values as a CPU ``uint8`` tensor of the bytes of its JSON text."""
    data = bytearray(json.dumps(record, sort_keys=True).encode())
    return torch.frombuffer(data, dtype=torch.uint8).clone()


def decode_record(value) -> dict | None:
    """The record :func:`encode_record` made (on any device, in any dtype), else ``None``."""
    if not torch.is_tensor(value) or value.dim() != 1:
        return None
    try:
        record = json.loads(bytes(int(b) for b in value.tolist()).decode())
    except (ValueError, UnicodeDecodeError):
        return None
    return record if isinstance(record, dict) else None


def load_state_dict_atomically(module: nn.Module, load, state_dict, strict: bool, assign: bool):
    """``load(state_dict, strict=strict, assign=assign)``, undone if it raises.

    torch's ``load_state_dict`` copies every tensor it can before it reports missing, unexpected
    or mis-shaped entries, and a record check in ``set_extra_state`` can fail after other
    modules were loaded; this keeps a copy of every parameter and buffer (and of which tensor
    object each slot held, for ``assign=True``) and puts them back on any error. Under
    ``strict=True`` a state dict without the ``_extra_state`` records the module writes is
    refused up front, before anything is copied.
    """
    if strict and hasattr(state_dict, "keys"):
        expected = [k for k in module.state_dict(keep_vars=True) if k.endswith("_extra_state")]
        missing = [k for k in expected if k not in state_dict]
        if missing:
            raise RuntimeError(
                f"{type(module).__name__}.load_state_dict: the state dict has no record of the "
                f"flow (or guide) it was saved from (missing {missing}); it was probably saved "
                "by a pyro_nf version that did not write one, so nothing can check that it fits. "
                "Pass strict=False to load it unchecked."
            )
    saved = [
        (slots, key, t, None if t is None else t.detach().clone())
        for mod in module.modules()
        for slots in (mod._parameters, mod._buffers)
        for key, t in slots.items()
    ]
    try:
        return load(state_dict, strict=strict, assign=assign)
    except BaseException:
        with torch.no_grad():
            for slots, key, t, value in saved:
                slots[key] = t
                if t is not None:
                    t.copy_(value)
        raise


def _check_empty_value(value: Tensor, batch_shape: torch.Size, event_shape: torch.Size) -> None:
    """The shape checks of ``Distribution._validate_sample`` for a value with no elements."""
    if not torch.is_tensor(value):
        raise ValueError(f"the value to score must be a torch.Tensor, got {type(value).__name__}")
    n = len(event_shape)
    if value.shape[value.dim() - n :] != event_shape:
        raise ValueError(
            f"the value to score has shape {tuple(value.shape)}; its rightmost dimensions must "
            f"be the event shape {tuple(event_shape)}"
        )
    try:
        torch.broadcast_shapes(value.shape[: value.dim() - n], batch_shape)
    except RuntimeError:
        raise ValueError(
            f"the value to score has shape {tuple(value.shape)}, which does not broadcast "
            f"with the batch shape {tuple(batch_shape)}"
        ) from None


#: the layer families of :class:`Flow`: a :class:`~pyro_nf.transforms.FlowModule` subclass, or
#: an :class:`~pyro_nf.transforms.ElementwiseMap` subclass, run by
#: :class:`~pyro_nf.transforms.MaskedAutoregressive`. A new family is one entry here; the class
#: says whether its layers stack into one transform (``fusable``) and take a MADE
#: (``autoregressive``).
_LAYERS: dict[str, type[FlowModule] | type[ElementwiseMap]] = {
    "planar": Planar,
    "radial": Radial,
    "iaf": AffineAutoregressive,
    "spline": SplineAutoregressive,
    "softplus_iaf": SoftplusAffineMap,
}
#: the transform names accepted by :class:`Flow`
TRANSFORMS = tuple(_LAYERS)


def _layer_family(transform: str):
    """``(layer class, constructor)`` of a registered family."""
    entry = _LAYERS[transform]
    if issubclass(entry, ElementwiseMap):
        return MaskedAutoregressive, functools.partial(MaskedAutoregressive, elementwise=entry)
    return entry, entry


class Flow(nn.Module):
    """A normalizing-flow distribution over :math:`\\mathbb{R}^D`, optionally conditioned on a context.

    ``flow()`` (or ``flow(h)`` with ``context_dim > 0``) returns a :class:`FlowDistribution` with
    ``event_shape (dim,)`` and ``batch_shape h.shape[:-1]``: base :math:`\\mathcal N(0, I)`, then
    ``num_transforms`` layers of one family, then a learnable elementwise affine layer (before
    the layers when there is a context, see ``affine_first``). With a context, the affine layer's
    location and scale and every layer's parameters are produced from ``h`` per datapoint
    (amortized inference), as in Rezende & Mohamed (2015) and Kingma et al. (2016).

    Args:
        dim: event size :math:`D`.
        transform: ``"planar"``, ``"radial"``, ``"iaf"`` (affine autoregressive, MADE),
            ``"spline"`` (rational-quadratic spline autoregressive, MADE) or ``"softplus_iaf"``
            (:class:`~pyro_nf.transforms.SoftplusAffineMap` autoregressive, MADE).
        num_transforms: number of flow layers :math:`K` (0 gives a diagonal Normal).
        context_dim: size of the context; 0 for an unconditional flow.
        init_loc, init_scale: the affine layer's start; the untrained flow is exactly
            :math:`\\mathcal N(\\text{init\\_loc}, \\text{init\\_scale}^2)`.
        hidden_dims: MADE hidden sizes (the autoregressive families only).
        affine_first: put the affine layer before the flow layers instead of after them (see
            the module docs); ``None`` (default): first when ``context_dim > 0``, last otherwise.
            The same parameters either way, a different distribution once trained.
        fused: evaluate a stack of a family that allows it (planar, radial: ``fusable``) as
            one transform (stacked parameters, one loop, log-dets vectorized): the same numbers,
            less per-layer overhead. The parameters are the same either way, so this can be
            switched at any time.
        name: the name under which the flow registers its parameters with Pyro's param store
            (``"{name}$$${parameter path}"``, as ``pyro.module(name, flow)`` would). Called inside a
            Pyro handler (``SVI``, :func:`pyro_nf.fit`, ``Predictive``, ``poutine.trace``), the flow
            registers every trainable parameter that the store does not already hold under another
            name, so ``pyro.sample("z", flow(h))`` in a guide trains the flow with nothing else
            added; a flow the user registers (``pyro.module`` on it or on a module that holds it,
            or a ``PyroModule`` around it) keeps that registration and is not registered twice. As
            with ``pyro.module(..., update_module_params=True)``, a value already in the store under
            this name wins (a restored param store). Two flow objects under one name are refused
            with an error: give each flow of a guide its own ``name``. Outside Pyro handlers and
            inside ``torch.compile`` tracing nothing is registered.
        **layer_kwargs: passed to every layer (e.g. ``log_scale_min`` for IAF, ``inverse_tol`` for
            planar, ``min_scale`` for ``"softplus_iaf"``).

    Example:
        >>> import pyro, torch
        >>> flow = Flow(2, "planar", num_transforms=4)
        >>> d = flow()
        >>> z = d.rsample((100,))
        >>> d.log_prob(z).shape, d.log_prob(torch.zeros(2)).shape
        (torch.Size([100]), torch.Size([]))
        >>> _ = pyro.poutine.trace(lambda: pyro.sample("z", flow())).get_trace()  # inside Pyro
        >>> sorted(pyro.get_param_store().keys())[:2]  # the flow registered itself
        ['flow$$$affine.raw', 'flow$$$layers.0.raw']
    """

    def __init__(
        self,
        dim: int,
        transform: str = "planar",
        num_transforms: int = 4,
        context_dim: int = 0,
        *,
        init_loc: Tensor | float = 0.0,
        init_scale: Tensor | float = 1.0,
        hidden_dims: Sequence[int] | None = None,
        affine_first: bool | None = None,
        fused: bool = True,
        name: str = "flow",
        **layer_kwargs,
    ) -> None:
        super().__init__()
        self.dim = _check_dim(dim)
        self.name = _check_name(name)
        if transform not in _LAYERS:
            raise ValueError(f"transform must be one of {TRANSFORMS}, got {transform!r}")
        num_transforms = integer(num_transforms, "num_transforms", minimum=0)
        family, make_layer = _layer_family(transform)
        if hidden_dims is not None and not family.autoregressive:
            autoregressive = [k for k in _LAYERS if _layer_family(k)[0].autoregressive]
            raise ValueError(f"hidden_dims applies to transform={autoregressive} only")
        self.transform = transform
        self.context_dim = context_dim
        if affine_first is None:
            affine_first = isinstance(context_dim, int) and context_dim > 0
        if not isinstance(affine_first, bool):
            raise TypeError(f"affine_first must be True, False or None, got {affine_first!r}")
        self.affine_first = affine_first
        self.fused = bool(fused) and family.fusable
        layers: list[FlowModule] = []
        for k in range(num_transforms):
            made = {}  # an autoregressive family's MADE sizes and order, reversed every other layer
            if family.autoregressive:
                order = torch.arange(dim).flip(0) if k % 2 else torch.arange(dim)
                made = dict(hidden_dims=hidden_dims, order=order)
            layers.append(make_layer(dim, context_dim, **made, **layer_kwargs))
        self.layers = nn.ModuleList(layers)
        self.affine = Affine(dim, context_dim, init_loc=init_loc, init_scale=init_scale)
        self.register_buffer("precond_loc", None)
        self.register_buffer("precond_tril", None)
        #: a fixed transform applied after everything else (not a parameter, not in the state
        #: dict); the flow autoguides put their ``noncentered=True`` map here
        self.outer_transform: FlowTransform | None = None

    def set_preconditioner(self, loc: Tensor | None, scale_tril: Tensor | None = None) -> Flow:
        """Follow the flow by a fixed full-rank affine map :math:`z \\mapsto m + L z`.

        The flow then models :math:`L^{-1}(z - m)`: with :math:`(m, L)` a Laplace approximation's
        mode and Cholesky factor of the covariance, its layers and affine base work in whitened
        coordinates, where every direction has scale about 1 (the start of
        ``precondition="laplace"`` in the flow autoguides). :math:`m` and :math:`L` are buffers,
        not parameters: no optimizer moves them, and they are in the state dict.
        ``set_preconditioner(None)`` removes it. Returns the flow.

        Example:
            >>> import torch
            >>> flow = Flow(2, "planar", 2, init_scale=1.0)
            >>> L = torch.tensor([[1.0, 0.0], [0.9, 0.1]])
            >>> _ = flow.set_preconditioner(torch.zeros(2), L)
            >>> z = flow().sample((20000,))
            >>> torch.allclose(torch.cov(z.T), L @ L.T, atol=0.05)
            True
        """
        if loc is None:
            if scale_tril is not None:
                raise ValueError("set_preconditioner(None) takes no scale_tril")
            self.precond_loc = self.precond_tril = None
            return self
        ref = next(self.affine.parameters())  # the flow's dtype and device
        loc = torch.as_tensor(loc, dtype=ref.dtype, device=ref.device).detach().clone()
        tril = torch.as_tensor(scale_tril, dtype=ref.dtype, device=ref.device).detach().tril()
        if loc.shape != (self.dim,) or tril.shape != (self.dim, self.dim):
            raise ValueError(
                f"preconditioner: loc must have shape ({self.dim},) and scale_tril "
                f"({self.dim}, {self.dim}), got {tuple(loc.shape)} and {tuple(tril.shape)}"
            )
        diag = tril.diagonal()
        if not (torch.isfinite(loc).all() and torch.isfinite(tril).all() and (diag > 0).all()):
            raise ValueError(
                "preconditioner: loc and scale_tril must be finite and scale_tril's diagonal "
                "positive"
            )
        self.precond_loc, self.precond_tril = loc, tril.clone()
        return self

    def transforms(self, context: Tensor | None = None) -> list[FlowTransform]:
        """The stateless transforms, in the order they act on the base noise.

        With ``fused=True`` (a ``fusable`` family: planar, radial), the layers come as one stack
        transform; a preconditioner (:meth:`set_preconditioner`) comes next, then
        ``outer_transform`` if set.
        """
        check_context(context, self.context_dim, "Flow")
        affine = [self.affine.condition(context)]
        if self.fused and len(self.layers) > 1:
            raw = torch.stack([layer._raw(context) for layer in self.layers], -2)
            layers = [self.layers[0]._build(raw, stacked=True)]
        else:
            layers = [layer.condition(context) for layer in self.layers]
        chain = affine + layers if self.affine_first else layers + affine
        if self.precond_tril is not None:
            chain.append(TriangularAffineTransform(self.precond_loc, self.precond_tril))
        if self.outer_transform is not None:
            chain.append(self.outer_transform)
        return chain

    def forward(self, context: Tensor | None = None) -> FlowDistribution:
        check_context(context, self.context_dim, "Flow")
        if am_i_wrapped() and not is_compiling():
            register_flow(self, _check_name(self.name))
        batch_shape = context.shape[:-1] if context is not None else torch.Size()
        p = next(self.affine.parameters())  # the flow's dtype and device
        return FlowDistribution(
            self.transforms(context), self.dim, batch_shape, dtype=p.dtype, device=p.device
        )

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, transform={self.transform!r}, num_transforms={len(self.layers)}, "
            f"name={self.name!r}, "
            f"context_dim={self.context_dim}, affine_first={self.affine_first}"
            + (", preconditioned" if self.precond_tril is not None else "")
        )

    # -- state dict -----------------------------------------------------------------------
    def record(self) -> dict:
        """What this flow's parameters mean, as plain values: the record in its state dict.

        The family, ``dim``, ``num_transforms``, ``context_dim``, ``affine_first`` and the
        layers' options that change the map for given parameters (MADE hidden sizes, activation
        and ``fan_in_ref``, log-scale bounds, gate bias, spline bins, bound and minimal widths).
        Not
        recorded: ``fused`` and ``inverse_tol`` (the same map either way) and the dtype (loading
        casts).

        Example:
            >>> Flow(2, "radial", 3).record()["transform"]
            'radial'
        """
        record = {
            "format": _FLOW_RECORD,
            "transform": self.transform,
            "dim": self.dim,
            "num_transforms": len(self.layers),
            "context_dim": self.context_dim,
            "affine_first": self.affine_first,
        }
        if len(self.layers):
            record.update(self.layers[0].options())
        return record

    def get_extra_state(self) -> Tensor:
        """:meth:`record` under the state-dict key ``_extra_state``, as the bytes of its JSON text
        in a ``uint8`` tensor: every value of the state dict stays a tensor (code that clones or
        copies a state dict's values keeps working) and it still loads with
        ``torch.load(weights_only=True)``."""
        return encode_record(self.record())

    def set_extra_state(self, state) -> None:
        mine = self.record()
        state = decode_record(state)
        if state is None or state.get("format") != _FLOW_RECORD:
            raise RuntimeError(
                "Flow.load_state_dict: the state dict's '_extra_state' is not a pyro_nf.Flow "
                "record; it was not saved from a pyro_nf.Flow"
            )
        diffs = [
            f"{key}={state.get(key)!r} (this flow: {mine.get(key)!r})"
            for key in sorted(set(state) | set(mine))
            if state.get(key) != mine.get(key)
        ]
        if diffs:
            raise RuntimeError(
                "Flow.load_state_dict: the state dict was saved from another kind of flow: "
                + ", ".join(diffs)
                + "; build the flow (or guide) with the same arguments to load it"
            )

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Load a state dict saved by :meth:`state_dict`, all or nothing.

        The state dict records the flow it came from (:meth:`record`); a different
        family or options (e.g. a radial flow's parameters into a planar flow whose tensors
        happen to have the same shapes) raise a ``RuntimeError`` naming each difference. If
        loading fails for any reason, every parameter and buffer keeps its value from before
        the call. A state dict without the record (saved before pyro_nf wrote it) is refused
        under ``strict=True`` and loaded unchecked with ``strict=False``.
        """
        return load_state_dict_atomically(self, super().load_state_dict, state_dict, strict, assign)

    # -- the affine base layer (how the autoguides start and read it) ----------------------
    def set_base(self, loc: Tensor | float, scale: Tensor | float) -> Flow:
        """Set the affine layer's location and scale in place (flows without context only).

        With every other layer at the identity the flow is then
        :math:`\\mathcal N(\\text{loc}, \\text{scale}^2)` (followed by the preconditioner, if
        any). The parameters stay the same tensors, cast values are written into them. Returns
        the flow.

        Example:
            >>> import torch
            >>> flow = Flow(2, "radial", 2).set_base(torch.tensor([1.0, 2.0]), 0.5)
            >>> flow.base_loc_scale()
            (tensor([1., 2.]), tensor([0.5000, 0.5000]))
        """
        self.affine.set_loc_scale(loc, scale)
        return self

    def base_loc_scale(self) -> tuple[Tensor, Tensor]:
        """The affine layer's current location and scale, detached (flows without context only);
        they have the flow's dtype and device."""
        return self.affine.loc, self.affine.scale


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not name or "$$$" in name:
        raise ValueError(
            f"name must be a non-empty string without '$$$' (Pyro's module name divider), "
            f"got {name!r}"
        )
    return name
