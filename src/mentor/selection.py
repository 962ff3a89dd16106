"""Teacher budgets and data selection: which examples the teacher is asked about.

The training set is treated as an **unlabelled pool**. A run with a ``selection`` section
(``selection: {method, budget, every, params}``) pays the teacher for ``params.initial``
examples chosen at random, trains on them, and every ``every`` epochs (or ``"N steps"``) asks
the current student which ``params.per_round`` examples of the rest should be labelled next (the selector, by
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
  exact. An online, served or cached teacher is counted alike: each answer read is a call.
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
from dataclasses import dataclass
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


def on_teacher_device(batch: dict[str, Any], source: Any) -> dict[str, Any]:
    """``batch`` with its tensors on the device of ``source``'s module (as is without one)."""
    module = getattr(source, "module", None)
    if not isinstance(module, nn.Module):
        return batch
    dev = next(module.parameters(), torch.empty(0)).device
    return {k: v.to(dev) if isinstance(v, Tensor) else v for k, v in batch.items()}


def _dense(out: Any, num_classes: int | None) -> Any:
    """A cached teacher's top-k signal as dense log-probabilities over ``num_classes``.

    Classes outside the stored top-k share the stored tail mass equally (exact when the cache
    kept every class, as ``mentor cache`` does for up to ``--top-k`` classes).
    """
    from mentor.signals import TopK

    if not isinstance(out, TopK):
        return out
    k = out.indices.shape[-1]
    v = int(num_classes or int(out.indices.max()) + 1)
    if k > v:
        raise ValueError(f"cached teacher stores {k} classes per example, the data has {v}")
    rest = out.tail.float() - math.log(max(1, v - k)) if v > k else out.tail.float()
    dense = rest.unsqueeze(-1).expand(*out.tail.shape, v).clone()
    dense.scatter_(-1, out.indices.long(), out.logprobs.float())
    return dense


class WrappedTeacher(TeacherSource):
    """A teacher source around the recipe's own (``inner``), checkpointing its ``owner``'s state.

    Attribute lookups it does not define (``module``, ``head_output``, ...) go to the inner
    source; ``to``/``after_step`` are passed on; :meth:`state_dict` holds the inner source's
    state under ``inner.`` plus ``owner.state()`` (a selection loop's own state).
    """

    def __init__(self, inner: TeacherSource, owner: Any = None) -> None:
        """Wrap ``inner``; ``owner`` (optional) has ``state()`` and ``load_state(state)``."""
        self.inner, self.owner = inner, owner

    def __getattr__(self, name: str) -> Any:
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def to(self, device: torch.device | str) -> WrappedTeacher:
        """Move the inner teacher."""
        self.inner.to(device)
        return self

    def after_step(self, student: nn.Module) -> None:
        """The inner teacher's per-step hook."""
        self.inner.after_step(student)

    def state_dict(self) -> dict[str, Tensor]:
        """The inner teacher's state (``inner.``) and the owner's."""
        state = {f"inner.{k}": v for k, v in self.inner.state_dict().items()}
        if self.owner is not None:
            state.update(self.owner.state())
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore what :meth:`state_dict` saved."""
        inner = {k[6:]: v for k, v in state.items() if k.startswith("inner.")}
        if inner:
            self.inner.load_state_dict(inner)
        if self.owner is not None:
            self.owner.load_state(state)


class BudgetTeacher(WrappedTeacher):
    """Wraps a teacher source: answers paid examples from memory, counts and logs every call.

    ``pay(ids, batches)`` asks the inner teacher about examples not paid yet (at most the
    remaining budget), keeps their outputs (dense class logits) and appends them to the labels
    file. Called on a batch, it answers from what was paid; examples never paid (held-out
    evaluation) go to the inner teacher and are counted in ``eval_calls``.
    """

    def __init__(self, inner: TeacherSource, budget: int) -> None:
        """``inner``: the recipe's teacher source; ``budget``: teacher calls allowed."""
        super().__init__(inner)
        self.budget = int(budget)
        self.order: list[int] = []  # paid example ids, in the order they were paid
        self.store: dict[int, Tensor] = {}
        self.prepaid: dict[int, Tensor] = {}  # read back from a killed run's labels file
        self.calls = 0  # teacher calls made by this process (prepaid answers are free)
        self.eval_calls = 0
        self.log_path: Path | None = None
        # self.owner: the Selection using this teacher (its state is checkpointed)

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
            out = self.inner(on_teacher_device(fetch(chunk), self.inner)).logits
            out = _dense(out, getattr(self.owner, "num_classes", None))
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

    def state_dict(self) -> dict[str, Tensor]:
        """The paid ids and outputs (checkpointed with the inner teacher's own state)."""
        state = super().state_dict()
        if self.order:
            state["selection.ids"] = torch.tensor(self.order, dtype=torch.long)
            state["selection.logprobs"] = torch.stack([self.store[i] for i in self.order])
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore what :meth:`state_dict` saved."""
        self.order, self.store = [], {}
        super().load_state_dict(state)
        if "selection.ids" in state:
            for i, row in zip(state["selection.ids"].tolist(), state["selection.logprobs"]):
                self.order.append(int(i))
                self.store[int(i)] = row.float()


class _Paid(Dataset):
    """The examples trained on this round: their own label where kept, else the teacher's."""

    def __init__(self, base: Dataset, positions: list[int], labels: list[int]) -> None:
        self.base, self.positions, self.labels = base, positions, labels

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = dict(self.base[self.positions[i]])
        item["labels"] = torch.tensor(self.labels[i], dtype=torch.long)
        return item


@dataclass(frozen=True)
class Method:
    """How a selection method picks what to pay for and what to train on.

    ``acquire``: ``"random"``, ``"scores"`` (the student's :data:`SELECTORS` score, highest
    first), ``"rad"`` (Robust Active Distillation's sampling) or ``"ddk"`` (domain
    proportions). ``train_filter``: a rule over the paid examples' teacher and student outputs
    keeping the ones trained on this round (LLKD, KD³). ``label_free``: no label is ever used.
    ``kd_weight``: the teacher terms' share of the loss follows the paid fraction
    (Distilling the Knowledge in Data Pruning).
    """

    acquire: str = "random"
    train_filter: str | None = None
    label_free: bool = False
    kd_weight: bool = False
    params: tuple[str, ...] = ()
    cite: str = ""


METHODS: dict[str, Method] = {
    "random": Method(cite="uniform sampling"),
    "entropy": Method("scores", cite=SELECTORS.describe("entropy")),
    "margin": Method("scores", cite=SELECTORS.describe("margin")),
    "least_confidence": Method("scores", cite=SELECTORS.describe("least_confidence")),
    "rad": Method(
        "rad",
        cite='Baykal, Trinh, Iliopoulos, Menghani & Vee, "Robust Active Distillation", ICLR '
        "2023: sample informative examples while hedging against the teacher's mistakes",
    ),
    "llkd": Method(
        train_filter="llkd",
        cite='Li et al., "Learning with Less: Knowledge Distillation from Large Language Models '
        'via Unlabeled Data", 2025: train on examples the teacher is sure of and the student is not',
    ),
    "kd3": Method(
        train_filter="kd3",
        cite='Tang et al., "Distribution Shift Matters for Knowledge Distillation with Webly '
        'Collected Images" (KD³), ICCV 2023: keep examples by the combined teacher-student '
        "prediction",
    ),
    "ddk": Method(
        "ddk",
        params=("domain", "smoothing"),
        cite='Liu et al., "DDK: Distilling Domain Knowledge for Efficient Large Language '
        'Models", NeurIPS 2024: sample domains by the student-teacher loss gap',
    ),
    "kd_pruned": Method(
        kd_weight=True,
        cite='Ben-Baruch et al., "Distilling the Knowledge in Data Pruning", 2024: a random '
        "subset with the KD weight tied to the kept fraction",
    ),
    "label_free": Method(
        label_free=True,
        cite='Cui et al., "Beyond Self-Supervision: A Simple Yet Effective Network Distillation '
        'Alternative to Improve Backbones" (SSLD), 2021: teacher signals only, no labels',
    ),
}
COMMON_PARAMS = ("initial", "per_round", "pseudo_labels")


def method_names() -> list[str]:
    """The selection methods (``selection.method``)."""
    return sorted(METHODS)


def parse_every(every: int | str) -> tuple[int, str]:
    """``selection.every``: ``N`` or ``"N epochs"`` (rounds every N epochs) or ``"N steps"``."""
    import re

    if isinstance(every, bool):
        every = str(every)
    if isinstance(every, int):
        n, unit = every, "epochs"
    else:
        m = re.fullmatch(r"\s*(\d+)\s*(steps?|epochs?)?\s*", str(every))
        if m is None:
            raise ValueError(
                f'selection.every={every!r}: give a number of epochs (2, "2 epochs") or of '
                'optimizer steps ("200 steps")'
            )
        n, unit = int(m.group(1)), "steps" if (m.group(2) or "").startswith("step") else "epochs"
    if n < 1:
        raise ValueError(f"selection.every={every!r}: must be at least 1")
    return n, unit


def _shuffled(xs: list[int], g: torch.Generator) -> list[int]:
    """``xs`` in a random order drawn from ``g``."""
    return [xs[int(k)] for k in torch.randperm(len(xs), generator=g)]


def _domain_of(item: dict[str, Any], field: str) -> int | None:
    v = item.get(field)
    if v is None:
        return None
    v = int(torch.as_tensor(v).reshape(-1)[0])
    return None if v == -100 else v


class Selection:
    """The selection loop of a run: how many examples each epoch trains on, and which.

    Built by :func:`build_selection` from the ``selection`` section; the engine calls
    :meth:`dataset` at the start of every epoch and :meth:`finish` at the end.
    """

    def __init__(
        self,
        method: str,
        budget: int,
        every: int | str,
        teacher: TeacherSource,
        train_data: Dataset,
        collate: Callable[[list[Any]], dict[str, Any]],
        *,
        initial: int | None = None,
        per_round: int | None = None,
        seed: int = 0,
        batch_size: int = 64,
        val_data: Dataset | None = None,
        gold: bool = False,
        pseudo_labels: bool = True,
        domain: str | None = None,
        smoothing: float | None = None,
        num_classes: int | None = None,
    ) -> None:
        """Check the settings against the pool; nothing is paid until :meth:`dataset`.

        ``gold``: the data keeps some of its own labels (``data.params.labeled``): those
        examples are paid for first and train on their own label. Without it the whole
        training set is an unlabelled pool. ``pseudo_labels``: unlabelled paid examples train
        on the teacher's most likely class (else only teacher terms see them).
        """
        if method not in METHODS:
            from mentor.registry import did_you_mean

            raise ValueError(
                f"unknown selection method {method!r}; registered: {', '.join(method_names())}"
                + did_you_mean(method, method_names())
            )
        self.spec = METHODS[method]
        n = len(train_data)
        if budget < 1:
            raise ValueError(f"selection.budget={budget}: give at least 1 teacher call")
        if budget > n:
            raise ValueError(
                f"selection.budget={budget} is larger than the pool ({n:,} training examples): "
                f"use at most {n:,}"
            )
        self.every, self.unit = parse_every(every)
        self.method, self.seed = method, int(seed)
        self.budget = int(budget)
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
        self.teacher.owner = self
        self.data, self.collate, self.batch_size = train_data, collate, int(batch_size)
        self.val_data = val_data
        self.gold = bool(gold) and not self.spec.label_free
        self.pseudo_labels = bool(pseudo_labels) and not self.spec.label_free
        self.num_classes = num_classes
        items = [train_data[i] for i in range(n)]
        self.ids = [int(it["index"]) for it in items]
        self.labels = [int(torch.as_tensor(it["labels"])) for it in items]
        self.position = {e: p for p, e in enumerate(self.ids)}
        self.domain, self.smoothing = domain, smoothing
        self.domains: list[int | None] | None = None
        self.domain_weights: Tensor | None = None
        if self.spec.acquire == "ddk":
            if not domain:
                raise ValueError(
                    "selection.method=ddk needs selection.params.domain: the field of the "
                    "examples that names their domain (e.g. labels)"
                )
            fields = sorted(items[0]) if items else []
            if items and domain not in items[0]:
                raise ValueError(
                    f"selection.params.domain={domain!r} is not a field of the data's examples; "
                    f"fields: {', '.join(fields)}"
                )
            self.domains = [_domain_of(it, domain) for it in items]
        self.records: list[dict[str, Any]] = []
        self.kept: dict[int, list[int]] = {}  # round -> ids trained on (train filters)
        self.kd3_labels: dict[int, int] = {}  # KD³: this round's combined pseudo-labels
        self.llkd_state: Any = None  # LLKD's moving-average thresholds
        self.min_train = 1  # a round trains on at least this many (the engine: one batch)
        self._logged: set[int] = set()  # rounds whose training subset was recorded

    # ---------------------------------------------------------------- sizes
    def size(self, epoch: int) -> int:
        """Examples paid for (and trained on) in ``epoch``."""
        return min(self.budget, self.initial + self.round_of(epoch) * self.per_round)

    def round_of(self, epoch: int) -> int:
        """The selection round of engine epoch ``epoch``.

        With ``every: N`` (epochs) a round spans N epochs; with ``every: "N steps"`` the engine
        makes each of its epochs one round of N optimizer steps (:meth:`round_batches`).
        """
        return epoch if self.unit == "steps" else epoch // self.every

    def round_batches(self, grad_accum: int) -> int | None:
        """Micro-batches per process in one round (``every: "N steps"``); None: one epoch."""
        return self.every * int(grad_accum) if self.unit == "steps" else None

    def steps(self, epochs: float, per_batch: int, grad_accum: int) -> int:
        """Optimizer steps of ``epochs`` epochs (the data grows between selection rounds)."""
        total = 0.0
        for e in range(math.ceil(epochs)):
            frac = min(1.0, epochs - e)
            total += frac * max(1, self.size(e) // per_batch // grad_accum)
        return max(1, math.ceil(total))

    @property
    def fraction(self) -> float:
        """The share of the pool the budget pays for."""
        return self.budget / max(1, len(self.ids))

    def kd_weight(self) -> float | None:
        """The teacher terms' share of the loss for ``kd_pruned`` (None: weights as written)."""
        if not self.spec.kd_weight:
            return None
        from mentor.selectors import kd_pruned_weight

        return float(kd_pruned_weight(self.fraction))

    # ---------------------------------------------------------------- helpers
    def _fetch(self, ids: list[int]) -> dict[str, Any]:
        return self.collate([self.data[self.position[i]] for i in ids])

    def _outputs(self, model: nn.Module, data: Dataset, positions: list[int]) -> Tensor:
        return outputs_of(model, data, positions, self.collate, self.batch_size)

    def accuracy(self, student: nn.Module) -> float | None:
        """The student's accuracy on the held-out data's own labels (None without it)."""
        if self.val_data is None:
            return None
        return heldout_accuracy(student, self.val_data, self.collate, self.batch_size)

    def _labelled(self, p: int) -> bool:
        return self.gold and self.labels[p] != -100

    def _generator(self, epoch: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + 7919 * epoch + 1)

    def _ddk_weights(self, student: nn.Module) -> Tensor:
        """DDK's domain proportions from the held-out loss gap of student and teacher."""
        from mentor.selectors import ddk_domain_weights

        assert self.domains is not None and self.domain is not None
        d = max((x for x in self.domains if x is not None), default=-1) + 1
        if self.val_data is None or len(self.val_data) == 0 or d == 0:
            return torch.full((max(d, 1),), 1.0 / max(d, 1))
        pos = list(range(len(self.val_data)))
        items = [self.val_data[p] for p in pos]
        dom = torch.tensor([_domain_of(it, self.domain) if self.domain in it else -1
                            for it in items])  # fmt: skip
        gold = torch.stack([torch.as_tensor(it["labels"]) for it in items])
        s_out = self._outputs(student, self.val_data, pos)
        inner = self.teacher.inner
        t_out = torch.cat([inner(on_teacher_device(self.collate(items[lo : lo + 64]), inner))
                           .logits.detach().float().cpu() for lo in range(0, len(items), 64)])  # fmt: skip
        self.teacher.eval_calls += len(items)
        s_loss = torch.nn.functional.cross_entropy(s_out, gold, reduction="none")
        t_loss = torch.nn.functional.cross_entropy(t_out, gold, reduction="none")
        s_d = torch.tensor([float(s_loss[dom == k].mean()) if bool((dom == k).any()) else 1.0
                            for k in range(d)])  # fmt: skip
        t_d = torch.tensor([float(t_loss[dom == k].mean()) if bool((dom == k).any()) else 1.0
                            for k in range(d)])  # fmt: skip
        kw = {} if self.smoothing is None else {"smoothing": float(self.smoothing)}
        self.domain_weights = ddk_domain_weights(s_d, t_d, self.domain_weights, **kw)
        return self.domain_weights

    def _acquire(
        self, epoch: int, student: nn.Module, unpaid: list[int], need: int
    ) -> tuple[list[int], str]:
        """Positions of ``need`` unpaid examples to pay for, and the rule that chose them."""
        g = self._generator(epoch)
        first = self.teacher.spent == 0
        labelled = [p for p in unpaid if self._labelled(p)]
        if labelled:  # the labelled part is paid first: its examples get both signals
            return _shuffled(labelled, g)[:need], "labelled"
        acquire = self.spec.acquire
        if first or acquire == "random":
            return _shuffled(unpaid, g)[:need], "random"
        if acquire == "scores":
            scores = SELECTORS.get(self.method)(self._outputs(student, self.data, unpaid))
            return [unpaid[k] for k in pick(scores, need)], self.method
        if acquire == "rad":
            from mentor.selectors import rad_acquire

            chosen, _w = rad_acquire(self._outputs(student, self.data, unpaid), need, generator=g)
            return [unpaid[k] for k in chosen], self.method
        # ddk: split ``need`` over domains by their weights, then draw within each domain
        assert self.domains is not None
        w = self._ddk_weights(student)
        dom = [self.domains[p] for p in unpaid]
        if self.domain == "labels" and not self.gold or any(x is None for x in dom):
            # a pool without labels: the student's prediction names the domain
            pred = self._outputs(student, self.data, unpaid).argmax(-1).tolist()
            dom = [d if d is not None and self.gold else int(q) for d, q in zip(dom, pred)]
        by: dict[int, list[int]] = {}
        for p, d in zip(unpaid, dom):
            by.setdefault(int(d), []).append(p)
        chosen: list[int] = []
        avail = {d: _shuffled(ps, g) for d, ps in sorted(by.items())}
        while len(chosen) < need and any(avail.values()):
            live = [d for d in avail if avail[d] and d < len(w)] or [d for d in avail if avail[d]]
            probs = torch.tensor([float(w[d]) if d < len(w) else 0.0 for d in live])
            probs = probs if float(probs.sum()) > 0 else torch.ones(len(live))
            d = live[int(torch.multinomial(probs, 1, generator=g))]
            chosen.append(avail[d].pop(0))
        return chosen, self.method

    def _train_filter(self, epoch: int, student: nn.Module, paid: list[int]) -> list[int]:
        """The paid ids this round trains on (LLKD, KD³ keep a subset; others keep all)."""
        name = self.spec.train_filter
        if name is None:
            return paid
        rnd = self.round_of(epoch)  # chosen once per selection round (restored on resume)
        if rnd in self.kept:
            return self.kept[rnd]
        import mentor.selectors as selectors

        pos = [self.position[i] for i in paid]
        t = torch.stack([self.teacher.store[i] for i in paid])
        s = self._outputs(student, self.data, pos)
        if name == "llkd":  # thresholds are moving averages carried across rounds
            if self.llkd_state is None:
                self.llkd_state = selectors.LLKDState()
            keep = selectors.llkd_select(t, s, state=self.llkd_state)
        else:
            keep = selectors.kd3_select(t, s)
            # KD³ trains on the combined prediction's class (kept for this round, checkpointed)
            q = selectors.kd3_combined(t, s)
            self.kd3_labels = dict(zip(paid, q.argmax(-1).tolist()))
        keep = keep.bool().tolist()
        out = [i for i, k, p in zip(paid, keep, pos) if k or self._labelled(p)]
        if len(out) < self.min_train:  # too few pass for one batch: the teacher's surest join
            conf = t.max(-1).values
            rest = [paid[j] for j in torch.sort(-conf, stable=True).indices.tolist()
                    if paid[j] not in set(out)]  # fmt: skip
            out = out + rest[: self.min_train - len(out)]
        self.kept = {rnd: out}
        return out

    def _label(self, i: int) -> int:
        p = self.position[i]
        if self._labelled(p):
            return self.labels[p]
        if self.pseudo_labels and i in self.kd3_labels:
            return self.kd3_labels[i]
        return int(self.teacher.store[i].argmax()) if self.pseudo_labels else -100

    def dataset(self, epoch: int, student: nn.Module, step: int) -> Dataset:
        """The paid examples of ``epoch``, paying for the ones this epoch adds first."""
        need = self.size(epoch) - self.teacher.spent
        rec: dict[str, Any] | None = None
        if need > 0:
            unpaid = [p for p, e in enumerate(self.ids) if e not in self.teacher.store]
            chosen, by = self._acquire(epoch, student, unpaid, need)
            acc = self.accuracy(student) if self.teacher.spent else None
            before = self.teacher.spent
            self.teacher.pay([self.ids[p] for p in chosen], self._fetch)
            picked = self.teacher.order[before:]
            per_class: dict[int, int] = {}
            for i in picked:
                c = int(self.teacher.store[i].argmax())
                per_class[c] = per_class.get(c, 0) + 1
            rec = {
                "kind": "selection", "step": step + 1, "epoch": epoch,
                "round": self.round_of(epoch), "by": by,
                "picked": len(picked), "teacher_calls": self.teacher.spent,
                "val_accuracy_before": acc,
                "picked_per_class": {str(k): v for k, v in sorted(per_class.items())},
                "picked_labelled": sum(self._labelled(self.position[i]) for i in picked),
            }  # fmt: skip
            if self.domains is not None and self.domain != "labels":
                per_dom: dict[str, int] = {}
                for i in picked:
                    d = self.domains[self.position[i]]
                    key = "?" if d is None else str(d)
                    per_dom[key] = per_dom.get(key, 0) + 1
                rec["picked_per_domain"] = dict(sorted(per_dom.items()))
                if self.domain_weights is not None:
                    rec["domain_weights"] = [round(float(x), 6) for x in self.domain_weights]
        paid = self.teacher.order[: self.size(epoch)]
        train = self._train_filter(epoch, student, paid)
        rnd = self.round_of(epoch)
        if self.spec.train_filter is not None and (rec is not None or rnd not in self._logged):
            rec = rec or {"kind": "selection", "step": step + 1, "epoch": epoch,
                          "by": self.method, "picked": 0, "teacher_calls": self.teacher.spent}  # fmt: skip
            rec["trained_on"] = len(train)
        if rec is not None:
            self._logged.add(rnd)
            self.records.append(rec)
        labels = [self._label(i) for i in train]
        return _Paid(self.data, [self.position[i] for i in train], labels)

    def state(self) -> dict[str, Tensor]:
        """What resume needs beyond the paid set: this epoch's training subset, DDK weights."""
        out: dict[str, Tensor] = {}
        for e, ids in self.kept.items():
            out["selection.kept_round"] = torch.tensor([e], dtype=torch.long)
            out["selection.kept"] = torch.tensor(ids, dtype=torch.long)
        if self.domain_weights is not None:
            out["selection.domain_weights"] = self.domain_weights.clone()
        if self.kd3_labels:
            out["selection.kd3_labels"] = torch.tensor(sorted(self.kd3_labels.items()))
        st = self.llkd_state
        if st is not None and st.teacher_class is not None:
            out["selection.llkd.scalars"] = torch.tensor(
                [st.teacher_confidence, st.student_uncertainty, float(st.rounds)],
                dtype=torch.float64,
            )
            out["selection.llkd.teacher_class"] = st.teacher_class.clone()
            out["selection.llkd.student_class"] = st.student_class.clone()
        return out

    def load_state(self, state: dict[str, Tensor]) -> None:
        """Restore :meth:`state`."""
        if "selection.kept" in state:
            e = int(state["selection.kept_round"][0])
            self.kept = {e: [int(i) for i in state["selection.kept"].tolist()]}
            self._logged.add(e)
        if "selection.domain_weights" in state:
            self.domain_weights = state["selection.domain_weights"].float()
        if "selection.kd3_labels" in state:
            self.kd3_labels = {int(i): int(c) for i, c in state["selection.kd3_labels"].tolist()}
        if "selection.llkd.scalars" in state:
            from mentor.selectors import LLKDState

            a, b, r = state["selection.llkd.scalars"].tolist()
            self.llkd_state = LLKDState(
                teacher_confidence=a, teacher_class=state["selection.llkd.teacher_class"],
                student_uncertainty=b, student_class=state["selection.llkd.student_class"],
                rounds=int(r),
            )  # fmt: skip

    def drain(self) -> list[dict[str, Any]]:
        """Records of the rounds since the last call (the engine logs them)."""
        out, self.records = self.records, []
        return out

    def summary(self, student: nn.Module) -> dict[str, Any]:
        """``selection.json``: settings, calls and the accuracy-vs-teacher-calls curve."""
        per_class: dict[str, int] = {}
        for i in self.teacher.order:
            c = str(int(self.teacher.store[i].argmax()))
            per_class[c] = per_class.get(c, 0) + 1
        out = {
            "method": self.method,
            "why": self.spec.cite,
            "budget": self.budget,
            "every": self.every,
            "every_unit": self.unit,
            "initial": self.initial,
            "per_round": self.per_round,
            "pool": len(self.ids),
            "labelled": sum(self._labelled(p) for p in range(len(self.ids))),
            "teacher_calls": self.teacher.spent,
            "calls_this_process": self.teacher.calls,
            "eval_calls": self.teacher.eval_calls,
            "paid_per_class": dict(sorted(per_class.items(), key=lambda kv: int(kv[0]))),
            "final_val_accuracy": self.accuracy(student),
            "labels_file": LABELS_FILE,
        }
        if self.spec.kd_weight:
            out["kd_weight"] = self.kd_weight()
        if self.domain_weights is not None:
            out["domain_weights"] = [round(float(x), 6) for x in self.domain_weights]
        return out


def build_selection(
    cfg: Any,
    teacher: TeacherSource | None,
    train_data: Dataset,
    collate: Callable[[list[Any]], dict[str, Any]],
    val_data: Dataset | None,
    task: str,
    info: Any = None,
) -> Selection | None:
    """The run's :class:`Selection` from ``cfg.selection`` (None when the recipe has none).

    DDK on language-model data is :func:`mentor.domain_mixing.build_domain_mixture` (the
    assembly picks it).
    """
    sc = getattr(cfg, "selection", None)
    if sc is None:
        return None
    if teacher is None:
        raise ValueError("selection needs a teacher to pay for labels: set teacher.builder")
    if task != "classification":
        raise ValueError(
            f"selection (teacher budgets) supports classification data, and method ddk on "
            f"language-model data; this run's task is {task!r} with method {sc.method!r}"
        )
    if sc.budget is None:
        raise ValueError(
            "selection.budget is required: the number of teacher calls allowed on the pool"
        )
    spec = METHODS.get(sc.method)
    allowed = (*COMMON_PARAMS, *(spec.params if spec else ()))
    p = dict(sc.params)
    unknown = sorted(set(p) - set(allowed))
    if unknown:
        raise ValueError(
            f"selection.params: unknown key(s) {unknown}; valid for {sc.method}: "
            f"{', '.join(allowed)}"
        )
    for k in ("initial", "per_round"):
        if k in p and (isinstance(p[k], bool) or not isinstance(p[k], int) or p[k] < 1):
            raise ValueError(f"selection.params.{k}={p[k]!r}: use a positive integer")
    if "pseudo_labels" in p and not isinstance(p["pseudo_labels"], bool):
        raise ValueError(f"selection.params.pseudo_labels={p['pseudo_labels']!r}: true or false")
    if "smoothing" in p and (
        isinstance(p["smoothing"], bool) or not isinstance(p["smoothing"], (int, float))
        or not 0 <= p["smoothing"] < 1
    ):  # fmt: skip
        raise ValueError(f"selection.params.smoothing={p['smoothing']!r}: a number in [0, 1)")
    extra = getattr(info, "extra", {}) or {}
    return Selection(
        sc.method, sc.budget, sc.every, teacher, train_data, collate,
        initial=p.get("initial"), per_round=p.get("per_round"), seed=cfg.train.seed,
        batch_size=cfg.eval.batch_size, val_data=val_data, gold="labeled" in extra,
        pseudo_labels=p.get("pseudo_labels", True), domain=p.get("domain"),
        smoothing=p.get("smoothing"), num_classes=getattr(info, "num_classes", None),
    )  # fmt: skip
