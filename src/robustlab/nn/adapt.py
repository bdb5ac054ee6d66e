"""Two small adapters every entry point shares: train/eval modes and model outputs.

:func:`preserve_modes` saves the ``training`` flag of *every* submodule and restores each
one afterwards (restoring only the root with ``model.train(was)`` would turn a submodule
the caller had put in eval mode back into train mode).

:func:`as_classifier` adapts a model whose forward returns a tuple, a list or a dict to
one that returns the logits tensor, so that attacks, ``evaluate``, ``clean_accuracy``,
``certify`` and ``lipschitz_bound`` all accept the same ``output=`` argument: an index
(``0``), a key (``"logits"``) or a callable (``lambda out: out.logits``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from robustlab.errors import RobustlabError

#: how to find the logits in a model's output: an index, a key or a function
OutputSpec = int | str | Callable[[Any], torch.Tensor] | None


class OutputError(RobustlabError, ValueError):
    """A model's output is not (or cannot be adapted to) a (batch, classes) logits tensor."""


@contextlib.contextmanager
def preserve_modes(model: Any, training: bool | None = None) -> Iterator[None]:
    """Within the block the model runs in ``training`` mode (unchanged if None); afterwards
    every submodule is back in the mode it was found in.

    Example:
        >>> with preserve_modes(model, training=False):
        ...     logits = model(x)
    """
    modules = list(model.modules()) if isinstance(model, nn.Module) else []
    modes = [m.training for m in modules]
    try:
        if training is not None and isinstance(model, nn.Module):
            model.train(training)
        yield
    finally:
        for m, mode in zip(modules, modes):
            m.training = mode


def select_output(out: Any, output: OutputSpec) -> Any:
    """Apply an :data:`OutputSpec` to a raw model output."""
    if output is None:
        return out
    if callable(output):
        return output(out)
    if isinstance(output, bool) or not isinstance(output, (int, str)):
        raise OutputError(
            f"output must be an index, a key or a function, got {type(output).__name__}"
        )
    try:
        return out[output]
    except (KeyError, IndexError, TypeError) as err:
        have = (
            f"keys {sorted(map(str, out))}"
            if isinstance(out, dict)
            else f"{len(out)} items"
            if isinstance(out, (tuple, list))
            else f"a {type(out).__name__}"
        )
        raise OutputError(f"output={output!r} does not select from the model's output ({have}): "
                          f"{type(err).__name__}") from None  # fmt: skip


def check_logits(out: Any, batch: int) -> torch.Tensor:
    """``out`` if it is a (batch, classes) tensor, else an :class:`OutputError` that says how
    to adapt the model."""
    if isinstance(out, torch.Tensor) and out.ndim == 2 and out.shape[0] == batch:
        return out
    if isinstance(out, dict):
        what, hint = f"a dict with keys {sorted(map(str, out))}", f"output={next(iter(out))!r}"
    elif isinstance(out, (tuple, list)):
        what, hint = f"a {type(out).__name__} of {len(out)} items", "output=0"
    elif isinstance(out, torch.Tensor):
        what, hint = f"a tensor of shape {tuple(out.shape)} for a batch of {batch}", None
    else:
        what, hint = f"a {type(out).__name__}", "output=lambda out: ..."
    advice = (
        f"; pass {hint} (an index, a key or a function) to select the logits"
        if hint
        else "; robustlab needs logits of shape (batch, classes)"
    )
    raise OutputError(f"the model returned {what}{advice}")


class Classifier(nn.Module):
    """``model`` followed by an output selection: forward returns the logits tensor.

    The wrapped model keeps its parameters (``classifier.model``), so a state dict of the
    adapter is the model's prefixed with ``model.``; torch.fx traces through the selection.
    """

    def __init__(self, model: nn.Module, output: OutputSpec) -> None:
        super().__init__()
        self.model = model
        self.output = output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return select_output(self.model(x), self.output)


def as_classifier(model: nn.Module, output: OutputSpec = None) -> nn.Module:
    """``model`` itself when ``output`` is None, else a :class:`Classifier` around it."""
    if output is None:
        return model
    if isinstance(output, bool) or not (callable(output) or isinstance(output, (int, str))):
        raise OutputError(
            f"output must be an index, a key or a function, got {type(output).__name__}"
        )
    return Classifier(model, output)


def check_labels(y: torch.Tensor, logits: torch.Tensor, what: str = "the data") -> None:
    """Labels must index the model's outputs: a data set with more classes than the model
    (a class folder added after training) would otherwise give meaningless accuracies."""
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= logits.shape[1]):
        raise OutputError(
            f"{what} has labels {int(y.min())}..{int(y.max())} but the model has "
            f"{logits.shape[1]} outputs: model and data set do not match"
        )
