"""Device and dtype follow the tensors: every layer, the flow and the workflow, on CPU and on CUDA.

Each test runs once per device in ``DEVICES``; the CUDA cases skip cleanly without a GPU, so the
same assertions run here on the CPU and, where a GPU is present, on it.
"""

import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from device_params import DEVICES, needs_cuda
from test_transforms import CASES, IDS, make_layer

import pyro_nf
from pyro_nf import Flow

DTYPES = [torch.float32, torch.float64]
TOL = {torch.float32: 1e-4, torch.float64: 1e-9}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("name,context_dim", CASES, ids=IDS)
def test_every_layer_runs_on_the_device_of_its_parameters(name, context_dim, dtype, device):
    layer = make_layer(name, context_dim).to(device=device, dtype=dtype)
    # drawn on the CPU and moved: every device is checked at the same points
    g = torch.Generator().manual_seed(1)
    context = torch.randn(6, context_dim, generator=g).to(device, dtype) if context_dim else None
    t = layer.condition(context)
    x = torch.randn(6, layer.dim, generator=g).to(device, dtype)
    y, ladj = t.call_and_ladj(x)
    assert y.device.type == device and y.dtype == dtype
    assert ladj.device.type == device and ladj.shape == (6,)
    x_back, ladj_back = t.inverse_and_ladj(y)
    assert x_back.device.type == device
    # The inverse solves f(x) = y to the dtype's precision, with the forward log-det at its x.
    y_again, ladj_again = t.call_and_ladj(x_back)
    torch.testing.assert_close(y_again, y, atol=TOL[dtype], rtol=TOL[dtype])
    torch.testing.assert_close(ladj_back, ladj_again, atol=TOL[dtype], rtol=TOL[dtype])
    # x itself is recovered to round-off times the layer's conditioning. For a random spline
    # layer in float32 that is heavy-tailed (this layer, 2000 random points on the CPU: median
    # 1e-4, 1% above 7e-3, at most 4e-2, while f(x_back) - y stayed below 4e-6), so x is
    # compared in float64 there, where it holds to 1e-9 like every layer.
    if not (name.startswith("spline") and dtype == torch.float32):
        torch.testing.assert_close(x_back, x, atol=TOL[dtype], rtol=TOL[dtype])
        torch.testing.assert_close(ladj_back, ladj, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("transform", ["planar", "radial", "iaf", "spline"])
def test_amortized_flow_on_the_device_of_its_context(transform, device):
    flow = Flow(3, transform, 2, context_dim=4).to(device)
    h = torch.randn(5, 4, device=device)
    d = flow(h)
    z = d.rsample((2,))
    assert z.device.type == device and z.shape == (2, 5, 3)
    lp = d.log_prob(torch.randn(5, 3, device=device))  # a value the flow did not sample
    assert lp.device.type == device and torch.isfinite(lp).all()
    d.log_prob(z).sum().backward()
    assert all(p.grad is not None and p.grad.device.type == device for p in flow.parameters())


def _model(x, y=None):
    w = pyro.sample("w", dist.Normal(x.new_zeros(2), 1.0).to_event(1))
    s = pyro.sample("s", dist.HalfNormal(x.new_ones(())))
    with pyro.plate("data", x.shape[0]):
        return pyro.sample("y", dist.Normal((x * w).sum(-1), s), obs=y)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
def test_workflow_on_the_device_and_dtype_of_the_data(dtype, device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 2, generator=g).to(device=device, dtype=dtype)
    y = x @ torch.tensor([1.0, -2.0], device=device, dtype=dtype) + 0.5
    # the plain start, so that 30 steps have a loss to bring down (the Laplace start is there)
    guide = pyro_nf.AutoIAFFlow(_model, num_transforms=2, precondition=None)
    result = pyro_nf.fit(_model, guide, x, y, num_steps=30, num_particles=4, progress=False)
    assert np.isfinite(result.losses).all() and result.losses[-5:].mean() < result.losses[:5].mean()
    for p in guide.parameters():
        assert p.device.type == device and p.dtype == dtype
    d = pyro_nf.diagnose(_model, guide, x, y, num_samples=200)
    assert math.isfinite(d.k_hat) and math.isfinite(d.elbo)
    lml = pyro_nf.log_marginal_likelihood(_model, guide, x, y, num_samples=400, chunk_size=100)
    assert math.isfinite(float(lml.value))
    idata = pyro_nf.to_inference_data(_model, guide, x, y, num_samples=50)
    assert idata.posterior["w"].shape == (2, 25, 2)


# --------------------------------------------------------------------------------------------
# Mixed-device models: priors from Python numbers (CPU), data elsewhere
# --------------------------------------------------------------------------------------------
GUIDE_CLASSES = [
    pyro_nf.AutoPlanarFlow,
    pyro_nf.AutoRadialFlow,
    pyro_nf.AutoIAFFlow,
    pyro_nf.AutoSplineFlow,
]


def _scalar_priors(x, y=None):
    """Priors written as Pyro's examples write them: Python numbers, so CPU tensors."""
    b = pyro.sample("b", dist.Normal(0.0, 1.0))
    s = pyro.sample("s", dist.HalfNormal(1.0))
    with pyro.plate("data", x.shape[0], device=x.device):
        return pyro.sample("y", dist.Normal(b * x, s), obs=y)


@pytest.mark.parametrize("cls", GUIDE_CLASSES, ids=lambda c: c.__name__)
def test_a_guide_puts_its_parameters_on_the_device_of_the_models_data(cls):
    """Latents drawn on the CPU at set-up, data elsewhere (``meta`` here): the data decide."""
    x = torch.randn(20, device="meta")
    y = torch.zeros(20, device="meta")
    with pyro.validation_enabled(False):  # (validation reads values; meta tensors have none)
        guide = cls(_scalar_priors).setup(x, y)
    assert {p.device.type for p in guide.parameters()} == {"meta"}


def test_a_deterministic_site_is_not_data():
    """``pyro.deterministic`` values follow the latents (here on the CPU), not the data."""

    def model(y):
        b = pyro.sample("b", dist.Normal(0.0, 1.0))
        pyro.deterministic("twice_b", 2 * b)
        with pyro.plate("data", y.shape[0], device=y.device):
            pyro.sample("y", dist.Normal(b, 1.0), obs=y)

    with pyro.validation_enabled(False):
        guide = pyro_nf.AutoPlanarFlow(model, 2).setup(torch.zeros(3, device="meta"))
    assert {p.device.type for p in guide.parameters()} == {"meta"}


def test_a_guide_refuses_a_model_whose_data_are_on_two_devices():
    def model(x, y):
        b = pyro.sample("b", dist.Normal(0.0, 1.0))
        pyro.sample("on_meta", dist.Normal(b * x, 1.0).to_event(1), obs=x)
        pyro.sample("on_cpu", dist.Normal(b, 1.0).expand([3]).to_event(1), obs=y)

    guide = pyro_nf.AutoPlanarFlow(model, 2)
    with pyro.validation_enabled(False), pytest.raises(ValueError) as info:
        guide.setup(torch.zeros(3, device="meta"), torch.zeros(3))
    message = str(info.value)
    assert "'on_meta'" in message and "'on_cpu'" in message and "meta" in message
    assert guide.prototype_trace is None  # and nothing half-built is left


def _logistic(X, y):
    """As ``benchmarks/speed.py``'s model: ``b``'s prior from Python numbers, the rest on the data
    (written to broadcast over vectorized particles)."""
    b = pyro.sample("b", dist.Normal(0.0, 1.0))
    w = pyro.sample("w", dist.Normal(X.new_zeros(X.shape[1]), 1.0).to_event(1))
    with pyro.plate("data", X.shape[0]):  # (its index tensor on the CPU, as users write it)
        pyro.sample("y", dist.Bernoulli(logits=b + (X * w).sum(-1)), obs=y)


@needs_cuda
@pytest.mark.parametrize("cls", GUIDE_CLASSES, ids=lambda c: c.__name__)
def test_a_mixed_device_model_runs_the_whole_workflow_on_cuda(cls):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(200, 3, generator=g)
    y = torch.bernoulli(torch.sigmoid(X @ torch.tensor([1.0, -1.0, 0.5]) + 0.3), generator=g)
    X, y = X.cuda(), y.cuda()
    guide = cls(_logistic)
    result = pyro_nf.fit(_logistic, guide, X, y, num_steps=30, num_particles=4, progress=False)
    assert np.isfinite(result.losses).all()
    assert {p.device.type for p in guide.parameters()} == {"cuda"}
    svi = pyro.infer.SVI(_logistic, guide, pyro.optim.Adam({"lr": 0.01}), pyro.infer.Trace_ELBO())
    assert math.isfinite(svi.step(X, y))
    draws = pyro.infer.Predictive(_logistic, guide=guide, num_samples=10)(X, y)
    assert draws["b"].device.type == "cuda"
    d = pyro_nf.diagnose(_logistic, guide, X, y, num_samples=100)
    assert math.isfinite(d.elbo)
    idata = pyro_nf.to_inference_data(_logistic, guide, X, y, num_samples=20)
    assert idata.posterior["w"].shape == (4, 5, 3)


def test_the_checks_ignore_a_plates_index_site_on_another_device():
    """A plate made without ``device=`` (as users write them) keeps its index site on the CPU
    while the data sit on CUDA; its log-density (zero, on the CPU) must not be summed with the
    model's. Here the index site's log-density is put on ``meta`` by hand."""
    from pyro_nf._importance import site_sums

    def model(y):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Normal(mu, 1.0), obs=y)

    y = torch.tensor([0.5, 1.0, 1.5])
    trace = pyro.poutine.trace(model).get_trace(y)
    trace.compute_log_prob()
    expected = site_sums(trace, 1, 1, None, unscaled=False)
    trace.nodes["data"]["log_prob"] = torch.zeros((), device="meta")
    torch.testing.assert_close(site_sums(trace, 1, 1, None, unscaled=False), expected)


# --------------------------------------------------------------------------------------------
# Set-up is all or nothing
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", GUIDE_CLASSES, ids=lambda c: c.__name__)
def test_a_failed_setup_leaves_the_guide_as_if_never_set_up(cls):
    """The model traced fine but the guide refused it (a discrete site): nothing is kept."""
    discrete = [True]

    def model():
        if discrete[0]:
            pyro.sample("k", dist.Bernoulli(0.5))
        pyro.sample("x", dist.Normal(torch.zeros(2), 1.0).to_event(1))

    guide = cls(model)
    with pytest.raises(ValueError, match="site 'k' is discrete"):
        guide()
    assert guide.prototype_trace is None and "flow" not in guide._modules
    discrete[0] = False  # the user fixes the model: the next call sets up afresh
    assert sorted(guide()) == ["x"]
    assert {name.split(".")[0] for name, _ in guide.named_parameters()} == {"flow"}


@pytest.mark.parametrize("cls", GUIDE_CLASSES, ids=lambda c: c.__name__)
def test_a_setup_error_is_raised_again_on_the_next_call(cls):
    """No ``KeyError: 'flow'`` from a half-built guide: the real error, every time."""

    def no_latents(y):
        pyro.sample("y", dist.Normal(0.0, 1.0), obs=y)

    guide = cls(no_latents)
    for _ in range(2):
        with pytest.raises(RuntimeError, match="found no latent variables"):
            guide(torch.tensor(0.5))
    for _ in range(2):
        with pytest.raises(RuntimeError, match="found no latent variables"):
            pyro_nf.fit(no_latents, guide, torch.tensor(0.5), num_steps=2, progress=False)


@needs_cuda
@pytest.mark.parametrize("first,then", [("cuda", "cpu"), ("cpu", "cuda")])
def test_a_checkpoint_written_on_one_device_resumes_on_the_other(first, then, tmp_path):
    path = tmp_path / "fit.pt"
    x = torch.randn(30, 2, generator=torch.Generator().manual_seed(0))
    y = x @ torch.tensor([1.0, -2.0]) + 0.5
    guide = pyro_nf.AutoIAFFlow(_model, num_transforms=2)
    before = pyro_nf.fit(_model, guide, x.to(first), y.to(first), num_steps=4, num_particles=2,
                         progress=False, checkpoint=path)  # fmt: skip
    pyro.clear_param_store()
    fresh = pyro_nf.AutoIAFFlow(_model, num_transforms=2)
    result = pyro_nf.fit(_model, fresh, x.to(then), y.to(then), num_steps=8, num_particles=2,
                         progress=False, checkpoint=path, resume=True)  # fmt: skip
    assert result.num_steps == 8 and np.isfinite(result.losses).all()
    np.testing.assert_array_equal(result.losses[:4], before.losses)
    assert {p.device.type for p in fresh.parameters()} == {then}


@needs_cuda
def test_a_resumed_fit_on_cuda_repeats_the_uninterrupted_one(tmp_path):
    x = torch.randn(30, 2, generator=torch.Generator().manual_seed(0)).cuda()
    y = x @ torch.tensor([1.0, -2.0], device="cuda") + 0.5
    kw = {"num_particles": 2, "progress": False, "seed": 3}
    whole = pyro_nf.fit(_model, pyro_nf.AutoIAFFlow(_model, 2), x, y, num_steps=8, **kw)
    pyro.clear_param_store()
    path = tmp_path / "fit.pt"
    pyro_nf.fit(_model, pyro_nf.AutoIAFFlow(_model, 2), x, y, num_steps=4, checkpoint=path, **kw)
    pyro.clear_param_store()
    kw.pop("seed")
    resumed = pyro_nf.fit(_model, pyro_nf.AutoIAFFlow(_model, 2), x, y, num_steps=8,
                          checkpoint=path, resume=True, **kw)  # fmt: skip
    np.testing.assert_array_equal(resumed.losses, whole.losses)
