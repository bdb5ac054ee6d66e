"""Residual networks: PreAct ResNet-18, ResNet-18/34/50 and Wide ResNets.

Every activation is its own module and every norm a plain ``nn.BatchNorm2d``, so model
surgery (activation swaps, auxiliary batch norms) reaches all of them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from robustlab.models.registry import MODELS, pair
from robustlab.nn.activations import ActSpec, make_activation


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def _shortcut(cin: int, cout: int, stride: int, with_bn: bool) -> nn.Module | None:
    if stride == 1 and cin == cout:
        return None
    conv = nn.Conv2d(cin, cout, 1, stride=stride, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(cout)) if with_bn else conv


class PreActBlock(nn.Module):
    """Pre-activation basic block (He et al. 2016): BN-act-conv twice, identity shortcut."""

    def __init__(self, cin: int, cout: int, stride: int, act: ActSpec, dropout: float = 0.0):
        super().__init__()
        self.bn1, self.act1 = nn.BatchNorm2d(cin), make_activation(act)
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn2, self.act2 = nn.BatchNorm2d(cout), make_activation(act)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = _conv3x3(cout, cout)
        self.shortcut = _shortcut(cin, cout, stride, with_bn=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(x))
        skip = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(self.dropout(self.act2(self.bn2(out))))
        return out + skip


class BasicBlock(nn.Module):
    """Post-activation basic block of ResNet-18/34 (He et al. 2015)."""

    expansion = 1

    def __init__(self, cin: int, width: int, stride: int, act: ActSpec):
        super().__init__()
        self.conv1, self.bn1, self.act1 = (
            _conv3x3(cin, width, stride),
            nn.BatchNorm2d(width),
            make_activation(act),
        )
        self.conv2, self.bn2 = _conv3x3(width, width), nn.BatchNorm2d(width)
        self.shortcut = _shortcut(cin, width, stride, with_bn=True)
        self.act2 = make_activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        skip = self.shortcut(x) if self.shortcut is not None else x
        return self.act2(out + skip)


class Bottleneck(nn.Module):
    """Bottleneck block of ResNet-50 (1x1, 3x3 with the stride, 1x1 x4)."""

    expansion = 4

    def __init__(self, cin: int, width: int, stride: int, act: ActSpec):
        super().__init__()
        cout = width * self.expansion
        self.conv1, self.bn1, self.act1 = (
            nn.Conv2d(cin, width, 1, bias=False),
            nn.BatchNorm2d(width),
            make_activation(act),
        )
        self.conv2, self.bn2, self.act2 = (
            _conv3x3(width, width, stride),
            nn.BatchNorm2d(width),
            make_activation(act),
        )
        self.conv3, self.bn3 = nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.shortcut = _shortcut(cin, cout, stride, with_bn=True)
        self.act3 = make_activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.act2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        skip = self.shortcut(x) if self.shortcut is not None else x
        return self.act3(out + skip)


class PreActResNet(nn.Module):
    """Pre-activation ResNet for small images (the network of Wong et al. 2020)."""

    def __init__(self, blocks: Sequence[int], num_classes: int, in_channels: int, act: ActSpec):
        super().__init__()
        self.conv1 = _conv3x3(in_channels, 64)
        layers, cin = [], 64
        for i, n in enumerate(blocks):
            cout = 64 * 2**i
            for j in range(n):
                layers.append(PreActBlock(cin, cout, 2 if (j == 0 and i > 0) else 1, act))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.bn, self.act = nn.BatchNorm2d(cin), make_activation(act)
        self.pool, self.flatten = nn.AdaptiveAvgPool2d(1), nn.Flatten()
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn(self.layers(self.conv1(x))))
        return self.fc(self.flatten(self.pool(out)))


class ResNet(nn.Module):
    """ResNet (He et al. 2015) with a CIFAR stem (3x3 conv) or an ImageNet stem (7x7 + pool)."""

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        blocks: Sequence[int],
        num_classes: int,
        in_channels: int,
        act: ActSpec,
        imagenet_stem: bool,
    ):
        super().__init__()
        if imagenet_stem:
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False),
                nn.BatchNorm2d(64), make_activation(act), nn.MaxPool2d(3, stride=2, padding=1),
            )  # fmt: skip
        else:
            self.stem = nn.Sequential(
                _conv3x3(in_channels, 64), nn.BatchNorm2d(64), make_activation(act)
            )
        layers, cin = [], 64
        for i, n in enumerate(blocks):
            width = 64 * 2**i
            for j in range(n):
                layers.append(block(cin, width, 2 if (j == 0 and i > 0) else 1, act))
                cin = width * block.expansion
        self.layers = nn.Sequential(*layers)
        self.pool, self.flatten = nn.AdaptiveAvgPool2d(1), nn.Flatten()
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.pool(self.layers(self.stem(x)))))


class WideResNet(nn.Module):
    """Wide ResNet-depth-width (Zagoruyko & Komodakis 2016), pre-activation blocks."""

    def __init__(
        self,
        depth: int,
        width: int,
        num_classes: int,
        in_channels: int,
        act: ActSpec,
        dropout: float,
    ):
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"wide_resnet: depth must be 6n + 4 with n >= 1, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * width, 32 * width, 64 * width]
        self.conv1 = _conv3x3(in_channels, widths[0])
        layers, cin = [], widths[0]
        for i, cout in enumerate(widths[1:]):
            for j in range(n):
                layers.append(PreActBlock(cin, cout, 2 if (j == 0 and i > 0) else 1, act, dropout))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.bn, self.act = nn.BatchNorm2d(cin), make_activation(act)
        self.pool, self.flatten = nn.AdaptiveAvgPool2d(1), nn.Flatten()
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn(self.layers(self.conv1(x))))
        return self.fc(self.flatten(self.pool(out)))


def _imagenet_stem(stem: str, input_size: int | Sequence[int]) -> bool:
    if stem not in ("auto", "cifar", "imagenet"):
        raise ValueError(f"stem must be 'auto', 'cifar' or 'imagenet', got {stem!r}")
    return stem == "imagenet" or (stem == "auto" and min(pair(input_size)) >= 64)


@MODELS.register("preact_resnet18")
def preact_resnet18(
    num_classes: int = 10,
    in_channels: int = 3,
    input_size: int | Sequence[int] = 32,
    act: ActSpec = "relu",
) -> nn.Module:
    """PreAct ResNet-18 (He et al. 2016), the CIFAR-10 model of fast adversarial training."""
    return PreActResNet([2, 2, 2, 2], num_classes, in_channels, act)


def _resnet(block, blocks):  # type: ignore[no-untyped-def]
    def build(
        num_classes: int = 10,
        in_channels: int = 3,
        input_size: int | Sequence[int] = 32,
        act: ActSpec = "relu",
        stem: str = "auto",
    ) -> nn.Module:
        return ResNet(
            block, blocks, num_classes, in_channels, act, _imagenet_stem(stem, input_size)
        )

    return build


resnet18 = MODELS.register("resnet18")(_resnet(BasicBlock, [2, 2, 2, 2]))
resnet34 = MODELS.register("resnet34")(_resnet(BasicBlock, [3, 4, 6, 3]))
resnet50 = MODELS.register("resnet50")(_resnet(Bottleneck, [3, 4, 6, 3]))
resnet18.__doc__ = "ResNet-18 (He et al. 2015); stem='auto' picks the CIFAR stem below 64 px."
resnet34.__doc__ = "ResNet-34 (He et al. 2015); stem='auto' picks the CIFAR stem below 64 px."
resnet50.__doc__ = "ResNet-50, bottleneck blocks (He et al. 2015); stem as for ResNet-18."


@MODELS.register("wide_resnet")
def wide_resnet(
    num_classes: int = 10,
    in_channels: int = 3,
    input_size: int | Sequence[int] = 32,
    act: ActSpec = "relu",
    depth: int = 28,
    width: int = 10,
    dropout: float = 0.0,
) -> nn.Module:
    """Wide ResNet (Zagoruyko & Komodakis 2016), WRN-28-10 by default.

    Args:
        depth: 6n + 4 layers.
        width: channel multiplier k.
        dropout: dropout rate between the two convolutions of a block.
    """
    return WideResNet(depth, width, num_classes, in_channels, act, dropout)
