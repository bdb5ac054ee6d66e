"""The model registry and ``create_model``."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from robustlab.models.layers import Normalize
from robustlab.nn.adapt import preserve_modes
from robustlab.registry import Registry, check_kwargs

#: name -> builder ``fn(num_classes, in_channels, input_size, act, **options) -> nn.Module``
MODELS: Registry[Callable[..., nn.Module]] = Registry("model")


def create_model(
    name: str,
    *,
    num_classes: int = 10,
    in_channels: int = 3,
    input_size: int | Sequence[int] | None = None,
    act: str | Callable[[], nn.Module] = "relu",
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    **options: Any,
) -> nn.Module:
    """Build a zoo model that takes pixels in [0, 1].

    Args:
        name: a name from ``robustlab list models``.
        num_classes: number of output logits.
        in_channels: input channels.
        input_size: input height and width (an int for square images); models with a
            fixed-size classifier need it, the default is the model's usual size.
        act: activation, a registered name (``relu``, ``silu`` ...) or a factory.
        mean: if given with ``std``, a :class:`Normalize` layer is put first and the
            model becomes ``Sequential(normalize=..., net=...)``.
        std: per-channel standard deviations for ``Normalize``.
        **options: model-specific options (``wide_resnet``: ``depth``, ``width``).

    Example:
        >>> model = create_model("small_cnn", num_classes=10, in_channels=1, input_size=28)
        >>> model(torch.rand(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """
    builder = MODELS.get(name)
    check_kwargs(builder, options, f"model {name!r}")
    kwargs: dict[str, Any] = dict(num_classes=num_classes, in_channels=in_channels, act=act)
    if input_size is not None:
        kwargs["input_size"] = input_size
    net = builder(**kwargs, **options)
    if (mean is None) != (std is None):
        raise ValueError("create_model: give both mean and std, or neither")
    if mean is None:
        return net
    normalize = Normalize(mean, std, in_channels=in_channels)
    return nn.Sequential(OrderedDict(normalize=normalize, net=net))


def pair(size: int | Sequence[int]) -> tuple[int, int]:
    """``28 -> (28, 28)``; ``(28, 32)`` stays."""
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


def flat_features(features: nn.Module, in_channels: int, input_size: int | Sequence[int]) -> int:
    """Number of features ``features`` outputs for one input, found by a dry run."""
    h, w = pair(input_size)
    try:  # eval: the dry run must not touch batch-norm running statistics
        with preserve_modes(features, training=False), torch.no_grad():
            out = features(torch.zeros(1, in_channels, h, w))
    except RuntimeError as err:
        raise ValueError(f"input size {h}x{w} is too small for this model ({err})") from None
    if out.numel() == 0:
        raise ValueError(f"input size {h}x{w} is too small for this model")
    return out.numel()


def add_denoising(model: nn.Module, spec: dict[str, Any], shape: Sequence[int]) -> nn.Module:
    """``model`` with the feature-denoising blocks ``spec`` describes (``after``, ``kind``,
    ``embed``; see :func:`robustlab.nn.denoise.insert_denoising`), inserted by a dry run on
    an input of ``shape`` (C, H, W). Used by the trainer and by ``load`` alike, so a run's
    architecture is rebuilt exactly."""
    from robustlab.errors import ConfigError
    from robustlab.nn.denoise import insert_denoising

    if not isinstance(spec, dict) or "after" not in spec:
        raise ConfigError(
            f"model.denoise needs 'after' (module names), got {spec!r}; "
            "e.g. {after: ['3'], kind: nonlocal_gaussian}"
        )
    unknown = set(spec) - {"after", "kind", "embed"}
    if unknown:
        raise ConfigError(f"model.denoise: unknown keys {sorted(unknown)} (after, kind, embed)")
    return insert_denoising(model, example=torch.zeros(2, *shape), **spec)
