"""Feature hints (Romero, Ballas, Kahou, Chassang, Gatta & Bengio, "FitNets: hints for
thin deep nets", ICLR 2015)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from robustlab.errors import ConfigError
from robustlab.train.recipes.base import RECIPES, Recipe
from robustlab.train.recipes.distill import Teacher, distillation_kl


def find_module(model: nn.Module, name: str, whose: str) -> nn.Module:
    """``model``'s submodule called ``name`` (as in ``named_modules()``), or a clear error."""
    modules = dict(model.named_modules())
    if name not in modules or name == "":
        names = [n for n in modules if n]
        raise ConfigError(
            f"hints recipe: the {whose} has no layer {name!r}; its layers are "
            f"{', '.join(names[:30])}{' ...' if len(names) > 30 else ''}"
        )
    return modules[name]


@contextlib.contextmanager
def capture(module: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Record ``module``'s outputs with a forward hook that exists only inside the block."""
    outputs: list[torch.Tensor] = []

    def hook(_module: nn.Module, _args: Any, output: Any) -> None:
        if not isinstance(output, torch.Tensor):
            raise ConfigError(
                f"hints recipe: layer {type(module).__name__} returns "
                f"{type(output).__name__}, not a tensor"
            )
        outputs.append(output)

    handle = module.register_forward_hook(hook)
    try:
        yield outputs
    finally:
        handle.remove()


def make_regressor(student: torch.Size, teacher: torch.Size) -> nn.Module:
    """FitNets' regressor from the student's guided layer to the teacher's hint layer.

    Feature maps (C, H, W): a convolution whose kernel turns the student's spatial size
    into the teacher's (``k = H_s - H_t + 1``; 1x1 when they agree), as in the paper;
    vectors: a linear layer.
    """
    if len(student) == 4 and len(teacher) == 4:
        kh, kw = student[2] - teacher[2] + 1, student[3] - teacher[3] + 1
        if kh < 1 or kw < 1:
            raise ConfigError(
                f"hints recipe: the student's feature map {tuple(student[1:])} is smaller "
                f"than the teacher's {tuple(teacher[1:])}; choose an earlier student layer "
                "or a later teacher layer"
            )
        return nn.Conv2d(student[1], teacher[1], (kh, kw))
    if len(student) == 2 and len(teacher) == 2:
        return nn.Linear(student[1], teacher[1])
    raise ConfigError(
        f"hints recipe: cannot match a student feature of shape {tuple(student[1:])} to a "
        f"teacher feature of shape {tuple(teacher[1:])}; choose two convolutional layers "
        "or two vector layers"
    )


class HintedStudent(nn.Module):
    """The student and the regressor, trained together; the student's forward unchanged.

    Exists only during training (checkpoints hold both); the recipe's export returns
    :attr:`student` alone.
    """

    def __init__(self, student: nn.Module, regressor: nn.Module) -> None:
        super().__init__()
        self.student, self.regressor = student, regressor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.student(x)


@RECIPES.register("hints")
class Hints(Recipe):
    """FitNets: guide an intermediate student layer by a teacher layer, then distil.

    Stage 1 (the first ``hint_epochs``): minimise ``1/2 * ||u_h(x) - r(v_g(x))||^2``,
    where ``u_h`` is the teacher's hint layer, ``v_g`` the student's guided layer and
    ``r`` a learned regressor (:func:`make_regressor`); only the student's layers up to
    the guided one, and ``r``, receive gradient. Stage 2: knowledge distillation
    (:class:`~robustlab.train.recipes.distill.Distillation`'s loss) of the whole
    student, plus ``hint_weight`` times the hint loss (0, as in the paper, by default).
    The squared distance is averaged over feature elements (the paper sums them), which
    only rescales the stage-1 learning rate. Departure: in stage 1 the rest of the
    student is kept in the graph with weight zero (so data-parallel training sees every
    parameter), which with weight decay shrinks those weights a little.

    Features are taken with forward hooks registered for one forward pass and removed
    right after (neither model's code is touched, and nothing stays hooked).

    Args:
        teacher: a run directory or a module (frozen; see
            :class:`~robustlab.train.recipes.distill.Teacher`).
        student_layer: the guided layer, a name from the student's ``named_modules()``
            (e.g. ``net.3``; an unknown name lists the valid ones).
        teacher_layer: the hint layer, a name from the teacher's ``named_modules()``.
        hint_epochs: length of stage 1 in epochs (may be fractional; 0 skips it).
        hint_weight: weight of the hint loss in stage 2.
        temperature, alpha: stage 2's distillation (as ``distill``: 4 and 0.9).
        **common: :class:`~robustlab.train.recipes.base.Recipe` options.

    Logged: ``hint`` (the hint loss), ``kl`` (stage 2's soft term; 0 in stage 1).
    """

    def __init__(
        self,
        *,
        teacher: str | nn.Module,
        student_layer: str,
        teacher_layer: str,
        hint_epochs: float = 1.0,
        hint_weight: float = 0.0,
        temperature: float = 4.0,
        alpha: float = 0.9,
        **common: Any,
    ) -> None:
        super().__init__(**common)
        if not float(hint_epochs) >= 0 or not float(hint_weight) >= 0:
            raise ConfigError(
                "hints recipe: need hint_epochs, hint_weight >= 0; got "
                f"{hint_epochs}, {hint_weight}"
            )
        if not float(temperature) > 0 or not 0 <= float(alpha) <= 1:
            raise ConfigError(
                "hints recipe: need temperature > 0 and alpha in [0, 1]; got "
                f"{temperature}, {alpha}"
            )
        self.teacher = Teacher(teacher)
        self.teacher_layer = find_module(self.teacher.module, teacher_layer, "teacher")
        self.student_layer_name, self.teacher_layer_name = student_layer, teacher_layer
        self.hint_epochs, self.hint_weight = float(hint_epochs), float(hint_weight)
        self.temperature, self.alpha = float(temperature), float(alpha)

    def prepare(self, model: nn.Module, example: torch.Tensor | None = None) -> nn.Module:
        model = super().prepare(model, example)
        layer = self._guided = find_module(model, self.student_layer_name, "student")
        if example is None:
            raise ConfigError("hints recipe: prepare needs an example batch to size the regressor")
        with torch.no_grad(), capture(layer) as mine, capture(self.teacher_layer) as theirs:
            was = model.training
            model.eval()
            model(example)
            model.train(was)
            self.teacher(example)
        return HintedStudent(model, make_regressor(mine[0].shape, theirs[0].shape))

    def _hinted(self, model: nn.Module) -> HintedStudent:
        from robustlab.defenses import DefendedModel

        net = self.unwrap(model)
        if isinstance(net, DefendedModel):  # trained with defenses in front (config defenses)
            net = net.model
        if not isinstance(net, HintedStudent):
            raise RuntimeError("hints recipe: loss() got a model its prepare() did not return")
        return net

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        net = self._hinted(model)
        with capture(self.teacher_layer) as theirs:
            teacher_logits = self.teacher(x)
        with self.optimizing(model), capture(self._guided) as mine:
            logits = model(x)
            guided_features = net.regressor(mine[0])
            wide = torch.promote_types(guided_features.dtype, torch.float32)
            hint = 0.5 * F.mse_loss(guided_features.to(wide), theirs[0].to(wide))
            if self.progress < self.hint_epochs:
                soft = torch.zeros((), device=x.device)
                loss = hint + 0.0 * logits.sum()  # later layers in the graph at weight 0
            else:
                soft = distillation_kl(logits, teacher_logits, self.temperature)
                hard = self.cross_entropy(logits, y)
                loss = self.alpha * soft + (1 - self.alpha) * hard + self.hint_weight * hint
        return {"loss": loss, "logits": logits, "hint": hint.detach(), "kl": soft.detach()}

    def export(self, model: nn.Module) -> nn.Module:
        from robustlab.defenses import DefendedModel

        if isinstance(model, DefendedModel) and isinstance(model.model, HintedStudent):
            model.model = model.model.student
            return super().export(model)
        return super().export(model.student if isinstance(model, HintedStudent) else model)
