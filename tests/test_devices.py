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
from test_transforms import CASES, IDS, make_layer

import pyro_nf
from pyro_nf import Flow

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.cuda,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
        ],
    ),
]
DTYPES = [torch.float32, torch.float64]
TOL = {torch.float32: 1e-4, torch.float64: 1e-9}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("name,context_dim", CASES, ids=IDS)
def test_every_layer_runs_on_the_device_of_its_parameters(name, context_dim, dtype, device):
    layer = make_layer(name, context_dim).to(device=device, dtype=dtype)
    context = torch.randn(6, context_dim, dtype=dtype, device=device) if context_dim else None
    t = layer.condition(context)
    x = torch.randn(6, layer.dim, dtype=dtype, device=device)
    y, ladj = t.call_and_ladj(x)
    assert y.device.type == device and y.dtype == dtype
    assert ladj.device.type == device and ladj.shape == (6,)
    x_back, ladj_back = t.inverse_and_ladj(y)
    assert x_back.device.type == device
    # A random spline layer's float32 inverse loses more: round-off in each recovered coordinate
    # is amplified by the steep bins of the ones that condition on it (2e-4 seen here); float64
    # holds it to 1e-9 like every layer.
    tol = 1e-3 if name.startswith("spline") and dtype == torch.float32 else TOL[dtype]
    torch.testing.assert_close(x_back, x, atol=tol, rtol=tol)
    torch.testing.assert_close(ladj_back, ladj, atol=tol, rtol=tol)


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
    guide = pyro_nf.AutoIAFFlow(_model, num_transforms=2)
    result = pyro_nf.fit(_model, guide, x, y, num_steps=30, num_particles=4, progress=False)
    assert np.isfinite(result.losses).all() and result.losses[-5:].mean() < result.losses[:5].mean()
    for p in guide.parameters():
        assert p.device.type == device and p.dtype == dtype
    d = pyro_nf.diagnose(_model, guide, x, y, num_samples=200)
    assert math.isfinite(d.k_hat) and math.isfinite(d.elbo)
    lml = pyro_nf.log_marginal_likelihood(_model, guide, x, y, num_samples=400, chunk_size=100)
    assert math.isfinite(float(lml.value))
    idata = pyro_nf.to_inference_data(_model, guide, x, y, num_samples=50)
    assert idata.posterior["w"].shape == (1, 50, 2)
