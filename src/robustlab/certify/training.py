"""A differentiable Lipschitz bound for training (Lipschitz-Margin Training).

:class:`LipschitzTracker` walks the same torch.fx graph with the same rules as
:func:`~robustlab.certify.lipschitz.lipschitz_bound` (:func:`~robustlab.certify.lipschitz.
propagate`: composition, residual sums, concatenation; the weight-free factors of
activations, pooling and normalisation) and recomputes the weighted layers
differentiably each step: one power-iteration step per call on a persistent vector ``u``
per layer (no gradient through ``u``), and the bound ``||A u||`` with gradient through the
weights (Tsuzuku, Sato & Sugiyama, NeurIPS 2018). Batch norm enters as
``max |gamma| / sqrt(running_var + eps)`` (gradient through gamma).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from robustlab.certify.lipschitz import (
    LipschitzError,
    Step,
    _bn_scale,
    _listed_factor,
    _trace,
    _Walk,
    propagate,
)
from robustlab.nn.adapt import preserve_modes


class LipschitzTracker(nn.Module):
    """Differentiable estimate of a network's L2 Lipschitz bound, one power step per call.

    Args:
        model: the network (traced once; its weights are read at every call).
        input_shape: one input's shape, e.g. ``(1, 28, 28)``.
        upto: ``"output"`` for the whole network, ``"features"`` for the network
            before its final ``nn.Linear`` (the last-layer LMT variant).

    The power-iteration vectors are buffers (they travel with checkpoints).
    """

    def __init__(self, model: nn.Module, input_shape: tuple[int, ...], upto: str = "output"):
        super().__init__()
        shape = (1, *input_shape) if len(input_shape) in (1, 3) else tuple(input_shape)
        with preserve_modes(model, training=False):
            gm = _trace(model, shape)
            # the weight-free factors now; the weighted ones at every call
            walk = _Walk(gm, method="lmt", fold_bn=False, weighted=False)
            steps, out = walk.steps()
        modules = walk.modules
        last: nn.Linear | None = None
        if upto == "features":
            if not (out.op == "call_module" and isinstance(modules[out.target], nn.Linear)):
                raise LipschitzError("the last-layer bound needs a model ending in nn.Linear")
            last = modules[out.target]
            out = out.args[0]
        elif upto != "output":
            raise LipschitzError(f"upto must be 'output' or 'features', got {upto!r}")
        nodes = [step.node for step in steps]
        self._steps: list[Step] = steps[: nodes.index(out) + 1]
        self._out = out.name
        # plain containers: the network's modules must not become this module's children
        self._layers_by_name = {"modules": modules, "last": last}
        self._vectors: dict[str, str] = {}
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        for step in self._steps:
            if step.node.op == "call_module" and isinstance(
                modules[step.node.target], (nn.Linear, nn.Conv2d)
            ):
                in_shape = step.node.args[0].meta["shape"]
                u = torch.randn((1, *in_shape[1:]), generator=torch.Generator().manual_seed(0))
                name = f"u_{step.node.name}"
                self.register_buffer(name, (u / u.norm()).to(device))
                self._vectors[step.node.name] = name

    @property
    def last(self) -> nn.Linear | None:
        """The final linear layer left out (``upto="features"``), else None."""
        return self._layers_by_name["last"]

    def _by_name(self, target: str) -> nn.Module:
        return self._layers_by_name["modules"][target]

    def _layer(self, node: fx.Node, m: nn.Module) -> torch.Tensor:
        u = getattr(self, self._vectors[node.name])
        if isinstance(m, nn.Linear):
            apply = lambda v, w: F.linear(v, w)  # noqa: E731
        else:
            kw = dict(stride=m.stride, padding=m.padding, dilation=m.dilation, groups=m.groups)
            apply = lambda v, w: F.conv2d(v, w, **kw)  # noqa: E731
        with torch.no_grad():  # one power-iteration step: u <- A^T A u / ||A^T A u||
            w = m.weight.detach()
            x = u.clone().requires_grad_(True)
            with torch.enable_grad():
                out = apply(x, w)
                (g,) = torch.autograd.grad(out, x, out)
            u.copy_(g / (g.norm() + 1e-12))
        return apply(u, m.weight).norm()  # differentiable in the weights

    def _factor(self, step: Step) -> Any:
        """The weighted rules' factors, differentiably; the others' as the walk found them."""
        if not step.rule.weighted:  # type: ignore[union-attr]
            return _listed_factor(step)
        m = self._by_name(step.node.target)
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            return _bn_scale(m, differentiable=True).abs().max()
        return self._layer(step.node, m)

    def forward(self) -> torch.Tensor:
        bound = propagate(self._steps, self._factor, one=torch.ones(()))
        return bound[self._out]
