"""Step time on a GPU against the launch-overhead floor (issue #19), in one run.

Run::

    python benchmarks/speed_cuda.py                        # CUDA: writes benchmarks/results/speed_cuda.md
    python benchmarks/speed_cuda.py --device cpu --quick   # small sizes, a few seconds (CI smoke test)

Four tables, every row timed in this process, one after the other:

1. **VAE step**, MNIST-sized (encoder 784-300-300, z of 20, decoder 20-300-300-784, Bernoulli
   pixels), posterior ``pyro_nf.Flow(20, "planar", 16, context_dim=300)``, batches of 100 and
   1000 random binary images (the pixel values do not change the time): Pyro ``SVI`` +
   ``Trace_ELBO``; :func:`pyro_nf.captured_step` (captured in one CUDA graph on CUDA) and the
   same step with ``capture=False``; the same network written in plain torch (affine base, 16
   planar layers, each layer's parameters from a linear head of the encoder's output, as
   ``pyro_nf.Flow`` does), eager; and that plain-torch step captured whole (forward, backward,
   ``Adam(capturable=True)``) in one CUDA graph: the floor.
2. **Autoguide step**, ``AutoPlanarFlow`` K=32 on the logistic regression of
   ``benchmarks/speed.py`` (N=500, D=21): ``pyro_nf.fit`` as usual, ``fit(compile=True)``, and
   the plain-torch step (same layers and constraint) eager and in one CUDA graph (the floor).
3. **Large D**: the Gaussian model of ``benchmarks/speed.py`` at D=10^5 (``--quick``: 10^3):
   ``AutoPlanarFlow`` and ``AutoRadialFlow`` K=8 through ``fit`` and ``fit(compile=True)``
   against ``AutoNormal`` through ``fit`` (Trace_ELBO) and under ``SVI``.
4. **IAF**: ``AutoIAFFlow`` K=2 with its default MADE width at D=10^4 (``--quick``: 100).

Timing: calls of a step function get a warm-up, then ``--repeats`` blocks of ``--steps`` calls
with the device synchronized at the end of each block; the median block's time per call is
reported. A ``fit`` row is fit's marginal time per step: the loop time of a fit of ``W + steps`` steps
minus that of a fit of ``W`` steps (each builds its guide and, with ``compile=True``, captures its
graph), over ``steps``, so set-up and capture are not counted; median over ``--repeats``. A captured row that
fell back to an eager step says so in the table (with the warning's reason).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
import warnings

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormal
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# this checkout's pyro_nf, not another installed copy (a run in a worktree measures its own code)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from _machine import cpu_name  # noqa: E402 - benchmarks/_machine.py, beside this script
from speed import plain_logistic_loss  # noqa: E402 - the same loss as speed.py's hand-written row

import pyro_nf  # noqa: E402

SHIFT = math.log(math.e - 1.0)
HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


# ------------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(call, device, steps: int, repeats: int, warmup: int = 10) -> float:
    """Median over blocks of the seconds per call (device synchronized at each block's end)."""
    for _ in range(warmup):
        call()
    sync(device)
    blocks = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            call()
        sync(device)
        blocks.append((time.perf_counter() - t0) / steps)
    return statistics.median(blocks)


def time_fit(run, device, steps: int, repeats: int, warmup: int = 10) -> float:
    """fit's marginal seconds per step: ``(T(warmup + steps) - T(warmup)) / steps``, with ``T``
    the seconds of fit's loop (``FitResult.seconds``: the guide's set-up is not in it, the
    warm-up and capture of a captured step are in both terms)."""
    run(warmup)  # first use: imports, kernels, allocator
    marginal = []
    for _ in range(repeats):
        short = run(warmup)
        long = run(warmup + steps)
        marginal.append((long - short) / steps)
    return statistics.median(marginal)


class Fallbacks:
    """Collects the warnings of the captured paths: a row that fell back says so."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def __enter__(self):
        self._ctx = warnings.catch_warnings(record=True)
        self._record = self._ctx.__enter__()
        warnings.simplefilter("always")
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)
        for w in self._record:
            text = str(w.message)
            if ("eager" in text or "captured" in text) and text not in self.seen:
                self.seen.append(text)


# ------------------------------------------------------------------------------------------------
# 1. The VAE step
# ------------------------------------------------------------------------------------------------
class PyroVAE(nn.Module):
    """The VAE of examples/vae.py: Bernoulli pixels, a planar flow posterior from the encoder."""

    def __init__(self, pixels: int, hidden: int, latent: int, num_transforms: int) -> None:
        super().__init__()
        self.latent = latent
        self.encoder = nn.Sequential(nn.Linear(pixels, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())  # fmt: skip
        self.decoder = nn.Sequential(nn.Linear(latent, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, pixels))  # fmt: skip
        self.flow = pyro_nf.Flow(latent, "planar", num_transforms, context_dim=hidden)

    def model(self, x):
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", x.shape[0], device=x.device):
            z = pyro.sample("z", dist.Normal(x.new_zeros(self.latent), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(z)).to_event(1), obs=x)

    def guide(self, x):
        pyro.module("encoder", self.encoder)
        with pyro.plate("data", x.shape[0], device=x.device):
            pyro.sample("z", self.flow(self.encoder(x)))


class PlainVAE(nn.Module):
    """The same network in plain torch: affine base then K planar layers, each layer's
    ``(u, w, b)`` and the base's ``(loc, rho)`` from linear heads of the encoder's output."""

    def __init__(self, pixels: int, hidden: int, latent: int, num_transforms: int) -> None:
        super().__init__()
        self.latent, self.K = latent, num_transforms
        self.encoder = nn.Sequential(nn.Linear(pixels, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())  # fmt: skip
        self.decoder = nn.Sequential(nn.Linear(latent, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, pixels))  # fmt: skip
        self.base = nn.Linear(hidden, 2 * latent)
        self.layers = nn.ModuleList(nn.Linear(hidden, 2 * latent + 1) for _ in range(num_transforms))  # fmt: skip

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        d = self.latent
        h = self.encoder(x)
        loc, rho = self.base(h).split(d, -1)
        scale = F.softplus(rho)
        eps = torch.randn_like(loc)
        z = loc + scale * eps
        log_q = -0.5 * (eps * eps).sum(-1) - d * HALF_LOG_2PI - scale.log().sum(-1)
        for layer in self.layers:
            u, w, b = layer(h).split([d, d, 1], -1)
            wu = (w * u).sum(-1, keepdim=True)
            m1 = F.softplus(wu + SHIFT)
            u_hat = u + (m1 - 1 - wu) / (w * w).sum(-1, keepdim=True) * w
            t = torch.tanh((z * w).sum(-1, keepdim=True) + b)
            z = z + u_hat * t
            log_q = log_q - torch.log(t * t + (1 - t * t) * m1).squeeze(-1)
        log_prior = -0.5 * (z * z).sum(-1) - d * HALF_LOG_2PI
        logits = self.decoder(z)
        log_lik = -F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(-1)
        return -(log_prior + log_lik - log_q).sum()


def plain_steps(loss_fn, params, static_inputs, device, lr=1e-3):
    """(eager step, captured step or None) of a plain-torch loss: Adam, no host read.

    The captured one follows torch's whole-network recipe: warm-up on a side stream,
    ``Adam(capturable=True)``, gradients from the graph's pool, one ``replay()`` per step.
    """
    cuda = device.type == "cuda"
    eager_opt = torch.optim.Adam(params, lr=lr, foreach=True)

    def eager(*inputs):
        for mine, new in zip(static_inputs, inputs):
            mine.copy_(new)
        eager_opt.zero_grad(set_to_none=True)
        loss_fn().backward()
        eager_opt.step()

    if not cuda:
        return eager, None
    opt = torch.optim.Adam(params, lr=lr, capturable=True, foreach=True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            loss_fn().backward()
            opt.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        loss_fn().backward()
        opt.step()

    def captured(*inputs):
        for mine, new in zip(static_inputs, inputs):
            mine.copy_(new)
        graph.replay()

    return eager, captured


def vae_rows(args, device, results, notes):
    sizes = (64, 32, 4, 4) if args.quick else (784, 300, 20, 16)  # pixels, hidden, z, K
    for batch in (10, 20) if args.quick else (100, 1000):
        vae_batch_rows(args, device, results, notes, sizes, batch)


def vae_batch_rows(args, device, results, notes, sizes, batch: int) -> None:
    S, R = args.steps, args.repeats
    g = torch.Generator().manual_seed(0)
    data = torch.bernoulli(torch.full((8, batch, sizes[0]), 0.3), generator=g).to(device)
    it = iter(range(10**9))

    def next_batch():
        return data[next(it) % len(data)]

    tag = f"VAE batch {batch}"
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    vae = PyroVAE(*sizes).to(device)
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-3}), Trace_ELBO())
    measure(results, notes, f"{tag}: Pyro SVI + Trace_ELBO", lambda: time_calls(lambda: svi.step(next_batch()), device, S, R))  # fmt: skip
    for capture, label in ((True, "pyro_nf.captured_step"), (False, "pyro_nf.captured_step(capture=False)")):  # fmt: skip
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        vae = PyroVAE(*sizes).to(device)

        def timed(vae=vae, capture=capture):
            with Fallbacks() as fb:
                step = pyro_nf.captured_step(vae.model, vae.guide, next_batch(), lr=1e-3, capture=capture)  # fmt: skip
                t = time_calls(lambda: step(next_batch()), device, S, R)
                step.losses()
            if capture and device.type == "cuda" and not step.captured:
                raise_fallback(fb)
            return t

        measure(results, notes, f"{tag}: {label}", timed)
    torch.manual_seed(0)
    plain = PlainVAE(*sizes).to(device)
    x_static = next_batch().clone()
    eager, captured = plain_steps(lambda: plain.loss(x_static), list(plain.parameters()), [x_static], device)  # fmt: skip
    measure(results, notes, f"{tag}: plain torch, eager", lambda: time_calls(lambda: eager(next_batch()), device, S, R))  # fmt: skip
    floor = (lambda: time_calls(lambda: captured(next_batch()), device, S, R)) if captured else None  # fmt: skip
    measure(results, notes, f"{tag}: plain torch, one CUDA graph (floor)", floor)


# ------------------------------------------------------------------------------------------------
# 2-4. Autoguides
# ------------------------------------------------------------------------------------------------
def logistic_data(device, n=500, d=21):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(n, d - 1, generator=g)
    y = torch.bernoulli(torch.sigmoid(X @ torch.randn(d - 1, generator=g)), generator=g)
    return X.to(device), y.to(device)


def logistic(X, y):
    b = pyro.sample("b", dist.Normal(X.new_tensor(0.0), 1.0))
    w = pyro.sample("w", dist.Normal(X.new_zeros(X.shape[1]), 1.0).to_event(1))
    with pyro.plate("data", X.shape[0], device=X.device):
        pyro.sample("y", dist.Bernoulli(logits=b + X @ w), obs=y)


def gaussian(y):
    x = pyro.sample("x", dist.Normal(y.new_zeros(y.shape[-1]), 1.0).to_event(1))
    pyro.sample("y", dist.Normal(x, 1.0).to_event(1), obs=y)


def fit_runner(model, make_guide, model_args, compile, fb: Fallbacks):
    def run(num_steps: int):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        guide = make_guide(model)
        with fb:
            result = pyro_nf.fit(model, guide, *model_args, num_steps=num_steps, lr=1e-3,
                                 progress=False, compile=compile)  # fmt: skip
        return result.seconds  # (fit reads the device at its end: the work is done)

    return run


def fit_row(results, notes, name, model, make_guide, model_args, compile, device, args):
    fb = Fallbacks()

    def timed():
        t = time_fit(fit_runner(model, make_guide, model_args, compile, fb), device, args.fit_steps, args.repeats)  # fmt: skip
        if compile is True and fb.seen:
            raise_fallback(fb)
        return t

    measure(results, notes, name, timed)


def autoguide_rows(args, device, results, notes):
    K = 8 if args.quick else 32
    X, y = logistic_data(device)
    tag = f"logistic, AutoPlanarFlow K={K}"
    planar = lambda m: pyro_nf.AutoPlanarFlow(m, K)  # noqa: E731
    fit_row(results, notes, f"{tag}: pyro_nf.fit", logistic, planar, (X, y), False, device, args)
    fit_row(results, notes, f"{tag}: pyro_nf.fit(compile=True)", logistic, planar, (X, y), True, device, args)  # fmt: skip
    loss, params = plain_logistic_loss(K, X, y)
    eager, captured = plain_steps(loss, params, [], device)
    S, R = args.steps, args.repeats
    measure(results, notes, f"{tag}: plain torch, eager", lambda: time_calls(eager, device, S, R))
    floor = (lambda: time_calls(captured, device, S, R)) if captured else None
    measure(results, notes, f"{tag}: plain torch, one CUDA graph (floor)", floor)


def large_d_rows(args, device, results, notes):
    D = 1000 if args.quick else 100_000
    yd = torch.randn(D, generator=torch.Generator().manual_seed(0)).to(device)
    tag = f"Gaussian D={D}"
    for name, make in (("AutoPlanarFlow K=8", lambda m: pyro_nf.AutoPlanarFlow(m, 8)),
                       ("AutoRadialFlow K=8", lambda m: pyro_nf.AutoRadialFlow(m, 8))):  # fmt: skip
        fit_row(results, notes, f"{tag}: {name}, pyro_nf.fit", gaussian, make, (yd,), False, device, args)  # fmt: skip
        fit_row(results, notes, f"{tag}: {name}, pyro_nf.fit(compile=True)", gaussian, make, (yd,), True, device, args)  # fmt: skip
    fit_row(results, notes, f"{tag}: Pyro AutoNormal, pyro_nf.fit", gaussian, AutoNormal, (yd,), False, device, args)  # fmt: skip
    pyro.clear_param_store()
    svi = SVI(gaussian, AutoNormal(gaussian), pyro.optim.Adam({"lr": 1e-3}), Trace_ELBO())
    measure(results, notes, f"{tag}: Pyro AutoNormal, SVI + Trace_ELBO", lambda: time_calls(lambda: svi.step(yd), device, args.steps, args.repeats))  # fmt: skip


def iaf_rows(args, device, results, notes):
    D = 100 if args.quick else 10_000
    yd = torch.randn(D, generator=torch.Generator().manual_seed(0)).to(device)
    make = lambda m: pyro_nf.AutoIAFFlow(m, 2)  # noqa: E731
    tag = f"Gaussian D={D}: AutoIAFFlow K=2 (default MADE width)"
    fit_row(results, notes, f"{tag}, pyro_nf.fit", gaussian, make, (yd,), False, device, args)
    fit_row(results, notes, f"{tag}, pyro_nf.fit(compile=True)", gaussian, make, (yd,), True, device, args)  # fmt: skip


# ------------------------------------------------------------------------------------------------
# Running and reporting
# ------------------------------------------------------------------------------------------------
class FellBack(RuntimeError):
    pass


def raise_fallback(fb: Fallbacks) -> None:
    raise FellBack("; ".join(fb.seen) or "not captured")


def measure(results: dict, notes: dict, name: str, timer) -> None:
    """Run ``timer`` (``None``: not on this device) and keep its seconds per step, or why not."""
    if timer is None:
        results[name], notes[name] = float("nan"), "CUDA only"
    else:
        try:
            results[name] = timer()
        except FellBack as e:  # measured, but the captured path was not used: say so
            results[name], notes[name] = float("nan"), f"fell back: {e}"
        except Exception as e:  # noqa: BLE001 - a row that fails says why, the others run
            results[name], notes[name] = float("nan"), f"failed: {type(e).__name__}: {e}"
    shown = f"{1e3 * results[name]:9.3f} ms/step" if math.isfinite(results[name]) else notes[name]
    print(f"{name:<78} {shown}", flush=True)


def ratio(results, a: str, b: str) -> str:
    x, y = results.get(a, float("nan")), results.get(b, float("nan"))
    return f"{x / y:.2f}x" if math.isfinite(x) and math.isfinite(y) and y > 0 else "n/a"


def machine(device: torch.device) -> str:
    cpu = cpu_name()
    if device.type == "cuda":
        cpu = f"GPU {torch.cuda.get_device_name(device)} (host: {cpu})"
    return (
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, pyro {pyro.__version__}, "
        f"{torch.get_num_threads()} thread(s); load average at the end "
        + ", ".join(f"{x:.1f}" for x in os.getloadavg())
    )


def write_report(args, device, results, notes) -> str:
    lines = [
        "# Step time against the launch-overhead floor (issue #19)",
        "",
        f"Machine: {machine(device)}.",
        f"Command: `python benchmarks/speed_cuda.py --device {args.device}"
        f"{' --quick' if args.quick else ''}` (calls: median of {args.repeats} blocks of "
        f"{args.steps}; fit rows: median of {args.repeats} marginal times over "
        f"{args.fit_steps} steps; see the script's docstring).",
        "",
        "| step | ms per step | note |",
        "|---|---:|---|",
    ]
    for name, t in results.items():
        lines.append(f"| {name} | {1e3 * t:.3f} | {notes.get(name, '')} |")
    vae = [k for k in results if k.startswith("VAE batch") and k.endswith("(floor)")]
    lines += ["", "Against the floor (target: within 2x):", ""]
    for floor in vae:
        tag = floor.split(":")[0]
        lines.append(
            f"- {tag}: pyro_nf.captured_step {ratio(results, f'{tag}: pyro_nf.captured_step', floor)}"
            f" the floor; Pyro SVI {ratio(results, f'{tag}: Pyro SVI + Trace_ELBO', floor)}; "
            f"plain torch eager {ratio(results, f'{tag}: plain torch, eager', floor)}"
        )
    for floor in [k for k in results if k.startswith("logistic") and k.endswith("(floor)")]:
        tag = floor.split(":")[0]
        lines.append(
            f"- {tag}: fit(compile=True) {ratio(results, f'{tag}: pyro_nf.fit(compile=True)', floor)}"
            f" the floor; fit {ratio(results, f'{tag}: pyro_nf.fit', floor)}"
        )
    large = [k for k in results if k.startswith("Gaussian D=") and "AutoNormal, pyro_nf.fit" in k]
    for normal in large:
        tag = normal.split(":")[0]
        for family in ("AutoPlanarFlow K=8", "AutoRadialFlow K=8"):
            lines.append(
                f"- {tag}: {family} fit(compile=True) "
                f"{ratio(results, f'{tag}: {family}, pyro_nf.fit(compile=True)', normal)} "
                "AutoNormal through fit (target: at most 1x)"
            )
    suffix = ("_quick" if args.quick else "") + ("" if device.type == "cuda" else "_cpu")
    path = os.path.join(args.out, f"speed_cuda{suffix}.md")
    os.makedirs(args.out, exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="small sizes, few steps (CI)")
    parser.add_argument("--steps", type=int, default=100, help="calls per timed block")
    parser.add_argument("--fit-steps", type=int, default=200, help="steps of a fit row's timing")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", nargs="*", default=["vae", "autoguide", "large_d", "iaf"])
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.fit_steps, args.repeats = 5, 20, 1
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    results: dict[str, float] = {}
    notes: dict[str, str] = {}
    parts = {"vae": vae_rows, "autoguide": autoguide_rows, "large_d": large_d_rows, "iaf": iaf_rows}  # fmt: skip
    for part in args.only:
        parts[part](args, device, results, notes)
    print(f"wrote {write_report(args, device, results, notes)}")


if __name__ == "__main__":
    main()
