"""Inference-time defenses, each declaring how it must be attacked (EOT, BPDA).

Registered (``robustlab list defenses``): ``resize_pad`` (Xie et al. 2018), ``bitdepth``
and ``median`` (Xu et al. 2018), ``jpeg`` (Guo et al. 2018), ``tvm`` (total-variation
minimisation, Guo et al. 2018), ``noise`` (Gaussian noise injection). The feature-
squeezing detector is :class:`SqueezeDetector`; feature-denoising blocks live in
:mod:`robustlab.nn.denoise` (they are part of the model, not in front of it).
"""

from robustlab.defenses import jpeg, noise, resize_pad, squeeze, tvm  # noqa: F401 (register)
from robustlab.defenses.base import (
    DEFENSES,
    DefendedModel,
    Defense,
    bpda_mode,
    create_defense,
    defend,
)
from robustlab.defenses.detector import SqueezeDetector

__all__ = [
    "DEFENSES",
    "DefendedModel",
    "Defense",
    "SqueezeDetector",
    "bpda_mode",
    "create_defense",
    "defend",
]
