"""Figures: adversarial-example grids and accuracy-versus-epsilon curves (matplotlib, Agg)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _image(t: torch.Tensor):
    t = t.detach().cpu().float().clamp(0, 1)
    return t[0].numpy() if t.shape[0] == 1 else t.permute(1, 2, 0).numpy()


def save_adversarial_grid(
    x: torch.Tensor,
    x_adv: torch.Tensor,
    y: torch.Tensor,
    logits_clean: torch.Tensor,
    logits_adv: torch.Tensor,
    path: str | Path,
    classes: Sequence[str] | None = None,
    max_rows: int = 8,
) -> Path:
    """Rows of clean | perturbation (amplified to the full range) | adversarial.

    Titles give the true label, and the predicted label with its softmax confidence.
    """
    plt = _pyplot()
    rows = min(max_rows, x.shape[0])
    name = (lambda k: classes[k]) if classes else str
    p_clean, p_adv = logits_clean.softmax(1), logits_adv.softmax(1)
    fig, axes = plt.subplots(rows, 3, figsize=(6.6, 2.2 * rows), squeeze=False)
    for i in range(rows):
        delta = (x_adv[i] - x[i]).detach().cpu().float()
        scale = float(delta.abs().max()) or 1.0
        panels = [
            (
                _image(x[i]),
                f"clean: {name(int(p_clean[i].argmax()))} ({p_clean[i].max():.0%})\n"
                f"true {name(int(y[i]))}",
            ),
            (
                _image(0.5 + delta / (2 * scale)),
                f"perturbation x{0.5 / scale:.1f}\nmax {scale:.3f}",
            ),
            (
                _image(x_adv[i]),
                f"adversarial: {name(int(p_adv[i].argmax()))} ({p_adv[i].max():.0%})",
            ),
        ]
        for ax, (img, title) in zip(axes[i], panels):
            ax.imshow(
                img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1, interpolation="nearest"
            )
            ax.set_title(title, fontsize=8)
            ax.axis("off")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def save_accuracy_curve(
    curves: dict[str, list[tuple[float, float]]],
    path: str | Path,
    norm: str = "linf",
    xlabel: str | None = None,
    marker: str | None = "o",
    ylabel: str = "accuracy (%)",
) -> Path:
    """Robust (or certified) accuracy versus epsilon, one line per model or attack."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for label, points in curves.items():
        ax.plot([p[0] for p in points], [100 * p[1] for p in points], marker=marker, label=label)
    ax.set_xlabel(xlabel or f"eps ({norm}, pixel units)")
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
