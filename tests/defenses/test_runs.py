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


def test_detect_fits_on_held_out_points_and_writes_the_report(tiny_config, capsys):
    import pytest

    run = Trainer(tiny_config("epochs=1")).fit()
    data_meta = json.loads((run / "meta.json").read_text())["data"]
    test = rl.load_dataset(data_meta["name"], "test", **data_meta["options"])
    n_test = len(test)
    argv = ["detect", str(run), "--squeezer", "bitdepth:bits=1", "--squeezer", "median:size=2",
            "--eps", "0.1,0.2", "--n", "24", "--fit-n", "40", "--steps", "3"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "adaptive" in out and "written" in out
    saved = json.loads((run / "detect.json").read_text())
    assert saved["n"] == 24 and saved["fit_n"] == 40 and [r["eps"] for r in saved["results"]] == [
        0.1, 0.2,
    ]  # fmt: skip
    # the threshold is the one fitted on the last 40 test points, not on the evaluated ones
    from robustlab.defenses import SqueezeDetector

    det = SqueezeDetector(rl.load(run), ["bitdepth:bits=1", "median:size=2"])
    det.fit(test.float_images(slice(n_test - 40, n_test)), fpr=0.05)
    assert saved["threshold"] == pytest.approx(det.threshold)
    capsys.readouterr()
    assert main([*argv[:-6], "--n", str(n_test), "--fit-n", "40"]) == 2
    assert "held out from those evaluated" in capsys.readouterr().err
    assert main([*argv, "--fpr", "1.5"]) == 2
    assert "--fpr must be in (0, 1)" in capsys.readouterr().err
