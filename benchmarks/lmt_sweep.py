"""Lipschitz-Margin Training on mnist5k: how certified accuracy moves with c (issue 5).

Trains ``configs/lmt-mnist.yaml`` (MLP 1024-1024, MaxMin, last-layer margin, c ramped
over the first fifth of training) at each c of ``--cs``, plus the comparisons named in
``EXTRA`` (the same MLP with ReLU, small_cnn, standard training), and certifies every
model on the test set with the proven ``fft`` bound: clean accuracy, certified accuracy
at each L2 radius, median certified radius. Training time is the sum of logged epochs.

Resumable: finished runs and certificates are cached under ``--out``.

    python benchmarks/lmt_sweep.py --cs 0.1,0.3,1.0,2.0 --seeds 0
    python benchmarks/lmt_sweep.py --only relu-c1.0,standard --seeds 0
    python benchmarks/lmt_sweep.py --table
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import robustlab as rl
from robustlab import io
from robustlab.certify import certify
from robustlab.config import load_config
from robustlab.train import Trainer

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "lmt-mnist.yaml"
RADII = (0.5, 1.0, 1.5)

#: comparisons at c = 1.0 (name -> config overrides); the c sweep is added per --cs
EXTRA: dict[str, list[str]] = {
    "relu-c1.0": ["model.act=relu"],
    "c2-ramp50": ["recipe.options.c=2.0", "recipe.options.c_ramp_epochs=50"],
    "standard": ["recipe.name=standard", "recipe.options={}"],
}


def experiments(cs: list[float]) -> dict[str, list[str]]:
    sweep = {f"c{c:g}": [f"recipe.options.c={c}"] for c in cs}
    return {**sweep, **EXTRA}


def train(name: str, overrides: list[str], seed: int, args: argparse.Namespace) -> Path:
    directory = args.out / f"{name}-e{args.epochs}-s{seed}"
    cfg = load_config(
        CONFIG,
        [f"name={directory.name}", f"out_dir={args.out}", f"seed={seed}",
         f"epochs={args.epochs}", *overrides],
    )  # fmt: skip
    ramp_set = any(o.startswith("recipe.options.c_ramp_epochs") for o in overrides)
    if "c_ramp_epochs" in cfg.recipe.options and not ramp_set:
        cfg.recipe.options["c_ramp_epochs"] = args.epochs / 5
    meta = directory / io.META_FILE
    if meta.exists() and json.loads(meta.read_text()).get("status") == "complete":
        return directory
    resume = (directory / io.CHECKPOINT_FILE).exists()
    print(f"[train] {directory.name} ({'resume' if resume else 'fresh'})", flush=True)
    Trainer(cfg, resume=resume, overwrite=not resume).fit()
    return directory


def certificate(directory: Path) -> dict:
    cache = directory / "sweep_certify.json"
    if cache.exists():
        return json.loads(cache.read_text())
    model = rl.load(directory)
    test = rl.load_dataset("mnist5k", "test")
    report = certify(model, test, radii=RADII, kind="last_layer", method="fft")
    metrics = [json.loads(line) for line in (directory / "metrics.jsonl").open()]
    result = {
        "clean": report.clean_accuracy,
        "certified": dict(zip(map(str, RADII), report.certified_accuracy)),
        "median_radius": report.median_radius,
        "lipschitz": report.lipschitz,
        "n": report.n,
        "train_seconds": sum(m.get("seconds", 0.0) for m in metrics),
    }
    io.atomic_write_text(cache, json.dumps(result, indent=1))
    return result


def table(names: list[str], seeds: list[int], args: argparse.Namespace) -> str:
    head = f"{'experiment':<14}{'seeds':>6}{'clean':>11}"
    head += "".join(f"{'r=' + str(r):>11}" for r in RADII) + f"{'median r':>10}{'train s':>9}"
    lines = [head]
    for name in names:
        rows = []
        for seed in seeds:
            cache = args.out / f"{name}-e{args.epochs}-s{seed}" / "sweep_certify.json"
            if cache.exists():
                rows.append(json.loads(cache.read_text()))
        if not rows:
            continue

        def mean(values: list[float]) -> str:
            m = statistics.mean(values)
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            return f"{100 * m:.1f}" + (f"±{100 * sd:.1f}" if len(values) > 1 else "")

        line = f"{name:<14}{len(rows):>6}{mean([r['clean'] for r in rows]):>11}"
        line += "".join(f"{mean([r['certified'][str(r_)] for r in rows]):>11}" for r_ in RADII)
        line += f"{statistics.mean(r['median_radius'] for r in rows):>10.3f}"
        line += f"{statistics.mean(r['train_seconds'] for r in rows):>9.0f}"
        lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cs", default="0.1,0.3,0.5,1.0,1.5,2.0", help="c values to sweep")
    parser.add_argument("--only", default=None, help="comma-separated experiment names")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "lmt-sweep")
    parser.add_argument("--table", action="store_true", help="only print the table")
    parser.add_argument("--results", type=Path, default=None, help="write table (.txt) + .json")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    exps = experiments([float(c) for c in args.cs.split(",")])
    names = args.only.split(",") if args.only else list(exps)
    unknown = [n for n in names if n not in exps]
    if unknown:
        raise SystemExit(f"unknown experiments {unknown}; known: {sorted(exps)}")
    if not args.table:
        for name in names:
            for seed in seeds:
                certificate(train(name, exps[name], seed, args))
                print(table(names, seeds, args), flush=True)
    text = table(names, seeds, args)
    print(text)
    if args.results:
        rows = {}
        for name in names:
            for seed in seeds:
                cache = args.out / f"{name}-e{args.epochs}-s{seed}" / "sweep_certify.json"
                if cache.exists():
                    rows[f"{name}-s{seed}"] = json.loads(cache.read_text())
        io.atomic_write_text(args.results.with_suffix(".txt"), text + "\n")
        io.atomic_write_text(args.results.with_suffix(".json"), json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
