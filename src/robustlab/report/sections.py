"""The report's sections: one function each, registered in order.

A section function takes the runs (and the report's options) and returns a
:class:`Section`, or ``None`` when none of the runs has that kind of result. Adding a
kind of result to every report format (HTML, Markdown, JSON) is one new function here.
"""

from __future__ import annotations

import base64
import io as _io
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from robustlab.report.collect import RunData, wilson_interval

#: colour-blind-safe (Okabe & Ito 2008), in the order lines are drawn
PALETTE = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000"]


@dataclass
class Figure:
    caption: str
    png: bytes  #: the image
    alt: str  #: what it shows, for readers who cannot see it

    @property
    def data_uri(self) -> str:
        return "data:image/png;base64," + base64.b64encode(self.png).decode()


@dataclass
class Section:
    """A titled part of the report: a paragraph, a table, figures and their numbers."""

    key: str
    title: str
    text: str = ""
    header: list[str] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    items: list[str] = field(default_factory=list)  #: a bulleted list (warnings)
    data: dict[str, Any] = field(default_factory=dict)  #: the numbers behind it (JSON)


@dataclass
class Options:
    examples: int = 3  #: adversarial examples per run (0: none; the only section that computes)
    transfer: dict[str, Any] | None = None  #: a `robustlab transfer` JSON
    #: universal perturbations saved by ``UniversalPerturbation.save`` (safetensors files)
    universal: list[str] = field(default_factory=list)


SectionFn = Callable[[list[RunData], Options], "Section | None"]
SECTIONS: list[SectionFn] = []


def section(fn: SectionFn) -> SectionFn:
    """Register a section (the report shows them in registration order)."""
    SECTIONS.append(fn)
    return fn


# ----------------------------------------------------------------------------- helpers


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = _io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    _pyplot().close(fig)
    return buf.getvalue()


def _label(ax, xlabel: str, ylabel: str, *, percent: bool = False, legend: int = 8) -> None:
    """Axis labels (with units), a light grid and the legend; 0-100 for percentages."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if percent:
        ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend)


def pct(v: float | None, digits: int = 1) -> str:
    return "–" if v is None else f"{100 * v:.{digits}f}%"


def robust_points(run: RunData) -> list[dict[str, Any]]:
    """Per eps: worst-case accuracy, its Wilson interval, the naive (non-adaptive)
    accuracy for defended models, and the attack that broke the most points (in the
    evaluation's order: each attack counts the points the earlier ones had left)."""
    robust = run.robust
    if not robust:
        return []
    n = int(robust.get("n") or (run.eval or {}).get("n") or 0)
    norm = robust.get("norm", "linf")
    out = []
    if "modes" in robust:  # a defended model: adaptive evaluation (one report per mode)
        naive = robust["modes"].get("naive", {}).get("results", [])
        for i, e in enumerate(robust.get("eps", [])):
            acc = robust["robust_accuracy"][i]
            modes = {
                m: r["results"][i]["robust_accuracy"]
                for m, r in robust["modes"].items()
                if m != "none" and i < len(r.get("results", []))
            }
            out.append(
                {
                    "norm": norm,
                    "eps": e,
                    "accuracy": acc,
                    "ci": wilson_interval(round(acc * n), n),
                    "naive": naive[i]["robust_accuracy"] if i < len(naive) else None,
                    "strongest": min(modes, key=modes.get) if modes else None,
                }
            )
        return out
    for r in robust.get("results", []):
        stages = r.get("stages") or []
        best = max(stages, key=lambda s: s.get("broken", 0), default=None)
        out.append(
            {
                "norm": norm,
                "eps": r["eps"],
                "accuracy": r["robust_accuracy"],
                "ci": wilson_interval(round(r["robust_accuracy"] * n), n),
                "naive": None,
                "strongest": best["attack"] if best and best.get("broken") else None,
            }
        )
    return out


def clean_accuracy(run: RunData) -> float | None:
    if run.eval and run.eval.get("clean_accuracy") is not None:
        return run.eval["clean_accuracy"]
    return (run.meta.get("final") or {}).get("test_acc")


# ----------------------------------------------------------------------------- sections


@section
def summary(runs: list[RunData], opts: Options) -> Section:
    keys = sorted({(p["norm"], p["eps"]) for r in runs for p in robust_points(r)})
    norms = {k[0] for k in keys}
    header = ["run", "model", "recipe", "seed", "points", "clean"]
    header += [f"robust @ {f'{m} ' if len(norms) > 1 else ''}{e:g}" for m, e in keys]
    header += [
        "most breaks (attack order)",
        "naive → adaptive",
        "certified",
        "corruptions",
        "train time",
        "validity",
    ]
    rows, data = [], []
    for run in runs:
        points = {(p["norm"], p["eps"]): p for p in robust_points(run)}
        n = (run.robust or {}).get("n")
        split = (run.eval or {}).get("split")
        where = "–" if n is None else f"{n} {split or ''}".strip()
        if split not in (None, "test"):
            where += " (not the test split)"
        cells = [run.name, run.model, run.recipe, str(run.seed), where, pct(clean_accuracy(run))]
        for key in keys:
            p = points.get(key)
            cells.append(
                "–"
                if p is None
                else f"{pct(p['accuracy'])} [{pct(p['ci'][0], 0)}, {pct(p['ci'][1], 0)}]"
            )
        last = points[max(points, key=lambda k: k[1])] if points else None
        cells.append(
            f"{last['strongest']} (eps {last['eps']:g})" if last and last["strongest"] else "–"
        )
        naive = [p for p in points.values() if p["naive"] is not None]
        cells.append(
            "; ".join(f"{p['eps']:g}: {pct(p['naive'])} → {pct(p['accuracy'])}" for p in naive)
            or "–"
        )
        cells.append(_certified_cell(run))
        cells.append(_corruption_cell(run))
        seconds = run.train_seconds
        cells.append("–" if seconds is None else f"{seconds:.0f} s")
        flags = run.flagged()
        cells.append(
            ", ".join(f"{c['verdict']}: {c['name']}" for c in flags)
            or ("passed" if run.checked else "–")
        )
        rows.append(cells)
        data.append(
            {
                "run": str(run.path),
                "clean": clean_accuracy(run),
                "n": n,
                "robust": points and list(points.values()),
                "train_seconds": seconds,
                "flags": [c["name"] for c in flags],
            }
        )
    return Section(
        "summary",
        "Summary",
        "One row per run. Robust accuracy is the per-point worst case over the evaluation's "
        'attacks, with a 95% Wilson interval over the points evaluated ("points": how many, '
        'from which split); "most breaks" names the attack that broke the most points at the '
        "largest eps, each attack counting what the earlier ones had left (for defended "
        'models: the evaluation mode with the lowest accuracy); "naive → adaptive" is for '
        "defended models (the attack that ignores the defense, then the worst case over "
        "BPDA, EOT and transfer). Nothing here is recomputed: it is read from each run "
        "directory.",
        header=header,
        rows=rows,
        data={"runs": data},
    )


def _certified_cell(run: RunData) -> str:
    report = (run.certify or {}).get("report") or {}
    radii = report.get("radii") or []
    values = report.get("certified_accuracy") or report.get("estimated_certified_accuracy")
    if not radii or not values:
        return "–"
    tag = "" if report.get("guaranteed") else " (estimate)"
    return ", ".join(f"{pct(a)} @ {r:g}" for r, a in zip(radii, values)) + tag


def _corruption_cell(run: RunData) -> str:
    reports = (run.corruptions or {}).get("reports") or {}
    parts = []
    for source, rep in reports.items():
        mean = rep.get("mean_accuracy")
        mce = rep.get("mce")
        label = source if source in ("generate", "mnist-c") else "files"
        parts.append(f"{label}: {pct(mean)} mean" + (f", mCE {pct(mce, 0)}" if mce else ""))
    return "; ".join(parts) or "–"


@section
def accuracy_vs_eps(runs: list[RunData], opts: Options) -> Section | None:
    curves = {r.name: robust_points(r) for r in runs if robust_points(r)}
    if not curves:
        return None
    plt = _pyplot()
    figures, data = [], {}
    for norm in sorted({points[0]["norm"] for points in curves.values()}):  # one plot per norm
        fig, ax = plt.subplots(figsize=(6.4, 4))
        for i, (name, points) in enumerate(curves.items()):
            if points[0]["norm"] != norm:
                continue
            run = next(r for r in runs if r.name == name)
            clean = clean_accuracy(run)
            xs = [0.0] + [p["eps"] for p in points]
            ys = [clean] + [p["accuracy"] for p in points]
            lo = [clean] + [p["ci"][0] for p in points]
            hi = [clean] + [p["ci"][1] for p in points]
            color = PALETTE[i % len(PALETTE)]
            ax.plot(xs, [100 * y for y in ys], marker="o", color=color, label=name)
            ax.fill_between(xs, [100 * v for v in lo], [100 * v for v in hi], color=color,
                            alpha=0.15)  # fmt: skip
            naive = [(p["eps"], p["naive"]) for p in points if p["naive"] is not None]
            if naive:
                ax.plot([0.0] + [e for e, _ in naive], [100 * clean] + [100 * a for _, a in naive],
                        ls="--", color=color, label=f"{name} (naive)")  # fmt: skip
            data[name] = {"norm": norm, "eps": xs, "accuracy": ys, "ci_low": lo, "ci_high": hi,
                          "naive": naive}  # fmt: skip
        _label(ax, f"eps ({norm}, pixel units)", "accuracy (%)", percent=True)
        ax.set_title(f"Worst-case robust accuracy, {norm} (band: 95% interval)")
        fig.tight_layout()
        figures.append(Figure(
            f"Worst-case robust accuracy per {norm} eps; eps 0 is clean accuracy.", _png(fig),
            f"line plot of robust accuracy against {norm} eps, one line per run",
        ))  # fmt: skip
    return Section("accuracy_vs_eps", "Accuracy versus eps", figures=figures, data=data)


@section
def certified(runs: list[RunData], opts: Options) -> Section | None:
    rows = [(r, (r.certify or {}).get("report") or {}) for r in runs if r.certify]
    if not rows:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4))
    data = {}
    for i, (run, rep) in enumerate(rows):
        values = rep.get("certified_accuracy") or rep.get("estimated_certified_accuracy") or []
        radii = rep.get("radii") or []
        tag = "" if rep.get("guaranteed") else " (estimate)"
        ax.plot(
            [0.0, *radii],
            [100 * (rep.get("clean_accuracy") or 0)] + [100 * v for v in values],
            marker="s",
            color=PALETTE[i % len(PALETTE)],
            label=run.name + tag,
        )
        data[run.name] = {
            "radii": radii,
            "certified_accuracy": values,
            "guaranteed": rep.get("guaranteed"),
        }
    _label(ax, "L2 radius (pixel units)", "certified accuracy (%)", percent=True)
    fig.tight_layout()
    return Section(
        "certified",
        "Certified accuracy versus radius",
        "Points whose certified radius (from a proven Lipschitz bound) reaches each radius "
        "and that are classified correctly; radius 0 is clean accuracy.",
        figures=[
            Figure(
                "Certified accuracy per L2 radius.",
                _png(fig),
                "line plot of certified accuracy against radius",
            )
        ],
        data=data,
    )


@section
def training(runs: list[RunData], opts: Options) -> Section | None:
    with_rows = [r for r in runs if r.metrics]
    if not with_rows:
        return None
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.6))
    data = {}
    for i, run in enumerate(with_rows):
        color = PALETTE[i % len(PALETTE)]
        epochs = [r["epoch"] for r in run.metrics]
        loss = [r.get("train_loss") for r in run.metrics]
        ax1.plot(epochs, loss, color=color, marker=".", label=run.name)
        for key, style in (("train_acc", ":"), ("test_acc", "-"), ("val_acc", "--")):
            pts = [(r["epoch"], r[key]) for r in run.metrics if key in r]
            if pts:
                ax2.plot(
                    [p[0] for p in pts],
                    [100 * p[1] for p in pts],
                    ls=style,
                    marker=".",
                    color=color,
                    label=f"{run.name} {key}",
                )
        data[run.name] = run.metrics
    _label(ax1, "epoch", "training loss", legend=7)
    _label(ax2, "epoch", "accuracy (%)", legend=6)
    fig.tight_layout()
    return Section(
        "training",
        "Training curves",
        "From metrics.jsonl: training loss, and accuracy on the training batches (dotted; "
        "adversarial batches for adversarial recipes), the test split (solid) and the "
        "validation split (dashed) where one was held out.",
        figures=[
            Figure(
                "Loss and accuracy per epoch.",
                _png(fig),
                "two line plots: loss and accuracy per epoch for each run",
            )
        ],
        data=data,
    )


@section
def examples(runs: list[RunData], opts: Options) -> Section | None:
    """Adversarial examples: the one section that computes (a PGD-20 on a few points)."""
    if opts.examples <= 0:
        return None
    from robustlab.errors import RobustlabError

    figures, data, skipped = [], {}, []
    for run in runs:
        points = robust_points(run)
        if not points or (run.robust or {}).get("norm", "linf") != "linf":
            continue
        eps = max(p["eps"] for p in points)
        try:
            fig, info = _example_grid(run, eps, opts.examples)
        except (RobustlabError, OSError, ValueError) as err:  # e.g. data read from a path
            skipped.append(f"{run.name}: no examples ({err})")  # relative to elsewhere
            continue
        figures.append(
            Figure(
                f"{run.name}: PGD-20 at L-inf eps {eps:g} on the first {opts.examples} test images "
                "(the perturbation is amplified to the full grey range).",
                _png(fig),
                f"grid of clean, perturbation and adversarial images for {run.name}",
            )
        )
        data[run.name] = info
    if not figures and not skipped:
        return None
    return Section(
        "examples",
        "Adversarial examples",
        "Clean image | perturbation | adversarial image, with the predicted label and its "
        "softmax confidence. Computed for the report (seed 0) and scored on the run's own "
        "model and defenses, attacked adaptively (BPDA through non-differentiable defenses, "
        "EOT over random ones).",
        figures=figures,
        items=skipped,
        data=data,
    )


def _adaptive(model) -> tuple[Any, int]:
    """The model to attack and the EOT draws: through BPDA when a defense is not
    differentiable and over 10 draws when it is random, as the adaptive evaluation does;
    the examples are then scored on the defended model itself."""
    import copy

    from robustlab.defenses import DefendedModel
    from robustlab.evaluate.adaptive import _set_bpda

    if not isinstance(model, DefendedModel):
        return model, 1
    target = model
    if not model.differentiable:
        target = copy.deepcopy(model)
        _set_bpda(target)
    return target, 10 if model.randomized else 1


def _example_grid(run: RunData, eps: float, count: int):
    import torch

    import robustlab as rl
    from robustlab.attacks import PGD

    model = rl.load(run.path)
    data = run.meta.get("data") or {}
    test = rl.load_dataset(
        data.get("name"), "test", data.get("root"), **(data.get("options") or {})
    )
    x, y = test.float_images(slice(0, count)), test.y[:count]
    target, draws = _adaptive(model)
    x_adv = PGD(target, eps=eps, steps=20, seed=0, eot_samples=draws)(x, y)
    with torch.no_grad():
        p_clean, p_adv = model(x).softmax(1), model(x_adv).softmax(1)
    classes = data.get("classes")
    name = (lambda k: str(classes[k])) if classes else str
    plt = _pyplot()
    fig, axes = plt.subplots(count, 3, figsize=(5.4, 1.9 * count), squeeze=False)
    info = []
    for i in range(count):
        delta = x_adv[i] - x[i]
        scale = float(delta.abs().max()) or 1.0
        panels = [
            (
                x[i],
                f"{name(int(p_clean[i].argmax()))} ({p_clean[i].max():.0%}), "
                f"true {name(int(y[i]))}",
            ),
            (0.5 + delta / (2 * scale), f"perturbation x{0.5 / scale:.1f}"),
            (x_adv[i], f"{name(int(p_adv[i].argmax()))} ({p_adv[i].max():.0%})"),
        ]
        for ax, (img, title) in zip(axes[i], panels):
            img = img.detach().clamp(0, 1)
            arr = img[0].numpy() if img.shape[0] == 1 else img.permute(1, 2, 0).numpy()
            ax.imshow(
                arr, cmap="gray" if arr.ndim == 2 else None, vmin=0, vmax=1, interpolation="nearest"
            )
            ax.set_title(title, fontsize=7)
            ax.axis("off")
        info.append(
            {
                "label": int(y[i]),
                "clean_pred": int(p_clean[i].argmax()),
                "adv_pred": int(p_adv[i].argmax()),
                "clean_conf": float(p_clean[i].max()),
                "adv_conf": float(p_adv[i].max()),
            }
        )
    fig.tight_layout()
    return fig, info


@section
def corruptions(runs: list[RunData], opts: Options) -> Section | None:
    from robustlab.corruptions import CorruptionReport

    figures, data = [], {}
    for run in runs:
        for source, saved in ((run.corruptions or {}).get("reports") or {}).items():
            report = CorruptionReport.from_dict(saved)
            if not report.accuracy:
                continue
            what = f"{run.name}, {source}"
            figures.append(Figure(f"{what}: accuracy per corruption and severity.",
                                  _png(report.heatmap_figure()),
                                  f"heatmap of corruption accuracy for {run.name}"))  # fmt: skip
            figures.append(Figure(f"{what}: accuracy versus severity by corruption group.",
                                  _png(report.severity_figure()),
                                  f"accuracy against severity for {run.name}"))  # fmt: skip
            data[f"{run.name}/{source}"] = saved["accuracy"]
    if not figures:
        return None
    return Section("corruptions", "Corruption robustness", figures=figures, data=data)


@section
def transfer(runs: list[RunData], opts: Options) -> Section | None:
    matrix = opts.transfer
    if not matrix:
        return None
    names, sources = matrix["names"], matrix["sources"]
    figures = []
    for i, e in enumerate(matrix["eps"]):
        grid = [[100 * matrix["accuracy"][i][s][t] for t in names] for s in sources]
        plt = _pyplot()
        fig, ax = plt.subplots(figsize=(1.1 * len(names) + 2.5, 0.5 * len(sources) + 1.8))
        im = ax.imshow(grid, cmap="viridis", vmin=0, vmax=100, aspect="auto")
        for r, row in enumerate(grid):
            for c, v in enumerate(row):
                ax.text(
                    c,
                    r,
                    f"{v:.0f}",
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if v < 50 else "black",
                )
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=7)
        ax.set_yticks(range(len(sources)), sources, fontsize=7)
        ax.set_xlabel("target (scored)")
        ax.set_ylabel("source (attacked)")
        fig.colorbar(im, ax=ax, label="robust accuracy (%)")
        ax.set_title(f"eps {e:g}", fontsize=9)
        fig.tight_layout()
        figures.append(
            Figure(
                f"Transfer at eps {e:g}: examples made on the row's model, "
                "scored on the column's; the diagonal is white-box.",
                _png(fig),
                f"transfer matrix heatmap at eps {e:g}",
            )
        )
    return Section("transfer", "Transfer matrix", figures=figures, data=matrix)


@section
def universal(runs: list[RunData], opts: Options) -> Section | None:
    if not opts.universal:
        return None
    from robustlab.errors import ConfigError
    from robustlab.io import load_tensors

    plt = _pyplot()
    fig, axes = plt.subplots(1, len(opts.universal), figsize=(2.6 * len(opts.universal), 2.9),
                             squeeze=False)  # fmt: skip
    data = {}
    for ax, path in zip(axes[0], opts.universal):
        try:
            tensors, meta = load_tensors(path)
            v = tensors["perturbation"].float()
            v = v[0] if v.dim() == 4 else v  # saved with a batch dimension of one
        except (KeyError, OSError, ValueError) as err:
            raise ConfigError(f"{path} is not a saved universal perturbation ({err})") from None
        scale = float(v.abs().max()) or 1.0
        img = (0.5 + v / (2 * scale)).clamp(0, 1)
        arr = img[0].numpy() if img.shape[0] == 1 else img.permute(1, 2, 0).numpy()
        ax.imshow(arr, cmap="gray" if arr.ndim == 2 else None, vmin=0, vmax=1,
                  interpolation="nearest")  # fmt: skip
        history = meta.get("history") or []
        last = history[-1] if history else None
        rate = f", fooling {pct(last)}" if isinstance(last, (int, float)) else ""
        ax.set_title(f"{Path(path).stem}\n{meta.get('norm')} xi {meta.get('xi'):.3g}{rate}",
                     fontsize=8)  # fmt: skip
        ax.axis("off")
        data[str(path)] = {"xi": meta.get("xi"), "norm": meta.get("norm"), "history": history}
    fig.tight_layout()
    return Section(
        "universal", "Universal perturbations",
        "One image-agnostic perturbation per file (Moosavi-Dezfooli et al. 2017), amplified "
        "to the full grey range; the title gives its radius and its last fooling rate on "
        "the data it was fitted on.",
        figures=[Figure("Universal perturbations.", _png(fig), "universal perturbation images")],
        data=data,
    )  # fmt: skip


@section
def validity(runs: list[RunData], opts: Options) -> Section | None:
    items, data = [], {}
    for run in runs:
        flagged = run.flagged()
        for c in flagged:
            step = f" What to do: {c['next_step']}" if c.get("next_step") else ""
            items.append(f"{run.name} — {c['verdict']}, {c['name']}: {c['reason']}.{step}")
        for line in (run.robust or {}).get("warnings") or []:
            items.append(f"{run.name} — {line}")
        data[run.name] = flagged
    checked = [r.name for r in runs if r.checked]
    if not items and not checked:
        return None
    text = (
        "Every warning the evaluations raised, in plain words."
        if items
        else f"The validity checks passed for {', '.join(checked)}."
    )
    return Section("validity", "Validity checks", text, items=items, data=data)
