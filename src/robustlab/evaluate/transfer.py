"""Transfer (black-box) evaluation: adversarial examples made on one model, scored on
another, for every pair of a set of models.

Papernot et al. (2016) showed adversarial examples transfer between models trained on
the same task; Tramèr et al. (2018) that adversarially trained models are far more
robust to transferred examples than to white-box ones, and that a defense evaluated only
on transferred examples looks stronger than it is. The matrix puts both in one place:
cell (source, target) is the target's robust accuracy when the attacks run on the source
and their examples are scored on the target; the diagonal is the white-box figure.

With ``universal=`` data, each source also gets a row ``SOURCE/universal``: one
image-agnostic perturbation (Moosavi-Dezfooli et al. 2017) fitted on the source from
that data, with radius eps, added to every evaluated point and scored on each target.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robustlab.data.base import ImageDataset
from robustlab.errors import ConfigError
from robustlab.evaluate.robustness import AttackSpec, _eps_list, evaluate


@dataclass
class TransferMatrix:
    """Robust accuracy per eps, source (row) and target (column); clean accuracy per target."""

    names: list[str]  #: the targets (columns)
    eps: list[float]
    attacks: list[str]
    n: int
    clean: dict[str, float]
    #: accuracy[i][s][t]: the target ``t``'s worst case over the attacks run on ``s`` at eps i
    accuracy: list[dict[str, dict[str, float]]]
    warnings: list[str] = field(default_factory=list)
    #: the rows: every model, then ``NAME/universal`` rows when universal perturbations ran
    sources: list[str] = field(default_factory=list)
    #: fooling rate of each universal perturbation on its source's fit data, per eps
    universal_fooling: list[dict[str, float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.sources:
            self.sources = list(self.names)

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))

    def table(self) -> str:
        width = max(8, *(len(n) for n in self.names), *(len(n) for n in self.sources))
        lines = [
            f"transfer: robust accuracy of each target (column) when {', '.join(self.attacks)} "
            f"run on the source (row); the diagonal is white-box; {self.n} points",
        ]
        for i, e in enumerate(self.eps):
            lines.append(f"eps {e:g}")
            lines.append(f"{'source':>{width}}  " + "  ".join(f"{t:>{width}}" for t in self.names))
            for s in self.sources:
                cells = "  ".join(
                    f"{100 * self.accuracy[i][s][t]:{width - 1}.1f}%" for t in self.names
                )
                lines.append(f"{s:>{width}}  {cells}")
        lines.append(
            f"{'clean':>{width}}  "
            + "  ".join(f"{100 * self.clean[t]:{width - 1}.1f}%" for t in self.names)
        )
        return "\n".join(lines + [f"warning: {w}" for w in self.warnings])

    def plot(self, path: str | Path) -> Path:
        """One heatmap per eps (rows: source, columns: target), accuracy in %, as PNG."""
        from robustlab.evaluate.plots import _pyplot

        plt = _pyplot()
        k, rows = len(self.names), len(self.sources)
        fig, axes = plt.subplots(
            1, len(self.eps), figsize=(2.5 + 1.2 * k * len(self.eps), 1.2 + 0.9 * rows),
            squeeze=False,
        )  # fmt: skip
        for ax, e, acc in zip(axes[0], self.eps, self.accuracy):
            grid = [[100 * acc[s][t] for t in self.names] for s in self.sources]
            im = ax.imshow(grid, vmin=0, vmax=100, cmap="viridis")
            for r in range(rows):
                for c in range(k):
                    ax.text(c, r, f"{grid[r][c]:.0f}", ha="center", va="center",
                            color="white" if grid[r][c] < 50 else "black", fontsize=8)  # fmt: skip
            ax.set_xticks(range(k), self.names, rotation=45, ha="right", fontsize=8)
            ax.set_yticks(range(rows), self.sources if ax is axes[0][0] else [], fontsize=8)
            ax.set_xlabel("target (scored on)")
            if ax is axes[0][0]:
                ax.set_ylabel("source (attacked)")
            ax.set_title(f"eps {e:g}: robust accuracy (%)", fontsize=9)
        fig.colorbar(im, ax=list(axes[0]), shrink=0.8, label="robust accuracy (%)")
        path = Path(path)
        fig.savefig(path, dpi=120, bbox_inches="tight")
        plt.close(fig)
        return path


def transfer_matrix(
    models: Mapping[str, nn.Module],
    data: ImageDataset,
    *,
    attacks: Sequence[str | AttackSpec] = ("pgd:steps=20",),
    eps: Sequence[float] | float = (),
    norm: str = "linf",
    n: int | None = None,
    seed: int = 0,
    universal: ImageDataset | None = None,
    universal_options: Mapping[str, Any] | None = None,
    universal_sources: Sequence[str] | None = None,
    **kwargs: Any,
) -> TransferMatrix:
    """Every source x target pair of ``models``: the target's worst-case robust accuracy
    over ``attacks`` run on the source (on the diagonal, on the target itself).

    Args:
        models: name -> classifier on [0, 1] pixels (at least two).
        data, attacks, eps, norm, n, seed: as for :func:`~robustlab.evaluate.evaluate`.
        universal: images to fit a universal perturbation on, per source and eps (radius
            eps, the evaluation's norm); they should not be the evaluated points (e.g.
            the training split). Adds the rows ``SOURCE/universal``: a point counts as
            robust on a target if the target classifies it and ``x + v`` correctly.
        universal_options: options of
            :class:`~robustlab.attacks.universal.UniversalPerturbation` (``max_passes``,
            ``delta``, ``deepfool_steps``, ``batch_size``...); its seed is ``seed``.
        universal_sources: the models to fit universal perturbations on (default: all;
            a defense without gradients, such as JPEG, gives DeepFool nothing to follow).
        **kwargs: passed to :func:`~robustlab.evaluate.evaluate` (batch_size, device,
            progress, attack_options, fast, output).

    Example:
        >>> m = transfer_matrix({"standard": a, "pgd": b}, test, eps=[0.3], n=500)
        >>> print(m.table()); m.plot("transfer.png")
    """
    names = list(models)
    if len(names) < 2:
        raise ConfigError(f"transfer_matrix needs at least two models, got {len(names)}")
    eps_list = _eps_list(eps)
    if not eps_list:
        raise ConfigError("transfer_matrix needs at least one eps")
    accuracy: list[dict[str, dict[str, float]]] = [{s: {} for s in names} for _ in eps_list]
    clean: dict[str, float] = {}
    warnings: list[str] = []
    common = dict(attacks=attacks, eps=eps_list, norm=norm, n=n, seed=seed, **kwargs)
    count = 0
    for t in names:
        for s in names:
            source = None if s == t else models[s]
            report = evaluate(models[t], data, transfer_from=source, checks=False, **common)
            count = report.n
            clean[t] = report.clean_accuracy
            for i, r in enumerate(report.results):
                accuracy[i][s][t] = r.robust_accuracy
    sources, fooling = list(names), [{} for _ in eps_list]
    if universal is not None:
        points = data.subset(n) if n is not None else data
        chosen = list(universal_sources) if universal_sources is not None else names
        unknown = [s for s in chosen if s not in models]
        if unknown:
            raise ConfigError(f"universal_sources {unknown} are not among the models {names}")
        for s in chosen:
            row = f"{s}/universal"
            sources.append(row)
            for i, e in enumerate(eps_list):
                accuracy[i][row], fooling[i][s] = _universal_row(
                    models[s], models, universal, points, e, norm, seed,
                    dict(universal_options or {}), kwargs.get("batch_size", 500),
                )  # fmt: skip
    for i, e in enumerate(eps_list):
        for t in names:
            white = accuracy[i][t][t]
            for s in sources:
                if accuracy[i][s][t] + 0.05 < white:
                    warnings.append(
                        f"eps {e:g}: examples made on {s} break {t} more "
                        f"({100 * accuracy[i][s][t]:.1f}%) than the white-box attack on {t} "
                        f"({100 * white:.1f}%): the white-box attack on {t} is too weak or its "
                        "gradients are masked"
                    )
    return TransferMatrix(
        names=names, eps=eps_list, attacks=[str(a) for a in attacks], n=count, clean=clean,
        accuracy=accuracy, warnings=warnings, sources=sources, universal_fooling=fooling,
    )  # fmt: skip


def _universal_row(
    source: nn.Module, targets: Mapping[str, nn.Module], fit: ImageDataset,
    points: ImageDataset, eps: float, norm: str, seed: int, options: dict[str, Any],
    batch_size: int,
) -> tuple[dict[str, float], float]:  # fmt: skip
    """(each target's accuracy on the points plus a universal perturbation fitted on
    ``source`` from ``fit``, that perturbation's fooling rate on ``fit``)."""
    from robustlab.attacks.universal import UniversalPerturbation
    from robustlab.data.base import to_float
    from robustlab.evaluate.clean import model_device
    from robustlab.nn.adapt import preserve_modes

    options.setdefault("seed", seed)
    uap = UniversalPerturbation(source, xi=eps, norm=norm, **options).fit(fit, progress=False)
    row: dict[str, float] = {}
    for t, target in targets.items():
        dev = model_device(target)
        correct = 0
        with torch.no_grad(), preserve_modes(target, training=False):
            for i in range(0, len(points), batch_size):
                x = to_float(points.x[i : i + batch_size]).to(dev)
                y = points.y[i : i + batch_size].to(dev)
                ok = (target(x).argmax(1) == y) & (target(uap(x)).argmax(1) == y)
                correct += int(ok.sum())
        row[t] = correct / len(points)
    return row, uap.history[-1] if uap.history else 0.0
