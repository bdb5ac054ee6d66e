"""Reproduction of the robust-training recipes on mnist5k (issue 4's table).

Trains every experiment with the same epochs, eps ramp and seeds, then evaluates each
model on the first ``--n`` test points at L-inf eps 0.3: clean accuracy, PGD-40 with 10
restarts, and the per-sample worst case of PGD-40x10 plus the standard suite
(APGD-CE, APGD-T, Square-5000). Training time is the sum of the logged epoch times
(attack generation and guard checks included, evaluation excluded).

Everything is resumable: finished runs and evaluations are cached in ``--out``, an
interrupted training run continues from its checkpoint, an interrupted evaluation
from its state file. Run it on a CPU or a GPU machine alike.

    python benchmarks/reproduce.py --epochs 10 --seeds 0            # the whole grid
    python benchmarks/reproduce.py --only pgd,fast --seeds 0,1,2    # a subset, 3 seeds
    python benchmarks/reproduce.py --table                          # print what is done
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

#: name -> (config, extra --set overrides); all share data, model, optimiser, schedule
EXPERIMENTS: dict[str, tuple[str, list[str]]] = {
    "standard": ("standard-mnist.yaml", []),
    "standard-bn": ("standard-mnist.yaml", ["model.options={bn: true}"]),
    "fgsm": ("fgsm-mnist.yaml", []),
    "fast": ("fast-mnist.yaml", []),
    "fast-step2eps": ("fast-mnist.yaml", ["recipe.options.step_size=0.6"]),
    "nfgsm": ("nfgsm-mnist.yaml", []),
    "nfgsm-k1": ("nfgsm-mnist.yaml", ["recipe.options.noise=1.0"]),
    "nfgsm-k0.5": ("nfgsm-mnist.yaml", ["recipe.options.noise=0.5"]),
    "pgd": ("pgd-mnist.yaml", []),
    "pgd-aug": ("pgd-mnist-aug.yaml", []),
    # feature denoising (Xie et al. 2019): a non-local block after each conv stage
    "pgd-denoise": ("pgd-mnist.yaml", ["model.denoise={after: [net.2, net.5]}"]),
    "trades": ("trades-mnist.yaml", []),
    "advprop": ("advprop-mnist.yaml", []),
    "advprop-eps0.1": ("advprop-mnist.yaml", ["recipe.options.eps=0.1"]),
    "sat-psoftplus": ("sat-mnist.yaml", []),
    "sat-silu": ("sat-mnist.yaml", ["recipe.options.activation=silu"]),
    "sat-gelu": ("sat-mnist.yaml", ["recipe.options.activation=gelu"]),
    "sat-softplus": ("sat-mnist.yaml", ["recipe.options.activation=softplus"]),
    "smoothgrad-attacker": ("pgd-mnist.yaml", ["recipe.options.smooth_grad=attacker"]),
    "smoothgrad-optimizer": ("pgd-mnist.yaml", ["recipe.options.smooth_grad=optimizer"]),
    "smoothgrad-both": ("pgd-mnist.yaml", ["recipe.options.smooth_grad=both"]),
    # issue 13's corruption grid: small_cnn with batch norm throughout
    "pgd-bn": ("pgd-mnist.yaml", ["model.options={bn: true}"]),
    "advprop-weak": ("advprop-mnist.yaml", ["recipe.options.eps=0.1", "recipe.options.steps=1"]),
    "sat-psoftplus-bn": ("sat-mnist.yaml", ["model.options={bn: true}"]),
    "sat-silu-bn": (
        "sat-mnist.yaml",
        ["model.options={bn: true}", "recipe.options.activation=silu"],
    ),
}
PGD_ATTACK = "pgd:steps=40:restarts=10"
SUITE = ["apgd-ce", "apgd-t", "square:n_queries=5000"]  # the standard suite


def run_dir(out: Path, name: str, epochs: int, seed: int) -> Path:
    return out / f"{name}-e{epochs}-s{seed}"


def train(name: str, args: argparse.Namespace, seed: int) -> Path:
    config, extra = EXPERIMENTS[name]
    directory = run_dir(args.out, name, args.epochs, seed)
    overrides = [
        f"name={directory.name}", f"out_dir={args.out}", f"seed={seed}",
        f"epochs={args.epochs}", *extra,
    ]  # fmt: skip
    cfg = load_config(ROOT / "configs" / config, overrides)
    if "eps_ramp_epochs" in cfg.recipe.options:
        cfg.recipe.options["eps_ramp_epochs"] = args.ramp
    meta = directory / io.META_FILE
    if meta.exists() and json.loads(meta.read_text()).get("status") == "complete":
        return directory
    resume = (directory / io.CHECKPOINT_FILE).exists()
    print(f"[train] {directory.name} ({'resume' if resume else 'fresh'})", flush=True)
    return Trainer(cfg, resume=resume, overwrite=not resume, progress=args.progress).fit()


def _eval(directory: Path, attacks: list[str], n: int, tag: str, args) -> dict | None:
    """Evaluate once and cache; ``None`` when ``n`` is 0 (skipped)."""
    if n <= 0:
        return None
    cache = directory / f"repro_{tag}_n{n}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    model = rl.load(directory)
    meta = json.loads((directory / io.META_FILE).read_text())
    test = rl.load_dataset(meta["data"]["name"], "test")
    t0 = time.perf_counter()
    report = rl.evaluate(
        model, test, attacks=attacks, eps=[EPS], n=n, seed=0, progress=args.progress,
        state_file=directory / f"repro_{tag}_n{n}.state.json",
    )  # fmt: skip
    stages = report.results[0].stages
    result = {
        "n": report.n,
        "clean": report.clean_accuracy,
        "robust": report.results[0].robust_accuracy,
        "stages": [
            {"attack": s.attack, "robust_after": s.robust_after, "seconds": s.seconds}
            for s in stages
        ],
        "seconds": time.perf_counter() - t0,
    }
    io.atomic_write_text(cache, json.dumps(result, indent=1))
    return result


def evaluate(directory: Path, args: argparse.Namespace) -> dict:
    """Clean and PGD-40x10 accuracy on ``--n`` points; the worst case with the standard
    suite on ``--suite-n`` points (0: skipped, it is the expensive part on a CPU)."""
    pgd = _eval(directory, [PGD_ATTACK], args.n, "pgd", args)
    suite = _eval(directory, [PGD_ATTACK, *SUITE], args.suite_n, "suite", args)
    rows = [json.loads(line) for line in (directory / io.METRICS_FILE).read_text().splitlines()]
    return {
        "run": directory.name,
        "n": args.n,
        "clean": pgd["clean"],
        "test_acc": rows[-1]["test_acc"],  # clean, all 1,000 test images
        "pgd40x10": pgd["robust"],
        "suite_n": args.suite_n,
        "worst": suite["robust"] if suite else None,
        "train_seconds": sum(r["seconds"] for r in rows),
        "epochs_run": len(rows),
        "guard_restored_epoch": next(
            (r["guard_restored_epoch"] for r in rows if "guard_restored_epoch" in r), None
        ),
        "guard_pgd_acc": [round(r["guard_pgd_acc"], 3) for r in rows if "guard_pgd_acc" in r],
    }


def fmt(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    if not values:
        return "-"
    mean = statistics.fmean(values) * scale
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values) * scale:.{digits}f}"


def table(args: argparse.Namespace, names: list[str], seeds: list[int]) -> str:
    lines = [
        f"mnist5k, small_cnn, {args.epochs} epochs (eps ramp {args.ramp}), L-inf eps {EPS}, "
        f"clean and PGD-40x10 on the first {args.n} test points, worst case over PGD-40x10 + "
        f"standard suite on the first {args.suite_n}; mean ± sd over seeds",
        "",
        "| experiment | seeds | clean % (1000) | clean % | PGD-40x10 % | worst case % | train s "
        "| / pgd time |",
        "|---|---|---|---|---|---|---|---|",
    ]
    results: dict[str, list[dict]] = {}
    for name in names:
        for seed in seeds:
            directory = run_dir(args.out, name, args.epochs, seed)
            if (directory / f"repro_pgd_n{args.n}.json").exists():
                results.setdefault(name, []).append(evaluate(directory, args))
    pgd_runs = results.get("pgd", [{"train_seconds": float("nan")}])
    pgd_time = statistics.fmean(r["train_seconds"] for r in pgd_runs)
    for name, rs in results.items():
        seconds = [r["train_seconds"] for r in rs]
        note = ""
        restored = [r["guard_restored_epoch"] for r in rs if r.get("guard_restored_epoch")]
        if restored:
            note = f" (guard restored epoch {', '.join(str(int(e)) for e in restored)})"
        lines.append(
            f"| {name}{note} | {len(rs)} | {fmt([r['test_acc'] for r in rs])} | "
            f"{fmt([r['clean'] for r in rs])} | "
            f"{fmt([r['pgd40x10'] for r in rs])} | "
            f"{fmt([r['worst'] for r in rs if r['worst'] is not None])} | "
            f"{fmt(seconds, 1.0, 0)} | {statistics.fmean(seconds) / pgd_time:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--ramp", type=float, default=4.0, help="eps ramp epochs")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--only", default=None, help="comma-separated experiment names")
    parser.add_argument("--n", type=int, default=500, help="test points for clean and PGD")
    parser.add_argument("--suite-n", type=int, default=0, help="test points for the suite")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "reproduce")
    parser.add_argument("--table", action="store_true", help="only print the table")
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args(argv)
    names = args.only.split(",") if args.only else list(EXPERIMENTS)
    unknown = [n for n in names if n not in EXPERIMENTS]
    if unknown:
        sys.exit(f"unknown experiments {unknown}; choose from {list(EXPERIMENTS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    if not args.table:
        for seed in seeds:
            for name in names:
                result = evaluate(train(name, args, seed), args)
                print(json.dumps(result), flush=True)
    print(table(args, names, seeds))


if __name__ == "__main__":
    main()
