"""The transform registry: every flow layer, with and without a context, passes the same checks.

A family counts as done once it is in ``LAYERS``. Checks run in float64 with perturbed parameters
(a fresh layer is the identity, which would make the Jacobian check trivial).
"""

import copy
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch.autograd.functional import jacobian

from pyro_nf.transforms import (
    MADE,
    Affine,
    AffineAutoregressive,
    AutoregressiveTransform,
    FlowModule,
    MaskedAutoregressive,
    Planar,
    PlanarTransform,
    Radial,
    RadialTransform,
    SoftplusAffineMap,
    SplineAutoregressive,
    rational_quadratic_spline,
)
from pyro_nf.transforms.autoregressive import ACTIVATIONS, DEFAULT_ACTIVATION

DIM = 4
CONTEXT_DIM = 3

_SPLINE_FLOORS = dict(min_bin_width=0.02, min_bin_height=0.02, min_derivative=0.02)

# One entry per layer family: name -> factory(dim, context_dim).
LAYERS = {
    "planar": lambda d, c: Planar(d, c),
    "radial": lambda d, c: Radial(d, c),
    "iaf": lambda d, c: AffineAutoregressive(d, c, hidden_dims=(16, 16)),
    "iaf_reversed": lambda d, c: AffineAutoregressive(
        d, c, hidden_dims=(12,), order=torch.arange(d).flip(0)
    ),
    "iaf_permuted": lambda d, c: AffineAutoregressive(
        d, c, hidden_dims=(9,), order=[2, 0, 3, 1][:d] if d == 4 else None
    ),
    "iaf_gated": lambda d, c: AffineAutoregressive(d, c, hidden_dims=(16,), gate_bias=1.5),
    "iaf_gelu": lambda d, c: AffineAutoregressive(d, c, hidden_dims=(8, 8), activation="gelu"),
    # bound 3 < the tests' |x| up to ~8, so the identity tails are checked too. The floors keep
    # the random bins' slopes above ~1e-2: with the defaults (1e-3) a perturbed layer can be so
    # flat that float32 cannot recover x (the device tests), whatever the inverse's formula.
    "spline": lambda d, c: SplineAutoregressive(
        d, c, hidden_dims=(16,), num_bins=5, bound=3.0, **_SPLINE_FLOORS
    ),
    "spline_reversed": lambda d, c: SplineAutoregressive(
        d,
        c,
        hidden_dims=(12, 12),
        order=torch.arange(d).flip(0),
        num_bins=3,
        bound=4.0,
        **_SPLINE_FLOORS,
    ),  # fmt: skip
    "spline_silu": lambda d, c: SplineAutoregressive(
        d, c, hidden_dims=(8, 8), num_bins=4, bound=3.0, activation="silu", **_SPLINE_FLOORS
    ),
    # the sinh-arcsinh map: one ElementwiseMap subclass run by the generic autoregressive layer
    "softplus_iaf": lambda d, c: MaskedAutoregressive(
        d, c, elementwise=SoftplusAffineMap, hidden_dims=(16,)
    ),
    "softplus_iaf_reversed": lambda d, c: MaskedAutoregressive(
        d, c, elementwise=SoftplusAffineMap(min_scale=0.2), order=torch.arange(d).flip(0)
    ),
    "affine": lambda d, c: Affine(d, c, init_loc=0.3, init_scale=2.0),
}
CASES = [(name, c) for name in LAYERS for c in (0, CONTEXT_DIM)]
IDS = [f"{name}-ctx{c}" for name, c in CASES]


def make_layer(name: str, context_dim: int, dim: int = DIM, seed: int = 0) -> FlowModule:
    torch.manual_seed(seed)
    layer = LAYERS[name](dim, context_dim).double()
    with torch.no_grad():  # move away from the identity start
        for p in layer.parameters():
            p.add_(0.4 * torch.randn_like(p))
    return layer


def make_transform(layer: FlowModule, batch=()):
    if layer.context_dim == 0:
        return layer.condition(), None
    context = torch.randn(*batch, layer.context_dim, dtype=torch.float64)
    return layer.condition(context), context


@pytest.mark.parametrize("name,context_dim", CASES, ids=IDS)
def test_log_det_matches_jacobian(name, context_dim):
    layer = make_layer(name, context_dim)
    t, _ = make_transform(layer)
    for scale in (0.5, 1.0, 3.0):
        x = scale * torch.randn(DIM, dtype=torch.float64)
        y, ladj = t.call_and_ladj(x)
        jac = jacobian(lambda v: t.call_and_ladj(v)[0], x)
        sign, logabsdet = torch.linalg.slogdet(jac)
        assert sign.item() > 0  # orientation-preserving, so the map is a diffeomorphism
        assert torch.allclose(ladj, logabsdet, atol=1e-9), (ladj, logabsdet)
        # torch's Transform API agrees with the one-pass primitive
        assert torch.allclose(layer.log_abs_det_jacobian(x, y), ladj) if context_dim == 0 else True
        # the inverse's log-det is minus the forward one, at the matching point
        jac_inv = jacobian(lambda v: t.inverse_and_ladj(v)[0], y)
        assert torch.allclose(torch.linalg.slogdet(jac_inv)[1], -ladj, atol=1e-8)


@pytest.mark.parametrize("name,context_dim", CASES, ids=IDS)
def test_inverse_round_trips(name, context_dim):
    layer = make_layer(name, context_dim)
    t, _ = make_transform(layer, batch=(50,))
    x = 2.0 * torch.randn(50, DIM, dtype=torch.float64)
    y, ladj = t.call_and_ladj(x)
    x_back, ladj_back = t.inverse_and_ladj(y)
    assert torch.allclose(x_back, x, atol=1e-9)
    assert torch.allclose(ladj_back, ladj, atol=1e-9)
    y2 = 2.0 * torch.randn(50, DIM, dtype=torch.float64)
    assert torch.allclose(t(t.inv(y2)), y2, atol=1e-9)
    # inverse log-det through torch's _InverseTransform
    assert torch.allclose(t.inv.log_abs_det_jacobian(y, x), -ladj, atol=1e-9)


@pytest.mark.parametrize("name,context_dim", CASES, ids=IDS)
def test_gradients_reach_every_parameter(name, context_dim):
    layer = make_layer(name, context_dim)
    t, context = make_transform(layer, batch=(8,))
    x = torch.randn(8, DIM, dtype=torch.float64)
    y, ladj = t.call_and_ladj(x)
    x_back, ladj_inv = t.inverse_and_ladj(torch.randn(8, DIM, dtype=torch.float64))
    (y.pow(2).sum() + ladj.sum() + x_back.pow(2).sum() + ladj_inv.sum()).backward()
    for pname, p in layer.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("name,context_dim", CASES, ids=IDS)
def test_batched_parameters_broadcast(name, context_dim):
    """Per-datapoint parameters (batch B) broadcast over extra leading sample dims."""
    layer = make_layer(name, context_dim)
    t, context = make_transform(layer, batch=(5,))
    x = torch.randn(3, 5, DIM, dtype=torch.float64)
    y, ladj = t.call_and_ladj(x)
    assert y.shape == (3, 5, DIM) and ladj.shape == (3, 5)
    for i in range(5):
        ti = layer.condition(None if context is None else context[i])
        yi, li = ti.call_and_ladj(x[:, i])
        assert torch.allclose(yi, y[:, i], atol=1e-12)
        assert torch.allclose(li, ladj[:, i], atol=1e-12)
    x_back, _ = t.inverse_and_ladj(y)
    assert torch.allclose(x_back, x, atol=1e-9)


@pytest.mark.parametrize("name,context_dim", CASES, ids=IDS)
def test_state_dict_round_trip(name, context_dim, tmp_path):
    layer = make_layer(name, context_dim, seed=1)
    path = tmp_path / "layer.pt"
    torch.save(layer.state_dict(), path)
    fresh = make_layer(name, context_dim, seed=2)
    fresh.load_state_dict(torch.load(path, weights_only=True))
    t1, context = make_transform(layer, batch=(6,))
    t2 = fresh.condition(context)
    x = torch.randn(6, DIM, dtype=torch.float64)
    y1, l1 = t1.call_and_ladj(x)
    y2, l2 = t2.call_and_ladj(x)
    assert torch.equal(y1, y2) and torch.equal(l1, l2)


@pytest.mark.parametrize("name", list(LAYERS))
def test_fresh_layer_is_identity(name):
    torch.manual_seed(0)
    layer = LAYERS[name](DIM, 0) if name != "affine" else Affine(DIM)
    x = torch.randn(10, DIM)
    y, ladj = layer.call_and_ladj(x)
    assert torch.allclose(y, x, atol=1e-6)
    assert torch.allclose(ladj, torch.zeros(10), atol=1e-6)
    with_ctx = LAYERS[name](DIM, CONTEXT_DIM) if name != "affine" else Affine(DIM, CONTEXT_DIM)
    y, ladj = with_ctx.condition(torch.randn(10, CONTEXT_DIM)).call_and_ladj(x)
    assert torch.allclose(y, x, atol=1e-6)
    assert torch.allclose(ladj, torch.zeros(10), atol=1e-6)


@pytest.mark.parametrize("name", list(LAYERS))
def test_scores_values_it_did_not_sample(name):
    """TransformedDistribution.log_prob works on any value, with no cache (Pyro's Planar raises KeyError)."""
    layer = make_layer(name, 0)
    base = dist.Normal(torch.zeros(DIM, dtype=torch.float64), 1.0).to_event(1)
    d = dist.TransformedDistribution(base, [layer])
    y = torch.randn(7, DIM, dtype=torch.float64)
    x, ladj = layer.inverse_and_ladj(y)
    assert torch.allclose(d.log_prob(y), base.log_prob(x) - ladj)
    assert torch.isfinite(d.log_prob(y)).all()


def test_pyro_planar_cannot_score_foreign_values():
    """The gap we close: Pyro's own Planar / Radial cannot invert, so they cannot score new values."""
    from pyro.distributions.transforms import Planar as PyroPlanar
    from pyro.distributions.transforms import Radial as PyroRadial

    for T in (PyroPlanar, PyroRadial):
        d = dist.TransformedDistribution(dist.Normal(torch.zeros(2), 1.0).to_event(1), [T(2)])
        with pytest.raises(KeyError):
            d.log_prob(torch.randn(2))


@pytest.mark.parametrize("name", ["planar", "radial", "iaf", "softplus_iaf"])
def test_no_overflow_far_out(name):
    layer = make_layer(name, 0)
    x = torch.tensor([[1e4, -1e4, 3e3, 0.0], [-1e6, 1e6, 1.0, 2.0]], dtype=torch.float64)
    y, ladj = layer.call_and_ladj(x)
    assert torch.isfinite(y).all() and torch.isfinite(ladj).all()
    x_back, ladj_back = layer.inverse_and_ladj(y)
    assert torch.isfinite(x_back).all() and torch.isfinite(ladj_back).all()
    assert torch.allclose(x_back, x, rtol=1e-9, atol=1e-6)


def test_planar_keeps_invertibility_constraint():
    torch.manual_seed(0)
    for _ in range(200):
        u, w = 5 * torch.randn(2, 3, dtype=torch.float64)
        t = PlanarTransform(u, w, torch.randn((), dtype=torch.float64))
        # 1 + w.u_hat > 0 is kept exactly (apart from rounding of w.u_hat itself near -1) ...
        assert t.one_plus_wu_hat > 0
        assert torch.allclose((t.w * t.u_hat).sum(), t.wu_hat)
        # ... so the log-det is finite everywhere, including where tanh' = 1
        x = -t.b * t.w / (t.w * t.w).sum()
        assert torch.isfinite(t.call_and_ladj(x)[1])


def test_planar_inverse_near_the_constraint_boundary_float32():
    """w.u_hat close to -1 makes the root solve stiff; Newton with bisection still converges."""
    torch.manual_seed(0)
    w = torch.tensor([1.0, 0.0])
    u = torch.tensor([-30.0, 0.5])  # m(w.u) = softplus(-30 + log(e-1)) - 1, within 1e-13 of -1
    t = PlanarTransform(u, w, torch.tensor(0.3))
    y = torch.randn(1000, 2) * 3
    x = t.inv(y)
    assert torch.isfinite(x).all()
    assert torch.allclose(t(x), y, atol=1e-4)


def test_planar_inverse_gradients_are_exact():
    """The one Newton step after the no-grad solve gives implicit-function-theorem gradients."""
    torch.manual_seed(0)
    u, w = torch.randn(2, 3, dtype=torch.float64)
    b = torch.randn((), dtype=torch.float64)
    y = torch.randn(4, 3, dtype=torch.float64)

    def inv(u, w, b, y):
        x, ladj = PlanarTransform(u, w, b).inverse_and_ladj(y)
        return x, ladj

    inputs = tuple(v.clone().requires_grad_() for v in (u, w, b, y))
    assert torch.autograd.gradcheck(inv, inputs, atol=1e-6)


def test_radial_inverse_gradients():
    torch.manual_seed(0)
    z0 = torch.randn(3, dtype=torch.float64)
    a, c = torch.randn(2, dtype=torch.float64)
    y = torch.randn(4, 3, dtype=torch.float64)

    def inv(z0, a, c, y):
        return RadialTransform(z0, a, c).inverse_and_ladj(y)

    inputs = tuple(v.clone().requires_grad_() for v in (z0, a, c, y))
    assert torch.autograd.gradcheck(inv, inputs)


@pytest.mark.parametrize("cls", [AffineAutoregressive, SplineAutoregressive])
def test_autoregressive_dependencies_follow_the_order(cls):
    """Output i depends only on inputs before i in the order (strictly lower-triangular Jacobian)."""
    torch.manual_seed(0)
    order = torch.tensor([2, 0, 3, 1])
    layer = cls(4, hidden_dims=(20,), order=order).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.5 * torch.randn_like(p))
    jac = jacobian(layer, torch.randn(4, dtype=torch.float64))
    position = torch.empty(4, dtype=torch.long)
    position[order] = torch.arange(4)
    for i in range(4):
        for j in range(4):
            if position[j] > position[i]:
                assert jac[i, j] == 0
            elif position[j] < position[i]:
                assert jac[i, j] != 0  # every earlier coordinate is used


@pytest.mark.parametrize("name", ["planar", "radial", "iaf", "spline"])
def test_context_errors_are_clear(name):
    layer = LAYERS[name](DIM, CONTEXT_DIM)
    with pytest.raises(ValueError, match="needs a context"):
        layer.condition()
    with pytest.raises(ValueError, match=r"shape \(\.\.\., 3\)"):
        layer.condition(torch.randn(5, 2))
    with pytest.raises(TypeError, match="dtype"):
        layer.condition(torch.randn(5, CONTEXT_DIM, dtype=torch.float64))
    with pytest.raises(ValueError, match="takes no context"):
        LAYERS[name](DIM, 0).condition(torch.randn(5, CONTEXT_DIM))


def test_bad_constructor_arguments():
    with pytest.raises(ValueError):
        Planar(0)
    with pytest.raises(ValueError):
        Radial(3, context_dim=-1)
    with pytest.raises(ValueError, match="permutation"):
        AffineAutoregressive(3, order=[0, 0, 1])
    with pytest.raises(ValueError, match="log_scale_min"):
        AffineAutoregressive(3, log_scale_min=1.0)
    with pytest.raises(ValueError, match="init_scale"):
        Affine(3, init_scale=-1.0)
    with pytest.raises(TypeError, match=r"hidden_dims must be a sequence.*\(40,\)"):
        AffineAutoregressive(3, hidden_dims=40)
    for bad in (float("nan"), float("inf"), "2", True):
        with pytest.raises(ValueError, match="gate_bias must be None or a finite number"):
            AffineAutoregressive(3, gate_bias=bad)


def test_made_activation_by_name_or_class():
    order = torch.arange(3)
    default = ACTIVATIONS[DEFAULT_ACTIVATION]
    assert type(MADE(3, (4,), order).activation) is default
    assert type(MADE(3, (4,), order, activation="GELU").activation) is torch.nn.GELU
    assert type(MADE(3, (4,), order, activation=torch.nn.Tanh).activation) is torch.nn.Tanh
    with pytest.raises(ValueError, match="activation must be one of"):
        MADE(3, (4,), order, activation="swish")
    with pytest.raises(TypeError, match="activation must be a name or a module class"):
        MADE(3, (4,), order, activation=3)
    with pytest.raises(TypeError, match="pass the class, e.g. activation=GELU"):
        MADE(3, (4,), order, activation=torch.nn.GELU())
    for cls in (AffineAutoregressive, SplineAutoregressive):
        assert type(cls(3, activation="silu").made.activation) is torch.nn.SiLU
        with pytest.raises(ValueError, match="activation must be one of"):
            cls(3, activation="softplus")


def test_spline_bad_arguments():
    with pytest.raises(ValueError, match="num_bins"):
        SplineAutoregressive(3, num_bins=1)
    with pytest.raises(ValueError, match="bound"):
        SplineAutoregressive(3, bound=-1.0)
    with pytest.raises(ValueError, match="bound"):
        SplineAutoregressive(3, bound=float("inf"))
    with pytest.raises(ValueError, match="min_bin_width"):
        SplineAutoregressive(3, num_bins=10, min_bin_width=0.2)
    for bad in (0.0, 1.0, float("nan")):
        with pytest.raises(ValueError, match="min_derivative"):
            SplineAutoregressive(3, min_derivative=bad)
    with pytest.raises(TypeError, match=r"hidden_dims must be a sequence"):
        SplineAutoregressive(3, hidden_dims=40)
    zero = torch.zeros(4)
    with pytest.raises(ValueError, match="K - 1 derivatives"):
        rational_quadratic_spline(zero[0], zero, zero, zero)
    with pytest.raises(ValueError, match="bound"):
        rational_quadratic_spline(zero[0], zero, zero, zero[:3], bound=0.0)
    with pytest.raises(ValueError, match="min_bin_height"):
        rational_quadratic_spline(zero[0], zero, zero, zero[:3], min_bin_height=0.3)


def test_rational_quadratic_spline_is_monotone_and_exact():
    """Random bins: increasing, continuous at the knots, identity outside, closed-form inverse."""
    torch.manual_seed(0)
    k, bound = 6, 2.5
    raw = [2 * torch.randn(k, dtype=torch.float64) for _ in range(2)]
    derivs = 2 * torch.randn(k - 1, dtype=torch.float64)
    x = torch.linspace(-4, 4, 20001, dtype=torch.float64).requires_grad_()
    y, ladj = rational_quadratic_spline(x, *raw, derivs, bound=bound)
    (dydx,) = torch.autograd.grad(y.sum(), x)
    x, y, ladj = x.detach(), y.detach(), ladj.detach()
    assert (y[1:] > y[:-1]).all()
    assert (y.diff().abs() < 0.05).all()  # no jumps at the knots
    outside = x.abs() > bound
    assert torch.equal(y[outside], x[outside]) and (ladj[outside] == 0).all()
    torch.testing.assert_close(ladj, dydx.log(), atol=1e-10, rtol=0)  # log-derivative is exact
    back, ladj_back = rational_quadratic_spline(y, *raw, derivs, bound=bound, inverse=True)
    torch.testing.assert_close(back, x, atol=1e-10, rtol=0)
    torch.testing.assert_close(ladj_back, ladj, atol=1e-8, rtol=0)


def test_fresh_spline_is_the_identity():
    layer = SplineAutoregressive(3, hidden_dims=(8,), num_bins=4).double()
    x = 3 * torch.randn(50, 3, dtype=torch.float64)
    y, ladj = layer.condition().call_and_ladj(x)
    torch.testing.assert_close(y, x, atol=1e-12, rtol=0)
    torch.testing.assert_close(ladj, torch.zeros(50, dtype=torch.float64), atol=1e-12, rtol=0)


def test_gated_iaf_scale_is_bounded_by_the_gate():
    """Gated update (Kingma et al. 2016): the scale is at most 1 / sigmoid(c), whatever the net."""
    layer = AffineAutoregressive(3, hidden_dims=(8,), gate_bias=2.0).double()
    with torch.no_grad():
        layer.made.out.bias.fill_(50.0)  # a huge log-scale for the plain update
    x = torch.randn(100, 3, dtype=torch.float64)
    y, ladj = layer.condition().call_and_ladj(x)
    bound = -torch.nn.functional.logsigmoid(torch.tensor(2.0, dtype=torch.float64))
    assert (ladj <= 3 * bound + 1e-12).all() and (ladj > 3 * bound - 1e-6).all()
    # The first coordinate in order sees no input: y_0 = x_0 / sigmoid(2) exactly (the shift is
    # the MADE bias times 1 - sigmoid(52), about 1e-21).
    torch.testing.assert_close(y[:, 0], x[:, 0] / torch.sigmoid(torch.tensor(2.0)).double())
    torch.testing.assert_close(layer.condition().inv(y), x)


def test_density_estimation_by_maximum_likelihood():
    """TransformedDistribution with our layers fits data: likelihood beats the best Gaussian.

    The autoregressive layers are used in the MAF direction (``layer.inv``), so scoring data is
    one network pass per layer.
    """
    torch.manual_seed(0)
    x2 = 2.0 * torch.randn(1000)
    data = torch.stack([x2**2 / 4 + torch.randn(1000), x2], -1)  # banana
    gauss = dist.MultivariateNormal(data.mean(0), torch.cov(data.T))
    layers = [
        AffineAutoregressive(2, hidden_dims=(32,), order=torch.tensor(o)) for o in ([1, 0], [0, 1])
    ]
    affine = Affine(2, init_loc=data.mean(0), init_scale=data.std(0))
    base = dist.Normal(torch.zeros(2), 1.0).to_event(1)
    flow = dist.TransformedDistribution(base, [layer.inv for layer in layers] + [affine])
    params = [p for layer in [*layers, affine] for p in layer.parameters()]
    opt = torch.optim.Adam(params, lr=1e-2)
    for _ in range(200):
        opt.zero_grad()
        loss = -flow.log_prob(data).mean()
        loss.backward()
        opt.step()
    assert -loss.item() > gauss.log_prob(data).mean().item() + 0.2
    assert flow.sample((5,)).shape == (5, 2)  # sampling runs the sequential direction


def test_layers_register_with_pyro_module():
    pyro.clear_param_store()
    layer = Planar(3)
    pyro.module("planar", layer)
    assert any(name.startswith("planar$$$") for name in pyro.get_param_store().keys())
    clone = copy.deepcopy(layer)
    x = torch.randn(3)
    assert torch.equal(clone(x), layer(x))


def test_planar_inverse_never_cycles_float32():
    """Plain Newton cycles across the bend of tanh for large w.u_hat; the safeguard must not."""
    torch.manual_seed(0)
    worst = 0.0
    for _ in range(50):
        u, w = 3.0 * torch.randn(2, 2)
        t = PlanarTransform(u, w, torch.randn(()))
        y = 4.0 * torch.randn(4000, 2)
        worst = max(worst, (t(t.inv(y)) - y).abs().max().item())
    assert worst < 1e-3


def test_softplus_affine_map_formula_and_identity_start():
    """y = x (min_scale + softplus(a)) + m; the MADE's output bias starts at the map's identity
    parameters (a non-zero a_0), and the scale stays above min_scale however negative a gets."""
    layer = MaskedAutoregressive(3, elementwise=SoftplusAffineMap, min_scale=0.25).double()
    a0 = math.log(math.expm1(0.75))
    expected_bias = torch.tensor([0.0] * 3 + [a0] * 3, dtype=torch.float64)
    torch.testing.assert_close(layer.made.out.bias.detach(), expected_bias)  # (set in float32)
    with torch.no_grad():  # the first coordinate in order sees only the output biases
        layer.made.out.bias.view(2, 3)[:, 0] = torch.tensor([0.3, -1e3], dtype=torch.float64)
    x = torch.linspace(-5, 5, 11, dtype=torch.float64)[:, None].expand(11, 3)
    y, _ = layer.condition().call_and_ladj(x)
    torch.testing.assert_close(y[:, 0], 0.25 * x[:, 0] + 0.3)
    torch.testing.assert_close(layer.inv(y), x)
    assert layer.options()["min_scale"] == 0.25
    for bad in (0.0, 1.0, float("nan"), True):
        with pytest.raises(ValueError, match="min_scale must be"):
            SoftplusAffineMap(min_scale=bad)


def test_elementwise_map_arguments_are_not_combined():
    with pytest.raises(TypeError, match="either elementwise or"):
        AutoregressiveTransform(lambda x: (x, x), gate_bias=1.0, elementwise=SoftplusAffineMap())
    with pytest.raises(TypeError, match="built elementwise map"):
        MaskedAutoregressive(2, elementwise=SoftplusAffineMap(), min_scale=0.5)
    with pytest.raises(TypeError, match="must be an ElementwiseMap"):
        MaskedAutoregressive(2, elementwise=torch.nn.Identity())
