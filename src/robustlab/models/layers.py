"""Layers shared by the zoo."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import fx, nn


def check_image_batch(x: torch.Tensor, channels: int) -> None:
    """Raise a ValueError unless ``x`` is an NCHW batch with ``channels`` channels (any
    number when ``channels`` is 1, since one mean and std broadcast to every channel).

    torch.fx records it as one call (see :func:`torch.fx.wrap`), so models stay traceable.
    """
    if x.ndim != 4:
        hint = (
            "; a flattened batch must be reshaped to (B, C, H, W)"
            if x.ndim == 2
            else "; a single image needs a batch dimension"
            if x.ndim == 3
            else ""
        )
        raise ValueError(
            f"the model takes image batches (B, C, H, W), got an input of shape "
            f"{tuple(x.shape)}{hint}"
        )
    if channels != 1 and x.shape[1] != channels:
        raise ValueError(
            f"Normalize has {channels} channel means/stds but the input has {x.shape[1]} "
            f"channels (shape {tuple(x.shape)})"
        )


fx.wrap("check_image_batch")


class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std`` as the model's first layer.

    Models take pixels in [0, 1]; normalisation is part of the model, so epsilons stay
    in pixel units and attacks never need to know the data set's statistics. The input
    must be an NCHW batch whose channel count matches the statistics.

    Args:
        mean: per-channel means (one value broadcasts to every channel).
        std: per-channel standard deviations, all positive.
        in_channels: the model's input channels, when known: checked against the number
            of means at construction.
    """

    def __init__(
        self, mean: Sequence[float], std: Sequence[float], in_channels: int | None = None
    ) -> None:
        super().__init__()
        mean_t = torch.as_tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1)
        std_t = torch.as_tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1)
        if mean_t.numel() != std_t.numel():
            raise ValueError(f"Normalize: {mean_t.numel()} means but {std_t.numel()} stds")
        if (std_t <= 0).any():
            raise ValueError(f"Normalize: std must be positive, got {list(std)}")
        if in_channels is not None and mean_t.numel() not in (1, in_channels):
            raise ValueError(
                f"Normalize: {mean_t.numel()} channel means/stds for a model with "
                f"{in_channels} input channels"
            )
        self.register_buffer("mean", mean_t)
        self.register_buffer("std", std_t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_image_batch(x, self.mean.shape[1])
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"
