"""Flow autoguides: every continuous latent of a model, flattened, under one normalizing flow.

The guides follow Pyro's :class:`~pyro.infer.autoguide.AutoContinuous` contract: each latent is
mapped to unconstrained space with :func:`~torch.distributions.biject_to` of its support, all of
them are concatenated into one vector :math:`z \\in \\mathbb{R}^D`, and :math:`z` gets the posterior
:math:`q(z) =` :class:`~pyro_nf.Flow` (base :math:`\\mathcal N(0, I)`, ``num_transforms`` layers,
then a learnable affine layer). The affine layer starts at ``init_loc_fn``'s location with scale
``init_scale`` and every flow layer at the identity, so an untrained guide *is* ``AutoNormal`` 's
starting distribution when both are given the same ``init_loc_fn`` and ``init_scale``. The
defaults differ in ``init_loc_fn``: :func:`init_to_median_or_feasible` (the prior median, like
the ``init_to_median`` of Pyro's ``AutoDiagonalNormal``) here, ``init_to_feasible`` for
``AutoNormal``; ``init_scale`` is 0.1 in both. (``init_to_median`` draws from the prior, so two
guides get the same start only from the same random state.) With
``precondition="laplace"`` the guide instead starts at the Laplace approximation and the flow works
in its whitened coordinates (see :class:`AutoFlow`).
"""

from __future__ import annotations

import hashlib
import json
import numbers
import time
import warnings
from collections.abc import Callable, Sequence

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions.util import sum_rightmost
from pyro.infer.autoguide import AutoContinuous, AutoGuide
from pyro.infer.autoguide.initialization import init_to_median
from pyro.infer.autoguide.utils import helpful_support_errors
from pyro.params.param_store import param_with_module_name
from pyro.poutine.runtime import _PYRO_STACK
from torch import Tensor
from torch.distributions import biject_to

from ._devices import model_device, site_values
from ._messages import first_line
from ._noncentering import NonCenteringTransform, hierarchical_normal_sites
from .flow import (
    Flow,
    FlowDistribution,
    decode_record,
    encode_record,
    load_state_dict_atomically,
)
from .transforms.base import ChainTransform, FlowTransform, inverse_softplus

__all__ = [
    "AutoFlow",
    "AutoPlanarFlow",
    "AutoRadialFlow",
    "AutoIAFFlow",
    "AutoSplineFlow",
    "init_to_median_or_feasible",
]


def init_to_median_or_feasible(site: dict | None = None, num_samples: int = 15) -> Tensor:
    """Prior median where the prior can be sampled, else a feasible point (e.g. ``ImproperUniform``).

    Pyro's :func:`~pyro.infer.autoguide.init_to_median` gives up with ``NotImplementedError`` on
    distributions that cannot be sampled; this falls back to
    :func:`~pyro.infer.autoguide.init_to_feasible` (zero in unconstrained space) there instead.
    Called without a site, it returns the strategy with the given ``num_samples``.

    Example:
        >>> import pyro.distributions as dist
        >>> from pyro.distributions import constraints
        >>> init_to_median_or_feasible({"fn": dist.ImproperUniform(constraints.positive, (), (2,))})
        tensor([1., 1.])
        >>> strategy = init_to_median_or_feasible(num_samples=50)  # for init_loc_fn=strategy
        >>> strategy({"fn": dist.Normal(3.0, 1e-6)}).round()
        tensor(3.)
    """
    if site is None:
        return lambda site: init_to_median_or_feasible(site, num_samples)
    try:
        return init_to_median(site, num_samples=num_samples)
    except NotImplementedError:
        # Pyro's init_to_feasible draws a sample for the shape; take it from the distribution.
        fn = site["fn"]
        t = biject_to(fn.support)
        return t(torch.zeros(t.inverse_shape(fn.shape())))


def _holds(store, keys: list[tuple[str, Tensor]]) -> bool:
    """Whether Pyro's param store holds exactly these tensors under these names."""
    params = getattr(store, "_params", None)
    return params is not None and all(params.get(key) is p for key, p in keys)


#: seed of the fixed base draws behind ``median()`` and ``quantiles()`` (any fixed number)
_QUANTILE_SEED = 20240917
#: format tag of the record a flow guide puts in its state dict
_GUIDE_RECORD = "pyro_nf.AutoFlow/1"
#: site names longer than this (joined) are abbreviated in the param-store names
_READABLE_SITES = 40


class AutoFlow(AutoContinuous):
    """Base class of the flow autoguides; use :class:`AutoPlanarFlow`, :class:`AutoRadialFlow`,
    :class:`AutoIAFFlow` or :class:`AutoSplineFlow`.

    Args:
        model: a Pyro model whose latents are all continuous.
        transform: flow family, ``"planar"``, ``"radial"``, ``"iaf"`` or ``"spline"``.
        num_transforms: number of flow layers.
        init_loc_fn: per-site initialization (see Pyro's autoguide initialization); default
            :func:`init_to_median_or_feasible`.
        init_scale: initial scale of every unconstrained coordinate, as in ``AutoNormal``.
        precondition: ``None`` (default) or ``"laplace"``. With ``"laplace"``, set-up finds the
            mode of the log density in unconstrained space (L-BFGS from ``init_loc_fn``'s point,
            then Newton steps with the exact Hessian) and puts the flow in the whitened
            coordinates of the Laplace approximation :math:`\\mathcal N(m, H^{-1})`:
            :math:`z = m + L\\,\\text{flow}(\\varepsilon)` with :math:`LL^\\top = H^{-1}` fixed
            (:meth:`pyro_nf.Flow.set_preconditioner`) and the flow's own affine base starting at
            location 0, scale 1. The untrained guide is then the Laplace approximation, and the
            layers see a posterior with unit scales and no linear correlation, however badly
            scaled or correlated the model's coordinates are. Where no mode is found (a funnel's
            log density grows without bound, a flat direction makes the Hessian singular), a
            warning says why and the guide starts as it would without ``precondition``.
            :attr:`laplace_info` records what happened. Refused for models that subsample data
            (the log density would change at every evaluation). Costs up to ``laplace_max_iter``
            L-BFGS iterations and :math:`D` Hessian rows, once.
        laplace_max_iter: L-BFGS iteration limit of ``precondition="laplace"``.
        noncentered: non-centre the model's hierarchical Normal sites inside the guide. A site
            :math:`x_s \\sim \\mathcal N(\\mu_s, \\sigma_s)` whose :math:`\\mu_s` or
            :math:`\\sigma_s` depends on other latents (found by
            :func:`pyro.infer.inspect.get_dependencies`) is modelled by the flow as
            :math:`v_s = (x_s - \\mu_s) / \\sigma_s`, and a fixed triangular map (one blocked run
            of the model, stopped after its last latent) turns each draw back into the model's
            :math:`x_s`. The model is unchanged; the flow sees the non-centred posterior, which
            for a funnel (a centred hierarchical model with weak data, such as the centred eight
            schools) is far better conditioned. The guide's density, exact scores, diagnostics
            and NeuTra transform include the map. The start is ``init_loc_fn``'s point mapped to
            those coordinates, with ``init_scale`` there. Where the model has no such site, a
            warning says so and the guide is the plain one. Costs one more partial model run
            per step. Normal sites only (other location-scale families pass unchanged).
        **flow_kwargs: passed to :class:`~pyro_nf.Flow` (e.g. ``hidden_dims`` for IAF).

    Example:
        >>> import pyro, pyro.distributions as dist, torch
        >>> def model():
        ...     pyro.sample("x", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        >>> guide = AutoFlow(model, transform="radial", num_transforms=2).setup()
        >>> fresh = AutoFlow(model, transform="radial", num_transforms=2).setup()
        >>> _ = fresh.load_state_dict(guide.state_dict())  # parameters exist after setup()
        >>> guide.get_posterior().log_prob(torch.tensor([3.0, -1.0])).shape  # scores any value
        torch.Size([])
    """

    def __init__(
        self,
        model: Callable,
        *,
        transform: str,
        num_transforms: int,
        init_loc_fn: Callable = init_to_median_or_feasible,
        init_scale: float = 0.1,
        precondition: str | None = None,
        laplace_max_iter: int = 500,
        noncentered: bool = False,
        **flow_kwargs,
    ) -> None:
        if (
            isinstance(init_scale, bool)
            or not isinstance(init_scale, (int, float))
            or not 0 < init_scale < float("inf")
        ):
            raise ValueError(f"init_scale must be a positive finite number, got {init_scale!r}")
        if precondition not in (None, "laplace"):
            raise ValueError(f"precondition must be None or 'laplace', got {precondition!r}")
        if (
            isinstance(laplace_max_iter, bool)
            or not isinstance(laplace_max_iter, int)
            or (laplace_max_iter < 1)
        ):
            raise ValueError(
                f"laplace_max_iter must be a positive integer, got {laplace_max_iter!r}"
            )
        if not isinstance(noncentered, bool):
            raise TypeError(f"noncentered must be True or False, got {noncentered!r}")
        self._precondition = precondition
        self._laplace_max_iter = laplace_max_iter
        self._noncentered = noncentered
        #: the non-centring map (``noncentered=True`` with hierarchical sites), else ``None``
        self.noncentering: NonCenteringTransform | None = None
        self._model_args: tuple[tuple, dict] = ((), {})
        #: what ``precondition="laplace"`` did at set-up (``None`` without it): ``used``,
        #: ``reason`` (why not, if not), ``log_density`` at the mode, ``newton_decrement``,
        #: ``iterations`` and ``seconds``.
        self.laplace_info: dict | None = None
        # Build a throw-away flow now so that bad arguments fail here, not at the first SVI step.
        with torch.device("cpu"):
            Flow(1, transform, num_transforms, **flow_kwargs)
        self._transform_name = transform
        self._num_transforms = num_transforms
        self._init_scale = float(init_scale)
        self._flow_kwargs = flow_kwargs
        super().__init__(model, init_loc_fn=init_loc_fn)
        # self.model runs init_loc_fn at every site whose value is not set yet (an
        # InitMessenger inside any handler around it); runs with all latents given use this.
        self._raw_model = (model,)

    def __getattr__(self, name: str):
        # PyroModule would register ``self.flow`` under "<guide>.flow" whenever it is read inside
        # the guide's Pyro context; the flow's parameters live under the names of
        # _flow_param_prefix instead, so reads go through _synced_flow.
        if name == "flow" and "flow" in self.__dict__.get("_modules", {}):
            return self._synced_flow()
        return super().__getattr__(name)

    # -- set-up ---------------------------------------------------------------------------
    def _setup_prototype(self, *args, **kwargs) -> None:
        """Run the model once and build the flow; all or nothing.

        A set-up that fails for any reason leaves the guide as if it had never been set up (no
        prototype, no flow), so that the next call redoes it and raises the real error again.
        """
        try:
            self._build_from_prototype(args, kwargs)
        except BaseException:
            self._discard_setup()
            raise

    def _discard_setup(self) -> None:
        self.prototype_trace = None
        self.__dict__.pop("_flow_slots_cache", None)
        self.__dict__.pop("_flow_prefix_cache", None)
        if "flow" in self._modules:
            del self._modules["flow"]
        self.noncentering = None
        self.laplace_info = None

    def _build_from_prototype(self, args: tuple, kwargs: dict) -> None:
        AutoGuide._setup_prototype(self, *args, **kwargs)
        self._check_model()
        self._unconstrained_shapes = {}
        self._cond_indep_stacks = {}
        for name, site in self.prototype_trace.iter_stochastic_nodes():
            with helpful_support_errors(site):
                self._unconstrained_shapes[name] = (
                    biject_to(site["fn"].support).inv(site["value"]).shape
                )
            self._cond_indep_stacks[name] = site["cond_indep_stack"]
        self.latent_dim = sum(
            int(torch.Size(s).numel()) for s in self._unconstrained_shapes.values()
        )
        if self.latent_dim == 0:
            raise RuntimeError(
                f"{type(self).__name__} found no latent variables; use an empty guide instead"
            )
        latents = site_values(self.prototype_trace, observed=False)
        observed = site_values(self._trace_at_prototype(args, kwargs), True, exclude=latents)
        device = model_device(type(self).__name__, observed, args, kwargs, latents)
        loc = self._init_loc(device)
        self.noncentering = None
        if self._noncentered:
            loc = self._setup_noncentering(loc, args, kwargs)
        # Built on the CPU whatever torch's default device, then moved to the model's device and
        # dtype (a flow built under a meta or CUDA default device would need moving anyway).
        with torch.device("cpu"):
            flow = Flow(
                self.latent_dim,
                self._transform_name,
                self._num_transforms,
                init_scale=self._init_scale,
                **self._flow_kwargs,
            )
        flow = flow.to(device=loc.device, dtype=loc.dtype)
        # Parameters follow the model's values, not torch's defaults.
        with torch.no_grad():
            # exact in the model's dtype, whatever torch's default dtype
            flow.affine.raw[: self.latent_dim].copy_(loc)
            flow.affine.raw[self.latent_dim :].copy_(
                inverse_softplus(torch.full_like(loc, self._init_scale))
            )
        if self._precondition == "laplace":
            self._check_no_subsampling(args, kwargs)
            log_joint = self._log_joint_fn(args, kwargs)
            if self.noncentering is not None:  # the mode in the flow's (non-centred) coordinates
                log_joint = _pulled_back(log_joint, self.noncentering)
            mode, tril, info = _laplace(log_joint, loc.detach(), self._laplace_max_iter)
            self.laplace_info = info
            if mode is None:
                warnings.warn(
                    f"{type(self).__name__}(precondition='laplace'): {info['reason']}; starting "
                    "without the preconditioner (init_loc_fn, init_scale)",
                    stacklevel=5,
                )
            else:
                with torch.no_grad():
                    flow.affine.raw[: self.latent_dim].zero_()
                    flow.affine.raw[self.latent_dim :].copy_(inverse_softplus(torch.ones_like(loc)))
                flow.set_preconditioner(mode, tril)
        flow.outer_transform = self.noncentering
        self.flow = flow
        # the name a Flow called inside a Pyro handler registers itself under: the guide's own
        # (the default "flow" would clash with a user's flow of that name)
        with self._pyro_context:  # (where the guide's full name is defined)
            flow.name = self._flow_param_prefix()

    def _init_loc(self, device: torch.device | None = None) -> Tensor:
        """The latent vector at ``init_loc_fn``'s point, on ``device`` (the model's)."""
        parts = []
        for _, site in self.prototype_trace.iter_stochastic_nodes():
            # mapped where the prior lives (its support's bounds are there), then moved
            part = biject_to(site["fn"].support).inv(site["value"].detach()).reshape(-1)
            if not torch.isfinite(part).all():
                raise ValueError(
                    f"{type(self).__name__}: init_loc_fn gave site {site['name']!r} a value "
                    "outside its support or not finite; use another init_loc_fn (e.g. "
                    "pyro.infer.autoguide.init_to_feasible)"
                )
            parts.append(part if device is None else part.to(device))
        return torch.cat(parts)

    def _setup_noncentering(self, loc: Tensor, args: tuple, kwargs: dict) -> Tensor:
        """Find the hierarchical Normal sites, build the map; the start in its coordinates."""
        sites = hierarchical_normal_sites(self, args, kwargs)
        if not sites:
            warnings.warn(
                f"{type(self).__name__}(noncentered=True): the model has no Normal latent whose "
                "location or scale depends on another latent; the guide is the plain one",
                stacklevel=6,
            )
            return loc
        self._model_args = (args, kwargs)
        self.noncentering = NonCenteringTransform(
            self, sites, self._model_plate_nesting(args, kwargs), lambda: self._model_args
        )
        with torch.no_grad():
            return self.noncentering.inv(loc)

    def _trace_at_prototype(self, args: tuple, kwargs: dict, model: Callable | None = None):
        """A trace of the whole model at the prototype's latent values (the prototype trace
        itself hides the observed sites)."""
        latents = {
            name: site["value"] for name, site in self.prototype_trace.iter_stochastic_nodes()
        }
        with torch.no_grad(), poutine.block():
            return poutine.trace(
                poutine.condition(model or self._raw_model[0], data=latents)
            ).get_trace(*args, **kwargs)

    def _model_plate_nesting(self, args: tuple, kwargs: dict, model: Callable | None = None) -> int:
        """The model's plate nesting, observed sites included."""
        trace = self._trace_at_prototype(args, kwargs, model)
        return max(
            (
                -frame.dim
                for site in trace.nodes.values()
                if site["type"] == "sample"
                for frame in site["cond_indep_stack"]
                if frame.vectorized
            ),
            default=0,
        )

    def _create_plates(self, *args, **kwargs) -> dict:
        """Pyro's plates for the model's frames, with their indices on the flow's device.

        (Pyro builds them on torch's default device; a guide on CUDA would then put CPU index
        tensors in its trace, which break code that sums over every site.) A user's
        ``create_plates`` and a guide inside an ``AutoGuideList`` keep Pyro's plates.
        """
        if self.master is not None or self.create_plates is not None or "flow" not in self._modules:
            return super()._create_plates(*args, **kwargs)
        device = self._modules["flow"].affine.raw.device
        self.plates = {
            name: pyro.plate(
                name, frame.full_size or frame.size, dim=frame.dim, subsample_size=frame.size,
                device=device,
            )
            for name, frame in sorted(self._prototype_frames.items())
        }  # fmt: skip
        return self.plates

    def _remember_args(self, args: tuple, kwargs: dict) -> None:
        """The model arguments the non-centring map runs the model with (the latest call's)."""
        if self.noncentering is not None and (args or kwargs):
            self._model_args = (args, kwargs)

    def forward(self, *args, **kwargs):
        self._remember_args(args, kwargs)
        return super().forward(*args, **kwargs)

    def _check_no_subsampling(self, args, kwargs) -> None:
        for name, site in self._trace_at_prototype(args, kwargs).nodes.items():
            if site["type"] != "sample":
                continue
            frame = _subsampled_frame(site)
            if frame is not None:
                raise ValueError(
                    f"precondition='laplace' needs the full log density, but site {name!r} "
                    f"is in the subsampled plate {frame.name!r} (size {frame.full_size}, "
                    f"subsample {frame.size}); drop subsample_size, or use precondition=None"
                )

    def _log_joint_fn(self, args, kwargs) -> Callable[[Tensor], Tensor]:
        """The model's log density in unconstrained space, as a function of the latent vector."""
        model = self._raw_model[0]

        def log_joint(latent: Tensor) -> Tensor:
            values, log_jac = self._constrain_with_log_jacobian(latent)
            with poutine.block():
                trace = poutine.trace(poutine.condition(model, data=values)).get_trace(
                    *args, **kwargs
                )
            return trace.log_prob_sum() + log_jac

        return log_joint

    def _constrain_with_log_jacobian(self, latent: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        """Each site's constrained value from the latent vector, and the summed log-Jacobian of
        the maps from unconstrained space (over sites, plates and any batch of latents)."""
        values, log_jac = {}, 0.0
        for site, unconstrained in self._unpack_latent(latent):
            transform = biject_to(site["fn"].support)
            value = transform(unconstrained)
            jac = transform.log_abs_det_jacobian(unconstrained, value)
            jac = sum_rightmost(jac, jac.dim() - value.dim() + site["fn"].event_dim)
            log_jac = log_jac + jac.sum()
            values[site["name"]] = value
        return values, log_jac

    def _check_model(self) -> None:
        name = type(self).__name__
        for site_name, site in self.prototype_trace.iter_stochastic_nodes():
            if site["fn"].support.is_discrete:
                raise ValueError(
                    f"{name} handles continuous latents only, but site {site_name!r} is discrete "
                    f"({type(site['fn']).__name__}). Enumerate it out: mark it with "
                    "infer={'enumerate': 'parallel'} and use TraceEnum_ELBO with this guide on "
                    f"poutine.block(model, hide=[{site_name!r}]) (see "
                    "https://pyro.ai/examples/enumeration.html)."
                )
            frame = _subsampled_frame(site)
            if frame is not None:
                raise ValueError(
                    f"{name} cannot guide site {site_name!r}: it is a local latent inside the "
                    f"subsampled plate {frame.name!r} (size {frame.full_size}, subsample "
                    f"{frame.size}), and a flattening guide would see a different latent "
                    "vector at every step. Use AutoNormal for local latents (it supports "
                    "subsampling), an amortized pyro_nf.Flow(dim, context_dim=H) in a "
                    "hand-written guide, or drop subsample_size."
                )

    def setup(self, *args, **kwargs) -> AutoFlow:
        """Create the parameters now (from one run of the model with these arguments).

        Needed before ``load_state_dict`` on a fresh guide; ``guide(*args)`` does it as well.
        Returns the guide. Inside Pyro (``SVI``, ``Predictive``) the values in Pyro's param store
        win over the module's, as for ``AutoNormal``: call ``pyro.clear_param_store()`` before
        loading a state dict into a fresh guide, or restore the param store instead.
        """
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        return self

    def _require_setup(self) -> None:
        if self.prototype_trace is None:
            raise RuntimeError(
                f"{type(self).__name__} has no parameters yet: call guide(*args) or "
                "guide.setup(*args) with the model's arguments first"
            )

    # -- the posterior --------------------------------------------------------------------
    def get_posterior(self, *args, **kwargs) -> FlowDistribution:
        """The flow over the flattened unconstrained latent vector (does not depend on the args).

        Its ``log_prob`` scores any vector exactly.
        """
        self._require_setup()
        self._remember_args(args, kwargs)
        return self._synced_flow()()

    def _synced_flow(self) -> Flow:
        """``self.flow``, sharing its tensors with Pyro's param store inside a Pyro context.

        Each trainable flow parameter is registered with :func:`pyro.param` under
        :meth:`_flow_param_prefix` ``+ "$$$" +`` its name in the flow. As for ``AutoNormal``'s
        parameters, an entry of the param store with that name wins (a restored param store, a
        second guide of the same model and architecture), so that the optimizer of ``SVI`` and
        the guide always see the same tensors. Frozen parameters (``requires_grad=False``) are
        left out, as :func:`pyro.module` leaves them out, but without its warning at every call.
        When no Pyro handler is active and the store already holds exactly the flow's tensors,
        registering them again would change nothing, and is skipped (it is a measurable part of a
        step for deep flows).
        """
        # Not self.flow: that goes through __getattr__, which calls this.
        flow = self._modules["flow"]
        if self._pyro_context.active:
            slots = [
                (key, params, p_name)
                for key, params, p_name in self._flow_slots(flow)
                if params[p_name].requires_grad
            ]
            store = pyro.get_param_store()
            if not _PYRO_STACK and _holds(store, [(k, ps[n]) for k, ps, n in slots]):
                return flow
            for key, params, p_name in slots:
                p = params[p_name]
                if key in store and store[key].shape != p.shape:
                    raise RuntimeError(
                        f"Pyro's param store holds {key!r} with shape {tuple(store[key].shape)}, "
                        f"but this guide's parameter has shape {tuple(p.shape)}; call "
                        "pyro.clear_param_store() first"
                    )
            for key, params, p_name in slots:
                p = params[p_name]
                stored = pyro.param(key, p)
                if stored._cdata != p._cdata:  # the store's tensor wins, as in pyro.module
                    params[p_name] = stored
        return flow

    def _flow_slots(self, flow: Flow) -> list[tuple[str, dict, str]]:
        """``(param-store name, owning ``_parameters`` dict, key in it)`` of every flow parameter.

        Cached (walking the module tree costs more than the rest of the check); callers read
        the tensors afresh, since the registration may swap them for the param store's.
        """
        name = self._flow_param_prefix()
        cached = self.__dict__.get("_flow_slots_cache")
        if cached is None or cached[0] is not flow or cached[1] != name:
            slots = []
            for mod_name, mod in flow.named_modules():
                for p_name, p in mod._parameters.items():
                    if p is not None:
                        full = f"{mod_name}.{p_name}" if mod_name else p_name
                        slots.append((param_with_module_name(name, full), mod._parameters, p_name))
            cached = (flow, name, slots)
            self.__dict__["_flow_slots_cache"] = cached
        return cached[2]

    def _flow_param_prefix(self) -> str:
        """The name under which the flow's parameters go into Pyro's param store.

        ``<guide's name>.flow[<sites>|<digest>]``, e.g. ``AutoPlanarFlow.flow[a,b|1f0c9e2a]``:
        the model's latent sites in order (abbreviated to the first few and a count when they
        are long), and 8 hex digits of a SHA-1 hash of the sites' unconstrained shapes, the
        flow's architecture (:meth:`pyro_nf.Flow.record`) and the guide's
        ``precondition`` and ``noncentered`` options. So guides of different models, or of one
        model with different flows, never share parameters, while a new guide built the same way
        on the same model finds the parameters of a restored param store, as ``AutoNormal`` does.
        """
        trace = self.prototype_trace
        cached = self.__dict__.get("_flow_prefix_cache")
        if cached is not None and cached[0] is trace and cached[1] == self._pyro_name:
            return cached[2]
        sites = self.record()["sites"]
        record = {
            "sites": sites,
            "flow": self._modules["flow"].record(),
            "precondition": self._precondition,
            "noncentered": self._noncentered,
        }
        digest = hashlib.sha1(json.dumps(record, sort_keys=True).encode()).hexdigest()[:8]
        names = [n for n, _ in sites]
        readable = ",".join(names)
        if len(readable) > _READABLE_SITES:
            shown: list[str] = []
            for n in names:
                if shown and len(",".join([*shown, n])) > _READABLE_SITES - 8:
                    break
                shown.append(n)
            readable = ",".join(shown) + f",+{len(names) - len(shown)}"
        prefix = self._pyro_get_fullname(f"flow[{readable.replace('$', '_')}|{digest}]")
        self.__dict__["_flow_prefix_cache"] = (trace, self._pyro_name, prefix)
        return prefix

    # -- state dict -----------------------------------------------------------------------
    def record(self) -> dict:
        """What this guide's parameters belong to, as plain values: the model's latent sites with
        their unconstrained shapes, and the non-centred sites (``noncentered=True``).

        It goes into the state dict (key ``_extra_state``, encoded as for
        :meth:`pyro_nf.Flow.get_extra_state`), and :meth:`load_state_dict` refuses a state dict
        whose record differs (a guide of another model, or of the same model with other sites
        non-centred), naming what differs.
        """
        if self.prototype_trace is None:
            return {"format": _GUIDE_RECORD, "sites": None, "noncentered": None}
        return {
            "format": _GUIDE_RECORD,
            "sites": [[n, [int(d) for d in s]] for n, s in self._unconstrained_shapes.items()],
            "noncentered": sorted(self.noncentering.sites) if self.noncentering is not None else [],
        }

    def get_extra_state(self) -> Tensor:
        return encode_record(self.record())

    def set_extra_state(self, state) -> None:
        name = type(self).__name__
        mine = self.record()
        state = decode_record(state)
        if state is None or state.get("format") != _GUIDE_RECORD:
            raise RuntimeError(
                f"{name}.load_state_dict: the state dict's '_extra_state' is not a pyro_nf flow "
                "guide's record; it was not saved from a pyro_nf flow guide"
            )

        def describe(sites):
            return ", ".join(f"{n} {tuple(s)}" for n, s in sites) if sites else "none"

        if state.get("sites") != mine["sites"]:
            raise RuntimeError(
                f"{name}.load_state_dict: the state dict was saved from a guide of other latent "
                f"sites: {describe(state.get('sites'))} (unconstrained shapes) there, "
                f"{describe(mine['sites'])} here; a flow guide's parameters fit only the model "
                "they were fitted to"
            )
        if state.get("noncentered") != mine["noncentered"]:
            raise RuntimeError(
                f"{name}.load_state_dict: the state dict was saved from a guide that non-centres "
                f"the sites {state.get('noncentered')}, this guide non-centres "
                f"{mine['noncentered']}: the flow works in other coordinates; build the guide "
                "with the same noncentered= option"
            )

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Load a state dict saved by :meth:`state_dict`, all or nothing.

        Needs the parameters, so :meth:`setup` (or a call of the guide) first. The state dict
        must come from a guide of the same model (latent sites and shapes) with the same flow
        (family, layers and their options, see :meth:`pyro_nf.Flow.load_state_dict`): a
        mismatch raises a ``RuntimeError`` that says what differs. If loading fails for any
        reason, every parameter and buffer keeps its value from before the call.

        State dicts saved before pyro_nf recorded the model and flow (no ``_extra_state``
        entries) are refused under ``strict=True``, since nothing could check them;
        ``strict=False`` loads them unchecked (and, as in torch, ignores missing or unexpected
        keys).
        """
        self._require_setup()
        return load_state_dict_atomically(self, super().load_state_dict, state_dict, strict, assign)

    def get_base_dist(self) -> dist.Distribution:
        """The flow's base distribution, :math:`\\mathcal N(0, I_D)` over the latent vector.

        With :meth:`get_transform` it gives the posterior as ``base -> transform``, the form
        Pyro's :class:`~pyro.infer.reparam.NeuTraReparam` uses to precondition HMC/NUTS with a
        trained guide (Hoffman et al. 2019).
        """
        self._require_setup()
        raw = self.flow.affine.raw
        zeros = torch.zeros(self.latent_dim, dtype=raw.dtype, device=raw.device)
        return dist.Normal(zeros, torch.ones_like(zeros)).to_event(1)

    def get_transform(self, *args, **kwargs) -> FlowTransform:
        """The whole flow as one transform from :meth:`get_base_dist`'s space to the latent vector.

        A :class:`~pyro_nf.transforms.FlowTransform` (no cache): its inverse and log-det are exact
        for any value. It does not depend on the model's arguments.

        Example:
            >>> import pyro, pyro.distributions as dist, torch
            >>> from pyro.infer.reparam import NeuTraReparam
            >>> def model():
            ...     pyro.sample("x", dist.Normal(torch.zeros(2), 1.0).to_event(1))
            >>> guide = AutoIAFFlow(model, num_transforms=1).setup()
            >>> t, base = guide.get_transform(), guide.get_base_dist()
            >>> z = base.sample((3,))
            >>> torch.allclose(guide.get_posterior().log_prob(t(z)),
            ...                base.log_prob(z) - t.log_abs_det_jacobian(z, t(z)), atol=1e-5)
            True
            >>> neutra = NeuTraReparam(guide)   # Pyro's neural-transport reparameterizer
        """
        self._require_setup()
        return ChainTransform(self._synced_flow().transforms())

    def _base_draws(self, num_samples: int) -> Tensor:
        """``num_samples`` fixed draws of the base :math:`\\mathcal N(0, I_D)`, shape ``(n, D)``.

        Every coordinate takes each value of the grid :math:`\\Phi^{-1}((k + 1/2) / n)`,
        :math:`k = 0, \\dots, n - 1`, exactly once, in an order drawn independently per
        coordinate (a Latin hypercube): the marginals are stratified, which makes the
        coordinatewise quantiles of the pushed draws far less noisy than plain Monte Carlo. The
        order comes from a private generator with a fixed seed on the flow's device, so the draws
        are the same at every call and the global random state is not touched.
        """
        raw = self._modules["flow"].affine.raw
        dtype, device = raw.dtype, raw.device
        gen = torch.Generator(device=device)
        gen.manual_seed(_QUANTILE_SEED)
        grid = torch.special.ndtri(
            (torch.arange(num_samples, dtype=dtype, device=device) + 0.5) / num_samples
        )
        keys = torch.rand(self.latent_dim, num_samples, generator=gen, dtype=dtype, device=device)
        return grid[keys.argsort(-1)].T

    def _unconstrained_draws(self, num_samples: int) -> Tensor:
        """The flow's pushforward of :meth:`_base_draws`: fixed draws of the latent vector."""
        self._require_setup()
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 2:
            raise ValueError(f"num_samples must be an integer >= 2, got {num_samples!r}")
        with torch.no_grad():
            return self._modules["flow"]().push_and_log_prob(self._base_draws(num_samples))[0]

    def _constrain(self, latent: Tensor) -> dict[str, Tensor]:
        return {
            site["name"]: biject_to(site["fn"].support)(value)
            for site, value in self._unpack_latent(latent)
        }

    @torch.no_grad()
    def median(self, *args, num_samples: int = 1001, **kwargs) -> dict[str, Tensor]:
        """Posterior median of each latent: :meth:`quantiles` at 0.5, exactly.

        Deterministic (the same value at every call, the global random state untouched). For an
        untrained guide with an odd ``num_samples`` (the default) the middle draw of every
        coordinate is the base's median 0, so the median is ``init_loc_fn``'s point up to the
        rounding of the identity layers (exactly, when the layers are exactly the identity).
        """
        q = self.quantiles([0.5], *args, num_samples=num_samples, **kwargs)
        return {name: value[0] for name, value in q.items()}

    @torch.no_grad()
    def quantiles(
        self, quantiles: Sequence[float] | Tensor, *args, num_samples: int = 1001, **kwargs
    ) -> dict[str, Tensor]:
        """Posterior quantiles of each latent, from ``num_samples`` fixed draws of the flow.

        The coordinatewise quantiles, in unconstrained space, of the flow applied to fixed
        stratified base draws (see :meth:`_base_draws`), mapped to each site's support (as
        Pyro's ``AutoContinuous.quantiles`` maps its Gaussian quantiles); for elementwise
        monotone supports (positive, interval, ...) these are the quantiles in the constrained
        space. The draws are the same at every call, so the result is deterministic, and
        ``median()`` is this at 0.5 exactly. More ``num_samples`` give finer quantiles.

        Returns a dict mapping each site to a tensor whose first dimension indexes ``quantiles``.
        """
        probs = _check_quantiles(quantiles)
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        draws = self._unconstrained_draws(num_samples)
        q = torch.tensor(probs, dtype=draws.dtype, device=draws.device)
        per_q = [self._constrain(row) for row in torch.quantile(draws, q, dim=0)]
        return {name: torch.stack([d[name] for d in per_q]) for name in per_q[0]}


def _check_quantiles(quantiles) -> list[float]:
    """The probabilities in ``quantiles`` as floats; a ``ValueError`` unless each is in [0, 1]."""
    if torch.is_tensor(quantiles):
        values = quantiles.detach().reshape(-1).tolist()
    elif isinstance(quantiles, numbers.Real):
        values = [quantiles]
    else:
        try:
            values = list(quantiles)
        except TypeError:
            raise TypeError(
                f"quantiles must be a sequence of probabilities, got {quantiles!r}"
            ) from None
    if not values:
        raise ValueError("quantiles must hold at least one probability in [0, 1], got none")
    if any(isinstance(v, bool) or not isinstance(v, numbers.Real) for v in values):
        raise TypeError(f"quantiles must be numbers in [0, 1], got {values!r}")
    values = [float(v) for v in values]
    if not all(0.0 <= v <= 1.0 for v in values):  # also refuses NaN
        raise ValueError(f"quantiles must lie in [0, 1], got {values}")
    return values


class AutoPlanarFlow(AutoFlow):
    """Flow autoguide with ``num_transforms`` planar layers (Rezende & Mohamed 2015).

    Cheap per layer (:math:`O(D)`); each layer bends the density along one direction, so deep stacks
    (16-32) are usual.

    Example:
        >>> import pyro, pyro.distributions as dist, torch
        >>> def model():
        ...     pyro.sample("x", dist.Normal(0.0, 1.0))
        >>> guide = AutoPlanarFlow(model, num_transforms=8)
        >>> sorted(guide())
        ['x']
    """

    def __init__(
        self,
        model: Callable,
        num_transforms: int = 16,
        *,
        init_loc_fn: Callable = init_to_median_or_feasible,
        init_scale: float = 0.1,
        precondition: str | None = None,
        laplace_max_iter: int = 500,
        noncentered: bool = False,
        inverse_tol: float | None = None,
    ) -> None:
        super().__init__(
            model, transform="planar", num_transforms=num_transforms, init_loc_fn=init_loc_fn,
            init_scale=init_scale, precondition=precondition, laplace_max_iter=laplace_max_iter,
            noncentered=noncentered,
            inverse_tol=inverse_tol,
        )  # fmt: skip


class AutoRadialFlow(AutoFlow):
    """Flow autoguide with ``num_transforms`` radial layers (Rezende & Mohamed 2015).

    Each layer contracts or expands the density around a learned point; cheap per layer.

    Example:
        >>> import pyro, pyro.distributions as dist
        >>> def model():
        ...     pyro.sample("s", dist.LogNormal(0.0, 1.0))
        >>> guide = AutoRadialFlow(model, num_transforms=8)
        >>> bool(guide()["s"] > 0)
        True
    """

    def __init__(
        self,
        model: Callable,
        num_transforms: int = 16,
        *,
        init_loc_fn: Callable = init_to_median_or_feasible,
        init_scale: float = 0.1,
        precondition: str | None = None,
        laplace_max_iter: int = 500,
        noncentered: bool = False,
    ) -> None:
        super().__init__(
            model, transform="radial", num_transforms=num_transforms, init_loc_fn=init_loc_fn,
            init_scale=init_scale, precondition=precondition, laplace_max_iter=laplace_max_iter,
            noncentered=noncentered,
        )  # fmt: skip


class AutoIAFFlow(AutoFlow):
    """Flow autoguide with ``num_transforms`` affine autoregressive (IAF) layers on MADE networks.

    Sampling and scoring its own samples cost one network pass per layer; scoring another value
    costs :math:`D` passes per layer. Consecutive layers reverse the variable order.

    Args:
        hidden_dims: MADE hidden sizes; default ``(min(max(2 * D, 16), 128),)`` (see
            :class:`~pyro_nf.transforms.MADE` for why it is capped and how its steps scale).
        activation: the MADEs' hidden nonlinearity, ``"elu"`` (default), ``"gelu"``, ``"silu"``,
            ``"tanh"``, ``"relu"`` or a module class. On the 2-D toy densities a smooth one fits
            far better: K=4 with one hidden layer of 64 has KL 0.004 on the banana with
            ``"gelu"``, 0.017 with ELU (``docs/benchmarks``).
        log_scale_min, log_scale_max: smooth bounds on each layer's log-scale.
        gate_bias: ``None`` for the plain affine update; a number for the gated update of
            Kingma et al. (2016) (see :class:`~pyro_nf.transforms.AffineAutoregressive`).

    Example:
        >>> import pyro, pyro.distributions as dist, torch
        >>> def model():
        ...     pyro.sample("x", dist.Normal(torch.zeros(3), 1.0).to_event(1))
        >>> guide = AutoIAFFlow(model, num_transforms=2, hidden_dims=(16,))
        >>> guide()["x"].shape
        torch.Size([3])
    """

    def __init__(
        self,
        model: Callable,
        num_transforms: int = 2,
        *,
        hidden_dims: Sequence[int] | None = None,
        activation: str | Callable[[], torch.nn.Module] = "elu",
        init_loc_fn: Callable = init_to_median_or_feasible,
        init_scale: float = 0.1,
        precondition: str | None = None,
        laplace_max_iter: int = 500,
        noncentered: bool = False,
        log_scale_min: float = -5.0,
        log_scale_max: float = 3.0,
        gate_bias: float | None = None,
    ) -> None:
        super().__init__(
            model, transform="iaf", num_transforms=num_transforms, init_loc_fn=init_loc_fn,
            init_scale=init_scale, precondition=precondition, laplace_max_iter=laplace_max_iter,
            noncentered=noncentered,
            hidden_dims=hidden_dims, activation=activation, log_scale_min=log_scale_min,
            log_scale_max=log_scale_max, gate_bias=gate_bias,
        )  # fmt: skip


class AutoSplineFlow(AutoFlow):
    """Flow autoguide with ``num_transforms`` rational-quadratic spline autoregressive layers.

    The layers of Durkan et al. (2019) (:class:`~pyro_nf.transforms.SplineAutoregressive`): each
    coordinate goes through a monotone spline whose bins come from a MADE over the earlier
    coordinates. Unlike the affine IAF, one layer can turn the Gaussian base into a density with
    several modes or sharp edges. The splines act on the standardized coordinates (before the
    affine base layer), on ``[-bound, bound]``, and are the identity outside; a fresh guide equals
    ``AutoNormal``'s start for the same ``init_loc_fn`` and ``init_scale``. Costs as for
    :class:`AutoIAFFlow`: one network pass per layer to sample and score, :math:`D` passes per
    layer to score another value.

    Args:
        hidden_dims: MADE hidden sizes; default ``(min(max(2 * D, 16), 128),)`` (see
            :class:`~pyro_nf.transforms.MADE` for why it is capped and how its steps scale).
        activation: the MADEs' hidden nonlinearity (see :class:`AutoIAFFlow`). On the toy
            densities U2-U4, ``hidden_dims=(64, 64)`` and 16 bins have KL 0.032, 0.113 and
            0.252 with ``activation="gelu"`` against 0.173, 0.343 and 0.424 with ELU
            (``docs/benchmarks``).
        num_bins: spline bins per coordinate.
        bound: half-width of the spline interval, in standardized coordinates.

    Example:
        >>> import pyro, pyro.distributions as dist, torch
        >>> def model():
        ...     pyro.sample("x", dist.Normal(torch.zeros(3), 1.0).to_event(1))
        >>> guide = AutoSplineFlow(model, num_transforms=2, hidden_dims=(16,), num_bins=4)
        >>> guide()["x"].shape
        torch.Size([3])
    """

    def __init__(
        self,
        model: Callable,
        num_transforms: int = 2,
        *,
        hidden_dims: Sequence[int] | None = None,
        activation: str | Callable[[], torch.nn.Module] = "elu",
        num_bins: int = 8,
        bound: float = 5.0,
        init_loc_fn: Callable = init_to_median_or_feasible,
        init_scale: float = 0.1,
        precondition: str | None = None,
        laplace_max_iter: int = 500,
        noncentered: bool = False,
    ) -> None:
        super().__init__(
            model, transform="spline", num_transforms=num_transforms, init_loc_fn=init_loc_fn,
            init_scale=init_scale, precondition=precondition, laplace_max_iter=laplace_max_iter,
            noncentered=noncentered, hidden_dims=hidden_dims, activation=activation,
            num_bins=num_bins, bound=bound,
        )  # fmt: skip


def _pulled_back(log_joint: Callable[[Tensor], Tensor], t: FlowTransform) -> Callable:
    """The log density of ``v`` when ``z = t(v)`` has density ``log_joint``."""

    def pulled_back(v: Tensor) -> Tensor:
        z, ladj = t.call_and_ladj(v)
        return log_joint(z) + ladj

    return pulled_back


def _subsampled_frame(site: dict):
    """The first subsampled plate (``subsample_size`` below the full size) a site sits in."""
    for frame in site["cond_indep_stack"]:
        if frame.full_size is not None and frame.full_size != frame.size:
            return frame
    return None


def _laplace(
    log_joint: Callable[[Tensor], Tensor], start: Tensor, max_iter: int, tol: float = 1e-3
) -> tuple[Tensor | None, Tensor | None, dict]:
    """Mode and Cholesky factor of the inverse Hessian of ``log_joint``, or ``None`` and why.

    L-BFGS (strong-Wolfe line search) from ``start``, then damped Newton steps with the exact
    Hessian. The mode is accepted when the Hessian of ``-log_joint`` is positive definite and the
    Newton decrement :math:`g^\\top H^{-1} g` (twice the log-density still to gain by a Newton
    step, whatever the coordinates' scales) is below ``tol``.
    """
    t0 = time.perf_counter()
    info: dict = {"used": False, "reason": None, "log_density": None, "newton_decrement": None,
                  "iterations": 0, "seconds": None}  # fmt: skip

    def finish(mode, tril, reason=None):
        info["seconds"] = time.perf_counter() - t0
        info["reason"] = reason
        info["used"] = mode is not None
        return mode, tril, info

    def neg(u: Tensor) -> Tensor:
        return -log_joint(u)

    u = start.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        if not torch.isfinite(neg(u)):
            return finish(None, None, "the log density is not finite at init_loc_fn's point")
        opt = torch.optim.LBFGS(
            [u], lr=1.0, max_iter=max_iter, max_eval=max_iter * 5 // 4, history_size=50,
            tolerance_grad=1e-10, tolerance_change=1e-14, line_search_fn="strong_wolfe",
        )  # fmt: skip

        def closure():
            opt.zero_grad()
            try:
                loss = neg(u)
            except (ValueError, RuntimeError):  # a step outside the model's valid region
                loss = None
            if loss is None or not torch.isfinite(loss):
                # a huge finite value with zero gradient: the line search backtracks from it
                u.grad = torch.zeros_like(u)
                return u.new_tensor(1e300 if u.dtype == torch.float64 else 1e30)
            loss.backward()
            return loss

        try:
            opt.step(closure)
        except (ValueError, RuntimeError) as e:
            return finish(None, None, f"the mode search failed ({first_line(e)})")
        info["iterations"] = opt.state[u].get("n_iter", 0)
        x = u.detach()
        if not torch.isfinite(x).all():
            return finish(None, None, "the mode search diverged (non-finite latent values)")
        decrement = float("inf")
        for i in range(20):  # damped Newton polish: exact on a Gaussian posterior
            xg = x.clone().requires_grad_(True)
            try:
                f = neg(xg)
                (g,) = torch.autograd.grad(f, xg)
                hess = torch.autograd.functional.hessian(neg, x)
            except (ValueError, RuntimeError) as e:
                return finish(None, None, f"the log density failed where the mode search ended "
                              f"({first_line(e)})")  # fmt: skip
            if not (torch.isfinite(f) and torch.isfinite(g).all() and torch.isfinite(hess).all()):
                return finish(None, None, "the log density or its derivatives are not finite "
                              "where the mode search ended (no finite mode?)")  # fmt: skip
            h64 = 0.5 * (hess + hess.T).double()
            chol, err = torch.linalg.cholesky_ex(h64)
            if err:
                return finish(
                    None,
                    None,
                    "the Hessian is not positive definite where the mode "
                    "search ended (a flat or unbounded direction, e.g. a funnel)",
                )
            step = torch.cholesky_solve(g.double().unsqueeze(-1), chol).squeeze(-1)
            decrement = float(g.double() @ step)
            if decrement < tol * 1e-3 or i == 19:
                break
            t, f0 = 1.0, float(f.detach())
            for _ in range(30):
                cand = x - t * step.to(x.dtype)
                try:
                    with torch.no_grad():
                        fc = float(neg(cand))
                except (ValueError, RuntimeError):
                    fc = float("nan")
                if fc == fc and fc <= f0:
                    break
                t *= 0.5
            else:
                break
            x = cand
        info["newton_decrement"] = decrement
        info["log_density"] = -float(f.detach())
    if not decrement < tol:
        return finish(None, None, f"no mode found: the Newton decrement is {decrement:.3g} "
                      f"after {info['iterations']} L-BFGS iterations (the log density may "
                      "grow without bound, e.g. a funnel)")  # fmt: skip
    cov = torch.cholesky_inverse(chol)
    tril, err = torch.linalg.cholesky_ex(0.5 * (cov + cov.T))
    if err or not torch.isfinite(tril).all():
        return finish(None, None, "the inverse Hessian is numerically singular")
    return finish(x.detach(), tril.to(dtype=start.dtype), None)
