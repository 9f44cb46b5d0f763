"""Fit a flow posterior data-parallel over several processes: a logistic regression on 10^6 rows.

Run it on two CPU processes (gloo), or unchanged on GPUs (NCCL, one process per GPU)::

    torchrun --nproc_per_node=2 examples/distributed.py
    torchrun --nproc_per_node=4 examples/distributed.py --device cuda

or as a plain script (one process, no torch.distributed). Every rank draws its minibatch from its
own block of the rows (``pyro_nf.distributed.minibatch``); ``pyro.plate(..., subsample=idx)``
scales the likelihood to all the rows, and ``fit(..., distributed=True)`` averages the gradients
over the ranks. Rank 0 prints the throughput and writes the loss curve (CSV and PNG) to ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import os

import pyro
import pyro.distributions as dist
import torch

import pyro_nf
import pyro_nf.distributed as pd


def make_data(rows: int, features: int, device: str):
    """A logistic regression data set, the same on every rank (generated from a fixed seed)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, features, generator=g)
    w_true = torch.linspace(-1.0, 1.0, features)
    y = torch.bernoulli(torch.sigmoid(x @ w_true), generator=g)
    return x.to(device), y.to(device)


def model(x, y, batch_size=None):
    """Logistic regression; each call sees ``batch_size`` rows of this rank's block (all rows
    when ``batch_size`` is None, as for diagnostics)."""
    features = x.shape[1]
    scale = pyro.sample("scale", dist.HalfNormal(torch.ones((), device=x.device)))
    w = pyro.sample("w", dist.Normal(torch.zeros(features, device=x.device), scale).to_event(1))
    b = pyro.sample("b", dist.Normal(torch.zeros((), device=x.device), 1.0))
    idx = None if batch_size is None else pd.minibatch(len(x), batch_size, device=x.device)
    with pyro.plate("data", len(x), subsample=idx) as rows:
        logits = (x[rows] * w).sum(-1) + b
        pyro.sample("y", dist.Bernoulli(logits=logits), obs=y[rows])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--features", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=1000, help="rows per rank per step")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="examples/output")
    args = parser.parse_args(argv)

    distributed = pd.is_launched()
    if distributed and args.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    x, y = make_data(args.rows, args.features, args.device)
    guide = pyro_nf.AutoIAFFlow(model, num_transforms=2)
    result = pyro_nf.fit(
        model,
        guide,
        x,
        y,
        args.batch_size,
        num_steps=args.steps,
        lr=0.005,
        seed=0,
        distributed=distributed,
    )
    rank, world = pd.rank_and_world()
    if rank != 0:
        return result
    rows_per_second = args.batch_size * world / result.seconds_per_step
    print(
        f"{world} process(es): {1 / result.seconds_per_step:.1f} steps/s, "
        f"{rows_per_second:,.0f} rows/s; final loss (mean of the last 100 steps) "
        f"{result.losses[-100:].mean():.1f}"
    )
    median = guide.median()
    print("posterior median of w:", [round(v, 2) for v in median["w"].tolist()])
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"losses_{world}.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", "loss"])
        writer.writerows(enumerate(result.losses.tolist()))
    ax = pyro_nf.plot_losses(result.losses, label=f"{world} process(es)")
    ax.figure.savefig(os.path.join(args.out, f"losses_{world}.png"), dpi=100)
    return result


if __name__ == "__main__":
    main()
