"""Step time of flow guides against Pyro's guides and a hand-written pure-torch loop.

Run::

    python benchmarks/speed.py                 # full run, writes benchmarks/results/speed.md and speed.png
    python benchmarks/speed.py --quick         # a few seconds, for CI

Model (as in the issue): Bayesian logistic regression, N=500 observations, D=21 latents (20
weights and an intercept, N(0, 1) priors), Trace_ELBO-equivalent loss with one particle, Adam.
Every configuration is timed in the same process, one after the other, with the same thread count:
after a warm-up, ``--repeats`` blocks of ``--steps`` SVI steps each; the figure is the median over
blocks of the time per step. ``hand-written`` is the floor: the same ELBO (affine base and planar
layers with the same constraint) in plain torch, with no Pyro at all.

The D sweep uses a Gaussian model with O(D) cost (x ~ N(0, I_D), y ~ N(x, 1) observed), so that
the guide's cost is what grows. Time per step is fitted as ``a + b D`` (slope ``b`` reported) and
the log-log slope between the two largest D is reported (1 means linear).
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import statistics
import time

import numpy as np
import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.distributions.transforms import iterated, planar
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoIAFNormal, AutoNormal, AutoNormalizingFlow
from pyro.optim import Adam

import pyro_nf
from pyro_nf.fast import FastELBO

N, D = 500, 21


def logistic_data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(N, D - 1, generator=g)
    w = torch.randn(D - 1, generator=g)
    y = torch.bernoulli(torch.sigmoid(X @ w), generator=g)
    return X, y


def logistic(X, y):
    b = pyro.sample("b", dist.Normal(0.0, 1.0))
    w = pyro.sample("w", dist.Normal(torch.zeros(X.shape[1]), 1.0).to_event(1))
    with pyro.plate("data", X.shape[0]):
        pyro.sample("y", dist.Bernoulli(logits=b + X @ w), obs=y)


def gaussian(y):
    x = pyro.sample("x", dist.Normal(torch.zeros(y.shape[-1]), 1.0).to_event(1))
    pyro.sample("y", dist.Normal(x, 1.0).to_event(1), obs=y)


def time_steps(step, steps: int, repeats: int, warmup: int = 20) -> float:
    """Median over ``repeats`` blocks of the seconds per call of ``step``."""
    for _ in range(warmup):
        step()
    blocks = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        blocks.append((time.perf_counter() - t0) / steps)
    return statistics.median(blocks)


def svi_step(model, make_guide, args, loss):
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    svi = SVI(model, make_guide(model), Adam({"lr": 1e-3}), loss)
    return lambda: svi.step(*args)


def hand_written_step(K: int, X, y):
    """Pure-torch ELBO: affine base + K planar layers (same constraint as pyro_nf), logistic model."""
    torch.manual_seed(0)
    d = X.shape[1] + 1
    loc = torch.zeros(d, requires_grad=True)
    rho = torch.full((d,), -2.25, requires_grad=True)
    u = torch.zeros(K, d, requires_grad=True)
    w = (torch.randn(K, d) / d**0.5).requires_grad_()
    b = torch.zeros(K, requires_grad=True)
    opt = torch.optim.Adam([loc, rho, u, w, b], lr=1e-3)
    shift = float(np.log(np.e - 1))
    half_log_2pi = 0.5 * float(np.log(2 * np.pi))

    def step():
        opt.zero_grad()
        wu = (w * u).sum(-1)
        m1 = F.softplus(wu + shift)
        u_hat = u + ((m1 - 1 - wu) / (w * w).sum(-1)).unsqueeze(-1) * w
        eps = torch.randn(d)
        z, ladj = eps, 0.0
        for k in range(K):
            t = torch.tanh(z @ w[k] + b[k])
            z = z + u_hat[k] * t
            ladj = ladj + torch.log(t * t + (1 - t * t) * m1[k])
        scale = F.softplus(rho)
        theta = loc + scale * z
        log_q = -0.5 * (eps * eps).sum() - d * half_log_2pi - ladj - scale.log().sum()
        log_prior = -0.5 * (theta * theta).sum() - d * half_log_2pi
        logits = theta[0] + X @ theta[1:]
        log_lik = -F.binary_cross_entropy_with_logits(logits, y, reduction="sum")
        loss = -(log_prior + log_lik - log_q)
        loss.backward()
        opt.step()
        return loss.item()

    return step


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, pyro {pyro.__version__}, "
        f"{torch.get_num_threads()} thread(s); load average at the end {load} "
        "(above the core count means other work shared the machine and inflated every figure)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100, help="steps per timed block")
    parser.add_argument("--repeats", type=int, default=7, help="timed blocks (median reported)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--compile", action="store_true", help="also time FastELBO(compile=True)")
    parser.add_argument("--quick", action="store_true", help="tiny run for CI")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.repeats = 5, 2
    torch.set_num_threads(args.threads)
    X, y = logistic_data()
    data = (X, y)
    trace = Trace_ELBO()
    fast = FastELBO()
    planar_pyro = lambda K: lambda m: AutoNormalizingFlow(m, functools.partial(iterated, K, planar))  # noqa: E731
    iaf_pyro = lambda m: AutoIAFNormal(m, num_transforms=2)  # noqa: E731
    configs = [
        ("Pyro AutoNormal", lambda: svi_step(logistic, AutoNormal, data, trace)),
        (
            "Pyro AutoNormalizingFlow planar K=8",
            lambda: svi_step(logistic, planar_pyro(8), data, trace),
        ),
        (
            "Pyro AutoNormalizingFlow planar K=32",
            lambda: svi_step(logistic, planar_pyro(32), data, trace),
        ),
        ("Pyro AutoIAFNormal K=2", lambda: svi_step(logistic, iaf_pyro, data, trace)),
    ]
    for label, loss in (("Trace_ELBO", trace), ("FastELBO", fast)):
        configs += [
            (f"pyro_nf planar K=8, {label}", lambda loss=loss: svi_step(logistic, lambda m: pyro_nf.AutoPlanarFlow(m, 8), data, loss)),
            (f"pyro_nf planar K=32, {label}", lambda loss=loss: svi_step(logistic, lambda m: pyro_nf.AutoPlanarFlow(m, 32), data, loss)),
            (f"pyro_nf radial K=32, {label}", lambda loss=loss: svi_step(logistic, lambda m: pyro_nf.AutoRadialFlow(m, 32), data, loss)),
            (f"pyro_nf IAF K=2, {label}", lambda loss=loss: svi_step(logistic, lambda m: pyro_nf.AutoIAFFlow(m, 2), data, loss)),
        ]  # fmt: skip
    if args.compile:
        compiled = FastELBO(compile=True)
        configs.append(("pyro_nf planar K=32, FastELBO(compile=True)", lambda: svi_step(logistic, lambda m: pyro_nf.AutoPlanarFlow(m, 32), data, compiled)))  # fmt: skip
    configs += [
        ("hand-written torch planar K=8", lambda: hand_written_step(8, X, y)),
        ("hand-written torch planar K=32", lambda: hand_written_step(32, X, y)),
    ]
    results = {}
    for name, make in configs:
        results[name] = time_steps(make(), args.steps, args.repeats)
        print(f"{name:<48} {1e3 * results[name]:8.3f} ms/step", flush=True)

    # Growth with D (Gaussian model, FastELBO) and with K (logistic model, FastELBO).
    dims = [10, 100, 1000] if args.quick else [10, 100, 1000, 10000]
    sweep = {}
    for family, make in (("planar", pyro_nf.AutoPlanarFlow), ("radial", pyro_nf.AutoRadialFlow)):
        for d in dims:
            yd = torch.randn(d)
            sweep[family, d] = time_steps(
                svi_step(gaussian, lambda m, make=make: make(m, 8), (yd,), fast),
                args.steps,
                args.repeats,
            )
            print(f"D sweep {family} K=8 D={d:<6} {1e3 * sweep[family, d]:8.3f} ms/step", flush=True)  # fmt: skip
    ks = [1, 4, 16] if args.quick else [1, 2, 4, 8, 16, 32, 64]
    ksweep = {}
    for k in ks:
        ksweep[k] = time_steps(svi_step(logistic, lambda m, k=k: pyro_nf.AutoPlanarFlow(m, k), data, fast), args.steps, args.repeats)  # fmt: skip
        print(f"K sweep planar K={k:<3} {1e3 * ksweep[k]:8.3f} ms/step", flush=True)

    write_report(args, results, sweep, dims, ksweep)


def write_report(args, results, sweep, dims, ksweep) -> None:
    os.makedirs(args.out, exist_ok=True)
    lines = [
        "# Step time of flow guides",
        "",
        f"Machine: {machine()}.",
        f"Command: `python benchmarks/speed.py{' --quick' if args.quick else ''}{' --compile' if args.compile else ''}`"
        f" (median over {args.repeats} blocks of {args.steps} steps, after 20 warm-up steps).",
        "",
        f"## Logistic regression, N={N}, D={D}, one particle",
        "",
        "| guide / loss | ms per step | vs Pyro planar K=32 |",
        "|---|---:|---:|",
    ]
    ref = results["Pyro AutoNormalizingFlow planar K=32"]
    for name, t in results.items():
        lines.append(f"| {name} | {1e3 * t:.3f} | {t / ref:.2f} |")
    fast32 = results["pyro_nf planar K=32, FastELBO"]
    hand32 = results["hand-written torch planar K=32"]
    lines += [
        "",
        f"pyro_nf planar K=32 (FastELBO) is {ref / fast32:.1f}x faster than Pyro's "
        f"AutoNormalizingFlow planar K=32 and takes {fast32 / hand32:.2f}x the time of the "
        "hand-written torch loop with the same layers.",
        "",
        "## Growth with the latent dimension D (Gaussian model, K=8, FastELBO)",
        "",
        "| D | " + " | ".join(f"{f} ms/step" for f in ("planar", "radial")) + " |",
        "|---:|---:|---:|",
    ]
    for d in dims:
        lines.append(f"| {d} | {1e3 * sweep['planar', d]:.3f} | {1e3 * sweep['radial', d]:.3f} |")
    lines.append("")
    for family in ("planar", "radial"):
        t = np.array([sweep[family, d] for d in dims])
        slope, intercept = np.polyfit(dims, t, 1)
        loglog = np.log(t[-1] / t[-2]) / np.log(dims[-1] / dims[-2])
        lines.append(
            f"- {family}: fit t = {1e3 * intercept:.3f} ms + {1e6 * slope:.4f} us x D; "
            f"log-log slope between D={dims[-2]} and D={dims[-1]}: {loglog:.2f}"
        )
    lines += [
        "",
        "## Growth with the number of planar layers K (logistic regression, FastELBO)",
        "",
    ]
    lines += ["| K | ms per step |", "|---:|---:|"] + [
        f"| {k} | {1e3 * t:.3f} |" for k, t in ksweep.items()
    ]
    path = os.path.join(args.out, "speed_quick.md" if args.quick else "speed.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {path}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.5))
    for family in ("planar", "radial"):
        ax[0].loglog(dims, [1e3 * sweep[family, d] for d in dims], "o-", label=f"{family} K=8")
    ax[0].set(xlabel="latent dimension D", ylabel="ms per step", title="time vs D (FastELBO)")
    ax[0].legend()
    ax[1].plot(list(ksweep), [1e3 * t for t in ksweep.values()], "o-")
    ax[1].set(xlabel="planar layers K", ylabel="ms per step", title="time vs K (logistic, D=21)")
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "speed_quick.png" if args.quick else "speed.png"), dpi=100)


if __name__ == "__main__":
    main()
