"""Feature-squeezing detection of adversarial examples (Xu, Evans & Qi, NDSS 2018).

A model's prediction on an input and on squeezed versions of it (bit-depth reduction,
median smoothing) agree on natural images and disagree on many adversarial ones. The
score is the largest L1 distance between the softmax outputs; an input scoring above a
threshold fitted on clean data (Xu et al.: 5% false positives) is flagged.

Not a :class:`~robustlab.defenses.base.Defense`: it does not change inputs, it labels them.
An adaptive attacker who knows the detector can evade it (He et al. 2017 broke an ensemble
of such detectors), so report its numbers beside an attack that targets it:
:class:`DetectionPipeline` joins classifier and detector into one model with a "rejected"
output (Carlini & Wagner 2017's construction for attacking detectors), and
:class:`DetectorEvasion` is PGD on it, succeeding only where the classifier is fooled and
the detector stays silent. :func:`robustlab.evaluate.evaluate_detector` runs both the
naive and this adaptive attack and reports the ROC and the whole pipeline's accuracy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from robustlab.attacks.pgd import PGD
from robustlab.defenses.base import Defense, check_pixels, create_defense
from robustlab.errors import ConfigError
from robustlab.nn.adapt import OutputSpec, check_logits, preserve_modes, select_output


class ROC(NamedTuple):
    """A receiver operating characteristic, adversarial examples as the positive class."""

    fpr: np.ndarray  #: false-positive rate at each threshold, increasing from 0 to 1
    tpr: np.ndarray  #: true-positive rate (detection rate) at each threshold
    thresholds: np.ndarray  #: score >= threshold is flagged; the first is +inf (nothing)
    auc: float  #: area under the curve (trapezoidal)


def roc_curve(negatives: np.ndarray, positives: np.ndarray) -> ROC:
    """ROC of a score that should be higher on ``positives``, at every distinct score.

    Flagging ``score >= t`` for each distinct score ``t`` (decreasing), plus ``t = +inf``
    first; tied scores move together, so a tie draws a diagonal segment. The same points
    as ``sklearn.metrics.roc_curve(..., drop_intermediate=False)`` (tested).

    Args:
        negatives: scores of clean examples, shape (N,).
        positives: scores of adversarial examples, shape (P,).
    """
    neg = np.asarray(negatives, dtype=np.float64).ravel()
    pos = np.asarray(positives, dtype=np.float64).ravel()
    if neg.size == 0 or pos.size == 0:
        raise ConfigError("roc: needs at least one clean and one adversarial score")
    if not (np.isfinite(neg).all() and np.isfinite(pos).all()):
        raise ConfigError("roc: scores must be finite")
    scores = np.concatenate([neg, pos])
    labels = np.concatenate([np.zeros(neg.size), np.ones(pos.size)])
    order = np.argsort(-scores, kind="stable")
    scores, labels = scores[order], labels[order]
    last = np.flatnonzero(np.diff(scores) != 0)  # the last index of each run of equal scores
    last = np.append(last, scores.size - 1)
    tp = np.cumsum(labels)[last]
    fp = (last + 1) - tp
    tpr = np.concatenate([[0.0], tp / pos.size])
    fpr = np.concatenate([[0.0], fp / neg.size])
    thresholds = np.concatenate([[np.inf], scores[last]])
    auc = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
    return ROC(fpr, tpr, thresholds, auc)


class SqueezeDetector:
    """Xu et al.'s detector: ``score(x) = max_s || softmax(f(x)) - softmax(f(s(x))) ||_1``.

    Args:
        model: the classifier (pixels in [0, 1] to logits). It runs in eval mode during
            scoring; every submodule's mode is put back afterwards.
        squeezers: defenses (specs such as ``"bitdepth:bits=1"``, ``"median:size=2"``, or
            :class:`~robustlab.defenses.base.Defense` modules) whose outputs the model
            can take. Xu et al. use bit depth 1 and median 2x2 on MNIST.
        output: where the logits are in the model's output (an index, key or function).
        batch_size: examples per forward pass when scoring.

    Shapes: ``score`` (B, C, H, W) -> (B,); ``detect`` -> bool (B,).

    Example:
        >>> detector = SqueezeDetector(model, ["bitdepth:bits=1", "median:size=2"])
        >>> detector.fit(x_clean_heldout, fpr=0.05)
        >>> flagged = detector.detect(x_adv)                     # bool (B,)
        >>> detector.roc(x_clean, x_adv).auc
    """

    def __init__(
        self,
        model: nn.Module,
        squeezers: Sequence[str | Defense],
        *,
        output: OutputSpec = None,
        batch_size: int = 256,
    ) -> None:
        if isinstance(squeezers, (str, Defense)) or len(squeezers) == 0:
            raise ConfigError("SqueezeDetector: squeezers must be a non-empty list of defenses")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"SqueezeDetector: batch_size must be >= 1, got {batch_size!r}")
        self.model = model
        self.squeezers = [create_defense(s) for s in squeezers]
        self.output = output
        self.batch_size = batch_size
        self.threshold: float | None = None  #: set by :meth:`fit`
        self.fpr: float | None = None  #: the false-positive rate asked of :meth:`fit`

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return check_logits(select_output(self.model(x), self.output), x.shape[0])

    def logits_and_score(
        self, x: torch.Tensor, squeezers: Sequence[Defense] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's logits (B, K) on ``x`` and the score (B,), differentiable (a
        non-differentiable squeezer gives its BPDA surrogate's gradient inside
        :func:`~robustlab.defenses.bpda_mode`). No batching, no mode changes: the building
        block of :meth:`score` and of :class:`DetectionPipeline`."""
        logits = self._logits(x)
        p = torch.softmax(logits.float(), dim=1)
        dist = [
            (p - torch.softmax(self._logits(s(x)).float(), dim=1)).abs().sum(1)
            for s in (self.squeezers if squeezers is None else squeezers)
        ]
        return logits, torch.stack(dist).amax(0)

    @torch.no_grad()
    def score(self, x: torch.Tensor) -> torch.Tensor:
        """Per-example score: the largest L1 distance between the softmax of the model on
        ``x`` and on a squeezed ``x``; shape (B,), float32, on ``x``'s device."""
        check_pixels(x, "SqueezeDetector")
        if x.shape[0] == 0:
            return torch.zeros(0, device=x.device)
        with preserve_modes(self.model, training=False):
            return torch.cat([self.logits_and_score(c)[1] for c in x.split(self.batch_size)])

    def fit(self, x_clean: torch.Tensor, fpr: float = 0.05) -> SqueezeDetector:
        """Set the threshold so that a fraction ``fpr`` of ``x_clean`` is flagged.

        The threshold is the ``k``-th smallest clean score, ``k = ceil((1 - fpr) * n)``;
        :meth:`detect` flags scores strictly above it, so on ``x_clean`` (without ties) it
        flags exactly ``floor(fpr * n)`` examples: the rate is at most ``fpr`` and within
        ``1/n`` of it. Fit on held-out clean data, not on the data you evaluate.
        """
        if isinstance(fpr, bool) or not isinstance(fpr, (int, float)) or not 0 < fpr < 1:
            raise ConfigError(f"SqueezeDetector.fit: fpr must be in (0, 1), got {fpr!r}")
        scores = self.score(x_clean).sort().values
        n = scores.numel()
        if n == 0:
            raise ConfigError("SqueezeDetector.fit: needs at least one clean example")
        k = max(1, math.ceil(round((1 - fpr) * n, 9)))  # round: 0.95 * 100 is 95.00000000000001
        self.threshold = float(scores[k - 1])
        self.fpr = float(fpr)
        return self

    def detect(self, x: torch.Tensor) -> torch.Tensor:
        """bool (B,): True where ``score(x)`` exceeds the fitted threshold (adversarial)."""
        if self.threshold is None:
            raise ConfigError("SqueezeDetector: call fit(x_clean, fpr) before detect()")
        return self.score(x) > self.threshold

    def roc(self, x_clean: torch.Tensor, x_adv: torch.Tensor) -> ROC:
        """ROC and AUC of the score separating ``x_adv`` (positive) from ``x_clean``."""
        return roc_curve(self.score(x_clean).cpu().numpy(), self.score(x_adv).cpu().numpy())

    def __repr__(self) -> str:
        specs = ", ".join(s.spec() for s in self.squeezers)
        return f"SqueezeDetector(squeezers=[{specs}], threshold={self.threshold})"


class DetectionPipeline(nn.Module):
    """Classifier and fitted detector as one model with ``K + 1`` outputs, for attacks.

    Outputs the classifier's logits ``z`` (B, K) and a last "rejected" logit
    ``r = max_j z_j + weight * (score(x) - threshold)``, so ``r`` is the largest exactly
    when the detector flags ``x`` (Carlini & Wagner 2017, "Adversarial examples are not
    easily detected", build the same kind of joint model). Gradients flow through the
    score; wrap attacks in :func:`~robustlab.defenses.bpda_mode` so that
    non-differentiable squeezers (bit depth) pass their surrogate's gradient.

    Decide the final verdict with :meth:`SqueezeDetector.detect` and the classifier:
    within ``weight * (score - threshold)``'s rounding of ``max z`` the two can differ.

    Args:
        detector: a fitted :class:`SqueezeDetector`.
        weight: logits per unit of score above the threshold (scores lie in [0, 2]).
    """

    def __init__(self, detector: SqueezeDetector, weight: float = 10.0) -> None:
        super().__init__()
        if detector.threshold is None:
            raise ConfigError("DetectionPipeline: fit the detector first (detector.fit)")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
            raise ConfigError(f"DetectionPipeline: weight must be > 0, got {weight!r}")
        self.detector = detector
        self.model = detector.model  # registered, so modes and devices follow the pipeline
        self.squeezers = nn.ModuleList(detector.squeezers)  # found by bpda_mode
        self.weight = float(weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits, score = self.detector.logits_and_score(x, list(self.squeezers))
        logits = logits.float()
        reject = logits.amax(1) + self.weight * (score - self.detector.threshold)
        return torch.cat([logits, reject[:, None]], dim=1)


class SqueezedViews(nn.Module):
    """The classifier as an ensemble over the input and each of its squeezed versions:
    ``sum_v log_softmax(f(v(x)))`` over ``v`` in (identity, squeezers...). An attack that
    misclassifies this ensemble with confidence pushes every view to the same wrong class,
    which is what keeps the detector's score low (the second adaptive attacker of
    :func:`~robustlab.evaluate.evaluate_detector`; He et al. 2017 attack squeezing the
    same way). Run attacks on it inside :func:`~robustlab.defenses.bpda_mode`.
    """

    def __init__(self, detector: SqueezeDetector) -> None:
        super().__init__()
        self.detector = detector
        self.model = detector.model
        self.squeezers = nn.ModuleList(detector.squeezers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.detector._logits
        out = torch.log_softmax(logits(x).float(), dim=1)
        for s in self.squeezers:
            out = out + torch.log_softmax(logits(s(x)).float(), dim=1)
        return out


def evasion_loss(
    logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None = None
) -> torch.Tensor:
    """The objective of evading a :class:`DetectionPipeline`'s output (B, K + 1): the best
    wrong class's logit minus the larger of the true class's and the rejected logit
    (targeted: the target's logit minus the largest other). Positive exactly when the
    pipeline predicts a wrong (or the target) class without rejecting."""
    z, k = logits.float(), logits.shape[1] - 1
    if target is not None:
        return z.gather(1, target[:, None])[:, 0] - z.scatter(1, target[:, None], -math.inf).amax(1)
    wrong = z[:, :k].scatter(1, y[:, None], -math.inf).amax(1)
    return wrong - torch.maximum(z.gather(1, y[:, None])[:, 0], z[:, k])


class DetectorEvasion(PGD):
    """PGD against a :class:`DetectionPipeline`: succeeds only where the pipeline predicts a
    wrong class and does not reject (the last output). Defaults: :func:`evasion_loss`,
    ``early_stop=True`` (each point kept at its first evading iterate). Other arguments as
    :class:`~robustlab.attacks.PGD`.

    Example:
        >>> pipeline = DetectionPipeline(detector.fit(x_heldout, fpr=0.05))
        >>> with bpda_mode(pipeline):
        ...     x_adv = DetectorEvasion(pipeline, eps=0.3, steps=100)(x, y)
    """

    name = "detector_evasion"

    def __init__(self, model: nn.Module, *, eps: float, **kwargs: Any) -> None:
        kwargs.setdefault("loss", evasion_loss)
        kwargs.setdefault("early_stop", True)
        super().__init__(model, eps=eps, **kwargs)

    def is_success(
        self, logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None
    ) -> torch.Tensor:
        pred = logits.argmax(1)
        accepted = pred != logits.shape[1] - 1
        return accepted & (pred == target if target is not None else pred != y)
