"""A differentiable Lipschitz bound for training (Lipschitz-Margin Training).

:class:`LipschitzTracker` re-uses :func:`~robustlab.certify.lipschitz.lipschitz_bound`'s
walk of the torch.fx graph for the structure (composition, residual sums,
concatenation) and the weight-free factors (activations, pooling, normalisation), and
recomputes the weighted layers differentiably each step: one power-iteration step per
call on a persistent vector ``u`` per layer (no gradient through ``u``), and the bound
``||A u||`` with gradient through the weights (Tsuzuku, Sato & Sugiyama, NeurIPS 2018).
Batch norm enters as ``max |gamma| / sqrt(running_var + eps)`` (gradient through gamma).
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from robustlab.certify.lipschitz import LipschitzError, _Tracer, lipschitz_bound, propagate_shapes

_SUMS = {operator.add, torch.add, operator.sub, torch.sub}


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
        graph = _Tracer().trace(model)
        gm = fx.GraphModule(model, graph)
        modes = {m: m.training for m in model.modules()}
        model.eval()
        try:
            device = next((p.device for p in model.parameters()), torch.device("cpu"))
            propagate_shapes(gm, torch.zeros(shape, device=device))
            report = lipschitz_bound(model, shape, method="lmt", fold_bn=False)
        finally:
            for m, mode in modes.items():
                m.training = mode
        self._factors = {layer.node: layer.bound for layer in report.layers}
        self._tensor_nodes = set(report.node_bounds)
        modules = dict(gm.named_modules())
        nodes = list(gm.graph.nodes)
        out = next(n for n in nodes if n.op == "output").args[0]
        last: nn.Linear | None = None
        if upto == "features":
            if not (out.op == "call_module" and isinstance(modules[out.target], nn.Linear)):
                raise LipschitzError("the last-layer bound needs a model ending in nn.Linear")
            last = modules[out.target]
            out = out.args[0]
        elif upto != "output":
            raise LipschitzError(f"upto must be 'output' or 'features', got {upto!r}")
        self._nodes = nodes[: nodes.index(out) + 1]
        # plain containers: the network's modules must not become this module's children
        self._layers_by_name = {"modules": modules, "last": last}
        self._vectors: dict[str, str] = {}
        for node in self._nodes:
            weighted = node.op == "call_module" and isinstance(
                modules[node.target], (nn.Linear, nn.Conv2d)
            )
            if weighted:
                in_shape = node.args[0].meta["shape"]
                u = torch.randn((1, *in_shape[1:]), generator=torch.Generator().manual_seed(0))
                name = f"u_{node.name}"
                self.register_buffer(name, (u / u.norm()).to(device))
                self._vectors[node.name] = name

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

    def forward(self) -> torch.Tensor:
        bound: dict[str, torch.Tensor] = {}
        result = None
        for node in self._nodes:
            if node.op == "placeholder":
                bound[node.name] = torch.ones(())
                continue
            if node.name not in self._tensor_nodes:
                continue
            args = [a for a in node.args if isinstance(a, fx.Node) and a.name in bound]
            if node.op == "call_function" and node.target in _SUMS:
                bound[node.name] = sum(bound[a.name] for a in args)
            elif node.op == "call_function" and node.target is torch.cat:
                parts = [bound[a.name] for a in node.args[0] if a.name in bound]
                bound[node.name] = torch.sqrt(sum(p * p for p in parts))
            else:
                src = bound[args[0].name]
                m = self._by_name(node.target) if node.op == "call_module" else None
                if isinstance(m, (nn.Linear, nn.Conv2d)):
                    bound[node.name] = src * self._layer(node, m)
                elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                    scale = 1.0 / torch.sqrt(m.running_var.detach() + m.eps)
                    if m.weight is not None:
                        scale = scale * m.weight
                    bound[node.name] = src * scale.abs().max()
                else:
                    bound[node.name] = src * self._factors.get(node.name, 1.0)
            result = bound[node.name]
        assert result is not None
        return result
