"""AutoIAFFlow's defaults from D = 1 to D = 10,000 latents, against AutoPlanarFlow and AutoNormal.

Run::

    python benchmarks/iaf_scaling.py            # full run, writes benchmarks/results/iaf_scaling.md
    python benchmarks/iaf_scaling.py --quick    # a few seconds (the test's configuration)

Model: a product of independent Normals with varied scales and a known posterior,

.. math::
    z_i \\sim \\mathcal N(0, 1), \\qquad y_i \\mid z_i \\sim \\mathcal N(z_i, \\sigma_i^2),
    \\qquad \\sigma_i \\text{ log-spaced in } [0.1, 10],

with ``y`` drawn from the model (seed 0). The posterior of :math:`z_i` is Normal with standard
deviation :math:`\\sigma_i / \\sqrt{1 + \\sigma_i^2}` (0.0995 to 0.995), and the exact evidence is
:math:`\\log p(y) = \\sum_i \\log \\mathcal N(y_i; 0, 1 + \\sigma_i^2)`: the negative ELBO is at least
:math:`-\\log p(y)`, with equality at the exact posterior, which every guide here can represent.
So the *gap* (loss + log p(y)) is the KL divergence from the guide to the posterior, estimated.

Each guide is built with its defaults and fitted by :func:`pyro_nf.fit` with its defaults
(Adam, ``lr=0.01``, one particle) for ``--steps`` steps, each fit in a fresh child process (so
that its peak memory is its own). Reported per fit:

* parameters: the number of numbers the optimizer trains;
* steps to converge: the first step at which the mean of the last ``--window`` losses is within
  ``--tol`` nats per latent of the optimum (``--tol * D`` nats in all), or ``>`` the budget;
* ms/step: time per step on one torch thread, set-up excluded: after the fit, the same guide is
  fitted on for ``--timing-steps / 5`` and for ``--timing-steps`` steps, and the difference of the
  two times is divided by the difference of their steps;
* peak RSS: the child's peak resident memory above its resident memory before the guide is built;
* final gap: the mean gap over the last ``--window`` steps, in nats and per latent;
* worst gap: the largest running-mean gap (a divergence shows here even when a fit recovers).

Comparison rows, for ``D <= --extra-max-dim``: ``AutoIAFFlow (old defaults)`` is the guide as
pyro_nf 0.1.0 built it (MADE width ``max(2D, 16)``, plain masked layers: ``fan_in_ref=None``), to
show what the capped width and scaled steps fix; ``AutoIAFFlow (0.2 defaults)`` is the guide as
pyro_nf 0.2 built it (2 layers, MADE units scaled from 64 inputs on: ``fan_in_ref=64``) and
``AutoIAFFlow (K=3, fan_in_ref=64)`` today's depth with 0.2's step reference, to show what the
autoguides' reference of 16 fixes; ``AutoSplineFlow`` with its defaults and with
``fan_in_ref=64``, the same comparison for the spline guide.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import os
import platform
import resource
import subprocess
import sys
import time
from datetime import datetime, timezone

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:  # the checkout this script belongs to, not another installed copy
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import pyro  # noqa: E402
import pyro.distributions as dist  # noqa: E402
import torch  # noqa: E402
from _machine import cpu_name  # noqa: E402  (benchmarks/_machine.py)
from pyro.infer.autoguide import AutoNormal  # noqa: E402

import pyro_nf  # noqa: E402
from pyro_nf.guides import AutoFlow  # noqa: E402

GUIDES = ("AutoIAFFlow", "AutoPlanarFlow", "AutoNormal")
#: comparison rows, run up to ``--extra-max-dim`` only
EXTRA = (
    "AutoIAFFlow (old defaults)",
    "AutoIAFFlow (0.2 defaults)",
    "AutoIAFFlow (K=3, fan_in_ref=64)",
    "AutoSplineFlow",
    "AutoSplineFlow (fan_in_ref=64)",
)


def make_model(dim: int, seed: int = 0):
    """The model, its data and the exact ``-log p(y)`` (in float64)."""
    gen = torch.Generator().manual_seed(seed)
    sigma = torch.logspace(-1, 1, dim, dtype=torch.float64) if dim > 1 else torch.ones(1).double()
    z = torch.randn(dim, generator=gen, dtype=torch.float64)
    y = z + sigma * torch.randn(dim, generator=gen, dtype=torch.float64)
    optimum = -float(dist.Normal(0.0, (1 + sigma**2).sqrt()).log_prob(y).sum())
    sigma32, y32 = sigma.float(), y.float()

    def model():
        z = pyro.sample("z", dist.Normal(torch.zeros(dim), 1.0).to_event(1))
        pyro.sample("y", dist.Normal(z, sigma32).to_event(1), obs=y32)

    return model, optimum


def make_guide(name: str, model, dim: int):
    if name == "AutoIAFFlow":
        return pyro_nf.AutoIAFFlow(model)
    if name == "AutoPlanarFlow":
        return pyro_nf.AutoPlanarFlow(model)
    if name == "AutoNormal":
        return AutoNormal(model)
    if name == "AutoIAFFlow (0.2 defaults)":
        return pyro_nf.AutoIAFFlow(model, num_transforms=2, fan_in_ref=64)
    if name == "AutoIAFFlow (K=3, fan_in_ref=64)":
        return pyro_nf.AutoIAFFlow(model, num_transforms=3, fan_in_ref=64)
    if name == "AutoSplineFlow":
        return pyro_nf.AutoSplineFlow(model)
    if name == "AutoSplineFlow (fan_in_ref=64)":
        return pyro_nf.AutoSplineFlow(model, fan_in_ref=64)
    if name == "AutoIAFFlow (old defaults)":
        return AutoFlow(
            model, transform="iaf", num_transforms=2, hidden_dims=(max(2 * dim, 16),),
            fan_in_ref=None,
        )  # fmt: skip
    raise ValueError(f"unknown guide {name!r}; choose from {GUIDES + EXTRA}")


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def run_one(
    name: str, dim: int, steps: int, window: int, tol: float, seed: int, timing_steps: int = 50
) -> dict:
    """One fit; returns its measurements (run in a child process by :func:`main`)."""
    torch.set_num_threads(1)
    pyro.clear_param_store()
    model, optimum = make_model(dim)
    rss0 = _rss_mb()
    guide = make_guide(name, model, dim)
    status, losses = "ok", []
    t0 = time.perf_counter()
    try:
        result = pyro_nf.fit(model, guide, num_steps=steps, progress=False, seed=seed)
        losses = list(result.losses)
    except pyro_nf.FitError as e:  # too many non-finite steps in a row
        status = f"FitError: {str(e).splitlines()[0][:80]}"
        losses = []
    seconds = time.perf_counter() - t0
    params = sum(p.numel() for p in pyro.get_param_store().values())
    # Time per step without set-up: two more short fits from where this one ended.
    timed = []
    for n in (timing_steps // 5, timing_steps):
        t = time.perf_counter()
        try:
            pyro_nf.fit(model, guide, num_steps=n, progress=False, seed=seed)
        except pyro_nf.FitError:
            break
        timed.append((n, time.perf_counter() - t))
    per_step = (
        (timed[1][1] - timed[0][1]) / (timed[1][0] - timed[0][0]) if len(timed) == 2 else math.nan
    )
    gap = np.asarray(losses, dtype=float) + (-optimum)  # loss - (-log p(y))
    gap = gap[np.isfinite(gap)] if len(gap) else gap
    w = min(window, len(gap)) if len(gap) else 0
    running = np.convolve(gap, np.ones(w) / w, mode="valid") if w else np.array([np.nan])
    hits = np.nonzero(running <= tol * dim)[0]
    return {
        "guide": name, "dim": dim, "steps": steps, "steps_taken": len(losses), "params": params,
        "ms_per_step": 1000 * per_step, "fit_seconds": seconds,
        "peak_rss_mb": _peak_rss_mb() - rss0,
        "steps_to_converge": int(hits[0]) + w if len(hits) else None,
        "start_gap": float(gap[0]) if len(gap) else math.nan,
        "final_gap": float(running[-1]), "worst_gap": float(np.max(running)),
        "optimum": optimum, "status": status,
    }  # fmt: skip


def _child(conn, *args) -> None:
    try:
        conn.send(run_one(*args))
    except Exception as e:  # noqa: BLE001 - reported in the table, the run goes on
        conn.send({"guide": args[0], "dim": args[1], "status": f"{type(e).__name__}: {e}"})
    conn.close()


def run_isolated(*args) -> dict:
    """:func:`run_one` in a fresh child process (fork where there is one)."""
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(child, *args))
    proc.start()
    child.close()
    try:
        out = parent.recv()
    except EOFError:  # killed (out of memory?)
        out = {"guide": args[0], "dim": args[1], "status": "child process died"}
    proc.join()
    return out


def _fmt(x, spec: str) -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def table(rows: list[dict]) -> str:
    head = (
        "| D | guide | parameters | steps to converge | ms/step | peak RSS (MB) | final gap (nats) "
        "| final gap per latent | worst gap (nats) | status |\n"
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---|"
    )
    lines = [head]
    for r in rows:
        conv = r.get("steps_to_converge")
        conv = f"> {r['steps_taken']}" if conv is None and "steps_taken" in r else _fmt(conv, "d")
        lines.append(
            f"| {r['dim']} | {r['guide']} | {_fmt(r.get('params'), ',d')} | {conv} "
            f"| {_fmt(r.get('ms_per_step'), '.1f')} | {_fmt(r.get('peak_rss_mb'), '.0f')} "
            f"| {_fmt(r.get('final_gap'), '.2f')} "
            f"| {_fmt(r.get('final_gap', math.nan) / r['dim'], '.4f')} "
            f"| {_fmt(r.get('worst_gap'), '.4g')} | {r.get('status', '')} |"
        )
    return "\n".join(lines)


def _git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()  # fmt: skip
        return sha + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def summary(rows: list[dict], steps: int, tol: float) -> list[str]:
    """Plain sentences computed from the rows."""
    out = []
    for name in GUIDES + EXTRA:
        mine = [r for r in rows if r["guide"] == name and "final_gap" in r]
        if not mine:
            continue
        conv = [r["dim"] for r in mine if r.get("steps_to_converge") is not None]
        above = [r["dim"] for r in mine if not r["final_gap"] <= tol * r["dim"]]
        bad = [r["dim"] for r in mine if r.get("worst_gap", 0) > 2 * max(r.get("start_gap", 0), 1)]
        text = f"- {name}: within {tol} nats per latent at some step for D = " + (
            ", ".join(map(str, conv)) if conv else "none"
        )
        text += f" (of {', '.join(str(r['dim']) for r in mine)})"
        if above:
            text += f"; final gap above it for D = {', '.join(map(str, above))}"
        if bad:
            text += f"; running-mean gap above twice its start for D = {', '.join(map(str, bad))}"
        out.append(text + ".")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[1, 10, 100, 1000, 10000])
    parser.add_argument("--guides", nargs="+", default=list(GUIDES + EXTRA), choices=GUIDES + EXTRA)
    parser.add_argument("--steps", type=int, default=1500, help="steps per fit")
    parser.add_argument(
        "--extra-max-dim", type=int, default=1000, help="largest D of the comparison rows"
    )
    parser.add_argument("--window", type=int, default=50, help="running-mean window (steps)")
    parser.add_argument(
        "--tol", type=float, default=0.1, help="nats per latent counted as converged"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timing-steps", type=int, default=50, help="steps of the timing fit")
    parser.add_argument("--out", default=os.path.join(HERE, "results"), help="folder of the report")
    parser.add_argument("--name", default="iaf_scaling", help="report file name, without .md")
    parser.add_argument(
        "--quick", action="store_true", help="D in {1, 10}, 40 steps (for the test)"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.dims, args.steps, args.window, args.timing_steps = [1, 10], 40, 10, 10
        if args.name == "iaf_scaling":
            args.name = "iaf_scaling_quick"
    torch.set_num_threads(1)
    commit = _git_commit()  # the code that runs, before anything can change it

    rows, t_start = [], time.perf_counter()
    for dim in args.dims:
        for name in args.guides:
            if name in EXTRA and dim > args.extra_max_dim:
                continue
            row = run_isolated(
                name, dim, args.steps, args.window, args.tol, args.seed, args.timing_steps
            )
            rows.append(row)
            print(table([row]).splitlines()[-1], flush=True)
    minutes = (time.perf_counter() - t_start) / 60

    text = table(rows)
    print()
    print(text)
    load = " ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    command = "python benchmarks/iaf_scaling.py " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    report = [
        "# AutoIAFFlow's defaults against the latent dimension D",
        "",
        f"Written by `{command.strip()}` ({__doc__.splitlines()[0]}); the model and every "
        "column are defined in the script's docstring.",
        "",
        f"- machine: {cpu_name()}, {os.cpu_count()} cores, {platform.system()}; one torch thread; "
        f"load average at the end {load}",
        f"- torch {torch.__version__}, pyro {pyro.__version__}, pyro_nf {pyro_nf.__version__}, "
        f"commit {commit}",
        f"- {datetime.now(timezone.utc):%Y-%m-%d}, {minutes:.1f} minutes in all",
        f"- pyro_nf.fit defaults (Adam, lr 0.01, one particle), seed {args.seed}; {args.steps} steps "
        f"per fit; comparison rows for D <= {args.extra_max_dim}; converged = running mean of "
        f"the last {args.window} losses within {args.tol} nats per latent of -log p(y)",
        "",
        text,
        "",
        *summary(rows, args.steps, args.tol),
        "",
    ]
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"{args.name}.md")
    with open(path, "w") as fh:
        fh.write("\n".join(report))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
