"""``pyro_nf.fit`` (arguments, FitResult, stopping rule, schedules, non-finite guards,
checkpoints and resume) and the plots in ``pyro_nf.plots``.

The non-finite and interruption tests use a model that misbehaves from a chosen step on. Which
model call belongs to which step is measured, not assumed: a clean one-step fit counts the calls
that happen before the first step (guide set-up, parameter creation).
"""

import math
import os
import re
import warnings

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pyro  # noqa: E402
import pyro.distributions as dist  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from pyro.infer.autoguide import AutoNormal, init_to_sample  # noqa: E402

import pyro_nf  # noqa: E402
from pyro_nf import CheckpointError, FitError, FitResult, fit  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

Y = torch.tensor([0.5, 1.2, -0.3, 0.8, 2.1, 0.4])


def simple_model(y):
    mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
    s = pyro.sample("s", dist.LogNormal(0.0, 1.0))
    with pyro.plate("n", len(y)):
        pyro.sample("y", dist.Normal(mu, s), obs=y)


def planar(model):
    return pyro_nf.AutoPlanarFlow(model, num_transforms=2)


def param_values():
    """Unconstrained values of every parameter in the store, cloned."""
    store = pyro.get_param_store()
    return {name: store[name].unconstrained().detach().clone() for name in store.keys()}


def assert_same_params(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


class FlakyModel:
    """``simple_model`` that misbehaves on model calls ``start <= call < stop``.

    kind: ``"nan"`` (a NaN factor), ``"-inf"`` (a -inf factor, passes Pyro's validation),
    ``"valueerror"`` (a Normal with a NaN loc, which Pyro's validation rejects),
    ``"nan_grad"`` (a finite factor whose gradient is NaN), ``"interrupt"`` (Ctrl-C).
    """

    def __init__(self, kind=None, start=None, stop=None):
        self.kind, self.start, self.stop = kind, start, stop
        self.calls = 0

    def __call__(self, y):
        call = self.calls
        self.calls += 1
        bad = self.start is not None and self.start <= call < (self.stop or math.inf)
        mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
        s = pyro.sample("s", dist.LogNormal(0.0, 1.0))
        loc = mu
        if bad and self.kind == "valueerror":
            loc = mu + torch.tensor(float("nan"))
        if bad and self.kind == "interrupt":
            raise KeyboardInterrupt
        with pyro.plate("n", len(y)):
            pyro.sample("y", dist.Normal(loc, s), obs=y)
        if bad and self.kind in ("nan", "-inf"):
            pyro.factor("bad", torch.tensor(float(self.kind)))
        if bad and self.kind == "nan_grad":
            # value 0, gradient inf * 0 = NaN
            pyro.factor("kink", (mu - mu).abs().sqrt())


def calls_before_first_step(make_guide=AutoNormal, **fit_kwargs):
    """Model calls a fit makes before its first step, and the calls per step."""
    counts = []
    for num_steps in (1, 2):
        pyro.clear_param_store()
        model = FlakyModel()
        fit(model, make_guide(model), Y, num_steps=num_steps, progress=False, **fit_kwargs)
        counts.append(model.calls)
    per_step = counts[1] - counts[0]
    assert per_step >= 1
    pyro.clear_param_store()
    return counts[0] - per_step, per_step


def flaky(kind, first_bad_step, last_bad_step=None, make_guide=AutoNormal, **fit_kwargs):
    """A FlakyModel that misbehaves in fit steps first_bad_step..last_bad_step (inclusive)."""
    setup, per_step = calls_before_first_step(make_guide, **fit_kwargs)
    start = setup + per_step * first_bad_step
    stop = None if last_bad_step is None else setup + per_step * (last_bad_step + 1)
    return FlakyModel(kind, start, stop)


# --------------------------------------------------------------------------------------------
# Arguments and FitResult
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(num_steps=0),
        dict(num_steps=-3),
        dict(num_steps=2.5),
        dict(num_steps=True),
        dict(lr=-1),
        dict(lr=0),
        dict(lr=float("nan")),
        dict(lr="0.01"),
        dict(num_particles=0),
        dict(max_bad_steps=0),
        dict(checkpoint_every=0),
        dict(stop_window=0),
        dict(lr_schedule="bogus"),
        dict(lr_schedule=3),
        dict(resume=True),
    ],
    ids=lambda kw: ",".join(f"{k}={v!r}" for k, v in kw.items()),
)
def test_fit_rejects_bad_arguments(kwargs):
    guide = AutoNormal(simple_model)
    with pytest.raises(ValueError) as info:
        fit(simple_model, guide, Y, **{"num_steps": 5, "progress": False, **kwargs})
    name = next(iter(kwargs))
    # the message names the offending argument (resume needs a checkpoint)
    assert (name if name != "resume" else "checkpoint") in str(info.value)


def test_fit_fast_path_choice_with_unvectorized_particles():
    guide = pyro_nf.AutoIAFFlow(simple_model, num_transforms=1)
    with pytest.raises(ValueError, match="vectorize_particles"):
        fit(simple_model, guide, Y, num_steps=2, num_particles=2, vectorize_particles=False,
            fast=True, progress=False)  # fmt: skip
    # one particle needs no vectorizing: fast=True is honoured
    result = fit(simple_model, guide, Y, num_steps=2, vectorize_particles=False, fast=True,
                 progress=False)  # fmt: skip
    assert len(result.losses) == 2


def test_fit_refuses_model_and_guide_without_parameters():
    def guide(y):
        pyro.sample("mu", dist.Normal(0.0, 1.0))
        pyro.sample("s", dist.LogNormal(0.0, 1.0))

    with pytest.raises(ValueError, match="no parameters"):
        fit(simple_model, guide, Y, num_steps=3, progress=False)


def test_fit_result_fields():
    guide = AutoNormal(simple_model)
    result = fit(simple_model, guide, Y, num_steps=40, lr=0.05, progress=False, seed=0)
    assert isinstance(result, FitResult)
    assert isinstance(result.losses, np.ndarray) and result.losses.shape == (40,)
    assert np.isfinite(result.losses).all()
    assert result.num_steps == 40
    assert result.stopped == "num_steps"
    assert result.skipped_steps == []
    assert result.seconds > 0 and result.seconds_per_step > 0
    assert result.seconds_per_step == pytest.approx(result.seconds / 40)
    assert result.guide is guide
    assert math.isfinite(result.final_loss)
    # final_loss: mean of the last 10% of the steps
    assert result.final_loss == pytest.approx(result.losses[-4:].mean())
    text = repr(result)
    assert text.startswith("FitResult(") and "num_steps=40" in text and "'num_steps'" in text
    # fitting actually happened: the guide moved away from its initial location
    assert abs(guide.median(Y)["mu"].item()) > 0.2


def test_fit_is_reproducible_with_a_seed():
    a = fit(simple_model, AutoNormal(simple_model), Y, num_steps=20, progress=False, seed=3)
    params_a = param_values()
    pyro.clear_param_store()
    b = fit(simple_model, AutoNormal(simple_model), Y, num_steps=20, progress=False, seed=3)
    assert np.array_equal(a.losses, b.losses)
    assert_same_params(params_a, param_values())


def test_fit_reduces_the_loss_and_passes_kwargs():
    def model(y, scale=1.0):
        mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        with pyro.plate("n", len(y)):
            pyro.sample("y", dist.Normal(mu, scale), obs=y)

    y = torch.full((20,), 3.0)
    guide = AutoNormal(model)
    result = fit(model, guide, y, scale=0.5, num_steps=300, lr=0.05, progress=False, seed=0)
    assert result.final_loss < result.losses[:10].mean()
    # posterior mean of mu is ~3 (the kwarg reached the model: scale only changes the width)
    assert guide.median(y, scale=0.5)["mu"].item() == pytest.approx(3.0, abs=0.1)


def test_fit_num_particles():
    guide = planar(simple_model)
    result = fit(simple_model, guide, Y, num_steps=15, num_particles=4, progress=False, seed=0)
    assert result.losses.shape == (15,) and np.isfinite(result.losses).all()
    # sequential particles give the same kind of answer
    pyro.clear_param_store()
    guide = planar(simple_model)
    result = fit(
        simple_model,
        guide,
        Y,
        num_steps=15,
        num_particles=4,
        vectorize_particles=False,
        progress=False,
        seed=0,
    )
    assert result.losses.shape == (15,) and np.isfinite(result.losses).all()


def test_fit_flow_guide_with_particles_on_a_model_whose_plate_is_observed_only():
    """The commonest model shape (the only plate is over the data) must not trip the default loss
    into a fallback warning when particles are vectorized."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        result = fit(
            simple_model,
            planar(simple_model),
            Y,
            num_steps=10,
            num_particles=3,
            progress=False,
            seed=0,
        )
    assert np.isfinite(result.losses).all()


@pytest.mark.parametrize(
    "make_loss",
    [
        lambda: pyro.infer.TraceMeanField_ELBO(),
        lambda: pyro.infer.RenyiELBO(alpha=0.5, num_particles=2),
        lambda: pyro.infer.TraceGraph_ELBO(),
    ],
    ids=["TraceMeanField_ELBO", "RenyiELBO", "TraceGraph_ELBO"],
)
def test_fit_with_any_pyro_elbo(make_loss):
    guide = AutoNormal(simple_model)
    guide(Y)
    before = param_values()
    result = fit(simple_model, guide, Y, num_steps=15, loss=make_loss(), progress=False, seed=0)
    assert result.losses.shape == (15,) and np.isfinite(result.losses).all()
    after = param_values()
    assert any(not torch.equal(before[name], after[name]) for name in before)


def test_fit_stop_window_converges_early():
    def model():
        pyro.sample("x", dist.Normal(1.0, 1.0))

    guide = AutoNormal(model)
    window, tol = 50, 1e-2
    result = fit(
        model,
        guide,
        num_steps=20_000,
        lr=0.05,
        stop_window=window,
        stop_tol=tol,
        progress=False,
        seed=0,
    )
    assert result.stopped == "converged"
    assert result.num_steps < 20_000
    assert result.num_steps % window == 0 and result.num_steps >= 2 * window
    assert len(result.losses) == result.num_steps
    # the documented rule: it stops at the end of the first window whose mean is not lower than
    # the previous window's mean by more than tol * max(1, |mean|)
    means = result.losses.reshape(-1, window).mean(axis=1)

    def not_improving(prev, cur):
        return prev - cur < tol * max(1.0, abs(cur))

    assert not_improving(means[-2], means[-1])
    for prev, cur in zip(means[:-2], means[1:-1]):
        assert not not_improving(prev, cur)


class RecordingAdam(torch.optim.Adam):
    """Adam that records the learning rate of every step."""

    seen: list = []

    def step(self, closure=None):
        RecordingAdam.seen.append(self.param_groups[0]["lr"])
        return super().step(closure)


@pytest.mark.parametrize("schedule", [None, "exponential", "cosine", "callable"])
def test_fit_lr_schedules(schedule):
    n, lr = 30, 0.02
    expected = {
        None: [lr] * n,
        "exponential": [lr * 0.01 ** (s / (n - 1)) for s in range(n)],
        "cosine": [lr * 0.5 * (1 + math.cos(math.pi * s / (n - 1))) for s in range(n)],
        "callable": [lr / (1 + s) for s in range(n)],
    }[schedule]
    steps_seen = []

    def by_step(step):
        steps_seen.append(step)
        return 1.0 / (1 + step)

    RecordingAdam.seen = []
    guide = AutoNormal(simple_model)
    result = fit(
        simple_model,
        guide,
        Y,
        num_steps=n,
        lr=lr,
        optimizer=RecordingAdam,
        lr_schedule=by_step if schedule == "callable" else schedule,
        progress=False,
        seed=0,
    )
    assert np.isfinite(result.losses).all()
    np.testing.assert_allclose(RecordingAdam.seen, expected, rtol=1e-12, atol=1e-15)
    if schedule == "callable":
        assert steps_seen == list(range(n))


def test_fit_zero_lr_schedule_leaves_parameters_alone():
    guide = AutoNormal(simple_model)
    guide(Y)
    before = param_values()
    fit(simple_model, guide, Y, num_steps=10, lr_schedule=lambda step: 0.0, progress=False)
    assert_same_params(before, param_values())


def test_fit_clip_norm_and_optimizer_kwargs():
    guide = AutoNormal(simple_model)
    result = fit(
        simple_model,
        guide,
        Y,
        num_steps=10,
        optimizer=torch.optim.SGD,
        optimizer_kwargs={"momentum": 0.5},
        clip_norm=1.0,
        progress=False,
        seed=0,
    )
    assert np.isfinite(result.losses).all()
    assert np.isfinite([v.numpy() for v in param_values().values()]).all()


def test_fit_progress_bar(capsys):
    guide = AutoNormal(simple_model)
    result = fit(simple_model, guide, Y, num_steps=20, progress=True, seed=0)
    assert len(result.losses) == 20
    err = capsys.readouterr().err
    assert "20/20" in err and "step" in err


def test_fit_without_progress_prints_nothing(capsys):
    fit(simple_model, AutoNormal(simple_model), Y, num_steps=5, progress=False, seed=0)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


# --------------------------------------------------------------------------------------------
# Non-finite steps and failing models
# --------------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:Encountered NaN")
@pytest.mark.parametrize("kind", ["nan", "-inf"])
def test_fit_skips_transient_non_finite_steps_and_recovers(kind):
    k, n = 6, 25
    clean = fit(simple_model, AutoNormal(simple_model), Y, num_steps=n, progress=False, seed=4)

    model = flaky(kind, k, k + 2, seed=4)
    # a NaN factor only gets past Pyro's validation with validation off; -inf passes it
    with pyro.validation_enabled(kind != "nan"):
        result = fit(model, AutoNormal(model), Y, num_steps=n, progress=False, seed=4)
    assert result.stopped == "num_steps" and result.num_steps == n
    assert result.skipped_steps == [k, k + 1, k + 2]
    assert np.isnan(result.losses[k : k + 3]).all()
    assert np.isfinite(np.delete(result.losses, [k, k + 1, k + 2])).all()
    # identical to the clean fit before the bad steps
    assert np.array_equal(result.losses[:k], clean.losses[:k])
    assert math.isfinite(result.final_loss)
    assert all(torch.isfinite(v).all() for v in param_values().values())


@pytest.mark.filterwarnings("ignore:Encountered NaN")
def test_fit_nan_from_some_step_on_raises_and_keeps_last_good_parameters():
    k, max_bad = 5, 4
    fit(simple_model, AutoNormal(simple_model), Y, num_steps=k, progress=False, seed=1)
    reference = param_values()

    model = flaky("nan", k, seed=1)
    pyro.clear_param_store()
    with pyro.validation_enabled(False), pytest.raises(FitError) as info:
        fit(
            model, AutoNormal(model), Y, num_steps=50, max_bad_steps=max_bad, progress=False, seed=1
        )
    message = str(info.value)
    assert re.search(rf"\bstep {k + max_bad - 1}\b", message), message
    assert f"{max_bad} consecutive" in message
    assert f"({k - 1})" in message  # the last finite step
    assert "nan" in message.lower()
    params = param_values()
    assert all(torch.isfinite(v).all() for v in params.values())
    assert_same_params(reference, params)


def test_fit_non_finite_gradients_are_skipped_and_named():
    k, max_bad = 3, 2
    fit(simple_model, AutoNormal(simple_model), Y, num_steps=k, progress=False, seed=2)
    reference = param_values()
    model = flaky("nan_grad", k, seed=2)
    pyro.clear_param_store()
    with pytest.raises(FitError) as info:
        fit(
            model, AutoNormal(model), Y, num_steps=30, max_bad_steps=max_bad, progress=False, seed=2
        )
    message = str(info.value)
    assert re.search(rf"\bstep {k + max_bad - 1}\b", message), message
    assert "gradient" in message and "AutoNormal.locs.mu" in message
    assert_same_params(reference, param_values())


def test_fit_failing_from_the_first_step_keeps_the_initial_parameters():
    model = flaky("nan_grad", 0)
    guide = AutoNormal(model)
    guide(Y)
    initial = param_values()
    with pytest.raises(FitError) as info:
        fit(model, guide, Y, num_steps=10, max_bad_steps=3, progress=False, seed=0)
    message = str(info.value)
    assert re.search(r"\bstep 2\b", message), message
    assert "initial" in message and "(-1)" not in message  # no "last finite step (-1)"
    assert_same_params(initial, param_values())


def test_fit_model_raising_value_error_gives_fit_error_with_last_good_parameters(tmp_path):
    k = 4
    fit(simple_model, AutoNormal(simple_model), Y, num_steps=k, progress=False, seed=5)
    reference = param_values()

    model = flaky("valueerror", k, seed=5)
    pyro.clear_param_store()
    path = tmp_path / "ck.pt"
    with pyro.validation_enabled(True), pytest.raises(FitError) as info:
        fit(model, AutoNormal(model), Y, num_steps=20, checkpoint=path, progress=False, seed=5)
    message = str(info.value)
    assert re.search(rf"\bstep {k}\b", message), message
    assert "ValueError" in message
    assert isinstance(info.value.__cause__, ValueError)
    params = param_values()
    assert all(torch.isfinite(v).all() for v in params.values())
    assert_same_params(reference, params)
    # the last good state is on disk too
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["step"] == k
    for name, value in reference.items():
        assert torch.equal(ckpt["params"][name], value)


# --------------------------------------------------------------------------------------------
# Checkpoints and resume
# --------------------------------------------------------------------------------------------
def plain_planar(model):
    """The plain start (the default Laplace start's resume is tested on its own below)."""
    return pyro_nf.AutoPlanarFlow(model, num_transforms=2, precondition=None)


@pytest.mark.parametrize(
    "make_guide", [AutoNormal, plain_planar], ids=["AutoNormal", "AutoPlanarFlow"]
)
@pytest.mark.parametrize("num_particles", [1, 3])
def test_resume_reproduces_uninterrupted_losses(tmp_path, make_guide, num_particles):
    n, k = 24, 10
    kw = dict(num_particles=num_particles, progress=False, seed=7)
    full = fit(simple_model, make_guide(simple_model), Y, num_steps=n, **kw)
    full_params = param_values()

    path = tmp_path / "ck.pt"
    pyro.clear_param_store()
    first = fit(simple_model, make_guide(simple_model), Y, num_steps=k, checkpoint=path, **kw)
    assert np.array_equal(first.losses, full.losses[:k])
    assert os.listdir(tmp_path) == ["ck.pt"]  # written atomically: no temporary file left

    pyro.clear_param_store()  # a fresh process: new guide, empty param store, other RNG state
    pyro.set_rng_seed(12345)
    rest = fit(
        simple_model,
        make_guide(simple_model),
        Y,
        num_steps=n,
        checkpoint=path,
        resume=True,
        **{**kw, "seed": None},
    )
    assert rest.num_steps == n and len(rest.losses) == n
    assert np.array_equal(rest.losses, full.losses)
    assert_same_params(full_params, param_values())
    assert torch.load(path, weights_only=True)["step"] == n


def test_resume_keeps_the_laplace_start_of_the_fit(tmp_path):
    # The default guide starts at the Laplace approximation, found at set-up from init_loc_fn's
    # point: a guide set up from another point finds the mode again only to the search's
    # tolerance. The checkpoint holds the guide's buffers (the preconditioner), so the resumed
    # fit continues exactly.
    n, k = 16, 8
    kw = dict(progress=False, seed=3)
    guide = pyro_nf.AutoPlanarFlow(simple_model, num_transforms=2)
    full = fit(simple_model, guide, Y, num_steps=n, **kw)
    assert guide.laplace_info["used"]
    path = tmp_path / "ck.pt"
    pyro.clear_param_store()
    fit(simple_model, pyro_nf.AutoPlanarFlow(simple_model, num_transforms=2), Y, num_steps=k,
        checkpoint=path, **kw)  # fmt: skip
    assert "precond_tril" in "".join(torch.load(path, weights_only=True)["buffers"])

    pyro.clear_param_store()
    pyro.set_rng_seed(4321)
    # set-up from another start (the search's start is fixed for one init_loc_fn; another one,
    # another machine or another version gives another mode within the search's tolerance)
    resumed = pyro_nf.AutoPlanarFlow(simple_model, num_transforms=2, init_loc_fn=init_to_sample)
    resumed(Y)
    found_again = {n: b.clone() for n, b in resumed.named_buffers()}
    rest = fit(simple_model, resumed, Y, num_steps=n, checkpoint=path, resume=True,
               **{**kw, "seed": None})  # fmt: skip
    assert any(not torch.equal(found_again[n], b) for n, b in resumed.named_buffers())
    assert np.array_equal(rest.losses, full.losses)


def test_resume_with_a_callable_lr_schedule(tmp_path):
    n, k = 20, 7
    kw = dict(lr=0.05, lr_schedule=lambda step: 0.9**step, progress=False, seed=8)
    full = fit(simple_model, AutoNormal(simple_model), Y, num_steps=n, **kw)
    path = tmp_path / "ck.pt"
    pyro.clear_param_store()
    fit(simple_model, AutoNormal(simple_model), Y, num_steps=k, checkpoint=path, **kw)
    pyro.clear_param_store()
    rest = fit(
        simple_model, AutoNormal(simple_model), Y, num_steps=n, checkpoint=path, resume=True, **kw
    )
    assert np.array_equal(rest.losses, full.losses)


def test_interrupt_between_steps_then_resume(tmp_path):
    """Ctrl-C arriving between steps (here: in the schedule, before the step's draws)."""
    n, k = 20, 9
    full = fit(simple_model, AutoNormal(simple_model), Y, num_steps=n, progress=False, seed=9)

    def schedule(step):
        if step == k:
            raise KeyboardInterrupt
        return 1.0

    path = tmp_path / "ck.pt"
    pyro.clear_param_store()
    with pytest.warns(UserWarning, match="interrupted"):
        part = fit(
            simple_model,
            AutoNormal(simple_model),
            Y,
            num_steps=n,
            lr_schedule=schedule,
            checkpoint=path,
            progress=False,
            seed=9,
        )
    assert part.stopped == "interrupted" and part.num_steps == k
    assert np.array_equal(part.losses, full.losses[:k])
    pyro.clear_param_store()
    rest = fit(
        simple_model,
        AutoNormal(simple_model),
        Y,
        num_steps=n,
        checkpoint=path,
        resume=True,
        progress=False,
    )
    assert np.array_equal(rest.losses, full.losses)


@pytest.mark.parametrize("lr_schedule", [None, "cosine"])
def test_interrupt_inside_a_step_then_resume(tmp_path, lr_schedule):
    """Ctrl-C arriving while the model runs (where a fit spends its time): the guide has already
    drawn this step's sample, yet resuming must still reproduce the uninterrupted run."""
    n, k = 20, 9
    kw = dict(lr_schedule=lr_schedule, progress=False)
    full = fit(simple_model, AutoNormal(simple_model), Y, num_steps=n, seed=10, **kw)

    model = flaky("interrupt", k, k, seed=10)
    path = tmp_path / "ck.pt"
    pyro.clear_param_store()
    with pytest.warns(UserWarning, match="interrupted at step"):
        part = fit(model, AutoNormal(model), Y, num_steps=n, checkpoint=path, seed=10, **kw)
    assert part.stopped == "interrupted" and part.num_steps == k
    assert np.array_equal(part.losses, full.losses[:k])
    assert torch.load(path, weights_only=True)["step"] == k

    pyro.clear_param_store()
    rest = fit(model, AutoNormal(model), Y, num_steps=n, checkpoint=path, resume=True, **kw)
    assert rest.stopped == "num_steps"
    assert np.array_equal(rest.losses, full.losses)


def test_checkpoint_loads_with_weights_only(tmp_path):
    path = tmp_path / "ck.pt"
    guide = planar(simple_model)
    result = fit(
        simple_model, guide, Y, num_steps=12, checkpoint=path, checkpoint_every=5, progress=False
    )
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["step"] == 12  # the last step is always saved
    np.testing.assert_array_equal(ckpt["losses"].numpy(), result.losses)
    store = pyro.get_param_store()
    assert set(ckpt["params"]) == set(store.keys())
    for name, value in ckpt["params"].items():
        assert torch.equal(value, store[name].unconstrained().detach())


def test_checkpoint_every_saves_along_the_way(tmp_path, monkeypatch):
    path = tmp_path / "ck.pt"
    model = flaky("valueerror", 12)  # fails at step 12, after the checkpoints of steps 5 and 10
    steps_saved = []
    original = pyro_nf.workflow._save_checkpoint

    def spy(p, ckpt):
        steps_saved.append(ckpt["step"])
        original(p, ckpt)

    monkeypatch.setattr(pyro_nf.workflow, "_save_checkpoint", spy)
    with pytest.raises(FitError):
        fit(
            model,
            AutoNormal(model),
            Y,
            num_steps=30,
            checkpoint=path,
            checkpoint_every=5,
            progress=False,
        )
    assert steps_saved == [5, 10, 12]


def _write_checkpoint(tmp_path, steps=5):
    path = tmp_path / "ck.pt"
    fit(simple_model, AutoNormal(simple_model), Y, num_steps=steps, checkpoint=path, progress=False)
    pyro.clear_param_store()
    return path


def _resume(path, model=simple_model, guide=None, **kwargs):
    guide = guide or AutoNormal(model)
    return fit(
        model, guide, Y, num_steps=10, checkpoint=path, resume=True, progress=False, **kwargs
    )


def test_truncated_checkpoint_raises_checkpoint_error(tmp_path):
    path = _write_checkpoint(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable pyro_nf checkpoint"):
        _resume(path)


def test_empty_checkpoint_raises_checkpoint_error(tmp_path):
    path = tmp_path / "ck.pt"
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match=re.escape(str(path))):
        _resume(path)


@pytest.mark.parametrize(
    "text",
    ["hello, this is not a checkpoint\n", "step,loss\n0,1.5\n1,1.2\n", "{}", "\x00\x01"],
    ids=["prose", "csv", "json", "binary"],
)
def test_foreign_text_file_raises_checkpoint_error(tmp_path, text):
    path = tmp_path / "ck.pt"
    path.write_text(text)
    with pytest.raises(CheckpointError, match=re.escape(str(path))):
        _resume(path)


@pytest.mark.parametrize(
    "content",
    [
        {"params": {}, "step": 3},
        {"format": "someone else's/1", "step": 3},
        torch.zeros(3),
        [1, 2, 3],
    ],
    ids=["dict", "other-marker", "tensor", "list"],
)
def test_foreign_torch_file_raises_checkpoint_error(tmp_path, content):
    path = tmp_path / "ck.pt"
    torch.save(content, path)
    with pytest.raises(CheckpointError, match="marker"):
        _resume(path)


def test_pickle_with_code_is_refused_not_run(tmp_path):
    path = tmp_path / "ck.pt"
    torch.save({"format": "pyro_nf.fit/1", "hook": warnings.WarningMessage}, path)
    with pytest.raises(CheckpointError, match="not a readable"):
        _resume(path)


def test_resume_without_a_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        _resume(tmp_path / "missing.pt")


def test_resume_into_a_different_guide_raises(tmp_path):
    path = _write_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="guide of class AutoNormal"):
        _resume(path, guide=planar(simple_model))


def test_resume_into_a_different_model_raises(tmp_path):
    path = _write_checkpoint(tmp_path)

    def other_model(y):
        mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
        with pyro.plate("n", len(y)):
            pyro.sample("y", dist.Normal(mu, 1.0), obs=y)

    with pytest.raises(CheckpointError, match="does not match"):
        _resume(path, model=other_model)


def test_resume_with_different_shapes_raises(tmp_path):
    def vector_model(y, d):
        mu = pyro.sample("mu", dist.Normal(torch.zeros(d), 2.0).to_event(1))
        pyro.sample("y", dist.Normal(mu.sum(), 1.0), obs=y.sum())

    path = tmp_path / "ck.pt"
    fit(vector_model, AutoNormal(vector_model), Y, 3, num_steps=3, checkpoint=path, progress=False)
    pyro.clear_param_store()
    with pytest.raises(CheckpointError, match="shape"):
        fit(
            vector_model,
            AutoNormal(vector_model),
            Y,
            4,
            num_steps=6,
            checkpoint=path,
            resume=True,
            progress=False,
        )


# --------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------
def test_plot_losses_accepts_sequences_and_fit_results():
    result = fit(simple_model, AutoNormal(simple_model), Y, num_steps=60, progress=False, seed=0)
    ax = pyro_nf.plot_losses(result, label="AutoNormal")
    assert isinstance(ax, matplotlib.axes.Axes)
    raw, smooth = ax.get_lines()
    np.testing.assert_allclose(raw.get_ydata(), result.losses)
    assert ax.get_legend() is not None

    _, own_ax = plt.subplots()
    assert pyro_nf.plot_losses(list(result.losses), ax=own_ax, window=5) is own_ax
    assert len(own_ax.get_lines()[1].get_ydata()) == 60 - 5 + 1

    ax = result.plot(log_scale=True)
    assert ax.get_yscale() == "log"
    assert np.min(ax.get_lines()[0].get_ydata()) == pytest.approx(1.0)


def test_plot_losses_skips_nan_steps():
    losses = np.array([3.0, 2.5, np.nan, 2.0, 1.8, np.nan, 1.7])
    ax = pyro_nf.plot_losses(losses, window=2)
    raw = ax.get_lines()[0]
    np.testing.assert_array_equal(raw.get_xdata(), [0, 1, 3, 4, 6])


@pytest.mark.parametrize("bad", [[], np.zeros((3, 2))])
def test_plot_losses_rejects_empty_or_2d(bad):
    with pytest.raises(ValueError, match="non-empty"):
        pyro_nf.plot_losses(bad)


def test_plot_losses_rejects_empty_fit_result():
    empty = FitResult(losses=np.array([]), num_steps=0, stopped="num_steps")
    with pytest.raises(ValueError):
        pyro_nf.plot_losses(empty)


def test_plot_posterior_with_dicts_and_inference_data():
    rng = np.random.default_rng(0)
    draws = {"a": rng.normal(size=300), "b": rng.normal(size=(300, 2))}
    reference = {"a": rng.normal(size=500), "b": rng.normal(size=(500, 2))}
    fig = pyro_nf.plot_posterior(draws, reference=reference)
    assert isinstance(fig, matplotlib.figure.Figure)
    # a, b[0], b[1]: a 3 x 3 grid
    assert len(fig.axes) == 9
    assert fig.axes[-1].get_xlabel() == "b[1]"

    fig = pyro_nf.plot_posterior(draws, var_names=["b"])
    assert len(fig.axes) == 4

    guide = AutoNormal(simple_model)
    fit(simple_model, guide, Y, num_steps=20, progress=False, seed=0)
    idata = pyro_nf.to_inference_data(simple_model, guide, Y, num_samples=200)
    fig = pyro_nf.plot_posterior(idata, reference=idata, var_names=["mu", "s"])
    assert isinstance(fig, matplotlib.figure.Figure) and len(fig.axes) == 4
    assert {ax.get_xlabel() for ax in fig.axes[2:]} == {"mu", "s"}


def test_plot_posterior_rejects_bad_input():
    draws = {"a": np.zeros(10)}
    with pytest.raises(KeyError, match="nope"):
        pyro_nf.plot_posterior(draws, var_names=["nope"])
    with pytest.raises(TypeError):
        pyro_nf.plot_posterior(np.zeros((10, 2)))
    with pytest.raises(ValueError, match="nothing to plot"):
        pyro_nf.plot_posterior({})


def test_a_tensor_stored_under_two_names_is_stepped_once():
    """Pyro's AutoIAFNormal stores one tensor twice; Adam must move it by lr, not 2 lr."""
    from pyro.infer.autoguide import AutoIAFNormal

    def two_d():
        pyro.sample("x", dist.Normal(torch.zeros(2), 1.0).to_event(1))

    guide = AutoIAFNormal(two_d, hidden_dim=[4])
    guide()
    before = {k: v.detach().clone() for k, v in pyro.get_param_store().items()}
    fit(two_d, guide, num_steps=1, lr=0.01, progress=False, seed=0)
    after = dict(pyro.get_param_store().items())
    moved = max((after[k].detach() - v).abs().max().item() for k, v in before.items())
    assert moved <= 0.01 + 1e-6


def test_fit_uses_a_multi_tensor_adam_with_the_same_updates():
    from pyro_nf.workflow import _make_optimizer

    p = [torch.zeros(3, requires_grad=True)]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # one CPU thread: the fused kernel, where torch has one
        try:  # torch < 2.4 has no fused Adam on the CPU: then the optimizer is built as asked
            torch.optim.Adam([torch.zeros(1, requires_grad=True)], fused=True)
            cpu_fused = True
        except RuntimeError:
            cpu_fused = False
        fused = _make_optimizer(torch.optim.Adam, p, 0.1, {}).defaults["fused"]
        assert fused is True if cpu_fused else not fused
        torch.set_num_threads(2)  # several: foreach (the fused CPU kernel threads badly)
        opt = _make_optimizer(torch.optim.AdamW, p, 0.1, {})
        assert opt.defaults["foreach"] is True and not opt.defaults["fused"]
    finally:
        torch.set_num_threads(threads)
    user = _make_optimizer(torch.optim.Adam, p, 0.1, {"foreach": False})
    assert not user.defaults["fused"] and user.defaults["foreach"] is False
    assert isinstance(_make_optimizer(torch.optim.SGD, p, 0.1, {}), torch.optim.SGD)
    runs = []
    for kwargs in (None, {"foreach": False}):  # a multi-tensor kernel, then the per-tensor loop
        pyro.clear_param_store()
        guide = AutoNormal(simple_model)
        fit(simple_model, guide, Y, num_steps=30, progress=False, seed=0, optimizer_kwargs=kwargs)
        runs.append({k: v.detach().clone() for k, v in pyro.get_param_store().items()})
    assert runs[0].keys() == runs[1].keys()
    for k in runs[0]:
        torch.testing.assert_close(runs[0][k], runs[1][k], rtol=1e-5, atol=1e-6)
