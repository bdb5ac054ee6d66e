"""The ``robustlab`` command line: a thin front end, every command is a library call.

robustlab train CONFIG.yaml [--set key=value ...] [--resume | --overwrite]
robustlab eval RUN [--split test] [--n N]
robustlab list models|datasets|recipes|activations
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from robustlab import __version__

log = logging.getLogger("robustlab")


def _cmd_train(args: argparse.Namespace) -> int:
    from robustlab.config import load_config
    from robustlab.train import Trainer

    overrides = list(args.set or [])
    if args.out_dir:
        overrides.append(f"out_dir={args.out_dir}")
    cfg = load_config(args.config, overrides)
    trainer = Trainer(cfg, resume=args.resume, overwrite=args.overwrite)
    run_dir = trainer.fit()
    if trainer.dist.is_main:
        from robustlab.io import META_FILE, read_json

        final = read_json(run_dir / META_FILE)["final"]
        acc = final.get("test_acc")
        print(f"run       {run_dir}")
        if acc is not None:
            print(f"test acc  {100 * acc:.2f}%  (clean, {len(trainer.test_data)} images)")
    return 0


def _split_floats(text: str | None) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()] if text else []


def _load_run_data(run: Path, split: str, n: int):
    from robustlab.data import load_dataset
    from robustlab.io import META_FILE, read_json

    meta = read_json(run / META_FILE)["data"]
    data = load_dataset(meta["name"], split, meta.get("root"), **meta.get("options", {}))
    return (data.subset(n) if n else data), meta["name"]


def _cmd_eval(args: argparse.Namespace) -> int:
    from robustlab.evaluate import clean_accuracy, evaluate
    from robustlab.io import load, write_json

    run = Path(args.run)
    model = load(run, device=args.device)
    data, name = _load_run_data(run, args.split, args.n)
    eps = _split_floats(args.eps)
    result: dict = {"split": args.split, "n": len(data)}
    print(f"run             {run}")
    print(f"data            {name} {args.split} ({len(data)} images)")
    if not eps:
        result["clean_accuracy"] = clean_accuracy(model, data, batch_size=args.batch_size)
        print(f"clean accuracy  {100 * result['clean_accuracy']:.2f}%")
    else:
        attacks = [a for a in (args.attacks or "quick").split(",") if a]
        state = Path(args.state) if args.state else run / "eval_state.json"
        report = evaluate(
            model, data, attacks=attacks, eps=eps, norm=args.norm, batch_size=args.batch_size,
            seed=args.seed, state_file=state,
        )  # fmt: skip
        result.update(clean_accuracy=report.clean_accuracy, robust=report.to_dict())
        print(report.table())
    write_json(run / "eval.json", result)
    print(f"written         {run / 'eval.json'}")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    import json

    from robustlab.evaluate import evaluate
    from robustlab.io import META_FILE, METRICS_FILE, load, read_json

    eps = _split_floats(args.eps)
    attacks = [a for a in args.attacks.split(",") if a]
    columns = []
    for run_text in args.runs:
        run = Path(run_text)
        model = load(run, device=args.device)
        data, name = _load_run_data(run, args.split, args.n)
        report = evaluate(
            model, data, attacks=attacks, eps=eps, norm=args.norm, batch_size=args.batch_size,
            seed=args.seed, state_file=run / "compare_state.json",
        )  # fmt: skip
        meta = read_json(run / META_FILE)
        rows = [json.loads(line) for line in (run / METRICS_FILE).read_text().splitlines()]
        columns.append(
            {
                "run": run.name,
                "recipe": meta["recipe"]["name"],
                "train_seconds": sum(r.get("seconds", 0.0) for r in rows),
                "accuracy": [report.clean_accuracy] + [r.robust_accuracy for r in report.results],
            }
        )
    width = max(12, *(len(c["run"]) for c in columns))
    labels = ["clean"] + [f"eps {e:g}" for e in sorted(eps)]
    where = f"{name} {args.split}, {len(data)} points"
    print(f"{args.norm} worst case over {', '.join(attacks)}; {where}")
    print(f"{'':<12}" + "".join(f"{c['run']:>{width + 2}}" for c in columns))
    print(f"{'recipe':<12}" + "".join(f"{c['recipe']:>{width + 2}}" for c in columns))
    print(
        f"{'train time':<12}" + "".join(f"{c['train_seconds']:>{width + 1}.0f}s" for c in columns)
    )
    for i, label in enumerate(labels):
        cells = "".join(f"{100 * c['accuracy'][i]:>{width + 1}.1f}%" for c in columns)
        print(f"{label:<12}" + cells)
    return 0


def _cmd_certify(args: argparse.Namespace) -> int:
    from robustlab.certify import certify, lipschitz_bound
    from robustlab.io import load, write_json

    run = Path(args.run)
    model = load(run, device=args.device)
    data, name = _load_run_data(run, args.split, args.n)
    bound = lipschitz_bound(model, data.shape, method=args.method)
    print(f"run             {run}")
    print(f"data            {name} {args.split} ({len(data)} images)")
    print(bound.table())
    report = certify(
        model, data, radii=_split_floats(args.radii), kind=args.kind, method=args.method,
        batch_size=args.batch_size, bound=bound if args.kind == "lmt" else None,
    )  # fmt: skip
    print(report.table())
    write_json(run / "certify.json", {"bound": bound.total, "report": report.__dict__})
    print(f"written         {run / 'certify.json'}")
    if not args.no_plot:
        from robustlab.evaluate.plots import save_accuracy_curve

        path = save_accuracy_curve(
            {f"{run.name} ({args.kind})": report.curve()}, run / "certified.png",
            xlabel="L2 radius (pixel units)", ylabel="certified accuracy (%)", marker=None,
        )  # fmt: skip
        print(f"written         {path}")
    return 0


def _cmd_attack(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from robustlab.attacks import lp_norm
    from robustlab.data import to_float
    from robustlab.evaluate.plots import save_adversarial_grid
    from robustlab.evaluate.robustness import AttackSpec
    from robustlab.io import atomic_write, load

    run = Path(args.run)
    model = load(run, device=args.device)
    data, _ = _load_run_data(run, args.split, args.n)
    device = next(model.parameters()).device
    x, y = to_float(data.x).to(device), data.y.to(device)
    torch.manual_seed(args.seed)
    attack = AttackSpec.parse(args.attack).build(model, args.eps, args.norm, args.seed)
    result = attack.run(x, y)
    with torch.no_grad():
        logits_clean, logits_adv = model(x), model(result.x_adv)
    out = Path(args.out)
    arrays = {
        "x": x.cpu().numpy(), "x_adv": result.x_adv.cpu().numpy(), "y": y.cpu().numpy(),
        "pred_clean": logits_clean.argmax(1).cpu().numpy(),
        "pred_adv": logits_adv.argmax(1).cpu().numpy(),
        "success": result.success.cpu().numpy(),
    }  # fmt: skip

    def write_npz(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **arrays)

    atomic_write(out, write_npz)
    png = save_adversarial_grid(
        x, result.x_adv, y, logits_clean, logits_adv, out.with_suffix(".png"), data.classes
    )
    norms = lp_norm(result.x_adv - x, args.norm)
    print(f"attack          {args.attack} ({args.norm}, eps {args.eps:g}) on {len(y)} images")
    print(f"success rate    {100 * float(result.success.float().mean()):.2f}%")
    print(
        f"perturbation    mean {float(norms.mean()):.4f}, max {float(norms.max()):.4f} "
        f"({args.norm})"
    )
    print(f"written         {out} and {png}")
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    from robustlab.attacks import ATTACKS
    from robustlab.data import DATASETS
    from robustlab.models import MODELS
    from robustlab.nn import ACTIVATIONS
    from robustlab.train import RECIPES

    registry = {
        "models": MODELS,
        "datasets": DATASETS,
        "recipes": RECIPES,
        "activations": ACTIVATIONS,
        "attacks": ATTACKS,
    }[args.what]
    width = max(len(n) for n in registry.names())
    for name in registry.names():
        print(f"{name:<{width}}  {registry.summary(name)}".rstrip())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="robustlab",
        description="Adversarial robustness for PyTorch: attack, train, certify, evaluate.",
    )
    parser.add_argument("--version", action="version", version=f"robustlab {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a model from a YAML config")
    p.add_argument("config", help="YAML config (see configs/)")
    p.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)"
    )
    p.add_argument("--out-dir", help="parent directory of the run (default: the config's out_dir)")
    group = p.add_mutually_exclusive_group()
    group.add_argument(
        "--resume", action="store_true", help="continue from the run's last checkpoint"
    )
    group.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("eval", help="clean and robust accuracy of a trained run")
    p.add_argument("run", help="run directory")
    p.add_argument(
        "--attacks",
        help="comma-separated attacks or suites: quick, standard, pgd, apgd-ce, "
        "apgd-t, square, ... with options as pgd:steps=40:restarts=5 (default: quick)",
    )
    p.add_argument(
        "--eps", help="comma-separated budgets in pixel units, e.g. 0.1,0.2,0.3 (none: clean only)"
    )
    p.add_argument("--norm", default="linf", choices=["linf", "l2"])
    p.add_argument("--split", default="test", choices=["train", "test"])
    p.add_argument("--n", type=int, default=0, help="use the first N images (default: all)")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--state", help="resumable state file (default: RUN/eval_state.json)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cpu)")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("compare", help="clean and robust accuracy of several runs side by side")
    p.add_argument("runs", nargs="+", help="run directories")
    p.add_argument("--attacks", default="quick", help="attacks or suites (default: quick)")
    p.add_argument("--eps", required=True, help="comma-separated budgets, e.g. 0.1,0.2,0.3")
    p.add_argument("--norm", default="linf", choices=["linf", "l2"])
    p.add_argument("--split", default="test", choices=["train", "test"])
    p.add_argument("--n", type=int, default=0, help="use the first N images (default: all)")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.set_defaults(func=_cmd_compare)

    p = sub.add_parser("certify", help="Lipschitz bound and certified L2 accuracy of a run")
    p.add_argument("run", help="run directory")
    p.add_argument("--radii", default="0.5,1.0,1.5", help="comma-separated L2 radii")
    p.add_argument("--kind", default="last_layer", choices=["last_layer", "lmt"])
    p.add_argument(
        "--method",
        default="fft",
        choices=["fft", "exact", "lmt", "power"],
        help="fft (default), exact, lmt: proven bounds; power: an estimate",
    )
    p.add_argument("--split", default="test", choices=["train", "test"])
    p.add_argument("--n", type=int, default=0, help="use the first N images (default: all)")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--device", default=None)
    p.add_argument("--no-plot", action="store_true", help="skip certified.png")
    p.set_defaults(func=_cmd_certify)

    p = sub.add_parser(
        "attack", help="attack a trained run; save adversarial examples and a PNG grid"
    )
    p.add_argument("run", help="run directory")
    p.add_argument("--attack", required=True, help="attack name with options, e.g. pgd:steps=40")
    p.add_argument("--eps", type=float, required=True, help="budget in pixel units")
    p.add_argument("--norm", default="linf", choices=["linf", "l2"])
    p.add_argument("--split", default="test", choices=["train", "test"])
    p.add_argument("--n", type=int, default=16, help="attack the first N images (default: 16)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="adv.npz", help="output .npz (the grid goes beside it as .png)")
    p.add_argument("--device", default=None)
    p.set_defaults(func=_cmd_attack)

    p = sub.add_parser(
        "list", help="list registered models, datasets, recipes, activations or attacks"
    )
    p.add_argument("what", choices=["models", "datasets", "recipes", "activations", "attacks"])
    p.set_defaults(func=_cmd_list)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``robustlab`` console script and ``python -m robustlab``."""
    args = build_parser().parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(
        level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    from robustlab.errors import RobustlabError

    try:
        return args.func(args)
    except (RobustlabError, ValueError) as err:  # bad input: a message, not a traceback
        if args.verbose:
            raise
        print(f"robustlab: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("robustlab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
