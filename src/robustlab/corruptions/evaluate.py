"""Corruption robustness of a model: accuracy per corruption and severity, and the
summary figures of Hendrycks & Dietterich (ICLR 2019) and RobustBench.

- corruption error ``E[c][s] = 1 - accuracy``;
- ``CE_c = sum_s E[c][s] / sum_s E_base[c][s]`` and ``mCE`` its mean over corruptions,
  against a baseline model the user names (AlexNet's role in the paper);
- relative ``CE_c = sum_s (E[c][s] - E_clean) / sum_s (E_base[c][s] - E_base_clean)`` and
  relative mCE (how much accuracy is *lost* to corruptions, relative to the baseline);
- mean corrupted accuracy over every (corruption, severity): RobustBench's figure.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robustlab.corruptions.generate import SEVERITIES, SUITES, corrupted_set
from robustlab.corruptions.imagenet_c import GROUPS
from robustlab.data.base import ImageDataset
from robustlab.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass
class CorruptionReport:
    """Accuracy of one model on corrupted copies of a data set."""

    source: str  #: "generate" (ImageNet-C at any size), "mnist-c", or the directory read
    n: int  #: points per (corruption, severity)
    clean_accuracy: float
    #: corruption -> severity -> accuracy
    accuracy: dict[str, dict[int, float]]
    seed: int = 0
    #: against a baseline (:meth:`against`): its name and the CE figures (None: undefined)
    baseline: str | None = None
    ce: dict[str, float | None] = field(default_factory=dict)
    relative_ce: dict[str, float | None] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def corruptions(self) -> list[str]:
        return list(self.accuracy)

    @property
    def mean_accuracy(self) -> float:
        """Mean accuracy over every (corruption, severity) set (RobustBench)."""
        values = [a for sev in self.accuracy.values() for a in sev.values()]
        return sum(values) / len(values)

    def error(self, name: str) -> dict[int, float]:
        return {s: 1 - a for s, a in self.accuracy[name].items()}

    @property
    def mce(self) -> float | None:
        return _mean(self.ce)

    @property
    def relative_mce(self) -> float | None:
        return _mean(self.relative_ce)

    def against(self, baseline: CorruptionReport, name: str = "baseline") -> CorruptionReport:
        """Fill :attr:`ce` and :attr:`relative_ce` against ``baseline``, which must cover
        every corruption and severity of this report (else a :class:`ConfigError`)."""
        missing = [
            f"{c} severity {s}" for c, sev in self.accuracy.items() for s in sev
            if s not in baseline.accuracy.get(c, {})
        ]  # fmt: skip
        if missing:
            raise ConfigError(
                f"the baseline {name} was not evaluated on {', '.join(missing[:5])}"
                + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
                + ": evaluate it on the same corruptions first"
            )
        self.baseline, self.ce, self.relative_ce = name, {}, {}
        base_clean = 1 - baseline.clean_accuracy
        for c, sev in self.accuracy.items():
            ours = sum(1 - a for a in sev.values())
            theirs = sum(1 - baseline.accuracy[c][s] for s in sev)
            self.ce[c] = ours / theirs if theirs > 0 else None
            ours_rel = sum(1 - a - (1 - self.clean_accuracy) for a in sev.values())
            theirs_rel = sum(1 - baseline.accuracy[c][s] - base_clean for s in sev)
            self.relative_ce[c] = ours_rel / theirs_rel if theirs_rel > 0 else None
        undefined = [c for c in self.accuracy if self.ce[c] is None]
        undefined_rel = [c for c in self.accuracy if self.relative_ce[c] is None]
        if undefined:
            self.warnings.append(
                f"CE undefined for {', '.join(undefined)}: the baseline made no error there"
            )
        if undefined_rel:
            self.warnings.append(
                f"relative CE undefined for {', '.join(undefined_rel)}: the baseline lost no "
                "accuracy to these corruptions (its corrupted error is not above its clean one)"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        accuracy = {c: {str(s): a for s, a in sev.items()} for c, sev in self.accuracy.items()}
        return {
            "source": self.source, "n": self.n, "seed": self.seed,
            "clean_accuracy": self.clean_accuracy, "mean_accuracy": self.mean_accuracy,
            "accuracy": accuracy,
            "baseline": self.baseline, "ce": self.ce, "mce": self.mce,
            "relative_ce": self.relative_ce, "relative_mce": self.relative_mce,
            "warnings": self.warnings,
        }  # fmt: skip

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CorruptionReport:
        try:
            accuracy = {
                c: {int(s): float(a) for s, a in sev.items()} for c, sev in d["accuracy"].items()
            }
            return cls(
                source=d["source"], n=int(d["n"]), clean_accuracy=float(d["clean_accuracy"]),
                accuracy=accuracy, seed=int(d.get("seed", 0)),
            )  # fmt: skip
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise ConfigError(f"not a corruption report ({err})") from None

    @classmethod
    def load(cls, path: str | Path) -> CorruptionReport:
        path = Path(path)
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError) as err:
            raise ConfigError(f"cannot read the corruption report {path}: {err}") from None

    def table(self) -> str:
        sevs = sorted({s for sev in self.accuracy.values() for s in sev})
        width = max(12, *(len(c) for c in self.accuracy))
        head = f"{'corruption':<{width}}" + "".join(f"  sev {s:<3}" for s in sevs)
        if self.ce:
            head += "      CE  rel. CE"
        lines = [
            f"corruptions ({self.source}, {self.n} points each): accuracy in %",
            head,
        ]
        for c, sev in self.accuracy.items():
            row = f"{c:<{width}}" + "".join(
                f"  {100 * sev[s]:6.1f}" if s in sev else "        " for s in sevs
            )
            if self.ce:
                row += f"  {_pct(self.ce.get(c))}  {_pct(self.relative_ce.get(c))}"
            lines.append(row)
        lines.append(f"clean accuracy {100 * self.clean_accuracy:.1f}%, "
                     f"mean corrupted accuracy {100 * self.mean_accuracy:.1f}%")  # fmt: skip
        if self.ce:
            lines.append(
                f"mCE {_pct(self.mce).strip()}, relative mCE {_pct(self.relative_mce).strip()} "
                f"(baseline {self.baseline} = 100%)"
            )
        return "\n".join(lines + [f"warning: {w}" for w in self.warnings])

    def plot(self, heatmap: str | Path, curve: str | Path | None = None) -> list[Path]:
        """A corruption x severity heatmap of accuracy (%) and, with ``curve``, accuracy
        versus severity (one line per corruption group and the mean) as PNG files."""
        from robustlab.evaluate.plots import _pyplot

        plt = _pyplot()
        paths = [Path(heatmap)] + ([Path(curve)] if curve is not None else [])
        figures = [self.heatmap_figure()] + ([self.severity_figure()] if curve else [])
        for fig, path in zip(figures, paths):
            fig.savefig(path, dpi=110)
            plt.close(fig)
        return paths

    def heatmap_figure(self):
        """The corruption x severity heatmap of accuracy (%), a matplotlib figure."""
        from robustlab.evaluate.plots import _pyplot

        plt = _pyplot()
        names = self.corruptions
        sevs = sorted({s for sev in self.accuracy.values() for s in sev})
        grid = [[100 * self.accuracy[c].get(s, float("nan")) for s in sevs] for c in names]
        fig, ax = plt.subplots(figsize=(max(4.8, 2.4 + 0.8 * len(sevs)), 1.0 + 0.32 * len(names)))
        im = ax.imshow(grid, vmin=0, vmax=100, cmap="viridis", aspect="auto")
        for r, row in enumerate(grid):
            for c, v in enumerate(row):
                ax.text(c, r, f"{v:.0f}", ha="center", va="center", fontsize=7,
                        color="white" if v < 50 else "black")  # fmt: skip
        ax.set_xticks(range(len(sevs)), [str(s) for s in sevs])
        ax.set_yticks(range(len(names)), names, fontsize=8)
        ax.set_xlabel("severity")
        ax.set_title(f"accuracy (%) under corruption; clean {100 * self.clean_accuracy:.1f}%",
                     fontsize=9)  # fmt: skip
        fig.colorbar(im, ax=ax, label="accuracy (%)")
        fig.tight_layout()
        return fig

    def severity_figure(self):
        """Accuracy versus severity, one line per corruption group and the mean (black)."""
        from robustlab.evaluate.plots import _pyplot

        plt = _pyplot()
        names = self.corruptions
        sevs = sorted({s for sev in self.accuracy.values() for s in sev})
        fig, ax = plt.subplots(figsize=(5, 3.5))
        groups = {g: [c for c in members if c in self.accuracy] for g, members in GROUPS.items()}
        groups = {g: m for g, m in groups.items() if m} or {"all": names}
        groups.setdefault("all", names)
        # Okabe & Ito's colour-blind-safe palette; the mean over all corruptions in black
        palette = ["#E69F00", "#56B4E9", "#009E73", "#D55E00", "#CC79A7", "#0072B2"]
        for i, (g, members) in enumerate(groups.items()):
            ys = [100 * _avg([self.accuracy[c][s] for c in members if s in self.accuracy[c]])
                  for s in sevs]  # fmt: skip
            ax.plot([0, *sevs], [100 * self.clean_accuracy, *ys], marker="o", label=g,
                    color="black" if g == "all" else palette[i % len(palette)],
                    linewidth=2.5 if g == "all" else 1.2)  # fmt: skip
        ax.set_xticks([0, *sevs], ["clean", *map(str, sevs)])
        ax.set_xlabel("severity")
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        return fig


def _avg(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _mean(values: dict[str, float | None]) -> float | None:
    defined = [v for v in values.values() if v is not None]
    return sum(defined) / len(defined) if values and len(defined) == len(values) else None


def _pct(v: float | None) -> str:
    return "   n/a" if v is None else f"{100 * v:6.1f}"


def _accuracy(model: nn.Module, data: ImageDataset, batch_size: int, dev: torch.device) -> float:
    from robustlab.evaluate.robustness import _predict

    return float((_predict(model, data.x, batch_size, dev) == data.y).float().mean())


def evaluate_corruptions(
    model: nn.Module,
    data: ImageDataset,
    *,
    source: str | Path = "generate",
    corruptions: Sequence[str] | None = None,
    severities: Sequence[int] | None = None,
    n: int | None = None,
    seed: int = 0,
    reference_size: int = 224,
    cache: str | Path | bool | None = None,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    baseline: CorruptionReport | None = None,
    baseline_name: str = "baseline",
    progress: bool | None = None,
) -> CorruptionReport:
    """Accuracy of ``model`` on corrupted copies of ``data``.

    Args:
        model: a classifier on [0, 1] pixels.
        data: the clean split (its first ``n`` points are corrupted, or scored clean).
        source: ``"generate"`` (the 15 ImageNet-C corruptions, generated at the data's
            size), ``"mnist-c"`` (MNIST-C's 15, one severity), or a directory holding
            CIFAR-10/100-C, ImageNet-C or MNIST-C files (read, not generated; ``n``
            points per set, spread over the set by ``seed``).
        corruptions: a subset of the suite's names (default: all).
        severities: a subset of 1..5 (default: all the suite has).
        n: points per set (default: all).
        seed, reference_size, cache: see :func:`~robustlab.corruptions.corrupted_set`.
        baseline: a report of the baseline model on the same sets: fills CE and mCE.

    Example:
        >>> base = evaluate_corruptions(standard, test, n=1000)
        >>> report = evaluate_corruptions(robust, test, n=1000, baseline=base)
        >>> print(report.table()); report.plot("corruptions.png", "severity.png")
    """
    from tqdm.auto import tqdm

    from robustlab.evaluate.clean import check_model_fits, model_device
    from robustlab.evaluate.robustness import check_count
    from robustlab.nn.adapt import preserve_modes

    if not isinstance(data, ImageDataset):
        raise ConfigError(f"data must be an ImageDataset, got {type(data).__name__}")
    if n is not None:
        data = data.subset(check_count(n, len(data), "n"))
    dev = torch.device(device) if device is not None else model_device(model)
    check_model_fits(model, data, dev)
    reader = None
    if str(source) in SUITES:
        suite = str(source)
        available = {c: SEVERITIES[suite] for c in SUITES[suite]}
    elif str(source) == "generate":
        suite = "imagenet-c"
        available = {c: SEVERITIES[suite] for c in SUITES[suite]}
    else:
        from robustlab.corruptions.readers import open_corruptions

        reader = open_corruptions(source, num_classes=data.num_classes)
        suite, available = reader.layout, reader.available
    names = list(corruptions) if corruptions is not None else list(available)
    unknown = [c for c in names if c not in available]
    if unknown or not names:
        raise ConfigError(
            f"corruptions {unknown or names} not in {source} (it has {', '.join(available)})"
        )
    jobs = []
    for c in names:
        wanted = tuple(severities) if severities is not None else available[c]
        bad = [s for s in wanted if s not in available[c]]
        if bad:
            raise ConfigError(f"{c} in {source} has severities {list(available[c])}, not {bad}")
        jobs += [(c, s) for s in wanted]
    accuracy: dict[str, dict[int, float]] = {c: {} for c in names}
    count = len(data)
    with preserve_modes(model, training=False):
        clean = _accuracy(model, data, batch_size, dev)
        for c, s in tqdm(
            jobs, desc="corruptions", disable=None if progress is None else not progress
        ):
            if reader is None:
                corrupted = corrupted_set(data, c, s, suite=suite, seed=seed,
                                          reference_size=reference_size, cache=cache)  # fmt: skip
            else:
                corrupted = reader.read(c, s, n=n, seed=seed)
            accuracy[c][s] = _accuracy(model, corrupted, batch_size, dev)
            count = len(corrupted)
            log.debug("%s severity %d: %.1f%%", c, s, 100 * accuracy[c][s])
    report = CorruptionReport(
        source="generate" if str(source) == "generate" else str(source),
        n=count,
        clean_accuracy=clean, accuracy=accuracy, seed=seed,
    )  # fmt: skip
    if baseline is not None:
        report.against(baseline, baseline_name)
    for w in report.warnings:
        log.warning(w)
    return report
