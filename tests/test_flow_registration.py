"""A ``Flow`` called inside a Pyro guide registers its parameters with Pyro by itself.

The README's VAE recipe is one line, ``pyro.sample("z", flow(h))``; these tests hold that line to
training every flow parameter, once, under a stable name, and to surviving a param store round
trip, without getting in the way of a user who registers the flow (or a module around it).
"""

import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from device_params import DEVICES
from pyro.infer import SVI, Trace_ELBO
from pyro.nn import PyroModule
from pyro.optim import Adam
from torch import nn

import pyro_nf

pytestmark = pytest.mark.usefixtures("one_torch_thread")

D, H, P, N = 2, 6, 5, 8  # latent, context, data sizes, datapoints


def _data():
    return torch.bernoulli(torch.full((N, P), 0.3, dtype=torch.float32))


def _snapshot(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def _unmoved(module, before):
    return sorted(n for n, p in module.named_parameters() if torch.equal(p.detach(), before[n]))


def _vae(flow, encoder, register=()):
    """The README's VAE: the guide's only change from the Gaussian one is ``flow(h)``.

    ``register`` names extra ``pyro.module`` calls the guide makes, before (``"flow-first"``,
    ``"encoder-first"``) or after (``"encoder-last"``) the sample statement.
    """
    decoder = nn.Linear(D, P).to(next(encoder.parameters()).device)

    def model(x):
        pyro.module("decoder", decoder)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(D), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=decoder(z)).to_event(1), obs=x)

    def guide(x):
        if "encoder-first" in register:
            pyro.module("encoder", encoder)
        if "flow-first" in register:
            pyro.module("flow", flow)
        if "plain" in register:
            pyro.module("encoder", encoder.net)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", flow(encoder(x)))
        if "encoder-last" in register:
            pyro.module("encoder", encoder)

    return model, guide


def _steps(model, guide, n=5, *args):
    svi = SVI(model, guide, Adam({"lr": 0.05}), Trace_ELBO())
    for _ in range(n):
        svi.step(*args)
    return svi


class _Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(P, H), nn.Tanh())

    def forward(self, x):
        return self.net(x)


class _EncoderWithFlow(nn.Module):
    """An encoder that owns the flow, as in a user's ``VAE(nn.Module)``."""

    def __init__(self, transform="iaf"):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(P, H), nn.Tanh())
        self.flow = pyro_nf.Flow(D, transform, 2, context_dim=H)

    def forward(self, x):
        return self.net(x)


@pytest.mark.parametrize("transform", ["iaf", "planar", "radial", "spline"])
def test_readme_vae_recipe_trains_every_flow_parameter(transform):
    """``pyro.sample("z", flow(h))`` and nothing else: SVI moves every flow parameter."""
    flow = pyro_nf.Flow(D, transform, 2, context_dim=H)
    encoder = _Encoder()
    model, guide = _vae(flow, encoder, register=("plain",))
    before = _snapshot(flow)
    _steps(model, guide, 5, _data())
    assert _unmoved(flow, before) == []
    store = pyro.get_param_store()
    for name, p in flow.named_parameters():  # under the documented name, the same tensors
        assert store.get_param(f"flow$$${name}") is p


@pytest.mark.parametrize("device", DEVICES)
def test_readme_vae_recipe_trains_on_the_device_and_restores_there(device, tmp_path):
    """On the device: the recipe trains; a param store saved there loads back into a new flow."""
    flow = pyro_nf.Flow(D, "iaf", 2, context_dim=H).to(device)
    encoder = _Encoder().to(device)
    model, guide = _vae(flow, encoder, register=("plain",))
    x = _data().to(device)
    before = _snapshot(flow)
    _steps(model, guide, 3, x)
    assert _unmoved(flow, before) == []
    pyro.get_param_store().save(tmp_path / "params.pt")
    pyro.clear_param_store()
    fresh = pyro_nf.Flow(D, "iaf", 2, context_dim=H).to(device)
    pyro.get_param_store().load(tmp_path / "params.pt", map_location=device)
    model, guide = _vae(fresh, _Encoder().to(device), register=("plain",))
    pyro.poutine.trace(guide).get_trace(x)
    for (name, p), q in zip(fresh.named_parameters(), flow.parameters()):
        assert p.device.type == device and torch.equal(p.detach(), q.detach()), name


@pytest.mark.parametrize("transform", ["iaf", "planar"])
def test_unconditional_flow_in_a_guide_trains_every_parameter(transform):
    """A flow without context in a hand-written guide (a global latent) trains as well."""
    flow = pyro_nf.Flow(3, transform, 2)
    y = torch.tensor([1.0, -2.0, 0.5])

    def model():
        z = pyro.sample("z", dist.Normal(torch.zeros(3), 1.0).to_event(1))
        pyro.sample("y", dist.Normal(z, 0.5).to_event(1), obs=y)

    def guide():
        pyro.sample("z", flow())

    before = _snapshot(flow)
    _steps(model, guide, 5)
    assert _unmoved(flow, before) == []


@pytest.mark.parametrize("order", ["encoder-first", "encoder-last"])
def test_flow_inside_a_registered_module_is_registered_once_and_stepped_once(order):
    """The user's ``pyro.module`` on a module holding the flow wins: no second name, one step."""
    encoder = _EncoderWithFlow()
    model, guide = _vae(encoder.flow, encoder, register=(order,))
    before = _snapshot(encoder.flow)
    svi = _steps(model, guide, 3, _data())
    assert _unmoved(encoder.flow, before) == []
    store = pyro.get_param_store()
    assert not [k for k in store.keys() if k.startswith("flow$$$")]
    for name, p in encoder.flow.named_parameters():
        assert store.param_name(p) == f"encoder$$$flow.{name}"
        assert svi.optim.optim_objs[p].state[p]["step"] == 3  # one Adam update per SVI step


def test_flow_registered_by_the_user_under_its_own_name_is_stepped_once():
    """The explicit ``pyro.module("flow", flow)`` of older recipes still works, one step each."""
    flow = pyro_nf.Flow(D, "iaf", 2, context_dim=H)
    model, guide = _vae(flow, _Encoder(), register=("encoder-first", "flow-first"))
    svi = _steps(model, guide, 2, _data())
    for p in flow.parameters():
        assert svi.optim.optim_objs[p].state[p]["step"] == 2


def test_flow_in_a_pyro_module_is_registered_by_the_pyro_module():
    """A ``PyroModule`` holding the flow registers it; the flow adds nothing of its own."""

    class VAE(PyroModule):
        def __init__(self):
            super().__init__(name="vae")
            self.encoder = nn.Sequential(nn.Linear(P, H), nn.Tanh())
            self.flow = pyro_nf.Flow(D, "planar", 2, context_dim=H)
            self.decoder = nn.Linear(D, P)

        def model(self, x):
            with pyro.plate("data", x.shape[0]):
                z = pyro.sample("z", dist.Normal(x.new_zeros(D), 1.0).to_event(1))
                pyro.sample("x", dist.Bernoulli(logits=self.decoder(z)).to_event(1), obs=x)

        def forward(self, x):  # the guide
            with pyro.plate("data", x.shape[0]):
                pyro.sample("z", self.flow(self.encoder(x)))

    vae = VAE()
    flow = vae.flow
    before = _snapshot(flow)
    svi = SVI(vae.model, vae, Adam({"lr": 0.05}), Trace_ELBO())
    for _ in range(3):
        svi.step(_data())
    assert _unmoved(flow, before) == []
    store = pyro.get_param_store()
    for name, p in flow.named_parameters():
        assert store.param_name(p) == f"vae.flow$$${name}"
        assert svi.optim.optim_objs[p].state[p]["step"] == 3
    assert not [k for k in store.keys() if k.startswith("flow$$$")]


def test_two_anonymous_flows_in_one_guide_raise_and_ask_for_a_name():
    """Two flows left at the default name would share param-store entries: refused loudly."""
    f1 = pyro_nf.Flow(D, "planar", 2, context_dim=H)
    f2 = pyro_nf.Flow(D, "planar", 2, context_dim=H)
    encoder = _Encoder()

    def model(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z1", dist.Normal(x.new_zeros(D), 1.0).to_event(1))
            pyro.sample("z2", dist.Normal(x.new_zeros(D), 1.0).to_event(1))

    def guide(x):
        pyro.module("encoder", encoder)
        h = encoder(x)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z1", f1(h))
            pyro.sample("z2", f2(h))

    svi = SVI(model, guide, Adam({"lr": 0.05}), Trace_ELBO())
    with pytest.raises(ValueError, match="name="):
        svi.step(_data())
    # named apart, both train, each under its own name
    f2.name = "flow_z2"
    before1, before2 = _snapshot(f1), _snapshot(f2)
    for _ in range(3):
        svi.step(_data())
    assert _unmoved(f1, before1) == [] and _unmoved(f2, before2) == []
    store = pyro.get_param_store()
    assert {store.param_name(p).split("$$$")[0] for p in f1.parameters()} == {"flow"}
    assert {store.param_name(p).split("$$$")[0] for p in f2.parameters()} == {"flow_z2"}


def test_a_fresh_flow_does_not_silently_take_another_flows_trained_values():
    """A second flow object under a name whose entries hold a first flow's tensors is refused."""
    model, guide = _vae(pyro_nf.Flow(D, "iaf", 2, context_dim=H), _Encoder(), ("plain",))
    _steps(model, guide, 2, _data())
    model, guide = _vae(pyro_nf.Flow(D, "iaf", 2, context_dim=H), _Encoder(), ("plain",))
    with pytest.raises(ValueError, match="clear_param_store"):
        _steps(model, guide, 1, _data())


def test_a_copy_of_a_flow_is_a_second_flow_and_needs_its_own_name():
    """``copy.deepcopy(flow)`` has its own tensors: refused under the same name, trained apart
    under another."""
    import copy

    flow = pyro_nf.Flow(3, "planar", 2)

    def run(f):
        pyro.poutine.trace(lambda: pyro.sample("z", f())).get_trace()

    run(flow)
    twin = copy.deepcopy(flow)
    with pytest.raises(ValueError, match="name="):
        run(twin)
    twin.name = "twin"
    run(twin)
    store = pyro.get_param_store()
    for name, p in twin.named_parameters():
        assert store.get_param(f"twin$$${name}") is p
        assert store.get_param(f"flow$$${name}") is dict(flow.named_parameters())[name]


def test_readme_vae_recipe_trains_under_jit_trace_elbo():
    """Pyro's JIT loss finds the flow's parameters through the same registration."""
    flow = pyro_nf.Flow(D, "iaf", 2, context_dim=H)
    model, guide = _vae(flow, _Encoder(), register=("plain",))
    before = _snapshot(flow)
    svi = SVI(model, guide, Adam({"lr": 0.05}), pyro.infer.JitTrace_ELBO(ignore_jit_warnings=True))
    x = _data()
    for _ in range(3):
        svi.step(x)
    assert _unmoved(flow, before) == []


def test_param_store_round_trip_restores_an_auto_registered_flow(tmp_path):
    """Save the param store, start afresh with a new flow, load: the flow has the saved values."""
    flow, encoder = pyro_nf.Flow(D, "iaf", 2, context_dim=H), _Encoder()
    model, guide = _vae(flow, encoder, ("plain",))
    x = _data()
    _steps(model, guide, 5, x)
    trained = _snapshot(flow)
    pyro.get_param_store().save(tmp_path / "params.pt")
    pyro.clear_param_store()

    fresh, fresh_encoder = pyro_nf.Flow(D, "iaf", 2, context_dim=H), _Encoder()
    assert _unmoved(fresh, trained) != sorted(trained)  # fresh values differ before the load
    pyro.get_param_store().load(tmp_path / "params.pt")
    model, guide = _vae(fresh, fresh_encoder, ("plain",))
    pyro.poutine.trace(guide).get_trace(x)  # any run of the guide under Pyro syncs the flow
    for name, p in fresh.named_parameters():
        assert torch.equal(p.detach(), trained[name]), name
        assert pyro.get_param_store().get_param(f"flow$$${name}") is p
    before = _snapshot(fresh)
    _steps(model, guide, 2, x)  # and it trains on from there
    assert _unmoved(fresh, before) == []


def test_flow_moved_after_a_step_keeps_training_its_new_tensors():
    """``flow.double()`` after a step: the store follows the flow, not the stale float tensors."""
    flow = pyro_nf.Flow(3, "planar", 2)
    data = {"y": torch.tensor([1.0, -2.0, 0.5])}

    def model():
        y = data["y"]
        z = pyro.sample("z", dist.Normal(torch.zeros_like(y), 1.0).to_event(1))
        pyro.sample("y", dist.Normal(z, 0.5).to_event(1), obs=y)

    def guide():
        pyro.sample("z", flow())

    _steps(model, guide, 2)
    flow.double()
    data["y"] = data["y"].double()
    before = _snapshot(flow)
    _steps(model, guide, 2)
    assert _unmoved(flow, before) == []
    store = pyro.get_param_store()
    for name, p in flow.named_parameters():
        assert p.dtype == torch.float64 and store.get_param(f"flow$$${name}") is p


def test_flow_called_outside_pyro_registers_nothing():
    flow = pyro_nf.Flow(D, "iaf", 2, context_dim=H)
    flow(torch.randn(4, H)).rsample()
    assert list(pyro.get_param_store().keys()) == []


def test_frozen_flow_registers_nothing_and_warns_nothing_until_unfrozen():
    flow = pyro_nf.Flow(D, "planar", 2, context_dim=H).requires_grad_(False)
    run = pyro.poutine.trace(lambda: pyro.sample("z", flow(torch.randn(4, H)))).get_trace
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run()
        run()
    assert list(pyro.get_param_store().keys()) == []
    flow.requires_grad_(True)
    run()
    assert sorted(pyro.get_param_store().keys()) == sorted(
        f"flow$$${n}" for n, _ in flow.named_parameters()
    )


def test_param_store_entry_of_another_shape_is_refused_with_a_clear_error():
    pyro.param("flow$$$affine.head.bias", torch.zeros(7))
    flow = pyro_nf.Flow(D, "planar", 2, context_dim=H)
    with pytest.raises(ValueError, match="shape"):
        pyro.poutine.trace(lambda: pyro.sample("z", flow(torch.randn(4, H)))).get_trace()
    assert "flow$$$affine.head.weight" not in pyro.get_param_store()  # nothing half-done


def test_module_local_params_mode_registers_nothing():
    flow = pyro_nf.Flow(D, "planar", 2, context_dim=H)
    with pyro.settings.context(module_local_params=True):
        pyro.poutine.trace(lambda: pyro.sample("z", flow(torch.randn(4, H)))).get_trace()
    assert list(pyro.get_param_store().keys()) == []


def test_autoguide_flow_is_not_registered_a_second_time():
    """The flow autoguides register their flow under the guide's names; ``Flow`` adds none."""

    def model():
        pyro.sample("x", dist.Normal(torch.zeros(3), 1.0).to_event(1))

    guide = pyro_nf.AutoIAFFlow(model, hidden_dims=(8,))
    pyro_nf.fit(model, guide, num_steps=3, progress=False)
    svi = SVI(model, guide, Adam({"lr": 0.01}), Trace_ELBO())
    svi.step()
    keys = list(pyro.get_param_store().keys())
    assert keys and not [k for k in keys if k.startswith("flow$$$")]


@pytest.mark.parametrize("bad", ["", "a$$$b", 3, None])
def test_bad_names_are_refused(bad):
    with pytest.raises(ValueError, match="name"):
        pyro_nf.Flow(D, "planar", 2, name=bad)


def test_an_autoguides_flow_registers_under_the_guides_name_not_the_default():
    """The guide's own flow, called inside a handler (here by ``median()`` under a trace), must
    not take the default name ``"flow"`` from a user's flow in the same param store."""

    def model():
        pyro.sample("x", dist.Normal(torch.zeros(2), 1.0).to_event(1))

    guide = pyro_nf.AutoPlanarFlow(model, 2).setup()
    user_flow = pyro_nf.Flow(2, "planar", 1)
    with pyro.poutine.trace():
        guide.median()
        user_flow()  # takes "flow": no clash with the guide's flow
    names = list(pyro.get_param_store().keys())
    assert any(n.startswith("flow$$$") for n in names)
    assert all(n.startswith(("flow$$$", "AutoPlanarFlow.flow[x|")) for n in names), names
