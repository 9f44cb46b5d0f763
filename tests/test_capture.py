"""The captured training step: ``fit(..., compile=...)`` and ``pyro_nf.captured_step``.

On a CPU the step runs eagerly, so these tests check its logic: the same losses and parameters as
the usual step for the same random numbers, no host synchronization inside it (every host-read
method of ``torch.Tensor`` patched to raise), fit's guarantees for non-finite steps kept by the
device-side flag, and a warned fallback where the step cannot be used. The CUDA tests (marked
``cuda``) check the captured graph against the same step run eagerly.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from device_params import needs_cuda
from pyro.infer import Trace_ELBO

import pyro_nf
from pyro_nf import _capture
from pyro_nf._capture import HostSync, SyncFreeStep, find_host_sync, no_host_syncs
from pyro_nf._captured_step import elbo_loss

pytestmark = pytest.mark.usefixtures("one_torch_thread")

GUIDES = {
    "planar": lambda m: pyro_nf.AutoPlanarFlow(m, 3),
    "radial": lambda m: pyro_nf.AutoRadialFlow(m, 2),
    "iaf": lambda m: pyro_nf.AutoIAFFlow(m, 1, hidden_dims=(8,)),
}


def data(device="cpu", n=40):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(n, 3, generator=g)
    y = torch.bernoulli(torch.sigmoid(X @ torch.tensor([1.0, -1.0, 0.5])), generator=g)
    return X.to(device), y.to(device)


def logistic(X, y):
    b = pyro.sample("b", dist.Normal(X.new_tensor(0.0), 1.0))
    w = pyro.sample("w", dist.Normal(X.new_zeros(X.shape[1]), 1.0).to_event(1))
    s = pyro.sample("s", dist.LogNormal(X.new_tensor(0.0), 1.0))
    with pyro.plate("data", X.shape[0]):
        pyro.sample("y", dist.Bernoulli(logits=s * (b + (X * w).sum(-1))), obs=y)


def run_fit(model, make_guide, *args, compile=False, **kwargs):
    pyro.clear_param_store()
    guide = make_guide(model)
    kwargs = {"num_steps": 30, "lr": 0.02, "seed": 0, "progress": False, **kwargs}
    result = pyro_nf.fit(model, guide, *args, compile=compile, **kwargs)
    return result, {n: v.detach().clone() for n, v in pyro.get_param_store().items()}


@pytest.fixture(params=["fused", "masked"])
def adam_kernel(request, monkeypatch):
    """The captured step's Adam update: torch's fused kernel, or the masked tensor operations
    used where torch has no fused kernel for the device and dtype."""
    if request.param == "masked":
        monkeypatch.setattr(_capture, "fused_kernel_works", lambda dtype, device: False)
    return request.param


def no_fallback() -> None:
    """Inside ``warnings.catch_warnings()``: a warning that the captured step fell back fails."""
    warnings.filterwarnings(
        "error", message=".*(usual eager step|could not be captured|runs the step eagerly)"
    )


def assert_same_fit(a, b, rtol=1e-4, atol=1e-5):
    (ra, pa), (rb, pb) = a, b
    assert ra.num_steps == rb.num_steps and ra.skipped_steps == rb.skipped_steps
    np.testing.assert_allclose(ra.losses, rb.losses, rtol=rtol, atol=atol * 10)
    assert pa.keys() == pb.keys()
    for name in pa:
        torch.testing.assert_close(pa[name], pb[name], rtol=rtol, atol=atol, msg=name)


# --------------------------------------------------------------------------------------------
# The same numbers as the usual step
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("guide", list(GUIDES))
@pytest.mark.parametrize("mode", [True, "eager"])
def test_fit_compile_gives_the_usual_losses_and_parameters(guide, mode):
    eager = run_fit(logistic, GUIDES[guide], *data())
    with warnings.catch_warnings():
        no_fallback()
        compiled = run_fit(logistic, GUIDES[guide], *data(), compile=mode)
    assert_same_fit(eager, compiled)
    assert compiled[0].losses[-1] != eager[0].losses[0]  # it did train


@pytest.mark.parametrize(
    "options",
    [
        {"num_particles": 3},
        {"clip_norm": 0.5, "lr_schedule": "cosine"},
        {"optimizer": "adamw", "optimizer_kwargs": {"weight_decay": 0.1, "betas": (0.8, 0.99)}},
        {"optimizer_kwargs": {"weight_decay": 0.05}},
        {"stop_window": 10, "stop_tol": 10.0},
    ],
    ids=["particles", "clip-schedule", "adamw", "adam-weight-decay", "stopping-rule"],
)
def test_fit_compile_keeps_fits_options(options, adam_kernel):
    eager = run_fit(logistic, GUIDES["planar"], *data(), **options)
    with warnings.catch_warnings():
        no_fallback()
        compiled = run_fit(logistic, GUIDES["planar"], *data(), compile=True, **options)
    assert_same_fit(eager, compiled)
    assert eager[0].stopped == compiled[0].stopped


def test_the_fit_step_reads_no_tensor_value_on_the_host(monkeypatch):
    body = SyncFreeStep.body
    guarded = []

    def body_without_syncs(self):
        with no_host_syncs():
            body(self)
        guarded.append(1)

    monkeypatch.setattr(SyncFreeStep, "body", body_without_syncs)
    result, _ = run_fit(logistic, GUIDES["iaf"], *data(), compile=True, num_particles=2)
    assert result.stopped == "num_steps" and len(guarded) == 30


def test_the_fused_kernel_is_used_where_torch_has_it():
    fused = _capture.fused_kernel_works(torch.float32, torch.device("cpu"))
    major, minor = (int(x) for x in torch.__version__.split(".")[:2])
    assert fused == ((major, minor) >= (2, 4))


def test_no_host_syncs_refuses_every_read_and_restores_the_methods():
    t = torch.ones(2)
    for read in (lambda: t[0].item(), lambda: float(t[0]), lambda: bool(t[0] > 0),
                 lambda: t.tolist(), lambda: int(t[0]), lambda: [0, 1][t.long()[0]],
                 lambda: f"{t.sum():.2f}"):  # fmt: skip
        with no_host_syncs(), pytest.raises(HostSync):
            read()
    assert t[0].item() == 1.0 and bool(t[0] > 0) and float(t[1]) == 1.0 and t.tolist() == [1, 1]


def test_capturable_scalars_fill_python_numbers_on_the_device(monkeypatch):
    # torch.distributions turns the 1.0 of Normal(loc, 1.0) into a tensor on loc's device: a
    # host-to-device copy, which a CUDA graph cannot capture; inside, it is a fill kernel
    filled = []
    original = _capture.scalar_tensor

    def spy(data, dtype=None, device=None, requires_grad=False):
        filled.append((data, dtype, torch.device(device).type))
        return original(data, dtype, device, requires_grad)

    monkeypatch.setattr(_capture, "scalar_tensor", spy)
    loc = torch.zeros(2, device="meta", dtype=torch.float64)
    with _capture.capturable_scalars():
        normal = torch.distributions.Normal(loc, 1.0, validate_args=False)
        zero = loc.new_tensor(0.0)
        assert torch.tensor(2.5).device.type == "cpu"  # CPU tensors are made as before
        assert torch.tensor([1.0, 2.0], device="meta").shape == (2,)  # so are lists
    assert filled == [(1.0, torch.float64, "meta"), (0.0, torch.float64, "meta")]
    assert normal.scale.dtype == zero.dtype == torch.float64 and normal.scale.device.type == "meta"
    assert torch.tensor is original_tensor and torch.Tensor.new_tensor is original_new_tensor
    for value in (1.5, 2, True):  # the dtype torch.tensor would infer
        assert original(value).dtype == torch.tensor(value).dtype


original_tensor, original_new_tensor = torch.tensor, torch.Tensor.new_tensor


def test_find_host_sync_names_a_model_that_reads_a_value_and_restores_the_generators():
    def branching(X, y):
        w = pyro.sample("w", dist.Normal(X.new_zeros(3), 1.0).to_event(1))
        if w.sum() > 0:  # a Python decision on a tensor's value
            w = 2 * w
        pyro.sample("y", dist.Bernoulli(logits=X @ w).to_event(1), obs=y)

    X, y = data()
    state = torch.get_rng_state()
    assert "reads a tensor's value" in find_host_sync(lambda: branching(X, y))
    assert find_host_sync(lambda: logistic(X, y)) is None
    assert torch.equal(state, torch.get_rng_state())


# --------------------------------------------------------------------------------------------
# Non-finite steps: skipped on the device, reported as before
# --------------------------------------------------------------------------------------------
def kink():  # finite log-density, NaN gradient (sqrt at 0) at every step
    x = pyro.sample("x", dist.Normal(0.0, 1.0))
    pyro.factor("kink", (x - x).sqrt())


@pytest.mark.parametrize("mode", [False, True])
def test_a_fit_whose_gradients_are_never_finite_stops_with_the_same_error(mode, adam_kernel):
    pyro.clear_param_store()
    guide = pyro_nf.AutoPlanarFlow(kink, 1)
    guide.setup()
    before = {n: p.detach().clone() for n, p in guide.named_parameters()}
    with pytest.raises(pyro_nf.FitError) as info:
        pyro_nf.fit(kink, guide, num_steps=50, max_bad_steps=3, progress=False, compile=mode)
    message = str(info.value)
    assert message.startswith("step 2: 3 consecutive non-finite steps, stopping")
    assert "the initial ones" in message and "gradients of AutoPlanarFlow" in message
    assert info.value.result.num_steps == 3 and info.value.result.skipped_steps == [0, 1, 2]
    for n, p in guide.named_parameters():
        torch.testing.assert_close(p.detach(), before[n], rtol=0, atol=0)


def make_flaky(bad_steps):
    """A model whose loss is infinite at the steps in ``bad_steps`` (told by the lr schedule, which
    fit calls before every step) and finite otherwise."""
    now = {"step": -1}

    def schedule(step):
        now["step"] = step
        return 1.0

    def model(X, y):
        logistic(X, y)
        bad = now["step"] in bad_steps
        pyro.factor("flaky", X.new_tensor(-math.inf if bad else 0.0))

    return model, schedule


def test_non_finite_steps_are_skipped_and_reported_as_by_the_usual_step(adam_kernel):
    model, schedule = make_flaky({3, 4, 11, 25})
    eager = run_fit(model, GUIDES["planar"], *data(), lr_schedule=schedule)
    compiled = run_fit(model, GUIDES["planar"], *data(), lr_schedule=schedule, compile=True)
    assert eager[0].skipped_steps == [3, 4, 11, 25]
    assert_same_fit(eager, compiled)


def test_the_device_freezes_the_parameters_at_the_step_that_reaches_max_bad_steps(adam_kernel):
    # steps 10-12 are bad (3 = max_bad_steps); steps 13 on are finite and would move the
    # parameters if the device did not freeze them: the host reads the record only at step 100
    errors, params = [], []
    for mode in (False, True):
        model, schedule = make_flaky({10, 11, 12})  # fresh: the last fit ended on a bad step
        pyro.clear_param_store()
        guide = GUIDES["planar"](model)
        with pytest.raises(pyro_nf.FitError) as info:
            pyro_nf.fit(model, guide, *data(), num_steps=100, lr=0.02, lr_schedule=schedule,
                        max_bad_steps=3, seed=0, progress=False, compile=mode)  # fmt: skip
        errors.append(info.value)
        params.append({n: p.detach().clone() for n, p in pyro.get_param_store().items()})
    for e in errors:
        assert str(e).startswith("step 12: 3 consecutive non-finite steps, stopping")
        assert "those of the last finite step (9)" in str(e) and "the loss itself is inf" in str(e)
        assert e.result.num_steps == 13 and e.result.skipped_steps == [10, 11, 12]
    np.testing.assert_allclose(errors[0].result.losses, errors[1].result.losses, rtol=1e-4)
    for name in params[0]:
        torch.testing.assert_close(params[0][name], params[1][name], rtol=1e-4, atol=1e-5)


def test_a_failing_step_is_a_fit_error_carrying_the_steps_read_so_far(tmp_path):
    model, schedule = make_flaky(set())

    def failing(step):
        if step == 130:
            raise RuntimeError("schedule broke")
        return schedule(step)

    pyro.clear_param_store()
    guide = GUIDES["planar"](model)
    with pytest.raises(pyro_nf.FitError, match="step 130: the model or guide failed") as info:
        pyro_nf.fit(model, guide, *data(), num_steps=200, lr_schedule=failing, progress=False,
                    compile=True, checkpoint=tmp_path / "ck.pt")  # fmt: skip
    result = info.value.result
    assert result.num_steps == 130 and np.isfinite(result.losses).all()
    assert torch.load(tmp_path / "ck.pt", weights_only=True)["step"] == 130


def test_ctrl_c_returns_the_steps_read_and_unread_so_far():
    def interrupt(step):
        if step == 150:
            raise KeyboardInterrupt
        return 1.0

    with pytest.warns(UserWarning, match="fit interrupted at step 150"):
        result, _ = run_fit(logistic, GUIDES["planar"], *data(), num_steps=300,
                            lr_schedule=interrupt, compile=True)  # fmt: skip
    assert result.stopped == "interrupted" and result.num_steps == 150
    assert len(result.losses) == 150 and np.isfinite(result.losses).all()


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------
def test_a_resumed_compiled_fit_repeats_the_uninterrupted_one(tmp_path):
    X, y = data()
    whole = run_fit(logistic, GUIDES["planar"], X, y, num_steps=40, compile=True)
    path = tmp_path / "ck.pt"
    run_fit(logistic, GUIDES["planar"], X, y, num_steps=20, compile=True, checkpoint=path,
            checkpoint_every=10)  # fmt: skip
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["step"] == 20 and len(ckpt["optimizer"]["state"]) > 0
    pyro.clear_param_store()
    guide = GUIDES["planar"](logistic)
    result = pyro_nf.fit(logistic, guide, X, y, num_steps=40, lr=0.02, progress=False,
                         compile=True, checkpoint=path, resume=True)  # fmt: skip
    np.testing.assert_allclose(result.losses, whole[0].losses, rtol=1e-6)
    # and an eager fit resumes the compiled fit's checkpoint (the same optimizer state)
    pyro.clear_param_store()
    guide = GUIDES["planar"](logistic)
    path.unlink()
    run_fit(logistic, GUIDES["planar"], X, y, num_steps=20, compile=True, checkpoint=path)
    pyro.clear_param_store()
    eager = pyro_nf.fit(logistic, GUIDES["planar"](logistic), X, y, num_steps=40, lr=0.02,
                        progress=False, checkpoint=path, resume=True)  # fmt: skip
    np.testing.assert_allclose(eager.losses, whole[0].losses, rtol=1e-4)


# --------------------------------------------------------------------------------------------
# Fallbacks: a warning, then the usual step (the usual answer)
# --------------------------------------------------------------------------------------------
def branching(X, y):
    w = pyro.sample("w", dist.Normal(X.new_zeros(3), 1.0).to_event(1))
    scale = 2.0 if w.sum() > 0 else 1.0
    with pyro.plate("data", X.shape[0]):
        pyro.sample("y", dist.Bernoulli(logits=scale * (X * w).sum(-1)), obs=y)


def subsampled(X, y):
    w = pyro.sample("w", dist.Normal(X.new_zeros(3), 1.0).to_event(1))
    with pyro.plate("data", X.shape[0], subsample_size=10) as idx:
        pyro.sample("y", dist.Bernoulli(logits=(X[idx] * w).sum(-1)), obs=y[idx])


@pytest.mark.parametrize(
    "model, make_guide, options, words",
    [
        (logistic, GUIDES["planar"], {"loss": Trace_ELBO()}, "the loss is Trace_ELBO"),
        (logistic, pyro.infer.autoguide.AutoNormal, {}, "the guide AutoNormal"),
        (logistic, GUIDES["planar"], {"optimizer": "sgd"}, "Adam or AdamW, not SGD"),
        (logistic, GUIDES["planar"], {"optimizer_kwargs": {"amsgrad": True}}, "no amsgrad"),
        (branching, GUIDES["planar"], {}, "reads a tensor's value in Python"),
        (subsampled, GUIDES["planar"], {}, "subsamples the plate 'data'"),
    ],
    ids=["trace-elbo", "autonormal", "sgd", "amsgrad", "python-branch", "subsampling"],
)
def test_fit_falls_back_to_the_usual_step_with_a_warning(model, make_guide, options, words):
    eager = run_fit(model, make_guide, *data(), **options)
    with pytest.warns(UserWarning, match="runs the usual eager step instead") as record:
        compiled = run_fit(model, make_guide, *data(), compile=True, **options)
    assert any(words in str(w.message) for w in record), [str(w.message) for w in record]
    assert_same_fit(eager, compiled, rtol=0, atol=0)


def test_fit_refuses_an_unknown_compile_mode():
    with pytest.raises(ValueError, match="compile must be False, True or 'eager'"):
        pyro_nf.fit(logistic, GUIDES["planar"](logistic), *data(), compile="max-autotune")


# --------------------------------------------------------------------------------------------
# captured_step: a model and guide of one's own
# --------------------------------------------------------------------------------------------
class TinyVAE:
    def __init__(self, device="cpu", transform="planar"):
        torch.manual_seed(0)
        self.encoder = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh()).to(device)
        self.flow = pyro_nf.Flow(2, transform, 2, context_dim=8).to(device)
        self.decoder = torch.nn.Linear(2, 6).to(device)

    def model(self, x):
        pyro.module("decoder", self.decoder)
        with pyro.plate("batch", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(2), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(z)).to_event(1), obs=x)

    def guide(self, x):
        pyro.module("encoder", self.encoder)
        with pyro.plate("batch", x.shape[0]):
            pyro.sample("z", self.flow(self.encoder(x)))


def batches(n=12, size=16, device="cpu"):
    g = torch.Generator().manual_seed(1)
    return torch.bernoulli(torch.rand(n, size, 6, generator=g)).to(device)


@pytest.mark.parametrize("transform", ["planar", "iaf"])
def test_elbo_loss_is_trace_elbos_loss(transform):
    vae, x = TinyVAE(transform=transform), batches()[0]
    pyro.set_rng_seed(3)
    ours = elbo_loss(vae.model, vae.guide, x)
    pyro.set_rng_seed(3)
    theirs = Trace_ELBO().differentiable_loss(vae.model, vae.guide, x)
    torch.testing.assert_close(ours, theirs)


def test_captured_step_trains_as_svi_with_trace_elbo_and_torch_adam():
    xs = batches()
    vae = TinyVAE()
    pyro.set_rng_seed(0)
    step = pyro_nf.captured_step(vae.model, vae.guide, xs[0], lr=0.01)
    with no_host_syncs():  # the whole step, sync-free
        for x in xs:
            step(x)
    ours = step.losses()
    trained = [p.detach().clone() for p in step.params]

    pyro.clear_param_store()
    vae = TinyVAE()
    pyro.set_rng_seed(0)
    svi = pyro.infer.SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 0.01}), Trace_ELBO())
    theirs = [svi.step(x) for x in xs]
    np.testing.assert_allclose(ours, theirs, rtol=1e-4)
    store = pyro.get_param_store()
    for name, p in zip(step.names, trained):
        torch.testing.assert_close(p, store[name].detach(), rtol=1e-4, atol=1e-5)
    assert step.num_steps == len(xs) and step.skipped_steps == [] and not step.captured


def test_captured_step_runs_other_shapes_eagerly_and_refuses_changed_python_values():
    vae, xs = TinyVAE(), batches()
    step = pyro_nf.captured_step(vae.model, vae.guide, xs[0])
    step(xs[1])
    with pytest.warns(UserWarning, match="other shapes"):
        step(xs[2][:5])
    assert np.isfinite(step.losses()).all() and step.num_steps == 2

    def scaled(x, k):
        vae.model(k * x)

    def scaled_guide(x, k):
        vae.guide(x)

    step = pyro_nf.captured_step(scaled, scaled_guide, xs[0], 1.0)
    with pytest.raises(ValueError, match="a non-tensor argument changed"):
        step(xs[1], 2.0)


def test_captured_step_refuses_a_guide_it_cannot_differentiate():
    def model():
        pyro.sample("k", dist.Poisson(3.0))
        pyro.sample("a", dist.Normal(0.0, 1.0))

    def guide():
        pyro.sample("k", dist.Poisson(pyro.param("rate", torch.tensor(2.0))))

    with pytest.raises(ValueError, match="'k' is not reparameterized"):
        pyro_nf.captured_step(model, guide)

    def guide_without_a():
        pyro.sample("k", dist.Normal(pyro.param("m", torch.tensor(2.0)), 1.0))

    def normal_model():
        pyro.sample("k", dist.Normal(0.0, 1.0))
        pyro.sample("a", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match="latent site 'a' is not in the guide"):
        pyro_nf.captured_step(normal_model, guide_without_a)


def test_captured_step_skips_non_finite_steps_and_stops_after_max_bad_steps():
    bad = {"on": False}

    def model(x):
        m = pyro.param("m", torch.zeros(2))
        z = pyro.sample("z", dist.Normal(m, 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)
        if bad["on"]:
            pyro.factor("nan", x.new_tensor(float("nan")))

    def guide(x):
        loc = pyro.param("loc", torch.zeros(2))
        pyro.sample("z", dist.Normal(loc, 1.0).to_event(1))

    x = torch.ones(2)
    step = pyro_nf.captured_step(model, guide, x, lr=0.1, max_bad_steps=2)
    step(x)
    bad["on"] = True
    step(x)
    frozen = [p.detach().clone() for p in step.params]
    bad["on"] = False
    step(x)
    bad["on"] = True
    step(x), step(x)
    assert [p.detach().tolist() for p in step.params] != [p.tolist() for p in frozen]
    with pytest.raises(pyro_nf.FitError, match="step 4: 2 consecutive non-finite steps"):
        step.losses()
    assert step.skipped_steps == [1, 3, 4] and math.isnan(step._losses[-1])


# --------------------------------------------------------------------------------------------
# CUDA: the captured graph against the same step run eagerly
# --------------------------------------------------------------------------------------------
@needs_cuda
@pytest.mark.parametrize("guide", ["planar", "iaf"])
def test_cuda_fit_captured_equals_the_step_run_eagerly(guide):
    X, y = data("cuda")
    eager = run_fit(logistic, GUIDES[guide], X, y, num_steps=60, compile="eager")
    captured = []
    original = SyncFreeStep._try_capture

    def spy(self):
        ok = original(self)
        captured.append(ok)
        return ok

    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings():
        no_fallback()
        mp.setattr(SyncFreeStep, "_try_capture", spy)
        compiled = run_fit(logistic, GUIDES[guide], X, y, num_steps=60, compile=True)
    assert captured == [True]
    assert_same_fit(eager, compiled, rtol=1e-3, atol=1e-4)


@needs_cuda
def test_cuda_captured_step_replays_a_graph_with_the_eager_numbers():
    xs = batches(device="cuda")
    results = []
    for capture in (False, True):
        pyro.clear_param_store()
        vae = TinyVAE("cuda")
        pyro.set_rng_seed(0)
        step = pyro_nf.captured_step(vae.model, vae.guide, xs[0], lr=0.01, capture=capture)
        for x in xs:
            step(x)
        results.append((step.losses(), step.captured))
    assert results[1][1] and not results[0][1]
    np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-3)
