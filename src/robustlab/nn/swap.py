"""Replace the activations of any model (Smooth Adversarial Training's surgery).

:func:`swap_activations` replaces ReLU-family activation *modules* and, through
torch.fx, *functional* calls (``F.relu(x)``, ``torch.relu(x)``, ``x.relu()``) in a
model's ``forward``. A swap never silently leaves a ReLU behind: when a model cannot be
traced, its ``forward`` source is scanned for functional activation calls and, if any
is found, :class:`SwapError` names each one.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import re
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import fx, nn

from robustlab.errors import RobustlabError
from robustlab.nn.activations import (
    ActSpec,
    MaxMin,
    ParametricSoftplus,
    SmoothGradReLU,
    SmoothReLU,
    make_activation,
)

#: activation modules that :func:`swap_activations` replaces (tanh and sigmoid are not
#: ReLU-like and are left alone)
SWAPPABLE: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Softplus, nn.SiLU, nn.GELU, nn.ELU, nn.CELU, nn.Mish,
    ParametricSoftplus, SmoothReLU, SmoothGradReLU, MaxMin,
)  # fmt: skip

_FUNCTIONS = {
    F.relu, F.relu_, torch.relu, torch.relu_, F.relu6, F.leaky_relu, F.leaky_relu_,
    F.softplus, F.silu, F.gelu, F.elu, F.elu_, F.celu, F.mish,
}  # fmt: skip
_METHODS = {"relu", "relu_"}
_SOURCE_PATTERN = re.compile(
    r"(?<![\w.])(?:F\.|torch\.|nn\.functional\.|\.)?"
    r"(relu6?_?|leaky_relu_?|softplus|silu|gelu|elu_?|celu|mish)\s*\("
)


class SwapError(RobustlabError, ValueError):
    """Activations of a model could not all be swapped."""


class _LeafTracer(fx.Tracer):
    """Keeps activation modules (including robustlab's) as single graph nodes."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, SWAPPABLE) or super().is_leaf_module(m, qualname)


def _swap_modules(model: nn.Module, act: ActSpec) -> int:
    count = 0
    for _parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, SWAPPABLE):
                setattr(parent, name, make_activation(act))
                count += 1
    return count


def _functional_calls_in_source(model: nn.Module) -> list[str]:
    """``Class.forward:line: code`` for each functional activation call in user forwards."""
    found: list[str] = []
    seen: set[type] = set()
    for module in model.modules():
        cls = type(module)
        if cls in seen or cls.__module__.startswith(("torch.", "robustlab.nn.activations")):
            continue
        seen.add(cls)
        try:
            lines, start = inspect.getsourcelines(cls.forward)
        except (OSError, TypeError):
            raise SwapError(
                f"{cls.__name__} could not be traced by torch.fx and its forward source is "
                "unavailable, so functional ReLU calls cannot be ruled out; make it traceable "
                "or hold activations as modules"
            ) from None
        for i, line in enumerate(lines):
            code = line.split("#", 1)[0]
            if _SOURCE_PATTERN.search(code):
                found.append(f"{cls.__name__}.forward:{start + i}: {code.strip()}")
    return found


def swap_activations(model: nn.Module, act: ActSpec) -> nn.Module:
    """A copy of ``model`` whose ReLU-family activations are all replaced by ``act``.

    Modules of the types in :data:`SWAPPABLE` are replaced in place in the copy (weights,
    class and state-dict keys are kept). Functional calls in ``forward`` are rewritten
    with torch.fx; the result is then an ``fx.GraphModule`` (same parameters and keys).

    Args:
        model: any ``nn.Module``; not modified.
        act: a registered activation name (``"silu"``, ``"gelu"``, ``"softplus"``,
            ``"parametric_softplus"`` (alpha 10; ``"parametric_softplus:alpha=5"``),
            ``"elu"``, ``"smooth_relu"``, ...) or a zero-argument module factory.

    Raises:
        SwapError: the model cannot be traced and its ``forward`` calls functional
            activations (each call is named), or nothing was found to swap.

    Example:
        >>> smooth = swap_activations(create_model("small_cnn"), "silu")
    """
    make_activation(act)  # unknown names fail before any work
    swapped = copy.deepcopy(model)
    n_modules = _swap_modules(swapped, act)
    try:
        graph = _LeafTracer().trace(swapped)
    except Exception as exc:  # any tracing failure falls back to the scan
        calls = _functional_calls_in_source(swapped)
        if calls:
            raise SwapError(
                "torch.fx could not trace the model "
                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}), "
                "so these functional activation calls could not be swapped: "
                + "; ".join(calls)
                + ". Replace them with activation modules (nn.ReLU()) or make forward traceable"
            ) from exc
        if n_modules == 0:
            raise SwapError("the model holds no activation module to swap") from exc
        return swapped
    rewritten = 0
    for node in list(graph.nodes):
        functional = node.op == "call_function" and node.target in _FUNCTIONS
        method = node.op == "call_method" and node.target in _METHODS
        if not (functional or method):
            continue
        source = node.args[0] if node.args else node.kwargs.get("input")
        name = f"swapped_activation_{rewritten}"
        swapped.add_module(name, make_activation(act))
        with graph.inserting_after(node):
            new = graph.call_module(name, (source,))
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        rewritten += 1
    if rewritten == 0:
        if n_modules == 0:
            raise SwapError("the model holds no ReLU-family activation to swap")
        return swapped
    graph.lint()
    module = fx.GraphModule(swapped, graph, class_name=type(model).__name__ + "Swapped")
    module.train(model.training)
    return module


@contextlib.contextmanager
def smooth_gradients(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Within the block, :class:`SmoothGradReLU` modules back-propagate softplus gradients
    when ``enabled`` (ReLU's otherwise); the previous setting is restored afterwards."""
    modules = [m for m in model.modules() if isinstance(m, SmoothGradReLU)]
    before = [m.smooth for m in modules]
    for m in modules:
        m.smooth = enabled
    try:
        yield
    finally:
        for m, b in zip(modules, before):
            m.smooth = b


def count_activations(model: nn.Module) -> dict[str, int]:
    """Activation modules by class name (for checks and reports)."""
    counts: dict[str, int] = {}
    for m in model.modules():
        if isinstance(m, (*SWAPPABLE, nn.Tanh, nn.Sigmoid)):
            counts[type(m).__name__] = counts.get(type(m).__name__, 0) + 1
    return counts
