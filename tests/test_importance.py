"""Pareto-smoothed importance sampling (``pyro_nf._importance``) on every ArviZ line.

``psis`` uses ArviZ 0.x ``arviz.psislw``, ArviZ 1.x ``arviz_stats`` (which takes negated
log-weights) or, with neither, pyro_nf's own ``pareto_smooth``. The three must agree: here the
installed line is compared with ``pareto_smooth`` (called directly, so the fallback is tested on
every install), and CI runs this file on ArviZ 0.x (.ci/run) and on ArviZ 1.x (.ci/arviz1).
ArviZ 0.x implements the same algorithm as ``pareto_smooth`` and must match it to rounding;
ArviZ 1.x takes a tail of ``floor(3 sqrt(S))`` instead of ``ceil(3 sqrt(S))`` draws (below 225
draws, ``S / 5`` for both), which moves k-hat by a few hundredths.
"""

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pyro_nf import _importance
from pyro_nf._arviz import ARVIZ_0, ARVIZ_1, arviz_line
from pyro_nf._importance import pareto_smooth, psis

ARVIZ = arviz_line()
ROOT = Path(__file__).resolve().parents[1]
# (k-hat, total variation between the normalized smoothed weights) allowed against pareto_smooth
# (1.x: largest for weights with k > 1, e.g. 0.02 in k-hat and 0.012 in total variation for
# "pareto k=1.2 S=1000", where a few draws carry most of the weight)
TOLERANCE = {ARVIZ_0: (1e-8, 1e-8), ARVIZ_1: (0.05, 0.02), None: (0.0, 0.0)}


def pareto_log_weights(k: float, n: int, seed: int) -> np.ndarray:
    """log of n weights with a Pareto tail of shape k: w = U^(-k), U ~ Uniform(0, 1)."""
    return -k * np.log(np.random.default_rng(seed).uniform(size=n))


def normal_is_log_weights(s2: float, n: int, seed: int) -> np.ndarray:
    """log N(x; 0, s2) - log N(x; 0, 1) at x ~ N(0, 1): a Pareto tail of shape 1 - 1/s2."""
    x = np.random.default_rng(seed).normal(size=n)
    return 0.5 * x**2 * (1 - 1 / s2) - 0.5 * math.log(s2)


WEIGHTS = {
    f"pareto k={k} S={n}": pareto_log_weights(k, n, seed=i)
    for i, (k, n) in enumerate((k, n) for k in (0.2, 0.5, 0.8, 1.2) for n in (100, 1000, 4000))
}
WEIGHTS["normal IS s2=1.5"] = normal_is_log_weights(1.5, 2000, seed=20)
WEIGHTS["normal IS s2=3"] = normal_is_log_weights(3.0, 2000, seed=21)
WEIGHTS["bounded (normal)"] = np.random.default_rng(22).normal(size=500)
WEIGHTS["large offset"] = pareto_log_weights(0.7, 1000, seed=23) - 800.0  # exp() would underflow


@pytest.mark.parametrize("name", list(WEIGHTS))
def test_the_installed_psis_agrees_with_pareto_smooth(name):
    lw = WEIGHTS[name]
    smoothed, k_hat = psis(lw)
    ref_smoothed, ref_k_hat = pareto_smooth(lw)
    k_tol, tv_tol = TOLERANCE[ARVIZ]
    assert abs(k_hat - ref_k_hat) <= k_tol, (ARVIZ, k_hat, ref_k_hat)
    total_variation = 0.5 * np.abs(np.exp(smoothed) - np.exp(ref_smoothed)).sum()
    assert total_variation <= tv_tol, (ARVIZ, total_variation)
    for s in (smoothed, ref_smoothed):  # normalized weights, as ArviZ returns them
        assert s.shape == lw.shape and np.logaddexp.reduce(s) == pytest.approx(0.0, abs=1e-10)


@pytest.mark.parametrize("k", [0.3, 0.7])
def test_pareto_smooth_recovers_a_known_tail_shape(k):
    estimates = [pareto_smooth(pareto_log_weights(k, 4000, seed))[1] for seed in range(100, 105)]
    assert abs(np.mean(estimates) - k) < 0.1, estimates


def test_pareto_smooth_changes_only_the_tail_and_keeps_its_order():
    lw = normal_is_log_weights(3.0, 1000, seed=30)
    smoothed, k_hat = pareto_smooth(lw)
    tail_size = math.ceil(min(1000 / 5, 3 * math.sqrt(1000)))  # 95 (Vehtari et al. 2024)
    order = np.argsort(lw)
    body, tail = order[:-tail_size], order[-tail_size:]
    offset = smoothed[body] - lw[body]  # the body is only renormalized
    np.testing.assert_allclose(offset, offset[0], atol=1e-12)
    assert not np.allclose(smoothed[tail] - lw[tail], offset[0])  # the tail is smoothed ...
    assert (np.diff(smoothed[tail]) >= -1e-12).all()  # ... keeping its order
    assert smoothed.max() <= lw.max() + offset[0] + 1e-12  # capped at the largest raw weight
    assert 0.3 < k_hat < 1.0


def test_too_few_draws_give_an_infinite_k_hat_and_no_smoothing():
    lw = np.random.default_rng(31).normal(size=20)  # a tail of 4 draws: too few to fit
    for smoothed, k_hat in (pareto_smooth(lw), psis(lw)):
        assert k_hat == math.inf
        np.testing.assert_allclose(smoothed, lw - np.logaddexp.reduce(lw), atol=1e-12)
    with pytest.raises(ValueError, match="at least 2 weights"):
        pareto_smooth(np.zeros(1))


def test_psis_uses_pareto_smooth_without_arviz(monkeypatch):
    lw = WEIGHTS["pareto k=0.8 S=1000"]
    monkeypatch.setattr(_importance, "arviz_line", lambda: None)
    smoothed, k_hat = psis(lw)
    ref_smoothed, ref_k_hat = pareto_smooth(lw)
    assert k_hat == ref_k_hat
    np.testing.assert_array_equal(smoothed, ref_smoothed)


@pytest.mark.skipif(ARVIZ != ARVIZ_0, reason="ArviZ 0.x")
def test_psis_is_arvizs_psislw_on_arviz_0():
    import arviz

    lw = WEIGHTS["normal IS s2=3"]
    smoothed, k_hat = psis(lw)
    ref_smoothed, ref_k_hat = arviz.psislw(lw.copy())
    assert k_hat == float(ref_k_hat)
    np.testing.assert_array_equal(smoothed, ref_smoothed)


@pytest.mark.skipif(ARVIZ != ARVIZ_1, reason="ArviZ 1.x")
def test_psis_negates_the_log_weights_for_arviz_stats():
    """arviz_stats smooths the negation of what it is given (LOO log-likelihoods): a heavy
    right tail of log-weights must come out with a large k-hat, not the bounded left tail's."""
    lw = WEIGHTS["pareto k=1.2 S=4000"]
    assert psis(lw)[1] > 0.7
    from arviz_stats.base import array_stats

    assert array_stats.psislw(lw)[1] < 0.0  # the same weights, not negated: the wrong tail


NO_ARVIZ = """
import math, sys
for name in ("arviz", "arviz_base", "arviz_stats"):
    sys.modules[name] = None  # import arviz... raises ImportError
import pyro, pyro.distributions as dist, torch, pyro_nf
from pyro_nf._arviz import arviz_line
assert arviz_line() is None
def model(y):
    mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Normal(mu, 1.0), obs=y)
y = torch.randn(20) + 3.0
guide = pyro_nf.AutoPlanarFlow(model, num_transforms=2)
result = pyro_nf.fit(model, guide, y, num_steps=200, lr=0.05, progress=False, seed=0)
d = pyro_nf.diagnose(model, guide, y, num_samples=1000)
assert math.isfinite(d.k_hat) and d.k_hat < 0.7, d
try:
    pyro_nf.to_inference_data(model, guide, y, num_samples=100)
except ImportError as e:
    print(e)
print("no arviz module loaded:", not any(m.startswith("arviz") for m in sys.modules if sys.modules[m]))
"""


def test_fit_and_diagnose_work_without_any_arviz():
    out = subprocess.run(
        [sys.executable, "-c", NO_ARVIZ], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "to_inference_data needs ArviZ: pip install arviz" in out.stdout
    assert "no arviz module loaded: True" in out.stdout
