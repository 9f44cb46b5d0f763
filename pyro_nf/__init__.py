"""pyro_nf: normalizing-flow variational posteriors for Pyro.

Flow layers with exact inverses (:mod:`pyro_nf.transforms`), a flow distribution that can be
conditioned on a context (:class:`Flow`), and autoguides (:class:`AutoPlanarFlow`,
:class:`AutoRadialFlow`, :class:`AutoIAFFlow`) that start where ``AutoNormal`` starts.
"""

from . import transforms
from .flow import Flow, FlowDistribution
from .guides import (
    AutoFlow,
    AutoIAFFlow,
    AutoPlanarFlow,
    AutoRadialFlow,
    init_to_median_or_feasible,
)

__version__ = "0.1.0"

__all__ = [
    "AutoFlow",
    "AutoIAFFlow",
    "AutoPlanarFlow",
    "AutoRadialFlow",
    "Flow",
    "FlowDistribution",
    "__version__",
    "init_to_median_or_feasible",
    "transforms",
]
