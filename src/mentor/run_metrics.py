"""Held-out metrics written to ``RUN/final_metrics.json`` at the end of ``mentor distill``.

classification: accuracy, cross-entropy, teacher accuracy, top-1 agreement;
causal_lm: perplexity of student and teacher, token agreement;
embedding: cosine to the teacher's embeddings, linear-probe accuracy of both embeddings on the
data's labels, and embeddings per second of both (the full report is ``mentor eval``).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset, default_collate

from mentor.data import DataBundle
from mentor.models import model_outputs

Collate = Callable[[list[Any]], dict[str, Any]]


def _batches(data: Dataset, bs: int, collate: Collate, limit: int | None = None) -> Any:
    n = len(data) if limit is None else min(limit, len(data))
    for lo in range(0, n, bs):
        yield collate([data[i] for i in range(lo, min(n, lo + bs))])


@torch.no_grad()
def outputs(
    model: nn.Module, data: Dataset, collate: Collate = default_collate, bs: int = 64
) -> tuple[Tensor, Tensor | None]:
    """Outputs (logits or embeddings) and labels of ``model`` over ``data`` (eval mode)."""
    was = model.training
    model.eval()
    outs, labels = [], []
    for b in _batches(data, bs, collate):
        outs.append(model_outputs(model, b).float())
        if isinstance(b.get("labels"), Tensor):
            labels.append(b["labels"])
    model.train(was)
    return torch.cat(outs), (torch.cat(labels) if labels else None)


@torch.no_grad()
def lm_perplexity(
    model: nn.Module, data: Dataset, collate: Collate = default_collate, bs: int = 8
) -> float:
    """exp(mean next-token cross-entropy) over the masked positions of ``data``."""
    was = model.training
    model.eval()
    nll, count = 0.0, 0
    for b in _batches(data, bs, collate):
        logits = model_outputs(model, b)[:, :-1].float()
        target = b["input_ids"][:, 1:]
        mask = b["attention_mask"][:, 1:].bool()
        ce = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none"
        )
        nll += float(ce[mask.reshape(-1)].sum())
        count += int(mask.sum())
    model.train(was)
    return math.exp(min(nll / max(count, 1), 50.0))


@torch.no_grad()
def lm_agreement(
    student: nn.Module, teacher: nn.Module, data: Dataset, collate: Collate = default_collate
) -> float:
    """Share of masked positions where student and teacher pick the same next token."""
    hits, count = 0, 0
    for b in _batches(data, 8, collate):
        s = model_outputs(student.eval(), b).argmax(-1)
        t = model_outputs(teacher.eval(), b).argmax(-1)
        m = b["attention_mask"].bool()
        hits += int(((s == t) & m).sum())
        count += int(m.sum())
    return hits / max(count, 1)


@torch.no_grad()
def items_per_second(
    model: nn.Module,
    data: Dataset,
    collate: Collate = default_collate,
    batch_size: int = 32,
    repeats: int = 3,
) -> float:
    """Examples per second at ``batch_size`` (median of ``repeats`` after one warm-up)."""
    model.eval()
    batch = collate([data[i] for i in range(min(batch_size, len(data)))])
    n = len(batch["index"])
    model_outputs(model, batch)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model_outputs(model, batch)
        times.append(time.perf_counter() - t0)
    return n / statistics.median(times)


def val_texts(data: Dataset) -> list[str]:
    """The raw texts of a text dataset, in order."""
    texts = getattr(data, "texts", None)
    return list(texts) if texts is not None else [data[i]["texts"] for i in range(len(data))]


def linear_probe(train_x: Any, train_y: Tensor, val_x: Any, val_y: Tensor) -> float:
    """Accuracy of a logistic-regression probe fit on frozen features (dense or sparse)."""
    from sklearn.linear_model import LogisticRegression

    def arr(x: Any) -> Any:
        return x.numpy() if isinstance(x, Tensor) else x

    clf = LogisticRegression(max_iter=2000)
    clf.fit(arr(train_x), train_y.numpy())
    return float((clf.predict(arr(val_x)) == val_y.numpy()).mean())


def final_metrics(
    student: nn.Module, teacher: nn.Module | None, bundle: DataBundle
) -> dict[str, Any]:
    """The task's held-out metrics for the student (and the teacher, when there is one)."""
    collate = bundle.collate or default_collate
    task, val = bundle.info.task, bundle.val
    out: dict[str, Any] = {}
    if task == "classification":
        s, y = outputs(student, val, collate)
        out["student_accuracy"] = float((s.argmax(-1) == y).float().mean())
        out["student_ce"] = float(F.cross_entropy(s, y))
        if teacher is not None:
            t, _ = outputs(teacher, val, collate)
            out["teacher_accuracy"] = float((t.argmax(-1) == y).float().mean())
            out["agreement"] = float((s.argmax(-1) == t.argmax(-1)).float().mean())
    elif task == "causal_lm":
        out["student_perplexity"] = lm_perplexity(student, val, collate)
        if teacher is not None:
            out["teacher_perplexity"] = lm_perplexity(teacher, val, collate)
            out["token_agreement"] = lm_agreement(student, teacher, val, collate)
    elif task == "embedding":
        s_val, y_val = outputs(student, val, collate)
        s_tr, y_tr = outputs(student, bundle.train, collate)
        if y_val is not None:
            out["student_probe_accuracy"] = linear_probe(s_tr, y_tr, s_val, y_val)
            if hasattr(student, "tfidf"):  # the no-teacher baseline: raw TF-IDF features
                out["tfidf_probe_accuracy"] = linear_probe(
                    student.tfidf(val_texts(bundle.train)),
                    y_tr,
                    student.tfidf(val_texts(bundle.val)),
                    y_val,
                )
        out["student_items_per_s"] = items_per_second(student, val, collate)
        if teacher is not None:
            t_val, _ = outputs(teacher, val, collate)
            out["cosine_to_teacher"] = float(F.cosine_similarity(s_val, t_val, dim=-1).mean())
            if y_val is not None:
                t_tr, _ = outputs(teacher, bundle.train, collate)
                out["teacher_probe_accuracy"] = linear_probe(t_tr, y_tr, t_val, y_val)
            out["teacher_items_per_s"] = items_per_second(teacher, val, collate)
    return out


__all__ = [
    "final_metrics",
    "items_per_second",
    "linear_probe",
    "lm_agreement",
    "lm_perplexity",
    "outputs",
]
