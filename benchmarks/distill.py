"""Distillation on mnist5k (issue 14's table): a small student (LeNet-5, 62k parameters)
alone versus distilled from a small_cnn teacher (3.3M parameters).

Per seed: a standard and a PGD-trained teacher; LeNet trained alone (standard, PGD),
distilled from the standard teacher (Hinton et al.'s ``distill``, FitNets ``hints``),
distilled from the PGD teacher (``ard``, ``rslad``), and defensive distillation (an
initial LeNet at T = 100 and the LeNet distilled from it). Every run holds out 500
training images (a seeded random draw) as a validation split and saves the epoch that is best on it (clean
accuracy, or PGD-10 accuracy at eps 0.3 for the adversarial recipes): the test split
is never used to choose.

Evaluation on the first ``--n`` test points at L-inf eps 0.3: PGD-40 with the
cross-entropy (the naive attack), then the standard suite (APGD-CE, APGD-T with the DLR
margin loss, Square-5000); the table shows PGD-CE alone and the per-sample worst case.

Resumable: finished runs and evaluations are cached in ``--out``.

    python benchmarks/distill.py --seeds 0,1,2 --epochs 6 --out runs/distill
    python benchmarks/distill.py --seeds 0,1,2 --epochs 6 --out runs/distill --table
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import robustlab as rl
from robustlab import io
from robustlab.config import load_config
from robustlab.train import Trainer

ROOT = Path(__file__).resolve().parents[1]
EPS = 0.3
ATTACKS = ["pgd:steps=40", "apgd-ce", "apgd-t", "square:n_queries=5000"]
VAL = ["data.val_size=500"]
CLEAN_SELECT = [*VAL, "select.metric=val_acc"]
ROBUST_SELECT = [*VAL, "select.metric=val_robust"]
LENET = ["model.name=lenet"]

#: name -> (config file, overrides, teacher run name or None, teacher option key)
RUNS: dict[str, tuple[str, list[str], str | None]] = {
    "teacher-standard": ("standard-mnist.yaml", CLEAN_SELECT, None),
    "teacher-pgd": ("pgd-mnist.yaml", ROBUST_SELECT, None),
    "lenet-standard": ("standard-mnist.yaml", [*LENET, *CLEAN_SELECT], None),
    "lenet-distill": (
        "standard-mnist.yaml",
        [*LENET, *CLEAN_SELECT, "recipe.name=distill"],
        "teacher-standard",
    ),
    "lenet-hints": (
        "standard-mnist.yaml",
        [
            *LENET,
            *CLEAN_SELECT,
            "recipe.name=hints",
            "recipe.options.student_layer=net.4",
            "recipe.options.teacher_layer=net.5",
            "recipe.options.hint_epochs=1",
        ],
        "teacher-standard",
    ),
    "lenet-pgd": ("pgd-mnist.yaml", [*LENET, *ROBUST_SELECT], None),
    "lenet-ard": (
        "pgd-mnist.yaml",
        [*LENET, *ROBUST_SELECT, "recipe.name=ard"],
        "teacher-pgd",
    ),
    "lenet-rslad": (
        "pgd-mnist.yaml",
        [*LENET, *ROBUST_SELECT, "recipe.name=rslad"],
        "teacher-pgd",
    ),
    # defensive distillation needs a larger learning rate: logits ~T times the usual
    "lenet-dd-initial": (
        "standard-mnist.yaml",
        [
            *LENET,
            *CLEAN_SELECT,
            "recipe.name=defensive_distillation",
            "optim.lr=0.01",
            "recipe.options.temperature=100",
        ],
        None,
    ),
    "lenet-dd": (
        "standard-mnist.yaml",
        [
            *LENET,
            *CLEAN_SELECT,
            "recipe.name=defensive_distillation",
            "optim.lr=0.01",
            "recipe.options.temperature=100",
        ],
        "lenet-dd-initial",
    ),
}


def run_dir(args: argparse.Namespace, name: str, seed: int) -> Path:
    return args.out / f"{name}-e{args.epochs}-s{seed}"


def train(name: str, args: argparse.Namespace, seed: int) -> Path:
    config, extra, teacher = RUNS[name]
    directory = run_dir(args, name, seed)
    overrides = [f"name={directory.name}", f"out_dir={args.out}", f"seed={seed}",
                 f"epochs={args.epochs}", *extra]  # fmt: skip
    if teacher is not None:
        overrides.append(f"recipe.options.teacher={run_dir(args, teacher, seed)}")
    cfg = load_config(ROOT / "configs" / config, overrides)
    if "eps_ramp_epochs" in cfg.recipe.options:
        cfg.recipe.options["eps_ramp_epochs"] = args.ramp
    meta = directory / io.META_FILE
    if meta.exists() and json.loads(meta.read_text()).get("status") == "complete":
        return directory
    resume = (directory / io.CHECKPOINT_FILE).exists()
    print(f"[train] {directory.name} ({'resume' if resume else 'fresh'})", flush=True)
    return Trainer(cfg, resume=resume, overwrite=not resume).fit()


def evaluate(directory: Path, args: argparse.Namespace) -> dict:
    cache = directory / f"distill_eval_n{args.n}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    print(f"[eval] {directory.name}", flush=True)
    model = rl.load(directory)
    meta = json.loads((directory / io.META_FILE).read_text())
    test = rl.load_dataset("mnist5k", "test")
    t0 = time.perf_counter()
    report = rl.evaluate(
        model, test, attacks=ATTACKS, eps=[EPS], n=args.n, seed=0,
        state_file=directory / f"distill_eval_n{args.n}.state.json",
    )  # fmt: skip
    result = {
        "run": directory.name,
        "parameters": sum(p.numel() for p in model.parameters()),
        "test_acc": meta["final"]["test_acc"],  # clean, all 1,000 test images
        "selected_epoch": meta["final"].get("selected_epoch"),
        "teacher_test_acc": meta["final"].get("teacher_test_acc"),
        "clean": report.clean_accuracy,
        "pgd_ce": report.results[0].stages[0].robust_after,
        "worst": report.results[0].robust_accuracy,
        "flags": [c.name for c in report.validity.flagged] if report.validity else [],
        "train_seconds": sum(r["seconds"] for r in _rows(directory)),
        "eval_seconds": time.perf_counter() - t0,
    }
    io.atomic_write_text(cache, json.dumps(result, indent=1))
    return result


def _rows(directory: Path) -> list[dict]:
    return [json.loads(x) for x in (directory / io.METRICS_FILE).read_text().splitlines() if x]


def fmt(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    if not values:
        return "-"
    mean = statistics.fmean(values) * scale
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values) * scale:.{digits}f}"


def collect(args: argparse.Namespace, seeds: list[int]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for name in RUNS:
        for seed in seeds:
            cache = run_dir(args, name, seed) / f"distill_eval_n{args.n}.json"
            if cache.exists():
                out.setdefault(name, []).append(json.loads(cache.read_text()))
    return out


def table(args: argparse.Namespace, seeds: list[int]) -> str:
    results = collect(args, seeds)
    lines = [
        f"mnist5k, {args.epochs} epochs (eps ramp {args.ramp}), the best epoch on 500 held-out "
        f"training images; L-inf eps {EPS} on the first {args.n} test points; mean ± sd over "
        "seeds",
        "",
        "| run | params | seeds | clean % (1000) | PGD-40 CE % | worst case % | flags | "
        "selected epochs | train s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, rs in results.items():
        flags = sorted({f for r in rs for f in r["flags"]})
        lines.append(
            f"| {name} | {rs[0]['parameters']:,} | {len(rs)} | "
            f"{fmt([r['test_acc'] for r in rs])} | {fmt([r['pgd_ce'] for r in rs])} | "
            f"{fmt([r['worst'] for r in rs])} | {', '.join(flags) or '-'} | "
            f"{', '.join(str(r['selected_epoch']) for r in rs)} | "
            f"{fmt([r['train_seconds'] for r in rs], 1.0, 0)} |"
        )
    return "\n".join(lines)


def plot(args: argparse.Namespace, seeds: list[int], path: Path) -> None:
    """Clean versus worst-case robust accuracy, marker area by parameter count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = collect(args, seeds)
    palette = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442",
               "#000000", "#999999", "#882255"]  # fmt: skip
    fig, ax = plt.subplots(figsize=(7.5, 5))
    markers = ["o", "o", "s", "^", "v", "s", "D", "P", "X", "X"]  # teachers, alone, distilled...
    for i, (name, rs) in enumerate(results.items()):
        clean = [100 * r["test_acc"] for r in rs]
        worst = [100 * r["worst"] for r in rs]
        size = 40 + 260 * (rs[0]["parameters"] / 3.3e6) ** 0.5
        color, marker = palette[i % len(palette)], markers[i % len(markers)]
        ax.scatter(clean, worst, s=size, color=color, marker=marker, alpha=0.3, edgecolors="none")
        ax.scatter(
            [statistics.fmean(clean)], [statistics.fmean(worst)], s=size, color=color,
            marker=marker, edgecolors="black",
            label=f"{name} ({rs[0]['parameters'] / 1e3:.0f}k params)",
        )  # fmt: skip
    ax.set_xlabel("clean accuracy (%), 1,000 test images")
    ax.set_ylabel(f"worst-case robust accuracy (%), L-inf eps {EPS}")
    ax.set_title(
        "Distillation on mnist5k: each seed (light), the mean (outlined);\n"
        "marker area grows with the parameter count",
        fontsize=10,
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--ramp", type=float, default=2.0, help="eps ramp epochs")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--only", default=None, help="comma-separated run names")
    parser.add_argument("--n", type=int, default=500, help="test points attacked")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "distill")
    parser.add_argument("--table", action="store_true", help="only print the table")
    parser.add_argument("--plot", type=Path, default=None, help="write the plot here")
    args = parser.parse_args(argv)
    names = args.only.split(",") if args.only else list(RUNS)
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        sys.exit(f"unknown runs {unknown}; choose from {list(RUNS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    if not args.table:
        for seed in seeds:
            for name in names:
                teacher = RUNS[name][2]
                if teacher is not None:
                    train(teacher, args, seed)
                print(json.dumps(evaluate(train(name, args, seed), args)), flush=True)
    print(table(args, seeds))
    if args.plot:
        plot(args, seeds, args.plot)
        print(f"plot written to {args.plot}")


if __name__ == "__main__":
    main()
