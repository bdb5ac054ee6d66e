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


def _cmd_eval(args: argparse.Namespace) -> int:
    from robustlab.data import load_dataset
    from robustlab.evaluate import clean_accuracy
    from robustlab.io import META_FILE, load, read_json, write_json

    run = Path(args.run)
    model = load(run, device=args.device)
    meta = read_json(run / META_FILE)["data"]
    data = load_dataset(meta["name"], args.split, meta.get("root"), **meta.get("options", {}))
    if args.n:
        data = data.subset(args.n)
    acc = clean_accuracy(model, data, batch_size=args.batch_size)
    result = {"split": args.split, "n": len(data), "clean_accuracy": acc}
    write_json(run / "eval.json", result)
    print(f"run             {run}")
    print(f"data            {meta['name']} {args.split} ({len(data)} images)")
    print(f"clean accuracy  {100 * acc:.2f}%")
    print(f"written         {run / 'eval.json'}")
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    from robustlab.data import DATASETS
    from robustlab.models import MODELS
    from robustlab.nn import ACTIVATIONS
    from robustlab.train import RECIPES

    registry = {
        "models": MODELS,
        "datasets": DATASETS,
        "recipes": RECIPES,
        "activations": ACTIVATIONS,
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

    p = sub.add_parser("eval", help="evaluate a trained run")
    p.add_argument("run", help="run directory")
    p.add_argument("--split", default="test", choices=["train", "test"])
    p.add_argument("--n", type=int, default=0, help="use the first N images (default: all)")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cpu)")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("list", help="list registered models, datasets, recipes or activations")
    p.add_argument("what", choices=["models", "datasets", "recipes", "activations"])
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
