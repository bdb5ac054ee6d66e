"""Data-parallel training with torchrun: 2 CPU processes over gloo.

``data.batch_size`` is the global batch and shards come from DistributedSampler, so
two processes with half the batch each must reach the same weights as one process
with the whole batch (DDP averages the gradients). Batch-norm models
train too, each process normalising over its own shard (SyncBatchNorm is GPU-only).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from robustlab.config import dump_config

pytestmark = pytest.mark.distributed

TORCHRUN = Path(sys.executable).with_name("torchrun")
needs_torchrun = pytest.mark.skipif(
    not TORCHRUN.exists() and shutil.which("torchrun") is None, reason="torchrun not found"
)


def _run(config: Path, nproc: int) -> subprocess.CompletedProcess:
    if nproc == 1:
        cmd = [sys.executable, "-m", "robustlab", "-q", "train", str(config)]
    else:
        cmd = [str(TORCHRUN), "--standalone", f"--nproc_per_node={nproc}", "-m", "robustlab", "-q",
               "train", str(config)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)


def _one_and_two_processes(tiny_config, tmp_path, tag: str, *overrides: str) -> dict:
    """Train the same config with 1 and with 2 processes; the two run directories."""
    runs = {}
    for nproc in (1, 2):
        cfg = tiny_config(
            f"name={tag}{nproc}", "model.name=mlp", "optim.name=sgd", "optim.lr=0.05",
            "data.options={size: 8, n_train: 128, n_test: 64, num_classes: 4}", *overrides,
        )  # fmt: skip
        path = tmp_path / f"{tag}{nproc}.yaml"
        path.write_text(dump_config(cfg))
        result = _run(path, nproc)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[nproc] = tmp_path / "runs" / f"{tag}{nproc}"
    return runs


@needs_torchrun
def test_two_processes_match_one_process_with_the_global_batch(tiny_config, tmp_path):
    runs = _one_and_two_processes(tiny_config, tmp_path, "n")
    meta = json.loads((runs[2] / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["status"] == "complete"
    one, two = (load_file(str(runs[n] / "model.safetensors")) for n in (1, 2))
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-5, msg=key)
    rows = [json.loads(line) for line in (runs[2] / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(line) for line in (runs[1] / "metrics.jsonl").read_text().splitlines()]
    assert [r["test_acc"] for r in rows] == [
        r["test_acc"] for r in ref
    ]  # sharded eval, all-reduced


@needs_torchrun
def test_batch_norm_model_trains_data_parallel(tiny_config, tmp_path):
    cfg = tiny_config(
        "model.name=wide_resnet", "model.options={depth: 10, width: 1}", "epochs=1",
        "data.options={size: 8, n_train: 128, n_test: 64, num_classes: 4}",
    )  # fmt: skip
    path = tmp_path / "bn.yaml"
    path.write_text(dump_config(cfg))
    result = _run(path, 2)
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "runs" / "tiny"
    weights = load_file(str(run / "model.safetensors"))
    assert all(torch.isfinite(v.float()).all() for v in weights.values())
    # The saved model is rank 0's; its test accuracy matches the sharded, all-reduced one.
    from robustlab import clean_accuracy, load, load_dataset

    test = load_dataset("synthetic", "test", size=8, n_train=128, n_test=64, num_classes=4)
    logged = json.loads((run / "meta.json").read_text())["final"]["test_acc"]
    assert clean_accuracy(load(run), test) == pytest.approx(logged)


@needs_torchrun
def test_advprop_trains_data_parallel(tiny_config, tmp_path):
    """AdvProp under DDP with two auxiliary norms: one routed forward per step (DDP raises
    on a parameter left without gradient), it learns, and the saved run is the plain
    model plus the auxiliary state apart."""
    cfg = tiny_config(
        "model.options={bn: true}", "epochs=2", "recipe.name=advprop",
        "recipe.options={eps: [0.05, 0.1], steps: 2}", "checkpoint_every=3",
        "data.options={size: 8, n_train: 128, n_test: 64, num_classes: 4}",
    )  # fmt: skip
    path = tmp_path / "advprop.yaml"
    path.write_text(dump_config(cfg))
    result = _run(path, 2)
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "runs" / "tiny"
    weights = load_file(str(run / "model.safetensors"))
    aux = load_file(str(run / "aux_bn.safetensors"))
    assert not any(".aux." in k or ".main." in k for k in weights)
    assert {k.split(".aux.")[1].split(".", 1)[0] for k in aux} == {"0", "1"}  # two aux norms
    meta = json.loads((run / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["final"]["test_acc"] > 0.4  # chance: 0.25


@needs_torchrun
def test_lmt_two_processes_match_one_process(tiny_config, tmp_path):
    """LMT's bound enters every rank's loss identically (same weights, same persistent
    power-iteration vectors), so DDP's averaged gradient is the one-process gradient."""
    runs = _one_and_two_processes(
        tiny_config, tmp_path, "lmt", "model.act=maxmin", "recipe.name=lmt",
        "recipe.options={c: 0.1, c_ramp_epochs: 1}",
    )  # fmt: skip
    weights = {n: load_file(str(run / "model.safetensors")) for n, run in runs.items()}
    for key in weights[1]:
        torch.testing.assert_close(weights[2][key], weights[1][key], rtol=1e-4, atol=1e-5)


@needs_torchrun
def test_hints_and_validation_selection_two_processes_match_one_process(tiny_config, tmp_path):
    """FitNets' regressor lives outside the student's forward and stage 1 leaves the
    later layers at weight zero: DDP must still average every gradient (it raises on a
    parameter without one). The validation split is sharded and its accuracy all-reduced,
    so both choose the same epoch and save the same weights."""
    from robustlab.train import Trainer

    teacher = Trainer(tiny_config(
        "name=teacher", "model.name=mlp", "epochs=1",
        "data.options={size: 8, n_train: 128, n_test: 64, num_classes: 4}",
    )).fit()  # fmt: skip
    runs = _one_and_two_processes(
        tiny_config, tmp_path, "hints", "epochs=3", "recipe.name=hints",
        f"recipe.options={{teacher: {teacher}, student_layer: net.2, teacher_layer: net.4, "
        "hint_epochs: 1}", "data.val_size=32", "select.metric=val_acc",
    )  # fmt: skip
    weights = {n: load_file(str(run / "model.safetensors")) for n, run in runs.items()}
    assert not any("regressor" in k for k in weights[2])
    for key in weights[1]:
        torch.testing.assert_close(weights[2][key], weights[1][key], rtol=1e-4, atol=1e-5)
    finals = [json.loads((runs[n] / "meta.json").read_text())["final"] for n in (1, 2)]
    assert finals[0]["selected_epoch"] == finals[1]["selected_epoch"]
    assert finals[0]["selected_score"] == pytest.approx(finals[1]["selected_score"])
