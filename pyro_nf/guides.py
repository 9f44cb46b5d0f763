"""Flow autoguides: every continuous latent of a model, flattened, under one normalizing flow.

The guides follow Pyro's :class:`~pyro.infer.autoguide.AutoContinuous` contract: each latent is
mapped to unconstrained space with :func:`~torch.distributions.biject_to` of its support, all of
them are concatenated into one vector :math:`z \\in \\mathbb{R}^D`, and :math:`z` gets the posterior
:math:`q(z) =` :class:`~pyro_nf.Flow` (base :math:`\\mathcal N(0, I)`, ``num_transforms`` layers,
then a learnable affine layer).

By default (``precondition="auto"``) set-up looks for the mode of the posterior and, where it
finds one with a usable Hessian, the guide starts at the Laplace approximation and the flow works
in its whitened coordinates (see :class:`AutoFlow`); elsewhere (no mode, a model that subsamples,
more than 32 latent dimensions) it starts as with ``precondition=None``. With
``precondition=None`` the affine layer starts at ``init_loc_fn``'s location with scale
``init_scale`` and every flow layer at the identity, so an untrained guide *is* ``AutoNormal`` 's
starting distribution when both are given the same ``init_loc_fn`` and ``init_scale``. The
defaults differ in ``init_loc_fn``: :func:`init_to_median_or_feasible` (the prior median, like
the ``init_to_median`` of Pyro's ``AutoDiagonalNormal``) here, ``init_to_feasible`` for
``AutoNormal``; ``init_scale`` is 0.1 in both. (``init_to_median`` draws from the prior, so two
guides get the same start only from the same random state.)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import pyro.distributions as dist
import torch
from pyro.infer.autoguide import AutoContinuous
from pyro.infer.autoguide.initialization import init_to_median
from torch import Tensor, nn
from torch.distributions import biject_to

from . import _checks
from ._guide_params import FlowParams
from ._guide_setup import GuideSetup
from ._laplace import LaplaceStart
from ._noncentering import NonCenteringStart, NonCenteringTransform
from ._summaries import PosteriorSummaries, check_quantiles
from .flow import (
    Flow,
    FlowDistribution,
    decode_record,
    encode_record,
    load_state_dict_atomically,
)
from .transforms.autoregressive import AUTOGUIDE_FAN_IN_REF, DEFAULT_ACTIVATION
from .transforms.base import ChainTransform, FlowTransform

__all__ = [
    "AutoFlow",
    "AutoPlanarFlow",
    "AutoRadialFlow",
    "AutoIAFFlow",
    "AutoSplineFlow",
    "GuideOptions",
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


@dataclasses.dataclass(frozen=True)
class GuideOptions:
    """The options every flow autoguide takes, with their defaults: the one place they are set.

    :class:`AutoFlow` documents them; its subclasses take them as keywords and pass them on. An
    instance holds a guide's checked values (``init_scale`` as a float).

    Example:
        >>> GuideOptions().init_scale, GuideOptions(precondition="laplace").laplace_max_iter
        (0.1, 500)
    """

    init_loc_fn: Callable = init_to_median_or_feasible
    init_scale: float = 0.1
    precondition: str | None = "auto"
    laplace_max_iter: int = 500
    noncentered: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "init_scale", float(_checks.number(self.init_scale, "init_scale")))
        if self.precondition not in (None, "laplace", "auto"):
            raise ValueError(
                f"precondition must be None, 'auto' or 'laplace', got {self.precondition!r}"
            )
        _checks.integer(self.laplace_max_iter, "laplace_max_iter")
        if not isinstance(self.noncentered, bool):
            raise TypeError(f"noncentered must be True or False, got {self.noncentered!r}")

    @classmethod
    def split(cls, owner: str, options: dict, others: bool = True) -> tuple[GuideOptions, dict]:
        """The checked options among ``options``, and the other keywords (a ``TypeError`` naming
        ``owner`` when there are others and ``others`` is false)."""
        names = {field.name for field in dataclasses.fields(cls)}
        rest = {k: v for k, v in options.items() if k not in names}
        if rest and not others:
            raise TypeError(f"{owner}() got an unexpected keyword argument {next(iter(rest))!r}")
        return cls(**{k: v for k, v in options.items() if k in names}), rest


#: format tag of the record a flow guide puts in its state dict
_GUIDE_RECORD = "pyro_nf.AutoFlow/1"


class AutoFlow(
    GuideSetup, FlowParams, NonCenteringStart, LaplaceStart, PosteriorSummaries, AutoContinuous
):
    """Base class of the flow autoguides; use :class:`AutoPlanarFlow`, :class:`AutoRadialFlow`,
    :class:`AutoIAFFlow` or :class:`AutoSplineFlow`.

    Args:
        model: a Pyro model whose latents are all continuous.
        transform: flow family: a key of :class:`~pyro_nf.Flow`'s registry (``"planar"``, ``"radial"``,
            ``"iaf"``, ``"spline"``, ``"softplus_iaf"``).
        num_transforms: number of flow layers.
        init_loc_fn: per-site initialization (see Pyro's autoguide initialization); default
            :func:`init_to_median_or_feasible`. This and the next four options are shared by
            every flow autoguide (the subclasses take them as keywords), with the defaults of
            ``pyro_nf.guides.GuideOptions``.
        init_scale: initial scale of every unconstrained coordinate, as in ``AutoNormal``;
            default 0.1. Used by the plain start (``precondition=None``, or where the Laplace
            start is not used); the Laplace start takes its scales from the Hessian.
        precondition: ``"auto"`` (default), ``"laplace"`` or ``None``. With ``"laplace"``, set-up finds the
            mode of the log density in unconstrained space (L-BFGS from ``init_loc_fn``'s point,
            drawn with the CPU generator seeded at 0 so that a guide set up again finds the same
            mode, then Newton steps with the exact Hessian) and puts the flow in the whitened
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
            ``"auto"`` is the Laplace start where it is usable and cheap: it is not tried for
            models that subsample or have more than 32 latent dimensions
            (``pyro_nf._laplace.AUTO_LAPLACE_MAX_DIM``); where no mode is found (or the
            search fails for any other reason), or where the Laplace start's ELBO is below the
            plain start's (both estimated from the same 64 fixed draws: a nearly flat direction
            makes the inverse Hessian far too wide), the guide starts as with ``None``, without
            a warning; :attr:`laplace_info` says which. ``None``: the plain start at
            ``init_loc_fn``'s point with ``init_scale`` (an untrained guide is ``AutoNormal``'s
            start; the default up to pyro_nf 0.2.0). The default was chosen
            on posteriordb (``docs/benchmarks.rst``, "The default call"): from the plain start
            the flows' layers train slowly on badly scaled or correlated posteriors, and at a
            user's budget of 3000 steps a default flow guide could end worse than
            ``AutoNormal``.
        laplace_max_iter: L-BFGS iteration limit of ``precondition="laplace"``; default 500.
        noncentered: non-centre the model's hierarchical Normal sites inside the guide (default
            ``False``). A site :math:`x_s \\sim \\mathcal N(\\mu_s, \\sigma_s)` whose
            :math:`\\mu_s` or :math:`\\sigma_s` depends on other latents (found by
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
        **options: the options above; any other keyword goes to :class:`~pyro_nf.Flow` (e.g.
            ``hidden_dims`` for IAF).

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

    def __init__(self, model: Callable, *, transform: str, num_transforms: int, **options) -> None:
        self._options, flow_kwargs = GuideOptions.split(type(self).__name__, options)
        #: the non-centring map (``noncentered=True`` with hierarchical sites), else ``None``
        self.noncentering: NonCenteringTransform | None = None
        self._model_args: tuple[tuple, dict] = ((), {})
        #: what ``precondition="laplace"`` or ``"auto"`` did at set-up (``None`` with
        #: ``precondition=None``): ``used``,
        #: ``reason`` (why not, if not), ``log_density`` at the mode, ``newton_decrement``,
        #: ``iterations`` and ``seconds``; with ``"auto"``, where a mode was found, also
        #: ``elbo_laplace`` and ``elbo_plain`` (the two starts' ELBOs that chose between them).
        self.laplace_info: dict | None = None
        # Build a throw-away flow now so that bad arguments fail here, not at the first SVI step.
        with torch.device("cpu"):
            Flow(1, transform, num_transforms, **flow_kwargs)
        self._flow_args = (transform, num_transforms, flow_kwargs)
        super().__init__(model, init_loc_fn=self._options.init_loc_fn)
        # self.model runs init_loc_fn at every site whose value is not set yet (an
        # InitMessenger inside any handler around it); runs with all latents given use this.
        self._raw_model = (model,)

    def forward(self, *args, **kwargs):
        self.remember_args(args, kwargs)
        return super().forward(*args, **kwargs)

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

    # -- the posterior --------------------------------------------------------------------
    def get_posterior(self, *args, **kwargs) -> FlowDistribution:
        """The flow over the flattened unconstrained latent vector (does not depend on the args).

        Its ``log_prob`` scores any vector exactly.
        """
        self._require_setup()
        self.remember_args(args, kwargs)
        return self._synced_flow()()

    def get_base_dist(self) -> dist.Distribution:
        """The flow's base distribution, :math:`\\mathcal N(0, I_D)` over the latent vector.

        With :meth:`get_transform` it gives the posterior as ``base -> transform``, the form
        Pyro's :class:`~pyro.infer.reparam.NeuTraReparam` uses to precondition HMC/NUTS with a
        trained guide (Hoffman et al. 2019).
        """
        self._require_setup()
        zeros = torch.zeros_like(self.flow.base_loc_scale()[0])
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

    @torch.no_grad()
    def median(self, *args, num_samples: int = 1001, **kwargs) -> dict[str, Tensor]:
        """Posterior median of each latent: :meth:`quantiles` at 0.5, exactly.

        Deterministic (the same value at every call, the global random state untouched). For an
        untrained guide with an odd ``num_samples`` (the default) the middle draw of every
        coordinate is the base's median 0, so with the plain start (``precondition=None``, or
        where the Laplace start is not used) the median is ``init_loc_fn``'s point up to the
        rounding of the identity layers (exactly, when the layers are exactly the identity).
        With the Laplace start it is the mode up to the error of the stratified draws (the
        preconditioner mixes the coordinates).
        """
        q = self.quantiles([0.5], *args, num_samples=num_samples, **kwargs)
        return {name: value[0] for name, value in q.items()}

    @torch.no_grad()
    def quantiles(
        self, quantiles: Sequence[float] | Tensor, *args, num_samples: int = 1001, **kwargs
    ) -> dict[str, Tensor]:
        """Posterior quantiles of each latent, from ``num_samples`` fixed draws of the flow.

        The coordinatewise quantiles, in unconstrained space, of the flow applied to fixed
        stratified base draws (a Latin hypercube, see ``pyro_nf._summaries``), mapped to each
        site's support (as Pyro's ``AutoContinuous.quantiles`` maps its Gaussian quantiles); for
        elementwise monotone supports (positive, interval, ...) these are the quantiles in the
        constrained space. The draws are the same at every call, so the result is deterministic,
        and ``median()`` is this at 0.5 exactly. More ``num_samples`` give finer quantiles.

        Returns a dict mapping each site to a tensor whose first dimension indexes ``quantiles``.
        """
        probs = check_quantiles(quantiles)
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        return self._summary_quantiles(probs, num_samples)

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


class AutoPlanarFlow(AutoFlow):
    """Flow autoguide with ``num_transforms`` planar layers (Rezende & Mohamed 2015).

    Cheap per layer (:math:`O(D)`); each layer bends the density along one direction, so deep stacks
    (16-32) are usual.

    Args:
        inverse_tol: tolerance of the planar layers' inverse (see
            :class:`~pyro_nf.transforms.Planar`); ``None`` for the layer's default.
        **options: the options of every flow autoguide (``init_scale``, ``precondition``, ...),
            see :class:`AutoFlow`.

    Example:
        >>> import pyro, pyro.distributions as dist, torch
        >>> def model():
        ...     pyro.sample("x", dist.Normal(0.0, 1.0))
        >>> guide = AutoPlanarFlow(model, num_transforms=8)
        >>> sorted(guide())
        ['x']
    """

    def __init__(
        self, model: Callable, num_transforms: int = 16, *, inverse_tol: float | None = None,
        **options,
    ) -> None:  # fmt: skip
        GuideOptions.split(type(self).__name__, options, others=False)
        super().__init__(
            model, transform="planar", num_transforms=num_transforms, inverse_tol=inverse_tol,
            **options,
        )  # fmt: skip


class AutoRadialFlow(AutoFlow):
    """Flow autoguide with ``num_transforms`` radial layers (Rezende & Mohamed 2015).

    Each layer contracts or expands the density around a learned point; cheap per layer.

    Args:
        **options: the options of every flow autoguide (``init_scale``, ``precondition``, ...),
            see :class:`AutoFlow`.

    Example:
        >>> import pyro, pyro.distributions as dist
        >>> def model():
        ...     pyro.sample("s", dist.LogNormal(0.0, 1.0))
        >>> guide = AutoRadialFlow(model, num_transforms=8)
        >>> bool(guide()["s"] > 0)
        True
    """

    def __init__(self, model: Callable, num_transforms: int = 16, **options) -> None:
        GuideOptions.split(type(self).__name__, options, others=False)
        super().__init__(model, transform="radial", num_transforms=num_transforms, **options)


class AutoIAFFlow(AutoFlow):
    """Flow autoguide with ``num_transforms`` affine autoregressive (IAF) layers on MADE networks.

    Sampling and scoring its own samples cost one network pass per layer; scoring another value
    costs :math:`D` passes per layer. Consecutive layers reverse the variable order.

    Args:
        num_transforms: number of IAF layers; default 3 (2 before pyro_nf 0.3): on the seeds'
            sd-4 banana two layers end five times further from the target, on U1-U4 three are
            better, and on the posteriordb benchmark within the noise of two
            (:doc:`/benchmarks`).
        hidden_dims: MADE hidden sizes; default ``(min(max(2 * D, 16), 128),)`` (see
            :class:`~pyro_nf.transforms.MADE` for why it is capped and how its steps scale).
        activation: the MADEs' hidden nonlinearity: a module class or one of the names
            ``"elu"``, ``"gelu"``, ``"silu"``, ``"tanh"``, ``"relu"``; default
            ``pyro_nf.transforms.autoregressive.DEFAULT_ACTIVATION``, the layers' default too
            (why: :doc:`/benchmarks`).
        log_scale_min, log_scale_max: smooth bounds on each layer's log-scale.
        gate_bias: ``None`` for the plain affine update; a number for the gated update of
            Kingma et al. (2016) (see :class:`~pyro_nf.transforms.AffineAutoregressive`).
        fan_in_ref: MADE units with more unmasked inputs than this take the steps of a unit
            with this many (see :class:`~pyro_nf.transforms.MADE`); default
            ``pyro_nf.transforms.autoregressive.AUTOGUIDE_FAN_IN_REF`` (16; 64 before pyro_nf
            0.3, the layers' default); ``None`` for plain masked layers.
        **options: the options of every flow autoguide (``init_scale``, ``precondition``, ...),
            see :class:`AutoFlow`.

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
        num_transforms: int = 3,
        *,
        hidden_dims: Sequence[int] | None = None,
        activation: str | Callable[[], nn.Module] = DEFAULT_ACTIVATION,
        log_scale_min: float = -5.0,
        log_scale_max: float = 3.0,
        gate_bias: float | None = None,
        fan_in_ref: int | None = AUTOGUIDE_FAN_IN_REF,
        **options,
    ) -> None:
        GuideOptions.split(type(self).__name__, options, others=False)
        super().__init__(
            model, transform="iaf", num_transforms=num_transforms, hidden_dims=hidden_dims,
            activation=activation, log_scale_min=log_scale_min, log_scale_max=log_scale_max,
            gate_bias=gate_bias, fan_in_ref=fan_in_ref, **options,
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
        hidden_dims, activation, fan_in_ref: the MADEs' hidden sizes, nonlinearity and step
            reference, as for :class:`AutoIAFFlow`.
        num_bins: spline bins per coordinate.
        bound: half-width of the spline interval, in standardized coordinates.
        **options: the options of every flow autoguide (``init_scale``, ``precondition``, ...),
            see :class:`AutoFlow`.

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
        activation: str | Callable[[], nn.Module] = DEFAULT_ACTIVATION,
        num_bins: int = 8,
        bound: float = 5.0,
        fan_in_ref: int | None = AUTOGUIDE_FAN_IN_REF,
        **options,
    ) -> None:
        GuideOptions.split(type(self).__name__, options, others=False)
        super().__init__(
            model, transform="spline", num_transforms=num_transforms, hidden_dims=hidden_dims,
            activation=activation, num_bins=num_bins, bound=bound, fan_in_ref=fan_in_ref,
            **options,
        )  # fmt: skip
