"""A VAE whose approximate posterior is a pyro_nf flow, on scikit-learn's 8x8 digits.

Run::

    python examples/vae.py                         # IAF posterior, 2 layers; under a minute on a CPU
    python examples/vae.py --num-transforms 0      # the usual diagonal Normal posterior, to compare
    python examples/vae.py --flow planar --num-transforms 8
    python examples/vae.py --device cuda           # on a GPU

The only change from a Gaussian-posterior VAE is the last line of the guide: instead of
``pyro.sample("z", dist.Normal(loc, scale).to_event(1))`` it samples ``pyro.sample("z", flow(h))``,
where ``h`` is the encoder's output for the mini-batch and ``flow`` a
``pyro_nf.Flow(latent_dim, "iaf", K, context_dim=H)``: each digit gets its own flow, its
parameters computed from ``h`` (amortized inference). The flow registers its parameters with
Pyro's param store itself, so ``SVI`` trains it with nothing else added.

Prints the training -ELBO per digit as it goes, then on the held-out digits the -ELBO and the
importance-weighted estimate of -log p(x) (:func:`pyro_nf.log_marginal_likelihood`, Burda et al.
2016), both in nats per digit (lower is better). Writes ``vae.png``: held-out digits, their
reconstructions and digits decoded from the prior.

Data: ``sklearn.datasets.load_digits()`` (1797 digits of 8x8 pixels, values 0-16), binarized at 8.
The measured comparison of posteriors on MNIST is ``benchmarks/vae.py``.
"""

from __future__ import annotations

import argparse
import os
import time

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI, Trace_ELBO
from torch import nn

import pyro_nf


class VAE(nn.Module):
    """Bernoulli decoder over the pixels; the encoder's output is the context of a flow posterior."""

    def __init__(self, pixels: int, latent: int, hidden: int, flow: str, num_transforms: int):
        super().__init__()
        self.latent = latent
        self.encoder = nn.Sequential(nn.Linear(pixels, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())  # fmt: skip
        self.decoder = nn.Sequential(nn.Linear(latent, hidden), nn.ReLU(), nn.Linear(hidden, pixels))  # fmt: skip
        self.flow = pyro_nf.Flow(latent, flow, num_transforms, context_dim=hidden)

    def model(self, x):
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(self.latent), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(z)).to_event(1), obs=x)

    def guide(self, x):
        pyro.module("encoder", self.encoder)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", self.flow(self.encoder(x)))  # was: dist.Normal(loc, scale).to_event(1)


def load_digits(device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Binarized digits, shuffled and split into 1500 training and 297 test digits."""
    from sklearn.datasets import load_digits

    x = torch.as_tensor(load_digits().data >= 8, dtype=torch.float32)
    x = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))]
    return x[:1500].to(device), x[1500:].to(device)


def parse_args(argv=None) -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--flow", default="iaf", choices=["iaf", "planar", "radial", "spline"])
    p.add_argument("--num-transforms", type=int, default=2, help="flow layers; 0: diagonal Normal")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--iw-samples", type=int, default=500, help="draws per digit for -log p(x); 0: skip")  # fmt: skip
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="examples/output", help="folder for vae.png")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)  # networks this small: one thread is fastest
    pyro.clear_param_store()
    pyro.set_rng_seed(args.seed)
    train, test = load_digits(device, args.seed)
    vae = VAE(train.shape[1], latent=8, hidden=128, flow=args.flow, num_transforms=args.num_transforms).to(device)  # fmt: skip
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-3}), Trace_ELBO())

    start, batch = time.perf_counter(), 100
    for epoch in range(1, args.epochs + 1):
        order = torch.randperm(len(train), device=device)
        total = sum(svi.step(train[idx]) for idx in order.split(batch))
        if epoch == 1 or epoch % 10 == 0 or epoch == args.epochs:
            print(f"epoch {epoch:4d}  train -ELBO {total / len(train):7.3f} nats/digit")
    print(f"{args.epochs} epochs in {time.perf_counter() - start:.1f} s on {device}")

    with torch.no_grad():
        test_elbo = -svi.evaluate_loss(test) / len(test)
        result = {"test_elbo": test_elbo}
        print(f"test -ELBO         {-test_elbo:7.3f} nats/digit")
        if args.iw_samples > 0:
            est = pyro_nf.log_marginal_likelihood(
                vae.model, vae.guide, test, num_samples=args.iw_samples, data_plate="data"
            )
            result["test_log_px"] = est.value / len(test)
            print(f"test -log p(x)     {-result['test_log_px']:7.3f} nats/digit "
                  f"(IWAE, {args.iw_samples} draws per digit: a tighter bound than the ELBO)")  # fmt: skip
        result["figure"] = plot(vae, test, args.out)
    print(f"wrote {result['figure']}")
    return result


def plot(vae: VAE, test: torch.Tensor, out: str) -> str:
    """Rows: held-out digits, their reconstructions (pixel probabilities), digits from the prior."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = test[:10]
    z = vae.flow(vae.encoder(x)).sample()
    rows = [x, torch.sigmoid(vae.decoder(z)), torch.sigmoid(vae.decoder(torch.randn_like(z)))]
    fig, axes = plt.subplots(3, 10, figsize=(8, 2.7))
    for r, (row, title) in enumerate(zip(rows, ["held-out digits", "reconstructions", "from the prior"])):  # fmt: skip
        for c, ax in enumerate(axes[r]):
            ax.imshow(row[c].reshape(8, 8).cpu().numpy(), cmap="gray_r", vmin=0, vmax=1)
            ax.set_axis_off()
        axes[r, 0].set_title(title, fontsize=8, loc="left")
    fig.tight_layout()
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "vae.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
