"""No tensor is made on torch's default device inside the library; every public path on CUDA.

CI has no GPU. A tensor that the library creates without an explicit device lands on torch's
default device (the CPU), which is right on a CPU and wrong for a model on CUDA: there it fails
with "Expected all tensors to be on the same device". To catch such a leak on a CPU, every public
path runs here with the model's tensors on the CPU while torch's default device is ``meta``
(:func:`meta_default_device`): a tensor made without a device is then a meta tensor, and the first
operation that mixes it with the model's real ones, or asks for its value, raises. This is
stricter than CUDA, which lets 0-dim CPU tensors mix with CUDA ones; the few places where Pyro
itself makes such a tensor are noted where they occur.

Each test also runs with the model on CUDA (``-m cuda``; skipped without a GPU), in float32 and
float64, with torch's default device left alone: the same paths, on the real device.

Each path of the "GPU is first-class" issue appears once per guide: set-up (plain, Laplace start,
non-centring), ``SVI`` with ``Trace_ELBO`` (one and vectorized particles), ``RenyiELBO`` and
``FastELBO`` (compiled or not), ``pyro_nf.fit`` with checkpoints and resume, ``Predictive``,
``median``/``quantiles``, ``get_posterior().log_prob``, the NeuTra transform, ``diagnose``,
``log_marginal_likelihood`` (with ``data_plate``), ``to_inference_data`` and the plots; then the
amortized ``Flow`` and a directly built ``FlowDistribution``.
"""

from __future__ import annotations

import contextlib
import math
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from device_params import CUDA
from pyro.infer import SVI, Predictive, RenyiELBO, Trace_ELBO
from pyro.infer.reparam import NeuTraReparam

import pyro_nf
from pyro_nf import Flow, FlowDistribution
from pyro_nf.transforms import AffineTransform, RadialTransform

GUIDES = {
    "planar": lambda model, **kw: pyro_nf.AutoPlanarFlow(model, 2, **kw),
    "radial": lambda model, **kw: pyro_nf.AutoRadialFlow(model, 2, **kw),
    "iaf": lambda model, **kw: pyro_nf.AutoIAFFlow(model, 2, hidden_dims=(8,), **kw),
    "spline": lambda model, **kw: pyro_nf.AutoSplineFlow(
        model, 1, hidden_dims=(8,), num_bins=4, **kw
    ),
}


@contextlib.contextmanager
def meta_default_device():
    """torch's default device is ``meta`` inside: a tensor made without a device cannot be used."""
    with torch.device("meta"):
        yield


def _torch_adam_steps_under_a_meta_default_device() -> bool:
    """Whether torch's own Adam (single- and multi-tensor) steps while the default device is
    ``meta``. torch 2.1 makes the optimizer's ``step`` counter without a device, so there torch
    itself fails before any pyro_nf code is checked; torch 2.13 passes."""
    p = torch.zeros(2, requires_grad=True)
    p.grad = torch.ones(2)
    try:
        with meta_default_device():
            for foreach in (False, True):
                torch.optim.Adam([p], foreach=foreach).step()
    except (RuntimeError, NotImplementedError):
        return False
    return True


META_DEFAULT = pytest.mark.skipif(
    not _torch_adam_steps_under_a_meta_default_device(),
    reason="this torch's Adam makes its step counter on the default device (torch 2.1)",
)

#: where the model's tensors live, and torch's default device while the library runs
PLACES = [
    pytest.param(("cpu", torch.float64), id="cpu-meta_default"),
    pytest.param(("cuda", torch.float32), id="cuda-float32", marks=CUDA),
    pytest.param(("cuda", torch.float64), id="cuda-float64", marks=CUDA),
]
#: the same, for tests that step torch's Adam
STEPPED_PLACES = [
    pytest.param(*p.values, id=p.id, marks=[*p.marks, META_DEFAULT])
    if p.id.endswith("meta_default")
    else p
    for p in PLACES
]


def _context(device: str):
    """The leak check on the CPU; on CUDA the real device is the check."""
    return meta_default_device() if device == "cpu" else contextlib.nullcontext()


def test_the_meta_default_device_catches_a_leak():
    """The check itself: a tensor made without a device fails when mixed with a CPU tensor."""
    x = torch.ones(3)
    with meta_default_device(), pytest.raises((RuntimeError, NotImplementedError)):
        float((x + torch.zeros(3)).sum())
    with meta_default_device():
        assert float((x + torch.zeros(3, device=x.device)).sum()) == 3.0


def _data(dtype=torch.float64, device="cpu"):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 2, generator=g, dtype=dtype)
    y = x @ torch.tensor([1.0, -2.0], dtype=dtype) + 0.3 * torch.randn(12, generator=g, dtype=dtype)
    return x.to(device), y.to(device)


def regression(x, y=None):
    """Every prior is built from the data's tensors (a model that lives wholly on one device)."""
    w = pyro.sample("w", dist.Normal(x.new_zeros(2), x.new_ones(2)).to_event(1))
    s = pyro.sample("s", dist.HalfNormal(x.new_ones(())))
    with pyro.plate("data", x.shape[0], device=x.device):
        return pyro.sample("y", dist.Normal((x * w).sum(-1), s), obs=y)


def hierarchical(x, y=None):
    """A centred hierarchy, for ``noncentered=True``: theta_j ~ N(mu, tau)."""
    mu = pyro.sample("mu", dist.Normal(x.new_zeros(()), x.new_ones(())))
    tau = pyro.sample("tau", dist.HalfNormal(x.new_ones(())))
    with pyro.plate("group", 3, device=x.device):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
    with pyro.plate("data", x.shape[0], device=x.device):
        pyro.sample(
            "y", dist.Normal(theta[..., torch.arange(x.shape[0], device=x.device) % 3], 1.0), obs=y
        )


def _fit_paths(guide, model, x, y, tmp_path):
    """Every training path of a flow autoguide, each a few steps."""
    optim = pyro.optim.Adam({"lr": 0.01})
    for loss in (
        Trace_ELBO(),
        Trace_ELBO(num_particles=3, vectorize_particles=True),
        RenyiELBO(alpha=0.5, num_particles=2),
        pyro_nf.FastELBO(),
        pyro_nf.FastELBO(num_particles=3, stl=True),
    ):
        svi = SVI(model, guide, optim, loss)
        assert math.isfinite(svi.step(x, y))
    path = tmp_path / "fit.pt"
    first = pyro_nf.fit(model, guide, x, y, num_steps=3, num_particles=2, progress=False,
                        checkpoint=path, checkpoint_every=2, seed=1)  # fmt: skip
    resumed = pyro_nf.fit(model, guide, x, y, num_steps=5, num_particles=2, progress=False,
                          checkpoint=path, resume=True)  # fmt: skip
    assert first.num_steps == 3 and resumed.num_steps == 5
    assert all(math.isfinite(v) for v in resumed.losses)


def _posterior_paths(guide, model, x, y):
    """Every way to read the fitted posterior, and the checks of the workflow."""
    samples = Predictive(model, guide=guide, num_samples=4)(x, y)
    assert samples["y"].shape == (4, 12) and samples["y"].device == x.device
    med = guide.median(x, y)
    q = guide.quantiles([0.25, 0.75], x, y)
    assert all(v.device == x.device for v in list(med.values()) + list(q.values()))
    post = guide.get_posterior()
    z = torch.zeros(guide.latent_dim, dtype=x.dtype, device=x.device)
    assert (
        torch.isfinite(post.log_prob(z)) and torch.isfinite(post.log_prob(post.rsample((3,)))).all()
    )
    t, base = guide.get_transform(), guide.get_base_dist()
    eps = base.sample((2,))
    assert torch.isfinite(t(eps)).all() and eps.device == x.device
    neutra = NeuTraReparam(guide)
    reparam_model = pyro.poutine.reparam(model, config=lambda _: neutra)
    trace = pyro.poutine.trace(reparam_model).get_trace(x, y)
    assert math.isfinite(float(trace.log_prob_sum()))
    d = pyro_nf.diagnose(model, guide, x, y, num_samples=20, chunk_size=8)
    assert math.isfinite(d.elbo) and d.log_weights.shape == (20,)
    lml = pyro_nf.log_marginal_likelihood(model, guide, x, y, num_samples=20, chunk_size=8)
    assert math.isfinite(float(lml))
    idata = pyro_nf.to_inference_data(model, guide, x, y, num_samples=10, resample=True, seed=0)
    assert idata.posterior["w" if "w" in idata.posterior else "mu"].shape[:2] == (2, 5)
    pyro_nf.plot_posterior(idata)


@pytest.mark.parametrize("place", STEPPED_PLACES)
@pytest.mark.parametrize("family", list(GUIDES))
def test_every_autoguide_path_makes_its_tensors_on_the_models_device(family, place, tmp_path):
    x, y = _data(place[1], place[0])
    with _context(place[0]), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        guide = GUIDES[family](regression)
        guide.setup(x, y)
        assert all(p.device == x.device and p.dtype == x.dtype for p in guide.parameters())
        _fit_paths(guide, regression, x, y, tmp_path)
        _posterior_paths(guide, regression, x, y)


@pytest.mark.parametrize("place", STEPPED_PLACES)
@pytest.mark.parametrize("family", ["planar", "iaf"])
@pytest.mark.parametrize("option", ["laplace", "noncentered"])
def test_the_laplace_start_and_noncentring_make_their_tensors_on_the_models_device(
    family, option, place, tmp_path
):
    x, y = _data(place[1], place[0])
    # the centred hierarchy has no mode (a funnel): the Laplace start is tried on the regression
    model = regression if option == "laplace" else hierarchical
    kw = {"precondition": "laplace"} if option == "laplace" else {"noncentered": True}
    with _context(place[0]), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        guide = GUIDES[family](model, **kw)
        guide.setup(x, y)
        if option == "laplace":
            assert guide.laplace_info["used"], guide.laplace_info
        else:
            assert guide.noncentering is not None
        _fit_paths(guide, model, x, y, tmp_path)
        _posterior_paths(guide, model, x, y)


@pytest.mark.parametrize(
    "compile,place",
    [
        pytest.param(
            compile,
            p.values[0],
            id=f"{name}-{p.id}",
            # torch.compile costs tens of seconds (float32 only on CUDA), and after it Pyro's
            # NaN checks warn where they did not (tests/test_laplace.py counts warnings): slow
            marks=[*p.marks, pytest.mark.slow] if compile else p.marks,
        )
        for compile, name in ((False, "eager"), (True, "compiled"))
        for p in STEPPED_PLACES[:2]
    ],
)
def test_fit_with_fast_elbo_makes_its_tensors_on_the_models_device(compile, place):
    x, y = _data(place[1], place[0])
    guide = GUIDES["planar"](regression)
    loss = pyro_nf.FastELBO(num_particles=2, compile=compile)
    with _context(place[0]), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        result = pyro_nf.fit(regression, guide, x, y, num_steps=3, loss=loss, progress=False)
    assert all(math.isfinite(v) for v in result.losses)
    assert all(p.device == x.device for p in guide.parameters())


def vae_model(x):
    """A VAE-shaped model: one latent per datapoint, for ``data_plate`` estimates."""
    decoder = pyro.module("decoder", _DECODER)
    with pyro.plate("data", x.shape[0], device=x.device):
        z = pyro.sample("z", dist.Normal(x.new_zeros(2), x.new_ones(2)).to_event(1))
        pyro.sample("x", dist.Normal(decoder(z), 0.5).to_event(1), obs=x)


def vae_guide(x):
    pyro.module("flow", _FLOW)
    with pyro.plate("data", x.shape[0], device=x.device):
        pyro.sample("z", _FLOW(x))


_DECODER = torch.nn.Linear(2, 3)
_FLOW = Flow(2, "iaf", 2, context_dim=3, hidden_dims=(8,))


@pytest.mark.parametrize("place", PLACES)
@pytest.mark.parametrize("transform", ["planar", "radial", "iaf", "spline"])
def test_an_amortized_flow_makes_its_tensors_on_the_device_of_its_context(transform, place):
    device, dtype = place
    flow = Flow(3, transform, 2, context_dim=4).to(device=device, dtype=dtype)
    h = torch.randn(5, 4, device=device, dtype=dtype)
    with _context(device):
        d = flow(h)
        z = d.rsample((2,))
        lp = d.log_prob(torch.randn(5, 3, device=h.device, dtype=dtype))
        assert torch.isfinite(lp).all() and z.device == h.device
        d.log_prob(z).sum().backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in flow.parameters())


@pytest.mark.parametrize("place", STEPPED_PLACES)
def test_the_vae_workflow_makes_its_tensors_on_the_datas_device(place):
    device, dtype = place
    x = torch.randn(6, 3, device=device, dtype=dtype)
    _DECODER.to(device=device, dtype=dtype)
    _FLOW.to(device=device, dtype=dtype)
    with _context(device):
        svi = SVI(vae_model, vae_guide, pyro.optim.Adam({"lr": 0.01}), Trace_ELBO())
        assert math.isfinite(svi.step(x))
        est = pyro_nf.log_marginal_likelihood(
            vae_model, vae_guide, x, num_samples=8, chunk_size=4, data_plate="data"
        )
        assert est.per_datapoint.shape == (6,) and torch.isfinite(est.per_datapoint).all()
        d = pyro_nf.diagnose(vae_model, vae_guide, x, num_samples=8, chunk_size=4)
        assert math.isfinite(d.elbo)


def test_a_directly_built_flow_distribution_follows_its_transforms():
    """Without ``dtype``/``device``, the base noise takes the transforms' dtype and device (here
    ``meta``, a stand-in for another device than the default one)."""
    opts = {"dtype": torch.float64, "device": "meta"}
    radial = RadialTransform(
        torch.zeros(2, **opts), torch.tensor(0.0, **opts), torch.tensor(1.0, **opts)
    )
    affine = AffineTransform(torch.ones(2, **opts), torch.full((2,), 0.5, **opts))
    d = FlowDistribution([radial, affine], 2)
    z, log_q = d.rsample_and_log_prob((4,))
    assert z.dtype == log_q.dtype == torch.float64
    assert z.device.type == log_q.device.type == "meta" and z.shape == (4, 2)
    assert FlowDistribution([], 2).sample().device == torch.empty(0).device
