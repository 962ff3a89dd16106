"""Teacher budgets and data selection: which examples the teacher is asked about.

The training set is treated as an **unlabelled pool**. A run with a ``selection`` section
(``selection: {method, budget, every, params}``) pays the teacher for ``params.initial``
examples chosen at random, trains on them, and every ``every`` epochs asks the current student
which ``params.per_round`` examples of the rest should be labelled next (the selector, by
``method``), until ``budget`` teacher calls are spent. The student only ever sees examples the
teacher was paid for, and their labels are the teacher's (its argmax; soft terms such as ``kd``
see its full distribution) — the data's own labels of the pool are never used for training.
This is the active loop of Prompt-Guided Knowledge Distillation (Cheng et al., "PGKD:
Prompt-Guided Knowledge Distillation for Text Classification with Large Language Models",
2024): a large LM labels a budget of examples for a small classifier, and the student's most
uncertain examples go back to the teacher.

* **Counted, durable calls.** Every paid example's teacher output is appended to
  ``RUN/teacher_labels.jsonl`` as soon as it arrives (id, label, log-probabilities), so a
  killed run never loses what it paid for: the resumed run reads the file and asks the
  teacher only for what is missing. The paid set is also in every checkpoint, so resume is
  exact.
* **Selectors** (registry :data:`SELECTORS`): ``random``; ``entropy`` (highest predictive
  entropy of the student; Settles, "Active Learning Literature Survey", 2009); ``margin``
  (smallest gap between the student's two most likely classes; Scheffer et al., "Active Hidden
  Markov Models for Information Extraction", 2001); ``least_confidence`` (lowest top
  probability; Culotta & McCallum, "Reducing Labeling Effort for Structured Prediction Tasks",
  2005). Ties go to the earlier example.
* **Record.** Each round is logged to ``metrics.jsonl`` (``kind: selection``: epoch, step,
  teacher calls so far, the student's held-out accuracy at that point, how many examples were
  picked and the teacher's labels of them per class) and summarised in ``RUN/selection.json``:
  the accuracy-vs-teacher-calls curve.

Held-out evaluation during training (``eval.every``) may ask the teacher about held-out
examples; those calls are counted apart (``eval_calls``), not against the budget.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from mentor.registry import Registry
from mentor.teachers.base import TeacherOutput, TeacherSource

SELECTORS: Registry[Callable[[Tensor], Tensor]] = Registry("selector")
LABELS_FILE = "teacher_labels.jsonl"
SUMMARY_FILE = "selection.json"


@SELECTORS.register("random")
def random_scores(logits: Tensor) -> Tensor:
    """Random order (the scores are replaced by a seeded permutation)."""
    return torch.zeros(logits.shape[0])


@SELECTORS.register("entropy")
def entropy_scores(logits: Tensor) -> Tensor:
    """Predictive entropy of the student, ``-sum p log p`` (higher: asked first)."""
    logp = logits.float().log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


@SELECTORS.register("margin")
def margin_scores(logits: Tensor) -> Tensor:
    """Minus the gap between the two most likely classes (smaller gap: asked first)."""
    top = logits.float().softmax(-1).topk(2, dim=-1).values
    return -(top[:, 0] - top[:, 1])


@SELECTORS.register("least_confidence")
def least_confidence_scores(logits: Tensor) -> Tensor:
    """One minus the top probability (lower confidence: asked first)."""
    return 1.0 - logits.float().softmax(-1).max(-1).values


def pick(scores: Tensor, k: int) -> list[int]:
    """Positions of the ``k`` highest scores, ties to the earlier position (stable)."""
    order = torch.sort(-scores.float(), stable=True).indices
    return [int(i) for i in order[:k]]


@torch.no_grad()
def outputs_of(
    model: nn.Module,
    data: Dataset,
    positions: Sequence[int],
    collate: Callable[[list[Any]], dict[str, Any]],
    batch_size: int = 64,
) -> Tensor:
    """``model``'s outputs (eval mode, on CPU) for the examples at ``positions`` of ``data``."""
    from mentor.models import model_outputs

    was = model.training
    model.eval()
    dev = next(model.parameters()).device
    out = []
    for lo in range(0, len(positions), batch_size):
        batch = collate([data[p] for p in positions[lo : lo + batch_size]])
        batch = {k: v.to(dev) if isinstance(v, Tensor) else v for k, v in batch.items()}
        out.append(model_outputs(model, batch).float().cpu())
    model.train(was)
    return torch.cat(out) if out else torch.empty(0)


def heldout_accuracy(
    model: nn.Module,
    data: Dataset,
    collate: Callable[[list[Any]], dict[str, Any]],
    batch_size: int = 64,
) -> float | None:
    """Accuracy of ``model`` on ``data``'s own labels (None for empty data)."""
    if len(data) == 0:
        return None
    pos = list(range(len(data)))
    pred = outputs_of(model, data, pos, collate, batch_size).argmax(-1)
    gold = torch.stack([torch.as_tensor(data[p]["labels"]) for p in pos])
    return float((pred == gold).float().mean())


class BudgetTeacher(TeacherSource):
    """Wraps a teacher source: answers paid examples from memory, counts and logs every call.

    ``pay(ids, batches)`` asks the inner teacher about examples not paid yet (at most the
    remaining budget), keeps their outputs (dense class logits) and appends them to the labels
    file. Called on a batch, it answers from what was paid; examples never paid (held-out
    evaluation) go to the inner teacher and are counted in ``eval_calls``.
    """

    def __init__(self, inner: TeacherSource, budget: int) -> None:
        """``inner``: the recipe's teacher source; ``budget``: teacher calls allowed."""
        self.inner, self.budget = inner, int(budget)
        self.order: list[int] = []  # paid example ids, in the order they were paid
        self.store: dict[int, Tensor] = {}
        self.prepaid: dict[int, Tensor] = {}  # read back from a killed run's labels file
        self.calls = 0  # teacher calls made by this process (prepaid answers are free)
        self.eval_calls = 0
        self.log_path: Path | None = None

    def __getattr__(self, name: str) -> Any:  # module, head_output, ... of the inner source
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    @property
    def spent(self) -> int:
        """Teacher calls paid so far (this run and the runs it resumes)."""
        return len(self.order)

    def open_log(self, path: Path, resume: bool) -> None:
        """Append paid outputs to ``path``; on resume, read the ones already there."""
        from mentor._jsonl import complete_lines

        self.log_path = path
        if not resume:
            return
        for line in complete_lines(path)[0]:  # a torn last line (killed mid-write) is dropped
            rec = json.loads(line)
            self.prepaid[int(rec["index"])] = torch.tensor(rec["logprobs"], dtype=torch.float32)

    def pay(self, ids: Sequence[int], fetch: Callable[[list[int]], dict[str, Any]]) -> int:
        """Pay for ``ids`` (in order, until the budget is spent); returns how many were paid.

        ``fetch(ids)`` collates those examples into a batch for the inner teacher.
        """
        todo = [i for i in ids if i not in self.store][: max(0, self.budget - self.spent)]
        ask = [i for i in todo if i not in self.prepaid]
        got: dict[int, Tensor] = {i: self.prepaid[i] for i in todo if i in self.prepaid}
        step = 64
        for lo in range(0, len(ask), step):
            chunk = ask[lo : lo + step]
            out = self.inner(fetch(chunk)).logits
            if not isinstance(out, Tensor) or out.dim() != 2:
                raise ValueError(
                    "selection needs a teacher whose signal is one row of class logits per "
                    f"example (a classification teacher); got {type(out).__name__}"
                    + (f" of shape {tuple(out.shape)}" if isinstance(out, Tensor) else "")
                )
            out = out.detach().float().log_softmax(-1).cpu()
            self.calls += len(chunk)
            lines = []
            for i, row in zip(chunk, out):
                got[i] = row
                rec = {"index": i, "label": int(row.argmax()), "logprobs": row.tolist()}
                lines.append(json.dumps(rec) + "\n")
            if self.log_path is not None:
                with open(self.log_path, "a") as f:
                    f.write("".join(lines))
                    f.flush()
        for i in todo:
            self.store[i] = got[i]
            self.order.append(i)
        return len(todo)

    def __call__(self, batch: dict[str, Any]) -> TeacherOutput:
        """The paid outputs of the batch's examples (held-out ones: ask the inner teacher)."""
        ids = [int(i) for i in batch["index"]]
        if all(i in self.store for i in ids):
            dev = batch["labels"].device if isinstance(batch.get("labels"), Tensor) else "cpu"
            return TeacherOutput(logits=torch.stack([self.store[i] for i in ids]).to(dev))
        self.eval_calls += len(ids)
        return self.inner(batch)

    def to(self, device: torch.device | str) -> BudgetTeacher:
        """Move the inner teacher."""
        self.inner.to(device)
        return self

    def after_step(self, student: nn.Module) -> None:
        """The inner teacher's per-step hook."""
        self.inner.after_step(student)

    def state_dict(self) -> dict[str, Tensor]:
        """The paid ids and outputs (checkpointed with the inner teacher's own state)."""
        state = {f"inner.{k}": v for k, v in self.inner.state_dict().items()}
        if self.order:
            state["selection.ids"] = torch.tensor(self.order, dtype=torch.long)
            state["selection.logprobs"] = torch.stack([self.store[i] for i in self.order])
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore what :meth:`state_dict` saved."""
        inner = {k[6:]: v for k, v in state.items() if k.startswith("inner.")}
        if inner:
            self.inner.load_state_dict(inner)
        self.order, self.store = [], {}
        if "selection.ids" in state:
            for i, row in zip(state["selection.ids"].tolist(), state["selection.logprobs"]):
                self.order.append(int(i))
                self.store[int(i)] = row.float()


class _Paid(Dataset):
    """The paid examples of the pool, labelled by the teacher (its most likely class)."""

    def __init__(self, base: Dataset, positions: list[int], labels: list[int]) -> None:
        self.base, self.positions, self.labels = base, positions, labels

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = dict(self.base[self.positions[i]])
        item["labels"] = torch.tensor(self.labels[i], dtype=torch.long)
        return item


class Selection:
    """The selection loop of a run: how many examples each epoch trains on, and which.

    Built by :func:`build_selection` from the ``selection`` section; the engine calls
    :meth:`dataset` at the start of every epoch and :meth:`finish` at the end.
    """

    def __init__(
        self,
        method: str,
        budget: int,
        every: int,
        teacher: TeacherSource,
        train_data: Dataset,
        collate: Callable[[list[Any]], dict[str, Any]],
        *,
        initial: int | None = None,
        per_round: int | None = None,
        seed: int = 0,
        batch_size: int = 64,
        val_data: Dataset | None = None,
    ) -> None:
        """Check the settings against the pool; nothing is paid until :meth:`dataset`."""
        SELECTORS.get(method)  # a clear error for an unknown method
        n = len(train_data)
        if budget < 1:
            raise ValueError(f"selection.budget={budget}: give at least 1 teacher call")
        self.method, self.every, self.seed = method, int(every), int(seed)
        self.budget = min(int(budget), n)
        self.initial = min(
            int(initial if initial is not None else max(1, budget // 4)), self.budget
        )
        self.per_round = int(per_round if per_round is not None else self.initial)
        if self.initial < 1 or self.per_round < 1:
            raise ValueError(
                f"selection.params.initial={self.initial} and per_round={self.per_round} must be "
                "at least 1"
            )
        self.teacher = BudgetTeacher(teacher, self.budget)
        self.data, self.collate, self.batch_size = train_data, collate, int(batch_size)
        self.val_data = val_data
        self.ids = [int(train_data[i]["index"]) for i in range(n)]
        self.position = {e: p for p, e in enumerate(self.ids)}
        self.records: list[dict[str, Any]] = []

    def size(self, epoch: int) -> int:
        """Examples paid for (and trained on) in ``epoch``."""
        return min(self.budget, self.initial + (epoch // self.every) * self.per_round)

    def steps(self, epochs: float, per_batch: int, grad_accum: int) -> int:
        """Optimizer steps of ``epochs`` epochs (the data grows between selection rounds)."""
        total = 0.0
        for e in range(math.ceil(epochs)):
            frac = min(1.0, epochs - e)
            total += frac * max(1, self.size(e) // per_batch // grad_accum)
        return max(1, math.ceil(total))

    def _fetch(self, ids: list[int]) -> dict[str, Any]:
        return self.collate([self.data[self.position[i]] for i in ids])

    def _outputs(self, model: nn.Module, data: Dataset, positions: list[int]) -> Tensor:
        return outputs_of(model, data, positions, self.collate, self.batch_size)

    def accuracy(self, student: nn.Module) -> float | None:
        """The student's accuracy on the held-out data's own labels (None without it)."""
        if self.val_data is None:
            return None
        return heldout_accuracy(student, self.val_data, self.collate, self.batch_size)

    def dataset(self, epoch: int, student: nn.Module, step: int) -> Dataset:
        """The paid examples of ``epoch``, paying for the ones this epoch adds first."""
        need = self.size(epoch) - self.teacher.spent
        if need > 0:
            unpaid = [p for p, e in enumerate(self.ids) if e not in self.teacher.store]
            if self.teacher.spent == 0 or self.method == "random":
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + 7919 * epoch + 1)
                order = [unpaid[int(k)] for k in torch.randperm(len(unpaid), generator=g)]
                chosen = order[:need]
                by = "random"
            else:
                scores = SELECTORS.get(self.method)(self._outputs(student, self.data, unpaid))
                chosen = [unpaid[k] for k in pick(scores, need)]
                by = self.method
            acc = self.accuracy(student) if self.teacher.spent else None
            before = self.teacher.spent
            self.teacher.pay([self.ids[p] for p in chosen], self._fetch)
            picked = self.teacher.order[before:]
            per_class: dict[int, int] = {}
            for i in picked:
                c = int(self.teacher.store[i].argmax())
                per_class[c] = per_class.get(c, 0) + 1
            self.records.append(
                {
                    "kind": "selection", "step": step + 1, "epoch": epoch, "by": by,
                    "picked": len(picked), "teacher_calls": self.teacher.spent,
                    "val_accuracy_before": acc,
                    "picked_per_class": {str(k): v for k, v in sorted(per_class.items())},
                }
            )  # fmt: skip
        paid = self.teacher.order[: self.size(epoch)]
        labels = [int(self.teacher.store[i].argmax()) for i in paid]
        return _Paid(self.data, [self.position[i] for i in paid], labels)

    def drain(self) -> list[dict[str, Any]]:
        """Records of the rounds since the last call (the engine logs them)."""
        out, self.records = self.records, []
        return out

    def summary(self, student: nn.Module) -> dict[str, Any]:
        """``selection.json``: settings, calls and the accuracy-vs-teacher-calls curve."""
        return {
            "method": self.method,
            "budget": self.budget,
            "every": self.every,
            "initial": self.initial,
            "per_round": self.per_round,
            "pool": len(self.ids),
            "teacher_calls": self.teacher.spent,
            "calls_this_process": self.teacher.calls,
            "eval_calls": self.teacher.eval_calls,
            "final_val_accuracy": self.accuracy(student),
            "labels_file": LABELS_FILE,
        }


def build_selection(
    cfg: Any,
    teacher: TeacherSource | None,
    train_data: Dataset,
    collate: Callable[[list[Any]], dict[str, Any]],
    val_data: Dataset | None,
    task: str,
) -> Selection | None:
    """The run's :class:`Selection` from ``cfg.selection`` (None when the recipe has none)."""
    sc = getattr(cfg, "selection", None)
    if sc is None:
        return None
    if teacher is None:
        raise ValueError("selection needs a teacher to pay for labels: set teacher.builder")
    if task != "classification":
        raise ValueError(
            f"selection (teacher budgets) supports classification data; this run's task is {task!r}"
        )
    if cfg.teacher.source == "cache":
        raise ValueError(
            "selection with teacher.source=cache: a cache has already paid for every example; "
            "use the online (or served) teacher so that only the selected examples are paid for"
        )
    p = dict(sc.params)
    unknown = sorted(set(p) - {"initial", "per_round"})
    if unknown:
        raise ValueError(f"selection.params: unknown key(s) {unknown}; valid: initial, per_round")
    for k in ("initial", "per_round"):
        if k in p and (isinstance(p[k], bool) or not isinstance(p[k], int) or p[k] < 1):
            raise ValueError(f"selection.params.{k}={p[k]!r}: use a positive integer")
    return Selection(
        sc.method, sc.budget, sc.every, teacher, train_data, collate,
        initial=p.get("initial"), per_round=p.get("per_round"), seed=cfg.train.seed,
        batch_size=cfg.eval.batch_size, val_data=val_data,
    )  # fmt: skip
