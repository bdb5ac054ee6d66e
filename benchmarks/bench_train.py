"""Cost of a PGD-k adversarial-training epoch versus its floor, side by side.

The floor is the work PGD-k training cannot avoid on each batch: k forward passes
with input-gradient backward passes (plus the sign step and projection), then one
forward and parameter-gradient backward pass and the optimiser step. "robustlab" is
the trainer's own step (``Trainer._train_step``: recipe, learning-rate schedule,
finite-loss check, metric sums) on a copy of the same model, over the same batches.
Contenders are timed round-robin; the median of ``--repeats`` is reported.

    python benchmarks/bench_train.py --steps 10 --batches 20 --repeats 5
    python benchmarks/bench_train.py --model preact_resnet18 --batch 32 --batches 4
    python benchmarks/bench_train.py --recipes standard,fgsm,fast,nfgsm,trades,advprop

``--recipes`` adds the trainer step of other recipes (eps 0.3, the configs' settings)
to the round-robin: the cost of each method relative to PGD-k, measured side by side.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

from robustlab.config import load_config
from robustlab.train import Trainer


def floor_step(model, opt, x, y, eps, steps, alpha):
    model.eval()
    x_adv = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1)
    for _ in range(steps):
        xa = x_adv.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(model(xa), y), xa)
        x_adv = torch.min(torch.max(xa.detach() + alpha * grad.sign(), x - eps), x + eps).clamp(
            0, 1
        )
    model.train()
    loss = F.cross_entropy(model(x_adv), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="small_cnn")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--eps", type=float, default=0.3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--recipes", default="", help="other recipes to time beside pgd")
    parser.add_argument("--out", default=None, help="append the result as a JSON line")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    mnist = args.model in ("small_cnn", "lenet", "mlp")
    size, channels = (28, 1) if mnist else (32, 3)

    def make_trainer(recipe: str, options: str, model_options: str = "{}") -> Trainer:
        overrides = [
            f"out_dir={tempfile.mkdtemp()}", "name=bench", "data.name=synthetic",
            f"data.options={{size: {size}, channels: {channels}, n_train: {args.batch * 2}, "
            "n_test: 16, num_classes: 10}",
            f"data.batch_size={args.batch}", f"model.name={args.model}",
            f"model.options={model_options}", "optim.name=adam", "optim.lr=0.001",
            f"recipe.name={recipe}", f"recipe.options={options}",
        ]  # fmt: skip
        trainer = Trainer(load_config(None, overrides), progress=False)
        trainer.ddp_model.train()
        return trainer

    eps = args.eps
    recipe_options = {
        "standard": ("{}", "{}"),
        "fgsm": (f"{{eps: {eps}}}", "{}"),
        "fast": (f"{{eps: {eps}, guard: false}}", "{}"),
        "nfgsm": (f"{{eps: {eps}}}", "{}"),
        "trades": (f"{{eps: {eps}, steps: {args.steps}}}", "{}"),
        "advprop": (f"{{eps: {eps}, steps: 5}}", "{bn: true}"),
        "sat": (f"{{eps: {eps}, steps: {args.steps}}}", "{}"),
    }
    trainer = make_trainer("pgd", f"{{eps: {eps}, steps: {args.steps}}}")
    alpha = 2.5 * args.eps / args.steps
    torch.manual_seed(0)
    batches = [
        (torch.rand(args.batch, channels, size, size), torch.randint(0, 10, (args.batch,)))
        for _ in range(args.batches)
    ]
    floor_model = copy.deepcopy(trainer.model)
    floor_opt = torch.optim.Adam(floor_model.parameters(), lr=1e-3)

    def run_floor():
        for x, y in batches:
            floor_step(floor_model, floor_opt, x, y, args.eps, args.steps, alpha)

    def run_ours():
        for x, y in batches:
            trainer._train_step(x, y)

    contenders = {"floor": run_floor, "robustlab": run_ours}
    for name in filter(None, args.recipes.split(",")):
        other = make_trainer(name, *recipe_options[name])

        def run_other(other=other):
            for x, y in batches:
                other._train_step(x, y)

        contenders[name] = run_other
    for fn in contenders.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in contenders}
    for _ in range(args.repeats):
        for name, fn in contenders.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "model": args.model, "batch": args.batch, "batches": args.batches, "steps": args.steps,
        "repeats": args.repeats, "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "median_s": med, "ratio": med["robustlab"] / med["floor"],
        "all_s": times,
    }  # fmt: skip
    print(f"PGD-{args.steps} training, {args.model}, {args.batches} batches of {args.batch}, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}")  # fmt: skip
    for name, t in med.items():
        label = "pgd (ours)" if name == "robustlab" else name
        print(
            f"  {label:<10} {t:8.3f} s   / floor {t / med['floor']:.3f}   "
            f"/ pgd {t / med['robustlab']:.3f}"
        )
    if args.out:
        with open(args.out, "a") as fh:
            fh.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
