"""Evaluation sharded over torchrun processes (2 CPU processes over gloo).

The guarantee: a sharded evaluation is the single-process one (every number and every
per-point mask; only timings differ), each process attacks a disjoint share of the
batches, and an interrupted job resumes from what every process had finished.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import robustlab as rl
from robustlab.errors import ConfigError

pytestmark = pytest.mark.distributed

JOB = Path(__file__).with_name("shard_job.py")
TORCHRUN = Path(sys.executable).with_name("torchrun")
needs_torchrun = pytest.mark.skipif(
    not TORCHRUN.exists() and shutil.which("torchrun") is None, reason="torchrun not found"
)
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _job(out: Path, nproc: int, *extra: str) -> subprocess.CompletedProcess:
    head = [sys.executable] if nproc == 1 else [
        str(TORCHRUN), "--standalone", f"--nproc_per_node={nproc}"]  # fmt: skip
    return subprocess.run([*head, str(JOB), str(out), *extra], capture_output=True, text=True,
                          env=ENV, timeout=240)  # fmt: skip


def _read(out: Path, rank: int) -> dict:
    return json.loads(Path(f"{out}.rank{rank}.json").read_text())


def _batches_of(record: dict, ref: dict) -> set[tuple]:
    """The batches a rank record holds, as the single-process run logged them
    (label, eps, first point): alone, a stage's batches run in position order."""
    ei, ai = (int(i) for i in record["stage"].split("/"))
    label, eps = ref["report"]["attacks"][ai], ref["report"]["results"][ei]["eps"]
    in_order = [tuple(b) for b in ref["ran"] if b[:2] == [label, eps]]
    return {in_order[int(start) // 16] for start in record["batches"]}  # batch size 16


@needs_torchrun
def test_two_processes_give_the_single_process_report_each_doing_half(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    assert _job(one, 1).returncode == 0
    result = _job(two, 2)
    assert result.returncode == 0, result.stderr[-3000:]
    ref, r0, r1 = _read(one, 0), _read(two, 0), _read(two, 1)
    assert r0["world"] == 2
    for got in (r0, r1):  # every process holds the whole report
        assert got["report"] == ref["report"]
        assert got["masks"] == ref["masks"]
    # the work was shared: disjoint batches that together are the single process's
    batches = [tuple(b) for b in ref["ran"]]
    mine0, mine1 = {tuple(b) for b in r0["ran"]}, {tuple(b) for b in r1["ran"]}
    assert not mine0 & mine1
    assert mine0 | mine1 == set(batches) and len(batches) == len(set(batches))
    assert min(len(mine0), len(mine1)) >= len(batches) // 2 - 3
    # and the evaluation did something: stages broke points, some points survived
    results = ref["report"]["results"]
    assert any(s["broken"] for r in results for s in r["stages"])
    assert 0 < results[-1]["robust_accuracy"] < ref["report"]["clean_accuracy"]


@needs_torchrun
def test_an_interrupted_sharded_evaluation_resumes_where_each_process_stopped(tmp_path):
    ref_out, out, state = tmp_path / "ref", tmp_path / "job", tmp_path / "state.json"
    assert _job(ref_out, 1).returncode == 0
    ref = _read(ref_out, 0)
    died = _job(out, 2, "--state", str(state), "--die-after", "5")
    # rank 1 exits before its 6th batch (its 2nd of the first eps's second stage: 8 batches
    # of 16 in the first stage, 4 each); torchrun stops the job
    assert died.returncode != 0
    assert state.is_file() and Path(f"{state}.rank1").is_file()
    record = json.loads(Path(f"{state}.rank1").read_text())
    assert record["batches"]  # rank 1's finished batches of the running stage are on disk
    assert not json.loads(state.read_text())["stages"].get(record["stage"], {}).get("done")
    finished_by_1 = _batches_of(record, ref)
    again = _job(out, 2, "--state", str(state))
    assert again.returncode == 0, again.stderr[-3000:]
    for rank in (0, 1):
        got = _read(out, rank)
        assert got["report"] == ref["report"] and got["masks"] == ref["masks"]
    # what rank 1 had finished was not attacked again, and the finished stages neither
    ran_again = {tuple(b) for rank in (0, 1) for b in _read(out, rank)["ran"]}
    assert finished_by_1 <= {tuple(b) for b in ref["ran"]}
    assert not ran_again & finished_by_1
    assert len(ran_again) < len(ref["ran"]) - len(finished_by_1)
    assert not Path(f"{state}.rank1").exists()  # a finished job leaves only the state
    # the finished state serves one process too: nothing is attacked, same report
    alone = _job(tmp_path / "alone", 1, "--state", str(state))
    assert alone.returncode == 0
    got = _read(tmp_path / "alone", 0)
    assert got["ran"] == [] and got["report"] == ref["report"]


@needs_torchrun
def test_a_job_killed_with_two_processes_resumes_alone_without_redoing_their_work(tmp_path):
    ref_out, out, state = tmp_path / "ref", tmp_path / "job", tmp_path / "state.json"
    assert _job(ref_out, 1).returncode == 0
    ref = _read(ref_out, 0)
    assert _job(out, 2, "--state", str(state), "--die-after", "5").returncode != 0
    finished_by_1 = _batches_of(json.loads(Path(f"{state}.rank1").read_text()), ref)
    alone = _job(out, 1, "--state", str(state))  # one process reads rank 1's record too
    assert alone.returncode == 0, alone.stderr[-3000:]
    got = _read(out, 0)
    assert got["report"] == ref["report"] and got["masks"] == ref["masks"]
    assert finished_by_1 and not {tuple(b) for b in got["ran"]} & finished_by_1
    assert not list(tmp_path.glob("state.json.rank*"))  # rank 0 cleared the records


@needs_torchrun
def test_an_error_on_one_process_stops_every_process_with_its_reason(tmp_path):
    failed = _job(tmp_path / "job", 2, "--fail-after", "3")
    assert failed.returncode != 0
    assert "planted failure on rank 1" in failed.stderr
    assert "process 1 failed with ValueError" in failed.stderr  # rank 0 says why it stopped


@needs_torchrun
def test_robustlab_eval_under_torchrun_writes_the_single_process_eval_json(tiny_config, tmp_path):
    from robustlab.config import dump_config

    cfg = tmp_path / "t.yaml"
    cfg.write_text(dump_config(tiny_config("model.name=mlp", "epochs=1")))
    cli = [sys.executable, "-m", "robustlab", "-q"]
    assert subprocess.run([*cli, "train", str(cfg)], env=ENV, timeout=240).returncode == 0
    run = tmp_path / "runs" / "tiny"
    args = [
        "eval",
        str(run),
        "--attacks",
        "pgd:steps=3,square:n_queries=20",
        "--eps",
        "0.05,0.2",
        "-n",
        "100",
        "--batch-size",
        "16",
    ]  # torchrun reads --n as its own
    outputs = {}
    for nproc in (1, 2):
        head = (
            cli
            if nproc == 1
            else [
                str(TORCHRUN),
                "--standalone",
                f"--nproc_per_node={nproc}",
                "-m",
                "robustlab",
                "-q",
            ]
        )
        done = subprocess.run([*head, *args], capture_output=True, text=True, env=ENV,
                              timeout=240)  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.count("written") == 1  # rank 0 speaks for the job
        result = json.loads((run / "eval.json").read_text())
        for r in result["robust"]["results"]:
            for s in r["stages"]:
                s.pop("seconds")
        outputs[nproc] = result
        (run / "eval_state.json").unlink()
    assert outputs[1] == outputs[2]
    assert not list(run.glob("*.rank*"))


def test_distributed_without_a_process_group_is_refused():
    net, data = (lambda: __import__("tests.evaluate.shard_job", fromlist=["x"]).model_and_data())()
    with pytest.raises(ConfigError, match="process group"):
        rl.evaluate(net, data, attacks=["fgsm"], eps=[0.1], distributed=True)
