"""Auxiliary batch norms for AdvProp (Xie, Tan, Gong, Wang, Yuille & Le, CVPR 2020).

Clean and adversarial images have different feature statistics; AdvProp normalises
them with separate batch norms while sharing every other weight. These functions do
that surgery on any model::

    model = convert_aux_bn(model, num_aux=1)     # every BatchNorm -> AuxBatchNorm
    with use_bn(model, "aux", 0):                # route through auxiliary norm 0
        logits_adv = model(x_adv)
    with split_bn(model, [len(x), len(x_adv)]):  # one pass, rows routed per norm
        logits = model(torch.cat([x, x_adv]))
    plain = strip_aux_bn(model)                  # the original architecture, main norms

:func:`split_bn` exists for data parallelism: DDP expects one forward per backward, so
the clean and adversarial batches go through the network together, each through its
own norms.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from robustlab.errors import RobustlabError


class AuxBNError(RobustlabError, ValueError):
    """Misuse of auxiliary batch norms (no norms to convert, bad route)."""


class AuxBatchNorm(nn.Module):
    """A main batch norm plus ``num_aux`` auxiliary ones of the same kind; routes inputs.

    ``route`` is ``0`` for the main norm, ``i + 1`` for auxiliary norm ``i``, or a list of
    row counts (one per norm, in that order) to split the batch between norms. With
    :attr:`freeze_stats`, training-mode passes normalise with batch statistics but do not
    update running statistics (AdvProp's attack step).
    """

    def __init__(self, main: _BatchNorm, num_aux: int) -> None:
        super().__init__()
        self.main = main
        self.aux = nn.ModuleList(copy.deepcopy(main) for _ in range(num_aux))
        self.route: int | list[int] = 0
        self.freeze_stats = False

    def norms(self) -> list[_BatchNorm]:
        return [self.main, *self.aux]  # type: ignore[list-item]

    def _apply_norm(self, bn: _BatchNorm, x: torch.Tensor) -> torch.Tensor:
        if not (self.freeze_stats and bn.training):
            return bn(x)
        # batch statistics, running statistics untouched
        return F.batch_norm(x, None, None, bn.weight, bn.bias, True, 0.0, bn.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norms = self.norms()
        if isinstance(self.route, int):
            return self._apply_norm(norms[self.route], x)
        if sum(self.route) != x.shape[0]:
            raise AuxBNError(f"split_bn sizes {self.route} do not add up to the batch {x.shape[0]}")
        parts = [
            self._apply_norm(bn, chunk)
            for bn, chunk in zip(norms, x.split(self.route))
            if chunk.shape[0] > 0
        ]
        return torch.cat(parts)

    def extra_repr(self) -> str:
        return f"num_aux={len(self.aux)}"


def _is_bn(m: nn.Module) -> bool:
    return isinstance(m, _BatchNorm)  # BatchNorm1d/2d/3d, SyncBatchNorm, LazyBatchNorm


def convert_aux_bn(model: nn.Module, num_aux: int = 1) -> nn.Module:
    """Wrap every batch norm of ``model`` (in place) in an :class:`AuxBatchNorm`.

    Auxiliary norms start as copies of the main one (weights and running statistics),
    so a pretrained model can be fine-tuned with AdvProp.

    Raises:
        AuxBNError: ``model`` has no batch norm, or is already converted.
    """
    if num_aux < 1:
        raise AuxBNError(f"num_aux must be >= 1, got {num_aux}")
    if any(isinstance(m, AuxBatchNorm) for m in model.modules()):
        raise AuxBNError("the model already has auxiliary batch norms")
    if _is_bn(model):
        return AuxBatchNorm(model, num_aux)
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if _is_bn(child):
                setattr(parent, name, AuxBatchNorm(child, num_aux))
                count += 1
    if count == 0:
        raise AuxBNError(
            "the model has no batch norm layer to give auxiliary norms (AdvProp needs one; "
            "zoo example: small_cnn with bn: true)"
        )
    return model


def aux_bn_modules(model: nn.Module) -> list[AuxBatchNorm]:
    mods = [m for m in model.modules() if isinstance(m, AuxBatchNorm)]
    if not mods:
        raise AuxBNError("the model has no auxiliary batch norms: call convert_aux_bn first")
    return mods


def num_aux_bn(model: nn.Module) -> int:
    """Number of auxiliary norms per layer (0 for a model without them)."""
    mods = [m for m in model.modules() if isinstance(m, AuxBatchNorm)]
    return len(mods[0].aux) if mods else 0


@contextlib.contextmanager
def _routed(model: nn.Module, route: int | list[int], freeze_stats: bool | None) -> Iterator[None]:
    mods = aux_bn_modules(model)
    before = [(m.route, m.freeze_stats) for m in mods]
    for m in mods:
        m.route = route
        if freeze_stats is not None:
            m.freeze_stats = freeze_stats
    try:
        yield
    finally:
        for m, (r, f) in zip(mods, before):
            m.route, m.freeze_stats = r, f


def use_bn(
    model: nn.Module, which: str = "main", index: int = 0, *, freeze_stats: bool | None = None
) -> contextlib.AbstractContextManager[None]:
    """Context: route every :class:`AuxBatchNorm` through the main norm or auxiliary ``index``.

    Args:
        which: ``"main"`` or ``"aux"``.
        index: which auxiliary norm (``"aux"`` only).
        freeze_stats: if set, training-mode passes inside use batch statistics without
            updating running statistics (``True``) or update them as usual (``False``).

    Example:
        >>> with use_bn(model, "aux", 0):
        ...     x_adv = attack(x, y)
    """
    n = num_aux_bn(model)
    if which == "main":
        route = 0
    elif which == "aux":
        if not 0 <= index < n:
            raise AuxBNError(f"aux norm index {index} out of range: the model has {n}")
        route = index + 1
    else:
        raise AuxBNError(f"use_bn: which must be 'main' or 'aux', got {which!r}")
    return _routed(model, route, freeze_stats)


def split_bn(model: nn.Module, sizes: Sequence[int]) -> contextlib.AbstractContextManager[None]:
    """Context: the first ``sizes[0]`` rows of each batch use the main norms, the next
    ``sizes[1]`` auxiliary norm 0, and so on (one forward for clean + adversarial)."""
    n = num_aux_bn(model)
    if len(sizes) > n + 1 or any(s < 0 for s in sizes):
        raise AuxBNError(f"split_bn: {len(sizes)} non-negative sizes for {n + 1} norms needed")
    return _routed(model, list(sizes), None)


def strip_aux_bn(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with each :class:`AuxBatchNorm` replaced by its main norm.

    The result has the original architecture and state-dict keys: auxiliary state
    cannot leak into it.
    """
    plain = copy.deepcopy(model)
    if isinstance(plain, AuxBatchNorm):
        return plain.main
    for parent in list(plain.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, AuxBatchNorm):
                setattr(parent, name, child.main)
    return plain


def aux_bn_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The auxiliary norms' parameters and buffers, keyed as in ``model.state_dict()``."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if ".aux." in f".{k}"}
