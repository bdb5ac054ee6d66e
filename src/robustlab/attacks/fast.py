"""A fast, frozen copy of a model for attacking it.

Attacks only need input gradients of a model in eval mode, which leaves room for
layouts and compilers that training code cannot always use. :func:`fast_model`
returns a copy that computes the same function (up to floating-point rounding):

- eval mode and frozen parameters: the attack cannot change the original at all;
- channels_last (NHWC) memory format for convolutional models: oneDNN on CPUs and
  cuDNN on GPUs run 2-D convolutions faster in it (measured in BENCHMARKS.md);
- optionally ``torch.compile``.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class _ChannelsLast(nn.Module):
    """Runs ``net`` on channels_last inputs."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net(x)


def _seconds_per_pass(model: nn.Module, x: torch.Tensor, repeats: int = 2) -> float:
    """Median time of a forward + input-backward pass (after one warm-up)."""
    import statistics
    import time

    times = []
    for i in range(repeats + 1):
        if x.is_cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        xa = x.detach().requires_grad_(True)
        torch.autograd.grad(model(xa).float().sum(), xa)
        if x.is_cuda:
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def fast_model(
    model: nn.Module,
    example: torch.Tensor | None = None,
    *,
    channels_last: bool | None = None,
    compile: bool = False,
) -> nn.Module:
    """A frozen eval-mode copy of ``model`` arranged for fast attacks.

    Args:
        model: the classifier (left untouched).
        example: a typical input batch. When given and ``channels_last`` is ``None``, both
            layouts are timed on it (a few passes) and the faster one is kept: which wins
            depends on the model, the batch size and the hardware.
        channels_last: force the NHWC layout on (``True``) or off (``False``); default:
            timed on ``example`` if given, else on for models with 2-D convolutions.
        compile: wrap the copy in ``torch.compile`` (pays a one-off compilation).

    Example:
        >>> x_adv = PGD(fast_model(model, x), eps=8 / 255, steps=10)(x, y)
    """
    fast = copy.deepcopy(model).eval()
    for p in fast.parameters():
        p.requires_grad_(False)
    has_conv = any(isinstance(m, nn.Conv2d) for m in fast.modules())
    if channels_last is None:
        channels_last = has_conv
        if has_conv and example is not None and example.ndim == 4:
            nhwc = _ChannelsLast(copy.deepcopy(fast))
            channels_last = _seconds_per_pass(nhwc, example) < _seconds_per_pass(fast, example)
    if channels_last:
        fast = _ChannelsLast(fast)
    if compile:
        fast = torch.compile(fast)
    return fast
