"""pyro_nf: normalizing-flow variational posteriors for Pyro.

Flow layers with exact inverses (:mod:`pyro_nf.transforms`), a flow distribution that can be
conditioned on a context (:class:`Flow`), autoguides (:class:`AutoPlanarFlow`,
:class:`AutoRadialFlow`, :class:`AutoIAFFlow`, :class:`AutoSplineFlow`) that start where
``AutoNormal`` starts when both get the same ``init_loc_fn`` and ``init_scale``, and the workflow
around a fit: :func:`fit`, :func:`diagnose`, :func:`log_marginal_likelihood`,
:func:`to_inference_data` and the plots in :mod:`pyro_nf.plots`.
"""

from . import plots, transforms
from ._captured_step import CapturedStep, captured_step
from .arviz_export import to_inference_data
from .diagnostics import (
    Diagnostics,
    LogMarginalLikelihood,
    diagnose,
    log_marginal_likelihood,
    psis_verdict,
)
from .fast import FastELBO
from .flow import Flow, FlowDistribution
from .gaps import InferenceGaps, inference_gaps
from .guides import (
    AutoFlow,
    AutoIAFFlow,
    AutoPlanarFlow,
    AutoRadialFlow,
    AutoSplineFlow,
    init_to_median_or_feasible,
)
from .hierarchical import AutoHierarchicalFlow
from .plots import plot_losses, plot_posterior
from .workflow import CheckpointError, FitError, FitResult, fit

__version__ = "0.2.0"

__all__ = [
    "AutoFlow",
    "AutoHierarchicalFlow",
    "AutoIAFFlow",
    "AutoPlanarFlow",
    "AutoRadialFlow",
    "AutoSplineFlow",
    "CapturedStep",
    "CheckpointError",
    "Diagnostics",
    "FastELBO",
    "FitError",
    "FitResult",
    "Flow",
    "FlowDistribution",
    "InferenceGaps",
    "LogMarginalLikelihood",
    "__version__",
    "captured_step",
    "diagnose",
    "fit",
    "inference_gaps",
    "init_to_median_or_feasible",
    "log_marginal_likelihood",
    "plot_losses",
    "plot_posterior",
    "plots",
    "psis_verdict",
    "to_inference_data",
    "transforms",
]
