"""Replace the activations of any model (Smooth Adversarial Training's surgery).

:func:`swap_activations` replaces ReLU-family activation *modules* and, through
torch.fx, *functional* calls (``F.relu(x)``, ``torch.relu(x)``, ``x.relu()``) in a
model's ``forward``. A swap never silently leaves a ReLU behind: given an ``example``
input, the swapped model is run once while every activation op that executes is
recorded, and a ReLU-family op running outside the newly inserted activation modules
is a :class:`SwapError` naming its call site. A model torch.fx cannot trace is swapped
only with an ``example`` to verify it by; without one it is refused.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import os
import traceback
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.overrides import TorchFunctionMode

from robustlab.errors import RobustlabError
from robustlab.nn.activations import (
    ActSpec,
    MaxMin,
    ParametricSoftplus,
    SmoothGradReLU,
    SmoothReLU,
    make_activation,
)
from robustlab.nn.adapt import preserve_modes

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
#: ReLUs inside fused recurrent kernels: seen when they run, never swappable
_FUSED = {torch.rnn_relu, torch.rnn_relu_cell}


def _op_names() -> dict[Any, str]:
    ops = _FUNCTIONS | _FUSED
    names: dict[Any, str] = {}
    for prefix, owner in (("F", F), ("torch", torch)):
        for attr in sorted({getattr(f, "__name__", "") for f in ops}):
            obj = getattr(owner, attr, None)
            if any(obj is f for f in ops):
                names.setdefault(obj, f"{prefix}.{attr}")
    for method in sorted(_METHODS):
        names[getattr(torch.Tensor, method)] = f"Tensor.{method}"
    assert all(f in names for f in ops), "an activation op without a display name"
    return names


#: every ReLU-family op the verification run watches for, with its display name
_WATCHED: dict[Any, str] = _op_names()
_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_SITE_DIR = os.path.dirname(os.path.dirname(torch.__file__))
_THIS_FILE = os.path.abspath(__file__)


class SwapError(RobustlabError, ValueError):
    """Activations of a model could not all be swapped."""


class _LeafTracer(fx.Tracer):
    """Keeps activation modules (including robustlab's) as single graph nodes."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, SWAPPABLE) or super().is_leaf_module(m, qualname)


def _swap_modules(model: nn.Module, act: ActSpec, inserted: list[nn.Module]) -> None:
    """Replace activation modules, and activation *functions* held as attributes (such as
    ``nn.TransformerEncoderLayer``'s ``activation=F.relu``), by new ``act`` modules."""
    for _parent_name, parent in list(model.named_modules()):
        replaced: set[str] = set()
        for name, child in list(parent.named_children()):
            if isinstance(child, SWAPPABLE):
                replaced.add(name)
        for name, value in list(vars(parent).items()):
            if not name.startswith("_") and any(value is f for f in _FUNCTIONS):
                replaced.add(name)
        for name in sorted(replaced):
            new = make_activation(act)
            # a child keeps its place; a function attribute becomes a registered child
            setattr(parent, name, new)
            inserted.append(new)
        if "activation" in replaced and hasattr(parent, "activation_relu_or_gelu"):
            # nn.Transformer*Layer's fast path (eval, no grad) would run a fused ReLU/GELU
            parent.activation_relu_or_gelu = 0


def _fused_relus(model: nn.Module) -> list[str]:
    """Recurrent modules whose fused kernel applies a ReLU (nothing can swap it)."""
    return [
        f"{name or 'model'} ({type(m).__name__}, nonlinearity='relu')"
        for name, m in model.named_modules()
        if isinstance(m, (nn.RNNBase, nn.RNNCellBase))
        and getattr(m, "nonlinearity", None) == "relu"
    ]


def _call_site() -> str:
    """``file:line: code`` of the innermost frame outside torch (and outside this module),
    plus the innermost torch frame below it when the op was called from within torch."""
    frames = traceback.extract_stack()[:-2]
    inside_torch = None
    for frame in reversed(frames):
        path = os.path.abspath(frame.filename) if not frame.filename.startswith("<") else ""
        if path == _THIS_FILE:
            continue
        if path.startswith(_TORCH_DIR):
            if inside_torch is None and "overrides.py" not in path:
                inside_torch = frame
            continue
        site = f"{frame.filename}:{frame.lineno}: {(frame.line or '').strip()}"
        if inside_torch is not None and not inside_torch.filename.endswith("functional.py"):
            rel = os.path.relpath(inside_torch.filename, _SITE_DIR)
            site += f" (inside {rel}:{inside_torch.lineno})"
        return site
    return "<unknown call site>"


class _ActivationRecorder(TorchFunctionMode):
    """Records every watched op that runs outside the inserted activation modules."""

    def __init__(self, stack: list[tuple[str, nn.Module]], inserted: set[int]) -> None:
        super().__init__()
        self.stack, self.inserted = stack, inserted
        self.sites: dict[str, None] = {}  # ordered set

    def __torch_function__(self, func, types, args=(), kwargs=None):
        try:
            name = _WATCHED.get(func)
        except TypeError:  # an unhashable callable is not one of ours
            name = None
        if name is not None and not any(id(m) in self.inserted for _, m in self.stack):
            where = ""
            if self.stack:
                qualname, module = self.stack[-1]
                where = (
                    f", in module {qualname!r} ({type(module).__name__})"
                    if qualname
                    else f", in the model itself ({type(module).__name__})"
                )
            self.sites[f"{name} at {_call_site()}{where}"] = None
        return func(*args, **(kwargs or {}))


def _verify(model: nn.Module, example: torch.Tensor, inserted: list[nn.Module]) -> None:
    """Run ``model`` once on ``example`` (eval mode, no grad, state restored afterwards) and
    refuse if a ReLU-family op ran outside the ``inserted`` activation modules."""
    param = next(iter(model.parameters()), None)
    if param is None:
        param = next(iter(model.buffers()), None)
    if param is not None:
        example = example.to(param.device)
    stack: list[tuple[str, nn.Module]] = []
    handles = []
    for qualname, module in model.named_modules():

        def enter(_m, _args, entry=(qualname, module)):
            stack.append(entry)

        def leave(_m, _args, _out):
            stack.pop()

        handles.append(module.register_forward_pre_hook(enter))
        handles.append(module.register_forward_hook(leave, always_call=True))
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    recorder = _ActivationRecorder(stack, {id(m) for m in inserted})
    try:
        with preserve_modes(model, training=False), torch.no_grad(), recorder:
            model(example)
    except Exception as err:
        raise SwapError(
            f"the swapped model could not be run on the example input of shape "
            f"{tuple(example.shape)} to verify the swap ({type(err).__name__}: {err})"
        ) from err
    finally:
        for h in handles:
            h.remove()
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
    if recorder.sites:
        raise SwapError(
            "these ReLU-family activations still run after the swap and could not be "
            "replaced: "
            + "; ".join(recorder.sites)
            + ". Hold activations as modules (nn.ReLU()) or make forward traceable by torch.fx"
        )


def swap_activations(
    model: nn.Module, act: ActSpec, *, example: torch.Tensor | None = None
) -> nn.Module:
    """A copy of ``model`` whose ReLU-family activations are all replaced by ``act``.

    Modules of the types in :data:`SWAPPABLE` are replaced in place in the copy (weights,
    class and state-dict keys are kept). Functional calls in ``forward`` are rewritten
    with torch.fx; the result is then an ``fx.GraphModule`` (same parameters and keys).

    With ``example``, the swap is verified by execution: the swapped model runs once on it
    (eval mode, no gradients, buffers restored) while every ReLU-family op that executes
    is recorded, and one running outside the new activation modules is refused. This also
    sees what torch.fx cannot (code inside ``torch.nn`` modules, untraceable forwards);
    it sees only the code paths that run in eval mode on that input.

    Args:
        model: any ``nn.Module``; not modified.
        act: a registered activation name (``"silu"``, ``"gelu"``, ``"softplus"``,
            ``"parametric_softplus"`` (alpha 10; ``"parametric_softplus:alpha=5"``),
            ``"elu"``, ``"smooth_relu"``, ...) or a zero-argument module factory.
        example: an input batch the model accepts; required when torch.fx cannot trace
            the model.

    Raises:
        SwapError: a ReLU-family op still runs after the swap (each call site is named),
            the model cannot be traced and no ``example`` was given, or nothing was found
            to swap.

    Example:
        >>> smooth = swap_activations(create_model("small_cnn"), "silu")
    """
    make_activation(act)  # unknown names fail before any work
    swapped = copy.deepcopy(model)
    inserted: list[nn.Module] = []
    _swap_modules(swapped, act, inserted)
    fused = _fused_relus(swapped)
    if fused:
        raise SwapError(
            "these modules apply ReLU inside a fused kernel that cannot be swapped: "
            + "; ".join(fused)
        )
    try:
        graph = _LeafTracer().trace(swapped)
    except Exception as exc:
        if example is None:
            reason = str(exc).splitlines()[0] if str(exc) else ""
            raise SwapError(
                f"torch.fx could not trace {type(model).__name__} ({type(exc).__name__}: "
                f"{reason}), so its functional activations cannot be found by reading the "
                "graph; pass example= (an input batch) so the swap can be verified by "
                "running the model"
            ) from exc
        _verify(swapped, example, inserted)
        if not inserted:
            raise SwapError("the model holds no ReLU-family activation to swap") from exc
        return swapped
    rewritten = _rewrite_functional(swapped, graph, act, inserted)
    _check_outputs_used(swapped, graph, inserted)
    if rewritten:
        graph.lint()
        result = fx.GraphModule(swapped, graph, class_name=type(model).__name__ + "Swapped")
        result.train(model.training)
    else:
        result = swapped
    if example is not None:
        _verify(result, example, inserted)
    if not inserted:
        raise SwapError("the model holds no ReLU-family activation to swap")
    return result


def _in_place(node: fx.Node) -> bool:
    """Whether a functional activation node mutates its input (``relu_``, ``inplace=True``)."""
    if node.op == "call_method":
        return str(node.target).endswith("_")
    if getattr(node.target, "__name__", "").endswith("_"):
        return True
    try:
        bound = inspect.signature(node.target).bind(*node.args, **node.kwargs)
    except (TypeError, ValueError):  # builtins without a signature take no inplace flag
        return False
    return bound.arguments.get("inplace") is True


def _rewrite_functional(
    root: nn.Module, graph: fx.Graph, act: ActSpec, inserted: list[nn.Module]
) -> int:
    """Replace functional activation nodes by calls to new ``act`` modules of ``root``.

    An in-place call (``torch.relu_(h)``, whose result the code may ignore and go on
    using ``h``) becomes ``h.copy_(act(h.clone()))``, so later uses of ``h`` see it too.
    """
    rewritten = 0
    for node in list(graph.nodes):
        functional = node.op == "call_function" and node.target in _FUNCTIONS
        method = node.op == "call_method" and node.target in _METHODS
        if not (functional or method):
            continue
        source = node.args[0] if node.args else node.kwargs.get("input")
        name = f"swapped_activation_{rewritten}"
        new = make_activation(act)
        root.add_module(name, new)
        inserted.append(new)
        with graph.inserting_before(node):  # successive inserts keep their order
            if _in_place(node):
                copy_in = graph.call_method("clone", (source,))
                out = graph.call_module(name, (copy_in,))
                replacement = graph.call_method("copy_", (source, out))
            else:
                replacement = graph.call_module(name, (source,))
        node.replace_all_uses_with(replacement)
        graph.erase_node(node)
        rewritten += 1
    return rewritten


def _check_outputs_used(root: nn.Module, graph: fx.Graph, inserted: list[nn.Module]) -> None:
    """Refuse a new activation module whose output the model discards: the code relied
    on the old module acting in place (``self.relu(h); return h`` with ``inplace=True``)."""
    new = {id(m) for m in inserted}
    unused = [
        str(node.target)
        for node in graph.nodes
        if node.op == "call_module"
        and id(root.get_submodule(str(node.target))) in new
        and not node.users
    ]
    if unused:
        raise SwapError(
            f"the model discards the output of activation module(s) {', '.join(unused)} "
            "and relies on them acting in place, which the new activation does not; "
            "use their output (h = self.relu(h))"
        )


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
