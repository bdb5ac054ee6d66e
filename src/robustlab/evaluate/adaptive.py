"""Adaptive evaluation of a defended model: naive, BPDA, EOT, BPDA+EOT and transfer,
with the per-point worst case as the only headline.

Athalye, Carlini & Wagner (ICML 2018) circumvented 7 of the 9 ICLR 2018 defenses that
relied on obfuscated gradients: a non-differentiable step is attacked through a
differentiable stand-in (BPDA), a randomized one through the expectation over its
randomness (EOT; Athalye, Engstrom, Ilyas & Kwok 2018). A defense evaluated only with
the gradients PyTorch gives ("naive") is credited for hiding them. Here every column a
defense's declarations call for is run, and a point counts as robust only if it
survives all of them.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from robustlab.data.base import ImageDataset
from robustlab.defenses.base import DefendedModel, Defense
from robustlab.errors import ConfigError
from robustlab.evaluate.robustness import AttackSpec, EvalReport, evaluate


@dataclass
class AdaptiveReport:
    """Robust accuracy of a defended model per evaluation mode and eps, and the worst case.

    ``modes`` maps a mode (``none`` = the undefended model, ``naive``, ``bpda``,
    ``eot-k``, ``bpda+eot-k``, ``transfer``) to its :class:`EvalReport`. The headline
    (:attr:`robust_accuracy`) is the per-point worst case over every mode except ``none``
    (which evaluates another model).
    """

    n: int
    norm: str
    eps: list[float]
    clean_accuracy: float
    modes: dict[str, EvalReport]
    robust_accuracy: list[float]  #: worst case per eps (defended model)
    defenses: list[str]
    randomized: bool
    differentiable: bool
    warnings: list[str] = field(default_factory=list)
    robust: dict[float, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def results(self) -> list[Any]:
        """(eps, worst-case accuracy) records, so code reading ``EvalReport.results`` works."""
        return [_Point(e, a) for e, a in zip(self.eps, self.robust_accuracy)]

    def curve(self) -> list[tuple[float, float]]:
        return [(0.0, self.clean_accuracy), *zip(self.eps, self.robust_accuracy)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "n": self.n, "norm": self.norm, "eps": self.eps,
            "clean_accuracy": self.clean_accuracy, "robust_accuracy": self.robust_accuracy,
            "defenses": self.defenses, "randomized": self.randomized,
            "differentiable": self.differentiable, "warnings": self.warnings,
            "modes": {m: r.to_dict() for m, r in self.modes.items()},
        }  # fmt: skip

    def table(self) -> str:
        """One row per eps: robust accuracy per mode, then the worst case."""
        names = list(self.modes)
        widths = [max(9, len(m)) for m in names]
        head = f"{'eps':>8}  {'clean':>7}  " + "  ".join(f"{m:>{w}}" for m, w in zip(names, widths))
        lines = [
            f"{self.norm} robust accuracy of {' -> '.join(self.defenses)} -> model, "
            f"{self.n} points; each column is the worst case over the attacks "
            "(none: the model without its defenses)",
            head + f"  {'worst case':>10}",
        ]
        for i, e in enumerate(self.eps):
            cells = "  ".join(
                f"{100 * self.modes[m].results[i].robust_accuracy:{w - 1}.2f}%"
                for m, w in zip(names, widths)
            )
            lines.append(
                f"{e:8.4g}  {100 * self.clean_accuracy:6.2f}%  {cells}  "
                f"{100 * self.robust_accuracy[i]:9.2f}%"
            )
        return "\n".join(lines + [f"warning: {w}" for w in self.warnings])


@dataclass
class _Point:
    eps: float
    robust_accuracy: float


def evaluate_defended(
    model: DefendedModel,
    data: ImageDataset,
    *,
    attacks: Sequence[str | AttackSpec] = ("quick",),
    eps: Sequence[float] = (),
    norm: str = "linf",
    eot_samples: int = 10,
    state_file: str | Path | None = None,
    **kwargs: Any,
) -> AdaptiveReport:
    """Evaluate ``model`` (a defended model) in every mode its declarations call for.

    Modes: ``none`` (the model behind the defenses, for reference), ``naive`` (gradients
    as PyTorch gives them through the defenses), ``bpda`` (non-differentiable defenses
    back-propagate their surrogate) when any defense is non-differentiable, ``eot-k``
    (losses and gradients averaged over k draws) when any is randomized, ``bpda+eot-k``
    when both, and ``transfer`` (the attacks run on the undefended model, their examples
    scored on the defended one). Each mode attacks every point the defended model
    classifies correctly; the headline is the per-point worst case over all modes but
    ``none``.

    Args:
        model: a :class:`~robustlab.defenses.DefendedModel`.
        data, attacks, eps, norm: as for :func:`~robustlab.evaluate.evaluate`.
        eot_samples: k, the EOT draws per gradient for randomized defenses.
        state_file: resumable state; each mode keeps its own file beside it
            (``state.naive.json`` ...).
        **kwargs: passed to :func:`~robustlab.evaluate.evaluate` (n, batch_size, seed,
            device, progress, attack_options, fast, output, checks). Each mode runs its
            validity checks (``modes[m].validity``); those that fire outside the naive
            mode are repeated in the warnings.
    """
    if not isinstance(model, DefendedModel):
        raise ConfigError(f"evaluate_defended needs a DefendedModel, got {type(model).__name__}")
    if isinstance(eot_samples, bool) or not isinstance(eot_samples, int) or eot_samples < 1:
        raise ConfigError(f"eot_samples must be a whole number >= 1, got {eot_samples!r}")
    base_opts = dict(kwargs.pop("attack_options", None) or {})
    eot_opts = {**base_opts, "eot_samples": eot_samples}
    bpda_model = copy.deepcopy(model)
    _set_bpda(bpda_model)

    plan: list[tuple[str, Any, dict[str, Any], dict[str, Any]]] = [
        ("none", model.model, base_opts, {}),
        ("naive", model, base_opts, {}),
    ]
    if not model.differentiable:
        plan.append(("bpda", bpda_model, base_opts, {}))
    if model.randomized:
        plan.append((f"eot-{eot_samples}", model, eot_opts, {}))
        if not model.differentiable:
            plan.append((f"bpda+eot-{eot_samples}", bpda_model, eot_opts, {}))
    # the transfer mode's model is the naive mode's: its checks would repeat them
    plan.append(("transfer", model, base_opts, {"transfer_from": model.model, "checks": False}))

    modes: dict[str, EvalReport] = {}
    for name, target, opts, extra in plan:
        state = _mode_state(state_file, name)
        modes[name] = evaluate(
            target, data, attacks=attacks, eps=eps, norm=norm, state_file=state,
            attack_options=opts, adaptive=False, eot_samples=eot_samples, **{**kwargs, **extra},
        )  # fmt: skip
    defended = [r for m, r in modes.items() if m != "none"]
    eps_list = sorted(defended[0].robust)
    worst = {e: torch.stack([r.robust[e] for r in defended]).all(0) for e in eps_list}
    warnings = [f"{m}: {w}" for m, r in modes.items() for w in r.warnings]
    # the naive mode's checks fire by design (that is what the adaptive modes answer);
    # a check firing in an adaptive mode, or on the undefended model, is news
    warnings += [
        f"{m}: check {line}" for m, r in modes.items() if m != "naive" for line in r.check_lines()
    ]
    naive = modes["naive"]
    for i, e in enumerate(eps_list):
        gap = naive.results[i].robust_accuracy - float(worst[e].float().mean())
        if gap > 0.05:
            warnings.append(
                f"at eps {e:g} the naive attack overstates robust accuracy by "
                f"{100 * gap:.1f} points: the defense hides gradients; trust the worst case"
            )
    return AdaptiveReport(
        n=naive.n, norm=norm, eps=eps_list, clean_accuracy=naive.clean_accuracy, modes=modes,
        robust_accuracy=[float(worst[e].float().mean()) for e in eps_list],
        defenses=model.specs(), randomized=model.randomized,
        differentiable=model.differentiable, warnings=warnings, robust=worst,
    )  # fmt: skip


def _set_bpda(model: DefendedModel) -> None:
    """Turn on BPDA in every defense of ``model`` (a copy: it stays on)."""
    for d in model.modules():
        if isinstance(d, Defense):
            d.use_surrogate_gradient = True


def _mode_state(state_file: str | Path | None, mode: str) -> Path | None:
    if state_file is None:
        return None
    path = Path(state_file)
    safe = mode.replace("+", "_")
    return path.with_name(f"{path.stem}.{safe}{path.suffix or '.json'}")
