"""The flow autoguides' parameters in Pyro's param store: the same tensors as the flow's, under
names derived from the model's latent sites and the flow's architecture."""

from __future__ import annotations

import hashlib
import json

import pyro
from pyro.poutine.runtime import _PYRO_STACK
from torch import Tensor

from ._autoregister import parameter_slots
from .flow import Flow

#: site names longer than this (joined) are abbreviated in the param-store names
_READABLE_SITES = 40


class FlowParams:
    """Mixin of :class:`~pyro_nf.AutoFlow`: the flow's parameters, registered with Pyro."""

    def __getattr__(self, name: str):
        # PyroModule would register ``self.flow`` under "<guide>.flow" whenever it is read inside
        # the guide's Pyro context; the flow's parameters live under the names of
        # _flow_param_prefix instead, so reads go through _synced_flow.
        if name == "flow" and "flow" in self.__dict__.get("_modules", {}):
            return self._synced_flow()
        return super().__getattr__(name)

    def registered_flow(self) -> Flow:
        """The flow, its parameters registered with Pyro's param store as inside a call of the
        guide (an ELBO that samples the flow without calling the guide, such as
        :class:`~pyro_nf.fast.FastELBO`, uses this)."""
        with self._pyro_context:
            return self._synced_flow()

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
                for key, params, p_name in parameter_slots(flow, self._flow_param_prefix())
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
            "precondition": self._options.precondition,
            "noncentered": self._options.noncentered,
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


def _holds(store, keys: list[tuple[str, Tensor]]) -> bool:
    """Whether Pyro's param store holds exactly these tensors under these names."""
    params = getattr(store, "_params", None)
    return params is not None and all(params.get(key) is p for key, p in keys)
