"""``pyro_nf.fit(..., compile=True)``: the fit loop around a :class:`~pyro_nf._capture.SyncFreeStep`.

The step itself (:mod:`pyro_nf._capture`) never waits for the device; this loop reads what the
steps did every :data:`~pyro_nf._capture.SYNC_EVERY` steps, at every checkpoint and stopping-rule
window and at the end, and then does what :func:`pyro_nf.workflow._loop` does after each step:
record the loss or the skip, stop with a :class:`~pyro_nf.FitError` after ``max_bad_steps``
non-finite steps in a row (the device froze the parameters at that step), update the progress bar,
checkpoint, apply the stopping rule. A step that raises (the eager step on a CPU) and Ctrl-C are
handled as in the usual loop, after the finished steps are read.

:func:`plan` decides whether a fit can use the step; where it cannot, it warns and the fit runs
the usual eager loop (never a different answer).
"""

from __future__ import annotations

import time
import warnings

import torch

from . import workflow as _workflow
from ._capture import SYNC_EVERY, SyncFreeStep, find_host_sync, unsupported_optimizer
from ._checkpoint import rng_state, set_rng_state
from ._guide_setup import subsampled_frame
from .fast import FastELBO
from .guides import AutoFlow

#: the values of fit's ``compile`` argument
MODES = (False, True, "eager")


def check_mode(compile) -> None:
    if not any(compile is m or (isinstance(m, str) and compile == m) for m in MODES):
        raise ValueError(f"compile must be False, True or 'eager', got {compile!r}")


def plan(settings, loss, model, guide, args, kwargs, optimizer, names, params, group):
    """The :class:`SyncFreeStep` for this fit, or ``None`` (with a warning saying why not)."""
    state = rng_state()  # the checks draw nothing the fit would draw otherwise
    try:
        reason = _why_not(loss, model, guide, args, kwargs, optimizer, params, group)
    finally:
        set_rng_state(state)

    def loss_fn():
        return loss.differentiable_loss(model, guide, *args, **kwargs)

    if reason is None:
        reason = find_host_sync(loss_fn)
    if reason is None and params[0].is_cuda and settings.compile is True:
        reason = _uses_cpu_random_numbers(loss_fn)
    if reason is not None:
        warnings.warn(
            f"fit(compile={settings.compile!r}) runs the usual eager step instead: {reason}",
            stacklevel=4,
        )
        return None
    return SyncFreeStep(
        loss_fn, names, params, optimizer, clip_norm=settings.clip_norm,
        max_bad_steps=settings.max_bad_steps, capture=settings.compile is True,
    )  # fmt: skip


def _why_not(loss, model, guide, args, kwargs, optimizer, params, group) -> str | None:
    if group is not None:
        return "distributed=True averages the gradients over the ranks on the host at every step"
    if not isinstance(loss, FastELBO) or not isinstance(guide, AutoFlow):
        return (
            f"the loss is {type(loss).__name__} and the guide {type(guide).__name__}; the captured "
            "step evaluates FastELBO, the default loss of the pyro_nf flow autoguides (for a "
            "guide of your own see pyro_nf.captured_step)"
        )
    reason = unsupported_optimizer(optimizer)
    if reason is not None:
        return reason
    if len({(p.device, p.dtype) for p in params}) > 1:
        return "the parameters are on several devices or of several dtypes"
    trace = guide._trace_at_prototype(args, kwargs, model)
    for site in trace.nodes.values():
        frame = subsampled_frame(site) if site["type"] == "sample" else None
        if frame is not None:
            return (
                f"the model subsamples the plate {frame.name!r} (its random indices would be "
                "drawn once and replayed at every step)"
            )
    return None


def _uses_cpu_random_numbers(loss_fn) -> str | None:
    """Whether a step of a model on CUDA draws from torch's CPU generator (a graph would replay
    the first draw)."""
    before = torch.get_rng_state()
    state = rng_state()
    try:
        with torch.no_grad():
            loss_fn()
        changed = not torch.equal(before, torch.get_rng_state())
    finally:
        set_rng_state(state)
    if changed:
        return (
            "the model draws random numbers on the CPU (a CUDA graph would replay the same "
            "numbers at every step)"
        )
    return None


def _chunk_end(step: int, settings) -> int:
    """The next step at which the record is read."""
    end = min(settings.num_steps, step + SYNC_EVERY)
    for every in (settings.checkpoint_every, settings.stop_window):
        if every:
            end = min(end, (step // every + 1) * every)
    return end


def _record(run, step: SyncFreeStep, settings, saver, guide, bar) -> None:
    """Read the finished steps and count them as the usual loop does, one by one."""
    rows, bad_names = step.flush()
    W = _workflow
    for value, finite in rows:
        if finite:
            outcome = W._Outcome(value, [])
        else:
            names = [] if not _is_finite(value) else (bad_names or ["(a parameter)"])
            outcome = W._Outcome(value, names)
        run.record(outcome)
        if run.bad_in_a_row >= settings.max_bad_steps:
            raise W._too_many_bad_steps(run, outcome, saver, guide)
        if bar is not None:
            W._show_progress(bar, run, outcome.value, settings.num_steps)


def _is_finite(value: float) -> bool:
    return value == value and abs(value) != float("inf")


def loop(run, settings, step: SyncFreeStep, saver, guide):
    """:func:`pyro_nf.workflow._loop` for a :class:`SyncFreeStep`."""
    W = _workflow
    bar = W._progress_bar(settings.num_steps, run.step, settings.progress)
    saved = False
    rng_before, current = None, None
    run.t0 = time.perf_counter()
    step.start(run.bad_in_a_row)
    base_lr = step.adam.optimizer.param_groups[0]["lr"]
    try:
        while run.step < settings.num_steps:
            try:
                for s in range(run.step, _chunk_end(run.step, settings)):
                    if saver is not None:  # to checkpoint a failed step as not yet begun
                        rng_before = rng_state()
                    current = s
                    step.set_lr(base_lr * settings.lr_factor(s))
                    step()
                    current = None
            except (KeyboardInterrupt, W.FitError):
                raise
            except Exception as e:
                _record(run, step, settings, saver, guide, bar)
                raise W._step_failed(e, run, saver, rng_before, guide) from e
            _record(run, step, settings, saver, guide, bar)
            if run.step % settings.checkpoint_every == 0:
                W._save_or_fail(saver, run, guide)
            if (
                settings.stop_window
                and run.step % settings.stop_window == 0
                and W._converged(run.losses, settings.stop_window, settings.stop_tol)
            ):
                run.stopped = "converged"
                break
    except KeyboardInterrupt:
        _record(run, step, settings, saver, guide, bar)
        run.stopped = "interrupted"
        if saver is not None and current is not None and run.step == current:  # never began
            W._save_or_fail(saver, run, guide, rng_before)
            saved = True
        warnings.warn(
            f"fit interrupted at step {run.step}; returning the result so far", stacklevel=3
        )
    finally:
        step.release()
        if bar is not None:
            bar.close()
    if not saved and (run.step % settings.checkpoint_every != 0 or run.stopped != "num_steps"):
        W._save_or_fail(saver, run, guide)
    return run.result(guide)
