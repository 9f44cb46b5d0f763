"""Which device a model lives on, for the code that makes tensors on its behalf."""

from __future__ import annotations

from collections.abc import Container

import torch
from pyro.poutine.util import site_is_subsample


def site_values(trace, observed: bool, exclude: Container[str] = ()) -> dict[str, torch.Tensor]:
    """The tensor values of a trace's observed (or latent) sample sites, leaving out plates'
    indices and ``pyro.deterministic`` sites."""
    return {
        name: site["value"]
        for name, site in trace.nodes.items()
        if site["type"] == "sample"
        and bool(site["is_observed"]) == observed
        and not site["infer"].get("_deterministic")  # (a function of the latents, not data)
        and name not in exclude
        and torch.is_tensor(site["value"])
        and not site_is_subsample(site)
    }


def model_device(
    owner: str, observed: dict, args: tuple, kwargs: dict, latents: dict
) -> torch.device:
    """The device to make tensors on for a model: that of its data.

    The data are the observed sites' values; a model with none is judged by the tensors among its
    arguments, and one with neither by its latents. Priors built from Python numbers live on the
    CPU whatever the data's device (``dist.Normal(0.0, 1.0)``), and so do the latents drawn from
    them at set-up; CUDA lets such 0-dim CPU tensors mix with CUDA ones, so the data decide.
    Data on more than one device cannot be decided for: the error names the sites on each.
    """
    arguments = {f"args[{i}]": a for i, a in enumerate(args) if torch.is_tensor(a)}
    arguments.update({f"{k}=": v for k, v in kwargs.items() if torch.is_tensor(v)})
    for kind, tensors in (
        ("observed site", observed),
        ("tensor argument", arguments),
        ("latent site", latents),
    ):
        by_device: dict[torch.device, list[str]] = {}
        for name, value in tensors.items():
            by_device.setdefault(value.device, []).append(name)
        if len(by_device) == 1:
            return next(iter(by_device))
        if len(by_device) > 1:
            where = "; ".join(
                f"{dev}: {', '.join(map(repr, names))}" for dev, names in by_device.items()
            )
            raise ValueError(
                f"{owner} cannot tell which device the model lives on: its {kind}s are on "
                f"different devices ({where}). Move the data to one device (e.g. "
                "y.to('cuda')) before calling the guide."
            )
    return torch.device("cpu")
