"""The model-structured bijection behind ``noncentered=True`` of the flow autoguides.

A hierarchical Normal site :math:`x_s \\sim \\mathcal N(\\mu_s(x_{pa}), \\sigma_s(x_{pa}))`, whose
location or scale depends on other latents, gets the coordinate
:math:`x_s = \\mu_s(x_{pa}) + \\sigma_s(x_{pa})\\,v_s`: the flow models :math:`v_s`, the
non-centred parameterization (Papaspiliopoulos et al. 2007), and this transform maps it back to
the model's centred value, site by site in the model's order. It is triangular (each
:math:`\\mu_s, \\sigma_s` depends on earlier sites only), so its log-det is
:math:`\\sum_s \\sum \\log\\sigma_s`, and its inverse is exact. The same map that Pyro's
``LocScaleReparam(centered=0)`` applies to the model, applied inside the guide, so the model is
unchanged: a funnel in the model's coordinates is, for the flow, the well-conditioned non-centred
posterior.

Both directions run the model once (blocked, its latents set, stopped after the last latent):
:math:`\\mu_s, \\sigma_s` are the ``mean`` and ``stddev`` of the distribution the model builds at
site :math:`s` from the values already set. :class:`NonCenteringStart` is the part of
:class:`~pyro_nf.AutoFlow` that builds the map.
"""

from __future__ import annotations

import math
import warnings

import torch
from pyro import poutine
from pyro.poutine.messenger import Messenger
from torch import Tensor
from torch.distributions import Independent, Normal, biject_to

from .transforms.base import FlowTransform

__all__ = ["NonCenteringStart", "NonCenteringTransform", "hierarchical_normal_sites"]


def _unwrap(fn):
    while isinstance(fn, Independent) or type(fn).__name__ == "ExpandedDistribution":
        fn = fn.base_dist
    return fn


def hierarchical_normal_sites(guide, args: tuple, kwargs: dict) -> list[str]:
    """Latent sites of ``guide``'s model with a Normal prior whose loc or scale depends on other
    latents (from :func:`pyro.infer.inspect.get_dependencies`), in the model's order."""
    from pyro.infer.inspect import get_dependencies

    latents = [name for name, _ in guide.prototype_trace.iter_stochastic_nodes()]
    # blocked: set-up may run inside the caller's trace of the guide (plain SVI's first step),
    # which must not record the model's sites
    with poutine.block():
        deps = get_dependencies(guide.model, args, kwargs)["prior_dependencies"]
    found = []
    for name, site in guide.prototype_trace.iter_stochastic_nodes():
        if not isinstance(_unwrap(site["fn"]), Normal):
            continue
        parents = set(deps.get(name, {})) - {name}
        if parents & set(latents):
            found.append(name)
    return found


class _Stop(Exception):
    pass


class _SetLatents(Messenger):
    """Sets each latent of the model from an unconstrained (non-centred) block, in order."""

    def __init__(self, blocks: dict, sites: set, supports: dict, inverse: bool, last: str) -> None:
        super().__init__()
        self.blocks, self.sites, self.supports = blocks, sites, supports
        self.inverse, self.last = inverse, last
        self.out: dict[str, Tensor] = {}
        self.log_scale: dict[str, Tensor] = {}

    def _pyro_sample(self, msg) -> None:
        name = msg["name"]
        if name not in self.blocks or msg["is_observed"]:
            return
        block = self.blocks[name]
        if name in self.sites:
            fn = msg["fn"]
            loc, scale = fn.mean, fn.stddev
            if self.inverse:  # block is the centred value x; out is v = (x - loc) / scale
                value = block
                self.out[name] = (block - loc) / scale
            else:  # block is v; out is x = loc + scale v
                value = loc + scale * block
                self.out[name] = value
            self.log_scale[name] = torch.log(scale).expand(self.out[name].shape)
        else:
            value = biject_to(self.supports[name])(block)  # as the guide constrains it
            self.out[name] = block
        msg["value"] = value
        msg["is_observed"] = True
        msg["done"] = True

    def _pyro_post_sample(self, msg) -> None:
        if msg["name"] == self.last:  # the rest of the model (the likelihood) is not needed
            raise _Stop


class NonCenteringTransform(FlowTransform):
    """:math:`v \\mapsto x`: each hierarchical Normal site :math:`x_s = \\mu_s + \\sigma_s v_s`.

    Args:
        guide: the set-up flow autoguide whose latent layout (site order and shapes) is used.
        sites: names of the sites to non-centre (the others pass through unchanged).
        nesting: the model's plate nesting (the batch of latents runs in a plate left of it).
        get_args: returns the ``(args, kwargs)`` to run the model with.
    """

    def __init__(self, guide, sites, nesting: int, get_args) -> None:
        super().__init__()
        self.guide = guide
        self.sites = set(sites)
        self.nesting = int(nesting)
        self.get_args = get_args
        self.sizes = {name: math.prod(shape) for name, shape in guide.record()["sites"]}
        self.order = list(self.sizes)
        self.supports = {
            name: site["fn"].support for name, site in guide.prototype_trace.iter_stochastic_nodes()
        }

    def _run(self, x: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        batch = x.shape[:-1]
        n = int(torch.Size(batch).numel())
        lat = x if not batch else x.reshape((n,) + (1,) * self.nesting + x.shape[-1:])
        blocks = self.guide.unpack_latent(lat)
        setter = _SetLatents(blocks, self.sites, self.supports, inverse, self.order[-1])
        args, kwargs = self.get_args()
        # The batch sits left of the model's plates and broadcasts through them, with no plate of
        # its own: the caller may hold that dim already (a particle plate around the guide).
        try:
            with poutine.block(), setter:
                self.guide.user_model(*args, **kwargs)
        except _Stop:
            pass
        missing = [name for name in self.order if name not in setter.out]
        if missing:
            raise RuntimeError(
                f"noncentered=True: the model did not reach site(s) {missing} when run with the "
                "guide's values; a model whose latent sites change between runs cannot be "
                "non-centred"
            )
        lead = (n,) if batch else ()
        parts, ladj = [], x.new_zeros(lead)
        for name in self.order:
            size = self.sizes[name]
            out = setter.out[name]
            if out.numel() != max(n, 1) * size:
                raise RuntimeError(
                    f"noncentered=True: site {name!r} has {out.numel()} values for a batch of "
                    f"{max(n, 1)} latents of size {size}; its location or scale broadcasts "
                    "beyond the site's shape"
                )
            parts.append(out.reshape(lead + (size,)))
            if name in setter.log_scale:
                ladj = ladj + setter.log_scale[name].reshape(lead + (size,)).sum(-1)
        y = torch.cat(parts, -1).reshape(x.shape)
        return y, (ladj.reshape(batch) if batch else ladj)

    def call_and_ladj(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self._run(x, inverse=False)

    def inverse_and_ladj(self, y: Tensor) -> tuple[Tensor, Tensor]:
        return self._run(y, inverse=True)

    def _inverse(self, y: Tensor) -> Tensor:
        return self._run(y, inverse=True)[0]


class NonCenteringStart:
    """Mixin of :class:`~pyro_nf.AutoFlow`: the ``noncentered=True`` map and its arguments."""

    def _noncentering_start(self, loc: Tensor, args: tuple, kwargs: dict) -> Tensor:
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
            self, sites, self.plate_nesting(args, kwargs), lambda: self._model_args
        )
        with torch.no_grad():
            return self.noncentering.inv(loc)

    def remember_args(self, args: tuple, kwargs: dict) -> None:
        """Keep the model arguments of the latest call (with any): the non-centring map runs
        the model with them. Does nothing for a guide without the map."""
        if self.noncentering is not None and (args or kwargs):
            self._model_args = (args, kwargs)
