"""Corruption robustness of the issue-13 grid (benchmarks/reproduce.py runs): ImageNet-C's
15 corruptions generated at 28x28 (5 severities) and MNIST-C's 15, on the first ``--n``
mnist5k test points, with CE / mCE / relative mCE against the standard model of the
same seed. Results are cached per run (``corruptions_*.json`` in the run directory).

    python benchmarks/reproduce.py --only standard-bn,pgd-bn,advprop,advprop-weak,\\
        sat-psoftplus-bn,sat-silu-bn --seeds 0,1,2 --epochs 4 --ramp 2 --n 300 --out runs/repro
    python benchmarks/corruptions.py --out runs/repro --epochs 4 --seeds 0,1,2 --n 1000
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from reproduce import fmt  # benchmarks/ is the script's directory, on sys.path

import robustlab as rl
from robustlab.corruptions import CorruptionReport, evaluate_corruptions
from robustlab.io import atomic_write_text

EXPERIMENTS = ["standard-bn", "pgd-bn", "advprop", "advprop-weak", "sat-psoftplus-bn",
               "sat-silu-bn"]  # fmt: skip
SOURCES = {"imagenet-c": "generate", "mnist-c": "mnist-c"}


def report_for(directory: Path, source: str, n: int, test) -> CorruptionReport:
    cache = directory / f"corruptions_{source}_n{n}.json"
    if cache.exists():
        return CorruptionReport.from_dict(json.loads(cache.read_text()))
    model = rl.load(directory)
    report = evaluate_corruptions(model, test, source=SOURCES[source], n=n, seed=0)
    atomic_write_text(cache, json.dumps(report.to_dict(), indent=1))
    return report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="reproduce.py's --out")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--json", type=Path, default=Path("benchmarks/results/corruptions.json"))
    args = p.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    test = rl.load_dataset("mnist5k", "test")
    rows: dict[str, dict[str, list]] = {}
    per_corruption: dict[str, dict[str, dict[str, list[float]]]] = {}
    for source in SOURCES:
        for seed in seeds:
            base_dir = args.out / f"standard-bn-e{args.epochs}-s{seed}"
            base = report_for(base_dir, source, args.n, test)
            for name in EXPERIMENTS:
                directory = args.out / f"{name}-e{args.epochs}-s{seed}"
                if not (directory / "model.safetensors").exists():
                    continue
                r = report_for(directory, source, args.n, test).against(base, "standard-bn")
                row = rows.setdefault(f"{source}/{name}", {})
                row.setdefault("clean", []).append(r.clean_accuracy)
                row.setdefault("mean", []).append(r.mean_accuracy)
                row.setdefault("mce", []).append(r.mce)
                row.setdefault("rel", []).append(r.relative_mce)
                for c, sev in r.accuracy.items():
                    acc = statistics.fmean(sev.values())
                    per_corruption.setdefault(source, {}).setdefault(name, {}).setdefault(
                        c, []
                    ).append(acc)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.json, json.dumps({"rows": rows, "per_corruption": per_corruption},
                                            indent=1))  # fmt: skip
    print(f"mnist5k, small_cnn with batch norm, {args.epochs} epochs; first {args.n} test points; "
          "mean ± sd over seeds; CE against standard-bn of the same seed\n")  # fmt: skip
    print("| suite / model | seeds | clean % | mean corrupted acc % | mCE % | relative mCE % |")
    print("|---|---|---|---|---|---|")
    for key, row in rows.items():
        print(f"| {key} | {len(row['clean'])} | {fmt(row['clean'])} | {fmt(row['mean'])} | "
              f"{fmt(row['mce'])} | {fmt(row['rel'])} |")  # fmt: skip
    for source, models in per_corruption.items():
        names = list(models)
        corruptions = list(next(iter(models.values())))
        print(f"\n{source}: accuracy % averaged over severities, mean over seeds\n")
        print("| corruption | " + " | ".join(names) + " |")
        print("|---|" + "---|" * len(names))
        for c in corruptions:
            cells = " | ".join(f"{100 * statistics.fmean(models[m][c]):.1f}" for m in names)
            print(f"| {c} | {cells} |")


if __name__ == "__main__":
    main()
