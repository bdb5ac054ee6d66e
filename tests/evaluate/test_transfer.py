"""Transfer matrix: each cell against an attack run by hand on the source and scored on
the target; the diagonal against the white-box evaluation; the CLI and its outputs."""

from __future__ import annotations

import json

import pytest
import torch

import robustlab as rl
from robustlab.attacks import FGSM
from robustlab.evaluate.transfer import transfer_matrix


@pytest.fixture
def two_models(trained_mnist_model, lmt_mnist_model):
    lenet, test = trained_mnist_model
    lmt, _ = lmt_mnist_model
    return {"lenet": lenet, "lmt": lmt}, test


def test_each_cell_is_the_target_scored_on_the_sources_examples(two_models):
    models, test = two_models
    n = 64
    m = transfer_matrix(models, test, attacks=["fgsm"], eps=[0.1, 0.2], n=n, fast=False)
    x, y = test.float_images(slice(0, n)), test.y[:n]
    with torch.no_grad():
        clean_ok = {k: v(x).argmax(1) == y for k, v in models.items()}
    for i, e in enumerate([0.1, 0.2]):
        for s, source in models.items():
            x_adv = FGSM(source, eps=e)(x, y)  # deterministic: per point, batch-independent
            for t, target in models.items():
                with torch.no_grad():
                    survives = clean_ok[t] & (target(x_adv).argmax(1) == y)
                assert m.accuracy[i][s][t] == pytest.approx(float(survives.float().mean())), (s, t)
    for t in models:
        assert m.clean[t] == pytest.approx(float(clean_ok[t].float().mean()))
    assert "lenet" in m.table() and m.to_dict()["accuracy"][0]["lmt"]["lenet"] >= 0


def test_diagonal_is_white_box_and_transfer_is_weaker(two_models, tmp_path):
    models, test = two_models
    m = transfer_matrix(models, test, attacks=["pgd:steps=10"], eps=[0.1], n=64)
    for t, model in models.items():
        white = rl.evaluate(model, test, attacks=["pgd:steps=10"], eps=[0.1], n=64)
        assert m.accuracy[0][t][t] == pytest.approx(white.results[0].robust_accuracy)
    # Papernot et al.: transferred examples are weaker than white-box ones
    assert m.accuracy[0]["lmt"]["lenet"] >= m.accuracy[0]["lenet"]["lenet"]
    png = m.plot(tmp_path / "transfer.png")
    assert png.stat().st_size > 1000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_universal_rows_score_one_perturbation_per_source(two_models, tmp_path):
    from robustlab.attacks.universal import UniversalPerturbation

    models, test = two_models
    fit = rl.load_dataset("mnist5k", "train").subset(200)
    opts = {"max_passes": 2, "deepfool_steps": 5}
    m = transfer_matrix(models, test, attacks=["fgsm"], eps=[0.2], n=64, universal=fit,
                        universal_options=opts, seed=3)  # fmt: skip
    assert m.sources == ["lenet", "lmt", "lenet/universal", "lmt/universal"]
    x, y = test.float_images(slice(0, 64)), test.y[:64]
    for s, source in models.items():
        v = UniversalPerturbation(source, xi=0.2, seed=3, **opts).fit(fit).perturbation
        assert float(v.abs().max()) <= 0.2 + 1e-6
        x_v = (x + v).clamp(0, 1)
        for t, target in models.items():
            with torch.no_grad():
                ok = (target(x).argmax(1) == y) & (target(x_v).argmax(1) == y)
            assert m.accuracy[0][f"{s}/universal"][t] == pytest.approx(float(ok.float().mean()))
        assert 0 <= m.universal_fooling[0][s] <= 1
    # one perturbation for all points is weaker than FGSM on each point, on its own source
    assert m.accuracy[0]["lenet/universal"]["lenet"] >= m.accuracy[0]["lenet"]["lenet"]
    assert "lmt/universal" in m.table()
    assert m.plot(tmp_path / "t.png").stat().st_size > 1000
    one = transfer_matrix(models, test, attacks=["fgsm"], eps=[0.2], n=16,
                          universal=fit.subset(50), universal_options={"max_passes": 1},
                          universal_sources=["lmt"])  # fmt: skip
    assert one.sources == ["lenet", "lmt", "lmt/universal"]
    with pytest.raises(rl.ConfigError, match="universal_sources"):
        transfer_matrix(models, test, eps=[0.1], n=8, universal=fit, universal_sources=["vgg"])


def test_errors(two_models):
    models, test = two_models
    with pytest.raises(rl.ConfigError, match="at least two models"):
        transfer_matrix({"one": models["lenet"]}, test, eps=[0.1])
    with pytest.raises(rl.ConfigError, match="at least one eps"):
        transfer_matrix(models, test, eps=[])


def test_cli_transfer_writes_json_and_png_and_never_overwrites(tiny_config, tmp_path, capsys):
    from robustlab.cli import main
    from robustlab.train import Trainer

    a = Trainer(tiny_config("epochs=1", "name=a")).fit()
    b = Trainer(tiny_config("epochs=1", "name=b", "seed=1")).fit()
    out = tmp_path / "matrix.json"
    argv = ["transfer", str(a), str(b), "--eps", "0.05", "--n", "16", "--attacks", "fgsm",
            "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    saved = json.loads(out.read_text())
    assert saved["names"] == ["a", "b"] and set(saved["accuracy"][0]["a"]) == {"a", "b"}
    assert out.with_suffix(".png").is_file()
    before = out.read_text()
    capsys.readouterr()
    assert main(argv) == 2 and "exists" in capsys.readouterr().err
    assert out.read_text() == before
    assert main([*argv, "--overwrite"]) == 0
    assert main([*argv, "--overwrite", "--universal", "50"]) == 0
    saved = json.loads(out.read_text())
    assert saved["sources"] == ["a", "b", "a/universal", "b/universal"]
    assert set(saved["accuracy"][0]["b/universal"]) == {"a", "b"}
    capsys.readouterr()
    assert main([*argv, "--overwrite", "--universal", "50", "--split", "train"]) == 2
    assert "fitted on" in capsys.readouterr().err


def test_cli_eval_transfer_from_adds_one_table_per_source(tiny_config, capsys):
    from robustlab.cli import main
    from robustlab.train import Trainer

    a = Trainer(tiny_config("epochs=1", "name=a")).fit()
    b = Trainer(tiny_config("epochs=1", "name=b", "seed=1")).fit()
    argv = ["eval", str(a), "--eps", "0.05", "--n", "16", "--attacks", "fgsm"]
    assert main([*argv, "--transfer-from", str(b)]) == 0
    assert f"transfer from {b}" in capsys.readouterr().out
    saved = json.loads((a / "eval.json").read_text())
    transfer = saved["transfer"][str(b)]
    # examples made on b are weaker on a than a's own (white-box) examples, never stronger
    # by more than noise on 16 points
    white = saved["robust"]["results"][0]["robust_accuracy"]
    assert transfer["results"][0]["robust_accuracy"] >= white - 2 / 16
    assert main(["eval", str(a), "--transfer-from", str(b)]) == 2
    assert "--transfer-from needs --eps" in capsys.readouterr().err
