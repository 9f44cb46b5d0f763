"""Plots of a fit: the loss trace, and posterior marginals and pairs (optionally against reference draws).

matplotlib is imported when a plot is made, not with the package.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["plot_losses", "plot_posterior"]


def plot_losses(
    losses, ax=None, window: int | None = None, label: str | None = None, log_scale: bool = False
):
    """Loss per step (faint) and its running mean over ``window`` steps (default 2% of the run).

    Args:
        losses: a sequence of losses, or a :class:`~pyro_nf.FitResult`.
        ax: matplotlib axes to draw on; a new figure when None.
        window: running-mean window.
        label: legend label of the running mean.
        log_scale: plot ``loss - min(loss) + 1`` on a log axis, which shows late progress.

    Returns:
        the axes.

    Example:
        >>> from pyro_nf import plot_losses
        >>> ax = plot_losses([5.0, 3.0, 2.2, 2.0, 1.9, 1.9], window=2, label="planar")
        >>> ax.get_xlabel(), ax.get_ylabel(), [line.get_label() for line in ax.lines][1]
        ('step', 'loss (-ELBO)', 'planar')
    """
    import matplotlib.pyplot as plt

    losses = np.asarray(getattr(losses, "losses", losses), dtype=float)
    if losses.ndim != 1 or losses.size == 0:
        raise ValueError("losses must be a non-empty 1-D sequence")
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3.5))
    window = window or max(1, losses.size // 50)
    steps = np.arange(losses.size)
    finite = np.isfinite(losses)
    shift = np.nanmin(losses) - 1.0 if log_scale else 0.0
    (line,) = ax.plot(steps[finite], losses[finite] - shift, alpha=0.25, lw=0.8)
    if finite.sum() >= window:
        kernel = np.ones(window) / window
        smooth = np.convolve(losses[finite], kernel, mode="valid")
        ax.plot(steps[finite][window - 1 :], smooth - shift, color=line.get_color(), label=label)
    if log_scale:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss - min + 1" if log_scale else "loss (-ELBO)")
    if label:
        ax.legend()
    return ax


def _scalar_columns(data, var_names: Sequence[str] | None) -> dict[str, np.ndarray]:
    """Flatten draws to ``{label: 1-D array}``; accepts InferenceData/DataTree or ``{name: (draws, ...)}``."""
    if hasattr(data, "posterior"):
        post = data.posterior
        names = var_names or list(post.data_vars)
        data = {n: post[n].values.reshape((-1,) + post[n].shape[2:]) for n in names}
    if not isinstance(data, Mapping):
        raise TypeError(
            "draws must be ArviZ data (InferenceData or DataTree) with a posterior group, "
            "or a dict {name: array (draws, ...)}"
        )
    columns = {}
    for name in var_names or list(data):
        if name not in data:
            raise KeyError(f"no variable {name!r} among {sorted(data)}")
        values = np.asarray(data[name], dtype=float)
        flat = values.reshape(values.shape[0], -1)
        if flat.shape[1] == 1:
            columns[name] = flat[:, 0]
        else:
            for j in range(flat.shape[1]):
                columns[f"{name}[{j}]"] = flat[:, j]
    return columns


def plot_posterior(
    draws,
    reference=None,
    var_names: Sequence[str] | None = None,
    max_vars: int = 6,
    labels: tuple[str, str] = ("guide", "reference"),
    max_points: int = 2000,
):
    """Marginals (diagonal) and pairs (below it) of posterior draws, optionally over reference draws.

    Args:
        draws: ArviZ data with a ``posterior`` group (an :class:`arviz.InferenceData` or, with
            ArviZ 1.x, an :class:`xarray.DataTree`; e.g. from :func:`pyro_nf.to_inference_data`) or a
            dict ``{name: array (draws, ...)}``; vector variables are split into components.
        reference: reference draws in the same form (e.g. long NUTS runs), drawn underneath.
        var_names: variables to show (default: all, up to ``max_vars`` scalar components).
        max_vars: show at most this many scalar components (the first ones).
        labels: legend labels of the two sets of draws.
        max_points: scatter at most this many draws per panel.

    Returns:
        the matplotlib figure.

    Example:
        >>> import numpy as np
        >>> from pyro_nf import plot_posterior
        >>> rng = np.random.default_rng(0)
        >>> draws = {"mu": rng.normal(size=(500,)), "theta": rng.normal(size=(500, 2))}
        >>> fig = plot_posterior(draws)  # theta is split into theta[0] and theta[1]
        >>> [ax.get_xlabel() for ax in fig.axes[-3:]]
        ['mu', 'theta[0]', 'theta[1]']
    """
    import matplotlib.pyplot as plt

    cols = _scalar_columns(draws, var_names)
    names = list(cols)[:max_vars]
    ref = _scalar_columns(reference, var_names) if reference is not None else {}
    k = len(names)
    if k == 0:
        raise ValueError("nothing to plot")
    fig, axes = plt.subplots(k, k, figsize=(2.3 * k + 1, 2.3 * k + 1), squeeze=False)
    rng = np.random.default_rng(0)

    def thin(x):
        return x if x.size <= max_points else x[rng.choice(x.size, max_points, replace=False)]

    for i, ni in enumerate(names):
        for j, nj in enumerate(names):
            ax = axes[i, j]
            if j > i:
                ax.set_axis_off()
                continue
            if i == j:
                if ni in ref:
                    ax.hist(ref[ni], bins=50, density=True, color="0.6", alpha=0.6, label=labels[1])
                ax.hist(
                    cols[ni], bins=50, density=True, histtype="step", color="C0", label=labels[0]
                )
                ax.set_yticks([])
            else:
                if ni in ref and nj in ref:
                    idx = thin(np.arange(ref[nj].size))
                    ax.scatter(ref[nj][idx], ref[ni][idx], s=2, color="0.6", alpha=0.4)
                idx = thin(np.arange(cols[nj].size))
                ax.scatter(cols[nj][idx], cols[ni][idx], s=2, color="C0", alpha=0.4)
            if i == k - 1:
                ax.set_xlabel(nj)
            if j == 0 and i > 0:
                ax.set_ylabel(ni)
    if ref:
        axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    return fig
