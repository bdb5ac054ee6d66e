"""Evaluation: clean accuracy now; robust evaluation arrives with the attacks."""

from robustlab.evaluate.clean import clean_accuracy, count_correct

__all__ = ["clean_accuracy", "count_correct"]
