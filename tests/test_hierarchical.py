"""AutoHierarchicalFlow: globals + local latents in subsampled plates."""

import math
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, Predictive, Trace_ELBO
from pyro.optim import ClippedAdam

import pyro_nf
from pyro_nf import AutoHierarchicalFlow

TAU, SIGMA = 1.0, 1.0


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def data(num_groups=40, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = 1.5 + TAU * torch.randn(num_groups, generator=g)
    return z[:, None] + SIGMA * torch.randn(num_groups, n, generator=g)


def conjugate(x, batch=10, subsample=None):
    mu = pyro.sample("mu", dist.Normal(x.new_zeros(()), 10.0))
    size = None if subsample is not None else batch
    with pyro.plate("groups", len(x), subsample_size=size, subsample=subsample) as idx:
        z = pyro.sample("z", dist.Normal(mu, TAU))
        pyro.sample("x", dist.Normal(z.unsqueeze(-1), SIGMA).to_event(1), obs=x[idx])


def rich(x, batch=10):
    """Constrained globals, a global in a full plate, several locals (vector, positive) and an
    inner full plate, the group plate at dim -2."""
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    s = pyro.sample("s", dist.LogNormal(0.0, 1.0))
    with pyro.plate("feat", 2, dim=-1):
        w = pyro.sample("w", dist.Normal(0.0, 1.0))
    with pyro.plate("groups", len(x), subsample_size=batch, dim=-2) as idx:
        z = pyro.sample("z", dist.Normal(mu, s))  # (B, 1)
        v = pyro.sample("v", dist.Normal(0.0, 1.0).expand([3]).to_event(1))  # (B, 1, 3)
        r = pyro.sample("r", dist.Gamma(2.0, 2.0))  # (B, 1)
        with pyro.plate("obs", x.shape[1], dim=-1):
            loc = z + v.sum(-1) * 0.1 + w.sum() * 0.0
            pyro.sample("x", dist.Normal(loc, r), obs=x[idx])


def exact(x):
    n = x.shape[1]
    xbar = x.double().mean(1)
    s2 = TAU**2 + SIGMA**2 / n
    v = 1 / (1 / 100 + len(x) / s2)
    m = v * xbar.sum() / s2
    w = 1 / (1 / TAU**2 + n / SIGMA**2)
    return (
        m,
        math.sqrt(v),
        w * (m / TAU**2 + n * xbar / SIGMA**2),
        math.sqrt(w + (w / TAU**2) ** 2 * v),
    )


@pytest.mark.parametrize("batch", [1, 7, 40])
def test_shapes_across_minibatch_sizes(batch):
    x = data(40, 3)
    guide = AutoHierarchicalFlow(rich)
    guide(x, batch=5)  # set up at another minibatch size
    tr = poutine.trace(guide).get_trace(x, batch=batch)
    assert tr.nodes["mu"]["value"].shape == ()
    assert tr.nodes["s"]["value"].shape == () and tr.nodes["s"]["value"] > 0
    assert tr.nodes["w"]["value"].shape == (2,)
    assert tr.nodes["z"]["value"].shape == (batch, 1)
    assert tr.nodes["v"]["value"].shape == (batch, 1, 3)
    assert tr.nodes["r"]["value"].shape == (batch, 1) and (tr.nodes["r"]["value"] > 0).all()
    # the guide's indices are the ones the model uses when replayed against the guide
    mt = poutine.trace(poutine.replay(rich, trace=tr)).get_trace(x, batch=batch)
    assert torch.equal(mt.nodes["groups"]["value"], tr.nodes["groups"]["value"])
    assert len(set(tr.nodes["groups"]["value"].tolist())) == batch
    # and the ELBO is finite with the model
    loss = Trace_ELBO().loss(rich, guide, x, batch=batch)
    assert math.isfinite(loss)


def test_subsampling_scale_is_the_plates():
    x = data(40, 3)
    guide = AutoHierarchicalFlow(conjugate)
    tr = poutine.trace(guide).get_trace(x, batch=8)
    tr.compute_log_prob()
    aux = tr.nodes["_AutoHierarchicalFlow_groups_locals"]
    assert aux["scale"] == pytest.approx(40 / 8)
    assert torch.allclose(aux["log_prob_sum"], aux["unscaled_log_prob"].sum() * 5)
    glob = tr.nodes["_AutoHierarchicalFlow_globals"]
    assert glob["scale"] == 1.0


def test_subsampled_elbo_is_unbiased_for_the_full_data_elbo():
    x = data(30, 3)
    guide = AutoHierarchicalFlow(conjugate, num_transforms=0, local_num_transforms=0)
    guide(x)
    elbo = Trace_ELBO()
    with torch.no_grad():
        sub = torch.tensor([elbo.loss(conjugate, guide, x, batch=5) for _ in range(150)])
        full = torch.tensor([elbo.loss(conjugate, guide, x, batch=30) for _ in range(150)])
    se = math.sqrt(sub.var() / len(sub) + full.var() / len(full))
    assert abs(sub.mean() - full.mean()) < 4 * se
    # a wrong scale (no N / B) would be far off: the subsampled terms are a sixth of the total
    assert sub.var() > full.var()  # (subsampling adds noise, not bias)


@pytest.mark.slow  # about 30 s each on a loaded CPU
@pytest.mark.parametrize("amortized", [True, False])
def test_exact_on_conjugate_model(amortized):
    torch.set_default_dtype(torch.float64)
    try:
        x = data(30, 4, seed=1)
        m, s, z_mean, z_sd = exact(x)
        guide = AutoHierarchicalFlow(
            conjugate, amortized=amortized, num_transforms=0, local_num_transforms=0,
            hidden_dims=(),
        )  # fmt: skip
        svi = SVI(conjugate, guide, ClippedAdam({"lr": 0.05, "lrd": 0.997}), Trace_ELBO())
        for _ in range(1500):
            svi.step(x, batch=15)
        loc, scale = guide.nets["globals"].base_loc_scale()
        assert abs(loc.item() - m) < 0.15 * s
        assert abs(scale.item() / s - 1) < 0.15
        with torch.no_grad():
            draws = torch.stack([guide(x, batch=None)["z"] for _ in range(600)])
        assert (draws.mean(0) - z_mean).abs().max() < 0.3 * z_sd
        assert (draws.std(0) / z_sd - 1).abs().max() < 0.15
    finally:
        torch.set_default_dtype(torch.float32)


def test_refuses_discrete_local():
    def model(x):
        with pyro.plate("g", 10, subsample_size=3):
            pyro.sample("k", dist.Bernoulli(0.5))

    with pytest.raises(ValueError, match="'k' is discrete"):
        AutoHierarchicalFlow(model)(torch.zeros(3))


def test_refuses_nested_subsampled_plates():
    def model():
        with pyro.plate("a", 10, subsample_size=3, dim=-1):
            with pyro.plate("b", 10, subsample_size=2, dim=-2):
                pyro.sample("z", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match="'z' sits in the nested subsampled plates"):
        AutoHierarchicalFlow(model)()


def test_refuses_model_without_subsampled_plate():
    def model():
        with pyro.plate("a", 10):
            pyro.sample("z", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match="no latent site in a subsampled plate.*AutoIAFFlow"):
        AutoHierarchicalFlow(model)()
    # unless the plate is declared local
    assert AutoHierarchicalFlow(model, local_plates=["a"], amortized=False)()["z"].shape == (10,)


def test_refuses_changing_per_datapoint_shape():
    guide = AutoHierarchicalFlow(conjugate)
    guide(data(20, 3))
    with pytest.raises(ValueError, match="'x'.*4 values per datapoint here, 3 at set-up"):
        guide(data(20, 4))


def test_refuses_plate_without_observed_values_unless_per_datapoint():
    def model(batch=3):
        with pyro.plate("g", 10, subsample_size=batch):
            pyro.sample("z", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match="no observed site.*amortized=False"):
        AutoHierarchicalFlow(model)()
    assert AutoHierarchicalFlow(model, amortized=False)()["z"].shape == (3,)


def test_refuses_options_it_does_not_support():
    with pytest.raises(ValueError, match="does not support precondition"):
        AutoHierarchicalFlow(conjugate, precondition="laplace")


def test_refuses_vectorized_particles_and_fit_draws_them_one_at_a_time():
    x = data(20, 3)
    guide = AutoHierarchicalFlow(conjugate)
    guide(x)
    with pytest.raises(NotImplementedError, match="does not vectorize"):
        Trace_ELBO(num_particles=2, vectorize_particles=True, max_plate_nesting=1).loss(
            conjugate, guide, x
        )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # fit picks one particle at a time for it, silently
        result = pyro_nf.fit(conjugate, guide, x, num_steps=30, num_particles=2, progress=False)
    assert len(result.losses) == 30 and all(math.isfinite(v) for v in result.losses)


def test_user_given_subsample_is_followed():
    x = data(20, 3)
    guide = AutoHierarchicalFlow(conjugate, amortized=False)
    guide(x)
    with torch.no_grad():
        part = guide.nets["local[groups]"].normal
        part.loc.copy_(torch.arange(20.0)[:, None])
        part.raw_scale.fill_(-30.0)  # scale ~ 1e-13: each draw is the row's loc
    z = guide(x, subsample=torch.tensor([3, 17, 5]))["z"]
    assert torch.allclose(z, torch.tensor([3.0, 17.0, 5.0]))
    amortized = AutoHierarchicalFlow(conjugate)
    assert amortized(x, subsample=torch.tensor([0, 1]))["z"].shape == (2,)


def test_fit_trains_and_state_dict_round_trips():
    x = data(20, 3)
    guide = AutoHierarchicalFlow(conjugate)
    result = pyro_nf.fit(conjugate, guide, x, num_steps=200, lr=0.02, progress=False)
    assert sum(result.losses[-20:]) < sum(result.losses[:20])
    state = guide.state_dict()
    pyro.clear_param_store()
    fresh = AutoHierarchicalFlow(conjugate).setup(x)
    fresh.load_state_dict(state)
    pyro.set_rng_seed(3)
    a = guide(x, subsample=torch.arange(5))
    pyro.set_rng_seed(3)
    b = fresh(x, subsample=torch.arange(5))
    assert torch.equal(a["mu"], b["mu"]) and torch.equal(a["z"], b["z"])


def test_second_guide_in_a_used_param_store_trains_its_own_tensors():
    x = data(20, 3)
    pyro_nf.fit(conjugate, AutoHierarchicalFlow(conjugate), x, num_steps=5, progress=False)
    guide = AutoHierarchicalFlow(conjugate)
    before = guide.setup(x).nets["globals"].base_loc_scale()[0].clone()
    pyro_nf.fit(conjugate, guide, x, num_steps=20, lr=0.05, progress=False)
    assert not torch.equal(guide.nets["globals"].base_loc_scale()[0], before)


def test_predictive_on_subsample_and_full_data():
    x = data(20, 3)
    guide = AutoHierarchicalFlow(conjugate)
    guide(x)
    sub = Predictive(conjugate, guide=guide, num_samples=4)(x, batch=6)
    assert sub["z"].shape == (4, 6) and sub["x"].shape == (4, 6, 3)
    full = Predictive(conjugate, guide=guide, num_samples=4)(x, batch=None)
    assert full["z"].shape == (4, 20)


def test_to_inference_data_has_the_plate_dimension():
    x = data(20, 3)
    guide = AutoHierarchicalFlow(conjugate)
    guide(x)
    idata = pyro_nf.to_inference_data(conjugate, guide, x, batch=None, num_samples=8)
    assert idata.posterior["z"].dims == ("chain", "draw", "groups")
    assert idata.posterior.sizes["groups"] == 20
    assert idata.posterior["mu"].dims == ("chain", "draw")


def test_diagnose_integrates_the_locals_out():
    x = data(12, 3)
    guide = AutoHierarchicalFlow(conjugate, num_local_draws=3)
    pyro_nf.fit(conjugate, guide, x, num_steps=100, lr=0.02, progress=False)
    with pytest.raises(ValueError, match="full data"):
        guide.global_log_weights(conjugate, x, batch=4, num_samples=2)
    lw = guide.global_log_weights(conjugate, x, batch=None, num_samples=30)
    assert lw.shape == (30,) and torch.isfinite(lw).all()
    d = pyro_nf.diagnose(conjugate, guide, x, batch=None, num_samples=30)
    assert d.num_samples == 30 and math.isfinite(d.elbo)


def test_pseudo_marginal_weights_are_exact_for_the_exact_conditional():
    """With q(z_i | g, x_i) the exact conditional, one local draw per datapoint gives the exact
    marginal weight p(x, g) / q(g): check it against the closed form."""
    torch.set_default_dtype(torch.float64)
    try:
        x = data(6, 2, seed=2)
        n = x.shape[1]
        guide = AutoHierarchicalFlow(
            conjugate, num_transforms=0, local_num_transforms=0, hidden_dims=(),
            num_local_draws=1, local_plates=["groups"],
        )  # fmt: skip
        guide(x, batch=None)
        part = guide.nets["local[groups]"]
        w = 1 / (1 / TAU**2 + n / SIGMA**2)
        with torch.no_grad():  # head: z_i = w (mu + n xbar_i) + sqrt(w) eps from [x_std, g]
            head = part.flow.affine.head
            head.weight.zero_()
            head.bias.zero_()
            head.weight[0, :n] = w * part.x_scale / SIGMA**2
            head.bias[0] = w * (part.x_loc / SIGMA**2).sum()
            # the encoder sees mu standardized by the globals' affine layer: mu = a + b * g
            a, b = guide.nets["globals"].base_loc_scale()
            head.weight[0, n] = w / TAU**2 * b[0]
            head.bias[0] += w / TAU**2 * a[0]
            head.bias[1] = math.log(math.expm1(math.sqrt(w)))
        # the same draws' log q(mu) and the closed-form log p(x, mu): lw + log q = log p(x, mu)
        q = guide.nets["globals"]()
        pyro.set_rng_seed(0)
        lw = guide.global_log_weights(conjugate, x, batch=None, num_samples=1)
        pyro.set_rng_seed(0)
        mu = guide(x, batch=None)["mu"]
        xbar = x.mean(1)
        s2 = TAU**2 + SIGMA**2 / n
        log_px_mu = dist.Normal(0.0, 10.0).log_prob(mu)
        log_px_mu = log_px_mu + dist.Normal(mu, math.sqrt(s2)).log_prob(xbar).sum()
        # the within-group part of the likelihood, which does not depend on mu
        resid = ((x - xbar[:, None]) ** 2).sum()
        log_px_mu = (
            log_px_mu
            - 0.5 * resid / SIGMA**2
            - len(x) * (n - 1) / 2 * math.log(2 * math.pi * SIGMA**2)
            - len(x) * 0.5 * math.log(n)
        )
        expected = log_px_mu - q.log_prob(mu.reshape(1))
        assert torch.allclose(lw[0], expected, atol=1e-6)
    finally:
        torch.set_default_dtype(torch.float32)


def test_benchmark_closed_form_posterior_matches_dense_gaussian_conditioning():
    """benchmarks/hierarchical.py's exact posterior, against the joint Gaussian's precision."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "hierarchical.py"
    spec = importlib.util.spec_from_file_location("_hier_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    x = bench.conjugate_data(5, 3, seed=1).double()
    m, s, z_mean, z_sd = bench.exact_posterior(x)
    N, n = x.shape
    tau2, sig2 = bench.TAU**2, bench.SIGMA**2
    P = torch.zeros(N + 1, N + 1, dtype=torch.float64)  # (mu, z_1..z_N)
    P[0, 0] = 1 / bench.PRIOR_SD**2 + N / tau2
    P[0, 1:] = P[1:, 0] = -1 / tau2
    P[1:, 1:] = torch.eye(N, dtype=torch.float64) * (1 / tau2 + n / sig2)
    b = torch.cat([torch.zeros(1, dtype=torch.float64), x.sum(1) / sig2])
    cov = torch.linalg.inv(P)
    mean = cov @ b
    assert m == pytest.approx(mean[0].item(), rel=1e-10)
    assert s == pytest.approx(cov[0, 0].sqrt().item(), rel=1e-10)
    assert torch.allclose(z_mean, mean[1:], rtol=1e-10)
    assert torch.allclose(torch.full((N,), z_sd, dtype=torch.float64), cov.diagonal()[1:].sqrt())


def test_user_encoder_is_trained_once_per_step():
    x = data(20, 3)
    encoder = torch.nn.Sequential(torch.nn.Linear(3 + 1, 8), torch.nn.Tanh())
    guide = AutoHierarchicalFlow(conjugate, encoder=encoder)
    svi = SVI(conjugate, guide, ClippedAdam({"lr": 0.01}), Trace_ELBO())
    svi.step(x)
    store = pyro.get_param_store()
    tensors = [store[k] for k in store.keys()]
    assert len({id(t) for t in tensors}) == len(tensors)  # no tensor under two names
    assert any(t is encoder[0].weight for t in tensors)  # the user's module is trained
    assert sum(k.startswith("AutoHierarchicalFlow.nets") for k in store.keys()) == len(tensors)
    assert not any(k.startswith("AutoHierarchicalFlow._user") for k in guide.state_dict())
