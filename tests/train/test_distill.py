"""Knowledge distillation (Hinton et al. 2015): the loss against a hand computation
(temperature, T^2, batchmean), the teacher frozen, unchanged and asked once per batch,
and the recipe end to end from a YAML-style config with a run directory as teacher."""

from __future__ import annotations

import hashlib
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import robustlab as rl
from robustlab.evaluate import clean_accuracy
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
    meta = json.loads((student_dir / "meta.json").read_text())
    assert meta["teacher"]["source"] == str(teacher_dir)
    test = rl.data.load_dataset("synthetic", "test", None, size=12, n_train=256, n_test=128,
                                num_classes=4)  # fmt: skip
    # the teacher's accuracy on the student's test split, stored with the student's results
    teacher_acc = clean_accuracy(rl.load(teacher_dir), test)
    assert meta["final"]["teacher_test_acc"] == pytest.approx(teacher_acc, abs=1e-12)
    assert meta["final"]["teacher_test_acc"] != meta["final"]["test_acc"]
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


# ----------------------------------------------------------------------------- helpers


def _hand_kl(p_rows, q_rows):
    """sum_k p log(p / q), averaged over rows, from plain Python floats."""
    total = 0.0
    for p, q in zip(p_rows, q_rows):
        total += sum(a * math.log(a / b) for a, b in zip(p, q))
    return total / len(p_rows)


def _softmax_rows(logits, t=1.0):
    rows = []
    for row in logits.tolist():
        e = [math.exp((v - max(row)) / t) for v in row]
        rows.append([v / sum(e) for v in e])
    return rows


class Recorder(nn.Module):
    """Wraps a model and records the inputs of each forward."""

    def __init__(self, model):
        super().__init__()
        self.model, self.inputs = model, []

    def forward(self, x):
        self.inputs.append(x.detach().clone())
        return self.model(x)


# ----------------------------------------------------------------------------- ARD


def test_ard_matches_its_formula_on_the_students_own_pgd_point():
    torch.manual_seed(0)
    teacher = Recorder(rl.create_model("mlp", in_channels=1, input_size=6, hidden=[16],
                                       num_classes=4).double())  # fmt: skip
    student = rl.create_model("mlp", in_channels=1, input_size=6, hidden=[8],
                              num_classes=4).double()  # fmt: skip
    x, y = torch.rand(12, 1, 6, 6, dtype=torch.float64), torch.arange(12) % 4
    for alpha in (1.0, 0.4):
        recipe = create_recipe("ard", teacher=teacher, eps=0.2, steps=3, temperature=5.0,
                               alpha=alpha)  # fmt: skip
        teacher.inputs.clear()
        torch.manual_seed(3)
        out = recipe.loss(student, x, y)
        assert len(teacher.inputs) == 1 and torch.equal(teacher.inputs[0], x)  # clean x only
        # the adversarial point is the library's PGD on the student's cross-entropy
        torch.manual_seed(3)
        x_adv = rl.attacks.PGD(student, eps=0.2, steps=3, step_size=0.05)(x, y)
        with torch.no_grad():
            s_adv, t_clean, s_clean = student(x_adv), teacher.model(x), student(x)
        soft = 25.0 * _hand_kl(_softmax_rows(t_clean, 5.0), _softmax_rows(s_adv, 5.0))
        hard = -sum(math.log(p[c]) for p, c in zip(_softmax_rows(s_clean), y.tolist())) / 12
        want = alpha * soft + (1 - alpha) * hard
        assert float(out["loss"].detach()) == pytest.approx(want, rel=1e-9)
        assert float(out["kl"]) == pytest.approx(soft, rel=1e-9)


def test_ard_attacks_the_student_not_the_teacher():
    torch.manual_seed(0)
    student = rl.create_model("mlp", in_channels=1, input_size=6, hidden=[8], num_classes=4)
    x, y = torch.rand(16, 1, 6, 6), torch.arange(16) % 4
    points = []
    for seed in (0, 1):  # two unrelated teachers
        torch.manual_seed(seed)
        teacher = rl.create_model("mlp", in_channels=1, input_size=6, hidden=[8], num_classes=4)
        recipe = create_recipe("ard", teacher=teacher, eps=0.2, steps=3)
        seen = Recorder(student)
        torch.manual_seed(5)
        recipe.loss(seen, x, y)
        points.append(seen.inputs[-1])  # the training pass's input: x_adv
    torch.testing.assert_close(points[0], points[1], rtol=0, atol=0)
    with torch.no_grad():
        ce = torch.nn.functional.cross_entropy
        assert ce(student(points[0]), y) > ce(student(x), y) + 0.05
    assert float((points[0] - x).abs().max()) <= 0.2 + 1e-6


# ----------------------------------------------------------------------------- RSLAD


def _rslad_official_inner_max(student, teacher_logits, x, eps, steps, step):
    """RSLAD's inner maximisation written out from the paper's code (independent of PGD)."""
    p_teacher = torch.softmax(teacher_logits, 1)
    x_adv = (x + 0.001 * torch.randn_like(x)).clamp(x - eps, x + eps).clamp(0, 1)
    for _ in range(steps):
        xa = x_adv.detach().requires_grad_(True)
        kl = torch.nn.functional.kl_div(torch.log_softmax(student(xa), 1), p_teacher,
                                        reduction="sum")  # fmt: skip
        (grad,) = torch.autograd.grad(kl, xa)
        x_adv = torch.min(torch.max(xa.detach() + step * grad.sign(), x - eps), x + eps)
        x_adv = x_adv.clamp(0, 1)
    return x_adv


@pytest.mark.parametrize("labels", ["true", "wrong"])
def test_rslad_inner_maximisation_and_loss_are_the_papers(labels):
    torch.manual_seed(0)
    teacher = rl.create_model("mlp", in_channels=1, input_size=8, hidden=[16],
                              num_classes=10).double()  # fmt: skip
    student = rl.create_model("small_cnn", in_channels=1, num_classes=10, input_size=8,
                              bn=True).double()  # fmt: skip
    student.train()
    x = torch.rand(16, 1, 8, 8, dtype=torch.float64)
    y = torch.arange(16) % 10 if labels == "true" else (torch.arange(16) + 3) % 10
    recipe = create_recipe("rslad", teacher=teacher, eps=0.1, steps=5, step_size=0.03)
    with torch.no_grad():
        t_logits = teacher(x)
    torch.manual_seed(1)
    got = recipe.make_adversarial(student, x, y, t_logits)
    assert student.training  # the attack ran in eval mode and put the mode back
    student.eval()
    torch.manual_seed(1)
    want = _rslad_official_inner_max(student, t_logits, x, 0.1, 5, 0.03)
    torch.testing.assert_close(got, want, atol=1e-9, rtol=0)

    # the loss: 5/6 KL(T(x) || S(x_adv)) + 1/6 KL(T(x) || S(x)), labels unused
    seen = Recorder(student)
    seen.eval()  # fixed batch norm: the recorded passes can be replayed exactly
    torch.manual_seed(1)
    out = recipe.loss(seen, x, y)
    x_adv, x_clean = seen.inputs[-2], seen.inputs[-1]
    assert torch.equal(x_clean, x)
    with torch.no_grad():
        kl_adv = _hand_kl(_softmax_rows(t_logits), _softmax_rows(student(x_adv)))
        kl_clean = _hand_kl(_softmax_rows(t_logits), _softmax_rows(student(x)))
    want_loss = 5 / 6 * kl_adv + 1 / 6 * kl_clean
    assert float(out["loss"].detach()) == pytest.approx(want_loss, rel=1e-9)
    assert kl_adv > kl_clean


# ----------------------------------------------------------------------------- defensive


def test_defensive_distillation_losses_against_hand_computations():
    torch.manual_seed(0)
    student = rl.create_model("mlp", in_channels=1, input_size=4, hidden=[8],
                              num_classes=3).double()  # fmt: skip
    teacher = rl.create_model("mlp", in_channels=1, input_size=4, hidden=[8],
                              num_classes=3).double()  # fmt: skip
    with torch.no_grad():  # logits of a network trained at T = 50: tens to hundreds
        for net in (student, teacher):
            net[-1].weight.mul_(300)
    x, y = torch.rand(6, 1, 4, 4, dtype=torch.float64), torch.arange(6) % 3
    with torch.no_grad():
        zs, zt = student(x), teacher(x)
    # the initial network: cross-entropy of softmax(z / T)
    out = create_recipe("defensive_distillation", temperature=50.0).loss(student, x, y)
    want = -sum(math.log(p[c]) for p, c in zip(_softmax_rows(zs, 50.0), y.tolist())) / 6
    assert float(out["loss"].detach()) == pytest.approx(want, rel=1e-9)
    # the distilled network: cross-entropy against the teacher's softmax(z_t / T)
    out = create_recipe("defensive_distillation", teacher=teacher, temperature=50.0).loss(
        student, x, y
    )
    soft, mine = _softmax_rows(zt, 50.0), _softmax_rows(zs, 50.0)
    want = -sum(sum(p * math.log(q) for p, q in zip(a, b)) for a, b in zip(soft, mine)) / 6
    assert float(out["loss"].detach()) == pytest.approx(want, rel=1e-9)
    # deployed at T = 1: the saved model is the network itself, logits unscaled
    recipe = create_recipe("defensive_distillation", temperature=50.0)
    assert recipe.export(student) is student
    with pytest.raises(rl.ConfigError, match="temperature"):
        create_recipe("defensive_distillation", temperature=-1)


# ----------------------------------------------------------------------------- hints


def _hooks(*models):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for model in models
               for m in model.modules())  # fmt: skip


def test_hints_stage_one_trains_only_up_to_the_guided_layer():
    torch.manual_seed(0)
    teacher = rl.create_model("small_cnn", in_channels=1, input_size=12, num_classes=4)
    student = rl.create_model("lenet", in_channels=1, input_size=12, num_classes=4)
    recipe = create_recipe("hints", teacher=teacher, student_layer="1", teacher_layer="1",
                           hint_epochs=1)  # fmt: skip
    x, y = torch.rand(8, 1, 12, 12), torch.arange(8) % 4
    model = recipe.prepare(student, example=x[:2])
    assert _hooks(student, teacher) == 0
    # FitNets' convolutional regressor: kernel H_s - H_t + 1 (both 8x8 here: 1x1), 6 -> 32
    assert isinstance(model.regressor, nn.Conv2d)
    assert model.regressor.kernel_size == (1, 1) and model.regressor.weight.shape[:2] == (32, 6)
    recipe.progress = 0.5
    out = recipe.loss(model, x, y)
    assert _hooks(student, teacher) == 0  # the hooks lived for one forward pass each
    with torch.no_grad():  # the features, computed without hooks
        u = teacher[:2](x)
        v = student[:2](x)
        want = 0.5 * ((model.regressor(v) - u) ** 2).mean()
    assert float(out["loss"].detach()) == pytest.approx(float(want), rel=1e-5)
    out["loss"].backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None and g.abs().sum() > 0 for n, g in grads.items()
               if n.startswith(("student.0.", "regressor.")))  # fmt: skip
    later = [n for n in grads if n.startswith("student.") and not n.startswith("student.0.")]
    assert later and all(grads[n] is not None and grads[n].abs().sum() == 0 for n in later)
    assert all(p.grad is None for p in teacher.parameters())


def test_hints_stage_two_is_distillation_plus_weighted_hint():
    torch.manual_seed(0)
    teacher = rl.create_model("small_cnn", in_channels=1, input_size=12, num_classes=4)
    student = rl.create_model("mlp", in_channels=1, input_size=12, hidden=[16, 16], num_classes=4)
    recipe = create_recipe("hints", teacher=teacher, student_layer="2", teacher_layer="8",
                           hint_epochs=1, hint_weight=0.5, temperature=3.0, alpha=0.7)  # fmt: skip
    x, y = torch.rand(8, 1, 12, 12), torch.arange(8) % 4
    model = recipe.prepare(student, example=x[:2])
    assert isinstance(model.regressor, nn.Linear) and model.regressor.weight.shape == (1024, 16)
    recipe.progress = 1.0
    out = recipe.loss(model, x, y)
    with torch.no_grad():
        hint = 0.5 * ((model.regressor(student[:3](x)) - teacher[:9](x)) ** 2).mean()
        zs, zt = student(x), teacher(x)
        soft = 9.0 * _hand_kl(_softmax_rows(zt, 3.0), _softmax_rows(zs, 3.0))
        hard = -sum(math.log(p[c]) for p, c in zip(_softmax_rows(zs), y.tolist())) / 8
    want = 0.7 * soft + 0.3 * hard + 0.5 * float(hint)
    assert float(out["loss"].detach()) == pytest.approx(want, rel=1e-5)
    assert recipe.export(model) is student and _hooks(student, teacher) == 0


def test_hints_hooks_are_removed_when_the_forward_fails():
    teacher = rl.create_model("small_cnn", in_channels=1, input_size=12, num_classes=4)
    student = rl.create_model("lenet", in_channels=1, input_size=12, num_classes=4)
    recipe = create_recipe("hints", teacher=teacher, student_layer="1", teacher_layer="1")
    model = recipe.prepare(student, example=torch.rand(2, 1, 12, 12))
    with pytest.raises(RuntimeError):
        recipe.loss(model, torch.rand(4, 3, 12, 12), torch.zeros(4, dtype=torch.long))
    assert _hooks(student, teacher) == 0


def test_hints_refuses_unknown_layers_and_mismatched_features():
    teacher = rl.create_model("small_cnn", in_channels=1, input_size=12, num_classes=4)
    with pytest.raises(rl.ConfigError, match=r"teacher has no layer 'net\.9'.*layers are 0, 1"):
        create_recipe("hints", teacher=teacher, student_layer="0", teacher_layer="net.9")
    recipe = create_recipe("hints", teacher=teacher, student_layer="x", teacher_layer="1")
    with pytest.raises(rl.ConfigError, match="student has no layer 'x'"):
        recipe.prepare(rl.create_model("lenet", in_channels=1, input_size=12, num_classes=4),
                       example=torch.rand(2, 1, 12, 12))  # fmt: skip
    recipe = create_recipe("hints", teacher=teacher, student_layer="1", teacher_layer="8")
    with pytest.raises(rl.ConfigError, match="cannot match"):
        recipe.prepare(rl.create_model("lenet", in_channels=1, input_size=12, num_classes=4),
                       example=torch.rand(2, 1, 12, 12))  # fmt: skip
    recipe = create_recipe("hints", teacher=teacher, student_layer="2", teacher_layer="1")
    with pytest.raises(rl.ConfigError, match="smaller than the teacher's"):
        recipe.prepare(rl.create_model("lenet", in_channels=1, input_size=12, num_classes=4),
                       example=torch.rand(2, 1, 12, 12))  # fmt: skip


def test_hints_end_to_end_saves_the_plain_student(tiny_config):
    teacher_dir = Trainer(tiny_config("epochs=1", "name=teacher")).fit()
    cfg = tiny_config(
        "epochs=2", "name=fitnet", "model.name=lenet", "recipe.name=hints",
        f"recipe.options={{teacher: {teacher_dir}, student_layer: net.1, teacher_layer: net.1, "
        "hint_epochs: 1}",
    )  # fmt: skip
    run = Trainer(cfg).fit()
    rows = [line for line in (run / "metrics.jsonl").read_text().splitlines() if line]
    assert '"train_kl": 0.0' in rows[0] and '"train_kl": 0.0' not in rows[1]
    student = rl.load(run)
    fresh = rl.create_model("lenet", in_channels=1, input_size=12, num_classes=4, mean=[0.5],
                            std=[0.2])  # fmt: skip
    # the export is the plain student: lenet's own keys and sizes, no regressor
    assert {k: v.shape for k, v in student.state_dict().items()} == {
        k: v.shape for k, v in fresh.state_dict().items()
    }
    assert _hooks(student) == 0


class Scaled(nn.Module):
    """``model``'s logits divided by ``t`` (Carlini & Wagner's undoing of the temperature)."""

    def __init__(self, model, t):
        super().__init__()
        self.model, self.t = model, t

    def forward(self, x):
        return self.model(x) / self.t


def test_defensive_distillation_masks_gradients_and_the_checks_say_so(tmp_path):
    """The known result (Papernot et al. 2016, broken by Carlini & Wagner 2016): the
    distilled network deployed at T = 1 resists cross-entropy PGD only because its
    softmax saturates; the logit-margin PGD, and the cross-entropy PGD on the logits
    divided by T, both break it; the validity checks name the cause."""
    from robustlab.config import load_config
    from robustlab.evaluate import evaluate

    base = [f"out_dir={tmp_path}", "epochs=2", "data.name=mnist5k", "data.train_limit=2000",
            "data.batch_size=50", "model.name=lenet", "optim.name=adam", "optim.lr=0.01",
            "optim.schedule=constant", "recipe.name=defensive_distillation"]  # fmt: skip
    initial = Trainer(load_config(None, [*base, "name=initial",
                                         "recipe.options={temperature: 100}"])).fit()  # fmt: skip
    distilled = Trainer(load_config(None, [
        *base, "name=distilled", f"recipe.options={{teacher: {initial}, temperature: 100}}"
    ])).fit()  # fmt: skip
    model = rl.load(distilled)
    test = rl.data.load_dataset("mnist5k", "test").subset(100)
    report = evaluate(model, test, attacks=["pgd", "pgd:loss=margin"], eps=[0.3])
    assert report.clean_accuracy >= 0.8
    ce_stage, margin_stage = report.results[0].stages
    assert ce_stage.robust_after >= 0.5  # the cross-entropy attack fails ...
    assert margin_stage.robust_after <= 0.1  # ... the margin attack does not
    undone = evaluate(Scaled(model, 100.0), test, attacks=["pgd"], eps=[0.3], checks=False)
    assert undone.results[0].robust_accuracy <= 0.1  # nor cross-entropy on the logits / T
    verdicts = {c.name: c for c in report.validity.checks}
    assert verdicts["saturation"].verdict == "warn"
    assert verdicts["gradients"].verdict in ("warn", "fail")
    assert "saturates" in verdicts["gradients"].reason


def test_fitnets_regressor_maps_the_guided_shape_onto_the_hint_shape():
    from robustlab.train.recipes.hints import make_regressor

    conv = make_regressor(torch.Size([2, 16, 10, 10]), torch.Size([2, 64, 7, 7]))
    assert isinstance(conv, nn.Conv2d) and conv.kernel_size == (4, 4)  # 10 - 7 + 1
    assert conv(torch.rand(2, 16, 10, 10)).shape == (2, 64, 7, 7)
    wide = make_regressor(torch.Size([2, 8, 9, 12]), torch.Size([2, 4, 9, 5]))
    assert wide.kernel_size == (1, 8) and wide(torch.rand(2, 8, 9, 12)).shape == (2, 4, 9, 5)


def test_hints_trains_behind_defenses(tiny_config):
    teacher_dir = Trainer(tiny_config("epochs=1", "name=teacher")).fit()
    cfg = tiny_config(
        "epochs=1", "name=fitnet", "model.name=lenet", "recipe.name=hints",
        "defenses=[bitdepth:bits=4]",
        f"recipe.options={{teacher: {teacher_dir}, student_layer: net.1, teacher_layer: net.1}}",
    )  # fmt: skip
    run = Trainer(cfg).fit()
    assert json.loads((run / "meta.json").read_text())["defenses"] and rl.load(run) is not None
