"""The command line: every command is a library call with readable output and errors."""

from __future__ import annotations

import json

import pytest

import robustlab as rl
from robustlab.cli import main
from robustlab.config import dump_config
from robustlab.models import MODELS


def test_list_prints_every_registered_name(capsys):
    assert main(["list", "models"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in MODELS.names())
    assert "Madry" in out  # the one-line summaries are shown
    for what in ("datasets", "recipes", "activations"):
        assert main(["list", what]) == 0
    assert "mnist5k" in capsys.readouterr().out


def test_train_then_eval(tiny_config, tmp_path, capsys):
    path = tmp_path / "exp.yaml"
    path.write_text(dump_config(tiny_config("epochs=1")))
    assert main(["-q", "train", str(path), "--set", "epochs=2", "--set", "name=cli"]) == 0
    out = capsys.readouterr().out
    run = tmp_path / "runs" / "cli"
    assert f"run       {run}" in out and "test acc" in out
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
    assert main(["eval", str(run), "--n", "50"]) == 0
    result = json.loads((run / "eval.json").read_text())
    data = rl.load_dataset(
        "synthetic", "test", size=12, n_train=256, n_test=128, num_classes=4
    ).subset(50)
    assert result == {
        "split": "test",
        "n": 50,
        "clean_accuracy": rl.clean_accuracy(rl.load(run), data),
    }
    assert f"{100 * result['clean_accuracy']:.2f}%" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["train", "{cfg}", "--set", "optim.lrr=1"],
            "unknown config key 'optim.lrr'; did you mean 'optim.lr'",
        ),
        (
            ["train", "{cfg}", "--set", "data.name=mnist6k"],
            "unknown dataset 'mnist6k'; did you mean 'mnist5k'",
        ),
        (["train", "{tmp}/missing.yaml"], "config file .*missing.yaml does not exist"),
        (["eval", "{tmp}/no-run"], "run directory .*no-run does not exist"),
        (
            [
                "train",
                "{cfg}",
                "--set",
                "model.name=wide_resnet",
                "--set",
                "model.options={depth: 12}",
            ],
            r"depth must be 6n \+ 4",
        ),
    ],
)
def test_errors_exit_2_with_a_message(tiny_config, tmp_path, capsys, argv, message):
    import re

    cfg = tmp_path / "exp.yaml"
    cfg.write_text(dump_config(tiny_config()))
    argv = [a.replace("{cfg}", str(cfg)).replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("robustlab: error: ") and re.search(message, err), err


def test_argparse_rejects_unknown_commands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["trian"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'trian'" in capsys.readouterr().err
