"""Time of the Lipschitz bound (``robustlab.certify.lipschitz_bound``) per method.

Builds a zoo model (random weights, eval mode) and bounds it with each method, several
times; reports the median wall time, the bound, and whether it is proven. Issue 5's
target: preact_resnet18 at 3x32x32 in under 5 s on a CPU.

    python benchmarks/bench_bound.py --model preact_resnet18 --shape 3,32,32 --repeats 3
    python benchmarks/bench_bound.py --baseline ddd662d   # also time that commit's code

With ``--baseline REV`` the ``robustlab/certify/lipschitz.py`` of git revision REV is
loaded beside the current one and timed on the same model, interleaved, for a
side-by-side before/after ratio.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import robustlab as rl
from robustlab.certify import lipschitz_bound

ROOT = Path(__file__).resolve().parents[1]


def baseline_bound(rev: str):
    """``lipschitz_bound`` as it was at git revision ``rev``."""
    source = subprocess.run(
        ["git", "show", f"{rev}:src/robustlab/certify/lipschitz.py"],
        cwd=ROOT, check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    path = Path(tempfile.mkdtemp()) / "baseline_lipschitz.py"
    path.write_text(source)
    name = "robustlab.certify.baseline_lipschitz"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module.lipschitz_bound


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="preact_resnet18")
    parser.add_argument("--shape", default="3,32,32")
    parser.add_argument("--methods", default="fft,power,lmt")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="write the results (json)")
    parser.add_argument("--baseline", default=None, help="git revision to compare with")
    args = parser.parse_args(argv)
    versions = {"now": lipschitz_bound}
    if args.baseline:
        versions[args.baseline] = baseline_bound(args.baseline)
    shape = tuple(int(s) for s in args.shape.split(","))
    torch.manual_seed(0)
    model = rl.create_model(args.model, in_channels=shape[0], input_size=shape[1:]).eval()
    rows = []
    for method in args.methods.split(","):
        times: dict[str, list[float]] = {v: [] for v in versions}
        reports = {}
        for _ in range(args.repeats):  # versions interleaved: the same machine state
            for version, bound in versions.items():
                t0 = time.perf_counter()
                reports[version] = bound(model, shape, method=method)
                times[version].append(time.perf_counter() - t0)
        for version, report in reports.items():
            row = {
                "model": args.model, "shape": shape, "method": method, "version": version,
                "median_s": statistics.median(times[version]), "times_s": times[version],
                "bound": report.total, "guaranteed": report.guaranteed,
                "converged": report.converged,
            }  # fmt: skip
            rows.append(row)
            print(
                f"{args.model} {args.shape} {method:<6} {version:<8} median "
                f"{row['median_s']:6.2f} s (of {args.repeats})  bound {report.total:.6g}  "
                f"proven {report.guaranteed}",
                flush=True,
            )
    machine = {
        "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
        "cores": os.cpu_count(), "torch": torch.__version__,
    }  # fmt: skip
    if args.out:
        args.out.write_text(json.dumps({"machine": machine, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
