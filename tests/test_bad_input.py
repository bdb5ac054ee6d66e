"""Bad or unusual input, through the CLI and the Python API: each gets one clear line.

CLI cases run ``robustlab.cli.main`` in-process and require exit status 2 and exactly one
line on stderr, ``robustlab: error: ...``, matching what the case expects (argparse's own
checks print their usage line first, then one ``error:`` line). API cases require a
robustlab error (or ``ValueError``) whose message is one line and says what is wrong.
Nothing a case touches may be left half-written.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import robustlab as rl
from robustlab import io
from robustlab.cli import main
from robustlab.config import dump_config, load_config
from robustlab.errors import RobustlabError
from robustlab.train import Trainer

BASE = [
    "name=tiny", "epochs=1", "data.name=synthetic",
    "data.options={size: 12, n_train: 64, n_test: 32, num_classes: 4}",
    "data.batch_size=32", "model.name=small_cnn", "optim.name=adam", "optim.lr=0.003",
]  # fmt: skip


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A finished run, its config file, and a scratch directory."""
    root = tmp_path_factory.mktemp("bad")
    cfg = load_config(None, [*BASE, f"out_dir={root / 'runs'}"])
    run = Trainer(cfg).fit()
    cfg_path = root / "tiny.yaml"
    cfg_path.write_text(dump_config(cfg))
    return {"root": root, "run": run, "cfg": cfg_path}


def _copy_run(work, name: str) -> Path:
    target = work["root"] / "copies" / name
    shutil.copytree(work["run"], target)
    return target


def _cli(capsys, argv: list[str]) -> tuple[int, str]:
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse
        rc = exc.code
    err = capsys.readouterr().err
    return rc, err


# ----------------------------------------------------------------------------- CLI cases
# (id, argv builder, expected message regex); {run}, {cfg}, {root} are substituted.

CLI_CASES = [
    # train: the config
    ("config-missing", ["train", "{root}/nope.yaml"], r"config file .*nope.yaml does not exist"),
    ("config-invalid-yaml", ["train", "{root}/broken.yaml"], r"broken.yaml: invalid YAML"),
    ("config-not-mapping", ["train", "{root}/list.yaml"], r"top level must be a mapping"),
    ("unknown-key", ["train", "{cfg}", "--set", "optim.lrr=0.1"], r"unknown config key 'optim.lrr'; did you mean 'optim.lr'"),
    ("int-not-number", ["train", "{cfg}", "--set", "epochs=abc"], r"epochs: expected an integer, got 'abc'"),
    ("epochs-zero", ["train", "{cfg}", "--set", "epochs=0"], r"epochs must be >= 1"),
    ("lr-negative", ["train", "{cfg}", "--set", "optim.lr=-1e-3"], r"optim.lr must be > 0"),
    ("lr-divide-by-zero", ["train", "{cfg}", "--set", "optim.lr=1/0"], r"divides by zero"),
    ("lr-words", ["train", "{cfg}", "--set", "optim.lr=fast"], r"optim.lr: expected a number \(like 0.1, 1e-4 or 8/255\), got 'fast'"),
    ("override-without-equals", ["train", "{cfg}", "--set", "epochs"], r"must look like key=value"),
    ("unknown-recipe", ["train", "{cfg}", "--set", "recipe.name=pgdd"], r"unknown recipe 'pgdd'; did you mean 'pgd'"),
    ("unknown-recipe-option", ["train", "{cfg}", "--set", "recipe.name=pgd", "--set", "recipe.options={{stepz: 3}}"], r"recipe 'pgd' has no option 'stepz'; did you mean 'steps'"),
    ("recipe-option-type", ["train", "{cfg}", "--set", "recipe.name=pgd", "--set", "recipe.options={{steps: many}}"], r"recipe 'pgd' option 'steps': expected an integer, got 'many'"),
    ("unknown-model", ["train", "{cfg}", "--set", "model.name=small_cn"], r"unknown model 'small_cn'; did you mean 'small_cnn'"),
    ("unknown-model-option", ["train", "{cfg}", "--set", "model.options={{bnn: true}}"], r"model 'small_cnn' has no option 'bnn'; did you mean 'bn'"),
    ("unknown-dataset", ["train", "{cfg}", "--set", "data.name=mnist6k"], r"unknown dataset 'mnist6k'; did you mean 'mnist5k'"),
    ("batch-zero", ["train", "{cfg}", "--set", "data.batch_size=0"], r"data.batch_size must be >= 1"),
    ("imagefolder-missing-root", ["train", "{cfg}", "--set", "data.name=imagefolder", "--set", "data.options={{}}", "--set", "data.root={root}/no-images"], r"no-images"),
    ("out-dir-under-a-file", ["train", "{cfg}", "--out-dir", "{root}/afile/runs"], r"(Not a directory|File exists).*afile"),
    # train: the run directory
    ("resume-missing", ["train", "{cfg}", "--set", "name=never", "--resume"], r"cannot resume .*never: the directory does not exist"),
    ("resume-no-checkpoint", ["train", "{cfg}", "--set", "name=userdir", "--resume"], r"cannot resume .*userdir: it holds no checkpoint.safetensors \(nothing was changed\)"),
    ("resume-finished", ["train", "{cfg}", "--resume"], r"tiny is finished \(1 epochs trained\): nothing to resume.*--extend"),
    ("extend-not-longer", ["train", "{cfg}", "--extend"], r"cannot extend .*config asks for 1; give more"),
    ("overwrite-foreign", ["train", "{cfg}", "--set", "name=userdir", "--overwrite"], r"refusing to overwrite .*userdir: it is not a robustlab run directory"),
    ("exists", ["train", "{cfg}"], r"run directory .*tiny already exists: resume it \(--resume\), replace it \(--overwrite\)"),
    ("duplicate-key", ["train", "{root}/dup.yaml"], r"dup.yaml: key 'epochs' is given twice \(line 2\)"),
    ("name-escapes", ["train", "{cfg}", "--set", "name=../../escape"], r"name must be a plain directory name"),
    ("momentum-range", ["train", "{cfg}", "--set", "optim.momentum=-1"], r"optim.momentum must lie in \[0, 1\)"),
    ("betas-range", ["train", "{cfg}", "--set", "optim.betas=[0.9, 1.5]"], r"optim.betas must be two numbers in \[0, 1\)"),
    ("device-missing", ["train", "{cfg}", "--set", "device=cuda:7"], r"(CUDA is not available here|has \d+ CUDA devices)"),
    ("device-unknown", ["train", "{cfg}", "--set", "device=gpu"], r"device must be auto, cpu, cuda or cuda:N"),
    ("recipe-step-size-negative", ["train", "{cfg}", "--set", "recipe.name=pgd", "--set", "recipe.options={{step_size: -1/255}}"], r"pgd recipe: step_size must be > 0"),
    # eval
    ("eval-missing-run", ["eval", "{root}/nowhere"], r"run directory .*nowhere does not exist"),
    ("eval-not-a-run", ["eval", "{root}/runs/userdir"], r"userdir is not a robustlab run directory \(it has no meta.json\)"),
    ("eval-meta-invalid", ["eval", "{copy:meta-invalid}"], r"meta.json is not valid JSON"),
    ("eval-meta-no-data", ["eval", "{copy:meta-no-data}"], r"meta.json lacks its 'data' section"),
    ("eval-meta-no-model", ["eval", "{copy:meta-no-model}"], r"meta.json lacks its 'model' section"),
    ("eval-weights-truncated", ["eval", "{copy:truncated}"], r"model.safetensors is truncated or not a valid safetensors file"),
    ("eval-weights-missing", ["eval", "{copy:no-weights}"], r"model.safetensors does not exist; training did not finish: resume it"),
    ("eval-n-negative", ["eval", "{run}", "--n", "-5"], r"--n must be >= 0"),
    ("eval-n-too-large", ["eval", "{run}", "--n", "100000"], r"--n 100000 asks for more images than synthetic test has \(32\)"),
    ("eval-eps-words", ["eval", "{run}", "--eps", "0.1,abc"], r"--eps: expected a number .*got 'abc'"),
    ("eval-eps-negative", ["eval", "{run}", "--eps", "-0.1"], r"eps must be >= 0"),
    ("eval-unknown-attack", ["eval", "{run}", "--eps", "0.1", "--attacks", "pgdd"], r"unknown attack 'pgdd'; did you mean 'pgd'"),
    ("eval-unknown-attack-option", ["eval", "{run}", "--eps", "0.1", "--attacks", "pgd:stepz=3"], r"attack 'pgd' has no option 'stepz'; did you mean 'steps'"),
    ("eval-attack-option-type", ["eval", "{run}", "--eps", "0.1", "--attacks", "pgd:steps=abc"], r"attack 'pgd' option 'steps': expected an integer, got 'abc'"),
    ("eval-attack-option-form", ["eval", "{run}", "--eps", "0.1", "--attacks", "pgd:steps"], r"attack option 'steps' in 'pgd:steps' must look like key=value"),
    ("eval-step-size-negative", ["eval", "{run}", "--eps", "0.1", "--attacks", "pgd:step_size=-1"], r"step_size must be a finite number > 0"),
    ("eval-targeted-true", ["eval", "{run}", "--eps", "0.1", "--attacks", "pgd:targeted=true"], r"targeted=true needs target classes"),
    ("eval-state-not-a-state", ["eval", "{run}", "--eps", "0.1", "--state", "{root}/precious.npz"], r"precious.npz exists and is not an evaluation state; refusing to overwrite it"),
    ("eval-device-unavailable", ["eval", "{run}", "--device", "cuda:3"], r"(CUDA is not available here|has \d+ CUDA devices)"),
    ("eval-batch-zero", ["eval", "{run}", "--batch-size", "0"], r"argument --batch-size: must be >= 1, got 0"),
    # certify, attack, compare
    ("certify-radii-words", ["certify", "{run}", "--radii", "0.5,big"], r"--radii: expected a number .*got 'big'"),
    ("certify-negative-radius", ["certify", "{run}", "--radii", "-1"], r"radii must be finite and >= 0"),
    ("certify-unknown-method", ["certify", "{run}", "--method", "guess"], r"argument --method: invalid choice: 'guess'"),
    ("attack-out-exists", ["attack", "{run}", "--attack", "fgsm", "--eps", "0.1", "--out", "{root}/precious.npz"], r"precious.npz already exist\(s\): pass --overwrite"),
    ("attack-out-is-a-directory", ["attack", "{run}", "--attack", "fgsm", "--eps", "0.1", "--out", "{root}/dir.npz", "--overwrite"], r"dir.npz is a directory"),
    ("attack-out-not-npz", ["attack", "{run}", "--attack", "fgsm", "--eps", "0.1", "--out", "{root}/x.txt"], r"--out must name a .npz file"),
    ("attack-eps-words", ["attack", "{run}", "--attack", "fgsm", "--eps", "lots"], r"argument --eps: value: expected a number"),
    ("compare-missing-run", ["compare", "{run}", "{root}/nowhere", "--eps", "0.1"], r"run directory .*nowhere does not exist"),
    ("compare-no-eps", ["compare", "{run}", "--eps", ","], r"--eps needs at least one budget"),
]  # fmt: skip


def _prepare(work, argv: list[str]) -> list[str]:
    root = work["root"]
    (root / "broken.yaml").write_text("epochs: [1,\n")
    (root / "list.yaml").write_text("- 1\n- 2\n")
    (root / "dup.yaml").write_text("epochs: 1\nepochs: 2\n")
    (root / "dir.npz").mkdir(exist_ok=True)
    (root / "afile").write_text("a file, not a directory")
    (root / "precious.npz").write_bytes(b"user data")
    user = root / "runs" / "userdir"
    user.mkdir(parents=True, exist_ok=True)
    (user / "notes.txt").write_text("mine")
    out = []
    for a in argv:
        if a.startswith("{copy:"):
            name = a[6:-1]
            run = (
                _copy_run(work, name)
                if not (root / "copies" / name).exists()
                else root / "copies" / name
            )
            meta = json.loads((run / io.META_FILE).read_text())
            if name == "meta-invalid":
                (run / io.META_FILE).write_text("{not json")
            elif name in ("meta-no-data", "meta-no-model"):
                meta.pop(name.rsplit("-", 1)[1])
                (run / io.META_FILE).write_text(json.dumps(meta))
            elif name == "truncated":
                w = run / io.MODEL_FILE
                w.write_bytes(w.read_bytes()[:200])
            elif name == "no-weights":
                (run / io.MODEL_FILE).unlink(missing_ok=True)
            a = str(run)
        out.append(a.format(run=work["run"], cfg=work["cfg"], root=root))
    return out


@pytest.mark.parametrize("case", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_bad_input_gets_one_clear_line(work, capsys, case):
    import re

    _, argv, expected = case
    argv = _prepare(work, argv)
    snapshot = {p: p.read_bytes() for p in (work["root"] / "runs").rglob("*") if p.is_file()}
    rc, err = _cli(capsys, argv)
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert "Traceback" not in err
    if lines and lines[0].startswith("usage:"):  # argparse's own check: usage, then one line
        lines = [ln for ln in lines if not ln.startswith(("usage:", " "))]
    assert len(lines) == 1, err
    assert re.search(expected, lines[0]), lines[0]
    # nothing of the finished run or the user's directory changed, no temporary file left
    after = {p: p.read_bytes() for p in (work["root"] / "runs").rglob("*") if p.is_file()}
    assert after == snapshot
    assert (work["root"] / "precious.npz").read_bytes() == b"user data"


def test_disk_full_while_writing_eval_output_leaves_no_partial_file(work, capsys, monkeypatch):
    run = _copy_run(work, "disk-full")
    before = sorted(p.name for p in run.iterdir())

    def full(src, dst):
        raise OSError(28, "No space left on device", str(dst))

    monkeypatch.setattr(io.os, "replace", full)
    rc, err = _cli(capsys, ["eval", str(run)])
    assert (
        rc == 2 and err.strip() == f"robustlab: error: No space left on device: {run / 'eval.json'}"
    )
    assert sorted(p.name for p in run.iterdir()) == before  # no eval.json, no .tmp, no lock


# ----------------------------------------------------------------------------- API cases


class _TupleModel(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x), x.mean()


class _DictModel(_TupleModel):
    def forward(self, x):
        return {"logits": self.model(x), "feat": x}


def _model_and_data(work):
    return rl.load(work["run"]), rl.load_dataset(
        "synthetic", "test", size=12, n_train=64, n_test=32, num_classes=4
    )


API_CASES = [
    ("eps-string", lambda m, d: rl.evaluate(m, d, eps="0.1,0.2"), r"eps must be a number or a list of numbers, got the string '0.1,0.2'; write eps=\[0.1, 0.2\]"),
    ("eps-negative", lambda m, d: rl.evaluate(m, d, eps=[-0.1]), r"eps must be >= 0"),
    ("eps-nan", lambda m, d: rl.evaluate(m, d, eps=[float("nan")]), r"eps: expected a finite number"),
    ("n-zero", lambda m, d: rl.evaluate(m, d, eps=[0.1], n=0), r"n must be >= 1, got 0"),
    ("n-negative", lambda m, d: rl.evaluate(m, d, eps=[0.1], n=-3), r"n must be >= 1, got -3"),
    ("n-too-large", lambda m, d: rl.evaluate(m, d, eps=[0.1], n=10**6), r"n=1000000 asks for more points than the data set has \(32\)"),
    ("norm-unknown", lambda m, d: rl.evaluate(m, d, eps=[0.1], norm="l3"), r"norm must be 'linf' or 'l2', got 'l3'"),
    ("batch-zero", lambda m, d: rl.evaluate(m, d, eps=[0.1], batch_size=0), r"batch_size must be a whole number >= 1"),
    ("data-not-dataset", lambda m, d: rl.evaluate(m, d.x, eps=[0.1]), r"data must be an ImageDataset"),
    ("tuple-output", lambda m, d: rl.evaluate(_TupleModel(m), d, eps=[0.1]), r"the model returned a tuple of 2 items; pass output=0"),
    ("dict-output-clean", lambda m, d: rl.clean_accuracy(_DictModel(m), d), r"the model returned a dict with keys \['feat', 'logits'\]; pass output="),
    ("bad-output-key", lambda m, d: rl.clean_accuracy(_DictModel(m), d, output="logit"), r"output='logit' does not select from the model's output \(keys \['feat', 'logits'\]\)"),
    ("shape-mismatch", lambda m, d: rl.evaluate(m, rl.load_dataset("mnist5k", "test"), eps=[0.1], n=4), r"model cannot take the data's images of shape \(1, 28, 28\)"),
    ("attack-eps-nan", lambda m, d: rl.attacks.PGD(m, eps=float("nan")), r"eps must be a finite number >= 0"),
    ("attack-eps-none", lambda m, d: rl.attacks.PGD(m, eps=None), r"needs eps"),
    ("load-missing", lambda m, d: rl.load("/nonexistent/run"), r"run directory /nonexistent/run does not exist"),
    ("dataset-unknown", lambda m, d: rl.load_dataset("mnist6k", "test"), r"unknown dataset 'mnist6k'; did you mean 'mnist5k'"),
    ("override-form", lambda m, d: load_config(None, ["optim.lr"]), r"override 'optim.lr' must look like key=value"),
    ("normalize-channels", lambda m, d: rl.create_model("small_cnn", in_channels=1, input_size=28, mean=[0.5] * 3, std=[0.2] * 3), r"Normalize: 3 channel means/stds for a model with 1 input channels"),
    ("flattened-input", lambda m, d: m(torch.rand(2, 3 * 12 * 12)), r"\(B, C, H, W\)"),
    ("labels-beyond-the-model", lambda m, d: rl.clean_accuracy(m, rl.ImageDataset(d.x, d.y + 4, 8)), r"labels 4..7 but the model has 4 outputs"),
    ("labels-beyond-the-model-eval", lambda m, d: rl.evaluate(m, rl.ImageDataset(d.x, d.y + 4, 8), eps=[0.1]), r"labels 4..7 but the model has 4 outputs"),
    ("activation-instance", lambda m, d: rl.nn.swap_activations(m, torch.nn.GELU()), r"not a module instance \(GELU\)"),
    ("attack-step-size-zero", lambda m, d: rl.attacks.PGD(m, eps=0.1, step_size=0), r"step_size must be a finite number > 0"),
    ("output-error-blamed-on-output", lambda m, d: rl.evaluate(_DictModel(m), d, eps=[0.1], output="logit"), r"^output='logit' does not select"),
    ("recipe-option-string", lambda m, d: rl.train.create_recipe("pgd", steps="ten"), r"recipe 'pgd' option 'steps': expected an integer, got 'ten'"),
]  # fmt: skip


@pytest.mark.parametrize("case", API_CASES, ids=[c[0] for c in API_CASES])
def test_api_bad_input_gets_one_clear_line(work, case):
    import re

    _, call, expected = case
    model, data = _model_and_data(work)
    with pytest.raises((RobustlabError, ValueError)) as info:
        call(model, data)
    message = str(info.value)
    assert "\n" not in message.strip(), message
    assert re.search(expected, message), message


def test_numbers_as_people_write_them(work, capsys):
    """1e-4 and 8/255 are numbers in YAML, in --set and in attack options."""
    path = work["root"] / "numbers.yaml"
    path.write_text("optim:\n  lr: 1e-4\nrecipe:\n  name: pgd\n  options: {eps: 8/255}\n")
    cfg = load_config(path, ["optim.weight_decay=5e-4", "recipe.options.step_size=2/255"])
    assert cfg.optim.lr == 1e-4 and cfg.optim.weight_decay == 5e-4
    assert cfg.recipe.options == {"eps": 8 / 255, "step_size": 2 / 255}
    recipe = rl.train.create_recipe("pgd", **cfg.recipe.options)
    assert recipe.eps == pytest.approx(8 / 255)
    out = work["root"] / "adv.npz"
    rc, err = _cli(capsys, ["attack", str(work["run"]), "--attack", "pgd:step_size=1/255", "--eps", "8/255", "--n", "4", "--out", str(out)])  # fmt: skip
    assert rc == 0, err
    import numpy as np

    with np.load(out) as f:
        assert np.abs(f["x_adv"] - f["x"]).max() <= 8 / 255 + 1e-6
