"""Metrics computed on held-out data: task quality, fidelity to the teacher, calibration.

Every function takes plain tensors so it can be checked against hand-computed values.
"""

from __future__ import annotations

import math
from collections.abc import Callable
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


def macro_f1(logits: Tensor, labels: Tensor, num_classes: int | None = None) -> float:
    """Unweighted mean over classes of the F1 score (scikit-learn's ``average='macro'``)."""
    from sklearn.metrics import f1_score

    keep = labels != -100
    y, p = labels[keep].numpy(), logits.argmax(-1)[keep].numpy()
    classes = list(range(num_classes)) if num_classes else None
    return float(f1_score(y, p, average="macro", labels=classes, zero_division=0))


def agreement(student_logits: Tensor, teacher_logits: Tensor) -> float:
    """Top-1 agreement: share of rows where student and teacher arg-max coincide."""
    return (student_logits.argmax(-1) == teacher_logits.argmax(-1)).float().mean().item()


def topk_overlap(student_logits: Tensor, teacher_logits: Tensor, k: int = 5) -> float:
    """Mean share of the teacher's top-k classes that are also in the student's top-k."""
    k = min(k, student_logits.shape[-1])
    s = student_logits.topk(k, dim=-1).indices
    t = teacher_logits.topk(k, dim=-1).indices
    hits = (t.unsqueeze(-1) == s.unsqueeze(-2)).any(-1).float().sum(-1)
    return (hits / k).mean().item()


def mean_kl(teacher_logits: Tensor, student_logits: Tensor) -> float:
    """Mean over rows of KL(p_teacher ‖ p_student) at temperature 1 (nats)."""
    lt = F.log_softmax(teacher_logits.float(), -1)
    ls = F.log_softmax(student_logits.float(), -1)
    return (lt.exp() * (lt - ls)).sum(-1).mean().item()


def bits_per_byte(nll_nats: float, n_bytes: int) -> float:
    """Bits per UTF-8 byte of text: total NLL in nats / ln 2 / bytes (NaN without bytes).

    Independent of the tokenizer, so models with different vocabularies compare on the same
    text (the measure of Gao et al., "The Pile: An 800GB Dataset of Diverse Text for Language
    Modeling", 2020). ``nll_nats`` must cover every token of the text.
    """
    return nll_nats / math.log(2) / n_bytes if n_bytes > 0 else float("nan")


def perplexity(logits: Tensor, labels: Tensor) -> float:
    """exp of the mean token cross-entropy (labels of -100 are ignored)."""
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1))
    return math.exp(nll.item())


def reliability(logits: Tensor, labels: Tensor, n_bins: int = 15) -> dict[str, Any]:
    """Expected calibration error and the reliability curve over ``n_bins`` equal-width bins.

    Confidence = max softmax probability; bin b holds confidences in (b/n, (b+1)/n] (the first
    bin includes 0). ECE = Σ_b (|B_b|/N)·|acc(B_b) − conf(B_b)| (Guo et al., "On Calibration of
    Modern Neural Networks", 2017).
    """
    keep = labels != -100
    probs = F.softmax(logits[keep].float(), -1)
    conf, pred = probs.max(-1)
    correct = (pred == labels[keep]).float()
    n = len(conf)
    edges = torch.linspace(0, 1, n_bins + 1)
    ids = torch.clamp(torch.bucketize(conf, edges[1:-1], right=False), 0, n_bins - 1)
    ece = 0.0
    curve = []
    for b in range(n_bins):
        sel = ids == b
        cnt = int(sel.sum())
        if cnt:
            acc_b, conf_b = correct[sel].mean().item(), conf[sel].mean().item()
            ece += cnt / n * abs(acc_b - conf_b)
            curve.append({"bin": b, "confidence": conf_b, "accuracy": acc_b, "count": cnt})
        else:
            curve.append({"bin": b, "confidence": None, "accuracy": None, "count": 0})
    return {"ece": ece, "bins": n_bins, "curve": curve}


def confusion(logits: Tensor, labels: Tensor, num_classes: int) -> list[list[int]]:
    """Confusion matrix: rows = true class, columns = predicted class."""
    keep = labels != -100
    m = torch.zeros(num_classes, num_classes, dtype=torch.long)
    for y, p in zip(labels[keep].tolist(), logits.argmax(-1)[keep].tolist()):
        m[y, p] += 1
    return m.tolist()


def linear_probe(train_x: Any, train_y: Tensor, val_x: Any, val_y: Tensor) -> float:
    """Accuracy of a logistic-regression probe fit on frozen features (dense or sparse)."""
    from sklearn.linear_model import LogisticRegression

    def arr(x: Any) -> Any:
        return x.numpy() if isinstance(x, Tensor) else x

    clf = LogisticRegression(max_iter=2000)
    clf.fit(arr(train_x), train_y.numpy())
    return float((clf.predict(arr(val_x)) == val_y.numpy()).mean())


@torch.no_grad()
def predict(
    model: nn.Module,
    data: Dataset,
    batch_size: int = 256,
    collate: Callable[[list[Any]], dict[str, Any]] = default_collate,
) -> tuple[Tensor, Tensor]:
    """Outputs and labels of ``model`` over a dataset (eval mode, no grad, on CPU)."""
    was_training = model.training
    model.eval()
    dev = next(model.parameters(), torch.empty(0)).device
    outs, labels = [], []
    for start in range(0, len(data), batch_size):
        batch = collate([data[i] for i in range(start, min(len(data), start + batch_size))])
        batch = {k: v.to(dev) if isinstance(v, Tensor) else v for k, v in batch.items()}
        outs.append(model_outputs(model, batch).float().cpu())
        if "labels" in batch:
            labels.append(batch["labels"].cpu())
    model.train(was_training)
    return torch.cat(outs), (torch.cat(labels) if labels else torch.empty(0))


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


def paired_gain(
    correct_a: Tensor, correct_b: Tensor, *, n_boot: int = 2000, seed: int = 0
) -> dict[str, Any]:
    """Accuracy of A minus accuracy of B on the same examples, with a 95% bootstrap interval.

    ``correct_a``/``correct_b``: boolean ``[N]`` (is each held-out example right). The
    interval resamples the examples with replacement (paired: both models on the same draw,
    ``n_boot`` draws, percentile interval; Efron & Tibshirani, "An Introduction to the
    Bootstrap", 1993). Returns ``gain`` (in accuracy units), ``ci95`` ``[low, high]``, ``n`` and
    ``significant`` (the interval excludes 0).
    """
    a, b = correct_a.float().reshape(-1), correct_b.float().reshape(-1)
    if a.shape != b.shape or a.numel() == 0:
        raise ValueError(
            f"paired_gain needs two equal, non-empty [N] vectors; got {tuple(a.shape)} and "
            f"{tuple(b.shape)}"
        )
    d = a - b
    n = d.numel()
    g = torch.Generator().manual_seed(seed)
    draws = torch.randint(0, n, (n_boot, n), generator=g)
    means = d[draws].mean(1).sort().values
    lo = float(means[int(0.025 * (n_boot - 1))])
    hi = float(means[int(math.ceil(0.975 * (n_boot - 1)))])
    return {
        "gain": float(d.mean()),
        "ci95": [lo, hi],
        "n": n,
        "significant": bool(lo > 0 or hi < 0),
    }
