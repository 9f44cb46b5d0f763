"""The Laplace start of the flow autoguides (``precondition="laplace"``): the mode and inverse
Hessian of the log density (:func:`laplace`), and the flow preconditioned with them."""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable

import torch
from pyro import poutine
from torch import Tensor

from ._guide_setup import subsampled_frame
from ._messages import first_line
from .flow import Flow
from .transforms.base import FlowTransform

#: ``precondition="auto"`` tries the Laplace start only up to this many latent dimensions: the
#: Hessian costs one backward pass per dimension and D^2 memory, and the evidence for the default
#: (docs/benchmarks.rst, "The default call") covers posteriors of up to 26 dimensions; on
#: benchmarks/iaf_scaling.py's Gaussian posteriors the default AutoIAFFlow from the exact Laplace
#: start drifted away from it at D = 100 (final gap 6.3 nats per latent against 0.10 from the
#: plain start) and at D = 1000 (tests/test_iaf_scaling.py), so larger models keep the plain start
#: unless asked.
AUTO_LAPLACE_MAX_DIM = 32


class LaplaceStart:
    """Mixin of :class:`~pyro_nf.AutoFlow`: the ``precondition="laplace"`` (or ``"auto"``) start."""

    def _laplace_start(
        self, flow: Flow, loc: Tensor, args: tuple, kwargs: dict, auto: bool = False
    ) -> None:
        """Precondition ``flow`` with the Laplace approximation found from ``loc``, or leave it
        as it is (with a warning that says why, unless ``auto``); :attr:`laplace_info` records
        what happened.

        ``auto`` (``precondition="auto"``): skip models that subsample or have more than
        :data:`AUTO_LAPLACE_MAX_DIM` latent dimensions, and fall back without a warning where
        the search fails for any reason (the user did not ask for this start).
        """
        if auto:
            reason = self._auto_laplace_obstacle(args, kwargs)
            if reason is not None:
                self.laplace_info = {"used": False, "reason": reason, "log_density": None,
                                     "newton_decrement": None, "iterations": 0, "seconds": 0.0}  # fmt: skip
                return
        else:
            self._check_no_subsampling(args, kwargs)
        log_joint = self._log_joint_fn(args, kwargs)
        if self.noncentering is not None:  # the mode in the flow's (non-centred) coordinates
            log_joint = pulled_back(log_joint, self.noncentering)
        if auto:
            t0 = time.perf_counter()
            try:
                mode, tril, info = laplace(log_joint, loc.detach(), self._options.laplace_max_iter)
            except Exception as e:  # noqa: BLE001 - any failure means: the plain start
                mode = tril = None
                info = {"used": False, "reason": f"the mode search failed ({first_line(e)})",
                        "log_density": None, "newton_decrement": None, "iterations": 0,
                        "seconds": time.perf_counter() - t0}  # fmt: skip
        else:
            mode, tril, info = laplace(log_joint, loc.detach(), self._options.laplace_max_iter)
        self.laplace_info = info
        if mode is not None and auto:
            # a mode and a positive definite Hessian are not enough: along a nearly flat
            # direction (a ridge, a weakly identified parameter) the inverse Hessian is huge and
            # the Laplace start far too wide. Keep it only where its ELBO is at least the plain
            # start's, both from the same fixed draws.
            base_loc, base_scale = flow.base_loc_scale()
            try:
                elbo_laplace = start_elbo(log_joint, mode, tril)
                elbo_plain = start_elbo(log_joint, base_loc, base_scale)
            except Exception as e:  # noqa: BLE001 - "auto" never fails the set-up: plain start
                elbo_laplace = elbo_plain = math.nan
                reason = f"the check of the Laplace start's ELBO failed ({first_line(e)})"
            else:
                reason = (
                    f"the Laplace start's ELBO ({elbo_laplace:.4g}) is below the plain start's "
                    f"({elbo_plain:.4g}): the inverse Hessian is too wide somewhere (a nearly "
                    "flat direction?)"
                )
            info["elbo_laplace"], info["elbo_plain"] = elbo_laplace, elbo_plain
            if not elbo_laplace >= elbo_plain:
                mode = tril = None
                info["used"] = False
                info["reason"] = reason
        if mode is None:
            if not auto:
                warnings.warn(
                    f"{type(self).__name__}(precondition='laplace'): {info['reason']}; starting "
                    "without the preconditioner (init_loc_fn, init_scale)",
                    stacklevel=6,
                )
            return
        flow.set_base(0.0, 1.0)  # the layers see the whitened coordinates
        flow.set_preconditioner(mode, tril)

    def _auto_laplace_obstacle(self, args, kwargs) -> str | None:
        """Why ``precondition="auto"`` does not try the Laplace start here, or ``None``."""
        if self.latent_dim > AUTO_LAPLACE_MAX_DIM:
            return (
                f"not tried: {self.latent_dim} latent dimensions, more than "
                f"{AUTO_LAPLACE_MAX_DIM} (precondition='laplace' forces it)"
            )
        frame = self._subsampled_site(args, kwargs)
        if frame is not None:
            return f"not tried: the model subsamples (plate {frame[1].name!r})"
        return None

    def _subsampled_site(self, args, kwargs) -> tuple[str, object] | None:
        """The first sample site in a subsampled plate and its frame, or ``None``."""
        for name, site in self._trace_at_prototype(args, kwargs).nodes.items():
            if site["type"] != "sample":
                continue
            frame = subsampled_frame(site)
            if frame is not None:
                return name, frame
        return None

    def _check_no_subsampling(self, args, kwargs) -> None:
        found = self._subsampled_site(args, kwargs)
        if found is not None:
            name, frame = found
            raise ValueError(
                f"precondition='laplace' needs the full log density, but site {name!r} "
                f"is in the subsampled plate {frame.name!r} (size {frame.full_size}, "
                f"subsample {frame.size}); drop subsample_size, or use precondition=None "
                "(for local latents in subsampled plates: pyro_nf.AutoHierarchicalFlow)"
            )

    def _log_joint_fn(self, args, kwargs) -> Callable[[Tensor], Tensor]:
        """The model's log density in unconstrained space, as a function of the latent vector."""
        model = self.user_model

        def log_joint(latent: Tensor) -> Tensor:
            values, log_jac = self.constrain_with_log_jacobian(latent)
            with poutine.block():
                trace = poutine.trace(poutine.condition(model, data=values)).get_trace(
                    *args, **kwargs
                )
            return trace.log_prob_sum() + log_jac

        return log_joint


#: draws behind :func:`start_elbo`'s estimate
START_ELBO_DRAWS = 64


def start_elbo(
    log_joint: Callable[[Tensor], Tensor],
    loc: Tensor,
    scale: Tensor,
    num_draws: int = START_ELBO_DRAWS,
) -> float:
    """Monte Carlo ELBO of the Gaussian start :math:`\\mathcal N(m, S S^\\top)` against
    ``log_joint``: ``scale`` is :math:`S`, a vector of scales or a lower-triangular factor.

    The draws come from a CPU generator seeded at 0 (the same standard normals for every start,
    so two starts are compared on common random numbers; the user's random state is untouched).
    ``-inf`` where the log density is not finite, or the model fails, at any draw.
    """
    gen = torch.Generator(device="cpu").manual_seed(0)
    # on the CPU whatever torch's default device (a CUDA or meta default must not leak in)
    eps = torch.randn(num_draws, loc.numel(), generator=gen, dtype=torch.float64, device="cpu")
    m, s = loc.detach().double().cpu().reshape(-1), scale.detach().double().cpu()
    if s.dim() == 2:
        x, log_det = m + eps @ s.T, s.diagonal().abs().log().sum()
    else:
        x, log_det = m + eps * s.reshape(-1), s.abs().log().sum()
    log_q = -0.5 * eps.pow(2).sum(-1) - 0.5 * loc.numel() * math.log(2 * math.pi) - log_det
    total = 0.0
    with torch.no_grad():
        for i in range(num_draws):
            try:
                lp = float(log_joint(x[i].to(dtype=loc.dtype, device=loc.device)))
            except (ValueError, RuntimeError):  # a draw outside the model's valid region
                return -math.inf
            if not math.isfinite(lp):
                return -math.inf
            total += lp - float(log_q[i])
    return total / num_draws


def pulled_back(log_joint: Callable[[Tensor], Tensor], t: FlowTransform) -> Callable:
    """The log density of ``v`` when ``z = t(v)`` has density ``log_joint``."""

    def pulled_back(v: Tensor) -> Tensor:
        z, ladj = t.call_and_ladj(v)
        return log_joint(z) + ladj

    return pulled_back


class _NoMode(Exception):
    """No usable mode; the message says why (it goes into ``laplace_info["reason"]``)."""


def laplace(
    log_joint: Callable[[Tensor], Tensor], start: Tensor, max_iter: int, tol: float = 1e-3
) -> tuple[Tensor | None, Tensor | None, dict]:
    """Mode and Cholesky factor of the inverse Hessian of ``log_joint``, or ``None`` and why.

    L-BFGS (strong-Wolfe line search) from ``start``, then damped Newton steps with the exact
    Hessian. The mode is accepted when the Hessian of ``-log_joint`` is positive definite and the
    Newton decrement :math:`g^\\top H^{-1} g` (twice the log-density still to gain by a Newton
    step, whatever the coordinates' scales) is below ``tol``. The third value is the record of
    ``laplace_info``: ``used``, ``reason``, ``log_density``, ``newton_decrement``,
    ``iterations`` and ``seconds``.
    """
    t0 = time.perf_counter()
    info: dict = {"used": False, "reason": None, "log_density": None, "newton_decrement": None,
                  "iterations": 0, "seconds": None}  # fmt: skip

    def neg(u: Tensor) -> Tensor:
        return -log_joint(u)

    mode = tril = None
    try:
        with torch.enable_grad():
            x = _lbfgs_mode(neg, start, max_iter, info)
            x, chol = _newton_polish(neg, x, tol, info)
        if not info["newton_decrement"] < tol:
            raise _NoMode(
                f"no mode found: the Newton decrement is {info['newton_decrement']:.3g} after "
                f"{info['iterations']} L-BFGS iterations (the log density may grow without "
                "bound, e.g. a funnel)"
            )
        cov = torch.cholesky_inverse(chol)
        tril, err = torch.linalg.cholesky_ex(0.5 * (cov + cov.T))
        if err or not torch.isfinite(tril).all():
            raise _NoMode("the inverse Hessian is numerically singular")
        mode, tril = x.detach(), tril.to(dtype=start.dtype)
    except _NoMode as e:
        info["reason"] = str(e)
    info["seconds"] = time.perf_counter() - t0
    info["used"] = mode is not None
    return mode, tril, info


def _lbfgs_mode(neg: Callable, start: Tensor, max_iter: int, info: dict) -> Tensor:
    """The end point of L-BFGS on ``neg`` from ``start``; its iteration count goes to ``info``."""
    u = start.detach().clone().requires_grad_(True)
    if not torch.isfinite(neg(u)):
        raise _NoMode("the log density is not finite at init_loc_fn's point")
    opt = torch.optim.LBFGS(
        [u], lr=1.0, max_iter=max_iter, max_eval=max_iter * 5 // 4, history_size=50,
        tolerance_grad=1e-10, tolerance_change=1e-14, line_search_fn="strong_wolfe",
    )  # fmt: skip

    def closure():
        opt.zero_grad()
        try:
            loss = neg(u)
        except (ValueError, RuntimeError):  # a step outside the model's valid region
            loss = None
        if loss is None or not torch.isfinite(loss):
            # a huge finite value with zero gradient: the line search backtracks from it
            u.grad = torch.zeros_like(u)
            return u.new_tensor(1e300 if u.dtype == torch.float64 else 1e30)
        loss.backward()
        return loss

    try:
        opt.step(closure)
    except (ValueError, RuntimeError) as e:
        raise _NoMode(f"the mode search failed ({first_line(e)})") from None
    info["iterations"] = opt.state[u].get("n_iter", 0)
    x = u.detach()
    if not torch.isfinite(x).all():
        raise _NoMode("the mode search diverged (non-finite latent values)")
    return x


def _newton_polish(neg: Callable, x: Tensor, tol: float, info: dict) -> tuple[Tensor, Tensor]:
    """Damped Newton steps from ``x`` (exact on a Gaussian posterior): the last point and the
    Cholesky factor of the Hessian of ``neg`` there (float64). The last Newton decrement and
    log density go to ``info``."""
    decrement = float("inf")
    for i in range(20):
        f, g, chol = _derivatives(neg, x)
        step = torch.cholesky_solve(g.double().unsqueeze(-1), chol).squeeze(-1)
        decrement = float(g.double() @ step)
        if decrement < tol * 1e-3 or i == 19:
            break
        t, f0 = 1.0, float(f.detach())
        for _ in range(30):  # backtracking: the longest step 2^-k that does not go uphill
            cand = x - t * step.to(x.dtype)
            try:
                with torch.no_grad():
                    fc = float(neg(cand))
            except (ValueError, RuntimeError):
                fc = float("nan")
            if fc == fc and fc <= f0:
                break
            t *= 0.5
        else:
            break
        x = cand
    info["newton_decrement"] = decrement
    info["log_density"] = -float(f.detach())
    return x, chol


def _derivatives(neg: Callable, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``neg`` at ``x``, its gradient, and the Cholesky factor of its Hessian (float64)."""
    xg = x.clone().requires_grad_(True)
    try:
        f = neg(xg)
        (g,) = torch.autograd.grad(f, xg)
        hess = torch.autograd.functional.hessian(neg, x)
    except (ValueError, RuntimeError) as e:
        raise _NoMode(
            f"the log density failed where the mode search ended ({first_line(e)})"
        ) from None
    if not (torch.isfinite(f) and torch.isfinite(g).all() and torch.isfinite(hess).all()):
        raise _NoMode(
            "the log density or its derivatives are not finite where the mode search ended "
            "(no finite mode?)"
        )
    chol, err = torch.linalg.cholesky_ex(0.5 * (hess + hess.T).double())
    if err:
        raise _NoMode(
            "the Hessian is not positive definite where the mode search ended (a flat or "
            "unbounded direction, e.g. a funnel)"
        )
    return f, g, chol
