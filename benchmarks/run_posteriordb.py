"""Benchmark: pyro_nf's flow guides against Pyro's autoguides on posteriordb, scored on NUTS draws.

Run (from the repository root)::

    python benchmarks/run_posteriordb.py --posteriordb PATH                 # full run (8 posteriors)
    python benchmarks/run_posteriordb.py --posteriordb PATH --quick         # smoke run, ~1 minute

``PATH`` is the ``posterior_database`` folder of a posteriordb checkout. Every guide is fitted with
:func:`pyro_nf.fit` under the same budget (steps, Adam learning rate and schedule, ELBO particles,
seeds), then scored against the posterior's pooled reference draws:

* ELBO (with its standard error) and PSIS k-hat from :func:`pyro_nf.diagnose`;
* for every reference parameter, from ``--samples`` guide draws: ``|mean - ref mean| / ref sd``,
  ``|log(sd / ref sd)|`` and the 1-Wasserstein distance of the marginals divided by the reference
  sd (``scipy.stats.wasserstein_distance``), each averaged over the parameters;
* wall time of the fit and time per step.

Writes ``OUT/NAME.md`` (settings, machine, summary and per-posterior tables), ``OUT/NAME.jsonl`` (one
line per fit; ``--resume`` skips the fits already there), ``OUT/NAME_w1.png`` (heatmap of the
standardized W1) and ``OUT/NAME_khat.png`` (k-hat per posterior and guide). ``NAME`` is
``posteriordb`` (``posteriordb_quick`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
# this checkout's pyro_nf first, not another installed copy (a worktree's run tests its own code)
for _p in (os.path.dirname(HERE), HERE):
    if _p in sys.path:
        sys.path.remove(_p)
    sys.path.insert(0, _p)

from posteriors import POSTERIORS, load_posterior  # noqa: E402

FULL_POSTERIORS = list(POSTERIORS)
QUICK_POSTERIORS = ["eight_schools-eight_schools_noncentered", "sblrc-blr"]
PYRO_GUIDES = [
    "AutoNormal",
    "AutoMultivariateNormal",
    "AutoNormalizingFlow",
    "AutoIAFNormal",
    "AutoLaplaceApproximation",
]
_PYRO_NF_BASE = ["AutoPlanarFlow", "AutoRadialFlow", "AutoIAFFlow"]
#: "[laplace]": the same guide with precondition="laplace"
#: "[laplace-untrained]": no step at all, the Laplace start itself (what the flow adds to it)
#: "[noncentered]": noncentered=True (hierarchical Normal sites non-centred inside the guide)
PYRO_NF_GUIDES = (
    _PYRO_NF_BASE
    + [f"{g}[laplace]" for g in _PYRO_NF_BASE]
    + [
        "AutoIAFFlow[laplace-untrained]",
        "AutoIAFFlow[noncentered]",
        "AutoIAFFlow[laplace+noncentered]",
    ]
)
ALL_GUIDES = PYRO_GUIDES + PYRO_NF_GUIDES
#: not in the default run: "[elu]", "[gelu]": the guide's own defaults (num_transforms,
#: hidden_dims, ...) but the MADEs' activation, the twins behind the activation default (issue #23,
#: benchmarks/activation_twins.py)
ACTIVATION_TWINS = [f"{g}[{a}]" for g in ("AutoIAFFlow", "AutoSplineFlow") for a in ("elu", "gelu")]
KNOWN_GUIDES = ALL_GUIDES + ACTIVATION_TWINS
#: every pyro_nf configuration (the report's "pyro_nf" columns, hatching and bests)
PYRO_NF_ALL = PYRO_NF_GUIDES + ACTIVATION_TWINS
#: ``--defaults``: every guide called with its default arguments (``AutoNormal(model)``,
#: ``pyro_nf.AutoPlanarFlow(model)``...). An option in brackets sets one argument there:
#: "[laplace]" precondition="laplace", "[plain]" precondition=None, "[noncentered]" noncentered=True.
DEFAULT_GUIDES = [
    "AutoNormal",
    "AutoPlanarFlow",
    "AutoRadialFlow",
    "AutoIAFFlow",
    "AutoSplineFlow",
]
#: "[elu]", "[gelu]" activation= (the MADE families only); "[K=4]" num_transforms=4.
_DEFAULT_OPTIONS = {"laplace", "plain", "noncentered", "elu", "gelu"}


def _layers_option(opt: str) -> int | None:
    """``"K=4"`` -> 4; None for any other option."""
    if opt.startswith("K=") and opt[2:].isdigit() and int(opt[2:]) > 0:
        return int(opt[2:])
    return None


def known_default_guide(guide: str) -> bool:
    """Whether ``--defaults`` knows how to build ``guide`` (a base name and known options)."""
    base, opts = _options(guide)
    plain_opts = {o for o in opts if _layers_option(o) is None}
    made = base in ("AutoIAFFlow", "AutoSplineFlow")
    return (
        base in DEFAULT_GUIDES
        and plain_opts <= _DEFAULT_OPTIONS
        and (made or not plain_opts & {"elu", "gelu"})
        and not (base == "AutoNormal" and opts)
    )


@dataclass(frozen=True)
class Settings:
    """The budget and guide sizes shared by every fit (part of each result's key)."""

    steps: int = 2000
    lr: float = 0.01
    lr_schedule: str = "cosine"
    particles: int = 4
    samples: int = 4000
    elbo_samples: int = 10000
    planar_transforms: int = 16
    radial_transforms: int = 16
    iaf_transforms: int = 2
    init_scale: float = 0.1
    fast: bool = True  # pyro_nf.fit's fast path (FastELBO) for the flow guides
    defaults: bool = False  # every guide with its default arguments (sizes and init_scale unused)

    def key(self) -> str:
        fields = asdict(self)
        if fields["fast"]:  # the default; left out so that keys of earlier runs stay valid
            del fields["fast"]
        if not fields["defaults"]:  # likewise
            del fields["defaults"]
        return hashlib.sha1(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:10]


def guide_label(guide: str) -> str:
    if guide in PYRO_NF_ALL or (guide not in PYRO_GUIDES and known_default_guide(guide)):
        return f"pyro_nf.{guide}"
    return guide


def default_guide_config(guide: str) -> str:
    """One line saying how ``--defaults`` builds the guide."""
    base, opts = _options(guide)
    if base == "AutoNormal":
        return "`AutoNormal(model)`: init_to_feasible, init_scale=0.1"
    args = ["model"]
    args += ['precondition="laplace"'] if "laplace" in opts else []
    args += ["precondition=None"] if "plain" in opts else []
    args += ["noncentered=True"] if "noncentered" in opts else []
    args += [f'activation="{a}"' for a in ("elu", "gelu") if a in opts]
    args += [f"num_transforms={k}" for k in map(_layers_option, opts) if k is not None]
    return f"`pyro_nf.{base}({', '.join(args)})`"


def guide_config(guide: str, s: Settings) -> str:
    """One line saying how the guide is built (shown in the report)."""
    return {
        "AutoNormal": f"init_to_median_or_feasible, init_scale={s.init_scale}",
        "AutoMultivariateNormal": f"init_to_median_or_feasible, init_scale={s.init_scale}",
        "AutoNormalizingFlow": f"iterated({s.planar_transforms}, planar), base N(0, I)",
        "AutoIAFNormal": f"num_transforms={s.iaf_transforms}, hidden_dim=[max(2D, 16)], base N(0, I)",
        "AutoLaplaceApproximation": "init_to_median_or_feasible; MAP by the same Adam steps, then "
        "`laplace_approximation()` (an AutoMultivariateNormal at the MAP, covariance from the "
        "Hessian) is scored",
        "AutoIAFFlow[laplace-untrained]": 'AutoIAFFlow as above with precondition="laplace" and '
        "no training step: the Laplace approximation found at set-up, scored as it is",
        "AutoPlanarFlow": f"num_transforms={s.planar_transforms}, init_scale={s.init_scale}",
        "AutoRadialFlow": f"num_transforms={s.radial_transforms}, init_scale={s.init_scale}",
        "AutoIAFFlow": f"num_transforms={s.iaf_transforms}, hidden_dims=(max(2D, 16),), fan_in_ref=64, init_scale={s.init_scale}",
    }.get(guide) or _options_config(guide, s)


def _options(guide: str) -> tuple[str, list[str]]:
    """``"AutoIAFFlow[laplace+noncentered]"`` -> ``("AutoIAFFlow", ["laplace", "noncentered"])``."""
    if not guide.endswith("]"):
        return guide, []
    base, opts = guide[:-1].split("[")
    return base, opts.split("+")


def _options_config(guide: str, s: Settings) -> str:
    base, opts = _options(guide)
    for act in ("elu", "gelu"):
        if act in opts:  # the twins: the guide's own defaults but the activation
            return f'defaults of {base}, init_scale={s.init_scale}, activation="{act}"'
    text = guide_config(base, s)
    if "laplace" in opts:
        text += ', precondition="laplace" (falls back to the plain start where no mode is found)'
    if "noncentered" in opts:
        text += (
            ", noncentered=True (hierarchical Normal sites non-centred inside the guide; the "
            "plain guide where the model has none)"
        )
    return text


def latent_dim(model: Callable, data: dict) -> int:
    """Size of the flattened unconstrained latent vector."""
    import pyro.poutine as poutine
    from pyro.infer.autoguide.initialization import InitMessenger
    from torch.distributions import biject_to

    from pyro_nf.guides import init_to_median_or_feasible

    with poutine.block():
        tr = poutine.trace(InitMessenger(init_to_median_or_feasible)(model)).get_trace(data)
    return sum(
        biject_to(site["fn"].support).inv(site["value"]).numel()
        for _, site in tr.iter_stochastic_nodes()
    )


def make_guide(guide: str, model: Callable, dim: int, s: Settings):
    """The guide, built as the report's configuration table says."""
    from pyro.infer.autoguide.initialization import InitMessenger

    from pyro_nf.guides import init_to_median_or_feasible as init

    if s.defaults:
        return _make_default_guide(guide, model)
    hidden = max(2 * dim, 16)
    if guide in ("AutoNormalizingFlow", "AutoIAFNormal"):
        # Pyro's flow guides take no init_loc_fn (their base is N(0, I)), but they run the model
        # once under init_to_feasible to see its latents, which cannot sample ImproperUniform:
        # the model they get sets every latent's value with the same initializer as the others.
        model = InitMessenger(init)(model)
    return _make_guide(guide, model, hidden, s, init)


def _make_guide(guide: str, model: Callable, hidden: int, s: Settings, init: Callable):
    from pyro.distributions.transforms import iterated, planar
    from pyro.infer.autoguide import (
        AutoIAFNormal,
        AutoLaplaceApproximation,
        AutoMultivariateNormal,
        AutoNormal,
        AutoNormalizingFlow,
    )

    import pyro_nf

    guide, opts = _options(guide)  # "[laplace]", "[laplace-untrained]", "[noncentered]", ...
    # the plain start unless the configuration names the Laplace one (the guides' default,
    # precondition="auto", is measured by --defaults)
    extra = {"precondition": None}
    if "laplace" in opts or "laplace-untrained" in opts:
        extra["precondition"] = "laplace"
    if "noncentered" in opts:
        extra["noncentered"] = True
    for act in ("elu", "gelu"):
        if act in opts:  # the twins: the guide's own defaults but the activation
            cls = {"AutoIAFFlow": pyro_nf.AutoIAFFlow, "AutoSplineFlow": pyro_nf.AutoSplineFlow}
            return cls[guide](model, init_loc_fn=init, init_scale=s.init_scale, activation=act)
    if guide == "AutoNormal":
        return AutoNormal(model, init_loc_fn=init, init_scale=s.init_scale)
    if guide == "AutoMultivariateNormal":
        return AutoMultivariateNormal(model, init_loc_fn=init, init_scale=s.init_scale)
    if guide == "AutoLaplaceApproximation":
        return AutoLaplaceApproximation(model, init_loc_fn=init)
    if guide == "AutoNormalizingFlow":
        return AutoNormalizingFlow(model, functools.partial(iterated, s.planar_transforms, planar))
    if guide == "AutoIAFNormal":
        return AutoIAFNormal(model, hidden_dim=[hidden], num_transforms=s.iaf_transforms)
    if guide == "AutoPlanarFlow":
        return pyro_nf.AutoPlanarFlow(
            model, s.planar_transforms, init_loc_fn=init, init_scale=s.init_scale, **extra
        )
    if guide == "AutoRadialFlow":
        return pyro_nf.AutoRadialFlow(
            model, s.radial_transforms, init_loc_fn=init, init_scale=s.init_scale, **extra
        )
    if guide == "AutoIAFFlow":
        # fan_in_ref=64: the MADE steps of the committed runs (the autoguides' default became
        # 16 in pyro_nf 0.3; --defaults measures that), so the configuration keeps its meaning
        return pyro_nf.AutoIAFFlow(
            model,
            s.iaf_transforms,
            hidden_dims=(hidden,),
            fan_in_ref=64,
            init_loc_fn=init,
            init_scale=s.init_scale,
            **extra,
        )
    raise ValueError(f"unknown guide {guide!r}; known: {', '.join(ALL_GUIDES)}")


def _make_default_guide(guide: str, model: Callable):
    """``--defaults``: the guide called as a user would, with its default arguments."""
    from pyro.infer.autoguide import AutoNormal

    import pyro_nf

    base, opts = _options(guide)
    if base == "AutoNormal":
        return AutoNormal(model)
    kwargs = {}
    if "laplace" in opts:
        kwargs["precondition"] = "laplace"
    if "plain" in opts:
        kwargs["precondition"] = None
    if "noncentered" in opts:
        kwargs["noncentered"] = True
    for act in ("elu", "gelu"):
        if act in opts:
            kwargs["activation"] = act
    for layers in map(_layers_option, opts):
        if layers is not None:
            kwargs["num_transforms"] = layers
    return getattr(pyro_nf, base)(model, **kwargs)


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------
def marginal_metrics(draws: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> dict[str, float]:
    """Mean over the reference parameters of the standardized errors of each marginal."""
    from scipy.stats import wasserstein_distance

    missing = set(ref) - set(draws)
    if missing:
        raise KeyError(f"the guide's draws miss reference parameters {sorted(missing)}")
    mean_err, sd_err, w1 = [], [], []
    for name, r in ref.items():
        q = np.asarray(draws[name], dtype=float)
        sd = r.std()
        mean_err.append(abs(q.mean() - r.mean()) / sd)
        sd_err.append(abs(math.log(q.std() / sd)) if q.std() > 0 else math.inf)
        w1.append(wasserstein_distance(q, r) / sd if np.isfinite(q).all() else math.inf)
    return {
        "w1": float(np.mean(w1)),
        "mean_err": float(np.mean(mean_err)),
        "sd_err": float(np.mean(sd_err)),
    }


def reference_noise_floor(ref: dict[str, np.ndarray], n: int, seed: int = 0) -> float:
    """Standardized W1 of ``n`` reference draws against the others: what sampling noise alone gives."""
    rng = np.random.default_rng(seed)
    size = len(next(iter(ref.values())))
    n = min(n, size // 2)
    idx = rng.permutation(size)
    a, b = idx[:n], idx[n:]
    return marginal_metrics({k: v[a] for k, v in ref.items()}, {k: v[b] for k, v in ref.items()})[
        "w1"
    ]


# ---------------------------------------------------------------------------------------------
# One fit
# ---------------------------------------------------------------------------------------------
class Adam(torch.optim.Adam):
    """``torch.optim.Adam`` over the distinct tensors of ``params``.

    Pyro's ``AutoNormalizingFlow`` (so ``AutoIAFNormal``) stores its first transform's first
    parameter twice in the param store (as ``_prototype_tensor`` too); ``pyro_nf.fit`` hands both
    names to the optimizer, and ``torch.optim.Adam`` would then step that tensor twice per step
    (twice the learning rate). Pyro's own ``SVI`` deduplicates; so does this.
    """

    def __init__(self, params, **kwargs) -> None:
        super().__init__(list({id(p): p for p in params}.values()), **kwargs)


def _setup_process(threads: int = 1) -> None:
    import torch

    torch.set_num_threads(threads)
    torch.set_default_dtype(torch.float64)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*did not vectorize.*")


@functools.lru_cache(maxsize=4)
def _database(path: str):
    from posteriordb import PosteriorDatabase

    return PosteriorDatabase(path)


@functools.lru_cache(maxsize=2)
def _posterior(path: str, name: str):
    return load_posterior(_database(path), name)


def run_one(path: str, posterior: str, guide: str, seed: int, s: Settings) -> dict:
    """Fit one guide with one seed and score it; never raises (failures are recorded)."""
    import pyro
    import torch

    import pyro_nf

    _setup_process()
    record = {"posterior": posterior, "guide": guide, "seed": seed, "settings": s.key()}
    t0 = time.perf_counter()
    try:
        spec, data, ref = _posterior(path, posterior)
        model = spec.model
        pyro.clear_param_store()
        pyro.set_rng_seed(seed)
        g = make_guide(guide, model, latent_dim(model, data), s)
        t_setup = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            g(data)  # set-up (the Laplace search, if any) timed apart from the steps
        record["setup_seconds"] = time.perf_counter() - t_setup
        if "noncentered" in _options(guide)[1]:
            nc = g.noncentering
            record["noncentered_sites"] = sorted(nc.sites) if nc is not None else []
        info = getattr(g, "laplace_info", None)
        if info is not None:
            record["laplace_used"] = info["used"]
            record["laplace_reason"] = info["reason"]
        record["setup_warnings"] = [str(w.message)[:300] for w in caught]
        if "laplace-untrained" in _options(guide)[1]:  # the set-up's Laplace start, as it is
            record.update(fit_seconds=0.0, seconds_per_step=None, skipped_steps=0)
        else:
            result = pyro_nf.fit(
                model,
                g,
                data,
                num_steps=s.steps,
                lr=s.lr,
                lr_schedule=None if s.lr_schedule == "none" else s.lr_schedule,
                num_particles=s.particles,
                optimizer=Adam,
                fast=None if s.fast else False,
                seed=seed,
                progress=False,
            )
            record.update(
                fit_seconds=result.seconds,
                seconds_per_step=result.seconds_per_step,
                skipped_steps=len(result.skipped_steps),
                final_loss=result.final_loss,
            )
        if guide == "AutoLaplaceApproximation":  # Pyro's recipe: the MAP, then the Laplace guide
            g = g.laplace_approximation(data)
        pyro.set_rng_seed(10_000 + seed)
        d = pyro_nf.diagnose(model, g, data, num_samples=s.elbo_samples)
        record.update(k_hat=d.k_hat, elbo=d.elbo, elbo_se=d.elbo_se, iw_elbo=d.iw_elbo)
        idata = pyro_nf.to_inference_data(model, g, data, num_samples=s.samples)
        # every draw: the chains are consecutive blocks of the independent draws
        samples = {
            k: np.asarray(v).reshape((-1,) + v.shape[2:])
            for k, v in idata.posterior.data_vars.items()
        }
        with torch.no_grad():
            draws = spec.to_reference(samples, data)
        record.update(marginal_metrics(draws, ref))
        record["status"] = "ok"
    except Exception as e:  # noqa: BLE001 - a failed fit is a result to report
        record["status"] = "failed"
        record["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        record["traceback"] = traceback.format_exc(limit=3)[-1500:]
    record["total_seconds"] = time.perf_counter() - t0
    return record


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------
def _mean_se(values: Sequence[float]) -> tuple[float, float]:
    x = np.asarray([v for v in values if v is not None], dtype=float)
    if x.size == 0:
        return math.nan, math.nan
    if not np.isfinite(x).all():
        return math.inf if np.isinf(x).any() else math.nan, math.nan
    se = x.std(ddof=1) / math.sqrt(x.size) if x.size > 1 else math.nan
    return float(x.mean()), float(se)


def _fmt(m: float, se: float, digits: int = 3) -> str:
    if math.isnan(m):
        return "n/a"
    if math.isinf(m):
        return "inf"
    if abs(m) >= 1e4:  # a blown-up fit: keep the cell readable
        return f"{m:.3g}" if math.isnan(se) else f"{m:.3g} ± {se:.2g}"
    if math.isnan(se):
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} ± {se:.{digits}f}"


def summarize(records: list[dict], posteriors: list[str], guides: list[str]) -> dict:
    """Per posterior x guide: mean and s.e. over seeds of every metric, plus rankings."""
    table: dict[str, dict[str, dict]] = {}
    for p in posteriors:
        table[p] = {}
        for g in guides:
            rs = [r for r in records if r["posterior"] == p and r["guide"] == g]
            ok = [r for r in rs if r["status"] == "ok"]
            row = {"runs": len(rs), "failed": len(rs) - len(ok)}
            for key in (
                "w1",
                "mean_err",
                "sd_err",
                "k_hat",
                "elbo",
                "fit_seconds",
                "seconds_per_step",
                "setup_seconds",
            ):
                row[key] = _mean_se([r.get(key) for r in ok])
            used = [r["laplace_used"] for r in ok if "laplace_used" in r]
            row["laplace"] = (sum(used), len(used)) if used else None
            reasons = {r["laplace_reason"] for r in ok if r.get("laplace_reason")}
            row["laplace_reasons"] = sorted(reasons)
            nc = {tuple(r["noncentered_sites"]) for r in ok if "noncentered_sites" in r}
            row["noncentered_sites"] = sorted(nc)
            if rs and not ok:
                row["w1"] = (math.inf, math.nan)
                row["error"] = rs[0].get("error", "")
            table[p][g] = row
    ranks = {g: [] for g in guides}
    best = {}
    for p in posteriors:
        rows = {g: r for g, r in table[p].items() if r["runs"]}
        if not rows:
            continue
        order = sorted(rows, key=lambda g: (math.isnan(rows[g]["w1"][0]), rows[g]["w1"][0]))
        for i, g in enumerate(order):
            ranks[g].append(i + 1)
        first, second = order[0], order[1] if len(order) > 1 else None
        tie = False
        if second is not None:
            (m1, s1), (m2, s2) = rows[first]["w1"], rows[second]["w1"]
            noise = math.sqrt(np.nan_to_num(s1) ** 2 + np.nan_to_num(s2) ** 2)
            tie = math.isfinite(m2) and (m2 - m1) <= noise
        nf = [g for g in order if g in PYRO_NF_ALL]
        best[p] = {
            "best": first,
            "runner_up": second,
            "tie": tie,
            "best_pyro_nf": nf[0] if nf else None,
            "best_pyro": next((g for g in order if g in PYRO_GUIDES), None),
        }
    return {"table": table, "ranks": ranks, "best": best}


def must_show(summary: dict, posteriors: list[str]) -> list[str]:
    """The issue's acceptance checks, each as a line with the numbers behind it."""
    table, best = summary["table"], summary["best"]
    done = [p for p in posteriors if p in best]
    lines = []
    if not done:
        return ["no posterior finished"]
    nf_wins = [p for p in done if best[p]["best"] in PYRO_NF_ALL]
    close = [p for p in done if table[p][best[p]["best"]]["w1"][0] <= 1.0]
    lines.append(
        f"- A pyro_nf guide has the lowest mean standardized W1 on **{len(nf_wins)} of "
        f"{len(done)}** posteriors (target: at least 6 of 8): "
        + (
            ", ".join(
                _short(p) + (" (tie within noise)" if best[p]["tie"] else "") for p in nf_wins
            )
            or "none"
        )  # fmt: skip
        + f". Counting only the posteriors where some guide came within 1 reference sd "
        f"(best W1 <= 1): {sum(p in nf_wins for p in close)} of {len(close)}"
        + (
            f"; on {', '.join(_short(p) for p in done if p not in close)} every guide is "
            "further than 1 reference sd from the reference (a least-bad ranking)"
            if len(close) < len(done)
            else ""
        )  # fmt: skip
        + "."
    )
    worse = []
    for p in done:
        g = best[p]["best_pyro_nf"]
        if g and "AutoNormal" in table[p]:
            w_nf, w_an = table[p][g]["w1"][0], table[p]["AutoNormal"]["w1"][0]
            if w_nf > w_an:
                worse.append(f"{_short(p)} ({guide_label(g)} {w_nf:.3f} > AutoNormal {w_an:.3f})")
    lines.append(
        f"- pyro_nf's best guide is worse than AutoNormal (mean W1) on **{len(worse)}** "
        f"posteriors (target: none)" + (": " + "; ".join(worse) if worse else "") + "."
    )
    good_k = []
    for p in done:
        g = best[p]["best_pyro_nf"]
        if g and table[p][g]["k_hat"][0] < 0.7:
            good_k.append(p)
    lines.append(
        f"- pyro_nf's best guide (by W1) has mean k-hat < 0.7 on **{len(good_k)} of {len(done)}** "
        "posteriors (target: at least 6 of 8); k-hat per posterior: "
        + ", ".join(
            f"{_short(p)} {table[p][best[p]['best_pyro_nf']]['k_hat'][0]:.2f}"
            for p in done
            if best[p]["best_pyro_nf"]
        )
        + "."
    )
    lowest = {
        p: min((table[p][g]["k_hat"][0], g) for g in PYRO_NF_ALL if g in table[p]) for p in done
    }
    lines.append(
        "- For comparison, the lowest mean k-hat of any pyro_nf guide: "
        + ", ".join(f"{_short(p)} {k:.2f} ({g})" for p, (k, g) in lowest.items())
        + f" ({sum(k < 0.7 for k, _ in lowest.values())} of {len(done)} below 0.7)."
    )
    cp = "eight_schools-eight_schools_centered"
    if cp in done and best[cp]["best_pyro_nf"]:
        g = best[cp]["best_pyro_nf"]
        k_nf = table[cp][g]["k_hat"][0]
        pyro_k = {h: table[cp][h]["k_hat"][0] for h in PYRO_GUIDES if h in table[cp]}
        beats = all(k_nf < k or math.isnan(k) for k in pyro_k.values())
        lines.append(
            f"- Centred eight schools: pyro_nf's best guide ({guide_label(g)}) has k-hat "
            f"{k_nf:.2f}; Pyro's guides: "
            + ", ".join(
                f"{h} {k:.2f}" if not math.isnan(k) else f"{h} failed (no k-hat)"
                for h, k in pyro_k.items()
            )
            + f" -> **{'lower than every Pyro guide' if beats else 'NOT lower than every Pyro guide'}**"
            + (
                f" (the differences are within noise: s.e. of pyro_nf's {se_nf:.2f})"
                if (se_nf := table[cp][g]["k_hat"][1]) == se_nf
                and any(abs(k - k_nf) < 2 * se_nf for k in pyro_k.values() if k == k)
                else ""
            )
            + "."
        )
    else:
        lines.append("- Centred eight schools: not run.")
    return lines


def _short(posterior: str) -> str:
    return posterior.split("-", 1)[1] if "-" in posterior else posterior


def machine_info(threads: int, jobs: int) -> str:
    import pyro
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        names = [ln.split(":", 1)[1].strip() for ln in out.splitlines() if "Model name" in ln]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    try:
        rev = subprocess.run(["git", "-C", HERE, "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, check=False).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "-C", HERE, "status", "--porcelain", "--", "../pyro_nf"],
                               capture_output=True, text=True, check=False).stdout.strip()  # fmt: skip
        rev = (
            f"pyro_nf at {rev}" + (" + uncommitted changes in pyro_nf/" if dirty else "")
            if rev
            else ""
        )
    except OSError:
        rev = ""
    return (
        (f"{rev}; " if rev else "")
        + f"{cpu}, {os.cpu_count()} cores (load average {os.getloadavg()[0]:.1f} at the start), "
        f"Python {platform.python_version()}, "
        f"torch {torch.__version__}, pyro {pyro.__version__}, float64, "
        f"{threads} torch thread per fit, {jobs} fit(s) in parallel"
    )


def write_report(
    out: str,
    name: str,
    records: list[dict],
    posteriors: list[str],
    guides: list[str],
    seeds: list[int],
    s: Settings,
    runs: list[dict],
    noise: dict[str, float],
    not_run: list[str],
    incomplete: dict[str, str],
) -> dict:
    summary = summarize(records, posteriors, guides)
    table, best, ranks = summary["table"], summary["best"], summary["ranks"]
    done = [p for p in posteriors if p in best]
    L = [f"# posteriordb benchmark: flow guides vs Pyro's autoguides ({name})", ""]
    L += [
        "Generated by `benchmarks/run_posteriordb.py` (see `benchmarks/README.md`). Every number "
        "below comes from the run described here.",
        "",
        "## Run",
        "",
        *[
            f"- command: `{r['command']}` ({r['fits']} fits, {r['wall_seconds'] / 60:.1f} min; "
            f"{r['machine'].split('; ')[0]})"
            for r in runs
        ],
        *(
            [f"- machine: {runs[0]['machine'].split('; ', 1)[-1]}"]
            if len({r["machine"].split("; ", 1)[-1] for r in runs}) == 1
            else [
                f"- machine of run {i + 1}: {r['machine'].split('; ', 1)[-1]}"
                for i, r in enumerate(runs)
            ]  # fmt: skip
        ),
        f"- total wall time: {sum(r['wall_seconds'] for r in runs) / 60:.1f} min",
        f"- budget, identical for every guide: {s.steps} steps of Adam, lr {s.lr} with a "
        f"{s.lr_schedule} schedule, {s.particles} ELBO particles (vectorized), seeds "
        f"{', '.join(map(str, seeds))}; fitted with `pyro_nf.fit` (optimizer: `torch.optim.Adam` "
        "over the distinct parameter tensors, see the fairness notes in `benchmarks/README.md`); "
        + (
            "flow guides through fit's fast path (FastELBO)"
            if s.fast
            else "fast path off: every guide through Trace_ELBO"
        ),
        f"- scoring: ELBO and PSIS k-hat from `pyro_nf.diagnose` with {s.elbo_samples} draws; "
        f"marginal errors from {s.samples} guide draws (`pyro_nf.to_inference_data`) against the "
        "pooled NUTS reference draws (10 chains x 1000)",
        "- W1 = 1-Wasserstein distance of each marginal to the reference draws / reference sd, "
        "averaged over the reference parameters; mean err = |mean - ref mean| / ref sd; "
        "sd err = |log(sd / ref sd)|; values are mean ± standard error over seeds",
        "",
        "| guide | configuration |",
        "|---|---|",
    ]
    L += [f"| {guide_label(g)} | {guide_config(g, s)} |" for g in guides]
    L += ["", "All initial locations: `pyro_nf.guides.init_to_median_or_feasible` where the guide "
          "takes one (Pyro's flow guides start from N(0, I) in unconstrained space).", ""]  # fmt: skip
    if not_run:
        L += ["**Not run:** " + ", ".join(not_run), ""]
    if incomplete:
        L += ["**Incomplete** (fewer fits than guides x seeds): "
              + ", ".join(f"{p} ({c})" for p, c in incomplete.items()), ""]  # fmt: skip

    L += ["## Acceptance checks (issue 5)", ""] + must_show(summary, posteriors) + [""]

    L += ["## Best guide per posterior (lowest mean W1 over seeds)", ""]
    L += [
        "| posterior | best guide | W1 | runner-up | W1 | best pyro_nf | best Pyro | noise floor |",
        "|---|---|---|---|---|---|---|---|",
    ]
    pyro_wins = []
    for p in done:
        b = best[p]
        r1 = table[p][b["best"]]
        ru = b["runner_up"]
        w_ru = _fmt(*table[p][ru]["w1"]) if ru else ""
        note = " (tie within noise)" if b["tie"] else ""
        if r1["w1"][0] > 1.0:
            note += " (no guide within 1 sd)"
        if b["best"] in PYRO_GUIDES:
            pyro_wins.append(p)
        L.append(
            f"| {_short(p)} | **{guide_label(b['best'])}**{note} | {_fmt(*r1['w1'])} | "
            f"{guide_label(ru) if ru else ''} | {w_ru} | "
            f"{guide_label(b['best_pyro_nf']) if b['best_pyro_nf'] else ''} "
            f"({_fmt(table[p][b['best_pyro_nf']]['w1'][0], math.nan) if b['best_pyro_nf'] else ''}) | "
            f"{b['best_pyro'] or ''} ({_fmt(table[p][b['best_pyro']]['w1'][0], math.nan) if b['best_pyro'] else ''}) | "
            f"{noise.get(p, math.nan):.3f} |"
        )
    L += [
        "",
        "Noise floor: the standardized W1 between "
        f"{s.samples} reference draws and the remaining ones (what sampling noise alone gives). "
        "'Tie within noise': the runner-up's mean is within the combined standard error over seeds. "
        "'No guide within 1 sd': even the best guide's marginals are more than one reference sd "
        "from the reference on average: no guide converged under this budget.",
        "",
    ]
    if pyro_wins:
        L += [
            "**Where a Pyro guide wins:** "
            + "; ".join(
                f"{_short(p)}: {guide_label(best[p]['best'])} "
                f"(W1 {table[p][best[p]['best']]['w1'][0]:.3f} vs pyro_nf's best "
                f"{guide_label(best[p]['best_pyro_nf'])} "
                f"{table[p][best[p]['best_pyro_nf']]['w1'][0]:.3f})"
                for p in pyro_wins
            ),
            "",
        ]
    else:
        L += ["A pyro_nf guide has the lowest mean W1 on every posterior run.", ""]

    L += ["## Ranking (by mean W1; rank 1 = best)", ""]
    L += [
        "| guide | mean rank | wins | geometric mean W1 | median k-hat | k-hat < 0.7 | mean ms/step "
        "| mean set-up s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    order = sorted(guides, key=lambda g: np.mean(ranks[g]) if ranks[g] else math.inf)
    for g in order:
        wins = sum(best[p]["best"] == g for p in done)
        w = [table[p][g]["w1"][0] for p in done]
        k = [table[p][g]["k_hat"][0] for p in done]
        t = [table[p][g]["seconds_per_step"][0] for p in done]
        setup = [table[p][g]["setup_seconds"][0] for p in done]
        good = sum(1 for v in k if v < 0.7)
        L.append(
            f"| {guide_label(g)} | {np.mean(ranks[g]) if ranks[g] else math.nan:.2f} | {wins} | "
            f"{_geomean(w):.3f} | {_nanmedian(k):.2f} | {good}/{len(done)} | "
            f"{_fmt(1000 * _nanmean(t), math.nan, 1)} "
            f"| {_fmt(_nanmean(setup), math.nan, 2)} |"
        )
    L += [
        "",
        "Wins: posteriors where the guide has the lowest mean W1. Geometric mean over posteriors of "
        "the mean W1 (a failed fit counts as inf); median over posteriors of the mean k-hat; "
        "k-hat < 0.7: posteriors where the mean k-hat is below 0.7; ms/step: mean over posteriors "
        "(the machine is shared, so timings carry other jobs' load); set-up s: the guide's first "
        "call before the steps (for [laplace], the mode search and Hessian), not in ms/step "
        "(n/a: not recorded by the run that made the fit).",
        "",
    ]
    laplace = [
        (p, g, table[p][g]) for p in done for g in guides if table[p][g].get("laplace") is not None
    ]
    fell_back = [(p, g, r) for p, g, r in laplace if r["laplace"][0] < r["laplace"][1]]
    if laplace:
        L += [
            "**Laplace preconditioning** ([laplace] guides): the mode was found and used in "
            f"{sum(r['laplace'][0] for _, _, r in laplace)} of "
            f"{sum(r['laplace'][1] for _, _, r in laplace)} fits"
            + (
                "; it fell back to the plain start on "
                + "; ".join(
                    f"{_short(p)} ({guide_label(g)}, {r['laplace'][1] - r['laplace'][0]} of "
                    f"{r['laplace'][1]}: {', '.join(r['laplace_reasons'])})"
                    for p, g, r in fell_back
                )
                if fell_back
                else ""
            )
            + ".",
            "",
        ]

    nc_rows = [
        (p, g, table[p][g]) for p in done for g in guides if table[p][g]["noncentered_sites"]
    ]
    if nc_rows:
        hit = [
            f"{_short(p)} ({guide_label(g)}: {', '.join(' / '.join(t) for t in r['noncentered_sites'])})"
            for p, g, r in nc_rows
            if any(r["noncentered_sites"])
        ]
        L += [
            "**Non-centring** ([noncentered] guides): sites non-centred inside the guide: "
            + ("; ".join(hit) if hit else "none")
            + ". On the other posteriors the model has no Normal latent whose location or scale "
            "depends on another latent, so the guide is the plain one (same numbers as without "
            "the option, up to the random stream).",
            "",
        ]

    L += ["## Standardized W1 (posterior x guide)", ""]
    L += ["| posterior | " + " | ".join(guide_label(g) for g in guides) + " |"]
    L += ["|---|" + "---|" * len(guides)]
    for p in done:
        cells = []
        for g in guides:
            m = table[p][g]["w1"][0]
            c = _fmt(m, math.nan)
            cells.append(f"**{c}**" if g == best[p]["best"] else c)
        L.append(f"| {_short(p)} | " + " | ".join(cells) + " |")
    L += ["", f"![W1 heatmap]({name}_w1.png)", "", f"![k-hat]({name}_khat.png)", ""]

    L += ["## Per posterior", ""]
    for p in done:
        L += [f"### {p}", "", f"{POSTERIORS[p].note}.", ""]
        L += [
            "| guide | W1 | mean err | sd err | k-hat | ELBO | fit s | ms/step | failed |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for g in guides:
            r = table[p][g]
            if not r["runs"]:
                continue
            L.append(
                f"| {guide_label(g)} | {_fmt(*r['w1'])} | {_fmt(*r['mean_err'])} | "
                f"{_fmt(*r['sd_err'])} | {_fmt(*r['k_hat'], 2)} | {_fmt(*r['elbo'], 2)} | "
                f"{_fmt(r['fit_seconds'][0], math.nan, 1)} | "
                f"{_fmt(1000 * r['seconds_per_step'][0], math.nan, 1)} | {r['failed']}/{r['runs']} |"
            )
        errors = [f"{guide_label(g)}: {r['error']}" for g, r in table[p].items() if r.get("error")]
        if errors:
            L += ["", "Failures: " + "; ".join(errors)]
        L += [""]
    path = os.path.join(out, f"{name}.md")
    with open(path, "w") as f:
        f.write("\n".join(L))
    plot(out, name, summary, done, guides)
    return summary


def verdict(flow: tuple[float, float], normal: tuple[float, float], floor: float) -> str:
    """A flow guide's mean W1 against AutoNormal's: "better", "tie" or "worse".

    Two means count as tied when they differ by at most ``max(2 * combined s.e., floor)``: twice
    the standard error of the difference over seeds, and never less than the reference noise
    floor (the W1 that sampling noise alone gives, below which W1s do not rank fits).
    """
    (m1, s1), (m2, s2) = flow, normal
    if math.isnan(m1) or math.isnan(m2):
        return "n/a"
    if math.isinf(m1) or math.isinf(m2):
        return "tie" if m1 == m2 else ("better" if m1 < m2 else "worse")
    band = max(2 * math.sqrt(np.nan_to_num(s1) ** 2 + np.nan_to_num(s2) ** 2), floor)
    return "better" if m1 < m2 - band else "worse" if m1 > m2 + band else "tie"


def write_defaults_report(
    out: str,
    name: str,
    records: list[dict],
    posteriors: list[str],
    guides: list[str],
    seeds: list[int],
    s: Settings,
    runs: list[dict],
    noise: dict[str, float],
    not_run: list[str],
    incomplete: dict[str, str],
) -> dict:
    """The ``--defaults`` report: every guide's default call against ``AutoNormal(model)``."""
    summary = summarize(records, posteriors, guides)
    table = summary["table"]
    flows = [g for g in guides if g != "AutoNormal"]
    L = [f"# posteriordb: the default call of every flow guide against AutoNormal ({name})", ""]
    L += [
        "Generated by `benchmarks/run_posteriordb.py --defaults` (see `benchmarks/README.md`). "
        "Every number below comes from the run described here.",
        "",
        "## Run",
        "",
        *[
            f"- command: `{r['command']}` ({r['fits']} fits, {r['wall_seconds'] / 60:.1f} min; "
            f"{r['machine'].split('; ')[0]})"
            for r in runs
        ],
        f"- machine: {runs[0]['machine'].split('; ', 1)[-1]}",
        f"- budget, identical for every guide (issue 23): {s.steps} steps of Adam, lr {s.lr}, "
        + ("no schedule" if s.lr_schedule == "none" else f"{s.lr_schedule} schedule")
        + f", Trace_ELBO's estimator with {s.particles} vectorized particles, seeds "
        f"{', '.join(map(str, seeds))}; fitted with `pyro_nf.fit(model, guide, data, "
        f"num_steps={s.steps}, lr={s.lr}, num_particles={s.particles})` as a user calls it: "
        + (
            "the flow guides go through fit's fast path (FastELBO, the same estimator), "
            "AutoNormal through Trace_ELBO"
            if s.fast
            else "fast path off, every guide through Trace_ELBO"
        ),
        f"- scoring: ELBO and PSIS k-hat from `pyro_nf.diagnose` with {s.elbo_samples} draws; "
        f"W1 from {s.samples} guide draws against the pooled NUTS reference draws: the "
        "1-Wasserstein distance of each marginal divided by the reference sd, averaged over the "
        "reference parameters; mean ± standard error over seeds",
        "- verdict of a flow guide against AutoNormal: **tie** when the mean W1s differ by at "
        "most max(2 × the combined standard error over seeds, the reference noise floor), else "
        "**better** or **worse**; 'no worse' = better or tie",
        "",
        "| guide | call |",
        "|---|---|",
        *[f"| {guide_label(g)} | {default_guide_config(g)} |" for g in guides],
        "",
    ]
    if incomplete:
        L += [f"Incomplete: {', '.join(f'{_short(p)} ({v})' for p, v in incomplete.items())}.", ""]
    if not_run:
        L += [f"Not run: {', '.join(_short(p) for p in not_run)}.", ""]
    verdicts = {
        (p, g): verdict(table[p][g]["w1"], table[p]["AutoNormal"]["w1"], noise[p])
        for p in posteriors
        for g in flows
        if "AutoNormal" in table[p] and table[p]["AutoNormal"]["runs"] and table[p][g]["runs"]
    }
    worse = [f"{guide_label(g)} on {_short(p)}" for (p, g), v in verdicts.items() if v == "worse"]
    L += [
        "## Verdict",
        "",
        f"- Default flow guide x posterior pairs no worse than AutoNormal (mean W1): "
        f"**{sum(v != 'worse' for v in verdicts.values())} of {len(verdicts)}** "
        f"({sum(v == 'better' for v in verdicts.values())} better, "
        f"{sum(v == 'tie' for v in verdicts.values())} tied"
        + (f"; worse: {', '.join(worse)}" if worse else "")
        + ").",
    ]
    for g in flows:
        vs = [verdicts[(p, g)] for p in posteriors if (p, g) in verdicts]
        L.append(
            f"- {guide_label(g)}: better on {vs.count('better')}, tied on {vs.count('tie')}, "
            f"worse on {vs.count('worse')} of {len(vs)} posteriors."
        )
    L += [
        "",
        "## Standardized W1 (mean ± s.e. over seeds; verdict against AutoNormal)",
        "",
        "| posterior | noise floor | " + " | ".join(guide_label(g) for g in guides) + " |",
        "|---|---|" + "---|" * len(guides),
    ]
    for p in posteriors:
        cells = []
        for g in guides:
            cell = _fmt(*table[p][g]["w1"])
            if (p, g) in verdicts:
                cell += f" ({verdicts[(p, g)]})"
            cells.append(cell)
        L.append(f"| {_short(p)} | {noise[p]:.3f} | " + " | ".join(cells) + " |")
    for title, key, digits in (
        ("ELBO (mean ± s.e. over seeds; higher is better)", "elbo", 2),
        ("PSIS k-hat", "k_hat", 2),
        ("Fit time, s (the steps; the machine is shared, so timings carry other jobs' load)",
         "fit_seconds", 1),
        ("Set-up time, s (the guide's first call: for a Laplace start, the mode search and "
         "Hessian)", "setup_seconds", 2),
    ):  # fmt: skip
        L += ["", f"## {title}", "", "| posterior | " + " | ".join(guides) + " |"]
        L.append("|---|" + "---|" * len(guides))
        for p in posteriors:
            L.append(
                f"| {_short(p)} | "
                + " | ".join(_fmt(*table[p][g][key], digits=digits) for g in guides)
                + " |"
            )
    laplace_rows = [
        (p, g, table[p][g]) for p in posteriors for g in flows if table[p][g]["laplace"]
    ]
    if laplace_rows:
        used = sum(r["laplace"][0] for _, _, r in laplace_rows)
        total = sum(r["laplace"][1] for _, _, r in laplace_rows)
        fell = [
            f"{_short(p)} ({g}, {r['laplace'][1] - r['laplace'][0]} of {r['laplace'][1]}: "
            f"{'; '.join(r['laplace_reasons'])})"
            for p, g, r in laplace_rows
            if r["laplace"][0] < r["laplace"][1]
        ]
        L += [
            "",
            f"**Laplace start**: the mode was found and used in {used} of {total} fits"
            + (f"; the plain start elsewhere: {'; '.join(fell)}" if fell else "")
            + ".",
        ]
    failed = [
        f"{_short(p)} {g}: {table[p][g].get('error', '')}"
        for p in posteriors
        for g in guides
        if table[p][g]["failed"]
    ]
    if failed:
        L += ["", "Failed fits: " + "; ".join(failed) + "."]
    with open(os.path.join(out, f"{name}.md"), "w") as f:
        f.write("\n".join(L) + "\n")
    summary["verdicts"] = verdicts
    return summary


def _geomean(x) -> float:
    x = np.asarray(x, dtype=float)
    x = x[~np.isnan(x)]
    return float(np.exp(np.log(x).mean())) if x.size else math.nan


def _nanmedian(x) -> float:
    x = np.asarray(x, dtype=float)
    x = x[~np.isnan(x)]
    return float(np.median(x)) if x.size else math.nan


def _nanmean(x) -> float:
    x = np.asarray(x, dtype=float)
    x = x[np.isfinite(x)]
    return float(x.mean()) if x.size else math.nan


def plot(out: str, name: str, summary: dict, posteriors: list[str], guides: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    table = summary["table"]
    w = np.array([[table[p][g]["w1"][0] for g in guides] for p in posteriors], dtype=float)
    shown = np.where(np.isfinite(w), w, np.nan)
    fig, ax = plt.subplots(figsize=(1.2 * len(guides) + 3, 0.5 * len(posteriors) + 2.5))
    finite = shown[np.isfinite(shown)]
    vmin = max(finite.min(), 1e-3) if finite.size else 1e-3
    vmax = min(max(finite.max(), vmin * 10), 100.0) if finite.size else 1.0  # beyond 100: lost
    norm = LogNorm(vmin, vmax)
    im = ax.imshow(np.clip(shown, vmin, vmax), cmap="viridis_r", norm=norm, aspect="auto")
    for i in range(len(posteriors)):
        for j in range(len(guides)):
            txt = "fail" if not np.isfinite(w[i, j]) else f"{w[i, j]:.3g}"
            best = summary["best"][posteriors[i]]["best"] == guides[j]
            dark = not np.isfinite(w[i, j]) or norm(min(max(w[i, j], vmin), vmax)) > 0.6
            ax.text(j, i, txt, ha="center", va="center", fontsize=8,
                    fontweight="bold" if best else "normal", color="w" if dark else "k")  # fmt: skip
    ax.set_xticks(range(len(guides)), [guide_label(g) for g in guides], rotation=35, ha="right")
    ax.set_yticks(range(len(posteriors)), [_short(p) for p in posteriors])
    fig.colorbar(im, ax=ax, label="mean standardized W1 (lower is better)")
    ax.set_title("W1 to NUTS reference draws / reference sd (bold: best)")
    fig.tight_layout()
    fig.savefig(os.path.join(out, f"{name}_w1.png"), dpi=110)
    plt.close(fig)

    k = np.array([[table[p][g]["k_hat"][0] for g in guides] for p in posteriors], dtype=float)
    cap = 3.0  # bars above it are cut there and labelled
    fig, ax = plt.subplots(figsize=(max(8, 1.4 * len(posteriors) + 2), 4))
    width = 0.8 / len(guides)
    for j, g in enumerate(guides):
        x = np.arange(len(posteriors)) + (j - (len(guides) - 1) / 2) * width
        h = np.clip(np.nan_to_num(k[:, j], nan=0.0, posinf=cap), 0.0, cap)
        ax.bar(x, h, width, label=guide_label(g), hatch="//" if g in PYRO_NF_ALL else None)
        for xi, ki in zip(x, k[:, j]):
            if not ki <= cap:
                ax.text(xi, cap, "fail" if np.isnan(ki) else f"{ki:.0f}", ha="center",
                        va="bottom", fontsize=6, rotation=90)  # fmt: skip
    ax.set_ylim(0, cap * 1.15)
    for y, style in ((0.5, ":"), (0.7, "--")):
        ax.axhline(y, color="k", ls=style, lw=0.8)
    ax.set_xticks(range(len(posteriors)), [_short(p) for p in posteriors], rotation=25, ha="right")
    ax.set_ylabel("PSIS k-hat (mean over seeds)")
    ax.set_title("PSIS k-hat (dashed: 0.7, do not trust above; hatched: pyro_nf)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(os.path.join(out, f"{name}_khat.png"), dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--posteriordb", required=True, help="posteriordb's posterior_database folder")
    p.add_argument("--posteriors", type=_csv, default=None,
                   help=f"comma-separated names (default: all {len(FULL_POSTERIORS)}; --quick: 2)")  # fmt: skip
    p.add_argument("--guides", type=_csv, default=None,
                   help="comma-separated guide names (default: all; --defaults: AutoNormal and "
                   "the four pyro_nf flow guides)")  # fmt: skip
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--lr", type=float, default=Settings.lr)
    p.add_argument(
        "--lr-schedule", default=None, choices=["cosine", "exponential", "none"],
        help=f"default {Settings.lr_schedule} ('none' with --defaults)",
    )  # fmt: skip
    p.add_argument("--particles", type=int, default=None)
    p.add_argument("--seeds", type=lambda v: [int(x) for x in _csv(v)], default=None)
    p.add_argument("--samples", type=int, default=None, help="guide draws for the marginal metrics")
    p.add_argument("--elbo-samples", type=int, default=None, help="draws for ELBO and k-hat")
    p.add_argument("--planar-transforms", type=int, default=Settings.planar_transforms)
    p.add_argument("--radial-transforms", type=int, default=Settings.radial_transforms)
    p.add_argument("--iaf-transforms", type=int, default=Settings.iaf_transforms)
    p.add_argument(
        "--fast", default="on", choices=["on", "off"],
        help="pyro_nf.fit's fast path for flow guides (off: Trace_ELBO, to check it loses nothing)",
    )  # fmt: skip
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    p.add_argument("--name", default=None, help="file name stem (default posteriordb[_quick])")
    p.add_argument(
        "--quick", action="store_true", help="smoke run: 2 posteriors, 100 steps, 1 seed"
    )
    p.add_argument(
        "--jobs", type=int, default=1, help="fits in parallel (processes, 1 thread each)"
    )
    p.add_argument(
        "--defaults", action="store_true",
        help="the default call: every guide with its default arguments, 3000 steps, lr 0.01 "
        "without schedule, 4 particles (issue 23); report NAME posteriordb_defaults",
    )  # fmt: skip
    p.add_argument("--resume", action="store_true",
                   help="keep the successful fits already in NAME.jsonl, run the rest")  # fmt: skip
    p.add_argument("--report-only", action="store_true", help="rewrite the report from NAME.jsonl")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    q = args.quick
    if args.defaults:
        if args.steps is None:
            args.steps = 3000
        if args.lr_schedule is None:
            args.lr_schedule = "none"
    s = Settings(
        steps=args.steps or (100 if q else Settings.steps),
        lr=args.lr,
        lr_schedule=args.lr_schedule or Settings.lr_schedule,
        particles=args.particles or (2 if q else Settings.particles),
        samples=args.samples or (1000 if q else Settings.samples),
        elbo_samples=args.elbo_samples or (1000 if q else Settings.elbo_samples),
        planar_transforms=args.planar_transforms,
        radial_transforms=args.radial_transforms,
        iaf_transforms=args.iaf_transforms,
        fast=args.fast == "on",
        defaults=args.defaults,
    )
    seeds = args.seeds or ([0] if q else [0, 1, 2])
    posteriors = args.posteriors or (QUICK_POSTERIORS if q else FULL_POSTERIORS)
    if args.guides is None:
        args.guides = DEFAULT_GUIDES if args.defaults else ALL_GUIDES
    known = known_default_guide if args.defaults else KNOWN_GUIDES.__contains__
    unknown = [p for p in posteriors if p not in POSTERIORS] + [
        g for g in args.guides if not known(g)
    ]
    if unknown:
        raise SystemExit(f"unknown posterior or guide name(s): {unknown}")
    name = args.name or (
        ("posteriordb_defaults" if args.defaults else "posteriordb") + ("_quick" if q else "")
    )
    path = os.path.abspath(args.posteriordb)
    if not os.path.isdir(os.path.join(path, "posteriors")):
        raise SystemExit(f"{path!r} is not a posteriordb 'posterior_database' folder")
    os.makedirs(args.out, exist_ok=True)
    jsonl = os.path.join(args.out, f"{name}.jsonl")
    _setup_process()
    s_run = s

    old = []
    if (args.resume or args.report_only) and os.path.exists(jsonl):
        with open(jsonl) as f:
            lines = [json.loads(line) for line in f if line.strip()]
        # the last record of each fit wins (a resumed run retries the failed ones)
        latest = {
            (r["posterior"], r["guide"], r["seed"]): r
            for r in lines
            if r["settings"] == s_run.key()
        }
        old = list(latest.values())
    done = {(r["posterior"], r["guide"], r["seed"]) for r in old if r["status"] == "ok"}
    tasks = [
        (p, g, seed)
        for p in posteriors
        for g in args.guides
        for seed in seeds
        if (p, g, seed) not in done
    ]
    if args.report_only:
        tasks = []
    retried = {t for t in tasks}
    old = [r for r in old if (r["posterior"], r["guide"], r["seed"]) not in retried]
    machine = machine_info(1, args.jobs)  # before the fits: the code that runs them
    t0 = time.perf_counter()
    records = list(old)
    mode = "a" if (args.resume or args.report_only) else "w"
    with open(jsonl, mode) as f:
        if args.jobs > 1 and tasks:
            import multiprocessing as mp

            with ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("spawn")) as ex:
                futures = [ex.submit(run_one, path, *t, s_run) for t in tasks]
                for fut in as_completed(futures):
                    records.append(_log(f, fut.result(), len(records) - len(old), len(tasks)))
        else:
            for t in tasks:
                records.append(
                    _log(f, run_one(path, *t, s_run), len(records) - len(old), len(tasks))
                )
    wall = time.perf_counter() - t0
    command = "python " + " ".join(
        shlex.quote(a) for a in [os.path.relpath(__file__)] + list(argv or sys.argv[1:])
    )
    # every invocation that ran fits is logged, so that a resumed run reports all its parts
    runs_path = os.path.join(args.out, f"{name}.runs.json")
    runs = []
    if (args.resume or args.report_only) and os.path.exists(runs_path):
        with open(runs_path) as f:
            runs = [r for r in json.load(f) if r.get("settings") == s_run.key()]
    if tasks:
        runs.append(
            {
                "command": command,
                "wall_seconds": wall,
                "fits": len(tasks),
                "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                "machine": machine,
                "settings": s_run.key(),
            }
        )
        with open(runs_path, "w") as f:
            json.dump(runs, f, indent=1)
    if not runs:
        runs = [{"command": command, "wall_seconds": wall, "fits": 0, "machine": machine}]
    records = [
        r
        for r in records
        if r["posterior"] in posteriors and r["guide"] in args.guides and r["seed"] in seeds
    ]
    expected = len(args.guides) * len(seeds)
    counts = {p: sum(r["posterior"] == p for r in records) for p in posteriors}
    finished = [p for p in posteriors if counts[p]]
    not_run = [p for p in posteriors if not counts[p]] + [
        p for p in FULL_POSTERIORS if p not in posteriors
    ]
    incomplete = {p: f"{counts[p]} of {expected} fits" for p in finished if counts[p] < expected}
    noise = {p: reference_noise_floor(_posterior(path, p)[2], s.samples) for p in finished}
    report = write_defaults_report if args.defaults else write_report
    summary = report(
        args.out, name, records, finished, args.guides, seeds, s_run, runs, noise, not_run,
        incomplete,
    )  # fmt: skip
    return summary


def _log(f, record: dict, i: int, n: int) -> dict:
    f.write(json.dumps(record) + "\n")
    f.flush()
    status = record["status"] if record["status"] == "ok" else "FAILED " + record.get("error", "")
    w1 = record.get("w1", math.nan)
    print(
        f"[{i + 1}/{n}] {record['posterior']} {record['guide']} seed {record['seed']}: "
        f"W1 {w1:.3f} k-hat {record.get('k_hat', math.nan):.2f} "
        f"{record['total_seconds']:.1f}s {status}",
        flush=True,
    )
    return record


if __name__ == "__main__":
    main()
