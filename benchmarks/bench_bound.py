"""Time of the Lipschitz bound (``robustlab.certify.lipschitz_bound``) per method.

Builds a zoo model (random weights, eval mode) and bounds it with each method, several
times; reports the median wall time, the bound, and whether it is proven. Issue 5's
target: preact_resnet18 at 3x32x32 in under 5 s on a CPU.

    python benchmarks/bench_bound.py --model preact_resnet18 --shape 3,32,32 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

import robustlab as rl
from robustlab.certify import lipschitz_bound


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="preact_resnet18")
    parser.add_argument("--shape", default="3,32,32")
    parser.add_argument("--methods", default="fft,power,lmt")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="write the results (json)")
    args = parser.parse_args(argv)
    shape = tuple(int(s) for s in args.shape.split(","))
    torch.manual_seed(0)
    model = rl.create_model(args.model, in_channels=shape[0], input_size=shape[1:]).eval()
    rows = []
    for method in args.methods.split(","):
        times, report = [], None
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            report = lipschitz_bound(model, shape, method=method)
            times.append(time.perf_counter() - t0)
        assert report is not None
        row = {
            "model": args.model, "shape": shape, "method": method,
            "median_s": statistics.median(times), "times_s": times,
            "bound": report.total, "guaranteed": report.guaranteed,
            "converged": report.converged,
        }  # fmt: skip
        rows.append(row)
        print(
            f"{args.model} {args.shape} {method:<6} median {row['median_s']:6.2f} s "
            f"(of {args.repeats})  bound {report.total:.6g}  proven {report.guaranteed}",
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
