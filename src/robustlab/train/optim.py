"""Optimisers and learning-rate schedules.

Schedules are pure functions of the global step, so there is no scheduler state to
checkpoint and a resumed run uses exactly the learning rates it would have used.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable

import torch

from robustlab.config import OptimConfig
from robustlab.errors import ConfigError


def build_optimizer(
    cfg: OptimConfig, params: Iterable[torch.nn.Parameter]
) -> torch.optim.Optimizer:
    """SGD (momentum, Nesterov), Adam or AdamW from the config."""
    params = [p for p in params if p.requires_grad]
    if cfg.name == "sgd":
        if cfg.nesterov and cfg.momentum <= 0:
            raise ConfigError("optim.nesterov needs optim.momentum > 0")
        return torch.optim.SGD(
            params,
            lr=cfg.lr,
            momentum=cfg.momentum,
            nesterov=cfg.nesterov,
            weight_decay=cfg.weight_decay,
        )
    if len(cfg.betas) != 2:
        raise ConfigError(f"optim.betas needs two values, got {cfg.betas}")
    cls = torch.optim.Adam if cfg.name == "adam" else torch.optim.AdamW
    return cls(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)


def lr_at(cfg: OptimConfig, step: int, steps_per_epoch: int, total_steps: int) -> float:
    """Learning rate for (0-based) optimisation step ``step``.

    - ``constant``, ``cosine`` (to 0 at the end), ``step`` (times ``gamma`` at each
      milestone epoch), each after an optional linear warm-up of ``warmup_epochs``;
    - ``onecycle``: linear rise from 0 to ``lr`` over ``pct_start`` of training, then
      linear fall to 0 (the cyclic schedule of Wong et al. 2020).
    """
    pos = step + 1  # the rate used for the update that completes step `pos`
    if cfg.schedule == "onecycle":
        peak = max(1.0, cfg.pct_start * total_steps)
        if pos <= peak:
            return cfg.lr * pos / peak
        return cfg.lr * max(0.0, (total_steps - pos) / max(1.0, total_steps - peak))
    warm = cfg.warmup_epochs * steps_per_epoch
    factor = min(1.0, pos / warm) if warm > 0 else 1.0
    if cfg.schedule == "cosine":
        t = (step - warm) / max(1.0, total_steps - warm)
        factor *= 0.5 * (1.0 + math.cos(math.pi * min(1.0, max(0.0, t))))
    elif cfg.schedule == "step":
        factor *= cfg.gamma ** bisect.bisect_right(sorted(cfg.milestones), step / steps_per_epoch)
    return cfg.lr * factor
