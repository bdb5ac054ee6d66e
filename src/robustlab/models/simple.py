"""Small models: mlp, small_cnn (Madry et al. 2018's MNIST network), lenet."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from robustlab.models.registry import MODELS, flat_features, pair
from robustlab.nn.activations import ActSpec, make_activation


@MODELS.register("mlp")
def mlp(
    num_classes: int = 10,
    in_channels: int = 1,
    input_size: int | Sequence[int] = 28,
    act: ActSpec = "relu",
    hidden: Sequence[int] = (256, 256),
) -> nn.Module:
    """Multi-layer perceptron on flattened pixels.

    Args:
        hidden: widths of the hidden layers.
    """
    h, w = pair(input_size)
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_channels * h * w
    for out in hidden:
        layers += [nn.Linear(width, out), make_activation(act)]
        width = out
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


@MODELS.register("small_cnn")
def small_cnn(
    num_classes: int = 10,
    in_channels: int = 1,
    input_size: int | Sequence[int] = 28,
    act: ActSpec = "relu",
    bn: bool = False,
) -> nn.Module:
    """conv32-conv64-fc1024: the MNIST network of Madry et al. (ICLR 2018).

    Two 5x5 "same" convolutions (32 and 64 channels), each followed by the activation
    and 2x2 max pooling, then a 1024-unit hidden layer.

    Args:
        bn: batch norm after each convolution and the hidden layer (not in the paper;
            what AdvProp's auxiliary norms need).
    """

    def conv(cin: int, cout: int) -> list[nn.Module]:
        if not bn:
            return [nn.Conv2d(cin, cout, 5, padding=2)]
        return [nn.Conv2d(cin, cout, 5, padding=2, bias=False), nn.BatchNorm2d(cout)]

    features = nn.Sequential(
        *conv(in_channels, 32), make_activation(act), nn.MaxPool2d(2),
        *conv(32, 64), make_activation(act), nn.MaxPool2d(2),
        nn.Flatten(),
    )  # fmt: skip
    n = flat_features(features, in_channels, input_size)
    hidden = [nn.Linear(n, 1024, bias=not bn)] + ([nn.BatchNorm1d(1024)] if bn else [])
    return nn.Sequential(*features, *hidden, make_activation(act), nn.Linear(1024, num_classes))


@MODELS.register("lenet")
def lenet(
    num_classes: int = 10,
    in_channels: int = 1,
    input_size: int | Sequence[int] = 28,
    act: ActSpec = "relu",
) -> nn.Module:
    """LeNet-5 (LeCun et al. 1998) with max pooling and a configurable activation."""
    features = nn.Sequential(
        nn.Conv2d(in_channels, 6, 5, padding=2), make_activation(act), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), make_activation(act), nn.MaxPool2d(2),
        nn.Flatten(),
    )  # fmt: skip
    n = flat_features(features, in_channels, input_size)
    return nn.Sequential(
        *features,
        nn.Linear(n, 120), make_activation(act),
        nn.Linear(120, 84), make_activation(act),
        nn.Linear(84, num_classes),
    )  # fmt: skip
