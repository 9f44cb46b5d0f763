"""Set-up of the flow autoguides (``guide(*args)`` or ``guide.setup(*args)``): one run of the
model, its latent layout, the flow built at ``init_loc_fn``'s point, and the model-facing helpers
the other parts of :class:`~pyro_nf.AutoFlow` share."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import pyro
import torch
from pyro import poutine
from pyro.distributions.util import sum_rightmost
from pyro.infer.autoguide import AutoGuide
from pyro.infer.autoguide.utils import helpful_support_errors
from torch import Tensor
from torch.distributions import biject_to

from ._devices import model_device, site_values
from .flow import Flow


@contextlib.contextmanager
def _fixed_random_start():
    """Run the block (the prototype trace and ``init_loc_fn``) on the CPU random generator seeded
    with 0, then give the generator back as it was.

    The Laplace start searches for the mode from ``init_loc_fn``'s (random) point and ends within
    the search's tolerance of it; from a fixed point, a guide set up again (restored from Pyro's
    param store, which holds the parameters but not the preconditioner) finds the very same
    preconditioner on the same machine, so the restored posterior is the saved one. Where the
    search finds no mode, set-up starts again from the user's random state, as without the
    Laplace start.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        yield


def subsampled_frame(site: dict):
    """The first subsampled plate (``subsample_size`` below the full size) a site sits in."""
    for frame in site["cond_indep_stack"]:
        if frame.full_size is not None and frame.full_size != frame.size:
            return frame
    return None


class GuideSetup:
    """Mixin of :class:`~pyro_nf.AutoFlow`: building the flow from one run of the model."""

    # -- the set-up, all or nothing -------------------------------------------------------
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
        self.__dict__.pop("_flow_prefix_cache", None)
        if "flow" in self._modules:
            del self._modules["flow"]
        self.noncentering = None
        self.laplace_info = None

    def _build_from_prototype(self, args: tuple, kwargs: dict) -> None:
        flow = None
        if self._options.precondition in ("laplace", "auto"):
            with _fixed_random_start():  # the search's start: the same at every set-up
                flow, loc = self._start(args, kwargs)
            self._laplace_start(flow, loc, args, kwargs, auto=self._options.precondition == "auto")
        if flow is None or not self.laplace_info["used"]:  # the plain start, from the user's RNG
            info = self.laplace_info
            flow, _ = self._start(args, kwargs)
            self.laplace_info = info
        flow.outer_transform = self.noncentering
        self.flow = flow
        # the name a Flow called inside a Pyro handler registers itself under: the guide's own
        # (the default "flow" would clash with a user's flow of that name)
        with self._pyro_context:  # (where the guide's full name is defined)
            flow.name = self._flow_param_prefix()

    def _start(self, args: tuple, kwargs: dict) -> tuple[Flow, Tensor]:
        """Trace the model at ``init_loc_fn``'s point; a flow starting there, and the point."""
        AutoGuide._setup_prototype(self, *args, **kwargs)
        self._check_model()
        self._read_latent_layout()
        loc = self._init_loc(self._model_device(args, kwargs))
        self.noncentering = None
        if self._options.noncentered:
            loc = self._noncentering_start(loc, args, kwargs)
        return self._new_flow(loc), loc

    def _read_latent_layout(self) -> None:
        """Each latent site's unconstrained shape and plates, and the latent vector's size."""
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

    def _model_device(self, args: tuple, kwargs: dict) -> torch.device:
        latents = site_values(self.prototype_trace, observed=False)
        observed = site_values(self._trace_at_prototype(args, kwargs), True, exclude=latents)
        return model_device(type(self).__name__, observed, args, kwargs, latents)

    def _new_flow(self, loc: Tensor) -> Flow:
        """The flow in ``loc``'s dtype and device, its base at ``loc`` with ``init_scale``."""
        transform, num_transforms, flow_kwargs = self._flow_args
        init_scale = self._options.init_scale
        # Built on the CPU whatever torch's default device, then moved to the model's device and
        # dtype (a flow built under a meta or CUDA default device would need moving anyway).
        with torch.device("cpu"):
            flow = Flow(
                self.latent_dim, transform, num_transforms, init_scale=init_scale, **flow_kwargs
            )
        # Parameters follow the model's values, not torch's defaults; the base is set after the
        # move, so it is exact in the model's dtype, whatever torch's default dtype.
        return flow.to(device=loc.device, dtype=loc.dtype).set_base(loc, init_scale)

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
            frame = subsampled_frame(site)
            if frame is not None:
                raise ValueError(
                    f"{name} cannot guide site {site_name!r}: it is a local latent inside the "
                    f"subsampled plate {frame.name!r} (size {frame.full_size}, subsample "
                    f"{frame.size}), and a flattening guide would see a different latent "
                    "vector at every step. Use pyro_nf.AutoHierarchicalFlow (a flow over the "
                    "globals, amortized conditional flows over the locals; see "
                    "docs/hierarchical.rst), AutoNormal, an amortized "
                    "pyro_nf.Flow(dim, context_dim=H) in a hand-written guide, or drop "
                    "subsample_size."
                )

    def _require_setup(self) -> None:
        if self.prototype_trace is None:
            raise RuntimeError(
                f"{type(self).__name__} has no parameters yet: call guide(*args) or "
                "guide.setup(*args) with the model's arguments first"
            )

    def _create_plates(self, *args, **kwargs) -> dict:
        """Pyro's plates for the model's frames, with their indices on the flow's device.

        (Pyro builds them on torch's default device; a guide on CUDA would then put CPU index
        tensors in its trace, which break code that sums over every site.) A user's
        ``create_plates`` and a guide inside an ``AutoGuideList`` keep Pyro's plates.
        """
        if self.master is not None or self.create_plates is not None or "flow" not in self._modules:
            return super()._create_plates(*args, **kwargs)
        device = self._modules["flow"].base_loc_scale()[0].device
        self.plates = {
            name: pyro.plate(
                name, frame.full_size or frame.size, dim=frame.dim, subsample_size=frame.size,
                device=device,
            )
            for name, frame in sorted(self._prototype_frames.items())
        }  # fmt: skip
        return self.plates

    # -- the model and the latent vector (shared with FastELBO and the non-centring map) --
    @property
    def user_model(self) -> Callable:
        """The model as it was given (``self.model`` also runs ``init_loc_fn`` at every site whose
        value is not set yet); for runs with every latent given."""
        return self._raw_model[0]

    def _trace_at_prototype(self, args: tuple, kwargs: dict, model: Callable | None = None):
        """A trace of the whole model at the prototype's latent values (the prototype trace
        itself hides the observed sites)."""
        latents = {
            name: site["value"] for name, site in self.prototype_trace.iter_stochastic_nodes()
        }
        with torch.no_grad(), poutine.block():
            return poutine.trace(
                poutine.condition(model or self.user_model, data=latents)
            ).get_trace(*args, **kwargs)

    def plate_nesting(self, args: tuple, kwargs: dict, model: Callable | None = None) -> int:
        """The model's plate nesting, observed sites included (``model`` instead of the guide's
        own, e.g. the one an ELBO was given)."""
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

    def unpack_latent(self, latent: Tensor) -> dict[str, Tensor]:
        """Each site's block of the unconstrained latent vector, shaped as the site (with any
        batch of latent vectors on the left), in the model's order."""
        return {site["name"]: value for site, value in self._unpack_latent(latent)}

    def constrain_with_log_jacobian(self, latent: Tensor) -> tuple[dict[str, Tensor], Tensor]:
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
