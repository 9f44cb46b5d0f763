"""``AutoHierarchicalFlow`` against Pyro's ``AutoNormal`` on models with subsampled plates.

Three parts (``--part a|b|c``, default all); each writes ``results/hierarchical_PART.json`` and
the report ``results/hierarchical.md`` is rebuilt from the JSON files there.

(a) Conjugate hierarchical Gaussian, exact posterior known:
    :math:`\\mu \\sim \\mathcal N(0, 10^2)`, :math:`z_i \\sim \\mathcal N(\\mu, \\tau^2)`,
    :math:`x_{ij} \\sim \\mathcal N(z_i, \\sigma^2)`, :math:`\\tau = \\sigma = 1` known,
    :math:`N = 10^5` groups of :math:`n = 5` observations, minibatches of 1000 groups. With
    :math:`s^2 = \\tau^2 + \\sigma^2 / n`, :math:`\\mu \\mid x \\sim \\mathcal N(m, v)` with
    :math:`v^{-1} = 10^{-2} + N / s^2`, :math:`m = v \\sum_i \\bar x_i / s^2`, and
    :math:`z_i \\mid \\mu, x \\sim \\mathcal N(w(\\mu / \\tau^2 + n \\bar x_i / \\sigma^2), w)`,
    :math:`w^{-1} = \\tau^{-2} + n \\sigma^{-2}`, so :math:`z_i \\mid x` has mean
    :math:`w(m / \\tau^2 + n \\bar x_i / \\sigma^2)` and variance :math:`w + (w / \\tau^2)^2 v`.
    Posterior means and sds of :math:`\\mu` and of 20 locals against these, and the fit's wall
    time, for the amortized guide, the per-datapoint guide and ``AutoNormal`` (same steps,
    learning rate, optimizer, seed).
(b) posteriordb's ``eight_schools-eight_schools_noncentered`` with the school plate subsampled
    (4 of 8 schools per step; each school's ``sigma`` enters the context as a
    ``pyro.deterministic`` covariate): standardized W1 of the marginals of ``mu``, ``tau`` and
    ``theta[1..8]`` against the NUTS reference draws, as in ``run_posteriordb.py``, 3 seeds.
(c) Time per step and memory at minibatch 1000 for :math:`N \\in \\{10^3, 10^4, 10^5, 10^6\\}`
    (model (a)), each configuration in a fresh process: parameters, peak resident memory
    (``ru_maxrss``) and the median time per step.

Run from the repository root, e.g.
``nice python benchmarks/hierarchical.py --posteriordb ../shared/posteriordb/posterior_database``
(``--quick`` for a short check of the harness, not for the results file).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

RESULTS = HERE / "results"
GUIDES = ("AutoHierarchicalFlow", "AutoHierarchicalFlow[per-datapoint]", "AutoNormal")


def _setup(threads: int = 1) -> None:
    import torch

    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------------
# the conjugate model
# ----------------------------------------------------------------------------------------------
TAU, SIGMA, PRIOR_SD = 1.0, 1.0, 10.0


def conjugate_data(num_groups: int, n: int, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    z = 2.0 + TAU * torch.randn(num_groups, generator=g)
    return z[:, None] + SIGMA * torch.randn(num_groups, n, generator=g)


def conjugate_model(x, batch=1000, subsample=None):
    import pyro
    import pyro.distributions as dist

    mu = pyro.sample("mu", dist.Normal(x.new_zeros(()), PRIOR_SD))
    size = None if subsample is not None else batch
    with pyro.plate("groups", len(x), subsample_size=size, subsample=subsample) as idx:
        z = pyro.sample("z", dist.Normal(mu, TAU))
        pyro.sample("x", dist.Normal(z.unsqueeze(-1), SIGMA).to_event(1), obs=x[idx])


def exact_posterior(x):
    n = x.shape[1]
    xbar = x.double().mean(1)
    s2 = TAU**2 + SIGMA**2 / n
    v = 1.0 / (1.0 / PRIOR_SD**2 + len(x) / s2)
    m = v * float(xbar.sum()) / s2
    w = 1.0 / (1.0 / TAU**2 + n / SIGMA**2)
    z_mean = w * (m / TAU**2 + n * xbar / SIGMA**2)
    z_sd = math.sqrt(w + (w / TAU**2) ** 2 * v)
    return m, math.sqrt(v), z_mean, z_sd


def make_guide(name: str, model, **options):
    from pyro.infer.autoguide import AutoNormal

    import pyro_nf

    if name == "AutoNormal":
        return AutoNormal(model)
    return pyro_nf.AutoHierarchicalFlow(model, amortized=name == "AutoHierarchicalFlow", **options)


#: the learning rate decays geometrically to this fraction of ``--lr`` over the fit
FINAL_LR_FACTOR = 0.01


def fit(model, guide, args, kwargs, steps: int, lr: float) -> float:
    """``steps`` of ``SVI`` + ``Trace_ELBO`` with ``pyro.optim.ClippedAdam`` (its default
    gradient clipping at norm 10), the learning rate decaying from ``lr`` to
    ``FINAL_LR_FACTOR * lr``; returns the CPU seconds."""
    import pyro
    from pyro.infer import SVI, Trace_ELBO
    from pyro.optim import ClippedAdam

    optim = ClippedAdam({"lr": lr, "lrd": FINAL_LR_FACTOR ** (1 / steps)})
    svi = SVI(model, guide, optim, Trace_ELBO())
    start = time.process_time()  # CPU time of this one-thread process: robust to a shared machine
    for _ in range(steps):
        svi.step(*args, **kwargs)
    del pyro
    return time.process_time() - start


def conjugate_moments(name, guide, x, idx, draws: int):
    """Posterior mean and sd of mu and of the locals ``idx`` under a fitted guide."""
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        if name == "AutoNormal":
            mu = (guide.locs.mu.item(), guide.scales.mu.item())
            return mu, guide.locs.z[idx], guide.scales.z[idx]
        if name == "AutoHierarchicalFlow":
            samples = [guide(x, subsample=idx) for _ in range(draws)]
            mus = torch.stack([s["mu"] for s in samples])
            zs = torch.stack([s["z"] for s in samples])
            return (mus.mean().item(), mus.std().item()), zs.mean(0), zs.std(0)
        mus = torch.stack([guide(x, batch=1)["mu"] for _ in range(draws)])
        part = guide.nets["local[groups]"].normal
        loc, scale = part.loc[idx, 0], F.softplus(part.raw_scale[idx, 0])
        return (mus.mean().item(), mus.std().item()), loc, scale


def part_a(args) -> dict:
    import pyro
    import torch

    _setup()
    N, n, B = (2000, 5, 100) if args.quick else (100_000, 5, 1000)
    steps = 300 if args.quick else args.steps
    x = conjugate_data(N, n, seed=0)
    m, s, z_mean, z_sd = exact_posterior(x)
    idx = torch.arange(0, N, N // 20)[:20]
    rows = []
    for name in args.guides:
        for seed in args.seeds:
            pyro.clear_param_store()
            pyro.set_rng_seed(seed)
            guide = make_guide(name, conjugate_model)
            seconds = fit(conjugate_model, guide, (x,), {"batch": B}, steps, args.lr)
            (mu_m, mu_s), zm, zs = conjugate_moments(name, guide, x, idx, args.draws)
            zm, zs = zm.double(), zs.double()
            rows.append(
                {
                    "guide": name,
                    "seed": seed,
                    "seconds": seconds,
                    "mu_mean_rel": abs(mu_m - m) / abs(m),
                    "mu_sd_rel": abs(mu_s / s - 1),
                    "z_mean_rel_max": float(((zm - z_mean[idx]).abs() / z_mean[idx].abs()).max()),
                    "z_mean_std_max": float(((zm - z_mean[idx]).abs() / z_sd).max()),
                    "z_sd_rel_max": float((zs / z_sd - 1).abs().max()),
                }
            )
            print(rows[-1], flush=True)
    return {
        "N": N,
        "n": n,
        "batch": B,
        "steps": steps,
        "lr": args.lr,
        "draws": args.draws,
        "exact": {"mu_mean": m, "mu_sd": s, "z_sd": z_sd},
        "rows": rows,
    }


# ----------------------------------------------------------------------------------------------
# eight schools with a subsampled school plate
# ----------------------------------------------------------------------------------------------
def schools_model(y, sigma, batch=4):
    import pyro
    import pyro.distributions as dist

    mu = pyro.sample("mu", dist.Normal(y.new_zeros(()), 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(y.new_tensor(5.0)))
    with pyro.plate("schools", len(y), subsample_size=batch) as idx:
        theta_trans = pyro.sample("theta_trans", dist.Normal(y.new_zeros(()), 1.0))
        pyro.deterministic("school_sigma", sigma[idx])  # a covariate for the locals' context
        pyro.sample("y", dist.Normal(mu + tau * theta_trans, sigma[idx]), obs=y[idx])


def schools_draws(name, guide, y, sigma, draws: int) -> dict:
    import torch

    with torch.no_grad():
        if name == "AutoNormal":
            mu = guide.locs.mu + guide.scales.mu * torch.randn(draws, dtype=y.dtype)
            tau = (guide.locs.tau + guide.scales.tau * torch.randn(draws, dtype=y.dtype)).exp()
            eps = torch.randn(draws, len(y), dtype=y.dtype)
            tt = guide.locs.theta_trans + guide.scales.theta_trans * eps
        else:
            samples = [guide(y, sigma, batch=None) for _ in range(draws)]
            mu = torch.stack([s["mu"] for s in samples])
            tau = torch.stack([s["tau"] for s in samples])
            tt = torch.stack([s["theta_trans"] for s in samples])
    theta = (mu[:, None] + tau[:, None] * tt).numpy()
    out = {"mu": mu.numpy(), "tau": tau.numpy()}
    out.update({f"theta[{j + 1}]": theta[:, j] for j in range(len(y))})
    return out


def part_b(args) -> dict:
    import pyro
    import torch

    from benchmarks.posteriors import load_posterior
    from benchmarks.run_posteriordb import _database, marginal_metrics, reference_noise_floor

    _setup()
    torch.set_default_dtype(torch.float64)
    name = "eight_schools-eight_schools_noncentered"
    _, data, raw_ref = load_posterior(_database(args.posteriordb), name)
    y, sigma = data["y"], data["sigma"]
    ref = {k: raw_ref[k] for k in ["mu", "tau"] + [f"theta[{j + 1}]" for j in range(8)]}
    steps = 500 if args.quick else args.schools_steps
    rows = []
    for guide_name in args.guides:
        for seed in args.seeds:
            pyro.clear_param_store()
            pyro.set_rng_seed(seed)
            options = {}
            if guide_name == "AutoHierarchicalFlow":
                # one local coordinate per school: the conditional affine layer is the whole
                # conditional flow (layers over one coordinate would only cost time)
                options = {"context_sites": ["y", "school_sigma"], "local_num_transforms": 0}
            guide = make_guide(guide_name, schools_model, **options)
            seconds = fit(schools_model, guide, (y, sigma), {"batch": 4}, steps, args.lr)
            pyro.set_rng_seed(1000 + seed)
            metrics = marginal_metrics(schools_draws(guide_name, guide, y, sigma, args.draws), ref)
            rows.append({"guide": guide_name, "seed": seed, "seconds": seconds, **metrics})
            print(rows[-1], flush=True)
    return {
        "posterior": name,
        "batch": 4,
        "steps": steps,
        "lr": args.lr,
        "draws": args.draws,
        "noise_floor_w1": reference_noise_floor(ref, args.draws),
        "rows": rows,
    }


# ----------------------------------------------------------------------------------------------
# time and memory per step against N
# ----------------------------------------------------------------------------------------------
def _one_scaling(queue, name: str, N: int, B: int, steps: int) -> None:
    import pyro
    import torch
    from pyro.infer import SVI, Trace_ELBO
    from pyro.optim import Adam

    _setup()
    x = conjugate_data(N, 5, seed=0)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    pyro.set_rng_seed(0)
    options = (
        {} if name == "AutoNormal" else {"local_plates": ["groups"]}
    )  # (N = B: no subsampling)
    guide = make_guide(name, conjugate_model, **options)
    svi = SVI(conjugate_model, guide, Adam({"lr": 0.01}), Trace_ELBO())
    times = []
    for i in range(steps + 5):
        start = time.process_time()
        svi.step(x, batch=B)
        if i >= 5:
            times.append(time.process_time() - start)
    params = sum(int(p.numel()) for p in pyro.get_param_store().values())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    queue.put(
        {
            "guide": name,
            "N": N,
            "ms_per_step": 1000 * float(np.median(times)),
            "params": params,
            "peak_rss_mb": peak / 1024,
            "rss_growth_mb": (peak - base) / 1024,
        }
    )
    del torch


def part_c(args) -> dict:
    sizes = (1000, 10_000) if args.quick else (1000, 10_000, 100_000, 1_000_000)
    steps = 20 if args.quick else args.scaling_steps
    ctx = mp.get_context("spawn")
    rows = []
    for N in sizes:
        for name in args.guides:
            queue = ctx.Queue()
            proc = ctx.Process(target=_one_scaling, args=(queue, name, N, 1000, steps))
            proc.start()
            rows.append(queue.get())
            proc.join()
            print(rows[-1], flush=True)
    return {"batch": 1000, "steps": steps, "rows": rows}


# ----------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------
def _machine() -> str:
    import pyro
    import torch

    from benchmarks._machine import cpu_name

    return (
        f"{cpu_name()}, {os.cpu_count()} logical CPUs shared with other jobs (times are the "
        "CPU time of one-thread processes, not wall time), 1 torch thread per process; "
        f"Python {platform.python_version()}, torch {torch.__version__}, pyro {pyro.__version__}"
    )


def _mean(values) -> str:
    values = list(values)
    m = float(np.mean(values))
    if len(values) < 2:
        return f"{m:.3g}"
    return f"{m:.3g} ± {float(np.std(values, ddof=1) / math.sqrt(len(values))):.2g}"


def write_report() -> None:
    parts = {p: RESULTS / f"hierarchical_{p}.json" for p in "abc"}
    found = {p: json.loads(f.read_text()) for p, f in parts.items() if f.exists()}
    lines = ["# AutoHierarchicalFlow against AutoNormal on subsampled hierarchical models", ""]
    lines += ["Written by `benchmarks/hierarchical.py` (see its docstring for the models).", ""]
    for p, res in found.items():
        lines += [f"Part ({p}): `{res['command']}`; machine: {res['machine']}.", ""]
    if "a" in found:
        a = found["a"]
        ex = a["exact"]
        lines += [
            f"## (a) Conjugate hierarchical Gaussian, N = {a['N']:,} groups, minibatch {a['batch']}",
            "",
            f"{a['n']} observations per group; {a['steps']} steps of `SVI` + `Trace_ELBO`, "
            f"`pyro.optim.ClippedAdam`, learning rate {a['lr']} decaying geometrically to "
            f"{a['lr'] * FINAL_LR_FACTOR:g}, for every guide; seeds "
            f"{sorted({r['seed'] for r in a['rows']})} (mean ± se over seeds). Exact posterior: "
            f"mu mean {ex['mu_mean']:.4f}, sd {ex['mu_sd']:.5f}; every local's sd "
            f"{ex['z_sd']:.4f}. Moments of the flow guides from {a['draws']} draws (so a "
            f"relative sd error of about {1 / math.sqrt(2 * a['draws']):.1%} is sampling noise); "
            "AutoNormal's and the per-datapoint guide's locals read off their parameters. "
            "Locals: the 20 groups 0, N/20, 2N/20, ...; the largest error over the 20.",
            "",
            "| guide | fit CPU time (s) | mu mean rel. err | mu sd rel. err | locals: max mean "
            "rel. err | locals: max mean err / exact sd | locals: max sd rel. err |",
            "|---|---|---|---|---|---|---|",
        ]
        for g in GUIDES:
            rs = [r for r in a["rows"] if r["guide"] == g]
            if rs:
                lines.append(
                    f"| {g} | {_mean(r['seconds'] for r in rs)} | "
                    + " | ".join(
                        _mean(r[k] for r in rs)
                        for k in (
                            "mu_mean_rel",
                            "mu_sd_rel",
                            "z_mean_rel_max",
                            "z_mean_std_max",
                            "z_sd_rel_max",
                        )
                    )
                    + " |"
                )
        lines.append("")
    if "b" in found:
        b = found["b"]
        lines += [
            "## (b) posteriordb eight schools (non-centred), school plate subsampled 4 of 8",
            "",
            f"`{b['posterior']}` with `pyro.plate('schools', 8, subsample_size=4)` around "
            "`theta_trans` and `y` (each school's `sigma` as a `pyro.deterministic` covariate "
            f"in the plate); {b['steps']} steps, `ClippedAdam`, learning rate {b['lr']} decaying "
            f"to {b['lr'] * FINAL_LR_FACTOR:g}, {b['draws']} draws "
            "scored against the NUTS reference draws as in `run_posteriordb.py` (standardized "
            "W1, mean over mu, tau and theta[1..8]; mean ± se over seeds "
            f"{sorted({r['seed'] for r in b['rows']})}). Noise floor (reference draws against "
            f"themselves at this many draws): W1 {b['noise_floor_w1']:.3f}.",
            "",
            "| guide | W1 | mean err | sd err (abs log ratio) | fit CPU time (s) |",
            "|---|---|---|---|---|",
        ]
        for g in GUIDES:
            rs = [r for r in b["rows"] if r["guide"] == g]
            if rs:
                lines.append(
                    f"| {g} | {_mean(r['w1'] for r in rs)} | {_mean(r['mean_err'] for r in rs)} "
                    f"| {_mean(r['sd_err'] for r in rs)} | {_mean(r['seconds'] for r in rs)} |"
                )
        lines.append("")
    if "c" in found:
        c = found["c"]
        lines += [
            f"## (c) Time and memory per step at minibatch {c['batch']}",
            "",
            "Model (a); each configuration in a fresh process; median time per step over "
            f"{c['steps']} steps after 5 warm-up steps (CPU time of the one-thread process); parameters in Pyro's param store; peak "
            "resident memory of the process (data included) and its growth during the fit. "
            "Every guide's step includes the model's plate drawing its minibatch with "
            "`torch.randperm(N)` (Pyro's `_Subsample`), the one part of a step that grows with "
            "N for the amortized guide; the per-datapoint guide and `AutoNormal` also update "
            "2N parameters per step.",
            "",
            "| N | guide | ms / step | parameters | peak RSS (MB) | RSS growth in fit (MB) |",
            "|---|---|---|---|---|---|",
        ]
        for r in c["rows"]:
            lines.append(
                f"| {r['N']:,} | {r['guide']} | {r['ms_per_step']:.1f} | {r['params']:,} | "
                f"{r['peak_rss_mb']:.0f} | {r['rss_growth_mb']:.0f} |"
            )
        lines.append("")
    (RESULTS / "hierarchical.md").write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", default="abc", help="any of a, b, c (default: all)")
    parser.add_argument("--posteriordb", default=None, help="posteriordb's posterior_database")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=8000, help="SVI steps in part (a)")
    parser.add_argument("--schools-steps", type=int, default=5000, help="SVI steps in part (b)")
    parser.add_argument("--scaling-steps", type=int, default=50, help="timed steps in part (c)")
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--draws", type=int, default=2000)
    parser.add_argument("--quick", action="store_true", help="a short check of the harness")
    parser.add_argument(
        "--guides", nargs="+", default=list(GUIDES), choices=GUIDES,
        help="guides to run; the results file keeps the other guides' rows of an earlier run",
    )  # fmt: skip
    args = parser.parse_args()
    if "b" in args.part and args.posteriordb is None:
        parser.error("part (b) needs --posteriordb PATH (posteriordb's posterior_database)")
    RESULTS.mkdir(exist_ok=True)
    command = "python benchmarks/hierarchical.py " + " ".join(sys.argv[1:])
    for p, run in (("a", part_a), ("b", part_b), ("c", part_c)):
        if p in args.part:
            result = run(args)
            result.update(command=command, machine=_machine())
            if not args.quick:
                path = RESULTS / f"hierarchical_{p}.json"
                if path.exists() and set(args.guides) != set(GUIDES):
                    # keep the other guides' rows (their settings must match: same command
                    # otherwise); the commands of both runs are recorded
                    old = json.loads(path.read_text())
                    kept = [r for r in old["rows"] if r["guide"] not in args.guides]
                    result["rows"] = kept + result["rows"]
                    result["command"] = old["command"] + "` and `" + result["command"]
                (RESULTS / f"hierarchical_{p}.json").write_text(json.dumps(result, indent=1))
    if not args.quick:
        write_report()


if __name__ == "__main__":
    main()
