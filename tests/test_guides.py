"""The flow autoguides (AutoPlanarFlow, AutoRadialFlow, AutoIAFFlow, AutoSplineFlow) in Pyro's inference machinery.

Known answers first: on a conjugate Gaussian model the ELBO must reach the exact log evidence and
the posterior moments must match; an untrained guide must be exactly AutoNormal's starting
distribution. Then the contract: constrained supports, dtype and device following the model,
state_dict round trips, median/quantiles, Predictive and the ELBOs, refusals, render_model,
gradients.
"""

import math
import re

import pyro
import pyro.distributions as dist
import pytest
import torch
from device_params import needs_cuda
from pyro import poutine
from pyro.distributions import constraints
from pyro.distributions.transforms import OrderedTransform
from pyro.infer import SVI, Predictive, RenyiELBO, Trace_ELBO
from pyro.infer.autoguide import AutoNormal, init_to_median
from pyro.infer.importance import vectorized_importance_weights
from pyro.optim import Adam, ClippedAdam
from torch.distributions import biject_to

from pyro_nf import AutoIAFFlow, AutoPlanarFlow, AutoRadialFlow, AutoSplineFlow, Flow
from pyro_nf.transforms.autoregressive import ACTIVATIONS, DEFAULT_ACTIVATION

GUIDES = [AutoPlanarFlow, AutoRadialFlow, AutoIAFFlow, AutoSplineFlow]
# Small flows keep the tests fast; the slow test at the bottom uses the constructors' defaults.
SMALL = {
    AutoPlanarFlow: dict(num_transforms=4),
    AutoRadialFlow: dict(num_transforms=4),
    AutoIAFFlow: dict(num_transforms=2, hidden_dims=(16,)),
    AutoSplineFlow: dict(num_transforms=2, hidden_dims=(16,), num_bins=4),
}
F64 = torch.float64


def _name(cls):
    return cls.__name__


parametrize_guides = pytest.mark.parametrize("cls", GUIDES, ids=_name)


def make_guide(cls, model, **kwargs):
    return cls(model, **{**SMALL[cls], **kwargs})


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------
def regression_model(x, y=None):
    """Bayesian linear regression with a positive noise scale and a deterministic site."""
    w = pyro.sample("w", dist.Normal(x.new_zeros(2), 1.0).to_event(1))
    s = pyro.sample("s", dist.HalfNormal(x.new_ones(())))
    with pyro.plate("data", x.shape[0]):
        mu = pyro.deterministic("mu", (x * w).sum(-1))
        return pyro.sample("y", dist.Normal(mu, s), obs=y)


def regression_data(dtype=torch.float32, device="cpu", n=20):
    g = torch.Generator().manual_seed(123)
    x = torch.randn(n, 2, generator=g, dtype=F64)
    y = x @ torch.tensor([1.0, -2.0], dtype=F64) + 0.5 * torch.randn(n, generator=g, dtype=F64)
    return x.to(dtype=dtype, device=device), y.to(dtype=dtype, device=device)


PRIOR_SD = (0.5, 1.0, 2.0)
NOISE_SD = 1.0
TAU_LOC, TAU_SCALE = 0.5, 0.4


def conjugate_model(y):
    """x ~ N(0, diag(PRIOR_SD^2)), y_n ~ N(x, NOISE_SD^2); tau ~ LogNormal, untouched by the data.

    tau's posterior is its prior, Gaussian in the unconstrained (log) space, so a flow can match the
    whole posterior exactly and the ELBO can reach log p(y); tau also puts a log-Jacobian in the ELBO.
    """
    prior_sd = torch.tensor(PRIOR_SD, dtype=y.dtype, device=y.device)
    x = pyro.sample("x", dist.Normal(torch.zeros_like(prior_sd), prior_sd).to_event(1))
    pyro.sample("tau", dist.LogNormal(y.new_tensor(TAU_LOC), TAU_SCALE))
    with pyro.plate("data", y.shape[0]):
        pyro.sample("y", dist.Normal(x, NOISE_SD).to_event(1), obs=y)


def conjugate_data(n=8):
    g = torch.Generator().manual_seed(2024)
    x_true = torch.tensor([0.3, -1.0, 2.0], dtype=F64)
    return x_true + NOISE_SD * torch.randn(n, 3, generator=g, dtype=F64)


def exact_conjugate_answer(y):
    """Exact posterior mean and sd of x and the log evidence log p(y), in float64."""
    n = y.shape[0]
    prior_var = torch.tensor(PRIOR_SD, dtype=F64) ** 2
    post_prec = 1.0 / prior_var + n / NOISE_SD**2
    post_sd = post_prec.rsqrt()
    post_mean = y.sum(0) / NOISE_SD**2 / post_prec
    # Column d of y is N(0, prior_var[d] * 1 1^T + NOISE_SD^2 I), independently of the others.
    cov = prior_var[:, None, None] * torch.ones(n, n, dtype=F64) + NOISE_SD**2 * torch.eye(
        n, dtype=F64
    )
    log_evidence = dist.MultivariateNormal(torch.zeros(n, dtype=F64), cov).log_prob(y.T).sum()
    # Self-check of the formulas: Bayes' rule log p(y) = log p(y|x) + log p(x) - log p(x|y) at any x.
    x0 = torch.tensor([0.1, 0.2, -0.3], dtype=F64)
    bayes = (
        dist.Normal(x0, NOISE_SD).log_prob(y).sum()
        + dist.Normal(0.0, prior_var.sqrt()).log_prob(x0).sum()
        - dist.Normal(post_mean, post_sd).log_prob(x0).sum()
    )
    assert torch.allclose(bayes, log_evidence, atol=1e-10)
    return post_mean, post_sd, log_evidence


def draw(guide, num, *args, dim=-1):
    """``num`` joint draws of the guide (constrained values), vectorized in a plate at ``dim``."""
    with torch.no_grad(), pyro.plate("_draws", num, dim=dim):
        return guide(*args)


# ---------------------------------------------------------------------------------------------
# 1. Conjugate Gaussian: the ELBO reaches the exact log evidence, the moments match.
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=GUIDES, ids=_name)
def conjugate_fit(request):
    """Each guide fitted to convergence on the conjugate model (float64), once per module."""
    cls = request.param
    pyro.clear_param_store()
    pyro.set_rng_seed(1)
    y = conjugate_data()
    guide = make_guide(cls, conjugate_model)
    steps = 2000
    svi = SVI(
        conjugate_model,
        guide,
        ClippedAdam({"lr": 0.05, "lrd": 0.02 ** (1.0 / steps)}),  # lr decays to 1e-3
        Trace_ELBO(num_particles=4, vectorize_particles=True, max_plate_nesting=1),
    )
    losses = [svi.step(y) for _ in range(steps)]
    assert all(math.isfinite(loss) for loss in losses)
    return guide, y


def test_conjugate_exact_answer_self_check():
    """The closed form used below agrees with a brute-force joint Gaussian marginal."""
    y = conjugate_data(n=4)
    _, _, log_evidence = exact_conjugate_answer(y)
    # vec(y) = kron(1_n, I_3) x + noise, x ~ N(0, diag(PRIOR_SD^2))
    n = y.shape[0]
    design = torch.kron(torch.ones(n, 1, dtype=F64), torch.eye(3, dtype=F64))
    cov = design @ torch.diag(torch.tensor(PRIOR_SD, dtype=F64) ** 2) @ design.T
    cov = cov + NOISE_SD**2 * torch.eye(3 * n, dtype=F64)
    brute = dist.MultivariateNormal(torch.zeros(3 * n, dtype=F64), cov).log_prob(y.reshape(-1))
    assert torch.allclose(brute, log_evidence, atol=1e-10)


def test_conjugate_elbo_reaches_log_evidence(conjugate_fit):
    guide, y = conjugate_fit
    post_mean, post_sd, log_evidence = exact_conjugate_answer(y)
    # dtype follows the model (float64 data), not torch's default dtype (float32 here).
    assert torch.get_default_dtype() == torch.float32
    assert all(p.dtype == F64 for p in guide.parameters())

    num = 2000
    log_w, _, _ = vectorized_importance_weights(
        conjugate_model, guide, y, num_samples=num, max_plate_nesting=1, normalized=False
    )
    assert log_w.shape == (num,) and log_w.dtype == F64
    assert torch.isfinite(log_w).all()
    elbo = log_w.mean().item()
    std_err = (log_w.std() / math.sqrt(num)).item()
    gap = log_evidence.item() - elbo
    # ELBO <= log p(y) up to Monte Carlo error (a wrong log-Jacobian or log-det would break this) ...
    assert gap >= -3 * std_err, (elbo, log_evidence.item(), std_err)
    # ... and a converged flow is (nearly) exact here.
    assert gap <= max(3 * std_err, 0.05), (elbo, log_evidence.item(), std_err)


def test_conjugate_posterior_moments(conjugate_fit):
    guide, y = conjugate_fit
    post_mean, post_sd, _ = exact_conjugate_answer(y)
    num = 4000
    draws = draw(guide, num, y, dim=-2)  # the model's own plate uses dim -1
    x = draws["x"].reshape(num, 3)
    log_tau = draws["tau"].reshape(num).log()
    assert x.dtype == F64 and log_tau.dtype == F64
    # Monte Carlo error of the mean is post_sd / sqrt(4000) = 0.016 post_sd; the rest is the fit's
    # (an ELBO gap of 0.05 allows a mean off by up to 0.3 post_sd).
    assert ((x.mean(0) - post_mean).abs() / post_sd).max() < 0.2
    assert ((x.std(0) / post_sd) - 1).abs().max() < 0.1
    assert abs(log_tau.mean().item() - TAU_LOC) < 0.2 * TAU_SCALE
    assert abs(log_tau.std().item() / TAU_SCALE - 1) < 0.1


def test_trained_guide_scores_its_draws_consistently(conjugate_fit):
    """The one-pass log q(z) that SVI uses equals the exact score through the inverse, after training."""
    guide, _ = conjugate_fit
    d = guide.get_posterior()
    z = d.rsample((64,))
    fast = d.log_prob(z)
    exact = d.log_prob(z.detach().clone())
    assert torch.allclose(fast, exact, atol=1e-8)


# ---------------------------------------------------------------------------------------------
# 2. An untrained guide with precondition=None is exactly AutoNormal's starting distribution
#    (the default, precondition="auto", starts at the Laplace approximation: tests/test_laplace.py).
# ---------------------------------------------------------------------------------------------
def constrained_gaussian_model(dtype):
    one = torch.ones((), dtype=dtype)
    pyro.sample("rate", dist.LogNormal(torch.zeros(2, dtype=dtype), one).to_event(1))
    pyro.sample("frac", dist.Beta(2 * one, 3 * one))
    pyro.sample("shift", dist.Uniform(-one, 2 * one))
    pyro.sample("probs", dist.Dirichlet(torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=dtype)))
    pyro.sample("x", dist.Normal(torch.zeros(3, dtype=dtype), 2 * one).to_event(1))


@parametrize_guides
@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["float64", "float32"])
def test_untrained_guide_is_autonormal_start(cls, dtype):
    init_scale = 0.2
    init = init_to_median(num_samples=15)
    normal = AutoNormal(constrained_gaussian_model, init_loc_fn=init, init_scale=init_scale)
    guide = make_guide(
        cls, constrained_gaussian_model, init_loc_fn=init, init_scale=init_scale, precondition=None
    )
    # Same seed right before each set-up: both draw the same prior medians.
    pyro.set_rng_seed(3)
    normal(dtype)
    pyro.set_rng_seed(3)
    guide.setup(dtype)

    names = [name for name, _ in guide.prototype_trace.iter_stochastic_nodes()]
    assert names == ["rate", "frac", "shift", "probs", "x"]
    loc = torch.cat([getattr(normal.locs, n).detach().reshape(-1) for n in names])
    scale = torch.cat([getattr(normal.scales, n).detach().reshape(-1) for n in names])
    assert guide.latent_dim == loc.numel() == 2 + 1 + 1 + 3 + 3
    assert loc.dtype == dtype and torch.allclose(scale, torch.full_like(scale, init_scale))

    posterior = guide.get_posterior()
    g = torch.Generator().manual_seed(5)
    # points out to several scales from the location, where importance weights are decided
    z = loc + 3 * scale * torch.randn(200, loc.numel(), generator=g, dtype=dtype)
    with torch.no_grad():
        flow_lp = posterior.log_prob(z)
    normal_lp = dist.Normal(loc, scale).log_prob(z).sum(-1)
    assert flow_lp.dtype == dtype
    if dtype == F64:
        torch.testing.assert_close(flow_lp, normal_lp, rtol=0, atol=1e-8)
    else:
        torch.testing.assert_close(flow_lp, normal_lp, rtol=1e-5, atol=1e-4)
    # and its draws have AutoNormal's moments
    with torch.no_grad():
        s = posterior.sample((4000,))
    assert ((s.mean(0) - loc).abs() / scale).max() < 0.1
    assert ((s.std(0) / scale) - 1).abs().max() < 0.1


# ---------------------------------------------------------------------------------------------
# 3. Constrained supports, and ImproperUniform with the default initialization.
# ---------------------------------------------------------------------------------------------
def constrained_model():
    a = pyro.sample("lognormal", dist.LogNormal(0.0, 1.0))
    b = pyro.sample("halfcauchy", dist.HalfCauchy(1.0))
    c = pyro.sample("beta", dist.Beta(2.0, 3.0))
    d = pyro.sample("uniform", dist.Uniform(-1.0, 2.0))
    pyro.sample("dirichlet", dist.Dirichlet(torch.ones(4)))
    ordered = pyro.sample("ordered", dist.ImproperUniform(constraints.ordered_vector, (), (3,)))
    pyro.factor("ordered_prior", dist.Normal(0.0, 3.0).log_prob(ordered).sum())
    pyro.sample(
        "ordered_td",
        dist.TransformedDistribution(
            dist.Normal(torch.zeros(3), 1.0).to_event(1), [OrderedTransform()]
        ),
    )
    pyro.sample("lkj", dist.LKJCholesky(3, concentration=2.0))
    free = pyro.sample("free", dist.ImproperUniform(constraints.real, (), (2,)))
    pyro.factor("free_prior", -0.5 * (free**2).sum(-1))
    pyro.sample("obs", dist.Normal(a + b + c + d, 1.0), obs=torch.tensor(1.5))


@parametrize_guides
def test_constrained_supports(cls):
    guide = make_guide(cls, constrained_model, init_scale=1.0)  # default init_loc_fn
    sample = guide()  # ImproperUniform sites need the default init to fall back to a feasible point
    sites = dict(guide.prototype_trace.iter_stochastic_nodes())
    assert set(sample) == set(sites) == {
        "lognormal", "halfcauchy", "beta", "uniform", "dirichlet", "ordered", "ordered_td", "lkj", "free",
    }  # fmt: skip
    assert guide.latent_dim == 1 + 1 + 1 + 1 + 3 + 3 + 3 + 3 + 2
    for name, value in sample.items():
        assert value.shape == sites[name]["value"].shape, name

    for _ in range(2):  # untrained (wide: init_scale=1), then after some SVI steps
        draws = draw(guide, 500)
        for name, site in sites.items():
            value = draws[name]
            assert torch.isfinite(value).all(), name
            assert site["fn"].support.check(value).all(), name
        assert (draws["ordered"].diff(dim=-1) > 0).all()
        svi = SVI(constrained_model, guide, Adam({"lr": 0.01}), Trace_ELBO())
        losses = [svi.step() for _ in range(10)]
        assert all(math.isfinite(loss) for loss in losses), losses


@parametrize_guides
@pytest.mark.parametrize(
    "support,event_shape",
    [
        (constraints.real, ()),
        (constraints.real, (2,)),
        (constraints.positive, (3,)),
        (constraints.ordered_vector, (3,)),
    ],
    ids=["real", "real_vector", "positive", "ordered"],
)
def test_default_init_handles_improper_uniform(cls, support, event_shape):
    """Pyro's init_to_median (and init_to_feasible) cannot sample an ImproperUniform; ours must cope."""

    def model():
        v = pyro.sample("v", dist.ImproperUniform(support, (), event_shape))
        pyro.factor("prior", -0.5 * (biject_to(support).inv(v) ** 2).sum())

    guide = make_guide(cls, model, precondition=None)  # the plain start: init_loc_fn's point
    value = guide()["v"]
    assert value.shape == event_shape
    assert support.check(value).all()
    # the fallback location is the feasible point 0 of the unconstrained space (as documented)
    t = biject_to(support)
    feasible = t(torch.zeros(t.inverse_shape(torch.Size(event_shape))))
    assert torch.allclose(guide.median()["v"], feasible, atol=0.05)
    loss = SVI(model, guide, Adam({"lr": 0.01}), Trace_ELBO()).step()
    assert math.isfinite(loss)


# ---------------------------------------------------------------------------------------------
# 4. dtype follows the model, end to end.
# ---------------------------------------------------------------------------------------------
@parametrize_guides
@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["float32", "float64"])
def test_dtype_follows_the_model(cls, dtype):
    x, y = regression_data(dtype)
    guide = make_guide(cls, regression_model)
    svi = SVI(regression_model, guide, Adam({"lr": 0.01}), Trace_ELBO())
    losses = [svi.step(x, y) for _ in range(5)]
    assert all(math.isfinite(loss) for loss in losses)
    assert torch.get_default_dtype() == torch.float32
    assert {p.dtype for p in guide.parameters()} == {dtype}
    assert all(v.dtype == dtype for v in guide(x, y).values())
    posterior = guide.get_posterior()
    z = posterior.sample((10,))
    assert z.dtype == dtype
    assert posterior.log_prob(torch.randn(10, guide.latent_dim, dtype=dtype)).dtype == dtype
    assert all(v.dtype == dtype for v in guide.median(x, y).values())
    assert all(v.dtype == dtype for v in guide.quantiles([0.1, 0.9], x, y).values())
    predictive = Predictive(regression_model, guide=guide, num_samples=5)(x)
    assert all(v.dtype == dtype for v in predictive.values())


# ---------------------------------------------------------------------------------------------
# 5. Saving and loading.
# ---------------------------------------------------------------------------------------------
def _train(guide, model, *args, steps=30, lr=0.02):
    svi = SVI(model, guide, Adam({"lr": lr}), Trace_ELBO())
    for _ in range(steps):
        svi.step(*args)
    return guide


@parametrize_guides
def test_state_dict_round_trip(cls, tmp_path):
    x, y = regression_data()
    guide = _train(make_guide(cls, regression_model), regression_model, x, y)
    points = 2 * torch.randn(16, guide.latent_dim)
    with torch.no_grad():
        expected = guide.get_posterior().log_prob(points)
    pyro.set_rng_seed(7)
    expected_median = guide.median(x, y)
    state = guide.state_dict()
    path = tmp_path / "guide.pt"
    torch.save(state, path)

    for loaded in (state, torch.load(path, weights_only=True)):
        pyro.clear_param_store()  # as in a new session
        fresh = make_guide(cls, regression_model)
        fresh.setup(x, y)
        with torch.no_grad():
            assert not torch.equal(fresh.get_posterior().log_prob(points), expected)
        fresh.load_state_dict(loaded)
        with torch.no_grad():
            assert torch.equal(fresh.get_posterior().log_prob(points), expected)
        pyro.set_rng_seed(7)
        median = fresh.median(x, y)
        assert median.keys() == expected_median.keys()
        for name in median:
            assert torch.equal(median[name], expected_median[name]), name
        # the restored guide is usable as is
        assert Predictive(regression_model, guide=fresh, num_samples=3)(x)["y"].shape == (3, 20)


@parametrize_guides
def test_load_state_dict_needs_setup_first(cls):
    x, y = regression_data()
    state = _train(make_guide(cls, regression_model), regression_model, x, y, steps=2).state_dict()
    fresh = make_guide(cls, regression_model)
    with pytest.raises(RuntimeError):  # no parameters yet: loading must not pass silently
        fresh.load_state_dict(state)
    with pytest.raises(RuntimeError, match="setup"):
        fresh.get_posterior()


@parametrize_guides
def test_new_guide_in_a_used_param_store_trains_what_it_samples(cls):
    """Notebook pattern: train a guide, then build and train another one without clearing the store.

    SVI's optimizer updates the tensors found in Pyro's param store; the guide must sample with those
    very tensors, or training silently does nothing.
    """
    x, y = regression_data()
    _train(make_guide(cls, regression_model), regression_model, x, y, steps=5)
    second = make_guide(cls, regression_model)
    svi = SVI(regression_model, second, Adam({"lr": 0.02}), Trace_ELBO())
    svi.step(x, y)
    in_store = {id(p) for _, p in pyro.get_param_store().named_parameters()}
    assert all(id(p) in in_store for p in second.parameters())
    before = [p.detach().clone() for p in second.parameters()]
    for _ in range(10):
        svi.step(x, y)
    assert all(not torch.equal(p.detach(), b) for p, b in zip(second.parameters(), before))


@parametrize_guides
def test_param_store_save_and_restore(cls, tmp_path):
    """Pyro's own persistence (param store save/load) restores the guide, as it does AutoNormal."""
    x, y = regression_data()
    guide = _train(make_guide(cls, regression_model), regression_model, x, y)
    points = 2 * torch.randn(16, guide.latent_dim)
    with torch.no_grad():
        expected = guide.get_posterior().log_prob(points)
    path = tmp_path / "params.pt"
    pyro.get_param_store().save(path)
    pyro.clear_param_store()
    pyro.get_param_store().load(path)
    fresh = make_guide(cls, regression_model)
    fresh(x, y)  # a call inside Pyro's machinery picks the stored values up
    with torch.no_grad():
        torch.testing.assert_close(fresh.get_posterior().log_prob(points), expected)


# ---------------------------------------------------------------------------------------------
# 5b. Neural transport: get_base_dist() + get_transform() for Pyro's NeuTraReparam.
# ---------------------------------------------------------------------------------------------
def test_neutra_reparam_whitens_the_posterior(conjugate_fit):
    """Reparameterized by a guide that fits exactly, the model's density is N(0, I) times p(y).

    Pyro's NeuTraReparam maps a base draw z through the guide's transform to every site; the
    reparameterized model's log density at z is then log p(y, T(z)) + log|det dT/dz|, which equals
    log N(z; 0, I) + log p(y) when q is the posterior, whatever z is.
    """
    from pyro.infer.reparam import NeuTraReparam

    guide, y = conjugate_fit
    _, _, log_evidence = exact_conjugate_answer(y)
    neutra = NeuTraReparam(guide)
    reparam_model = poutine.reparam(conjugate_model, config=lambda _: neutra)
    base = guide.get_base_dist()
    assert base.event_shape == (guide.latent_dim,) and base.mean.dtype == F64
    diffs = []
    with torch.no_grad():
        for _ in range(200):
            trace = poutine.trace(reparam_model).get_trace(y)
            z = next(s["value"] for n, s in trace.nodes.items() if n.endswith("_shared_latent"))
            diffs.append(trace.log_prob_sum() - base.log_prob(z))
    # log p_reparam(z) - log N(z) is the log importance weight log p(y, x) - log q(x), x = T(z):
    # nearly constant for a guide this close to the posterior, with mean the ELBO <= log p(y)
    diffs = torch.stack(diffs)
    se = diffs.std() / math.sqrt(len(diffs))
    assert diffs.std() < 0.3, diffs.std()
    assert -3 * se - 0.01 <= log_evidence - diffs.mean() <= max(3 * se, 0.05)
    with torch.no_grad():
        elbo = -Trace_ELBO(num_particles=2000, vectorize_particles=True, max_plate_nesting=1).loss(
            conjugate_model, guide, y
        )
    assert abs(diffs.mean().item() - elbo) < 4 * se + 0.01
    # transform_sample maps base draws to the model's sites, in their supports
    samples = neutra.transform_sample(base.sample((500,)))
    assert samples["x"].shape == (500, 3) and (samples["tau"] > 0).all()
    post_mean, post_sd, _ = exact_conjugate_answer(y)
    assert ((samples["x"].mean(0) - post_mean).abs() / post_sd).max() < 0.3


@parametrize_guides
def test_get_transform_inverts_exactly_and_needs_setup(cls):
    x, y = regression_data(F64)
    guide = make_guide(cls, regression_model)
    with pytest.raises(RuntimeError, match="setup"):
        guide.get_transform()
    guide = _train(guide, regression_model, x, y, steps=30)
    t = guide.get_transform()
    z = torch.randn(7, guide.latent_dim, dtype=F64)
    latent = t(z)
    torch.testing.assert_close(t.inv(latent), z, atol=1e-8, rtol=1e-8)
    expected = guide.get_base_dist().log_prob(z) - t.log_abs_det_jacobian(z, latent)
    torch.testing.assert_close(guide.get_posterior().log_prob(latent), expected)


@pytest.mark.slow
def test_neutra_nuts_on_the_regression_model():
    from pyro.infer import MCMC, NUTS
    from pyro.infer.reparam import NeuTraReparam

    x, y = regression_data(F64, n=40)
    guide = _train(make_guide(AutoIAFFlow, regression_model), regression_model, x, y, steps=800)
    neutra = NeuTraReparam(guide)
    mcmc = MCMC(
        NUTS(poutine.reparam(regression_model, config=lambda _: neutra)),
        num_samples=300, warmup_steps=200, disable_progbar=True,
    )  # fmt: skip
    mcmc.run(x, y)
    z = next(v for k, v in mcmc.get_samples().items() if k.endswith("_shared_latent"))
    w = neutra.transform_sample(z)["w"]
    plain = MCMC(NUTS(regression_model), num_samples=300, warmup_steps=200, disable_progbar=True)
    plain.run(x, y)
    w_ref = plain.get_samples()["w"]
    assert ((w.mean(0) - w_ref.mean(0)).abs() / w_ref.std(0)).max() < 0.3


# ---------------------------------------------------------------------------------------------
# 6. median() and quantiles().
# ---------------------------------------------------------------------------------------------
def test_median_and_quantiles_match_the_exact_posterior(conjugate_fit):
    guide, y = conjugate_fit
    post_mean, post_sd, _ = exact_conjugate_answer(y)
    median = guide.median(y, num_samples=4000)
    assert set(median) == {"x", "tau"}
    assert median["x"].shape == (3,) and median["tau"].shape == ()
    assert ((median["x"] - post_mean).abs() / post_sd).max() < 0.25
    assert abs(median["tau"].log().item() - TAU_LOC) < 0.25 * TAU_SCALE

    probs = [0.05, 0.5, 0.95]
    q = guide.quantiles(probs, y, num_samples=4000)
    assert q["x"].shape == (3, 3) and q["tau"].shape == (3,)
    assert (q["x"].diff(dim=0) > 0).all() and (q["tau"].diff(dim=0) > 0).all()
    z = dist.Normal(0.0, 1.0).icdf(torch.tensor(probs, dtype=F64))
    exact_x = post_mean + z[:, None] * post_sd
    assert ((q["x"] - exact_x).abs() / post_sd).max() < 0.35
    exact_log_tau = TAU_LOC + z * TAU_SCALE
    assert ((q["tau"].log() - exact_log_tau).abs() / TAU_SCALE).max() < 0.35
    # the median from quantiles() agrees with median()
    assert ((q["x"][1] - median["x"]).abs() / post_sd).max() < 0.15


@parametrize_guides
def test_quantiles_shapes_and_bad_arguments(cls):
    x, y = regression_data()
    guide = make_guide(cls, regression_model)
    q = guide.quantiles([0.05, 0.5, 0.95], x, y)  # sets the guide up when needed
    assert q["w"].shape == (3, 2) and q["s"].shape == (3,)
    assert (q["w"].diff(dim=0) > 0).all() and (q["s"].diff(dim=0) > 0).all() and (q["s"] > 0).all()
    for bad in ([1.5], [-0.1], [0.5, 1.01]):
        with pytest.raises(ValueError):
            guide.quantiles(bad, x, y)
    with pytest.raises(ValueError):
        guide.median(x, y, num_samples=1)


# ---------------------------------------------------------------------------------------------
# 7. Predictive, vectorized Trace_ELBO, RenyiELBO.
# ---------------------------------------------------------------------------------------------
@parametrize_guides
def test_predictive_and_elbos(cls):
    x, y = regression_data()
    guide = make_guide(cls, regression_model)
    elbos = [
        Trace_ELBO(num_particles=8, vectorize_particles=True, max_plate_nesting=1),
        RenyiELBO(alpha=0.5, num_particles=4, max_plate_nesting=1),
        RenyiELBO(alpha=0.5, num_particles=4, vectorize_particles=True, max_plate_nesting=1),
    ]
    for elbo in elbos:
        svi = SVI(regression_model, guide, Adam({"lr": 0.01}), elbo)
        losses = [svi.step(x, y) for _ in range(5)]
        assert all(math.isfinite(loss) for loss in losses), (type(elbo).__name__, losses)

    num = 30
    samples = Predictive(regression_model, guide=guide, num_samples=num)(x)
    assert set(samples) == {"w", "s", "mu", "y"}
    assert samples["y"].shape == (num, 20) and samples["mu"].shape == (num, 20)
    assert all(torch.isfinite(v).all() for v in samples.values())
    assert (samples["s"] > 0).all()
    # the same shapes as Pyro's AutoNormal gives for this model
    reference = AutoNormal(regression_model)
    reference(x, y)
    expected = Predictive(regression_model, guide=reference, num_samples=num)(x)
    assert {k: v.shape for k, v in samples.items()} == {k: v.shape for k, v in expected.items()}
    # posterior draws only
    latents = Predictive(regression_model, guide=guide, num_samples=num, return_sites=["w", "s"])(x)
    assert latents["w"].shape[0] == num and latents["w"].shape[-1] == 2


# ---------------------------------------------------------------------------------------------
# 8. Refusals.
# ---------------------------------------------------------------------------------------------
@parametrize_guides
def test_refuses_discrete_latents(cls):
    def model():
        pyro.sample("x", dist.Normal(0.0, 1.0))
        pyro.sample("coin", dist.Bernoulli(0.5))

    with pytest.raises(ValueError, match="'coin'"):
        make_guide(cls, model)()


@parametrize_guides
def test_refuses_local_latents_in_subsampled_plates(cls):
    def model():
        pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", 100, subsample_size=10):
            pyro.sample("local_z", dist.Normal(0.0, 1.0))

    guide = make_guide(cls, model)
    with pytest.raises(ValueError, match="local_z") as info:
        guide()
    assert "AutoNormal" in str(info.value)


@parametrize_guides
def test_full_plates_are_fine(cls):
    def model():
        with pyro.plate("data", 5):
            pyro.sample("z", dist.Normal(0.0, 1.0))

    assert make_guide(cls, model)()["z"].shape == (5,)


def _model_must_not_run():
    raise AssertionError("argument checks must not need the model")


@parametrize_guides
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(init_scale=0.0),
        dict(init_scale=-1.0),
        dict(init_scale=float("nan")),
        dict(init_scale=float("inf")),
        dict(num_transforms=-1),
        dict(num_transforms=1.5),
    ],
    ids=["scale0", "scale-1", "scale-nan", "scale-inf", "K-1", "K1.5"],
)
def test_bad_constructor_arguments_raise_at_construction(cls, kwargs):
    with pytest.raises(ValueError):
        cls(_model_must_not_run, **kwargs)


@parametrize_guides
def test_unknown_keyword_raises_at_construction(cls):
    with pytest.raises(TypeError):
        cls(_model_must_not_run, num_transfroms=3)


def test_bad_iaf_arguments_raise_at_construction():
    with pytest.raises(ValueError):
        AutoIAFFlow(_model_must_not_run, hidden_dims=(0,))
    with pytest.raises(ValueError):
        AutoIAFFlow(_model_must_not_run, log_scale_min=1.0)
    with pytest.raises(TypeError):
        AutoPlanarFlow(_model_must_not_run, hidden_dims=(8,))
    with pytest.raises(ValueError, match="num_bins"):
        AutoSplineFlow(_model_must_not_run, num_bins=1)
    with pytest.raises(ValueError, match="bound"):
        AutoSplineFlow(_model_must_not_run, bound=0.0)
    for cls in (AutoIAFFlow, AutoSplineFlow):
        with pytest.raises(ValueError, match=r"activation must be one of \['elu', 'gelu'"):
            cls(_model_must_not_run, activation="swish")


@pytest.mark.parametrize("cls", [AutoIAFFlow, AutoSplineFlow], ids=_name)
@pytest.mark.parametrize("activation", ["gelu", torch.nn.SiLU])
def test_activation_reaches_every_made(cls, activation):
    x, y = regression_data()
    guide = cls(regression_model, num_transforms=2, hidden_dims=(8, 8), activation=activation)
    pyro.set_rng_seed(1)  # the same prior medians for both guides' init_loc_fn
    guide(x, y)
    want = torch.nn.GELU if activation == "gelu" else activation
    mades = [layer.made for layer in guide.flow.layers]
    assert len(mades) == 2 and all(type(m.activation) is want for m in mades)
    # the default is DEFAULT_ACTIVATION's, and the untrained guide is the same distribution
    default = cls(regression_model, num_transforms=2, hidden_dims=(8, 8))
    pyro.set_rng_seed(1)
    default(x, y)
    want = ACTIVATIONS[DEFAULT_ACTIVATION]
    assert all(type(layer.made.activation) is want for layer in default.flow.layers)
    z = torch.randn(5, guide.latent_dim)
    assert torch.allclose(
        guide.get_posterior().log_prob(z), default.get_posterior().log_prob(z), atol=1e-6
    )


def test_made_activation_default_is_set_in_one_place():
    """Every constructor that builds MADEs takes its activation default from DEFAULT_ACTIVATION."""
    import inspect

    from pyro_nf.transforms import MADE, AffineAutoregressive, SplineAutoregressive
    from pyro_nf.transforms.autoregressive import MaskedAutoregressive

    for fn in (MADE, MaskedAutoregressive, AffineAutoregressive, SplineAutoregressive,
               AutoIAFFlow, AutoSplineFlow):  # fmt: skip
        assert inspect.signature(fn).parameters["activation"].default is DEFAULT_ACTIVATION, fn
    for transform in ("iaf", "spline"):
        flow = Flow(3, transform, 2)
        assert all(type(layer.made.activation) is ACTIVATIONS[DEFAULT_ACTIVATION]
                   for layer in flow.layers)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# 9. pyro.render_model
# ---------------------------------------------------------------------------------------------
@parametrize_guides
def test_render_guide(cls):
    pytest.importorskip("graphviz")
    x, y = regression_data()
    guide = make_guide(cls, regression_model)
    graph = pyro.render_model(
        guide, model_args=(x, y), render_distributions=True, render_params=True
    )
    source = graph.source
    for name in ("w", "s"):
        assert re.search(rf"^\s*{name} \[", source, flags=re.M), source
    assert "FlowDistribution" in source


# ---------------------------------------------------------------------------------------------
# 10. CUDA
# ---------------------------------------------------------------------------------------------
@needs_cuda
@parametrize_guides
@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["float32", "float64"])
def test_cuda(cls, dtype):
    device = torch.device("cuda")
    x, y = regression_data(dtype, device)
    guide = make_guide(cls, regression_model)
    svi = SVI(
        regression_model,
        guide,
        Adam({"lr": 0.01}),
        Trace_ELBO(num_particles=4, vectorize_particles=True),
    )
    losses = [svi.step(x, y) for _ in range(5)]
    assert all(math.isfinite(loss) for loss in losses)
    for p in guide.parameters():
        assert p.device.type == "cuda" and p.dtype == dtype
    for v in guide(x, y).values():
        assert v.device.type == "cuda" and v.dtype == dtype
    posterior = guide.get_posterior()
    z = posterior.sample((10,))
    assert z.device.type == "cuda" and z.dtype == dtype
    lp = posterior.log_prob(torch.randn(10, guide.latent_dim, dtype=dtype, device=device))
    assert lp.device.type == "cuda" and torch.isfinite(lp).all()
    for v in guide.median(x, y).values():
        assert v.device.type == "cuda"
    for v in Predictive(regression_model, guide=guide, num_samples=4)(x).values():
        assert v.device.type == "cuda" and v.dtype == dtype


# ---------------------------------------------------------------------------------------------
# 11. Gradients: reach every parameter; the identity start is not a trap.
# ---------------------------------------------------------------------------------------------
@parametrize_guides
def test_gradients_reach_every_parameter(cls):
    x, y = regression_data()
    guide = make_guide(cls, regression_model, num_transforms=3).setup(x, y)
    loss = Trace_ELBO().differentiable_loss(regression_model, guide, x, y)
    loss.backward()
    params = dict(guide.flow.named_parameters())
    assert params
    for name, p in params.items():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    assert params["affine.raw"].grad.abs().sum() > 0

    for p in params.values():
        p.grad = None
    start = {name: p.detach().clone() for name, p in params.items()}
    _train(guide, regression_model, x, y, steps=20, lr=0.01)
    for k, layer in enumerate(guide.flow.layers):
        for name, p in layer.named_parameters():
            moved = p.detach() != start[f"layers.{k}.{name}"]
            assert moved.any(), f"layer {k}: {name} never moved"
            if cls not in (AutoIAFFlow, AutoSplineFlow):  # MADE's masked weights stay put
                assert moved.all(), f"layer {k}: {name} partly stuck at its start"


@parametrize_guides
def test_seeded_guide_is_reproducible(cls):
    """poutine.seed fixes every draw: the guide uses torch's RNG and nothing else."""
    x, y = regression_data()
    guide = make_guide(cls, regression_model)
    guide.setup(x, y)
    first = poutine.trace(poutine.seed(guide, rng_seed=11)).get_trace(x, y)
    second = poutine.trace(poutine.seed(guide, rng_seed=11)).get_trace(x, y)
    third = poutine.trace(poutine.seed(guide, rng_seed=12)).get_trace(x, y)
    for name in ("w", "s"):
        assert torch.equal(first.nodes[name]["value"], second.nodes[name]["value"])
        assert not torch.equal(first.nodes[name]["value"], third.nodes[name]["value"])


# ---------------------------------------------------------------------------------------------
# Slow: the conjugate test with the constructors' defaults (deeper planar/radial stacks).
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
@parametrize_guides
def test_conjugate_with_default_arguments(cls):
    _check_conjugate_fit(cls(conjugate_model))


@pytest.mark.slow
def test_conjugate_with_gated_iaf():
    """The gated IAF update (Kingma et al. 2016) reaches the exact answer as well."""
    _check_conjugate_fit(AutoIAFFlow(conjugate_model, gate_bias=2.0))


def _check_conjugate_fit(guide):
    y = conjugate_data()
    post_mean, post_sd, log_evidence = exact_conjugate_answer(y)
    steps = 2000
    svi = SVI(
        conjugate_model,
        guide,
        ClippedAdam({"lr": 0.05, "lrd": 0.02 ** (1.0 / steps)}),
        Trace_ELBO(num_particles=4, vectorize_particles=True, max_plate_nesting=1),
    )
    for _ in range(steps):
        svi.step(y)
    num = 2000
    log_w, _, _ = vectorized_importance_weights(
        conjugate_model, guide, y, num_samples=num, max_plate_nesting=1
    )
    std_err = (log_w.std() / math.sqrt(num)).item()
    gap = log_evidence.item() - log_w.mean().item()
    assert -3 * std_err <= gap <= max(3 * std_err, 0.05), (gap, std_err)
    x = draw(guide, 4000, y, dim=-2)["x"].reshape(4000, 3)
    assert ((x.mean(0) - post_mean).abs() / post_sd).max() < 0.2
    assert ((x.std(0) / post_sd) - 1).abs().max() < 0.1
