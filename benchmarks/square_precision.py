"""Square in bf16 versus fp32: points broken at equal queries, several seeds.

Why Square stays in fp32 under ``precision="auto"``: it accepts a proposal only when the
margin loss decreases, and bf16 rounds the logits (to 1/128 of their size) so that
small real improvements read as ties and are rejected. Success is judged in fp32 in
both cases (the attack's own result, confirmed).

    python benchmarks/square_precision.py --run runs/demo-pgd-mnist --eps 0.3
"""

from __future__ import annotations

import argparse

import torch

import robustlab as rl
from robustlab.attacks import Square
from robustlab.io import load_run_data


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--run", action="append", required=True, help="RUN:EPS (repeatable)")
    p.add_argument("--n", type=int, default=150)
    p.add_argument("--queries", type=int, default=400)
    p.add_argument("--seeds", default="0,1,2")
    args = p.parse_args()
    for case in args.run:
        run, eps = case.rsplit(":", 1)
        model = rl.load(run).eval()
        test, _ = load_run_data(run)
        x, y = test.float_images(), test.y
        with torch.no_grad():
            ok = model(x).argmax(1) == y
        x, y = x[ok][: args.n], y[ok][: args.n]
        row = {}
        for prec in ("fp32", "bf16"):
            row[prec] = [
                int(Square(model, eps=float(eps), n_queries=args.queries, seed=int(s),
                           precision=prec).run(x, y).success.sum())
                for s in args.seeds.split(",")
            ]  # fmt: skip
        print(f"{run} eps {eps}, {len(y)} clean points, {args.queries} queries, seeds "
              f"{args.seeds}: broken fp32 {row['fp32']}, bf16 {row['bf16']}")  # fmt: skip


if __name__ == "__main__":
    main()
