"""When to trust a fit: eight schools, centred and non-centred, AutoNormal vs a pyro_nf flow guide.

Run::

    python examples/diagnostics.py                       # ~3 minutes on a 2-core CPU
    python examples/diagnostics.py --posteriordb PATH    # also overlay posteriordb's NUTS draws

For each parametrization x guide it fits with :func:`pyro_nf.fit`, then prints the
:func:`pyro_nf.diagnose` table (PSIS k-hat, importance-sampling ESS, ELBO, IW-ELBO, verdict) and
writes ``diagnostics_losses.png`` (loss traces) and ``diagnostics_pairs_<model>_<guide>.png``
(marginals and pairs of mu, log tau and theta[0], over the NUTS draws when given).

The centred model has a funnel between tau and theta (Neal 2003): a Gaussian guide cannot follow
it, and PSIS k-hat says so. Data: Rubin (1981), as in Gelman et al., *Bayesian Data Analysis* 5.5.
"""

from __future__ import annotations

import argparse
import json
import os
import zipfile

import numpy as np
import pyro
import torch
from pyro.infer.autoguide import AutoNormal

import pyro_nf
from pyro_nf.models import eight_schools_centered, eight_schools_data, eight_schools_noncentered

MODELS = {"centred": eight_schools_centered, "non-centred": eight_schools_noncentered}
GUIDES = {
    "AutoNormal": lambda m: AutoNormal(m),
    "AutoIAFFlow": lambda m: pyro_nf.AutoIAFFlow(m, num_transforms=3),
}


def reference_draws(path: str) -> dict[str, np.ndarray]:
    name = "eight_schools-eight_schools_noncentered"
    draws_zip = os.path.join(path, "reference_posteriors", "draws", "draws", name + ".json.zip")
    if not os.path.exists(draws_zip):
        raise SystemExit(f"no reference draws under {path!r}: expected {draws_zip}")
    with zipfile.ZipFile(draws_zip) as zf:
        chains = json.loads(zf.read(zf.namelist()[0]))
    pooled = {k: np.concatenate([c[k] for c in chains]) for k in chains[0]}
    return {"mu": pooled["mu"], "log tau": np.log(pooled["tau"]), "theta[0]": pooled["theta[1]"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--particles", type=int, default=4)
    parser.add_argument("--samples", type=int, default=4000, help="draws for diagnose")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="examples/output")
    parser.add_argument("--posteriordb", default=None, help="posteriordb checkout (optional)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(args.out, exist_ok=True)
    y, sigma = eight_schools_data()
    reference = reference_draws(args.posteriordb) if args.posteriordb else None
    fig, axes = plt.subplots(1, len(MODELS), figsize=(11, 3.6))
    rows = []
    for ax, (model_name, model) in zip(axes, MODELS.items()):
        for guide_name, make in GUIDES.items():
            pyro.clear_param_store()
            guide = make(model)
            result = pyro_nf.fit(
                model, guide, y, sigma, num_steps=args.steps, lr=args.lr,
                num_particles=args.particles, lr_schedule="exponential", seed=args.seed,
                progress=False,
            )  # fmt: skip
            result.plot(ax=ax, label=guide_name, log_scale=True)
            d = pyro_nf.diagnose(model, guide, y, sigma, num_samples=args.samples)
            rows.append((model_name, guide_name, d, result.seconds_per_step))
            idata = pyro_nf.to_inference_data(model, guide, y, sigma, num_samples=args.samples)
            post = idata.posterior
            draws = {
                "mu": post["mu"].values.ravel(),
                "log tau": np.log(post["tau"].values.ravel()),
                "theta[0]": post["theta"].values[..., 0].ravel(),
            }
            pairs = pyro_nf.plot_posterior(draws, reference, labels=(guide_name, "NUTS"))
            pairs.suptitle(f"{model_name} eight schools, {guide_name} (k-hat {d.k_hat:.2f})", y=1.0)
            tag = f"{model_name}_{guide_name}".replace("-", "")
            pairs.savefig(
                os.path.join(args.out, f"diagnostics_pairs_{tag}.png"), dpi=90, bbox_inches="tight"
            )
            plt.close(pairs)
        ax.set_title(f"{model_name} eight schools")
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "diagnostics_losses.png"), dpi=100)

    print(
        f"{'model':<12} {'guide':<12} {'k-hat':>6} {'ESS %':>6} {'ELBO':>15} {'IW-ELBO':>15} {'ms/step':>8}  verdict"
    )
    for model_name, guide_name, d, sps in rows:
        print(
            f"{model_name:<12} {guide_name:<12} {d.k_hat:6.2f} {100 * d.ess_fraction:6.1f} "
            f"{d.elbo:8.2f} +- {d.elbo_se:4.2f} {d.iw_elbo:8.2f} +- {d.iw_elbo_se:4.2f} "
            f"{1e3 * sps:8.1f}  {d.verdict.split(':')[0]}"
        )
    print(f"\nplots written to {args.out}/diagnostics_*.png")


if __name__ == "__main__":
    main()
