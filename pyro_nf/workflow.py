"""``pyro_nf.fit``: SVI with a progress bar, a stopping rule, and no lost or corrupted work.

What :func:`fit` adds to a hand-written ``svi.step`` loop:

* **Non-finite steps never touch the parameters.** The loss and every gradient are checked before
  the optimizer step; a step with a NaN/inf is skipped, so the parameters stay at the last finite
  state. After ``max_bad_steps`` consecutive bad steps the fit stops with a :class:`FitError` that
  names the step and the likely cause.
* **Stopping rule** (optional, ``stop_window``): the losses are averaged over consecutive,
  non-overlapping windows of ``stop_window`` steps; the fit stops at the end of the first window
  whose mean is not lower than the previous window's mean by more than
  ``stop_tol * max(1, |mean|)`` (a relative improvement below ``stop_tol``).
* **Checkpoints** every ``checkpoint_every`` steps, written atomically, that load with
  ``torch.load(weights_only=True)`` (no code runs when a checkpoint is opened);
  ``resume=True`` continues from one and reproduces the uninterrupted run's losses exactly (the
  random-number states are part of the checkpoint).
* **Ctrl-C** stops the fit cleanly: the result so far is returned (and checkpointed when a
  checkpoint path is given), with ``result.stopped == "interrupted"``.
"""

from __future__ import annotations

import math
import os
import random
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pyro
import pyro.poutine as poutine
import torch
from pyro.infer import ELBO, Trace_ELBO

from .fast import FastELBO
from .guides import AutoFlow

__all__ = ["fit", "FitResult", "FitError", "CheckpointError"]

_CHECKPOINT_FORMAT = "pyro_nf.fit/1"


class FitError(RuntimeError):
    """Raised when a fit cannot go on (too many consecutive non-finite steps, or a failing step).

    Example:
        >>> import pyro, pyro.distributions as dist, pyro_nf
        >>> def model():  # a finite log-density whose gradient is NaN (sqrt at 0) at every step
        ...     x = pyro.sample("x", dist.Normal(0.0, 1.0))
        ...     pyro.factor("kink", (x - x).sqrt())
        >>> guide = pyro_nf.AutoPlanarFlow(model, num_transforms=1)
        >>> try:
        ...     pyro_nf.fit(model, guide, num_steps=100, max_bad_steps=3, progress=False)
        ... except pyro_nf.FitError as e:
        ...     print(str(e).split(".")[0])
        step 2: 3 consecutive non-finite steps, stopping
    """


class CheckpointError(RuntimeError):
    """Raised when a checkpoint file cannot be read or does not belong to this fit.

    Example:
        >>> import os, tempfile, pyro, pyro.distributions as dist, pyro_nf
        >>> def model():
        ...     pyro.sample("x", dist.Normal(0.0, 1.0))
        >>> guide = pyro_nf.AutoPlanarFlow(model, num_transforms=1)
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     path = os.path.join(tmp, "notes.pt")
        ...     with open(path, "w") as f:
        ...         _ = f.write("not a checkpoint")
        ...     try:
        ...         pyro_nf.fit(model, guide, num_steps=5, progress=False, checkpoint=path, resume=True)
        ...     except pyro_nf.CheckpointError as e:
        ...         print("refused:", "not a readable pyro_nf checkpoint" in str(e))
        refused: True
    """


@dataclass
class FitResult:
    """What :func:`fit` returns.

    Attributes:
        losses: the loss (negative ELBO estimate) of every step taken, NaN for skipped steps.
        num_steps: steps taken (including resumed ones).
        stopped: ``"num_steps"``, ``"converged"`` (stopping rule) or ``"interrupted"`` (Ctrl-C).
        skipped_steps: indices of steps skipped because of a non-finite loss or gradient.
        seconds: wall time of this call (not of earlier resumed parts).
        seconds_per_step: ``seconds`` divided by the steps taken in this call.
        guide: the fitted guide.

    Example:
        >>> import pyro, pyro.distributions as dist, pyro_nf
        >>> def model():
        ...     pyro.sample("x", dist.Normal(0.0, 1.0))
        >>> result = pyro_nf.fit(model, pyro_nf.AutoRadialFlow(model, 2), num_steps=20, progress=False)
        >>> result.num_steps, result.stopped, result.losses.shape, result.skipped_steps
        (20, 'num_steps', (20,), [])
    """

    losses: np.ndarray
    num_steps: int
    stopped: str
    skipped_steps: list[int] = field(default_factory=list)
    seconds: float = 0.0
    seconds_per_step: float = float("nan")
    guide: Callable | None = None

    @property
    def final_loss(self) -> float:
        """Mean loss over the last 10% of steps (at least 1), ignoring skipped steps."""
        finite = self.losses[np.isfinite(self.losses)]
        if finite.size == 0:
            return float("nan")
        return float(finite[-max(1, finite.size // 10) :].mean())

    def plot(self, ax=None, **kwargs):
        """Plot the loss trace and its running mean (see :func:`pyro_nf.plots.plot_losses`)."""
        from .plots import plot_losses

        return plot_losses(self.losses, ax=ax, **kwargs)

    def __repr__(self) -> str:
        return (
            f"FitResult(num_steps={self.num_steps}, stopped={self.stopped!r}, "
            f"final_loss={self.final_loss:.4g}, skipped={len(self.skipped_steps)}, "
            f"seconds={self.seconds:.1f})"
        )


def _lr_factor(schedule, num_steps: int) -> Callable[[int], float]:
    if schedule is None:
        return lambda step: 1.0
    if callable(schedule):
        return schedule
    if schedule == "exponential":  # decays to 1% of lr at the last step
        return lambda step: 0.01 ** (step / max(num_steps - 1, 1))
    if schedule == "cosine":
        return lambda step: 0.5 * (1.0 + math.cos(math.pi * step / max(num_steps - 1, 1)))
    raise ValueError(
        f"lr_schedule must be None, 'exponential', 'cosine' or a callable step -> factor, got {schedule!r}"
    )


def _rng_state() -> dict:
    # numpy's legacy global generator is what pyro.set_rng_seed seeds, so it is saved too.
    _, keys, pos, has_gauss, cached = np.random.get_state()  # noqa: NPY002
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, cached))  # noqa: NPY002
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def _load_checkpoint(path: str) -> dict:
    try:
        ckpt = torch.load(path, weights_only=True, map_location="cpu")
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 - whatever a foreign file makes torch.load raise
        raise CheckpointError(
            f"{path!r} is not a readable pyro_nf checkpoint (truncated, corrupted or a foreign "
            f"file): {type(e).__name__}: {e}"
        ) from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != _CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path!r} is not a pyro_nf.fit checkpoint (no '{_CHECKPOINT_FORMAT}' marker)"
        )
    return ckpt


def _save_checkpoint(path: str, ckpt: dict) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(ckpt, tmp)
    os.replace(tmp, path)  # atomic: a crash mid-write never leaves a truncated checkpoint


def _likely_cause(loss: float, bad_grads: list[str]) -> str:
    if not math.isfinite(loss):
        return (
            f"the loss itself is {loss}: the model or guide produced a non-finite log-density "
            "(NaN data, a log of zero, a scale that reached zero, or an overflow). Check the data, "
            "lower lr, or use a smaller init_scale"
        )
    return (
        "the loss is finite but gradients of " + ", ".join(bad_grads[:5]) + " are not: a "
        "non-differentiable point (e.g. sqrt or norm at 0) or an overflow in the backward pass"
    )


def fit(
    model: Callable,
    guide: Callable,
    *args,
    num_steps: int = 1000,
    lr: float = 0.01,
    num_particles: int = 1,
    vectorize_particles: bool = True,
    loss: ELBO | None = None,
    fast: bool | None = None,
    optimizer: type[torch.optim.Optimizer] = torch.optim.Adam,
    optimizer_kwargs: dict | None = None,
    lr_schedule: str | Callable[[int], float] | None = None,
    clip_norm: float | None = None,
    stop_window: int | None = None,
    stop_tol: float = 1e-3,
    max_bad_steps: int = 20,
    seed: int | None = None,
    progress: bool = True,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 500,
    resume: bool = False,
    **kwargs,
) -> FitResult:
    """Fit ``guide`` to ``model`` by stochastic variational inference.

    Args:
        model, guide: Pyro model and guide; ``*args, **kwargs`` are passed to both.
        num_steps: total number of steps (a resumed fit counts the steps already taken).
        lr: learning rate.
        num_particles: Monte Carlo particles per step (vectorized when ``vectorize_particles``).
        vectorize_particles: evaluate the particles in one pass through a leading plate (the
            model must broadcast over it); ``False`` evaluates them one at a time with
            ``Trace_ELBO``.
        loss: an ELBO instance to use instead of the default below.
        fast: use :class:`~pyro_nf.fast.FastELBO` (same loss as ``Trace_ELBO``, without tracing
            the guide; several times faster for flow guides). ``None`` (default): for pyro_nf flow
            autoguides, falling back to ``Trace_ELBO`` if the model cannot be evaluated that way
            (e.g. does not broadcast over particles); ``True``: required; ``False``: never.
            Other guides always use ``Trace_ELBO``, and so does ``vectorize_particles=False``
            with more than one particle (FastELBO always vectorizes; ``fast=True`` then raises).
        optimizer, optimizer_kwargs: a ``torch.optim`` optimizer class and extra arguments.
            Adam and its subclasses get a multi-tensor kernel unless ``optimizer_kwargs`` sets
            ``fused`` or ``foreach``: fused on CUDA or with one CPU thread, ``foreach`` otherwise.
        lr_schedule: ``None``, ``"exponential"`` (to 1% of ``lr`` at the last step), ``"cosine"``,
            or a callable ``step -> factor`` multiplying ``lr``.
        clip_norm: clip the global gradient norm to this value.
        stop_window, stop_tol: the stopping rule (module docs); off when ``stop_window`` is None.
        max_bad_steps: consecutive non-finite steps tolerated before :class:`FitError`.
        seed: seeds Pyro's random number generators (``pyro.set_rng_seed``) before the fit.
        progress: show a progress bar (tqdm) with the loss and its running mean.
        checkpoint: file to save checkpoints to (and resume from when ``resume=True``).
        checkpoint_every: steps between checkpoints; the last step is always saved.
        resume: continue from ``checkpoint``; the guide must be built the same way.

    Returns:
        :class:`FitResult` with one loss per step.

    Example:
        >>> import pyro, pyro.distributions as dist, torch, pyro_nf
        >>> def model(y):
        ...     mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        ...     with pyro.plate("n", len(y)):
        ...         pyro.sample("y", dist.Normal(mu, 1.0), obs=y)
        >>> guide = pyro_nf.AutoPlanarFlow(model, num_transforms=2)
        >>> result = pyro_nf.fit(model, guide, torch.ones(5), num_steps=50, progress=False, seed=0)
        >>> len(result.losses), result.stopped
        (50, 'num_steps')
    """
    _check_positive_int(num_steps, "num_steps")
    _check_positive_int(num_particles, "num_particles")
    _check_positive_int(max_bad_steps, "max_bad_steps")
    _check_positive_int(checkpoint_every, "checkpoint_every")
    if stop_window is not None:
        _check_positive_int(stop_window, "stop_window")
    if not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    if resume and checkpoint is None:
        raise ValueError("resume=True needs checkpoint=PATH")
    lr_factor = _lr_factor(lr_schedule, num_steps)
    trace_elbo = Trace_ELBO(
        num_particles=num_particles, vectorize_particles=vectorize_particles and num_particles > 1
    )
    default_loss = loss is None
    if loss is None:
        # FastELBO evaluates particles in one vectorized pass (one particle needs no vectorizing)
        vectorized = vectorize_particles or num_particles == 1
        use_fast = isinstance(guide, AutoFlow) and fast is not False and vectorized
        if fast and not isinstance(guide, AutoFlow):
            raise ValueError(
                f"fast=True needs a pyro_nf flow autoguide, got {type(guide).__name__}"
            )
        if fast and not vectorized:
            raise ValueError(
                "fast=True evaluates the particles in one vectorized pass; it cannot be combined "
                "with vectorize_particles=False and num_particles > 1"
            )
        loss = FastELBO(num_particles) if use_fast else trace_elbo
    elif fast:
        raise ValueError("pass either loss= or fast=True, not both")

    if seed is not None:
        pyro.set_rng_seed(seed)

    # Create every parameter once, so the optimizer knows them.
    try:
        with poutine.trace(param_only=True) as param_capture:
            _capture_loss(loss, model, guide, args, kwargs)
    except (ValueError, RuntimeError, NotImplementedError) as e:
        # The default losses evaluate particles in one vectorized pass; a model that does not
        # broadcast over them gets the plain sequential Trace_ELBO instead (same estimator).
        vectorized = isinstance(loss, FastELBO) or getattr(loss, "vectorize_particles", False)
        if (
            not default_loss
            or fast
            or not (vectorized and (num_particles > 1 or isinstance(loss, FastELBO)))
        ):
            raise
        warnings.warn(
            f"{type(loss).__name__} could not evaluate this model ({type(e).__name__}: {e}); "
            "using Trace_ELBO with particles one at a time",
            stacklevel=2,
        )
        loss = Trace_ELBO(num_particles=num_particles, vectorize_particles=False)
        with poutine.trace(param_only=True) as param_capture:
            _capture_loss(loss, model, guide, args, kwargs)
    # One entry per tensor: Pyro can store a tensor under two names (e.g. AutoIAFNormal's
    # _prototype_tensor), and the optimizer must not step it twice.
    store = pyro.get_param_store()
    names, params, seen = [], [], set()
    for name in param_capture.trace.nodes:
        p = store[name].unconstrained()
        if id(p) not in seen:
            seen.add(id(p))
            names.append(name)
            params.append(p)
    if not names:
        raise ValueError("the model and guide have no parameters to fit")
    opt = _make_optimizer(optimizer, params, lr, optimizer_kwargs or {})
    base_lrs = [group["lr"] for group in opt.param_groups]

    losses: list[float] = []
    skipped: list[int] = []
    start_step = 0
    if resume:
        if not os.path.exists(checkpoint):
            raise FileNotFoundError(
                f"resume=True but there is no checkpoint at {os.fspath(checkpoint)!r}"
            )
        ckpt = _load_checkpoint(checkpoint)
        missing = set(names) ^ set(ckpt["params"])
        if missing:
            raise CheckpointError(
                f"checkpoint {os.fspath(checkpoint)!r} does not match this model and guide; "
                f"parameters present in only one of them: {sorted(missing)[:5]}"
            )
        with torch.no_grad():
            for name, p in zip(names, params):
                saved = ckpt["params"][name]
                if saved.shape != p.shape:
                    raise CheckpointError(
                        f"parameter {name!r} has shape {tuple(saved.shape)} in the checkpoint, {tuple(p.shape)} here"
                    )
                p.copy_(saved.to(p.device, p.dtype))
        opt.load_state_dict(ckpt["optimizer"])
        losses = ckpt["losses"].tolist()
        skipped = list(ckpt["skipped"])
        start_step = int(ckpt["step"])
        _set_rng_state(ckpt["rng"])

    rng_before_step = None  # random-number state at the start of the current step
    saved = False

    def save(step: int, rng: dict | None = None) -> None:
        if checkpoint is None:
            return
        _save_checkpoint(
            os.fspath(checkpoint),
            {
                "format": _CHECKPOINT_FORMAT,
                "step": step,
                "params": {n: p.detach().cpu() for n, p in zip(names, params)},
                "optimizer": opt.state_dict(),
                "losses": torch.tensor(losses, dtype=torch.float64, device="cpu"),
                "skipped": list(skipped),
                "rng": rng if rng is not None else _rng_state(),
            },
        )

    bar = _progress_bar(num_steps, start_step, progress)
    stopped = "num_steps"
    bad_in_a_row = 0
    t0 = time.perf_counter()
    step = start_step
    try:
        while step < num_steps:
            if checkpoint is not None:  # to checkpoint an unfinished step as not yet begun
                rng_before_step = _rng_state()
            factor = lr_factor(step)
            for group, base in zip(opt.param_groups, base_lrs):
                group["lr"] = base * factor
            opt.zero_grad(set_to_none=True)
            try:
                value = _loss_and_backward(loss, model, guide, args, kwargs)
            except (ValueError, RuntimeError) as e:
                # e.g. a distribution rejecting a NaN parameter: the step never reached the
                # optimizer, so the parameters are still the last good ones; keep them on disk.
                save(step, rng_before_step)
                raise FitError(
                    f"step {step}: the model or guide failed ({type(e).__name__}: {e}). The "
                    f"parameters are those of the last finished step ({step - 1})."
                ) from e
            bad_grads = _non_finite_grads(names, params) if math.isfinite(value) else []
            if not math.isfinite(value) or bad_grads:
                bad_in_a_row += 1
                skipped.append(step)
                losses.append(float("nan"))
                if bad_in_a_row >= max_bad_steps:
                    last = step - bad_in_a_row
                    kept = (
                        f"those of the last finite step ({last})"
                        if last >= 0
                        else "the initial ones (no step was finite)"
                    )
                    raise FitError(
                        f"step {step}: {bad_in_a_row} consecutive non-finite steps, stopping. The "
                        f"parameters are {kept}. Likely cause: {_likely_cause(value, bad_grads)}."
                    )
            else:
                bad_in_a_row = 0
                if clip_norm is not None:
                    torch.nn.utils.clip_grad_norm_(params, clip_norm)
                opt.step()
                losses.append(value)
            step += 1
            if bar is not None:
                bar.update(1)
                if step % 10 == 0 or step == num_steps:
                    recent = [v for v in losses[-100:] if math.isfinite(v)]
                    bar.set_postfix(
                        loss=f"{value:.4g}",
                        mean=f"{np.mean(recent) if recent else float('nan'):.4g}",
                    )
            if step % checkpoint_every == 0:
                save(step)
            if (
                stop_window
                and step % stop_window == 0
                and _converged(losses, stop_window, stop_tol)
            ):
                stopped = "converged"
                break
    except KeyboardInterrupt:
        stopped = "interrupted"
        if len(losses) > step:  # the step had finished; only its count was missing
            step = len(losses)
        else:  # the step had not reached the optimizer: save it as not begun
            save(step, rng_before_step)
            saved = True
        warnings.warn(f"fit interrupted at step {step}; returning the result so far", stacklevel=2)
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - t0
    if not saved and (step % checkpoint_every != 0 or stopped != "num_steps"):
        save(step)
    steps_here = step - start_step
    return FitResult(
        losses=np.asarray(losses, dtype=float),
        num_steps=step,
        stopped=stopped,
        skipped_steps=skipped,
        seconds=seconds,
        seconds_per_step=seconds / steps_here if steps_here else float("nan"),
        guide=guide,
    )


def _make_optimizer(optimizer, params, lr: float, kwargs: dict) -> torch.optim.Optimizer:
    """The optimizer; Adam and its subclasses (AdamW) use a multi-tensor kernel unless told otherwise.

    A step of the default per-tensor Adam costs tens of microseconds per parameter tensor on a
    CPU, which for a deep flow is a large part of the step. The fused kernel makes the same update
    in one call; on a CPU it is used only with one torch thread, because with several threads on a
    busy machine it can be many times slower than the loop it replaces. Otherwise the ``foreach``
    kernel (a few batched calls, no threading) is used. Where a kernel is not available (a device
    or dtype it does not support) the optimizer is built as asked.
    """
    fusable = isinstance(optimizer, type) and issubclass(optimizer, torch.optim.Adam)
    if fusable and not {"fused", "foreach"} & set(kwargs):
        on_cuda = all(p.is_cuda for p in params)
        kernel = {"fused": True} if on_cuda or torch.get_num_threads() == 1 else {"foreach": True}
        try:
            return optimizer(params, lr=lr, **kernel, **kwargs)
        except (RuntimeError, TypeError, ValueError):
            pass
    return optimizer(params, lr=lr, **kwargs)


def _non_finite_grads(names: list[str], params: list[torch.Tensor]) -> list[str]:
    """Names of the parameters whose gradient holds a NaN or inf (one reduction when none does)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return []
    try:  # one fused norm over every gradient; it is finite exactly when every entry is
        if bool(torch.isfinite(torch.stack(torch._foreach_norm(grads))).all()):
            return []
    except (AttributeError, RuntimeError):  # private API moved, or mixed devices
        pass
    return [
        n for n, p in zip(names, params) if p.grad is not None and not torch.isfinite(p.grad).all()
    ]


def _capture_loss(loss: ELBO, model, guide, args, kwargs) -> None:
    if hasattr(loss, "differentiable_loss"):
        loss.differentiable_loss(model, guide, *args, **kwargs)
    else:
        loss.loss(model, guide, *args, **kwargs)


def _loss_and_backward(loss: ELBO, model, guide, args, kwargs) -> float:
    """The loss value; gradients are accumulated only when it is finite (where we can tell)."""
    if hasattr(loss, "differentiable_loss"):
        loss_tensor = loss.differentiable_loss(model, guide, *args, **kwargs)
        value = float(loss_tensor.detach())
        if math.isfinite(value):
            loss_tensor.backward()
        return value
    # ELBOs without a differentiable loss (e.g. RenyiELBO) run backward themselves; non-finite
    # gradients are caught by the caller's check before any optimizer step.
    return float(loss.loss_and_grads(model, guide, *args, **kwargs))


def _converged(losses: list[float], window: int, tol: float) -> bool:
    if len(losses) < 2 * window:
        return False
    cur = np.nanmean(losses[-window:])
    prev = np.nanmean(losses[-2 * window : -window])
    return bool(prev - cur < tol * max(1.0, abs(cur)))


def _check_positive_int(value, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _progress_bar(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="fit", unit="step", dynamic_ncols=True)
