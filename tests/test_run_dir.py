"""The run directory's owner: resume never deletes, one writer at a time, --overwrite and
--extend do exactly what they say, evaluation resume only for the same evaluation."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from robustlab import io
from robustlab.errors import CheckpointError, RobustlabError
from robustlab.io import FileLock, LockedError, Run
from robustlab.train import Trainer


def _tree(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` with its bytes: what must stay untouched."""
    return {
        str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()
    }


def _user_dir(path: Path) -> dict[str, bytes]:
    path.mkdir(parents=True)
    (path / "notes.txt").write_text("my thesis draft")
    (path / "data").mkdir()
    (path / "data" / "x.npy").write_bytes(b"\x00\x01\x02")
    return _tree(path)


# ----------------------------------------------------------------------------- resume


def test_resume_without_a_checkpoint_deletes_nothing(tiny_config):
    cfg = tiny_config("name=mine")
    target = Path(cfg.out_dir) / "mine"
    before = _user_dir(target)  # not a run directory at all
    with pytest.raises(CheckpointError, match="holds no checkpoint.safetensors.*nothing was"):
        Trainer(cfg, resume=True).fit()
    assert _tree(target) == before


def test_resume_of_a_missing_directory_is_an_error(tiny_config):
    with pytest.raises(CheckpointError, match="does not exist"):
        Trainer(tiny_config("name=nowhere"), resume=True).fit()


def test_resume_of_a_finished_run_says_it_is_finished(tiny_config):
    run = Trainer(tiny_config("epochs=1")).fit()
    before = _tree(run)
    with pytest.raises(CheckpointError, match=r"is finished \(1 epochs trained\).*--extend"):
        Trainer(tiny_config("epochs=1"), resume=True).fit()
    with pytest.raises(CheckpointError, match="is finished.*--extend"):
        Trainer(tiny_config("epochs=3"), resume=True).fit()  # more epochs is --extend's job
    assert _tree(run) == before


def test_extend_trains_further_along_the_longer_schedule(tiny_config):
    run = Trainer(tiny_config("epochs=1", "optim.schedule=cosine")).fit()
    with pytest.raises(CheckpointError, match="config asks for 1; give more"):
        Trainer(tiny_config("epochs=1", "optim.schedule=cosine"), extend=True).fit()
    first = load_file(str(run / io.MODEL_FILE))
    trainer = Trainer(tiny_config("epochs=3", "optim.schedule=cosine"), extend=True)
    trainer.fit()
    rows = Run(run).metrics()
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    # the documented semantics: from step 8 (1 epoch of 8 steps) the lr is that of the
    # 3-epoch cosine schedule: at the last step of epoch 2 (step 15 of 24)
    expected = 0.003 * (1 + math.cos(math.pi * 15 / 24)) / 2
    assert rows[1]["lr"] == pytest.approx(expected, rel=1e-5)
    assert json.loads((run / io.META_FILE).read_text())["status"] == "complete"
    second = load_file(str(run / io.MODEL_FILE))
    assert any(not torch.equal(first[k], second[k]) for k in first)


# ----------------------------------------------------------------------------- overwrite


def test_overwrite_refuses_a_directory_that_is_not_a_run(tiny_config):
    cfg = tiny_config("name=mine")
    target = Path(cfg.out_dir) / "mine"
    before = _user_dir(target)
    with pytest.raises(CheckpointError, match="not a robustlab run directory"):
        Trainer(cfg, overwrite=True).fit()
    assert _tree(target) == before


def test_overwrite_deletes_only_what_robustlab_wrote(tiny_config):
    run = Trainer(tiny_config("epochs=1")).fit()
    (run / io.EVAL_FILE).write_text("{}")  # a stale evaluation of the old weights
    (run / "my-notes.txt").write_text("keep me")
    sibling = run.parent / "other"
    sibling.mkdir()
    (sibling / "f").write_text("keep")
    Trainer(tiny_config("epochs=1", "seed=3"), overwrite=True).fit()
    assert not (run / io.EVAL_FILE).exists()
    assert (run / "my-notes.txt").read_text() == "keep me"
    assert (sibling / "f").read_text() == "keep"
    assert [r["epoch"] for r in Run(run).metrics()] == [1]


# ----------------------------------------------------------------------------- lock


def test_lock_refuses_a_second_writer_and_names_the_holder(tmp_path):
    path = tmp_path / "run" / ".lock"
    with FileLock(path, "training (a)"):
        info = json.loads(path.read_text())
        assert info["pid"] == os.getpid() and info["purpose"] == "training (a)"
        with pytest.raises(LockedError, match=rf"training \(a\) by pid {os.getpid()}"):
            FileLock(path, "training (b)").acquire()
    assert not path.exists()  # released
    with FileLock(path, "again"):
        pass


def test_a_stale_lock_of_a_dead_process_is_detected_and_named(tmp_path, caplog):
    path = tmp_path / ".lock"
    # a process that takes the lock and dies without releasing it
    code = (
        "import os; from robustlab.io import FileLock; "
        f"FileLock({str(path)!r}, 'x').acquire(); os._exit(0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    dead_pid = json.loads(path.read_text())["pid"]
    with caplog.at_level("WARNING"), FileLock(path, "y") as lock:
        assert lock.stale["pid"] == dead_pid
    assert f"stale lock of pid {dead_pid}" in caplog.text


def test_a_second_writer_of_one_run_directory_is_refused(tiny_config, tmp_path):
    """While a process writes a run directory (here: holds its lock), `train --overwrite`
    and `eval` of that directory are refused in one line naming the holder; nothing of the
    run changes."""
    from robustlab.config import dump_config

    cfg = tiny_config("epochs=1")
    run = Trainer(cfg).fit()
    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(dump_config(cfg))
    before = _tree(run)
    env = {**os.environ, "ROBUSTLAB_PROGRESS": "0"}
    with Run(run).lock("training (tiny)"):
        with pytest.raises(LockedError, match=rf"in use: training \(tiny\) by pid {os.getpid()}"):
            Trainer(cfg, overwrite=True).fit()
        for argv in (["train", str(cfg_path), "--overwrite"], ["eval", str(run)]):
            proc = subprocess.run(
                [sys.executable, "-m", "robustlab", "-q", *argv], env=env, capture_output=True,
                text=True,
            )  # fmt: skip
            assert proc.returncode == 2, proc.stderr
            lines = proc.stderr.strip().splitlines()
            assert len(lines) == 1 and f"in use: training (tiny) by pid {os.getpid()}" in lines[0]
        assert {k: v for k, v in _tree(run).items() if k != ".lock"} == before
    assert not (run / ".lock").exists()


# ----------------------------------------------------------------------------- checkpoints


def test_a_failing_replace_leaves_the_previous_checkpoint_loadable(tiny_config, monkeypatch):
    trainer = Trainer(tiny_config("epochs=1"))
    run = trainer.fit()
    before = (run / io.CHECKPOINT_FILE).read_bytes()

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device", str(dst))

    monkeypatch.setattr(io.os, "replace", broken_replace)
    trainer.epoch += 1  # a different state to write
    with pytest.raises(OSError, match="No space left"):
        trainer.save_checkpoint()
    monkeypatch.undo()
    assert (run / io.CHECKPOINT_FILE).read_bytes() == before
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")]  # no partial file
    tensors, state = io.load_tensors(run / io.CHECKPOINT_FILE)
    assert state["epoch"] == 1 and tensors


# ----------------------------------------------------------------------------- eval resume


def _eval(model, data, state, **kw):
    from robustlab.evaluate import evaluate

    return evaluate(model, data, attacks=["fgsm"], eps=[0.1], state_file=state, **kw)


def test_evaluation_resumes_only_for_the_same_evaluation(trained_mnist_model, tmp_path):
    """A state written for the train split is not reused for the test split (the bug:
    `eval --split train` then `eval --split test` printed the train figure)."""
    import robustlab as rl

    model, test = trained_mnist_model
    train = rl.load_dataset("mnist5k", "train")
    state = tmp_path / "state.json"
    on_train = _eval(model, train, state, n=100)
    on_test = _eval(model, test, state, n=100)
    fresh = _eval(model, test, None, n=100)
    assert on_train.clean_accuracy != fresh.clean_accuracy  # the two splits differ here
    assert on_test.clean_accuracy == fresh.clean_accuracy
    assert on_test.results[0].robust_accuracy == fresh.results[0].robust_accuracy
    assert any("changed: data" in w and "started afresh" in w for w in on_test.warnings)
    # other indices of the same split, other eps, other weights: each starts afresh
    for kw, what in [
        (dict(data=test.subset(torch.arange(1, 101))), "data"),
        (dict(eps=[0.2]), "eps"),
        (dict(seed=5), "seed"),
    ]:
        _eval(model, test, state, n=100)
        data = kw.pop("data", test.subset(100))
        from robustlab.evaluate import evaluate

        report = evaluate(model, data, attacks=["fgsm"], **{"eps": [0.1], **kw}, state_file=state)
        assert any(f"changed: {what}" in w for w in report.warnings), (what, report.warnings)
    other = rl.create_model("lenet", in_channels=1, input_size=28)
    report = _eval(other, test, state, n=100)
    assert any(re.search(r"\(changed: weights", w) for w in report.warnings)
    # the same evaluation resumes without a note
    again = _eval(other, test, state, n=100)
    assert not again.warnings or all("changed" not in w for w in again.warnings)


def test_second_evaluation_of_one_state_file_is_refused(tmp_path):
    state = tmp_path / "s.json"
    with FileLock(tmp_path / "s.json.lock", "evaluation"):
        code = textwrap.dedent(f"""
            import torch, robustlab as rl
            data = rl.load_dataset("synthetic", "test", n_test=8, size=8, num_classes=3)
            c, h, w = data.shape
            m = rl.create_model("mlp", num_classes=3, in_channels=c, input_size=h)
            rl.evaluate(m, data, attacks=["fgsm"], eps=[0.1], state_file={str(state)!r})
        """)
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode != 0 and "LockedError" in proc.stderr and "in use" in proc.stderr


def test_run_clear_refuses_foreign_directories(tmp_path):
    before = _user_dir(tmp_path / "x")
    with pytest.raises(CheckpointError, match="refusing to overwrite"):
        Run(tmp_path / "x").clear()
    assert _tree(tmp_path / "x") == before
    with pytest.raises(RobustlabError, match="not a robustlab run directory"):
        Run(tmp_path / "x").require()


def test_continuing_drops_metrics_rows_the_checkpoint_has_not_seen(tiny_config):
    """A process killed between logging an epoch and checkpointing it leaves a row the
    checkpoint does not know; continuing redoes that epoch and logs it once."""
    run = Trainer(tiny_config("epochs=1")).fit()
    Run(run).append_metrics({"epoch": 2, "orphan": True})
    Trainer(tiny_config("epochs=2"), extend=True).fit()
    rows = Run(run).metrics()
    assert [r["epoch"] for r in rows] == [1, 2] and "orphan" not in rows[1]


def test_a_state_file_that_is_not_an_evaluation_state_is_never_overwritten(
    trained_mnist_model, tmp_path
):
    """`eval --state PATH` used to replace whatever PATH held (notes, meta.json, weights)."""
    model, test = trained_mnist_model
    for content in (b"my precious notes", b'{"model": {"name": "lenet"}}', bytes(range(256))):
        path = tmp_path / "precious"
        path.write_bytes(content)
        with pytest.raises(RobustlabError, match="is not an evaluation state; refusing"):
            _eval(model, test, path, n=10)
        assert path.read_bytes() == content
    with pytest.raises(RobustlabError, match="is not a file"):
        _eval(model, test, tmp_path, n=10)


def test_weights_that_predate_an_unfinished_extension_are_not_loaded_silently(tiny_config):
    import robustlab as rl

    run = Trainer(tiny_config("epochs=1")).fit()
    extending = Trainer(tiny_config("epochs=3"), extend=True)
    extending._prepare_run_dir()  # the extension started (and was interrupted)
    extending._release_lock()
    with pytest.raises(CheckpointError, match="predates an unfinished training.*--resume"):
        rl.load(run)
    assert rl.load(run, allow_incomplete=True) is not None
    with pytest.raises(CheckpointError, match="at epochs.*use --extend"):
        Trainer(tiny_config("epochs=3"), resume=True).fit()  # no checkpoint of the extension yet
    Trainer(tiny_config("epochs=3"), extend=True).fit()  # finishing it makes it loadable
    assert [r["epoch"] for r in Run(run).metrics()] == [1, 2, 3] and rl.load(run) is not None


def test_a_checkpoint_written_before_new_config_keys_still_resumes(tiny_config, monkeypatch):
    run = Trainer(tiny_config("epochs=1")).fit()
    tensors, state = io.load_tensors(run / io.CHECKPOINT_FILE)
    del state["config"]["defenses"], state["config"]["model"]["denoise"]  # an older robustlab
    io.save_tensors(run / io.CHECKPOINT_FILE, tensors, state)
    # and the same directory spelled differently (relative out_dir)
    monkeypatch.chdir(run.parent.parent)
    Trainer(tiny_config("epochs=2", "out_dir=runs"), extend=True).fit()
    assert [r["epoch"] for r in Run(run).metrics()] == [1, 2]
    # a real change to a key the old checkpoint lacked is still refused
    with pytest.raises(CheckpointError, match="differs from the checkpoint's at defenses"):
        Trainer(tiny_config("epochs=3", "defenses=[bitdepth]"), extend=True).fit()


def test_a_run_being_written_is_named_before_its_first_checkpoint(tiny_config):
    cfg = tiny_config("name=busy")
    run = Path(cfg.out_dir) / "busy"
    with Run(run).lock("training (busy)"):
        for kw in ({}, {"resume": True}, {"overwrite": True}):
            with pytest.raises(LockedError, match=rf"training \(busy\) by pid {os.getpid()}"):
                Trainer(cfg, **kw).fit()


def test_eval_refuses_a_data_set_whose_classes_changed_since_training(
    tiny_config, tmp_path, capsys
):
    """Renaming or adding a class folder after training shifted every label silently."""
    import numpy as np
    from PIL import Image

    from robustlab.cli import main

    root = tmp_path / "images"
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c, name in enumerate(("cat", "dog", "eel")):
            (root / split / name).mkdir(parents=True)
            for i in range(8):
                img = np.clip(rng.normal(60 + 70 * c, 20, (12, 12)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(root / split / name / f"{i}.png")
    cfg = tiny_config("data.name=imagefolder", f"data.root={root}", "data.options={}",
                      "data.batch_size=8", "epochs=1")  # fmt: skip
    run = Trainer(cfg).fit()
    assert json.loads((run / io.META_FILE).read_text())["data"]["classes"] == ["cat", "dog", "eel"]
    assert main(["eval", str(run)]) == 0
    for split in ("train", "test"):
        (root / split / "cat").rename(root / split / "zebra")
    capsys.readouterr()
    assert main(["eval", str(run)]) == 2
    err = capsys.readouterr().err
    assert "classes ['dog', 'eel', 'zebra'] differ from those the run was trained on" in err


def test_the_trainer_holds_the_lock_while_it_writes(tiny_config):
    trainer = Trainer(tiny_config("epochs=1"))
    trainer._prepare_run_dir()  # what fit() does first
    try:
        with pytest.raises(LockedError, match=rf"training \(tiny\) by pid {os.getpid()}"):
            Run(trainer.run_dir).lock("evaluation").acquire()
    finally:
        trainer._release_lock()
    Run(trainer.run_dir).lock("evaluation").acquire().release()  # free once it is done
