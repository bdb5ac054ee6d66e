"""PGD speed, side by side in one process: the floor, robustlab, torchattacks, ART.

The floor is the work PGD cannot avoid: ``steps`` forward passes and ``steps``
backward passes with respect to the input, nothing else. Every contender runs on the
same model, batch, eps, step size and number of steps; contenders are timed
round-robin (so machine noise hits them alike) and each reports the median of
``--repeats`` runs. Ratios are what to compare across machines, not seconds.

    python benchmarks/bench_pgd.py --model small_cnn --batch 256 --steps 10
    python benchmarks/bench_pgd.py --model preact_resnet18 --batch 64 --steps 10 --repeats 3

Peers are optional (``pip install --no-deps torchattacks adversarial-robustness-toolbox six``).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import robustlab as rl
from robustlab.attacks import PGD, fast_model
from robustlab.io import load_run_data


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def floor(model, x, y, steps):
    for _ in range(steps):
        xa = x.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(model(xa), y), xa)
    return grad


def build(args):
    if args.model == "small_cnn":
        shape, classes = (1, 28, 28), 10
    else:
        shape, classes = (3, 32, 32), 10
    torch.manual_seed(0)
    if args.run:
        model = rl.load(args.run)
    else:
        model = rl.create_model(
            args.model, num_classes=classes, in_channels=shape[0], input_size=shape[1]
        )
    model = model.eval().to(args.device)
    if args.run:
        test, _ = load_run_data(args.run)
        x, y = test.float_images()[: args.batch], test.y[: args.batch]
        if len(x) < args.batch:
            raise SystemExit(f"the test split has {len(x)} images, fewer than --batch")
    else:
        x, y = torch.rand(args.batch, *shape), torch.randint(0, classes, (args.batch,))
    return model, x.to(args.device), y.to(args.device)


def contenders(model, x, y, args) -> dict[str, Callable[[], torch.Tensor | None]]:
    eps, steps = args.eps, args.steps
    alpha = 2.5 * eps / steps
    out: dict[str, Callable] = {
        "floor": lambda: floor(model, x, y, steps),
        # as users construct it: the defaults (precision auto, channels_last input)
        "robustlab": lambda: PGD(model, eps=eps, steps=steps, step_size=alpha)(x, y),
        "robustlab fp32 NCHW": lambda: PGD(
            model, eps=eps, steps=steps, step_size=alpha, precision="fp32", channels_last=False
        )(x, y),
        "robustlab fp32": lambda: PGD(
            model, eps=eps, steps=steps, step_size=alpha, precision="fp32"
        )(x, y),
        "robustlab bf16 NCHW": lambda: PGD(
            model, eps=eps, steps=steps, step_size=alpha, precision="bf16", channels_last=False
        )(x, y),
    }
    fast = fast_model(model)  # a frozen channels_last copy
    out["robustlab fast_model"] = lambda: PGD(fast, eps=eps, steps=steps, step_size=alpha)(x, y)
    if args.compile:
        compiled = fast_model(model, compile=True)
        out["robustlab fast_model+compile"] = lambda: PGD(
            compiled, eps=eps, steps=steps, step_size=alpha
        )(x, y)
    try:
        import torchattacks

        out["torchattacks"] = lambda: torchattacks.PGD(model, eps=eps, alpha=alpha, steps=steps)(
            x, y
        )
    except ImportError:
        pass
    try:
        import numpy as np
        from art.attacks.evasion import ProjectedGradientDescentPyTorch
        from art.estimators.classification import PyTorchClassifier

        clf = PyTorchClassifier(
            model=model, loss=torch.nn.CrossEntropyLoss(), input_shape=tuple(x.shape[1:]),
            nb_classes=10, clip_values=(0.0, 1.0), device_type="gpu" if x.is_cuda else "cpu",
        )  # fmt: skip
        art_pgd = ProjectedGradientDescentPyTorch(
            clf, norm=np.inf, eps=eps, eps_step=alpha, max_iter=steps, batch_size=len(x),
            num_random_init=1, verbose=False,
        )  # fmt: skip
        xn, yn = x.cpu().numpy(), y.cpu().numpy()
        out["art"] = lambda: torch.from_numpy(art_pgd.generate(xn, yn)).to(x.device)
    except ImportError:
        pass
    return out


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--model", default="small_cnn", choices=["small_cnn", "preact_resnet18", "resnet18"]
    )
    p.add_argument("--run", help="use a trained run (and its test data) instead of random weights")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--eps", type=float, default=0.1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--compile", action="store_true", help="also time fast_model(compile=True)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    model, x, y = build(args)
    runs = contenders(model, x, y, args)
    times: dict[str, list[float]] = {k: [] for k in runs}
    outputs: dict[str, torch.Tensor | None] = {}
    for name, fn in runs.items():  # warm-up (allocator, oneDNN primitives)
        outputs[name] = fn()
    for _ in range(args.repeats):
        for name, fn in runs.items():
            if x.is_cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if x.is_cuda:
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"{args.model}, batch {args.batch}, {args.steps} steps, eps {args.eps}, {args.device}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu_name()}"
    )
    print(
        f"{'contender':26s} {'median s':>9s} {'/ floor':>8s} {'/ robustlab':>12s} {'success':>8s}"
    )
    result = {"args": vars(args), "median_s": med, "success": {}}
    with torch.no_grad():
        for name in runs:
            succ = ""
            if name != "floor":
                rate = float((model(outputs[name]).argmax(1) != y).float().mean())
                result["success"][name] = rate
                succ = f"{100 * rate:7.1f}%"
            print(
                f"{name:26s} {med[name]:9.3f} {med[name] / med['floor']:8.3f} "
                f"{med[name] / med['robustlab']:12.3f} {succ:>8s}"
            )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
