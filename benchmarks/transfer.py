"""Transfer matrix of the demo models (issue 12): standard, PGD-trained and LMT small
models on mnist5k, plus the standard model behind JPEG (evaluated adaptively when it is
the target), PGD-20 on each source, scored on each target.

    python benchmarks/transfer.py --runs runs/demo-mnist runs/demo-pgd-mnist runs/demo-lmt-mnist \
        --eps 0.1,0.3 --n 200 --universal 500 --passes 5 --out benchmarks/results/transfer.json

With ``--universal N`` each source also gets a row ``NAME/universal``: one universal
perturbation (radius eps) fitted on the first N training images.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import robustlab as rl
from robustlab.defenses import defend
from robustlab.evaluate.transfer import transfer_matrix
from robustlab.io import atomic_write_text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", nargs="+", type=Path, required=True)
    p.add_argument("--eps", default="0.1,0.3")
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/transfer.json"))
    p.add_argument(
        "--universal",
        type=int,
        default=0,
        help="fit a universal perturbation per source on the first N training images",
    )
    p.add_argument("--passes", type=int, default=10, help="universal perturbation passes at most")
    args = p.parse_args()
    models = {run.name.removeprefix("demo-").removesuffix("-mnist"): rl.load(run)
              for run in args.runs}  # fmt: skip
    first = next(iter(models))
    models[f"{first}+jpeg"] = defend(models[first], ["jpeg:quality=75"])
    test = rl.load_dataset("mnist5k", "test")
    eps = [float(e) for e in args.eps.split(",")]
    fit = rl.load_dataset("mnist5k", "train").subset(args.universal) if args.universal else None
    m = transfer_matrix(models, test, attacks=["pgd:steps=20"], eps=eps, n=args.n, universal=fit,
                        universal_options={"max_passes": args.passes},
                        universal_sources=[n for n in models if n != f"{first}+jpeg"])  # fmt: skip
    print(m.table())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(m.to_dict(), indent=1))
    m.plot(args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
