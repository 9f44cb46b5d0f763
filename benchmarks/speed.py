"""Step time of flow guides against Pyro's guides and a hand-written pure-torch loop.

Run::

    python benchmarks/speed.py                 # full run, writes benchmarks/results/speed.md and speed.png
    python benchmarks/speed.py --quick         # a few seconds, for CI

Model (as in the issue): Bayesian logistic regression, N=500 observations, D=21 latents (20
weights and an intercept, N(0, 1) priors), Trace_ELBO-equivalent loss with one particle, Adam.
Every configuration is timed in the same process, one after the other, with the same thread count:
after a warm-up, ``--repeats`` blocks of ``--steps`` steps each; the figure is the median over
blocks of the time per step. Rows named ``SVI + ...`` are ``pyro.infer.SVI`` steps with
``pyro.optim.Adam``; rows named ``pyro_nf.fit`` run :func:`pyro_nf.fit` (the path a user of
pyro_nf takes: FastELBO for flow guides and one fused torch Adam) and take fit's own seconds per
step. ``hand-written`` is the floor: the same ELBO (affine base and planar layers with the same
constraint) in plain torch, with no Pyro at all.

The D sweep uses a Gaussian model with O(D) cost (x ~ N(0, I_D), y ~ N(x, 1) observed), so that
the guide's cost is what grows. Time per step is fitted as ``a + b D`` by least squares (slope
``b`` and the fit's R^2 reported), and the log-log slope between the two largest D is reported
(it tends to 1 once the O(D) work outweighs the fixed cost of a step).
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time

import numpy as np
import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from _machine import cpu_name  # benchmarks/_machine.py, beside this script
from pyro.distributions.transforms import iterated, planar
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoIAFNormal, AutoNormal, AutoNormalizingFlow
from pyro.optim import Adam

# this checkout's pyro_nf, not another installed copy (a run in a worktree measures its own code)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pyro_nf  # noqa: E402
from pyro_nf.fast import FastELBO  # noqa: E402

N, D = 500, 21


def logistic_data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(N, D - 1, generator=g)
    w = torch.randn(D - 1, generator=g)
    y = torch.bernoulli(torch.sigmoid(X @ w), generator=g)
    return X, y


def logistic(X, y):
    b = pyro.sample("b", dist.Normal(0.0, 1.0))
    w = pyro.sample("w", dist.Normal(X.new_zeros(X.shape[1]), 1.0).to_event(1))
    with pyro.plate("data", X.shape[0]):
        pyro.sample("y", dist.Bernoulli(logits=b + X @ w), obs=y)


def gaussian(y):
    x = pyro.sample("x", dist.Normal(y.new_zeros(y.shape[-1]), 1.0).to_event(1))
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


def fit_block(model, make_guide, args, loss=None):
    """A callable running one timed block of ``pyro_nf.fit`` on the same guide.

    Each call continues the fit for ``steps`` steps and returns fit's own seconds per step (its
    loop only: the once-per-call set-up, one trace of model and guide, is not counted).
    """
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = make_guide(model)

    def block(steps: int) -> float:
        result = pyro_nf.fit(
            model, guide, *args, num_steps=steps, lr=1e-3, loss=loss, progress=False
        )
        return result.seconds_per_step

    return block


def time_fit(block, steps: int, repeats: int) -> float:
    """Median over ``repeats`` blocks of fit's seconds per step (after a 20-step warm-up block)."""
    block(20)
    return statistics.median(block(steps) for _ in range(repeats))


def plain_logistic_loss(K: int, X, y):
    """The plain-torch ELBO of an affine base + K planar layers (same constraint as pyro_nf) on
    the logistic model, one particle: its loss function and parameters (``benchmarks/speed_cuda.py``
    captures the same loss)."""
    torch.manual_seed(0)
    d, dev = X.shape[1] + 1, X.device
    loc = torch.zeros(d, device=dev, requires_grad=True)
    rho = torch.full((d,), -2.25, device=dev, requires_grad=True)
    u = torch.zeros(K, d, device=dev, requires_grad=True)
    w = (torch.randn(K, d, device=dev) / d**0.5).requires_grad_()
    b = torch.zeros(K, device=dev, requires_grad=True)
    shift = float(np.log(np.e - 1))
    half_log_2pi = 0.5 * float(np.log(2 * np.pi))

    def loss():
        wu = (w * u).sum(-1)
        m1 = F.softplus(wu + shift)
        u_hat = u + ((m1 - 1 - wu) / (w * w).sum(-1)).unsqueeze(-1) * w
        eps = torch.randn(d, device=dev)
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
        return -(log_prior + log_lik - log_q)

    return loss, [loc, rho, u, w, b]


def hand_written_step(K: int, X, y, fused: bool = False):
    """One Adam step of :func:`plain_logistic_loss`, the loss read back as a float.

    ``fused=True`` uses torch's fused Adam kernel, as ``pyro_nf.fit`` does.
    """
    loss, params = plain_logistic_loss(K, X, y)
    opt = torch.optim.Adam(params, lr=1e-3, fused=fused or None)

    def step():
        opt.zero_grad()
        value = loss()
        value.backward()
        opt.step()
        return value.item()

    return step


def machine(device: torch.device) -> str:
    cpu = cpu_name()
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    if device.type == "cuda":
        cpu = f"GPU {torch.cuda.get_device_name(device)} (host: {cpu})"
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
    parser.add_argument("--device", default="cpu", help="cpu or cuda (data, guides and loop there)")
    parser.add_argument("--compile", action="store_true", help="also time FastELBO(compile=True)")
    parser.add_argument("--quick", action="store_true", help="tiny run for CI")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.repeats = 5, 2
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    X, y = (t.to(device) for t in logistic_data())
    data = (X, y)
    trace = Trace_ELBO()
    fast = FastELBO()
    S, R = args.steps, args.repeats

    def svi(make_guide, loss, model=logistic, model_args=data):
        return lambda: time_steps(svi_step(model, make_guide, model_args, loss), S, R)

    def fitted(make_guide, model=logistic, model_args=data, loss=None):
        return lambda: time_fit(fit_block(model, make_guide, model_args, loss), S, R)

    def hand(K, fused=False):
        return lambda: time_steps(hand_written_step(K, X, y, fused), S, R)

    planar_pyro = lambda K: lambda m: AutoNormalizingFlow(m, functools.partial(iterated, K, planar))  # noqa: E731
    ours = {
        "planar K=8": lambda m: pyro_nf.AutoPlanarFlow(m, 8),
        "planar K=32": lambda m: pyro_nf.AutoPlanarFlow(m, 32),
        "radial K=32": lambda m: pyro_nf.AutoRadialFlow(m, 32),
        "IAF K=2": lambda m: pyro_nf.AutoIAFFlow(m, 2),
    }
    configs = [
        ("Pyro AutoNormal", svi(AutoNormal, trace)),
        ("Pyro AutoNormalizingFlow planar K=8", svi(planar_pyro(8), trace)),
        ("Pyro AutoNormalizingFlow planar K=32", svi(planar_pyro(32), trace)),
        ("Pyro AutoIAFNormal K=2", svi(lambda m: AutoIAFNormal(m, num_transforms=2), trace)),
        ("Pyro AutoNormal, pyro_nf.fit", fitted(AutoNormal)),
    ]
    for label, loss in (("SVI + Trace_ELBO", trace), ("SVI + FastELBO", fast)):
        configs += [(f"pyro_nf {name}, {label}", svi(g, loss)) for name, g in ours.items()]
    configs += [(f"pyro_nf {name}, pyro_nf.fit", fitted(g)) for name, g in ours.items()]
    if args.compile:
        compiled = FastELBO(compile=True)
        configs.append(("pyro_nf planar K=32, pyro_nf.fit + FastELBO(compile=True)", fitted(ours["planar K=32"], loss=compiled)))  # fmt: skip
    configs += [
        ("hand-written torch planar K=8", hand(8)),
        ("hand-written torch planar K=32", hand(32)),
        ("hand-written torch planar K=32, fused Adam", hand(32, fused=True)),
    ]
    results = {}
    for name, timer in configs:
        try:
            results[name] = timer()
        except Exception as e:  # noqa: BLE001 - e.g. a Pyro guide that cannot run on this device
            print(f"{name:<56} failed: {type(e).__name__}: {e}", flush=True)
            results[name] = float("nan")
            continue
        print(f"{name:<56} {1e3 * results[name]:8.3f} ms/step", flush=True)

    # Growth with D (Gaussian model) and with K (logistic model), through pyro_nf.fit.
    dims = [10, 100, 1000] if args.quick else [10, 100, 1000, 10000, 100000]
    sweep = {}
    for family, make in (("planar", pyro_nf.AutoPlanarFlow), ("radial", pyro_nf.AutoRadialFlow)):
        for d in dims:
            yd = torch.randn(d, device=device)
            sweep[family, d] = fitted(lambda m, make=make: make(m, 8), gaussian, (yd,))()
            print(f"D sweep {family} K=8 D={d:<6} {1e3 * sweep[family, d]:8.3f} ms/step", flush=True)  # fmt: skip
    ks = [1, 4, 16] if args.quick else [1, 2, 4, 8, 16, 32, 64]
    ksweep = {}
    for k in ks:
        ksweep[k] = fitted(lambda m, k=k: pyro_nf.AutoPlanarFlow(m, k))()
        print(f"K sweep planar K={k:<3} {1e3 * ksweep[k]:8.3f} ms/step", flush=True)

    write_report(args, results, sweep, dims, ksweep)


def write_report(args, results, sweep, dims, ksweep) -> None:
    os.makedirs(args.out, exist_ok=True)
    lines = [
        "# Step time of flow guides",
        "",
        f"Machine: {machine(torch.device(args.device))}.",
        f"Command: `python benchmarks/speed.py{' --quick' if args.quick else ''}{' --compile' if args.compile else ''}"
        f"{' --device ' + args.device if args.device != 'cpu' else ''}`"
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
    fast32 = results["pyro_nf planar K=32, pyro_nf.fit"]
    hand32 = results["hand-written torch planar K=32"]
    hand32f = results["hand-written torch planar K=32, fused Adam"]
    lines += [
        "",
        f"pyro_nf planar K=32 through `pyro_nf.fit` is {ref / fast32:.1f}x faster than Pyro's "
        f"AutoNormalizingFlow planar K=32 under SVI and takes {fast32 / hand32:.2f}x the time of "
        f"the hand-written torch loop with the same layers ({fast32 / hand32f:.2f}x the "
        "hand-written loop with fused Adam).",
        "",
        "Rows: `SVI + ...` are `pyro.infer.SVI` steps with `pyro.optim.Adam` (one torch optimizer "
        "per parameter tensor); `pyro_nf.fit` rows are `pyro_nf.fit` (FastELBO for flow guides, "
        "one fused torch Adam over all parameters, finite-gradient checks included), timed by "
        "fit's own seconds per step.",
        "",
        "## Growth with the latent dimension D (Gaussian model, K=8, pyro_nf.fit)",
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
        r2 = 1.0 - np.sum((t - (intercept + slope * np.array(dims))) ** 2) / np.sum(
            (t - t.mean()) ** 2
        )
        loglog = np.log(t[-1] / t[-2]) / np.log(dims[-1] / dims[-2])
        lines.append(
            f"- {family}: least-squares fit t = {1e3 * intercept:.3f} ms + "
            f"{1e6 * slope:.4f} us x D (R^2 = {r2:.4f}); log-log slope between D={dims[-2]} and "
            f"D={dims[-1]}: {loglog:.2f}"
        )
    lines += [
        "",
        "## Growth with the number of planar layers K (logistic regression, pyro_nf.fit)",
        "",
    ]
    lines += ["| K | ms per step |", "|---:|---:|"] + [
        f"| {k} | {1e3 * t:.3f} |" for k, t in ksweep.items()
    ]
    stem = "speed" + ("_quick" if args.quick else "") + ("" if args.device == "cpu" else "_cuda")
    path = os.path.join(args.out, f"{stem}.md")
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
    ax[0].set(xlabel="latent dimension D", ylabel="ms per step", title="time vs D (pyro_nf.fit)")
    ax[0].legend()
    ax[1].plot(list(ksweep), [1e3 * t for t in ksweep.values()], "o-")
    ax[1].set(xlabel="planar layers K", ylabel="ms per step", title="time vs K (logistic, D=21)")
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, f"{stem}.png"), dpi=100)


if __name__ == "__main__":
    main()
