"""Inference-time defenses: a module in front of (or inside) a model that declares how
it must be attacked.

Every defense states whether it is **randomized** (an adaptive attack needs EOT:
Athalye, Engstrom, Ilyas & Kwok 2018) and whether it is **differentiable** (if not, an
adaptive attack needs BPDA: Athalye, Carlini & Wagner 2018), and offers a **surrogate**:
the differentiable stand-in whose gradient BPDA uses (the identity by default; a smooth
approximation where one exists). Evaluation reads these declarations, so no defense is
credited for hiding its gradients.

A :class:`Defense` runs its deployed transform in ``forward``. Inside
:func:`bpda_mode` it returns the same values but back-propagates the surrogate's
gradient. Randomness comes from torch's global generator, so ``torch.manual_seed``
makes a defended model reproducible (evaluation seeds each batch).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from robustlab.errors import ConfigError, RobustlabError, did_you_mean
from robustlab.registry import Registry, check_options, check_types, init_hints, init_options

#: name -> Defense subclass
DEFENSES: Registry[type] = Registry("defense")


class DefenseInputError(RobustlabError, ValueError):
    """A defense was given something other than a batch of pixels in [0, 1]."""


def check_pixels(x: Any, who: str, channels: tuple[int, ...] | None = None) -> torch.Tensor:
    """``x`` if it is a floating-point (B, C, H, W) batch of pixels in [0, 1], else a
    :class:`DefenseInputError` naming the problem (no silent clamping).

    Args:
        x: the batch.
        who: the defense's name, for the message.
        channels: the channel counts the defense supports (None: any).
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        got = getattr(x, "dtype", type(x).__name__)
        raise DefenseInputError(f"{who}: expects a floating-point tensor of pixels, got {got}")
    if x.ndim != 4:
        raise DefenseInputError(
            f"{who}: expects a batch of images (B, C, H, W), got shape {tuple(x.shape)}"
        )
    if channels is not None and x.shape[1] not in channels:
        raise DefenseInputError(
            f"{who}: supports {' or '.join(map(str, channels))} channels, got {x.shape[1]} "
            f"(shape {tuple(x.shape)})"
        )
    if x.numel() == 0:
        return x
    if torch.isnan(x).any():
        raise DefenseInputError(f"{who}: the input contains NaN")
    lo, hi = float(x.detach().min()), float(x.detach().max())
    if lo < 0.0 or hi > 1.0:
        raise DefenseInputError(
            f"{who}: expects pixels in [0, 1] (normalisation belongs inside the model), "
            f"got values in [{lo:.4g}, {hi:.4g}]"
        )
    return x


class Defense(nn.Module):
    """Base class of every defense: ``forward`` is the deployed transform of a batch of
    pixels in [0, 1] (B, C, H, W), returning pixels in [0, 1] of the shape the model takes.

    Subclasses set the class declarations and implement :meth:`transform`; a
    non-differentiable or randomized defense says so, and a defense with a better BPDA
    stand-in than the identity overrides :meth:`surrogate`.
    """

    name: ClassVar[str] = "defense"
    randomized: ClassVar[bool] = False  #: needs EOT to be attacked adaptively
    differentiable: ClassVar[bool] = True  #: gradients through ``transform`` are useful

    def __init__(self) -> None:
        super().__init__()
        self.use_surrogate_gradient = False  #: set by :func:`bpda_mode`

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        """The deployed transform."""
        raise NotImplementedError

    def surrogate(self, x: torch.Tensor) -> torch.Tensor:
        """Differentiable stand-in for :meth:`transform` (BPDA); the identity by default."""
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.use_surrogate_gradient:
            if self.differentiable:
                return self.transform(x)
            with torch.no_grad():  # what PyTorch gives an attacker: no gradient at all
                out = self.transform(x)
            return out + 0.0 * x.sum(dim=tuple(range(1, x.ndim)), keepdim=True)
        with torch.no_grad():
            out = self.transform(x)
        approx = self.surrogate(x)
        if approx.shape != out.shape:
            raise ConfigError(
                f"{self.name}: the surrogate gives shape {tuple(approx.shape)} but the "
                f"transform {tuple(out.shape)}"
            )
        return approx + (out - approx).detach()  # the value of out, the gradient of approx

    def spec(self) -> str:
        """``name:key=value:...``: the text that rebuilds this defense (saved in meta.json)."""
        opts = "".join(f":{k}={v}" for k, v in self.options().items() if v is not None)
        return f"{self.name}{opts}"

    def options(self) -> dict[str, Any]:
        """The constructor options that rebuild this defense (JSON-able)."""
        return {}

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.options().items())


class DefendedModel(nn.Module):
    """``model(defenses[-1](...defenses[0](x)))``: a model behind a chain of defenses.

    Args:
        model: the classifier (pixels in [0, 1] to logits).
        defenses: applied in order before the model.

    Example:
        >>> defended = DefendedModel(model, [create_defense("jpeg:quality=75")])
        >>> defended.randomized, defended.differentiable
        (False, False)
    """

    def __init__(self, model: nn.Module, defenses: Sequence[Defense]) -> None:
        super().__init__()
        if isinstance(model, DefendedModel):
            defenses, model = [*model.defenses, *defenses], model.model
        if not defenses:
            raise ConfigError("DefendedModel needs at least one defense")
        for d in defenses:
            if not isinstance(d, Defense):
                raise ConfigError(f"a defense must be a robustlab Defense, got {type(d).__name__}")
        self.defenses = nn.ModuleList(defenses)
        self.model = model

    @property
    def randomized(self) -> bool:
        return any(d.randomized for d in self.defenses)

    @property
    def differentiable(self) -> bool:
        return all(d.differentiable for d in self.defenses)

    def specs(self) -> list[str]:
        return [d.spec() for d in self.defenses]

    def forward(self, x: torch.Tensor) -> Any:
        for d in self.defenses:
            x = d(x)
        return self.model(x)


@contextlib.contextmanager
def bpda_mode(model: nn.Module, enabled: bool = True) -> Iterator[nn.Module]:
    """Within the block every :class:`Defense` in ``model`` back-propagates its surrogate's
    gradient (BPDA); the previous setting is restored afterwards."""
    defenses = [m for m in model.modules() if isinstance(m, Defense)]
    before = [d.use_surrogate_gradient for d in defenses]
    for d in defenses:
        d.use_surrogate_gradient = enabled
    try:
        yield model
    finally:
        for d, b in zip(defenses, before):
            d.use_surrogate_gradient = b


def create_defense(spec: str | Defense, **options: Any) -> Defense:
    """A registered defense from ``"name:key=value:..."`` (or a name plus keyword options).

    Example:
        >>> create_defense("bitdepth:bits=4")
    """
    if isinstance(spec, Defense):
        return spec
    from robustlab.config import load_yaml

    head, *opts = str(spec).strip().split(":")
    if head not in DEFENSES:
        raise ConfigError(
            f"unknown defense {head!r}{did_you_mean(head, DEFENSES.names())} "
            f"(choose from {', '.join(DEFENSES.names())})"
        )
    parsed: dict[str, Any] = {}
    for opt in opts:
        if "=" not in opt:
            raise ConfigError(f"defense option {opt!r} in {spec!r} must look like key=value")
        key, value = opt.split("=", 1)
        parsed[key] = load_yaml(value)
    parsed.update(options)
    cls = DEFENSES.get(head)
    what = f"defense {head!r}"
    check_options(init_options(cls, Defense), parsed, what, ConfigError)
    parsed = check_types(init_hints(cls, Defense), parsed, what)
    return cls(**parsed)


def defend(model: nn.Module, defenses: Sequence[str | Defense]) -> DefendedModel:
    """``model`` behind ``defenses`` (specs such as ``"jpeg:quality=75"`` or modules)."""
    return DefendedModel(model, [create_defense(d) for d in defenses])
