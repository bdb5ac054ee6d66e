"""Inference-time defenses, each declaring how it must be attacked (EOT, BPDA)."""

from robustlab.defenses.base import (
    DEFENSES,
    DefendedModel,
    Defense,
    bpda_mode,
    create_defense,
    defend,
)

__all__ = ["DEFENSES", "DefendedModel", "Defense", "bpda_mode", "create_defense", "defend"]
