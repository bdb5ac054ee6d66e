"""Clean (unattacked) accuracy."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from robustlab.data.base import ImageDataset
from robustlab.data.loader import BatchLoader
from robustlab.errors import ConfigError, RobustlabError
from robustlab.nn.adapt import (
    OutputSpec,
    as_classifier,
    check_labels,
    check_logits,
    preserve_modes,
)


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

    Every module's train/eval mode is restored afterwards.
    """
    correct = total = 0
    with preserve_modes(model, training=False):
        for x, y in batches:
            logits = check_logits(model(x), len(y))
            correct += int((logits.argmax(1) == y).sum())
            total += int(y.numel())
    return correct, total


def check_model_fits(model: nn.Module, data: ImageDataset, device: torch.device | str) -> None:
    """One forward pass on two images: the model must take the data's images, return
    (batch, classes) logits, and have an output for every label; else one clear error."""
    x = data.float_images(slice(0, 2)).to(device)
    with preserve_modes(model, training=False), torch.no_grad():
        try:
            out = model(x)
        except RobustlabError:  # already says what is wrong (a bad output= selection ...)
            raise
        except (RuntimeError, ValueError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ConfigError(
                f"the model cannot take the data's images of shape {tuple(x.shape[1:])} "
                f"({first}); check that model and data set match"
            ) from None
    check_labels(data.y, check_logits(out, len(x)))


def clean_accuracy(
    model: nn.Module,
    data: ImageDataset,
    *,
    batch_size: int = 500,
    device: torch.device | str | None = None,
    output: OutputSpec = None,
) -> float:
    """Top-1 accuracy on ``data`` (fraction in [0, 1]); the device defaults to the model's.

    ``output`` selects the logits of a model that returns a tuple or dict (an index, a
    key or a function; see :func:`robustlab.nn.as_classifier`).

    Example:
        >>> clean_accuracy(robustlab.load("runs/demo-mnist"), load_dataset("mnist5k", "test"))
        0.98
    """
    if not isinstance(data, ImageDataset):
        raise ConfigError(f"data must be an ImageDataset, got {type(data).__name__}")
    if len(data) == 0:
        raise ConfigError("the data set is empty")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a whole number >= 1, got {batch_size!r}")
    model = as_classifier(model, output)
    dev = device or model_device(model)
    check_model_fits(model, data, dev)
    loader = BatchLoader(data, batch_size, device=dev)
    correct, total = count_correct(model, loader)
    return correct / total
