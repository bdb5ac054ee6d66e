"""Is 1-bit squeezing (binarisation) really robust on MNIST, or is BPDA too weak at 1 bit?

An independent check of the adaptive table's ``bitdepth:bits=1`` rows. Behind
binarisation the model only ever sees binary images, and within L-inf ``eps`` of ``x`` the
reachable ones are exactly: ``round(x)`` with any subset of the *flippable* pixels flipped
(those with ``0.5 - eps < x <= 0.5 + eps``; ``torch.round`` sends 0.5 to 0). So the
defended model's robust accuracy is a search over subsets of flippable pixels, which this
script attacks without any surrogate:

1. relaxed PGD (margin loss) on the flippable pixels in [0, 1], every iterate rounded and
   checked, with random restarts;
2. greedy flips: repeatedly flip the flippable pixel whose gradient promises the largest
   gain in the margin.

A point counts as broken if any rounded iterate is misclassified. The result is an upper
bound on the defended model's robust accuracy from an attack that is exact in the forward
direction; if it matches the BPDA figure, BPDA was not the weak link.

    python benchmarks/binary_space.py runs/demo-mnist --eps 0.3 --n 100
"""

from __future__ import annotations

import argparse
import json

import torch

import robustlab as rl


def margin(model, b: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    z = model(b)
    return z.scatter(1, y[:, None], float("-inf")).amax(1) - z.gather(1, y[:, None])[:, 0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run")
    p.add_argument("--eps", type=float, default=0.3)
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--restarts", type=int, default=10)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--greedy", type=int, default=150, help="greedy flips per image")
    args = p.parse_args()
    torch.manual_seed(0)
    model = rl.load(args.run).eval()
    test = rl.load_dataset("mnist5k", "test")
    x, y = test.float_images(slice(0, args.n)), test.y[: args.n].long()
    b0 = torch.round(x)
    flippable = ((x > 0.5 - args.eps) & (x <= 0.5)) | ((x > 0.5) & (x <= 0.5 + args.eps))

    def wrong(b: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(b).argmax(1) != y

    broken = wrong(b0)  # misclassified after binarisation already
    out = {
        "run": args.run, "eps": args.eps, "n": args.n,
        "flippable_mean": float(flippable.flatten(1).sum(1).float().mean()),
        "clean_defended": float((~broken).float().mean()), "relaxed": [],
    }  # fmt: skip
    for restart in range(args.restarts):
        u = b0 if restart == 0 else torch.where(flippable, torch.rand_like(x), b0)
        for _ in range(args.steps):
            u = u.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(margin(model, u, y).sum(), u)
            with torch.no_grad():
                u = torch.where(flippable, (u + 0.05 * g.sign()).clamp(0, 1), b0)
                broken |= wrong(torch.where(flippable, torch.round(u), b0))
        out["relaxed"].append(float((~broken).float().mean()))
        print(f"restart {restart}: robust {100 * out['relaxed'][-1]:.1f}%", flush=True)
    b, free = b0.clone(), flippable.clone()
    for _ in range(args.greedy):
        b = b.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(margin(model, b, y).sum(), b)
        with torch.no_grad():
            gain = torch.where(free, g * (1 - 2 * b), torch.full_like(g, float("-inf"))).flatten(1)
            idx = gain.argmax(1)
            ok = torch.isfinite(gain.gather(1, idx[:, None])[:, 0])
            flat, free_flat = b.detach().flatten(1).clone(), free.flatten(1).clone()
            rows = ok.nonzero()[:, 0]
            flat[rows, idx[rows]] = 1 - flat[rows, idx[rows]]
            free_flat[rows, idx[rows]] = False
            b, free = flat.view_as(x), free_flat.view_as(x)
            broken |= wrong(b)
    out["after_greedy"] = float((~broken).float().mean())
    print(json.dumps(out))


if __name__ == "__main__":
    main()
