"""Defenses and denoising blocks in run directories: trained with, saved, loaded and
evaluated adaptively from the CLI."""

from __future__ import annotations

import json

import torch

import robustlab as rl
from robustlab.cli import main
from robustlab.defenses import DefendedModel
from robustlab.nn.denoise import DenoisingBlock
from robustlab.train import Trainer


def test_a_run_trained_behind_a_defense_loads_behind_it(tiny_config):
    trainer = Trainer(tiny_config("epochs=1", "defenses=[bitdepth:bits=5, 'noise:sigma=0.05']"))
    run = trainer.fit()
    meta = json.loads((run / "meta.json").read_text())
    assert meta["defenses"] == ["bitdepth:bits=5:temperature=0.1", "noise:sigma=0.05:clip=True"]
    model = rl.load(run)
    assert isinstance(model, DefendedModel) and model.specs() == meta["defenses"]
    assert model.randomized and not model.differentiable
    # the weights are those of the model the trainer trained behind the defenses
    trained = trainer.model.model.state_dict()
    assert all(torch.equal(v.cpu(), trained[k].cpu()) for k, v in model.model.state_dict().items())


def test_a_run_with_denoising_blocks_rebuilds_them(tiny_config):
    trainer = Trainer(tiny_config("epochs=1", "model.denoise={after: [net.2], kind: mean}"))
    run = trainer.fit()
    model = rl.load(run)
    assert sum(isinstance(m, DenoisingBlock) for m in model.modules()) == 1
    x = torch.rand(4, 1, 12, 12)
    with torch.no_grad():
        assert torch.equal(model(x), trainer.model.eval()(x))


def test_eval_with_a_defense_gives_the_adaptive_table(tiny_config, capsys):
    run = Trainer(tiny_config("epochs=1")).fit()
    argv = ["eval", str(run), "--defense", "bitdepth:bits=2", "--eps", "0.2", "--n", "32",
            "--attacks", "pgd:steps=5"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "none" in out and "naive" in out and "bpda" in out and "worst case" in out
    robust = json.loads((run / "eval.json").read_text())["robust"]
    assert set(robust["modes"]) == {"none", "naive", "bpda", "transfer"}
    worst = robust["robust_accuracy"][0]
    for mode in ("naive", "bpda", "transfer"):
        assert worst <= robust["modes"][mode]["results"][0]["robust_accuracy"]
    assert main(["list", "defenses"]) == 0
    assert "jpeg" in capsys.readouterr().out
