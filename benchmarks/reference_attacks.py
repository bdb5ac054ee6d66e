"""Attack strength against a peer: robust accuracy of robustlab's attacks vs torchattacks'.

For each trained run and epsilon, on the same test points: our PGD-40, APGD-CE, the
standard suite (APGD-CE + APGD-T + Square, worst case), and torchattacks' PGD-40 and
APGD-CE at the same budgets. A correct and strong implementation reaches a robust
accuracy no higher than the peer's (within noise). Rows are cached in ``--out`` so an
interrupted run resumes.

    python benchmarks/reference_attacks.py --run runs/demo-mnist:0.1 --run runs/pgd-mnist:0.3 --n 500
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import robustlab as rl
from robustlab.attacks import APGD, PGD


def _batched(fn, x, y, batch):
    return torch.cat([fn(x[i : i + batch], y[i : i + batch]) for i in range(0, len(x), batch)])


def rows_for(run: str, eps: float, n: int, batch: int, seed: int, skip: set, only: str | None):
    import torchattacks

    model = rl.load(run)
    meta = json.loads((Path(run) / "meta.json").read_text())
    test = rl.load_dataset(meta["data"]["name"], "test").subset(n)
    x, y = test.float_images(), test.y
    with torch.no_grad():
        clean = _batched(lambda a, b: model(a).argmax(1), x, y, batch) == y
    step = 2.5 * eps / 40

    def acc_of(x_adv):
        with torch.no_grad():
            pred = _batched(lambda a, b: model(a).argmax(1), x_adv, y, batch)
        return float(((pred == y) & clean).float().mean())

    def row(name, acc, seconds):
        return {
            "run": run,
            "eps": eps,
            "n": n,
            "seed": seed,
            "attack": name,
            "robust_acc": acc,
            "seconds": seconds,
        }

    def suite():
        return (
            rl.evaluate(model, test, attacks=["standard"], eps=[eps], batch_size=batch, seed=seed)
            .results[0]
            .robust_accuracy
        )

    jobs = {
        "clean": lambda: float(clean.float().mean()),
        "robustlab PGD-40": lambda: acc_of(
            _batched(PGD(model, eps=eps, steps=40, step_size=step, seed=seed), x, y, batch)
        ),
        "torchattacks PGD-40": lambda: acc_of(
            _batched(torchattacks.PGD(model, eps=eps, alpha=step, steps=40), x, y, batch)
        ),
        "robustlab APGD-CE-100": lambda: acc_of(
            _batched(APGD(model, eps=eps, steps=100, seed=seed), x, y, batch)
        ),
        "torchattacks APGD-CE-100": lambda: acc_of(
            _batched(
                torchattacks.APGD(model, eps=eps, steps=100, loss="ce", seed=seed), x, y, batch
            )
        ),
        "robustlab standard suite": suite,
    }
    wanted = set(only.split(",")) if only else set(jobs)
    for name, job in jobs.items():
        if name not in wanted:
            continue
        if (run, eps, name, n, seed) in skip or (
            name == "clean" and (run, eps, name, n, 0) in skip
        ):
            continue
        torch.manual_seed(seed)
        t0 = time.perf_counter()
        acc = job()
        yield row(name, acc, time.perf_counter() - t0)


def print_table(rows: list[dict]) -> None:
    """Markdown: one line per (run, eps, attack), mean robust accuracy over seeds and range."""
    groups: dict[tuple, list[float]] = {}
    for r in rows:
        groups.setdefault(
            (r["run"], r["eps"] if r["attack"] != "clean" else 0.0, r["attack"]), []
        ).append(100 * r["robust_acc"])
    print("| run | eps | attack | robust accuracy (mean) | min-max | seeds |")
    print("|---|---|---|---:|---|---:|")
    for (run, eps, attack), accs in groups.items():
        lo, hi = min(accs), max(accs)
        print(
            f"| {run} | {eps:g} | {attack} | {sum(accs) / len(accs):.2f}% | {lo:.1f}-{hi:.1f} | {len(accs)} |"
        )


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--run", action="append", default=[], help="RUN_DIR:EPS (repeatable)")
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--batch", type=int, default=250)
    p.add_argument(
        "--seeds", default="0", help="comma-separated seeds (random starts differ per seed)"
    )
    p.add_argument("--only", help="comma-separated attack names to run (default: all)")
    p.add_argument("--out", default="benchmarks/results/reference_attacks.json")
    p.add_argument(
        "--table", action="store_true", help="print the cached rows as a markdown table and exit"
    )
    args = p.parse_args()
    out = Path(args.out)
    if args.table:
        print_table(json.loads(out.read_text()))
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    done = json.loads(out.read_text()) if out.is_file() else []
    have = {(r["run"], r["eps"], r["attack"], r["n"], r.get("seed", 0)) for r in done}
    for r in done:
        print(
            f"{r['run']:22s} eps {r['eps']:<5g} seed {r.get('seed', 0)} {r['attack']:26s} {100 * r['robust_acc']:6.2f}%  (cached)"
        )
    for spec in args.run:
        run, eps = spec.rsplit(":", 1)
        for seed in [int(v) for v in args.seeds.split(",")]:
            for row in rows_for(run, float(eps), args.n, args.batch, seed, have, args.only):
                done.append(row)
                out.write_text(json.dumps(done, indent=1))
                print(
                    f"{row['run']:22s} eps {row['eps']:<5g} seed {row['seed']} {row['attack']:26s} {100 * row['robust_acc']:6.2f}%  {row['seconds']:7.1f}s",
                    flush=True,
                )


if __name__ == "__main__":
    main()
