"""DDK's domain re-weighting for language-model distillation (``selection.method: ddk`` on LM data).

DDK (Liu et al., "DDK: Distilling Domain Knowledge for Efficient Large Language Models",
NeurIPS 2024) samples the distillation data by domain, in proportion to how far the student
trails the teacher on each domain: every K steps it measures each domain's held-out
perplexity of both models, turns the ratio into sampling proportions
(:func:`mentor.selectors.ddk_domain_weights`, factor-smoothed) and draws the next K steps'
training blocks from those proportions.

Here a run's data needs a ``domain`` field per block (``lm_text`` with ``domains: true``:
the BBC topic, or the folder of each file). With ``selection: {method: ddk, every: "N steps"}``
each round of N optimizer steps trains on ``N x batch_size x grad_accum`` blocks drawn with
replacement: the domain from the current proportions, the block uniformly within it (seeded
per round). The proportions of round 0 come from the untrained student (the paper's Eq. 1);
later rounds use the smoothed update (Eq. 2, ``params.smoothing``, default the paper's 0.5).
The proportions of the current round are checkpointed, so a resumed run draws the same blocks.

Each round is logged (``kind: selection``: the proportions, each domain's held-out
perplexity of the student and the teacher, blocks drawn per domain) and summarised in
``RUN/selection.json`` with the final per-domain perplexities, their mean and the worst.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import Dataset

from mentor.selection import WrappedTeacher, on_teacher_device, parse_every
from mentor.teachers.base import TeacherOutput, TeacherSource

CITE = (
    "DDK (Liu et al., 'DDK: Distilling Domain Knowledge for Efficient Large Language Models', "
    "2024): domains sampled in proportion to the student/teacher held-out perplexity ratio"
)
PARAMS = ("domain", "smoothing", "eval_blocks")


@dataclass
class _Spec:  # what the engine reads of a selection method
    label_free: bool = False
    train_filter: None = None
    cite: str = CITE


class _CountingTeacher(WrappedTeacher):
    """The run's teacher, answering every batch; counts calls and checkpoints the mixture."""

    def __init__(self, inner: TeacherSource, owner: DomainMixture) -> None:
        super().__init__(inner, owner)
        self.calls = 0
        self.eval_calls = 0

    def open_log(self, path: Any, resume: bool) -> None:
        """Nothing to log per call: every training block is a teacher call."""

    def __call__(self, batch: dict[str, Any]) -> TeacherOutput:
        self.calls += int(batch["input_ids"].shape[0])
        return self.inner(batch)


class _Blocks(Dataset):
    def __init__(self, base: Dataset, positions: list[int]) -> None:
        self.base, self.positions = base, positions

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.base[self.positions[i]]


def _domains_of(data: Dataset, field: str, what: str) -> list[int]:
    out = []
    for i in range(len(data)):  # type: ignore[arg-type]
        item = data[i]
        if field not in item:
            raise ValueError(
                f"selection.params.domain={field!r} is not a field of the {what} blocks (fields: "
                f"{', '.join(sorted(item))}); lm_text gives one with data.params.domains=true"
            )
        out.append(int(torch.as_tensor(item[field])))
    return out


def token_loss(logits: Tensor, input_ids: Tensor, mask: Tensor | None = None) -> Tensor:
    """Summed next-token cross-entropy per row and the token counts (``[B]``, ``[B]``)."""
    lp = F.log_softmax(logits[:, :-1].float(), -1)
    nll = -lp.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    m = torch.ones_like(nll) if mask is None else mask[:, 1:].to(nll.dtype)
    return (nll * m).sum(-1), m.sum(-1)


class DomainMixture:
    """DDK's per-round domain proportions and the blocks each round trains on (LM data)."""

    unit = "steps"

    def __init__(
        self,
        every: int | str,
        teacher: TeacherSource,
        train_data: Dataset,
        collate: Callable[[list[Any]], dict[str, Any]],
        val_data: Dataset | None,
        *,
        domain: str | None,
        names: list[str] | None = None,
        smoothing: float | None = None,
        eval_blocks: int = 16,
        batch_size: int = 8,
        seed: int = 0,
        budget: int | None = None,
    ) -> None:
        """Check the data (a domain per block, held-out blocks of every domain)."""
        self.every, unit = parse_every(every)
        if unit != "steps":
            raise ValueError(
                f"selection.every={every!r}: DDK on language-model data re-weights the domains "
                'every N optimizer steps; give selection.every as "N steps"'
            )
        if not domain:
            raise ValueError(
                "selection.method=ddk needs selection.params.domain: the field of the blocks that "
                "names their domain (lm_text with data.params.domains=true gives 'domain')"
            )
        if val_data is None or len(val_data) == 0:  # type: ignore[arg-type]
            raise ValueError(
                "selection.method=ddk measures each domain's held-out perplexity: the data needs "
                "a held-out split (data.val_fraction > 0)"
            )
        self.spec = _Spec()
        self.method, self.budget, self.seed = "ddk", budget, int(seed)
        self.data, self.val_data, self.collate = train_data, val_data, collate
        self.domain = domain
        self.train_dom = _domains_of(train_data, domain, "training")
        val_dom = _domains_of(val_data, domain, "held-out")
        d = max(self.train_dom + val_dom) + 1
        self.names = list(names) if names and len(names) >= d else [str(k) for k in range(d)]
        self.by_domain = [[p for p, k in enumerate(self.train_dom) if k == j] for j in range(d)]
        self.val_by_domain = [[p for p, k in enumerate(val_dom) if k == j][: int(eval_blocks)]
                              for j in range(d)]  # fmt: skip
        empty = [self.names[j] for j in range(d) if not self.by_domain[j]]
        missing = [self.names[j] for j in range(d) if not self.val_by_domain[j]]
        if empty or missing:
            raise ValueError(
                "selection.method=ddk: every domain needs training and held-out blocks; "
                + (f"no training blocks: {', '.join(empty)}; " if empty else "")
                + (f"no held-out blocks: {', '.join(missing)}" if missing else "")
            )
        if smoothing is not None and not 0 <= float(smoothing) < 1:
            raise ValueError(f"selection.params.smoothing={smoothing!r}: a number in [0, 1)")
        self.smoothing = 0.5 if smoothing is None else float(smoothing)
        self.batch_size = int(batch_size)
        self.teacher = _CountingTeacher(teacher, self)
        self.min_train = 1
        self.per_round_blocks = 0  # set by the engine through round_batches()
        self.weights: Tensor | None = None  # the proportions of the current round
        self.round: int | None = None
        self.teacher_loss: Tensor | None = None
        self.records: list[dict[str, Any]] = []
        self.last_eval: dict[str, Any] | None = None

    # ------------------------------------------------------------- what the engine calls
    def kd_weight(self) -> None:
        return None

    def size(self, epoch: int) -> int:
        """Blocks of one round (the engine checks the first holds one batch)."""
        return max(self.per_round_blocks, self.min_train)

    def round_of(self, epoch: int) -> int:
        return epoch

    def round_batches(self, grad_accum: int) -> int:
        return self.every * int(grad_accum)

    def steps(self, epochs: float, per_batch: int, grad_accum: int) -> int:
        raise ValueError(
            "selection.method=ddk on language-model data counts optimizer steps: set "
            "train.max_steps"
        )

    @torch.no_grad()
    def domain_losses(self, model: Any, teacher: bool = False) -> Tensor:
        """Mean next-token cross-entropy (nats) of each domain's held-out blocks."""
        out = []
        module = model if not teacher else None
        was = module.training if module is not None else False
        if module is not None:
            module.eval()
        try:
            for ps in self.val_by_domain:
                tot, n = 0.0, 0.0
                for lo in range(0, len(ps), self.batch_size):
                    batch = self.collate([self.val_data[p] for p in ps[lo : lo + self.batch_size]])
                    if teacher:
                        b = on_teacher_device(batch, self.teacher.inner)
                        logits = self.teacher.inner(b).logits
                        self.teacher.eval_calls += len(batch["input_ids"])
                        if not isinstance(logits, Tensor):
                            raise ValueError(
                                "selection.method=ddk on LM data needs an online teacher that "
                                f"returns dense logits, got {type(logits).__name__}"
                            )
                    else:
                        from mentor.models import model_outputs

                        b = on_teacher_device(batch, module)
                        logits = model_outputs(module, b)
                    s, c = token_loss(logits, b["input_ids"], b.get("attention_mask"))
                    tot, n = tot + float(s.sum()), n + float(c.sum())
                out.append(tot / max(n, 1.0))
        finally:
            if module is not None and was:
                module.train()
        return torch.tensor(out, dtype=torch.float64)

    def _proportions(self, student: nn.Module) -> tuple[Tensor, Tensor, Tensor]:
        from mentor.selectors import ddk_domain_weights

        if self.teacher_loss is None:
            self.teacher_loss = self.domain_losses(None, teacher=True)
        s = self.domain_losses(student)
        w = ddk_domain_weights(s, self.teacher_loss, self.weights, smoothing=self.smoothing)
        return w.float(), s, self.teacher_loss

    def dataset(self, epoch: int, student: nn.Module, step: int) -> Dataset:
        """The blocks of round ``epoch``: domains drawn from this round's proportions."""
        n = max(self.per_round_blocks, self.min_train)
        if self.round != epoch:  # a new round: measure, re-weight, log
            w, s, t = self._proportions(student)
            self.weights, self.round = w, epoch
            rec: dict[str, Any] = {
                "kind": "selection", "step": step + 1, "epoch": epoch, "round": epoch,
                "by": "ddk", "domain_weights": [round(float(x), 6) for x in w],
                "student_ppl": {nm: round(math.exp(float(x)), 4)
                                for nm, x in zip(self.names, s)},
                "teacher_ppl": {nm: round(math.exp(float(x)), 4)
                                for nm, x in zip(self.names, t)},
            }  # fmt: skip
            self.records.append(rec)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + 7 * epoch + 1)
        doms = torch.multinomial(self.weights, n, replacement=True, generator=g).tolist()
        pos = []
        for k in doms:
            ps = self.by_domain[k]
            pos.append(ps[int(torch.randint(len(ps), (), generator=g))])
        if self.records and self.records[-1]["round"] == epoch:
            per = {self.names[k]: doms.count(k) for k in range(len(self.names))}
            self.records[-1]["blocks_per_domain"] = per
        return _Blocks(self.data, pos)

    def state(self) -> dict[str, Tensor]:
        if self.weights is None or self.round is None:
            return {}
        return {
            "selection.ddk.round": torch.tensor([self.round], dtype=torch.long),
            "selection.ddk.weights": self.weights.clone(),
        }

    def load_state(self, state: dict[str, Tensor]) -> None:
        if "selection.ddk.weights" in state:
            self.weights = state["selection.ddk.weights"].float()
            self.round = int(state["selection.ddk.round"][0])

    def drain(self) -> list[dict[str, Any]]:
        out, self.records = self.records, []
        return out

    def summary(self, student: nn.Module) -> dict[str, Any]:
        """``selection.json``: settings, final per-domain held-out perplexities (mean, worst)."""
        s = self.domain_losses(student)
        t = self.teacher_loss if self.teacher_loss is not None else self.domain_losses(None, True)
        ppl = {nm: math.exp(float(x)) for nm, x in zip(self.names, s)}
        worst = max(ppl, key=ppl.get)  # type: ignore[arg-type]
        return {
            "kind": "domains",
            "method": "ddk",
            "why": CITE,
            "every": self.every,
            "every_unit": "steps",
            "smoothing": self.smoothing,
            "domain_field": self.domain,
            "domains": self.names,
            "training_blocks_per_domain": {nm: len(p) for nm, p in zip(self.names, self.by_domain)},
            "teacher_calls": self.teacher.calls,
            "eval_calls": self.teacher.eval_calls,
            "domain_weights": [
                round(float(x), 6) for x in (self.weights if self.weights is not None else [])
            ],
            "final_student_ppl": ppl,
            "teacher_ppl": {nm: math.exp(float(x)) for nm, x in zip(self.names, t)},
            "mean_ppl": sum(ppl.values()) / len(ppl),
            "worst_domain": worst,
            "worst_ppl": ppl[worst],
        }


def build_domain_mixture(
    cfg: Any,
    teacher: TeacherSource,
    train_data: Dataset,
    collate: Callable[[list[Any]], dict[str, Any]],
    val_data: Dataset | None,
    info: Any = None,
) -> DomainMixture:
    """The run's :class:`DomainMixture` from ``cfg.selection`` (LM data, ``method: ddk``)."""
    sc = cfg.selection
    p = dict(sc.params)
    unknown = sorted(set(p) - set(PARAMS))
    if unknown:
        raise ValueError(
            f"selection.params: unknown key(s) {unknown}; valid for ddk on language-model data: "
            f"{', '.join(PARAMS)}"
        )
    eb = p.get("eval_blocks", 16)
    if isinstance(eb, bool) or not isinstance(eb, int) or eb < 1:
        raise ValueError(f"selection.params.eval_blocks={eb!r}: use a positive integer")
    t = cfg.train
    mix = DomainMixture(
        sc.every, teacher, train_data, collate, val_data, domain=p.get("domain"),
        names=(getattr(info, "extra", {}) or {}).get("domains"), smoothing=p.get("smoothing"),
        eval_blocks=eb, batch_size=cfg.eval.batch_size, seed=t.seed, budget=sc.budget,
    )  # fmt: skip
    mix.per_round_blocks = mix.every * t.batch_size * t.grad_accum
    if t.max_steps is not None and sc.budget is not None:
        need = t.max_steps * t.batch_size * t.grad_accum
        if need > sc.budget:
            raise ValueError(
                f"selection.budget={sc.budget} teacher calls is less than the {need:,} training "
                f"blocks the run's train.max_steps={t.max_steps} x train.batch_size={t.batch_size}"
                f" draw: raise the budget or lower train.max_steps"
            )
    return mix
