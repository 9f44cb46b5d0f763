"""pyro_nf.Flow and FlowDistribution: shapes, exact scoring, one-pass sampling, use inside Pyro."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, RenyiELBO, Trace_ELBO
from pyro.optim import Adam

from pyro_nf import Flow, FlowDistribution

FAMILIES = ["planar", "radial", "iaf", "spline", "softplus_iaf"]


def perturbed_flow(
    transform, dim=2, context_dim=0, num_transforms=3, seed=0, scale=0.5, affine_first=False
):
    torch.manual_seed(seed)
    if transform == "spline":
        # a spline's 3K - 1 outputs per coordinate turn the same weight noise into far steeper
        # bins; 0.5 gives slopes of e^-10 in a 4-layer stack, which no inverse recovers to 1e-8
        scale = min(scale, 0.15)
    flow = Flow(dim, transform, num_transforms, context_dim, affine_first=affine_first).double()
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(scale * torch.randn_like(p))
    return flow


@pytest.mark.parametrize("transform", FAMILIES)
def test_density_integrates_to_one(transform):
    """The log-density is exact: on a fine grid, exp(log q) sums to 1 (2-D quadrature)."""
    # (a milder perturbation for IAF: its log-scales make very long tails that a grid cannot cover)
    flow = perturbed_flow(transform, scale=0.25 if transform == "iaf" else 0.5)
    d = flow()
    z = d.sample((4000,))
    lo = z.min(0).values - 3 * z.std(0)
    hi = z.max(0).values + 3 * z.std(0)
    n = 400
    g0 = torch.linspace(lo[0].item(), hi[0].item(), n, dtype=torch.float64)
    g1 = torch.linspace(lo[1].item(), hi[1].item(), n, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(g0, g1, indexing="ij"), -1).reshape(-1, 2)
    with torch.no_grad():
        mass = d.log_prob(grid).exp().sum() * (g0[1] - g0[0]) * (g1[1] - g1[0])
    assert abs(mass.item() - 1.0) < 1e-3


@pytest.mark.parametrize("transform", FAMILIES)
@pytest.mark.parametrize("context_dim", [0, 3])
@pytest.mark.parametrize("affine_first", [False, True])
def test_log_prob_of_own_sample_equals_exact_score(transform, context_dim, affine_first):
    flow = perturbed_flow(transform, dim=3, context_dim=context_dim, affine_first=affine_first)
    h = torch.randn(5, 3, dtype=torch.float64) if context_dim else None
    d = flow(h)
    z = d.rsample((4,))
    fast = d.log_prob(z)  # one-pass value remembered from rsample
    exact = d.log_prob(z.detach().clone())  # through the inverse
    assert torch.allclose(fast, exact, atol=1e-9)
    z2, lq = d.rsample_and_log_prob((4,))
    assert torch.allclose(d.log_prob(z2.detach().clone()), lq, atol=1e-9)


def test_in_place_change_of_a_sample_is_not_scored_from_memory():
    d = perturbed_flow("planar")()
    z = d.rsample()
    before = d.log_prob(z).detach()
    with torch.no_grad():
        z.add_(1.0)
    after = d.log_prob(z)
    assert not torch.allclose(before, after)
    assert torch.allclose(after, d.log_prob(z.detach().clone()))


def test_sample_then_log_prob_has_gradients():
    """log_prob of a value drawn by sample() (no grad) still differentiates w.r.t. the parameters."""
    flow = perturbed_flow("planar")
    d = flow()
    z = d.sample((10,))
    d.log_prob(z).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in flow.parameters())


@pytest.mark.parametrize("transform", FAMILIES)
@pytest.mark.parametrize("affine_first", [False, True])
def test_untrained_flow_is_the_affine_normal(transform, affine_first):
    loc = torch.tensor([1.0, -2.0, 0.5])
    flow = Flow(3, transform, 2, init_loc=loc, init_scale=0.3, affine_first=affine_first)
    d = flow()
    x = torch.randn(20, 3)
    ref = dist.Normal(loc, 0.3).to_event(1)
    assert torch.allclose(d.log_prob(x), ref.log_prob(x), atol=1e-5)


@pytest.mark.parametrize("transform", FAMILIES)
def test_affine_first_puts_the_affine_layer_before_the_flow_layers(transform):
    from pyro_nf.transforms import AffineTransform

    last, first = (
        perturbed_flow(transform, dim=2, context_dim=3, affine_first=a) for a in (False, True)
    )
    # the same parameters; the state dict records affine_first, so drop that record to load
    # across orders deliberately
    state = {k: v for k, v in last.state_dict().items() if k != "_extra_state"}
    first.load_state_dict(state, strict=False)
    h = torch.randn(4, 3, dtype=torch.float64)
    t_last, t_first = last(h).transforms, first(h).transforms
    assert isinstance(t_last[-1], AffineTransform) and isinstance(t_first[0], AffineTransform)
    eps = torch.randn(4, 2, dtype=torch.float64)
    z = eps
    for t in t_first[1:] + t_first[:1]:  # the same maps in the other order give the other flow
        z = t(z)
    torch.testing.assert_close(z, last(h).push_and_log_prob(eps)[0])
    assert not torch.allclose(first(h).push_and_log_prob(eps)[0], z)
    with pytest.raises(TypeError, match="affine_first"):
        Flow(2, transform, 1, affine_first="yes")


def test_affine_first_by_default_exactly_when_there_is_a_context():
    from pyro_nf.transforms import AffineTransform

    assert not Flow(2, "iaf", 2).affine_first
    amortized = Flow(2, "iaf", 2, context_dim=3)
    assert amortized.affine_first
    assert isinstance(amortized(torch.randn(3)).transforms[0], AffineTransform)
    assert not Flow(2, "iaf", 2, context_dim=3, affine_first=False).affine_first


@pytest.mark.parametrize("transform", FAMILIES)
def test_shapes_with_context(transform):
    flow = Flow(4, transform, 2, context_dim=6)
    d = flow(torch.randn(7, 6))
    assert d.batch_shape == (7,) and d.event_shape == (4,)
    assert d.rsample().shape == (7, 4)
    assert d.rsample((2, 3)).shape == (2, 3, 7, 4)
    assert d.log_prob(torch.randn(7, 4)).shape == (7,)
    assert d.log_prob(torch.randn(2, 7, 4)).shape == (2, 7)
    e = d.expand((5, 7))
    assert e.batch_shape == (5, 7) and e.rsample().shape == (5, 7, 4)
    with pytest.raises(ValueError, match="expand"):
        d.expand((3,))


def test_context_errors():
    flow = Flow(2, "planar", 2, context_dim=3)
    with pytest.raises(ValueError, match="needs a context"):
        flow()
    with pytest.raises(ValueError, match=r"\(\.\.\., 3\)"):
        flow(torch.randn(4, 2))
    with pytest.raises(ValueError, match="takes no context"):
        Flow(2, "planar", 2)(torch.randn(4, 3))


def test_bad_arguments():
    with pytest.raises(ValueError, match="transform"):
        Flow(2, "spline-coupling")
    with pytest.raises(ValueError, match="num_transforms"):
        Flow(2, "planar", -1)
    with pytest.raises(ValueError, match="dim"):
        Flow(0)
    with pytest.raises(ValueError, match="hidden_dims"):
        Flow(2, "planar", 2, hidden_dims=(8,))


@pytest.mark.parametrize("transform", FAMILIES)
def test_amortized_flow_in_a_vae_style_guide(transform):
    """A hand-written guide with pyro.sample("z", flow(h)) inside a subsampled plate, vectorized particles."""
    torch.manual_seed(0)
    pyro.clear_param_store()
    data = torch.randn(40, 5)
    encoder = torch.nn.Linear(5, 8)
    decoder = torch.nn.Linear(2, 5)
    flow = Flow(2, transform, 2, context_dim=8)

    def model(x):
        pyro.module("decoder", decoder)
        with pyro.plate("data", 40, subsample_size=10) as idx:
            z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(decoder(z), 1.0).to_event(1), obs=x[idx])

    def guide(x):
        pyro.module("encoder", encoder)
        pyro.module("flow", flow)
        with pyro.plate("data", 40, subsample_size=10) as idx:
            pyro.sample("z", flow(encoder(x[idx])))

    for elbo in (
        Trace_ELBO(num_particles=3, vectorize_particles=True, max_plate_nesting=1),
        RenyiELBO(alpha=0.5, num_particles=3, max_plate_nesting=1),
    ):
        svi = SVI(model, guide, Adam({"lr": 1e-2}), elbo)
        losses = [svi.step(data) for _ in range(5)]
        assert all(math.isfinite(v) for v in losses)
    # gradients reach the encoder through every layer
    loss = Trace_ELBO(max_plate_nesting=1).differentiable_loss(model, guide, data)
    loss.backward()
    assert encoder.weight.grad is not None and encoder.weight.grad.abs().sum() > 0
    for layer in flow.layers:
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters())


def test_trace_elbo_uses_the_one_pass_log_prob(monkeypatch):
    """Pyro's Trace_ELBO scores the guide's sample without running the inverse."""
    pyro.clear_param_store()
    flow = Flow(3, "iaf", 2)

    def model():
        pyro.sample("z", dist.Normal(torch.zeros(3), 1.0).to_event(1))

    def guide():
        pyro.module("flow", flow)
        pyro.sample("z", flow())

    calls = []
    from pyro_nf.transforms import AutoregressiveTransform

    original = AutoregressiveTransform.inverse_and_ladj
    monkeypatch.setattr(
        AutoregressiveTransform,
        "inverse_and_ladj",
        lambda self, y: calls.append(1) or original(self, y),
    )
    loss = Trace_ELBO(num_particles=4, vectorize_particles=True, max_plate_nesting=0).loss(
        model, guide
    )
    assert math.isfinite(loss) and calls == []


def test_flow_distribution_is_pyro_distribution():
    d = Flow(2, "radial", 2)()
    assert isinstance(d, FlowDistribution) and isinstance(d, dist.TorchDistribution)
    assert d.has_rsample and d.support.event_dim == 1
    with pytest.raises(ValueError):
        dist.TorchDistribution.set_default_validate_args(True)
        d2 = Flow(2, "radial", 2)()
        d2.log_prob(torch.tensor([float("nan"), 0.0]))


@pytest.mark.parametrize("transform", ["planar", "radial"])
@pytest.mark.parametrize("context_dim", [0, 3])
def test_fused_stack_equals_separate_layers(transform, context_dim):
    """The fused stack (one transform, stacked parameters) gives the same numbers to 1e-6."""
    flow = perturbed_flow(transform, dim=4, context_dim=context_dim, num_transforms=6)
    h = torch.randn(5, 3, dtype=torch.float64) if context_dim else None
    fused = flow(h)
    flow.fused = False
    separate = flow(h)
    assert len(fused.transforms) == 2 and len(separate.transforms) == 7
    eps = torch.randn(3, 5, 4, dtype=torch.float64)
    z1, l1 = eps, 0.0
    for t in fused.transforms:
        z1, ladj = t.call_and_ladj(z1)
        l1 = l1 + ladj
    z2, l2 = eps, 0.0
    for t in separate.transforms:
        z2, ladj = t.call_and_ladj(z2)
        l2 = l2 + ladj
    assert torch.allclose(z1, z2, atol=1e-6) and torch.allclose(l1, l2, atol=1e-6)
    y = torch.randn(3, 5, 4, dtype=torch.float64)
    assert torch.allclose(fused.log_prob(y), separate.log_prob(y), atol=1e-6)


@pytest.mark.parametrize("transform", FAMILIES)
@pytest.mark.parametrize("context_dim", [0, 3])
@pytest.mark.parametrize("affine_first", [False, True])
def test_whole_flow_log_det_matches_jacobian(transform, context_dim, affine_first):
    """log q from one pass equals the change of variables computed with autograd's Jacobian."""
    flow = perturbed_flow(
        transform, dim=3, context_dim=context_dim, num_transforms=4, affine_first=affine_first
    )
    h = torch.randn(3, dtype=torch.float64) if context_dim else None
    d = flow(h)

    def push(eps):
        z = eps
        for t in d.transforms:
            z = t(z)
        return z

    for _ in range(3):
        eps = torch.randn(3, dtype=torch.float64)
        z = push(eps)
        jac = torch.autograd.functional.jacobian(push, eps)
        base = dist.Normal(torch.zeros(3, dtype=torch.float64), 1.0).to_event(1).log_prob(eps)
        expected = base - torch.linalg.slogdet(jac)[1]
        assert torch.allclose(d.log_prob(z.detach()), expected, atol=1e-8)


@pytest.mark.parametrize("transform", FAMILIES)
def test_empty_context_batch_samples_and_scores_to_empty_results(transform):
    flow = perturbed_flow(transform, dim=2, context_dim=3)
    d = flow(torch.zeros(0, 3, dtype=torch.float64))
    z = d.rsample()
    assert z.shape == (0, 2)
    assert d.log_prob(z).shape == (0,)
    lp = d.log_prob(torch.zeros(0, 2, dtype=torch.float64))  # a value it did not sample
    assert lp.shape == (0,) and lp.dtype == torch.float64
    assert flow(torch.zeros(4, 0, 3, dtype=torch.float64)).log_prob(torch.zeros(2)).shape == (4, 0)
    with pytest.raises(ValueError, match="event shape"):
        d.log_prob(torch.zeros(0, 3, dtype=torch.float64))


@pytest.mark.parametrize(
    "other",
    [
        dict(transform="radial"),  # 1-D planar and radial layers have the same raw shape
        dict(transform="planar", affine_first=True),  # same tensors, another distribution
    ],
    ids=["family", "affine_first"],
)
def test_state_dict_of_another_kind_of_flow_is_refused(other):
    target = Flow(1, "planar", 2)
    before = {k: v.clone() for k, v in target.state_dict().items() if torch.is_tensor(v)}
    source = Flow(1, num_transforms=2, **other)
    with torch.no_grad():
        for p in source.parameters():
            p.add_(1.0)
    with pytest.raises(RuntimeError, match="another kind of flow"):
        target.load_state_dict(source.state_dict())
    after = target.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


@pytest.mark.parametrize("transform", FAMILIES)
def test_failed_flow_load_state_dict_changes_nothing(transform):
    source = perturbed_flow(transform, num_transforms=2)
    target = Flow(2, transform, 2).double()
    before = {k: v.clone() for k, v in target.state_dict().items() if torch.is_tensor(v)}
    state = source.state_dict()
    last = [k for k, v in state.items() if torch.is_tensor(v)][-1]
    state[last] = torch.zeros(3, 3, dtype=torch.float64)  # a shape that fits nowhere
    with pytest.raises(RuntimeError, match="size mismatch"):
        target.load_state_dict(state)
    after = target.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_state_dict_values_stay_tensors_so_copying_them_keeps_working():
    """The record goes into the state dict as a uint8 tensor, so the usual early-stopping idiom
    (clone every value, later copy them back, as benchmarks/vae.py does) works on a module that
    holds a Flow, and the record survives a round trip through torch.save(weights_only=True)."""
    model = torch.nn.ModuleDict({"encoder": torch.nn.Linear(3, 4), "flow": Flow(2, "iaf", 2, 4)})
    state = model.state_dict()
    assert all(torch.is_tensor(v) for v in state.values())
    best = {k: v.detach().clone() for k, v in state.items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
        for k, v in model.state_dict().items():
            v.copy_(best[k])
    assert all(torch.equal(v, best[k]) for k, v in model.state_dict().items())
    assert model["flow"].record()["transform"] == "iaf"
    Flow(2, "iaf", 2, 4).load_state_dict(
        {k[len("flow.") :]: v.to(torch.float16) for k, v in state.items() if k.startswith("flow.")}
    )  # the record decodes whatever dtype a conversion gave it
