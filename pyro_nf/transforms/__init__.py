"""Flow layers: each is a bijection of :math:`\\mathbb{R}^D` with an exact inverse and a log-det
computed in the same pass as the map, usable as a :class:`torch.distributions.Transform`.

=============================  ======================================  ====================================
layer (owns parameters)        stateless transform                     inverse
=============================  ======================================  ====================================
:class:`Planar`                :class:`PlanarTransform`                1-D safeguarded Newton solve along w
:class:`Radial`                :class:`RadialTransform`                closed form
:class:`MaskedAutoregressive`  :class:`AutoregressiveTransform`        D sequential MADE passes
:class:`AffineAutoregressive`  :class:`AutoregressiveTransform`        D sequential MADE passes
:class:`SplineAutoregressive`  :class:`SplineAutoregressiveTransform`  D sequential MADE passes
:class:`Affine`                :class:`AffineTransform`                closed form
(fixed preconditioner)         :class:`TriangularAffineTransform`      triangular solve
=============================  ======================================  ====================================
"""

from .affine import Affine, AffineTransform, TriangularAffineTransform
from .autoregressive import (
    MADE,
    AffineAutoregressive,
    AutoregressiveTransform,
    MaskedAutoregressive,
)
from .base import ChainTransform, FlowModule, FlowTransform
from .elementwise import AffineMap, ElementwiseMap, GatedAffineMap, SoftplusAffineMap
from .planar import Planar, PlanarStackTransform, PlanarTransform
from .radial import Radial, RadialStackTransform, RadialTransform
from .spline import (
    RationalQuadraticMap,
    SplineAutoregressive,
    SplineAutoregressiveTransform,
    rational_quadratic_spline,
)

__all__ = [
    "Affine",
    "AffineAutoregressive",
    "AffineMap",
    "AffineTransform",
    "AutoregressiveTransform",
    "ChainTransform",
    "ElementwiseMap",
    "FlowModule",
    "FlowTransform",
    "GatedAffineMap",
    "MADE",
    "MaskedAutoregressive",
    "Planar",
    "PlanarStackTransform",
    "PlanarTransform",
    "Radial",
    "RadialStackTransform",
    "RadialTransform",
    "RationalQuadraticMap",
    "SoftplusAffineMap",
    "SplineAutoregressive",
    "SplineAutoregressiveTransform",
    "TriangularAffineTransform",
    "rational_quadratic_spline",
]
