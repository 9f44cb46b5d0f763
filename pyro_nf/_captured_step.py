"""``pyro_nf.captured_step``: the captured training step for a model and guide of your own (a VAE)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import numpy as np
import pyro.poutine as poutine
import torch
from pyro.poutine.util import site_is_subsample

from ._capture import SyncFreeStep, find_host_sync, unsupported_optimizer
from ._checkpoint import rng_state, set_rng_state
from ._guide_setup import subsampled_frame

__all__ = ["CapturedStep", "captured_step", "elbo_loss"]


def elbo_loss(model: Callable, guide: Callable, *args, **kwargs) -> torch.Tensor:
    """``Trace_ELBO``'s loss (the negative ELBO, one particle) as a differentiable tensor,
    computed without host synchronization: one traced run of the guide, the model replayed on
    it, and the difference of their summed log-densities. Valid when every latent site of the
    guide is reparameterized (``has_rsample``) and every latent of the model is in the guide
    (:func:`captured_step` checks both once)."""
    guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)

    def keep(name, site):
        return not site_is_subsample(site)

    return guide_trace.log_prob_sum(keep) - model_trace.log_prob_sum(keep)


def captured_step(
    model: Callable,
    guide: Callable,
    *args,
    lr: float = 1e-3,
    optimizer: type[torch.optim.Optimizer] | str = torch.optim.Adam,
    optimizer_kwargs: dict | None = None,
    clip_norm: float | None = None,
    max_bad_steps: int = 20,
    capture: bool = True,
    **kwargs,
) -> CapturedStep:
    """A training step for your own model and guide (e.g. a VAE's ``pyro.sample("z", flow(h))``)
    with no host synchronization, captured in one CUDA graph on CUDA.

    The step is the one of ``SVI(model, guide, Adam, Trace_ELBO())`` with one particle: sample
    the guide, score model and guide (:func:`elbo_loss`), backward, Adam or AdamW update. It is
    built from example arguments (``*args, **kwargs``, e.g. the first mini-batch), which give the
    shapes; each later call ``step(x)`` copies its tensors into the step's own inputs and runs
    (on CUDA: replays) the whole step. The loss and a finite flag stay on the device and are read
    by :meth:`CapturedStep.losses` (and every 100 steps); a step with a non-finite loss or
    gradient changes nothing, and ``max_bad_steps`` of them in a row raise
    :class:`~pyro_nf.FitError` at the next read, with the parameters of the last finite step.

    What the model and guide must satisfy (see :doc:`/gpu`): every latent of the model is a
    reparameterized sample site of the guide; the same shapes at every call (a call with other
    shapes, such as a smaller last mini-batch, runs eagerly with a warning: right, not fast);
    no Python decision on a tensor's value and no ``.item()`` (on CUDA, looked for once at
    construction: the step then runs eagerly, with a warning); no subsampling plate (its random
    indices would be replayed: runs eagerly, with a warning); non-tensor arguments that do not
    change between calls. Where it is not captured the step computes the same numbers eagerly.

    Args:
        model, guide: Pyro model and guide; ``*args, **kwargs`` are example arguments for both.
        lr, optimizer, optimizer_kwargs, clip_norm, max_bad_steps: as for :func:`pyro_nf.fit`;
            the optimizer must be Adam or AdamW.
        capture: capture in a CUDA graph when the parameters are on CUDA; ``False``: always
            run the step eagerly (to compare).

    Returns:
        a :class:`CapturedStep`; call it once per mini-batch.

    Example:
        >>> import pyro, pyro.distributions as dist, torch, pyro_nf
        >>> encoder = torch.nn.Linear(3, 4)
        >>> flow = pyro_nf.Flow(2, "planar", 2, context_dim=4)
        >>> decoder = torch.nn.Linear(2, 3)
        >>> def model(x):
        ...     pyro.module("decoder", decoder)
        ...     with pyro.plate("batch", x.shape[0]):
        ...         z = pyro.sample("z", dist.Normal(x.new_zeros(2), 1.0).to_event(1))
        ...         pyro.sample("x", dist.Normal(decoder(z), 1.0).to_event(1), obs=x)
        >>> def guide(x):
        ...     pyro.module("encoder", encoder)
        ...     with pyro.plate("batch", x.shape[0]):
        ...         pyro.sample("z", flow(encoder(x)))
        >>> data = torch.randn(10, 8, 3)
        >>> step = pyro_nf.captured_step(model, guide, data[0], lr=0.01)
        >>> for x in data:
        ...     step(x)
        >>> step.losses().shape, step.skipped_steps
        ((10,), [])
    """
    return CapturedStep(
        model, guide, args, kwargs, lr=lr, optimizer=optimizer, optimizer_kwargs=optimizer_kwargs,
        clip_norm=clip_norm, max_bad_steps=max_bad_steps, capture=capture,
    )  # fmt: skip


class CapturedStep:
    """The step :func:`captured_step` returns.

    Attributes:
        captured: whether the step replays a CUDA graph (``False`` on a CPU, before the first
            few calls, and where it could not be captured).
        params: the trained tensors, in ``names``' order (Pyro's param store holds them).
        optimizer: the torch optimizer holding the settings and (after a read) the Adam state.
        skipped_steps: indices of the steps skipped as non-finite (as of the last read).

    Example:
        >>> import pyro, pyro.distributions as dist, torch, pyro_nf
        >>> def model(x):
        ...     loc = pyro.sample("loc", dist.Normal(x.new_zeros(2), 1.0).to_event(1))
        ...     pyro.sample("x", dist.Normal(loc, 1.0).to_event(1), obs=x)
        >>> def guide(x):
        ...     m = pyro.param("m", torch.zeros(2))
        ...     pyro.sample("loc", dist.Normal(m, 0.5).to_event(1))
        >>> step = pyro_nf.captured_step(model, guide, torch.ones(2), lr=0.1)
        >>> for _ in range(200):
        ...     step(torch.ones(2))
        >>> step.num_steps, step.captured  # on a CPU the step runs eagerly
        (200, False)
        >>> bool((pyro.param("m") - 0.5).abs().max() < 0.2)  # the posterior mean is 0.5
        True
    """

    def __init__(self, model, guide, args, kwargs, *, lr, optimizer, optimizer_kwargs,
                 clip_norm, max_bad_steps, capture) -> None:  # fmt: skip
        from . import _checks
        from . import workflow as W

        _checks.number(lr, "lr", lower=0.0)
        _checks.integer(max_bad_steps, "max_bad_steps")
        if clip_norm is not None:
            _checks.number(clip_norm, "clip_norm", lower=0.0)
        self.model, self.guide = model, guide
        self._args = tuple(_own(a) for a in args)
        self._kwargs = {k: _own(v) for k, v in kwargs.items()}
        state = rng_state()  # building the step draws nothing that the steps would draw
        try:
            self._check_model_and_guide()
            with poutine.trace(param_only=True) as params:
                self._loss()
            why = self._why_not_capture() if capture and _on_cuda(params.trace) else None
        finally:
            set_rng_state(state)
        self.names, self.params = W._collect_parameters(list(params.trace.nodes))
        cls = W._resolve_optimizer(optimizer)
        opt_kwargs = W._check_optimizer_kwargs(optimizer_kwargs)
        self.optimizer = W._make_optimizer(cls, self.params, float(lr), opt_kwargs)
        reason = unsupported_optimizer(self.optimizer)
        if reason is not None:
            raise ValueError(f"captured_step: {reason}")
        if len({(p.device, p.dtype) for p in self.params}) > 1:
            raise ValueError("captured_step: the parameters are on several devices or dtypes")
        self.max_bad_steps = max_bad_steps
        if why is not None:
            warnings.warn(f"captured_step runs the step eagerly: {why}", stacklevel=3)
        self._step = SyncFreeStep(
            self._loss, self.names, self.params, self.optimizer, clip_norm=clip_norm,
            max_bad_steps=max_bad_steps, capture=capture and why is None,
        )  # fmt: skip
        self._losses: list[float] = []
        self.skipped_steps: list[int] = []
        self._bad_in_a_row = 0
        self._warned_shapes = False

    def _loss(self) -> torch.Tensor:
        return elbo_loss(self.model, self.guide, *self._args, **self._kwargs)

    def _check_model_and_guide(self) -> None:
        guide_trace = poutine.trace(self.guide).get_trace(*self._args, **self._kwargs)
        replayed = poutine.trace(poutine.replay(self.model, trace=guide_trace))
        model_trace = replayed.get_trace(*self._args, **self._kwargs)
        for name, site in guide_trace.iter_stochastic_nodes():
            if site_is_subsample(site):
                continue
            if not getattr(site["fn"], "has_rsample", False) or site["infer"].get("enumerate"):
                raise ValueError(
                    f"captured_step: the guide's site {name!r} is not reparameterized "
                    f"({type(site['fn']).__name__}); its gradient needs Trace_ELBO's score "
                    "function, use pyro.infer.SVI with Trace_ELBO"
                )
        for name, site in model_trace.iter_stochastic_nodes():
            if not site_is_subsample(site) and name not in guide_trace.nodes:
                raise ValueError(
                    f"captured_step: the model's latent site {name!r} is not in the guide"
                )

    def _why_not_capture(self) -> str | None:
        trace = poutine.trace(self.model).get_trace(*self._args, **self._kwargs)
        for site in trace.nodes.values():
            frame = subsampled_frame(site) if site["type"] == "sample" else None
            if frame is not None:
                return f"the model subsamples the plate {frame.name!r}"
        reason = find_host_sync(self._loss)
        if reason is None:
            before = torch.get_rng_state()
            with torch.no_grad():
                self._loss()
            if not torch.equal(before, torch.get_rng_state()):
                reason = "the model or guide draws random numbers on the CPU"
        return reason

    @property
    def captured(self) -> bool:
        return self._step.captured

    @property
    def num_steps(self) -> int:
        """Steps taken (read or not)."""
        return len(self._losses) + self._step.pending

    def __call__(self, *args, **kwargs) -> None:
        """One step on these arguments (tensors of the example's shapes; other arguments as in
        the example)."""
        if len(args) != len(self._args) or set(kwargs) != set(self._kwargs):
            raise TypeError(
                "captured_step: call the step with the same arguments as the example "
                f"({len(self._args)} positional, keywords {sorted(self._kwargs)})"
            )
        pairs = list(zip(self._args, args)) + [(self._kwargs[k], v) for k, v in kwargs.items()]
        same_shapes = True
        for mine, new in pairs:
            if torch.is_tensor(mine) != torch.is_tensor(new):
                raise TypeError("captured_step: a tensor argument became a non-tensor or back")
            if torch.is_tensor(mine):
                same_shapes &= (mine.shape, mine.dtype, mine.device) == (
                    new.shape,
                    new.dtype,
                    new.device,
                )
            elif not (mine is new or _equal(mine, new)):
                raise ValueError(
                    f"captured_step: a non-tensor argument changed ({mine!r} -> {new!r}); the "
                    "step bakes them in: build another step for other values"
                )
        if self._step.pending >= self._step.capacity:
            self._read()
        if same_shapes:
            for mine, new in pairs:
                if torch.is_tensor(mine) and mine is not new:
                    mine.copy_(new)
            self._step()
            return
        if not self._warned_shapes:
            warnings.warn(
                "captured_step: tensors of other shapes than the example's: this step (and any "
                "other such) runs eagerly",
                stacklevel=2,
            )
            self._warned_shapes = True
        saved = self._args, self._kwargs
        self._args, self._kwargs = tuple(args), dict(kwargs)
        try:
            self._step.body()
            self._step.pending += 1
        finally:
            self._args, self._kwargs = saved

    def _read(self) -> None:
        from .workflow import FitError, _likely_cause

        rows, bad = self._step.flush()
        for value, finite in rows:
            if finite:
                self._bad_in_a_row = 0
                self._losses.append(value)
                continue
            self._bad_in_a_row += 1
            self.skipped_steps.append(len(self._losses))
            self._losses.append(float("nan"))
            if self._bad_in_a_row >= self.max_bad_steps:
                cause = _likely_cause(value, [] if not math.isfinite(value) else bad)
                raise FitError(
                    f"step {len(self._losses) - 1}: {self._bad_in_a_row} consecutive non-finite "
                    f"steps; the parameters are those of the last finite step. Likely cause: "
                    f"{cause}. The step is frozen: build a new one"
                )

    def losses(self) -> np.ndarray:
        """The loss of every step so far (NaN for skipped steps); reads the device (a sync)."""
        self._read()
        return np.asarray(self._losses, dtype=float)


def _on_cuda(param_trace) -> bool:
    """Whether the parameters a trace registered are on CUDA."""
    values = [site["value"] for site in param_trace.nodes.values()]
    return any(torch.is_tensor(v) and v.is_cuda for v in values)


def _own(value):
    """The step's own input: a copy of a tensor (later calls copy into it), else the value."""
    return value.detach().clone() if torch.is_tensor(value) else value


def _equal(a, b) -> bool:
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - values that do not compare are different
        return False
