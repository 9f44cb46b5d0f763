"""The scripts in examples/ and the Python blocks of README.md run, and say what they should.

Each script runs as a user runs it (a subprocess from the repository root) with its smallest
settings; these runs are marked ``slow``. The posteriordb path checks of the quickstart are quick
and run by default. The README's main example runs with fewer steps and draws; its VAE block runs
exactly as written.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
import subprocess
import sys

import pytest
from device_params import DEVICES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
DB_PATH = os.environ.get(
    "POSTERIORDB_PATH", os.path.join(ROOT, "..", "shared", "posteriordb", "posterior_database")
)
HAVE_DB = os.path.isdir(os.path.join(DB_PATH, "reference_posteriors"))
NUMBER = r"-?\d+\.\d+"


def run_example(script: str, *argv: str, timeout: int = 600) -> str:
    """Run ``examples/<script>`` with ``argv``; return stdout + stderr (asserting it succeeded)."""
    env = dict(os.environ, MPLBACKEND="Agg", OMP_NUM_THREADS="1")
    env.pop("POSTERIORDB_PATH", None)  # each test says whether it wants the reference
    proc = subprocess.run(
        [sys.executable, os.path.join(EXAMPLES, script), *argv],
        capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def load_quickstart():
    spec = importlib.util.spec_from_file_location("examples_quickstart", os.path.join(EXAMPLES, "quickstart.py"))  # fmt: skip
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------ quickstart.py
@pytest.mark.slow  # two fits of 30 steps: 26 s on a loaded 2-core machine
def test_quickstart_fits_diagnoses_and_plots(tmp_path):
    argv = ["--steps", "30", "--samples", "300", "--out", str(tmp_path)]
    if HAVE_DB:
        argv += ["--posteriordb", DB_PATH]
    out = run_example("quickstart.py", *argv)
    assert "Guessed max_plate_nesting" not in out  # Pyro's INFO line is silenced
    rows = dict(re.findall(rf"^(AutoNormal|AutoIAFFlow) +({NUMBER} +{NUMBER} +{NUMBER}) ", out, re.M))  # fmt: skip
    assert set(rows) == {"AutoNormal", "AutoIAFFlow"}, out[-2000:]
    for name, numbers in rows.items():
        elbo, iw_elbo, k_hat = (float(v) for v in numbers.split())
        assert math.isfinite(elbo) and math.isfinite(k_hat), name
        assert iw_elbo >= elbo - 1.0, name  # the IWAE bound is the tighter one (up to noise)
    assert "PSIS k-hat" in out and "hdi_3%" in out  # diagnose's table and arviz.summary
    if HAVE_DB:
        assert re.search(rf"^NUTS +{NUMBER} +{NUMBER}$", out, re.M)
    assert (tmp_path / "quickstart.png").stat().st_size > 10_000


def test_quickstart_refuses_a_bad_posteriordb_path_before_fitting(tmp_path, monkeypatch):
    quickstart = load_quickstart()

    def no_fit(*args, **kwargs):
        raise AssertionError("fit ran before the posteriordb path was checked")

    monkeypatch.setattr(quickstart.pyro_nf, "fit", no_fit)
    monkeypatch.delenv("POSTERIORDB_PATH", raising=False)
    with pytest.raises(SystemExit) as error:
        quickstart.main(["--posteriordb", str(tmp_path / "nowhere"), "--out", str(tmp_path)])
    message = str(error.value)
    assert "POSTERIORDB_PATH" in message and "nowhere" in message
    assert "posterior_database" in message  # it says which layouts it looked for
    monkeypatch.setenv("POSTERIORDB_PATH", str(tmp_path / "elsewhere"))
    with pytest.raises(SystemExit, match="elsewhere"):  # the environment variable is read too
        quickstart.main(["--out", str(tmp_path)])


@pytest.mark.skipif(not HAVE_DB, reason=f"no posteriordb checkout at {DB_PATH}")
def test_quickstart_reads_the_reference_from_the_checkout_root_or_its_database_folder():
    quickstart = load_quickstart()
    database = os.path.abspath(DB_PATH)
    from_folder = quickstart.nuts_reference(database)
    from_root = quickstart.nuts_reference(os.path.dirname(database))
    assert sorted(from_folder) == ["mu", "tau", "theta[0]"]
    assert len(from_folder["tau"]) == 10_000 and (from_folder["tau"] > 0).all()
    assert (from_root["theta[0]"] == from_folder["theta[0]"]).all()


# ------------------------------------------------------------------------ the other scripts
@pytest.mark.slow  # two epochs on sklearn's digits: 27 s (loaded 2-core machine)
def test_vae_example_reports_a_bound_and_its_iwae_estimate(tmp_path):
    pytest.importorskip("sklearn")
    out = run_example("vae.py", "--epochs", "2", "--iw-samples", "20", "--device", "cpu", "--out", str(tmp_path))  # fmt: skip
    elbo = float(re.search(rf"test -ELBO +({NUMBER})", out).group(1))
    nll = float(re.search(rf"test -log p\(x\) +({NUMBER})", out).group(1))
    assert 0 < nll <= elbo < 45  # 64 binary pixels: a uniform model costs 64 log 2 = 44.4 nats
    assert (tmp_path / "vae.png").stat().st_size > 5_000


@pytest.mark.slow  # four fits of 30 steps: 28 s (loaded 2-core machine)
def test_diagnostics_example_prints_its_table_and_writes_its_plots(tmp_path):
    argv = ["--steps", "30", "--samples", "200", "--out", str(tmp_path)]
    if HAVE_DB:
        argv += ["--posteriordb", DB_PATH]
    out = run_example("diagnostics.py", *argv)
    rows = re.findall(rf"^(centred|non-centred) +(AutoNormal|AutoIAFFlow) +({NUMBER})", out, re.M)
    assert len(rows) == 4 and all(math.isfinite(float(k)) for *_, k in rows)
    pairs = sorted(p.name for p in tmp_path.glob("diagnostics_pairs_*.png"))
    assert len(pairs) == 4 and (tmp_path / "diagnostics_losses.png").stat().st_size > 0


@pytest.mark.slow  # 300 steps of a 2-D flow: 24 s (loaded 2-core machine)
def test_density_estimation_gets_close_to_the_true_banana(tmp_path):
    out = run_example("density_estimation.py", "--steps", "300", "--samples", "1000", "--out", str(tmp_path))  # fmt: skip
    m = re.search(rf"flow ({NUMBER}), true density ({NUMBER})", out)
    flow, true = float(m.group(1)), float(m.group(2))
    # The untrained flow scores about -35 nats; after 300 steps it is within a nat of the truth,
    # and it cannot beat the true density by more than the noise of 1000 held-out draws.
    assert true - 1.0 < flow < true + 0.1
    assert (tmp_path / "density_estimation.png").stat().st_size > 5_000


@pytest.mark.slow  # 5 steps of each part: 20 s (loaded 2-core machine)
@pytest.mark.parametrize("device", DEVICES)
def test_gpu_example_times_both_parts_on_the_device(device):
    pytest.importorskip("sklearn")
    out = run_example("gpu.py", "--device", device, "--steps", "5")
    assert re.search(rf"AutoIAFFlow, eight schools: {NUMBER} ms/step \(parameters on {device}", out), out  # fmt: skip
    assert re.search(rf"VAE with an IAF posterior, batch 100: {NUMBER} ms/step", out), out


# ------------------------------------------------------------------------ README.md
def readme_blocks() -> list[str]:
    with open(os.path.join(ROOT, "README.md")) as fh:
        return re.findall(r"```python\n(.*?)```", fh.read(), flags=re.S)


def test_readme_has_the_main_example_and_the_vae_block():
    blocks = readme_blocks()
    assert len(blocks) == 2
    main, vae = blocks
    for call in ("pyro_nf.fit(", "pyro_nf.diagnose(", "pyro_nf.to_inference_data("):
        assert call in main
    assert 'pyro.sample("z", flow(encoder(x)))' in vae


@pytest.mark.slow  # 50 steps and 300 draws instead of 2000 and 4000: 18 s (loaded)
def test_readme_main_example_runs(tmp_path):
    main = readme_blocks()[0]
    small = main.replace("num_steps=2000", "num_steps=50").replace("num_samples=4000", "num_samples=300")  # fmt: skip
    assert small.count("num_steps=50") == 1 and small.count("num_samples=300") == 2
    namespace: dict = {}
    exec(compile(small, "README.md (main example)", "exec"), namespace)
    assert namespace["result"].num_steps == 50
    assert namespace["idata"].posterior["tau"].shape == (4, 75)  # 300 draws as 4 chains


@pytest.mark.slow  # 1000 VAE steps as written, one thread: 43 s (loaded 2-core machine)
def test_readme_vae_block_runs_as_written(tmp_path):
    pytest.importorskip("sklearn")
    script = tmp_path / "readme_vae.py"
    script.write_text(readme_blocks()[1])
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=900, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    log_px = float(re.search(rf"held-out log p\(x\): ({NUMBER}) nats per digit", proc.stdout).group(1))  # fmt: skip
    assert -44.4 < log_px < 0  # better than a uniform model of 64 binary pixels


# ------------------------------------------------------------------------ distributed.py
@pytest.mark.slow
def test_distributed_example_runs_as_a_plain_script(tmp_path):
    argv = ["--rows", "5000", "--batch-size", "100", "--steps", "30", "--out", str(tmp_path)]
    out = run_example("distributed.py", *argv)
    assert re.search(r"1 process\(es\): [\d.]+ steps/s, [\d,]+ rows/s", out), out[-2000:]
    lines = (tmp_path / "losses_1.csv").read_text().splitlines()
    assert lines[0] == "step,loss" and len(lines) == 31
    assert all(math.isfinite(float(row.split(",")[1])) for row in lines[1:])
    assert (tmp_path / "losses_1.png").stat().st_size > 0


@pytest.mark.slow
@pytest.mark.distributed
def test_distributed_benchmark_runs_one_and_two_processes(tmp_path):
    results = tmp_path / "distributed.md"
    argv = ["--procs", "1", "2", "--rows", "4000", "--batch-size", "100", "--steps", "20"]
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "distributed.py"), *argv,
         "--results", str(results)],
        capture_output=True, text=True, timeout=600, cwd=ROOT, env=dict(os.environ, MPLBACKEND="Agg"),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = re.findall(r"^\| (\d) \| ([\d.]+) \| ([\d,]+) \|", results.read_text(), re.M)
    assert [r[0] for r in rows] == ["1", "2"]
    assert all(float(r[1]) > 0 for r in rows)
    assert (tmp_path / "distributed.png").stat().st_size > 0
