"""Arguments that were accepted silently or failed deep inside torch are refused up front, with an
error that names the argument and says what it takes."""

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn

import pyro_nf
from pyro_nf import AutoIAFFlow, AutoPlanarFlow, AutoRadialFlow, AutoSplineFlow, Flow
from pyro_nf.transforms import MADE, AffineAutoregressive, Planar, PlanarTransform


def model():
    a = pyro.sample("a", dist.Normal(0.0, 1.0))
    pyro.sample("obs", dist.Normal(a, 1.0), obs=torch.tensor(0.5))


@pytest.mark.parametrize("hidden_dims", [(2.7,), (True,), (8, 0), (8.0,), ()], ids=str)
def test_hidden_dims_must_be_positive_integers(hidden_dims):
    for build in (
        lambda: AutoIAFFlow(model, hidden_dims=hidden_dims),
        lambda: AutoSplineFlow(model, hidden_dims=hidden_dims),
        lambda: Flow(3, "iaf", 2, hidden_dims=hidden_dims),
        lambda: AffineAutoregressive(3, hidden_dims=hidden_dims),
        lambda: MADE(3, hidden_dims, torch.arange(3)),
    ):
        with pytest.raises(
            ValueError, match="hidden_dims must be a non-empty sequence of positive"
        ):
            build()
    # numpy integers are integers
    flow = Flow(3, "iaf", 1, hidden_dims=(np.int64(4),))
    assert flow.layers[0].made.hidden[0].out_features == 4


@pytest.mark.parametrize("fan_in_ref", [0, -1, 2.5, "16", True], ids=repr)
def test_fan_in_ref_must_be_none_or_a_positive_integer(fan_in_ref):
    """The autoguides' new ``fan_in_ref`` is checked when the guide is built, not at set-up."""
    for build in (
        lambda: AutoIAFFlow(model, fan_in_ref=fan_in_ref),
        lambda: AutoSplineFlow(model, fan_in_ref=fan_in_ref),
        lambda: Flow(3, "iaf", 1, fan_in_ref=fan_in_ref),
    ):
        with pytest.raises(ValueError, match="fan_in_ref must be None or a positive integer"):
            build()
    made = AutoIAFFlow(model, fan_in_ref=np.int64(8)).setup().flow.layers[0].made
    assert made.fan_in_ref == 8 and type(made.fan_in_ref) is int  # numpy integers are integers


@pytest.mark.parametrize(
    "cls, options",
    [
        (AutoIAFFlow, {"fan_in_ref": np.int64(8)}),
        (AutoIAFFlow, {"num_transforms": np.int64(2), "hidden_dims": (np.int64(8),)}),
        (AutoIAFFlow, {"gate_bias": np.float32(1.0), "log_scale_min": np.float32(-4.0)}),
        (AutoSplineFlow, {"num_bins": np.int64(4), "bound": np.float32(4.0)}),
        (AutoPlanarFlow, {"inverse_tol": np.float32(1e-6)}),
        (AutoRadialFlow, {"init_scale": np.float32(0.2)}),
    ],
    ids=lambda v: "-".join(v) if isinstance(v, dict) else v.__name__,
)
def test_numpy_scalars_are_numbers_and_the_guide_saves_and_restores(cls, options):
    """numpy scalars from a config or a sweep are taken as the numbers they are: a numpy integer
    used to break the JSON record of the layers' options at set-up (``num_bins``,
    ``fan_in_ref``), and numpy floats were refused (``gate_bias``, ``inverse_tol``)."""
    guide = cls(model, **options).setup()
    fresh = cls(model, **options).setup()
    fresh.load_state_dict(guide.state_dict())
    x = guide.get_posterior().sample((3,))
    torch.testing.assert_close(fresh.get_posterior().log_prob(x), guide.get_posterior().log_prob(x))


@pytest.mark.parametrize("cls", [AutoPlanarFlow, AutoRadialFlow, AutoIAFFlow, AutoSplineFlow])
@pytest.mark.parametrize("init_scale", [True, False, float("nan"), 0.0, -1.0, "0.1"], ids=repr)
def test_init_scale_must_be_a_positive_number(cls, init_scale):
    with pytest.raises(ValueError, match="init_scale must be a positive finite number"):
        cls(model, init_scale=init_scale)


@pytest.mark.parametrize("tol", [float("nan"), float("inf"), 0.0, -1e-6, True], ids=repr)
def test_inverse_tol_must_be_a_positive_finite_number(tol):
    for build in (
        lambda: AutoPlanarFlow(model, inverse_tol=tol),
        lambda: Flow(2, "planar", 2, inverse_tol=tol),
        lambda: Planar(2, inverse_tol=tol),
        lambda: PlanarTransform(torch.zeros(2), torch.ones(2), torch.tensor(0.0), inverse_tol=tol),
    ):
        with pytest.raises(ValueError, match="inverse_tol must be None"):
            build()
    assert Planar(2, inverse_tol=1e-4).inverse_tol == 1e-4


@pytest.mark.parametrize("cls", [AutoIAFFlow, AutoSplineFlow])
def test_activation_function_of_tensors_is_refused_with_the_name_to_use(cls):
    with pytest.raises(TypeError, match="activation must be .*pass activation='tanh'"):
        cls(model, activation=torch.tanh)
    with pytest.raises(TypeError, match="activation must be .*module class"):
        cls(model, activation=torch.nn.functional.softplus)
    with pytest.raises(TypeError, match="activation must be a name or a torch.nn.Module class"):
        cls(model, activation=dict)
    # a function that builds a module is fine
    guide = cls(model, num_transforms=1, activation=lambda: nn.LeakyReLU(0.1)).setup()
    assert isinstance(guide.flow.layers[0].made.activation, nn.LeakyReLU)


def test_to_inference_data_resampling_needs_two_draws():
    guide = AutoPlanarFlow(model, num_transforms=2)
    with pytest.raises(ValueError, match="resample=True.*num_samples >= 2"):
        pyro_nf.to_inference_data(model, guide, num_samples=1, resample=True)
    idata = pyro_nf.to_inference_data(model, guide, num_samples=2, resample=True, seed=0)
    assert idata.posterior["a"].shape == (1, 2)
