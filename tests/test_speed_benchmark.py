"""benchmarks/speed.py --quick runs and writes a well-formed report (its figures are not checked)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_speed_benchmark_quick_writes_its_tables(tmp_path):
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "speed.py"), "--quick", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "MPLBACKEND": "Agg"},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    report = (tmp_path / "speed_quick.md").read_text()
    assert (tmp_path / "speed_quick.png").stat().st_size > 0
    rows = dict(re.findall(r"^\| (.+?) \| ([0-9.]+|nan) \|", report, flags=re.M))
    for name in (
        "Pyro AutoNormalizingFlow planar K=32",
        "pyro_nf planar K=32, pyro_nf.fit",
        "hand-written torch planar K=32",
    ):
        assert float(rows[name]) > 0, name
    assert re.search(r"is [0-9.]+x faster than Pyro's", report)
    assert re.search(r"R\^2 = [0-9.]+", report)


def test_speed_cuda_benchmark_runs_on_the_cpu_and_reports_every_row(tmp_path):
    env = {**os.environ, "MPLBACKEND": "Agg"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "speed_cuda.py"), "--device", "cpu",
         "--quick", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    report = (tmp_path / "speed_cuda_quick_cpu.md").read_text()
    rows = {name: (t, note) for name, t, note in re.findall(r"^\| (.+?) \| ([0-9.]+|nan) \| (.*?) \|$", report, flags=re.M)}  # fmt: skip
    assert len(rows) == 22
    for name, (t, note) in rows.items():
        if name.endswith("(floor)"):  # the CUDA graph rows say why they have no figure
            assert t == "nan" and note == "CUDA only", name
        else:  # every other row ran (a failure or a fallback would be noted)
            assert float(t) > 0 and note == "", (name, note)
    assert "pyro_nf.captured_step n/a the floor" in report  # no floor on a CPU
