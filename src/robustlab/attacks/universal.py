"""Universal adversarial perturbations (Moosavi-Dezfooli, Fawzi, Fawzi & Frossard, CVPR 2017)."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from robustlab.attacks.base import AttackError, _view, lp_norm
from robustlab.attacks.deepfool import DeepFool
from robustlab.data.base import ImageDataset, to_float
from robustlab.nn.adapt import preserve_modes

log = logging.getLogger(__name__)


def _project_ball(v: torch.Tensor, xi: float, norm: str) -> torch.Tensor:
    if norm == "linf":
        return v.clamp(-xi, xi)
    n = lp_norm(v, "l2")
    return v * _view(torch.clamp(xi / (n + 1e-12), max=1.0), v)


class UniversalPerturbation:
    """One image-agnostic perturbation ``v`` with ``||v|| <= xi`` that fools most inputs.

    The algorithm of the paper: start at ``v = 0``; pass over the data; for each image
    whose predicted label ``v`` does not yet change, add the DeepFool step that sends
    ``x + v`` across the nearest boundary and project ``v`` back onto the xi-ball; stop
    once the fooling rate on the data reaches ``1 - delta`` (or after ``max_passes``).

    Images are processed in mini-batches of ``batch_size``: the DeepFool steps of one
    batch are computed from the same ``v`` and then added one after another, each
    followed by the projection. ``batch_size=1`` is the paper's strictly sequential loop.

    Defaults follow the paper: delta 0.2, xi 10/255 (L-inf), DeepFool with 10 candidate
    classes, overshoot 0.02 and 10 iterations.

    Args:
        model: classifier on [0, 1] pixels returning logits.
        xi: radius of the perturbation's ball, pixel units.
        norm: ``"linf"`` or ``"l2"``.
        delta: target fooling rate ``1 - delta``.
        max_passes: passes over the data at most.
        deepfool_steps: DeepFool iterations per image.
        overshoot: DeepFool overshoot.
        candidates: DeepFool candidate classes.
        batch_size: images per DeepFool batch.
        seed: seed of the order in which images are visited.

    Example:
        >>> uap = UniversalPerturbation(model, xi=0.2).fit(train)
        >>> uap.fooling_rate(test), uap.save("uap.safetensors")
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        xi: float = 10 / 255,
        norm: str = "linf",
        delta: float = 0.2,
        max_passes: int = 10,
        deepfool_steps: int = 10,
        overshoot: float = 0.02,
        candidates: int = 10,
        batch_size: int = 32,
        seed: int = 0,
    ) -> None:
        if not math.isfinite(xi) or xi < 0 or not 0 <= delta < 1:
            raise AttackError(f"need a finite xi >= 0 and 0 <= delta < 1, got {xi}, {delta}")
        self.model, self.xi, self.norm, self.delta = model, float(xi), norm, delta
        self.max_passes, self.batch_size, self.seed = max_passes, batch_size, seed
        self.deepfool = DeepFool(
            model, norm=norm, steps=deepfool_steps, overshoot=overshoot, candidates=candidates
        )
        self.perturbation: torch.Tensor | None = None
        self.history: list[float] = []

    def _device(self) -> torch.device:
        p = next(self.model.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    @torch.no_grad()
    def _predict(self, x: torch.Tensor) -> torch.Tensor:
        with preserve_modes(self.model, training=False):
            return torch.cat([self.model(x[i : i + 512]).argmax(1) for i in range(0, len(x), 512)])

    def fit(
        self, data: ImageDataset | torch.Tensor, progress: bool | None = None
    ) -> UniversalPerturbation:
        """Compute the perturbation on ``data`` (images; labels are not used)."""
        x_all = to_float(data.x if isinstance(data, ImageDataset) else data).to(self._device())
        v = torch.zeros_like(x_all[:1])
        clean_pred = self._predict(x_all)
        g = torch.Generator().manual_seed(self.seed)
        self.history = []
        for _ in tqdm(
            range(self.max_passes),
            desc="uap passes",
            disable=None if progress is None else not progress,
        ):
            order = torch.randperm(len(x_all), generator=g).to(x_all.device)
            for start in range(0, len(order), self.batch_size):
                idx = order[start : start + self.batch_size]
                xb = (x_all[idx] + v).clamp(0.0, 1.0)
                still = self._predict(xb) == clean_pred[idx]
                if not still.any():
                    continue
                xs = xb[still]
                steps = self.deepfool(xs, clean_pred[idx][still]) - xs
                for step in steps:
                    v = _project_ball(v + step[None], self.xi, self.norm)
            rate = self._rate(x_all, clean_pred, v)
            self.history.append(rate)
            log.info(
                "universal perturbation: fooling rate %.3f after pass %d", rate, len(self.history)
            )
            if rate >= 1 - self.delta:
                break
        self.perturbation = v.detach()
        return self

    def _rate(self, x: torch.Tensor, clean_pred: torch.Tensor, v: torch.Tensor) -> float:
        return float((self._predict((x + v).clamp(0.0, 1.0)) != clean_pred).float().mean())

    def _require(self) -> torch.Tensor:
        if self.perturbation is None:
            raise AttackError("no perturbation yet: call fit() or load() first")
        return self.perturbation

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``x + v`` clipped to [0, 1]."""
        return (x + self._require().to(x.device, x.dtype)).clamp(0.0, 1.0)

    def fooling_rate(self, data: ImageDataset | torch.Tensor) -> float:
        """Fraction of images whose predicted label ``v`` changes (held-out data)."""
        x = to_float(data.x if isinstance(data, ImageDataset) else data).to(self._device())
        return self._rate(x, self._predict(x), self._require().to(x.device))

    def save(self, path: str | Path) -> None:
        """Write the perturbation and its settings to a safetensors file."""
        from robustlab.io import save_tensors

        meta: dict[str, Any] = {"xi": self.xi, "norm": self.norm, "history": self.history}
        save_tensors(path, {"perturbation": self._require()}, meta)

    @classmethod
    def load(cls, path: str | Path, model: nn.Module) -> UniversalPerturbation:
        """Read a perturbation written by :meth:`save`."""
        from robustlab.io import load_tensors

        tensors, meta = load_tensors(path)
        if "perturbation" not in tensors or not isinstance(meta, dict):
            raise AttackError(f"{path} holds no universal perturbation")
        uap = cls(model, xi=meta["xi"], norm=meta["norm"])
        uap.perturbation, uap.history = tensors["perturbation"], list(meta.get("history", []))
        return uap
