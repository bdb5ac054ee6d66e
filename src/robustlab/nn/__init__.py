"""Model surgery and building blocks that work on any ``nn.Module``."""

from robustlab.nn.activations import (
    ACTIVATIONS,
    MaxMin,
    ParametricSoftplus,
    SmoothGradReLU,
    SmoothReLU,
    make_activation,
)
from robustlab.nn.adapt import (
    Classifier,
    OutputError,
    as_classifier,
    check_logits,
    preserve_modes,
    select_output,
)
from robustlab.nn.aux_bn import (
    AuxBatchNorm,
    AuxBNError,
    aux_bn_state,
    convert_aux_bn,
    split_bn,
    strip_aux_bn,
    use_bn,
)
from robustlab.nn.denoise import DenoiseError, DenoisingBlock, insert_denoising
from robustlab.nn.swap import SwapError, count_activations, smooth_gradients, swap_activations

__all__ = [
    "ACTIVATIONS",
    "AuxBNError",
    "AuxBatchNorm",
    "Classifier",
    "DenoiseError",
    "DenoisingBlock",
    "MaxMin",
    "OutputError",
    "ParametricSoftplus",
    "SmoothGradReLU",
    "SmoothReLU",
    "SwapError",
    "as_classifier",
    "aux_bn_state",
    "check_logits",
    "convert_aux_bn",
    "count_activations",
    "insert_denoising",
    "make_activation",
    "preserve_modes",
    "select_output",
    "smooth_gradients",
    "split_bn",
    "strip_aux_bn",
    "swap_activations",
    "use_bn",
]
