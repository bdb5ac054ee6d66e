"""A detector evaluated the way it will be attacked: naive and adaptive, ROC and the
whole pipeline's accuracy.

A detector that flags adversarial examples is judged on two questions: how well its score
separates clean from adversarial inputs (the ROC), and how many points an attacker can
still turn into a wrong, unflagged prediction. The second must be asked of an attacker who
knows the detector: Carlini & Wagner (2017) bypassed ten detection methods that way, and
He et al. (2017) an ensemble of weak ones. Here two attackers run per eps:

- **naive**: PGD on the classifier alone (it does not know about the detector);
- **adaptive**: two attackers who know the detector, through the squeezers' BPDA
  surrogates where a squeezer is not differentiable, a point counting as broken if
  either gets an accepted wrong answer: :class:`~robustlab.defenses.detector.DetectorEvasion`
  (PGD on classifier and detector joined, succeeding only without being flagged) and PGD
  on :class:`~robustlab.defenses.detector.SqueezedViews` (every squeezed view pushed to a
  confident wrong class, which keeps the score low). On mnist5k neither dominates: the
  first is best at small eps, the second where the first stalls at the detection boundary.

The pipeline answers "rejected" or a class. A point counts as robust when its clean input
is accepted and classified correctly and no attacker produced an accepted wrong
prediction; the headline is the per-point worst case over both attackers.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from robustlab.attacks.pgd import PGD
from robustlab.data.base import ImageDataset
from robustlab.defenses.base import bpda_mode
from robustlab.defenses.detector import (
    ROC,
    DetectionPipeline,
    DetectorEvasion,
    SqueezeDetector,
    SqueezedViews,
    roc_curve,
)
from robustlab.errors import ConfigError
from robustlab.evaluate.clean import check_model_fits, model_device
from robustlab.evaluate.robustness import _eps_list, check_count
from robustlab.nn.adapt import preserve_modes


@dataclass
class DetectionEpsResult:
    """One eps: accuracies over all ``n`` points, detection rates over the adversarial
    examples that fool the classifier."""

    eps: float
    undefended: float  #: the classifier alone against the naive attack
    naive: float  #: the pipeline against the naive attack
    adaptive: float  #: the pipeline against the adaptive attack
    worst: float  #: the pipeline, per-point worst case over both
    #: flagged share of the naive examples that fool the classifier (None: there are none)
    detected_naive: float | None
    detected_adaptive: float | None  #: the same for the adaptive examples
    fooling_naive: int  #: how many naive examples fool the classifier (the ROC's positives)
    fooling_adaptive: int
    roc_naive: ROC | None  #: clean (negatives) versus the naive fooling examples
    roc_adaptive: ROC | None
    seconds: float
    #: per point: clean accepted and correct, and not fooled by the naive attack
    robust_naive: torch.Tensor = field(repr=False, default_factory=lambda: torch.zeros(0))
    #: per point: the same for the adaptive attack
    robust_adaptive: torch.Tensor = field(repr=False, default_factory=lambda: torch.zeros(0))

    def to_dict(self) -> dict[str, Any]:
        def roc(r: ROC | None) -> dict[str, Any] | None:
            if r is None:
                return None
            return {"auc": r.auc, "fpr": r.fpr.tolist(), "tpr": r.tpr.tolist()}

        out = {k: v for k, v in vars(self).items() if not k.startswith(("roc_", "robust_"))}
        return {
            **out,
            "roc_naive": roc(self.roc_naive),
            "roc_adaptive": roc(self.roc_adaptive),
            "broken_naive": (~self.robust_naive).nonzero()[:, 0].tolist(),
            "broken_adaptive": (~self.robust_adaptive).nonzero()[:, 0].tolist(),
        }


@dataclass
class DetectionReport:
    """:func:`evaluate_detector`'s result."""

    n: int
    norm: str
    squeezers: list[str]
    threshold: float
    target_fpr: float | None  #: the false-positive rate the threshold was fitted at
    clean_accuracy: float  #: the classifier alone
    pipeline_clean_accuracy: float  #: accepted and correct
    false_positive_rate: float  #: clean points flagged (measured here, not at fitting)
    attack: str
    results: list[DetectionEpsResult]
    warnings: list[str] = field(default_factory=list)

    @property
    def robust_accuracy(self) -> list[float]:
        """The headline per eps: the pipeline's per-point worst case."""
        return [r.worst for r in self.results]

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in vars(self).items() if k != "results"}
        return {**out, "results": [r.to_dict() for r in self.results]}

    def table(self) -> str:
        lines = [
            f"squeezing detector [{', '.join(self.squeezers)}], threshold {self.threshold:.4g} "
            f"(fitted at {self.target_fpr} false positives; {100 * self.false_positive_rate:.1f}%"
            f" of these {self.n} clean points flagged); {self.attack}",
            f"clean: classifier {100 * self.clean_accuracy:.2f}%, pipeline (accepted and "
            f"correct) {100 * self.pipeline_clean_accuracy:.2f}%",
            f"{'eps':>8}  {'undefended':>10}  {'naive':>7}  {'adaptive':>8}  {'worst':>7}  "
            f"{'detected naive':>14}  {'detected adaptive':>17}  {'AUC naive':>9}  "
            f"{'AUC adaptive':>12}",
        ]

        def auc(r: ROC | None) -> str:
            return "-" if r is None else f"{r.auc:.3f}"

        def rate(v: float | None) -> str:
            return "-" if v is None else f"{100 * v:.1f}%"

        for r in self.results:
            lines.append(
                f"{r.eps:8.4g}  {100 * r.undefended:9.2f}%  {100 * r.naive:6.2f}%  "
                f"{100 * r.adaptive:7.2f}%  {100 * r.worst:6.2f}%  "
                f"{rate(r.detected_naive):>14}  {rate(r.detected_adaptive):>17}  "
                f"{auc(r.roc_naive):>9}  {auc(r.roc_adaptive):>12}"
            )
        return "\n".join(lines + [f"warning: {w}" for w in self.warnings])


def evaluate_detector(
    model: nn.Module,
    detector: SqueezeDetector,
    data: ImageDataset,
    *,
    eps: Sequence[float] | float,
    norm: str = "linf",
    n: int | None = None,
    steps: int = 100,
    restarts: int = 1,
    step_size: float | None = None,
    weight: float = 10.0,
    batch_size: int = 256,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> DetectionReport:
    """The detector's ROC and the defended pipeline's accuracy, naive and adaptive.

    Args:
        model: the classifier the detector watches (``detector.model``).
        detector: a :class:`~robustlab.defenses.SqueezeDetector` already fitted on
            held-out clean data (never on the points evaluated here).
        data: the evaluation points (the first ``n``).
        eps: budgets in pixel units.
        norm: ``"linf"`` or ``"l2"``.
        n: number of points (default: all).
        steps, restarts, step_size: of both attacks (PGD; ``step_size`` default
            ``2.5 * eps / steps``).
        weight: the adaptive attack's logits per unit of detector score above the
            threshold (see :class:`~robustlab.defenses.detector.DetectionPipeline`).
        batch_size: points per attack batch.
        seed: seed of the attacks' random starts.
        device: where to run (default: the model's device).

    Returns:
        A :class:`DetectionReport`; its ``table()`` prints it.
    """
    if not isinstance(detector, SqueezeDetector):
        got = type(detector).__name__
        raise ConfigError(f"evaluate_detector needs a SqueezeDetector, got {got}")
    if detector.model is not model:
        raise ConfigError("evaluate_detector: the detector watches another model than `model`")
    if detector.threshold is None:
        raise ConfigError("evaluate_detector: fit the detector on held-out clean data first")
    eps_list = _eps_list(eps)
    n = check_count(len(data) if n is None else n, len(data))
    dev = torch.device(device) if device is not None else model_device(model)
    check_model_fits(model, data, dev)
    x_all, y_all = data.float_images(slice(0, n)), data.y[:n].long()

    def verdicts(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Classifier correct, flagged, score: computed directly, not through the pipeline."""
        correct, flagged, scores = [], [], []
        with torch.no_grad(), preserve_modes(model, training=False):
            for i in range(0, len(x), batch_size):
                xb = x[i : i + batch_size].to(dev)
                logits, score = detector.logits_and_score(xb)
                correct.append(logits.argmax(1).cpu() == y_all[i : i + batch_size])
                flagged.append((score > detector.threshold).cpu())
                scores.append(score.cpu())
        return torch.cat(correct), torch.cat(flagged), torch.cat(scores)

    clean_correct, clean_flagged, clean_scores = verdicts(x_all)
    accepted_ok = clean_correct & ~clean_flagged
    pipeline = DetectionPipeline(detector, weight=weight).to(dev)
    views = SqueezedViews(detector).to(dev)
    common = dict(norm=norm, steps=steps, restarts=restarts, step_size=step_size, seed=seed)
    results, warnings = [], []
    for e in eps_list:
        t0 = time.perf_counter()
        torch.manual_seed(seed)
        naive_attack = PGD(model, eps=e, **common)  # as a user would run it
        evasion = DetectorEvasion(pipeline, eps=e, **common)
        views_attack = PGD(views, eps=e, **common)
        x_naive, x_evasion, x_views = [], [], []
        for i in range(0, n, batch_size):
            xb, yb = x_all[i : i + batch_size].to(dev), y_all[i : i + batch_size].to(dev)
            x_naive.append(naive_attack(xb, yb).cpu())
            with bpda_mode(pipeline):
                x_evasion.append(evasion(xb, yb).cpu())
            with bpda_mode(views):
                x_views.append(views_attack(xb, yb).cpu())
        naive_correct, naive_flagged, naive_scores = verdicts(torch.cat(x_naive))
        adapt_correct, adapt_flagged, adapt_scores = verdicts(torch.cat(x_evasion))
        v_correct, v_flagged, v_scores = verdicts(torch.cat(x_views))
        # per point, the adaptive example is the views attack's where only it evaded
        take = (~v_correct & ~v_flagged) & ~(~adapt_correct & ~adapt_flagged)
        adapt_correct = torch.where(take, v_correct, adapt_correct)
        adapt_flagged = torch.where(take, v_flagged, adapt_flagged)
        adapt_scores = torch.where(take, v_scores, adapt_scores)
        robust_naive = accepted_ok & ~(~naive_correct & ~naive_flagged)  # not fooled
        robust_adaptive = accepted_ok & ~(~adapt_correct & ~adapt_flagged)
        # the ROC's positives: examples that fool the classifier from a correct clean point
        pos_naive = clean_correct & ~naive_correct
        pos_adaptive = clean_correct & ~adapt_correct

        def roc(pos: torch.Tensor, scores: torch.Tensor) -> ROC | None:
            if not pos.any():
                return None
            return roc_curve(clean_scores.numpy(), scores[pos].numpy())

        def share(flags: torch.Tensor, pos: torch.Tensor) -> float | None:
            return float(flags[pos].float().mean()) if pos.any() else None

        result = DetectionEpsResult(
            eps=e,
            undefended=float((clean_correct & naive_correct).float().mean()),
            naive=float(robust_naive.float().mean()),
            adaptive=float(robust_adaptive.float().mean()),
            worst=float((robust_naive & robust_adaptive).float().mean()),
            detected_naive=share(naive_flagged, pos_naive),
            detected_adaptive=share(adapt_flagged, pos_adaptive),
            fooling_naive=int(pos_naive.sum()),
            fooling_adaptive=int(pos_adaptive.sum()),
            roc_naive=roc(pos_naive, naive_scores),
            roc_adaptive=roc(pos_adaptive, adapt_scores),
            seconds=round(time.perf_counter() - t0, 2),
            robust_naive=robust_naive,
            robust_adaptive=robust_adaptive,
        )
        if result.worst + 0.05 < result.naive:
            warnings.append(
                f"eps {e:g}: the naive figure ({100 * result.naive:.1f}%) overstates the "
                f"detector: an attacker who knows it leaves {100 * result.worst:.1f}%"
            )
        results.append(result)
    return DetectionReport(
        n=n,
        norm=norm,
        squeezers=[s.spec() for s in detector.squeezers],
        threshold=float(detector.threshold),
        target_fpr=detector.fpr,
        clean_accuracy=float(clean_correct.float().mean()),
        pipeline_clean_accuracy=float(accepted_ok.float().mean()),
        false_positive_rate=float(clean_flagged.float().mean()),
        attack=f"PGD-{steps}" + (f"x{restarts}" if restarts > 1 else "") + f" ({norm}); "
        "adaptive: detector evasion and squeezed views, per-point best",
        results=results,
        warnings=warnings,
    )
