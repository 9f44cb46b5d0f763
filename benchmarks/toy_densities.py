"""Fit 2-D toy densities with pyro_nf flow guides and with Pyro's own guides.

Targets (z = (z1, z2) is the single latent site ``x`` of shape (2,)):

* U1-U4 are the unnormalised energies of Rezende & Mohamed (2015), "Variational
  Inference with Normalizing Flows", Table 1 / Figure 3, with
  w1 = sin(2 pi z1 / 4), w2 = 3 exp(-0.5 ((z1 - 1) / 0.6)^2),
  w3 = 3 sigmoid((z1 - 1) / 0.3); the log(exp(a) + exp(b)) terms use logsumexp.
  U2, U3 and U4 do not depend on the magnitude of z1, so exp(-U) is not
  integrable.  To make KL(q||p) well defined we add a soft box penalty
  B(z1) = 0.5 * (max(|z1| - 4, 0) / 0.5)^2 to U2, U3 and U4 (flat on the
  paper's window |z1| <= 4, Gaussian tails of sd 0.5 outside).  U1 is proper
  and is used unchanged.
* banana: the seeds' p(x1, x2) = N(x1 | x2^2 / 4, 1) N(x2 | 0, 4), where N(. | m, s)
  has *standard deviation* s, i.e. x2 has sd 4 (variance 16).  Its energy is the
  exact negative normalised log density, so log Z = 0; the quadrature is checked
  against this.  ``--banana-sd S`` sets the sd of x2; ``--banana-sd 2`` is the
  labelled sd-2 variant (an earlier reading of N(x2 | 0, 4) as a variance).

Each target is the model ``x ~ ImproperUniform(real, (), (2,))`` plus
``pyro.factor("U", -U(x))``.  Guides: pyro_nf.AutoPlanarFlow, AutoRadialFlow,
AutoIAFFlow and AutoSplineFlow at several depths, and Pyro's AutoNormalizingFlow
(16 planar layers), AutoIAFNormal and AutoNormal, all with the same steps, learning-rate
schedule and particles (8, vectorized), each over three training seeds (``--num-seeds``).
The schedule (``--schedule``) is a cosine decay of Adam's learning rate from ``--lr`` (0.005)
to 2% of it at the last step: at a constant rate the fitted parameters keep jittering and the
final KL is that of a random late iterate. Pyro's guides also run at the constant rate
(rows "constant lr"), and "best Pyro flow" in the goals is the better of the two, so the
schedule cannot handicap them. Two spline rows use a deeper MADE and 16 bins. Rows marked GELU
build the MADEs with ``activation="gelu"`` instead of the default ELU; each is the twin of the
ELU row with the same settings and draws the same random numbers, so the pair isolates the
nonlinearity. Each configuration runs over three training seeds (``--num-seeds``):
on these energies one seed's KL can differ from another's by a factor of
several, because reverse KL settles in optima that cover part of the target,
so the tables give the mean and sd over seeds and the goals use the mean.  Metric: KL(q||p) = E_q[log q(x) + U(x)] + log Z, with log Z from
midpoint quadrature on a fine grid and E_q from ``--samples`` draws of the fitted
guide (reported as mean +- standard error).  log q is the sum of the guide's
sample-site log densities in a vectorised trace; for pyro_nf guides it is also
cross-checked against ``guide.get_posterior().log_prob`` on fresh copies.
pyro_nf guides use init_scale 1 (the N(0, I) start of Pyro's flow guides) and
AutoIAFFlow / AutoSplineFlow hidden_dims (64,); see --init-scale and --hidden.

Pyro's AutoNormalizingFlow and AutoIAFNormal initialise with init_to_feasible
(and pyro_nf's default init falls back to it), which cannot sample an
ImproperUniform site, so every guide is built on the
model wrapped in ``InitMessenger(init_to_value(x=0))``; SVI uses the bare model.

Run (from the repository root)::

    python benchmarks/toy_densities.py              # full run, all cores
    python benchmarks/toy_densities.py --quick      # short CI configuration
    python benchmarks/toy_densities.py --targets banana,U1 --guides iaf,pyro-iaf

Figure: ``--out`` (default benchmarks/output); table: ``--results`` (default
benchmarks/results/toy_densities.md, or toy_densities_quick.md with --quick).
Fits run in ``--jobs`` processes with one torch thread each; every fit is
seeded from ``--seed`` and its own name, so results do not depend on --jobs.
Cost (2-core AMD EPYC, torch 2.13): the full run (330 fits) is about 8500
CPU-seconds of fitting (72 minutes on 2 cores), --quick about 30.
"""

import argparse
import functools
import math
import os
import platform
import sys
import time
import zlib
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions import constraints
from pyro.distributions.transforms import iterated, planar
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoIAFNormal, AutoNormal, AutoNormalizingFlow, init_to_value
from pyro.infer.autoguide.initialization import InitMessenger
from pyro.optim import LambdaLR

# Let `python benchmarks/toy_densities.py` find the checkout's pyro_nf when it is not installed.
# this checkout's pyro_nf, not another installed copy (a run in a worktree measures its own code)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# ----------------------------------------------------------------------------- targets


def _w1(z1):
    return torch.sin(2 * math.pi * z1 / 4)


def _lse2(a, b):
    return torch.logsumexp(torch.stack([a, b]), dim=0)


def soft_box(z1):
    return 0.5 * (torch.relu(z1.abs() - 4.0) / 0.5) ** 2


def u1(z):
    z1 = z[..., 0]
    r = z.pow(2).sum(-1).sqrt()
    modes = _lse2(-0.5 * ((z1 - 2) / 0.6) ** 2, -0.5 * ((z1 + 2) / 0.6) ** 2)
    return 0.5 * ((r - 2) / 0.4) ** 2 - modes


def u2(z):
    z1, z2 = z[..., 0], z[..., 1]
    return 0.5 * ((z2 - _w1(z1)) / 0.4) ** 2 + soft_box(z1)


def u3(z):
    z1, z2 = z[..., 0], z[..., 1]
    w2 = 3 * torch.exp(-0.5 * ((z1 - 1) / 0.6) ** 2)
    d = z2 - _w1(z1)
    return -_lse2(-0.5 * (d / 0.35) ** 2, -0.5 * ((d + w2) / 0.35) ** 2) + soft_box(z1)


def u4(z):
    z1, z2 = z[..., 0], z[..., 1]
    w3 = 3 * torch.sigmoid((z1 - 1) / 0.3)
    d = z2 - _w1(z1)
    return -_lse2(-0.5 * (d / 0.4) ** 2, -0.5 * ((d + w3) / 0.35) ** 2) + soft_box(z1)


def u_banana(z, sd=4.0):
    x1, x2 = z[..., 0], z[..., 1]
    return 0.5 * (x1 - x2**2 / 4) ** 2 + 0.5 * (x2 / sd) ** 2 + math.log(sd * 2 * math.pi)


TARGETS = ("U1", "U2", "U3", "U4", "banana")


def target(name, banana_sd=4.0):
    """(energy, quadrature box (x1lo, x1hi, x2lo, x2hi), plot box) of a target."""
    if name == "banana":
        s = banana_sd
        return (
            functools.partial(u_banana, sd=s),
            (-8, 9 * s**2 + 8, -6 * s, 6 * s),
            (-4, 3.5 * s**2, -3.5 * s, 3.5 * s),
        )
    return {"U1": u1, "U2": u2, "U3": u3, "U4": u4}[name], (-8, 8, -8, 8), (-5, 5, -5, 5)


def make_model(energy):
    def model():
        x = pyro.sample("x", dist.ImproperUniform(constraints.real, (), (2,)))
        pyro.factor("U", -energy(x))

    return model


def grid(box, n):
    """Midpoint grid on box: returns points (n*n, 2) float64 and cell area."""
    x1lo, x1hi, x2lo, x2hi = box
    h1, h2 = (x1hi - x1lo) / n, (x2hi - x2lo) / n
    g1 = torch.linspace(x1lo + h1 / 2, x1hi - h1 / 2, n, dtype=torch.float64)
    g2 = torch.linspace(x2lo + h2 / 2, x2hi - h2 / 2, n, dtype=torch.float64)
    a, b = torch.meshgrid(g1, g2, indexing="xy")  # rows index x2, columns x1
    return torch.stack([a, b], -1).reshape(-1, 2), h1 * h2


def log_normaliser(energy, box, n):
    """log Z by quadrature, and the fraction of mass in the outer 2% frame of the box."""
    pts, area = grid(box, n)
    logp = -energy(pts).reshape(n, n)
    log_z = (torch.logsumexp(logp.flatten(), 0) + math.log(area)).item()
    k = max(1, n // 50)
    inner = torch.logsumexp(logp[k:-k, k:-k].flatten(), 0) + math.log(area)
    return log_z, 1.0 - math.exp(inner.item() - log_z)


# ----------------------------------------------------------------------------- guides

PYRO_GUIDES = [("pyro-planar", 16, ""), ("pyro-iaf", 1, ""), ("pyro-normal", 0, "")]
# Pyro's guides also run under a constant learning rate, and "best Pyro flow" is the better of the
# two schedules: the schedule of the table never handicaps them.
PYRO_CONSTANT = [(f, k, "constant lr") for f, k, _ in PYRO_GUIDES]
FULL_GUIDES = [("planar", k, "") for k in (8, 16, 32)] + [("radial", k, "") for k in (8, 32)]
FULL_GUIDES += [("iaf", k, "") for k in (1, 2, 4)] + [("spline", k, "") for k in (1, 2)]
# AutoIAFFlow(model) and AutoSplineFlow(model) as a user calls them: every argument at its default
# (init_scale, MADE width, activation, K: the K of these rows is only a label, 0)
FULL_GUIDES += [("iaf", 0, "default arguments"), ("spline", 0, "default arguments")]
FULL_GUIDES += [("spline", 1, "2x64, 16 bins"), ("spline", 1, "3x64, 16 bins")]
# the same guides with GELU MADEs (activation="gelu"): twins of rows above, drawing the same numbers
FULL_GUIDES += [("iaf", 2, "GELU"), ("iaf", 4, "GELU")]
FULL_GUIDES += [("spline", 1, "2x64, 16 bins, GELU"), ("spline", 1, "3x64, 16 bins, GELU")]
FULL_GUIDES += PYRO_GUIDES + PYRO_CONSTANT
QUICK_GUIDES = [("planar", 8, ""), ("radial", 8, ""), ("iaf", 2, ""), ("spline", 1, "")]
QUICK_GUIDES += PYRO_GUIDES
PYRO_NF = ("planar", "radial", "iaf", "spline")
#: a variant's settings over the command line's: splines with a deeper MADE and 16 bins, MADEs
#: with GELU instead of ELU, and "constant lr", which keeps the learning rate constant whatever
#: --schedule says
VARIANTS = {
    "": {},
    "2x64, 16 bins": {"hidden": [64, 64], "spline_bins": 16},
    "3x64, 16 bins": {"hidden": [64, 64, 64], "spline_bins": 16},
    "constant lr": {"schedule": "constant"},
    "default arguments": {"defaults": True},
}
# the GELU twin of each MADE variant: its settings plus activation="gelu"
for _v in ("", "2x64, 16 bins", "3x64, 16 bins"):
    VARIANTS[f"{_v}, GELU" if _v else "GELU"] = {**VARIANTS[_v], "activation": "gelu"}
#: settings that change no random draw (a learning rate, a parameter-free nonlinearity): a variant
#: that differs from another only in these is its twin and is seeded like it
DRAW_FREE = ("schedule", "activation")


def seed_tag(name, family, k, variant):
    """What a fit's seed hashes: target, family, K and the variant's draw-changing settings."""
    drawn = {key: v for key, v in VARIANTS[variant].items() if key not in DRAW_FREE}
    twin = next(n for n, v in VARIANTS.items() if v == drawn)
    return f"{name}/{family}/{k}" + (f"/{twin}" if twin else "")


NAMES = {
    "planar": "AutoPlanarFlow",
    "radial": "AutoRadialFlow",
    "iaf": "AutoIAFFlow",
    "spline": "AutoSplineFlow",
    "pyro-planar": "AutoNormalizingFlow (16 planar)",
    "pyro-iaf": "AutoIAFNormal",
    "pyro-normal": "AutoNormal",
}


def label(family, k, variant=""):
    if variant == "default arguments":
        return f"pyro_nf.{NAMES[family]}, default arguments"
    name = f"pyro_nf.{NAMES[family]} K={k}" if family in PYRO_NF else f"Pyro {NAMES[family]}"
    v = VARIANTS[variant]
    if "hidden" in v:
        gelu = ", GELU" if v.get("activation") == "gelu" else ""
        return f"{name}, hidden {tuple(v['hidden'])}, {v['spline_bins']} bins{gelu}"
    return f"{name}, {variant}" if variant else name


def schedule_text(a):
    if a.get("schedule", "constant") == "constant":
        return "(constant)"
    return f"(cosine decay to {a['lr'] * a['lr_final']:g} at the last step)"


def settings(a, variant):
    """The command line's settings with a variant's applied."""
    return {**a, **VARIANTS[variant]}


def lr_factor(schedule, steps, final):
    """Multiplier of the learning rate at step t: 1, or a cosine from 1 down to ``final``."""
    if schedule == "constant":
        return lambda t: 1.0
    if schedule == "cosine":
        return lambda t: final + (1 - final) * 0.5 * (1 + math.cos(math.pi * t / max(steps - 1, 1)))
    raise ValueError(f"schedule must be 'constant' or 'cosine', got {schedule!r}")


def make_guide(
    family, k, model, init_scale, hidden, spline_bins=8, spline_bound=5.0, activation="elu",
    defaults=False,
):  # fmt: skip
    """The guide of a row; ``defaults``: a pyro_nf guide with every argument at its default."""
    if family in PYRO_NF:
        import pyro_nf

        if defaults:
            return getattr(pyro_nf, NAMES[family])(model)
        kwargs = {}
        if family in ("iaf", "spline"):
            # fan_in_ref=64: the MADE steps of the committed tables (pyro_nf 0.2's autoguide
            # default; 16 since 0.3, which the rows 'default arguments' use)
            kwargs.update(hidden_dims=tuple(hidden), activation=activation, fan_in_ref=64)
        if family == "spline":
            kwargs.update(num_bins=spline_bins, bound=spline_bound)
        guide_class = getattr(pyro_nf, NAMES[family])
        # the plain start (not the default Laplace start): the table's configurations are fixed
        return guide_class(
            model, num_transforms=k, init_scale=init_scale, precondition=None, **kwargs
        )
    if family == "pyro-planar":
        return AutoNormalizingFlow(model, functools.partial(iterated, k, planar))
    if family == "pyro-iaf":
        return AutoIAFNormal(model, num_transforms=k)
    return AutoNormal(model)


def sample_logq(guide, n):
    """n draws x ~ q and log q(x): sum of the guide's site log densities in a vectorised trace."""

    def vectorised():
        with pyro.plate("_mc", n, dim=-1):
            guide()

    tr = poutine.trace(vectorised).get_trace()
    logq = 0.0
    for name, site in tr.nodes.items():
        if site["type"] == "sample" and name != "_mc":
            logq = logq + site["fn"].log_prob(site["value"])
    return tr.nodes["x"]["value"].reshape(n, 2), logq


def density_image(guide, family, x, box, res):
    """(res, res) image of q on the plot box: exp(log q) on a grid for pyro_nf, else a histogram."""
    if family in PYRO_NF:
        pts, _ = grid(box, res)
        try:
            log_q = guide.get_posterior().log_prob(pts.float())
            return log_q.exp().reshape(res, res).numpy(), "density"
        except Exception as e:  # report, fall back to the histogram
            print(f"  [{label(family, 0)}] grid log_prob failed: {e!r}")
    x = x.numpy()
    h, _, _ = np.histogram2d(x[:, 1], x[:, 0], bins=res, range=[box[2:], box[:2]], density=True)
    return h, "histogram"


def _warm_up():
    """Per-process one-off costs (torch's lazy torch._dynamo import in Adam) outside the timers."""
    torch.set_num_threads(1)
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])


def fit_one(task):
    """Fit one guide to one target with one seed; return metrics and a plot image (in a worker)."""
    name, family, k, variant, seed, a, log_z = task
    a = settings(a, variant)
    torch.set_num_threads(1)
    # a twin (the "constant lr" or GELU row of a guide) draws the same random numbers as the guide
    tag = seed_tag(name, family, k, variant)
    pyro.set_rng_seed(seed + zlib.crc32(tag.encode()) % 100003)
    pyro.clear_param_store()
    energy, _, plot_box = target(name, a["banana_sd"])
    model = make_model(energy)
    init_model = InitMessenger(init_to_value(values={"x": torch.zeros(2)}))(model)
    res = dict(
        target=name,
        family=family,
        k=k,
        variant=variant,
        seed=seed,
        kl=math.nan,
        se=math.nan,
        is_ratio=math.nan,
        check=math.nan,
        seconds=math.nan,
        cpu=math.nan,
        image=np.zeros((a["res"],) * 2),
        kind="failed",
    )
    try:
        guide = make_guide(
            family, k, init_model, a["init_scale"], a["hidden"],
            a.get("spline_bins", 8), a.get("spline_bound", 5.0), a.get("activation", "elu"),
            a.get("defaults", False),
        )  # fmt: skip
        elbo = Trace_ELBO(
            num_particles=a["particles"],
            vectorize_particles=a["particles"] > 1,
            max_plate_nesting=0,
        )
        # a constant factor gives exactly the updates of a plain pyro.optim.Adam
        factor = lr_factor(a["schedule"], a["steps"], a["lr_final"])
        optim = LambdaLR({"optimizer": torch.optim.Adam, "optim_args": {"lr": a["lr"]},
                          "lr_lambda": factor})  # fmt: skip
        svi = SVI(model, guide, optim, elbo)
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(a["steps"]):
            svi.step()
            optim.step()  # the scheduler: step t + 1 uses lr * factor(t + 1)
        res["seconds"], res["cpu"] = time.perf_counter() - t0, time.process_time() - c0
        with torch.no_grad():
            x, logq = sample_logq(guide, a["samples"])
            if family in PYRO_NF:  # exact log_prob of fresh tensors must agree with the trace
                res["check"] = (guide.get_posterior().log_prob(x.clone()) - logq).abs().max().item()
            log_w = (-energy(x.double()) - logq.double()).numpy()  # log p~(x) - log q(x)
            terms = log_z - log_w
            res["kl"], res["se"] = terms.mean(), terms.std(ddof=1) / math.sqrt(len(terms))
            res["is_ratio"] = np.exp(log_w - log_z).mean()  # E_q[p/q], ~1 (see markdown)
            res["image"], res["kind"] = density_image(guide, family, x, plot_box, a["res"])
    except Exception as e:  # keep the other fits; the failure shows as nan in the tables
        print(f"FAILED {name} {label(family, k, variant)}: {e!r}")
    return res


# ----------------------------------------------------------------------------- output


def aggregate(runs, seeds):
    """Per (target, family, K, variant): the metrics over seeds; the image is the median-KL seed's
    fit."""
    out = {}
    for key in {r[:4] for r in runs}:
        rs = [runs[(*key, s)] for s in seeds]
        kls = np.array([r["kl"] for r in rs])
        ok = np.isfinite(kls)
        finite = [r for r, good in zip(rs, ok) if good]
        median = sorted(finite, key=lambda r: r["kl"])[(len(finite) - 1) // 2] if finite else rs[0]
        out[key] = dict(
            target=key[0],
            family=key[1],
            k=key[2],
            variant=key[3],
            kls=kls,
            # a failed seed makes the mean nan: it is never quietly left out
            kl=kls.mean() if ok.all() else math.nan,
            kl_sd=kls.std(ddof=1) if len(kls) > 1 and ok.all() else math.nan,
            se=max(r["se"] for r in rs),
            is_ratio=np.mean([r["is_ratio"] for r in rs]),
            check=max((r["check"] for r in rs if np.isfinite(r["check"])), default=math.nan),
            seconds=np.mean([r["seconds"] for r in rs]),
            cpu=np.mean([r["cpu"] for r in rs]),
            image=median["image"],
            kind=median["kind"],
            median_kl=median["kl"],
        )
    return out


def plot(results, targets, guides, quad, path, res, banana_sd):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fams = ("planar", "radial", "iaf", "spline", "pyro-planar", "pyro-iaf", "pyro-normal")
    cols = [(fam, [(k, v) for f, k, v in guides if f == fam]) for fam in fams]
    cols = [c for c in cols if c[1]]  # best configuration of each family, in this order
    nr, nc = len(targets), len(cols) + 1
    fig, axes = plt.subplots(nr, nc, figsize=(2.2 * nc, 2.2 * nr), squeeze=False)
    for i, t in enumerate(targets):
        energy, _, box = target(t, banana_sd)
        pts, _ = grid(box, res)
        true = (-energy(pts) - quad[t][0]).exp().reshape(res, res).numpy()
        panels = [("true density", true, "")]
        for fam, ks in cols:
            rs = [results[(t, fam, k, v)] for k, v in ks]
            best = min(rs, key=lambda r: r["kl"] if np.isfinite(r["kl"]) else math.inf)  # mean
            name = label(fam, best["k"]).split(" K=")[0].replace("pyro_nf.", "")
            v = best["variant"]
            parts = [f"K={best['k']}"] if fam in PYRO_NF and v != "default arguments" else []
            short = {"constant lr": "const. lr", "default arguments": "default arguments"}
            parts += [short.get(v, f"MADE {v}")] if v else []
            note = f"KL={best['median_kl']:.3f} (median seed)"
            if parts:
                note = ", ".join(parts) + "\n" + note
            panels.append((name.replace(" (", "\n("), best["image"], note))
        for j, (title, img, note) in enumerate(panels):
            ax = axes[i, j]
            ax.imshow(img, origin="lower", extent=box, aspect="auto", cmap="viridis")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.text(0.03, 0.97, note, transform=ax.transAxes, va="top", fontsize=7, color="w")
            if i == 0:
                ax.set_title(title, fontsize=8)
            if j == 0:
                ax.set_ylabel(t)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def default_arguments():
    """The defaults of AutoIAFFlow / AutoSplineFlow that matter here, as text."""
    import inspect

    import pyro_nf
    from pyro_nf.guides import GuideOptions

    def value(cls, name):
        return inspect.signature(cls).parameters[name].default

    iaf, spline = pyro_nf.AutoIAFFlow, pyro_nf.AutoSplineFlow
    return (
        f"init_scale {GuideOptions().init_scale}, MADE hidden_dims (16,) for D = 2, "
        f"activation {value(iaf, 'activation')!r}, AutoIAFFlow K={value(iaf, 'num_transforms')}, "
        f"AutoSplineFlow K={value(spline, 'num_transforms')} with {value(spline, 'num_bins')} bins, "
        f"fan_in_ref {value(iaf, 'fan_in_ref')} (no effect at this width)"
    )


def markdown(results, runs, targets, guides, quad, a, wall):
    from _machine import cpu_name  # benchmarks/_machine.py, beside this script

    checks = [r["check"] for r in results.values() if np.isfinite(r["check"])]
    out = [
        "# Toy 2-D densities: KL(q||p) of fitted guides",
        "",
        f"Generated by `{a['cmd']}`; see the script's docstring for the targets and the method.",
        "",
        "## Settings",
        "",
        f"- steps {a['steps']}, Adam lr {a['lr']} {schedule_text(a)}, ELBO particles "
        f"{a['particles']} (vectorized), the same for every guide"
        + (
            "; Pyro's guides also with a constant lr (rows 'constant lr'), and 'best Pyro flow' "
            "in the goals is the better of the two schedules"
            if any(v == "constant lr" for _, _, v in guides)
            else ""
        ),
        f"- training seeds {', '.join(map(str, a['seeds']))} for every configuration; a fit's "
        "seed is the training seed plus a hash of its target, family, K and (for the rows "
        "with other MADE sizes) variant; a GELU or 'constant lr' row draws the same random "
        "numbers as its twin without that setting",
        f"- KL Monte Carlo samples per fit {a['samples']}; quadrature grid {a['quad']}^2 points",
        f"- pyro_nf: init_scale {a['init_scale']}, AutoIAFFlow and AutoSplineFlow hidden_dims "
        f"{tuple(a['hidden'])} with ELU and fan_in_ref 64 (set explicitly), AutoSplineFlow "
        f"{a['spline_bins']} bins on [-{a['spline_bound']:g}, {a['spline_bound']:g}] (rows that "
        "name other hidden sizes, bins or GELU use those); rows 'default arguments': the guide "
        f"with every argument at its default ({default_arguments()}); Pyro guides: their defaults",
        f"- machine: processor {cpu_name()}, machine {platform.machine()}, "
        f"os.cpu_count() {os.cpu_count()}, torch {torch.__version__}, pyro {pyro.__version__}",
        f"- each fit in its own process with torch.get_num_threads() = 1; {a['jobs']} parallel "
        f"fits; total wall time {wall:.0f} s; sum of the fits' CPU times "
        f"{sum(r['cpu'] for r in runs.values()):.0f} s (wall time on an idle machine is about "
        "this over the number of parallel fits)",
        "- max |get_posterior().log_prob(x) - log q(x) from the trace| over pyro_nf fits: "
        + (f"{max(checks):.1e}" if checks else "n/a"),
        "",
        "## Targets",
        "",
        "- U1-U4: Rezende & Mohamed (2015), Table 1. U2, U3, U4 plus the soft box "
        "0.5 * (max(|z1| - 4, 0) / 0.5)^2 so that they are normalisable; U1 unchanged.",
        f"- banana: N(x1 | x2^2/4, 1) N(x2 | 0, s^2) with sd s = {a['banana_sd']:g}"
        + {
            4: " (the seeds' banana).",
            2: " (the sd-2 variant: N(x2 | 0, 4) read as a variance).",
        }.get(a["banana_sd"], "."),
        "",
        "| target | quadrature box | log Z | mass in outer 2% frame |",
        "|---|---|---|---|",
    ]
    for t in targets:
        box = target(t, a["banana_sd"])[1]
        out.append(f"| {t} | {box} | {quad[t][0]:.5f} | {quad[t][1]:.1e} |")
    se = max((r["se"] for r in runs.values() if np.isfinite(r["se"])), default=math.nan)
    n = len(a["seeds"])
    tables = [
        (
            f"KL(q||p): mean over the {n} training seeds +- their standard deviation "
            f"(the Monte Carlo standard error of each fit's KL is at most {se:.3f})",
            lambda r: f"{r['kl']:.3f} +- {r['kl_sd']:.3f}" if n > 1 else f"{r['kl']:.3f}",
        ),
        ("KL(q||p) per training seed", lambda r: " / ".join(f"{v:.3f}" for v in r["kls"])),
        (
            "Fit time (s), mean over seeds: wall (CPU)",
            lambda r: f"{r['seconds']:.1f} ({r['cpu']:.1f})",
        ),
        (
            "Check: E_q[p/q] (mean over seeds), about 1 when log q is right and q covers p",
            lambda r: f"{r['is_ratio']:.3f}",
        ),
        (
            "Check: max over the MC samples and seeds of |get_posterior().log_prob(x) - trace "
            "log q(x)|",
            lambda r: f"{r['check']:.1e}" if np.isfinite(r["check"]) else "-",
        ),
    ]
    for title, fmt in tables:
        out += [
            "",
            f"## {title}",
            "",
            "| guide | " + " | ".join(targets) + " |",
            "|---" * (len(targets) + 1) + "|",
        ]
        for f, k, v in guides:
            cells = " | ".join(fmt(results[(t, f, k, v)]) for t in targets)
            out.append(f"| {label(f, k, v)} | {cells} |")
    out += [
        "",
        "## Goals (set for the full configuration; judged on the mean KL over seeds)",
        "",
    ] + [f"- {g}" for g in goals(results, targets, guides, a["banana_sd"], a["particles"])]
    return "\n".join(out) + "\n"


def goals(results, targets, guides, banana_sd=4.0, particles=16):
    """The goals' verdicts: on the sd-4 banana (issue #23) pyro_nf's best KL <= 0.05 and
    ``AutoIAFFlow`` with its default arguments <= 0.15 (set at 16 particles: ``--particles 16``,
    the table's default is 8); on the sd-2
    variant the earlier goals; on U1-U4 pyro_nf's best at most half Pyro's best flow."""

    def best(t, fams, k=None, variants=None):
        rs = [
            results[(t, f, j, v)]
            for f, j, v in guides
            if f in fams and k in (None, j) and (variants is None or v in variants)
        ]
        return min((r["kl"] for r in rs), default=math.nan)

    def verdict(value, ok):
        return "not run" if not np.isfinite(value) else ("PASS" if ok else "FAIL")

    lines = []
    if "banana" in targets and banana_sd == 4:
        kl = best("banana", PYRO_NF)
        lines.append(f"banana: best pyro_nf KL {kl:.3f} <= 0.05: {verdict(kl, kl <= 0.05)}")
        kl = best("banana", ["iaf"], variants=["default arguments"])
        lines.append(
            f"banana: AutoIAFFlow with default arguments KL {kl:.3f} <= 0.15: "
            + verdict(kl, kl <= 0.15)
            + (
                ""
                if particles == 16
                else f" (at this run's {particles} particles; the goal is "
                "set at 16: toy_densities_ablation.py's rows 'library defaults')"
            )  # fmt: skip
        )
    elif "banana" in targets:  # the sd-2 variant's goals (the earlier issue's)
        kl = best("banana", ["iaf"])
        lines.append(f"banana: best AutoIAFFlow KL {kl:.3f} <= 0.03: {verdict(kl, kl <= 0.03)}")
        kl = best("banana", ["planar"], 16, [""])
        lines.append(f"banana: AutoPlanarFlow K=16 KL {kl:.3f} <= 0.15: {verdict(kl, kl <= 0.15)}")
    for t in [t for t in targets if t != "banana"]:
        # Pyro's best flow: over every Pyro flow row, both learning-rate schedules
        ours, theirs = best(t, PYRO_NF), best(t, ["pyro-planar", "pyro-iaf"])
        ok = verdict(ours + theirs, ours <= 0.5 * theirs)
        lines.append(f"{t}: best pyro_nf KL {ours:.3f} <= 0.5 x best Pyro flow {theirs:.3f}: {ok}")
    return lines


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, help="Adam steps per fit (3000; 300 with --quick)")
    p.add_argument("--lr", type=float, default=0.005, help="Adam's (peak) learning rate")
    p.add_argument(
        "--schedule", choices=("cosine", "constant"), default="cosine",
        help="learning rate over the steps, every guide: cosine from --lr down to --lr x "
        "--lr-final (default), or constant; Pyro's guides also run at a constant rate",
    )  # fmt: skip
    p.add_argument(
        "--lr-final", type=float, default=0.02,
        help="the cosine schedule's last learning rate as a fraction of --lr (0.02)",
    )  # fmt: skip
    p.add_argument("--particles", type=int, default=8, help="ELBO particles, every guide (8)")
    p.add_argument("--seed", type=int, default=0, help="first training seed")
    p.add_argument("--num-seeds", type=int, help="training seeds per fit (3; 1 with --quick)")
    p.add_argument("--targets", default=",".join(TARGETS))
    p.add_argument(
        "--guides", help="subset of planar,radial,iaf,spline,pyro-planar,pyro-iaf,pyro-normal"
    )
    p.add_argument("--samples", type=int, help="MC samples for KL (20000; 4000 with --quick)")
    p.add_argument(
        "--banana-sd", type=float, default=4.0,
        help="sd of x2 in the banana (4, the seeds' banana; 2: the sd-2 variant)",
    )  # fmt: skip
    p.add_argument("--init-scale", type=float, default=1.0, help="init_scale of pyro_nf guides")
    p.add_argument(
        "--hidden", default="64", help="AutoIAFFlow / AutoSplineFlow hidden_dims, e.g. 64 or 64,64"
    )
    p.add_argument("--spline-bins", type=int, default=8, help="AutoSplineFlow num_bins")
    p.add_argument("--spline-bound", type=float, default=5.0, help="AutoSplineFlow bound")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel fits")
    p.add_argument("--quick", action="store_true", help="short CI configuration")
    p.add_argument("--out", default="benchmarks/output", help="directory for the figure")
    p.add_argument("--results", help="markdown table path")
    a = p.parse_args()
    sfx = "_quick" if a.quick else ""
    a.cmd = " ".join(["python", *sys.argv])
    a.hidden = [int(h) for h in a.hidden.split(",")]
    a.steps = a.steps or (300 if a.quick else 3000)
    a.num_seeds = a.num_seeds or (1 if a.quick else 3)
    if a.num_seeds < 1 or a.particles < 1:
        p.error("--num-seeds and --particles must be at least 1")
    if not 0 < a.lr_final <= 1:
        p.error("--lr-final must be in (0, 1]")
    a.seeds = list(range(a.seed, a.seed + a.num_seeds))
    a.samples = a.samples or (4000 if a.quick else 20000)
    a.quad, a.res = (400, 80) if a.quick else (1000, 150)
    a.results = a.results or f"benchmarks/results/toy_densities{sfx}.md"
    targets = a.targets.split(",")
    guides = QUICK_GUIDES if a.quick else FULL_GUIDES
    if a.schedule == "constant":  # the constant-lr twins would repeat the rows
        guides = [g for g in guides if g[2] != "constant lr"]
    if a.guides:
        chosen = a.guides.split(",")
        unknown = set(chosen) - set(NAMES)
        if unknown:
            p.error(f"unknown --guides {sorted(unknown)}; choose from {list(NAMES)}")
        guides = [g for g in guides if g[0] in chosen]
    torch.set_num_threads(1)
    t_start = time.perf_counter()

    quad = {t: log_normaliser(*target(t, a.banana_sd)[:2], a.quad) for t in targets}
    for t in targets:
        exact = "  [exact: 0]" if t == "banana" else ""
        print(f"{t}: log Z = {quad[t][0]:.6f} (mass in outer 2% frame {quad[t][1]:.1e}){exact}")

    cfg = dict(vars(a))
    tasks = [
        (t, f, k, v, s, cfg, quad[t][0]) for t in targets for f, k, v in guides for s in a.seeds
    ]
    tasks.sort(key=lambda task: -(task[2] + 1))  # deepest first, for load balance
    out = []
    with ProcessPoolExecutor(a.jobs, get_context("spawn"), initializer=_warm_up) as ex:
        for r in ex.map(fit_one, tasks):  # in order, so progress lags the fastest fits a little
            out.append(r)
            print(
                f"[{len(out)}/{len(tasks)}] {r['target']:6s} "
                f"{label(r['family'], r['k'], r['variant']):34s} "
                f"seed {r['seed']}  KL {r['kl']:.3f} +- {r['se']:.3f}  {r['seconds']:.0f} s  "
                f"check {r['check']:.1e}",
                flush=True,
            )
    runs = {(r["target"], r["family"], r["k"], r["variant"], r["seed"]): r for r in out}
    results = aggregate(runs, a.seeds)
    wall = time.perf_counter() - t_start

    print(
        f"\nKL(q||p), mean +- sd over seeds {a.seeds} [fit seconds]  ({a.steps} steps, "
        f"lr {a.lr} {schedule_text(cfg)}, {a.particles} particle(s), {a.samples} MC samples)"
    )
    print(f"{'guide':66s}" + "".join(f"{t:>24s}" for t in targets))
    for f, k, v in guides:
        rs = [results[(t, f, k, v)] for t in targets]
        cells = [f"{r['kl']:>9.3f} +-{r['kl_sd']:6.3f} [{r['seconds']:4.0f}s]" for r in rs]
        print(f"{label(f, k, v):66s}" + "".join(cells))
    checks = [r["check"] for r in out if np.isfinite(r["check"])]
    if checks:
        print(f"max |get_posterior().log_prob - trace log q| (pyro_nf fits): {max(checks):.1e}")
    print("\n".join(goals(results, targets, guides, a.banana_sd, a.particles)))
    cpu = sum(r["cpu"] for r in out)
    print(f"total wall time {wall:.0f} s with {a.jobs} parallel fit(s); fits' CPU time {cpu:.0f} s")

    os.makedirs(a.out, exist_ok=True)
    fig_path = os.path.join(a.out, f"toy_densities{sfx}.png")
    plot(results, targets, guides, quad, fig_path, a.res, a.banana_sd)
    os.makedirs(os.path.dirname(a.results) or ".", exist_ok=True)
    with open(a.results, "w") as fh:
        fh.write(markdown(results, runs, targets, guides, quad, cfg, wall))
    print(f"wrote {fig_path} and {a.results}")


if __name__ == "__main__":
    main()
