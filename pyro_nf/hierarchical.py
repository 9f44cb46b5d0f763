"""A flow guide for hierarchical models whose local latents sit in subsampled plates.

A model with a few *global* latents :math:`g` and one *local* latent :math:`z_i` per datapoint
(group, patient, document) of a plate that is subsampled (``pyro.plate(..., subsample_size=B)`` or
``subsample=idx``) is guided by

.. math::
    q(g, z_{1:N} \\mid x) = q_\\phi(g) \\prod_{i} q_\\psi(z_i \\mid c_i), \\qquad
    c_i = \\text{encoder}([\\tilde x_i, (u(g) - m_\\phi) / s_\\phi]),

where :math:`q_\\phi(g)` is a :class:`~pyro_nf.Flow` over the flattened unconstrained globals
:math:`u(g)` (as in :class:`~pyro_nf.AutoFlow`) whose affine layer has location :math:`m_\\phi` and
scale :math:`s_\\phi`, :math:`\\tilde x_i` are datapoint :math:`i`'s
observed values in the plate (standardized with the set-up minibatch's mean and sd), and
:math:`q_\\psi(z_i \\mid c_i)` is a conditional :class:`~pyro_nf.Flow` over the flattened
unconstrained local sites of datapoint :math:`i`, shared by all datapoints (amortized). Only the
minibatch's :math:`z_i` are drawn at each step, inside the model's plate, so Pyro scales their
terms by :math:`N / B` and the ELBO estimate is unbiased for the full-data ELBO. With
``amortized=False`` each datapoint instead gets its own Normal (``AutoNormal``-style parameters of
shape ``(N, d)`` indexed by the subsample), independent of :math:`g`.

How the guide finds the minibatch: at each call it first runs the model once, hidden from every
handler, which draws the plate's subsample indices and exposes the minibatch's observed values;
the guide then creates the plate with those indices (so they are in its trace, and the model,
replayed against the guide, uses the same ones) and builds the contexts from those values.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from contextlib import ExitStack

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions.util import sum_rightmost
from pyro.infer.autoguide import AutoGuide
from pyro.infer.autoguide.initialization import InitMessenger
from pyro.infer.autoguide.utils import helpful_support_errors
from pyro.poutine.runtime import _PYRO_STACK
from pyro.poutine.util import site_is_subsample
from torch import Tensor, nn
from torch.distributions import biject_to

from . import _checks
from .flow import Flow
from .guides import init_to_median_or_feasible
from .transforms.base import inverse_softplus

__all__ = ["AutoHierarchicalFlow"]


def _is_subsampled(frame) -> bool:
    return frame.full_size is not None and frame.full_size != frame.size


def _per_datapoint(value: Tensor, event_dim: int, plate_dim: int, size: int) -> Tensor:
    """``value`` with the plate's axis first and everything else flattened: ``(size, -1)``.

    The plate's axis is counted from the right of the batch dims (``plate_dim < 0``); a value
    with fewer batch dims, or with size 1 along the plate (broadcast), is expanded first.
    """
    batch_ndim = value.dim() - event_dim
    if batch_ndim < -plate_dim:
        value = value.reshape((1,) * (-plate_dim - batch_ndim) + value.shape)
        batch_ndim = -plate_dim
    axis = batch_ndim + plate_dim
    if value.shape[axis] == 1 and size != 1:
        value = value.expand(value.shape[:axis] + (size,) + value.shape[axis + 1 :])
    return value.movedim(axis, 0).reshape(value.shape[axis], -1)


class _Encoder(nn.Module):
    """The default encoder: ``[input, MLP(input)]`` (a linear skip plus learned features), so the
    conditional flow's linear heads can use the input directly (enough for a Gaussian posterior
    whose mean is linear in the data and the globals)."""

    def __init__(self, in_dim: int, hidden_dims: Sequence[int]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_dim
        for h in hidden_dims:
            layers += [nn.Linear(width, h), nn.ELU()]
            width = h
        self.mlp = nn.Sequential(*layers)
        self.out_dim = in_dim + (width if hidden_dims else 0)

    def forward(self, inputs: Tensor) -> Tensor:
        if len(self.mlp) == 0:
            return inputs
        return torch.cat([inputs, self.mlp(inputs)], -1)


class _PerDatapoint(nn.Module):
    """One Normal per datapoint in unconstrained space: ``loc`` and ``softplus(raw_scale)`` of
    shape ``(N, d)``."""

    def __init__(self, loc: Tensor, scale: float) -> None:
        super().__init__()
        self.loc = nn.Parameter(loc.detach().clone())
        self.raw_scale = nn.Parameter(inverse_softplus(torch.full_like(loc, scale)))

    def forward(self, index: Tensor) -> dist.Normal:
        loc = self.loc.index_select(0, index)
        scale = nn.functional.softplus(self.raw_scale.index_select(0, index))
        return dist.Normal(loc, scale)


class _LocalPlate:
    """What set-up learned about one subsampled plate holding local latents (plain values)."""

    def __init__(self, frame, sites: list[dict], context: dict[str, tuple[int, int]]) -> None:
        self.name = frame.name
        self.dim = frame.dim
        self.full_size = frame.full_size
        self.sites = sites  # name, support, event_dim, unc_event_dim, rest (per-datapoint shape)
        self.context = context  # observed site -> (event_dim, per-datapoint width)
        self.latent_dim = sum(s["numel"] for s in sites)
        self.context_dim = sum(width for _, width in context.values())


class AutoHierarchicalFlow(AutoGuide):
    """Flow guide for models with global latents and local latents in subsampled plates.

    The globals (latents in no subsampled plate) get a :class:`~pyro_nf.Flow` over their flattened
    unconstrained values, started at ``init_loc_fn``'s point with ``init_scale``, as
    :class:`~pyro_nf.AutoFlow` does. The locals of each subsampled plate (latents inside exactly
    one subsampled plate; other, full plates around them are fine) get, per datapoint of the
    minibatch, a conditional flow :math:`q(z_i \\mid c_i)` whose context :math:`c_i` is an
    encoder's output for the datapoint's observed values in the plate and the global draw (module
    docs); with ``amortized=False``, a Normal per datapoint instead. Works with ``SVI`` and
    ``Trace_ELBO`` (one particle at a time: ``vectorize_particles=False``), :func:`pyro_nf.fit`,
    ``Predictive`` (with the observed values given, on a subsample or the full data),
    :func:`pyro_nf.diagnose` and :func:`pyro_nf.to_inference_data` (see ``docs/hierarchical.rst``).

    Args:
        model: a Pyro model with continuous latents, at least one of them in a subsampled plate.
        transform, num_transforms: the globals' flow family (a key of :class:`~pyro_nf.Flow`'s
            registry) and number of layers; default two IAF layers.
        local_transform, local_num_transforms: the locals' conditional flow; default two IAF
            layers (for one local coordinate per datapoint the layers add nothing to the
            conditional affine layer, so ``0`` is as good and cheaper).
        amortized: ``True`` (default): the encoder and the shared conditional flow; memory and
            time per step do not grow with the plate's full size :math:`N`. ``False``: a Normal
            per datapoint (``2 N d`` parameters), like ``AutoNormal``.
        encoder: the user's encoder: an ``nn.Module`` (one local plate) or a dict from plate name
            to module, called as ``encoder(inputs)`` on ``inputs`` of shape ``(B, c + g)``: the
            datapoint's standardized observed values (``c`` numbers) then the unconstrained
            global draw standardized by the globals' affine layer (``g`` numbers, see the
            module docs); it returns the context, ``(B, H)``. Default: an MLP with
            ``hidden_dims`` whose output is concatenated to its input.
        hidden_dims: hidden sizes of the default encoder; default ``(64,)``.
        context_sites: per plate, the observed sites whose values form the context: a list (one
            local plate) or a dict from plate name to list. Default: every observed sample site
            in the plate except ``pyro.deterministic`` ones; list a deterministic site here to
            feed per-datapoint covariates (``pyro.deterministic("cov", x[idx])`` in the plate).
        init_loc_fn: per-site initialization; default
            :func:`~pyro_nf.init_to_median_or_feasible`.
        init_scale: initial scale of every unconstrained coordinate; default 0.1.
        local_plates: names of plates whose latents are local although the set-up call does
            not subsample them (e.g. a set-up on the full data, or a plate of 1000 datapoints
            fitted in minibatches of 1000); subsampled plates are always local.
        num_local_draws: draws of the locals per draw of the globals in :func:`pyro_nf.diagnose`
            (the locals are integrated out by importance sampling, see ``docs/hierarchical.rst``);
            default 8.
        local_flow_kwargs: options of the locals' flow (e.g. ``hidden_dims`` for IAF).
        **flow_kwargs: options of the globals' flow (e.g. ``hidden_dims`` for IAF).

    ``precondition="laplace"`` and ``noncentered=True`` of the other flow guides are refused: the
    Laplace search needs a fixed log density (a subsampled model's changes at every step), and
    non-centring acts on the flattened vector of all latents.

    Example:
        >>> import pyro, pyro.distributions as dist, torch
        >>> x = torch.randn(100, 3) + 2.0           # 100 groups, 3 observations each
        >>> def model(x, batch=10):
        ...     mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        ...     with pyro.plate("groups", len(x), subsample_size=batch) as idx:
        ...         z = pyro.sample("z", dist.Normal(mu, 1.0))
        ...         pyro.sample("x", dist.Normal(z.unsqueeze(-1), 1.0).to_event(1), obs=x[idx])
        >>> guide = AutoHierarchicalFlow(model)
        >>> sample = guide(x)
        >>> sample["mu"].shape, sample["z"].shape
        (torch.Size([]), torch.Size([10]))
    """

    def __init__(
        self,
        model: Callable,
        *,
        transform: str = "iaf",
        num_transforms: int = 2,
        local_transform: str = "iaf",
        local_num_transforms: int = 2,
        amortized: bool = True,
        encoder: nn.Module | dict | None = None,
        hidden_dims: Sequence[int] = (64,),
        context_sites: Sequence[str] | dict | None = None,
        init_loc_fn: Callable = init_to_median_or_feasible,
        init_scale: float = 0.1,
        num_local_draws: int = 8,
        local_plates: Sequence[str] = (),
        local_flow_kwargs: dict | None = None,
        **flow_kwargs,
    ) -> None:
        name = type(self).__name__
        for option in ("precondition", "noncentered"):
            if option in flow_kwargs:
                raise ValueError(
                    f"{name} does not support {option}=: the Laplace start needs a fixed log "
                    "density (a subsampled model's changes at every step) and non-centring "
                    "acts on the flattened vector of all latents; use AutoFlow's option on a "
                    "model without subsampling instead"
                )
        if not isinstance(amortized, bool):
            raise TypeError(f"amortized must be True or False, got {amortized!r}")
        self._init_scale = float(_checks.number(init_scale, "init_scale"))
        if not self._init_scale > 0:
            raise ValueError(f"init_scale must be positive, got {init_scale!r}")
        _checks.integer(num_local_draws, "num_local_draws")
        self._global_args = (transform, num_transforms, dict(flow_kwargs))
        self._local_args = (local_transform, local_num_transforms, dict(local_flow_kwargs or {}))
        # bad flow arguments fail here, not at the first step
        with torch.device("cpu"):
            Flow(2, transform, num_transforms, **flow_kwargs)
            Flow(2, local_transform, local_num_transforms, context_dim=1, **self._local_args[2])
        self.amortized = amortized
        self._user_encoder = (encoder,)  # (a tuple: not a submodule of the guide itself)
        self._hidden_dims = tuple(int(h) for h in hidden_dims)
        self._context_sites = context_sites
        self.num_local_draws = int(num_local_draws)
        if isinstance(local_plates, str):
            local_plates = (local_plates,)
        self._declared_local = frozenset(local_plates)
        self.init_loc_fn = init_loc_fn
        super().__init__(model)
        self._init_model = (InitMessenger(init_loc_fn)(model),)
        self._globals: list[dict] = []
        self._locals: dict[str, _LocalPlate] = {}
        self._full_plates: dict[str, object] = {}
        self._fixed_globals: Tensor | None = None

    # -- set-up ---------------------------------------------------------------------------
    def setup(self, *args, **kwargs) -> AutoHierarchicalFlow:
        """Create the parameters now (one run of the model with these arguments); returns the
        guide. Needed before ``load_state_dict`` on a fresh guide; ``guide(*args)`` does it too."""
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        return self

    def _setup_prototype(self, *args, **kwargs) -> None:
        try:
            self._build(args, kwargs)
        except BaseException:
            self.prototype_trace = None
            self._modules.pop("nets", None)
            raise

    def _build(self, args: tuple, kwargs: dict) -> None:
        name = type(self).__name__
        with torch.no_grad(), poutine.block():
            trace = poutine.trace(self._init_model[0]).get_trace(*args, **kwargs)
        self._globals, plates, frames = [], {}, {}
        for site_name, site in trace.nodes.items():
            if site["type"] != "sample" or site_is_subsample(site):
                continue
            for frame in site["cond_indep_stack"]:
                if not frame.vectorized and _is_subsampled(frame):
                    raise ValueError(
                        f"{name}: site {site_name!r} is in the sequential subsampled plate "
                        f"{frame.name!r}; only vectorized plates (pyro.plate used as a context "
                        "manager) are supported"
                    )
            if site["is_observed"]:
                continue
            fn = site["fn"]
            if fn.support.is_discrete:
                raise ValueError(
                    f"{name} handles continuous latents only, but site {site_name!r} is discrete "
                    f"({type(fn).__name__}); enumerate it out (infer={{'enumerate': 'parallel'}} "
                    "with TraceEnum_ELBO) or write its guide by hand"
                )
            sub = [
                f
                for f in site["cond_indep_stack"]
                if f.vectorized and (_is_subsampled(f) or f.name in self._declared_local)
            ]
            if len(sub) > 1:
                raise ValueError(
                    f"{name}: site {site_name!r} sits in the nested subsampled plates "
                    f"{[f.name for f in sub]}; only one subsampled plate per local latent is "
                    "supported. Subsample one of the plates only, or use AutoNormal"
                )
            for frame in site["cond_indep_stack"]:
                if frame.vectorized:
                    frames[frame.name] = frame
            with helpful_support_errors(site):
                unc = biject_to(fn.support).inv(site["value"])
            info = {
                "name": site_name,
                "support": fn.support,
                "event_dim": fn.event_dim,
                "unc_event_dim": fn.event_dim + unc.dim() - site["value"].dim(),
                "shape": tuple(unc.shape),
                "init": unc.detach(),
            }
            if not torch.isfinite(unc).all():
                raise ValueError(
                    f"{name}: init_loc_fn gave site {site_name!r} a value outside its support or "
                    "not finite; use another init_loc_fn (e.g. init_to_feasible)"
                )
            if not sub:
                info["numel"] = int(unc.numel())
                self._globals.append(info)
                continue
            frame = sub[0]
            batch_ndim = unc.dim() - info["unc_event_dim"]
            axis = batch_ndim + frame.dim
            if axis < 0 or unc.shape[axis] != frame.size:
                raise ValueError(
                    f"{name}: site {site_name!r} in plate {frame.name!r} has shape "
                    f"{tuple(site['value'].shape)} without the plate's dim {frame.dim} of size "
                    f"{frame.size}"
                )
            info["axis"] = axis
            rest = unc.shape[:axis] + unc.shape[axis + 1 :]
            info["rest"] = tuple(rest)
            info["numel"] = int(torch.Size(rest).numel())
            plates.setdefault(frame.name, (frame, []))[1].append(info)
        if not plates:
            raise ValueError(
                f"{name} found no latent site in a subsampled plate; for a model without local "
                "latents in subsampled plates use the flattening flow guides (AutoIAFFlow, "
                "AutoPlanarFlow, AutoRadialFlow, AutoSplineFlow)"
            )
        self._locals = {}
        for plate_name, (frame, sites) in plates.items():
            context = self._find_context(trace, frame) if self.amortized else {}
            self._locals[plate_name] = _LocalPlate(frame, sites, context)
        self._full_plates = {n: f for n, f in frames.items() if n not in self._locals}
        self.prototype_trace = trace
        self._build_nets(trace)

    def _find_context(self, trace, frame) -> dict[str, tuple[int, int]]:
        name = type(self).__name__
        wanted = self._context_sites
        if isinstance(wanted, dict):
            wanted = wanted.get(frame.name)
        context = {}
        for site_name, site in trace.nodes.items():
            if site["type"] != "sample" or site_is_subsample(site) or not site["is_observed"]:
                continue
            if frame.name not in {f.name for f in site["cond_indep_stack"]}:
                continue
            deterministic = site["infer"].get("_deterministic", False)
            if wanted is None and deterministic:
                continue
            if wanted is not None and site_name not in wanted:
                continue
            event_dim = 0 if deterministic else site["fn"].event_dim
            flat = _per_datapoint(site["value"], event_dim, frame.dim, frame.size)
            if flat.shape[0] != frame.size:
                raise ValueError(
                    f"{name}: observed site {site_name!r} in plate {frame.name!r} has shape "
                    f"{tuple(site['value'].shape)}, with no axis of the plate's size "
                    f"{frame.size} at dim {frame.dim}"
                )
            context[site_name] = (event_dim, int(flat.shape[1]))
        missing = set(wanted or ()) - set(context)
        if missing:
            raise ValueError(
                f"{name}: context_sites {sorted(missing)} are not observed sample sites in plate "
                f"{frame.name!r}"
            )
        if not context:
            raise ValueError(
                f"{name}: plate {frame.name!r} holds local latents but no observed site to build "
                "their context from; pass amortized=False (one Normal per datapoint), or feed "
                "per-datapoint covariates through pyro.deterministic sites in the plate named "
                "in context_sites"
            )
        return context

    def _build_nets(self, trace) -> None:
        ref = (self._globals or next(iter(self._locals.values())).sites)[0]["init"]
        like = {"dtype": ref.dtype, "device": ref.device}
        nets = nn.ModuleDict()
        self._global_dim = sum(s["numel"] for s in self._globals)
        if self._globals:
            transform, k, kw = self._global_args
            with torch.device("cpu"):
                flow = Flow(self._global_dim, transform, k, init_scale=self._init_scale, **kw)
            loc = torch.cat([s["init"].reshape(-1).to(**like) for s in self._globals])
            nets["globals"] = flow.to(**like).set_base(loc, self._init_scale)
        for plate_name, lp in self._locals.items():
            inits = [
                s["init"].movedim(s["axis"], 0).reshape(s["init"].shape[s["axis"]], -1)
                for s in lp.sites
            ]
            init = torch.cat(inits, -1).to(**like)  # (B, d) at the prototype's minibatch
            part = nn.Module()
            if self.amortized:
                x = self._context_values(trace, lp).to(**like)
                x_loc, x_scale = x.mean(0), x.std(0) if x.shape[0] > 1 else torch.ones_like(x[0])
                x_scale = torch.where(x_scale > 0, x_scale, torch.ones_like(x_scale))
                part.register_buffer("x_loc", x_loc)
                part.register_buffer("x_scale", x_scale)
                in_dim = lp.context_dim + self._global_dim
                encoder = self._user_encoder[0]
                if isinstance(encoder, dict):
                    encoder = encoder.get(plate_name)
                if encoder is None:
                    with torch.device("cpu"):
                        encoder = _Encoder(in_dim, self._hidden_dims)
                    encoder = encoder.to(**like)
                probe = torch.zeros(init.shape[0], in_dim, **like)
                out = encoder(probe)
                if out.dim() != 2 or out.shape[0] != init.shape[0]:
                    raise ValueError(
                        f"{type(self).__name__}: the encoder of plate {plate_name!r} must map "
                        f"inputs of shape (B, {in_dim}) to a context of shape (B, H), gave "
                        f"{tuple(out.shape)}"
                    )
                transform, k, kw = self._local_args
                with torch.device("cpu"):
                    flow = Flow(
                        lp.latent_dim, transform, k, context_dim=int(out.shape[1]),
                        init_loc=init.mean(0).cpu().to(torch.get_default_dtype()),
                        init_scale=self._init_scale, **kw,
                    )  # fmt: skip
                part.encoder = encoder
                part.flow = flow.to(**like)
            else:
                reps = -(-lp.full_size // init.shape[0])
                part.normal = _PerDatapoint(init.repeat(reps, 1)[: lp.full_size], self._init_scale)
            nets[f"local[{plate_name}]"] = part
        self.nets = nets

    def _context_values(self, trace, lp: _LocalPlate, size: int | None = None) -> Tensor:
        cols = []
        for site_name, (event_dim, width) in lp.context.items():
            site = trace.nodes.get(site_name)
            if site is None or site["type"] != "sample" or not site["is_observed"]:
                raise ValueError(
                    f"{type(self).__name__}: the locals' context needs the observed values of "
                    f"site {site_name!r} in plate {lp.name!r}, but the model did not observe it "
                    "in this call; pass the data (an amortized guide reads it), or use "
                    "amortized=False"
                )
            n = size if size is not None else site["value"].shape[0]
            flat = _per_datapoint(site["value"], event_dim, lp.dim, n)
            if flat.shape[1] != width:
                raise ValueError(
                    f"{type(self).__name__}: observed site {site_name!r} in plate {lp.name!r} "
                    f"has {flat.shape[1]} values per datapoint here, {width} at set-up; the "
                    "context needs a fixed per-datapoint shape (pad and mask ragged data)"
                )
            cols.append(flat)
        return torch.cat(cols, -1)

    # -- parameters in Pyro's param store ---------------------------------------------------
    def _param_prefix(self) -> str:
        record = {
            "globals": [[s["name"], list(s["shape"])] for s in self._globals],
            "locals": {p: [[s["name"], list(s["rest"])] for s in lp.sites]
                       for p, lp in self._locals.items()},
            "amortized": self.amortized,
        }  # fmt: skip
        digest = hashlib.sha1(json.dumps(record, sort_keys=True).encode()).hexdigest()[:8]
        return f"{self._pyro_name}.nets[{digest}]"

    def _registered_nets(self) -> nn.ModuleDict:
        nets = self._modules["nets"]
        if _PYRO_STACK:
            prefix = self._param_prefix()
            store = pyro.get_param_store()
            for key, p in nets.named_parameters():
                full = f"{prefix}$$${key}"
                if full in store and store[full].shape != p.shape:
                    raise RuntimeError(
                        f"Pyro's param store holds {full!r} with shape "
                        f"{tuple(store[full].shape)}, this guide's parameter has shape "
                        f"{tuple(p.shape)}; call pyro.clear_param_store() first"
                    )
            pyro.module(prefix, nets, update_module_params=True)
        return nets

    def __getattr__(self, name: str):
        # plain reads of ``nets`` would make PyroModule register it under another name
        if name == "nets" and "nets" in self.__dict__.get("_modules", {}):
            return self._modules["nets"]
        return super().__getattr__(name)

    # -- the guide --------------------------------------------------------------------------
    def _check_not_vectorized(self) -> None:
        known = set(self._locals) | set(self._full_plates)
        for frame in _PYRO_STACK:
            plate_name = getattr(frame, "name", None)
            if (
                isinstance(frame, poutine.plate_messenger.PlateMessenger)
                and frame.dim is not None
                and plate_name not in known
            ):
                raise NotImplementedError(
                    f"{type(self).__name__} does not vectorize over particles or draws (plate "
                    f"{plate_name!r} around the guide): use Trace_ELBO(vectorize_particles=False), "
                    "Predictive(parallel=False), or vectorize=False"
                )

    def _pre_run(self, args: tuple, kwargs: dict):
        """One run of the model, hidden from every handler: the plates' subsample indices and
        sizes and the minibatch's observed values."""
        with torch.no_grad(), poutine.block():
            return poutine.trace(self.model).get_trace(*args, **kwargs)

    @staticmethod
    def _frames(trace) -> dict:
        frames = {}
        for site in trace.nodes.values():
            if site["type"] == "sample":
                for frame in site["cond_indep_stack"]:
                    if frame.vectorized:
                        frames[frame.name] = frame
        return frames

    def _make_plates(self, pre) -> tuple[dict, dict]:
        """The model's plates of this call, with the pre-run's subsample indices; and the
        indices of each local plate (``None`` where the model passed its own ``subsample``)."""
        frames = self._frames(pre)
        plates, indices = {}, {}
        for plate_name in [*self._locals, *self._full_plates]:
            frame = frames.get(plate_name)
            if frame is None:
                raise ValueError(
                    f"{type(self).__name__}: the model's plate {plate_name!r} did not appear in "
                    "this call"
                )
            full = frame.full_size or frame.size
            node = pre.nodes.get(plate_name)
            if node is not None and site_is_subsample(node):
                mini = poutine.Trace()
                mini.add_node(plate_name, **{k: v for k, v in node.items() if k != "name"})
                with poutine.replay(trace=mini):
                    plates[plate_name] = pyro.plate(
                        plate_name, full, subsample_size=frame.size, dim=frame.dim
                    )
                indices[plate_name] = node["value"]
            else:  # the model passed subsample=...: its indices are its own
                ref = next(iter(self.nets.parameters()))
                sub = torch.arange(frame.size, device=ref.device)
                plates[plate_name] = pyro.plate(plate_name, full, subsample=sub, dim=frame.dim)
                indices[plate_name] = None
        return plates, indices

    @staticmethod
    def _constrain(info: dict, unc: Tensor) -> tuple[Tensor, Tensor]:
        transform = biject_to(info["support"])
        value = transform(unc)
        jac = transform.log_abs_det_jacobian(unc, value)
        batch_ndim = unc.dim() - info["unc_event_dim"]
        jac = sum_rightmost(jac, jac.dim() - batch_ndim)
        return value, jac.expand(unc.shape[:batch_ndim])

    def forward(self, *args, **kwargs) -> dict[str, Tensor]:
        """Draw the globals and the minibatch's locals; returns each latent's value."""
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        self._check_not_vectorized()
        nets = self._registered_nets()
        pre = self._pre_run(args, kwargs)
        plates, indices = self._make_plates(pre)
        result: dict[str, Tensor] = {}
        prefix = f"_{self._pyro_name}"

        def enter(stack, site_name):
            for frame in pre.nodes[site_name]["cond_indep_stack"]:
                if frame.vectorized:
                    stack.enter_context(plates[frame.name])

        z_g = None
        if self._globals:
            flow = nets["globals"]()
            if self._fixed_globals is None:
                z, log_q = flow.rsample_and_log_prob()
            else:  # diagnose's inner draws: the globals held at a given draw
                z = self._fixed_globals
                log_q = flow.log_prob(z)
            values, log_jac, pos = {}, 0.0, 0
            for info in self._globals:
                unc = z[pos : pos + info["numel"]].reshape(info["shape"])
                pos += info["numel"]
                values[info["name"]], jac = self._constrain(info, unc)
                log_jac = log_jac + jac.sum()
            pyro.sample(
                f"{prefix}_globals",
                dist.Delta(z, log_density=log_q - log_jac, event_dim=1),
                infer={"is_auxiliary": True},
            )
            z_g = z
            for info in self._globals:
                with ExitStack() as stack:
                    enter(stack, info["name"])
                    result[info["name"]] = pyro.sample(
                        info["name"], dist.Delta(values[info["name"]], event_dim=info["event_dim"])
                    )
        for plate_name, lp in self._locals.items():
            part = nets[f"local[{plate_name}]"]
            frame = self._frames(pre)[plate_name]
            size = frame.size
            if self.amortized:
                x = self._context_values(pre, lp, size).to(part.x_loc)
                inputs = (x - part.x_loc) / part.x_scale
                if z_g is not None:
                    # the global draw standardized by the globals' affine layer (not detached:
                    # an equivalent parametrization, exact gradients), so the encoder's input
                    # stays centred while the globals' location moves during the fit
                    affine = nets["globals"].affine
                    loc_g, scale_g = affine._split(affine.raw)
                    g = (z_g - loc_g) / scale_g
                    inputs = torch.cat([inputs, g.expand(size, -1)], -1)
                z, log_q = part.flow(part.encoder(inputs)).rsample_and_log_prob()
            else:
                index = indices[plate_name]
                if index is None:
                    raise ValueError(
                        f"{type(self).__name__}(amortized=False) needs the indices of plate "
                        f"{plate_name!r}, but the model passes its own subsample=; use "
                        "subsample_size=, or amortized=True"
                    )
                q = part.normal(index.to(part.normal.loc.device))
                z = q.rsample()
                log_q = q.log_prob(z).sum(-1)
            values, log_jac, pos = {}, 0.0, 0
            for info in lp.sites:
                block = z[:, pos : pos + info["numel"]].reshape((size,) + info["rest"])
                pos += info["numel"]
                unc = block.movedim(0, info["axis"])
                value, jac = self._constrain(info, unc)
                values[info["name"]] = value
                log_jac = log_jac + jac.movedim(info["axis"], 0).reshape(size, -1).sum(-1)
            shape = (size,) + (1,) * (-lp.dim - 1)
            with plates[plate_name]:
                pyro.sample(
                    f"{prefix}_{plate_name}_locals",
                    dist.Delta(
                        z.reshape(shape + (lp.latent_dim,)),
                        log_density=(log_q - log_jac).reshape(shape),
                        event_dim=1,
                    ),
                    infer={"is_auxiliary": True},
                )
            for info in lp.sites:
                with ExitStack() as stack:
                    enter(stack, info["name"])
                    result[info["name"]] = pyro.sample(
                        info["name"], dist.Delta(values[info["name"]], event_dim=info["event_dim"])
                    )
        return result

    # -- diagnostics ----------------------------------------------------------------------
    #: pyro_nf's importance sampling (``diagnose``, ``to_inference_data``,
    #: ``log_marginal_likelihood``) draws from this guide one at a time
    _draws_one_at_a_time = True

    @torch.no_grad()
    def global_log_weights(self, model: Callable, *args, num_samples: int = 1000, **kwargs):
        """Importance log-weights of ``num_samples`` draws of the globals, the locals integrated
        out: :math:`\\log \\hat p(x, g_s) - \\log q(g_s)`, shape ``(num_samples,)``.

        :math:`\\hat p(x \\mid g) = \\prod_i \\frac1M \\sum_m p(x_i, z_{im} \\mid g) /
        q(z_{im} \\mid g, x_i)` with :math:`M` = ``num_local_draws`` draws of the locals from the
        guide; it is unbiased for :math:`p(x \\mid g)`, so these are the weights of a
        pseudo-marginal importance sampler over the globals, and their PSIS :math:`\\hat k`
        (what :func:`pyro_nf.diagnose` reports for this guide) judges :math:`q(g)` with the
        locals integrated out, approaching the exact marginal weights as :math:`M` grows. The
        model must be called on the full data (its local plates not subsampled), and every site
        outside the local plates may depend on the globals only (so that
        :math:`p(x, z \\mid g)` factorizes over the datapoints).
        """
        _checks.integer(num_samples, "num_samples")
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        out = []
        try:
            for _ in range(num_samples):
                self._fixed_globals = None
                total, local_terms = None, []
                for m in range(self.num_local_draws):
                    with poutine.block():
                        gt = poutine.trace(self).get_trace(*args, **kwargs)
                        mt = poutine.trace(poutine.replay(model, trace=gt)).get_trace(
                            *args, **kwargs
                        )
                    if m == 0 and self._globals:
                        self._fixed_globals = gt.nodes[f"_{self._pyro_name}_globals"]["value"]
                    glob, loc = self._split_log_weight(gt, mt)
                    total = glob if total is None else total
                    local_terms.append(loc)
                stacked = torch.stack(local_terms)  # (M, sum of plate sizes)
                lme = torch.logsumexp(stacked, 0) - torch.log(torch.tensor(float(len(stacked))))
                out.append(total + lme.sum())
        finally:
            self._fixed_globals = None
        return torch.stack(out)

    def _split_log_weight(self, gt, mt) -> tuple[Tensor, Tensor]:
        """``(global part, per-datapoint parts)`` of ``log p(x, g, z) - log q(g, z)``."""
        gt.compute_log_prob()
        mt.compute_log_prob()
        frames = self._frames(mt)
        for plate_name in self._locals:
            frame = frames[plate_name]
            if _is_subsampled(frame):
                raise ValueError(
                    f"{type(self).__name__}: diagnostics need the model on the full data, but "
                    f"plate {plate_name!r} is subsampled ({frame.size} of {frame.full_size}) in "
                    "this call; pass the model's arguments that turn subsampling off"
                )
        glob, parts = 0.0, {p: 0.0 for p in self._locals}
        for sign, trace in ((1.0, mt), (-1.0, gt)):
            for site in trace.nodes.values():
                if site["type"] != "sample" or site_is_subsample(site):
                    continue
                local = [f for f in site["cond_indep_stack"] if f.name in self._locals]
                if not local:
                    glob = glob + sign * site["log_prob_sum"]
                    continue
                frame = local[0]
                lp = site["unscaled_log_prob"]
                if site["mask"] is not None:
                    lp = lp * site["mask"]
                if not torch.is_tensor(lp):
                    lp = torch.as_tensor(lp)
                per = _per_datapoint(lp, 0, frame.dim, frame.size).sum(-1)
                parts[frame.name] = parts[frame.name] + sign * per
        return torch.as_tensor(glob), torch.cat([torch.atleast_1d(v) for v in parts.values()])

    # -- state dict -----------------------------------------------------------------------
    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Load a state dict saved by :meth:`state_dict` (after :meth:`setup` or a call)."""
        if self.prototype_trace is None:
            raise RuntimeError(
                f"{type(self).__name__} has no parameters yet: call guide(*args) or "
                "guide.setup(*args) with the model's arguments first"
            )
        return super().load_state_dict(state_dict, strict=strict, assign=assign)
