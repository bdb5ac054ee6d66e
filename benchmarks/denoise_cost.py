"""Cost of feature-denoising blocks: one forward+backward of small_cnn on a batch, with
and without a non-local block after each pooling stage (what ``pgd-denoise`` trains),
timed alternately in one process; medians of the repeats and their ratio.

    python benchmarks/denoise_cost.py --batch 64 --repeats 30
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

import robustlab as rl
from robustlab.nn.denoise import insert_denoising


def step_seconds(model: torch.nn.Module, x: torch.Tensor) -> float:
    t0 = time.perf_counter()
    xx = x.clone().requires_grad_(True)
    model(xx).sum().backward()
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--kind", default="nonlocal_gaussian")
    args = p.parse_args()
    torch.manual_seed(0)
    plain = rl.create_model("small_cnn", in_channels=1, input_size=28).train()
    pools = [n for n, m in plain.named_modules() if isinstance(m, torch.nn.MaxPool2d)]
    denoised = insert_denoising(
        plain, after=pools, kind=args.kind, example=torch.zeros(2, 1, 28, 28)
    ).train()
    x = torch.rand(args.batch, 1, 28, 28)
    for model in (plain, denoised):  # warm-up
        step_seconds(model, x)
    times: dict[str, list[float]] = {"plain": [], "denoised": []}
    for _ in range(args.repeats):  # alternate, so drifts in machine load hit both
        times["plain"].append(step_seconds(plain, x))
        times["denoised"].append(step_seconds(denoised, x))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, batch {args.batch}, {args.repeats} repeats")  # fmt: skip
    print(f"plain    {1000 * med['plain']:.1f} ms")
    print(f"denoised {1000 * med['denoised']:.1f} ms ({args.kind} after {pools})")
    print(f"ratio    {med['denoised'] / med['plain']:.2f}x")


if __name__ == "__main__":
    main()
