"""pyro_nf.inference_gaps on a linear-Gaussian "VAE", where log p(x) and the posterior are exact.

p(z) = N(0, I_d), p(x | z) = N(W z + b, s^2 I_p): p(x) = N(b, W W^T + s^2 I), and the posterior
is N(mu, Sigma) with precision Lambda = I + W^T W / s^2 and mu = Sigma W^T (x - b) / s^2. With
orthogonal columns of W, Lambda is diagonal and a diagonal Gaussian is exact.
"""

import math
import os
import sys

import pyro.distributions as dist
import pytest
import torch

import pyro_nf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

S = 0.5  # observation noise


def make_problem(orthogonal: bool, n: int = 12, d: int = 2, p: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    if orthogonal:
        q, _ = torch.linalg.qr(torch.randn(p, d, generator=g, dtype=torch.float64))
        w = q * torch.tensor([1.5, 0.7], dtype=torch.float64)[:d]
    else:  # two nearly parallel columns: a strongly correlated posterior
        a = torch.randn(p, 1, generator=g, dtype=torch.float64)
        w = torch.cat([a, a + 0.3 * torch.randn(p, 1, generator=g, dtype=torch.float64)], 1)
    b = torch.randn(p, generator=g, dtype=torch.float64)
    z = torch.randn(n, d, generator=g, dtype=torch.float64)
    x = z @ w.T + b + S * torch.randn(n, p, generator=g, dtype=torch.float64)
    precision = torch.eye(d, dtype=torch.float64) + w.T @ w / S**2
    cov = torch.linalg.inv(precision)
    mu = (x - b) @ w @ cov / S**2  # cov is symmetric
    marginal = dist.MultivariateNormal(b, w @ w.T + S**2 * torch.eye(p, dtype=torch.float64))

    def log_lik(x, z):
        return dist.Normal(z @ w.T + b, S).to_event(1).log_prob(x)

    return dict(x=x, w=w, b=b, mu=mu, cov=cov, precision=precision,
                log_px=marginal.log_prob(x), log_lik=log_lik)  # fmt: skip


def gaussian_kl_diag_to_full(loc, scale, mu, cov):
    """KL(N(loc, diag(scale^2)) || N(mu, cov)) per datapoint."""
    d = loc.shape[-1]
    prec = torch.linalg.inv(cov)
    diff = mu - loc
    trace = (torch.diagonal(prec) * scale**2).sum(-1)
    maha = ((diff @ prec) * diff).sum(-1)
    return 0.5 * (trace + maha - d + torch.logdet(cov) - 2 * scale.log().sum(-1))


def test_exact_posterior_gives_zero_approximation_gap_and_exact_log_px():
    pr = make_problem(orthogonal=True)
    shift = torch.tensor([0.4, -0.3], dtype=torch.float64)
    scale = torch.tensor([0.5, 0.9], dtype=torch.float64)

    def encoder(x):  # deliberately wrong: shifted mean, wrong scales
        mu = (x - pr["b"]) @ pr["w"] @ pr["cov"] / S**2
        return dist.Normal(mu + shift, scale).to_event(1)

    torch.manual_seed(0)
    gaps = pyro_nf.inference_gaps(pr["log_lik"], pr["x"], encoder, local_steps=400,
                                  local_lr=0.02, elbo_samples=4000, iw_samples=2000)  # fmt: skip
    # the fitted diagonal Gaussian is the exact posterior: the importance-weighted estimate
    # (defensive mixture proposal) is within its Monte Carlo error of the exact log p(x)
    err = gaps.log_px - pr["log_px"]
    assert (err.abs() < 4 * gaps.log_px_se + 1e-3).all(), (err, gaps.log_px_se)
    assert gaps.log_px_se.max() < 0.01 and abs(err.mean()) < 0.005
    assert gaps.approximation_gap.abs().max() < 0.02
    # the amortization gap is then KL(q_amortized || posterior), known in closed form
    kl = gaussian_kl_diag_to_full(encoder(pr["x"]).base_dist.loc, scale, pr["mu"], pr["cov"])
    assert gaps.amortization_gap_mean > 0.3
    assert torch.allclose(gaps.amortization_gap, kl, atol=0.15)  # Monte Carlo error per point
    assert abs(gaps.amortization_gap_mean - kl.mean()) < 0.03
    # the gaps add up to the whole gap of the amortized posterior
    total = gaps.log_px - gaps.amortized_elbo
    assert torch.allclose(gaps.approximation_gap + gaps.amortization_gap, total, atol=1e-12)
    assert abs(gaps.approximation_gap_mean + gaps.amortization_gap_mean - total.mean()) < 1e-9
    assert gaps.local_trace[-1][0] == 400


def test_correlated_posterior_gives_the_diagonal_gaussians_known_approximation_gap():
    """A full-covariance posterior: the best diagonal Gaussian (mean mu, variances 1/Lambda_ii)
    misses it by KL = (sum log Lambda_ii - log det Lambda) / 2, the approximation gap; the
    importance-weighted log p(x) still reaches the exact value."""
    pr = make_problem(orthogonal=False, seed=1)
    lam = pr["precision"]
    expected_gap = 0.5 * (torch.diagonal(lam).log().sum() - torch.logdet(lam))
    assert expected_gap > 0.1  # the test means something

    def encoder(x):
        return dist.Normal(torch.zeros_like(x[:, :2]), 1.0).to_event(1)  # the prior

    torch.manual_seed(1)
    gaps = pyro_nf.inference_gaps(pr["log_lik"], pr["x"], encoder, local_steps=600,
                                  local_lr=0.02, elbo_samples=4000, iw_samples=4000)  # fmt: skip
    err = gaps.log_px - pr["log_px"]
    assert (err.abs() < 4 * gaps.log_px_se + 1e-3).all(), (err, gaps.log_px_se)
    assert abs(err.mean()) < 0.01
    assert abs(gaps.approximation_gap_mean - expected_gap.item()) < 0.03
    assert gaps.amortization_gap_mean > 0.5  # the prior is far from each posterior


def test_local_flow_and_batches_keep_datapoints_apart():
    """A planar local flow, fitted in batches of 5 of 12 datapoints: every datapoint gets its own
    exact posterior back (its approximation gap ~0 and log p(x) exact, in the input order)."""
    pr = make_problem(orthogonal=True, seed=2)

    def encoder(x):
        return dist.Normal(torch.zeros_like(x[:, :2]), 0.8).to_event(1)

    torch.manual_seed(2)
    gaps = pyro_nf.inference_gaps(pr["log_lik"], pr["x"], encoder, local="planar",
                                  num_transforms=2, local_steps=500, local_lr=0.02,
                                  elbo_samples=2000, iw_samples=2000, batch_size=5)  # fmt: skip
    assert gaps.log_px.shape == (12,) and gaps.local_family == "planar"
    err = gaps.log_px - pr["log_px"]
    assert (err.abs() < 4 * gaps.log_px_se + 1e-3).all(), (err, gaps.log_px_se)
    assert gaps.approximation_gap.abs().max() < 0.05
    assert (gaps.amortization_gap > 0).all()
    text = str(gaps)
    assert "planar K=2" in text and "amortization gap" in text
    assert set(gaps.as_dict()) >= {"log_px", "log_px_se", "approximation_gap_se"}


def test_bad_input_is_refused_with_a_message():
    pr = make_problem(orthogonal=True, n=3)

    def encoder(x):
        return dist.Normal(torch.zeros_like(x[:, :2]), 1.0).to_event(1)

    call = dict(local_steps=1, elbo_samples=2, iw_samples=2)
    with pytest.raises(ValueError, match="local must be one of"):
        pyro_nf.inference_gaps(pr["log_lik"], pr["x"], encoder, local="iaf", **call)
    with pytest.raises(ValueError, match="first dimension"):
        pyro_nf.inference_gaps(pr["log_lik"], [1.0, 2.0], encoder, **call)
    with pytest.raises(TypeError, match="callables"):
        pyro_nf.inference_gaps(None, pr["x"], encoder, **call)
    with pytest.raises(ValueError, match=r"log_likelihood\(x, z\) must have shape"):
        pyro_nf.inference_gaps(lambda x, z: pr["log_lik"](x, z).sum(-1), pr["x"], encoder, **call)
    with pytest.raises(ValueError, match="batch_shape"):
        pyro_nf.inference_gaps(pr["log_lik"], pr["x"],
                               lambda x: dist.Normal(torch.zeros(2), 1.0).to_event(1), **call)  # fmt: skip
    with pytest.raises(ValueError, match="prior must have event_shape"):
        prior = dist.Normal(torch.zeros(3, dtype=torch.float64), 1.0).to_event(1)
        pyro_nf.inference_gaps(pr["log_lik"], pr["x"], encoder, prior=prior, **call)
    with pytest.raises(ValueError, match="not finite"):
        pyro_nf.inference_gaps(lambda x, z: pr["log_lik"](x, z) * math.nan, pr["x"], encoder,
                               **call)  # fmt: skip
    with pytest.raises(ValueError, match="iw_samples must be a positive integer"):
        pyro_nf.inference_gaps(pr["log_lik"], pr["x"], encoder, local_steps=1, iw_samples=0)
    with pytest.raises(ValueError, match="local_lr"):
        pyro_nf.inference_gaps(pr["log_lik"], pr["x"], encoder, local_lr=-1.0, **call)


def test_benchmark_quick(tmp_path):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import vae_gaps

    threads = torch.get_num_threads()
    try:
        vae_gaps.main(["--quick", "--results", str(tmp_path / "gaps.md")])
    finally:
        torch.set_num_threads(threads)
    md = (tmp_path / "gaps.md").read_text()
    section = md.split("## sklearn digits")[1].split("Paired with the Gaussian")[0]
    rows = [ln for ln in section.splitlines() if ln.startswith("| ") and "posterior" not in ln]
    labels = [r.split("|")[1].strip() for r in rows]
    assert labels == ["Gaussian", "planar K=16", "radial K=16", "IAF K=4"]
    assert all("nan" not in r and r.count("|") == 9 for r in rows)
    paired = md.split("Paired with the Gaussian")[1].split("## ")[0]
    assert [r.split("|")[1].strip() for r in paired.splitlines() if r.startswith("| ") and "posterior" not in r] == labels[1:]  # fmt: skip
    png = (tmp_path / "gaps.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    # the report can be rewritten from the per-digit JSON: the same tables, no training
    out = tmp_path / "again.md"
    vae_gaps.main(["--quick", "--results", str(out), "--from-json", str(tmp_path / "gaps.json")])
    again = out.read_text()
    assert "rewritten from its JSON" in again
    table = lambda text: text.split("## sklearn digits")[1].split("## Cremer")[0]  # noqa: E731
    assert table(again) == table(md)


def test_the_users_modules_are_left_alone():
    """Only the local posteriors are trained: the decoder's and encoder's parameters keep their
    values and get no gradient."""
    pr = make_problem(orthogonal=True, n=4)
    decoder = torch.nn.Linear(2, 4).double()
    encoder = torch.nn.Linear(4, 2).double()
    before = [p.detach().clone() for p in [*decoder.parameters(), *encoder.parameters()]]

    def log_lik(x, z):
        return dist.Normal(decoder(z), S).to_event(1).log_prob(x)

    def posterior(x):
        return dist.Normal(encoder(x), 1.0).to_event(1)

    pyro_nf.inference_gaps(log_lik, pr["x"], posterior, local="radial", num_transforms=2,
                           local_steps=5, elbo_samples=4, iw_samples=4)  # fmt: skip
    after = [*decoder.parameters(), *encoder.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(after, before))
    assert all(p.grad is None for p in after)


def test_a_flow_posterior_starts_the_local_fit_at_its_own_parameters():
    """Given as a pyro_nf.Flow with its encoder, an amortized posterior of the local family
    starts each local fit at its own parameters: with no step the local posterior is the
    amortized one (same ELBO up to Monte Carlo error), and steps only improve it."""
    pr = make_problem(orthogonal=False, n=6, seed=3)
    torch.manual_seed(3)
    flow = pyro_nf.Flow(2, "planar", 2, context_dim=4).double()
    encoder = torch.nn.Linear(4, 4).double()
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.1 * torch.randn_like(p))
    call = dict(encoder=encoder, local="planar", num_transforms=2, elbo_samples=20000,
                iw_samples=100)  # fmt: skip
    still = pyro_nf.inference_gaps(pr["log_lik"], pr["x"], flow, local_steps=0, **call)
    assert still.local_start == "amortized"
    # the two ELBOs are means of 20000 independent log-weights each: their difference is noise
    with torch.no_grad():
        z, log_q = flow(encoder(pr["x"])).rsample_and_log_prob((20000,))
        lw = pr["log_lik"](pr["x"], z) + dist.Normal(0.0, 1.0).expand([2]).to_event(1).log_prob(z) - log_q  # fmt: skip
    se = lw.std(0) * math.sqrt(2 / 20000)
    assert (still.amortization_gap.abs() < 4 * se).all(), (still.amortization_gap, se)
    fitted = pyro_nf.inference_gaps(pr["log_lik"], pr["x"], flow, local_steps=200, **call)
    assert (fitted.amortization_gap > 0.05).all(), fitted.amortization_gap
    # another family, or a plain callable, starts from the moments
    other = pyro_nf.inference_gaps(pr["log_lik"], pr["x"], flow, encoder=encoder, local_steps=0,
                                   elbo_samples=4, iw_samples=4)  # fmt: skip
    assert other.local_start == "moments"
    with pytest.raises(ValueError, match="encoder= goes with a pyro_nf.Flow"):
        pyro_nf.inference_gaps(pr["log_lik"], pr["x"], lambda x: flow(encoder(x)), encoder=encoder)
    with pytest.raises(ValueError, match="needs a context"):
        pyro_nf.inference_gaps(pr["log_lik"], pr["x"], flow)
