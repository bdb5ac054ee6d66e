"""Evaluation: clean accuracy and worst-case robust accuracy over attack ensembles."""

from robustlab.evaluate.clean import clean_accuracy, count_correct
from robustlab.evaluate.robustness import SUITES, AttackSpec, EvalReport, evaluate, expand_attacks

__all__ = [
    "SUITES",
    "AttackSpec",
    "EvalReport",
    "clean_accuracy",
    "count_correct",
    "evaluate",
    "expand_attacks",
]
