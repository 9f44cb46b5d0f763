"""Data-parallel fitting on ``torch.distributed``: what ``fit(..., distributed=True)`` uses.

Every process (a *rank*) holds the whole guide and evaluates the ELBO on its own shard of the
data; after each backward pass the gradients are averaged over the ranks with one
``all_reduce``, so every rank takes the same optimizer step and the parameters stay identical.
PyTorch's collectives do the communication (gloo on the CPU, NCCL on CUDA); there is no
communication code here beyond calling them.

The model sees its shard through a plate over the *whole* data set, subsampled by the shard's
global indices, so Pyro scales the likelihood to the full data set::

    def model(x, y):                       # x, y: the whole data set, or a memory map of it
        w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([x.shape[1]]).to_event(1))
        idx = pyro_nf.distributed.minibatch(len(x), 1000)    # this rank's 1000 rows this step
        with pyro.plate("data", len(x), subsample=idx):
            pyro.sample("y", dist.Bernoulli(logits=(x[idx] * w).sum(-1)), obs=y[idx])

Each rank's estimate of the ELBO is then unbiased for the full data set, and their mean (the
averaged gradient) is the estimate of a minibatch that is the union of the ranks' minibatches.

Launch with ``torchrun --nproc_per_node=2 script.py`` (or any launcher that sets ``RANK``,
``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``), or initialize a process group yourself
before calling ``fit``.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from . import _checks

__all__ = [
    "RankFailed",
    "epoch_batches",
    "is_launched",
    "local_range",
    "minibatch",
    "rank_and_world",
    "setup",
]

_LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class RankFailed(RuntimeError):
    """Another rank's step raised: this rank stops too, instead of waiting for it forever.

    :func:`pyro_nf.fit` raises it as the cause of its :class:`~pyro_nf.FitError` on every rank
    but the failing one, whose own error is the cause there.

    Example:
        >>> from pyro_nf.distributed import RankFailed
        >>> issubclass(RankFailed, RuntimeError)
        True
    """


@dataclass(frozen=True)
class Group:
    """The process group a distributed fit runs in."""

    rank: int
    world_size: int
    backend: str
    created: bool  # whether setup() initialized it
    device: torch.device  # where this rank's collectives put their small tensors

    @classmethod
    def current(cls, created: bool = False) -> Group:
        backend = dist.get_backend()
        device = torch.device("cpu")
        if backend == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        return cls(dist.get_rank(), dist.get_world_size(), backend, created, device)


def is_launched() -> bool:
    """Whether a process group exists or a launcher has set the variables to make one.

    Example:
        >>> import pyro_nf.distributed as pd
        >>> pd.is_launched()  # a plain python process
        False
    """
    if not dist.is_available():
        return False
    return dist.is_initialized() or all(v in os.environ for v in _LAUNCHER_VARIABLES)


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the current process group; ``(0, 1)`` outside one.

    Example:
        >>> import pyro_nf.distributed as pd
        >>> pd.rank_and_world()
        (0, 1)
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def setup(device: torch.device | str | None = None, timeout: float = 1800.0) -> Group:
    """The process group to fit in: the one already initialized, or a new one from the launcher's
    environment variables (gloo for a CPU ``device``, NCCL for CUDA).

    ``timeout`` (seconds) bounds how long a collective waits for a rank that has stopped
    answering (a crashed process); a rank whose step raises is reported at once (see
    :class:`RankFailed`).

    Returns:
        a ``Group`` with the ``rank``, ``world_size``, ``backend``, whether this call ``created``
        the group, and the ``device`` of its small collectives.

    Raises:
        RuntimeError: no process group and no launcher variables; the message says how to launch.

    Example:
        A process group of one process (what ``torchrun --nproc_per_node=1`` would give); a fit
        in it is a plain fit:

        >>> import os, tempfile, torch.distributed as dist
        >>> import pyro_nf.distributed as pd
        >>> store = os.path.join(tempfile.mkdtemp(), "store")
        >>> dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
        >>> group = pd.setup()
        >>> group.rank, group.world_size, group.backend, group.created
        (0, 1, 'gloo', False)
        >>> dist.destroy_process_group()
    """
    _checks.number(timeout, "timeout")
    if not dist.is_available():
        raise RuntimeError("distributed=True needs torch.distributed, which this torch lacks")
    if dist.is_initialized():
        return Group.current()
    missing = [v for v in _LAUNCHER_VARIABLES if v not in os.environ]
    if missing:
        raise RuntimeError(
            "distributed=True found no process group and no launcher variables "
            f"({', '.join(missing)} unset). Launch the script with e.g. "
            "`torchrun --nproc_per_node=2 script.py`, or call "
            "torch.distributed.init_process_group(...) before fit, or drop distributed=True to "
            "fit in this one process"
        )
    on_cuda = device is not None and torch.device(device).type == "cuda"
    backend = "nccl" if on_cuda and dist.is_nccl_available() else "gloo"
    if on_cuda and backend == "nccl":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
    atexit.register(_destroy)
    return Group.current(created=True)


def _destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def shared_seed(seed: int | None) -> int:
    """``seed``, or (when it is None) a seed drawn on rank 0 and sent to every rank."""
    group = Group.current()
    value = torch.tensor(
        [seed if seed is not None else int(torch.randint(2**31 - 1, ()))],
        dtype=torch.int64,
        device=group.device,
    )
    dist.broadcast(value, src=0)
    return int(value)


def _failed_ranks(group: Group, failed: bool) -> list[int]:
    """Every rank says whether it failed; the ranks that did (the same list on every rank)."""
    flags = torch.zeros(group.world_size, dtype=torch.float32, device=group.device)
    flags[group.rank] = 1.0 if failed else 0.0
    dist.all_reduce(flags)
    return torch.nonzero(flags).flatten().tolist()


@contextlib.contextmanager
def all_or_none(group: Group | None, what: str):
    """Run the block on every rank; if it raises on one, every rank raises.

    The rank whose block raised raises its own error; the others raise :class:`RankFailed`,
    which names it, instead of waiting for it in the next collective.
    """
    if group is None:
        yield
        return
    try:
        yield
    except BaseException:
        _failed_ranks(group, True)
        raise
    failed = _failed_ranks(group, False)
    if failed:
        raise RankFailed(
            f"rank(s) {', '.join(map(str, failed))} failed while {what} (their own error is in "
            "their output); this rank stops too"
        )


def start_identical(names: list[str], params: list[torch.Tensor]) -> None:
    """Check that every rank has the same parameters (names and shapes), then give them all
    rank 0's values."""
    mine = [(n, tuple(p.shape), str(p.dtype)) for n, p in zip(names, params)]
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    for rank, theirs in enumerate(everyone):
        if theirs != everyone[0]:
            diff = sorted(set(map(str, theirs)) ^ set(map(str, everyone[0])))[:4]
            raise RuntimeError(
                f"rank {rank} has other parameters than rank 0 (differing: {'; '.join(diff)}): "
                "every rank must build the same model and guide (only the data shard may differ)"
            )
    broadcast_parameters(params)


def share_buffers(guide) -> None:
    """Give every rank rank 0's module buffers of ``guide`` (such as the Laplace start's
    preconditioner, which each rank's set-up found from its own data shard): the ranks must train
    one guide, not one each."""
    from ._checkpoint import buffers, restore_buffers

    box = [buffers(guide) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    restore_buffers({"buffers": box[0]}, "rank 0's guide", guide)


def check_checkpoint_ranks(ckpt: dict, path: str, group: Group | None) -> None:
    """Refuse to resume a distributed checkpoint on another number of ranks, or in one process
    (and a one-process checkpoint in a distributed fit): the random numbers would differ."""
    from ._checkpoint import CheckpointError

    written = ckpt.get("world_size")
    running = None if group is None else group.world_size
    if written != running:
        said = {None: "a fit in one process"}
        raise CheckpointError(
            f"{path!r} was written by {said.get(written, f'a distributed fit on {written} ranks')}"
            f"; this is {said.get(running, f'a distributed fit on {running} ranks')}. Resume on "
            "the same number of ranks, or start a new fit without resume=True"
        )


def rank_seed(seed: int, rank: int) -> int:
    """The seed of ``rank``'s random numbers in a fit seeded with ``seed``.

    Rank 0 uses ``seed`` itself (so a one-process distributed fit draws what ``fit(seed=seed)``
    draws); the other ranks get distinct, reproducible seeds derived from ``(seed, rank)``.
    """
    if rank == 0:
        return int(seed)
    return int(np.random.SeedSequence([int(seed), int(rank)]).generate_state(1)[0])


def local_range(num_data: int) -> tuple[int, int]:
    """``(start, stop)``: the contiguous block of ``range(num_data)`` that this rank owns.

    The blocks of all ranks partition the data; their sizes differ by at most one.

    Example:
        >>> import pyro_nf.distributed as pd
        >>> pd.local_range(10)  # outside a process group: everything
        (0, 10)
    """
    _checks.integer(num_data, "num_data")
    rank, world = rank_and_world()
    if num_data < world:
        raise ValueError(f"num_data={num_data} is smaller than the number of ranks ({world})")
    base, extra = divmod(num_data, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def minibatch(num_data: int, batch_size: int, device: torch.device | str | None = None):
    """``batch_size`` distinct global indices drawn at random from this rank's block (every
    subset of that size equally likely; the cost does not grow with the block).

    Drawn from torch's global generator, which a distributed fit seeds differently on every rank
    (and checkpoints), so a resumed fit draws the same minibatches. Pass the result as a plate's
    ``subsample``: ``pyro.plate("data", num_data, subsample=idx)``. Outside a process group this
    draws from the whole data set.

    Example:
        >>> import pyro_nf.distributed as pd
        >>> idx = pd.minibatch(1000, 5)
        >>> idx.shape, bool((idx >= 0).all() and (idx < 1000).all()), len(set(idx.tolist()))
        (torch.Size([5]), True, 5)
    """
    _checks.integer(batch_size, "batch_size")
    start, stop = local_range(num_data)
    if batch_size > stop - start:
        raise ValueError(
            f"batch_size={batch_size} is larger than this rank's block of {stop - start} rows"
        )
    return start + _distinct_uniform(stop - start, batch_size, device)


def _distinct_uniform(n: int, k: int, device) -> torch.Tensor:
    """``k`` distinct integers from ``range(n)``, every subset equally likely, in O(k log k).

    (``torch.randperm(n)[:k]`` costs O(n) per call: for a block of 10^6 rows that is most of a
    step.) Draw ``k`` integers, then redraw the later copies of any repeated value until none is
    repeated: the distinct values of the first draw are a uniformly random set of their size, and
    each redraw is uniform over the values not yet taken.
    """
    idx = torch.randint(n, (k,), device=device)
    while True:
        values, order = torch.sort(idx, stable=True)
        repeated = order[1:][values[1:] == values[:-1]]
        if len(repeated) == 0:
            return idx
        idx[repeated] = torch.randint(n, (len(repeated),), device=device)


def epoch_batches(num_data: int, batch_size: int, epoch: int, seed: int = 0) -> list[torch.Tensor]:
    """This rank's minibatches (global indices) for one pass over the data, as
    ``torch.utils.data.DistributedSampler`` would split them.

    The whole index range is shuffled with ``(seed, epoch)`` (the same on every rank), cut into
    one block per rank (the last rows are dropped so every rank gets the same number of
    batches), and this rank's block is split into batches of ``batch_size`` (the last one may be
    shorter).

    Example:
        >>> import pyro_nf.distributed as pd
        >>> [len(b) for b in pd.epoch_batches(10, 4, epoch=0)]
        [4, 4, 2]
    """
    _checks.integer(num_data, "num_data")
    _checks.integer(batch_size, "batch_size")
    _checks.integer(epoch, "epoch", minimum=0)
    rank, world = rank_and_world()
    generator = torch.Generator().manual_seed(int(seed) * 1_000_003 + epoch)
    order = torch.randperm(num_data, generator=generator)
    per_rank = num_data // world
    if per_rank == 0:
        raise ValueError(f"num_data={num_data} is smaller than the number of ranks ({world})")
    mine = order[rank * per_rank : (rank + 1) * per_rank]
    return list(torch.split(mine, batch_size))


class Averager:
    """Averages gradients and the loss over the ranks in one ``all_reduce`` per step.

    The flat buffer holds every gradient, then the loss, then one slot per rank that is 1 when
    that rank's step raised: so a failure reaches every rank in the same collective that would
    otherwise wait for it.
    """

    def __init__(self, group: Group, params: list[torch.Tensor]) -> None:
        self.group, self.params = group, params
        self.sizes = [p.numel() for p in params]
        device, dtype = params[0].device, params[0].dtype
        self.buffer = torch.zeros(
            sum(self.sizes) + 1 + group.world_size, dtype=dtype, device=device
        )

    def __call__(self, loss: float, failed: bool) -> float:
        """Average the gradients (in place) and the loss; the mean loss.

        Raises :class:`RankFailed` when another rank's step raised (``failed``: this one did).
        """
        n = sum(self.sizes)
        buf = self.buffer
        buf.zero_()
        if not failed:
            offset = 0
            for p, size in zip(self.params, self.sizes):
                if p.grad is not None:
                    buf[offset : offset + size].copy_(p.grad.reshape(-1))
                offset += size
            buf[n] = loss
        buf[n + 1 + self.group.rank] = 1.0 if failed else 0.0
        dist.all_reduce(buf)
        failed_ranks = [int(r) for r in torch.nonzero(buf[n + 1 :]).flatten().tolist()]
        if failed_ranks:
            if failed:
                return float("nan")
            raise RankFailed(
                f"rank(s) {', '.join(map(str, failed_ranks))} raised in this step (their own "
                "error is in their output); this rank stops too"
            )
        buf[: n + 1].div_(self.group.world_size)
        offset = 0
        for p, size in zip(self.params, self.sizes):
            grad = buf[offset : offset + size].view_as(p)
            if p.grad is None:
                p.grad = grad.clone()
            else:
                p.grad.copy_(grad)
            offset += size
        return float(buf[n])


def broadcast_parameters(params: list[torch.Tensor]) -> None:
    """Copy rank 0's parameter values to every rank (in place)."""
    with torch.no_grad():
        for p in params:
            dist.broadcast(p.data, src=0)


def all_equal(value: torch.Tensor) -> bool:
    """Whether ``value`` is the same on every rank (for tests and users' own checks)."""
    v = value.detach().reshape(-1).to(torch.float64)
    lo, hi = v.clone(), v.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    return bool(torch.equal(lo, hi))


def gather_objects(obj) -> list | None:
    """Every rank's ``obj`` on rank 0 (a list in rank order); ``None`` on the other ranks."""
    rank, world = rank_and_world()
    out = [None] * world if rank == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out
