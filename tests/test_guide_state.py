"""What a flow guide owns and reports: its names in Pyro's param store, its state dict, its median
and quantiles, and its behaviour when frozen.

* Parameters are tied to the model's sites (and the flow's architecture): guides of different
  models never share them, while a new guide built the same way on the same model finds them in a
  restored param store, as ``AutoNormal``'s do.
* ``load_state_dict`` is all or nothing and refuses a state dict of another flow or model.
* ``median()`` and ``quantiles()`` are deterministic, consistent with each other and leave the
  global random state alone.
* A frozen guide (``requires_grad_(False)``) samples and scores without a warning.
* An untrained guide is ``AutoNormal``'s start when both get the same ``init_loc_fn`` and
  ``init_scale``.
"""

import re
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from device_params import DEVICES
from pyro import poutine
from pyro.infer import SVI, Predictive, Trace_ELBO
from pyro.infer.autoguide import AutoNormal, init_to_feasible, init_to_value
from pyro.optim import Adam

from pyro_nf import AutoIAFFlow, AutoPlanarFlow, AutoRadialFlow, AutoSplineFlow, Flow

GUIDES = [AutoPlanarFlow, AutoRadialFlow, AutoIAFFlow, AutoSplineFlow]
SMALL = {
    AutoPlanarFlow: dict(num_transforms=2),
    AutoRadialFlow: dict(num_transforms=2),
    AutoIAFFlow: dict(num_transforms=2, hidden_dims=(8,)),
    AutoSplineFlow: dict(num_transforms=2, hidden_dims=(8,), num_bins=4),
}
parametrize_guides = pytest.mark.parametrize("cls", GUIDES, ids=lambda c: c.__name__)


def make(cls, model, **kwargs):
    return cls(model, **{**SMALL[cls], **kwargs})


def model_ab(y=None):
    y = torch.tensor(3.0) if y is None else y
    a = pyro.sample("a", dist.Normal(y.new_zeros(()), 1.0))
    b = pyro.sample("b", dist.LogNormal(y.new_zeros(()), 1.0))
    pyro.sample("obs", dist.Normal(a + b, 0.5), obs=y)


def model_c(y=None):
    """Another model with the same latent size as model_ab."""
    y = torch.tensor([-3.0, 1.0]) if y is None else y
    c = pyro.sample("c", dist.Normal(y.new_zeros(2), 1.0).to_event(1))
    pyro.sample("obs", dist.Normal(c, 0.5).to_event(1), obs=y)


def train(guide, model, steps=30, lr=0.05):
    svi = SVI(model, guide, Adam({"lr": lr}), Trace_ELBO())
    for _ in range(steps):
        svi.step()
    return guide


def perturb(guide):
    """Move every parameter away from the identity start (so that different values show)."""
    with torch.no_grad():
        for p in guide.parameters():
            p.add_(0.1 * torch.randn(p.shape, dtype=p.dtype, device=p.device))
    return guide


def flow_params_in_store(guide):
    """The param-store names under which the store holds this guide's own tensors."""
    mine = {id(p) for p in guide.parameters()}
    return {name for name, p in pyro.get_param_store().named_parameters() if id(p) in mine}


# ---------------------------------------------------------------------------------------------
# Parameters belong to the model's sites (#17, item 1).
# ---------------------------------------------------------------------------------------------
@parametrize_guides
def test_guides_of_different_models_do_not_share_parameters(cls):
    first = train(make(cls, model_ab), model_ab)
    z = torch.randn(16, 2)
    with torch.no_grad():
        log_q = first.get_posterior().log_prob(z)
    values = {n: p.detach().clone() for n, p in first.named_parameters()}
    names_first = flow_params_in_store(first)

    second = make(cls, model_c)  # same latent size, same class, no clear_param_store
    train(second, model_c)

    assert second.latent_dim == first.latent_dim == 2
    names_second = flow_params_in_store(second) - names_first
    assert names_second and not (names_second & names_first)
    assert not {id(p) for p in first.parameters()} & {id(p) for p in second.parameters()}
    for n, p in first.named_parameters():
        assert torch.equal(p.detach(), values[n]), n
    with torch.no_grad():
        assert torch.equal(first.get_posterior().log_prob(z), log_q)
    # a Pyro step of the first guide still trains its own tensors
    train(first, model_ab, steps=1)
    in_store = {id(p) for _, p in pyro.get_param_store().named_parameters()}
    assert all(id(p) in in_store for p in first.parameters())


@parametrize_guides
def test_guides_of_one_model_with_different_flows_do_not_share_parameters(cls):
    small = make(cls, model_ab, num_transforms=1)
    train(small, model_ab, steps=2)
    large = make(cls, model_ab, num_transforms=3)
    train(large, model_ab, steps=2)  # no shape clash, no error, no shared tensors
    assert not {id(p) for p in small.parameters()} & {id(p) for p in large.parameters()}
    assert flow_params_in_store(small).isdisjoint(flow_params_in_store(large))


def test_flows_with_the_same_shapes_but_another_meaning_do_not_share_parameters():
    elu = make(AutoIAFFlow, model_ab)
    train(elu, model_ab, steps=2)
    gelu = make(AutoIAFFlow, model_ab, activation="gelu")  # same tensor shapes
    train(gelu, model_ab, steps=2)
    assert flow_params_in_store(elu).isdisjoint(flow_params_in_store(gelu))


@parametrize_guides
@pytest.mark.parametrize("precondition", [None, "auto"])
def test_a_new_guide_built_the_same_way_finds_its_parameters_in_the_param_store(
    cls, precondition, tmp_path
):
    """Exactly with the plain start. With the default Laplace start the preconditioner is not a
    parameter (not in Pyro's store): the fresh guide's set-up finds the mode again, from another
    init_to_median draw, so the restored posterior agrees up to the mode search's tolerance."""
    guide = perturb(make(cls, model_ab, precondition=precondition).setup())
    guide()  # registers the (perturbed) tensors in the store
    z = torch.randn(8, 2)
    with torch.no_grad():
        expected = guide.get_posterior().log_prob(z)
    pyro.get_param_store().save(tmp_path / "params.pt")
    pyro.clear_param_store()
    pyro.get_param_store().load(tmp_path / "params.pt")
    fresh = make(cls, model_ab, precondition=precondition)
    fresh()  # inside Pyro's machinery the stored values win
    assert (fresh.laplace_info is None) == (precondition is None)
    with torch.no_grad():
        restored = fresh.get_posterior().log_prob(z)
    if precondition is None:
        torch.testing.assert_close(restored, expected)
    else:
        assert fresh.laplace_info["used"]
        torch.testing.assert_close(restored, expected, rtol=2e-3, atol=2e-3)
        assert not torch.equal(
            restored, perturb(make(cls, model_ab).setup()).get_posterior().log_prob(z)
        )


def test_param_store_names_carry_the_sites_and_abbreviate_long_lists():
    guide = make(AutoPlanarFlow, model_ab)
    guide()
    names = flow_params_in_store(guide)
    assert names and all(
        re.match(r"AutoPlanarFlow\.flow\[a,b\|[0-9a-f]{8}\]\$\$\$", n) for n in names
    )
    again = make(AutoPlanarFlow, model_ab)
    again()
    assert flow_params_in_store(again) == names  # deterministic: the same name for the same guide

    def many(n=60):
        for i in range(n):
            pyro.sample(f"site_with_a_long_name_{i}", dist.Normal(0.0, 1.0))

    pyro.clear_param_store()
    long = make(AutoPlanarFlow, many)
    long()
    (prefix,) = {n.split("$$$")[0] for n in flow_params_in_store(long)}
    assert len(prefix) < 100 and re.search(r",\+\d+\|[0-9a-f]{8}\]$", prefix), prefix


# ---------------------------------------------------------------------------------------------
# load_state_dict is all or nothing, and checks what it loads (#17, item 7).
# ---------------------------------------------------------------------------------------------
def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items() if torch.is_tensor(v)}


def _unchanged(module, snapshot):
    now = _snapshot(module)
    return now.keys() == snapshot.keys() and all(torch.equal(now[k], snapshot[k]) for k in now)


@parametrize_guides
def test_failed_load_state_dict_leaves_the_guide_as_it_was(cls):
    source = perturb(make(cls, model_ab).setup())
    target = make(cls, model_ab).setup()
    before = _snapshot(target)
    good = source.state_dict()
    last = [k for k, v in good.items() if torch.is_tensor(v)][-1]

    wrong_shape = dict(good)
    wrong_shape[last] = torch.zeros(wrong_shape[last].numel() + 1)
    missing = {k: v for k, v in good.items() if k != last}
    unexpected = {**good, "flow.extra_parameter": torch.zeros(1)}
    for bad in (wrong_shape, missing, unexpected):
        with pytest.raises(RuntimeError):
            target.load_state_dict(bad)
        assert _unchanged(target, before)
    target.load_state_dict(good)  # and a good one loads
    assert not _unchanged(target, before)


def test_state_dict_of_another_flow_family_is_refused_even_when_the_shapes_match():
    def one():
        pyro.sample("x", dist.Normal(0.0, 1.0))

    radial = perturb(AutoRadialFlow(one, num_transforms=2).setup())
    planar = AutoPlanarFlow(one, num_transforms=2).setup()
    shapes = {k: tuple(v.shape) for k, v in planar.state_dict().items() if torch.is_tensor(v)}
    assert shapes == {
        k: tuple(v.shape) for k, v in radial.state_dict().items() if torch.is_tensor(v)
    }
    before = _snapshot(planar)
    with pytest.raises(RuntimeError, match="transform='radial' \\(this flow: 'planar'\\)"):
        planar.load_state_dict(radial.state_dict())
    assert _unchanged(planar, before)
    # the bare flows too
    with pytest.raises(RuntimeError, match="transform='radial'"):
        Flow(1, "planar", 2).load_state_dict(Flow(1, "radial", 2).state_dict())


def test_state_dict_of_a_guide_of_another_model_is_refused():
    source = perturb(make(AutoPlanarFlow, model_c).setup())
    target = make(AutoPlanarFlow, model_ab).setup()
    before = _snapshot(target)
    with pytest.raises(RuntimeError, match=r"other latent sites: c \(2,\).*here.*a \(\), b \(\)"):
        target.load_state_dict(source.state_dict())
    assert _unchanged(target, before)


def test_state_dict_of_other_flow_options_is_refused():
    source = make(AutoIAFFlow, model_ab, activation="gelu").setup()
    target = make(AutoIAFFlow, model_ab).setup()
    with pytest.raises(RuntimeError, match="activation=.GELU.*this flow: .ELU"):
        target.load_state_dict(source.state_dict())


@parametrize_guides
def test_state_dict_without_a_record_loads_only_with_strict_false(cls):
    source = perturb(make(cls, model_ab).setup())
    old_style = {k: v for k, v in source.state_dict().items() if not k.endswith("_extra_state")}
    target = make(cls, model_ab).setup()
    before = _snapshot(target)
    with pytest.raises(RuntimeError, match="strict=False"):
        target.load_state_dict(old_style)
    assert _unchanged(target, before)
    target.load_state_dict(old_style, strict=False)
    after = _snapshot(target)
    assert all(torch.equal(after[k], v) for k, v in old_style.items())


@parametrize_guides
def test_state_dict_with_its_record_loads_with_weights_only(cls, tmp_path):
    source = perturb(make(cls, model_ab).setup())
    assert all(torch.is_tensor(v) for v in source.state_dict().values())
    assert source.record()["sites"] == [["a", []], ["b", []]]
    torch.save(source.state_dict(), tmp_path / "guide.pt")
    target = make(cls, model_ab).setup()
    target.load_state_dict(torch.load(tmp_path / "guide.pt", weights_only=True))
    assert _unchanged(target, _snapshot(source))


# ---------------------------------------------------------------------------------------------
# median() and quantiles() are deterministic and consistent (#17, items 8 and 11).
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@parametrize_guides
def test_median_and_quantiles_are_deterministic_consistent_and_leave_the_rng_alone(cls, device):
    y = torch.tensor(3.0, device=device)
    guide = perturb(make(cls, model_ab).setup(y))
    cpu_state = torch.get_rng_state()
    cuda_state = torch.cuda.get_rng_state() if device == "cuda" else None
    median = guide.median(y)
    again = guide.median(y)
    q = guide.quantiles([0.1, 0.5, 0.9], y)
    q_again = guide.quantiles(torch.tensor([0.1, 0.5, 0.9]), y)
    assert torch.equal(torch.get_rng_state(), cpu_state)
    if cuda_state is not None:
        assert torch.equal(torch.cuda.get_rng_state(), cuda_state)
    for name in ("a", "b"):
        assert median[name].device.type == device
        assert torch.equal(median[name], again[name])
        assert torch.equal(q[name], q_again[name])
        assert torch.equal(q[name][1], median[name])  # median is quantiles([0.5]) exactly
        assert (q[name].diff() > 0).all()


@parametrize_guides
def test_median_draws_are_made_on_the_flow_device_not_the_default_one(cls):
    """On the meta device a tensor made without an explicit device cannot meet the guide's."""
    guide = perturb(make(cls, model_ab).setup())
    expected = guide.median()
    with torch.device("meta"):
        median = guide.median()
        q = guide.quantiles([0.25, 0.75])
    assert all(torch.equal(median[k], expected[k]) for k in expected)
    assert all(v.device.type == "cpu" for v in q.values())


@parametrize_guides
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_untrained_median_is_the_initial_location(cls, dtype):
    values = {"a": torch.tensor(1.25, dtype=dtype), "b": torch.tensor(0.4, dtype=dtype)}
    guide = make(cls, model_ab, init_loc_fn=init_to_value(values=values), precondition=None)
    median = guide.median(torch.tensor(3.0, dtype=dtype))
    q = guide.quantiles([0.5], torch.tensor(3.0, dtype=dtype))
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    for name, value in values.items():
        assert median[name].dtype == dtype
        torch.testing.assert_close(median[name], value, rtol=tol, atol=tol)
        assert torch.equal(q[name][0], median[name])


@parametrize_guides
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_untrained_median_of_the_default_guide_is_the_laplace_mode(cls, dtype):
    """precondition="auto" (the default) starts at the Laplace approximation: the untrained
    median is its mode, mapped to each site's support, up to the error of the stratified draws
    (the preconditioner mixes the coordinates, so the middle draw is not exactly the mode)."""
    y = torch.tensor(3.0, dtype=dtype)
    guide = make(cls, model_ab)
    median = guide.median(y)
    assert guide.laplace_info["used"]
    mode, L = guide.flow.precond_loc, guide.flow.precond_tril
    sd = (L @ L.T).diagonal().sqrt()
    unconstrained = torch.stack([median["a"], median["b"].log()])  # b is LogNormal: log scale
    assert ((unconstrained - mode).abs() / sd).max() < 0.02
    # and the mode is the model's: the log density's gradient vanishes there
    u = mode.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(guide._log_joint_fn((y,), {})(u), u)
    assert (g.abs() * sd).max() < (1e-6 if dtype == torch.float64 else 1e-2)


def test_quantiles_of_an_untrained_guide_are_close_to_the_gaussian_ones():
    """The stratified base draws give the quantiles of N(loc, scale) to 1% of the scale (plain
    Monte Carlo with 1001 draws has a standard error of 7% of the scale at the 5% quantile)."""
    values = {"a": torch.tensor(0.5), "b": torch.tensor(1.0)}
    guide = make(AutoIAFFlow, model_ab, init_loc_fn=init_to_value(values=values), precondition=None)
    q = guide.quantiles([0.05, 0.25, 0.75, 0.95])
    z = torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor([0.05, 0.25, 0.75, 0.95]))
    torch.testing.assert_close(q["a"], 0.5 + 0.1 * z, atol=1e-3, rtol=0)


@parametrize_guides
def test_quantiles_refuse_empty_or_nan_probabilities(cls):
    guide = make(cls, model_ab).setup()
    with pytest.raises(ValueError, match="quantiles must hold at least one probability"):
        guide.quantiles([])
    with pytest.raises(ValueError, match=r"quantiles must lie in \[0, 1\]"):
        guide.quantiles([0.5, float("nan")])
    with pytest.raises(TypeError, match="quantiles must be"):
        guide.quantiles("0.5")


# ---------------------------------------------------------------------------------------------
# A frozen guide is quiet (#17, item 9).
# ---------------------------------------------------------------------------------------------
@parametrize_guides
def test_frozen_guide_samples_and_scores_without_warnings(cls):
    guide = train(make(cls, model_ab), model_ab, steps=3)
    guide.requires_grad_(False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trace = poutine.trace(guide).get_trace()
        samples = Predictive(model_ab, guide=guide, num_samples=12)()
        with torch.no_grad():
            log_q = guide.get_posterior().log_prob(torch.zeros(2))
    assert [str(w.message) for w in caught] == []
    assert torch.isfinite(trace.log_prob_sum())
    assert samples["a"].shape == (12,) and (samples["b"] > 0).all()
    assert torch.isfinite(log_q)
    # frozen tensors stay out of the optimizer's reach
    assert all(not p.requires_grad for p in guide.parameters())


# ---------------------------------------------------------------------------------------------
# The AutoNormal claim, as the docs state it (#17, item 11).
# ---------------------------------------------------------------------------------------------
@parametrize_guides
def test_untrained_guide_is_autonormal_start_for_autonormals_own_defaults(cls):
    """Given AutoNormal's init_loc_fn (init_to_feasible), both guides' default init_scale (0.1)
    and precondition=None (the default "auto" starts at the Laplace approximation where there is
    one), an untrained flow guide is the distribution AutoNormal starts from: the same density
    at any point of the unconstrained space, and draws with its moments."""
    normal = AutoNormal(model_ab)
    normal()
    guide = make(cls, model_ab, init_loc_fn=init_to_feasible, precondition=None)
    guide()
    loc = torch.stack([normal.locs.a.detach(), normal.locs.b.detach()])
    scale = torch.stack([normal.scales.a.detach(), normal.scales.b.detach()])
    torch.testing.assert_close(scale, torch.full((2,), 0.1))
    z = loc + 0.3 * torch.randn(50, 2)
    with torch.no_grad():
        torch.testing.assert_close(
            guide.get_posterior().log_prob(z),
            dist.Normal(loc, scale).log_prob(z).sum(-1),
            rtol=1e-5,
            atol=1e-5,
        )
        draws = guide.get_posterior().sample((20000,))
    assert ((draws.mean(0) - loc).abs() / scale).max() < 0.05
    assert ((draws.std(0) / scale) - 1).abs().max() < 0.05


def test_discrete_site_error_points_to_pyros_enumeration_guide():
    def coin():
        p = pyro.sample("p", dist.Beta(2.0, 2.0))
        pyro.sample("x", dist.Bernoulli(p))

    with pytest.raises(ValueError, match=r"site 'x' is discrete.*enumeration\.html"):
        AutoPlanarFlow(coin, num_transforms=1)()
