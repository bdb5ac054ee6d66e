"""Robust evaluation: per-sample worst case over an attack ensemble, for several epsilons.

The scheme of AutoAttack (Croce & Hein 2020): each attack runs only on the points
still robust, so the ensemble costs little more than its strongest member and the
result is the per-sample worst case. Two further savings that keep the result exact:

- epsilons are processed in increasing order and a point broken at eps stays broken
  at every larger eps (its adversarial example lies inside the larger ball too);
- points the model already misclassifies are never attacked.

Each (eps, attack, batch) draws its randomness from a seed derived from ``seed``, so
an evaluation is reproducible, and with ``state_file`` it resumes after an interruption
where it stopped (the state is rewritten atomically after every batch).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from robustlab.attacks import ATTACKS, Attack
from robustlab.attacks.base import attack_options
from robustlab.attacks.fast import fast_model
from robustlab.data.base import ImageDataset, to_float
from robustlab.data.loader import batch_seed
from robustlab.errors import ConfigError, did_you_mean
from robustlab.evaluate.clean import model_device
from robustlab.registry import check_options

log = logging.getLogger(__name__)

#: alias -> (registered attack, fixed options)
ALIASES: dict[str, tuple[str, dict[str, Any]]] = {
    "apgd-ce": ("apgd", {"loss": "ce"}),
    "apgd-dlr": ("apgd", {"loss": "dlr"}),
    "pgd-margin": ("pgd", {"loss": "margin"}),
}

#: suite -> attack specs (the norm is the evaluation's)
SUITES: dict[str, list[str]] = {
    # AutoAttack's standard version without FAB-T: APGD-CE, APGD-T (DLR, 9 targets), Square.
    "standard": ["apgd-ce", "apgd-t", "square:n_queries=5000"],
    # A cheap sanity check: PGD with restarts (cross-entropy), then the margin loss.
    "quick": ["pgd:steps=20:restarts=3", "pgd-margin:steps=20"],
}


@dataclass
class AttackSpec:
    """An attack by registered name plus options, e.g. parsed from ``"pgd:steps=40:restarts=5"``."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)
    label: str = ""

    @classmethod
    def parse(cls, text: str) -> AttackSpec:
        import yaml

        head, *opts = text.strip().split(":")
        base, fixed = ALIASES.get(head, (head, {}))
        if base not in ATTACKS:
            choices = [*ATTACKS.names(), *ALIASES, *SUITES]
            raise ConfigError(
                f"unknown attack {head!r}{did_you_mean(head, choices)} "
                f"(choose from {', '.join(choices)})"
            )
        options = dict(fixed)
        for opt in opts:
            if "=" not in opt:
                raise ConfigError(f"attack option {opt!r} in {text!r} must look like key=value")
            key, value = opt.split("=", 1)
            options[key] = yaml.safe_load(value)
        return cls(base, options, text.strip())

    def build(self, model: nn.Module, eps: float, norm: str, seed: int, **common: Any) -> Attack:
        cls = ATTACKS.get(self.name)
        accepted = attack_options(cls)
        check_options(
            sorted(accepted), {**self.options, **common}, f"attack {self.name!r}", ConfigError
        )
        kwargs = {**common, **self.options}
        if "early_stop" in accepted:  # evaluation only needs to know whether a point breaks
            kwargs.setdefault("early_stop", True)
        return cls(model, eps=eps, norm=norm, seed=seed, **kwargs)


def expand_attacks(attacks: Sequence[str | AttackSpec]) -> list[AttackSpec]:
    """Specs from names, aliases (``apgd-ce``), suites (``standard``) or specs."""
    out: list[AttackSpec] = []
    for item in attacks:
        if isinstance(item, AttackSpec):
            out.append(item)
        elif item in SUITES:
            out.extend(AttackSpec.parse(s) for s in SUITES[item])
        else:
            out.append(AttackSpec.parse(item))
    if not out:
        raise ConfigError("no attacks given")
    return out


@dataclass
class StageResult:
    """One attack at one epsilon."""

    attack: str
    broken: int  #: points this attack broke that earlier stages had left robust
    robust_after: float  #: worst-case robust accuracy after this attack
    attacked: int  #: points it ran on
    seconds: float


@dataclass
class EpsResult:
    eps: float
    robust_accuracy: float  #: per-sample worst case over all attacks
    stages: list[StageResult]


@dataclass
class EvalReport:
    """Clean accuracy and worst-case robust accuracy per epsilon."""

    n: int
    norm: str
    clean_accuracy: float
    results: list[EpsResult]
    attacks: list[str]
    seed: int
    warnings: list[str] = field(default_factory=list)
    robust: dict[float, torch.Tensor] = field(default_factory=dict, repr=False)  #: per-sample masks

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("robust")
        return d

    def curve(self) -> list[tuple[float, float]]:
        """(eps, robust accuracy) pairs, the accuracy-versus-epsilon curve (eps 0 = clean)."""
        return [(0.0, self.clean_accuracy)] + [(r.eps, r.robust_accuracy) for r in self.results]

    def table(self) -> str:
        """A plain-text table: one row per epsilon, one column per attack (cumulative)."""
        widths = [max(len(a), 8) for a in self.attacks]
        head = f"{'eps':>8}  {'clean':>7}  " + "  ".join(
            f"{a:>{w}}" for a, w in zip(self.attacks, widths)
        )
        lines = [
            f"{self.norm} robust accuracy, {self.n} points (cumulative after each attack)",
            head + f"  {'worst case':>10}",
        ]
        for r in self.results:
            cells = "  ".join(
                f"{100 * s.robust_after:{w - 1}.2f}%" for s, w in zip(r.stages, widths)
            )
            lines.append(
                f"{r.eps:8.4g}  {100 * self.clean_accuracy:6.2f}%  {cells}  "
                f"{100 * r.robust_accuracy:9.2f}%"
            )
        return "\n".join(lines + [f"warning: {w}" for w in self.warnings])


def _signature(
    model: nn.Module, specs: list[AttackSpec], eps: list[float], norm: str, n: int, seed: int
) -> str:
    h = hashlib.sha256()
    for t in model.state_dict().values():
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()[:4096])
    settings = [[[s.name, s.options] for s in specs], eps, norm, n, seed]
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def _predict(
    model: nn.Module, x: torch.Tensor, batch_size: int, device: torch.device
) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat(
            [
                model(to_float(x[i : i + batch_size]).to(device)).argmax(1).cpu()
                for i in range(0, len(x), batch_size)
            ]
        )


def evaluate(
    model: nn.Module,
    data: ImageDataset,
    *,
    attacks: Sequence[str | AttackSpec] = ("quick",),
    eps: Sequence[float] = (),
    norm: str = "linf",
    n: int | None = None,
    batch_size: int = 256,
    seed: int = 0,
    state_file: str | Path | None = None,
    device: torch.device | str | None = None,
    progress: bool | None = None,
    attack_options: dict[str, Any] | None = None,
    fast: bool = True,
) -> EvalReport:
    """Clean and worst-case robust accuracy of ``model`` on ``data``.

    Args:
        model: classifier on [0, 1] pixels (left in the mode it was found in).
        data: the evaluation set (the first ``n`` points are used).
        attacks: attack names (``pgd``, ``apgd-ce``, ``apgd-t``, ``square`` ...), with
            options as ``"pgd:steps=40:restarts=10"``, or suites ``standard`` / ``quick``.
        eps: budgets in pixel units (evaluated in increasing order).
        norm: ``"linf"`` or ``"l2"``.
        n: number of points (default: all).
        batch_size: points per attack batch.
        seed: seed of all attack randomness.
        state_file: JSON file to resume from and to keep up to date.
        device: where to run (default: the model's device).
        progress: progress bars (default: only on a terminal).
        attack_options: options given to every attack (e.g. ``{"eot_samples": 10}``).
        fast: attack :func:`~robustlab.attacks.fast_model`'s frozen channels_last copy
            of the model (same function, faster convolutions); the model is untouched.

    Example:
        >>> report = evaluate(model, test, attacks=["standard"], eps=[0.1, 0.3], n=1000)
        >>> print(report.table())
    """
    specs = expand_attacks(list(attacks))
    eps_list = sorted(float(e) for e in eps)
    if any(e < 0 for e in eps_list):
        raise ConfigError(f"eps must be >= 0, got {eps_list}")
    if n is not None:
        data = data.subset(n)
    dev = torch.device(device) if device is not None else model_device(model)
    modes = [m.training for m in model.modules()]
    model.eval()
    try:
        return _evaluate(
            model,
            data,
            specs,
            eps_list,
            norm,
            batch_size,
            seed,
            state_file,
            dev,
            progress,
            attack_options or {},
            fast_model(model, to_float(data.x[:batch_size]).to(dev)) if fast else model,
        )
    finally:
        for m, mode in zip(model.modules(), modes):
            m.training = mode


def _evaluate(
    model, data, specs, eps_list, norm, batch_size, seed, state_file, dev, progress, common, target
) -> EvalReport:
    """``model`` gives clean predictions and the signature; ``target`` is what is attacked."""
    x_all, y_all = data.x, data.y
    n = len(y_all)
    clean_ok = _predict(model, x_all, batch_size, dev) == y_all
    sig = _signature(model, specs, eps_list, norm, n, seed)
    state: dict[str, Any] = {"signature": sig, "robust": {}, "stages": {}}
    path = Path(state_file) if state_file else None
    if path is not None and path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("signature") == sig:
            state = saved
            log.info("resuming evaluation from %s", path)
        else:
            log.warning(
                "%s belongs to another evaluation (model, attacks or settings differ); "
                "starting over",
                path,
            )

    def save_state() -> None:
        if path is not None:
            from robustlab.io import write_json

            write_json(path, state)

    results: list[EpsResult] = []
    robust_masks: dict[float, torch.Tensor] = {}
    warnings: list[str] = []
    robust = clean_ok.clone()
    for ei, e in enumerate(eps_list):
        key_e = f"{ei}"
        if key_e in state["robust"]:
            robust = torch.tensor(state["robust"][key_e], dtype=torch.bool)
        stages: list[StageResult] = []
        black_box_only, gradient_ran = 0, False
        for ai, spec in enumerate(specs):
            key = f"{ei}/{ai}"
            stage = state["stages"].get(
                key, {"next": 0, "broken": 0, "attacked": 0, "seconds": 0.0, "done": False}
            )
            todo = robust.nonzero()[:, 0]
            if not stage["done"]:
                if stage["next"] == 0:
                    stage["attacked"] = int(todo.numel())
                    stage["targets"] = todo.tolist()
                targets = torch.tensor(stage["targets"], dtype=torch.long)
                batches = range(stage["next"], len(targets), batch_size)
                bar = tqdm(
                    batches,
                    desc=f"eps {e:g} {spec.label}",
                    leave=False,
                    disable=None if progress is None else not progress,
                )
                for start in bar:
                    t0 = time.perf_counter()
                    idx = targets[start : start + batch_size]
                    s = batch_seed(seed, ei, ai, start)
                    torch.manual_seed(s)
                    attack = spec.build(target, e, norm, s, **common)
                    x = to_float(x_all[idx]).to(dev)
                    y = y_all[idx].to(dev)
                    success = attack.run(x, y).success.cpu()
                    robust[idx[success]] = False
                    stage["broken"] += int(success.sum())
                    stage["next"] = start + batch_size
                    stage["seconds"] += time.perf_counter() - t0
                    state["stages"][key] = stage
                    state["robust"][key_e] = robust.tolist()
                    save_state()
                stage["done"] = True
                stage["robust_after"] = float(robust.float().mean())
                state["stages"][key] = stage
                state["robust"][key_e] = robust.tolist()
                save_state()
            uses_gradients = ATTACKS.get(spec.name).uses_gradients
            if not uses_gradients and gradient_ran:  # it found what gradient attacks missed
                black_box_only += stage["broken"]
            gradient_ran |= uses_gradients
            stages.append(
                StageResult(
                    spec.label,
                    stage["broken"],
                    stage["robust_after"],
                    stage["attacked"],
                    round(stage["seconds"], 3),
                )
            )
        if black_box_only:
            warnings.append(
                f"at eps {e:g}, gradient-free attacks broke {black_box_only} points the gradient "
                "attacks missed: the gradients may be masked or obfuscated; prefer adaptive "
                "attacks (EOT, BPDA)"
            )
        robust_masks[e] = robust.clone()
        results.append(EpsResult(e, float(robust.float().mean()), stages))
        if ei + 1 < len(eps_list) and f"{ei + 1}" not in state["robust"]:
            state["robust"][f"{ei + 1}"] = robust.tolist()  # broken at eps stays broken above it
    if _is_randomised(model, x_all[: min(8, n)], dev):
        warnings.append(
            "the model's outputs vary between identical calls: it is randomised; attack it with EOT"
        )
    for w in warnings:
        log.warning(w)
    return EvalReport(
        n=n, norm=norm, clean_accuracy=float(clean_ok.float().mean()), results=results,
        attacks=[s.label for s in specs], seed=seed, warnings=warnings, robust=robust_masks,
    )  # fmt: skip


def _is_randomised(model: nn.Module, x: torch.Tensor, dev: torch.device) -> bool:
    with torch.no_grad():
        xb = to_float(x).to(dev)
        return not torch.equal(model(xb), model(xb))
