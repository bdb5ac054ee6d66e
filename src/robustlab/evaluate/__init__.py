"""Evaluation: clean accuracy and worst-case robust accuracy over attack ensembles."""

from robustlab.evaluate.clean import clean_accuracy, count_correct
from robustlab.evaluate.detection import DetectionReport, evaluate_detector
from robustlab.evaluate.robustness import SUITES, AttackSpec, EvalReport, evaluate, expand_attacks

__all__ = [
    "SUITES",
    "AttackSpec",
    "DetectionReport",
    "EvalReport",
    "clean_accuracy",
    "count_correct",
    "evaluate",
    "evaluate_detector",
    "expand_attacks",
]
