"""Certified L2 radii from Lipschitz bounds (Tsuzuku, Sato & Sugiyama, NeurIPS 2018).

If every logit difference ``z_y - z_i`` is L-Lipschitz in the input, no perturbation
shorter than ``(z_y - z_i) / L`` can make class ``i`` overtake ``y``. Two ways to bound
those constants:

- ``"lmt"``: with L the network's constant, ``z_y - z_i`` is ``sqrt(2) L``-Lipschitz
  (the vector (e_y - e_i) has norm sqrt(2)), so the radius is
  ``margin / (sqrt(2) L)``, margin = ``z_y - max_{i != y} z_i``.
- ``"last_layer"``: with ``L_sub`` the constant of the network before its last linear
  layer ``W``, ``z_y - z_i`` is ``L_sub ||w_y - w_i||``-Lipschitz; the radius is the
  minimum over ``i`` of ``(z_y - z_i) / (L_sub ||w_y - w_i||)``, never smaller than the
  first form's (``||w_y - w_i|| <= sqrt(2) ||W||``).

Misclassified points get radius 0. A radius is sound when the bounds are (see
:mod:`robustlab.certify.lipschitz` for what each method guarantees).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from robustlab.certify.lipschitz import (
    LipschitzError,
    LipschitzReport,
    _Tracer,
    lipschitz_bound,
)
from robustlab.data import ImageDataset
from robustlab.nn.adapt import OutputSpec, as_classifier, check_labels, check_logits, preserve_modes

KINDS = ("lmt", "last_layer")

#: what the constant each certificate divides by is the constant of, in words
SUBJECTS = {
    "lmt": "the whole network (input to logits)",
    "last_layer": "the network below its last linear layer (input to features)",
}
#: how each certificate turns that constant into a radius, in words
RULES = {
    "lmt": "radius = (z_y - max_i z_i) / (sqrt(2) L)",
    "last_layer": "radius = min_i (z_y - z_i) / (L ||w_y - w_i||), w: last-layer weights",
}


def _last_linear(model: nn.Module) -> tuple[nn.Module, nn.Linear]:
    """Split ``model`` into (everything before the final Linear, that Linear)."""
    gm = fx.GraphModule(model, _Tracer().trace(model))
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    if not (isinstance(out, fx.Node) and out.op == "call_module"):
        raise LipschitzError("the last-layer certificate needs a model ending in nn.Linear")
    last = gm.get_submodule(out.target)
    if not isinstance(last, nn.Linear):
        raise LipschitzError(
            f"the last-layer certificate needs a final nn.Linear, not {type(last).__name__}"
        )
    feature_node = out.args[0]
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in gm.graph.nodes:
        if node is out:
            break
        env[node] = graph.node_copy(node, lambda n: env[n])
        if node is feature_node:
            break
    graph.output(env[feature_node])
    return fx.GraphModule(gm, graph), last


@dataclass
class Certificate:
    """Per-sample certified radii and what they rest on."""

    radius: torch.Tensor  #: (B,) certified L2 radius (0 where misclassified)
    correct: torch.Tensor  #: (B,) bool
    kind: str  #: "lmt" or "last_layer"
    lipschitz: float  #: the constant used (L, or L_sub for last_layer)
    method: str = "fft"  #: how it was computed (``"supplied"``: a number the caller gave)
    guaranteed: bool = True  #: the constant is a proven upper bound, so each radius is too


def _bound_for(
    model: nn.Module, kind: str, input_shape: tuple[int, ...], method: str
) -> LipschitzReport:
    """The bound a certificate of ``kind`` divides by: the whole network's (``lmt``), or
    the network's below its last linear layer (``last_layer``)."""
    if kind == "lmt":
        report = lipschitz_bound(model, input_shape, method=method)
    else:
        with preserve_modes(model, training=False):
            features, _ = _last_linear(model)
        report = lipschitz_bound(features, input_shape, method=method)
    report.subject = SUBJECTS[kind]
    return report


def _provenance(bound: LipschitzReport | float) -> tuple[float, str, bool]:
    """(constant, method, guaranteed) of a precomputed bound; a bare number is taken on
    trust, so it is not counted as a guarantee."""
    if isinstance(bound, LipschitzReport):
        return bound.total, bound.method, bound.guaranteed
    return float(bound), "supplied", False


def certified_radius(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    bound: LipschitzReport | float | None = None,
    kind: str = "lmt",
    method: str = "fft",
    output: OutputSpec = None,
) -> Certificate:
    """Certified L2 radius of each input.

    Args:
        model: classifier on [0, 1] pixels (evaluated in eval mode).
        x, y: inputs (B, C, H, W) and labels (B,).
        bound: a precomputed :class:`LipschitzReport` or constant: the whole network's
            for ``kind="lmt"``, the network-before-the-last-linear-layer's for
            ``"last_layer"``; computed with ``method`` when omitted. A bare number is
            reported as ``method="supplied"``, not guaranteed.
        kind: ``"lmt"`` or ``"last_layer"``.
        method: bound method when computing (``fft``, ``exact``, ``lmt``: proven;
            ``power``: an estimate, and the radii with it).
        output: for a model whose forward returns a tuple, list or dict, where its logits
            are (an index, a key or a function; :func:`robustlab.nn.adapt.as_classifier`).

    Raises:
        OutputError: the model's output is not a (batch, classes) tensor (and ``output``
            does not select one).

    Example:
        >>> cert = certified_radius(model, x, y, kind="last_layer")
        >>> (cert.radius > 0.5).float().mean()   # certified accuracy at radius 0.5
    """
    if kind not in KINDS:
        raise LipschitzError(f"kind must be 'lmt' or 'last_layer', got {kind!r}")
    model = as_classifier(model, output)
    with preserve_modes(model, training=False):
        with torch.no_grad():
            logits = check_logits(model(x), len(x)).double()
        if bound is None:
            bound = _bound_for(model, kind, tuple(x.shape[1:]), method)
        lip, method, guaranteed = _provenance(bound)
        correct = logits.argmax(1) == y
        z_y = logits.gather(1, y[:, None])
        if kind == "lmt":
            margin = (z_y - logits.scatter(1, y[:, None], float("-inf"))).amin(1)
            radius = margin / (math.sqrt(2) * lip)
        else:
            _, last = _last_linear(model)
            w = last.weight.detach().double()
            gaps = z_y - logits  # (B, K): z_y - z_i
            norms = (w[y][:, None, :] - w[None, :, :]).norm(dim=2)  # (B, K): ||w_y - w_i||
            ratio = gaps / (lip * norms)
            ratio = ratio.scatter(1, y[:, None], float("inf"))
            radius = ratio.amin(1)
    radius = torch.where(correct, radius.clamp_min(0), torch.zeros_like(radius))
    return Certificate(radius.float(), correct, kind, lip, method, guaranteed)


@dataclass
class CertifyReport:
    """Certified accuracy at each radius and the median certified radius.

    ``guaranteed`` is false when the Lipschitz constant is an estimate (``method="power"``)
    or a number taken on trust (``"supplied"``): then the "certified" figures are
    estimates, and :meth:`table` and :meth:`to_dict` say so.
    """

    n: int
    clean_accuracy: float
    radii: list[float]
    certified_accuracy: list[float]
    median_radius: float
    kind: str
    lipschitz: float  #: the constant the radii divide by: of ``SUBJECTS[kind]``
    method: str
    point_radii: list[float] = field(default_factory=list, repr=False)  #: per point, 0 if wrong
    guaranteed: bool = True

    def accuracy_at(self, radius: float) -> float:
        """Certified accuracy at any radius > 0 (from the per-point radii; a point
        certified at radius r > 0 is correctly classified); the clean accuracy at 0."""
        if radius <= 0:
            return self.clean_accuracy
        return sum(r >= radius for r in self.point_radii) / max(1, self.n)

    def curve(self, points: int = 41) -> list[tuple[float, float]]:
        """(radius, certified accuracy) from 0 to the largest certified radius."""
        top = max(self.point_radii, default=0.0) or 1.0
        grid = [top * i / (points - 1) for i in range(points)]
        return [(r, self.accuracy_at(r)) for r in grid]

    @property
    def quantity(self) -> str:
        """What the accuracies are, in words: certified, or estimated."""
        if self.guaranteed:
            return "certified L2 accuracy"
        if self.method == "power":
            return "estimated certified L2 accuracy (power iteration: not a guarantee)"
        return (
            f"estimated certified L2 accuracy ({self.method} Lipschitz constant, "
            "not verified: not a guarantee)"
        )

    @property
    def lipschitz_meaning(self) -> str:
        """What ``lipschitz`` is the constant of, and how the radii use it."""
        what = "L2 Lipschitz bound" if self.guaranteed else "estimated L2 Lipschitz constant"
        return f"{what} of {SUBJECTS[self.kind]}; {RULES[self.kind]}"

    def table(self) -> str:
        lines = [
            f"{self.quantity} ({self.kind} certificate, {self.method}), {self.n} points",
            f"  clean accuracy {100 * self.clean_accuracy:.2f}%, median "
            f"{'certified' if self.guaranteed else 'estimated'} radius {self.median_radius:.4f}",
            f"  L = {self.lipschitz:.6g}: the {self.lipschitz_meaning}",
        ]
        lines += [
            f"  radius {r:<8g} {100 * a:6.2f}%" for r, a in zip(self.radii, self.certified_accuracy)
        ]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary with the provenance spelled out. When ``guaranteed`` is
        false the certificate figures are keyed ``estimated_...``, so that no reader takes
        them for proven ones."""
        key = (lambda name: name) if self.guaranteed else (lambda name: f"estimated_{name}")
        return {
            "quantity": self.quantity,
            "method": self.method,
            "guaranteed": self.guaranteed,
            "certificate": self.kind,
            "certificate_rule": RULES[self.kind],
            "lipschitz": {
                "value": self.lipschitz,
                "of": SUBJECTS[self.kind],
                "guaranteed": self.guaranteed,
            },
            "n": self.n,
            "clean_accuracy": self.clean_accuracy,
            "radii": list(self.radii),
            key("certified_accuracy"): list(self.certified_accuracy),
            key("median_radius"): self.median_radius,
            key("point_radii"): list(self.point_radii),
        }


def certify(
    model: nn.Module,
    data: ImageDataset,
    *,
    radii: Sequence[float] = (0.5, 1.0, 1.5),
    kind: str = "last_layer",
    method: str = "fft",
    n: int | None = None,
    batch_size: int = 500,
    bound: LipschitzReport | float | None = None,
    output: OutputSpec = None,
) -> CertifyReport:
    """Certified accuracy (correct and certified radius >= r) at each radius, and the
    median certified radius over all points (0 for misclassified ones).

    ``bound`` is a precomputed constant as in :func:`certified_radius` (the network's
    for ``kind="lmt"``, the features' for ``"last_layer"``); computed once when omitted.
    ``output`` selects the logits of a model returning a tuple or dict (an index, a key or
    a function), as in :func:`certified_radius`.

    Example:
        >>> print(certify(model, rl.load_dataset("mnist5k", "test"), radii=[0.5, 1.0]).table())
    """
    if kind not in KINDS:
        raise LipschitzError(f"kind must be 'lmt' or 'last_layer', got {kind!r}")
    radii = list(radii)
    if any(not math.isfinite(float(r)) or float(r) < 0 for r in radii):
        raise LipschitzError(f"radii must be finite and >= 0, got {radii}")
    if n is not None:
        data = data.subset(n)
    model = as_classifier(model, output)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    x_all, y_all = data.float_images(), data.y
    if bound is None:
        with preserve_modes(model, training=False), torch.no_grad():
            logits = check_logits(model(x_all[:1].to(device)), 1)  # before bounding
            check_labels(y_all, logits)
        bound = _bound_for(model, kind, tuple(x_all.shape[1:]), method)
    lip, method, guaranteed = _provenance(bound)
    radius, correct = [], []
    for i in range(0, len(data), batch_size):
        x, y = x_all[i : i + batch_size].to(device), y_all[i : i + batch_size].to(device)
        cert = certified_radius(model, x, y, bound=bound, kind=kind)
        radius.append(cert.radius.cpu())
        correct.append(cert.correct.cpu())
    r, c = torch.cat(radius), torch.cat(correct)
    return CertifyReport(
        n=len(data),
        clean_accuracy=float(c.float().mean()),
        radii=[float(v) for v in radii],
        certified_accuracy=[float((c & (r >= v)).float().mean()) for v in radii],
        median_radius=float(statistics.median(r.tolist())),
        kind=kind,
        lipschitz=float(lip),
        method=method,
        point_radii=r.tolist(),  # 0 where misclassified (certified_radius)
        guaranteed=guaranteed,
    )
