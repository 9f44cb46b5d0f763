"""Amortized flows as VAE posteriors: ``pyro.sample("z", flow(encoder(x)))`` inside a data plate.

Small synthetic data throughout; the MNIST comparison itself is ``benchmarks/vae.py`` (the last test
runs its CI configuration).
"""

import math
import os
import subprocess
import sys

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, RenyiELBO, Trace_ELBO
from pyro.optim import Adam
from torch import nn

import pyro_nf
from pyro_nf import Flow

pytestmark = pytest.mark.usefixtures("one_torch_thread")

D, H, P = 2, 6, 5  # latent, context and data sizes
# (id, transform, K): K = 0 is the amortized diagonal Normal (the VAE's usual posterior)
POSTERIORS = [("gaussian", "planar", 0), ("planar", "planar", 3), ("radial", "radial", 3), ("iaf", "iaf", 2)]  # fmt: skip
parametrize_posteriors = pytest.mark.parametrize(
    "transform, k", [p[1:] for p in POSTERIORS], ids=[p[0] for p in POSTERIORS]
)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_flow(transform, k, dim=D, context_dim=H):
    kwargs = {"hidden_dims": (16,)} if transform == "iaf" else {}
    return Flow(dim, transform, k, context_dim=context_dim, **kwargs)


def perturb(module, scale=0.3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return module


class TinyVAE(nn.Module):
    """A VAE whose guide differs from the textbook one only by ``flow(h)``."""

    def __init__(self, transform, k, num_data):
        super().__init__()
        self.num_data = num_data
        self.encoder = nn.Sequential(nn.Linear(P, H), nn.Tanh())
        self.decoder = nn.Linear(D, P)
        self.flow = make_flow(transform, k)

    def model(self, x, subsample_size=None, subsample=None):
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", self.num_data, subsample_size=subsample_size, subsample=subsample) as idx:  # fmt: skip
            z = pyro.sample("z", dist.Normal(torch.zeros(D), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(self.decoder(z), 0.5).to_event(1), obs=x[idx])

    def guide(self, x, subsample_size=None, subsample=None):
        pyro.module("encoder", self.encoder)
        pyro.module("flow", self.flow)
        with pyro.plate("data", self.num_data, subsample_size=subsample_size, subsample=subsample) as idx:  # fmt: skip
            pyro.sample("z", self.flow(self.encoder(x[idx])))


# --------------------------------------------------------------------------------------------
# In a plate, with any batch size, particles and IWAE-style objectives
# --------------------------------------------------------------------------------------------
@parametrize_posteriors
def test_plate_with_varying_batch_size_particles_and_iwae(transform, k):
    n = 23
    data = torch.randn(n, P)
    vae = TinyVAE(transform, k, n)
    objectives = [
        Trace_ELBO(max_plate_nesting=1),
        Trace_ELBO(num_particles=3, vectorize_particles=True, max_plate_nesting=1),
        RenyiELBO(
            alpha=0.0, num_particles=4, vectorize_particles=True, max_plate_nesting=1
        ),  # IWAE
        RenyiELBO(alpha=0.5, num_particles=3, max_plate_nesting=1),
    ]
    for batch in (1, 7, n):  # n: no subsampling
        for objective in objectives:
            svi = SVI(vae.model, vae.guide, Adam({"lr": 1e-2}), objective)
            for _ in range(2):
                assert math.isfinite(svi.step(data, batch))
        tr = pyro.poutine.trace(vae.guide).get_trace(data, batch)
        z = tr.nodes["z"]
        assert z["value"].shape == (batch, D)
        assert z["fn"].batch_shape == (batch,) and z["fn"].event_shape == (D,)
        assert z["scale"] == pytest.approx(n / batch)
        with pyro.plate("particles", 4, dim=-2):  # how Pyro vectorizes particles
            tr = pyro.poutine.trace(vae.guide).get_trace(data, batch)
        tr.compute_log_prob()
        assert tr.nodes["z"]["value"].shape == (4, batch, D)
        assert tr.nodes["z"]["log_prob"].shape == (4, batch)
        assert torch.isfinite(tr.nodes["z"]["log_prob"]).all()


@parametrize_posteriors
def test_explicit_batches_with_a_partial_last_batch(transform, k):
    """User-defined subsampling (``pyro.plate(..., subsample=idx)``), as in benchmarks/vae.py."""
    n = 23
    data = torch.randn(n, P)
    vae = TinyVAE(transform, k, n)
    svi = SVI(vae.model, vae.guide, Adam({"lr": 1e-2}), Trace_ELBO(max_plate_nesting=1))
    for idx in torch.randperm(n).split(10):  # 10, 10, 3
        assert math.isfinite(svi.step(data, None, idx))


# --------------------------------------------------------------------------------------------
# Wrong contexts are refused with a message that says what is wrong
# --------------------------------------------------------------------------------------------
@parametrize_posteriors
def test_context_of_wrong_shape_or_type_gives_a_clear_error(transform, k):
    flow = make_flow(transform, k)
    with pytest.raises(ValueError, match=rf"expects a context of shape \(\.\.\., {H}\), got \(4, {H + 1}\)"):  # fmt: skip
        flow(torch.randn(4, H + 1))
    with pytest.raises(ValueError, match=rf"expects a context of shape \(\.\.\., {H}\), got \(\)"):
        flow(torch.tensor(1.0))
    with pytest.raises(ValueError, match=rf"needs a context: call it with a tensor of shape \(\.\.\., {H}\)"):  # fmt: skip
        flow()
    with pytest.raises(TypeError, match="floating-point"):
        flow(torch.ones(4, H, dtype=torch.long))
    with pytest.raises(TypeError, match="dtype"):
        flow(torch.randn(4, H, dtype=torch.float64))
    with pytest.raises(TypeError, match="torch.Tensor"):
        flow([[0.0] * H])
    # an unbatched context is one datapoint
    assert flow(torch.randn(H)).batch_shape == ()


def test_wrong_encoder_output_is_reported_from_inside_svi():
    """The error surfaces unchanged from ``svi.step`` when the encoder's width does not match."""
    n = 10
    data = torch.randn(n, P)
    vae = TinyVAE("iaf", 2, n)
    vae.encoder = nn.Linear(P, H - 1)
    svi = SVI(vae.model, vae.guide, Adam({"lr": 1e-2}), Trace_ELBO(max_plate_nesting=1))
    with pytest.raises(ValueError, match=rf"Flow expects a context of shape \(\.\.\., {H}\), got \({n}, {H - 1}\)"):  # fmt: skip
        svi.step(data)


# --------------------------------------------------------------------------------------------
# Scoring values the flow did not draw
# --------------------------------------------------------------------------------------------
@parametrize_posteriors
def test_log_prob_of_arbitrary_values_is_per_datapoint(transform, k):
    """A batch of contexts scores each datapoint under its own flow, for any values."""
    flow = perturb(make_flow(transform, k).double())
    h = torch.randn(5, H, dtype=torch.float64)
    d = flow(h)
    values = torch.randn(3, 5, D, dtype=torch.float64) * 2.0
    lp = d.log_prob(values)
    assert lp.shape == (3, 5)
    for i in range(5):
        alone = flow(h[i]).log_prob(values[:, i])
        assert torch.allclose(lp[:, i], alone, atol=1e-10)
    # one value broadcast against every datapoint; values far out stay finite
    assert d.log_prob(values[0, 0]).shape == (5,)
    assert torch.isfinite(d.log_prob(40.0 * torch.randn(5, D, dtype=torch.float64))).all()
    # a sample drawn for datapoint 0, scored under every datapoint's posterior: exactly the inverse
    z = d.sample()
    assert torch.allclose(d.log_prob(z), d.log_prob(z.clone()), atol=1e-10)


@parametrize_posteriors
def test_every_datapoints_density_is_normalized(transform, k):
    """Quadrature in 2-D: each context gives its own density, and each integrates to 1."""
    # (mild perturbation: near-singular planar layers and long IAF tails need finer grids)
    flow = perturb(make_flow(transform, k).double(), scale=0.15 if transform == "iaf" else 0.2)
    h = torch.randn(2, H, dtype=torch.float64)
    d = flow(h)
    z = d.sample((4000,))
    lo, hi = z.amin((0, 1)) - 3 * z.std((0, 1)), z.amax((0, 1)) + 3 * z.std((0, 1))
    n = 300
    g0 = torch.linspace(lo[0].item(), hi[0].item(), n, dtype=torch.float64)
    g1 = torch.linspace(lo[1].item(), hi[1].item(), n, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(g0, g1, indexing="ij"), -1).reshape(-1, 1, 2)
    with torch.no_grad():
        lp = d.log_prob(grid)
    mass = lp.exp().sum(0) * (g0[1] - g0[0]) * (g1[1] - g1[0])
    assert torch.allclose(mass, torch.ones(2, dtype=torch.float64), atol=2e-3)
    assert not torch.allclose(lp[:, 0], lp[:, 1])  # the datapoints have different posteriors


def test_planar_log_prob_inverts_exactly_for_any_per_datapoint_parameters():
    """Scoring goes through the inverse: forward(inverse(y)) must give y back for every datapoint."""
    flow = perturb(make_flow("planar", 2).double(), scale=1.0)
    h = torch.randn(200, H, dtype=torch.float64)
    y = 5.0 * torch.randn(200, D, dtype=torch.float64)
    x = y
    transforms = flow.transforms(h)
    for t in reversed(transforms):
        x = t.inv(x)
    for t in transforms:
        x = t(x)
    assert torch.allclose(x, y, atol=1e-8)


# --------------------------------------------------------------------------------------------
# Gradients reach the encoder through every layer
# --------------------------------------------------------------------------------------------
def _context_inputs(flow):
    """Every linear map that reads the context: the base head, and each layer's head (or MADE input)."""
    heads = {"affine": flow.affine.head}
    for i, layer in enumerate(flow.layers):
        heads[f"layer {i}"] = layer.made.context if hasattr(layer, "made") else layer.head
    return heads


@parametrize_posteriors
def test_gradients_reach_the_encoder_through_every_layer(transform, k):
    n = 12
    data = torch.randn(n, P)
    vae = TinyVAE(transform, k, n)
    svi = SVI(vae.model, vae.guide, Adam({"lr": 5e-2}), Trace_ELBO(max_plate_nesting=1))
    for _ in range(5):  # the heads start at zero weight; a few steps make every path live
        svi.step(data)
    grads, handles = {}, []
    for name, head in _context_inputs(vae.flow).items():

        def pre_hook(module, args, name=name):
            h = args[0] * 1.0  # a separate node per head: its gradient is this path's alone
            h.register_hook(lambda g, name=name: grads.__setitem__(name, g))
            return (h,)

        handles.append(head.register_forward_pre_hook(pre_hook))
    vae.zero_grad()
    loss = Trace_ELBO(max_plate_nesting=1).differentiable_loss(vae.model, vae.guide, data)
    loss.backward()
    for handle in handles:
        handle.remove()
    assert set(grads) == {"affine"} | {f"layer {i}" for i in range(k)}
    for name, g in grads.items():
        assert torch.isfinite(g).all() and g.abs().sum() > 0, f"no gradient into h through {name}"
    for p in vae.encoder.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0
    for name, p in vae.flow.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


# --------------------------------------------------------------------------------------------
# A known answer: linear-Gaussian VAE whose exact posterior the amortized flow can represent
# --------------------------------------------------------------------------------------------
def _linear_gaussian(n=7, sigma=0.5, seed=0):
    """z ~ N(0, I), x ~ N(A z, sigma^2 I) with orthogonal columns of A: the posterior is Gaussian
    with a diagonal covariance, (I + A^T A / sigma^2)^-1, and a mean linear in x."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(P, D, generator=gen, dtype=torch.float64))
    a = q * torch.tensor([1.5, 0.7], dtype=torch.float64)
    prec = torch.eye(D, dtype=torch.float64) + a.T @ a / sigma**2
    cov = torch.linalg.inv(prec)
    gain = cov @ a.T / sigma**2  # posterior mean = gain @ x
    x = torch.randn(n, P, generator=gen, dtype=torch.float64) * 2.0
    marginal = dist.MultivariateNormal(
        torch.zeros(P, dtype=torch.float64), a @ a.T + sigma**2 * torch.eye(P, dtype=torch.float64)
    )
    return a, sigma, x, gain, cov.diagonal().sqrt(), marginal.log_prob(x)


@parametrize_posteriors
def test_log_marginal_likelihood_of_the_exact_amortized_posterior(transform, k):
    """With the base head set to the exact posterior (layers at their identity start), every
    importance weight equals p(x_i): the per-datapoint estimates are exact."""
    a, sigma, x, gain, post_sd, exact = _linear_gaussian()
    flow = make_flow(transform, k, context_dim=P).double()
    with torch.no_grad():
        flow.affine.head.weight.zero_()
        flow.affine.head.weight[:D] = gain
        flow.affine.head.bias[:D] = 0.0
        flow.affine.head.bias[D:] = post_sd + torch.log(-torch.expm1(-post_sd))  # softplus^-1

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(D, dtype=x.dtype), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ a.T, sigma).to_event(1), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", flow(x))

    est = pyro_nf.log_marginal_likelihood(model, guide, x, num_samples=50, chunk_size=20, data_plate="data")  # fmt: skip
    assert torch.allclose(est.per_datapoint, exact, atol=1e-8)
    # the same with the datapoints scored in two subsampled batches
    halves = [pyro_nf.log_marginal_likelihood(model, guide, x[s], num_samples=10, data_plate="data") for s in (slice(0, 3), slice(3, None))]  # fmt: skip
    assert torch.allclose(torch.cat([e.per_datapoint for e in halves]), exact, atol=1e-8)


def test_training_the_encoder_and_flow_reaches_the_exact_evidence(transform="iaf", k=2):
    """Fitting only the guide (encoder + amortized flow) by SVI closes the gap to log p(x)."""
    a, sigma, x, _, _, exact = _linear_gaussian(n=32)
    x, a = x.float(), a.float()
    encoder = nn.Linear(P, H)
    flow = make_flow(transform, k)

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(D), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ a.T, sigma).to_event(1), obs=x)

    def guide(x):
        pyro.module("encoder", encoder)
        pyro.module("flow", flow)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", flow(encoder(x)))

    elbo = Trace_ELBO(num_particles=8, vectorize_particles=True, max_plate_nesting=1)
    final = Trace_ELBO(num_particles=400, vectorize_particles=True, max_plate_nesting=1)

    def gap():  # ELBO - log p(x), per datapoint; <= 0, and 0 only at the exact posterior
        return (-final.loss(model, guide, x) - exact.sum().item()) / x.shape[0]

    start = gap()
    svi = SVI(model, guide, Adam({"lr": 2e-2}), elbo)
    for _ in range(300):
        svi.step(x)
    assert start < -1.0 and -0.06 < gap() < 0.02


# --------------------------------------------------------------------------------------------
# The example's CI configuration
# --------------------------------------------------------------------------------------------
@pytest.mark.slow  # 15 s on an idle 2-core machine, over a minute under load
def test_vae_benchmark_quick(tmp_path):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    env = dict(os.environ, MPLBACKEND="Agg", OMP_NUM_THREADS="1")
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "vae.py"), "--quick", "--out", str(tmp_path)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "test -log p(x)" in proc.stdout
    report = (tmp_path / "vae.md").read_text()
    assert "| Gaussian |" in report and "| IAF K=2 |" in report
    assert "| Pyro ConditionalPlanar K=16 |" in report  # the timing baseline ran
    for kind in ("curves", "reconstructions", "samples", "epoch_times"):
        assert (tmp_path / f"vae_digits_{kind}.png").stat().st_size > 0


@pytest.mark.slow  # two short digits runs, about 10 s
def test_own_noise_makes_a_posterior_independent_of_the_others(tmp_path):
    """With --own-noise a posterior's result is the same whether or not others train beside it
    (without it they share torch's global stream); benchmarks/vae_seeds.py relies on this."""
    pytest.importorskip("sklearn")
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import vae  # benchmarks/vae.py

    def final_nll(names, own_noise):
        argv = ["--epochs", "2", "--iw-samples", "20", "--out", str(tmp_path)]
        args = vae.build_parser().parse_args(argv + (["--own-noise"] if own_noise else []))
        res = vae.run_dataset("digits", names, args, torch.device("cpu"))
        return {r.name: r.final["nll"] for r in res.runs}

    alone = final_nll(["iaf2"], own_noise=True)["iaf2"]
    beside = final_nll(["gaussian", "iaf2"], own_noise=True)["iaf2"]
    assert alone == beside
    shared_alone = final_nll(["iaf2"], own_noise=False)["iaf2"]
    shared_beside = final_nll(["gaussian", "iaf2"], own_noise=False)["iaf2"]
    assert shared_alone != shared_beside  # the control: the shared stream does couple them


@pytest.mark.slow  # two short digits runs of three posteriors, about 20 s
def test_vae_seeds_benchmark_quick(tmp_path):
    pytest.importorskip("sklearn")
    env = dict(os.environ, MPLBACKEND="Agg", OMP_NUM_THREADS="1")
    results = tmp_path / "seeds.md"
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "vae_seeds.py"), "--quick",
           "--dataset", "digits", "--seeds", "0", "1", "--threads", "1",
           "--out", str(tmp_path), "--results", str(results)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = results.read_text()
    for row in ("| Gaussian |", "| planar K=16 |", "| IAF K=4 |", "| Gaussian minus IAF K=4 |"):
        assert row in report
    assert "seed 0 | seed 1 |" in report and "## The issue's claims" in report
