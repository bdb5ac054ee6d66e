"""robustlab's standard evaluation versus AutoAttack's standard version, side by side.

Same model, same points, same eps (L-inf). AutoAttack (``pyautoattack``, installed for
benchmarks and tests only) runs APGD-CE, APGD-T, FAB-T and Square-5000 on the points
still robust; robustlab runs ``evaluate(model, data, attacks=[SUITE], eps=[eps])``
(validity checks off: they are not part of an attack's cost) once per ``--precision``.
Reported: robust accuracy, seconds, the ratio to AutoAttack's time, and per stage of
robustlab where the time went (points attacked, images forwarded, gradients taken).
Contenders alternate within each repeat; the medians of ``--repeats`` are reported.

    python benchmarks/bench_standard.py --case runs/demo-mnist:0.1 \\
        --case runs/demo-pgd-mnist:0.3 --n 100 --json benchmarks/results/standard.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from bench_pgd import cpu_name  # benchmarks/ is on the path when run as a script

import robustlab as rl
from robustlab.io import load_run_data


def run_autoattack(model, x, y, eps, batch):
    from pyautoattack import AutoAttack

    aa = AutoAttack(model, norm="Linf", eps=eps, version="standard", seed=0)
    aa.verbose = False
    t0 = time.perf_counter()
    x_adv = aa.run_standard_evaluation(x, y, batch_size=batch)
    seconds = time.perf_counter() - t0
    if isinstance(x_adv, tuple):
        x_adv = x_adv[0]
    with torch.no_grad():
        robust = float((model(x_adv).argmax(1) == y).float().mean())
    return robust, seconds


def run_robustlab(model, data, eps, n, batch, suite, precision):
    t0 = time.perf_counter()
    report = rl.evaluate(
        model, data, attacks=[suite], eps=[eps], n=n, batch_size=batch, checks=False,
        attack_options={"precision": precision}, progress=False,
    )  # fmt: skip
    seconds = time.perf_counter() - t0
    stages = [
        {"attack": s.attack, "attacked": s.attacked, "broken": s.broken, "seconds": s.seconds,
         "forwards": s.forwards, "gradients": s.gradients}
        for s in report.results[0].stages
    ]  # fmt: skip
    return report.results[0].robust_accuracy, seconds, stages


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--case", action="append", required=True, help="RUN:EPS (repeatable)")
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--suite", default="standard")
    p.add_argument("--precision", default="fp32,auto", help="robustlab contenders")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--no-autoattack", action="store_true")
    p.add_argument("--json")
    args = p.parse_args()
    print(f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    out = []
    for case in args.case:
        run, eps = case.rsplit(":", 1)
        eps = float(eps)
        model = rl.load(run).eval()
        test, _ = load_run_data(run)
        data = test.subset(args.n)
        x, y = data.float_images(), data.y
        times: dict[str, list[float]] = {}
        robust: dict[str, float] = {}
        stages: dict[str, list] = {}
        for _ in range(args.repeats):
            if not args.no_autoattack:
                r, s = run_autoattack(model, x, y, eps, args.batch)
                robust["autoattack"] = r
                times.setdefault("autoattack", []).append(s)
            for prec in args.precision.split(","):
                name = f"robustlab {args.suite} ({prec})"
                r, s, st = run_robustlab(model, data, eps, args.n, args.batch, args.suite, prec)
                robust[name], stages[name] = r, st
                times.setdefault(name, []).append(s)
        med = {k: statistics.median(v) for k, v in times.items()}
        ref = med.get("autoattack")
        print(f"\n{run}, eps {eps}, {args.n} points")
        print(f"{'contender':36s} {'robust':>7s} {'median s':>9s} {'/ AutoAttack':>13s}")
        for k in med:
            ratio = f"{med[k] / ref:13.3f}" if ref else ""
            print(f"{k:36s} {100 * robust[k]:6.1f}% {med[k]:9.1f} {ratio}")
        for k, st in stages.items():
            print(f"  {k}:")
            for s in st:
                print(f"    {s['attack']:28s} {s['attacked']:5d} points  {s['broken']:4d} broken  "
                      f"{s['seconds']:7.1f} s  {s['forwards']:8d} fwd  {s['gradients']:7d} grad")  # fmt: skip
        out.append({"run": run, "eps": eps, "n": args.n, "median_s": med, "robust": robust,
                    "stages": stages, "repeats": args.repeats})  # fmt: skip
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"cpu": cpu_name(), "threads": torch.get_num_threads(), "cases": out}, fh,
                      indent=2)  # fmt: skip


if __name__ == "__main__":
    main()
