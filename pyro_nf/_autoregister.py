"""How a :class:`~pyro_nf.Flow` called inside a hand-written guide reaches SVI's optimizer.

``SVI`` (and :func:`pyro_nf.fit`) step the tensors that appear as ``param`` sites while the model
and guide run, so an ``nn.Module``'s parameters train only if something registers them with Pyro
at every step (``pyro.module``, or a :class:`~pyro.nn.PyroModule` holding the module). A flow
called inside a Pyro handler does that itself, through :func:`register_flow`, for every trainable
parameter that is not registered already:

* a parameter that Pyro's param store holds under another name (the user called
  ``pyro.module`` on the flow, or on a module that contains it, or a ``PyroModule`` holds it) is
  left to that registration, so nothing is registered or stepped twice;
* any other parameter is registered as ``pyro.module(flow.name, flow, update_module_params=True)``
  would: under ``"{flow.name}$$${parameter path}"``, a value already in the store winning (a
  restored param store), so that the flow and the optimizer always share the same tensors.

A store entry under the flow's name that holds a parameter of *another* ``Flow`` object (alive or
not) is a name clash, refused with an error that asks for ``name=``: two flows never share
parameters silently. An entry that holds an older tensor of the *same* flow (the flow was moved
with ``.to()`` after a step) is replaced by the flow's current tensor.
"""

from __future__ import annotations

import weakref

import pyro
from pyro.params.param_store import param_with_module_name
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["register_flow"]

#: parameter tensor -> weak reference to the flow that put it into Pyro's param store
_OWNER: WeakIdKeyDictionary = WeakIdKeyDictionary()
#: flow -> (name, where each of its parameters lives), see :func:`_slots`
_SLOTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
#: flow -> (name, the store's dict, [(where, key, tensor, its other name or None if frozen)])
#: when, at the last call, someone else had registered every trainable parameter
_ELSEWHERE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def parameter_slots(flow: nn.Module, name: str) -> list[tuple[str, dict, str]]:
    """``(param-store name, the owning module's _parameters dict, key)`` of every parameter.

    Cached per flow and name (walking the module tree costs more than the rest of the check),
    outside the flow, so that copies of it do not share the cache. The tensors are read from the
    dicts afresh at every call (registration may swap them).
    """
    cached = _SLOTS.get(flow)
    if cached is None or cached[0] != name:
        slots = []
        for mod_name, mod in flow.named_modules():
            for p_name, p in mod._parameters.items():
                if p is None:
                    continue
                full = f"{mod_name}.{p_name}" if mod_name else p_name
                slots.append((param_with_module_name(name, full), mod._parameters, p_name))
        cached = (name, slots)
        _SLOTS[flow] = cached
    return cached[1]


def register_flow(flow: nn.Module, name: str) -> None:
    """Register ``flow``'s trainable parameters with Pyro under ``name``, unless registered.

    Called by ``Flow.forward`` inside an active Pyro handler (the module docs say what it does).
    With ``pyro.settings.set(module_local_params=True)`` nothing is registered: parameters then
    live in the modules, not in the global store.
    """
    if pyro.settings.get("module_local_params"):
        return
    store = pyro.get_param_store()
    held_by_name = store._params
    # The common case inside an autoguide or a registered module, checked cheaply: nothing has
    # changed since the last call found every parameter registered under another name.
    last = _ELSEWHERE.get(flow)
    if last is not None and last[0] == name and last[1] is held_by_name:
        if all(
            params.get(p_name) is p
            and (
                held_by_name.get(other) is p
                if other is not None
                else p is None or not p.requires_grad
            )
            for params, p_name, p, other in last[2]
        ):
            return
    todo, elsewhere = [], []
    for key, params, p_name in parameter_slots(flow, name):
        p = params.get(p_name)
        if p is None or not p.requires_grad:
            elsewhere.append((params, p_name, p, None))
            continue  # frozen: nothing to train, and no warning per call
        other = store.param_name(p)
        if other is not None and other != key and held_by_name.get(other) is p:
            # Registered by someone else (pyro.module on the flow or a module around it). If
            # this flow registered it too, in an earlier step, drop that alias: one name each.
            if held_by_name.get(key) is p:
                del held_by_name[key]
                store._constraints.pop(key, None)
            elsewhere.append((params, p_name, p, other))
            continue
        todo.append((key, params, p_name, p))
    if not todo:
        _ELSEWHERE[flow] = (name, held_by_name, elsewhere)
        return
    _ELSEWHERE.pop(flow, None)
    # Check every entry before changing anything, so an error leaves the flow as it was.
    take, replace = [], []
    for key, params, p_name, p in todo:
        held = held_by_name.get(key)
        if held is None or held is p:
            continue
        owner = _OWNER.get(held)
        if owner is not None and owner() is flow:
            replace.append(key)  # this flow's own older tensor (moved or converted since)
        elif owner is not None:
            raise ValueError(
                f"two Flow objects take the name {name!r} in Pyro's param store ({key!r} holds "
                "another flow's parameter). Give each flow its own name, e.g. "
                f"pyro_nf.Flow(..., name='{name}_z'), or call pyro.clear_param_store() if the "
                "other flow is no longer used"
            )
        elif (held.shape, held.dtype, held.device) != (p.shape, p.dtype, p.device):
            raise ValueError(
                f"Pyro's param store holds {key!r} with shape {tuple(held.shape)} "
                f"({held.dtype}, {held.device}), but this flow's parameter has shape "
                f"{tuple(p.shape)} ({p.dtype}, {p.device}): left over from a flow built "
                "differently? Call pyro.clear_param_store(), give this flow another name=, or "
                "load the param store with the flow's device (map_location=)"
            )
        else:
            take.append((params, p_name, held))  # a restored value: the store wins
    for key in replace:
        del store[key]
    for params, p_name, held in take:
        params[p_name] = held
    for key, params, p_name, _ in todo:
        p = params[p_name]
        pyro.param(key, p)  # the param site SVI collects; adds p to the store if absent
        if _OWNER.get(p) is None:
            _OWNER[p] = weakref.ref(flow)
