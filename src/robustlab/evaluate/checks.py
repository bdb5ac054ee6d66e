"""Checks that an evaluation can be trusted: signs of masked gradients and weak attacks.

An attack that fails proves nothing if the gradient it follows is broken. These checks
automate what the best references ask a reader to verify by hand:

- AutoAttack (Croce & Hein, ICML 2020) flags randomness across identical calls, a softmax
  instead of logits, zero gradients, gradients computed inside the forward pass (a
  dynamic defense) and a gradient-free attack beating gradient ones;
- the indicators of attack failure (Pintor et al., NeurIPS 2022) add unavailable
  gradients, predictions unstable under small random noise, an attack that fails even
  without a budget and an optimisation still moving when it stops;
- Carlini et al. (2019, "On evaluating adversarial robustness") ask that random noise be
  weaker than the attacks, iterative attacks stronger than single-step ones, and that
  doubling iterations or restarts change nothing.

Each check returns a verdict (``pass``, ``warn``, ``fail``), its evidence (numbers and
the points concerned) and, when it fires, a plain-words reason with the next step. The
model checks run on a few points and cost a handful of forward and backward passes; the
report checks read an :class:`~robustlab.evaluate.robustness.EvalReport`.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from robustlab.errors import ConfigError
from robustlab.nn.adapt import OutputSpec, check_logits, preserve_modes, select_output

VERDICTS = ("pass", "warn", "fail")


@dataclass
class Check:
    """One check's outcome."""

    name: str
    verdict: str  #: "pass", "warn" or "fail"
    reason: str  #: what was found, in plain words
    next_step: str = ""  #: what to do about it (empty when the check passes)
    evidence: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        tail = f" Next: {self.next_step}" if self.next_step and self.verdict != "pass" else ""
        return f"[{self.verdict}] {self.name}: {self.reason}{tail}"


@dataclass
class ValidityReport:
    """Every check run, in order; :attr:`flagged` are those that did not pass."""

    checks: list[Check]

    @property
    def flagged(self) -> list[Check]:
        return [c for c in self.checks if c.verdict != "pass"]

    def verdict(self, name: str) -> str:
        """The verdict of the check called ``name``."""
        for c in self.checks:
            if c.name == name:
                return c.verdict
        raise KeyError(f"no check named {name!r}; ran {[c.name for c in self.checks]}")

    def to_dict(self) -> dict[str, Any]:
        return {"checks": [asdict(c) for c in self.checks]}

    def table(self) -> str:
        return "\n".join(["validity checks:"] + ["  " + c.line() for c in self.checks])


def _logits(model: nn.Module, x: torch.Tensor, output: OutputSpec) -> torch.Tensor:
    return check_logits(select_output(model(x), output), x.shape[0])


def model_checks(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float | None = None,
    output: OutputSpec = None,
    seed: int = 0,
) -> list[Check]:
    """The checks that need only the model and a few clean points (pixels in [0, 1]).

    Args:
        model: the classifier evaluated (left in the mode it was found in).
        x, y: a few clean points (16 to 64 are enough) and their labels.
        eps: the smallest budget evaluated; the noise check perturbs by ``eps / 10``
            (default 1/255).
        output: where the logits are in the model's output.
        seed: seed of the random noise.
    """
    if x.ndim < 2 or x.shape[0] == 0 or x.shape[0] != y.shape[0]:
        raise ConfigError(f"model_checks: needs a batch of points and labels, got {tuple(x.shape)}")
    checks: list[Check] = []
    gen = torch.Generator(device=x.device).manual_seed(seed)
    with preserve_modes(model, training=False):
        with torch.no_grad():
            z1, z2 = _logits(model, x, output), _logits(model, x, output)
        checks.append(_randomness(z1, z2))
        checks.append(_softmax_output(z1))
        checks.append(_saturation(z1))
        checks.append(_classes(z1.shape[1]))
        checks.append(_gradients(model, x, y, output))
        checks.append(_noise_stability(model, x, z1, eps, output, gen))
        checks.append(_inner_gradients(model, x[:2], output))
    return checks


_AUTOGRAD_ENTRY = {"grad", "backward"}  # torch.autograd.grad / .backward (Tensor.backward too)


def _inner_gradients(model: nn.Module, x: torch.Tensor, output: OutputSpec) -> Check:
    """Does one forward pass call autograd? Watched with a profile hook (``sys.setprofile``,
    which leaves coverage tools' ``settrace`` alone): a call of ``torch.autograd.grad`` or
    ``torch.autograd.backward`` from inside the model is a test-time optimisation."""
    calls: list[str] = []

    def watch(frame: Any, event: str, arg: Any) -> None:
        code = frame.f_code
        if event == "call" and code.co_name in _AUTOGRAD_ENTRY:
            path = code.co_filename.replace("\\", "/")
            if path.endswith("torch/autograd/__init__.py"):
                calls.append(code.co_name)

    previous = sys.getprofile()
    sys.setprofile(watch)
    try:
        _logits(model, x, output)
    finally:
        sys.setprofile(previous)
    if not calls:
        return Check("inner_gradients", "pass", "the forward pass computes no gradients")
    return Check(
        "inner_gradients", "warn",
        f"the forward pass calls torch.autograd ({len(calls)} calls: "
        f"{', '.join(sorted(set(calls)))}): the model optimises at test time (a dynamic "
        "defense, e.g. purification by gradient steps), and gradients through that inner "
        "loop are unreliable or differ from what the defense does",
        "attack the whole pipeline adaptively: BPDA over the inner optimisation, EOT if it "
        "is randomised, and gradient-free attacks (square) as a cross-check",
        {"autograd_calls": len(calls)},
    )  # fmt: skip


def _randomness(z1: torch.Tensor, z2: torch.Tensor) -> Check:
    differ = (z1 != z2).any(1)
    if not differ.any():
        return Check("deterministic", "pass", "two identical calls give identical outputs")
    return Check(
        "deterministic", "warn",
        f"two identical calls give different outputs on {int(differ.sum())} of "
        f"{len(differ)} points: the model is randomised, and one draw per gradient follows "
        "noise",
        "attack with EOT (attack_options={'eot_samples': k}) and score each example over "
        "several draws (evaluate does so for models it finds randomised)",
        {"points": differ.nonzero()[:, 0].tolist()},
    )  # fmt: skip


def _softmax_output(z: torch.Tensor) -> Check:
    z = z.float()
    probabilities = bool((z >= 0).all()) and bool(((z.sum(1) - 1).abs() < 1e-4).all())
    if not probabilities:
        return Check("logits", "pass", "the outputs are not probability vectors")
    return Check(
        "logits", "fail",
        "every output row is non-negative and sums to 1: the model returns probabilities, "
        "and cross-entropy or margins computed on them are flat where the softmax saturates",
        "give the attacks the logits (remove the final softmax, or select them with output=)",
        {"row_sums": z.sum(1)[:8].tolist()},
    )  # fmt: skip


def _saturation(z: torch.Tensor) -> Check:
    p = torch.softmax(z.float(), 1)
    saturated = p.amax(1) >= 1.0  # the float32 softmax is exactly one-hot
    share = float(saturated.float().mean())
    if share <= 0.5:
        return Check("saturation", "pass", f"{100 * share:.0f}% of the softmax outputs are one-hot")
    return Check(
        "saturation", "warn",
        f"{100 * share:.0f}% of the points have a softmax that is exactly one-hot in float32 "
        "(logits of scale "
        f"{float(z.float().std(1).median()):.3g}): cross-entropy gradients vanish there, as for "
        "a model whose logits carry a large temperature",
        "use a margin loss (pgd:loss=margin, cw, apgd-t with dlr), which is scale-free",
        {"points": saturated.nonzero()[:, 0].tolist()},
    )  # fmt: skip


def _classes(k: int) -> Check:
    if k >= 4:
        return Check("classes", "pass", f"{k} classes: DLR and targeted attacks apply")
    return Check(
        "classes", "warn",
        f"only {k} classes: the DLR loss needs 3 (targeted: 4), and apgd-t has at most "
        f"{max(k - 1, 0)} targets",
        "use ce or margin losses (pgd, apgd-ce, cw) instead of apgd-t/dlr",
        {"classes": k},
    )  # fmt: skip


def _gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor, output: OutputSpec) -> Check:
    with torch.enable_grad():
        xa = x.detach().clone().requires_grad_(True)
        loss = F.cross_entropy(_logits(model, xa, output).float(), y.to(x.device), reduction="sum")
        grads = torch.autograd.grad(loss, xa, allow_unused=True)[0]
    if grads is None:
        zero = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    else:
        zero = (grads.flatten(1) == 0).all(1)
    if not zero.any():
        return Check("gradients", "pass", "every point has a non-zero input gradient")
    share = float(zero.float().mean())
    if grads is not None and _margin_gradients_live(model, x[zero], y[zero.cpu()], output):
        return Check(
            "gradients", "fail" if share > 0.5 else "warn",
            f"the input gradient of the cross-entropy is exactly zero on {int(zero.sum())} of "
            f"{len(zero)} points while the logit margin's is not: the softmax saturates in "
            "float32 (a large logit scale, as in defensive distillation deployed at T = 1), "
            "so cross-entropy attacks (fgsm, pgd, apgd-ce) stall there",
            "use a margin loss (pgd:loss=margin, cw, apgd-t with dlr), or divide the logits "
            "by their temperature before attacking",
            {"points": zero.nonzero()[:, 0].tolist(), "cause": "saturation"},
        )  # fmt: skip
    return Check(
        "gradients", "fail" if share > 0.5 else "warn",
        f"the input gradient of the loss is exactly zero on {int(zero.sum())} of "
        f"{len(zero)} points: a non-differentiable or gradient-stopping step (quantisation, "
        "rounding, a detached branch) hides the gradient from the attacks",
        "attack through a differentiable stand-in (BPDA: wrap the step as a robustlab "
        "Defense with a surrogate) and add gradient-free attacks (square)",
        {"points": zero.nonzero()[:, 0].tolist()},
    )  # fmt: skip


def _margin_gradients_live(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, output: OutputSpec
) -> bool:
    """Whether the logit margin (true class minus the best other) has a non-zero input
    gradient on every point: then a zero cross-entropy gradient is saturation, not a
    gradient the model hides."""
    with torch.enable_grad():
        xa = x.detach().clone().requires_grad_(True)
        z = _logits(model, xa, output).float()
        y = y.to(x.device)
        others = z.scatter(1, y[:, None], float("-inf")).amax(1)
        margin = (z.gather(1, y[:, None])[:, 0] - others).sum()
        grads = torch.autograd.grad(margin, xa, allow_unused=True)[0]
    return grads is not None and bool((grads.flatten(1) != 0).any(1).all())


def _noise_stability(
    model: nn.Module,
    x: torch.Tensor,
    z: torch.Tensor,
    eps: float | None,
    output: OutputSpec,
    gen: torch.Generator,
) -> Check:
    size = (eps if eps else 1 / 255) / 10
    noise = (torch.rand(x.shape, generator=gen, device=x.device, dtype=x.dtype) * 2 - 1) * size
    with torch.no_grad():
        moved = _logits(model, (x + noise).clamp(0, 1), output).argmax(1) != z.argmax(1)
    share = float(moved.float().mean())
    if share <= 0.1:
        return Check(
            "noise_stability", "pass",
            f"uniform noise of L-inf {size:.3g} changes {100 * share:.0f}% of the predictions",
        )  # fmt: skip
    return Check(
        "noise_stability", "warn",
        f"uniform noise of L-inf {size:.3g} (a tenth of the budget) changes "
        f"{100 * share:.0f}% of the predictions: the decision surface is unstable at a scale "
        "far below eps, which breaks gradient steps (randomness or input quantisation)",
        "use EOT for randomness, BPDA for quantisation, and more restarts",
        {"points": moved.nonzero()[:, 0].tolist(), "noise": size},
    )  # fmt: skip


def report_checks(report: Any, noise: Sequence[float] | None = None) -> list[Check]:
    """The checks that read an evaluation's results.

    Args:
        report: an :class:`~robustlab.evaluate.robustness.EvalReport`.
        noise: accuracy under random sign noise at each of the report's eps (the same
            points; :func:`noise_accuracy`), for Carlini et al.'s "noise is weaker than
            the attacks".
    """
    from robustlab.attacks import ATTACKS
    from robustlab.evaluate.robustness import AttackSpec

    checks: list[Check] = []
    gradient_free = []
    compared = False  # did a gradient-free attack run after a gradient one at all?
    for r in report.results:
        gradient_ran = False
        for s in r.stages:
            uses = ATTACKS.get(AttackSpec.parse(s.attack).name).uses_gradients
            compared |= not uses and gradient_ran
            if not uses and gradient_ran and s.broken:
                gradient_free.append({"eps": r.eps, "attack": s.attack, "broken": s.broken})
            gradient_ran |= uses
    if gradient_free:
        checks.append(Check(
            "gradient_free_weaker", "fail",
            "a gradient-free attack broke points the gradient attacks had left standing ("
            + ", ".join(f"{g['broken']} by {g['attack']} at eps {g['eps']:g}"
                        for g in gradient_free)
            + "): the gradients are masked or the gradient attacks too weak",
            "attack adaptively (EOT for randomness, BPDA for non-differentiable steps), raise "
            "iterations and restarts, use the margin loss",
            {"cases": gradient_free},
        ))  # fmt: skip
    else:
        checks.append(Check(
            "gradient_free_weaker", "pass",
            "no gradient-free attack broke a point the gradient attacks missed" if compared
            else "not checked: no gradient-free attack ran after the gradient ones (add "
            "square to the attacks to look for gradients that only a black box gets past)",
        ))  # fmt: skip
    if noise is not None:
        worse = [
            {"eps": r.eps, "noise": a, "attacks": r.robust_accuracy}
            for r, a in zip(report.results, noise)
            if a < r.robust_accuracy
        ]
        if worse:
            checks.append(Check(
                "noise_weaker", "fail",
                "random noise breaks more points than the attacks ("
                + ", ".join(f"eps {w['eps']:g}: noise {100 * w['noise']:.1f}% vs attacks "
                            f"{100 * w['attacks']:.1f}%" for w in worse)
                + "): the attacks are not working",
                "check the loss (logits, not probabilities), the step size and the gradients",
                {"cases": worse},
            ))  # fmt: skip
        else:
            checks.append(Check("noise_weaker", "pass", "random noise is weaker than the attacks"))
    return checks


@torch.no_grad()
def noise_accuracy(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: Sequence[float],
    *,
    draws: int = 4,
    output: OutputSpec = None,
    seed: int = 0,
    batch_size: int = 256,
) -> list[float]:
    """Accuracy under random sign noise of L-inf size ``eps`` (a point counts as correct
    only if it survives every one of ``draws`` draws), per eps. ``x`` may be uint8 images
    (converted per batch) on any device; the model's device is used."""
    from robustlab.data.base import to_float
    from robustlab.evaluate.clean import model_device

    dev = model_device(model) if isinstance(model, nn.Module) else x.device
    gen = torch.Generator(device=dev).manual_seed(seed)
    correct = [0] * len(eps)
    with preserve_modes(model, training=False):
        for i in range(0, len(x), batch_size):
            xb, yb = to_float(x[i : i + batch_size]).to(dev), y[i : i + batch_size].to(dev)
            gen.manual_seed(seed)  # per batch: noise depends on a point's place in its batch
            clean = _logits(model, xb, output).argmax(1) == yb
            for k, e in enumerate(eps):
                ok = clean.clone()
                for _ in range(draws):
                    sign = torch.randint(0, 2, xb.shape, generator=gen, device=dev).to(xb.dtype)
                    xn = (xb + e * (2 * sign - 1)).clamp(0, 1)
                    ok &= _logits(model, xn, output).argmax(1) == yb
                correct[k] += int(ok.sum())
    return [c / len(x) for c in correct]


def _default(spec: Any, option: str) -> Any:
    """The value of ``option`` in ``spec``: given, else the attack's default (looked up
    along its classes: APGD-T takes ``steps`` from APGD); None when it has none."""
    import inspect

    from robustlab.attacks import ATTACKS

    if option in spec.options:
        return spec.options[option]
    for klass in ATTACKS.get(spec.name).__mro__:
        if "__init__" in vars(klass):
            param = inspect.signature(klass.__init__).parameters.get(option)
            if param is not None and param.default is not inspect.Parameter.empty:
                return param.default
    return None


def _steps(spec: Any) -> int | None:
    """The iterations ``spec`` runs (None for an attack without a fixed step count)."""
    steps = _default(spec, "steps")
    return int(steps) if isinstance(steps, int) and not isinstance(steps, bool) else None


def costly_checks(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    report: Any,
    *,
    seed: int = 0,
) -> list[Check]:
    """The checks that attack again (``checks="full"``), on the points ``x, y`` (the first
    of the report's points; 64 are enough). Cost: a 50-step unbounded PGD, one FGSM per
    eps, and on the points the ensemble left, the first gradient attack again with twice
    its steps, with twice its restarts, and once with its loss recorded.

    - ``unbounded``: PGD with the margin loss from the clean point (no random start: a
      random image is misclassified by chance) over the whole pixel range must break
      almost every point; if not, the attack cannot reach the boundary (Pintor et al.).
    - ``single_step_weaker``: FGSM must not break more points than the ensemble did.
    - ``converged``: doubling the steps or the restarts of the first gradient attack
      breaks (almost) nothing new (Carlini et al. 2019).
    - ``loss_settled``: along the first gradient attack's path the best loss has stopped
      rising on most of the points it left (Pintor et al. 2022's incomplete
      optimisation; :func:`_still_moving`). Only for attacks whose loss can be recorded
      (PGD, BIM, APGD, APGD-T), at each eps where points are left.
    """
    from robustlab.attacks import ATTACKS, FGSM, PGD
    from robustlab.attacks.base import attack_options
    from robustlab.evaluate.robustness import AttackSpec

    norm, n = report.norm, x.shape[0]
    checks: list[Check] = []
    with torch.no_grad(), preserve_modes(model, training=False):
        clean_ok = _logits(model, x, None).argmax(1) == y
    big = 1.0 if norm == "linf" else float(x[0].numel()) ** 0.5  # covers [0, 1]^d
    unbounded = PGD(model, eps=big, norm=norm, steps=50, step_size=big / 25, loss="margin",
                    random_start=False, early_stop=True, seed=seed).run(x, y)  # fmt: skip
    left = clean_ok & ~unbounded.success
    share = float(left.float().mean())
    checks.append(Check(
        "unbounded", "pass" if share <= 0.05 else "fail",
        f"an unbounded PGD-50 (margin loss) leaves {100 * share:.0f}% of {n} points correct"
        + ("" if share <= 0.05 else ": the attack cannot reach the decision boundary even "
           "without a budget, so its bounded figures prove nothing"),
        "look for masked gradients (see the gradients check), use BPDA or gradient-free attacks",
        {"points": left.nonzero()[:, 0].tolist()},
    ))  # fmt: skip
    weaker, stalled, moving = [], [], []
    grad_spec = next(
        (AttackSpec.parse(a) for a in report.attacks
         if ATTACKS.get(AttackSpec.parse(a).name).uses_gradients),
        None,
    )  # fmt: skip
    steps = _steps(grad_spec) if grad_spec is not None else None
    for r in report.results:
        robust = report.robust[r.eps][:n].to(x.device)
        fgsm = FGSM(model, eps=r.eps, norm=norm).run(x, y).success
        fgsm_acc, ens_acc = float((clean_ok & ~fgsm).float().mean()), float(robust.float().mean())
        if fgsm_acc < ens_acc:
            weaker.append({"eps": r.eps, "fgsm": fgsm_acc, "ensemble": ens_acc})
        if steps is None or not robust.any():
            continue
        idx = robust.nonzero()[:, 0]
        accepted = attack_options(ATTACKS.get(grad_spec.name))
        doubled = {"steps": 2 * steps}
        if "restarts" in accepted:
            doubled["restarts"] = 2 * int(grad_spec.options.get("restarts", 1))
        for option, value in doubled.items():
            spec = AttackSpec(grad_spec.name, {**grad_spec.options, option: value})
            more = int(spec.build(model, r.eps, norm, seed).run(x[idx], y[idx]).success.sum())
            if more > max(1, 0.02 * n):
                stalled.append({"eps": r.eps, option: value, "newly_broken": more})
        trace = _loss_trace(model, x[idx], y[idx], grad_spec, steps, r.eps, norm, seed)
        if trace is not None:
            still = _still_moving(trace)
            moving.append({"eps": r.eps, "points": idx[still].tolist(),
                           "share": float(still.float().mean())})  # fmt: skip
    checks.append(Check(
        "single_step_weaker", "fail" if weaker else "pass",
        "FGSM is weaker than the ensemble at every eps" if not weaker else
        "single-step FGSM breaks more points than the ensemble ("
        + ", ".join(f"eps {w['eps']:g}: {100 * w['fgsm']:.1f}% vs {100 * w['ensemble']:.1f}%"
                    for w in weaker) + "): the iterative attacks are failing",
        "check step size and iterations; add restarts and the margin loss",
        {"cases": weaker},
    ))  # fmt: skip
    checks.append(Check(
        "converged", "warn" if stalled else "pass",
        "doubling the first gradient attack's steps or restarts breaks nothing new"
        if not stalled else
        "doubling the first gradient attack's steps or restarts breaks more points ("
        + ", ".join(f"eps {s['eps']:g}, " + ("steps" if "steps" in s else "restarts")
                    + f" {s.get('steps', s.get('restarts'))}: {s['newly_broken']}"
                    for s in stalled)
        + "): the attack had not converged",
        "raise the steps (and restarts) until doubling them changes nothing",
        {"cases": stalled},
    ))  # fmt: skip
    if moving:
        # Near the decision boundary a fixed-step PGD's loss creeps up long after it has
        # stopped breaking points (a standard MNIST model at eps 0.2: on 20-30% of the 15
        # points PGD-20 left of 200, at 20 and at 100 steps): a warning needs most of them.
        unfinished = [m for m in moving if m["share"] > 0.5]
        shares = ", ".join(f"{100 * m['share']:.0f}% at eps {m['eps']:g}" for m in moving)
        checks.append(Check(
            "loss_settled", "warn" if unfinished else "pass",
            ("the first gradient attack's best loss was still rising in its last tenth of "
             "steps on most of the points it left (" if unfinished else
             "the first gradient attack's best loss had settled on most of the points it "
             "left (still rising on ") + shares + ")"
            + (": it stopped before the optimisation was complete" if unfinished else ""),
            "use an attack that adapts its step (apgd-ce, apgd-t), or raise the steps at a "
            "fixed step_size (PGD's default step, 2.5 eps / steps, shrinks as steps grow)",
            {"cases": moving},
        ))  # fmt: skip
    return checks


#: attacks whose loss can be recorded (they accept a loss function, ``early_stop`` and
#: ``restarts``, and evaluate the loss of the whole batch once per step)
_TRACEABLE = ("pgd", "bim", "apgd", "apgd-t")


def _loss_trace(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, spec: Any, steps: int,
    eps: float, norm: str, seed: int,
) -> torch.Tensor | None:  # fmt: skip
    """The per-point loss (steps + 1, B) along one run of ``spec`` (one restart, no early
    stop), recorded through a loss function that computes the spec's own loss; None for
    an attack that does not take one."""
    from robustlab.attacks.base import attack_loss

    if spec.name not in _TRACEABLE:
        return None
    kind = _default(spec, "loss")
    rows: list[torch.Tensor] = []

    def recorded(logits: torch.Tensor, y_: torch.Tensor, target: Any) -> torch.Tensor:
        value = attack_loss(logits, y_, kind, target)
        if value.shape[0] == x.shape[0] and len(rows) <= steps:  # the first run's whole batch
            rows.append(value.detach().float())
        return value

    options = {**spec.options, "loss": recorded, "restarts": 1, "early_stop": False}
    if spec.name == "apgd-t":
        options["n_target_classes"] = 1
    from robustlab.evaluate.robustness import AttackSpec

    AttackSpec(spec.name, options).build(model, eps, norm, seed).run(x, y)
    return torch.stack(rows) if len(rows) > 1 else None


def _still_moving(trace: torch.Tensor, tolerance: float = 0.05) -> torch.Tensor:
    """Pintor et al. (2022)'s incomplete-optimisation indicator for a maximised loss: per
    point, the running best loss rescaled to [0, 1] by the range the loss covered, and
    whether it rose by more than ``tolerance`` over the last tenth of the steps (their
    last 10 of 100; at least one step)."""
    best = trace.cummax(0).values
    span = (trace.amax(0) - trace.amin(0)).clamp_min(1e-12)
    k = max(1, math.ceil((trace.shape[0] - 1) / 10))
    return (best[-1] - best[-1 - k]) / span > tolerance
