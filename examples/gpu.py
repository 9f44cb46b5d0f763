"""On a GPU: an autoguide and a VAE step with the data on CUDA, timed.

Run::

    python examples/gpu.py                  # CUDA when there is one, else the CPU
    python examples/gpu.py --device cpu     # the same on the CPU, to compare

Nothing in the code is GPU-specific: the data go to ``--device``, and the rest follows them.

1. ``pyro_nf.AutoIAFFlow`` on the non-centred eight schools, data on the device, fitted with
   :func:`pyro_nf.fit` (4 particles); the guide puts its parameters where the model's data are.
   Then :func:`pyro_nf.diagnose` runs there too.
2. The flow-posterior VAE of ``examples/vae.py`` (encoder, decoder and ``pyro_nf.Flow`` moved with
   ``.to(device)``), trained for some steps on mini-batches of sklearn's digits.

Prints milliseconds per step for both. At these sizes a GPU step is bound by kernel launches, not
arithmetic, so do not expect a speed-up over one CPU thread (``docs/gpu.rst`` and
``benchmarks/results/gpu_check.md`` have measured numbers; ``benchmarks/gpu_check.py`` is the full
check of every public path).
"""

from __future__ import annotations

import argparse
import time

import pyro
import torch
from pyro.infer import SVI, Trace_ELBO
from vae import VAE, load_digits  # examples/vae.py

import pyro_nf
from pyro_nf.models import eight_schools_data, eight_schools_noncentered


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # CUDA runs asynchronously: wait before reading the clock


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=500, help="steps of each part")
    args = p.parse_args(argv)
    if args.steps < 2:
        p.error("--steps must be at least 2")
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {device} ({name}), torch {torch.__version__}")

    # 1. An autoguide: the data on the device, nothing else changes.
    pyro.clear_param_store()
    y, sigma = (t.to(device) for t in eight_schools_data())
    model = eight_schools_noncentered
    guide = pyro_nf.AutoIAFFlow(model, num_transforms=2)
    result = pyro_nf.fit(model, guide, y, sigma, num_steps=args.steps, num_particles=4, seed=0, progress=False)  # fmt: skip
    where = next(p.device for p in guide.parameters())
    d = pyro_nf.diagnose(model, guide, y, sigma, num_samples=1000)
    autoguide_ms = 1e3 * result.seconds_per_step
    print(f"AutoIAFFlow, eight schools: {autoguide_ms:.2f} ms/step (parameters on {where}), "
          f"final loss {result.final_loss:.2f}, PSIS k-hat {d.k_hat:.2f}")  # fmt: skip

    # 2. A VAE step: move the modules (the flow among them) with .to(device).
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    train, _ = load_digits(device)
    vae = VAE(train.shape[1], latent=8, hidden=128, flow="iaf", num_transforms=2).to(device)
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-3}), Trace_ELBO())
    batches = torch.randint(len(train), (args.steps, 100), device=device)
    svi.step(train[batches[0]])  # the first step creates the parameters: not timed
    synchronize(device)
    start = time.perf_counter()
    losses = [svi.step(train[idx]) for idx in batches[1:]]
    synchronize(device)
    vae_ms = 1e3 * (time.perf_counter() - start) / max(1, len(losses))
    print(f"VAE with an IAF posterior, batch 100: {vae_ms:.2f} ms/step, "
          f"last -ELBO {losses[-1] / 100:.2f} nats/digit")  # fmt: skip
    return {"autoguide_ms": autoguide_ms, "vae_ms": vae_ms, "device": str(where), "k_hat": d.k_hat}


if __name__ == "__main__":
    main()
