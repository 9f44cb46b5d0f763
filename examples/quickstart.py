"""Quickstart: fit eight schools with AutoNormal and a pyro_nf flow, check the fits, compare them.

Run::

    python examples/quickstart.py                      # 2000 steps per guide, about a minute on a CPU
    python examples/quickstart.py --posteriordb PATH   # also plot posteriordb's NUTS reference draws
    python examples/quickstart.py --steps 100          # a quick look

``PATH`` is a posteriordb checkout (its root or its ``posterior_database`` folder); the environment
variable ``POSTERIORDB_PATH`` works too. The steps, for each guide:

1. :func:`pyro_nf.fit` trains the guide (Adam, 4 particles, learning rate decayed to 1%);
2. :func:`pyro_nf.diagnose` scores 4000 of its draws under the model: PSIS k-hat, the ELBO and
   the importance-weighted ELBO, and a verdict in words;
3. :func:`pyro_nf.to_inference_data` turns 4000 draws into an ArviZ ``InferenceData``, summarised
   by ``arviz.summary``.

The figure ``quickstart.png`` shows the loss traces, the joint posterior of ``theta[0]`` and
``log tau`` under each guide (and NUTS), and the marginal of ``log tau``. The posterior is a funnel:
NUTS visits small values of ``tau`` where ``theta[0]`` narrows; AutoNormal's draws stop short of
them, the flow's reach further down (not all the way: its PSIS k-hat says how much to trust it).

Model: the non-centred eight schools (:func:`pyro_nf.models.eight_schools_noncentered`); data:
Rubin (1981), as in Gelman et al., *Bayesian Data Analysis*, section 5.5.
"""

from __future__ import annotations

import argparse
import json
import os
import zipfile

import arviz as az
import numpy as np
import pyro
import torch
from pyro.infer.autoguide import AutoNormal

import pyro_nf
from pyro_nf.models import eight_schools_data
from pyro_nf.models import eight_schools_noncentered as model

POSTERIOR = "eight_schools-eight_schools_noncentered"  # its name in posteriordb


def nuts_reference(path: str) -> dict[str, np.ndarray]:
    """posteriordb's NUTS draws of this model: ``{"mu", "tau", "theta[0]"}`` (10 chains pooled).

    ``path`` is a posteriordb checkout: its root or its ``posterior_database`` folder. Raises
    ``SystemExit`` with the paths tried when the draws are not there.
    """
    tried = []
    for root in (path, os.path.join(path, "posterior_database")):
        draws_zip = os.path.join(root, "reference_posteriors", "draws", "draws", POSTERIOR + ".json.zip")  # fmt: skip
        tried.append(draws_zip)
        if os.path.isfile(draws_zip):
            with zipfile.ZipFile(draws_zip) as zf:
                chains = json.loads(zf.read(zf.namelist()[0]))
            pooled = {k: np.concatenate([chain[k] for chain in chains]) for k in chains[0]}
            # Stan numbers the schools from 1
            return {"mu": pooled["mu"], "tau": pooled["tau"], "theta[0]": pooled["theta[1]"]}
    raise SystemExit(
        f"no NUTS reference draws for {POSTERIOR} in {path!r} (from --posteriordb or "
        f"POSTERIORDB_PATH); looked for:\n  " + "\n  ".join(tried)
    )


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000, help="optimisation steps per guide")
    parser.add_argument("--samples", type=int, default=4000, help="draws for diagnose and ArviZ")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="examples/output", help="folder for quickstart.png")
    parser.add_argument(
        "--posteriordb",
        default=os.environ.get("POSTERIORDB_PATH"),
        help="posteriordb checkout for the NUTS reference (default: $POSTERIORDB_PATH, if set)",
    )
    args = parser.parse_args(argv)
    if args.steps < 1 or args.samples < 2:
        parser.error("--steps must be >= 1 and --samples >= 2")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    # Check the reference path before spending a minute on the fits.
    reference = nuts_reference(args.posteriordb) if args.posteriordb else None
    # Pyro's Trace_ELBO (used for AutoNormal with several particles) logs the plate nesting it
    # guesses at INFO level; that line says nothing a reader of this example needs.
    torch.set_num_threads(1)  # a model this small is fastest on one thread

    y, sigma = eight_schools_data()
    guides = {
        "AutoNormal": lambda: AutoNormal(model),
        "AutoIAFFlow": lambda: pyro_nf.AutoIAFFlow(model),
    }
    results = {}
    for name, make_guide in guides.items():
        pyro.clear_param_store()
        guide = make_guide()
        fitted = pyro_nf.fit(
            model, guide, y, sigma, num_steps=args.steps, num_particles=4,
            lr_schedule="exponential", seed=args.seed, progress=False,
        )  # fmt: skip
        checks = pyro_nf.diagnose(model, guide, y, sigma, num_samples=args.samples)
        idata = pyro_nf.to_inference_data(model, guide, y, sigma, num_samples=args.samples)
        print(f"\n== {name}: {fitted.num_steps} steps, {1e3 * fitted.seconds_per_step:.1f} ms/step")
        print(checks)
        print(az.summary(idata, var_names=["mu", "tau"], kind="stats"))
        post = idata.posterior
        draws = {
            "mu": post["mu"].values.ravel(),
            "tau": post["tau"].values.ravel(),
            "theta[0]": post["theta"].values[..., 0].ravel(),
        }
        results[name] = {"fit": fitted, "diagnostics": checks, "draws": draws}

    print(f"\n{'posterior':<12}{'ELBO':>9}{'IW-ELBO':>9}{'k-hat':>7}{'tau mean':>10}{'tau sd':>8}")
    for name, r in results.items():
        d, tau = r["diagnostics"], r["draws"]["tau"]
        print(f"{name:<12}{d.elbo:9.2f}{d.iw_elbo:9.2f}{d.k_hat:7.2f}{tau.mean():10.2f}{tau.std():8.2f}")  # fmt: skip
    if reference is not None:
        tau = reference["tau"]
        print(f"{'NUTS':<12}{'':9}{'':9}{'':7}{tau.mean():10.2f}{tau.std():8.2f}")
    path = plot(results, reference, args.out)
    print(f"\nwrote {path}")
    return results


def plot(results: dict, reference: dict | None, out: str) -> str:
    """Loss traces; theta[0] against log tau per posterior; the marginal of log tau."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    joints = {name: r["draws"] for name, r in results.items()}
    if reference is not None:
        joints["NUTS (posteriordb)"] = reference
    fig, axes = plt.subplots(1, len(joints) + 2, figsize=(3.6 * (len(joints) + 2), 3.4))
    for name, r in results.items():
        r["fit"].plot(ax=axes[0], label=name)
    late = np.concatenate([r["fit"].losses[len(r["fit"].losses) // 10 :] for r in results.values()])
    late = late[np.isfinite(late)]
    axes[0].set(title="training", xlabel="step", ylim=(late.min() - 1, np.percentile(late, 98)))
    axes[0].legend(fontsize=8)

    def xy(d):
        return d["theta[0]"], np.log(d["tau"])

    every = [xy(d) for d in joints.values()]
    xlim = np.percentile(np.concatenate([x for x, _ in every]), [0.5, 99.5])
    ylim = np.percentile(np.concatenate([y for _, y in every]), [0.5, 99.5])
    for ax, (name, d) in zip(axes[1:], joints.items()):
        x, y = xy(d)
        ax.scatter(x[:2000], y[:2000], s=2, alpha=0.3)
        ax.set(title=name, xlabel="theta[0]", ylabel="log tau", xlim=xlim, ylim=ylim)
    hist = axes[-1]
    bins = np.linspace(*ylim, 50)
    for name, d in joints.items():
        hist.hist(np.log(d["tau"]), bins=bins, density=True, histtype="step", label=name)
    hist.set(title="marginal of log tau", xlabel="log tau", ylabel="density")
    hist.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "quickstart.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
