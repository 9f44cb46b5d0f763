"""Whether a model still has the latent sites a flow autoguide was set up with.

A flow autoguide lays the model's latent sites out in one vector when it is set up (its first
call, ``guide.setup(...)``, or the first evaluation of a fit), and that layout is fixed from then
on. Run with other arguments, the same model can have other latents: a local latent in a plate
over the data changes shape with the data, a branch adds or drops a site. ``FastELBO`` fails on
such a mismatch; ``Trace_ELBO`` does worse and runs: it broadcasts the guide's values of the old
shape against the new data, or draws a new site from its prior, and so optimizes something that is
not the ELBO of the model at hand. :func:`pyro_nf.fit` therefore checks before its first step.
"""

from __future__ import annotations

from collections.abc import Callable

import pyro.poutine as poutine
from pyro.infer.autoguide.guides import prototype_hide_fn
from pyro.infer.autoguide.initialization import InitMessenger
from torch.distributions import constraints

Site = tuple[str, tuple[int, ...], str]  # name, shape, support


def support_name(constraint: constraints.Constraint) -> str:
    """A short, stable name of a support (``"Real"``, ``"GreaterThan"``, ``"Simplex"``...)."""
    while isinstance(constraint, constraints.independent):
        constraint = constraint.base_constraint
    return type(constraint).__name__.lstrip("_")


def latent_sites(trace) -> list[Site]:
    """``(name, shape, support)`` of each latent (unobserved sample) site of ``trace``, in order.

    The shape is the site's distribution's (batch and event shape, plates included): the shape
    the model expects of the site's value.
    """
    return [
        (name, tuple(site["fn"].shape()), support_name(site["fn"].support))
        for name, site in trace.iter_stochastic_nodes()
    ]


def describe_differences(
    a: list[Site], b: list[Site], a_name: str, b_name: str, ordered: bool = True
) -> list[str]:
    """The differences between two lists of latent sites, in words (empty when they agree)."""
    a_sites = {name: rest for name, *rest in a}
    b_sites = {name: rest for name, *rest in b}
    out = [f"site {n!r} is in {a_name} but not in {b_name}" for n in a_sites if n not in b_sites]
    out += [f"site {n!r} is in {b_name} but not in {a_name}" for n in b_sites if n not in a_sites]
    for name, (a_shape, a_support) in a_sites.items():
        if name not in b_sites:
            continue
        b_shape, b_support = b_sites[name]
        if a_shape != b_shape:
            out.append(f"site {name!r} has shape {a_shape} in {a_name}, {b_shape} in {b_name}")
        if a_support != b_support:
            out.append(
                f"site {name!r} has support {a_support} in {a_name}, {b_support} in {b_name}"
            )
    if not out and ordered and list(a_sites) != list(b_sites):
        out.append(
            f"the sites come in another order ({', '.join(a_sites)} in {a_name}; "
            f"{', '.join(b_sites)} in {b_name})"
        )
    return out


def check_unchanged(model: Callable, guide, args: tuple, kwargs: dict) -> None:
    """Refuse to fit a set-up flow autoguide to a model whose latents are no longer the ones the
    guide was set up with (other sites, shapes or supports), with an error naming them.

    Runs the model once with these arguments, each latent at the guide's set-up value where its
    shape is unchanged (so a model that ran at set-up runs here too), else at
    :func:`~pyro_nf.init_to_median_or_feasible`'s. The random-number states are restored
    afterwards, so a seeded fit draws the same numbers with or without this check. Does nothing
    for other guides and for guides not set up yet (the fit sets them up with its arguments).
    """
    from ._checkpoint import rng_state, set_rng_state
    from .guides import AutoFlow, init_to_median_or_feasible

    if not isinstance(guide, AutoFlow) or guide.prototype_trace is None:
        return
    at_setup = dict(guide.prototype_trace.iter_stochastic_nodes())
    changed = []

    def init(site: dict):
        old = at_setup.get(site["name"])
        if old is not None and old["fn"].shape() == site["fn"].shape():
            return old["value"]
        changed.append(site["name"])
        return init_to_median_or_feasible(site)

    hidden = poutine.block(InitMessenger(init)(model), hide_fn=prototype_hide_fn)
    traced = poutine.trace(hidden)
    state = rng_state()
    failure = None
    try:
        poutine.block(traced.get_trace)(*args, **kwargs)
    except Exception as e:
        if not changed:  # the model's own error, with these arguments: the fit would meet it too
            raise
        failure = e
    finally:
        set_rng_state(state)
    now = latent_sites(traced.msngr.trace)
    before = latent_sites(guide.prototype_trace)
    if failure is not None:  # sites after the failure were not reached: compare the others
        reached = {name for name, *_ in now}
        before = [site for site in before if site[0] in reached]
    name = type(guide).__name__
    differences = describe_differences(
        before, now, f"the {name}'s set-up", "the model run with these arguments", ordered=False
    )
    if differences:
        raise ValueError(
            f"{name} was set up for other latent variables than the model has with these "
            "arguments: " + "; ".join(differences) + ". A flow autoguide's latent vector is "
            "fixed when it is set up (by its first call, guide.setup(...) or an earlier fit); "
            f"build a new {name} for these arguments and fit that one"
        ) from failure
    if failure is not None:
        raise failure
