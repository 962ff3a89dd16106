"""Evaluation: task quality, fidelity to the teacher, calibration and cost."""

from mentor.eval.metrics import accuracy, agreement, evaluate_classifier, perplexity

__all__ = ["accuracy", "agreement", "evaluate_classifier", "perplexity"]
