"""The distillation loop, readable top to bottom.

for each optimizer step:
    take grad_accum micro-batches; count their positions (global, across processes)
    for each micro-batch:
        teacher signal  (online module / cache / ensemble / EMA)   -- frozen, no grad
        student forward + objective -> named terms                 -- one trainable module
        backward(loss * positions_in_batch / positions_in_step)    -- exact big-batch mean
    clip, optimizer step, LR schedule step
    teacher.after_step (EMA), objective.after_step (TAID), loss-weight schedules
    log -> metrics.jsonl / trackers / progress bar; eval every N; checkpoint every N
"""

from __future__ import annotations

import json
import math
import signal
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import Tensor, nn
from torch.utils.data import Dataset, default_collate

from mentor.config import RunConfig, TrainConfig, dump_config
from mentor.engine import checkpoint as ckpt
from mentor.engine import rundir
from mentor.generation import SamplingConfig, generate
from mentor.losses import Objective
from mentor.losses.objective import LABEL_ONLY, FusedHead
from mentor.losses.schedules import apply_schedules, check_schedules, lr_lambda
from mentor.models import LOGITS_FROM, model_outputs, position_ids
from mentor.models.taps import FeatureTaps
from mentor.progress import Progress
from mentor.registry import did_you_mean
from mentor.tasks import Task, get_task
from mentor.teachers import OnlineTeacher, TeacherOutput, TeacherSource
from mentor.teachers.sources import linear_head

# Feature/batch terms may name this pseudo tap to compare the models' outputs themselves
# (e.g. sentence embeddings: ``{loss: cosine_embedding, student: output, teacher: output}``).
OUTPUT_TAP = "output"


class DistillModule(nn.Module):
    """The student, its feature taps and the objective (with any learned projectors) as one
    trainable module, so DDP synchronises all trainable parameters together."""

    def __init__(
        self,
        student: nn.Module,
        objective: Objective,
        task: str | Task,
        fused_chunk: int | None = None,
    ) -> None:
        """Attach taps named by the objective's feature terms (validated now)."""
        super().__init__()
        self.student = student
        self.objective = objective
        self.task = get_task(task) if isinstance(task, str) else task
        self.fused_chunk = fused_chunk
        if fused_chunk is not None:
            _check_fusable(student, self.task)
        paths = [s for s, _ in objective.taps.values() if s != OUTPUT_TAP]
        self._taps = FeatureTaps(student, paths, role="student") if paths else None

    def forward(self, batch: dict[str, Any], teacher: TeacherOutput) -> dict[str, Tensor]:
        """Student forward, then every objective term against the teacher's signal."""
        return self.terms(batch, teacher, self.student_outputs(batch))

    def student_outputs(self, batch: dict[str, Any]) -> Any:
        """The student's logits (or, with a fused head, its hidden states + head)."""
        if self.fused_chunk is not None:
            return _fused_head(self.student, batch, self.fused_chunk)
        return model_outputs(self.student, batch)

    def terms(
        self, batch: dict[str, Any], teacher: TeacherOutput, logits: Any
    ) -> dict[str, Tensor]:
        """The objective's named terms for student outputs ``logits`` (task view applied)."""
        feats = self._taps.pop() if self._taps else {}
        logits, t_logits, labels, mask = self.task.loss_view(logits, teacher.logits, batch)
        t_feats = teacher.features
        if self.objective.taps:
            feats = {**feats, OUTPUT_TAP: logits}
            if t_logits is not None or OUTPUT_TAP not in t_feats:  # cached: a stored feature
                t_feats = {**t_feats, OUTPUT_TAP: t_logits}
        return self.objective(
            logits,
            t_logits,
            labels=labels,
            mask=mask,
            feature_mask=self.task.feature_mask(batch, mask),
            student_features=feats,
            teacher_features=t_feats,
            groups=batch.get("groups"),
            rewards=batch.get("rewards"),
            tasks=batch.get("task"),  # step-by-step data: 0 = label row, 1 = rationale row
            xtok=self.task.xtok_inputs(batch, t_logits),
        )


def _check_fusable(student: nn.Module, task: Task) -> None:
    if not task.per_token or linear_head(student) is None:
        raise ValueError(
            "train.fused_loss_chunk needs a causal LM student with a linear output head "
            "(a Hugging Face *ForCausalLM); set train.fused_loss_chunk=null for this model"
        )


def _fused_head(student: nn.Module, batch: dict[str, Any], chunk: int) -> FusedHead:
    """Run the student body only; the objective applies the output head chunk by chunk."""
    out = student.base_model(
        input_ids=batch["input_ids"],
        attention_mask=batch.get("attention_mask"),
        position_ids=position_ids(batch),
    )
    head = student.get_output_embeddings()
    start = batch.get(LOGITS_FROM)
    hidden = out.last_hidden_state
    if isinstance(start, int) and start > 0:
        hidden = hidden[:, start:]
    return FusedHead(hidden, head.weight, head.bias, chunk)


def count_positions(batch: dict[str, Any], task: str | Task) -> int:
    """Positions a micro-batch contributes to the loss mean (see :class:`mentor.tasks.Task`)."""
    return (get_task(task) if isinstance(task, str) else task).count_positions(batch)


class NonFiniteError(ValueError):
    """The loss or the gradient became NaN/inf; the message names the step and the terms."""


class _LocalAccelerator:
    """The few Accelerator calls the loop makes, for one process (fitting a teacher inside a
    multi-process run must not join the other processes' collectives)."""

    process_index, num_processes, is_main_process = 0, 1, True

    def __init__(self) -> None:
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def prepare(self, *objs: Any) -> Any:
        return tuple(o.to(self.device) if isinstance(o, nn.Module) else o for o in objs)

    def reduce(self, x: Tensor, _op: str) -> Tensor:
        return x

    def backward(self, loss: Tensor) -> None:
        loss.backward()

    def no_sync(self, _model: nn.Module) -> Any:
        return nullcontext()

    def autocast(self) -> Any:
        return nullcontext()

    def clip_grad_norm_(self, params: Any, max_norm: float) -> Tensor:
        return torch.nn.utils.clip_grad_norm_(list(params), max_norm)

    def wait_for_everyone(self) -> None:
        pass

    def print(self, *args: Any) -> None:
        print(*args)


class ReplayBuffer:
    """Student samples kept for reuse (``generation.mode=replay``; DistiLLM's replay buffer).

    A FIFO of at most ``size`` sequences on the CPU: each is its real prompt tokens, its counted
    completion tokens (EOS included; padding is not stored) and its example id. :meth:`sample`
    draws distinct sequences uniformly with a given generator and lays them out like a prompt
    batch (prompts left-padded to a common end column ``P``, completions right-padded after
    it), so ``position_ids`` and the completion-only loss work as for a fresh batch.
    """

    def __init__(self, size: int) -> None:
        """An empty buffer of at most ``size`` sequences."""
        self.items: deque[tuple[Tensor, Tensor, int | None]] = deque(maxlen=size)

    def __len__(self) -> int:
        return len(self.items)

    def add(self, batch: dict[str, Any]) -> None:
        """Keep every row of a generated prompt batch (the oldest rows go first when full)."""
        p = batch["prompt_ids"].shape[1]
        ids, mask, comp = (
            batch[k].detach().cpu() for k in ("input_ids", "attention_mask", "completion_mask")
        )
        index = batch.get("index")
        for r in range(ids.shape[0]):
            prompt = ids[r, :p][mask[r, :p].bool()].clone()
            completion = ids[r, p:][comp[r, p:].bool()].clone()
            idx = int(index[r]) if isinstance(index, Tensor) else None
            self.items.append((prompt, completion, idx))

    def sample(
        self, n: int, generator: torch.Generator, pad_token_id: int, prompt_length: bool = False
    ) -> dict[str, Any]:
        """``n`` distinct sequences drawn uniformly, re-padded as one prompt batch (CPU).

        The batch has ``input_ids``, ``attention_mask``, ``completion_mask``, ``prompt_ids``,
        ``prompt_mask``, ``index`` (when every sequence has one) and, with ``prompt_length``,
        the int ``prompt_length`` (``P``) the ``prompts`` data collate also gives.
        """
        pick = torch.randperm(len(self.items), generator=generator)[:n].tolist()
        rows = [self.items[k] for k in pick]
        big_p = max(len(pr) for pr, _, _ in rows)
        big_c = max(len(co) for _, co, _ in rows)
        ids = torch.full((len(rows), big_p + big_c), int(pad_token_id), dtype=torch.long)
        mask = torch.zeros_like(ids)
        comp = torch.zeros_like(ids)
        for r, (pr, co, _) in enumerate(rows):
            lo, hi = big_p - len(pr), big_p + len(co)
            ids[r, lo:big_p], ids[r, big_p:hi] = pr, co
            mask[r, lo:hi] = 1
            comp[r, big_p:hi] = 1
        out: dict[str, Any] = {
            "input_ids": ids,
            "attention_mask": mask,
            "completion_mask": comp,
            "prompt_ids": ids[:, :big_p].clone(),
            "prompt_mask": mask[:, :big_p].clone(),
        }
        if all(idx is not None for _, _, idx in rows):
            out["index"] = torch.tensor([idx for _, _, idx in rows], dtype=torch.long)
        if prompt_length:
            out["prompt_length"] = big_p
        return out

    def state_tensors(self) -> dict[str, Tensor]:
        """The buffer as padded tensors (oldest first), for a checkpoint."""
        n = len(self.items)
        plens = torch.tensor([len(pr) for pr, _, _ in self.items], dtype=torch.long)
        clens = torch.tensor([len(co) for _, co, _ in self.items], dtype=torch.long)
        prompts = torch.zeros((n, int(plens.max()) if n else 0), dtype=torch.long)
        completions = torch.zeros((n, int(clens.max()) if n else 0), dtype=torch.long)
        for r, (pr, co, _) in enumerate(self.items):
            prompts[r, : len(pr)], completions[r, : len(co)] = pr, co
        out = {
            "prompts": prompts,
            "prompt_lengths": plens,
            "completions": completions,
            "completion_lengths": clens,
        }
        if n and all(idx is not None for _, _, idx in self.items):
            out["index"] = torch.tensor([idx for _, _, idx in self.items], dtype=torch.long)
        return out

    def load_state_tensors(self, t: Mapping[str, Tensor]) -> None:
        """Replace the contents by those of :meth:`state_tensors`."""
        self.items.clear()
        index = t.get("index")
        for r in range(int(t["prompt_lengths"].shape[0])):
            pr = t["prompts"][r, : int(t["prompt_lengths"][r])].clone()
            co = t["completions"][r, : int(t["completion_lengths"][r])].clone()
            self.items.append((pr, co, int(index[r]) if index is not None else None))


class Distiller:
    """Train ``student`` to imitate ``teacher`` under ``objective``.

    ``Distiller(student, teacher, objective, train_data, max_steps=200, lr=1e-3,
    output_dir="runs/x").fit()`` returns the run directory, which holds ``config.yaml``,
    ``metrics.jsonl``, ``checkpoints/`` and the final ``student/``.

    ``teacher``: a frozen ``nn.Module`` (run online), any :class:`TeacherSource` (cached,
    ensemble, EMA, ...) or None for a label-only student. ``objective``: an :class:`Objective`,
    a mapping of terms (``{"kd": {"weight": 0.9, "temperature": 4}, "ce": {"weight": 0.1}}``)
    or one loss name. ``config``: a full :class:`RunConfig` (optional); keyword settings
    (``max_steps``, ``epochs``, ``lr``, ``batch_size``, any other ``train.*`` key,
    ``output_dir``, ``eval_every``) are applied on top of it. ``task``: ``classification``,
    ``causal_lm`` or ``embedding``; by default guessed from the data (``input_ids`` without
    ``labels``: a causal LM). ``reward_fn``: with generation, a function of a generated batch
    returning each row's reward (float ``[B]``, e.g. :class:`mentor.generation.AnswerReward`),
    put in the batch as ``rewards`` for the quality-aware objectives.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: TeacherSource | nn.Module | None,
        objective: Objective | Mapping[str, Any] | str,
        train_data: Dataset,
        config: RunConfig | None = None,
        *,
        val_data: Dataset | None = None,
        task: str | Task | None = None,
        save_student: Callable[[nn.Module, Path], None] | None = None,
        collate_fn: Callable[[list[Any]], dict[str, Any]] = default_collate,
        callbacks: Sequence[Any] = (),
        reward_fn: Callable[[dict[str, Any]], Tensor] | None = None,
        write_run: bool = True,
        output_dir: str | Path | None = None,
        eval_every: int | None = None,
        selection: Any = None,
        **train: Any,
    ) -> None:
        """Check the set-up (taps, schedules, data size) before anything runs.

        ``selection``: a :class:`mentor.selection.Selection` (teacher budget and data
        selection); the teacher is then its budget-counting wrapper of ``teacher``.
        """
        if isinstance(teacher, nn.Module):
            teacher = OnlineTeacher(teacher)
        self.selection = selection
        if selection is not None:
            teacher = selection.teacher
        if not isinstance(objective, Objective):
            objective = Objective({objective: {}} if isinstance(objective, str) else objective)
        config = _with_settings(config, objective, train, output_dir, eval_every)
        self.cfg = config
        self.teacher = teacher
        self.train_data, self.val_data = train_data, val_data
        if not isinstance(task, Task):
            task = get_task(task or _guess_task(train_data))
        self.task = task
        self.save_student = save_student or _save_state_dict
        self.collate = collate_fn
        self.callbacks = list(callbacks)
        self.reward_fn = reward_fn  # generation: a batch -> float [B] verifier score
        self.write_run = write_run
        self.out = Path(config.output.dir)
        teacher_terms = [n for n, t in objective.terms.items() if t.name not in LABEL_ONLY]
        if teacher is None and teacher_terms:
            raise ValueError(
                f"the objective has teacher terms ({', '.join(teacher_terms)}) but no teacher "
                "was given: pass a teacher, or use only a 'ce' term"
            )
        check_schedules(config.train.schedules, objective)
        _check_cross_tokenizer(config, objective, self.task, teacher)
        if self.task.name == "classification" and selection is None:
            self.train_data = _labelled_part(train_data, objective, teacher_terms)
        if selection is not None:
            _apply_selection_rules(selection, objective, teacher_terms)
            t = config.train
            selection.min_train = t.batch_size * t.grad_accum
        self.meta_data: Dataset | None = None  # tgeo_kd: labelled examples held out for φ
        if objective.meta_terms():
            if selection is not None:
                raise ValueError(
                    "tgeo_kd learns its fusion weights on held-out labelled examples; with a "
                    "selection section the training set is the paid pool: drop one of them"
                )
            self.train_data, self.meta_data = _meta_split(
                self.train_data, self.task.name, config.train.seed, list(objective.meta_terms())
            )
        self.model = DistillModule(student, objective, self.task, config.train.fused_loss_chunk)
        if config.generation.mode != "off":
            _check_generation(config, self.task, train_data)
            if teacher is not None and not hasattr(teacher, "module"):
                raise ValueError(
                    f"generation.mode={config.generation.mode} needs a teacher that scores new "
                    f"samples (an online module); teacher.source={config.teacher.source} only "
                    "holds signals for the data's own completions: use generation.mode=off with "
                    "it, or an online teacher"
                )
        es = config.eval.early_stopping
        if es is not None and write_run:
            known = [*objective.terms, "loss", *self.task.eval_metrics]
            if es.metric not in known:
                raise ValueError(
                    f"eval.early_stopping.metric={es.metric!r} is not computed; available: "
                    f"{', '.join(sorted(known))}"
                )
            if val_data is None or not config.eval.every:
                raise ValueError(
                    "eval.early_stopping needs held-out data and eval.every (steps between "
                    "evaluations)"
                )
        # with a fused student head, an online causal-LM teacher's logits are fused too: its
        # hidden states and head go to the loss, which computes them chunk by chunk
        self._teacher_head = (
            config.train.fused_loss_chunk is not None
            and isinstance(teacher, OnlineTeacher)
            and teacher.top_k is None
            and OUTPUT_TAP not in {t for _, t in objective.taps.values()}
            and linear_head(teacher.module) is not None
        )
        # prompt batches: student and teacher compute logits from the last prompt token on
        # (positions before it never count); not with feature taps, which see every position
        self._cut_logits = self.task.name == "causal_lm" and not objective.taps
        self.history: list[dict[str, Any]] = []
        self.replay: ReplayBuffer | None = None  # generation.mode=replay: set up by fit()
        self._step = 0  # the optimizer step reached (for selection records)

    # ------------------------------------------------------------------ set-up helpers
    def _steps_per_epoch(self, world: int) -> int:
        size = len(self.train_data) if self.selection is None else self.selection.size(0)
        n = size // (self.cfg.train.batch_size * world)
        if n == 0:
            what = "training set" if self.selection is None else "first selection round"
            raise ValueError(
                f"train.batch_size={self.cfg.train.batch_size} x {world} process(es) is larger "
                f"than the {what} ({size} examples): lower train.batch_size"
            )
        return max(1, n // self.cfg.train.grad_accum)

    def total_steps(self, world: int = 1) -> int:
        """Optimizer steps this run will take."""
        t = self.cfg.train
        if t.max_steps is not None:
            return t.max_steps
        if self.selection is not None:  # the paid set grows between selection rounds
            self._steps_per_epoch(world)  # a clear error if the first round is too small
            if self.selection.unit == "steps":
                raise ValueError(
                    f"selection.every={self.cfg.selection.every!r} counts optimizer steps: set "
                    "train.max_steps (the run's length in steps) instead of train.epochs"
                )
            return self.selection.steps(t.epochs or 1.0, t.batch_size * world, t.grad_accum)
        return max(1, math.ceil((t.epochs or 1.0) * self._steps_per_epoch(world)))

    def _batches(self, epoch: int, start: int, rank: int, world: int) -> Iterator[dict[str, Any]]:
        """Micro-batches of this rank from position ``start`` of ``epoch`` (deterministic)."""
        b = self.cfg.train.batch_size
        data = self.train_data
        per_round = None
        if self.selection is not None:  # the examples paid for by this epoch, teacher-labelled
            data = self.selection.dataset(epoch, self.model.student, self._step)
            # every: "N steps": this "epoch" is one selection round of exactly N steps, going
            # through the round's examples as many times as that takes (a new order each pass)
            per_round = self.selection.round_batches(self.cfg.train.grad_accum)
        seed = self.cfg.train.seed * 1_000_003 + epoch
        n_batches = len(data) // (b * world)
        stop = n_batches if per_round is None else (per_round if n_batches else 0)
        perm: Tensor | None = None
        for k in range(start, stop):
            p, k_in = divmod(k, n_batches)
            if perm is None or k_in == 0:
                g = torch.Generator().manual_seed(seed if p == 0 else seed * 7919 + p)
                perm = torch.randperm(len(data), generator=g)
            lo = k_in * b * world + rank * b
            yield self.collate([data[int(i)] for i in perm[lo : lo + b]])

    def _generate(
        self, window: list[dict[str, Any]], step: int, rank: int, device: torch.device
    ) -> list[dict[str, Any]]:
        """Replace the completions of this step's prompt batches by generated ones.

        ``on_policy``: the student samples (current weights); ``seq_kd``: the teacher samples;
        ``mixed``: each micro-batch is on-policy with probability ``generation.lambda``;
        ``replay``: each micro-batch is, with probability ``generation.reuse_at(step)`` once the
        replay buffer holds at least one micro-batch of sequences, drawn uniformly from the
        buffer (earlier student samples, reused off-policy), else sampled fresh by the student
        and added to the buffer (DistiLLM's adaptive off-policy approach, see
        ``docs/config.md``). With ``generation.samples_per_prompt`` = k each prompt is sampled
        k times. Each sample draws from its own generator seeded by (seed, step, example id,
        sample number) and each coin from one seeded by (seed, step, micro-batch), so what is
        sampled depends neither on the process an example lands on nor on the other rows of its
        batch; the replay buffer is saved in checkpoints (its picks are seeded per process too).
        A resumed run, and a multi-process run, sample what the uninterrupted single-process
        run sampled. Every returned batch has ``groups`` (the example id of each row).
        """
        g = self.cfg.generation
        if g.mode == "off":
            return window
        sampling = SamplingConfig(
            max_new_tokens=g.max_new_tokens, temperature=g.temperature, top_p=g.top_p,
            top_k=g.top_k,
        )  # fmt: skip
        if g.mode == "replay" and self.replay is None:
            self.replay = ReplayBuffer(g.buffer_size)
        replay = self.replay if g.mode == "replay" else None
        seed = self.cfg.train.seed
        out = []
        for i, batch in enumerate(window):
            coin_seed = ((seed * 1_000_003 + step) * 1009 + i) * 131 + 7919
            if g.mode == "mixed":  # GKD's coin: on-policy with probability lambda
                coin = torch.Generator().manual_seed(coin_seed)
                if float(torch.rand((), generator=coin)) >= g.lambda_:
                    out.append(_with_groups(batch))  # off-policy: the data's own completion
                    continue
            model = self._generator_model()
            eos, pad = _eos_and_pad(model)
            if replay is not None:  # DistiLLM's off-policy coin: reuse earlier samples
                n = int(batch["prompt_ids"].shape[0])
                coin = torch.Generator().manual_seed(coin_seed)
                draw = float(torch.rand((), generator=coin))
                if len(replay) >= n and draw < g.reuse_at(step):
                    pick = torch.Generator().manual_seed(coin_seed * 131 + 104_729 + rank)
                    old = replay.sample(n, pick, pad, prompt_length="prompt_length" in batch)
                    out.append(_with_groups(_to_device(old, device)))
                    continue
            k = g.samples_per_prompt
            rows = _repeat_rows(batch, k)
            ids = _example_ids(batch, rank, i).repeat_interleave(k)
            reps = torch.arange(ids.shape[0]) % k
            rngs = [
                torch.Generator(device=device).manual_seed(_sample_seed(seed, step, e, k))
                for e, k in zip(ids.tolist(), reps.tolist(), strict=True)
            ]
            bf16 = g.mode == "seq_kd" and getattr(self.teacher, "precision", "fp32") == "bf16"
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                gen = generate(
                    model, rows["prompt_ids"], rows["prompt_mask"], sampling,
                    generator=rngs, eos_token_id=eos, pad_token_id=pad,
                )  # fmt: skip
            new = {**rows, "input_ids": gen.input_ids, "attention_mask": gen.attention_mask,
                   "completion_mask": gen.completion_mask}  # fmt: skip
            if replay is not None:
                replay.add(new)
            out.append(_with_groups(new, ids.to(device)))
        if self.reward_fn is not None:
            out = [{**b, "rewards": self.reward_fn(b)} for b in out]
        return out

    def _restore_replay(self, folder: Path, rank: int, acc: Any) -> None:
        """Load this process's replay buffer from a checkpoint folder (empty if it has none)."""
        assert self.replay is not None
        saved = ckpt.load_rank_tensors(folder, "replay", rank)
        if saved is None:
            self.replay.items.clear()
            acc.print(f"{folder.name} holds no replay buffer of process {rank}: it starts empty")
        else:
            self.replay.load_state_tensors(saved)

    def _rank_tensors(self) -> dict[str, dict[str, Tensor]] | None:
        out = {"replay": self.replay.state_tensors()} if self.replay is not None else {}
        meta = self.model.objective.tensor_state()  # tgeo_kd's fusion net and its optimizer
        if meta:
            out["objective"] = meta
        sparse = getattr(self.model.student, "mentor_sparse", None)
        if sparse is not None:  # the masks of a sparse student (they may change: stages, AST)
            out["masks"] = sparse.state_dict()
        return out or None

    def _sparse_step(self, step: int, total: int) -> dict[str, float]:
        """After optimizer step ``step``: a sparse student's masks updated and enforced."""
        sparse = getattr(self.model.student, "mentor_sparse", None)
        if sparse is None:
            return {}
        return sparse.after_step(self.model.student, step, total)

    def _meta_batch(self, step: int) -> dict[str, Any]:
        """The held-out labelled batch of ``step`` for a meta term (the same on resume)."""
        assert self.meta_data is not None
        n = len(self.meta_data)
        b = min(self.cfg.train.batch_size, n)
        per = max(1, n // b)
        g = torch.Generator().manual_seed(self.cfg.train.seed * 7_919 + step // per + 13)
        perm = torch.randperm(n, generator=g)
        lo = (step % per) * b
        return self.collate([self.meta_data[int(i)] for i in perm[lo : lo + b]])

    def _meta_steps(
        self, window: list[dict[str, Any]], step: int, lr: float, acc: Any
    ) -> dict[str, float]:
        """One bilevel update of each meta term's fusion net (TGeo-KD) before this step."""
        out: dict[str, float] = {}
        meta = self.model.objective.meta_terms()
        if not meta:
            return out
        b0 = window[0]
        t_logits = self._teacher_output(b0).logits
        meta_batch = _to_device(self._meta_batch(step), acc.device)

        def forward(m: nn.Module, b: dict[str, Any]) -> Tensor:
            return self.task.loss_view(model_outputs(m, b), None, b)[0]

        world = acc.num_processes
        for name, term in meta.items():
            out[f"{name}.meta_loss"] = float(
                term.meta_step(
                    self.model.student, forward, b0, t_logits, meta_batch, inner_lr=lr,
                    reduce=(lambda g: acc.reduce(g, "mean") / world) if world > 1 else None,
                )
            )  # fmt: skip
        return out

    def _generator_model(self) -> nn.Module:
        if self.cfg.generation.mode != "seq_kd":
            return self.model.student
        module = getattr(self.teacher, "module", None)
        if not isinstance(module, nn.Module):
            raise ValueError(
                "generation.mode=seq_kd samples from the teacher, which needs an online teacher "
                "module (teacher.source=online or run); for a cached teacher, generate the "
                "completions once and train on them with generation.mode=off"
            )
        return module

    def _teacher_output(self, batch: dict[str, Any]) -> TeacherOutput:
        if self.teacher is None:
            return TeacherOutput()
        batch = self.task.teacher_view(batch)  # cross-tokenizer data: the teacher's tokens
        if self._teacher_head:
            return self.teacher.head_output(batch)  # type: ignore[attr-defined]
        return self.teacher(batch)

    def _make_optimizer(self) -> torch.optim.Optimizer:
        t = self.cfg.train
        params = [p for p in self.model.parameters() if p.requires_grad]
        if t.optimizer == "sgd":
            return torch.optim.SGD(
                params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay
            )
        return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)

    @staticmethod
    def check_output(cfg: RunConfig, resume: bool) -> list[tuple[str, Any, Any]]:
        """Refuse a run that would lose or mix data, before anything is built or written
        (see :mod:`mentor.engine.rundir`); returns the changes a resumed run may make."""
        return rundir.check_output(cfg, resume)

    def _prepare_dir(self, resume: bool) -> Path | None:
        """Create (or continue) the run directory; an overwritten run is moved aside."""
        return rundir.prepare(self.out, dump_config(self.cfg), resume, print)

    def _apply_resume_changes(
        self, acc: Any, changes: list[tuple[str, Any, Any]], optimizer: Any, scheduler: Any,
        step: int,
    ) -> None:  # fmt: skip
        """Announce what a resumed run changes; a new ``train.lr`` is applied from here on."""
        for key, old, new in changes:
            if key == "train.lr":
                rundir.apply_lr_change(optimizer, scheduler, new)
                acc.print(f"--resume: train.lr {old} -> {new}, applied from step {step}")
            elif key in ("train.max_steps", "train.epochs"):
                acc.print(
                    f"--resume: {key} {old} -> {new}: training continues to the new length "
                    "(the learning-rate schedule follows the new total)"
                )
            else:
                acc.print(f"--resume: {key} {old!r} -> {new!r}")

    def _non_finite(
        self, step: int, terms: dict[str, Tensor], n: float, norm: Any, scheduler: Any
    ) -> None:
        """Stop at the first non-finite loss or gradient, naming the step and the terms."""
        vals = {k: float(v) / n for k, v in terms.items()}
        shown = ", ".join(f"{k}={v:.4g}" for k, v in vals.items())
        found = ckpt.list_checkpoints(self.out) if self.write_run else []
        last = f"the last checkpoint ({found[-1].name}) is kept" if found else "no checkpoint yet"
        raise NonFiniteError(
            f"step {step}: the loss or its gradient is not finite ({shown}; gradient norm "
            f"{float(norm):.4g}); training stopped before the optimizer step and nothing of "
            f"this step was saved; {last}. Try a lower train.lr (now "
            f"{scheduler.get_last_lr()[0]:.3g}), train.grad_clip (now {self.cfg.train.grad_clip}),"
            " or check the data; then --resume (train.lr may change on resume)"
        )

    # ------------------------------------------------------------------ the loop
    def fit(self, resume: bool = False) -> Path:
        """Train; return the run directory. ``resume=True`` continues from the last checkpoint."""
        t = self.cfg.train
        _check_trackers(self.cfg.output.trackers)
        if self.cfg.generation.mode != "off":  # both models score the samples: both windows
            for m in (self.model.student, getattr(self.teacher, "module", None)):
                _check_context(self.cfg, self.train_data, m)
        changes = rundir.check_output(self.cfg, resume) if self.write_run else []
        if self.write_run:
            acc: Any = Accelerator(
                cpu=not torch.cuda.is_available(),  # multi-process CPU runs use gloo
                mixed_precision="bf16" if t.precision == "bf16" else "no",
                log_with=list(self.cfg.output.trackers) or None,
                project_dir=str(self.out),
            )
        else:  # fitting a teacher: one process, no run directory
            acc = _LocalAccelerator()
        main = acc.is_main_process
        moved: Path | None = None
        if main and self.write_run:
            moved = self._prepare_dir(resume)
        acc.wait_for_everyone()
        try:
            return self._fit(acc, resume, changes)
        except BaseException:
            if main and self.write_run and not resume and not ckpt.list_checkpoints(self.out):
                self._undo_new_run(moved)  # nothing worth keeping: leave the disk as it was
            raise

    def _undo_new_run(self, moved: Path | None) -> None:
        """Remove a new run that failed before its first checkpoint; restore the old one."""
        import shutil

        if (self.out / rundir.MARKER).exists():
            shutil.rmtree(self.out, ignore_errors=True)
        if moved is not None and not self.out.exists():
            moved.rename(self.out)

    def _fit(self, acc: Any, resume: bool, changes: list[tuple[str, Any, Any]]) -> Path:
        t = self.cfg.train
        rank, world, main = acc.process_index, acc.num_processes, acc.is_main_process
        set_seed(t.seed + rank)
        if self.selection is not None:
            if world > 1:
                raise ValueError(
                    "selection (teacher budgets) runs in one process for now: launch without "
                    "accelerate's --num_processes, or drop the selection section"
                )
            if self.write_run:
                from mentor.selection import LABELS_FILE

                self.selection.teacher.open_log(self.out / LABELS_FILE, resume)
        total = self.total_steps(world)
        steps_per_epoch = self._steps_per_epoch(world)

        optimizer = self._make_optimizer()
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_lambda(t.schedule, t.warmup_steps, total)
        )
        model, optimizer = acc.prepare(self.model, optimizer)
        objective = self.model.objective
        if self.teacher is not None:
            self.teacher.to(acc.device)
        if self.cfg.output.trackers:
            acc.init_trackers(
                self.cfg.name, config=json.loads(json.dumps(self.cfg.model_dump(mode="json")))
            )

        state = {"step": 0, "epoch": 0, "pos": 0, "best": None, "bad_evals": 0}
        g = self.cfg.generation
        self.replay = ReplayBuffer(g.buffer_size) if g.mode == "replay" else None
        if resume:

            def restore(folder: Path) -> None:
                if self.replay is not None:
                    self._restore_replay(folder, rank, acc)
                sparse = getattr(self.model.student, "mentor_sparse", None)
                if sparse is not None:
                    st = ckpt.load_rank_tensors(folder, "masks", rank)
                    if st is not None:
                        sparse.load_state_dict(st, self.model.student)
                if objective.meta_terms():
                    st = ckpt.load_rank_tensors(folder, "objective", rank)
                    if st is not None:
                        objective.load_tensor_state(st)

            loaded = ckpt.load_latest(
                self.out, acc, self.model, optimizer, scheduler, self.teacher, restore=restore
            )
            if loaded is None:
                acc.print(f"no checkpoint in {self.out}/checkpoints: starting from step 0")
            else:
                state.update(loaded)
                self._apply_resume_changes(acc, changes, optimizer, scheduler, state["step"])
            if main:  # records after the checkpoint are logged again; a torn line is dropped
                dropped = ckpt.truncate_metrics(self.out / "metrics.jsonl", state["step"])
                if dropped:
                    acc.print(f"metrics.jsonl: {dropped} torn record(s) or record(s) after step "
                              f"{state['step']} dropped (later steps are logged again)")  # fmt: skip
                gone = ckpt.missing_records(self.out / "metrics.jsonl", state["step"], t.log_every)
                if gone:
                    acc.print(f"metrics.jsonl has no record of step(s) {gone[:5]}"
                              f"{' ...' if len(gone) > 5 else ''}: the file was truncated or "
                              "edited; those records cannot be recovered")  # fmt: skip
        apply_schedules(t.schedules, objective, state["step"])
        self._step = state["step"]
        ck_minutes = t.checkpoint_minutes
        last_ck, ck_cost = time.perf_counter(), 0.0
        ck_total = 0.0

        stop_signal: list[int] = []
        old_handlers = _install_signal_handlers(stop_signal) if self.write_run else {}
        label = "distil" if self.write_run else "fit"
        bar = Progress(
            total, enabled=main and t.progress, initial=state["step"], label=label, unit="steps"
        )
        batches = self._batches(state["epoch"], state["pos"], rank, world)
        log_acc: dict[str, float] = {}
        log_n, t0 = 0, time.perf_counter()
        try:
            while state["step"] < total:
                # 1. gather this step's micro-batches (so the count of positions is known)
                window = []
                empty = 0  # epochs in a row that gave no batch
                while len(window) < t.grad_accum:
                    batch = next(batches, None)
                    if batch is None:
                        empty = empty + 1 if state["pos"] == 0 else 1
                        if empty > 2:
                            raise ValueError(
                                f"epoch {state['epoch']} has fewer training examples than one "
                                f"batch (train.batch_size={t.batch_size} x {world} process(es)): "
                                "lower train.batch_size"
                            )
                        state["epoch"], state["pos"] = state["epoch"] + 1, 0
                        batches = self._batches(state["epoch"], 0, rank, world)
                        continue
                    state["pos"] += 1
                    window.append(_to_device(batch, acc.device))
                window = self._generate(window, state["step"], rank, acc.device)
                if self._cut_logits:  # the loss counts completion tokens only
                    window = [_logits_from_prompt_end(b) for b in window]
                meta_values = self._meta_steps(window, state["step"],
                                               scheduler.get_last_lr()[0], acc)  # fmt: skip
                counts = [self.task.count_positions(b) for b in window]
                n_global = acc.reduce(torch.tensor(float(sum(counts)), device=acc.device), "sum")
                n_global = max(float(n_global), 1.0)

                # 2. forward/backward each micro-batch, scaled to the big-batch mean
                step_terms: dict[str, Tensor] = {}
                for i, batch in enumerate(window):
                    last = i == len(window) - 1
                    with nullcontext() if last else acc.no_sync(model):
                        with acc.autocast():
                            teacher_out = self._teacher_output(batch)
                            terms = model(batch, teacher_out)
                        scale = counts[i] * world / n_global
                        loss = terms["loss"] * scale
                        del teacher_out  # free the teacher's logits before the backward pass
                        acc.backward(loss)
                    for k, v in terms.items():
                        step_terms[k] = step_terms.get(k, 0.0) + v.detach().float() * counts[i]

                # 3. optimizer step, unless the loss or the gradient is not finite (then stop)
                clip = t.grad_clip if t.grad_clip is not None else float("inf")
                norm = acc.clip_grad_norm_(model.parameters(), clip)
                bad = not all(bool(torch.isfinite(v).all()) for v in step_terms.values())
                bad = bad or not bool(torch.isfinite(torch.as_tensor(norm)).all())
                if world > 1:  # every process stops together
                    bad = bool(acc.reduce(torch.tensor(float(bad), device=acc.device), "max"))
                if bad:
                    self._non_finite(state["step"] + 1, step_terms, n_global, norm, scheduler)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                state["step"] += 1
                step = state["step"]
                self._step = step
                sparse_logs = self._sparse_step(step, total)  # pruned weights stay pruned

                # 4. per-step hooks: EMA teacher, TAID schedule, weight/temperature schedules
                values = {k: float(acc.reduce(v, "sum")) / n_global for k, v in step_terms.items()}
                values.update(meta_values)
                values.update(sparse_logs)
                for name, term in objective.meta_terms().items():
                    if term.last_alpha is not None:
                        values[f"{name}.alpha"] = float(term.last_alpha)
                if self.teacher is not None:
                    self.teacher.after_step(self.model.student)
                objective.after_step(step - 1, total, values)
                apply_schedules(t.schedules, objective, step)
                for k, v in values.items():
                    log_acc[k] = log_acc.get(k, 0.0) + v
                log_n += 1
                bar.update(step, values)

                # 5. log, evaluate, checkpoint
                if step % t.log_every == 0 or step == total:
                    rec = {k: v / log_n for k, v in log_acc.items()}
                    rec.update({f"{k}.t": v for k, v in objective.taid_t().items()})  # TAID
                    rec.update(
                        step=step,
                        epoch=round(step / steps_per_epoch, 4),
                        lr=scheduler.get_last_lr()[0],
                        elapsed_s=round(time.perf_counter() - t0, 3),
                        checkpoint_s=round(ck_total, 3),
                    )
                    self._log(acc, {"kind": "train", **rec})
                    log_acc, log_n = {}, 0
                if self.selection is not None:
                    for rec in self.selection.drain():
                        self._log(acc, rec)
                stop = False
                every = self.cfg.eval.every
                if self.val_data is not None and every and (step % every == 0 or step == total):
                    stop = self._evaluate(acc, step, state)
                for cb in self.callbacks:
                    if hasattr(cb, "on_step_end"):
                        stop = bool(cb.on_step_end(self, step, values)) or stop
                ck_every = t.checkpoint_every
                # time-based checkpoints: every checkpoint_minutes, and never more often than 20x
                # the last save took (so saving costs at most ~5% of the run)
                due = ck_minutes is not None and (
                    time.perf_counter() - last_ck >= max(60 * ck_minutes, 20 * ck_cost)
                )
                if world > 1 and ck_minutes is not None:  # the same decision on every process
                    due = bool(acc.reduce(torch.tensor(float(due), device=acc.device), "max"))
                due = due or bool(ck_every and step % ck_every == 0) or bool(stop_signal)
                if self.write_run and due and (step < total or stop_signal):
                    c0 = time.perf_counter()
                    ckpt.save(self.out, acc, self.model, optimizer, scheduler, self.teacher,
                              state, rank_tensors=self._rank_tensors())  # fmt: skip
                    last_ck = time.perf_counter()
                    ck_cost = last_ck - c0
                    ck_total += ck_cost
                if stop_signal:
                    acc.print(
                        f"signal {stop_signal[0]} received: checkpoint written at step {step}"
                    )
                    raise SystemExit(128 + stop_signal[0])
                if stop:
                    acc.print(f"early stopping at step {step}")
                    break
        finally:
            bar.close()
            _restore_signal_handlers(old_handlers)

        if self.write_run:
            ckpt.save(self.out, acc, self.model, optimizer, scheduler, self.teacher, state,
                      rank_tensors=self._rank_tensors())  # fmt: skip
        if main and self.write_run:
            self.save_student(self.model.student, self.out / "student")
            if self.selection is not None:
                from mentor.selection import SUMMARY_FILE

                summary = self.selection.summary(self.model.student)
                lines = (self.out / "metrics.jsonl").read_text().splitlines()
                rounds = [r for r in map(json.loads, lines) if r.get("kind") == "selection"]
                summary["rounds"] = [{k: v for k, v in r.items() if k != "kind"} for r in rounds]
                (self.out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
        acc.wait_for_everyone()
        if self.cfg.output.trackers:
            acc.end_training()
        return self.out

    # ------------------------------------------------------------------ helpers
    def _log(self, acc: Accelerator, record: dict[str, Any]) -> None:
        self.history.append(record)
        if acc.is_main_process and self.write_run:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(ckpt.finite(record), allow_nan=False) + "\n")
        if self.cfg.output.trackers:
            acc.log(
                {
                    f"{record['kind']}/{k}": v
                    for k, v in record.items()
                    if isinstance(v, (int, float))
                },
                step=record["step"],
            )

    def _evaluate(self, acc: Accelerator, step: int, state: dict[str, Any]) -> bool:
        """Held-out metrics on the main process; returns True when early stopping triggers."""
        stop = torch.tensor(0.0, device=acc.device)
        if acc.is_main_process:
            metrics = self.evaluate(self.val_data)
            self._log(acc, {"kind": "eval", "step": step, **metrics})
            es = self.cfg.eval.early_stopping
            if es is not None:
                if es.metric not in metrics:
                    raise ValueError(
                        f"eval.early_stopping.metric={es.metric!r} is not computed; "
                        f"available: {', '.join(sorted(metrics))}"
                    )
                value = metrics[es.metric]
                best = state["best"]
                better = best is None or (value > best if es.mode == "max" else value < best)
                if better:
                    state["best"], state["bad_evals"] = value, 0
                else:
                    state["bad_evals"] += 1
                stop.fill_(float(state["bad_evals"] >= es.patience))
        return bool(acc.reduce(stop, "sum") > 0)

    @torch.no_grad()
    def evaluate(self, data: Dataset) -> dict[str, float]:
        """Objective terms and the task's held-out metrics (accuracy or perplexity, agreement
        with a dense teacher signal) of the student on ``data``."""
        model, student = self.model, self.model.student
        was_training = student.training
        student.eval()
        dev = next(student.parameters()).device
        sums: dict[str, float] = {}
        n_total = 0
        acc = self.task.accumulator()
        for lo in range(0, len(data), self.cfg.eval.batch_size):
            hi = min(len(data), lo + self.cfg.eval.batch_size)
            batch = _to_device(self.collate([data[i] for i in range(lo, hi)]), dev)
            t_out = self.teacher(self.task.teacher_view(batch)) if self.teacher else TeacherOutput()
            outputs = model.student_outputs(batch)
            terms = model.terms(batch, t_out, outputs)
            n = self.task.count_positions(batch)
            n_total += n
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v) * n
            if isinstance(outputs, Tensor):
                seen = {"student": outputs}
                if isinstance(t_out.logits, Tensor) and t_out.logits.shape == outputs.shape:
                    seen["teacher"] = t_out.logits
                acc.add(batch, seen)
        student.train(was_training)
        out = {k: v / max(n_total, 1) for k, v in sums.items()}
        res = acc.result().get("student", {})
        for key in ("accuracy", "perplexity", "bits_per_byte", "agreement", "cosine_to_teacher"):
            if key in res:
                out[key] = res[key]
        return out


_TRACKER_MODULES = {
    "tensorboard": ("tensorboard", "tensorboardX"),
    "mlflow": ("mlflow",),
    "wandb": ("wandb",),
}


def term_needs_labels(loss: nn.Module) -> bool:
    """Whether a loss term reads the data's labels (ce, step_by_step, dkd, pld, kd with alpha>0)."""
    from mentor.losses.logit import ROWWISE

    if loss.name in LABEL_ONLY:
        return True
    if loss.name in ROWWISE:
        hp = {k: v for k, v in loss.hp.items() if k != "chunk_size"}
        return bool(ROWWISE[loss.name][0](**hp).needs_labels)
    return False


def _labelled_part(data: Dataset, objective: Objective, teacher_terms: list[str]) -> Dataset:
    """The training data as the objective can use it when some labels are hidden (-100).

    ``data.params.labeled`` keeps the labels of part of the training set. With teacher terms
    every example trains (the unlabelled ones through the teacher only); an objective of label
    terms alone trains on the labelled part only. No labels at all with a term that reads them
    is refused.
    """
    from mentor.data.sources import labeled_mask

    has = labeled_mask(data)
    if has is None or bool(has.all()):
        return data
    needs = [n for n, t in objective.terms.items() if term_needs_labels(t)]
    if not bool(has.any()) and needs:
        raise ValueError(
            f"the training data has no labels (data.params.labeled=0) but objective term(s) "
            f"{', '.join(needs)} read labels: drop them (label-free distillation uses teacher "
            "terms only, e.g. kd with alpha 0) or keep some labels (data.params.labeled=N)"
        )
    if teacher_terms:
        return data
    return torch.utils.data.Subset(data, torch.nonzero(has).flatten().tolist())


def _meta_split(data: Dataset, task: str, seed: int, terms: list[str]) -> tuple[Dataset, Dataset]:
    """Hold out 10% of the labelled training examples (at least one) for the fusion net of a
    meta term (``tgeo_kd``'s upper level); the rest trains the student."""
    if task != "classification":
        raise ValueError(
            f"objective term(s) {', '.join(terms)} (tgeo_kd) need classification data; this "
            f"run's task is {task}"
        )
    from mentor.data.sources import labeled_mask

    has = labeled_mask(data)
    pos = torch.arange(len(data)) if has is None else torch.nonzero(has).flatten()  # labelled
    if len(pos) < 2:
        raise ValueError(
            f"objective term(s) {', '.join(terms)} learn their fusion weights on held-out "
            "labelled examples, and the training data has fewer than 2 labels"
        )
    g = torch.Generator().manual_seed(seed + 4_242)
    perm = pos[torch.randperm(len(pos), generator=g)]
    n_meta = max(1, len(pos) // 10)
    meta = set(perm[:n_meta].tolist())
    keep = [i for i in range(len(data)) if i not in meta]
    return (
        torch.utils.data.Subset(data, keep),
        torch.utils.data.Subset(data, sorted(meta)),
    )


def _apply_selection_rules(selection: Any, objective: Objective, teacher_terms: list[str]) -> None:
    """What a selection method asks of the objective: no label terms for ``label_free``; the
    teacher terms' share of the loss set from the paid fraction for ``kd_pruned``."""
    if selection.spec.label_free:
        needs = [n for n, t in objective.terms.items() if term_needs_labels(t)]
        if needs:
            raise ValueError(
                f"selection.method=label_free trains on teacher signals only, but objective "
                f"term(s) {', '.join(needs)} read labels: drop them (kd needs alpha 0)"
            )
    alpha = selection.kd_weight()
    if alpha is None:
        return
    label_terms = [n for n in objective.terms if n not in teacher_terms]
    if not teacher_terms or not label_terms:
        raise ValueError(
            "selection.method=kd_pruned sets the balance of teacher and label terms from the "
            "paid fraction: the objective needs both (e.g. kd and ce)"
        )
    for names, share in ((teacher_terms, alpha), (label_terms, 1.0 - alpha)):
        total = sum(objective.weights[n] for n in names)
        for n in names:
            w = objective.weights[n]
            objective.weights[n] = share * (w / total if total > 0 else 1.0 / len(names))


def _check_trackers(trackers: Sequence[str]) -> None:
    """Fail before training when a requested tracker's package is not installed."""
    import importlib.util

    for name in trackers:
        mods = _TRACKER_MODULES.get(name, (name,))
        if not any(importlib.util.find_spec(m) for m in mods):
            raise ValueError(
                f"output.trackers includes {name!r} but its package is not installed: "
                f"pip install {mods[0]}  (or remove it from output.trackers)"
            )


def _check_generation(cfg: RunConfig, task: Task, data: Dataset) -> None:
    """Generation modes need a causal LM and prompt data; say which setting to change."""
    mode = cfg.generation.mode
    if not task.per_token:
        raise ValueError(
            f"generation.mode={mode} needs a causal LM task (the data is {task.name}); "
            "set generation.mode=off"
        )
    if "prompt_ids" not in data[0]:
        raise ValueError(
            f"generation.mode={mode} needs prompt data: set data.source=prompts (JSONL "
            "prompts/completions or text cut into prompt/continuation pairs)"
        )
    field = cfg.generation.reward_field
    if field is not None and field not in data[0]:
        raise ValueError(
            f"generation.reward_field={field!r}: the data has no field {field!r}; pass it "
            f"through from the JSONL with data.params.fields: [{field}]"
        )
    if field is not None and mode == "replay":
        raise ValueError(
            "generation.reward_field does not work with generation.mode=replay (the replay "
            "buffer keeps tokens, not data fields); use on_policy or mixed"
        )


def _longest_prompt(data: Dataset) -> int:
    """Tokens in the longest prompt of prompt data (its ``prompts`` list, else every item)."""
    prompts = getattr(data, "prompts", None)
    if isinstance(prompts, list):
        return max((len(p) for p in prompts), default=0)
    items = (data[i] for i in range(len(data)))
    return max((len(it.get("prompt_ids", it.get("prompt", ()))) for it in items), default=0)


def _check_context(cfg: RunConfig, data: Dataset, model: Any) -> None:
    """Prompt + ``max_new_tokens`` must fit the context window of a model that sees them."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if not isinstance(limit, int):
        return
    longest, new = _longest_prompt(data), cfg.generation.max_new_tokens
    if longest + new > limit:
        raise ValueError(
            f"the longest prompt ({longest} tokens) plus generation.max_new_tokens={new} is more "
            f"than the {limit}-token context window of the {type(model).__name__}: lower "
            f"generation.max_new_tokens, or cut prompts with data.params.max_prompt_tokens="
            f"{max(1, limit - new)} and data.params.truncate_prompts=true"
        )


def _eos_and_pad(model: nn.Module) -> tuple[Any, int]:
    """A generating model's EOS id(s) and the id written as padding (its pad, else EOS, else 0)."""
    cfg = getattr(model, "config", None)
    eos = getattr(cfg, "eos_token_id", None)
    pad = getattr(cfg, "pad_token_id", None)
    pad = pad if isinstance(pad, int) else (eos if isinstance(eos, int) else 0)
    return eos, pad


def _guess_task(data: Dataset) -> str:
    """``causal_lm_xtok`` for data tokenised per side, ``causal_lm`` for token data without
    labels, else ``classification``."""
    first = data[0]
    if "teacher_input_ids" in first:
        return "causal_lm_xtok"
    return "causal_lm" if "input_ids" in first and "labels" not in first else "classification"


def _check_cross_tokenizer(
    cfg: RunConfig, objective: Objective, task: Task, teacher: TeacherSource | None
) -> None:
    """Cross-tokenizer terms need data tokenised per side and a teacher run on its own tokens;
    data tokenised per side need cross-tokenizer teacher terms. Each error names the setting."""
    xtok = [n for n, t in objective.terms.items() if t.inputs == "xtok"]
    if xtok and not task.cross_tokenizer:
        raise ValueError(
            f"objective.{xtok[0]} is a cross-tokenizer loss: it needs the same text tokenised by "
            f"the teacher and by the student (data.source=xtok_text, task causal_lm_xtok); the "
            f"data here are {task.name} data"
        )
    if not task.cross_tokenizer:
        return
    same = [n for n, t in objective.terms.items() if t.inputs != "xtok" and t.name != "ce"]
    if same:
        raise ValueError(
            f"objective.{same[0]} ({objective.terms[same[0]].name}) compares teacher and student "
            "token by token over one vocabulary, but the data are tokenised per side "
            "(data.source=xtok_text): use a cross-tokenizer loss (uld, gold_hybrid) with ce"
        )
    if xtok and cfg.train.fused_loss_chunk is not None:
        raise ValueError(
            "train.fused_loss_chunk does not work with cross-tokenizer terms (they need the "
            "student's full logits): set train.fused_loss_chunk=null"
        )
    if xtok and teacher is not None and not isinstance(teacher, OnlineTeacher):
        name = getattr(teacher, "name", "") or type(teacher).__name__
        raise ValueError(
            f"teacher.source={name} does not work with cross-tokenizer terms "
            f"({', '.join(xtok)}): they need the teacher's full logits over its own tokens of "
            "each batch, which only a teacher module run on the batch gives; use "
            "teacher.source=online (the default) with teacher.builder or teacher.path"
        )
    top_k = getattr(teacher, "top_k", None)
    if xtok and top_k is not None:
        raise ValueError(
            f"teacher.top_k={top_k} does not work with cross-tokenizer terms (they compare full "
            "distributions): set teacher.top_k=null"
        )


def _with_settings(
    config: RunConfig | None,
    objective: Objective,
    train: Mapping[str, Any],
    output_dir: str | Path | None,
    eval_every: int | None,
) -> RunConfig:
    """``config`` (or the defaults) with keyword settings applied, validated like a recipe."""
    from mentor.config import validate

    data = (config or RunConfig()).model_dump(mode="json")
    if config is None:  # config.yaml records the objective that trains
        data["objective"] = _objective_record(objective)
    unknown = [k for k in train if k not in TrainConfig.model_fields]
    if unknown:
        raise TypeError(
            f"Distiller got an unexpected setting {unknown[0]!r}."
            f"{did_you_mean(unknown[0], list(TrainConfig.model_fields))} Keyword settings are "
            "train.* keys, output_dir and eval_every"
        )
    data["train"].update(train)
    if "max_steps" in train and "epochs" not in train:
        data["train"]["epochs"] = None
    if output_dir is not None:
        data["output"]["dir"] = str(output_dir)
    if eval_every is not None:
        data["eval"]["every"] = eval_every
    return validate(data)


def _objective_record(objective: Objective) -> dict[str, dict[str, Any]]:
    """Each term's loss, weight and non-default hyperparameters (plain values only)."""
    out = {}
    for name, term in objective.terms.items():
        rec: dict[str, Any] = {"loss": term.name, "weight": float(objective.weights[name])}
        for k, v in term.hp.items():
            if v != term.defaults.get(k) and isinstance(v, (bool, int, float, str)):
                rec[k] = v
        if name in objective.taps:
            rec["student"], rec["teacher"] = objective.taps[name]
        out[name] = rec
    return out


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}


def _logits_from_prompt_end(batch: dict[str, Any]) -> dict[str, Any]:
    """Mark a prompt batch so logits are computed from its last prompt position on."""
    prompt = batch.get("prompt_ids")
    if not isinstance(prompt, Tensor) or prompt.dim() != 2 or prompt.shape[1] < 2:
        return batch
    return {**batch, LOGITS_FROM: int(prompt.shape[1]) - 1}


def _sample_seed(seed: int, step: int, example: int, sample: int) -> int:
    """The seed of one sample: (run seed, optimizer step, example id, sample number)."""
    return (((seed * 1_000_003 + step) * 999_983 + example) * 1013 + sample) % (2**63 - 1)


def _repeat_rows(batch: dict[str, Any], k: int) -> dict[str, Any]:
    """Each row of a prompt batch ``k`` times in a row (tensors and per-row lists)."""
    if k == 1:
        return batch
    n = int(batch["prompt_ids"].shape[0])
    out: dict[str, Any] = {}
    for key, v in batch.items():
        if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == n:
            out[key] = v.repeat_interleave(k, dim=0)
        elif isinstance(v, list) and len(v) == n:
            out[key] = [x for x in v for _ in range(k)]
        else:
            out[key] = v
    return out


def _example_ids(batch: dict[str, Any], rank: int, micro: int) -> Tensor:
    """Each row's example id (``index``); without one, an id from (process, micro-batch, row)."""
    index = batch.get("index")
    if isinstance(index, Tensor):
        return index.detach().long().cpu().reshape(-1)
    n = int(batch["prompt_ids"].shape[0])
    return torch.arange(n) + (rank * 1009 + micro) * 100_003


def _with_groups(batch: dict[str, Any], ids: Tensor | None = None) -> dict[str, Any]:
    """The batch with ``groups``: rows with equal values are samples of the same prompt."""
    if ids is None:
        ids = _example_ids(batch, 0, 0)
    return {**batch, "groups": ids.to(batch["input_ids"].device)}


def _save_state_dict(student: nn.Module, folder: Path) -> None:
    """Default export: ``model.safetensors`` (tied/shared weights handled), written atomically."""
    from safetensors.torch import save_model

    folder.mkdir(parents=True, exist_ok=True)
    save_model(student, str(folder / "model.safetensors.tmp"))
    (folder / "model.safetensors.tmp").replace(folder / "model.safetensors")


def _install_signal_handlers(flag: list[int]) -> dict[int, Any]:
    """SIGINT/SIGTERM set ``flag``; the loop checkpoints at the end of the step and exits."""
    old: dict[int, Any] = {}

    def handler(signum: int, _frame: Any) -> None:
        if flag:  # second signal: stop now
            raise KeyboardInterrupt
        flag.append(signum)

    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            old[sig] = signal.signal(sig, handler)
        except ValueError:  # not in the main thread
            pass
    return old


def _restore_signal_handlers(old: dict[int, Any]) -> None:
    for sig, h in old.items():
        signal.signal(sig, h)
