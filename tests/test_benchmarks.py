"""The posteriordb benchmark: registry checks and a smoke run.

Needs a posteriordb checkout: ``$POSTERIORDB_PATH`` or ``../shared/posteriordb/posterior_database``
next to the repository (as in CI); the tests skip cleanly without one or without the client.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

DB_PATH = os.environ.get(
    "POSTERIORDB_PATH",
    os.path.join(ROOT, "..", "shared", "posteriordb", "posterior_database"),
)

pytest.importorskip("posteriordb")
pytest.importorskip("scipy")
if not os.path.isdir(os.path.join(DB_PATH, "posteriors")):
    pytest.skip(f"no posteriordb checkout at {DB_PATH}", allow_module_level=True)

import pyro  # noqa: E402
import pyro.poutine as poutine  # noqa: E402
from posteriordb import PosteriorDatabase  # noqa: E402
from posteriors import POSTERIORS, load_posterior  # noqa: E402
from torch.distributions import biject_to  # noqa: E402


@pytest.fixture(autouse=True)
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


@pytest.fixture(scope="module")
def db():
    return PosteriorDatabase(DB_PATH)


def _latents(model, data, n):
    """``n`` random points of every latent site, constrained, drawn around the prior's feasible point."""
    from pyro.infer.autoguide.initialization import InitMessenger

    from pyro_nf.guides import init_to_median_or_feasible

    with poutine.block():
        proto = poutine.trace(InitMessenger(init_to_median_or_feasible)(model)).get_trace(data)
    out = {}
    for name, site in proto.iter_stochastic_nodes():
        t = biject_to(site["fn"].support)
        u = t.inv(site["value"])
        out[name] = t(u + 0.3 * torch.randn((n,) + u.shape))
    return out


@pytest.mark.parametrize("name", list(POSTERIORS))
def test_registry_covers_reference_parameters(db, name):
    """Every reference parameter comes out of ``to_reference``, with one value per draw."""
    spec, data, ref = load_posterior(db, name)
    pyro.set_rng_seed(0)
    values = {k: v.numpy() for k, v in _latents(spec.model, data, 7).items()}
    mapped = spec.to_reference(values, data)
    assert set(mapped) == set(ref), (sorted(set(ref) - set(mapped)), sorted(set(mapped) - set(ref)))
    for k, v in mapped.items():
        assert np.shape(v) == (7,), k
        assert np.isfinite(v).all(), k


@pytest.mark.parametrize("name", list(POSTERIORS))
def test_models_vectorize(db, name):
    """The log joint of a batch of latents equals the log joints computed one at a time.

    ``pyro_nf.diagnose`` and vectorized ELBO particles rely on it; a model that broadcast wrongly
    would give wrong numbers without an error.
    """
    spec, data, _ = load_posterior(db, name)
    pyro.set_rng_seed(1)
    values = _latents(spec.model, data, 5)

    def log_joint(vals):
        tr = poutine.trace(poutine.condition(spec.model, vals)).get_trace(data)
        return sum(s["fn"].log_prob(s["value"]) for s in tr.nodes.values() if s["type"] == "sample")

    with pyro.plate("draws", 5, dim=-1):
        batched = log_joint(values)
    assert batched.shape == (5,)
    single = torch.stack([log_joint({k: v[i] for k, v in values.items()}) for i in range(5)])
    assert torch.isfinite(single).all()
    torch.testing.assert_close(batched, single)


@pytest.mark.parametrize("name", list(POSTERIORS))
def test_every_guide_sets_up(db, name):
    """Every benchmarked guide builds on every posterior and draws every latent (Pyro's flow
    guides included, on a model with an ImproperUniform prior)."""
    import run_posteriordb

    spec, data, _ = load_posterior(db, name)
    dim = run_posteriordb.latent_dim(spec.model, data)
    settings = run_posteriordb.Settings(planar_transforms=2, radial_transforms=2)
    latents = set(_latents(spec.model, data, 1))
    for guide in run_posteriordb.ALL_GUIDES:
        pyro.clear_param_store()
        draw = run_posteriordb.make_guide(guide, spec.model, dim, settings)(data)
        assert set(draw) == latents, guide
        assert all(torch.isfinite(v).all() for v in draw.values()), guide


def test_activation_twins_are_the_guides_defaults_but_the_activation(db):
    """The twin configurations (issue #23): each builds the guide with its own defaults and only
    the MADEs' activation set; they are accepted by --guides but not in the default run."""
    import run_posteriordb

    import pyro_nf

    spec, data, _ = load_posterior(db, "sblrc-blr")
    dim = run_posteriordb.latent_dim(spec.model, data)
    assert not set(run_posteriordb.ACTIVATION_TWINS) & set(run_posteriordb.ALL_GUIDES)
    for guide in run_posteriordb.ACTIVATION_TWINS:
        base, (act,) = run_posteriordb._options(guide)
        g = run_posteriordb.make_guide(guide, spec.model, dim, run_posteriordb.Settings())
        g(data)
        default = getattr(pyro_nf, base)(spec.model)
        default(data)
        assert len(g.flow.layers) == len(default.flow.layers)
        assert all(type(layer.made.activation) is {"elu": torch.nn.ELU, "gelu": torch.nn.GELU}[act]
                   for layer in g.flow.layers)  # fmt: skip
        assert f'activation="{act}"' in run_posteriordb.guide_config(
            guide, run_posteriordb.Settings()
        )
        assert run_posteriordb.guide_label(guide) == f"pyro_nf.{guide}"


def test_reference_draws_agree_with_models(db):
    """Spot check of the maths: the log joint is higher at the reference mean than far from it."""
    spec, data, ref = load_posterior(db, "sblrc-blr")
    beta = torch.tensor([ref[f"beta[{i}]"].mean() for i in range(1, 6)])
    sigma = torch.tensor(ref["sigma"].mean())

    def lj(b, s):
        tr = poutine.trace(poutine.condition(spec.model, {"beta": b, "sigma": s})).get_trace(data)
        return tr.log_prob_sum()

    assert lj(beta, sigma) > lj(beta + 0.5, sigma)
    assert lj(beta, sigma) > lj(beta, 2 * sigma)


def test_smoke_run(tmp_path):
    """The CLI on two posteriors, every guide, a few steps: the report and plots are written."""
    import warnings

    import run_posteriordb

    threads = torch.get_num_threads()
    args = ["--posteriordb", DB_PATH, "--quick", "--steps", "20", "--samples", "300",
            "--elbo-samples", "300", "--out", str(tmp_path)]  # fmt: skip
    try:
        with warnings.catch_warnings():  # main() sets process-wide warning filters
            summary = run_posteriordb.main(args)
    finally:
        torch.set_num_threads(threads)  # and one torch thread
    md = (tmp_path / "posteriordb_quick.md").read_text()
    for png in ("posteriordb_quick_w1.png", "posteriordb_quick_khat.png"):
        data = (tmp_path / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000, png
    lines = (tmp_path / "posteriordb_quick.jsonl").read_text().splitlines()
    assert len(lines) == 2 * len(run_posteriordb.ALL_GUIDES)

    guides = [run_posteriordb.guide_label(g) for g in run_posteriordb.ALL_GUIDES]
    # the W1 table: a header with every guide, one row per posterior, a number in every cell
    header = next(ln for ln in md.splitlines() if ln.startswith("| posterior | AutoNormal"))
    assert [c.strip() for c in header.strip("|").split("|")][1:] == guides
    section = md.split("## Standardized W1")[1].split("##")[0]
    rows = [ln for ln in section.splitlines() if ln.startswith("| ") and "posterior" not in ln]
    assert [r.split("|")[1].strip() for r in rows] == [
        "eight_schools_noncentered",
        "blr",
    ]
    for r in rows:
        cells = [c.strip().strip("*") for c in r.strip("|").split("|")[1:]]
        assert len(cells) == len(guides)
        assert all(re.fullmatch(r"\d+\.\d{3}|inf", c) for c in cells), r
    # the ranking table lists every guide once
    ranking = md.split("## Ranking")[1].split("##")[0]
    assert sorted(ln.split("|")[1].strip() for ln in ranking.splitlines()
                  if ln.startswith("| ") and "mean rank" not in ln) == sorted(guides)  # fmt: skip
    for check in ("Acceptance checks", "Best guide per posterior", "machine:", "command:"):
        assert check in md
    assert set(summary["best"]) == {"eight_schools-eight_schools_noncentered", "sblrc-blr"}


def test_defaults_verdict_bands():
    """A flow guide ties AutoNormal within max(2 combined s.e., noise floor), else wins or loses."""
    from run_posteriordb import verdict

    assert verdict((0.10, 0.01), (0.12, 0.01), floor=0.02) == "tie"  # within the noise floor
    assert verdict((0.10, 0.01), (0.20, 0.01), floor=0.02) == "better"
    assert verdict((0.30, 0.01), (0.20, 0.01), floor=0.02) == "worse"
    assert verdict((0.30, 0.06), (0.20, 0.01), floor=0.02) == "tie"  # within 2 combined s.e.
    assert verdict((0.05, math.nan), (math.inf, math.nan), floor=0.02) == "better"


def test_defaults_smoke_run(tmp_path):
    """--defaults: every guide called with its default arguments, and the verdict report."""
    import warnings

    import run_posteriordb

    threads = torch.get_num_threads()
    args = ["--posteriordb", DB_PATH, "--defaults", "--quick", "--steps", "20",
            "--posteriors", "sblrc-blr", "--samples", "300", "--elbo-samples", "300",
            "--out", str(tmp_path)]  # fmt: skip
    try:
        with warnings.catch_warnings():
            summary = run_posteriordb.main(args)
    finally:
        torch.set_num_threads(threads)
    md = (tmp_path / "posteriordb_defaults_quick.md").read_text()
    with open(tmp_path / "posteriordb_defaults_quick.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert sorted(r["guide"] for r in records) == sorted(run_posteriordb.DEFAULT_GUIDES)
    assert all(r["status"] == "ok" for r in records)
    # the flow guides were built with their defaults: the Laplace start, found on this posterior
    assert all(r["laplace_used"] for r in records if r["guide"] != "AutoNormal")
    assert "`pyro_nf.AutoPlanarFlow(model)`" in md and "`AutoNormal(model)`" in md
    assert "20 steps of Adam, lr 0.01, no schedule" in md
    flows = len(run_posteriordb.DEFAULT_GUIDES) - 1
    assert len(summary["verdicts"]) == flows
    assert "no worse than AutoNormal (mean W1): **" in md
    row = next(ln for ln in md.splitlines() if ln.startswith("| blr |"))
    assert len(re.findall(r"\((better|tie|worse)\)", row)) == flows


def test_defaults_options_set_one_argument_each():
    """--defaults: "[K=4]" sets num_transforms, "[gelu]" the MADE activation (MADE guides only);
    anything else is refused by name."""
    import pyro.distributions as dist
    from run_posteriordb import _make_default_guide, default_guide_config, known_default_guide

    import pyro_nf

    def model():
        pyro.sample("x", dist.Normal(torch.zeros(3), 1.0).to_event(1))

    assert known_default_guide("AutoIAFFlow[K=4]") and known_default_guide("AutoIAFFlow[K=2+gelu]")
    assert known_default_guide("AutoSplineFlow[gelu]")
    for bad in ("AutoPlanarFlow[gelu]", "AutoIAFFlow[K=0]", "AutoIAFFlow[K=x]", "AutoNormal[K=2]"):
        assert not known_default_guide(bad), bad
    guide = _make_default_guide("AutoIAFFlow[K=4+gelu]", model).setup()
    assert len(guide.flow.layers) == 4
    assert isinstance(guide.flow.layers[0].made.activation, torch.nn.GELU)
    assert len(_make_default_guide("AutoIAFFlow", model).setup().flow.layers) == len(
        pyro_nf.AutoIAFFlow(model).setup().flow.layers
    )
    assert (
        default_guide_config("AutoIAFFlow[K=2]") == "`pyro_nf.AutoIAFFlow(model, num_transforms=2)`"
    )
