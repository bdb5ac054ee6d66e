"""Robust evaluation that stops attacking broken points, vs a full PGD-k over all points.

Both compute the PGD-k robust accuracy of the same model on the same points at each
eps. The full run attacks every point for all k steps at every eps; ``evaluate``
skips points already misclassified, drops a point from the batch once it is broken
(early stop), and carries broken points over to larger eps. The robust accuracies
must agree; the time ratio is the saving. Median of ``--repeats``, timed round-robin.

    python benchmarks/bench_eval.py --run runs/demo-mnist --eps 0.05,0.1,0.2 --n 500 --steps 20
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import robustlab as rl
from robustlab.attacks import PGD


def full_pgd(model, x, y, eps_list, steps, batch):
    accs = []
    for eps in eps_list:
        ok = torch.zeros(len(y), dtype=torch.bool)
        for i in range(0, len(y), batch):
            xb, yb = x[i : i + batch], y[i : i + batch]
            x_adv = PGD(model, eps=eps, steps=steps, random_start=False)(xb, yb)
            with torch.no_grad():
                ok[i : i + batch] = model(x_adv).argmax(1) == yb
        accs.append(float(ok.float().mean()))
    return accs


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--run", default="runs/demo-mnist")
    p.add_argument("--eps", default="0.05,0.1,0.2")
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=250)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json")
    args = p.parse_args()
    model = rl.load(args.run)
    meta = json.loads((Path(args.run) / "meta.json").read_text())
    test = rl.load_dataset(meta["data"]["name"], "test").subset(args.n)
    x, y = test.float_images(), test.y
    eps_list = [float(e) for e in args.eps.split(",")]
    spec = f"pgd:steps={args.steps}:random_start=false"
    times = {"full PGD over all points": [], "evaluate (early stop)": []}
    results = {}
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        results["full PGD over all points"] = full_pgd(
            model, x, y, eps_list, args.steps, args.batch
        )
        times["full PGD over all points"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        report = rl.evaluate(model, test, attacks=[spec], eps=eps_list, batch_size=args.batch)
        results["evaluate (early stop)"] = [r.robust_accuracy for r in report.results]
        times["evaluate (early stop)"].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"{args.run}: PGD-{args.steps} (no random start), {args.n} points, eps {eps_list}, "
        f"{torch.get_num_threads()} threads"
    )
    for k in times:
        accs = "  ".join(f"{100 * a:6.2f}%" for a in results[k])
        print(f"{k:26s} median {med[k]:7.2f}s  robust acc {accs}")
    print(f"speed-up: {med['full PGD over all points'] / med['evaluate (early stop)']:.2f}x")
    if args.json:
        Path(args.json).write_text(
            json.dumps({"args": vars(args), "median_s": med, "robust_acc": results}, indent=2)
        )


if __name__ == "__main__":
    main()
