"""Knowledge distillation (Hinton, Vinyals & Dean, "Distilling the knowledge in a neural
network", 2015)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from robustlab.errors import ConfigError
from robustlab.train.recipes.base import RECIPES, Recipe


def distillation_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
) -> torch.Tensor:
    """``T^2 * KL(softmax(z_t / T) || softmax(z_s / T))``, summed over classes and
    averaged over the batch (``batchmean``), in at least float32. The ``T^2`` keeps the
    soft term's gradients on the scale of the hard term's as T changes (Hinton et al.,
    section 2)."""
    t = float(temperature)
    dtype = torch.promote_types(student_logits.dtype, torch.float32)  # float64 stays
    log_p_student = F.log_softmax(student_logits.to(dtype) / t, 1)
    log_p_teacher = F.log_softmax(teacher_logits.to(dtype) / t, 1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return t * t * kl


class Teacher:
    """A frozen teacher: a run directory (loaded with :func:`robustlab.load`) or a module.

    It is kept in eval mode with ``requires_grad`` off on every parameter, is not part
    of the student (so not in its optimiser, checkpoint or export), and answers one
    forward per batch under ``torch.no_grad``.
    """

    def __init__(self, teacher: str | Path | nn.Module) -> None:
        if isinstance(teacher, (str, Path)):
            from robustlab.io import load

            self.source, self.path = str(teacher), str(Path(teacher).resolve())
            self.module = load(teacher)
        elif isinstance(teacher, nn.Module):
            self.source, self.module, self.path = type(teacher).__name__, teacher, None
        else:
            raise ConfigError(
                f"teacher must be a run directory or an nn.Module, got {type(teacher).__name__}"
            )
        self.module.eval()  # inference mode for good: not a child of the student, so the
        for p in self.module.parameters():  # trainer's model.train() never reaches it
            p.requires_grad_(False)

    def to(self, device: torch.device) -> Teacher:
        self.module.to(device)
        return self

    def describe(self) -> dict[str, Any]:
        """What the student's run records about its teacher (``meta.json``)."""
        size = sum(p.numel() for p in self.module.parameters())
        out: dict[str, Any] = {"source": self.source, "parameters": size}
        if self.path is not None:  # found again from any working directory
            out["path"] = self.path
        return out

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The teacher's logits for ``x`` (moved to ``x``'s device on first use: the
        trainer places the student after the recipe prepared it)."""
        device = next((p.device for p in self.module.parameters()), x.device)
        if device != x.device:
            self.module.to(x.device)
        return self.module(x)


@RECIPES.register("distill")
class Distillation(Recipe):
    """``alpha * T^2 * KL(softmax(z_t / T) || softmax(z_s / T)) + (1 - alpha) * CE(z_s, y)``.

    Args:
        teacher: the teacher: a run directory (YAML: ``teacher: runs/big``) or, from
            Python, any module on [0, 1] pixels returning logits. Frozen (see
            :class:`Teacher`).
        temperature: T (Hinton et al. found T around 2-20 useful; default 4).
        alpha: weight of the soft (distillation) term; ``1 - alpha`` on the hard labels.
        **common: :class:`~robustlab.train.recipes.base.Recipe` options.

    Logged: ``kl`` (the soft term, T^2 included) and ``teacher_acc`` on the batch.
    Cost per step: one teacher forward (no graph) and one student training pass.

    Example (YAML)::

        recipe:
          name: distill
          options: {teacher: runs/demo-mnist, temperature: 4, alpha: 0.9}
    """

    def __init__(
        self,
        *,
        teacher: str | nn.Module,
        temperature: float = 4.0,
        alpha: float = 0.9,
        **common: Any,
    ) -> None:
        super().__init__(**common)
        if not (float(temperature) > 0):
            raise ConfigError(f"distill recipe: temperature must be > 0, got {temperature}")
        if not 0 <= float(alpha) <= 1:
            raise ConfigError(f"distill recipe: alpha must be in [0, 1], got {alpha}")
        self.teacher = Teacher(teacher)
        self.temperature, self.alpha = float(temperature), float(alpha)

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        teacher_logits = self.teacher(x)
        with self.optimizing(model):
            logits = model(x)
            soft = distillation_kl(logits, teacher_logits, self.temperature)
            hard = self.cross_entropy(logits, y)
            loss = self.alpha * soft + (1 - self.alpha) * hard
        return {
            "loss": loss,
            "logits": logits,
            "kl": soft.detach(),
            "teacher_acc": (teacher_logits.argmax(1) == y).float().mean(),
        }
