"""The attack interface and the machinery every attack shares.

An attack is built once from a model and a threat model, then called on batches::

    attack = PGD(model, eps=0.3, steps=40)
    x_adv = attack(x, y)                 # adversarial examples only (no extra forward pass)
    result = attack.run(x, y)            # also per-sample success

Contracts (DESIGN.md) enforced here for every attack:

- pixels in [0, 1]; ``eps`` in pixel units; the output lies in the threat model
  (``||x_adv - x|| <= eps`` and ``x_adv`` in [0, 1]), with the input's shape, dtype and
  device, and never NaN;
- the model is left as found: every module's train/eval mode is restored, no
  gradient is accumulated on parameters (input gradients come from
  ``torch.autograd.grad``), no parameter changes, and with ``model_mode="train"`` every
  buffer (batch norm running statistics, ``num_batches_tracked``) is put back;
- bad input (pixels outside [0, 1], NaN, wrong shapes, labels out of range, negative
  eps, a model whose output is not a 2-D logit tensor) raises an error naming it.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any, ClassVar, NamedTuple, TypeAlias

import torch
import torch.nn.functional as F
from torch import nn

from robustlab.errors import RobustlabError, did_you_mean
from robustlab.nn.adapt import OutputError, OutputSpec, check_logits, preserve_modes, select_output
from robustlab.registry import Registry, init_options

#: name -> Attack subclass
ATTACKS: Registry[type[Attack]] = Registry("attack")

NORMS = ("linf", "l2")
LOSSES = ("ce", "margin", "dlr")
#: a loss given as a function: ``(logits (B, K), y (B,), target (B,) or None) -> (B,)``,
#: the per-sample value the attack maximises
LossFn: TypeAlias = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]
TARGET_MODES = (False, True, "random", "least_likely")
#: arithmetic of the model's passes inside an attack (see :class:`Attack`)
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def cpu_has_bf16() -> bool:
    """Whether this CPU has native bf16 arithmetic (AVX512-BF16 or AMX), where bf16
    convolutions and matrix products beat fp32 ones; Linux only (elsewhere False)."""
    global _CPU_BF16
    if _CPU_BF16 is None:
        try:
            with open("/proc/cpuinfo") as f:
                flags = next((line for line in f if line.startswith("flags")), "").split()
        except OSError:
            flags = []
        _CPU_BF16 = "avx512_bf16" in flags or "amx_bf16" in flags
    return _CPU_BF16


_CPU_BF16: bool | None = None


class AttackError(RobustlabError, ValueError):
    """Invalid input to an attack."""


class AttackOutputError(AttackError, OutputError):
    """The model's output is not (or ``output_fn`` does not select) a logits tensor."""


class AttackResult(NamedTuple):
    """What :meth:`Attack.run` returns."""

    x_adv: torch.Tensor  #: adversarial examples, same shape/dtype/device as the input
    success: torch.Tensor  #: bool (B,): misclassified (untargeted) or target reached (targeted)
    #: long (B,): gradient steps taken (over all restarts; for APGD-T, all targets) before
    #: each point first fooled the model, 0 for its starting point, -1 where it never
    #: did; None where the attack does not count steps (PGD, BIM, APGD and APGD-T do)
    first_step: torch.Tensor | None = None


# ----------------------------------------------------------------------------- losses


def _other_max(logits: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
    """max over i != cls of logits[:, i]."""
    masked = logits.scatter(1, cls[:, None], float("-inf"))
    return masked.amax(1)


def attack_loss(
    logits: torch.Tensor, y: torch.Tensor, kind: str | LossFn, target: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-sample loss an attack maximises.

    - a function ``kind(logits, y, target)``: its value, checked to hold one number per
      sample (an adaptive attack's own objective, e.g. evading a detector).
    - ``ce``: cross-entropy of the true class; targeted: minus that of the target.
    - ``margin``: Carlini & Wagner's logit margin ``max_{i != y} z_i - z_y``; targeted:
      ``z_t - max_{i != t} z_i``. Positive exactly when the attack succeeds.
    - ``dlr``: Croce & Hein (2020)'s difference of logits ratio,
      ``-(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3)``; targeted:
      ``-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2)`` (pi sorts the logits decreasingly).
    """
    if callable(kind):
        value = kind(logits, y, target)
        if not isinstance(value, torch.Tensor) or value.shape != (logits.shape[0],):
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise AttackError(
                f"a loss function must return one value per sample, shape ({logits.shape[0]},); "
                f"got {got}"
            )
        return value.float()
    logits = logits.float()
    if kind == "ce":
        if target is None:
            return F.cross_entropy(logits, y, reduction="none")
        return -F.cross_entropy(logits, target, reduction="none")
    if kind == "margin":
        if target is None:
            return _other_max(logits, y) - logits.gather(1, y[:, None])[:, 0]
        return logits.gather(1, target[:, None])[:, 0] - _other_max(logits, target)
    if kind == "dlr":
        if logits.shape[1] < (3 if target is None else 4):
            raise AttackError(f"the dlr loss needs at least {3 if target is None else 4} classes")
        top = logits.sort(1, descending=True).values
        z_y = logits.gather(1, y[:, None])[:, 0]
        if target is None:
            return -(z_y - _other_max(logits, y)) / (top[:, 0] - top[:, 2] + 1e-12)
        z_t = logits.gather(1, target[:, None])[:, 0]
        return -(z_y - z_t) / (top[:, 0] - 0.5 * (top[:, 2] + top[:, 3]) + 1e-12)
    raise AttackError(f"unknown loss {kind!r}{did_you_mean(kind, LOSSES)} (choose from {LOSSES})")


def still_robust(success: torch.Tensor, rounds: int) -> Iterator[torch.Tensor]:
    """Indices of the samples not yet fooled, for up to ``rounds`` rounds.

    Stops early once every sample is fooled; the caller updates ``success`` in place
    between rounds (restarts that only attack what earlier rounds left standing).
    """
    for _ in range(rounds):
        idx = (~success).nonzero()[:, 0]
        if idx.numel() == 0:
            return
        yield idx


def check_loss(loss: str | LossFn) -> str | LossFn:
    """Return ``loss`` if it names an attack loss or is a function (see :data:`LossFn`),
    else raise naming the choices."""
    if callable(loss):
        return loss
    if loss not in LOSSES:
        raise AttackError(
            f"unknown loss {loss!r}{did_you_mean(str(loss), LOSSES)} (choose from {LOSSES})"
        )
    return loss


# ----------------------------------------------------------------------------- geometry


def _view(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *([1] * (like.ndim - 1)))


def lp_norm(delta: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-sample L-inf or L2 norm of a batch."""
    flat = delta.flatten(1)
    return flat.abs().amax(1) if norm == "linf" else flat.norm(p=2, dim=1)


def project(
    x_adv: torch.Tensor, x: torch.Tensor, eps: float | torch.Tensor, norm: str
) -> torch.Tensor:
    """Project onto the eps-ball around ``x`` intersected with [0, 1]."""
    delta = x_adv - x
    if norm == "linf":
        e = _view(eps, x) if isinstance(eps, torch.Tensor) else eps
        delta = (
            torch.maximum(torch.minimum(delta, e), -e)
            if isinstance(e, torch.Tensor)
            else delta.clamp(-e, e)
        )
    else:
        e = (
            eps
            if isinstance(eps, torch.Tensor)
            else torch.full((x.shape[0],), float(eps), device=x.device)
        )
        n = lp_norm(delta, "l2")
        delta = delta * _view(torch.clamp(e / (n + 1e-12), max=1.0), x)
    # Clamping x + delta to [0, 1] moves each pixel towards x, so the norm only shrinks.
    return (x + delta).clamp(0.0, 1.0)


def normalize_step(grad: torch.Tensor, norm: str) -> torch.Tensor:
    """Steepest-ascent direction of unit norm: sign (L-inf) or grad / ||grad||_2 (L2)."""
    if norm == "linf":
        return grad.sign()
    return grad / _view(lp_norm(grad, "l2") + 1e-12, grad)


def random_start(
    x: torch.Tensor, eps: float, norm: str, generator: torch.Generator | None = None
) -> torch.Tensor:
    """A uniform random point of the eps-ball (clipped to [0, 1])."""
    if norm == "linf":
        delta = (
            torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) * 2 - 1
        ) * eps
    else:
        d = x[0].numel()
        direction = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        direction = direction / _view(lp_norm(direction, "l2") + 1e-12, x)
        radius = torch.rand(x.shape[0], generator=generator, device=x.device, dtype=x.dtype) ** (
            1.0 / d
        )
        delta = direction * _view(radius * eps, x)
    return (x + delta).clamp(0.0, 1.0)


# ----------------------------------------------------------------------------- base class


def _check_eps(eps: Any) -> float:
    """``eps`` as a float, or an :class:`AttackError` naming what is wrong with it."""
    if isinstance(eps, (str, bytes, bool)):
        raise AttackError(f"eps must be a number, got {eps!r}")
    try:
        value = float(eps)
    except (TypeError, ValueError, RuntimeError):  # RuntimeError: a tensor of several values
        raise AttackError(f"eps must be a number, got {eps!r}") from None
    if not math.isfinite(value) or value < 0:
        raise AttackError(f"eps must be a finite number >= 0, got {eps}")
    return value


@contextlib.contextmanager
def _buffers_restored(model: Any, active: bool) -> Iterator[None]:
    """Put every buffer of ``model`` back afterwards (when ``active``).

    Train-mode passes update running statistics (batch norm's ``running_mean``,
    ``running_var``, ``num_batches_tracked``; spectral norm's power-iteration vectors);
    an attack run in train mode must not leave them moved.
    """
    if not active or not isinstance(model, nn.Module):
        yield
        return
    saved = [
        (m, name, buf, buf.detach().clone())
        for m in model.modules()
        for name, buf in m.named_buffers(recurse=False)
        if not nn.parameter.is_lazy(buf)
    ]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, name, buf, value in saved:
                buf.copy_(value)
                m._buffers[name] = buf


class Attack:
    """Base class of every attack.

    Args:
        model: a classifier taking pixels in [0, 1] and returning logits (B, K).
        eps: perturbation budget in pixel units (``None`` only for minimum-norm attacks).
        norm: ``"linf"`` or ``"l2"``.
        targeted: ``False``; ``True`` (pass ``target=`` to the call); ``"random"`` (a
            random wrong class); ``"least_likely"`` (the class the clean logits rank last).
        output_fn: where the logits are in the model's output, for models returning
            tuples or dicts: an index (``0``), a key (``"logits"``) or a function
            (``lambda out: out.logits``).
        eot_samples: gradients (and losses) are averaged over this many forward passes:
            Expectation over Transformation for randomised models (see :func:`EOT`).
        model_mode: ``"eval"`` (default) or ``"train"``: the mode the model runs in
            during the attack; every module's original mode is restored afterwards.
        seed: seed of the attack's own randomness (random starts, targets, Square's
            proposals); ``None`` uses torch's global generator.
        precision: arithmetic of the model's passes during the attack: ``"fp32"``;
            ``"bf16"`` (autocast; CPU or CUDA); ``"fp16"`` (autocast, CUDA only); ``"auto"``
            (default): bf16 on CPUs with native bf16 units (AVX512-BF16 or AMX) for a
            float32 model in eval mode and a gradient attack with a budget (minimum-norm
            attacks measure distances to the boundary and gradient-free ones compare close
            losses, where bf16 was measured weaker: they stay in fp32, and minimum-norm
            ones refuse reduced precision), where it was measured faster and as strong
            (BENCHMARKS.md), else fp32. Success is always decided in fp32: every point a
            reduced-precision pass calls fooled is confirmed by an fp32 pass before it
            counts (or stops an early-stopping attack), and :meth:`run` judges the
            returned points in fp32.
        channels_last: pass 4-D inputs to the model in the channels_last (NHWC) layout,
            without touching the model (its weights keep their layout); ``None``
            (default): on for models with 2-D convolutions when the passes run in reduced
            precision (where it was measured to help). The returned points have the
            input's layout. For a frozen copy with channels_last weights too, attack
            :func:`~robustlab.attacks.fast_model` (what ``evaluate`` does).
    """

    name: ClassVar[str] = "attack"
    uses_gradients: ClassVar[bool] = True
    minimum_norm: ClassVar[bool] = False  # eps optional: the attack finds the smallest perturbation

    def __init__(
        self,
        model: nn.Module,
        *,
        eps: float | None,
        norm: str = "linf",
        targeted: bool | str = False,
        output_fn: OutputSpec = None,
        eot_samples: int = 1,
        model_mode: str = "eval",
        seed: int | None = None,
        precision: str = "auto",
        channels_last: bool | None = None,
    ) -> None:
        if not isinstance(model, nn.Module) and not callable(model):
            raise AttackError(f"model must be an nn.Module or callable, got {type(model).__name__}")
        if eps is None and not self.minimum_norm:
            minimum_norm = [n for n in ATTACKS.names() if ATTACKS.get(n).minimum_norm]
            raise AttackError(
                f"{self.name} needs eps (a number >= 0); only minimum-norm attacks "
                f"({', '.join(minimum_norm)}) accept eps=None"
            )
        if eps is not None:
            eps = _check_eps(eps)
        if norm not in NORMS:
            raise AttackError(
                f"unknown norm {norm!r}{did_you_mean(str(norm), NORMS)} (choose linf or l2)"
            )
        if targeted not in TARGET_MODES:
            raise AttackError(f"targeted must be one of {TARGET_MODES}, got {targeted!r}")
        if eot_samples < 1:
            raise AttackError(f"eot_samples must be >= 1, got {eot_samples}")
        if model_mode not in ("eval", "train"):
            raise AttackError(f"model_mode must be 'eval' or 'train', got {model_mode!r}")
        if precision not in PRECISIONS:
            raise AttackError(
                f"unknown precision {precision!r}{did_you_mean(str(precision), PRECISIONS)} "
                f"(choose from {', '.join(PRECISIONS)})"
            )
        if precision != "fp32" and precision != "auto" and model_mode == "train":
            raise AttackError(
                f"precision={precision!r} needs model_mode='eval': success is confirmed in "
                "fp32 on the points in question, which batch norm in train mode would change"
            )
        if precision in ("bf16", "fp16") and self.minimum_norm:
            raise AttackError(
                f"{self.name} finds the smallest perturbation, a distance bf16/fp16 rounding "
                "would decide: it runs in fp32 (precision='fp32' or 'auto')"
            )
        if channels_last not in (None, True, False):
            raise AttackError(f"channels_last must be True, False or None, got {channels_last!r}")
        index_or_key = isinstance(output_fn, (int, str)) and not isinstance(output_fn, bool)
        if output_fn is not None and not (index_or_key or callable(output_fn)):
            raise AttackError(
                f"output_fn must be an index, a key or a function, got {type(output_fn).__name__}"
            )
        self.model = model
        self.eps = None if eps is None else float(eps)
        self.norm = norm
        self.targeted = targeted
        self.output_fn = output_fn
        self.eot_samples = eot_samples
        self.model_mode = model_mode
        self.seed = seed
        self.precision = precision
        self.channels_last = channels_last
        self._generator: torch.Generator | None = None
        self._reduced: torch.dtype | None = None  #: autocast dtype of the running call
        #: images sent through the model so far, without and with an input gradient
        #: (every call of :meth:`logits` counts; where an evaluation's time goes)
        self.passes = {"forward": 0, "gradient": 0}

    # -- public API ------------------------------------------------------------------

    def __call__(
        self, x: torch.Tensor, y: torch.Tensor, *, target: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Adversarial examples for ``(x, y)``; see the class docstring for the contracts."""
        return self._execute(x, y, target, need_success=False).x_adv

    def run(
        self, x: torch.Tensor, y: torch.Tensor, *, target: torch.Tensor | None = None
    ) -> AttackResult:
        """Adversarial examples and per-sample success."""
        return self._execute(x, y, target, need_success=True)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(eps={self.eps}, norm={self.norm!r}, targeted={self.targeted!r})"
        )

    # -- to implement ----------------------------------------------------------------

    def _perturb(
        self, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None, need_success: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None] | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return (x_adv, success or None), or (x_adv, success, first_step) from an attack
        that counts steps (see :class:`AttackResult`). ``success`` may be None; the base
        computes it."""
        raise NotImplementedError

    # -- helpers for subclasses --------------------------------------------------------

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The model's logits for ``x``, checked to be a (B, K) tensor."""
        kind = "gradient" if torch.is_grad_enabled() and x.requires_grad else "forward"
        self.passes[kind] += x.shape[0]
        try:
            return check_logits(select_output(self.model(x), self.output_fn), x.shape[0])
        except OutputError as err:  # the attacks' keyword is output_fn
            raise AttackOutputError(str(err).replace("output=", "output_fn=")) from None

    def loss_and_grad(
        self, x_adv: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None, loss: str | LossFn
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-sample loss, its input gradient and the logits at ``x_adv``.

        With ``eot_samples = n`` the loss and gradient are averaged over n passes.
        """
        total_loss = total_grad = None
        with torch.enable_grad():
            for _ in range(self.eot_samples):
                xa = x_adv.detach().requires_grad_(True)
                logits = self.logits(xa)
                value = attack_loss(logits, y, loss, target)
                (grad,) = torch.autograd.grad(value.sum(), xa)
                total_loss = value.detach() if total_loss is None else total_loss + value.detach()
                total_grad = grad if total_grad is None else total_grad + grad
        if self.eot_samples > 1:  # no extra full-size tensor ops on the common path
            total_loss, total_grad = total_loss / self.eot_samples, total_grad / self.eot_samples
        return total_loss, total_grad, logits.detach()  # type: ignore[return-value]

    @torch.no_grad()
    def loss_value(
        self, x_adv: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None, loss: str | LossFn
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample loss (averaged over EOT draws) and the last logits, no gradients."""
        total = None
        for _ in range(self.eot_samples):
            logits = self.logits(x_adv)
            value = attack_loss(logits, y, loss, target)
            total = value if total is None else total + value
        return total / float(self.eot_samples), logits  # type: ignore[operator]

    def is_success(
        self, logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None
    ) -> torch.Tensor:
        pred = logits.argmax(1)
        return pred == target if target is not None else pred != y

    def confirmed(
        self, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None, fooled: torch.Tensor
    ) -> torch.Tensor:
        """``fooled`` (a bool mask over ``x``'s rows, from reduced-precision logits) with
        every True checked by an fp32 pass; unchanged in fp32. Attacks pass each point
        they would call fooled through here, so reduced precision never decides success."""
        if self._reduced is None or not bool(fooled.any()):
            return fooled
        idx = fooled.nonzero()[:, 0]
        with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
            t = target[idx] if target is not None else None
            ok = self.is_success(self.logits(x[idx].detach()), y[idx], t)
        out = fooled.clone()
        out[idx] = ok
        return out

    @property
    def generator(self) -> torch.Generator | None:
        return self._generator

    # -- machinery ---------------------------------------------------------------------

    @contextlib.contextmanager
    def _model_state(self, device: torch.device) -> Iterator[None]:
        if self.seed is not None:
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(self.seed)
        train = self.model_mode == "train"
        try:
            with preserve_modes(self.model, training=train), _buffers_restored(self.model, train):
                yield
        finally:
            self._generator = None

    def _check_inputs(
        self, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise AttackError(
                f"x must be a floating-point tensor, got {getattr(x, 'dtype', type(x).__name__)}"
            )
        if x.ndim < 2 or x.shape[0] == 0:
            raise AttackError(f"x must be a non-empty batch (B, ...), got shape {tuple(x.shape)}")
        if torch.isnan(x).any():
            raise AttackError("x contains NaN")
        lo, hi = float(x.min()), float(x.max())
        if lo < 0.0 or hi > 1.0:
            raise AttackError(
                f"x must hold pixels in [0, 1] (normalisation belongs inside the model), "
                f"got values in [{lo:.4g}, {hi:.4g}]"
            )
        y = torch.as_tensor(y, device=x.device)
        if y.ndim != 1 or y.shape[0] != x.shape[0]:
            raise AttackError(f"y must have shape ({x.shape[0]},), got {tuple(y.shape)}")
        if y.is_floating_point():
            raise AttackError(f"y must hold integer class labels, got {y.dtype}")
        y = y.long()
        if target is not None:
            target = torch.as_tensor(target, device=x.device).long()
            if target.shape != y.shape:
                raise AttackError(
                    f"target must have shape {tuple(y.shape)}, got {tuple(target.shape)}"
                )
        elif self.targeted is True:
            raise AttackError(
                f"{self.name} was built with targeted=True: pass target=... to the call"
            )
        return x, y, target

    def _resolve_target(
        self, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None, k: int
    ):
        if target is not None or self.targeted is False:
            return target
        if self.targeted == "random":
            shift = torch.randint(1, k, y.shape, generator=self._generator, device=y.device)
            return (y + shift) % k
        with torch.no_grad():  # least likely among the wrong classes
            return self.logits(x).scatter(1, y[:, None], float("inf")).argmin(1)

    def _reduced_dtype(self, x: torch.Tensor) -> torch.dtype | None:
        """The autocast dtype of this call (``precision``), or None for fp32."""
        if self.precision == "fp32":
            return None
        if self.precision == "fp16":
            if x.device.type != "cuda":
                raise AttackError("precision='fp16' needs a CUDA device; on the CPU use 'bf16'")
            return torch.float16
        if self.precision == "bf16":
            if x.device.type not in ("cpu", "cuda"):
                raise AttackError(f"precision='bf16' needs a CPU or CUDA device, got {x.device}")
            return torch.bfloat16
        if not isinstance(self.model, nn.Module):
            return None
        # fp32 where bf16 was measured weaker: minimum-norm attacks measure distances to
        # the boundary, and gradient-free ones (Square) compare losses whose differences
        # bf16 rounds away (fewer points broken at equal queries)
        auto = (
            not self.minimum_norm and self.uses_gradients
            and x.device.type == "cpu" and cpu_has_bf16() and self.model_mode == "eval"
            and x.dtype == torch.float32
            and all(p.dtype == torch.float32 for p in self.model.parameters())
            and any(isinstance(m, (nn.Conv2d, nn.Linear)) for m in self.model.modules())
        )  # fmt: skip
        return torch.bfloat16 if auto else None

    def _wants_channels_last(self, x: torch.Tensor, reduced: torch.dtype | None) -> bool:
        if x.ndim != 4 or self.channels_last is False:
            return False
        if self.channels_last:
            return True
        # measured (BENCHMARKS.md): faster with bf16 on a ResNet at batch 64, a wash with
        # fp32 or on small_cnn; so by default only with reduced precision
        return (
            reduced is not None
            and isinstance(self.model, nn.Module)
            and any(isinstance(m, nn.Conv2d) for m in self.model.modules())
        )

    def _execute(
        self, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None, need_success: bool
    ) -> AttackResult:
        x, y, target = self._check_inputs(x, y, target)
        reduced = self._reduced_dtype(x)
        layout = torch.channels_last if self._wants_channels_last(x, reduced) else None
        x_in = x if layout is None else x.contiguous(memory_format=layout)
        self._reduced = reduced
        try:
            with torch.autocast(x.device.type, dtype=reduced or torch.float32,
                                enabled=reduced is not None):  # fmt: skip
                x_adv, success, first_step = self._attack(x_in, y, target, need_success)
        finally:
            self._reduced = None
        if layout is not None and x.is_contiguous():  # the caller's layout back
            x_adv = x_adv.contiguous()
        return AttackResult(x_adv, success, first_step)

    def _attack(
        self, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None, need_success: bool
    ) -> AttackResult:
        with self._model_state(x.device):
            if isinstance(self.model, nn.Module):  # probe in eval mode: no BN statistics move
                self.model.eval()
            with torch.no_grad():
                k = self.logits(x[:1]).shape[1]
            if isinstance(self.model, nn.Module):
                self.model.train(self.model_mode == "train")
            bad = (y < 0) | (y >= k)
            if target is not None:
                bad |= (target < 0) | (target >= k)
            if bad.any():
                raise AttackError(f"labels must lie in 0..{k - 1} for this model ({k} logits)")
            target = self._resolve_target(x, y, target, k)
            out = self._perturb(x.detach(), y, target, need_success)
            x_adv, success = out[0], out[1]
            first_step = out[2] if len(out) == 3 else None
            x_adv = x_adv.detach().to(dtype=x.dtype)
            if self.eps is not None:  # final guarantee; samples already inside stay bit-exact
                outside = lp_norm(x_adv - x, self.norm) > self.eps + 1e-6  # contract tolerance
                outside |= (x_adv < 0).flatten(1).any(1)
                outside |= (x_adv > 1).flatten(1).any(1)
                if outside.any():  # e.g. a minimum-norm attack given a budget
                    x_adv = torch.where(
                        _view(outside, x), project(x_adv, x, self.eps, self.norm), x_adv
                    )
                    success = None  # judge the projected points
            if need_success and (success is None or self._reduced is not None):
                with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
                    success = self.is_success(self.logits(x_adv), y, target)  # fp32 decides
        return AttackResult(
            x_adv, success if success is not None else torch.zeros(0, dtype=torch.bool), first_step
        )


def attack_options(cls: type[Attack]) -> set[str]:
    """Keyword options an attack class accepts (its own and its bases'), minus model/eps/norm."""
    return set(init_options(cls, Attack)) - {"model", "eps", "norm"}


def EOT(attack: Attack, n: int = 30) -> Attack:
    """Expectation over Transformation (Athalye et al. 2018) for randomised models.

    Returns a copy of ``attack`` whose losses and gradients are averaged over ``n``
    forward passes, so randomness in the model (random resizing, noise) is integrated
    out instead of fooling the attacker. Athalye et al. used n = 30.

    Example:
        >>> attack = EOT(PGD(randomised_model, eps=8 / 255, steps=20), n=30)
    """
    import copy

    if n < 1:
        raise AttackError(f"EOT needs n >= 1, got {n}")
    wrapped = copy.copy(attack)
    wrapped.eot_samples = n
    wrapped.passes = {"forward": 0, "gradient": 0}  # its own count, not the original's
    return wrapped
