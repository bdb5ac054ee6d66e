"""The ``robustlab`` command line: a thin front end, every command is a library call.

robustlab train CONFIG.yaml [--set key=value ...] [--resume | --overwrite | --extend]
robustlab eval RUN [--attacks A,B --eps E1,E2] [--split test] [--n N]
robustlab compare RUN RUN ... --eps E1,E2
robustlab certify RUN [--radii R1,R2]
robustlab transfer RUN RUN ... --eps E --out matrix.json
robustlab detect RUN --squeezer bitdepth:bits=1 --squeezer median:size=2 --eps E1,E2
robustlab attack RUN --attack pgd --eps E --out adv.npz
robustlab list models|datasets|recipes|activations|attacks|defenses

Bad input ends in one line on stderr (``robustlab: error: ...``) and exit status 2; every
command that writes into a run directory holds its lock, so two writers never mix.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from robustlab import __version__
from robustlab.errors import ConfigError
from robustlab.io import load_run_data

log = logging.getLogger("robustlab")


def _cmd_train(args: argparse.Namespace) -> int:
    from robustlab.config import load_config
    from robustlab.train import Trainer

    overrides = list(args.set or [])
    if args.out_dir:
        overrides.append(f"out_dir={args.out_dir}")
    if args.tensorboard:
        overrides.append("tensorboard=true")
    cfg = load_config(args.config, overrides)
    trainer = Trainer(cfg, resume=args.resume, overwrite=args.overwrite, extend=args.extend)
    run_dir = trainer.fit()
    if trainer.dist.is_main:
        from robustlab.io import Run

        final = Run(run_dir).meta_section("final")
        acc = final.get("test_acc")
        print(f"run       {run_dir}")
        if acc is not None:
            print(f"test acc  {100 * acc:.2f}%  (clean, {len(trainer.test_data)} images)")
        if "selected_epoch" in final:
            print(
                f"saved     epoch {final['selected_epoch']}: best {final['selected_by']} "
                f"{100 * final['selected_score']:.2f}% on {cfg.data.val_size} held-out images"
            )
        if "teacher_test_acc" in final:
            print(f"teacher   {100 * final['teacher_test_acc']:.2f}% test acc (clean)")
    return 0


def _split_floats(text: str | None, what: str = "--eps") -> list[float]:
    from robustlab.config import parse_number

    if not text:
        return []
    return [parse_number(v, what) for v in text.split(",") if v.strip()]


def _cmd_eval(args: argparse.Namespace) -> int:
    """``robustlab eval``; under torchrun the points are sharded over the processes
    (rank 0 prints and writes, every rank attacks its share)."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return _eval(args, None)
    from robustlab.train.distributed import init_distributed, local_rank, resolve_device

    if args.corruptions:
        raise ConfigError("--corruptions is not sharded: run it in one process (without torchrun)")
    device = resolve_device(args.device or "cpu", local_rank())
    args.device = str(device)
    dist = init_distributed(device)
    try:
        return _eval(args, dist)
    finally:
        dist.close()


def _eval(args: argparse.Namespace, dist) -> int:
    import contextlib

    from robustlab.evaluate import clean_accuracy, evaluate
    from robustlab.io import EVAL_FILE, EVAL_STATE_FILE, TEACHER_STATE_FILE, Run, load

    main = dist is None or dist.is_main
    say = print if main else (lambda *a, **k: None)
    sharded = {"distributed": dist is not None}
    run = Run(args.run).require()
    eps = _split_floats(args.eps)
    if args.transfer_from and not eps:
        raise ConfigError("--transfer-from needs --eps (the budgets to attack the sources at)")
    sources = [Run(s).require() for s in args.transfer_from or []]  # checked before any work
    teacher = _teacher_run(run) if args.teacher else None
    if teacher is not None and not eps:
        raise ConfigError("--teacher needs --eps (the budgets to attack both models at)")
    model = _defended(load(run.path, device=_device(args.device)), args.defense)
    data, name = load_run_data(run.path, args.split, args.n)
    result: dict = {"split": args.split, "n": len(data)}
    baseline = _corruption_baseline(args, name) if args.corruptions else None
    checks = {"cheap": True, "full": "full", "off": False}[args.checks]
    with run.lock("evaluation") if main else contextlib.nullcontext():
        say(f"run             {run.path}")
        say(f"data            {name} {args.split} ({len(data)} images)")
        if dist is not None:
            say(f"processes       {dist.world_size} (each attacks its share of every stage)")
        if args.corruptions:
            _eval_corruptions(args, run, model, data, name, baseline)
            if not eps:
                return 0
        if not eps:
            result["clean_accuracy"] = clean_accuracy(model, data, batch_size=args.batch_size)
            say(f"clean accuracy  {100 * result['clean_accuracy']:.2f}%")
        else:
            attacks = [a for a in (args.attacks or "quick").split(",") if a]
            state = Path(args.state) if args.state else run.file(EVAL_STATE_FILE)
            report = evaluate(
                model, data, attacks=attacks, eps=eps, norm=args.norm,
                batch_size=args.batch_size, seed=args.seed, state_file=state,
                eot_samples=args.eot_samples, checks=checks, **sharded,
            )  # fmt: skip
            result.update(clean_accuracy=report.clean_accuracy, robust=report.to_dict())
            say(report.table())
            for src in sources:  # black-box: examples made on the source, scored here
                transfer = evaluate(
                    model, data, attacks=attacks, eps=eps, norm=args.norm,
                    batch_size=args.batch_size, seed=args.seed, checks=False,
                    transfer_from=load(src.path, device=_device(args.device)), **sharded,
                )  # fmt: skip
                result.setdefault("transfer", {})[str(src.path)] = transfer.to_dict()
                say(f"transfer from {src.path}:")
                say(transfer.table())
            if teacher is not None:  # the same points, attacks and seed as the student
                report = evaluate(
                    load(teacher.path, device=_device(args.device)), data, attacks=attacks,
                    eps=eps, norm=args.norm, batch_size=args.batch_size, seed=args.seed,
                    state_file=run.file(TEACHER_STATE_FILE), eot_samples=args.eot_samples,
                    checks=checks, **sharded,
                )  # fmt: skip
                result["teacher"] = {
                    "run": str(teacher.path),
                    "parameters": run.meta()["teacher"].get("parameters"),
                    "clean_accuracy": report.clean_accuracy,
                    "robust": report.to_dict(),
                }
                result["parameters"] = sum(p.numel() for p in model.parameters())
                say(f"teacher {teacher.path}:")
                say(report.table())
        if not main:
            return 0
        path = run.write_output(EVAL_FILE, result)
    print(f"written         {path}")
    return 0


def _teacher_run(run):
    """The distillation teacher a run recorded (``meta.json``), as a run directory."""
    from robustlab.io import Run

    teacher = run.meta().get("teacher")
    if not teacher:
        raise ConfigError(f"--teacher: {run.path} was not trained from a teacher")
    source = Path(teacher.get("path") or teacher["source"])
    if not Run(source).is_run():
        raise ConfigError(
            f"--teacher: {run.path}'s teacher {teacher['source']} is not a run directory "
            "(a module passed from Python, or moved): evaluate it yourself"
        )
    return Run(source).require()


def _corruption_options(args: argparse.Namespace) -> tuple[list[str] | None, list[int] | None]:
    only = [c for c in (args.only or "").split(",") if c] or None
    values = _split_floats(args.severities) if args.severities else None
    if values is not None and any(v != int(v) for v in values):
        raise ConfigError(f"--severities must be whole numbers, got {args.severities}")
    return only, None if values is None else [int(v) for v in values]


def _corruption_source(args: argparse.Namespace) -> str:
    """The key a corruption report is filed under: generate, mnist-c, or the directory."""
    if args.corruptions in ("generate", "mnist-c"):
        return args.corruptions
    return str(Path(args.corruptions).resolve())


def _corruption_reports(run) -> dict:
    """The run's corruption reports by source (empty when there are none)."""
    from robustlab.io import CORRUPTIONS_FILE

    path = run.file(CORRUPTIONS_FILE)
    if not path.is_file():
        return {}
    try:
        saved = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"cannot read {path}: {err}") from None
    reports = saved.get("reports") if isinstance(saved, dict) else None
    if not isinstance(reports, dict):
        raise ConfigError(
            f"{path} is not a corruption-report file (one report per source under "
            "'reports'); move it aside to evaluate again, nothing was overwritten"
        )
    return saved


def _corruption_baseline(args: argparse.Namespace, data_name: str):
    """The baseline run's report for the same source and data set, or None."""
    if not args.baseline:
        return None
    from robustlab.corruptions import CorruptionReport
    from robustlab.io import CORRUPTIONS_FILE, Run

    base = Run(args.baseline).require()
    saved = _corruption_reports(base)
    source = _corruption_source(args)
    if source not in saved.get("reports", {}):
        raise ConfigError(
            f"{base.path}/{CORRUPTIONS_FILE} has no report for {source}: evaluate the baseline "
            f"first, robustlab eval {base.path} --corruptions {args.corruptions} (same options)"
        )
    if saved.get("data") != data_name:
        raise ConfigError(
            f"the baseline {base.path} was evaluated on {saved.get('data')}, not {data_name}"
        )
    return CorruptionReport.from_dict(saved["reports"][source]), str(base.path)


def _eval_corruptions(args, run, model, data, name, baseline) -> None:
    from robustlab.corruptions import evaluate_corruptions
    from robustlab.io import CORRUPTIONS_FILE

    only, sevs = _corruption_options(args)
    report = evaluate_corruptions(
        model, data, source=args.corruptions, corruptions=only, severities=sevs,
        seed=args.seed, batch_size=args.batch_size, reference_size=args.reference_size,
        baseline=baseline[0] if baseline else None,
        baseline_name=baseline[1] if baseline else "baseline",
    )  # fmt: skip
    print(report.table())
    saved = _corruption_reports(run)
    if saved.get("data", name) != name:
        saved = {}  # reports on another data set are replaced, not mixed
    saved = {"data": name, "reports": {**saved.get("reports", {}),
                                      _corruption_source(args): report.to_dict()}}  # fmt: skip
    path = run.write_output(CORRUPTIONS_FILE, saved)
    kind = {"generate": "imagenet-c", "mnist-c": "mnist-c"}.get(args.corruptions, "files")
    heatmap, curve = (
        run.file(f"corruptions-{kind}.png"),
        run.file(f"corruptions-{kind}-severity.png"),
    )
    report.plot(heatmap, curve)
    print(f"written         {path}, {heatmap.name}, {curve.name}")


def _cmd_detect(args: argparse.Namespace) -> int:
    from robustlab.defenses.detector import SqueezeDetector
    from robustlab.evaluate.clean import model_device
    from robustlab.evaluate.detection import evaluate_detector
    from robustlab.io import DETECT_FILE, Run, load

    run = Run(args.run).require()
    eps = _split_floats(args.eps)
    if not eps:
        raise ConfigError("--eps needs at least one budget, e.g. --eps 0.1,0.3")
    if args.fpr is None or not 0 < args.fpr < 1:
        raise ConfigError(f"--fpr must be in (0, 1), got {args.fpr}")
    model = load(run.path, device=_device(args.device))
    data, name = load_run_data(run.path, args.split, 0)
    if args.fit_n < 1 or args.n < 0:
        raise ConfigError(f"--fit-n must be >= 1 and --n >= 0, got {args.fit_n} and {args.n}")
    n = args.n or max(0, len(data) - args.fit_n)
    if n < 1 or n + args.fit_n > len(data):
        raise ConfigError(
            f"the detector is fitted on clean points held out from those evaluated: --n {n} "
            f"plus --fit-n {args.fit_n} must fit in {name} {args.split} ({len(data)} images)"
        )
    held_out = data.float_images(slice(len(data) - args.fit_n, len(data)))
    detector = SqueezeDetector(model, args.squeezer, batch_size=args.batch_size)
    with run.lock("detector evaluation"):
        print(f"run             {run.path}")
        print(f"data            {name} {args.split}: {n} evaluated, the last {args.fit_n} fit "
              f"the threshold at {args.fpr:g} false positives")  # fmt: skip
        detector.fit(held_out.to(model_device(model)), fpr=args.fpr)
        report = evaluate_detector(
            model, detector, data, eps=eps, norm=args.norm, n=n, steps=args.steps,
            restarts=args.restarts, batch_size=args.batch_size, seed=args.seed,
        )  # fmt: skip
        print(report.table())
        path = run.write_output(
            DETECT_FILE, {"split": args.split, "fit_n": args.fit_n, **report.to_dict()}
        )
    print(f"written         {path}")
    return 0


def _cmd_transfer(args: argparse.Namespace) -> int:
    from robustlab.evaluate.transfer import transfer_matrix
    from robustlab.io import Run, atomic_write_text, load

    eps = _split_floats(args.eps)
    if not eps:
        raise ConfigError("--eps needs at least one budget, e.g. --eps 0.1,0.3")
    runs = [Run(r).require() for r in args.runs]
    names = [r.path.name for r in runs]
    if len(set(names)) != len(names):
        raise ConfigError(f"the runs' directory names must differ (they name the rows): {names}")
    out = Path(args.out)
    png = out.with_suffix(".png")
    existing = [str(p) for p in (out, png) if p.exists()]
    if existing and not args.overwrite:
        raise ConfigError(f"{', '.join(existing)} exists; pass --overwrite to replace it")
    data, name = load_run_data(runs[0].path, args.split, args.n)
    for run in runs[1:]:
        other = run.meta_section("data", "name")["name"]
        if other != name:
            raise ConfigError(f"{run.path} was trained on {other}, {runs[0].path} on {name}")
    models = {n: load(r.path, device=_device(args.device)) for n, r in zip(names, runs)}
    attacks = [a for a in args.attacks.split(",") if a]
    universal = None
    if args.universal:
        if args.universal < 0:
            raise ConfigError(f"--universal must be >= 0 (0: off), got {args.universal}")
        if args.split == "train":
            raise ConfigError(
                "--universal fits on the train split: evaluate on --split test, not the "
                "points the perturbation was fitted on"
            )
        universal, _ = load_run_data(runs[0].path, "train", args.universal)
    matrix = transfer_matrix(
        models, data, attacks=attacks, eps=eps, norm=args.norm, seed=args.seed,
        batch_size=args.batch_size, universal=universal,
    )  # fmt: skip
    print(matrix.table())
    atomic_write_text(out, json.dumps({"data": name, "split": args.split, **matrix.to_dict()}))
    matrix.plot(png)
    print(f"written         {out}, {png}")
    return 0


def _device(name: str | None):
    """The ``--device`` asked for, checked (None: the CPU)."""
    if name is None:
        return None
    from robustlab.train.distributed import resolve_device

    return resolve_device(name)


def _defended(model, specs: list[str] | None):
    """``model`` behind the ``--defense`` specs given on the command line (if any)."""
    if not specs:
        return model
    from robustlab.defenses import defend

    return defend(model, specs)


def _cmd_report(args: argparse.Namespace) -> int:
    from robustlab.report import Options, write_report

    if args.examples < 0:
        raise ConfigError(f"--examples must be >= 0, got {args.examples}")
    transfer = None
    if args.transfer:
        try:
            transfer = json.loads(Path(args.transfer).read_text())
            transfer["names"], transfer["sources"], transfer["accuracy"], transfer["eps"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
            raise ConfigError(
                f"--transfer {args.transfer} is not a `robustlab transfer` result ({err})"
            ) from None
    path = write_report(
        args.runs, args.out,
        Options(examples=args.examples, transfer=transfer, universal=args.universal),
        overwrite=args.overwrite, title=args.title,
    )  # fmt: skip
    print(f"written         {path}")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from robustlab.evaluate import evaluate
    from robustlab.io import COMPARE_STATE_FILE, Run, load

    eps = _split_floats(args.eps)
    if not eps:
        raise ConfigError("--eps needs at least one budget, e.g. --eps 0.1,0.3")
    attacks = [a for a in args.attacks.split(",") if a]
    runs = [Run(r).require() for r in args.runs]  # every run checked before any work
    columns = []
    for run in runs:
        model = load(run.path, device=_device(args.device))
        data, name = load_run_data(run.path, args.split, args.n)
        with run.lock("comparison"):
            report = evaluate(
                model, data, attacks=attacks, eps=eps, norm=args.norm,
                batch_size=args.batch_size, seed=args.seed,
                state_file=run.file(COMPARE_STATE_FILE),
            )  # fmt: skip
        recipe = run.meta_section("recipe", "name")
        columns.append(
            {
                "run": run.path.name,
                "data": name,
                "recipe": recipe["name"],
                "train_seconds": sum(r.get("seconds", 0.0) for r in run.metrics()),
                "accuracy": [report.clean_accuracy] + [r.robust_accuracy for r in report.results],
            }
        )
    width = max(12, *(len(c["run"]) for c in columns))
    labels = ["clean"] + [f"eps {e:g}" for e in sorted(eps)]
    names = sorted({c["data"] for c in columns})
    where = f"{' / '.join(names)} {args.split}, {len(data)} points" + (
        " (the runs use different data sets)" if len(names) > 1 else ""
    )
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
    from robustlab.io import CERTIFIED_PLOT, CERTIFY_FILE, Run, load

    run = Run(args.run).require()
    radii = _split_floats(args.radii, "--radii")
    model = load(run.path, device=_device(args.device))
    data, name = load_run_data(run.path, args.split, args.n)
    with run.lock("certification"):
        bound = lipschitz_bound(model, data.shape, method=args.method)
        print(f"run             {run.path}")
        print(f"data            {name} {args.split} ({len(data)} images)")
        print(bound.table())
        report = certify(
            model, data, radii=radii, kind=args.kind, method=args.method,
            batch_size=args.batch_size, bound=bound if args.kind == "lmt" else None,
        )  # fmt: skip
        print(report.table())
        path = run.write_output(CERTIFY_FILE, _certify_json(bound, report))
        print(f"written         {path}")
        if not args.no_plot:
            from robustlab.evaluate.plots import save_accuracy_curve

            path = save_accuracy_curve(
                {f"{run.path.name} ({args.kind})": report.curve()}, run.file(CERTIFIED_PLOT),
                xlabel="L2 radius (pixel units)", marker=None,
                ylabel="certified accuracy (%)" if report.guaranteed
                else "estimated certified accuracy (%): power iteration, not a guarantee",
            )  # fmt: skip
            print(f"written         {path}")
    return 0


def _certify_json(bound, report) -> dict:
    """certify.json: both reports, an estimate (power iteration) labelled as one."""
    return {"bound": bound.to_dict(), "report": report.to_dict()}


def _cmd_attack(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from robustlab.attacks import lp_norm
    from robustlab.data import to_float
    from robustlab.evaluate.plots import save_adversarial_grid
    from robustlab.evaluate.robustness import AttackSpec
    from robustlab.io import Run, atomic_write, load

    run = Run(args.run).require()
    out = Path(args.out)
    if out.suffix != ".npz":
        raise ConfigError(f"--out must name a .npz file, got {out}")
    if out.is_dir():
        raise ConfigError(f"--out {out} is a directory; name a .npz file")
    png_path = out.with_suffix(".png")
    existing = [p for p in (out, png_path) if p.exists()]
    if existing and not args.overwrite:
        raise ConfigError(
            f"{', '.join(map(str, existing))} already exist(s): pass --overwrite to replace, "
            "or choose another --out"
        )
    model = load(run.path, device=_device(args.device))
    data, _ = load_run_data(run.path, args.split, args.n)
    device = next(model.parameters()).device
    x, y = to_float(data.x).to(device), data.y.to(device)
    torch.manual_seed(args.seed)
    attack = AttackSpec.parse(args.attack).build(model, args.eps, args.norm, args.seed)
    result = attack.run(x, y)
    with torch.no_grad():
        logits_clean, logits_adv = model(x), model(result.x_adv)
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
        x, result.x_adv, y, logits_clean, logits_adv, png_path, data.classes
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
    from robustlab.defenses import DEFENSES
    from robustlab.models import MODELS
    from robustlab.nn import ACTIVATIONS
    from robustlab.train import RECIPES

    registry = {
        "models": MODELS,
        "datasets": DATASETS,
        "recipes": RECIPES,
        "activations": ACTIVATIONS,
        "attacks": ATTACKS,
        "defenses": DEFENSES,
    }[args.what]
    width = max(len(n) for n in registry.names())
    for name in registry.names():
        print(f"{name:<{width}}  {registry.summary(name)}".rstrip())
    return 0


def _number(text: str) -> float:
    from robustlab.config import parse_number

    try:
        return parse_number(text, "value")
    except ConfigError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _add_data_args(p: argparse.ArgumentParser) -> None:
    """The options every command that attacks a run's data shares."""
    p.add_argument("--norm", default="linf", choices=["linf", "l2"])
    p.add_argument("--split", default="test", choices=["train", "test"])
    p.add_argument("-n", "--n", type=int, default=0, help="use the first N images (default: all)")
    p.add_argument("--batch-size", type=_positive_int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cpu)")


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
    p.add_argument(
        "--tensorboard", action="store_true",
        help="also log each epoch's metrics as TensorBoard events in the run directory "
        "(needs the tensorboard package; view with tensorboard --logdir runs)",
    )  # fmt: skip
    group = p.add_mutually_exclusive_group()
    group.add_argument(
        "--resume", action="store_true", help="continue from the run's last checkpoint"
    )
    group.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing run directory (deletes the files robustlab wrote there)",
    )
    group.add_argument(
        "--extend",
        action="store_true",
        help="train a run further, to the config's (larger) epochs; the schedule continues "
        "along the longer run's from the step reached",
    )
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("eval", help="clean and robust accuracy of a trained run")
    p.add_argument("run", help="run directory")
    p.add_argument(
        "--attacks",
        help="comma-separated attacks or suites: quick, standard, fast, pgd, apgd-ce, "
        "apgd-t, square, ... with options as pgd:steps=40:restarts=5 (default: quick)",
    )
    p.add_argument(
        "--eps", help="comma-separated budgets in pixel units, e.g. 0.1,0.2,0.3 (none: clean only)"
    )
    p.add_argument("--norm", default="linf", choices=["linf", "l2"])
    p.add_argument("--split", default="test", choices=["train", "test"])
    p.add_argument("-n", "--n", type=int, default=0, help="use the first N images (default: all)")
    p.add_argument("--batch-size", type=_positive_int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--state", help="resumable state file (default: RUN/eval_state.json)")
    p.add_argument(
        "--defense",
        action="append",
        metavar="SPEC",
        help="put an inference defense in front (repeatable, in order), e.g. jpeg:quality=75; "
        "the evaluation is then adaptive (naive, BPDA, EOT, transfer; worst case)",
    )
    p.add_argument(
        "--eot-samples", type=_positive_int, default=10, help="EOT draws for randomized defenses"
    )
    p.add_argument(
        "--transfer-from", nargs="+", metavar="SRC",
        help="also score examples made on these runs (black-box transfer), one table each",
    )  # fmt: skip
    p.add_argument(
        "--teacher", action="store_true",
        help="also evaluate the run's distillation teacher (recorded in its meta.json) on the "
        "same points, attacks and seed; stored under 'teacher' in eval.json",
    )  # fmt: skip
    p.add_argument(
        "--checks", default="cheap", choices=["cheap", "full", "off"],
        help="validity checks: cheap (default; a few passes on 32 points), full (adds an "
        "unbounded attack, FGSM and doubled steps on 64 points), off",
    )  # fmt: skip
    p.add_argument(
        "--corruptions", metavar="SOURCE",
        help="corruption robustness: 'generate' (the 15 ImageNet-C corruptions at the data's "
        "size, cached), 'mnist-c', or a directory of CIFAR-10/100-C, ImageNet-C or MNIST-C "
        "files; writes RUN/corruptions.json and two plots",
    )  # fmt: skip
    p.add_argument("--severities", help="with --corruptions: e.g. 1,3,5 (default: all)")
    p.add_argument("--only", metavar="NAMES", help="with --corruptions: e.g. fog,contrast")
    p.add_argument(
        "--baseline", metavar="RUN",
        help="with --corruptions: CE and mCE against this run's corruptions.json",
    )  # fmt: skip
    p.add_argument(
        "--reference-size", type=_positive_int, default=224,
        help="with --corruptions generate: the image size ImageNet-C's parameters are for "
        "(spatial ones are scaled by size / this; default 224)",
    )  # fmt: skip
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cpu)")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser(
        "detect",
        help="a feature-squeezing detector's ROC and the defended pipeline's accuracy under "
        "naive and adaptive attacks",
    )
    p.add_argument("run", help="run directory")
    p.add_argument(
        "--squeezer",
        action="append",
        required=True,
        metavar="SPEC",
        help="a squeezer (repeatable); Xu et al. use bitdepth:bits=1 and median:size=2 on "
        "MNIST, bitdepth:bits=5 and median:size=2 on CIFAR-10",
    )
    p.add_argument("--eps", required=True, help="comma-separated budgets, e.g. 0.1,0.3")
    p.add_argument("--fpr", type=float, default=0.05, help="false-positive rate (default 0.05)")
    p.add_argument(
        "--fit-n", type=int, default=500,
        help="clean points, from the split's end, that fit the threshold (default 500)",
    )  # fmt: skip
    p.add_argument(
        "-n", "--n", type=int, default=0,
        help="points evaluated, from the split's start (default: all but --fit-n)",
    )  # fmt: skip
    p.add_argument("--steps", type=_positive_int, default=100, help="PGD steps of both attacks")
    p.add_argument("--restarts", type=_positive_int, default=1)
    p.add_argument("--norm", default="linf", choices=["linf", "l2"])
    p.add_argument("--split", default="test", choices=["train", "test"])
    p.add_argument("--batch-size", type=_positive_int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cpu)")
    p.set_defaults(func=_cmd_detect)

    p = sub.add_parser(
        "transfer", help="transfer matrix: examples made on each run, scored on every run"
    )
    p.add_argument("runs", nargs="+", help="run directories (two or more, same data set)")
    p.add_argument("--eps", required=True, help="comma-separated budgets, e.g. 0.1,0.3")
    p.add_argument("--attacks", default="pgd:steps=20", help="attacks run on each source")
    p.add_argument("--out", required=True, help="JSON file to write (and a .png heatmap beside it)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument(
        "--universal", type=int, default=0, metavar="N",
        help="also fit a universal perturbation (radius eps) on each run from the first N "
        "training images: rows RUN/universal (default 0: off)",
    )  # fmt: skip
    _add_data_args(p)
    p.set_defaults(func=_cmd_transfer)

    p = sub.add_parser(
        "report", help="a self-contained HTML (or Markdown, JSON) report of one or more runs"
    )
    p.add_argument("runs", nargs="+", help="run directories")
    p.add_argument("-o", "--out", required=True, help="report.html, report.md or report.json")
    p.add_argument(
        "--transfer", metavar="JSON", help="a `robustlab transfer` result to show as a matrix"
    )
    p.add_argument(
        "--examples", type=int, default=3,
        help="adversarial examples per evaluated run (computed: PGD-20 at the largest eps; "
        "0: none)",
    )  # fmt: skip
    p.add_argument(
        "--universal", action="append", metavar="FILE", default=[],
        help="a universal perturbation saved with UniversalPerturbation.save (repeatable)",
    )  # fmt: skip
    p.add_argument("--title", default="robustlab report")
    p.add_argument("--overwrite", action="store_true", help="replace an existing report file")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("compare", help="clean and robust accuracy of several runs side by side")
    p.add_argument("runs", nargs="+", help="run directories")
    p.add_argument("--attacks", default="quick", help="attacks or suites (default: quick)")
    p.add_argument("--eps", required=True, help="comma-separated budgets, e.g. 0.1,0.2,0.3")
    _add_data_args(p)
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
    p.add_argument("-n", "--n", type=int, default=0, help="use the first N images (default: all)")
    p.add_argument("--batch-size", type=_positive_int, default=500)
    p.add_argument("--device", default=None)
    p.add_argument("--no-plot", action="store_true", help="skip certified.png")
    p.set_defaults(func=_cmd_certify)

    p = sub.add_parser(
        "attack", help="attack a trained run; save adversarial examples and a PNG grid"
    )
    p.add_argument("run", help="run directory")
    p.add_argument("--attack", required=True, help="attack name with options, e.g. pgd:steps=40")
    p.add_argument("--eps", type=_number, required=True, help="budget in pixel units (8/255 works)")
    p.add_argument("--norm", default="linf", choices=["linf", "l2"])
    p.add_argument("--split", default="test", choices=["train", "test"])
    p.add_argument(
        "-n", "--n", type=int, default=16, help="attack the first N images (default: 16)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="adv.npz", help="output .npz (the grid goes beside it as .png)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--device", default=None)
    p.set_defaults(func=_cmd_attack)

    p = sub.add_parser(
        "list", help="list registered models, datasets, recipes, activations or attacks"
    )
    p.add_argument(
        "what", choices=["models", "datasets", "recipes", "activations", "attacks", "defenses"]
    )
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
    except OSError as err:  # unwritable directory, disk full, missing file
        if args.verbose:
            raise
        where = f": {err.filename}" if err.filename else ""
        print(f"robustlab: error: {err.strerror or err}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("robustlab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
