"""Which ArviZ is installed: the one place that decides.

pyro_nf works with either ArviZ line:

* **0.x** (the ``arviz`` package below version 1): PSIS is :func:`arviz.psislw` and exports are
  :class:`arviz.InferenceData` built by :func:`arviz.from_dict`;
* **1.x** (``arviz`` 1.x, which is made of ``arviz-base`` and ``arviz-stats``; the two can also be
  installed without ``arviz`` itself): PSIS is :func:`arviz_stats.psislw` and exports are
  :class:`xarray.DataTree` built by :func:`arviz_base.from_dict`;
* **neither**: PSIS falls back to pyro_nf's own smoothing (:mod:`pyro_nf._importance`) and
  :func:`pyro_nf.to_inference_data` says what to install.

An ``arviz`` 0.x wins over ``arviz-base``/``arviz-stats`` installed next to it, so an
environment that has always had ArviZ 0.x keeps getting ``InferenceData``.
"""

from __future__ import annotations

import importlib

ARVIZ_0 = "0.x"
ARVIZ_1 = "1.x"


def _imported(name: str):
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def arviz_line() -> str | None:
    """``"0.x"``, ``"1.x"`` or ``None`` (no usable ArviZ), by what imports."""
    arviz = _imported("arviz")
    if arviz is not None and int(arviz.__version__.split(".")[0]) < 1:
        return ARVIZ_0
    if _imported("arviz_base") is not None and _imported("arviz_stats") is not None:
        return ARVIZ_1
    return None


def missing_arviz_message(what: str) -> str:
    """The ImportError text for ``what`` when no ArviZ is installed."""
    return (
        f"{what} needs ArviZ: pip install arviz (0.x on Python < 3.12, 1.x on Python >= 3.12), "
        "or arviz-base and arviz-stats"
    )
