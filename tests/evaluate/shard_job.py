"""One process of a sharded evaluation, for tests/evaluate/test_sharded.py.

Run alone (``python shard_job.py OUT``) it evaluates in one process; under torchrun it
joins a gloo group and shards. Every process writes its report (without timings), its
per-point masks and the batches it attacked to ``OUT.rank{R}.json``. ``--die-after K``
makes rank 1 exit abruptly when its (K+1)-th batch would start (an interruption).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist
from torch import nn

import robustlab as rl
from robustlab.evaluate import robustness


def model_and_data() -> tuple[nn.Module, rl.ImageDataset]:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 5)
    )  # fmt: skip
    x = torch.rand(150, 1, 8, 8)
    with torch.no_grad():  # labels the net mostly gets right, so that there is work to do
        y = net(x).argmax(1)
    y[::7] = (y[::7] + 1) % 5
    return net, rl.ImageDataset(x, y, num_classes=5, name="toy")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--state")
    p.add_argument("--die-after", type=int, default=0)
    p.add_argument("--fail-after", type=int, default=0)
    args = p.parse_args()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0
    torch.set_num_threads(1)
    ran: list[list] = []
    run_batch = robustness._run_batch

    def logged(ctx, spec, e, idx, seed):
        if args.die_after and rank == 1 and len(ran) == args.die_after:
            os._exit(3)  # killed between batches, its K finished ones recorded
        if args.fail_after and rank == 1 and len(ran) == args.fail_after:
            raise ValueError("planted failure on rank 1")
        ran.append([spec.label, e, int(idx[0])])
        return run_batch(ctx, spec, e, idx, seed)

    robustness._run_batch = logged
    model, data = model_and_data()
    report = rl.evaluate(
        model, data, attacks=["pgd:steps=4", "apgd-t:steps=5:n_target_classes=2",
                              "square:n_queries=40"],
        eps=[0.05, 0.1], batch_size=16, seed=3, state_file=args.state, checks=False,
        distributed=world > 1,
    )  # fmt: skip
    d = report.to_dict()
    for r in d["results"]:
        for s in r["stages"]:
            s.pop("seconds")
    masks = {str(e): m.tolist() for e, m in report.robust.items()}
    with open(f"{args.out}.rank{rank}.json", "w") as f:
        json.dump({"report": d, "masks": masks, "ran": ran, "world": world}, f)
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
