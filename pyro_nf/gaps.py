"""Inference gaps of a trained VAE: how far its amortized posterior is from :math:`\\log p(x)`.

Cremer, Li & Duvenaud (2018, *Inference suboptimality in variational autoencoders*) split what a
VAE's amortized posterior :math:`q_\\phi(z \\mid x)` loses against the exact log-likelihood into
two parts. With the decoder :math:`p(x \\mid z)` and prior fixed, and for each datapoint
:math:`q^*` the member of the posterior family that maximizes that datapoint's ELBO:

.. math::
    \\log p(x) - \\mathcal L[q_\\phi]
    = \\underbrace{\\log p(x) - \\mathcal L[q^*]}_{\\text{approximation gap}}
    + \\underbrace{\\mathcal L[q^*] - \\mathcal L[q_\\phi]}_{\\text{amortization gap}}.

The approximation gap is what the family cannot express; the amortization gap is what the
encoder loses by predicting the posterior instead of fitting it. A more flexible family can only
shrink the first; a better encoder (or a few local steps at test time) the second.

:func:`inference_gaps` estimates the three quantities per datapoint: :math:`\\log p(x)` by
importance weighting (Burda et al. 2016) with the locally fitted posterior as proposal,
:math:`\\mathcal L[q_\\phi]` by Monte Carlo with the user's posterior, and
:math:`\\mathcal L[q^*]` by fitting one posterior per datapoint with the decoder fixed, all
datapoints of a batch in one batched optimization.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ._checks import integer, number
from .diagnostics import _logmeanexp_and_se
from .flow import Flow
from .transforms.base import inverse_softplus

__all__ = ["InferenceGaps", "inference_gaps", "LOCAL_FAMILIES"]

#: the families a local posterior can take: ``"gaussian"`` (diagonal Normal) and the flow
#: families whose layers have per-datapoint parameters in :class:`pyro_nf.Flow`
LOCAL_FAMILIES = ("gaussian", "planar", "radial")


def _se(v: Tensor) -> float:
    """Standard error of the mean of ``v`` over datapoints."""
    return (v.std() / math.sqrt(v.numel())).item() if v.numel() > 1 else float("nan")


@dataclass
class InferenceGaps:
    """What :func:`inference_gaps` returns: per-datapoint tensors (nats) and their averages.

    Attributes:
        log_px: importance-weighted estimate of :math:`\\log p(x_i)`, shape ``(N,)``.
        log_px_se: its Monte Carlo standard error per datapoint (delta method).
        amortized_elbo: ELBO of the user's (amortized) posterior per datapoint.
        local_elbo: ELBO of the posterior fitted to each datapoint alone.
        approximation_gap: ``log_px - local_elbo`` per datapoint.
        amortization_gap: ``local_elbo - amortized_elbo`` per datapoint.
        local_family, num_transforms: the family of the local posterior.
        iw_samples, elbo_samples, local_steps: the budgets used.
        local_start: ``"amortized"`` (each local fit started at the amortized posterior's own
            parameters) or ``"moments"`` (at a Gaussian with its moments).
        local_trace: ``(step, mean local ELBO)`` every tenth of the local steps (the training
            estimate with ``local_particles`` draws, averaged over datapoints and batches): if it
            still rises at the end, the local fit has not converged.

    The averages over datapoints are the properties ``log_px_mean``, ``amortized_elbo_mean``,
    ``local_elbo_mean``, ``approximation_gap_mean`` and ``amortization_gap_mean``, each with a
    ``..._se`` (standard error over datapoints). ``as_dict()`` gives them as plain floats and
    ``str(result)`` as a small table.

    Example:
        >>> import torch
        >>> gaps = InferenceGaps(log_px=torch.tensor([-10.0, -12.0]), log_px_se=torch.zeros(2),
        ...                      amortized_elbo=torch.tensor([-11.5, -13.0]),
        ...                      local_elbo=torch.tensor([-10.5, -12.5]), local_family="gaussian",
        ...                      num_transforms=0, iw_samples=1, elbo_samples=1, local_steps=0)
        >>> gaps.approximation_gap, gaps.amortization_gap
        (tensor([0.5000, 0.5000]), tensor([1.0000, 0.5000]))
        >>> gaps.amortization_gap_mean
        0.75
    """

    log_px: Tensor
    log_px_se: Tensor
    amortized_elbo: Tensor
    local_elbo: Tensor
    local_family: str
    num_transforms: int
    iw_samples: int
    elbo_samples: int
    local_steps: int
    local_trace: list = None
    local_start: str = "moments"

    @property
    def approximation_gap(self) -> Tensor:
        return self.log_px - self.local_elbo

    @property
    def amortization_gap(self) -> Tensor:
        return self.local_elbo - self.amortized_elbo

    def _mean(name):  # noqa: N805 - a property factory used in the class body only
        return property(lambda self: getattr(self, name).mean().item())

    def _mean_se(name):  # noqa: N805
        return property(lambda self: _se(getattr(self, name)))

    log_px_mean = _mean("log_px")
    log_px_mean_se = _mean_se("log_px")
    amortized_elbo_mean = _mean("amortized_elbo")
    amortized_elbo_mean_se = _mean_se("amortized_elbo")
    local_elbo_mean = _mean("local_elbo")
    local_elbo_mean_se = _mean_se("local_elbo")
    approximation_gap_mean = _mean("approximation_gap")
    approximation_gap_mean_se = _mean_se("approximation_gap")
    amortization_gap_mean = _mean("amortization_gap")
    amortization_gap_mean_se = _mean_se("amortization_gap")
    del _mean, _mean_se

    def as_dict(self) -> dict:
        """The averages over datapoints and their standard errors, as plain floats."""
        out = {"num_datapoints": self.log_px.numel(), "local_family": self.local_family}
        for key in ("log_px", "amortized_elbo", "local_elbo", "approximation_gap", "amortization_gap"):  # fmt: skip
            out[key] = getattr(self, f"{key}_mean")
            out[f"{key}_se"] = getattr(self, f"{key}_mean_se")
        return out

    def __str__(self) -> str:
        d = self.as_dict()
        family = self.local_family + (f" K={self.num_transforms}" if self.num_transforms else "")
        rows = [
            ("log p(x)", "log_px"),
            ("amortized ELBO", "amortized_elbo"),
            (f"local ELBO ({family})", "local_elbo"),
            ("approximation gap", "approximation_gap"),
            ("amortization gap", "amortization_gap"),
        ]
        width = max(len(r[0]) for r in rows)
        lines = [f"inference gaps over {d['num_datapoints']} datapoints (nats, mean +- s.e.)"]
        lines += [f"  {label:<{width}}  {d[key]:10.3f} +- {d[key + '_se']:.3f}" for label, key in rows]  # fmt: skip
        return "\n".join(lines)


def _draw(d, num: int) -> tuple[Tensor, Tensor]:
    """``num`` reparameterized draws of ``d`` and their log-densities, shapes ``(num, n, D)``
    and ``(num, n)``."""
    if hasattr(d, "rsample_and_log_prob"):
        return d.rsample_and_log_prob((num,))
    z = d.rsample((num,))
    return z, d.log_prob(z)


def _log_weights(log_likelihood, prior, x: Tensor, d, num: int) -> Tensor:
    """``log p(x | z) + log p(z) - log q(z)`` for ``num`` draws of ``d``: shape ``(num, n)``."""
    z, log_q = _draw(d, num)
    log_lik = log_likelihood(x, z)
    log_prior = prior.log_prob(z)
    expected = z.shape[:-1]
    for what, value in (("log_likelihood(x, z)", log_lik), ("the posterior's log_prob", log_q),
                        ("prior.log_prob(z)", log_prior)):  # fmt: skip
        if not isinstance(value, Tensor) or value.shape != expected:
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(
                f"inference_gaps: {what} must have shape {tuple(expected)} (samples, datapoints) "
                f"for z of shape {tuple(z.shape)}, got {shape}: sum log p(x_i | z_i) over each "
                "datapoint's own dimensions and keep the leading sample and datapoint dimensions"
            )
    return log_lik + log_prior - log_q


def _chunked_log_weights(log_likelihood, prior, x, d, num: int, chunk: int) -> Tensor:
    with torch.no_grad():
        parts = []
        for start in range(0, num, chunk):
            parts.append(_log_weights(log_likelihood, prior, x, d, min(chunk, num - start)))
        return torch.cat(parts, 0)


def _defensive_log_weights(log_likelihood, prior, x, q, num: int, widen: float) -> Tensor:
    """Importance log-weights with the defensive mixture proposal (Hesterberg 1995)
    :math:`m = \\tfrac12 q + \\tfrac12 q_\\tau`, :math:`q_\\tau` the flow ``q`` pushed from a base
    :math:`\\mathcal N(0, \\tau^2 I)`; half of the ``num`` draws from each (stratified, still
    unbiased for :math:`p(x)`). Both components share the flow, so :math:`m(z)` needs no inverse:
    with :math:`u` the base point of :math:`z`, :math:`\\log m(z) = \\log q(z) - \\log\\mathcal
    N(u; 0, I) + \\log(\\tfrac12\\mathcal N(u; 0, I) + \\tfrac12\\mathcal N(u; 0, \\tau^2 I))`."""
    dim = q.event_shape[0]
    eps = torch.randn((num,) + tuple(q.batch_shape) + (dim,), dtype=q._dtype, device=q._device)
    tau = torch.ones(num, dtype=eps.dtype, device=eps.device)
    tau[num // 2 :] = widen
    u = eps * tau.view((num,) + (1,) * (eps.dim() - 1))
    z, log_q = q.push_and_log_prob(u)
    sq = (u * u).sum(-1)
    log_n1 = -0.5 * sq
    log_nt = -0.5 * sq / widen**2 - dim * math.log(widen)
    log_m = log_q - log_n1 + torch.logaddexp(log_n1, log_nt) - math.log(2.0)
    return log_likelihood(x, z) + prior.log_prob(z) - log_m


def _same_family(flow: Flow, family: str, num_transforms: int) -> bool:
    """Whether ``flow``'s posterior for each context is a member of the local family: the same
    layers, order and options, and nothing after them."""
    k = 0 if family == "gaussian" else num_transforms
    return (
        len(flow.layers) == k
        and (k == 0 or flow.transform == family)
        and flow.affine_first
        and flow.precond_tril is None
        and flow.outer_transform is None
    )


def _local_flow(n: int, dim: int, family: str, num_transforms: int, loc: Tensor, scale: Tensor,
                flow_kwargs: dict, raw_start: list[Tensor] | None = None) -> Flow:  # fmt: skip
    """A flow with one set of parameters per datapoint: a context of size ``n`` that is the
    one-hot code of the datapoint, each head's bias folded into its weight and frozen, so the
    head's column ``i`` is datapoint ``i``'s parameters and nothing is shared. The affine base of
    datapoint ``i`` starts at ``N(loc[i], scale[i]^2)``, the layers at the identity."""
    transform = "planar" if family == "gaussian" else family
    k = 0 if family == "gaussian" else num_transforms
    flow = Flow(dim, transform, k, context_dim=n, name="inference_gaps_local", **flow_kwargs)
    flow = flow.to(dtype=loc.dtype, device=loc.device)
    with torch.no_grad():
        for module in flow.modules():
            head = getattr(module, "head", None)
            if isinstance(head, torch.nn.Linear):
                head.weight.add_(head.bias.unsqueeze(-1))
                head.bias.zero_()
                head.bias.requires_grad_(False)
        if raw_start is not None:  # datapoint i starts at the amortized posterior's parameters
            for module, raw in zip([flow.affine, *flow.layers], raw_start):
                module.head.weight.copy_(raw.T)
        else:  # the affine layer's raw parameters are [loc, softplus^-1(scale)] (affine.py)
            flow.affine.head.weight.copy_(torch.cat([loc, inverse_softplus(scale)], -1).T)
    return flow


def inference_gaps(
    log_likelihood: Callable[[Tensor, Tensor], Tensor],
    x: Tensor,
    posterior: Callable[[Tensor], torch.distributions.Distribution] | Flow,
    *,
    encoder: Callable[[Tensor], Tensor] | None = None,
    prior: torch.distributions.Distribution | None = None,
    local: str = "gaussian",
    num_transforms: int = 16,
    local_steps: int = 1000,
    local_lr: float = 0.01,
    local_particles: int = 8,
    elbo_samples: int = 500,
    iw_samples: int = 5000,
    chunk_size: int = 250,
    batch_size: int = 500,
    init_samples: int = 100,
    iw_widen: float = 1.5,
    layer_lr: float | None = None,
    progress: bool = False,
    **flow_kwargs,
) -> InferenceGaps:
    """Approximation and amortization gaps of a VAE's posterior (Cremer, Li & Duvenaud 2018).

    The decoder and the posterior are used as they are: nothing of theirs is trained and their
    parameters' ``.grad`` are left untouched. For every datapoint :math:`x_i` of ``x`` it
    estimates

    - ``amortized_elbo``: :math:`\\mathcal L[q_\\phi] = E_{q_\\phi(z|x_i)}[\\log p(x_i|z) + \\log
      p(z) - \\log q_\\phi(z|x_i)]` with ``elbo_samples`` draws of ``posterior(x)``;
    - ``local_elbo``: the same for a posterior of family ``local`` fitted to :math:`x_i` alone:
      its own parameters, started at the amortized posterior's own parameters for
      :math:`x_i` when that posterior is a member of the family (a :class:`pyro_nf.Flow` given
      with ``encoder=``, with ``num_transforms`` layers of family ``local``, or none for
      ``"gaussian"``): the fit then starts at the amortized ELBO and can only climb; otherwise
      at a Gaussian with the mean and standard deviation of ``init_samples`` draws of the
      amortized posterior (the layers of a flow at the identity);
      then ``local_steps`` Adam steps (learning rate ``local_lr`` for the Gaussian base,
      ``layer_lr`` for a flow's layers, both cosine-decayed to a hundredth of ``local_lr``,
      ``local_particles`` draws per step) on the ELBO, all datapoints of a batch of
      ``batch_size`` at once (their parameters never mix: the loss is a sum of per-datapoint
      terms and Adam's update is elementwise);
    - ``log_px``: :math:`\\log \\frac1S\\sum_s p(x_i, z_s)/m(z_s)` with :math:`S =`
      ``iw_samples`` draws (Burda et al. 2016), ``chunk_size`` at a time so memory stays
      bounded, from the defensive mixture (Hesterberg 1995) :math:`m = \\frac12 q^* + \\frac12
      q^*_\\tau` of the fitted local posterior :math:`q^*` and the same flow pushed from a base
      widened by :math:`\\tau =` ``iw_widen``. A posterior fitted by the ELBO is narrower than
      the target where they differ, and importance weights from a narrower proposal can have
      infinite variance; the widened half keeps the tails covered, and the other half costs at
      most a factor 2 in the weights (``iw_widen=1``: :math:`q^*` alone). It is a stochastic
      lower bound of :math:`\\log p(x_i)`; with a good proposal and many draws it is tight.
      The approximation gap includes whatever bias it has left, so increase ``iw_samples``
      until ``log_px`` stops moving.

    The gaps are ``approximation_gap = log_px - local_elbo`` and ``amortization_gap =
    local_elbo - amortized_elbo``; they add up to ``log_px - amortized_elbo``. A local fit that
    has not converged makes the amortization gap too small and the approximation gap too big:
    raise ``local_steps`` until ``local_elbo`` stops improving.

    Args:
        log_likelihood: ``log_likelihood(x, z)`` with ``x`` a batch of datapoints (first
            dimension ``n``) and ``z`` of shape ``(S, n, D)``: returns :math:`\\log p(x_i \\mid
            z_{s,i})` of shape ``(S, n)`` (summed over each datapoint's own dimensions), e.g.
            ``dist.Bernoulli(logits=decoder(z)).to_event(1).log_prob(x)``.
        x: the datapoints, a tensor whose first dimension indexes them (a test set).
        posterior: the amortized posterior: a callable, ``posterior(x)`` returning a
            distribution with ``batch_shape (n,)``, ``event_shape (D,)``, ``rsample`` and
            ``log_prob`` (or a :class:`pyro_nf.FlowDistribution`), e.g. ``lambda x:
            flow(encoder(x))``; or a :class:`pyro_nf.Flow` with a context, given with
            ``encoder``, which lets the local fits start at its parameters (above).
        encoder: with a :class:`pyro_nf.Flow` posterior, the callable that maps ``x`` to the
            flow's context.
        prior: the prior :math:`p(z)`, ``event_shape (D,)``; default :math:`\\mathcal N(0, I)`.
        local: family of the local posterior, one of ``"gaussian"`` (diagonal), ``"planar"``,
            ``"radial"``; the flows use :class:`pyro_nf.Flow` with ``num_transforms`` layers, every
            parameter per datapoint. (The autoregressive families share their MADE's weights
            across a batch, so they cannot be fitted per datapoint in one batch.)
        num_transforms: layers of a local flow.
        local_steps, local_lr, local_particles: the local optimization.
        layer_lr: learning rate of a local flow's layers; default ``local_lr / 10``. The layers
            start at the identity, so the flow starts as the Gaussian: Adam's steps of about the
            learning rate on every per-datapoint layer parameter, driven by noisy few-particle
            gradients, otherwise push the fit below that start before it improves.
        elbo_samples: draws per datapoint for both ELBOs.
        iw_samples, chunk_size: draws per datapoint for ``log_px``, and per chunk.
        batch_size: datapoints fitted together (and scored together).
        init_samples: draws of the amortized posterior for the local start.
        iw_widen: :math:`\\tau \\ge 1`, the base scale of the widened half of the proposal.
        progress: print the local ELBO every tenth of the steps.
        **flow_kwargs: passed to :class:`pyro_nf.Flow` for a local flow.

    Returns:
        :class:`InferenceGaps`, per-datapoint tensors with means and standard errors.

    Example (a linear-Gaussian model, whose exact posterior is a diagonal Gaussian here):
        >>> import torch, pyro.distributions as dist, pyro_nf
        >>> _ = torch.manual_seed(0)
        >>> W = torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]])   # x | z ~ N(W z, I)
        >>> x = torch.randn(20, 2) @ W.T + torch.randn(20, 3)
        >>> log_lik = lambda x, z: dist.Normal(z @ W.T, 1.0).to_event(1).log_prob(x)
        >>> encoder = lambda x: dist.Normal(0.3 * x[:, :2], 0.5).to_event(1)  # not the posterior
        >>> gaps = pyro_nf.inference_gaps(log_lik, x, encoder, local_steps=300, iw_samples=500)
        >>> abs(gaps.approximation_gap_mean) < 0.05   # a Gaussian is exact here
        True
        >>> gaps.amortization_gap_mean > 0.1          # the encoder is not
        True
    """
    if not callable(log_likelihood) or not callable(posterior):
        raise TypeError("inference_gaps: log_likelihood and posterior must be callables")
    if isinstance(posterior, Flow):
        if posterior.context_dim == 0 or not callable(encoder):
            raise ValueError(
                "inference_gaps: a pyro_nf.Flow posterior needs a context: give a Flow with "
                "context_dim > 0 and encoder=, the callable that maps x to its context"
            )
    elif encoder is not None:
        raise ValueError(
            "inference_gaps: encoder= goes with a pyro_nf.Flow posterior; a callable posterior "
            "maps x to the distribution itself"
        )
    if not isinstance(x, Tensor) or x.dim() < 1 or x.shape[0] < 1:
        raise ValueError(
            "inference_gaps: x must be a tensor whose first dimension indexes at least one "
            f"datapoint, got {type(x).__name__}"
            + (f" of shape {tuple(x.shape)}" if isinstance(x, Tensor) else "")
        )
    if local not in LOCAL_FAMILIES:
        raise ValueError(f"inference_gaps: local must be one of {LOCAL_FAMILIES}, got {local!r}")
    for value, name in ((num_transforms, "num_transforms"),):
        integer(value, name, minimum=1 if local != "gaussian" else 0)
    for value, name in ((local_steps, "local_steps"),):
        integer(value, name, minimum=0)
    for value, name in ((local_particles, "local_particles"), (elbo_samples, "elbo_samples"),
                        (iw_samples, "iw_samples"), (chunk_size, "chunk_size"),
                        (batch_size, "batch_size"), (init_samples, "init_samples")):  # fmt: skip
        integer(value, name, minimum=2 if name == "init_samples" else 1)
    number(local_lr, "local_lr")
    number(iw_widen, "iw_widen", lower=1.0, strict=False)
    layer_lr = local_lr / 10 if layer_lr is None else number(layer_lr, "layer_lr")

    results: dict[str, list[Tensor]] = {k: [] for k in ("log_px", "log_px_se", "amortized", "local")}  # fmt: skip
    trace: dict[int, float] = {}
    num = x.shape[0]
    for start in range(0, num, batch_size):
        xb = x[start : start + batch_size]
        n = xb.shape[0]
        with torch.no_grad():
            h = encoder(xb) if encoder is not None else None
            q_amortized = posterior(h) if h is not None else posterior(xb)
            event = tuple(getattr(q_amortized, "event_shape", ()))
            if len(event) != 1 or tuple(getattr(q_amortized, "batch_shape", ())) != (n,):
                raise ValueError(
                    "inference_gaps: posterior(x) must be a distribution with batch_shape (n,) "
                    f"and event_shape (D,) for n = {n} datapoints, got batch_shape "
                    f"{tuple(getattr(q_amortized, 'batch_shape', ()))} and event_shape {event}"
                )
            dim = event[0]
            if prior is None:
                z0 = q_amortized.sample()
                prior = torch.distributions.Independent(
                    torch.distributions.Normal(z0.new_zeros(dim), z0.new_ones(dim)), 1
                )
            if tuple(prior.event_shape) != (dim,):
                raise ValueError(
                    f"inference_gaps: prior must have event_shape ({dim},) like the posterior, "
                    f"got {tuple(prior.event_shape)}"
                )
            lw_amortized = _chunked_log_weights(
                log_likelihood, prior, xb, q_amortized, elbo_samples, chunk_size
            )
            if not torch.isfinite(lw_amortized).all():
                raise ValueError(
                    "inference_gaps: log p(x|z) + log p(z) - log q(z|x) is not finite for some "
                    "draws of the amortized posterior; check log_likelihood and the posterior"
                )
            results["amortized"].append(lw_amortized.mean(0))
            z_init = q_amortized.sample((init_samples,))
            loc, scale = z_init.mean(0), z_init.std(0).clamp_min(1e-4)

        raw_start = None
        if encoder is not None and _same_family(posterior, local, num_transforms):
            with torch.no_grad():
                raw_start = [m._raw(h) for m in [posterior.affine, *posterior.layers]]
            flow_kwargs = {**posterior.layers[0].options(), **flow_kwargs} if len(posterior.layers) else flow_kwargs  # fmt: skip
        local_start = "amortized" if raw_start is not None else "moments"
        flow = _local_flow(n, dim, local, num_transforms, loc, scale, flow_kwargs, raw_start)
        onehot = torch.eye(n, dtype=loc.dtype, device=loc.device)
        base = [p for p in flow.affine.parameters() if p.requires_grad]
        layers = [p for p in flow.layers.parameters() if p.requires_grad]
        params = base + layers
        groups = [{"params": base}] + ([{"params": layers, "lr": layer_lr}] if layers else [])
        optim = torch.optim.Adam(groups, lr=local_lr)
        # cosine decay to a hundredth: the fit settles instead of hovering at Adam's noise level
        decay = torch.optim.lr_scheduler.CosineAnnealingLR(optim, max(local_steps, 1), local_lr / 100)  # fmt: skip
        for step in range(local_steps):
            lw = _log_weights(log_likelihood, prior, xb, flow(onehot), local_particles)
            loss = -lw.mean(0).sum()
            # gradients of the local parameters only: the user's decoder keeps its .grad as is
            for p, g in zip(params, torch.autograd.grad(loss, params)):
                p.grad = g
            optim.step()
            decay.step()
            if (step + 1) % max(1, local_steps // 10) == 0 or step + 1 == local_steps:
                trace[step + 1] = trace.get(step + 1, 0.0) - loss.item() / num
            if progress and (step + 1) % max(1, local_steps // 10) == 0:
                print(
                    f"inference_gaps: datapoints {start}-{start + n - 1}, local step {step + 1}"
                    f"/{local_steps}: mean ELBO {-loss.item() / n:.3f}",
                    flush=True,
                )
        q_local = flow(onehot)
        lw_local = _chunked_log_weights(log_likelihood, prior, xb, q_local, elbo_samples, chunk_size)  # fmt: skip
        results["local"].append(lw_local.mean(0))
        with torch.no_grad():
            sizes = [min(chunk_size, iw_samples - i) for i in range(0, iw_samples, chunk_size)]
            lw_iw = torch.cat(
                [
                    _defensive_log_weights(log_likelihood, prior, xb, q_local, size, iw_widen)
                    for size in sizes
                ]
            )
        value, se = _logmeanexp_and_se(lw_iw)
        results["log_px"].append(value)
        results["log_px_se"].append(se)

    cat = {k: torch.cat(v).detach() for k, v in results.items()}
    return InferenceGaps(
        log_px=cat["log_px"],
        log_px_se=cat["log_px_se"],
        amortized_elbo=cat["amortized"],
        local_elbo=cat["local"],
        local_family=local,
        num_transforms=0 if local == "gaussian" else num_transforms,
        iw_samples=iw_samples,
        elbo_samples=elbo_samples,
        local_steps=local_steps,
        local_trace=sorted(trace.items()),
        local_start=local_start,
    )
