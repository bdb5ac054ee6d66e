"""The trainer: run directories, load(), resume after a kill, schedules, errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import robustlab as rl
from robustlab.config import OptimConfig, dump_config
from robustlab.errors import CheckpointError, ConfigError, RobustlabError
from robustlab.io import load
from robustlab.train import Trainer, lr_at
from robustlab.train.recipes import RECIPES, Recipe
from robustlab.train.trainer import KILL_ENV, decode_state, encode_state


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_training_writes_a_complete_run_directory(tiny_config):
    cfg = tiny_config("epochs=3")
    run = Trainer(cfg).fit()
    assert {p.name for p in run.iterdir()} >= {
        "config.yaml", "meta.json", "model.safetensors", "checkpoint.safetensors", "metrics.jsonl"
    }  # fmt: skip
    rows = _rows(run)
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert rows[-1]["test_acc"] > 0.5  # 4 classes: chance is 0.25
    meta = json.loads((run / "meta.json").read_text())
    assert meta["status"] == "complete" and meta["final"]["test_acc"] == rows[-1]["test_acc"]
    assert meta["model"]["name"] == "small_cnn"
    assert meta["model"]["kwargs"]["num_classes"] == 4 and meta["model"]["kwargs"][
        "input_size"
    ] == [12, 12]
    assert meta["data"]["name"] == "synthetic" and meta["recipe"]["name"] == "standard"
    assert set(meta["versions"]) >= {"robustlab", "torch", "python"}
    assert yaml.safe_load((run / "config.yaml").read_text())["epochs"] == 3
    # weights are as readable as the other files of the run (not 0600)
    modes = {p.name: p.stat().st_mode & 0o777 for p in run.iterdir()}
    assert modes["model.safetensors"] == modes["meta.json"] == modes["checkpoint.safetensors"]


def test_load_rebuilds_the_model_without_pickle(tiny_config):
    cfg = tiny_config()
    trainer = Trainer(cfg)
    run = trainer.fit()
    model = load(run)
    assert not model.training
    saved = load_file(str(run / "model.safetensors"))
    for key, value in model.state_dict().items():
        assert torch.equal(value, saved[key])
    for key, value in trainer.model.state_dict().items():
        assert torch.equal(value.cpu(), saved[key])
    acc = rl.clean_accuracy(model, trainer.test_data)
    assert acc == pytest.approx(json.loads((run / "meta.json").read_text())["final"]["test_acc"])
    # Normalize with the training split's statistics is inside the model.
    assert torch.allclose(model.normalize.mean.flatten(), torch.tensor(trainer.train_data.mean))


def _train_subprocess(config_path: Path, *extra: str, env: dict | None = None):
    cmd = [sys.executable, "-m", "robustlab", "-q", "train", str(config_path), *extra]
    return subprocess.run(cmd, env={**os.environ, **(env or {})}, capture_output=True, text=True)


_RANDOMISED = {
    # crops and flips (augmentation) on the standard recipe
    "augment": ["model.name=lenet", "model.options={}", "data.crop_padding=1", "data.flip=true"],
    # PGD's random start, and dropout inside the model, draw from the global RNG
    "pgd+dropout": [
        "model.name=wide_resnet", "model.options={depth: 10, width: 1, dropout: 0.3}",
        "recipe.name=pgd", "recipe.options={eps: 0.1, steps: 2}",
    ],
    "pgd": ["model.name=lenet", "model.options={}", "recipe.name=pgd",
            "recipe.options={eps: 0.1, steps: 2}"],
    # FGSM from a uniform random start, with its guard on held-out images
    "fast": ["model.name=lenet", "model.options={}", "recipe.name=fast",
             "recipe.options={eps: 0.1, guard_size: 16, guard_steps: 2}"],
}  # fmt: skip


@pytest.mark.parametrize(
    "randomness,checkpoint_every",
    [("augment", 5), ("augment", 0), ("pgd+dropout", 5), ("pgd", 0), ("fast", 3),
     ("hints+select", 4)],
)  # fmt: skip
def test_resume_after_kill_reaches_the_same_weights(
    tiny_config, tmp_path, randomness, checkpoint_every
):
    """SIGKILL a run mid-epoch, resume it, compare with a run never interrupted: bit-identical
    weights and metrics whatever draws randomness (augmentation, random starts, dropout)."""
    if randomness == "hints+select":  # a teacher's run, a regressor, the best state
        teacher = Trainer(tiny_config("epochs=1", "name=teacher")).fit()
        extra = [
            "model.name=lenet", "recipe.name=hints", "data.val_size=64",
            "select.metric=val_acc", f"recipe.options={{teacher: {teacher}, "
            "student_layer: net.1, teacher_layer: net.1, hint_epochs: 1}",
        ]  # fmt: skip
    else:
        extra = _RANDOMISED[randomness]
    common = [
        "epochs=3", f"checkpoint_every={checkpoint_every}", "optim.schedule=onecycle", *extra,
    ]  # fmt: skip
    paths = {}
    for name in ("whole", "killed"):
        cfg = tiny_config(*common, f"name={name}")
        paths[name] = tmp_path / f"{name}.yaml"
        paths[name].write_text(dump_config(cfg))
    whole = _train_subprocess(paths["whole"])
    assert whole.returncode == 0, whole.stderr
    # 256 images / batch 32 = 8 steps an epoch: step 14 is mid-way through epoch 2, one step
    # past the checkpoint at batch 5 (checkpoint_every=5), so resuming redoes work.
    killed = _train_subprocess(paths["killed"], env={KILL_ENV: "14"})
    assert killed.returncode == -signal.SIGKILL
    run_killed = tmp_path / "runs" / "killed"
    assert not (run_killed / "model.safetensors").exists()
    with pytest.raises(CheckpointError, match="did not finish.*--resume"):
        load(run_killed)
    resumed = _train_subprocess(paths["killed"], "--resume")
    assert resumed.returncode == 0, resumed.stderr
    a = load_file(str(tmp_path / "runs" / "whole" / "model.safetensors"))
    b = load_file(str(run_killed / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(_rows(run_killed)) == strip(_rows(tmp_path / "runs" / "whole"))


def test_extend_refuses_a_changed_config_but_allows_more_epochs(tiny_config):
    run = Trainer(tiny_config("epochs=1")).fit()
    with pytest.raises(CheckpointError, match="differs from the checkpoint's at optim.lr"):
        Trainer(tiny_config("epochs=2", "optim.lr=0.1"), extend=True).fit()
    Trainer(tiny_config("epochs=2"), extend=True).fit()
    assert [r["epoch"] for r in _rows(run)] == [1, 2]


def test_existing_run_directory_is_not_clobbered(tiny_config):
    Trainer(tiny_config("epochs=1")).fit()
    with pytest.raises(RobustlabError, match="already exists.*--resume.*--overwrite"):
        Trainer(tiny_config("epochs=1"))._prepare_run_dir()
    run = Trainer(tiny_config("epochs=1")).run_dir
    (run / "compare_state.json").write_text("{}")  # an evaluation of the old weights
    (run / "extra").mkdir()  # not robustlab's: kept
    Trainer(tiny_config("epochs=1"), overwrite=True).fit()
    assert len(_rows(run)) == 1
    assert not (run / "compare_state.json").exists() and (run / "extra").is_dir()


def test_truncated_or_missing_files_are_named(tiny_config):
    run = Trainer(tiny_config("epochs=1")).fit()
    weights = run / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(
        CheckpointError, match="model.safetensors is truncated or not a valid safetensors"
    ):
        load(run)
    ckpt = run / "checkpoint.safetensors"
    ckpt.write_bytes(ckpt.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="checkpoint.safetensors is truncated"):
        Trainer(tiny_config("epochs=2"), extend=True).fit()
    (run / "meta.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="meta.json is not valid JSON"):
        load(run)
    with pytest.raises(CheckpointError, match="run directory .* does not exist"):
        load(run.parent / "nope")


@pytest.mark.parametrize(
    "overrides",
    [
        ["optim.name=sgd", "optim.lr=0.05", "optim.nesterov=true", "optim.schedule=step",
         "optim.milestones=[1]"],
        ["optim.name=adamw", "optim.weight_decay=0.01", "optim.schedule=cosine",
         "optim.warmup_epochs=0.5"],
        ["label_smoothing=0.1", "optim.grad_clip=0.5", "model.name=wide_resnet",
         "model.options={depth: 10, width: 1}", "model.act=silu"],
        ["amp=bf16", "data.normalize=false", "model.name=mlp", "eval_every=0"],
    ],
)  # fmt: skip
def test_trainer_options_train(tiny_config, overrides, caplog):
    trainer = Trainer(tiny_config(*overrides))
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    run = trainer.fit()
    rows = _rows(run)
    assert all(torch.isfinite(torch.tensor(r["train_loss"])) for r in rows)
    assert any(not torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
    if "amp=bf16" in overrides:
        assert "CUDA only" in caplog.text  # warned, and trained in float32 on the CPU
        assert "test_acc" not in rows[0] and "test_acc" in rows[-1]  # eval_every=0: only the end


@RECIPES.register("_test_nan")
class _NanRecipe(Recipe):
    """Test recipe whose loss is NaN."""

    def loss(self, model, x, y):
        logits = model(x)
        return {"loss": logits.sum() * float("nan"), "logits": logits}


@RECIPES.register("_test_stop")
class _StopRecipe(Recipe):
    """Test recipe that asks to stop after the first epoch and logs an extra loss term."""

    def loss(self, model, x, y):
        logits = model(x)
        loss = self.cross_entropy(logits, y)
        return {"loss": loss, "logits": logits, "extra": loss.detach() * 2}

    def on_epoch_end(self, model, epoch):
        self.stop_training = True
        return {"guard": 1.0}


def test_nan_loss_is_a_clear_error(tiny_config):
    with pytest.raises(RobustlabError, match="loss is nan at epoch 1, batch 0"):
        Trainer(tiny_config("recipe.name=_test_nan")).fit()


def test_recipe_hooks_extra_metrics_and_early_stop(tiny_config):
    run = Trainer(tiny_config("epochs=5", "recipe.name=_test_stop")).fit()
    rows = _rows(run)
    assert len(rows) == 1 and rows[0]["guard"] == 1.0
    assert rows[0]["train_extra"] == pytest.approx(2 * rows[0]["train_loss"])
    assert "test_acc" in rows[0]


def test_unknown_recipe_option_is_named(tiny_config):
    with pytest.raises(ValueError, match="recipe 'standard' has no option 'eps'"):
        Trainer(tiny_config("recipe.options={eps: 0.3}"))


def test_sync_bn_on_cpu_is_refused_with_a_reason(tiny_config, monkeypatch):
    from robustlab.train import trainer as trainer_module
    from robustlab.train.distributed import DistContext

    monkeypatch.setattr(trainer_module, "init_distributed", lambda device: DistContext(0, 2, 0))
    with pytest.raises(ValueError, match="sync_bn needs CUDA devices"):
        Trainer(
            tiny_config(
                "sync_bn=true", "model.name=wide_resnet", "model.options={depth: 10, width: 1}"
            )
        )


def test_global_batch_must_split_evenly(tiny_config, monkeypatch):
    from robustlab.train import trainer as trainer_module
    from robustlab.train.distributed import DistContext

    monkeypatch.setattr(trainer_module, "init_distributed", lambda device: DistContext(0, 3, 0))
    with pytest.raises(
        ValueError, match=r"batch_size \(32\) is the global batch.*divisible.*\(3\)"
    ):
        Trainer(tiny_config())


# ----------------------------------------------------------------------------- schedules


def test_schedules():
    total, per_epoch = 100, 10
    lrs = lambda cfg: [lr_at(cfg, s, per_epoch, total) for s in range(total)]  # noqa: E731
    one = lrs(OptimConfig(lr=1.0, schedule="onecycle", pct_start=0.25))
    assert max(one) == pytest.approx(1.0) and one.index(max(one)) == 24
    assert one[0] == pytest.approx(1 / 25) and one[-1] == 0.0
    rising, falling = one[:25], one[24:]
    assert rising == sorted(rising) and falling == sorted(falling, reverse=True)
    cos = lrs(OptimConfig(lr=2.0, schedule="cosine"))
    assert (
        cos[0] == pytest.approx(2.0) and cos[50] == pytest.approx(1.0, abs=1e-9) and cos[-1] < 0.01
    )
    step = lrs(OptimConfig(lr=1.0, schedule="step", milestones=[5, 8], gamma=0.1))
    assert step[49] == 1.0 and step[50] == pytest.approx(0.1) and step[80] == pytest.approx(0.01)
    warm = lrs(OptimConfig(lr=1.0, schedule="constant", warmup_epochs=2))
    assert warm[0] == pytest.approx(1 / 20) and warm[19] == 1.0 and warm[-1] == 1.0


# ----------------------------------------------------------------------------- checkpoint codec


def test_state_codec_round_trips_an_optimizer_state():
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.rand(4, 3)).sum().backward()
    opt.step()
    tensors: dict = {}
    encoded = encode_state(opt.state_dict(), tensors, "opt")
    json.dumps(encoded)  # the non-tensor part is plain JSON
    decoded = decode_state(json.loads(json.dumps(encoded)), tensors)
    fresh = torch.optim.Adam(torch.nn.Linear(3, 2).parameters(), lr=0.5)
    fresh.load_state_dict(decoded)
    assert fresh.param_groups[0]["lr"] == 0.1
    for k in ("exp_avg", "exp_avg_sq", "step"):
        assert torch.equal(fresh.state_dict()["state"][0][k], opt.state_dict()["state"][0][k])
    with pytest.raises(TypeError, match="cannot checkpoint a value of type object"):
        encode_state({"x": object()}, {}, "bad")


def test_tensorboard_logs_every_epoch_and_is_cleared_by_overwrite(tiny_config, monkeypatch):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = Trainer(tiny_config("epochs=2", "tensorboard=true")).fit()
    events = sorted(run.glob("events.out.tfevents.*"))
    assert len(events) == 1
    acc = EventAccumulator(str(run))
    acc.Reload()
    rows = _rows(run)
    for key in ("train_loss", "train_acc", "test_acc"):
        logged = [(e.step, e.value) for e in acc.Scalars(key)]
        assert logged == [(r["epoch"], pytest.approx(r[key], rel=1e-6)) for r in rows], key
    Trainer(tiny_config("epochs=1"), overwrite=True).fit()  # the old events go with the run
    assert not list(run.glob("events.out.tfevents.*"))


def test_tensorboard_missing_is_a_clear_error_before_any_work(tiny_config, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith(("torch.utils.tensorboard", "tensorboard")):
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    cfg = tiny_config("tensorboard=true")
    with pytest.raises(ConfigError, match=r"pip install tensorboard"):
        Trainer(cfg)
    assert not (Path(cfg.out_dir) / cfg.name).exists()
