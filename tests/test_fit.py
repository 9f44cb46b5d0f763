"""``pyro_nf.fit``'s parts, each on its own, and what issue #17 asked of fit: it never changes the
objective behind the user's back, never hides a real error, never loses a finished step, refuses
nonsense arguments, and resumes only the checkpoint of the same fit.

``tests/test_workflow.py`` tests fit as a whole (FitResult, stopping rule, schedules, non-finite
steps, interruption and resume).
"""

import math
import os
import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO
from pyro.infer.autoguide import AutoNormal
from test_workflow import Y, simple_model
from torch.optim import SGD, Adam

import pyro_nf
import pyro_nf._checkpoint as checkpoint_module
from pyro_nf import CheckpointError, FitError, FitResult, fit
from pyro_nf._latents import check_unchanged, describe_differences, latent_sites
from pyro_nf.fast import FastELBO
from pyro_nf.workflow import (
    _check_arguments,
    _choose_loss,
    _collect_parameters,
    _first_evaluation,
    _loop,
    _Outcome,
    _Run,
    _Stepper,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def local_model(y):
    """One latent per data point: its shape follows the data."""
    mu = pyro.sample("mu", dist.Normal(0.0, 3.0))
    with pyro.plate("n", len(y)):
        z = pyro.sample("z", dist.Normal(mu, 1.0))
        pyro.sample("y", dist.Normal(z, 1.0), obs=y)


def planar(model):
    # The plain start: these tests count the model's calls, and the default Laplace start's
    # mode search makes a number of them that depends on its random start.
    return pyro_nf.AutoPlanarFlow(model, num_transforms=2, precondition=None)


def param_values():
    store = pyro.get_param_store()
    return {name: store[name].unconstrained().detach().clone() for name in store.keys()}


def quiet_fit(*args, **kwargs):
    return fit(*args, **{"progress": False, **kwargs})


# --------------------------------------------------------------------------------------------
# Item 3: the objective is the one asked for, and real errors are raised as they are
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss", [None, "Trace_ELBO"])
def test_fit_refuses_data_that_changes_the_latent_shapes(loss):
    """A guide set up on 3 points, fitted on 1: Trace_ELBO would broadcast the guide's 3 values
    of z against 1 data point and end below the true bound."""
    guide = planar(local_model).setup(torch.tensor([1.0, 2.0, 3.0]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # refused outright, not a warning and a fallback
        with pytest.raises(ValueError) as info:
            quiet_fit(
                local_model,
                guide,
                torch.tensor([1.0]),
                num_steps=5,
                loss=None if loss is None else Trace_ELBO(),
            )
    message = str(info.value)
    assert "site 'z' has shape (3,)" in message and "(1,)" in message
    assert "new AutoPlanarFlow" in message  # what to do


def test_fit_refuses_a_model_that_gained_a_latent_after_set_up():
    """The new latent would be drawn from its prior inside the 'ELBO', with no warning."""
    extra = {"on": False}

    def model(y):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        if extra["on"]:
            mu = mu + pyro.sample("b", dist.Normal(0.0, 1.0))
        pyro.sample("y", dist.Normal(mu, 1.0), obs=y)

    guide = planar(model).setup(torch.tensor(1.0))
    extra["on"] = True
    with pytest.raises(ValueError, match="site 'b' is in the model run with these arguments"):
        quiet_fit(model, guide, torch.tensor(1.0), num_steps=5)


def test_fit_refuses_a_model_that_lost_a_latent_or_changed_its_support():
    variant = {"v": 0}

    def model():
        pyro.sample("a", dist.Normal(0.0, 1.0))
        if variant["v"] == 0:
            pyro.sample("b", dist.Normal(0.0, 1.0))
        elif variant["v"] == 1:
            pyro.sample("b", dist.LogNormal(0.0, 1.0))

    guide = planar(model).setup()
    variant["v"] = 1
    with pytest.raises(ValueError, match="site 'b' has support Real .*, GreaterThan"):
        quiet_fit(model, guide, num_steps=2)
    variant["v"] = 2
    with pytest.raises(ValueError, match="site 'b' is in the AutoPlanarFlow's set-up but not"):
        quiet_fit(model, guide, num_steps=2)


def test_fit_of_a_set_up_guide_with_the_same_arguments_runs_and_draws_the_same_numbers():
    """The latent check runs the model at the set-up values and restores the random states."""
    guide = planar(simple_model).setup(Y)
    torch_state = torch.get_rng_state()
    check_unchanged(simple_model, guide, (Y,), {})
    assert torch.equal(torch_state, torch.get_rng_state())
    result = quiet_fit(simple_model, guide, Y, num_steps=5)
    assert np.isfinite(result.losses).all()


def test_latent_check_reports_the_changed_site_even_when_the_model_then_fails():
    def model(y):
        z = pyro.sample("z", dist.Normal(torch.zeros(len(y)), 1.0).to_event(1))
        # needs z to have the data's length
        pyro.sample("y", dist.Normal(z.reshape(3), 1.0).to_event(1), obs=y.expand(3))

    guide = planar(model).setup(torch.zeros(3))
    with pytest.raises(ValueError, match=r"site 'z' has shape \(3,\).*\(2,\)") as info:
        check_unchanged(model, guide, (torch.zeros(2),), {})
    assert isinstance(info.value.__cause__, RuntimeError)  # the model's own failure, chained


def test_latent_check_raises_the_models_own_error_when_nothing_changed():
    fail = {"on": False}

    def model():
        pyro.sample("x", dist.Normal(0.0, 1.0))
        if fail["on"]:
            raise KeyError("a missing column")

    guide = planar(model).setup()
    fail["on"] = True
    with pytest.raises(KeyError, match="a missing column"):
        check_unchanged(model, guide, (), {})


@pytest.mark.parametrize("num_particles", [1, 3])
def test_fit_raises_the_guides_own_error_for_a_model_without_latents(num_particles):
    """Not a fallback warning and then an unrelated KeyError: 'flow'."""

    def model(y):
        pyro.sample("y", dist.Normal(0.0, 1.0), obs=y)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RuntimeError, match="no latent variables"):
            quiet_fit(
                model, planar(model), torch.tensor(1.0), num_steps=3, num_particles=num_particles
            )


def unbroadcastable(y):
    """Fine with one particle; fails on a particle plate (it assumes a scalar mu)."""
    mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
    loc = torch.cat([mu.reshape(1), -mu.reshape(1)])
    with pyro.plate("n", 2):
        pyro.sample("y", dist.Normal(loc, 1.0), obs=y)


@pytest.mark.parametrize("make_guide", [planar, AutoNormal], ids=["AutoPlanarFlow", "AutoNormal"])
def test_fit_falls_back_to_sequential_particles_only_for_a_model_that_does_not_broadcast(
    make_guide,
):
    y = torch.tensor([0.3, -0.2])
    with pytest.warns(UserWarning, match="does not broadcast over the particle plate"):
        result = quiet_fit(
            unbroadcastable, make_guide(unbroadcastable), y, num_steps=5, num_particles=3, seed=0
        )
    assert np.isfinite(result.losses).all()


def test_fit_never_falls_back_on_an_error_unrelated_to_particles():
    """A model error that one particle meets too is raised as it is, with no fallback warning."""

    def model(y):
        pyro.sample("mu", dist.Normal(0.0, 1.0))
        raise ValueError("the data has a NaN in column 3")

    for make_guide in (planar, AutoNormal):
        pyro.clear_param_store()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with pytest.raises(ValueError, match="column 3"):
                quiet_fit(model, make_guide(model), Y, num_steps=3, num_particles=3)


def test_fit_with_fast_true_or_a_given_loss_never_falls_back():
    y = torch.tensor([0.3, -0.2])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RuntimeError):
            quiet_fit(unbroadcastable, planar(unbroadcastable), y, num_steps=2, num_particles=3,
                      fast=True)  # fmt: skip
        with pytest.raises(RuntimeError):
            quiet_fit(unbroadcastable, AutoNormal(unbroadcastable), y, num_steps=2,
                      loss=Trace_ELBO(num_particles=3, vectorize_particles=True))  # fmt: skip


# --------------------------------------------------------------------------------------------
# Item 4: arguments
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "clip_norm", [-1, 0, 0.0, -0.5, float("nan"), float("inf"), True, "1.0"], ids=repr
)
def test_fit_refuses_a_clip_norm_that_is_not_a_positive_finite_number(clip_norm):
    """clip_norm=-1 reversed every gradient, 0 froze training."""
    with pytest.raises(ValueError, match="clip_norm must be a positive finite number"):
        quiet_fit(simple_model, AutoNormal(simple_model), Y, num_steps=3, clip_norm=clip_norm)


def test_fit_clip_norm_bounds_the_update():
    guide = AutoNormal(simple_model)
    guide(Y)
    before = param_values()
    quiet_fit(
        simple_model, guide, Y, num_steps=1, optimizer=torch.optim.SGD, lr=1.0, clip_norm=1e-3
    )
    moved = torch.cat([(param_values()[k] - v).flatten() for k, v in before.items()])
    assert moved.norm() <= 1e-3 * (1 + 1e-5)


@pytest.mark.parametrize(
    "kwargs, exception, words",
    [
        (dict(lr=True), ValueError, "lr must be a positive finite number"),
        (dict(lr=float("inf")), ValueError, "lr must be"),
        (dict(stop_tol=float("nan")), ValueError, "stop_tol must be a finite number"),
        (dict(stop_tol=-0.1), ValueError, "stop_tol"),
        (dict(stop_tol=True), ValueError, "stop_tol"),
        (dict(stop_window=True), ValueError, "stop_window must be a positive integer"),
        (dict(num_particles=2.0), ValueError, "num_particles"),
        (dict(seed=1.5), ValueError, "seed must be None or an integer"),
        (dict(seed=True), ValueError, "seed"),
        (dict(progress="no"), TypeError, "progress must be True or False"),
        (dict(vectorize_particles=1), TypeError, "vectorize_particles"),
        (dict(fast="yes"), TypeError, "fast must be None, True or False"),
        (dict(fast=1), TypeError, "fast"),
        (dict(loss=Trace_ELBO), TypeError, r"pass loss=Trace_ELBO\(...\)"),
        (dict(loss="Trace_ELBO"), TypeError, "ELBO instance"),
        (dict(optimizer_kwargs={"lr": 0.1}), ValueError, "pass lr= to fit"),
        (dict(optimizer_kwargs=[("momentum", 0.9)]), TypeError, "optimizer_kwargs must be"),
        (dict(checkpoint=3), TypeError, "checkpoint must be a file path"),
    ],
    ids=lambda v: repr(v) if isinstance(v, dict) else "",
)
def test_fit_refuses_arguments_of_the_wrong_kind_naming_them(kwargs, exception, words):
    model_calls = []

    def model(y):
        model_calls.append(1)
        simple_model(y)

    with pytest.raises(exception, match=words):
        quiet_fit(model, AutoNormal(model), Y, num_steps=3, **kwargs)
    assert not model_calls  # refused before anything ran


@pytest.mark.parametrize("name", ["adam", "Adam", "ADAMW", "sgd", "RMSprop"])
def test_fit_accepts_the_name_of_a_torch_optim_optimizer_in_any_case(name, monkeypatch):
    cls = {c.__name__.lower(): c for c in vars(torch.optim).values() if isinstance(c, type)}[
        name.lower()
    ]
    built = []
    original = pyro_nf.workflow._make_optimizer

    def spy(optimizer, *args):
        opt = original(optimizer, *args)
        built.append(type(opt))
        return opt

    monkeypatch.setattr(pyro_nf.workflow, "_make_optimizer", spy)
    by_name = quiet_fit(simple_model, AutoNormal(simple_model), Y, num_steps=5, seed=1,
                        optimizer=name)  # fmt: skip
    named = param_values()
    pyro.clear_param_store()
    by_class = quiet_fit(simple_model, AutoNormal(simple_model), Y, num_steps=5, seed=1,
                         optimizer=cls)  # fmt: skip
    assert built == [cls, cls]
    assert np.array_equal(by_name.losses, by_class.losses)
    for k, v in param_values().items():
        assert torch.equal(v, named[k])


@pytest.mark.parametrize(
    "optimizer, exception, words",
    [
        ("adamm", ValueError, "not the name of a torch.optim optimizer.*adam, adamax, adamw"),
        ("lbfgs", ValueError, "LBFGS needs a closure"),
        (torch.optim.LBFGS, ValueError, "LBFGS"),
        (pyro.optim.Adam, TypeError, "not Pyro's wrapper"),
        (pyro.optim.Adam({"lr": 0.01}), TypeError, "not Pyro's wrapper"),
        (torch.optim.Adam([torch.zeros(1, requires_grad=True)]), TypeError, "not an instance"),
        (dict, TypeError, "torch.optim.Optimizer subclass"),
        (3, TypeError, "optimizer must be"),
    ],
    ids=["typo", "lbfgs-name", "lbfgs", "pyro-function", "pyro-instance", "instance", "dict", "3"],
)
def test_fit_refuses_what_is_not_an_optimizer_class_or_name(optimizer, exception, words):
    with pytest.raises(exception, match=words):
        quiet_fit(simple_model, AutoNormal(simple_model), Y, num_steps=3, optimizer=optimizer)


def test_fit_refuses_an_optimizer_factory_that_builds_no_optimizer():
    with pytest.raises(TypeError, match="not a torch.optim.Optimizer"):
        quiet_fit(simple_model, AutoNormal(simple_model), Y, num_steps=3,
                  optimizer=lambda params, lr: object())  # fmt: skip


def test_check_arguments_normalizes_the_settings(tmp_path):
    settings = _check_arguments(
        num_steps=10, lr=1, num_particles=1, vectorize_particles=True, loss=None, fast=None,
        optimizer="sgd", optimizer_kwargs=None, lr_schedule="cosine", clip_norm=2,
        stop_window=None, stop_tol=0, max_bad_steps=3, seed=None, progress=False,
        checkpoint=tmp_path / "ck.pt", checkpoint_every=5, resume=False, distributed=False,
    )  # fmt: skip
    assert settings.optimizer is torch.optim.SGD and settings.optimizer_kwargs == {}
    assert isinstance(settings.lr, float) and settings.clip_norm == 2.0
    assert settings.checkpoint == str(tmp_path / "ck.pt")
    assert settings.lr_factor(0) == 1.0 and settings.lr_factor(9) == pytest.approx(0.0)
    assert os.listdir(tmp_path) == []  # checking the folder leaves nothing behind


# --------------------------------------------------------------------------------------------
# Item 5: a checkpoint records what it belongs to
# --------------------------------------------------------------------------------------------
def two_sites(y):
    a = pyro.sample("a", dist.Normal(torch.zeros(2), 1.0).to_event(1))
    b = pyro.sample("b", dist.Normal(0.0, 1.0))
    pyro.sample("y", dist.Normal(a.sum() + b, 1.0), obs=y)


def renamed_sites(y):  # same latent size (3), other sites
    c = pyro.sample("c", dist.Normal(torch.zeros(2), 1.0).to_event(1))
    d = pyro.sample("d", dist.Normal(0.0, 1.0))
    pyro.sample("y", dist.Normal(c.sum() + d, 1.0), obs=y)


def reshaped_sites(y):  # same names and size, other shapes
    a = pyro.sample("a", dist.Normal(0.0, 1.0))
    b = pyro.sample("b", dist.Normal(torch.zeros(2), 1.0).to_event(1))
    pyro.sample("y", dist.Normal(a + b.sum(), 1.0), obs=y)


def reordered_sites(y):
    b = pyro.sample("b", dist.Normal(0.0, 1.0))
    a = pyro.sample("a", dist.Normal(torch.zeros(2), 1.0).to_event(1))
    pyro.sample("y", dist.Normal(a.sum() + b, 1.0), obs=y)


def _checkpoint_of(tmp_path, model=two_sites, make_guide=planar, **kwargs):
    path = tmp_path / "ck.pt"
    path.unlink(missing_ok=True)  # a new fit: fit refuses to overwrite an earlier one's file
    quiet_fit(model, make_guide(model), torch.tensor(1.0), num_steps=4, checkpoint=path, **kwargs)
    pyro.clear_param_store()
    return path


def _resume(path, model=two_sites, make_guide=planar, **kwargs):
    return quiet_fit(model, make_guide(model), torch.tensor(1.0), num_steps=8, checkpoint=path,
                     resume=True, **kwargs)  # fmt: skip


def test_a_new_fit_refuses_to_overwrite_an_earlier_fits_checkpoint(tmp_path):
    path = _checkpoint_of(tmp_path)
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="already exists: pass resume=True"):
        quiet_fit(two_sites, planar(two_sites), torch.tensor(1.0), num_steps=4, checkpoint=path)
    assert path.read_bytes() == before
    _resume(path)  # and the earlier fit continues


def test_checkpoint_records_the_guide_the_latent_sites_and_the_optimizer(tmp_path):
    ckpt = torch.load(_checkpoint_of(tmp_path), weights_only=True)
    assert ckpt["format"] == "pyro_nf.fit/2"
    assert ckpt["guide"] == "AutoPlanarFlow"
    assert ckpt["latents"] == [["a", [2], "Real"], ["b", [], "Real"]]
    assert ckpt["optimizer_class"] == "Adam"
    # other guides name their sites in their parameters; latents is None for them
    ckpt = torch.load(_checkpoint_of(tmp_path, make_guide=AutoNormal), weights_only=True)
    assert ckpt["guide"] == "AutoNormal" and ckpt["latents"] is None


@pytest.mark.parametrize(
    "other, words",
    [
        (renamed_sites, "site 'a' is in the checkpoint but not in this fit"),
        (reshaped_sites, r"site 'a' has shape \(2,\) in the checkpoint, \(\) in this fit"),
        (reordered_sites, "the sites come in another order"),
    ],
    ids=["renamed", "reshaped", "reordered"],
)
def test_resume_refuses_a_checkpoint_of_another_model_with_the_same_latent_size(
    tmp_path, other, words
):
    """The flow's parameters have the same names and shapes; only the record tells them apart."""
    path = _checkpoint_of(tmp_path)
    with pytest.raises(CheckpointError, match="belongs to another model: " + words):
        _resume(path, model=other)


@pytest.mark.parametrize(
    "written, resumed, words",
    [
        (dict(optimizer=SGD, optimizer_kwargs={"momentum": 0.5}), dict(optimizer=Adam),
         "holds the state of a SGD optimizer, this fit uses Adam"),
        (dict(optimizer=Adam), dict(optimizer=SGD, optimizer_kwargs={"momentum": 0.5}),
         r"optimizer=torch.optim.Adam"),
        (dict(optimizer=SGD, optimizer_kwargs={"momentum": 0.5}),
         dict(optimizer=SGD, optimizer_kwargs={"momentum": 0.9}),
         r"momentum=0.5 in the checkpoint, 0.9 here"),
        (dict(optimizer=Adam), dict(optimizer=Adam, optimizer_kwargs={"betas": (0.8, 0.9)}),
         r"betas=\(0.9, 0.999\) in the checkpoint, \(0.8, 0.9\) here"),
    ],
    ids=["sgd-then-adam", "adam-then-sgd", "other-momentum", "other-betas"],
)  # fmt: skip
def test_resume_refuses_another_optimizer_naming_the_checkpoints(tmp_path, written, resumed, words):
    """Adam's state into SGD gave KeyError: 'momentum'; other settings were silently replaced."""
    path = _checkpoint_of(tmp_path, **written)
    with pytest.raises(CheckpointError, match=words):
        _resume(path, **resumed)


def test_resume_accepts_a_new_lr_and_reproduces_the_run_otherwise(tmp_path):
    kw = dict(optimizer=SGD, optimizer_kwargs={"momentum": 0.5}, seed=3)
    full = quiet_fit(two_sites, planar(two_sites), torch.tensor(1.0), num_steps=8, **kw)
    pyro.clear_param_store()
    path = _checkpoint_of(tmp_path, **kw)
    rest = _resume(path, **{**kw, "seed": None})
    assert np.array_equal(rest.losses, full.losses)
    pyro.clear_param_store()
    faster = _resume(path, **{**kw, "seed": None, "lr": 0.05})  # lr may change on resume
    assert np.array_equal(faster.losses[:4], full.losses[:4]) and faster.num_steps == 8


def test_resume_refuses_a_checkpoint_of_another_guide_class(tmp_path):
    path = _checkpoint_of(tmp_path)
    ckpt = torch.load(path, weights_only=True)
    ckpt["guide"] = "AutoRadialFlow"
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match="guide of class AutoRadialFlow"):
        _resume(path)


def test_old_format_checkpoint_still_resumes_with_a_warning(tmp_path):
    full = quiet_fit(two_sites, planar(two_sites), torch.tensor(1.0), num_steps=8, seed=2)
    pyro.clear_param_store()
    path = _checkpoint_of(tmp_path, seed=2)
    ckpt = torch.load(path, weights_only=True)
    for key in ("guide", "latents", "optimizer_class"):
        del ckpt[key]
    ckpt["format"] = "pyro_nf.fit/1"
    torch.save(ckpt, path)
    with pytest.warns(UserWarning, match="older pyro_nf"):
        rest = _resume(path)
    assert np.array_equal(rest.losses, full.losses)
    assert torch.load(path, weights_only=True)["format"] == "pyro_nf.fit/2"


def test_old_format_checkpoint_of_another_optimizer_is_refused(tmp_path):
    path = _checkpoint_of(tmp_path)  # Adam
    ckpt = torch.load(path, weights_only=True)
    for key in ("guide", "latents", "optimizer_class"):
        del ckpt[key]
    ckpt["format"] = "pyro_nf.fit/1"
    torch.save(ckpt, path)
    with pytest.warns(UserWarning, match="older"), pytest.raises(CheckpointError, match="momentum"):
        _resume(path, optimizer=SGD, optimizer_kwargs={"momentum": 0.5})


def test_restore_changes_nothing_when_it_refuses(tmp_path):
    path = _checkpoint_of(tmp_path, optimizer="sgd", optimizer_kwargs={"momentum": 0.5})
    ckpt = checkpoint_module.load(str(path))
    guide = planar(reordered_sites)
    guide(torch.tensor(1.0))  # sets up and registers its parameters in the param store
    names, params = _collect_parameters(list(pyro.get_param_store().keys()))
    before = [p.detach().clone() for p in params]
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.5)
    owner = checkpoint_module.owner(guide, opt)
    rng = torch.get_rng_state()
    with pytest.raises(CheckpointError, match="another order"):
        checkpoint_module.restore(ckpt, str(path), owner, names, params, opt)
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert opt.state_dict()["state"] == {} and torch.equal(rng, torch.get_rng_state())


def test_describe_differences_names_each_difference():
    a = [("x", (2,), "Real"), ("y", (), "GreaterThan"), ("w", (), "Real")]
    b = [("x", (3,), "Real"), ("y", (), "Interval"), ("v", (), "Real")]
    text = describe_differences(a, b, "A", "B")
    assert text == [
        "site 'w' is in A but not in B",
        "site 'v' is in B but not in A",
        "site 'x' has shape (2,) in A, (3,) in B",
        "site 'y' has support GreaterThan in A, Interval in B",
    ]
    assert describe_differences(a, a[::-1], "A", "B", ordered=False) == []
    assert "another order" in describe_differences(a, a[::-1], "A", "B")[0]


def test_latent_sites_lists_names_shapes_and_supports_in_order():
    guide = planar(local_model).setup(torch.zeros(4))
    assert latent_sites(guide.prototype_trace) == [("mu", (), "Real"), ("z", (4,), "Real")]


# --------------------------------------------------------------------------------------------
# Item 6: no lost work
# --------------------------------------------------------------------------------------------
class FailingFrom:
    """simple_model that raises ``error`` from its ``start``-th call on (``None``: never)."""

    def __init__(self, error, start=None):
        self.error, self.start, self.calls = error, start, 0

    def __call__(self, y):
        self.calls += 1
        if self.start is not None and self.calls > self.start:
            raise self.error
        simple_model(y)


def calls_before_step(make_guide, step, **kw):
    """Model calls a fit makes before step ``step`` begins (measured, not assumed)."""
    counts = []
    for n in (1, 2):
        pyro.clear_param_store()
        model = FailingFrom(None)
        quiet_fit(model, make_guide(model), Y, num_steps=n, **kw)
        counts.append(model.calls)
    pyro.clear_param_store()
    per_step = counts[1] - counts[0]
    return counts[0] - per_step + per_step * step


@pytest.mark.parametrize(
    "error",
    [KeyError("column"), TypeError("bad type"), IndexError("index"), ZeroDivisionError("zero")],
    ids=lambda e: type(e).__name__,
)
@pytest.mark.parametrize("make_guide", [AutoNormal, planar], ids=["AutoNormal", "AutoPlanarFlow"])
def test_fit_model_raising_anything_mid_fit_saves_the_checkpoint_and_carries_the_result(
    tmp_path, error, make_guide
):
    k, n = 5, 9
    kw = dict(seed=6)
    full = quiet_fit(simple_model, make_guide(simple_model), Y, num_steps=n, **kw)
    model = FailingFrom(error, calls_before_step(make_guide, k, **kw))
    path = tmp_path / "ck.pt"
    with pytest.raises(FitError) as info:
        quiet_fit(model, make_guide(model), Y, num_steps=n, checkpoint=path, **kw)
    e = info.value
    assert e.__cause__ is error
    assert f"step {k}" in str(e) and type(error).__name__ in str(e) and ".result" in str(e)
    assert isinstance(e.result, FitResult) and e.result.stopped == "error"
    assert e.result.num_steps == k and np.array_equal(e.result.losses, full.losses[:k])
    assert torch.load(path, weights_only=True)["step"] == k
    # once the cause is fixed, resuming finishes the run exactly as if nothing had happened
    pyro.clear_param_store()
    model.start = None
    rest = quiet_fit(model, make_guide(model), Y, num_steps=n, checkpoint=path, resume=True)
    assert np.array_equal(rest.losses, full.losses)


def test_fit_error_at_the_first_step_says_the_parameters_are_the_initial_ones():
    model = FailingFrom(KeyError("x"), calls_before_step(AutoNormal, 0))
    with pytest.raises(FitError, match="initial ones") as info:
        quiet_fit(model, AutoNormal(model), Y, num_steps=5)
    assert "(-1)" not in str(info.value)
    assert info.value.result.num_steps == 0 and info.value.result.losses.shape == (0,)


def test_a_failing_lr_schedule_is_a_fit_error_with_the_result(tmp_path):
    def schedule(step):
        if step == 3:
            raise ZeroDivisionError("schedule")
        return 1.0

    path = tmp_path / "ck.pt"
    with pytest.raises(FitError, match="step 3") as info:
        quiet_fit(simple_model, AutoNormal(simple_model), Y, num_steps=9, lr_schedule=schedule,
                  checkpoint=path)  # fmt: skip
    assert info.value.result.num_steps == 3
    assert torch.load(path, weights_only=True)["step"] == 3


@pytest.mark.filterwarnings("ignore:Encountered NaN")
def test_fit_error_for_non_finite_steps_carries_the_result_and_checkpoints(tmp_path):
    def model(y):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        pyro.factor("kink", (mu - mu).abs().sqrt())  # finite value, NaN gradient

    path = tmp_path / "ck.pt"
    with pytest.raises(FitError, match="3 consecutive non-finite") as info:
        quiet_fit(model, AutoNormal(model), Y, num_steps=10, max_bad_steps=3, checkpoint=path)
    result = info.value.result
    assert result.num_steps == 3 and result.skipped_steps == [0, 1, 2]
    assert torch.load(path, weights_only=True)["step"] == 3


def test_a_checkpoint_that_cannot_be_written_mid_fit_keeps_the_result(tmp_path, monkeypatch):
    original = checkpoint_module.save

    def full_disk(path, ckpt):
        if ckpt["step"] >= 4:
            raise OSError(28, "No space left on device")
        original(path, ckpt)

    monkeypatch.setattr(pyro_nf.workflow, "_save_checkpoint", full_disk)
    with pytest.raises(FitError, match="could not write the checkpoint") as info:
        quiet_fit(simple_model, AutoNormal(simple_model), Y, num_steps=10, checkpoint_every=2,
                  checkpoint=tmp_path / "ck.pt")  # fmt: skip
    assert isinstance(info.value.__cause__, OSError)
    assert info.value.result.num_steps == 4
    assert torch.load(tmp_path / "ck.pt", weights_only=True)["step"] == 2


def test_fit_refuses_a_checkpoint_in_a_missing_folder_before_any_step(tmp_path):
    model = FailingFrom(None)
    path = tmp_path / "no such folder" / "ck.pt"
    with pytest.raises(FileNotFoundError, match="does not exist; create it first"):
        quiet_fit(model, AutoNormal(model), Y, num_steps=3, checkpoint=path)
    assert model.calls == 0


def test_fit_refuses_a_checkpoint_path_that_is_a_folder(tmp_path):
    with pytest.raises(IsADirectoryError, match="is a folder"):
        quiet_fit(simple_model, AutoNormal(simple_model), Y, num_steps=3, checkpoint=tmp_path)


def test_fit_refuses_a_checkpoint_in_a_folder_it_cannot_write(tmp_path):
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        if os.access(folder, os.W_OK):
            pytest.skip("this user can write anywhere (root)")
        with pytest.raises(PermissionError, match="cannot write in"):
            quiet_fit(simple_model, AutoNormal(simple_model), Y, num_steps=3,
                      checkpoint=folder / "ck.pt")  # fmt: skip
    finally:
        folder.chmod(0o700)


# --------------------------------------------------------------------------------------------
# The parts on their own
# --------------------------------------------------------------------------------------------
def test_choose_loss():
    flow, normal = planar(simple_model), AutoNormal(simple_model)
    loss, may = _choose_loss(flow, None, None, 1, True)
    assert isinstance(loss, FastELBO) and loss.num_particles == 1 and not may
    loss, may = _choose_loss(flow, None, None, 4, True)
    assert isinstance(loss, FastELBO) and may
    loss, may = _choose_loss(flow, None, True, 4, True)
    assert isinstance(loss, FastELBO) and not may  # fast=True: required, no fallback
    loss, may = _choose_loss(flow, None, False, 4, True)
    assert type(loss) is Trace_ELBO and loss.vectorize_particles and may
    loss, may = _choose_loss(normal, None, None, 4, False)
    assert type(loss) is Trace_ELBO and not loss.vectorize_particles and not may
    mine = Trace_ELBO()
    assert _choose_loss(flow, mine, None, 4, True) == (mine, False)
    with pytest.raises(ValueError, match="either loss= or fast=True"):
        _choose_loss(flow, mine, True, 1, True)
    with pytest.raises(ValueError, match="needs a pyro_nf flow autoguide"):
        _choose_loss(normal, None, True, 1, True)


def test_first_evaluation_creates_the_parameters_and_falls_back_only_when_allowed():
    y = torch.tensor([0.3, -0.2])
    guide = planar(simple_model)
    loss, names = _first_evaluation(FastELBO(2), True, simple_model, guide, (Y,), {})
    assert isinstance(loss, FastELBO) and any("affine" in name for name in names)
    assert set(names) == set(pyro.get_param_store().keys())
    pyro.clear_param_store()
    with pytest.raises(RuntimeError):  # not allowed to fall back: the error as it is
        _first_evaluation(FastELBO(3), False, unbroadcastable, planar(unbroadcastable), (y,), {})
    pyro.clear_param_store()
    with pytest.warns(UserWarning, match="one at a time with Trace_ELBO"):
        loss, names = _first_evaluation(
            FastELBO(3), True, unbroadcastable, planar(unbroadcastable), (y,), {}
        )
    assert type(loss) is Trace_ELBO and loss.num_particles == 3 and not loss.vectorize_particles
    assert names


def test_collect_parameters_keeps_one_entry_per_tensor():
    store = pyro.get_param_store()
    pyro.param("a", torch.zeros(2))
    store._params["alias"] = store._params["a"]  # one tensor under two names
    store._constraints["alias"] = store._constraints["a"]
    pyro.param("b", torch.ones(()))
    names, params = _collect_parameters(["a", "alias", "b"])
    assert names == ["a", "b"] and params[0] is store["a"].unconstrained()
    with pytest.raises(ValueError, match="no parameters to fit"):
        _collect_parameters([])


def _stepper_for(value_fn, clip_norm=None, lr=0.1):
    """A _Stepper over one parameter whose loss is value_fn(p) (a Pyro-free loss object)."""
    p = torch.tensor([3.0, -4.0], requires_grad=True)

    class Loss:
        def differentiable_loss(self, model, guide):
            return value_fn(p)

    opt = torch.optim.SGD([p], lr=lr)
    return p, opt, _Stepper(Loss(), None, None, (), {}, opt, ["p"], [p], lambda s: 1.0, clip_norm)


def test_stepper_updates_only_on_a_finite_loss_and_gradient():
    p, opt, step = _stepper_for(lambda p: (p**2).sum())
    outcome = step(0)
    assert outcome.finite and outcome.value == 25.0
    assert torch.allclose(p.detach(), torch.tensor([3.0, -4.0]) * 0.8)  # p - 0.1 * 2p
    for bad in (lambda p: p.sum() * float("nan"), lambda p: (p - p).abs().sqrt().sum()):
        p, opt, step = _stepper_for(bad)
        outcome = step(0)
        assert not outcome.finite
        assert torch.equal(p.detach(), torch.tensor([3.0, -4.0]))  # untouched
    assert outcome.bad_grads == ["p"]  # the finite loss with a NaN gradient names the parameter


def test_stepper_clips_the_gradient_norm_and_applies_the_schedule():
    p, opt, step = _stepper_for(lambda p: (p**2).sum(), clip_norm=1.0, lr=1.0)
    step(0)  # gradient (6, -8), norm 10, clipped to norm 1: a move of (0.6, -0.8)
    assert torch.allclose(p.detach(), torch.tensor([2.4, -3.2]))
    step.lr_factor = lambda s: 0.5
    step(1)
    assert opt.param_groups[0]["lr"] == 0.5


def _settings(**overrides):
    base = dict(
        num_steps=10, lr=0.1, num_particles=1, vectorize_particles=True, loss=None, fast=None,
        optimizer="sgd", optimizer_kwargs=None, lr_schedule=None, clip_norm=None,
        stop_window=None, stop_tol=1e-3, max_bad_steps=3, seed=None, progress=False,
        checkpoint=None, checkpoint_every=500, resume=False, distributed=False,
    )  # fmt: skip
    return _check_arguments(**{**base, **overrides})


def test_loop_on_its_own_counts_steps_skips_and_stops():
    values = iter([5.0, math.nan, 4.0, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0])
    result = _loop(_Run(), _settings(), lambda step: _Outcome(next(values), []), None, "g")
    assert result.num_steps == 10 and result.skipped_steps == [1] and result.guide == "g"
    assert np.isnan(result.losses[1]) and result.losses[0] == 5.0
    # the stopping rule: windows of 2 steps whose mean stops improving
    result = _loop(_Run(), _settings(stop_window=2), lambda step: _Outcome(1.0, []), None, None)
    assert result.stopped == "converged" and result.num_steps == 4
    # max_bad_steps in a row: FitError with the result
    with pytest.raises(FitError, match="step 2: 3 consecutive") as info:
        _loop(_Run(), _settings(), lambda step: _Outcome(math.inf, []), None, None)
    assert info.value.result.num_steps == 3


def test_loop_turns_a_failing_step_into_a_fit_error_and_passes_ctrl_c_on_as_a_result():
    def failing(step):
        if step == 2:
            raise LookupError("gone")
        return _Outcome(1.0, [])

    with pytest.raises(FitError, match="step 2: the model or guide failed") as info:
        _loop(_Run(), _settings(), failing, None, None)
    assert isinstance(info.value.__cause__, LookupError) and info.value.result.num_steps == 2

    def interrupted(step):
        if step == 2:
            raise KeyboardInterrupt
        return _Outcome(1.0, [])

    with pytest.warns(UserWarning, match="interrupted at step 2"):
        result = _loop(_Run(), _settings(), interrupted, None, None)
    assert result.stopped == "interrupted" and result.num_steps == 2


def test_fit_does_not_pass_on_pyros_plate_nesting_guess():
    """fit chooses a vectorizing Trace_ELBO for AutoNormal with particles; Pyro's INFO line about
    guessing its plate depth is not for the user, and other log records still get through."""
    import logging

    class Records(logging.Handler):
        def __init__(self):
            super().__init__(logging.INFO)
            self.messages = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    logger = logging.getLogger("pyro.infer.elbo")
    records, level, filters = Records(), logger.level, list(logger.filters)
    logger.addHandler(records)
    logger.setLevel(logging.INFO)
    try:
        quiet_fit(simple_model, AutoNormal(simple_model), Y, num_steps=2, num_particles=3)
        logger.info("another message")
        assert records.messages == ["another message"]
        assert logger.filters == filters  # outside fit, Pyro's records pass as usual
    finally:
        logger.removeHandler(records)
        logger.setLevel(level)


def _mixes_particles(y):  # runs with vectorized particles, but pairs particle i with datum i
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Normal(mu.reshape(-1), 1.0), obs=y)


def test_fit_with_trace_elbo_refuses_to_sum_particles_a_model_mixes():
    """AutoNormal gets a vectorizing Trace_ELBO; the model runs with 4 particles and 4 data, every
    shape matches, and only the per-particle check shows that the loss would be wrong."""
    y = torch.arange(4.0)
    pyro.clear_param_store()
    with pytest.warns(UserWarning, match="does not broadcast over the particle plate"):
        r = quiet_fit(_mixes_particles, AutoNormal(_mixes_particles), y, num_steps=3,
                      num_particles=4)  # fmt: skip
    assert len(r.losses) == 3


@pytest.mark.parametrize("make", [AutoNormal, pyro_nf.AutoPlanarFlow], ids=["trace", "fast"])
def test_the_particle_check_leaves_a_seeded_fit_unchanged(make, monkeypatch):
    def losses():
        pyro.clear_param_store()
        return quiet_fit(simple_model, make(simple_model), Y, num_steps=5, num_particles=3,
                         seed=4).losses.tolist()  # fmt: skip

    checked = losses()
    monkeypatch.setattr(pyro_nf._particles, "check_not_mixed", lambda *a, **k: None)
    monkeypatch.setattr(pyro_nf._particles, "check_vectorized_elbo", lambda *a, **k: None)
    assert losses() == checked
