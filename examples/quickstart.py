"""Quickstart: eight schools (non-centred) fitted with pyro_nf's AutoIAFFlow and Pyro's AutoNormal.

Run::

    python examples/quickstart.py                      # 3000 steps per guide, about a minute on CPU
    python examples/quickstart.py --posteriordb PATH   # also compare with posteriordb's NUTS draws

Prints the posterior mean and sd of ``mu`` and ``tau`` under both guides (and under the NUTS
reference when a posteriordb checkout is given) and writes ``quickstart.png``: the loss traces and
the marginals of ``mu`` and ``log tau``.

Data: the eight schools of Rubin (1981), as in Gelman et al., *Bayesian Data Analysis*, section 5.5.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import zipfile

import pyro
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormal
from pyro.optim import ClippedAdam

import pyro_nf
from pyro_nf.models import eight_schools_data, eight_schools_noncentered

POSTERIOR = "eight_schools-eight_schools_noncentered"
model = eight_schools_noncentered


def fit(guide, y, sigma, steps: int, lr: float) -> list[float]:
    svi = SVI(
        model,
        guide,
        ClippedAdam({"lr": lr, "lrd": 0.1 ** (1 / steps)}),
        Trace_ELBO(num_particles=4, vectorize_particles=True),
    )
    return [svi.step(y, sigma) for _ in range(steps)]


def draws(guide, y, sigma, n: int = 4000) -> dict[str, torch.Tensor]:
    predictive = pyro.infer.Predictive(
        model, guide=guide, num_samples=n, return_sites=["mu", "tau"]
    )
    with torch.no_grad():
        return {k: v.reshape(n) for k, v in predictive(y, sigma).items()}


def reference(path: str) -> dict[str, torch.Tensor] | None:
    """NUTS reference draws of mu and tau from a posteriordb checkout, or None."""
    draws_zip = os.path.join(
        path, "reference_posteriors", "draws", "draws", POSTERIOR + ".json.zip"
    )
    if not os.path.exists(draws_zip):
        raise SystemExit(f"no reference draws for {POSTERIOR} under {path!r}: expected {draws_zip}")
    with zipfile.ZipFile(draws_zip) as zf:
        chains = json.loads(zf.read(zf.namelist()[0]))
    return {k: torch.tensor([v for chain in chains for v in chain[k]]) for k in ("mu", "tau")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000, help="SVI steps per guide")
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="examples/output", help="folder for quickstart.png")
    parser.add_argument(
        "--posteriordb", default=None, help="path of a posteriordb checkout (optional)"
    )
    args = parser.parse_args()
    if args.steps < 1:
        parser.error("--steps must be positive")

    y, sigma = eight_schools_data()
    results, losses = {}, {}
    for name, make in [
        ("AutoNormal", lambda: AutoNormal(model)),
        ("pyro_nf.AutoIAFFlow", lambda: pyro_nf.AutoIAFFlow(model, num_transforms=2)),
    ]:
        pyro.clear_param_store()
        pyro.set_rng_seed(args.seed)
        guide = make()
        start = time.perf_counter()
        losses[name] = fit(guide, y, sigma, args.steps, args.lr)
        seconds = time.perf_counter() - start
        results[name] = draws(guide, y, sigma)
        print(
            f"{name}: {args.steps} steps in {seconds:.1f} s, final loss {sum(losses[name][-100:]) / len(losses[name][-100:]):.2f}"
        )
    if args.posteriordb:
        results["NUTS reference"] = reference(args.posteriordb)

    print(f"\n{'posterior':<22}{'mu mean':>9}{'mu sd':>8}{'tau mean':>10}{'tau sd':>8}")
    for name, d in results.items():
        print(
            f"{name:<22}{d['mu'].mean():9.2f}{d['mu'].std():8.2f}{d['tau'].mean():10.2f}{d['tau'].std():8.2f}"
        )

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for name, trace in losses.items():
        window = max(1, len(trace) // 50)
        smooth = (
            torch.tensor(trace).unfold(0, window, 1).mean(-1)
            if len(trace) >= window
            else torch.tensor(trace)
        )
        axes[0].plot(smooth, label=name)
    axes[0].set(xlabel="step", ylabel="-ELBO (running mean)", title="training")
    axes[0].set_ylim(top=min(max(t[len(t) // 10 :]) for t in losses.values()) + 5)
    for name, d in results.items():
        axes[1].hist(d["mu"].numpy(), bins=60, density=True, histtype="step", label=name)
        axes[2].hist(d["tau"].log().numpy(), bins=60, density=True, histtype="step", label=name)
    axes[1].set(xlabel="mu", title="posterior of mu")
    axes[2].set(xlabel="log tau", title="posterior of log tau")
    axes[0].legend()
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "quickstart.png")
    fig.savefig(path, dpi=110)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
