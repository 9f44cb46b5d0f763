"""One rank of the distributed-fit checks; run by tests/test_distributed.py as

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/distributed_worker.py OUT

Every scenario runs on every rank, in order, and each rank writes what it saw to
``OUT/rank<r>.json``; the tests read those files and assert.
"""

from __future__ import annotations

import json
import os
import sys
import time

import pyro
import pyro.distributions as dist
import torch
import torch.distributed as tdist

import pyro_nf
import pyro_nf.distributed as pd

N, D = 512, 3


def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=g)
    y = torch.bernoulli(torch.sigmoid(x @ torch.tensor([1.0, -2.0, 0.5])), generator=g)
    return x, y


def model(x, y, idx=None, fail_at=None):
    """Logistic regression; ``idx`` the global rows this rank sees (all rows when None)."""
    w = pyro.sample("w", dist.Normal(torch.zeros(D), 1.0).to_event(1))
    if fail_at is not None:
        fail_at[0] -= 1
        if fail_at[0] == 0:
            raise ValueError("this rank's model fails on purpose")
    idx = torch.arange(len(x)) if idx is None else idx
    with pyro.plate("data", len(x), subsample=idx):
        logits = (x[idx] * w).sum(-1)  # broadcasts over a batch of w (unlike x @ w)
        pyro.sample("y", dist.Bernoulli(logits=logits), obs=y[idx])


def my_rows(n=N):
    start, stop = pd.local_range(n)
    return torch.arange(start, stop)


def params():
    return {k: v.detach().clone() for k, v in pyro.get_param_store().items()}


def identical(out):
    """A fit on both ranks, each with its own block: the parameters end identical."""
    x, y = data()
    pyro.clear_param_store()
    guide = pyro_nf.AutoIAFFlow(model, num_transforms=2)
    result = pyro_nf.fit(
        model, guide, x, y, my_rows(), num_steps=30, lr=0.01, seed=1, distributed=True
    )
    pyro.set_rng_seed(11)  # the same draws on every rank: the same answer
    report = pyro_nf.diagnose(model, guide, x, y, num_samples=200)
    out["identical"] = {
        "losses": result.losses.tolist(),
        "all_equal": all(pd.all_equal(v) for v in params().values()),
        "num_params": len(params()),
        "k_hat": float(report.k_hat),
    }


def laplace_shards(out):
    """Each rank's model sees only its own rows (no subsampled plate), so each rank's set-up finds
    the Laplace start of its own shard: the fit must train rank 0's, on every rank."""
    x, y = data()
    rows = my_rows()
    pyro.clear_param_store()
    guide = pyro_nf.AutoPlanarFlow(model, num_transforms=1)
    pyro_nf.fit(model, guide, x[rows], y[rows], num_steps=5, seed=2, progress=False,
                distributed=True)  # fmt: skip
    tril = guide.flow.precond_tril
    out["laplace_shards"] = {
        "used": bool(guide.laplace_info["used"]),
        "tril_equal": tril is not None and pd.all_equal(tril),
        "params_equal": all(pd.all_equal(v) for v in params().values()),
    }


class VAE(torch.nn.Module):
    """A tiny VAE with a flow posterior: encoder and decoder registered with pyro.module."""

    def __init__(self, x_dim=6, z_dim=2, hidden=8):
        super().__init__()
        self.encoder = torch.nn.Sequential(torch.nn.Linear(x_dim, hidden), torch.nn.Tanh())
        self.decoder = torch.nn.Linear(z_dim, x_dim)
        self.flow = pyro_nf.Flow(z_dim, "iaf", 2, context_dim=hidden)
        self.z_dim = z_dim

    def model(self, x, idx):
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", len(x), subsample=idx):
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([self.z_dim]).to_event(1))
            pyro.sample("x", dist.Normal(self.decoder(z), 0.5).to_event(1), obs=x[idx])

    def guide(self, x, idx):
        pyro.module("encoder", self.encoder)
        with pyro.plate("data", len(x), subsample=idx):
            pyro.sample("z", self.flow(self.encoder(x[idx])))


def vae(out):
    """The VAE use: a user-written guide with a Flow, trained on both ranks' blocks."""
    pyro.clear_param_store()
    torch.manual_seed(0)
    x = torch.randn(64, 6)
    net = VAE()
    result = pyro_nf.fit(
        net.model,
        net.guide,
        x,
        my_rows(len(x)),
        num_steps=15,
        lr=0.01,
        seed=2,
        progress=False,
        distributed=True,
    )
    out["vae"] = {
        "losses": result.losses.tolist(),
        "all_equal": all(pd.all_equal(v) for v in params().values()),
        "names": sorted(params()),
    }


def one_step(out):
    """With every rank's noise the same, one distributed step on the blocks equals one
    single-process step on all the rows."""
    x, y = data()
    original = pd.rank_seed
    pd.rank_seed = lambda seed, rank: seed  # the same Monte Carlo noise on every rank
    try:
        pyro.clear_param_store()
        # the plain start: the single-process run's model (all rows, no subsampled plate)
        # would get the Laplace start, the distributed one's (subsampled) would not
        guide = pyro_nf.AutoPlanarFlow(model, num_transforms=2, precondition=None)
        kw = dict(num_steps=1, lr=0.1, optimizer="sgd", seed=3, progress=False)
        pyro_nf.fit(model, guide, x, y, my_rows(), distributed=True, **kw)
        after_distributed = params()
    finally:
        pd.rank_seed = original
    pyro.clear_param_store()
    guide = pyro_nf.AutoPlanarFlow(model, num_transforms=2, precondition=None)
    pyro_nf.fit(model, guide, x, y, None, **kw)
    after_single = params()
    out["one_step"] = {
        "max_abs_diff": max(
            float((after_distributed[k] - after_single[k]).abs().max()) for k in after_single
        ),
        "moved": max(float(v.abs().max()) for v in after_single.values()),
    }


def resume(out, folder):
    """Interrupted at step 10 and resumed to 20 on both ranks: the same losses as 20 at once."""
    x, y = data()
    path = os.path.join(folder, "ckpt.pt")
    kw = dict(lr=0.01, seed=5, progress=False, distributed=True)

    def fresh():
        pyro.clear_param_store()
        return pyro_nf.AutoIAFFlow(model, num_transforms=1)

    straight = pyro_nf.fit(model, fresh(), x, y, my_rows(), num_steps=20, **kw)
    pyro_nf.fit(model, fresh(), x, y, my_rows(), num_steps=10, checkpoint=path, **kw)
    tdist.barrier()
    resumed = pyro_nf.fit(
        model, fresh(), x, y, my_rows(), num_steps=20, checkpoint=path, resume=True, **kw
    )
    out["resume"] = {"straight": straight.losses.tolist(), "resumed": resumed.losses.tolist()}


def failure(out):
    """Rank 1's model raises at its 6th call: every rank stops at once with a FitError."""
    x, y = data()
    pyro.clear_param_store()
    # the plain start: the Laplace start's mode search would make the 6th call during set-up
    guide = pyro_nf.AutoPlanarFlow(model, num_transforms=1, precondition=None)
    fail_at = [6] if pd.rank_and_world()[0] == 1 else None
    t0 = time.perf_counter()
    try:
        pyro_nf.fit(
            model, guide, x, y, my_rows(), fail_at, num_steps=20, progress=False, distributed=True
        )
        out["failure"] = {"raised": None}
    except pyro_nf.FitError as e:
        out["failure"] = {
            "raised": type(e).__name__,
            "cause": type(e.__cause__).__name__,
            "message": str(e),
            "steps_done": int(e.result.num_steps),
            "seconds": time.perf_counter() - t0,
        }


def main(folder: str) -> None:
    torch.set_num_threads(1)
    tdist.init_process_group("gloo", timeout=__import__("datetime").timedelta(seconds=60))
    rank = tdist.get_rank()
    out = {"rank": rank, "world_size": tdist.get_world_size()}
    for scenario in (identical, laplace_shards, vae, one_step, failure):
        scenario(out)
    resume(out, folder)
    with open(os.path.join(folder, f"rank{rank}.json"), "w") as f:
        json.dump(out, f)
    tdist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
