"""ELU against GELU MADEs, paired: the evidence for the MADE activation default (issue #23).

Reads the records of ``run_posteriordb.py`` runs of the twin configurations ``AutoIAFFlow[elu]``,
``AutoIAFFlow[gelu]``, ``AutoSplineFlow[elu]`` and ``AutoSplineFlow[gelu]`` (the guide's defaults
except the activation; each pair shares posterior, seed and budget) and, optionally, the
committed benchmark's records (``--baseline``, for ``AutoIAFFlow`` as it was configured there),
and the ``vae_seeds.py`` results of an ELU and a GELU run (``--vae ELU.md GELU.md``). Writes one
Markdown file with the paired differences per posterior (GELU minus ELU: negative W1 and k-hat,
positive ELBO favour GELU) and the count of posteriors each side wins.

    python benchmarks/activation_twins.py --twins OUT/twins.jsonl [more.jsonl ...] \\
        --baseline benchmarks/results/posteriordb.jsonl --out benchmarks/results/activation_twins.md
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys

import numpy as np

METRICS = (("w1", "W1", -1), ("k_hat", "k-hat", -1), ("elbo", "ELBO", +1))


def load(paths: list[str]) -> list[dict]:
    """The successful records of the runs, the last one of each (posterior, guide, seed)."""
    latest = {}
    for path in paths:
        with open(path) as fh:
            for line in fh:
                if line.strip():
                    r = json.loads(line)
                    latest[(r["posterior"], r["guide"], r["seed"])] = r
    return [r for r in latest.values() if r["status"] == "ok"]


def runs_of(paths: list[str]) -> list[dict]:
    """The invocations logged beside each records file (``NAME.runs.json``)."""
    out = []
    for path in paths:
        runs = re.sub(r"\.jsonl$", ".runs.json", path)
        if os.path.exists(runs):
            with open(runs) as fh:
                out += json.load(fh)
    return out


def paired(records: list[dict], a: str, b: str, key: str) -> dict[str, list[float]]:
    """Per posterior, the seed-by-seed differences ``b - a`` of ``key`` (seeds both have)."""
    by = {(r["posterior"], r["guide"], r["seed"]): r for r in records}
    out: dict[str, list[float]] = {}
    for (p, g, s), r in sorted(by.items()):
        if g == a and (p, b, s) in by:
            out.setdefault(p, []).append(by[(p, b, s)][key] - r[key])
    return out


def mean_se(xs: list[float]) -> tuple[float, float]:
    x = np.asarray(xs, dtype=float)
    se = x.std(ddof=1) / math.sqrt(x.size) if x.size > 1 else math.nan
    return float(x.mean()), float(se)


def cell(xs: list[float]) -> str:
    m, se = mean_se(xs)
    return f"{m:+.3f}" + ("" if math.isnan(se) else f" ± {se:.3f}") + f" (n={len(xs)})"


def means(records: list[dict], guide: str, key: str) -> dict[str, float]:
    out: dict[str, list[float]] = {}
    for r in records:
        if r["guide"] == guide:
            out.setdefault(r["posterior"], []).append(r[key])
    return {p: float(np.mean(v)) for p, v in out.items()}


def table(records: list[dict], a: str, b: str, title: str) -> tuple[list[str], list[str]]:
    """A Markdown table of ``b - a`` per posterior and metric, and the wins counted per metric."""
    lines = [
        f"### {title}",
        "",
        f"Differences `{b}` minus `{a}`, mean ± s.e. over the seeds both ran.",
        "",
    ]
    lines += ["| posterior | " + " | ".join(f"{a} {n}" for _, n, _ in METRICS[:1])
              + f" | {b} W1 | " + " | ".join(f"Δ {n}" for _, n, _ in METRICS) + " |"]  # fmt: skip
    lines += ["|---" * (3 + len(METRICS)) + "|"]
    diffs = {key: paired(records, a, b, key) for key, _, _ in METRICS}
    wa, wb = means(records, a, "w1"), means(records, b, "w1")
    posteriors = sorted(diffs["w1"])
    for p in posteriors:
        cells = " | ".join(cell(diffs[key][p]) for key, _, _ in METRICS)
        lines.append(f"| {p} | {wa[p]:.3f} | {wb[p]:.3f} | {cells} |")
    wins = []
    for key, name, sign in METRICS:
        better = sum(sign * np.mean(diffs[key][p]) > 0 for p in posteriors)
        worse = sum(sign * np.mean(diffs[key][p]) < 0 for p in posteriors)
        wins.append(
            f"{name}: `{b}` better on {better} of {len(posteriors)} posteriors, worse on {worse}"
        )
    return lines + [""], wins


def vae_rows(path: str) -> dict[str, list[float]]:
    """posterior label -> per-seed test -log p(x), from a vae_seeds.py results file."""
    rows = {}
    with open(path) as fh:
        for line in fh:
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if len(cells) >= 3 and re.fullmatch(r"-?\d+\.\d+", cells[1] or ""):
                vals = []
                for c in cells[1:]:
                    if re.fullmatch(r"-?\d+\.\d+", c):
                        vals.append(float(c))
                    else:
                        break
                rows[cells[0]] = vals
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--twins", nargs="+", required=True, help="run_posteriordb.py NAME.jsonl files")
    p.add_argument("--baseline", help="the committed benchmark's posteriordb.jsonl")
    p.add_argument(
        "--labelled", nargs="*", default=[], metavar="LABEL=PATH",
        help="more run_posteriordb.py records, their guide names prefixed with LABEL (e.g. the "
        "same guide at another --iaf-transforms)",
    )  # fmt: skip
    p.add_argument(
        "--pairs", nargs="*", default=[], metavar="A|B",
        help="more pairs of guide names (after --labelled's renaming) to tabulate, B minus A",
    )  # fmt: skip
    p.add_argument("--vae", nargs=2, metavar=("ELU", "GELU"), help="vae_seeds.py results files")
    p.add_argument("--out", default="benchmarks/results/activation_twins.md")
    p.add_argument("--verdict", default="", help="a closing paragraph (the decision it supports)")
    a = p.parse_args(argv)
    records = load(a.twins)
    for item in a.labelled:
        label, path = item.rsplit("=", 1)
        records += [{**r, "guide": f"{label} {r['guide']}"} for r in load([path])]
    cmd = "python " + " ".join([os.path.relpath(__file__), *(argv or sys.argv[1:])])
    L = ["# ELU against GELU MADEs: paired twins", "", f"Written by `{cmd}`.", ""]
    L += ["## Runs", ""]
    for r in runs_of(a.twins + [item.rsplit("=", 1)[1] for item in a.labelled]):
        L.append(f"- `{r['command']}`: {r['fits']} fits, {r['wall_seconds'] / 60:.1f} min, "
                 f"finished {r['finished']}; {r['machine']}")  # fmt: skip
    seeds = sorted({r["seed"] for r in records})
    runs = runs_of(a.twins)
    if runs and all("--defaults" in r["command"] for r in runs):
        budget = ("run_posteriordb.py --defaults: the default call, 3000 Adam steps at lr 0.01 "
                  "with no schedule, 4 particles, float64")  # fmt: skip
    else:
        budget = ("run_posteriordb.py's defaults: 2000 Adam steps, lr 0.01 with a cosine "
                  "schedule, 4 particles, float64")  # fmt: skip
    L += [
        f"- seeds {', '.join(map(str, seeds))}; every twin pair shares posterior, seed and budget "
        f"({budget}); W1, k-hat and ELBO as in posteriordb.md",
        "",
        "## posteriordb",
        "",
    ]
    verdicts = []
    for fam in ("AutoIAFFlow", "AutoSplineFlow"):
        if any(r["guide"] == f"{fam}[elu]" for r in records):
            lines, wins = table(records, f"{fam}[elu]", f"{fam}[gelu]", f"{fam}: GELU against ELU")
            L += lines
            verdicts += [f"- {fam}, {w}" for w in wins]
    if a.baseline:
        base = [r for r in load([a.baseline]) if r["guide"] == "AutoIAFFlow" and r["seed"] in seeds]
        merged = records + [{**r, "guide": "AutoIAFFlow (committed run)"} for r in base]
        for twin in ("AutoIAFFlow[elu]", "AutoIAFFlow[gelu]"):
            title = f"{twin} against the committed AutoIAFFlow run (its configuration in posteriordb.md)"
            lines, wins = table(merged, "AutoIAFFlow (committed run)", twin, title)
            L += lines
            verdicts += [f"- {twin} against the committed AutoIAFFlow, {w}" for w in wins]
    for pair in a.pairs:
        first, second = pair.split("|")
        lines, wins = table(records, first, second, f"{second} against {first}")
        L += lines
        verdicts += [f"- {second} against {first}, {w}" for w in wins]
    if a.vae:
        elu, gelu = (vae_rows(path) for path in a.vae)
        L += ["## VAE (vae_seeds.py)", "",
              "| posterior | ELU per seed | GELU per seed | GELU minus ELU (test -log p(x), nats) |",
              "|---|---|---|---|"]  # fmt: skip
        for name in elu:
            if name in gelu:
                d = [g - e for e, g in zip(elu[name], gelu[name])]
                L.append(f"| {name} | {' / '.join(f'{v:.2f}' for v in elu[name])} | "
                         f"{' / '.join(f'{v:.2f}' for v in gelu[name])} | {cell(d)} |")  # fmt: skip
                verdicts.append(
                    f"- VAE {name}: GELU minus ELU {cell(d)} nats (negative favours GELU)"
                )
        L += ["", f"ELU: `{a.vae[0]}`, GELU: `{a.vae[1]}`.", ""]
    L += ["## Counts", ""] + verdicts + [""]
    if a.verdict:
        L += ["## Verdict", "", a.verdict, ""]
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as fh:
        fh.write("\n".join(L))
    print("\n".join(L))


if __name__ == "__main__":
    main()
