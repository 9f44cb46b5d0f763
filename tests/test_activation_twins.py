"""benchmarks/activation_twins.py: pairing of twin records and the wins it counts."""

from __future__ import annotations

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import activation_twins as twins  # noqa: E402


def _record(posterior, guide, seed, w1, k_hat=0.5, elbo=-10.0, status="ok"):
    return dict(posterior=posterior, guide=guide, seed=seed, w1=w1, k_hat=k_hat, elbo=elbo,
                status=status)  # fmt: skip


def test_pairs_only_seeds_both_twins_ran_and_counts_wins(tmp_path):
    records = [
        _record("a", "AutoIAFFlow[elu]", 0, 0.30, elbo=-10.0),
        _record("a", "AutoIAFFlow[gelu]", 0, 0.10, elbo=-9.0),
        _record("a", "AutoIAFFlow[elu]", 1, 0.20),
        _record("a", "AutoIAFFlow[gelu]", 1, 0.10),
        _record("a", "AutoIAFFlow[elu]", 2, 0.90),  # no twin: left out of the differences
        _record("b", "AutoIAFFlow[elu]", 0, 0.10),
        _record("b", "AutoIAFFlow[gelu]", 0, 0.40, status="failed"),  # failed: not loaded
        _record("b", "AutoIAFFlow[gelu]", 0, 0.30),  # the retry, later in the file: it counts
    ]
    path = tmp_path / "twins.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    loaded = twins.load([str(path)])
    assert len(loaded) == 7  # a: 3 ELU + 2 GELU, b: 1 + the retried GELU
    d = twins.paired(loaded, "AutoIAFFlow[elu]", "AutoIAFFlow[gelu]", "w1")
    assert d["a"] == pytest.approx([-0.2, -0.1]) and d["b"] == pytest.approx([0.2])
    lines, wins = twins.table(loaded, "AutoIAFFlow[elu]", "AutoIAFFlow[gelu]", "t")
    assert wins[0] == "W1: `AutoIAFFlow[gelu]` better on 1 of 2 posteriors, worse on 1"
    assert any(line.startswith("| a | 0.467 | 0.100 | -0.150 ± 0.050 (n=2)") for line in lines)


def test_failed_records_are_not_scored(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(_record("a", "AutoIAFFlow[elu]", 0, 0.3, status="failed")) + "\n")
    assert twins.load([str(path)]) == []


def test_vae_rows_reads_the_per_seed_table(tmp_path):
    md = tmp_path / "vae.md"
    md.write_text(
        "| posterior | seed 0 | seed 1 | mean ± s.e. over seeds | best epochs |\n"
        "|---|---:|---:|---:|---|\n"
        "| IAF K=4 | 22.80 | 23.10 | **22.95 ± 0.15** | 500, 420 |\n"
    )
    assert twins.vae_rows(str(md)) == {"IAF K=4": [22.80, 23.10]}


def test_vae_seeds_activation_swaps_only_the_made_nonlinearity():
    """vae_seeds.py --activation: the twin has GELU MADEs and the same initial weights."""
    import torch
    import vae
    import vae_seeds

    from pyro_nf.transforms.autoregressive import ACTIVATIONS, DEFAULT_ACTIVATION, MADE

    make = vae_seeds.with_activation(vae.make_posterior, "gelu")
    torch.manual_seed(0)
    gelu = make("iaf4")
    torch.manual_seed(0)
    elu = vae.make_posterior("iaf4")
    mades = [m for m in gelu.modules() if isinstance(m, MADE)]
    assert len(mades) == 4 and all(isinstance(m.activation, torch.nn.GELU) for m in mades)
    default = ACTIVATIONS[DEFAULT_ACTIVATION]
    assert all(type(m.activation) is default for m in elu.modules() if isinstance(m, MADE))
    for (name, a), (_, b) in zip(gelu.state_dict().items(), elu.state_dict().items()):
        if not name.endswith("_extra_state"):  # the record names the activation
            assert torch.equal(a, b), name


@pytest.mark.parametrize("defaults", [True, False])
def test_report_states_the_budget_of_the_runs_it_read(tmp_path, defaults):
    """Twins of a --defaults run are at the default call's budget, the others at the benchmark's."""
    records = [_record("a", "AutoIAFFlow", 0, 0.3), _record("a", "AutoIAFFlow[gelu]", 0, 0.2)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    command = "python benchmarks/run_posteriordb.py" + (" --defaults" if defaults else "")
    runs = [dict(command=command, fits=2, wall_seconds=60.0, finished="now", machine="m")]
    (tmp_path / "d.runs.json").write_text(json.dumps(runs))
    out = tmp_path / "out.md"
    twins.main(["--twins", str(tmp_path / "d.jsonl"), "--pairs", "AutoIAFFlow|AutoIAFFlow[gelu]",
                "--out", str(out)])  # fmt: skip
    text = out.read_text()
    assert ("3000 Adam steps at lr 0.01 with no schedule" in text) == defaults
    assert ("2000 Adam steps, lr 0.01 with a cosine" in text) == (not defaults)
    assert "| a | 0.300 | 0.200 | -0.100 (n=1)" in text
