"""Knowledge distillation (Hinton et al. 2015): the loss against a hand computation
(temperature, T^2, batchmean), the teacher frozen, unchanged and asked once per batch,
and the recipe end to end from a YAML-style config with a run directory as teacher."""

from __future__ import annotations

import hashlib
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import robustlab as rl
from robustlab.train import Trainer, create_recipe
from robustlab.train.recipes.distill import distillation_kl


def test_distillation_kl_against_a_hand_computation():
    torch.manual_seed(0)
    zs, zt = torch.randn(5, 4, dtype=torch.float64), 3 * torch.randn(5, 4, dtype=torch.float64)
    for t in (1.0, 4.0, 20.0):
        total = 0.0
        for s_row, t_row in zip(zs.tolist(), zt.tolist()):
            es = [math.exp(v / t) for v in s_row]
            et = [math.exp(v / t) for v in t_row]
            ps = [v / sum(es) for v in es]
            pt = [v / sum(et) for v in et]
            total += sum(b * math.log(b / a) for a, b in zip(ps, pt))
        want = t * t * total / 5  # T^2, summed over classes, averaged over the batch
        assert float(distillation_kl(zs, zt, t)) == pytest.approx(want, rel=1e-5)
    assert float(distillation_kl(zt, zt, 4.0)) == pytest.approx(0.0, abs=1e-7)


def test_alpha_weights_soft_and_hard_terms():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    x, y = torch.rand(8, 1, 4, 4), torch.arange(8) % 3
    for alpha in (0.0, 0.3, 1.0):
        out = create_recipe("distill", teacher=teacher, temperature=2.0, alpha=alpha).loss(
            student, x, y
        )
        with torch.no_grad():
            soft = distillation_kl(student(x), teacher(x), 2.0)
            hard = F.cross_entropy(student(x), y)
        want = alpha * soft + (1 - alpha) * hard
        assert float(out["loss"].detach()) == pytest.approx(float(want), rel=1e-5)


class Counting(nn.Module):
    """A batch-norm teacher that counts its forward passes."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                                 nn.Flatten(), nn.LazyLinear(4))  # fmt: skip
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.net(x)


def test_the_teacher_is_frozen_unchanged_and_asked_once_per_batch(tiny_config):
    torch.manual_seed(0)
    teacher = Counting()
    teacher(torch.rand(2, 1, 12, 12))  # materialise the lazy layer
    teacher.train()  # the recipe must put it in eval mode itself
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    teacher.calls = 0
    recipe = create_recipe("distill", teacher=teacher, temperature=4.0, alpha=0.5)
    model = recipe.prepare(rl.create_model("small_cnn", in_channels=1, input_size=12,
                                           num_classes=4))  # fmt: skip
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(3):
        x, y = torch.rand(16, 1, 12, 12), torch.randint(0, 4, (16,))
        out = recipe.loss(model, x, y)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        assert teacher.calls == step + 1  # one teacher forward per batch
    assert not teacher.training
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    for k, v in teacher.state_dict().items():  # weights and BN running statistics
        assert torch.equal(v, before[k]), k


def test_distill_from_a_run_directory_end_to_end(tiny_config):
    teacher_dir = Trainer(tiny_config("epochs=2", "name=teacher")).fit()
    weights = (teacher_dir / "model.safetensors").read_bytes()
    cfg = tiny_config(
        "epochs=2", "name=student", "model.name=mlp", "model.options={hidden: [32]}",
        "recipe.name=distill",
        f"recipe.options={{teacher: {teacher_dir}, temperature: 4, alpha: 0.9}}",
    )  # fmt: skip
    student_dir = Trainer(cfg).fit()
    rows = [line for line in (student_dir / "metrics.jsonl").read_text().splitlines() if line]
    assert "train_kl" in rows[-1] and "train_teacher_acc" in rows[-1]
    assert hashlib.sha256((teacher_dir / "model.safetensors").read_bytes()).digest() == (
        hashlib.sha256(weights).digest()
    )
    student = rl.load(student_dir)  # the export is the student alone
    assert sum(p.numel() for p in student.parameters()) < 12 * 12 * 32 + 32 * 4 + 100


def test_bad_options_are_refused(tmp_path):
    teacher = nn.Linear(4, 2)
    with pytest.raises(rl.ConfigError, match="temperature"):
        create_recipe("distill", teacher=teacher, temperature=0)
    with pytest.raises(rl.ConfigError, match="alpha"):
        create_recipe("distill", teacher=teacher, alpha=1.5)
    with pytest.raises(rl.RobustlabError, match="does not exist"):
        create_recipe("distill", teacher=str(tmp_path / "missing"))
    with pytest.raises(rl.ConfigError, match="teacher"):
        create_recipe("distill")
