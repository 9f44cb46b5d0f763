"""A training step with no host synchronization, captured whole in one CUDA graph on a GPU.

On a GPU a flow guide's step is launch-bound: its arithmetic takes microseconds and its time goes
to launching hundreds of small kernels from Python. A CUDA graph records those launches once and
replays them with one call (``torch.cuda.CUDAGraph``), which needs a step that never waits for the
device: no ``.item()``, no ``float(tensor)``, no Python ``if`` on a tensor's value. This module
builds such a step from any function that returns a differentiable loss tensor:

* the loss is evaluated with Pyro's and torch's validation off (their checks read values);
* the gradients accumulate into one flat buffer (each parameter's ``.grad`` is a view of it), so
  the finite check is one reduction and the Adam/AdamW update runs on flat tensors;
* whether the loss and every gradient are finite is a flag on the device; the update, the Adam
  moments and the step count are kept as they were when it is not set (``torch.where``), so a
  non-finite step changes nothing, as in :func:`pyro_nf.fit`;
* a device-side count of consecutive non-finite steps freezes the parameters once it reaches
  ``max_bad_steps``, so that when the host reads the record later the parameters are still those
  of the last finite step before the limit;
* each step writes its loss and finite flag into a device buffer that the host reads every few
  steps (:meth:`SyncFreeStep.flush`).

On a CPU the same step runs eagerly (nothing to capture); tests check it against the usual step
and run it with every host-sync method of ``torch.Tensor`` patched to raise
(:func:`no_host_syncs`). The Adam update follows ``torch.optim.Adam`` (Kingma & Ba 2015;
decoupled weight decay as in ``AdamW``, Loshchilov & Hutter 2019); its state is written back
into the torch optimizer at every read, so checkpoints are those of the usual step.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable

import pyro
import torch

from ._checkpoint import rng_state, set_rng_state

#: steps between two reads of the device-side record (at most)
SYNC_EVERY = 100
#: eager steps on a side stream before the capture (cuBLAS handles, allocator pools)
WARMUP_STEPS = 3


class HostSync(RuntimeError):
    """A tensor's value was read on the host inside a step that must not synchronize."""


_SYNCING = (
    "item",
    "tolist",
    "numpy",
    "__bool__",
    "__float__",
    "__int__",
    "__index__",
    "__complex__",
)


@contextlib.contextmanager
def no_host_syncs():
    """Make every ``torch.Tensor`` method that reads a value on the host raise :class:`HostSync`.

    (``item``, ``tolist``, ``numpy``, ``bool()``, ``float()``, ``int()``, indexing with a tensor
    as a Python integer.) Operations that synchronize inside torch's C++ code (``nonzero``,
    boolean-mask indexing) are not caught on a CPU; capturing on a GPU refuses them.
    """
    saved = {name: torch.Tensor.__dict__.get(name) for name in _SYNCING}

    def refuse(name):
        def method(self, *args, **kwargs):
            raise HostSync(
                f"Tensor.{name} reads a tensor's value on the host (shape {tuple(self.shape)})"
            )

        return method

    try:
        for name in _SYNCING:
            setattr(torch.Tensor, name, refuse(name))
        yield
    finally:
        for name, method in saved.items():
            if method is None:
                delattr(torch.Tensor, name)
            else:
                setattr(torch.Tensor, name, method)


def scalar_tensor(data, dtype=None, device=None, requires_grad=False) -> torch.Tensor:
    """``torch.tensor(data, dtype=..., device=...)`` for a Python number, made on its device by a
    fill kernel instead of a copy from the host (the dtype torch would infer: ``bool``,
    ``int64`` or the default floating dtype)."""
    if dtype is None:
        dtype = (
            torch.bool
            if isinstance(data, bool)
            else torch.int64
            if isinstance(data, int)
            else torch.get_default_dtype()
        )
    return torch.full((), data, dtype=dtype, device=device, requires_grad=requires_grad)


@contextlib.contextmanager
def capturable_scalars():
    """Inside, ``torch.tensor(x, device=d)``, ``torch.as_tensor(x, device=d)`` and
    ``t.new_tensor(x)`` of a Python number ``x`` on a device other than the CPU fill the value
    on the device instead of copying it from the host.

    A host-to-device copy synchronizes, so it cannot be captured in a CUDA graph, and
    ``torch.distributions`` makes one for every Python number beside a tensor parameter
    (``dist.Normal(loc, 1.0)``); the number is a constant of the model's code, which the graph
    then replays as such.
    """
    tensor, as_tensor, new_tensor = torch.tensor, torch.as_tensor, torch.Tensor.new_tensor
    number = (bool, int, float)

    def on_device(device) -> bool:
        return device is not None and torch.device(device).type != "cpu"

    def tensor_(data, *args, dtype=None, device=None, requires_grad=False, **kwargs):
        if isinstance(data, number) and not args and not kwargs and on_device(device):
            return scalar_tensor(data, dtype, device, requires_grad)
        return tensor(data, *args, dtype=dtype, device=device, requires_grad=requires_grad, **kwargs)  # fmt: skip

    def as_tensor_(data, dtype=None, device=None):
        if isinstance(data, number) and on_device(device):
            return scalar_tensor(data, dtype, device)
        return as_tensor(data, dtype=dtype, device=device)

    def new_tensor_(self, data, dtype=None, device=None, requires_grad=False, **kwargs):
        device = self.device if device is None else device
        if isinstance(data, number) and not kwargs and on_device(device):
            dtype = self.dtype if dtype is None else dtype
            return scalar_tensor(data, dtype, device, requires_grad)
        return new_tensor(self, data, dtype=dtype, device=device, requires_grad=requires_grad, **kwargs)  # fmt: skip

    try:
        torch.tensor, torch.as_tensor, torch.Tensor.new_tensor = tensor_, as_tensor_, new_tensor_
        yield
    finally:
        torch.tensor, torch.as_tensor, torch.Tensor.new_tensor = tensor, as_tensor, new_tensor


def find_host_sync(loss_fn: Callable[[], torch.Tensor]) -> str | None:
    """Evaluate ``loss_fn()`` once under :func:`no_host_syncs` (without gradients, validation
    off, random-number states restored): ``None`` when it reads no value on the host, else what
    read one. Another error is returned in words too (the usual step will raise it)."""
    state = rng_state()
    try:
        with torch.no_grad(), no_host_syncs(), pyro.validation_enabled(False):
            loss_fn()
    except Exception as e:  # noqa: BLE001 - any failure means: do not capture
        cause: BaseException | None = e
        while cause is not None and not isinstance(cause, HostSync):
            cause = cause.__cause__ or cause.__context__
        if cause is not None:
            return f"the model or guide reads a tensor's value in Python ({first_line(cause)})"
        return f"the step failed without validation ({type(e).__name__}: {first_line(e)})"
    finally:
        set_rng_state(state)
    return None


def first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [""])[0]


def unsupported_optimizer(optimizer: torch.optim.Optimizer) -> str | None:
    """Why the captured step cannot run ``optimizer``'s update (``None``: it can)."""
    if not isinstance(optimizer, torch.optim.Adam) and type(optimizer).__name__ != "AdamW":
        return f"the captured step updates with Adam or AdamW, not {type(optimizer).__name__}"
    if len(optimizer.param_groups) != 1:
        return "the optimizer has several parameter groups"
    group = optimizer.param_groups[0]
    for option in ("amsgrad", "maximize", "differentiable"):
        if group.get(option):
            return f"the captured Adam update has no {option}=True"
    if torch.is_tensor(group["lr"]):
        return "the optimizer's lr is a tensor"
    return None


class FlatAdam:
    """Adam/AdamW (``torch.optim.Adam``'s update) with a device-side skip, on moments kept in
    flat buffers.

    ``params`` are the tensors to update (one device and dtype), ``optimizer`` the
    ``torch.optim.Adam``/``AdamW`` that holds their settings (one group) and any state to start
    from; :meth:`export_state` writes the state back into it. Where torch has it for the
    parameters' device and dtype, the update is torch's fused Adam/AdamW kernel, whose
    ``found_inf`` argument (the one AMP's ``GradScaler`` uses) skips a step on the device;
    otherwise it is the same update written as masked tensor operations (:meth:`_masked`).
    """

    def __init__(self, params: list[torch.Tensor], optimizer: torch.optim.Optimizer) -> None:
        self.params, self.optimizer = params, optimizer
        group = optimizer.param_groups[0]
        self.beta1, self.beta2 = (float(b) for b in group["betas"])
        self.eps, self.weight_decay = float(group["eps"]), float(group["weight_decay"])
        self.decoupled = bool(group.get("decoupled_weight_decay", type(optimizer).__name__ == "AdamW"))  # fmt: skip
        like = {"dtype": params[0].dtype, "device": params[0].device}
        self.sizes = [p.numel() for p in params]
        n = sum(self.sizes)
        self.exp_avg, self.exp_avg_sq = torch.zeros(n, **like), torch.zeros(n, **like)
        # one step count per parameter, as torch keeps them (all equal here)
        self.steps = torch.zeros(len(params), dtype=torch.float32, device=like["device"])
        self._views = [
            (m.view_as(p), v.view_as(p), step)
            for p, m, v, step in zip(
                params, self.exp_avg.split(self.sizes), self.exp_avg_sq.split(self.sizes),
                self.steps.unbind(),
            )
        ]  # fmt: skip
        self.fused = fused_kernel_works(like["dtype"], like["device"])
        lr_dtype = torch.float32 if self.fused else like["dtype"]
        self.lr = torch.tensor(float(group["lr"]), dtype=lr_dtype, device=like["device"])
        self._lr_value = float(group["lr"])
        self._constants = {
            name: torch.tensor(value, **like)
            for name, value in (("zero", 0.0), ("one", 1.0), ("beta2", self.beta2),
                                ("one_minus_beta1", 1.0 - self.beta1))
        }  # fmt: skip
        for p, (m, v, step) in zip(params, self._views):  # a resumed optimizer's state
            state = optimizer.state.get(p, {})
            if "exp_avg" in state:
                m.copy_(state["exp_avg"])
                v.copy_(state["exp_avg_sq"])
                step.fill_(float(state["step"]))

    def set_lr(self, value: float) -> None:
        """Set the learning rate (one small copy to the device, only when it changes)."""
        if value != self._lr_value:
            self.lr.fill_(value)
            self._lr_value = value
        self.optimizer.param_groups[0]["lr"] = value

    @torch.no_grad()
    def update(
        self,
        grad: torch.Tensor,
        grads: list[torch.Tensor],
        apply: torch.Tensor,
        clip_norm: float | None,
    ) -> None:
        """One Adam step from the flat gradient ``grad`` (``grads``: each parameter's view of it)
        where the 0-dim bool ``apply`` is set; nothing changes where it is not (a NaN in
        ``grad`` included)."""
        if clip_norm is not None:  # as torch.nn.utils.clip_grad_norm_
            grad.mul_(torch.clamp(clip_norm / (grad.norm() + 1e-6), max=1.0))
        applied = apply.to(torch.float32)
        self.steps.add_(applied)
        if not self.fused:
            self._masked(grad, apply)
            return
        kernel = torch._fused_adamw_ if self.decoupled else torch._fused_adam_
        ms, vs, steps = (list(x) for x in zip(*self._views))
        kernel(
            [p.detach() for p in self.params], grads, ms, vs, [], steps, amsgrad=False,
            lr=self.lr, beta1=self.beta1, beta2=self.beta2, weight_decay=self.weight_decay,
            eps=self.eps, maximize=False, grad_scale=None, found_inf=1.0 - applied,
        )  # fmt: skip

    def _masked(self, grad: torch.Tensor, apply: torch.Tensor) -> None:
        """The update as masked in-place tensor operations (the moments' weights and the step
        size are Adam's where ``apply`` is set and leave everything unchanged where it is not);
        about ten passes over the flat vectors."""
        c = self._constants
        grad = torch.where(apply, grad, c["zero"])  # a skipped step's NaN stays out
        if self.weight_decay and not self.decoupled:
            param = torch.cat([p.detach().reshape(-1) for p in self.params])
            grad.add_(torch.where(apply, param, c["zero"]), alpha=self.weight_decay)
        self.exp_avg.lerp_(grad, torch.where(apply, c["one_minus_beta1"], c["zero"]))
        self.exp_avg_sq.mul_(torch.where(apply, c["beta2"], c["one"]))
        self.exp_avg_sq.addcmul_(grad, grad, value=1.0 - self.beta2)
        step = self.steps[0].to(grad.dtype)
        lr = self.lr.to(grad.dtype)
        bias1 = 1.0 - torch.pow(self.beta1, step)
        bias2 = torch.where(apply, 1.0 - torch.pow(self.beta2, step), c["one"])  # not 0
        step_size = torch.where(apply, lr / bias1, c["zero"])
        denom = (self.exp_avg_sq.sqrt() / bias2.sqrt()).add_(self.eps)
        update = (self.exp_avg / denom).mul_(step_size)
        params = [p.detach() for p in self.params]
        if self.weight_decay and self.decoupled:
            torch._foreach_mul_(params, torch.where(apply, 1.0 - lr * self.weight_decay, c["one"]))  # fmt: skip
        torch._foreach_sub_(params, [u.view_as(p) for u, p in zip(update.split(self.sizes), params)])  # fmt: skip

    def export_state(self) -> None:
        """Write the moments and the step count into the torch optimizer's state (its
        ``state_dict`` then holds them, as after its own steps). Reads the step count: a sync."""
        group = self.optimizer.param_groups[0]
        on_device = group.get("fused") or group.get("capturable")
        for p, (m, v, _), step in zip(self.params, self._views, self.steps.tolist()):
            self.optimizer.state[p] = {
                "step": torch.tensor(
                    step, dtype=torch.float32, device=p.device if on_device else "cpu"
                ),
                "exp_avg": m,
                "exp_avg_sq": v,
            }


def fused_kernel_works(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether torch's fused Adam kernel, with a tensor learning rate and ``found_inf``, runs for
    parameters of this dtype on this device (torch >= 2.4 on a CPU; tried once on tiny tensors)."""
    try:
        x = [torch.zeros(2, dtype=dtype, device=device)]
        g = [torch.ones(2, dtype=dtype, device=device)]
        m, v = [torch.zeros_like(x[0])], [torch.zeros_like(x[0])]
        step = [torch.ones((), dtype=torch.float32, device=device)]
        flag = torch.zeros((), dtype=torch.float32, device=device)
        lr = torch.tensor(0.5, dtype=torch.float32, device=device)
        torch._fused_adam_(x, g, m, v, [], step, amsgrad=False, lr=lr, beta1=0.9, beta2=0.999,
                           weight_decay=0.0, eps=1e-8, maximize=False, grad_scale=None,
                           found_inf=flag)  # fmt: skip
        return bool(torch.isfinite(x[0]).all()) and float(x[0][0]) < 0
    except Exception:  # noqa: BLE001 - no such kernel here: the masked update
        return False


class SyncFreeStep:
    """One training step (loss, backward, finite check, Adam/AdamW update) with no host sync,
    captured in a CUDA graph on CUDA when ``capture``.

    Args:
        loss_fn: returns the loss, a differentiable 0-dim tensor, from fixed inputs.
        names, params: the parameters to train (one device and dtype) and their names.
        optimizer: a ``torch.optim.Adam``/``AdamW`` over ``params`` (settings, state; see
            :class:`FlatAdam`).
        clip_norm: clip the gradient norm to this number first.
        max_bad_steps: consecutive non-finite steps after which the parameters freeze.
        capture: capture the step in a CUDA graph (parameters on CUDA only).
        capacity: steps the device-side record holds; :meth:`flush` before it is full.

    Call it once per step; :meth:`flush` reads what the steps since the last read did.
    """

    def __init__(
        self,
        loss_fn: Callable[[], torch.Tensor],
        names: list[str],
        params: list[torch.Tensor],
        optimizer: torch.optim.Optimizer,
        *,
        clip_norm: float | None = None,
        max_bad_steps: int | None = None,
        capture: bool = True,
        capacity: int = SYNC_EVERY,
    ) -> None:
        self.loss_fn, self.names, self.params = loss_fn, names, params
        self.clip_norm = clip_norm
        self.adam = FlatAdam(params, optimizer)
        like = {"dtype": params[0].dtype, "device": params[0].device}
        index = {"dtype": torch.long, "device": params[0].device}
        self.grad = torch.zeros(sum(self.adam.sizes), **like)
        self._attach_grads()
        self.capacity = capacity
        self.record = torch.zeros(capacity, 2, **like)  # loss, finite flag
        self.slot = torch.zeros(1, **index)
        self.bad_run = torch.zeros((), **index)
        self.max_bad = torch.tensor(max_bad_steps if max_bad_steps else 2**62, **index)
        self.bad_params = torch.zeros(len(params), dtype=torch.bool, device=like["device"])
        self.capture = bool(capture) and like["device"].type == "cuda"
        self.graph = None
        self.calls = 0
        self.pending = 0  # steps since the last flush
        self.capture_error: str | None = None

    def _attach_grads(self) -> None:
        start, self._grads = 0, []
        for p, size in zip(self.params, self.adam.sizes):
            p.grad = self.grad[start : start + size].view_as(p)
            self._grads.append(p.grad)
            start += size

    # -- the step --------------------------------------------------------------------------
    def body(self) -> None:
        """The step's work, with no host sync: what the CUDA graph records."""
        self.grad.zero_()
        with pyro.validation_enabled(False):
            loss = self.loss_fn()
        loss.backward()
        with torch.no_grad():
            loss = loss.detach().to(self.grad.dtype)
            # one norm per gradient (one multi-tensor kernel): finite exactly when every entry
            # is, except for a norm that overflows the dtype (entries of 1e19 in float32),
            # which counts as non-finite
            bad = ~torch.isfinite(torch.stack(torch._foreach_norm(self._grads)))
            ok = torch.isfinite(loss) & ~bad.any()
            frozen = self.bad_run >= self.max_bad
            self.bad_params.copy_(torch.where(~ok & ~frozen, bad, self.bad_params))
            self.adam.update(self.grad, self._grads, ok & ~frozen, self.clip_norm)
            self.bad_run.copy_(
                torch.where(frozen, self.bad_run, torch.where(ok, 0, self.bad_run + 1))
            )
            row = torch.stack([loss, ok.to(loss.dtype)]).unsqueeze(0)
            self.record.index_copy_(0, self.slot, row)
            self.slot.add_(1)

    def __call__(self) -> None:
        if self.pending >= self.capacity:
            raise RuntimeError("the step record is full: flush() first")
        if self.graph is not None:
            self.graph.replay()
        elif self.capture and self.calls >= WARMUP_STEPS:
            if self._try_capture():
                self.graph.replay()
            else:
                self.body()
        elif self.capture:  # warm-up on a side stream, as torch.cuda.graphs asks
            side = torch.cuda.Stream(device=self.grad.device)
            side.wait_stream(torch.cuda.current_stream(self.grad.device))
            with torch.cuda.stream(side):
                self.body()
            torch.cuda.current_stream(self.grad.device).wait_stream(side)
        else:
            self.body()
        self.calls += 1
        self.pending += 1

    def _try_capture(self) -> bool:
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph), capturable_scalars():
                self.body()
        except Exception as e:  # noqa: BLE001 - a step that cannot be captured runs eagerly
            self.capture, self.capture_error = False, f"{type(e).__name__}: {first_line(e)}"
            torch.cuda.synchronize(self.grad.device)
            self._attach_grads()
            warnings.warn(
                f"the training step could not be captured in a CUDA graph ({self.capture_error}); "
                "it runs eagerly (the same numbers, without the speed-up)",
                stacklevel=4,
            )
            return False
        self.graph = graph
        return True

    @property
    def captured(self) -> bool:
        """Whether the step replays a CUDA graph."""
        return self.graph is not None

    def set_lr(self, value: float) -> None:
        self.adam.set_lr(value)

    def start(self, bad_in_a_row: int = 0) -> None:
        """Start counting consecutive non-finite steps from ``bad_in_a_row``."""
        self.bad_run.fill_(bad_in_a_row)

    # -- reading the record ------------------------------------------------------------------
    def flush(self) -> tuple[list[tuple[float, bool]], list[str]]:
        """Read the steps since the last read (one sync): each step's ``(loss, finite)``, and
        the parameters whose gradient was not finite at the last non-finite step counted
        (before any freeze). Writes the optimizer state back (:meth:`FlatAdam.export_state`)."""
        done = int(self.slot[0])
        rows = [(loss, flag > 0.5) for loss, flag in self.record[:done].tolist()]
        bad = [n for n, b in zip(self.names, self.bad_params.tolist()) if b]
        self.slot.zero_()
        self.pending = 0
        self.adam.export_state()
        return rows, bad

    def release(self) -> None:
        """Detach the parameters' ``.grad`` from the flat buffer (at the end of a fit)."""
        for p in self.params:
            p.grad = None
