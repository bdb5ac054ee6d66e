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


def test_eval_with_attacks_and_attack_command(tiny_config, tmp_path, capsys):
    import numpy as np

    from robustlab import Trainer
    from robustlab.attacks import lp_norm

    run = Trainer(tiny_config("epochs=1")).fit()
    assert (
        main(["eval", str(run), "--attacks", "fgsm,pgd:steps=3", "--eps", "0.05,0.1", "--n", "40"])
        == 0
    )
    out = capsys.readouterr().out
    assert "linf robust accuracy, 40 points" in out and "worst case" in out
    result = json.loads((run / "eval.json").read_text())
    assert [r["eps"] for r in result["robust"]["results"]] == [0.05, 0.1]
    assert result["robust"]["clean_accuracy"] == result["clean_accuracy"]
    assert (run / "eval_state.json").is_file()

    out_npz = tmp_path / "adv.npz"
    assert (
        main(
            [
                "attack",
                str(run),
                "--attack",
                "pgd:steps=5",
                "--eps",
                "0.1",
                "--n",
                "6",
                "--out",
                str(out_npz),
            ]
        )
        == 0
    )
    arrays = np.load(out_npz)
    assert arrays["x_adv"].shape == arrays["x"].shape == (6, 1, 12, 12)
    import torch

    delta = torch.from_numpy(arrays["x_adv"] - arrays["x"])
    assert float(lp_norm(delta, "linf").max()) <= 0.1 + 1e-6
    assert np.array_equal(arrays["success"], arrays["pred_adv"] != arrays["y"])
    png = out_npz.with_suffix(".png")
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "success rate" in capsys.readouterr().out


def test_compare_prints_runs_side_by_side(tiny_config, tmp_path, capsys):
    from robustlab import Trainer
    from robustlab.evaluate import evaluate

    std = Trainer(tiny_config("epochs=1", "name=std")).fit()
    adv = Trainer(tiny_config("epochs=1", "name=adv", "recipe.name=fast",
                              "recipe.options={eps: 0.1, guard: false}")).fit()  # fmt: skip
    argv = ["compare", str(std), str(adv), "--attacks", "fgsm", "--eps", "0.05,0.1", "--n", "40"]
    assert main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    assert "std" in out[1] and "adv" in out[1]
    assert out[2].split()[1:] == ["standard", "fast"]
    rows = {line.split()[0] + (line.split()[1] if line.startswith("eps") else ""): line.split()[-2:]
            for line in out[4:]}  # fmt: skip
    data = rl.load_dataset("synthetic", "test", size=12, n_train=256, n_test=128, num_classes=4)
    for i, run in enumerate((std, adv)):  # each column is that run's own evaluation
        report = evaluate(rl.load(run), data, attacks=["fgsm"], eps=[0.05, 0.1], n=40)
        assert rows["clean"][i] == f"{100 * report.clean_accuracy:.1f}%"
        assert rows["eps0.1"][i] == f"{100 * report.results[1].robust_accuracy:.1f}%"


def test_certify_command_writes_the_bound_and_certified_accuracy(tiny_config, capsys):
    from robustlab import Trainer
    from robustlab.certify import certify

    run = Trainer(tiny_config("epochs=1", "model.name=mlp")).fit()
    assert main(["certify", str(run), "--radii", "0.1,0.5", "--n", "60"]) == 0
    out = capsys.readouterr().out
    assert "L2 Lipschitz bound" in out and "radius 0.5" in out
    result = json.loads((run / "certify.json").read_text())
    data = rl.load_dataset("synthetic", "test", size=12, n_train=256, n_test=128, num_classes=4)
    expected = certify(rl.load(run), data, radii=[0.1, 0.5], n=60, method="fft")
    assert result["report"]["certified_accuracy"] == expected.certified_accuracy
    assert (run / "certified.png").stat().st_size > 0
    # the curve (and the plot) agree with the table at the requested radii
    for radius, acc in zip([0.1, 0.5], expected.certified_accuracy):
        assert expected.accuracy_at(radius) == pytest.approx(acc)
    curve = expected.curve()
    assert curve[0] == (0.0, expected.clean_accuracy) and curve[-1][1] > 0
    assert [a for _, a in curve] == sorted((a for _, a in curve), reverse=True)
    # an estimate is called an estimate, on screen and in certify.json
    assert main(["certify", str(run), "--radii", "0.5", "--n", "20", "--method", "power"]) == 0
    out = capsys.readouterr().out
    assert "estimated certified L2 accuracy (power iteration: not a guarantee)" in out
    result = json.loads((run / "certify.json").read_text())
    assert result["report"]["guaranteed"] is False and result["bound"]["guaranteed"] is False
    assert "estimated_certified_accuracy" in result["report"]
    assert "certified_accuracy" not in result["report"]


def test_eval_teacher_scores_the_teacher_on_the_same_points(tiny_config, capsys):
    from robustlab import Trainer
    from robustlab.evaluate import evaluate

    teacher = Trainer(tiny_config("epochs=1", "name=teacher")).fit()
    student = Trainer(tiny_config(
        "epochs=1", "name=student", "model.name=mlp", "recipe.name=distill",
        f"recipe.options={{teacher: {teacher}}}",
    )).fit()  # fmt: skip
    args = ["eval", str(student), "--attacks", "pgd:steps=3", "--eps", "0.1", "--n", "40"]
    assert main([*args, "--teacher"]) == 0
    assert f"teacher {teacher}:" in capsys.readouterr().out
    result = json.loads((student / "eval.json").read_text())
    # independent reference: the teacher evaluated directly, same points, attack and seed
    data = rl.load_dataset("synthetic", "test", size=12, n_train=256, n_test=128,
                           num_classes=4).subset(40)  # fmt: skip
    ref = evaluate(rl.load(teacher), data, attacks=["pgd:steps=3"], eps=[0.1], seed=0)
    got = result["teacher"]
    assert got["run"] == str(teacher) and got["clean_accuracy"] == ref.clean_accuracy
    assert got["robust"]["results"][0]["robust_accuracy"] == ref.results[0].robust_accuracy
    assert got["parameters"] > result["parameters"]  # small_cnn teacher, mlp student
    assert main(["eval", str(teacher), "--eps", "0.1", "--teacher"]) != 0
    assert "was not trained from a teacher" in capsys.readouterr().err
    assert main(["eval", str(student), "--teacher"]) != 0
    assert "--teacher needs --eps" in capsys.readouterr().err
