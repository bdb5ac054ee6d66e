"""Inference-time defenses, naive versus adaptive (issue 11's reproduction).

For each trained run and each defense: ``rl.evaluate`` of the defended model, which runs
every mode the defense's declarations call for (none = the undefended model, naive,
BPDA, EOT-k, BPDA+EOT-k, transfer from the undefended model) and reports the per-point
worst case. The published outcome (Athalye et al. 2018) is the reference: the naive
figure looks strong, the adaptive worst case falls to about the undefended model's.

Then, for random resize-and-pad behind the standard model: robust accuracy against the
number of EOT samples k (which justifies the default k) and against PGD iterations.

    python benchmarks/defenses.py --runs runs/demo-mnist runs/demo-pgd-mnist \
        --eps 0.1,0.2:0.2,0.3 --n 200 --out benchmarks/results/defenses

Each (run, defense) result is cached as JSON in --out, so an interrupted run resumes.

With ``--detector``: Xu et al.'s MNIST feature-squeezing detector (bit depth 1, median
2x2) behind each run, threshold fitted at 5% false positives on the last 500 test points,
evaluated on the first ``--n`` against the naive and the adaptive attack (PGD-``--steps``):

    python benchmarks/defenses.py --runs runs/demo-mnist runs/demo-pgd-mnist \
        --eps 0.1,0.2,0.3:0.1,0.2,0.3 --n 500 --steps 100 --detector
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import robustlab as rl
from robustlab.defenses import SqueezeDetector, defend
from robustlab.evaluate import evaluate_detector
from robustlab.io import atomic_write_text

#: mnist5k models take 28x28 images: resize-and-pad shrinks to a random size in [24, 28]
#: and pads back to 28 (Xie et al. enlarge 299 -> [299, 331) for a 331 network input).
DEFENSES = [
    "resize_pad:size_min=24:size_max=28:out_size=28",
    "bitdepth:bits=1",  # Xu et al.'s MNIST setting
    "median:size=2",
    "jpeg:quality=75",
    "tvm:keep_prob=0.5:iterations=30",
    "noise:sigma=0.2",
]


def evaluate_defense(run: Path, spec: str, eps: list[float], args) -> dict:
    model = rl.load(run)
    test = rl.load_dataset("mnist5k", "test")
    t0 = time.perf_counter()
    report = rl.evaluate(
        defend(model, [spec]), test, attacks=[f"pgd:steps={args.steps}"], eps=eps, n=args.n,
        seed=0, eot_samples=args.eot,
    )  # fmt: skip
    return {
        "run": run.name, "defense": spec, "eps": eps, "n": args.n,
        "clean": report.clean_accuracy, "worst": report.robust_accuracy,
        "modes": {m: [r.robust_accuracy for r in rep.results] for m, rep in report.modes.items()},
        "majority": {
            m: [r.majority_accuracy for r in rep.results] for m, rep in report.modes.items()
        },
        "seconds": round(time.perf_counter() - t0, 1),
    }  # fmt: skip


def eot_curve(run: Path, eps: float, args) -> dict:
    """Robust accuracy of resize-and-pad (each example scored over 16 draws, worst case)
    against the EOT samples per gradient, and against PGD iterations at the default k."""
    model = defend(rl.load(run), [DEFENSES[0]])
    test = rl.load_dataset("mnist5k", "test")
    out: dict = {"run": run.name, "eps": eps, "n": args.n, "eot": {}, "steps": {}}
    common = dict(eps=[eps], n=args.n, seed=0, adaptive=False, rescore_draws=16)
    for k in (1, 2, 4, 8, 16, 32, 64):
        r = rl.evaluate(model, test, attacks=["pgd:steps=20"], attack_options={"eot_samples": k},
                        **common)  # fmt: skip
        out["eot"][k] = r.results[0].robust_accuracy
        print(f"  EOT k={k:3d}: {100 * out['eot'][k]:.1f}%", flush=True)
    for steps in (5, 10, 20, 40, 80):
        r = rl.evaluate(model, test, attacks=[f"pgd:steps={steps}"],
                        attack_options={"eot_samples": args.eot}, **common)  # fmt: skip
        out["steps"][steps] = r.results[0].robust_accuracy
        print(f"  steps {steps:3d}: {100 * out['steps'][steps]:.1f}%", flush=True)
    return out


def detector(run: Path, eps: list[float], args) -> dict:
    """Xu et al.'s MNIST detector: ROC and pipeline accuracy, naive and adaptive."""
    model = rl.load(run)
    test = rl.load_dataset("mnist5k", "test")
    det = SqueezeDetector(model, ["bitdepth:bits=1", "median:size=2"])
    det.fit(test.float_images(slice(len(test) - 500, len(test))), fpr=0.05)
    report = evaluate_detector(model, det, test, eps=eps, n=args.n, steps=args.steps)
    print(report.table(), flush=True)
    return {"run": run.name, **report.to_dict()}


def detector_table(rows: list[dict]) -> str:
    lines = [
        "| run | eps | clean (pipeline) | flagged clean | undefended | naive | adaptive | "
        "worst case | detected naive | detected adaptive | AUC naive | AUC adaptive |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def pct(v):
        return "-" if v is None else f"{100 * v:.1f}"

    def auc(roc):
        return "-" if roc is None else f"{roc['auc']:.3f}"

    for row in rows:
        for r in row["results"]:
            lines.append(
                f"| {row['run']} | {r['eps']:g} | {pct(row['clean_accuracy'])} "
                f"({pct(row['pipeline_clean_accuracy'])}) | {pct(row['false_positive_rate'])} | "
                f"{pct(r['undefended'])} | {pct(r['naive'])} | {pct(r['adaptive'])} | "
                f"**{pct(r['worst'])}** | {pct(r['detected_naive'])} | "
                f"{pct(r['detected_adaptive'])} | {auc(r['roc_naive'])} | {auc(r['roc_adaptive'])} |"
            )
    return "\n".join(lines)


def table(rows: list[dict]) -> str:
    modes = ["none", "naive", "bpda", "eot", "bpda+eot", "transfer"]
    lines = [
        "| run | defense | eps | clean | " + " | ".join(modes) + " | worst case |",
        "|---|---|---|---|" + "---|" * len(modes) + "---|",
    ]
    for r in rows:
        for i, e in enumerate(r["eps"]):
            cells = []
            for m in modes:
                key = next((k for k in r["modes"] if k.split("-")[0] == m or k == m), None)
                if m in ("eot", "bpda+eot"):
                    key = next((k for k in r["modes"] if k.rsplit("-", 1)[0] == m), None)
                cells.append(f"{100 * r['modes'][key][i]:.1f}" if key else "")
            lines.append(
                f"| {r['run']} | `{r['defense']}` | {e:g} | {100 * r['clean']:.1f} | "
                + " | ".join(cells) + f" | **{100 * r['worst'][i]:.1f}** |"
            )  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", nargs="+", type=Path, required=True)
    p.add_argument("--eps", required=True, help="per run, ':'-separated lists: 0.1,0.2:0.2,0.3")
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--eot", type=int, default=10)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/defenses"))
    p.add_argument("--skip-curve", action="store_true")
    p.add_argument("--detector", action="store_true", help="only the detector's evaluation")
    args = p.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    eps_per_run = [[float(e) for e in part.split(",")] for part in args.eps.split(":")]
    args.out.mkdir(parents=True, exist_ok=True)
    if args.detector:
        rows = []
        for run, eps in zip(args.runs, eps_per_run):
            cache = args.out / f"detector--{run.name}--n{args.n}-steps{args.steps}.json"
            if not cache.is_file():
                print(f"{run.name} with the squeezing detector", flush=True)
                atomic_write_text(cache, json.dumps(detector(run, eps, args), indent=1))
            rows.append(json.loads(cache.read_text()))
        text = detector_table(rows)
        atomic_write_text(args.out / "detector_table.md", text + "\n")
        print(text)
        return
    rows = []
    for run, eps in zip(args.runs, eps_per_run):
        for spec in DEFENSES:
            cache = args.out / f"{run.name}--{spec.split(':')[0]}.json"
            if cache.is_file():
                rows.append(json.loads(cache.read_text()))
                continue
            print(f"{run.name} behind {spec}", flush=True)
            row = evaluate_defense(run, spec, eps, args)
            atomic_write_text(cache, json.dumps(row, indent=1))
            rows.append(row)
            print(f"  worst {row['worst']} naive {row['modes']['naive']} ({row['seconds']} s)")
    text = table(rows)
    atomic_write_text(args.out / "table.md", text + "\n")
    print(text)
    if not args.skip_curve:
        cache = args.out / "eot_curve.json"
        if not cache.is_file():
            curve = eot_curve(args.runs[0], eps_per_run[0][0], args)
            atomic_write_text(cache, json.dumps(curve, indent=1))
        print(cache.read_text())


if __name__ == "__main__":
    main()
