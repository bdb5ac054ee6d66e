"""What a report knows about a run: everything read from its run directory, nothing run.

A :class:`RunData` is built from the files robustlab wrote (``meta.json``,
``config.yaml``, ``metrics.jsonl``, ``eval.json``, ``certify.json``,
``corruptions.json``); a missing file is a missing section, never an error, and a
damaged one is named.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from robustlab import io
from robustlab.errors import ConfigError


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion (Wilson 1927).

    Chosen over the normal approximation because robust accuracies sit near 0 and 1,
    where that one leaves [0, 1]; exact (Clopper-Pearson) intervals need Beta quantiles,
    which neither torch nor the standard library has.
    """
    if n <= 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


@dataclass
class RunData:
    """One run directory's results, as the report shows them."""

    path: Path
    name: str
    meta: dict[str, Any]
    config: dict[str, Any]
    metrics: list[dict[str, Any]]
    eval: dict[str, Any] | None = None
    certify: dict[str, Any] | None = None
    corruptions: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def model(self) -> str:
        spec = self.meta.get("model") or {}
        act = (spec.get("kwargs") or {}).get("act")
        return f"{spec.get('name', '?')}" + (f" ({act})" if act and act != "relu" else "")

    @property
    def recipe(self) -> str:
        recipe = self.meta.get("recipe") or {}
        defenses = self.meta.get("defenses") or []
        return recipe.get("name", "?") + (f" + {', '.join(defenses)}" if defenses else "")

    @property
    def seed(self) -> Any:
        return self.config.get("seed")

    @property
    def train_seconds(self) -> float | None:
        seconds = [r["seconds"] for r in self.metrics if isinstance(r.get("seconds"), (int, float))]
        return sum(seconds) if seconds else None

    @property
    def robust(self) -> dict[str, Any] | None:
        return (self.eval or {}).get("robust")

    def flagged(self) -> list[dict[str, Any]]:
        """The validity checks of its evaluation that did not pass. For a defended model,
        those of the adaptive modes (the naive mode's fire by design: they are what the
        adaptive modes answer), named with their mode."""
        robust = self.robust or {}
        if "modes" in robust:
            return [
                {**c, "name": f"{c['name']} ({mode})"}
                for mode, report in robust["modes"].items()
                if mode not in ("naive", "none")
                for c in ((report.get("validity") or {}).get("checks") or [])
                if c.get("verdict") != "pass"
            ]
        validity = robust.get("validity") or {}
        return [c for c in validity.get("checks", []) if c.get("verdict") != "pass"]

    @property
    def checked(self) -> bool:
        """Whether its evaluation ran the validity checks."""
        robust = self.robust or {}
        reports = robust["modes"].values() if "modes" in robust else [robust]
        return any(r.get("validity") for r in reports)


def _read_json(path: Path) -> Any:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"cannot read {path}: {err}") from None


def load_run(path: str | Path) -> RunData:
    """Read a run directory (refused, with the reason, when it is not one)."""
    run = io.Run(path).require()
    meta = run.meta()
    config_path = run.file(io.CONFIG_FILE)
    config = yaml.safe_load(config_path.read_text()) if config_path.is_file() else {}
    return RunData(
        path=run.path,
        name=run.path.name,
        meta=meta,
        config=config if isinstance(config, dict) else {},
        metrics=run.metrics(),
        eval=_read_json(run.file(io.EVAL_FILE)),
        certify=_read_json(run.file(io.CERTIFY_FILE)),
        corruptions=_read_json(run.file(io.CORRUPTIONS_FILE)),
    )
