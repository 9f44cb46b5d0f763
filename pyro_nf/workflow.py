"""``pyro_nf.fit``: SVI with a progress bar, a stopping rule, and no lost or corrupted work.

What :func:`fit` adds to a hand-written ``svi.step`` loop:

* **Non-finite steps never touch the parameters.** The loss and every gradient are checked before
  the optimizer step; a step with a NaN/inf is skipped, so the parameters stay at the last finite
  state. After ``max_bad_steps`` consecutive bad steps the fit stops with a :class:`FitError` that
  names the step and the likely cause.
* **A failing step loses nothing.** Whatever the model, guide or loss raises in a step, the
  parameters are those of the last finished step, they are checkpointed (with a checkpoint path),
  and the :class:`FitError` raised carries the result so far as ``error.result``.
* **The objective is the one asked for.** A flow autoguide set up for other latent sites or
  shapes than the model has with the fit's arguments is refused before the first step. The default
  loss changes only in one case: vectorized particles that the model does not broadcast over (it
  does evaluate with one particle) are evaluated one at a time instead, with a warning; the
  estimator is the same. Any other error is raised as it is.
* **Stopping rule** (optional, ``stop_window``): the losses are averaged over consecutive,
  non-overlapping windows of ``stop_window`` steps; the fit stops at the end of the first window
  whose mean is not lower than the previous window's mean by more than
  ``stop_tol * max(1, |mean|)`` (a relative improvement below ``stop_tol``).
* **Checkpoints** every ``checkpoint_every`` steps, written atomically, that load with
  ``torch.load(weights_only=True)`` (no code runs when a checkpoint is opened). A checkpoint
  records the guide's class, a flow autoguide's latent sites and shapes, and the optimizer;
  ``resume=True`` refuses one written for another model, guide or optimizer, and otherwise
  continues from it and reproduces the uninterrupted run's losses exactly (the random-number
  states are part of the checkpoint).
* **Ctrl-C** stops the fit cleanly: the result so far is returned (and checkpointed when a
  checkpoint path is given), with ``result.stopped == "interrupted"``.

:func:`fit` is assembled from parts that each do one thing: checking the arguments
(``_check_arguments``), choosing the loss (``_choose_loss``, ``_first_evaluation``), collecting
the parameters (``_collect_parameters``), one step (``_Stepper``), checkpoints (``_Checkpointer``
and ``pyro_nf._checkpoint``), the latent-site check (``pyro_nf._latents``) and the loop
(``_loop``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import numbers
import os
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import pyro
import pyro.poutine as poutine
import torch
from pyro.infer import ELBO, Trace_ELBO

from . import _checkpoint, _checks, _particles
from . import distributed as _distributed
from ._checkpoint import CheckpointError
from ._checkpoint import rng_state as _rng_state
from ._checkpoint import save as _save_checkpoint
from ._checkpoint import set_rng_state as _set_rng_state
from ._devices import model_device
from ._latents import check_unchanged as _check_latents_unchanged
from ._messages import first_line
from .fast import FastELBO
from .guides import AutoFlow

__all__ = ["fit", "FitResult", "FitError", "CheckpointError"]


class FitError(RuntimeError):
    """Raised when a fit cannot go on (too many consecutive non-finite steps, or a failing step).

    Attributes:
        result: the :class:`FitResult` of the steps finished before the error (``stopped ==
            "error"``), or ``None`` when the error came before the first step. The parameters
            are those of its last step; with a checkpoint path they are on disk too.

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
        ...     print(e.result.num_steps, e.result.skipped_steps)
        step 2: 3 consecutive non-finite steps, stopping
        3 [0, 1, 2]
    """

    def __init__(self, message: str, result: FitResult | None = None) -> None:
        super().__init__(message)
        self.result = result


@dataclass
class FitResult:
    """What :func:`fit` returns.

    Attributes:
        losses: the loss (negative ELBO estimate) of every step taken, NaN for skipped steps.
        num_steps: steps taken (including resumed ones).
        stopped: ``"num_steps"``, ``"converged"`` (stopping rule), ``"interrupted"`` (Ctrl-C), or
            ``"error"`` (the partial result carried by a :class:`FitError`).
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
    optimizer: type[torch.optim.Optimizer] | str = torch.optim.Adam,
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
    distributed: bool = False,
    compile: bool | str = False,
    **kwargs,
) -> FitResult:
    """Fit ``guide`` to ``model`` by stochastic variational inference.

    Every argument is checked before anything runs; a bad one is refused with an error naming it.

    Args:
        model, guide: Pyro model and guide; ``*args, **kwargs`` go to both. A pyro_nf flow
            autoguide already set up (called, ``setup()``, fitted) must get arguments that give
            the model the same latent sites and shapes, or the fit is refused before its first
            step (build a new guide for other data).
        num_steps: total number of steps (a resumed fit counts the steps already taken).
        lr: learning rate, a positive finite number.
        num_particles: Monte Carlo particles per step.
        vectorize_particles: evaluate the particles in one pass through a leading plate (the
            model must broadcast over it); ``False``: one at a time with ``Trace_ELBO``.
        loss: an ELBO instance to use, as given, instead of the default below.
        fast: use :class:`~pyro_nf.fast.FastELBO` (``Trace_ELBO``'s loss without tracing the
            guide; several times faster). ``None`` (default): for pyro_nf flow autoguides;
            ``True``: required; ``False``: never. Other guides use ``Trace_ELBO``, and so does
            ``vectorize_particles=False`` with several particles (``fast=True`` then raises).
            With the default loss, vectorized particles that the model fails on while it
            evaluates with one particle are evaluated one at a time by ``Trace_ELBO`` instead
            (the same estimator), with a warning; any other error is raised as it is.
        optimizer, optimizer_kwargs: a ``torch.optim`` optimizer class (or its name, any case:
            ``"adam"``, ``"sgd"``...) and extra arguments for it (not ``lr``). Adam and its
            subclasses get the fused kernel on CUDA or with one CPU thread, ``foreach``
            otherwise, unless ``optimizer_kwargs`` sets ``fused`` or ``foreach``.
        lr_schedule: ``None``, ``"exponential"`` (to 1% of ``lr`` at the last step), ``"cosine"``,
            or a callable ``step -> factor`` multiplying ``lr``.
        clip_norm: clip the global gradient norm to this positive number; ``None``: no clipping.
        stop_window, stop_tol: the stopping rule (module docs), off when ``stop_window`` is None;
            ``stop_tol`` is a finite number ``>= 0``.
        max_bad_steps: consecutive non-finite steps tolerated before :class:`FitError`.
        seed: seeds Pyro's random number generators (``pyro.set_rng_seed``) before the fit.
        progress: show a progress bar (tqdm) with the loss and its running mean.
        checkpoint: file to save checkpoints to (and resume from with ``resume=True``), in an
            existing, writable folder; without ``resume`` the file must not exist yet (an earlier
            fit's checkpoint is never overwritten). Checked before the first step.
        checkpoint_every: steps between checkpoints; the last step is always saved, and so is
            the last finished one when a step fails or the fit is interrupted.
        resume: continue from ``checkpoint``, written by the same model, guide (built the same
            way), optimizer and settings; ``lr`` and ``lr_schedule`` may change. A mismatch is
            refused with :class:`CheckpointError`, which names it.
        distributed: fit data-parallel over the ranks of a ``torch.distributed`` process group
            (:doc:`/scaling`): the one ``torchrun`` describes, or one the caller initialized.
            Each rank fits on its own shard of the data; the parameters start as rank 0's, the
            gradients and the loss are averaged over the ranks at every step, each rank draws
            its own reproducible random numbers (from ``seed`` and its rank), rank 0 alone shows
            progress and writes checkpoints (with every rank's random-number state, so
            ``resume=True`` on the same number of ranks continues exactly), and every rank
            returns the same losses. A step that raises on one rank stops every rank with a
            :class:`FitError`. Without a process group or launcher variables: ``RuntimeError``.
        compile: ``False`` (default): the usual step. ``True``: a step with no host
            synchronization (:doc:`/gpu`, "A captured training step"), captured whole (sample,
            score, backward, Adam update) in one CUDA graph when the parameters are on CUDA, run
            eagerly elsewhere; ``"eager"``: that step, never captured. The losses and finite
            flags are then read from the device every 100 steps (and at checkpoints,
            stopping-rule windows and the end); a non-finite step is still skipped on the device
            and reported as above, and ``max_bad_steps`` non-finite steps in a row stop the fit
            with the parameters of the last finite one. Needs a pyro_nf flow autoguide with the
            default loss (or a :class:`~pyro_nf.FastELBO`), Adam or AdamW, and a model without
            subsampling whose step reads no tensor value in Python; otherwise (and with
            ``distributed=True``) a warning says why and the usual step runs. (Not
            :class:`~pyro_nf.FastELBO`'s ``compile``, which compiles the flow's sample-and-score
            with ``torch.compile``.)

    Returns:
        :class:`FitResult` with one loss per step.

    Raises:
        FitError: a step failed, or ``max_bad_steps`` steps in a row were not finite; its
            ``result`` holds the steps finished.
        CheckpointError: the checkpoint to resume is not readable or belongs to another fit.

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
    settings = _check_arguments(**locals())  # first: locals() holds the arguments only
    loss, may_fall_back = _choose_loss(guide, loss, fast, num_particles, vectorize_particles)
    return _fit(settings, loss, may_fall_back, model, guide, args, kwargs)


def _fit(settings: _Settings, loss: ELBO, may_fall_back: bool, model, guide, args, kwargs):
    """The fit once the arguments are checked and the loss chosen."""
    group = None
    if settings.distributed:
        # gloo or NCCL by the device of the data the fit is given (tensor arguments)
        group = _distributed.setup(model_device("fit(distributed=True)", {}, args, kwargs, {}))
    _seed(settings.seed, group)
    with _distributed.all_or_none(group, "setting up the guide"):
        _check_latents_unchanged(model, guide, args, kwargs)
        with _quiet_plate_guess():
            loss, names = _first_evaluation(loss, may_fall_back, model, guide, args, kwargs)
        names, params = _collect_parameters(names)
    if group is not None:  # (collectives: only once every rank has set its guide up)
        _distributed.start_identical(names, params)
        _distributed.share_buffers(guide)
    opt = _make_optimizer(settings.optimizer, params, settings.lr, settings.optimizer_kwargs)
    averager = None if group is None else _distributed.Averager(group, params)
    stepper = _Stepper(
        loss, model, guide, args, kwargs, opt, names, params, settings.lr_factor, settings.clip_norm,
        averager,
    )  # fmt: skip
    saver = None
    if settings.checkpoint is not None:
        owner = _checkpoint.owner(guide, opt)
        saver = _Checkpointer(settings.checkpoint, owner, names, params, opt, group, guide)
    with _distributed.all_or_none(group, "resuming from the checkpoint"):
        run = saver.resume() if settings.resume else _Run()
    if group is not None and group.rank != 0:
        settings = dataclasses.replace(settings, progress=False)
    if settings.compile is not False:  # fit(compile=...): pyro_nf._captured_fit
        from . import _captured_fit

        step = _captured_fit.plan(settings, loss, model, guide, args, kwargs, opt, names, params, group)  # fmt: skip
        if step is not None:
            return _captured_fit.loop(run, settings, step, saver, guide)
    return _loop(run, settings, stepper, saver, guide, group)


def _seed(seed: int | None, group) -> None:
    """Seed Pyro's generators: with ``seed``; in a distributed fit, each rank differently."""
    if group is None:
        if seed is not None:
            pyro.set_rng_seed(seed)
        return
    pyro.set_rng_seed(_distributed.rank_seed(_distributed.shared_seed(seed), group.rank))


# ------------------------------------------------------------------------------------------------
# Arguments
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Settings:
    """fit's arguments that the loop uses, checked and normalized."""

    num_steps: int
    lr: float
    lr_factor: Callable[[int], float]
    clip_norm: float | None
    stop_window: int | None
    stop_tol: float
    max_bad_steps: int
    optimizer: Callable
    optimizer_kwargs: dict
    progress: bool
    checkpoint: str | None
    checkpoint_every: int
    resume: bool
    seed: int | None = None
    distributed: bool = False
    compile: bool | str = False


def _check_arguments(**a) -> _Settings:
    """Check :func:`fit`'s arguments, given by name (errors name the argument); the loop's
    settings."""
    for name in ("num_steps", "num_particles", "max_bad_steps", "checkpoint_every"):
        _checks.integer(a[name], name)
    if a["stop_window"] is not None:
        _checks.integer(a["stop_window"], "stop_window")
    _checks.number(a["lr"], "lr", lower=0.0)
    if a["clip_norm"] is not None:
        _checks.number(a["clip_norm"], "clip_norm", lower=0.0, hint=" (or None for no clipping)")
    _checks.number(a["stop_tol"], "stop_tol", lower=0.0, strict=False)
    seed = a["seed"]
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
        raise ValueError(f"seed must be None or an integer, got {seed!r}")
    for name in ("vectorize_particles", "progress", "resume", "distributed"):
        if not isinstance(a[name], bool):
            raise TypeError(f"{name} must be True or False, got {a[name]!r}")
    if not (a["fast"] is None or isinstance(a["fast"], bool)):
        raise TypeError(f"fast must be None, True or False, got {a['fast']!r}")
    if a["loss"] is not None:
        _check_loss(a["loss"])
    if a["resume"] and a["checkpoint"] is None:
        raise ValueError("resume=True needs checkpoint=PATH")
    _check_compile(a.get("compile", False))
    checkpoint = a["checkpoint"]
    return _Settings(
        num_steps=a["num_steps"],
        lr=float(a["lr"]),
        lr_factor=_lr_factor(a["lr_schedule"], a["num_steps"]),
        clip_norm=None if a["clip_norm"] is None else float(a["clip_norm"]),
        stop_window=a["stop_window"],
        stop_tol=float(a["stop_tol"]),
        max_bad_steps=a["max_bad_steps"],
        optimizer=_resolve_optimizer(a["optimizer"]),
        optimizer_kwargs=_check_optimizer_kwargs(a["optimizer_kwargs"]),
        progress=a["progress"],
        checkpoint=None if checkpoint is None else _checkpoint.check_path(checkpoint, a["resume"]),
        checkpoint_every=a["checkpoint_every"],
        resume=a["resume"],
        seed=seed,
        distributed=a["distributed"],
        compile=a.get("compile", False),
    )


def _check_compile(compile) -> None:
    if compile is not False:
        from ._captured_fit import check_mode

        check_mode(compile)


def _check_loss(loss) -> None:
    if isinstance(loss, type):
        raise TypeError(
            f"loss must be an ELBO instance, got the class {loss.__name__}; "
            f"pass loss={loss.__name__}(...)"
        )
    if not (hasattr(loss, "differentiable_loss") or hasattr(loss, "loss_and_grads")):
        raise TypeError(
            f"loss must be an ELBO instance such as pyro.infer.Trace_ELBO(), got {loss!r}"
        )


def _optimizers_by_name() -> dict[str, type[torch.optim.Optimizer]]:
    return {
        name.lower(): cls
        for name, cls in vars(torch.optim).items()
        if isinstance(cls, type)
        and issubclass(cls, torch.optim.Optimizer)
        and cls is not torch.optim.Optimizer
    }


def _resolve_optimizer(optimizer) -> Callable:
    """The optimizer class (or factory) for ``optimizer=``: a class, or a torch.optim name."""
    if isinstance(optimizer, str):
        by_name = _optimizers_by_name()
        if optimizer.lower() not in by_name:
            raise ValueError(
                f"optimizer={optimizer!r} is not the name of a torch.optim optimizer (one of "
                f"{', '.join(sorted(by_name))}); or pass a class, e.g. torch.optim.Adam"
            )
        optimizer = by_name[optimizer.lower()]
    if isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"optimizer must be an optimizer class or name, not an instance "
            f"({type(optimizer).__name__}): fit builds it over the parameters it collects; "
            f"pass optimizer=torch.optim.{type(optimizer).__name__} and its settings in "
            "optimizer_kwargs"
        )
    module = getattr(optimizer, "__module__", None) or ""
    if module.startswith("pyro.optim") or isinstance(optimizer, pyro.optim.PyroOptim):
        raise TypeError(
            f"optimizer takes a torch.optim class, not Pyro's wrapper {optimizer!r}; pass e.g. "
            "optimizer=torch.optim.Adam, with its settings (other than lr) in optimizer_kwargs"
        )
    if isinstance(optimizer, type):
        if not issubclass(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer subclass, got {optimizer.__name__}"
            )
        if issubclass(optimizer, torch.optim.LBFGS):
            raise ValueError(
                "optimizer=LBFGS needs a closure that re-evaluates a deterministic loss; fit's "
                "steps are stochastic estimates. Use a first-order optimizer (Adam, SGD...)"
            )
    elif not callable(optimizer):
        raise TypeError(
            f"optimizer must be a torch.optim optimizer class or its name, got {optimizer!r}"
        )
    return optimizer


def _check_optimizer_kwargs(optimizer_kwargs) -> dict:
    if optimizer_kwargs is None:
        return {}
    if not isinstance(optimizer_kwargs, Mapping):
        raise TypeError(f"optimizer_kwargs must be a dict or None, got {optimizer_kwargs!r}")
    for key in ("lr", "params"):
        if key in optimizer_kwargs:
            raise ValueError(
                f"optimizer_kwargs must not set {key!r}"
                + (": pass lr= to fit" if key == "lr" else ": fit collects the parameters")
            )
    return dict(optimizer_kwargs)


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


# ------------------------------------------------------------------------------------------------
# The loss
# ------------------------------------------------------------------------------------------------
def _choose_loss(
    guide, loss: ELBO | None, fast: bool | None, num_particles: int, vectorize_particles: bool
) -> tuple[ELBO, bool]:
    """The loss to fit with, and whether it may fall back to sequential particles.

    A loss the user passes is used as it is. Otherwise: ``FastELBO`` for pyro_nf flow autoguides
    (unless ``fast=False``, or particles that must not be vectorized), else ``Trace_ELBO``. Only
    the default loss with vectorized particles (more than one) may fall back, and only when
    ``fast`` is not ``True`` (see :func:`_first_evaluation`).
    """
    if loss is not None:
        if fast:
            raise ValueError("pass either loss= or fast=True, not both")
        return loss, False
    if getattr(guide, "_draws_one_at_a_time", False):  # AutoHierarchicalFlow: no particle plate
        vectorize_particles = False
    # FastELBO evaluates particles in one vectorized pass (one particle needs no vectorizing)
    vectorized = vectorize_particles or num_particles == 1
    if fast and not isinstance(guide, AutoFlow):
        raise ValueError(f"fast=True needs a pyro_nf flow autoguide, got {type(guide).__name__}")
    if fast and not vectorized:
        raise ValueError(
            "fast=True evaluates the particles in one vectorized pass; it cannot be combined "
            "with vectorize_particles=False and num_particles > 1"
        )
    if isinstance(guide, AutoFlow) and fast is not False and vectorized:
        chosen = FastELBO(num_particles)
    else:
        chosen = Trace_ELBO(
            num_particles=num_particles,
            vectorize_particles=vectorize_particles and num_particles > 1,
        )
    may_fall_back = not fast and vectorize_particles and num_particles > 1
    return chosen, may_fall_back


def _first_evaluation(
    loss: ELBO, may_fall_back: bool, model, guide, args: tuple, kwargs: dict
) -> tuple[ELBO, list[str]]:
    """Evaluate the loss once, which sets the guide up and creates every parameter.

    Returns the loss to fit with and the names of the parameters the evaluation used. An error
    is raised as it is, except in one case: the loss vectorizes several particles (and
    ``may_fall_back``), and the same model and guide evaluate with one particle and no particle
    plate. Then the model does not broadcast over the particle plate (it fails there, or it runs
    but mixes the particles, which :mod:`pyro_nf._particles` checks once), and the particles are
    evaluated one at a time by ``Trace_ELBO`` (the same estimator), with a warning.
    """
    try:
        names = _parameter_names(loss, model, guide, args, kwargs)
        if may_fall_back and not isinstance(loss, FastELBO):  # FastELBO checks this itself
            _particles.check_vectorized_elbo(loss, model, guide, args, kwargs)
        return loss, names
    except Exception as error:
        if not may_fall_back or not _evaluates_with_one_particle(loss, model, guide, args, kwargs):
            raise
        n = loss.num_particles
        warnings.warn(
            f"{type(loss).__name__} with {n} vectorized particles failed ({first_line(error)}), "
            "but the model evaluates with one particle: it does not "
            "broadcast over the particle plate (or, with data on a GPU, a prior built from Python "
            "numbers is expanded over that plate on the CPU: build it on the data's device, see "
            f"the docs' 'Running on a GPU'). The {n} particles are evaluated one at a time "
            "with Trace_ELBO instead (the same estimator, slower). Pass "
            "vectorize_particles=False to choose this without the warning",
            stacklevel=3,
        )
        sequential = Trace_ELBO(num_particles=n, vectorize_particles=False)
        return sequential, _parameter_names(sequential, model, guide, args, kwargs)


class _PlateGuessFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Guessed max_plate_nesting")


@contextlib.contextmanager
def _quiet_plate_guess():
    """Drop Pyro's INFO line "Guessed max_plate_nesting = N", which a vectorizing ``Trace_ELBO``
    logs at its first evaluation: fit chose that loss, the user did not ask for the guess."""
    logger, quiet = logging.getLogger("pyro.infer.elbo"), _PlateGuessFilter()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


def _evaluates_with_one_particle(loss: ELBO, model, guide, args: tuple, kwargs: dict) -> bool:
    """Whether the model and guide evaluate with one particle, without a particle plate."""
    single = FastELBO(1) if isinstance(loss, FastELBO) else Trace_ELBO(num_particles=1)
    try:
        single.loss(model, guide, *args, **kwargs)
    except Exception:  # noqa: BLE001 - any failure here means the first error was not about particles
        return False
    return True


def _capture_loss(loss: ELBO, model, guide, args, kwargs) -> None:
    if hasattr(loss, "differentiable_loss"):
        loss.differentiable_loss(model, guide, *args, **kwargs)
    else:
        loss.loss(model, guide, *args, **kwargs)


def _parameter_names(loss: ELBO, model, guide, args, kwargs) -> list[str]:
    """Names of the parameters one evaluation of the loss uses (creating any that are new)."""
    with poutine.trace(param_only=True) as param_capture:
        _capture_loss(loss, model, guide, args, kwargs)
    return list(param_capture.trace.nodes)


# ------------------------------------------------------------------------------------------------
# Parameters and optimizer
# ------------------------------------------------------------------------------------------------
def _collect_parameters(names: list[str]) -> tuple[list[str], list[torch.Tensor]]:
    """The param store's unconstrained tensors for ``names``, one entry per tensor.

    Pyro can store a tensor under two names (e.g. AutoIAFNormal's ``_prototype_tensor``), and the
    optimizer must not step it twice.
    """
    store = pyro.get_param_store()
    kept, params, seen = [], [], set()
    for name in names:
        p = store[name].unconstrained()
        if id(p) not in seen:
            seen.add(id(p))
            kept.append(name)
            params.append(p)
    if not kept:
        raise ValueError("the model and guide have no parameters to fit")
    return kept, params


def _make_optimizer(optimizer, params, lr: float, kwargs: dict) -> torch.optim.Optimizer:
    """The optimizer; Adam, AdamW and their subclasses use a multi-tensor kernel unless told otherwise.

    A step of the default per-tensor Adam costs tens of microseconds per parameter tensor on a
    CPU, which for a deep flow is a large part of the step. The fused kernel makes the same update
    in one call; on a CPU it is used only with one torch thread, because with several threads on a
    busy machine it can be many times slower than the loop it replaces. Otherwise the ``foreach``
    kernel (a few batched calls, no threading) is used. Where a kernel is not available (a device
    or dtype it does not support) the optimizer is built as asked.
    """
    opt = None
    adams = (torch.optim.Adam, torch.optim.AdamW)  # AdamW subclasses Adam only in newer torch
    fusable = isinstance(optimizer, type) and issubclass(optimizer, adams)
    if fusable and not {"fused", "foreach"} & set(kwargs):
        on_cuda = all(p.is_cuda for p in params)
        kernel = {"fused": True} if on_cuda or torch.get_num_threads() == 1 else {"foreach": True}
        try:
            opt = optimizer(params, lr=lr, **kernel, **kwargs)
        except (RuntimeError, TypeError, ValueError):
            pass
    if opt is None:
        opt = optimizer(params, lr=lr, **kwargs)
    if not isinstance(opt, torch.optim.Optimizer):
        raise TypeError(
            f"optimizer={optimizer!r} built a {type(opt).__name__}, not a torch.optim.Optimizer"
        )
    return opt


# ------------------------------------------------------------------------------------------------
# One step
# ------------------------------------------------------------------------------------------------
@dataclass
class _Outcome:
    """What one step did: its loss, and the parameters whose gradient was not finite."""

    value: float
    bad_grads: list[str]

    @property
    def finite(self) -> bool:
        return math.isfinite(self.value) and not self.bad_grads


class _Stepper:
    """One optimizer step of a fit, with everything it needs bound once.

    ``stepper(step)`` sets the learning rate for ``step``, evaluates the loss and its gradients,
    and updates the parameters (clipping the gradient norm first, if asked) only when the loss
    and every gradient are finite; otherwise nothing changes. Exceptions propagate.
    """

    def __init__(
        self,
        loss,
        model,
        guide,
        args,
        kwargs,
        optimizer,
        names,
        params,
        lr_factor,
        clip_norm,
        averager=None,
    ) -> None:
        self.loss, self.model, self.guide = loss, model, guide
        self.args, self.kwargs = args, kwargs
        self.optimizer, self.names, self.params = optimizer, names, params
        self.lr_factor, self.clip_norm = lr_factor, clip_norm
        self.averager = averager  # a distributed fit's gradient averaging (pyro_nf.distributed)
        # The lrs fit was called with: a resumed optimizer state does not replace them.
        self.base_lrs = [group["lr"] for group in optimizer.param_groups]

    def __call__(self, step: int) -> _Outcome:
        factor = self.lr_factor(step)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * factor
        self.optimizer.zero_grad(set_to_none=True)
        try:
            value = _loss_and_backward(self.loss, self.model, self.guide, self.args, self.kwargs)
        except Exception:
            if self.averager is not None:  # tell the other ranks, which would wait for us
                self.averager(float("nan"), failed=True)
            raise
        if self.averager is not None:
            value = self.averager(value, failed=False)
        bad_grads = _non_finite_grads(self.names, self.params) if math.isfinite(value) else []
        outcome = _Outcome(value, bad_grads)
        if outcome.finite:
            if self.clip_norm is not None:
                torch.nn.utils.clip_grad_norm_(self.params, self.clip_norm)
            self.optimizer.step()
        return outcome


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


# ------------------------------------------------------------------------------------------------
# What a fit has done, and its checkpoints
# ------------------------------------------------------------------------------------------------
@dataclass
class _Run:
    """What a fit has done so far (restored from a checkpoint when resuming)."""

    losses: list[float] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    step: int = 0  # steps finished, resumed ones included
    start_step: int = 0  # steps finished before this call
    bad_in_a_row: int = 0
    stopped: str = "num_steps"
    t0: float = field(default_factory=time.perf_counter)

    def record(self, outcome: _Outcome) -> None:
        """Count a finished step: its loss, or NaN and its index if it was skipped."""
        if outcome.finite:
            self.bad_in_a_row = 0
            self.losses.append(outcome.value)
        else:
            self.bad_in_a_row += 1
            self.skipped.append(self.step)
            self.losses.append(float("nan"))
        self.step += 1

    def kept_parameters(self) -> str:
        """Which step's parameters the guide holds, in words (for error messages)."""
        last = self.step - 1 - self.bad_in_a_row  # skipped steps leave the parameters alone
        if last < 0:
            return "the initial ones (no step was finite)"
        return f"those of the last finite step ({last})"

    def result(self, guide) -> FitResult:
        seconds = time.perf_counter() - self.t0
        steps_here = self.step - self.start_step
        return FitResult(
            losses=np.asarray(self.losses, dtype=float),
            num_steps=self.step,
            stopped=self.stopped,
            skipped_steps=list(self.skipped),
            seconds=seconds,
            seconds_per_step=seconds / steps_here if steps_here else float("nan"),
            guide=guide,
        )


class _Checkpointer:
    """Saves a fit's state to ``path`` (see :mod:`pyro_nf._checkpoint`) and resumes from it."""

    def __init__(
        self, path: str, owner: dict, names, params, optimizer, group=None, guide=None
    ) -> None:
        self.path, self.owner, self.guide = path, owner, guide
        self.names, self.params, self.optimizer = names, params, optimizer
        self.group = group  # a distributed fit's process group: rank 0 writes

    def save(self, run: _Run, rng: dict | None = None) -> None:
        """Save ``run`` as it is (with ``rng``, the random-number states at ``run.step``).

        In a distributed fit every rank calls this at the same step: rank 0 gathers every
        rank's random-number states and writes the file; the other ranks write nothing.
        """
        rng = rng if rng is not None else _rng_state()
        ranks = {}
        if self.group is not None:
            states = _distributed.gather_objects(rng)
            if self.group.rank != 0:
                return
            ranks = {"world_size": self.group.world_size, "rng_ranks": states}
        _save_checkpoint(
            self.path,
            {
                "format": _checkpoint.FORMAT,
                **self.owner,
                "step": run.step,
                "params": {n: p.detach().cpu() for n, p in zip(self.names, self.params)},
                "optimizer": self.optimizer.state_dict(),
                "buffers": _checkpoint.buffers(self.guide),
                "losses": torch.tensor(run.losses, dtype=torch.float64, device="cpu"),
                "skipped": list(run.skipped),
                "rng": rng,
                **ranks,
            },
        )

    def resume(self) -> _Run:
        """Load the checkpoint into the parameters, optimizer and generators; its run so far."""
        ckpt = _checkpoint.load(self.path)
        _distributed.check_checkpoint_ranks(ckpt, self.path, self.group)
        _checkpoint.restore(ckpt, self.path, self.owner, self.names, self.params, self.optimizer)
        _checkpoint.restore_buffers(ckpt, self.path, self.guide)
        if self.group is not None:
            _set_rng_state(ckpt["rng_ranks"][self.group.rank])
        step = int(ckpt["step"])
        return _Run(
            losses=ckpt["losses"].tolist(),
            skipped=list(ckpt["skipped"]),
            step=step,
            start_step=step,
        )


# ------------------------------------------------------------------------------------------------
# The loop
# ------------------------------------------------------------------------------------------------
def _loop(
    run: _Run,
    settings: _Settings,
    stepper: _Stepper,
    saver: _Checkpointer | None,
    guide,
    group=None,
) -> FitResult:
    """Take steps until ``num_steps``, the stopping rule, Ctrl-C or an error.

    A step that raises leaves the parameters of the last finished step; they are checkpointed
    (with the random-number states from before the failed step, so a resumed fit retries it as
    it would have run) and a :class:`FitError` with the result so far is raised from the error.
    """
    bar = _progress_bar(settings.num_steps, run.step, settings.progress)
    saved = False
    in_step, rng_before_step = False, None
    run.t0 = time.perf_counter()
    try:
        while run.step < settings.num_steps:
            if saver is not None:  # to checkpoint an unfinished step as not yet begun
                rng_before_step = _rng_state()
            in_step = True
            try:
                outcome = stepper(run.step)
            except Exception as e:
                raise _step_failed(e, run, saver, rng_before_step, guide) from e
            run.record(outcome)
            in_step = False
            if run.bad_in_a_row >= settings.max_bad_steps:
                raise _too_many_bad_steps(run, outcome, saver, guide)
            if bar is not None:
                _show_progress(bar, run, outcome.value, settings.num_steps)
            if run.step % settings.checkpoint_every == 0:
                _save_or_fail(saver, run, guide)
            if (
                settings.stop_window
                and run.step % settings.stop_window == 0
                and _converged(run.losses, settings.stop_window, settings.stop_tol)
            ):
                run.stopped = "converged"
                break
    except KeyboardInterrupt:
        run.stopped = "interrupted"
        if len(run.losses) > run.step:  # the step had finished; only its count was missing
            run.step = len(run.losses)
        elif in_step and saver is not None and group is None:  # the step never began
            _save_or_fail(saver, run, guide, rng_before_step)
            saved = True
        warnings.warn(
            f"fit interrupted at step {run.step}; returning the result so far", stacklevel=3
        )
    finally:
        if bar is not None:
            bar.close()
    if group is not None and run.stopped == "interrupted":
        saved = True  # the ranks stop at different points: the last periodic checkpoint stands
    if not saved and (run.step % settings.checkpoint_every != 0 or run.stopped != "num_steps"):
        _save_or_fail(saver, run, guide)
    return run.result(guide)


def _save_or_fail(saver: _Checkpointer | None, run: _Run, guide, rng: dict | None = None) -> None:
    """Save a checkpoint; a failure to write it is a :class:`FitError` that keeps the result."""
    if saver is None:
        return
    try:
        saver.save(run, rng)
    except Exception as e:
        run.stopped = "error"
        raise FitError(
            f"step {run.step}: could not write the checkpoint {saver.path!r} ({type(e).__name__}:"
            f" {e}). The fit so far is in this error's .result; the parameters are those of "
            f"step {run.step - 1}",
            run.result(guide),
        ) from e


def _step_failed(
    error: Exception, run: _Run, saver: _Checkpointer | None, rng: dict | None, guide
) -> FitError:
    """The FitError for a step that raised, after checkpointing the last finished step."""
    run.stopped = "error"
    where = ""
    if saver is not None:
        try:
            saver.save(run, rng)
            where = (
                f" They are checkpointed in {saver.path!r} (resume=True retries step {run.step})."
            )
        except Exception as e:  # noqa: BLE001 - report, but the step's own error comes first
            where = f" Writing the checkpoint failed too ({type(e).__name__}: {e})."
    return FitError(
        f"step {run.step}: the model or guide failed ({type(error).__name__}: {error}). The "
        f"parameters are {_finished(run)}.{where} The result so far is in this error's .result.",
        run.result(guide),
    )


def _finished(run: _Run) -> str:
    if run.step == 0:
        return "the initial ones (no step had finished)"
    return f"those of the last finished step ({run.step - 1})"


def _too_many_bad_steps(
    run: _Run, outcome: _Outcome, saver: _Checkpointer | None, guide
) -> FitError:
    """The FitError for ``max_bad_steps`` non-finite steps in a row (checkpointed first)."""
    where = ""
    if saver is not None:
        try:
            saver.save(run)
            where = f" The fit so far is checkpointed in {saver.path!r}."
        except Exception as e:  # noqa: BLE001 - report, but the non-finite steps come first
            where = f" Writing the checkpoint failed ({type(e).__name__}: {e})."
    run.stopped = "error"
    return FitError(
        f"step {run.step - 1}: {run.bad_in_a_row} consecutive non-finite steps, stopping. The "
        f"parameters are {run.kept_parameters()}. Likely cause: "
        f"{_likely_cause(outcome.value, outcome.bad_grads)}.{where}",
        run.result(guide),
    )


def _show_progress(bar, run: _Run, value: float, num_steps: int) -> None:
    bar.update(1)
    if run.step % 10 == 0 or run.step == num_steps:
        recent = [v for v in run.losses[-100:] if math.isfinite(v)]
        bar.set_postfix(
            loss=f"{value:.4g}", mean=f"{np.mean(recent) if recent else float('nan'):.4g}"
        )


def _converged(losses: list[float], window: int, tol: float) -> bool:
    if len(losses) < 2 * window:
        return False
    cur = np.nanmean(losses[-window:])
    prev = np.nanmean(losses[-2 * window : -window])
    return bool(prev - cur < tol * max(1.0, abs(cur)))


def _progress_bar(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="fit", unit="step", dynamic_ncols=True)
