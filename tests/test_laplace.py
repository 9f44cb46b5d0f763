"""``precondition="laplace"``: the flow guides start at the Laplace approximation, whitened.

Known answers: on a Gaussian posterior (conjugate linear regression with badly scaled, strongly
correlated coefficients) the Laplace approximation is exact, so the *untrained* guide's importance
weights are constant and equal the exact evidence, and every estimator (Trace_ELBO, FastELBO,
diagnose) agrees. Then the failure paths: a funnel has no mode (warning, plain start), a
subsampled model is refused, bad arguments fail at construction. Then the plumbing: the
preconditioner is part of the posterior everywhere (sampling, scoring, NeuTra's transform, the
state dict, Predictive), and training keeps it fixed.
"""

import math
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Predictive, Trace_ELBO
from pyro.infer.autoguide import init_to_value
from test_devices import DEVICES
from torch.autograd.functional import jacobian

import pyro_nf
from pyro_nf import AutoIAFFlow, AutoPlanarFlow, AutoRadialFlow, FastELBO, Flow
from pyro_nf.transforms import TriangularAffineTransform

F64 = torch.float64
GUIDES = [AutoPlanarFlow, AutoRadialFlow, AutoIAFFlow]
SMALL = {
    AutoPlanarFlow: dict(num_transforms=4),
    AutoRadialFlow: dict(num_transforms=4),
    AutoIAFFlow: dict(num_transforms=2, hidden_dims=(16,)),
}
parametrize_guides = pytest.mark.parametrize("cls", GUIDES, ids=lambda c: c.__name__)

PRIOR_SD = 10.0
NOISE_SD = 0.5


def regression_data(n=30, dtype=F64):
    """x far from 0 with a small spread: intercept and slope correlated at about -0.9999."""
    g = torch.Generator().manual_seed(7)
    x = 100.0 + torch.randn(n, generator=g, dtype=F64)
    y = 1.0 + 0.3 * x + NOISE_SD * torch.randn(n, generator=g, dtype=F64)
    return x.to(dtype), y.to(dtype)


def regression_model(x, y):
    coef = pyro.sample("coef", dist.Normal(x.new_zeros(2), PRIOR_SD).to_event(1))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Normal(coef[..., 0] + coef[..., 1] * x, NOISE_SD), obs=y)


def exact_answer(x, y):
    """Posterior mean and covariance of (intercept, slope), and log p(y), in float64."""
    x, y = x.double(), y.double()
    X = torch.stack([torch.ones_like(x), x], -1)
    prec = torch.eye(2, dtype=F64) / PRIOR_SD**2 + X.T @ X / NOISE_SD**2
    cov = torch.linalg.inv(prec)
    mean = cov @ (X.T @ y) / NOISE_SD**2
    marginal = PRIOR_SD**2 * X @ X.T + NOISE_SD**2 * torch.eye(len(x), dtype=F64)
    log_evidence = dist.MultivariateNormal(torch.zeros(len(x), dtype=F64), marginal).log_prob(y)
    return mean, cov, log_evidence


def funnel():
    log_tau = pyro.sample("log_tau", dist.Normal(0.0, 3.0))
    pyro.sample("theta", dist.Normal(torch.zeros(8), log_tau.exp()).to_event(1))


def setup_quietly(guide, *args):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        guide.setup(*args)
    return [str(w.message) for w in caught]


# ---------------------------------------------------------------------------------------------
# The transform
# ---------------------------------------------------------------------------------------------
def _random_tril(d, batch=()):
    g = torch.Generator().manual_seed(3)
    a = torch.randn(*batch, d, d, generator=g, dtype=F64).tril(-1)
    diag = torch.rand(*batch, d, generator=g, dtype=F64) + 0.2
    return a + torch.diag_embed(diag)


def test_triangular_affine_log_det_and_inverse():
    L = _random_tril(4)
    loc = torch.randn(4, dtype=F64)
    t = TriangularAffineTransform(loc, L)
    x = torch.randn(4, dtype=F64)
    y, ladj = t.call_and_ladj(x)
    J = jacobian(lambda v: t(v), x)
    assert torch.allclose(ladj, torch.linalg.slogdet(J)[1])
    assert torch.allclose(J, L)
    assert torch.allclose(t.inv(y), x)
    xs = torch.randn(5, 3, 4, dtype=F64)
    back, ladj_inv = t.inverse_and_ladj(t(xs))
    assert torch.allclose(back, xs) and ladj_inv.shape == (5, 3)
    # the upper triangle is ignored, not silently used
    assert torch.allclose(TriangularAffineTransform(loc, L + torch.ones(4, 4).triu(1)).inv(y), x)


def test_triangular_affine_batched_parameters():
    L = _random_tril(3, batch=(2,))
    loc = torch.zeros(2, 3, dtype=F64)
    t = TriangularAffineTransform(loc, L)
    x = torch.randn(6, 2, 3, dtype=F64)
    y, ladj = t.call_and_ladj(x)
    assert y.shape == x.shape and ladj.shape == (6, 2)
    assert torch.allclose(t.inv(y), x)
    assert torch.allclose(ladj[0], L.diagonal(dim1=-2, dim2=-1).log().sum(-1))


# ---------------------------------------------------------------------------------------------
# Flow.set_preconditioner
# ---------------------------------------------------------------------------------------------
def test_flow_preconditioner_is_part_of_the_distribution():
    torch.manual_seed(0)
    flow = Flow(3, "planar", 2, init_scale=0.7).double()
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.3 * torch.randn_like(p))
    L, m = _random_tril(3), torch.tensor([5.0, -2.0, 1.0], dtype=F64)
    plain = flow().sample((1000,))
    flow.set_preconditioner(m, L)
    d = flow()
    z, log_q = d.rsample_and_log_prob((7,))
    assert torch.allclose(d.log_prob(z.clone()), log_q)  # scored through the inverse
    # q_pre(z) = q_plain(L^-1 (z - m)) / det L
    u = torch.linalg.solve_triangular(L, (z - m).unsqueeze(-1), upper=False).squeeze(-1)
    flow_plain = Flow(3, "planar", 2).double()
    flow_plain.load_state_dict({k: v for k, v in flow.state_dict().items() if "precond" not in k})
    expected = flow_plain().log_prob(u) - L.diagonal().log().sum()
    assert torch.allclose(log_q, expected)
    # the same noise lands at m + L * (plain draw)
    torch.manual_seed(1)
    a = flow().sample((4,))
    torch.manual_seed(1)
    b = flow_plain().sample((4,))
    assert torch.allclose(a, m + b @ L.T)
    assert plain.shape == (1000, 3) and "preconditioned" in repr(flow)
    assert {"precond_loc", "precond_tril"} <= set(flow.state_dict())
    assert all("precond" not in name for name, _ in flow.named_parameters())
    flow.set_preconditioner(None)
    assert len(flow.transforms()) == 2 and "precond_loc" not in flow.state_dict()


def test_flow_preconditioner_follows_dtype_and_rejects_bad_input():
    flow = Flow(2, "radial", 1).double()
    flow.set_preconditioner(torch.zeros(2), torch.eye(2))  # float32 in, float64 kept
    assert flow.precond_tril.dtype == F64 and flow().sample().dtype == F64
    with pytest.raises(ValueError, match="shape"):
        flow.set_preconditioner(torch.zeros(3), torch.eye(3))
    with pytest.raises(ValueError, match="positive"):
        flow.set_preconditioner(torch.zeros(2), torch.diag(torch.tensor([1.0, 0.0])))
    with pytest.raises(ValueError, match="finite"):
        flow.set_preconditioner(torch.tensor([0.0, math.nan]), torch.eye(2))
    with pytest.raises(ValueError, match="no scale_tril"):
        flow.set_preconditioner(None, torch.eye(2))


# ---------------------------------------------------------------------------------------------
# The guides on a Gaussian posterior: the untrained guide is exact
# ---------------------------------------------------------------------------------------------
@parametrize_guides
def test_untrained_guide_is_the_exact_gaussian_posterior(cls):
    x, y = regression_data()
    mean, cov, log_evidence = exact_answer(x, y)
    assert abs(cov[0, 1] / cov.diag().prod().sqrt()) > 0.999  # the test's point: a thin ridge
    guide = cls(regression_model, **SMALL[cls], precondition="laplace")
    assert setup_quietly(guide, x, y) == []
    info = guide.laplace_info
    assert info["used"] and info["reason"] is None and info["newton_decrement"] < 1e-3
    assert info["seconds"] > 0
    assert torch.allclose(guide.flow.precond_loc, mean, rtol=1e-6, atol=1e-8)
    L = guide.flow.precond_tril
    assert torch.allclose(L @ L.T, cov, rtol=1e-5, atol=1e-12)
    # constant importance weights: the ELBO is log p(y) exactly, k-hat meaningless but ESS full
    d = pyro_nf.diagnose(regression_model, guide, x, y, num_samples=500)
    assert abs(d.elbo - float(log_evidence)) < 1e-6
    assert d.ess > 499
    torch.manual_seed(0)
    loss = Trace_ELBO(num_particles=10, vectorize_particles=True).loss(
        regression_model, guide, x, y
    )
    assert abs(-loss - float(log_evidence)) < 1e-6
    fast = FastELBO(num_particles=10).loss(regression_model, guide, x, y)
    assert abs(-fast - float(log_evidence)) < 1e-6


def test_plain_guide_is_far_from_that_posterior():
    """The control: without the preconditioner the same start is poor (the test above is not
    trivially true)."""
    x, y = regression_data()
    _, _, log_evidence = exact_answer(x, y)
    guide = AutoIAFFlow(regression_model, **SMALL[AutoIAFFlow], precondition=None)
    d = pyro_nf.diagnose(regression_model, guide, x, y, num_samples=500)
    assert d.elbo < float(log_evidence) - 100 and guide.laplace_info is None


@parametrize_guides
def test_training_keeps_the_preconditioner_fixed(cls, tmp_path):
    x, y = regression_data()
    _, _, log_evidence = exact_answer(x, y)
    pyro.clear_param_store()
    guide = cls(regression_model, **SMALL[cls], precondition="laplace")
    setup_quietly(guide, x, y)
    L0 = guide.flow.precond_tril.clone()
    result = pyro_nf.fit(regression_model, guide, x, y, num_steps=30, lr=0.01, progress=False)
    assert all(math.isfinite(v) for v in result.losses)
    assert torch.equal(guide.flow.precond_tril, L0)
    d = pyro_nf.diagnose(regression_model, guide, x, y, num_samples=2000)
    assert abs(d.elbo - float(log_evidence)) < 0.5  # 30 noisy steps from the exact answer
    # state dict round trip into a fresh (re-preconditioned) guide
    fresh = cls(regression_model, **SMALL[cls], precondition="laplace")
    setup_quietly(fresh, x, y)
    fresh.load_state_dict(guide.state_dict())
    z = torch.randn(5, guide.latent_dim, dtype=F64) + guide.flow.precond_loc
    assert torch.allclose(guide.get_posterior().log_prob(z), fresh.get_posterior().log_prob(z))


@parametrize_guides
def test_neutra_transform_and_predictive_include_the_preconditioner(cls):
    x, y = regression_data()
    guide = cls(regression_model, **SMALL[cls], precondition="laplace")
    setup_quietly(guide, x, y)
    t, base = guide.get_transform(), guide.get_base_dist()
    e = base.sample((6,))
    z = t(e)
    lp = guide.get_posterior().log_prob(z)
    assert torch.allclose(lp, base.log_prob(e) - t.log_abs_det_jacobian(e, z))
    assert torch.allclose(t.inv(z), e, atol=1e-6)
    draws = Predictive(regression_model, guide=guide, num_samples=2000)(x, None)
    mean, cov, _ = exact_answer(x, y)
    coef = draws["coef"].reshape(2000, 2)
    assert torch.allclose(coef.mean(0), mean, atol=4 * cov.diag().sqrt().max() / 2000**0.5)
    assert draws["y"].shape[-1] == x.shape[0]


def test_float32_model_gets_a_float32_preconditioner():
    x, y = regression_data(dtype=torch.float32)
    x, y = x - 100.0, y - 30.0  # keep float32 well conditioned
    guide = AutoPlanarFlow(regression_model, num_transforms=2, precondition="laplace")
    setup_quietly(guide, x, y)
    assert guide.laplace_info["used"]
    assert guide.flow.precond_tril.dtype == torch.float32
    assert guide(x, y)["coef"].dtype == torch.float32


# ---------------------------------------------------------------------------------------------
# Failure paths
# ---------------------------------------------------------------------------------------------
@parametrize_guides
def test_funnel_has_no_mode_and_falls_back_with_a_warning(cls):
    pyro.set_rng_seed(0)  # init_to_median draws from the prior
    guide = cls(funnel, **SMALL[cls], precondition="laplace")
    messages = setup_quietly(guide)
    assert len(messages) == 1 and "precondition='laplace'" in messages[0]
    assert "starting without the preconditioner" in messages[0]
    assert not guide.laplace_info["used"] and guide.laplace_info["reason"]
    assert guide.flow.precond_tril is None
    pyro.set_rng_seed(0)
    plain = cls(funnel, **SMALL[cls], precondition=None)
    plain.setup()
    assert torch.equal(guide.flow.affine.raw, plain.flow.affine.raw)  # the plain start exactly


def test_non_finite_start_falls_back():
    def model():
        pyro.sample("s", dist.HalfNormal(1.0))
        pyro.factor("bad", torch.tensor(-math.inf))

    guide = AutoRadialFlow(model, num_transforms=1, precondition="laplace")
    messages = setup_quietly(guide)
    assert "not finite" in guide.laplace_info["reason"] and len(messages) == 1


def test_subsampled_model_is_refused():
    data = torch.randn(100)

    def model():
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", 100, subsample_size=10) as idx:
            pyro.sample("obs", dist.Normal(mu, 1.0), obs=data[idx])

    guide = AutoIAFFlow(model, num_transforms=1, precondition="laplace")
    with pytest.raises(ValueError, match="subsampled plate 'data'"):
        guide.setup()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(precondition="newton"), "precondition must be None, 'auto' or 'laplace'"),
        (dict(precondition="laplace", laplace_max_iter=0), "laplace_max_iter"),
        (dict(laplace_max_iter=2.5), "laplace_max_iter"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AutoPlanarFlow(regression_model, **kwargs)


@pytest.mark.parametrize("device", DEVICES)
def test_preconditioner_follows_the_model_device(device):
    x, y = regression_data()
    x, y = x.to(device), y.to(device)
    mean, cov, log_evidence = exact_answer(x.cpu(), y.cpu())
    guide = AutoIAFFlow(regression_model, **SMALL[AutoIAFFlow], precondition="laplace")
    setup_quietly(guide, x, y)
    assert guide.laplace_info["used"]
    assert guide.flow.precond_tril.device.type == device
    assert torch.allclose(guide.flow.precond_loc.cpu(), mean, rtol=1e-6, atol=1e-8)
    d = pyro_nf.diagnose(regression_model, guide, x, y, num_samples=200)
    assert abs(d.elbo - float(log_evidence)) < 1e-6
    assert guide(x, y)["coef"].device.type == device


# ---------------------------------------------------------------------------------------------
# precondition="auto", the default: the Laplace start where it is usable, else the plain start
# ---------------------------------------------------------------------------------------------
@parametrize_guides
def test_default_is_the_laplace_start_where_a_mode_exists(cls):
    x, y = regression_data()
    mean, cov, log_evidence = exact_answer(x, y)
    guide = cls(regression_model, **SMALL[cls])  # no precondition argument
    assert guide._options.precondition == "auto"
    assert setup_quietly(guide, x, y) == []
    assert guide.laplace_info["used"]
    assert torch.allclose(guide.flow.precond_loc, mean, rtol=1e-6, atol=1e-8)
    L = guide.flow.precond_tril
    assert torch.allclose(L @ L.T, cov, rtol=1e-5, atol=1e-12)
    d = pyro_nf.diagnose(regression_model, guide, x, y, num_samples=200)
    assert abs(d.elbo - float(log_evidence)) < 1e-6


@parametrize_guides
def test_auto_falls_back_quietly_to_the_plain_start(cls):
    """A funnel has no mode: "auto" says so in laplace_info only (no warning) and starts
    exactly as precondition=None does."""
    pyro.set_rng_seed(0)
    guide = cls(funnel, **SMALL[cls])
    assert setup_quietly(guide) == []
    reason = guide.laplace_info["reason"]
    assert not guide.laplace_info["used"] and ("no mode" in reason or "not positive" in reason)
    assert guide.flow.precond_tril is None
    pyro.set_rng_seed(0)
    plain = cls(funnel, **SMALL[cls], precondition=None)
    plain.setup()
    assert plain.laplace_info is None
    assert torch.equal(guide.flow.affine.raw, plain.flow.affine.raw)


def test_auto_does_not_try_a_subsampled_model():
    data = torch.randn(100)

    def model():
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", 100, subsample_size=10) as idx:
            pyro.sample("obs", dist.Normal(mu, 1.0), obs=data[idx])

    guide = AutoIAFFlow(model, num_transforms=1)
    assert setup_quietly(guide) == []  # where precondition="laplace" refuses the model
    assert not guide.laplace_info["used"]
    assert "subsamples (plate 'data')" in guide.laplace_info["reason"]
    assert guide.flow.precond_tril is None


def test_auto_does_not_try_beyond_its_dimension_limit(monkeypatch):
    from pyro_nf import _laplace

    x, y = regression_data()
    monkeypatch.setattr(_laplace, "AUTO_LAPLACE_MAX_DIM", 1)  # the model has 2 latent dims
    guide = AutoPlanarFlow(regression_model, num_transforms=2)
    assert setup_quietly(guide, x, y) == []
    assert not guide.laplace_info["used"] and "2 latent dimensions" in guide.laplace_info["reason"]
    assert guide.laplace_info["iterations"] == 0 and guide.flow.precond_tril is None
    forced = AutoPlanarFlow(regression_model, num_transforms=2, precondition="laplace")
    setup_quietly(forced, x, y)
    assert forced.laplace_info["used"]  # the limit is "auto"'s only


def test_auto_falls_back_when_the_log_density_raises():
    """Any error in the mode search means the plain start for "auto" (the guide still trains),
    where precondition="laplace" lets an error it does not expect through."""

    def model():
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        if mu.requires_grad:  # only in the mode search: the set-up's own runs have plain values
            raise NotImplementedError("no gradient here")
        pyro.sample("obs", dist.Normal(mu, 1.0), obs=torch.tensor(0.5))

    guide = AutoPlanarFlow(model, num_transforms=2)
    assert setup_quietly(guide) == []
    assert not guide.laplace_info["used"]
    assert guide.laplace_info["reason"].startswith("the mode search failed")
    assert "no gradient here" in guide.laplace_info["reason"]
    assert guide.flow.precond_tril is None
    with pytest.raises(NotImplementedError, match="no gradient here"):
        AutoPlanarFlow(model, num_transforms=2, precondition="laplace").setup()


def sine_ridge():
    """Rezende & Mohamed's U2 in a soft box, under a nearly flat prior: at the mode (0, 0) the
    Hessian sees neither the box nor the prior, so along the ridge the inverse Hessian is
    hundreds of times wider than the box the posterior lives in."""
    z = pyro.sample("z", dist.Normal(torch.zeros(2), 1e3).to_event(1))
    ridge = -0.5 * ((z[..., 1] - torch.sin(math.pi * z[..., 0] / 2)) / 0.4) ** 2
    box = -0.5 * (torch.relu(z[..., 0].abs() - 4) / 0.5) ** 2
    pyro.factor("u2", ridge + box)


@parametrize_guides
def test_auto_keeps_the_plain_start_where_the_laplace_start_is_far_too_wide(cls):
    kwargs = {**SMALL[cls], "init_loc_fn": init_to_value(values={"z": torch.zeros(2)})}
    forced = cls(sine_ridge, **kwargs, precondition="laplace")
    setup_quietly(forced)
    assert forced.laplace_info["used"]  # a mode, a positive definite Hessian ...
    assert float(forced.flow.precond_tril.diagonal().max()) > 100  # ... and a start far too wide
    pyro.set_rng_seed(0)
    guide = cls(sine_ridge, **kwargs)
    assert setup_quietly(guide) == []
    info = guide.laplace_info
    assert not info["used"] and "ELBO" in info["reason"]
    assert info["elbo_laplace"] < info["elbo_plain"] - 100
    assert guide.flow.precond_tril is None
    pyro.set_rng_seed(0)
    plain = cls(sine_ridge, **kwargs, precondition=None)
    plain.setup()
    assert torch.equal(guide.flow.affine.raw, plain.flow.affine.raw)


def test_start_elbo_is_the_log_evidence_at_the_exact_posterior():
    """On a Gaussian posterior the Laplace start is exact: every draw's log p - log q is log Z."""
    from pyro_nf._laplace import start_elbo

    x, y = regression_data()
    mean, cov, log_evidence = exact_answer(x, y)
    guide = AutoPlanarFlow(regression_model, num_transforms=2)
    setup_quietly(guide, x, y)
    info = guide.laplace_info
    assert info["used"] and abs(info["elbo_laplace"] - float(log_evidence)) < 1e-6
    assert info["elbo_plain"] < info["elbo_laplace"]
    log_joint = guide._log_joint_fn((x, y), {})
    tril = torch.linalg.cholesky(cov)
    assert abs(start_elbo(log_joint, mean, tril) - float(log_evidence)) < 1e-6
    # a diagonal start with the wrong scale is strictly worse (Gibbs' inequality)
    assert start_elbo(log_joint, mean, cov.diagonal().sqrt() * 3) < float(log_evidence) - 0.1
    # the model failing at a draw makes the estimate -inf, not an error
    assert start_elbo(lambda v: torch.tensor(float("nan")), mean, tril) == -math.inf


def test_auto_falls_back_when_the_start_check_raises():
    """An error the model raises only at the ELBO check's draws (not in the mode search) still
    means the plain start for "auto", with the reason, never a failed set-up."""

    def model():
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        if not mu.requires_grad and abs(float(mu)) > 1.0:  # a check draw far from the mode
            raise TypeError("not out here")
        pyro.sample("obs", dist.Normal(mu, 1.0), obs=torch.tensor(0.5))

    guide = AutoPlanarFlow(
        model, num_transforms=2, init_loc_fn=init_to_value(values={"mu": torch.tensor(0.0)})
    )
    assert setup_quietly(guide) == []
    info = guide.laplace_info
    assert not info["used"] and "not out here" in info["reason"]
    assert math.isnan(info["elbo_laplace"]) and guide.flow.precond_tril is None
