"""When to trust a fit: eight schools, centred and non-centred, AutoNormal vs a pyro_nf flow guide.

Run::

    python examples/diagnostics.py                       # about 3 minutes on a 2-core CPU
    python examples/diagnostics.py --posteriordb PATH    # also overlay posteriordb's NUTS draws
    python examples/diagnostics.py --steps 200           # a quick look

For each parametrization and guide it fits with :func:`pyro_nf.fit`, prints the
:func:`pyro_nf.diagnose` table (PSIS k-hat, importance-sampling ESS, ELBO, IW-ELBO, verdict) and
writes ``diagnostics_losses.png`` (loss traces) and ``diagnostics_pairs_<model>_<guide>.png``
(marginals and pairs of mu, log tau and theta[0], over the NUTS draws when given; ``PATH`` or
``POSTERIORDB_PATH`` is a posteriordb checkout, its root or its ``posterior_database`` folder).

The centred model has a funnel between tau and theta (Neal 2003): a Gaussian guide cannot follow
it, and PSIS k-hat says so (Yao et al. 2018: above 0.7 the importance weights, and the guide, are
not to be trusted). Data: Rubin (1981), as in Gelman et al., *Bayesian Data Analysis* 5.5.
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import pyro
import torch
from pyro.infer.autoguide import AutoNormal
from quickstart import nuts_reference  # examples/quickstart.py

import pyro_nf
from pyro_nf.models import eight_schools_centered, eight_schools_data, eight_schools_noncentered

MODELS = {"centred": eight_schools_centered, "non-centred": eight_schools_noncentered}
GUIDES = {
    "AutoNormal": lambda m: AutoNormal(m),
    "AutoIAFFlow": lambda m: pyro_nf.AutoIAFFlow(m, num_transforms=3),
}


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--samples", type=int, default=4000, help="draws for diagnose")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="examples/output")
    parser.add_argument("--posteriordb", default=os.environ.get("POSTERIORDB_PATH"),
                        help="posteriordb checkout (default: $POSTERIORDB_PATH, if set)")  # fmt: skip
    args = parser.parse_args(argv)
    reference = None
    if args.posteriordb:  # checked before any fit
        nuts = nuts_reference(args.posteriordb)
        reference = {"mu": nuts["mu"], "log tau": np.log(nuts["tau"]), "theta[0]": nuts["theta[0]"]}  # fmt: skip
    torch.set_num_threads(1)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(args.out, exist_ok=True)
    y, sigma = eight_schools_data()
    fig, axes = plt.subplots(1, len(MODELS), figsize=(11, 3.6))
    rows = []
    for ax, (model_name, model) in zip(axes, MODELS.items()):
        for guide_name, make in GUIDES.items():
            pyro.clear_param_store()
            guide = make(model)
            result = pyro_nf.fit(
                model, guide, y, sigma, num_steps=args.steps, num_particles=4,
                lr_schedule="exponential", seed=args.seed, progress=False,
            )  # fmt: skip
            result.plot(ax=ax, label=guide_name, log_scale=True)
            d = pyro_nf.diagnose(model, guide, y, sigma, num_samples=args.samples)
            rows.append((model_name, guide_name, d))
            post = pyro_nf.to_inference_data(model, guide, y, sigma, num_samples=args.samples).posterior  # fmt: skip
            draws = {
                "mu": post["mu"].values.ravel(),
                "log tau": np.log(post["tau"].values.ravel()),
                "theta[0]": post["theta"].values[..., 0].ravel(),
            }
            pairs = pyro_nf.plot_posterior(draws, reference, labels=(guide_name, "NUTS"))
            pairs.suptitle(f"{model_name} eight schools, {guide_name} (k-hat {d.k_hat:.2f})", y=1.0)
            tag = f"{model_name}_{guide_name}".replace("-", "")
            pairs.savefig(os.path.join(args.out, f"diagnostics_pairs_{tag}.png"), dpi=90, bbox_inches="tight")  # fmt: skip
            plt.close(pairs)
        ax.set_title(f"{model_name} eight schools")
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "diagnostics_losses.png"), dpi=100)
    plt.close(fig)

    print(f"{'model':<12} {'guide':<12} {'k-hat':>6} {'ESS %':>6} {'ELBO':>15} {'IW-ELBO':>15}  verdict")  # fmt: skip
    for model_name, guide_name, d in rows:
        print(
            f"{model_name:<12} {guide_name:<12} {d.k_hat:6.2f} {100 * d.ess_fraction:6.1f} "
            f"{d.elbo:8.2f} +- {d.elbo_se:4.2f} {d.iw_elbo:8.2f} +- {d.iw_elbo_se:4.2f}  "
            f"{d.verdict.split(':')[0]}"
        )
    print(f"\nplots written to {args.out}/diagnostics_*.png")
    return rows


if __name__ == "__main__":
    main()
