"""Certified robustness: Lipschitz bounds and the certified radii they give."""

from robustlab.certify.lipschitz import (
    LayerBound,
    LipschitzError,
    LipschitzReport,
    activation_bound,
    lipschitz_bound,
    lmt_conv_bound,
    max_slope,
)
from robustlab.certify.radius import Certificate, CertifyReport, certified_radius, certify

__all__ = [
    "Certificate",
    "CertifyReport",
    "LayerBound",
    "LipschitzError",
    "LipschitzReport",
    "activation_bound",
    "certified_radius",
    "certify",
    "lipschitz_bound",
    "lmt_conv_bound",
    "max_slope",
]
