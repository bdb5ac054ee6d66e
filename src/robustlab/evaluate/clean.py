"""Clean (unattacked) accuracy."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from robustlab.data.base import ImageDataset
from robustlab.data.loader import BatchLoader


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter (or buffer); CPU for a stateless model."""
    p = next(model.parameters(), None)
    if p is None:
        p = next(model.buffers(), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def count_correct(
    model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]
) -> tuple[int, int]:
    """(correct, total) of ``model``'s top-1 predictions over ``batches``, in eval mode.

    The model's train/eval mode is restored afterwards.
    """
    was_training = model.training
    model.eval()
    correct = total = 0
    try:
        for x, y in batches:
            correct += int((model(x).argmax(1) == y).sum())
            total += int(y.numel())
    finally:
        model.train(was_training)
    return correct, total


def clean_accuracy(
    model: nn.Module,
    data: ImageDataset,
    *,
    batch_size: int = 500,
    device: torch.device | str | None = None,
) -> float:
    """Top-1 accuracy on ``data`` (fraction in [0, 1]); the device defaults to the model's.

    Example:
        >>> clean_accuracy(robustlab.load("runs/demo-mnist"), load_dataset("mnist5k", "test"))
        0.98
    """
    loader = BatchLoader(data, batch_size, device=device or model_device(model))
    correct, total = count_correct(model, loader)
    return correct / total
