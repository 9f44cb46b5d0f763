"""Checkpoints of :func:`pyro_nf.fit`: what one holds, and how it is written, read and matched.

A checkpoint is a dict written with :func:`torch.save` and read with
``torch.load(weights_only=True)``, so opening one never runs code. Format ``pyro_nf.fit/2``:

* ``format``: the marker; ``step``: steps finished; ``losses``, ``skipped``: as in ``FitResult``;
* ``params``: every fitted parameter (unconstrained) by its param-store name;
* ``optimizer``: the optimizer's state dict; ``rng``: the random-number states at ``step``;
* what it belongs to: ``guide`` (the guide's class name), ``latents`` (for pyro_nf flow
  autoguides, the model's latent sites in order, ``[name, shape, support]``; ``None`` for other
  guides, whose parameter names already carry the sites) and ``optimizer_class``;
* ``buffers`` (optional): the guide's module buffers by name, such as the Laplace start's
  preconditioner, which set-up computes and which is not a parameter. A resumed guide gets these
  back, so it continues with the preconditioner the fit had rather than one found again from
  another random start. Checkpoints without this entry resume with the guide's own.

Resuming checks all of these against the fit at hand before anything is changed, and refuses a
mismatch with a :class:`CheckpointError` that names the difference. Checkpoints of format
``pyro_nf.fit/1`` (without the last three entries) still load, with a warning that the model and
optimizer cannot be checked beyond the parameter names and shapes.
"""

from __future__ import annotations

import os
import random
import tempfile
import warnings

import numpy as np
import torch

from ._latents import describe_differences, latent_sites

FORMAT = "pyro_nf.fit/2"
_FORMAT_1 = "pyro_nf.fit/1"

# Optimizer settings that may differ between the run that wrote a checkpoint and the one resuming
# it: the learning rate (fit sets it from ``lr`` and ``lr_schedule`` at every step) and the kernel
# flags (fit picks the kernel from the machine; the update is the same).
_FREE_SETTINGS = {"params", "lr", "initial_lr", "foreach", "fused", "capturable", "differentiable"}


class CheckpointError(RuntimeError):
    """Raised when a checkpoint file cannot be read or does not belong to this fit.

    Example:
        >>> import os, tempfile, pyro, pyro.distributions as dist, pyro_nf
        >>> def model():
        ...     pyro.sample("x", dist.Normal(0.0, 1.0))
        >>> guide = pyro_nf.AutoPlanarFlow(model, num_transforms=1)
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     path = os.path.join(tmp, "notes.pt")
        ...     with open(path, "w") as f:
        ...         _ = f.write("not a checkpoint")
        ...     try:
        ...         pyro_nf.fit(model, guide, num_steps=5, progress=False, checkpoint=path, resume=True)
        ...     except pyro_nf.CheckpointError as e:
        ...         print("refused:", "not a readable pyro_nf checkpoint" in str(e))
        refused: True
    """


# -- the file --------------------------------------------------------------------------------
def check_path(path: str | os.PathLike, resume: bool) -> str:
    """The checkpoint path as a string, refused now if a save there would fail later.

    The folder must exist and be writable, and the path must not be a folder. With ``resume``
    the file must exist; without it, it must not (a new fit never overwrites an earlier fit's
    checkpoint).
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"checkpoint must be a file path (str or os.PathLike), got {path!r}")
    path = os.fspath(path)
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(
            f"checkpoint={path!r}: the folder {folder!r} does not exist; create it first "
            "(fit does not create folders)"
        )
    if os.path.isdir(path):
        raise IsADirectoryError(f"checkpoint={path!r} is a folder; give a file path in it")
    try:  # an anonymous file, gone when closed: the folder takes new files (a save writes one)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise PermissionError(
            f"checkpoint={path!r}: cannot write in {folder!r} ({type(e).__name__}: {e})"
        ) from e
    if resume and not os.path.exists(path):
        raise FileNotFoundError(f"resume=True but there is no checkpoint at {path!r}")
    if not resume and os.path.exists(path):
        raise FileExistsError(
            f"checkpoint={path!r} already exists: pass resume=True to continue that fit, or "
            "delete the file (or choose another path) to start a new one; fit does not "
            "overwrite an earlier fit's checkpoint"
        )
    return path


def save(path: str, ckpt: dict) -> None:
    """Write ``ckpt`` atomically: a crash mid-write never leaves a truncated checkpoint."""
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(ckpt, tmp)
    os.replace(tmp, path)


def load(path: str) -> dict:
    """The checkpoint at ``path``; :class:`CheckpointError` for anything that is not one."""
    try:
        ckpt = torch.load(path, weights_only=True, map_location="cpu")
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 - whatever a foreign file makes torch.load raise
        raise CheckpointError(
            f"{path!r} is not a readable pyro_nf checkpoint (truncated, corrupted or a foreign "
            f"file): {type(e).__name__}: {e}"
        ) from e
    if not isinstance(ckpt, dict) or ckpt.get("format") not in (FORMAT, _FORMAT_1):
        raise CheckpointError(f"{path!r} is not a pyro_nf.fit checkpoint (no '{FORMAT}' marker)")
    return ckpt


# -- what a checkpoint belongs to ---------------------------------------------------------------
def owner(guide, optimizer: torch.optim.Optimizer) -> dict:
    """The ``guide``, ``latents`` and ``optimizer_class`` entries for this fit."""
    from .guides import AutoFlow

    latents = None
    if isinstance(guide, AutoFlow) and guide.prototype_trace is not None:
        latents = [
            [name, list(shape), support]
            for name, shape, support in latent_sites(guide.prototype_trace)
        ]
    return {
        "guide": type(guide).__qualname__,
        "latents": latents,
        "optimizer_class": type(optimizer).__qualname__,
    }


def buffers(guide) -> dict[str, torch.Tensor]:
    """The guide's module buffers (on the CPU) by name; empty for a guide that is no module."""
    if not isinstance(guide, torch.nn.Module):
        return {}
    return {name: b.detach().cpu() for name, b in guide.named_buffers()}


def restore_buffers(ckpt: dict, path: str, guide) -> None:
    """Put the checkpoint's ``buffers`` back into ``guide`` (nothing for an older checkpoint).

    A buffer the checkpoint holds is set (on the device and in the dtype of the guide's parameters
    or of the buffer it replaces); a buffer the guide has and the checkpoint lacks is set to
    ``None`` (e.g. a preconditioner that the fit's own set-up did not find).
    """
    saved = ckpt.get("buffers")
    if saved is None or not isinstance(guide, torch.nn.Module):
        return
    reference = next(iter(guide.parameters()), None)
    for name in sorted(set(saved) | {n for n, _ in guide.named_buffers()}):
        owner_name, _, leaf = name.rpartition(".")
        try:
            module = guide.get_submodule(owner_name)
        except AttributeError as e:
            raise CheckpointError(
                f"checkpoint {path!r} holds the buffer {name!r}, which this guide does not have"
            ) from e
        value = saved.get(name)
        if value is not None:
            like = getattr(module, leaf, None)
            like = like if isinstance(like, torch.Tensor) else reference
            if like is not None:
                value = value.to(like.device, like.dtype if value.is_floating_point() else None)
        module.register_buffer(leaf, value)


def _check_owner(ckpt: dict, path: str, mine: dict) -> None:
    if ckpt["format"] == _FORMAT_1:
        warnings.warn(
            f"{path!r} was written by an older pyro_nf ({_FORMAT_1}) that did not record the "
            "model's latent sites or the optimizer; only the parameter names and shapes are "
            "checked",
            stacklevel=4,
        )
        return
    if ckpt["guide"] != mine["guide"]:
        raise CheckpointError(
            f"checkpoint {path!r} was written for a guide of class {ckpt['guide']}, this fit's "
            f"guide is of class {mine['guide']}; resume with the same kind of guide, or start a "
            "new fit"
        )
    if ckpt["latents"] != mine["latents"] and None not in (ckpt["latents"], mine["latents"]):
        theirs = [(n, tuple(s), sup) for n, s, sup in ckpt["latents"]]
        ours = [(n, tuple(s), sup) for n, s, sup in mine["latents"]]
        differences = describe_differences(theirs, ours, "the checkpoint", "this fit")
        raise CheckpointError(
            f"checkpoint {path!r} belongs to another model: " + "; ".join(differences) + ". "
            "Resume with the model and arguments that wrote it, or start a new fit"
        )
    if ckpt["optimizer_class"] != mine["optimizer_class"]:
        raise CheckpointError(
            f"checkpoint {path!r} holds the state of a {ckpt['optimizer_class']} optimizer, this "
            f"fit uses {mine['optimizer_class']}; resume with "
            f"optimizer=torch.optim.{ckpt['optimizer_class']} (and the same optimizer_kwargs), "
            "or start a new fit"
        )


def _plain(value):
    """An optimizer setting in a form that compares equal across save and load."""
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return tuple(_plain(v) for v in value)
    return value


def _check_optimizer_settings(ckpt: dict, path: str, optimizer: torch.optim.Optimizer) -> None:
    saved = ckpt["optimizer"].get("param_groups", [])
    groups = optimizer.param_groups
    if len(saved) != len(groups) or any(
        len(s["params"]) != len(g["params"]) for s, g in zip(saved, groups)
    ):
        raise CheckpointError(
            f"checkpoint {path!r}: its optimizer state covers other parameters than this fit's"
        )
    for s, g in zip(saved, groups):
        differ = [
            f"{key}={_plain(s[key])!r} in the checkpoint, {_plain(g[key])!r} here"
            for key in sorted(set(s) & set(g) - _FREE_SETTINGS)
            if _plain(s[key]) != _plain(g[key])
        ]
        if differ:
            raise CheckpointError(
                f"checkpoint {path!r} was written with other optimizer settings: "
                + "; ".join(differ)
                + ". Resume with the same optimizer_kwargs (lr and lr_schedule may change)"
            )


def restore(
    ckpt: dict,
    path: str,
    mine: dict,
    names: list[str],
    params: list[torch.Tensor],
    optimizer: torch.optim.Optimizer,
) -> None:
    """Load ``ckpt`` into the parameters, the optimizer and the random-number generators.

    Everything is checked first (guide, latents, optimizer, parameter names and shapes); on a
    mismatch nothing is changed and :class:`CheckpointError` says what differs.
    """
    _check_owner(ckpt, path, mine)
    only_one = set(names) ^ set(ckpt["params"])
    if only_one:
        raise CheckpointError(
            f"checkpoint {path!r} does not match this model and guide; parameters present in "
            f"only one of them: {sorted(only_one)[:5]}"
        )
    for name, p in zip(names, params):
        saved = ckpt["params"][name]
        if saved.shape != p.shape:
            raise CheckpointError(
                f"checkpoint {path!r} does not match: parameter {name!r} has shape "
                f"{tuple(saved.shape)} in the checkpoint, {tuple(p.shape)} here"
            )
    _check_optimizer_settings(ckpt, path, optimizer)
    needed = [set(g) for g in optimizer.param_groups]
    try:
        optimizer.load_state_dict(ckpt["optimizer"])
    except (KeyError, ValueError, TypeError, RuntimeError) as e:
        raise CheckpointError(
            f"checkpoint {path!r}: its optimizer state does not load into "
            f"{type(optimizer).__name__} ({type(e).__name__}: {e})"
        ) from e
    missing = sorted(set().union(*needed) - set().union(*map(set, optimizer.param_groups)))
    if missing:  # an old-format checkpoint of another optimizer (e.g. Adam's state into SGD)
        raise CheckpointError(
            f"checkpoint {path!r}: its optimizer state lacks the {type(optimizer).__name__} "
            f"settings {missing}; it was written by another optimizer. Resume with that one"
        )
    with torch.no_grad():
        for name, p in zip(names, params):
            p.copy_(ckpt["params"][name].to(p.device, p.dtype))
    set_rng_state(ckpt["rng"])


# -- random-number states ------------------------------------------------------------------------
def rng_state() -> dict:
    """torch's (and CUDA's, if in use), Python's and numpy's global random-number states."""
    # numpy's legacy global generator is what pyro.set_rng_seed seeds, so it is saved too.
    _, keys, pos, has_gauss, cached = np.random.get_state()  # noqa: NPY002
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned (also after a save and a ``weights_only`` load)."""
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, cached))  # noqa: NPY002
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x
