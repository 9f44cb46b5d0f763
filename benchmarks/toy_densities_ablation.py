"""What limits AutoIAFFlow on the sd-4 banana: one setting changed at a time, from the defaults.

The target is ``toy_densities.py``'s banana, p(x1, x2) = N(x1 | x2^2/4, 1) N(x2 | 0, 4^2). Every row
fits ``pyro_nf.AutoIAFFlow`` with pyro_nf 0.2's default arguments (``OLD_DEFAULTS``:
``num_transforms=2``, ``activation="elu"``, ``init_scale=0.1``, ``hidden_dims=(16,)``, log-scale
bounds (-5, 3), ``fan_in_ref=64``) except the ones named, at the budget of
the issue (3000 Adam steps, 16 vectorized particles, lr 0.005; the learning-rate schedule of
``toy_densities.py``, a cosine decay to 2% of the rate, unless ``--schedule constant``), over a
few training seeds; KL(q||p) as in ``toy_densities.py`` (20000 draws, log Z = 0 exactly).

Run (from the repository root)::

    python benchmarks/toy_densities_ablation.py --jobs 2 --rows 'default;init_scale=1;gelu'

Rows are names from ``ROWS`` below. In a row's name, ``swapped`` fits the target with its two
coordinates swapped (the same as reversing every layer's variable order: the first layer then
conditions the banana's x1 on x2, the second x2 on x1), ``12000 steps`` runs four times the
budget (the same cosine schedule over it), ``best diagonal start`` starts the flow's affine base
at the diagonal Gaussian closest to the banana in KL(q||p) instead of ``init_scale``;
``--results`` appends a markdown table to the file (with a header when it is new); ``--target``
runs the rows on another of ``toy_densities.py``'s targets.
"""

import argparse
import functools
import math
import os
import sys
import time
import zlib
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import numpy as np
import pyro
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import init_to_value
from pyro.infer.autoguide.initialization import InitMessenger
from pyro.optim import LambdaLR

# this checkout's pyro_nf, not another installed copy (a worktree's run must test its own code)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import toy_densities as toy  # noqa: E402

#: AutoIAFFlow's default arguments in pyro_nf 0.2 (2 layers, ELU MADEs, the plain start): every
#: row starts from these, so the table does not move if the library's defaults do
OLD_DEFAULTS = {"num_transforms": 2, "activation": "elu", "precondition": None, "fan_in_ref": 64}
#: row name -> (AutoIAFFlow keyword arguments over OLD_DEFAULTS, overrides of the optimisation
#: settings)
ROWS = {
    "default": ({}, {}),
    "library defaults": (("library", {}), {}),  # AutoIAFFlow(model): this checkout's defaults
    "init_scale=1": ({"init_scale": 1.0}, {}),
    "init_scale=4": ({"init_scale": 4.0}, {}),
    "gelu": ({"activation": "gelu"}, {}),
    "hidden=(64,)": ({"hidden_dims": (64,)}, {}),
    "hidden=(64,), gelu": ({"hidden_dims": (64,), "activation": "gelu"}, {}),
    "K=1": ({"num_transforms": 1}, {}),
    "K=3": ({"num_transforms": 3}, {}),
    "K=4": ({"num_transforms": 4}, {}),
    "K=4, gelu": ({"num_transforms": 4, "activation": "gelu"}, {}),
    "K=3, gelu": ({"num_transforms": 3, "activation": "gelu"}, {}),
    "K=8": ({"num_transforms": 8}, {}),
    "log_scale_max=5": ({"log_scale_max": 5.0}, {}),
    "lr=0.02": ({}, {"lr": 0.02}),
    "init_scale=1, gelu": ({"init_scale": 1.0, "activation": "gelu"}, {}),
    "init_scale=1, K=4, gelu": ({"init_scale": 1.0, "num_transforms": 4, "activation": "gelu"}, {}),
    "log_scale_max=1": ({"log_scale_max": 1.0}, {}),
    "log_scale_max=0.5": ({"log_scale_max": 0.5}, {}),
    "log_scale_max=1, gelu": ({"log_scale_max": 1.0, "activation": "gelu"}, {}),
    "log_scale_max=1, K=4": ({"log_scale_max": 1.0, "num_transforms": 4}, {}),
    "log_scale_max=1, init_scale=1": ({"log_scale_max": 1.0, "init_scale": 1.0}, {}),
    "log_scale_min=-2, log_scale_max=1": ({"log_scale_min": -2.0, "log_scale_max": 1.0}, {}),
}
#: rows over this checkout's defaults (``AutoIAFFlow(model, **kwargs)``), not pyro_nf 0.2's
#: (name -> (AutoIAFFlow keyword arguments over this checkout's defaults, optimisation overrides))
LIBRARY_ROWS = {f"library defaults, K={k}": ({"num_transforms": k}, {}) for k in (2, 3, 4)} | {
    "library defaults, init_scale=1": ({"init_scale": 1.0}, {}),
    "library defaults, lr=0.02": ({}, {"lr": 0.02}),
    "library defaults, plain start": ({"precondition": None}, {}),
    "library defaults, plain start, K=4": ({"precondition": None, "num_transforms": 4}, {}),
    # what limits two layers on the banana: the variable order, the budget, the start
    "library defaults, K=1": ({"num_transforms": 1}, {}),
    "library defaults, K=1, swapped": ({"num_transforms": 1}, {"swap": True}),
    "library defaults, K=2, swapped": ({"num_transforms": 2}, {"swap": True}),
    "library defaults, swapped": ({}, {"swap": True}),
    "library defaults, K=2, 12000 steps": ({"num_transforms": 2}, {"steps": 12000}),
    "library defaults, K=1, swapped, 12000 steps": (
        {"num_transforms": 1},
        {"swap": True, "steps": 12000},
    ),
    "library defaults, K=2, best diagonal start": (
        {"num_transforms": 2, "precondition": None},
        {"start": "best diagonal"},
    ),
}
ROWS.update({name: (("library", kw), over) for name, (kw, over) in LIBRARY_ROWS.items()})


HEADER = """# What limits AutoIAFFlow on the sd-4 banana: one setting at a time

Written by `benchmarks/toy_densities_ablation.py` (see its docstring), one table per command
below, appended in the order they ran. Each row is `pyro_nf.AutoIAFFlow` with pyro_nf 0.2's
defaults (`num_transforms=2`, `activation="elu"`, `init_scale=0.1`, `hidden_dims=(16,)`,
log-scale bounds (-5, 3)) except the settings its name gives; "library defaults" is
`AutoIAFFlow(model)` with this checkout's defaults. 3000 Adam steps from lr 0.005 with
`toy_densities.py`'s cosine decay to 2% of it, 16 vectorized particles; KL(q||p) from 20000
draws (log Z exact for the banana, from quadrature on a 1000^2 grid for U1-U4).

- machine: {machine}; one torch thread per fit
"""


def machine():
    from _machine import cpu_name

    return (
        f"processor {cpu_name()}, os.cpu_count() {os.cpu_count()}, torch {torch.__version__}, "
        f"pyro {pyro.__version__}"
    )


def _swapped(energy, x):
    return energy(x.flip(-1))


def best_diagonal_start(target, sd):
    """The diagonal Gaussian closest to the banana in KL(q||p), in closed form: x1 has sd 1 and
    mean E[x2^2]/4; the variance t of x2 solves t^2/4 + t/sd^2 - 1 = 0."""
    if target != "banana":
        raise ValueError("the best diagonal start is worked out for the banana only")
    t = 2 * (math.sqrt(sd**-4 + 1) - sd**-2)
    return torch.tensor([t / 4, 0.0]), torch.tensor([1.0, math.sqrt(t)])


def fit(task):
    row, seed, a = task
    kwargs, over = ROWS[row]
    a = {**a, **over}
    torch.set_num_threads(1)
    pyro.set_rng_seed(seed + zlib.crc32(f"{a['target']}-ablation".encode()) % 100003)
    pyro.clear_param_store()
    import pyro_nf

    energy, _, _ = toy.target(a["target"], a["sd"])
    if a.get("swap"):  # the same as reversing every layer's variable order
        energy = functools.partial(_swapped, energy)
    log_z = (
        0.0
        if a["target"] == "banana"
        else toy.log_normaliser(*toy.target(a["target"])[:2], 1000)[0]
    )
    model = toy.make_model(energy)
    init_model = InitMessenger(init_to_value(values={"x": torch.zeros(2)}))(model)
    if isinstance(kwargs, tuple):  # ("library", over this checkout's defaults)
        kwargs = dict(kwargs[1])
    else:
        kwargs = {**OLD_DEFAULTS, **kwargs}
    guide = pyro_nf.AutoIAFFlow(init_model, **kwargs)
    if a.get("start") == "best diagonal":
        loc, scale = best_diagonal_start(a["target"], a["sd"])
        if a.get("swap"):
            loc, scale = loc.flip(0), scale.flip(0)
        guide.setup()
        guide.flow.set_base(loc, scale)
    elbo = Trace_ELBO(num_particles=a["particles"], vectorize_particles=True, max_plate_nesting=0)
    factor = toy.lr_factor(a["schedule"], a["steps"], 0.02)
    optim = LambdaLR({"optimizer": torch.optim.Adam, "optim_args": {"lr": a["lr"]},
                      "lr_lambda": factor})  # fmt: skip
    svi = SVI(model, guide, optim, elbo)
    t0 = time.process_time()
    for _ in range(a["steps"]):
        svi.step()
        optim.step()
    cpu = time.process_time() - t0
    with torch.no_grad():
        x, logq = toy.sample_logq(guide, 20000)
        kl = float((logq.double() + energy(x.double())).mean()) + log_z
        scale = guide.flow.base_loc_scale()[1].tolist()
    return row, seed, kl, cpu, scale


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", default=";".join(ROWS), help="rows of ROWS, separated by ';'")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--particles", type=int, default=16)
    p.add_argument("--lr", type=float, default=0.005)
    p.add_argument("--schedule", choices=("cosine", "constant"), default="cosine")
    p.add_argument("--sd", type=float, default=4.0, help="sd of x2 in the banana")
    p.add_argument("--target", default="banana", choices=toy.TARGETS, help="a toy_densities target")
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--results", help="markdown table path (appended)")
    args = p.parse_args()
    rows = args.rows.split(";")
    unknown = set(rows) - set(ROWS)
    if unknown:
        p.error(f"unknown rows {sorted(unknown)}; choose from {list(ROWS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    a = dict(vars(args))
    tasks = [(r, s, a) for r in rows for s in seeds]
    out = {}
    with ProcessPoolExecutor(args.jobs, get_context("spawn")) as ex:
        for row, seed, kl, cpu, scale in ex.map(fit, tasks):
            out.setdefault(row, []).append(kl)
            print(f"{row:28s} seed {seed}  KL {kl:.3f}  cpu {cpu:.0f} s  base scale "
                  f"{scale[0]:.2f}, {scale[1]:.2f}", flush=True)  # fmt: skip
    lines = [
        f"| row | KL per seed ({', '.join(map(str, seeds))}) | mean |",
        "|---|---|---|",
    ]
    for row in rows:
        kls = out[row]
        lines.append(f"| {row} | {' / '.join(f'{k:.3f}' for k in kls)} | {np.mean(kls):.3f} |")
    text = "\n".join(lines)
    print(text)
    if args.results:
        if not os.path.exists(args.results):
            with open(args.results, "w") as fh:
                fh.write(HEADER.format(machine=machine()))
        with open(args.results, "a") as fh:
            fh.write(f"\n`python {' '.join(sys.argv)}` (target {args.target})\n\n{text}\n")
    return math.nan


if __name__ == "__main__":
    main()
