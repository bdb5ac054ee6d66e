"""Checkpoint selection on a held-out validation split: the split is never trained on,
the saved weights are those of the best validation epoch (not the last, not the best on
the test split), selection survives a resume, and configs that would choose on the test
split are refused."""

from __future__ import annotations

import json

import pytest
import torch

import robustlab as rl
from robustlab.data import load_dataset
from robustlab.evaluate import clean_accuracy
from robustlab.train import Trainer
from robustlab.train.recipes.base import RECIPES, Recipe

SEEN: list[torch.Tensor] = []


@RECIPES.register("_test_recording")
class Recording(Recipe):
    """Cross-entropy, recording every training image it is given."""

    def loss(self, model, x, y):
        SEEN.append(x.detach().cpu().clone())
        logits = model(x)
        return {"loss": self.cross_entropy(logits, y), "logits": logits}


@RECIPES.register("_test_sabotage")
class Sabotage(Recipe):
    """Learns shifted labels in the first epoch, the true ones in the second, and
    unlearns in the third (gradient ascent on the cross-entropy): the validation
    accuracy peaks after epoch 2."""

    def loss(self, model, x, y):
        logits = model(x)
        if self.progress < 1:
            loss = self.cross_entropy(logits, (y + 1) % 4)
        elif self.progress < 2:
            loss = self.cross_entropy(logits, y)
        else:
            loss = -self.cross_entropy(logits, y).clamp(max=20.0)
        return {"loss": loss, "logits": logits}


def test_the_validation_split_is_never_trained_on(tiny_config):
    SEEN.clear()
    cfg = tiny_config("recipe.name=_test_recording", "data.val_size=64", "epochs=2")
    trainer = Trainer(cfg)
    trainer.fit()
    train = load_dataset("synthetic", "train", None, size=12, n_train=256, n_test=128,
                         num_classes=4)  # fmt: skip

    def keys(images):  # exact pixel contents of each image
        return [bytes((255 * im).round().to(torch.uint8).flatten().tolist()) for im in images]

    images = set(keys(train.float_images()))
    val = set(keys(trainer.val_data.float_images()))
    seen = keys(torch.cat(SEEN))
    assert len(images) == 256 and len(val) == 64 and len(seen) == 2 * 192  # twice each
    assert not set(seen) & val and set(seen) | val == images  # disjoint, nothing else lost
    # a random draw, not the file's last images (files in class order would lose a class)
    assert val != set(keys(train.float_images()[-64:]))
    assert len(set(trainer.val_data.y.tolist())) == 4


def _fake_test_accuracy(monkeypatch):
    """A test split that would pick epoch 1 (or 3) if selection looked at it."""

    def fake(self):
        return [0.99, 0.01, 0.98][min(self.epoch, 2)]

    monkeypatch.setattr(Trainer, "evaluate", fake)


def test_the_best_validation_epoch_is_saved(tiny_config, monkeypatch):
    _fake_test_accuracy(monkeypatch)
    cfg = tiny_config("recipe.name=_test_sabotage", "data.val_size=64", "epochs=3",
                      "select.metric=val_acc", "optim.lr=0.003")  # fmt: skip
    trainer = Trainer(cfg)
    run = trainer.fit()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    val = [r["val_acc"] for r in rows]
    assert val[1] > max(val[0], val[2]), val  # the scenario holds
    meta = json.loads((run / "meta.json").read_text())
    assert meta["final"]["selected_epoch"] == 2 and meta["final"]["selected_by"] == "val_acc"
    assert meta["final"]["train_acc"] == rows[1]["train_acc"]  # the saved epoch's
    # the saved model is epoch 2's: its accuracy on the validation images, recomputed
    saved = clean_accuracy(rl.load(run), trainer.val_data)
    assert saved == pytest.approx(val[1], abs=1e-9)

    last = Trainer(tiny_config("recipe.name=_test_sabotage", "data.val_size=64", "epochs=3",
                               "optim.lr=0.003", "name=last")).fit()  # fmt: skip
    assert clean_accuracy(rl.load(last), trainer.val_data) == pytest.approx(
        val[2], abs=1e-9
    )  # select.metric=last (the default) keeps the last epoch: same run, same seed


def test_selection_survives_a_resume(tiny_config, monkeypatch):
    _fake_test_accuracy(monkeypatch)
    args = ("recipe.name=_test_sabotage", "data.val_size=64", "select.metric=val_acc",
            "optim.lr=0.003")  # fmt: skip
    whole = Trainer(tiny_config(*args, "epochs=3", "name=whole")).fit()
    Trainer(tiny_config(*args, "epochs=2", "name=cut")).fit()  # stops after the best epoch
    cut = Trainer(tiny_config(*args, "epochs=3", "name=cut"), extend=True).fit()
    a = rl.load(whole).state_dict()
    b = rl.load(cut).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((cut / "meta.json").read_text())["final"]["selected_epoch"] == 2


def test_robust_selection_and_refusals(tiny_config):
    cfg = tiny_config("recipe.name=fgsm", "recipe.options={eps: 0.1}", "data.val_size=32",
                      "select.metric=val_robust", "select.steps=2")  # fmt: skip
    run = Trainer(cfg).fit()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(0 <= r["val_robust_acc"] <= r["val_acc"] for r in rows)
    with pytest.raises(rl.ConfigError, match="data.val_size.*test split is never used"):
        tiny_config("select.metric=val_acc").validate()
    with pytest.raises(rl.ConfigError, match="select.metric"):
        tiny_config("select.metric=test_acc", "data.val_size=10").validate()
    with pytest.raises(rl.ConfigError, match="select.eps"):
        Trainer(tiny_config("data.val_size=10", "select.metric=val_robust"))
    with pytest.raises(rl.ConfigError, match="val_size .* smaller"):
        Trainer(tiny_config("data.val_size=256"))
    # the robust check attacks in the recipe's norm unless told otherwise
    l2 = ["recipe.name=pgd", "recipe.options={eps: 0.5, norm: l2, steps: 2}",
          "data.val_size=32", "select.metric=val_robust"]  # fmt: skip
    assert Trainer(tiny_config(*l2)).select_norm == "l2"
    assert Trainer(tiny_config(*l2, "select.norm=linf", "select.eps=0.05")).select_norm == "linf"
    with pytest.raises(rl.ConfigError, match="select.norm"):
        tiny_config(*l2, "select.norm=l1").validate()
