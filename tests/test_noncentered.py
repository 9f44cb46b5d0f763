"""``noncentered=True``: hierarchical Normal sites non-centred inside the flow autoguides.

The centred eight schools (Rubin 1981) is the funnel of the posteriordb benchmark. With the same
flow parameters and the same random numbers, the non-centring guide on the centred model must give
exactly what the plain guide gives on the non-centred model: the importance weights of a
reparameterization do not change.
"""

from __future__ import annotations

import math
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Predictive, Trace_ELBO

import pyro_nf
from pyro_nf import AutoIAFFlow, AutoPlanarFlow, FastELBO

F64 = torch.float64
Y = torch.tensor([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0], dtype=F64)
SIGMA = torch.tensor([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0], dtype=F64)


def centred(y, sigma):
    mu = pyro.sample("mu", dist.Normal(torch.zeros((), dtype=F64), 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(torch.full((), 5.0, dtype=F64)))
    with pyro.plate("schools", y.shape[-1]):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        pyro.sample("y", dist.Normal(theta, sigma), obs=y)


def noncentred(y, sigma):
    """The same posterior in (mu, tau, eta); eta keeps the name "theta" so the layouts agree."""
    mu = pyro.sample("mu", dist.Normal(torch.zeros((), dtype=F64), 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(torch.full((), 5.0, dtype=F64)))
    with pyro.plate("schools", y.shape[-1]):
        eta = pyro.sample("theta", dist.Normal(torch.zeros((), dtype=F64), 1.0))
        pyro.sample("y", dist.Normal(mu + tau * eta, sigma), obs=y)


def pair(cls=AutoIAFFlow, **kwargs):
    """A non-centring guide on the centred model and a plain one on the non-centred model, with
    the same flow parameters (the plain start, so that no Laplace search differs between them)."""
    kwargs.setdefault("precondition", None)
    pyro.clear_param_store()
    nc = cls(centred, noncentered=True, **kwargs).setup(Y, SIGMA)
    plain = cls(noncentred, **kwargs).setup(Y, SIGMA)
    with torch.no_grad():
        for p in nc.flow.parameters():  # away from the identity start
            p.add_(0.1 * torch.randn(p.shape, dtype=p.dtype))
    plain.flow.load_state_dict(nc.flow.state_dict())
    return nc, plain


@pytest.fixture(autouse=True)
def _fresh_store():
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()


def test_finds_the_hierarchical_site():
    guide = AutoIAFFlow(centred, noncentered=True).setup(Y, SIGMA)
    assert guide.noncentering.sites == {"theta"}
    assert guide.noncentering.nesting == 1  # the schools plate
    assert all(p.dtype == F64 for p in guide.parameters())


@pytest.mark.parametrize("batch", [(), (3,), (2, 3)], ids=str)
def test_the_map_is_exact(batch):
    guide = AutoIAFFlow(centred, noncentered=True).setup(Y, SIGMA)
    t = guide.noncentering
    torch.manual_seed(0)
    v = torch.randn(*batch, guide.latent_dim, dtype=F64)
    x, ladj = t.call_and_ladj(v)
    assert x.shape == v.shape and ladj.shape == batch
    v_back, ladj_back = t.inverse_and_ladj(x)
    torch.testing.assert_close(v_back, v, rtol=0, atol=1e-12)
    torch.testing.assert_close(ladj_back, ladj, rtol=0, atol=1e-12)
    # theta = mu + tau * v_theta, the rest unchanged: log-det = 8 log tau (tau = exp of v[1])
    torch.testing.assert_close(x[..., :2], v[..., :2])
    torch.testing.assert_close(x[..., 2:], v[..., :1] + v[..., 1:2].exp() * v[..., 2:])
    torch.testing.assert_close(ladj, 8 * v[..., 1])
    one = v.reshape(-1, guide.latent_dim)[0]
    jac = torch.autograd.functional.jacobian(t, one)
    torch.testing.assert_close(t.call_and_ladj(one)[1], torch.linalg.slogdet(jac)[1])


def test_same_density_as_the_plain_guide_on_the_noncentred_model():
    nc, plain = pair()
    torch.manual_seed(1)
    v = torch.randn(50, nc.latent_dim, dtype=F64)
    x, ladj = nc.noncentering.call_and_ladj(v)
    # q_centred(x) = q_noncentred(v) / |det dx/dv|, scored through every inverse
    torch.testing.assert_close(
        nc.get_posterior().log_prob(x), plain.get_posterior().log_prob(v) - ladj
    )
    # and the log density of the model, pulled back, is the non-centred model's
    lj_nc, lj_plain = nc._log_joint_fn((Y, SIGMA), {}), plain._log_joint_fn((Y, SIGMA), {})
    for i in range(3):
        torch.testing.assert_close(lj_nc(x[i]) + ladj[i], lj_plain(v[i]))


@pytest.mark.parametrize("num_particles", [1, 4])
@pytest.mark.parametrize("loss", ["FastELBO", "Trace_ELBO"])
def test_same_elbo_as_the_plain_guide_on_the_noncentred_model(loss, num_particles):
    nc, plain = pair()
    values = []
    for model, guide in ((centred, nc), (noncentred, plain)):
        if loss == "FastELBO":
            elbo = FastELBO(num_particles=num_particles)
        else:
            elbo = Trace_ELBO(
                num_particles=num_particles, vectorize_particles=True, max_plate_nesting=1
            )
        pyro.set_rng_seed(3)
        values.append(elbo.differentiable_loss(model, guide, Y, SIGMA))
    torch.testing.assert_close(values[0], values[1], rtol=1e-10, atol=1e-9)


def test_gradients_match_the_plain_guide_on_the_noncentred_model():
    nc, plain = pair(AutoPlanarFlow, num_transforms=3)
    grads = []
    for model, guide in ((centred, nc), (noncentred, plain)):
        pyro.set_rng_seed(5)
        loss = FastELBO(num_particles=2).differentiable_loss(model, guide, Y, SIGMA)
        # (the two guides share Pyro's param store names, hence possibly tensors)
        grads.append(torch.autograd.grad(loss, list(guide.flow.parameters())))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_laplace_start_exists_in_noncentred_coordinates():
    """The centred funnel has no mode (the Laplace start falls back); the non-centred one has."""
    with pytest.warns(UserWarning, match="not positive definite|no mode|starting without"):
        plain = AutoIAFFlow(centred, precondition="laplace").setup(Y, SIGMA)
    assert not plain.laplace_info["used"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        guide = AutoIAFFlow(centred, precondition="laplace", noncentered=True).setup(Y, SIGMA)
    assert guide.laplace_info["used"], guide.laplace_info
    # the untrained guide's draws are the Laplace approximation pushed through the map: every
    # theta sits near mu, at a distance of the order of tau
    draws = Predictive(centred, guide=guide, num_samples=2000, return_sites=["mu", "tau", "theta"])(
        Y, SIGMA
    )
    z = (draws["theta"] - draws["mu"]) / draws["tau"]  # mu, tau: (2000, 1), theta (2000, 8)
    assert z.shape == (2000, 8) and z.dtype == F64
    assert abs(z.mean().item()) < 0.5 and 0.3 < z.std().item() < 1.5


def test_fit_predictive_and_state_dict():
    pyro.set_rng_seed(0)
    guide = AutoIAFFlow(centred, noncentered=True)
    result = pyro_nf.fit(centred, guide, Y, SIGMA, num_steps=200, lr=0.01, progress=False)
    assert math.isfinite(result.final_loss)
    draws = Predictive(centred, guide=guide, num_samples=7)(Y, SIGMA)
    assert draws["theta"].shape == (7, 8) and (draws["tau"] > 0).all()
    x = guide.get_posterior().sample((5,))
    fresh = AutoIAFFlow(centred, noncentered=True).setup(Y, SIGMA)
    fresh.load_state_dict(guide.state_dict())
    torch.testing.assert_close(fresh.get_posterior().log_prob(x), guide.get_posterior().log_prob(x))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*did not vectorize.*")  # no slow fallback
        d = pyro_nf.diagnose(centred, guide, Y, SIGMA, num_samples=200)
        idata = pyro_nf.to_inference_data(centred, guide, Y, SIGMA, num_samples=50)
    assert math.isfinite(d.elbo) and math.isfinite(d.k_hat)
    assert idata.posterior["theta"].shape == (2, 25, 8)


@pytest.mark.parametrize(
    "options",
    [{"noncentered": True}, {"noncentered": True, "precondition": "laplace"}, {}],
    ids=["noncentered", "noncentered+laplace", "plain"],
)
@pytest.mark.parametrize("guide_class", [AutoIAFFlow, AutoPlanarFlow])
def test_first_call_inside_plain_svi(guide_class, options):
    """A fresh guide set up by plain ``SVI``'s first step: the set-up runs inside SVI's trace of
    the guide, whose record must not get the model's sites. (The non-centring set-up traced the
    model unblocked and failed with "Multiple sample sites named 'mu'".)"""
    pyro.set_rng_seed(0)
    guide = guide_class(centred, **options)
    svi = pyro.infer.SVI(centred, guide, pyro.optim.Adam({"lr": 0.01}), Trace_ELBO())
    losses = [svi.step(Y, SIGMA) for _ in range(3)]
    assert all(math.isfinite(v) for v in losses)
    assert (guide.noncentering is not None) == bool(options.get("noncentered"))
    trace = pyro.poutine.trace(guide).get_trace(Y, SIGMA)
    assert "y" not in trace.nodes  # the guide's record holds no model site
    assert trace.nodes["theta"]["value"].shape == (8,) and trace.nodes["tau"]["value"] > 0


def test_model_without_hierarchical_sites_warns_and_is_plain():
    def model():
        pyro.sample("a", dist.Normal(torch.zeros(2, dtype=F64), 1.0).to_event(1))
        pyro.sample("b", dist.LogNormal(torch.zeros((), dtype=F64), 1.0))

    with pytest.warns(UserWarning, match="no Normal latent whose location or scale depends"):
        guide = AutoIAFFlow(model, noncentered=True).setup()
    assert guide.noncentering is None and guide.flow.outer_transform is None
    assert guide()["a"].shape == (2,)


def test_noncentered_must_be_a_bool():
    with pytest.raises(TypeError, match="noncentered must be True or False"):
        AutoIAFFlow(centred, noncentered="yes")
