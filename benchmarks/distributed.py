"""Throughput of ``fit(..., distributed=True)`` with 1, 2, ... processes, and their loss curves.

Runs ``examples/distributed.py`` (logistic regression, 10^6 rows, AutoIAFFlow, a minibatch of
``--batch-size`` rows per rank per step) under ``torchrun`` once per process count, every process
on one torch thread, and writes a Markdown table and one plot of the loss curves::

    python benchmarks/distributed.py --procs 1 2 --results benchmarks/results/distributed.md

Steps per second is the fit's own ``seconds_per_step`` (set-up excluded); rows per second is the
rows all the ranks see per step times steps per second. With the same rows per rank, two ranks see
twice the data per step: the gradient is an average over twice as many rows.
"""

from __future__ import annotations

import argparse
import csv
import os
import pathlib
import platform
import re
import subprocess
import sys
import tempfile

import numpy as np
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from _machine import cpu_name  # noqa: E402  (benchmarks/_machine.py)


def run(procs: int, args, out: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        env.pop(var, None)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={procs}",
        str(ROOT / "examples" / "distributed.py"),
        f"--rows={args.rows}",
        f"--batch-size={args.batch_size}",
        f"--steps={args.steps}",
        f"--device={args.device}",
        f"--out={out}",
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{procs} process(es) failed:\n{done.stderr[-3000:]}")
    line = next(ln for ln in done.stdout.splitlines() if "steps/s" in ln)
    steps, rows = re.search(r"([\d.]+) steps/s, ([\d,]+) rows/s", line).groups()
    with open(os.path.join(out, f"losses_{procs}.csv")) as f:
        losses = np.array([float(r["loss"]) for r in csv.DictReader(f)])
    return {
        "procs": procs,
        "steps": float(steps),
        "rows": float(rows.replace(",", "")),
        "losses": losses,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--results", default="benchmarks/results/distributed_quick.md")
    parser.add_argument(
        "--figure", default=None, help="PNG of the loss curves (default: next to --results)"
    )
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as out:
        runs = [run(p, args, out) for p in args.procs]

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure = args.figure or str(pathlib.Path(args.results).with_suffix(".png"))
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for r in runs:
        window = max(len(r["losses"]) // 50, 1)
        mean = np.convolve(r["losses"], np.ones(window) / window, mode="valid")
        ax.plot(np.arange(len(mean)) + window - 1, mean, label=f"{r['procs']} process(es)")
    ax.set_xlabel("step")
    ax.set_ylabel(f"loss (-ELBO), running mean of {window}")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(figure, dpi=100)

    base = runs[0]
    lines = [
        "# Distributed fit: throughput with 1, 2, ... processes",
        "",
        f"Command: `python benchmarks/distributed.py --procs {' '.join(map(str, args.procs))} "
        f"--rows {args.rows} --batch-size {args.batch_size} --steps {args.steps} "
        f"--device {args.device} --results {args.results}`",
        "",
        f"Machine: {cpu_name()}, {os.cpu_count()} cores; torch {torch.__version__}; Python {platform.python_version()}; one torch thread per "
        "process; gloo on CPU.",
        "",
        f"Model: `examples/distributed.py`, logistic regression on {args.rows:,} generated rows "
        f"(10 features), `AutoIAFFlow(num_transforms=2)`, {args.batch_size} rows per rank per step, "
        f"{args.steps} steps, lr 0.005.",
        "",
        "| processes | steps/s | rows/s | speed-up in rows/s | loss, mean of the last 10% of steps |",
        "|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        tail = r["losses"][-max(len(r["losses"]) // 10, 1) :].mean()
        lines.append(
            f"| {r['procs']} | {r['steps']:.1f} | {r['rows']:,.0f} | "
            f"{r['rows'] / base['rows']:.2f}x | {tail:,.1f} |"
        )
    lines += [
        "",
        f"![loss curves]({pathlib.Path(figure).name})",
        "",
        "The losses are the mean over the ranks of each rank's unbiased estimate of the full-data "
        "loss; with more ranks each step averages more rows, so the curve is the same to Monte "
        "Carlo noise (less noise with more ranks).",
        "",
    ]
    pathlib.Path(args.results).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
