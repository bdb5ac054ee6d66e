"""Validity checks on the demo models (which must stay silent) and on masked versions of
the standard one (which must fire, with the reason): issue 12's table.

    python benchmarks/validity.py --runs runs/demo-mnist runs/demo-pgd-mnist --n 200

Each model is evaluated with ``--attacks`` (default PGD-20) at L-inf 0.1 and 0.3 and
``checks="full"``; the
table shows each check's verdict and, for the masked models, the reason of the first
check that fired.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import nn

import robustlab as rl
from robustlab.io import atomic_write_text


class Broken(nn.Module):
    """A trained model with one thing broken before or after it."""

    def __init__(self, model: nn.Module, kind: str) -> None:
        super().__init__()
        self.model, self.kind = model, kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "quantised input":
            x = torch.round(x * 3) / 3
        z = self.model(x)
        if self.kind == "softmax output":
            return torch.softmax(z, 1)
        if self.kind == "temperature 1000":
            return 1000 * z
        if self.kind == "random noise in forward":
            return self.model((x + 0.2 * torch.randn_like(x)).clamp(0, 1))
        if self.kind == "test-time gradient steps":  # 3 steps against total variation
            with torch.enable_grad():
                u = x.detach().clone().requires_grad_(True)
                for _ in range(3):
                    tv = (u[..., 1:, :] - u[..., :-1, :]).abs().sum()
                    (g,) = torch.autograd.grad(tv, u)
                    u = (u - 0.02 * g.sign()).clamp(0, 1).detach().requires_grad_(True)
            return self.model(x + (u - x).detach())
        return z


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", nargs="+", type=Path, required=True)
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--attacks", default="pgd:steps=20", help="comma-separated attack specs")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/validity.json"))
    args = p.parse_args()
    test = rl.load_dataset("mnist5k", "test")
    models = {run.name: rl.load(run) for run in args.runs}
    standard = models[args.runs[0].name]
    for kind in ("quantised input", "softmax output", "temperature 1000",
                 "random noise in forward", "test-time gradient steps"):  # fmt: skip
        models[f"{args.runs[0].name} + {kind}"] = Broken(standard, kind)
    rows = {}
    for name, model in models.items():
        report = rl.evaluate(model, test, attacks=args.attacks.split(","), eps=[0.1, 0.3],
                             n=args.n, checks="full", seed=0)  # fmt: skip
        rows[name] = {
            "clean": report.clean_accuracy,
            "robust": [r.robust_accuracy for r in report.results],
            "checks": {c.name: c.verdict for c in report.validity.checks},
            "fired": [c.line() for c in report.validity.flagged],
        }
        print(name, json.dumps(rows[name]["checks"]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(rows, indent=1))
    names = list(next(iter(rows.values()))["checks"])
    print("| model | clean | robust 0.1 / 0.3 | " + " | ".join(names) + " |")
    print("|---|---|---|" + "---|" * len(names))
    for name, r in rows.items():
        cells = " | ".join(r["checks"][c] for c in names)
        rob = " / ".join(f"{100 * a:.1f}" for a in r["robust"])
        print(f"| {name} | {100 * r['clean']:.1f} | {rob} | {cells} |")


if __name__ == "__main__":
    main()
