"""FastELBO gives Trace_ELBO's numbers for flow autoguides, without tracing the guide."""

import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormal
from pyro.optim import Adam
from pyro.params.param_store import param_with_module_name

import pyro_nf
from pyro_nf.fast import FastELBO

GUIDES = [
    lambda m: pyro_nf.AutoPlanarFlow(m, 4),
    lambda m: pyro_nf.AutoRadialFlow(m, 4),
    lambda m: pyro_nf.AutoIAFFlow(m, 2),
]
IDS = ["planar", "radial", "iaf"]


def model(y):
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(2.0))
    p = pyro.sample("p", dist.Dirichlet(torch.ones(3)))
    with pyro.plate("groups", 4):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
    with pyro.plate("obs", len(y)):
        # p[..., 0], not p[..., :1]: the latter keeps a dimension left of theta's, which mixed
        # the particles of p and theta (the particle check of FastELBO found it)
        pyro.sample("y", dist.Normal(theta[..., :1] + p[..., 0], 1.0), obs=y)


Y = torch.tensor([0.5, -1.0, 2.0, 1.5, 0.3])


def perturbed(make):
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = make(model)
    guide(Y)
    with torch.no_grad():
        for p in guide.flow.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return guide


@pytest.mark.parametrize("make", GUIDES, ids=IDS)
@pytest.mark.parametrize("num_particles", [1, 4])
def test_same_loss_and_gradients_as_trace_elbo(make, num_particles):
    guide = perturbed(make)
    params = list(guide.flow.parameters())
    ref = Trace_ELBO(num_particles=num_particles, vectorize_particles=True, max_plate_nesting=1)
    pyro.set_rng_seed(5)
    a = ref.differentiable_loss(model, guide, Y)
    grads_a = torch.autograd.grad(a, params)
    pyro.set_rng_seed(5)
    b = FastELBO(num_particles).differentiable_loss(model, guide, Y)
    grads_b = torch.autograd.grad(b, params)
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)
    for ga, gb in zip(grads_a, grads_b):
        assert torch.allclose(ga, gb, rtol=1e-4, atol=1e-5)


def test_svi_with_fast_elbo_reaches_the_same_fit():
    losses = {}
    for name, loss in (
        ("trace", Trace_ELBO(num_particles=4, vectorize_particles=True)),
        ("fast", FastELBO(4)),
    ):
        guide = perturbed(GUIDES[0])
        svi = SVI(model, guide, Adam({"lr": 0.02}), loss)
        loss.loss(model, guide, Y)  # Trace_ELBO's first call draws extra random numbers
        pyro.set_rng_seed(1)
        losses[name] = [svi.step(Y) for _ in range(30)]
    assert losses["trace"] == pytest.approx(losses["fast"], rel=1e-4, abs=1e-4)


def test_refuses_other_guides():
    with pytest.raises(TypeError, match="flow autoguides"):
        FastELBO().differentiable_loss(model, AutoNormal(model), Y)


def test_fit_uses_fast_path_and_falls_back_for_models_that_do_not_vectorize():
    def stubborn(y):  # X @ w with a batched w breaks: cannot broadcast over particles
        w = pyro.sample("w", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        pyro.sample("y", dist.Normal(torch.ones(3, 2) @ w, 1.0).to_event(1), obs=y)

    y = torch.zeros(3)
    pyro.clear_param_store()
    r = pyro_nf.fit(stubborn, pyro_nf.AutoPlanarFlow(stubborn, 2), y, num_steps=5, progress=False)
    assert len(r.losses) == 5  # one particle: the fast path needs no broadcasting
    pyro.clear_param_store()
    with pytest.warns(UserWarning, match="Trace_ELBO"):
        r = pyro_nf.fit(
            stubborn, pyro_nf.AutoPlanarFlow(stubborn, 2), y, num_steps=5, num_particles=3,
            vectorize_particles=True, progress=False,
        )  # fmt: skip
    assert torch.isfinite(torch.tensor(r.losses)).all()
    with pytest.raises(ValueError, match="flow autoguide"):
        pyro_nf.fit(stubborn, AutoNormal(stubborn), y, num_steps=2, fast=True, progress=False)


@pytest.mark.slow
def test_compiled_sample_and_score_matches_eager():
    guide = perturbed(GUIDES[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = FastELBO(4, compile=True)
        pyro.set_rng_seed(2)
        a = compiled.differentiable_loss(model, guide, Y)  # compiles (or falls back) here
    pyro.set_rng_seed(2)
    compiled_again = compiled.differentiable_loss(model, guide, Y)
    pyro.set_rng_seed(2)
    eager = FastELBO(4).differentiable_loss(model, guide, Y)
    assert torch.isfinite(a)
    assert torch.allclose(compiled_again, eager, rtol=1e-5, atol=1e-5)


def test_sticking_the_landing_gradients_vanish_at_the_exact_posterior():
    """With q equal to the posterior, STL gradients are zero for every draw; plain ones are not."""

    def conjugate():
        x = pyro.sample("x", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        pyro.sample("y", dist.Normal(x, 1.0).to_event(1), obs=torch.tensor([1.0, -2.0]))

    guide = pyro_nf.AutoPlanarFlow(conjugate, 3, precondition=None).setup()
    # exact posterior N(y/2, 1/2) set by hand (no preconditioner); planar layers stay at the identity
    guide.flow.set_base(torch.tensor([0.5, -1.0]), 0.5**0.5)
    params = [p for p in guide.flow.parameters()]
    pyro.set_rng_seed(3)
    plain = FastELBO(4).differentiable_loss(conjugate, guide)
    pyro.set_rng_seed(3)
    stl = FastELBO(4, stl=True).differentiable_loss(conjugate, guide)
    assert torch.allclose(plain, stl, atol=1e-5)  # same loss value
    g_plain = torch.autograd.grad(plain, params, allow_unused=True)
    g_stl = torch.autograd.grad(stl, params, allow_unused=True)
    assert max(g.abs().max() for g in g_plain if g is not None) > 1e-2
    assert all(g is None or g.abs().max() < 1e-5 for g in g_stl)


# ---------------------------------------------------------------------------------------------
# The flow's registration with Pyro's param store is skipped only when it would change nothing.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make", GUIDES, ids=IDS)
def test_fast_steps_pick_up_a_restored_param_store(make, tmp_path):
    pyro.clear_param_store()
    guide = make(model)
    pyro_nf.fit(model, guide, Y, num_steps=20, progress=False, seed=0)
    points = torch.randn(8, guide.latent_dim)
    with torch.no_grad():
        saved = guide.get_posterior().log_prob(points)
    path = tmp_path / "store.pt"
    pyro.get_param_store().save(path)
    pyro_nf.fit(model, guide, Y, num_steps=20, progress=False, seed=1)
    with torch.no_grad():
        assert not torch.allclose(guide.get_posterior().log_prob(points), saved)
    pyro.get_param_store().load(path)  # new tensors under the same names
    FastELBO().differentiable_loss(model, guide, Y)  # no Pyro handler active: the fast path
    with torch.no_grad():
        torch.testing.assert_close(guide.get_posterior().log_prob(points), saved)
    in_store = {id(p) for _, p in pyro.get_param_store().named_parameters()}
    assert all(id(p) in in_store for p in guide.flow.parameters())


@pytest.mark.parametrize("make", GUIDES, ids=IDS)
def test_every_flow_parameter_reaches_pyro_handlers_at_every_step(make):
    pyro.clear_param_store()
    guide = make(model).setup(Y)
    loss = FastELBO()
    for _ in range(2):  # the second time the store already holds every tensor
        with pyro.poutine.trace(param_only=True) as capture:
            loss.differentiable_loss(model, guide, Y)
        name = guide._flow_param_prefix()  # "<guide>.flow[<sites>|<digest>]"
        expected = {param_with_module_name(name, n) for n, _ in guide.flow.named_parameters()}
        assert expected <= set(capture.trace.nodes)


def _mixes_particles(y):  # runs with vectorized particles, but pairs particle i with datum i
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Normal(mu.reshape(-1), 1.0), obs=y)


def _subsampled(y):  # broadcasts correctly; the plate draws its own random subsample
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    with pyro.plate("data", len(y), subsample_size=3) as idx:
        pyro.sample("y", dist.Normal(mu, 1.0), obs=y[idx])


def test_a_model_that_mixes_particles_is_refused_not_summed_into_a_wrong_loss():
    """With 4 particles and 4 data the shapes all match, so nothing fails: only comparing each
    particle with the model run on it alone shows the loss is wrong."""
    y = torch.arange(4.0)
    pyro.clear_param_store()
    guide = pyro_nf.AutoPlanarFlow(_mixes_particles)
    with pytest.raises(ValueError, match="does not broadcast over the particle plate: with 4"):
        FastELBO(4).loss(_mixes_particles, guide, y)
    assert FastELBO(1).loss(_mixes_particles, guide, y) > 0  # one particle: nothing to mix


def test_fit_evaluates_particles_one_at_a_time_for_a_model_that_mixes_them():
    y = torch.arange(4.0)
    pyro.clear_param_store()
    guide = pyro_nf.AutoPlanarFlow(_mixes_particles)
    with pytest.warns(UserWarning, match="does not broadcast over the particle plate"):
        r = pyro_nf.fit(_mixes_particles, guide, y, num_steps=3, num_particles=4, progress=False)
    assert len(r.losses) == 3 and torch.isfinite(torch.tensor(r.losses)).all()


@pytest.mark.parametrize("m", [model, _subsampled], ids=["plates", "random_subsample"])
def test_the_particle_check_changes_no_number(m):
    """The check runs at the first evaluation for each guide and restores every random-number
    state, so a seeded run gives the same losses with it and without it (here: a second ELBO
    object whose check is marked done), also for a model that draws its own subsample."""
    y = torch.arange(7.0)[: len(Y)] if m is model else torch.arange(7.0)

    def losses(skip_check):
        pyro.clear_param_store()
        pyro.set_rng_seed(3)
        guide = pyro_nf.AutoIAFFlow(m, 2)
        guide(y)
        elbo = FastELBO(4)
        if skip_check:
            elbo._particles_checked.add(id(guide))
        return [elbo.loss(m, guide, y) for _ in range(3)]

    assert losses(skip_check=False) == losses(skip_check=True)
