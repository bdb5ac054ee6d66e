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

import contextlib
import glob
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
from robustlab.attacks.base import attack_options, cpu_has_bf16
from robustlab.attacks.fast import fast_model
from robustlab.data.base import ImageDataset, to_float
from robustlab.data.loader import batch_seed
from robustlab.errors import ConfigError, did_you_mean
from robustlab.evaluate.clean import check_model_fits, model_device
from robustlab.evaluate.shard import ALONE, Shard
from robustlab.nn.adapt import (
    OutputSpec,
    as_classifier,
    preserve_modes,
)
from robustlab.registry import check_options, check_types, init_hints

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
    # AutoAttack's gradient attacks with APGD-T on the 3 most likely wrong classes (as the
    # MM attack, Gao et al. 2022): AutoAttack's robust accuracy within a point on the
    # models in BENCHMARKS.md in a small fraction of its time. No gradient-free attack:
    # masked gradients that only Square would expose go unseen (the validity checks still
    # look for zero gradients, saturation and noise beating the attacks); publish with
    # ``standard``.
    "fast": ["apgd-ce", "apgd-t:n_target_classes=3"],
}


@dataclass
class AttackSpec:
    """An attack by registered name plus options, e.g. parsed from ``"pgd:steps=40:restarts=5"``."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)
    label: str = ""

    @classmethod
    def parse(cls, text: str) -> AttackSpec:
        from robustlab.config import load_yaml

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
            try:
                options[key] = load_yaml(value)
            except Exception:  # yaml.YAMLError
                raise ConfigError(f"attack option {opt!r} in {text!r}: unreadable value") from None
        return cls(base, options, text.strip())

    def build(self, model: nn.Module, eps: float, norm: str, seed: int, **common: Any) -> Attack:
        cls = ATTACKS.get(self.name)
        accepted = attack_options(cls)
        check_options(
            sorted(accepted), {**self.options, **common}, f"attack {self.name!r}", ConfigError
        )
        kwargs = check_types(
            init_hints(cls, Attack), {**common, **self.options}, f"attack {self.name!r}"
        )
        if kwargs.get("targeted") is True:
            raise ConfigError(
                f"attack {self.name!r}: targeted=true needs target classes for each point; "
                "use targeted=random or targeted=least_likely"
            )
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
    seconds: float  #: attack time (summed over the processes of a sharded evaluation)
    #: images the model was asked for: forward-only passes and passes with an input
    #: gradient (one image through the model counts one; EOT draws count each)
    forwards: int = 0
    gradients: int = 0


@dataclass
class EpsResult:
    eps: float
    robust_accuracy: float  #: per-sample worst case over all attacks (and draws)
    stages: list[StageResult]
    majority_accuracy: float | None = None  #: randomized models: majority vote over draws


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
    draws: int = 1  #: forward passes each example is scored over (randomized models)
    #: the validity checks (:mod:`robustlab.evaluate.checks`); None when switched off
    validity: Any = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("robust")
        return d

    def check_lines(self) -> list[str]:
        """The validity checks that did not pass, one line each."""
        return [c.line() for c in self.validity.flagged] if self.validity is not None else []

    def curve(self) -> list[tuple[float, float]]:
        """(eps, robust accuracy) pairs, the accuracy-versus-epsilon curve (eps 0 = clean)."""
        return [(0.0, self.clean_accuracy)] + [(r.eps, r.robust_accuracy) for r in self.results]

    def table(self) -> str:
        """A plain-text table: one row per epsilon, one column per attack (cumulative)."""
        widths = [max(len(a), 8) for a in self.attacks]
        head = f"{'eps':>8}  {'clean':>7}  " + "  ".join(
            f"{a:>{w}}" for a, w in zip(self.attacks, widths)
        )
        scored = f", each example scored over {self.draws} draws" if self.draws > 1 else ""
        lines = [
            f"{self.norm} robust accuracy, {self.n} points (cumulative after each attack{scored})",
            head + f"  {'worst case':>10}" + (f"  {'majority':>8}" if self.draws > 1 else ""),
        ]
        for r in self.results:
            cells = "  ".join(
                f"{100 * s.robust_after:{w - 1}.2f}%" for s, w in zip(r.stages, widths)
            )
            vote = f"  {100 * r.majority_accuracy:7.2f}%" if r.majority_accuracy is not None else ""
            lines.append(
                f"{r.eps:8.4g}  {100 * self.clean_accuracy:6.2f}%  {cells}  "
                f"{100 * r.robust_accuracy:9.2f}%{vote}"
            )
        return "\n".join(
            lines
            + self.cost_lines()
            + [f"warning: {w}" for w in self.warnings]
            + [f"check {c}" for c in self.check_lines()]
        )

    def cost_lines(self) -> list[str]:
        """Where the time went: per eps and attack, the points attacked, the seconds, and
        the images sent through the model (forward only / with an input gradient)."""
        rows = [
            (f"{r.eps:g}", s) for r in self.results for s in r.stages if s.attacked or s.seconds
        ]
        if not rows:
            return []
        width = max(len(s.attack) for _, s in rows)
        lines = ["where the time went (per eps and attack):"]
        for eps, s in rows:
            lines.append(
                f"  eps {eps:>6}  {s.attack:<{width}}  {s.attacked:6d} points  {s.seconds:8.1f} s"
                f"  {s.forwards:9,d} forward  {s.gradients:9,d} gradient"
            )
        total = sum(s.seconds for _, s in rows)
        lines.append(f"  total {total:.1f} s of attacks")
        return lines


def _tensor_digest(tensors: Sequence[torch.Tensor]) -> str:
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _settings(
    model: nn.Module, data: ImageDataset, specs: list[AttackSpec], eps: list[float], norm: str,
    seed: int, batch_size: int, common: dict[str, Any], fast: bool,
) -> dict[str, Any]:  # fmt: skip
    """Everything that decides an evaluation's result, in readable form (the resume key).

    The weights and the points are identified by content hashes, so another split,
    another subset or retrained weights never resume a state written for different ones.
    """
    return {
        "weights": _tensor_digest(list(model.state_dict().values())),
        "data": f"{data.name or 'data'}: {len(data)} points, "
        f"images {_tensor_digest([data.x])}, labels {_tensor_digest([data.y])}",
        "attacks": json.dumps([[s.name, s.options] for s in specs], sort_keys=True, default=str),
        "eps": eps,
        "norm": norm,
        "seed": seed,
        "batch_size": batch_size,  # per-batch seeds depend on it
        "attack_options": json.dumps(common, sort_keys=True, default=str),
        "fast": fast,
        "format": 2,  # per-batch records (states of earlier versions start afresh)
        "robustlab": _version(),
        # what precision="auto" resolves to here: a state is not resumed across machines
        # (or merged across processes) that would compute its batches differently
        "cpu_bf16": cpu_has_bf16(),
    }


def _version() -> str:
    from robustlab import __version__

    return __version__


def _signature(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _predict(
    model: nn.Module, x: torch.Tensor, batch_size: int, device: torch.device,
    shard: Shard = ALONE,
) -> torch.Tensor:  # fmt: skip
    """The model's predicted classes for ``x``, batch by batch (shared out over a shard's
    processes: batch k on rank k mod world size)."""
    parts: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        for k, i in enumerate(range(0, len(x), batch_size)):
            if shard.mine(k):
                parts[i] = model(to_float(x[i : i + batch_size]).to(device)).argmax(1).cpu()
    return _joined(shard, parts)


def _joined(shard: Shard, parts: dict[int, torch.Tensor]) -> torch.Tensor:
    """The per-batch tensors of every process, concatenated in batch order."""
    merged: dict[int, torch.Tensor] = {}
    for part in shard.gather(parts):
        merged.update(part)
    return torch.cat([merged[i] for i in sorted(merged)])


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
    output: OutputSpec = None,
    transfer_from: nn.Module | None = None,
    adaptive: bool = True,
    eot_samples: int = 10,
    rescore_draws: int | None = None,
    checks: bool | str = True,
    distributed: bool = False,
) -> EvalReport:
    """Clean and worst-case robust accuracy of ``model`` on ``data``.

    Args:
        model: classifier on [0, 1] pixels (left in the mode it was found in).
        data: the evaluation set (the first ``n`` points are used).
        attacks: attack names (``pgd``, ``apgd-ce``, ``apgd-t``, ``square`` ...), with
            options as ``"pgd:steps=40:restarts=10"``, or suites ``standard`` / ``fast`` /
            ``quick`` (:data:`SUITES`).
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
        output: for a model returning a tuple or dict: the index, key or function that
            selects its logits (see :func:`robustlab.nn.as_classifier`).
        transfer_from: a surrogate model: the attacks run on it and their adversarial
            examples are scored on ``model`` (a black-box transfer evaluation).
        adaptive: for a :class:`~robustlab.defenses.DefendedModel`, evaluate it
            adaptively (see :func:`robustlab.evaluate.adaptive.evaluate_defended`): the
            undefended model, the naive attack, BPDA, EOT, BPDA+EOT and transfer from the
            undefended model, with the per-point worst case as the headline.
        eot_samples: EOT draws for the adaptive evaluation of a randomized defense.
        rescore_draws: forward passes each adversarial (and clean) example is scored over;
            default ``eot_samples`` for a model whose outputs vary between identical calls,
            else 1. The robust accuracy is then the worst case over draws (a point counts
            as broken if any draw misclassifies it) and ``majority_accuracy`` the
            majority vote: filtering on one draw would inflate a randomized defense.
        checks: run the validity checks (:mod:`robustlab.evaluate.checks`: randomness,
            probabilities instead of logits, saturated softmax, too few classes, zero
            gradients, instability under small noise, a gradient-free attack beating the
            gradient ones, random noise beating the attacks); they cost a few forward and
            backward passes on 32 points and 4 noise draws per eps, and land in
            ``report.validity``. ``"full"`` adds the checks that attack again on 64
            points: an unbounded attack, FGSM versus the ensemble, doubled steps.
        distributed: shard the points over the processes of torch.distributed's default
            process group (a ``torchrun`` job; every process calls ``evaluate`` with the
            same arguments): each stage's batches go round-robin to the processes, which
            exchange the points they broke after every stage. The report, on every
            process, is the single-process one (same batches, same seeds; stage seconds
            are summed over processes). With ``state_file``, rank 0 keeps the state and
            every other rank its unfinished batches beside it (``STATE.rank1`` ...), so an
            interrupted job resumes, with any number of processes.

    A state file is resumed only when everything that decides the result is the same:
    the weights (hash), the points (hash of images and labels: data set, split and subset),
    the attacks with their options, eps, norm, seed and batch size. Otherwise the
    evaluation starts afresh and the log says which of these differ.

    Example:
        >>> report = evaluate(model, test, attacks=["standard"], eps=[0.1, 0.3], n=1000)
        >>> print(report.table())
    """
    if checks is not True and checks is not False and checks != "full":
        raise ConfigError(f"checks must be True, False or 'full', got {checks!r}")
    shard = Shard.current(distributed)
    if not distributed:
        _note_unsharded()
    if isinstance(attacks, str):
        attacks = [attacks]
    specs = expand_attacks(list(attacks))
    eps_list = _eps_list(eps)
    if norm not in ("linf", "l2"):
        raise ConfigError(f"norm must be 'linf' or 'l2', got {norm!r}")
    if not isinstance(data, ImageDataset):
        raise ConfigError(
            f"data must be an ImageDataset (robustlab.load_dataset, or ImageDataset(x, y, ...)), "
            f"got {type(data).__name__}"
        )
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a whole number >= 1, got {batch_size!r}")
    if n is not None:
        data = data.subset(check_count(n, len(data), "n"))
    if len(data) == 0:
        raise ConfigError("the evaluation set is empty")
    from robustlab.defenses import DefendedModel

    if adaptive and isinstance(model, DefendedModel) and transfer_from is None:
        from robustlab.evaluate.adaptive import evaluate_defended

        return evaluate_defended(
            model, data, attacks=specs, eps=eps_list, norm=norm, batch_size=batch_size,
            seed=seed, state_file=state_file, device=device, progress=progress,
            attack_options=attack_options, fast=fast, output=output, eot_samples=eot_samples,
            checks=checks, distributed=distributed,
        )  # fmt: skip
    model = as_classifier(model, output)
    dev = torch.device(device) if device is not None else model_device(model)
    source = as_classifier(transfer_from, output) if transfer_from is not None else model
    example = to_float(data.x[:batch_size]).to(dev)
    check_model_fits(model, data, dev)
    if transfer_from is not None:
        check_model_fits(source, data, dev)
    with preserve_modes(model, training=False), preserve_modes(source, training=False):
        report = _evaluate(
            model, data, specs, eps_list, norm, batch_size, seed, state_file, dev, progress,
            attack_options or {}, fast,
            # sharded: the layout by rule, not by timing (every process attacks one function)
            fast_model(source, example if shard.world == 1 else None) if fast else source,
            scorer=model if transfer_from is not None else None,
            rescore_draws=rescore_draws, eot_draws=eot_samples, shard=shard,
        )  # fmt: skip
    if checks:
        report.validity = shard.from_main(  # one process checks, every process gets it
            lambda: _validity(
                model, data, report, eps_list, norm, batch_size, dev, seed, full=checks == "full"
            )
        )
        for c in report.validity.flagged:
            log.warning(c.line())
    return report


def _note_unsharded() -> None:
    """Say once per process when a process group exists but ``distributed`` is off."""
    import torch.distributed as dist

    global _NOTED_UNSHARDED
    if _NOTED_UNSHARDED or not (dist.is_available() and dist.is_initialized()):
        return
    if dist.get_world_size() > 1:
        _NOTED_UNSHARDED = True
        log.warning(
            "a process group of %d processes exists but evaluate(distributed=False): every "
            "process evaluates every point; pass distributed=True (on every process) to shard",
            dist.get_world_size(),
        )


_NOTED_UNSHARDED = False


def _validity(model, data, report, eps_list, norm, batch_size, dev, seed, full=False):
    """The validity checks of an evaluation: model checks on the first 32 points, report
    checks (noise versus attacks under L-inf only: sign noise is an L-inf direction).
    Seeded, so that a randomized model's checks do not depend on what ran before."""
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(seed)
        return _validity_checks(model, data, report, eps_list, norm, batch_size, dev, seed, full)


def _validity_checks(model, data, report, eps_list, norm, batch_size, dev, seed, full):
    from robustlab.evaluate.checks import (
        ValidityReport,
        costly_checks,
        model_checks,
        noise_accuracy,
        report_checks,
    )

    x, y = to_float(data.x[:32]).to(dev), data.y[:32].to(dev)
    found = model_checks(model, x, y, eps=min(eps_list) if eps_list else None, seed=seed)
    noise = None
    if eps_list and norm == "linf":  # batched inside, the images converted per batch
        noise = noise_accuracy(model, data.x, data.y, eps_list, seed=seed, batch_size=batch_size)
    found += report_checks(report, noise)
    if full and eps_list:
        xs, ys = to_float(data.x[:64]).to(dev), data.y[:64].to(dev)
        found += costly_checks(model, xs, ys, report, seed=seed)
    return ValidityReport(found)


def check_count(n: Any, available: int, what: str = "n") -> int:
    """``n`` as a point count in 1..available, else a clear error (never clipped or wrapped)."""
    if isinstance(n, bool) or not isinstance(n, int):
        raise ConfigError(f"{what} must be a whole number, got {n!r}")
    if n < 1:
        raise ConfigError(f"{what} must be >= 1, got {n}")
    if n > available:
        raise ConfigError(f"{what}={n} asks for more points than the data set has ({available})")
    return n


def _eps_list(eps: Any) -> list[float]:
    """Budgets from a number or a sequence of numbers; a string is refused with a hint."""
    from robustlab.config import parse_number

    if isinstance(eps, str):
        raise ConfigError(
            f"eps must be a number or a list of numbers, got the string {eps!r}; "
            f"write eps=[{', '.join(e.strip() for e in eps.split(','))}]"
        )
    if isinstance(eps, (int, float)) and not isinstance(eps, bool):
        eps = [eps]
    try:
        values = [parse_number(e, "eps") for e in eps]
    except TypeError:
        raise ConfigError(f"eps must be a number or a list of numbers, got {eps!r}") from None
    if any(e < 0 for e in values):
        raise ConfigError(f"eps must be >= 0, got {values}")
    return sorted(values)


def _evaluate(
    model, data, specs, eps_list, norm, batch_size, seed, state_file, dev, progress, common, fast,
    target, scorer=None, rescore_draws=None, eot_draws=10, shard: Shard = ALONE,
) -> EvalReport:  # fmt: skip
    """``model`` gives clean predictions and the signature; ``target`` is what is attacked;
    ``scorer`` (transfer) decides success instead of the attack's own model."""
    x_all, y_all = data.x, data.y
    torch.manual_seed(seed)  # a randomized model's clean predictions are reproducible too
    randomized = _is_randomised(model, x_all[: min(8, len(x_all))], dev)
    draws = rescore_draws
    if draws is None:  # every example of a randomized model is scored over several draws
        draws = eot_draws if randomized else 1
    clean_majority = None
    if draws > 1:  # correct on every draw (worst case) and on most (majority vote)
        clean_ok, clean_majority = (
            ~m for m in _score_batches(model, x_all, y_all, batch_size, dev, draws, seed, shard)
        )
    else:
        clean_ok = _predict(model, x_all, batch_size, dev, shard) == y_all
    settings = _settings(model, data, specs, eps_list, norm, seed, batch_size, common, fast)
    settings["draws"] = draws
    if scorer is not None:
        settings["transfer_from"] = _tensor_digest(list(target.state_dict().values()))
    sig = _signature(settings)
    state: dict[str, Any] = {"signature": sig, "settings": settings, "robust": {}, "stages": {}}
    path = Path(state_file) if state_file else None
    locks: list[Any] = []

    def locked_resume() -> tuple[dict[str, Any], str | None]:  # rank 0 (alone: the process)
        if path is not None:
            from robustlab.io import FileLock

            locks.append(FileLock(path.with_name(path.name + ".lock"), "evaluation").acquire())
        return _resume(path, state, settings)

    try:
        state, note = shard.from_main(locked_resume)
        store = _State(state, path, shard)
        report = _run_stages(
            model, specs, eps_list, norm, batch_size, seed, dev, progress, common, target,
            x_all, y_all, clean_ok, store, scorer, draws, clean_majority, randomized, shard,
        )  # fmt: skip
        store.finished()
        if note:
            report.warnings.insert(0, note)
        return report
    finally:
        for lock in locks:
            lock.release()


def _resume(
    path: Path | None, fresh: dict[str, Any], settings: dict[str, Any]
) -> tuple[dict[str, Any], str | None]:
    """(the saved state at ``path`` if written for the same settings, else ``fresh``; a note
    saying why a saved state was not used)."""
    if path is None or not path.exists():
        return fresh, None
    if not path.is_file():
        raise ConfigError(f"the evaluation state {path} is not a file")
    try:
        saved = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        saved = None
    if not (isinstance(saved, dict) and {"signature", "robust", "stages"} <= set(saved)):
        # never overwrite a file that is not an evaluation state (a user's file, meta.json)
        raise ConfigError(
            f"{path} exists and is not an evaluation state; refusing to overwrite it "
            "(choose another state file)"
        )
    if saved.get("signature") == fresh["signature"]:
        log.info("resuming evaluation from %s", path)
        return saved, None
    old = saved.get("settings", {})
    old = old if isinstance(old, dict) else {}
    differ = [k for k in settings if old.get(k) != settings[k]] or ["its format"]
    note = (
        f"{path} was written for another evaluation (changed: {', '.join(differ)}); started afresh"
    )
    return fresh, note


def _score_batches(
    model: nn.Module, x_all: torch.Tensor, y_all: torch.Tensor, batch_size: int,
    dev: torch.device, draws: int, seed: int = 0, shard: Shard = ALONE,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """:func:`_score` of clean images, batch by batch, each batch's draws seeded by its
    position (so that sharing batches out over processes changes nothing)."""
    anys: dict[int, torch.Tensor] = {}
    majorities: dict[int, torch.Tensor] = {}
    for k, i in enumerate(range(0, len(x_all), batch_size)):
        if shard.mine(k):
            torch.manual_seed(batch_seed(seed, 1 << 20, i))  # apart from the stages' seeds
            anys[i], majorities[i] = _score(
                model, to_float(x_all[i : i + batch_size]).to(dev),
                y_all[i : i + batch_size].to(dev), draws,
            )  # fmt: skip
    return _joined(shard, anys), _joined(shard, majorities)


def _score(
    model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor, draws: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(misclassified on any of ``draws`` forward passes, on a majority of them)."""
    with torch.no_grad():
        wrong = sum((model(x_adv).argmax(1) != y).long() for _ in range(draws))
    return (wrong > 0).cpu(), (2 * wrong > draws).cpu()


@dataclass
class _Context:
    """What every stage of one evaluation shares (fixed for the whole run)."""

    model: nn.Module  #: the evaluated model (scores randomized and transfer examples)
    target: nn.Module  #: what the attacks run on (the model, its fast copy, or a surrogate)
    scorer: nn.Module | None  #: transfer: the model that decides success
    x_all: torch.Tensor
    y_all: torch.Tensor
    norm: str
    batch_size: int
    seed: int
    dev: torch.device
    progress: bool | None
    common: dict[str, Any]  #: options given to every attack
    draws: int  #: forward passes each adversarial example is scored over
    shard: Shard = ALONE  #: this process's share of the batches


class _State:
    """The resumable record of an evaluation, written atomically after every batch.

    Per stage (eps, attack): the points it attacks (fixed when it starts), and while it
    runs, per finished batch the points that batch broke; once it is done, its totals.
    Per eps: the robust masks after the finished stages. Sharded, rank 0 writes this
    file and every other rank writes its own unfinished batches to ``PATH.rankR``; the
    batches of a stage are merged when it ends, so any rank's record serves any layout.
    """

    def __init__(self, data: dict[str, Any], path: Path | None, shard: Shard = ALONE) -> None:
        self.data, self.shard = data, shard
        data.setdefault("majority", {})
        self.path = path if path is None or shard.is_main else _rank_path(path, shard.rank)
        self.own: dict[str, Any] = {}  #: a non-zero rank's record: {stage, targets, batches}
        if self.path is not None and not shard.is_main:
            self.own = _rank_record(self.path, data["signature"])
        elif self.path is not None:  # rank 0 (or alone): every rank record it can see counts
            for rank_file in self._rank_files():
                record = _rank_record(rank_file, data["signature"])
                stage = data["stages"].get(record.get("stage", ""))
                if stage and not stage["done"] and _digest(stage["targets"]) == record["targets"]:
                    stage.setdefault("batches", {}).update(record["batches"])

    def stage(self, key: str) -> dict[str, Any]:
        return self.data["stages"].get(key, {"done": False})

    def masks(
        self, key: str, robust: torch.Tensor, majority: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The saved masks of eps ``key``, or copies of the ones carried from below."""

        def restored(table: str, default: torch.Tensor) -> torch.Tensor:
            saved = self.data[table].get(key)
            return default.clone() if saved is None else torch.tensor(saved, dtype=torch.bool)

        return restored("robust", robust), restored("majority", majority)

    def done_batches(self, key: str, stage: dict[str, Any]) -> dict[str, Any]:
        """The finished batches of a running stage this process knows of."""
        done = dict(stage.get("batches", {}))
        if self.own.get("stage") == key and self.own.get("targets") == _digest(stage["targets"]):
            done.update(self.own.get("batches", {}))
        return done

    def save_batch(self, key: str, stage: dict[str, Any], done: dict[str, Any]) -> None:
        """Record a running stage's finished batches (``done``: this process's view)."""
        if self.shard.is_main:
            stage["batches"] = done
            self.data["stages"][key] = stage
            self._write(self.data)
        else:
            mine = {"stage": key, "targets": _digest(stage["targets"]), "batches": done}
            self._write({"signature": self.data["signature"], **mine})

    def save(self, key: str, stage: dict[str, Any], robust: torch.Tensor,
             majority: torch.Tensor) -> None:  # fmt: skip
        """Record a finished stage and the masks it left (rank 0 writes)."""
        eps_key = key.split("/")[0]
        self.data["stages"][key] = stage
        self.data["robust"][eps_key] = robust.tolist()
        self.data["majority"][eps_key] = majority.tolist()
        if self.shard.is_main:
            self._write(self.data)

    def finished(self) -> None:
        """The evaluation is complete: the ranks' batch records are not needed (rank 0
        removes every one it can see, stale ones of earlier jobs too)."""
        if self.path is None:
            return
        for rank_file in [self.path] if not self.shard.is_main else self._rank_files():
            rank_file.unlink(missing_ok=True)

    def _rank_files(self) -> list[Path]:
        assert self.path is not None
        return [
            f for f in self.path.parent.glob(f"{glob.escape(self.path.name)}.rank*")
            if f.name[len(self.path.name) + 5 :].isdigit()
        ]  # fmt: skip

    def _write(self, data: dict[str, Any]) -> None:
        if self.path is not None:
            from robustlab.io import write_json

            write_json(self.path, data)


def _rank_record(path: Path, signature: str) -> dict[str, Any]:
    """A rank's record of its unfinished batches, if written for this evaluation."""
    if not path.is_file():
        return {}
    with contextlib.suppress(json.JSONDecodeError, UnicodeDecodeError, OSError):
        record = json.loads(path.read_text())
        keys = {"signature", "stage", "targets", "batches"}
        if isinstance(record, dict) and keys <= set(record) and record["signature"] == signature:
            return record
    return {}


def _rank_path(path: Path, rank: int) -> Path:
    return path.with_name(f"{path.name}.rank{rank}")


def _digest(values: list[int]) -> str:
    return hashlib.sha256(json.dumps(values).encode()).hexdigest()[:16]


def _run_stages(
    model, specs, eps_list, norm, batch_size, seed, dev, progress, common, target,
    x_all, y_all, clean_ok, store, scorer=None, draws=1, clean_majority=None,
    randomized=False, shard: Shard = ALONE,
) -> EvalReport:  # fmt: skip
    """The stage loop: for each eps (increasing), each attack runs on the points still
    robust and breaks what it can (:func:`_run_stage`); then :func:`_assemble` builds
    the report. ``robust`` is the worst case; with ``draws`` > 1 (a randomized model)
    every adversarial example is re-scored over that many forward passes: broken in the
    worst case if any pass misclassifies it, broken by majority vote if most do. Points
    are attacked while robust by majority vote, so both figures see every attack."""
    ctx = _Context(model, target, scorer, x_all, y_all, norm, batch_size, seed, dev, progress,
                   common, draws, shard)  # fmt: skip
    clean_majority = clean_ok if clean_majority is None else clean_majority
    results: list[EpsResult] = []
    robust_masks: dict[float, torch.Tensor] = {}
    # robust so far: a point broken at a smaller eps stays broken above it
    robust, majority = clean_ok, clean_majority
    for ei, e in enumerate(eps_list):
        robust, majority = store.masks(f"{ei}", robust, majority)
        stages = [
            _run_stage(ctx, store, ei, e, ai, spec, robust, majority)
            for ai, spec in enumerate(specs)
        ]
        robust_masks[e] = robust.clone()
        results.append(
            EpsResult(
                e, float(robust.float().mean()), stages,
                float(majority.float().mean()) if draws > 1 else None,
            )
        )  # fmt: skip
    return _assemble(ctx, specs, results, robust_masks, clean_majority, randomized)


def _run_stage(
    ctx: _Context, store: _State, ei: int, e: float, ai: int, spec: AttackSpec,
    robust: torch.Tensor, majority: torch.Tensor,
) -> StageResult:  # fmt: skip
    """One attack at one eps, on the points robust (by majority vote) when it starts.

    Those points are cut into batches of ``batch_size``, each seeded by its position;
    this process runs its share of them (all, when alone), recording after every batch
    the points it broke, so an interrupted stage resumes at its unfinished batches. When
    every batch is done (the processes of a sharded evaluation exchange theirs),
    ``robust`` and ``majority`` are updated in place: the result does not depend on
    which process ran which batch, or in what order.
    """
    key = f"{ei}/{ai}"
    stage = store.stage(key)
    if not stage["done"]:
        if "targets" not in stage:
            todo = majority.nonzero()[:, 0]
            stage = {"done": False, "targets": todo.tolist(), "attacked": int(todo.numel())}
        targets = torch.tensor(stage["targets"], dtype=torch.long)
        starts = range(0, len(targets), ctx.batch_size)
        done = store.done_batches(key, stage)
        todo_starts = [s for k, s in enumerate(starts) if ctx.shard.mine(k) and str(s) not in done]
        bar = tqdm(todo_starts, desc=f"eps {e:g} {spec.label}", leave=False,
                   disable=None if ctx.progress is None else not ctx.progress)  # fmt: skip
        failure: Exception | None = None
        try:
            for start in bar:
                done[str(start)] = _run_batch(ctx, spec, e, targets[start : start + ctx.batch_size],
                                              batch_seed(ctx.seed, ei, ai, start))  # fmt: skip
                store.save_batch(key, stage, done)
        except Exception as err:  # sharded: every process hears of it at the exchange
            if ctx.shard.world == 1:
                raise
            failure = err
        parts = ctx.shard.gather((None if failure is None else repr(failure), done))
        failed = [(rank, why) for rank, (why, _) in enumerate(parts) if why is not None]
        if failure is not None:
            raise failure
        if failed:
            raise RuntimeError(
                f"stage {key} stopped: process {failed[0][0]} failed with {failed[0][1]}"
            )
        merged: dict[str, Any] = {}
        for _, part in parts:
            merged.update(part)
        if set(merged) != {str(s) for s in starts}:  # every batch is somebody's
            raise RuntimeError(f"stage {key}: batches missing after the exchange")
        broken = 0
        for record in merged.values():
            hit = torch.tensor(record["any"], dtype=torch.long)
            broken += int(robust[hit].sum())
            robust[hit] = False
            majority[torch.tensor(record["majority"], dtype=torch.long)] = False
        stage = {
            "done": True, "attacked": stage["attacked"], "broken": broken,
            "robust_after": float(robust.float().mean()),
            "seconds": sum(r["seconds"] for r in merged.values()),
            "forwards": sum(r["forwards"] for r in merged.values()),
            "gradients": sum(r["gradients"] for r in merged.values()),
        }  # fmt: skip
        store.save(key, stage, robust, majority)
    return StageResult(
        spec.label, stage["broken"], stage["robust_after"], stage["attacked"],
        round(stage["seconds"], 3), stage["forwards"], stage["gradients"],
    )  # fmt: skip


def _run_batch(
    ctx: _Context, spec: AttackSpec, e: float, idx: torch.Tensor, seed: int
) -> dict[str, Any]:
    """Attack the points ``idx`` (one batch) at ``e``: the points broken (on any draw and
    by majority vote), the time taken and the images sent through the model."""
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    attack = spec.build(ctx.target, e, ctx.norm, seed, **ctx.common)
    x = to_float(ctx.x_all[idx]).to(ctx.dev)
    y = ctx.y_all[idx].to(ctx.dev)
    result = attack.run(x, y)
    rescored = 0
    if ctx.scorer is None and ctx.draws == 1:
        broken_any = broken_majority = result.success.cpu()
    else:  # transfer, or a randomized model: score on the evaluated model
        judge = ctx.scorer if ctx.scorer is not None else ctx.model
        broken_any, broken_majority = _score(judge, result.x_adv, y, ctx.draws)
        rescored = ctx.draws * len(idx)
    return {
        "any": idx[broken_any].tolist(), "majority": idx[broken_majority].tolist(),
        "seconds": time.perf_counter() - t0, "forwards": attack.passes["forward"] + rescored,
        "gradients": attack.passes["gradient"],
    }  # fmt: skip


def _assemble(
    ctx: _Context, specs: list[AttackSpec], results: list[EpsResult],
    robust_masks: dict[float, torch.Tensor], clean_majority: torch.Tensor, randomized: bool,
) -> EvalReport:  # fmt: skip
    """The report of a finished stage loop, with the warning a randomized model earns
    when its attacks used one draw per gradient."""
    warnings: list[str] = []
    if randomized and int(ctx.common.get("eot_samples", 1)) < 2:
        warnings.append(
            "the model's outputs vary between identical calls: it is randomised; "
            + (f"each example was scored over {ctx.draws} draws, but " if ctx.draws > 1 else "")
            + "the attacks used one draw per gradient: attack it with EOT "
            "(attack_options={'eot_samples': k}, or evaluate it as a DefendedModel)"
        )
    for w in warnings:
        log.warning(w)
    return EvalReport(
        n=len(ctx.y_all), norm=ctx.norm, clean_accuracy=float(clean_majority.float().mean()),
        results=results, attacks=[s.label for s in specs], seed=ctx.seed, warnings=warnings,
        robust=robust_masks, draws=ctx.draws,
    )  # fmt: skip


def _is_randomised(model: nn.Module, x: torch.Tensor, dev: torch.device) -> bool:
    with torch.no_grad():
        xb = to_float(x).to(dev)
        return not torch.equal(model(xb), model(xb))
