"""Metrics computed on held-out data."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset, default_collate

from mentor.models import model_outputs


def accuracy(logits: Tensor, labels: Tensor) -> float:
    """Share of rows whose arg-max equals the label (labels of -100 are ignored)."""
    keep = labels != -100
    if not keep.any():
        return float("nan")
    return (logits.argmax(-1)[keep] == labels[keep]).float().mean().item()


def agreement(student_logits: Tensor, teacher_logits: Tensor) -> float:
    """Top-1 agreement: share of rows where student and teacher arg-max coincide."""
    return (student_logits.argmax(-1) == teacher_logits.argmax(-1)).float().mean().item()


def perplexity(logits: Tensor, labels: Tensor) -> float:
    """exp of the mean token cross-entropy (labels of -100 are ignored)."""
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1))
    return math.exp(nll.item())


@torch.no_grad()
def predict(model: nn.Module, data: Dataset, batch_size: int = 256) -> tuple[Tensor, Tensor]:
    """Logits and labels of ``model`` over a classification dataset (eval mode, no grad)."""
    was_training = model.training
    model.eval()
    dev = next(model.parameters(), torch.empty(0)).device
    logits, labels = [], []
    for start in range(0, len(data), batch_size):
        batch = default_collate([data[i] for i in range(start, min(len(data), start + batch_size))])
        batch = {k: v.to(dev) if isinstance(v, Tensor) else v for k, v in batch.items()}
        logits.append(model_outputs(model, batch).float().cpu())
        labels.append(batch["labels"].cpu())
    model.train(was_training)
    return torch.cat(logits), torch.cat(labels)


def evaluate_classifier(
    student: nn.Module, data: Dataset, teacher: nn.Module | None = None, batch_size: int = 256
) -> dict[str, Any]:
    """Accuracy (and agreement with the teacher, when given) of a classifier on ``data``."""
    s_logits, labels = predict(student, data, batch_size)
    out: dict[str, Any] = {
        "accuracy": accuracy(s_logits, labels),
        "ce": F.cross_entropy(s_logits, labels, ignore_index=-100).item(),
    }
    if teacher is not None:
        t_logits, _ = predict(teacher, data, batch_size)
        out["agreement"] = agreement(s_logits, t_logits)
        out["teacher_accuracy"] = accuracy(t_logits, labels)
    return out
