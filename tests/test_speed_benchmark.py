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
