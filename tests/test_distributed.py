"""``fit(..., distributed=True)`` and ``pyro_nf.distributed``.

The multi-process checks launch two gloo ranks once with ``torch.distributed.run`` (see
``tests/distributed_worker.py``) and assert on what each rank wrote; they are marked
``distributed`` (and ``slow``) and run in CI's own bounded step: ``pytest -m distributed``.
"""

import json
import os
import pathlib
import subprocess
import sys

import pyro
import pyro.distributions as dist
import pytest
import torch

import pyro_nf
import pyro_nf.distributed as pd

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("distributed")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        env.pop(var, None)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(ROOT / "tests" / "distributed_worker.py"),
        str(folder),
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return [json.loads((folder / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.distributed
@pytest.mark.slow
def test_parameters_and_losses_identical_on_every_rank(ranks):
    assert all(r["identical"]["all_equal"] for r in ranks)
    assert ranks[0]["identical"]["num_params"] > 0
    assert ranks[0]["identical"]["losses"] == ranks[1]["identical"]["losses"]
    losses = ranks[0]["identical"]["losses"]
    assert len(losses) == 30 and losses[-1] < losses[0]


@pytest.mark.distributed
@pytest.mark.slow
def test_every_rank_trains_rank_0s_laplace_start(ranks):
    # each rank's set-up found the Laplace start of its own shard; the fit shares rank 0's
    assert all(r["laplace_shards"]["used"] for r in ranks)
    assert all(r["laplace_shards"]["tril_equal"] for r in ranks)
    assert all(r["laplace_shards"]["params_equal"] for r in ranks)


@pytest.mark.distributed
@pytest.mark.slow
def test_diagnose_after_a_distributed_fit_is_the_same_on_every_rank(ranks):
    assert ranks[0]["identical"]["k_hat"] == ranks[1]["identical"]["k_hat"]


@pytest.mark.distributed
@pytest.mark.slow
def test_a_vae_with_a_flow_posterior_trains_identically_on_every_rank(ranks):
    for r in ranks:
        assert r["vae"]["all_equal"]
        assert any(n.startswith("encoder") for n in r["vae"]["names"])
        assert any(n.startswith("flow") for n in r["vae"]["names"])  # the Flow registered itself
    assert ranks[0]["vae"]["losses"] == ranks[1]["vae"]["losses"]


@pytest.mark.distributed
@pytest.mark.slow
def test_one_distributed_step_equals_one_step_on_all_the_rows(ranks):
    for r in ranks:
        assert r["one_step"]["max_abs_diff"] < 1e-5 * max(1.0, r["one_step"]["moved"])


@pytest.mark.distributed
@pytest.mark.slow
def test_resume_on_two_ranks_reproduces_the_uninterrupted_run(ranks):
    for r in ranks:
        assert r["resume"]["resumed"] == r["resume"]["straight"]
        assert len(r["resume"]["resumed"]) == 20


@pytest.mark.distributed
@pytest.mark.slow
def test_a_failing_rank_stops_every_rank_at_once(ranks):
    failing, other = ranks[1]["failure"], ranks[0]["failure"]
    assert failing["raised"] == "FitError" and failing["cause"] == "ValueError"
    assert other["raised"] == "FitError" and other["cause"] == "RankFailed"
    assert "rank(s) 1" in other["message"]
    assert failing["steps_done"] == other["steps_done"]
    assert other["seconds"] < 30  # the collective timeout is 60 s: it did not wait for it


# ---------------------------------------------------------------------------------------------
# One process: no launcher, and the pure helpers
# ---------------------------------------------------------------------------------------------
def _model(y):
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    with pyro.plate("n", len(y)):
        pyro.sample("y", dist.Normal(mu, 1.0), obs=y)


def test_distributed_outside_a_launcher_says_how_to_launch(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    guide = pyro_nf.AutoPlanarFlow(_model)
    with pytest.raises(RuntimeError, match="torchrun --nproc_per_node"):
        pyro_nf.fit(_model, guide, torch.ones(3), num_steps=2, distributed=True, progress=False)


def test_distributed_must_be_a_bool():
    guide = pyro_nf.AutoPlanarFlow(_model)
    with pytest.raises(TypeError, match="distributed must be True or False"):
        pyro_nf.fit(_model, guide, torch.ones(3), num_steps=2, distributed=1, progress=False)


def _as(monkeypatch, rank, world):
    monkeypatch.setattr(pd, "rank_and_world", lambda: (rank, world))


@pytest.mark.parametrize("world", [1, 2, 3, 7])
def test_local_ranges_partition_the_data(monkeypatch, world):
    blocks = []
    for rank in range(world):
        _as(monkeypatch, rank, world)
        blocks.append(pd.local_range(100))
    assert blocks[0][0] == 0 and blocks[-1][1] == 100
    assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))
    sizes = [b - a for a, b in blocks]
    assert max(sizes) - min(sizes) <= 1


def test_minibatch_draws_distinct_rows_of_this_ranks_block(monkeypatch):
    _as(monkeypatch, 1, 2)
    idx = pd.minibatch(100, 20)
    assert len(set(idx.tolist())) == 20 and idx.min() >= 50 and idx.max() < 100
    with pytest.raises(ValueError, match="larger than this rank's block of 50"):
        pd.minibatch(100, 51)


def test_epoch_batches_split_one_shuffle_between_ranks(monkeypatch):
    mine = []
    for rank in range(3):
        _as(monkeypatch, rank, 3)
        mine.append(torch.cat(pd.epoch_batches(100, 8, epoch=2, seed=1)))
    union = torch.cat(mine)
    assert len(union) == 99 and len(set(union.tolist())) == 99  # 33 each, none twice
    _as(monkeypatch, 0, 3)
    assert torch.equal(torch.cat(pd.epoch_batches(100, 8, epoch=2, seed=1)), mine[0])
    assert not torch.equal(torch.cat(pd.epoch_batches(100, 8, epoch=3, seed=1)), mine[0])
    assert [len(b) for b in pd.epoch_batches(100, 8, epoch=0)] == [8, 8, 8, 8, 1]


def test_rank_seeds_are_distinct_and_rank_zero_keeps_the_seed():
    seeds = [pd.rank_seed(7, r) for r in range(8)]
    assert seeds[0] == 7 and len(set(seeds)) == 8
    assert seeds == [pd.rank_seed(7, r) for r in range(8)]


def test_a_one_process_checkpoint_is_refused_by_a_distributed_resume_and_back():
    group = pd.Group(0, 2, "gloo", False, torch.device("cpu"))
    with pytest.raises(pyro_nf.CheckpointError, match="one process.*2 ranks"):
        pd.check_checkpoint_ranks({}, "c.pt", group)
    with pytest.raises(pyro_nf.CheckpointError, match="2 ranks.*one process"):
        pd.check_checkpoint_ranks({"world_size": 2}, "c.pt", None)
    pd.check_checkpoint_ranks({"world_size": 2}, "c.pt", group)
    pd.check_checkpoint_ranks({}, "c.pt", None)


def test_minibatch_draws_every_subset_equally_often():
    """n=6, k=3: each of the 20 subsets should come up about 1/20 of the time, and each row
    half of the time (the redraw of repeated values must not favour any)."""
    torch.manual_seed(0)
    draws = 20_000
    counts = {}
    for _ in range(draws):
        key = tuple(sorted(pd.minibatch(6, 3).tolist()))
        assert len(set(key)) == 3
        counts[key] = counts.get(key, 0) + 1
    assert len(counts) == 20
    expected = draws / 20
    chi2 = sum((c - expected) ** 2 / expected for c in counts.values())
    assert chi2 < 43.8  # the 99.9% quantile of chi-square with 19 degrees of freedom


def test_minibatch_cost_does_not_depend_on_the_block_size():
    """With a block of 10^8 rows, a randperm would allocate 800 MB; the draw does not."""
    idx = pd.minibatch(100_000_000, 1000)
    assert len(set(idx.tolist())) == 1000 and int(idx.max()) < 100_000_000
