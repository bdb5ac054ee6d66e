"""Small models for attack tests."""

from __future__ import annotations

import torch
from torch import nn


def conv_net(channels: int = 1, classes: int = 5, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(channels, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, classes),
    )  # fmt: skip


class Linear(nn.Module):
    """f(x) = W (x - 0.5) + b on flattened pixels: decision boundaries are known exactly."""

    def __init__(self, d: int, k: int, seed: int = 0, scale: float = 1.0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.weight = nn.Parameter(torch.randn(k, d, generator=g) * scale)
        self.bias = nn.Parameter(torch.randn(k, generator=g) * 0.1)

    def forward(self, x):
        return (x.flatten(1) - 0.5) @ self.weight.t() + self.bias
