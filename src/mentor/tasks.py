"""Tasks: what differs between classification, causal LM and embedding distillation.

A task owns three things, and nothing else decides them:

* **which positions count** (``count_positions``: rows for classifiers, attended next-token
  positions for causal LMs) — the engine scales each micro-batch by it, so gradient
  accumulation and multi-process runs average like one big batch;
* **the causal shift** (``loss_view``: logits at position ``t`` predict token ``t+1``);
* **the held-out metrics** (``accumulator``): one streaming implementation serves the
  training-time evaluation, ``final_metrics.json`` and ``mentor eval``.

Tasks are registered by name (``TASKS``); a data source declares its task in ``DataInfo.task``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset, default_collate

from mentor.eval import metrics as M
from mentor.models import model_outputs
from mentor.progress import Progress
from mentor.registry import Registry

TOPK = 5
Predictor = Callable[[dict[str, Any]], Tensor]
Collate = Callable[[list[Any]], dict[str, Any]]


class Accumulator:
    """Streams model outputs batch by batch; ``result()`` gives metrics per model name."""

    def add(self, batch: Mapping[str, Any], outputs: Mapping[str, Tensor]) -> None:
        """Record one batch of outputs (``{"student": logits, "teacher": logits, ...}``)."""
        raise NotImplementedError

    def result(self) -> dict[str, dict[str, Any]]:
        """Metrics per model name (the teacher is the reference for fidelity metrics)."""
        raise NotImplementedError


class Task:
    """Base task. Subclasses set ``name`` and override what differs."""

    name: ClassVar[str] = ""
    per_token: ClassVar[bool] = False
    cross_tokenizer: ClassVar[bool] = False  # teacher and student read their own tokens
    eval_metrics: ClassVar[tuple[str, ...]] = ()  # held-out metrics besides the loss terms

    def loss_view(
        self, logits: Any, teacher_logits: Any, batch: Mapping[str, Any]
    ) -> tuple[Any, Any, Tensor | None, Tensor | None]:
        """(student logits, teacher logits, labels, mask) as the objective sees them."""
        return logits, teacher_logits, batch.get("labels"), None

    def feature_mask(self, batch: Mapping[str, Any], mask: Tensor | None) -> Any:
        """The mask of feature terms on module outputs ("same": ``mask``, the logits' mask)."""
        return "same"

    def teacher_view(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The batch the teacher runs on (the same batch, except for cross-tokenizer data)."""
        return batch

    def model_batch(self, name: str, batch: dict[str, Any]) -> dict[str, Any]:
        """The batch the model called ``name`` in :func:`heldout` runs on."""
        return self.teacher_view(batch) if name == "teacher" else batch

    def xtok_inputs(self, batch: Mapping[str, Any], teacher_logits: Any) -> dict[str, Any] | None:
        """Per-side inputs of cross-tokenizer loss terms (None: this task has none)."""
        return None

    def count_positions(self, batch: Mapping[str, Any]) -> int:
        """Positions a micro-batch contributes to the loss mean."""
        labels = batch.get("labels")
        if isinstance(labels, Tensor):
            return int((labels != -100).sum())
        if "index" in batch:
            return len(batch["index"])
        return len(next(iter(batch.values())))

    def accumulator(self, num_classes: int | None = None) -> Accumulator:
        """A fresh streaming accumulator of this task's held-out metrics."""
        raise NotImplementedError

    def summary(self, res: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
        """The headline numbers of ``final_metrics.json`` from per-model held-out metrics."""
        raise NotImplementedError


TASKS: Registry[type[Task]] = Registry("task")


def get_task(name: str) -> Task:
    """The registered task called ``name`` (did-you-mean error otherwise)."""
    return TASKS.get(name)()


# ----------------------------------------------------------------------------- classification


class _ClassAcc(Accumulator):
    def __init__(self, num_classes: int | None) -> None:
        self.num_classes = num_classes
        self.outs: dict[str, list[Tensor]] = {}
        self.labels: list[Tensor] = []

    def add(self, batch: Mapping[str, Any], outputs: Mapping[str, Tensor]) -> None:
        for name, z in outputs.items():
            self.outs.setdefault(name, []).append(z.detach().float().cpu())
        self.labels.append(batch["labels"].cpu())

    def result(self) -> dict[str, dict[str, Any]]:
        y = torch.cat(self.labels)
        outs = {n: torch.cat(v) for n, v in self.outs.items()}
        t = outs.get("teacher")
        res = {}
        for name, z in outs.items():
            rel = M.reliability(z, y)
            r: dict[str, Any] = {
                "accuracy": M.accuracy(z, y),
                "ce": F.cross_entropy(z, y, ignore_index=-100).item(),
                "macro_f1": M.macro_f1(z, y, self.num_classes),
                "ece": rel["ece"],
                "reliability": rel["curve"],
            }
            if self.num_classes:
                r["confusion"] = M.confusion(z, y, self.num_classes)
            if t is not None:
                r["agreement"] = M.agreement(z, t)
                r["kl_teacher_student"] = M.mean_kl(t, z)
                r[f"top{TOPK}_overlap"] = M.topk_overlap(z, t, TOPK)
            res[name] = r
        return res


@TASKS.register("classification")
class Classification(Task):
    """One label per example; the loss counts rows whose label is not -100."""

    name = "classification"
    eval_metrics = ("accuracy", "agreement")

    def loss_view(
        self, logits: Any, teacher_logits: Any, batch: Mapping[str, Any]
    ) -> tuple[Any, Any, Tensor | None, Tensor | None]:
        """Every row counts for teacher terms; label terms (``ce``) skip rows labelled -100.

        Rows without a label (the unlabelled pool of ``data.params.labeled``) still carry the
        teacher's signal, so the mask is all rows and only the labels mark the missing ones.
        """
        labels = batch.get("labels")
        mask = None
        if isinstance(labels, Tensor) and bool((labels == -100).any()):
            mask = torch.ones(labels.shape, dtype=torch.bool, device=labels.device)
        return logits, teacher_logits, labels, mask

    def count_positions(self, batch: Mapping[str, Any]) -> int:
        """Rows of the micro-batch (labelled or not: teacher terms count them all)."""
        labels = batch.get("labels")
        if isinstance(labels, Tensor):
            return int(labels.shape[0])
        return super().count_positions(batch)

    def accumulator(self, num_classes: int | None = None) -> Accumulator:
        """Accuracy, CE, macro-F1, calibration, confusion, and fidelity to the teacher."""
        return _ClassAcc(num_classes)

    def summary(self, res: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
        """student_accuracy, student_ce, teacher_accuracy, agreement."""
        s = res["student"]
        out = {"student_accuracy": s["accuracy"], "student_ce": s["ce"]}
        if "teacher" in res:
            out["teacher_accuracy"] = res["teacher"]["accuracy"]
            out["agreement"] = s["agreement"]
        return out


# ----------------------------------------------------------------------------- causal LM


class _LMAcc(Accumulator):
    def __init__(self) -> None:
        self.sums: dict[str, dict[str, float]] = {}

    def add(self, batch: Mapping[str, Any], outputs: Mapping[str, Tensor]) -> None:
        ids = batch["input_ids"]
        mask = _target_mask(batch)
        keep = mask if mask is not None else torch.ones_like(ids[:, 1:], dtype=bool)
        keep = keep.to(ids.device)
        y = ids[:, 1:][keep]
        rows = {n: z[:, :-1][keep].float() for n, z in outputs.items()}
        t = rows.get("teacher")
        n = len(y)
        for name, z in rows.items():
            s = self.sums.setdefault(name, {})
            s["tokens"] = s.get("tokens", 0) + n
            s["nll"] = s.get("nll", 0.0) + F.cross_entropy(z, y, reduction="sum").item()
            s["correct"] = s.get("correct", 0.0) + (z.argmax(-1) == y).sum().item()
            if t is not None and n:
                s["agree"] = s.get("agree", 0.0) + M.agreement(z, t) * n
                s["kl"] = s.get("kl", 0.0) + M.mean_kl(t, z) * n
                s["overlap"] = s.get("overlap", 0.0) + M.topk_overlap(z, t, TOPK) * n

    def result(self) -> dict[str, dict[str, Any]]:
        res = {}
        for name, s in self.sums.items():
            n = max(s["tokens"], 1)
            r = {
                "perplexity": math.exp(min(s["nll"] / n, 50.0)),
                "ce": s["nll"] / n,
                "next_token_accuracy": s["correct"] / n,
                "tokens": int(s["tokens"]),
            }
            if "agree" in s:
                r.update(
                    agreement=s["agree"] / n,
                    kl_teacher_student=s["kl"] / n,
                    **{f"top{TOPK}_overlap": s["overlap"] / n},
                )
            res[name] = r
        return res


def _positions(x: Any) -> int:
    """Sequence positions of logits ``[B, T, V]``, a teacher signal or a fused head."""
    hidden = getattr(x, "hidden", None)
    return int((hidden if isinstance(hidden, Tensor) else x).shape[1])


def _target_mask(batch: Mapping[str, Any]) -> Tensor | None:
    """Which next-token targets count: completion tokens when the batch marks them (prompt
    data, generated samples), else every attended token; ``None`` when all count."""
    m = batch.get("completion_mask")
    if m is None:
        m = batch.get("attention_mask")
    return m[:, 1:].bool() if m is not None else None


@TASKS.register("causal_lm")
class CausalLM(Task):
    """Next-token prediction: logits at position t are scored against token t+1 (the shift)."""

    name = "causal_lm"
    per_token = True
    eval_metrics = ("perplexity", "agreement")

    def loss_view(
        self, logits: Any, teacher_logits: Any, batch: Mapping[str, Any]
    ) -> tuple[Any, Any, Tensor | None, Tensor | None]:
        """Drop the last position of both models' logits; labels are the next tokens.

        With prompt data (a ``completion_mask``) only the completion tokens count."""
        mask = _target_mask(batch)
        ids = batch["input_ids"]
        ns = _positions(logits)
        nt = _positions(teacher_logits) if teacher_logits is not None else ns
        n = min(ns, nt)  # a model may return only the last positions' logits (logits_from)
        start = ids.shape[1] - n
        t = teacher_logits[:, nt - n : -1] if teacher_logits is not None else None
        if start > 0 and mask is not None:
            mask = mask[:, start:]
        return logits[:, ns - n : -1], t, ids[:, start + 1 :], mask

    def feature_mask(self, batch: Mapping[str, Any], mask: Tensor | None) -> Tensor | None:
        """Hidden states are not shifted: every attended token counts (None: all of them)."""
        m = batch.get("attention_mask")
        return m.bool() if m is not None else None

    def count_positions(self, batch: Mapping[str, Any]) -> int:
        """Attended next-token positions (the first token of each sequence predicts nothing);
        with prompt data, the completion tokens only."""
        m = _target_mask(batch)
        ids = batch["input_ids"]
        return int(m.sum()) if m is not None else ids.shape[0] * (ids.shape[1] - 1)

    def accumulator(self, num_classes: int | None = None) -> Accumulator:
        """Perplexity, next-token accuracy and token-level fidelity, streamed."""
        return _LMAcc()

    def summary(self, res: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
        """student_perplexity, teacher_perplexity, token_agreement."""
        out = {"student_perplexity": res["student"]["perplexity"]}
        if "teacher" in res:
            out["teacher_perplexity"] = res["teacher"]["perplexity"]
            out["token_agreement"] = res["student"]["agreement"]
        return out


# ----------------------------------------------------------------------------- cross-tokenizer LM


class _XtokLMAcc(Accumulator):
    """Per model: token NLL on its own side's tokens, and bits per byte of the chunk text."""

    def __init__(self) -> None:
        self.sums: dict[str, dict[str, float]] = {}

    def add(self, batch: Mapping[str, Any], outputs: Mapping[str, Tensor]) -> None:
        n_bytes = int(batch["n_bytes"].sum())
        for name, z in outputs.items():
            side = "teacher_" if name == "teacher" else ""
            ids, mask = batch[f"{side}input_ids"], batch[f"{side}attention_mask"]
            keep = mask[:, 1:].bool().to(z.device)
            y = ids[:, 1:].to(z.device)[keep]
            rows = z[:, :-1][keep].float()
            s = self.sums.setdefault(name, {})
            s["tokens"] = s.get("tokens", 0) + len(y)
            s["bytes"] = s.get("bytes", 0) + n_bytes
            s["nll"] = s.get("nll", 0.0) + F.cross_entropy(rows, y, reduction="sum").item()
            s["correct"] = s.get("correct", 0.0) + (rows.argmax(-1) == y).sum().item()

    def result(self) -> dict[str, dict[str, Any]]:
        res = {}
        for name, s in self.sums.items():
            n = max(s["tokens"], 1)
            res[name] = {
                "bits_per_byte": M.bits_per_byte(s["nll"], int(s["bytes"])),
                "perplexity": math.exp(min(s["nll"] / n, 50.0)),
                "ce": s["nll"] / n,
                "next_token_accuracy": s["correct"] / n,
                "tokens": int(s["tokens"]),
                "bytes": int(s["bytes"]),
            }
        return res


@TASKS.register("causal_lm_xtok")
class CrossTokenizerLM(CausalLM):
    """Causal LM distillation across tokenizers (data from ``data.source: xtok_text``).

    The student reads ``input_ids`` and learns its own next tokens (``ce``); the teacher reads
    ``teacher_input_ids`` (:meth:`teacher_view`) of the same text. Both logits are shifted on
    their own side; :meth:`xtok_inputs` gives the ``uld`` / ``gold_hybrid`` terms the teacher's
    labels and mask, both sides' character spans of the predicted tokens and the vocab map.
    Held-out quality is bits per byte of the text (comparable across tokenizers; perplexity is
    per token of each model's own tokenizer).
    """

    name = "causal_lm_xtok"
    cross_tokenizer = True
    eval_metrics = ("bits_per_byte", "perplexity")

    def loss_view(
        self, logits: Any, teacher_logits: Any, batch: Mapping[str, Any]
    ) -> tuple[Any, Any, Tensor | None, Tensor | None]:
        """Student logits ``[:, :-1]`` against its next tokens; teacher logits ``[:, :-1]``."""
        t = teacher_logits[:, :-1] if isinstance(teacher_logits, Tensor) else teacher_logits
        mask = batch["attention_mask"][:, 1:].bool()
        return logits[:, :-1], t, batch["labels"][:, 1:], mask

    def teacher_view(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The teacher's tokens of the batch's text (its ids, mask and example ids)."""
        if "teacher_input_ids" not in batch:
            raise KeyError(
                "a cross-tokenizer batch needs teacher_input_ids (data.source: xtok_text)"
            )
        out = {"input_ids": batch["teacher_input_ids"],
               "attention_mask": batch["teacher_attention_mask"]}  # fmt: skip
        if "index" in batch:
            out["index"] = batch["index"]
        return out

    def xtok_inputs(self, batch: Mapping[str, Any], teacher_logits: Any) -> dict[str, Any]:
        """Shifted teacher labels/mask, spans of the predicted tokens and the vocab map
        (padded with −1 to the teacher logits' V when its output head is larger)."""
        vm = batch.get("vocab_map")
        vt = teacher_logits.shape[-1] if isinstance(teacher_logits, Tensor) else None
        if isinstance(vm, Tensor) and vt is not None and vm.shape[0] < vt:
            vm = torch.cat([vm, vm.new_full((vt - vm.shape[0],), -1)])
        return {
            "teacher_labels": batch["teacher_labels"][:, 1:],
            "teacher_mask": batch["teacher_mask"][:, 1:],
            "student_offsets": batch["student_offsets"][:, 1:],
            "teacher_offsets": batch["teacher_offsets"][:, 1:],
            "vocab_map": vm,
        }

    def accumulator(self, num_classes: int | None = None) -> Accumulator:
        """Bits per byte and per-token perplexity of each model on its own tokens."""
        return _XtokLMAcc()

    def summary(self, res: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
        """student_bits_per_byte, student_perplexity (own tokens), teacher_bits_per_byte,
        teacher_perplexity (own tokens)."""
        s = res["student"]
        out = {"student_bits_per_byte": s["bits_per_byte"], "student_perplexity": s["perplexity"]}
        if "teacher" in res:
            out["teacher_bits_per_byte"] = res["teacher"]["bits_per_byte"]
            out["teacher_perplexity"] = res["teacher"]["perplexity"]
        return out


# ----------------------------------------------------------------------------- embedding


class _EmbAcc(Accumulator):
    def __init__(self) -> None:
        self.outs: dict[str, list[Tensor]] = {}
        self.labels: list[Tensor] = []

    def add(self, batch: Mapping[str, Any], outputs: Mapping[str, Tensor]) -> None:
        for name, z in outputs.items():
            self.outs.setdefault(name, []).append(z.detach().float().cpu())
        if isinstance(batch.get("labels"), Tensor):
            self.labels.append(batch["labels"].cpu())

    def embeddings(self) -> tuple[dict[str, Tensor], Tensor | None]:
        y = torch.cat(self.labels) if self.labels else None
        return {n: torch.cat(v) for n, v in self.outs.items()}, y

    def result(self) -> dict[str, dict[str, Any]]:
        outs, _ = self.embeddings()
        t = outs.get("teacher")
        res: dict[str, dict[str, Any]] = {}
        for name, z in outs.items():
            res[name] = {}
            if t is not None:
                cos = F.cosine_similarity(z, t, dim=-1).mean().item()
                res[name]["cosine_to_teacher"] = cos
        return res


@TASKS.register("embedding")
class Embedding(Task):
    """Sentence embeddings: fidelity is cosine to the teacher; quality a linear probe."""

    name = "embedding"
    eval_metrics = ("cosine_to_teacher",)

    def accumulator(self, num_classes: int | None = None) -> Accumulator:
        """Cosine to the teacher (the linear probe is added by :func:`heldout`)."""
        return _EmbAcc()

    def summary(self, res: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
        """cosine_to_teacher and the probe accuracies of both embeddings."""
        s = res["student"]
        out: dict[str, Any] = {}
        for key, name in (("cosine_to_teacher", "cosine_to_teacher"),
                          ("linear_probe_accuracy", "student_probe_accuracy")):  # fmt: skip
            if key in s:
                out[name] = s[key]
        if "linear_probe_accuracy" in res.get("teacher", {}):
            out["teacher_probe_accuracy"] = res["teacher"]["linear_probe_accuracy"]
        return out


# ----------------------------------------------------------------------------- the one path


def as_predictor(model: nn.Module | Predictor) -> Predictor:
    """A module (run in eval mode on its own device) or a function ``batch -> outputs``."""
    if not isinstance(model, nn.Module):
        return model

    def run(batch: dict[str, Any]) -> Tensor:
        model.eval()
        dev = next(model.parameters(), torch.empty(0)).device
        batch = {k: v.to(dev) if isinstance(v, Tensor) else v for k, v in batch.items()}
        return model_outputs(model, batch)

    return run


def batches(data: Dataset, batch_size: int, collate: Collate | None = None) -> Iterable[Any]:
    """Consecutive batches of ``data`` (the held-out order is the dataset's order)."""
    collate = collate or default_collate
    for lo in range(0, len(data), batch_size):
        yield collate([data[i] for i in range(lo, min(len(data), lo + batch_size))])


@torch.no_grad()
def heldout(
    task: Task | str,
    models: Mapping[str, nn.Module | Predictor],
    data: Dataset,
    *,
    collate: Collate | None = None,
    batch_size: int = 64,
    num_classes: int | None = None,
    train: Dataset | None = None,
    label: str = "evaluate",
    progress: bool = True,
) -> dict[str, dict[str, Any]]:
    """Held-out metrics of every named model on ``data``: the one evaluation path.

    ``models`` maps a name (``teacher`` is the reference for fidelity metrics) to a module or
    a function ``batch -> outputs``. For embeddings, ``train`` (when given) fits a linear
    probe per model on its training-set embeddings.
    """
    task = get_task(task) if isinstance(task, str) else task
    preds = {n: as_predictor(m) for n, m in models.items()}
    mods = [m for m in models.values() if isinstance(m, nn.Module)]
    was = [m.training for m in mods]
    acc = task.accumulator(num_classes)
    n_batches = math.ceil(len(data) / batch_size)
    bar = Progress(n_batches, enabled=progress, label=label, unit="batches")
    try:
        for i, batch in enumerate(batches(data, batch_size, collate)):
            acc.add(batch, {n: p(task.model_batch(n, batch)).cpu() for n, p in preds.items()})
            bar.update(i + 1, {})
        res = acc.result()
        if isinstance(task, Embedding) and train is not None and isinstance(acc, _EmbAcc):
            val_emb, y_val = acc.embeddings()
            if y_val is not None:
                tr = task.accumulator()
                for batch in batches(train, batch_size, collate):
                    tr.add(batch, {n: p(batch).cpu() for n, p in preds.items()})
                tr_emb, y_tr = tr.embeddings()  # type: ignore[attr-defined]
                for name in preds:
                    res[name]["linear_probe_accuracy"] = M.linear_probe(
                        tr_emb[name], y_tr, val_emb[name], y_val
                    )
    finally:
        bar.close()
        for m, w in zip(mods, was):
            m.train(w)
    return res


__all__ = [
    "TASKS",
    "Accumulator",
    "CausalLM",
    "Classification",
    "CrossTokenizerLM",
    "Embedding",
    "Task",
    "as_predictor",
    "get_task",
    "heldout",
]
