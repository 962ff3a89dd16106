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
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import Tensor, nn
from torch.utils.data import Dataset, default_collate

from mentor.config import RunConfig, dump_config
from mentor.engine import checkpoint as ckpt
from mentor.engine.progress import Progress
from mentor.engine.schedules import apply_schedules, check_schedules, lr_lambda
from mentor.eval.metrics import accuracy, agreement
from mentor.losses import Objective
from mentor.losses.objective import FusedHead
from mentor.models import model_outputs
from mentor.teachers import FeatureTaps, OnlineTeacher, TeacherOutput, TeacherSource
from mentor.teachers.sources import linear_head

# Feature/batch terms may name this pseudo tap to compare the models' outputs themselves
# (e.g. sentence embeddings: ``{loss: cosine_embedding, student: output, teacher: output}``).
OUTPUT_TAP = "output"


class DistillModule(nn.Module):
    """The student, its feature taps and the objective (with any learned projectors) as one
    trainable module, so DDP synchronises all trainable parameters together."""

    def __init__(
        self, student: nn.Module, objective: Objective, task: str, fused_chunk: int | None = None
    ) -> None:
        """Attach taps named by the objective's feature terms (validated now)."""
        super().__init__()
        self.student = student
        self.objective = objective
        self.task = task
        self.fused_chunk = fused_chunk
        if fused_chunk is not None:
            _check_fusable(student, task)
        paths = [s for s, _ in objective.taps.values() if s != OUTPUT_TAP]
        self._taps = FeatureTaps(student, paths, role="student") if paths else None

    def forward(self, batch: dict[str, Any], teacher: TeacherOutput) -> dict[str, Tensor]:
        """Student forward, then every objective term against the teacher's signal."""
        if self.fused_chunk is not None:
            logits = _fused_head(self.student, batch, self.fused_chunk)
        else:
            logits = model_outputs(self.student, batch)
        feats = self._taps.pop() if self._taps else {}
        t_logits, labels, mask = teacher.logits, batch.get("labels"), None
        if self.task == "causal_lm":
            logits, t_logits = logits[:, :-1], _shift(t_logits)
            labels = batch["input_ids"][:, 1:]
            mask = batch.get("attention_mask")
            mask = mask[:, 1:].bool() if mask is not None else None
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
            student_features=feats,
            teacher_features=t_feats,
        )


def _check_fusable(student: nn.Module, task: str) -> None:
    if task != "causal_lm" or linear_head(student) is None:
        raise ValueError(
            "train.fused_loss_chunk needs a causal LM student with a linear output head "
            "(a Hugging Face *ForCausalLM); set train.fused_loss_chunk=null for this model"
        )


def _fused_head(student: nn.Module, batch: dict[str, Any], chunk: int) -> FusedHead:
    """Run the student body only; the objective applies the output head chunk by chunk."""
    out = student.base_model(
        input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")
    )
    head = student.get_output_embeddings()
    return FusedHead(out.last_hidden_state, head.weight, head.bias, chunk)


def _shift(signal_: Any) -> Any:
    """Drop the last position of a dense or sparse per-token teacher signal."""
    if signal_ is None:
        return None
    if getattr(signal_, "aligned", False):  # cached signals may already be shifted
        return signal_
    return signal_[:, :-1]


def count_positions(batch: dict[str, Any], task: str) -> int:
    """Positions a micro-batch contributes to the loss mean (tokens for LMs, rows otherwise)."""
    if task == "causal_lm":
        m = batch.get("attention_mask")
        ids = batch["input_ids"]
        return int(m[:, 1:].sum()) if m is not None else ids.shape[0] * (ids.shape[1] - 1)
    labels = batch.get("labels")
    if labels is not None:
        return int((labels != -100).sum())
    return len(batch["index"]) if "index" in batch else len(next(iter(batch.values())))


class Distiller:
    """Train ``student`` to imitate ``teacher`` under ``objective``.

    ``Distiller(student, teacher, objective, train_data, config).fit()`` returns the run
    directory, which holds ``config.yaml``, ``metrics.jsonl``, ``checkpoints/`` and the final
    ``student/``.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: TeacherSource | None,
        objective: Objective,
        train_data: Dataset,
        config: RunConfig,
        *,
        val_data: Dataset | None = None,
        task: str = "classification",
        save_student: Callable[[nn.Module, Path], None] | None = None,
        collate_fn: Callable[[list[Any]], dict[str, Any]] = default_collate,
        callbacks: Sequence[Any] = (),
    ) -> None:
        """Check the set-up (taps, schedules, data size) before anything runs."""
        self.cfg = config
        self.teacher = teacher
        self.train_data, self.val_data = train_data, val_data
        self.task = task
        self.save_student = save_student or _save_state_dict
        self.collate = collate_fn
        self.callbacks = list(callbacks)
        self.out = Path(config.output.dir)
        teacher_terms = [n for n, t in objective.terms.items() if t.name != "ce"]
        if teacher is None and teacher_terms:
            raise ValueError(
                f"the objective has teacher terms ({', '.join(teacher_terms)}) but no teacher "
                "was given: pass a teacher, or use only a 'ce' term"
            )
        check_schedules(config.train.schedules, objective)
        self.model = DistillModule(student, objective, task, config.train.fused_loss_chunk)
        # with a fused student head, an online causal-LM teacher's logits are fused too: its
        # hidden states and head go to the loss, which computes them chunk by chunk
        self._teacher_head = (
            config.train.fused_loss_chunk is not None
            and isinstance(teacher, OnlineTeacher)
            and OUTPUT_TAP not in {t for _, t in objective.taps.values()}
            and linear_head(teacher.module) is not None
        )
        self.history: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ set-up helpers
    def _steps_per_epoch(self, world: int) -> int:
        n = len(self.train_data) // (self.cfg.train.batch_size * world)
        if n == 0:
            raise ValueError(
                f"train.batch_size={self.cfg.train.batch_size} x {world} process(es) is larger "
                f"than the training set ({len(self.train_data)} examples): lower train.batch_size"
            )
        return max(1, n // self.cfg.train.grad_accum)

    def total_steps(self, world: int = 1) -> int:
        """Optimizer steps this run will take."""
        t = self.cfg.train
        if t.max_steps is not None:
            return t.max_steps
        return max(1, math.ceil((t.epochs or 1.0) * self._steps_per_epoch(world)))

    def _batches(self, epoch: int, start: int, rank: int, world: int) -> Iterator[dict[str, Any]]:
        """Micro-batches of this rank from position ``start`` of ``epoch`` (deterministic)."""
        b = self.cfg.train.batch_size
        g = torch.Generator().manual_seed(self.cfg.train.seed * 1_000_003 + epoch)
        perm = torch.randperm(len(self.train_data), generator=g)
        n_batches = len(self.train_data) // (b * world)
        for k in range(start, n_batches):
            lo = k * b * world + rank * b
            yield self.collate([self.train_data[int(i)] for i in perm[lo : lo + b]])

    def _teacher_output(self, batch: dict[str, Any]) -> TeacherOutput:
        if self.teacher is None:
            return TeacherOutput()
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

    def _prepare_dir(self, resume: bool) -> None:
        exists = (self.out / "metrics.jsonl").exists() or (self.out / "checkpoints").exists()
        if exists and not resume and not self.cfg.output.overwrite:
            raise FileExistsError(
                f"run directory {self.out} already holds a run: continue it with --resume, "
                f"or set output.overwrite=true, or choose another output.dir"
            )
        if exists and not resume:
            ckpt.clear_run(self.out)
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "config.yaml").write_text(dump_config(self.cfg))

    # ------------------------------------------------------------------ the loop
    def fit(self, resume: bool = False) -> Path:
        """Train; return the run directory. ``resume=True`` continues from the last checkpoint."""
        t = self.cfg.train
        _check_trackers(self.cfg.output.trackers)
        acc = Accelerator(
            cpu=not torch.cuda.is_available(),  # multi-process CPU runs use gloo
            mixed_precision="bf16" if t.precision == "bf16" else "no",
            log_with=list(self.cfg.output.trackers) or None,
            project_dir=str(self.out),
        )
        rank, world, main = acc.process_index, acc.num_processes, acc.is_main_process
        if main:
            self._prepare_dir(resume)
        acc.wait_for_everyone()
        set_seed(t.seed + rank)
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
        if resume:
            loaded = ckpt.load_latest(self.out, acc, self.model, optimizer, scheduler, self.teacher)
            if loaded is None:
                acc.print(f"no checkpoint in {self.out}/checkpoints: starting from step 0")
            else:
                state.update(loaded)
                if main:
                    ckpt.truncate_metrics(self.out / "metrics.jsonl", state["step"])
        apply_schedules(t.schedules, objective, state["step"])

        stop_signal: list[int] = []
        old_handlers = _install_signal_handlers(stop_signal)
        bar = Progress(total, enabled=main and t.progress, initial=state["step"])
        batches = self._batches(state["epoch"], state["pos"], rank, world)
        log_acc: dict[str, float] = {}
        log_n, t0 = 0, time.perf_counter()
        try:
            while state["step"] < total:
                # 1. gather this step's micro-batches (so the count of positions is known)
                window = []
                while len(window) < t.grad_accum:
                    batch = next(batches, None)
                    if batch is None:
                        state["epoch"], state["pos"] = state["epoch"] + 1, 0
                        batches = self._batches(state["epoch"], 0, rank, world)
                        continue
                    state["pos"] += 1
                    window.append(_to_device(batch, acc.device))
                counts = [count_positions(b, self.task) for b in window]
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

                # 3. optimizer step
                if t.grad_clip is not None:
                    acc.clip_grad_norm_(model.parameters(), t.grad_clip)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                state["step"] += 1
                step = state["step"]

                # 4. per-step hooks: EMA teacher, TAID schedule, weight/temperature schedules
                values = {k: float(acc.reduce(v, "sum")) / n_global for k, v in step_terms.items()}
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
                    rec.update(
                        step=step,
                        epoch=round(step / steps_per_epoch, 4),
                        lr=scheduler.get_last_lr()[0],
                        elapsed_s=round(time.perf_counter() - t0, 3),
                    )
                    self._log(acc, {"kind": "train", **rec})
                    log_acc, log_n = {}, 0
                stop = False
                every = self.cfg.eval.every
                if self.val_data is not None and every and (step % every == 0 or step == total):
                    stop = self._evaluate(acc, step, state)
                for cb in self.callbacks:
                    if hasattr(cb, "on_step_end"):
                        stop = bool(cb.on_step_end(self, step, values)) or stop
                ck_every = t.checkpoint_every
                if (ck_every and step % ck_every == 0) or stop_signal or stop:
                    ckpt.save(self.out, acc, self.model, optimizer, scheduler, self.teacher, state)
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

        ckpt.save(self.out, acc, self.model, optimizer, scheduler, self.teacher, state)
        if main:
            self.save_student(self.model.student, self.out / "student")
        acc.wait_for_everyone()
        if self.cfg.output.trackers:
            acc.end_training()
        return self.out

    # ------------------------------------------------------------------ helpers
    def _log(self, acc: Accelerator, record: dict[str, Any]) -> None:
        self.history.append(record)
        if acc.is_main_process:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
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
        """Objective terms, task metric and teacher agreement on ``data``."""
        model, student = self.model, self.model.student
        was_training = student.training
        student.eval()
        dev = next(student.parameters()).device
        sums: dict[str, float] = {}
        n_total = 0
        s_all, t_all, y_all = [], [], []
        bs = self.cfg.eval.batch_size
        for lo in range(0, len(data), bs):
            batch = _to_device(
                self.collate([data[i] for i in range(lo, min(len(data), lo + bs))]), dev
            )
            t_out = self.teacher(batch) if self.teacher else TeacherOutput()
            terms = model(batch, t_out)
            n = count_positions(batch, self.task)
            n_total += n
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v) * n
            if self.task == "classification":
                s_all.append(model_outputs(student, batch).float().cpu())
                y_all.append(batch["labels"].cpu())
                if isinstance(t_out.logits, Tensor):
                    t_all.append(t_out.logits.float().cpu())
        student.train(was_training)
        out = {k: v / max(n_total, 1) for k, v in sums.items()}
        if self.task == "causal_lm" and "ce" in out:
            out["perplexity"] = math.exp(min(out["ce"], 50.0))
        if s_all:
            s, y = torch.cat(s_all), torch.cat(y_all)
            out["accuracy"] = accuracy(s, y)
            if t_all:
                out["agreement"] = agreement(s, torch.cat(t_all))
        return out


_TRACKER_MODULES = {
    "tensorboard": ("tensorboard", "tensorboardX"),
    "mlflow": ("mlflow",),
    "wandb": ("wandb",),
}


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


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}


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
