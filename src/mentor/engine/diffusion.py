"""The diffusion (generative) task: fit a teacher denoiser, distil a few-step student, evaluate.

The loop, readable top to bottom (:class:`DiffusionDistiller`)::

    for each optimizer step:
        x0 = a batch of training samples, drawn with the run's seeded torch.Generator
        logs = objective.train_step(student, teacher, x0, optimizer, generator)
               (DMD2: its fake-score updates first; every objective: loss, backward, clip,
               step, after_step — mentor.diffusion.objectives)
        LR schedule step; a non-finite loss stops the run
        log -> metrics.jsonl (kind: train); checkpoint every train.checkpoint_every steps,
        every train.checkpoint_minutes, and on SIGTERM/SIGINT (then exit 128 + signal)

Every random draw of the run (batches, noise, timesteps, the objectives' own draws) comes from
one ``torch.Generator`` whose state is checkpointed with the student, its optimizer and LR
schedule, and ``objective.state_dict()`` (counters, EMA targets, DMD2's fake score and its
optimizer, progressive teachers), so ``--resume`` continues bit for bit as if never stopped.

Evaluation (:func:`evaluate`): samples from the teacher at each NFE of
``diffusion.eval_teacher_steps`` and the student at each of ``diffusion.student_steps`` from
the same initial noise; 2-D points against fresh draws of the mixture (MMD, Gretton et al.
2012; mode coverage, Metz et al. 2017), images against the held-out images in the penultimate
features of a small classifier (Fréchet distance, Heusel et al. 2017; precision/recall,
Kynkäänniemi et al. 2019) — Inception weights are not available offline, so this is
classifier-feature FD, not FID. Latency is CPU wall-clock per sample.
"""

from __future__ import annotations

import json
import math
import shutil
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from mentor._console import err as console
from mentor.config import DiffusionConfig, FitConfig, RunConfig, dump_config
from mentor.data.generative import data_tensor
from mentor.data.sources import DataBundle, DataInfo
from mentor.diffusion.schedules import VPSchedule
from mentor.engine import checkpoint as ckpt
from mentor.engine import rundir
from mentor.losses.schedules import lr_lambda
from mentor.progress import Progress

STATE_FILE = "state.pt"
STUDENT_FILE = "student.safetensors"
SAMPLE_SEED_OFFSET = 7919  # evaluation noise: train.seed + this (the same for every model/NFE)


# ----------------------------------------------------------------------------- set-up


def make_schedule(dcfg: DiffusionConfig) -> VPSchedule:
    """The run's noise schedule (shared by teacher, student and objective): a diffusers
    ``DDPMScheduler`` (Ho et al., 2020) from the ``diffusion`` keys, or from the
    ``diffusion.scheduler_config`` file (a pretrained pipeline's ``scheduler_config.json``)."""
    if dcfg.scheduler_config:
        return schedule_from_file(dcfg.scheduler_config)
    try:
        return VPSchedule.default(
            dcfg.num_train_timesteps, dcfg.beta_schedule, dcfg.prediction_type
        )
    except ValueError as e:
        raise ValueError(f"diffusion: {e}") from None


def schedule_from_file(path: str | Path) -> VPSchedule:
    """A :class:`VPSchedule` from a diffusers scheduler config JSON (errors name the key)."""
    from diffusers import DDPMScheduler

    p = Path(path).expanduser()
    try:
        raw = json.loads(p.read_text())
    except FileNotFoundError:
        raise ValueError(f"diffusion.scheduler_config={str(p)!r} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"diffusion.scheduler_config={str(p)!r} is not JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"diffusion.scheduler_config={str(p)!r} must hold a JSON object")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return VPSchedule.from_scheduler(DDPMScheduler.from_config(raw))
    except (ValueError, TypeError, NotImplementedError) as e:
        raise ValueError(f"diffusion.scheduler_config={str(p)!r}: {e}") from None


def check_teacher_sampler(schedule: VPSchedule, dcfg: DiffusionConfig) -> None:
    """Refuse, before anything trains, a teacher sampler the schedule cannot run at every
    evaluated NFE (a dry run with a zero denoiser on one sample)."""
    from mentor.diffusion.samplers import sample

    def zero(x: Tensor, t: Tensor) -> Tensor:
        return torch.zeros_like(x)

    for n in sorted({*dcfg.eval_teacher_steps, dcfg.teacher_steps}):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out = sample(zero, schedule, (1, 1), n, method=dcfg.teacher_sampler)
        except (ValueError, RuntimeError, IndexError, TypeError) as e:
            raise ValueError(
                f"diffusion.teacher_sampler={dcfg.teacher_sampler} cannot run the teacher's "
                f"schedule ({_describe(schedule)}) at {n} steps: {e}. Choose another "
                "diffusion.teacher_sampler (ddim, euler, dpm_multistep) or fix the schedule "
                "(diffusion.scheduler_config)"
            ) from None
        if not bool(torch.isfinite(out).all()):
            raise ValueError(
                f"diffusion.teacher_sampler={dcfg.teacher_sampler} gives non-finite samples on "
                f"this schedule at {n} steps ({_describe(schedule)}); choose ddim or another "
                "schedule"
            )


def _describe(schedule: VPSchedule) -> str:
    d = schedule.describe()
    return (f"prediction_type={d['prediction_type']}, beta_schedule={d['beta_schedule']}, "
            f"{d['num_train_timesteps']} timesteps")  # fmt: skip


def total_steps(cfg: RunConfig, n_train: int) -> int:
    """Optimizer steps of the run: ``train.max_steps``, else epochs over the training set."""
    t = cfg.train
    if t.max_steps is not None:
        return int(t.max_steps)
    return max(1, math.ceil(float(t.epochs or 1.0) * n_train / t.batch_size))


# progressive distillation's first student step count when the recipe sets none (matched to
# 16 teacher steps; the class's own default, 256, suits runs of 10^5 steps per round)
PROGRESSIVE_START = 8


def objective_kwargs(dcfg: DiffusionConfig, steps: int) -> dict[str, Any]:
    """``diffusion.params`` with run-length defaults: the consistency curriculum (iCT's N(k))
    spans the run (``total_steps``), Hyper-SD's stages split it evenly (``iters_per_stage``),
    and progressive distillation halves 8 → 4 → 2 → 1 student steps in equal rounds
    (``student_steps`` 8, ``final_student_steps`` 1, ``iters_per_round`` = steps / 4)."""
    params = dcfg.objective_kwargs()
    if dcfg.objective in ("consistency_distillation", "consistency_training"):
        params.setdefault("total_steps", steps)
    elif dcfg.objective == "progressive" and "iters_per_round" not in params:
        n = params.setdefault("student_steps", PROGRESSIVE_START)
        final = params.setdefault("final_student_steps", 1)
        if isinstance(n, int) and isinstance(final, int) and 0 < final < n and n % final == 0:
            rounds = (n // final).bit_length()  # 8 -> 1: rounds of 8, 4, 2, 1 steps
            params["iters_per_round"] = max(1, math.ceil(steps / rounds))
    elif dcfg.objective == "hyper_sd_tscd":
        segments = params.get("segments", (8, 4, 2, 1))
        n = len(segments) if isinstance(segments, (list, tuple)) and segments else 1
        params.setdefault("iters_per_stage", max(1, math.ceil(steps / n)))
    return params


def build_diffusion_objective(dcfg: DiffusionConfig, schedule: VPSchedule, steps: int) -> Any:
    """The configured objective on ``schedule`` (its errors name ``diffusion.params``)."""
    from mentor.diffusion.objectives import build_objective

    try:
        return build_objective(dcfg.objective, schedule=schedule, **objective_kwargs(dcfg, steps))
    except (ValueError, TypeError) as e:
        raise ValueError(f"diffusion.params: {e}") from None


@contextmanager
def torch_threads(dcfg: DiffusionConfig | None, info: DataInfo) -> Iterator[None]:
    """``diffusion.threads`` torch threads for the duration (None: 1 for 2-D points)."""
    n = None if dcfg is None else dcfg.threads
    if n is None and len(info.input_shape or ()) == 1:
        n = 1
    old = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(old)


def fit_teacher(
    model: nn.Module, bundle: DataBundle, fit: FitConfig, cfg: RunConfig
) -> list[float]:
    """``teacher.fit`` on diffusion data: the DDPM denoising objective (Ho et al., 2020) via
    :func:`mentor.diffusion.fit.fit_denoiser`.

    ``steps = ceil(epochs × training samples / batch_size)``, AdamW at ``fit.lr`` (constant)
    with ``fit.weight_decay``, gradient clipping at 1, seeded by ``train.seed``;
    ``diffusion.teacher_ema`` keeps an EMA of the weights (loaded at the end).
    """
    from mentor.diffusion.fit import fit_denoiser

    dcfg = cfg.diffusion
    if dcfg is None:
        raise ValueError(diffusion_section_missing(cfg))
    x = data_tensor(bundle.train)
    bs = min(int(fit.batch_size), len(x))
    steps = max(1, math.ceil(float(fit.epochs) * len(x) / bs))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch_threads(dcfg, bundle.info):
        losses = fit_denoiser(
            model.to(device), make_schedule(dcfg), x, steps=steps, batch_size=bs, lr=fit.lr,
            seed=cfg.train.seed, ema=dcfg.teacher_ema, weight_decay=fit.weight_decay,
            progress=cfg.train.progress,
        )  # fmt: skip
    model.cpu().requires_grad_(False)
    return losses


def diffusion_section_missing(cfg: RunConfig) -> str:
    return (
        f"data.source={cfg.data.source} gives diffusion (generative) data: the recipe needs a "
        "diffusion: section (objective, schedule, evaluation; see docs/diffusion.md, e.g. the "
        "diffusion-2d recipe)"
    )


# ----------------------------------------------------------------------------- the trainer


class DiffusionDistiller:
    """Distil ``teacher`` into ``student`` with a few-step ``objective`` on ``data``.

    ``fit(resume=False)`` writes ``RUN/config.yaml``, ``metrics.jsonl``, ``checkpoints/`` and
    ``student/`` (via ``save_model`` with ``builder``/``params``/``info``) and returns the run
    directory. See the module docstring for the loop and what a checkpoint holds.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None,
        objective: Any,
        data: Any,
        cfg: RunConfig,
        *,
        info: DataInfo | None = None,
        builder: str | None = None,
        params: dict[str, Any] | None = None,
    ) -> None:
        self.student, self.teacher, self.objective, self.cfg = student, teacher, objective, cfg
        self.x = data_tensor(data).float()
        if len(self.x) < 1:
            raise ValueError("the training split holds no samples")
        self.info = info or DataInfo(task="diffusion", input_shape=tuple(self.x.shape[1:]))
        self.builder = builder or cfg.student.builder
        self.params = dict(cfg.student.params if params is None else params)
        self.out = Path(cfg.output.dir)
        self.history: list[dict[str, Any]] = []
        self.diverged_at: int | None = None
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def total_steps(self) -> int:
        return total_steps(self.cfg, len(self.x))

    # ------------------------------------------------------------------ run directory
    def _prepare_dir(self, resume: bool) -> Path | None:
        return rundir.prepare(self.out, dump_config(self.cfg), resume, console.print)

    def _undo_new_run(self, moved: Path | None) -> None:
        if (self.out / rundir.MARKER).exists():
            shutil.rmtree(self.out, ignore_errors=True)
        if moved is not None and not self.out.exists():
            moved.rename(self.out)

    def fit(self, resume: bool = False) -> Path:
        """Train; return the run directory. ``resume=True`` continues from the last checkpoint."""
        changes = rundir.check_output(self.cfg, resume)
        moved = self._prepare_dir(resume)
        try:
            with torch_threads(self.cfg.diffusion, self.info):
                return self._fit(resume, changes)
        except BaseException:
            if not resume and not self._checkpoints():
                self._undo_new_run(moved)  # nothing worth keeping: leave the disk as it was
            raise

    # ------------------------------------------------------------------ one step
    def train_step(
        self, x0: Tensor, optimizer: torch.optim.Optimizer, generator: torch.Generator
    ) -> dict[str, Any]:
        """One ``objective.train_step``; the objective's divergence warning is captured (the
        loop prints it once through the console)."""
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", RuntimeWarning)
            logs = self.objective.train_step(
                self.student, self.teacher, x0, optimizer, generator,
                max_grad_norm=self.cfg.train.grad_clip,
            )  # fmt: skip
        for w in caught:
            text = str(w.message)
            if "fake-score loss" in text:
                logs["diverged"] = True
                logs.setdefault("divergence_message", text)
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        return logs

    # ------------------------------------------------------------------ checkpoints
    def _save(self, state: dict[str, Any], optimizer: Any, scheduler: Any, gen: Any) -> Path:
        from safetensors.torch import save_model

        step = state["step"]
        cdir = self.out / "checkpoints"
        final, tmp = cdir / f"step_{step:08d}", cdir / f".tmp-step_{step:08d}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_model(self.student, str(tmp / STUDENT_FILE))
        torch.save(
            {
                **state,
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "objective": self.objective.state_dict(),
                "generator": gen.get_state(),
                "torch_rng": torch.get_rng_state(),
            },
            tmp / STATE_FILE,
        )
        ckpt.write_checksums(tmp)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in self._checkpoints()[: -ckpt.KEEP]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def _checkpoints(self) -> list[Path]:
        d = self.out / "checkpoints"
        if not d.exists():
            return []
        return sorted(p for p in d.glob("step_*") if (p / STATE_FILE).exists())

    def _load_latest(self, optimizer: Any, scheduler: Any, gen: Any) -> dict[str, Any] | None:
        """Restore the newest intact checkpoint (checksums verified; a damaged one is reported
        and the previous one used); None when there is none."""
        from safetensors.torch import load_model

        found = self._checkpoints()
        if not found:
            return None
        damaged = []
        for d in reversed(found):
            problems = ckpt.verify(d)
            if not problems:
                try:
                    missing, unexpected = load_model(
                        self.student, str(d / STUDENT_FILE), strict=False
                    )
                    if missing or unexpected:
                        raise ckpt.CheckpointError(
                            f"checkpoint {d} does not fit this run's student (missing "
                            f"{missing[:3]}, unexpected {unexpected[:3]}): was the recipe changed?"
                        )
                    st = torch.load(d / STATE_FILE, weights_only=True)
                    optimizer.load_state_dict(st.pop("optimizer"))
                    scheduler.load_state_dict(st.pop("scheduler"))
                    self.objective.load_state_dict(st.pop("objective"))
                    gen.set_state(st.pop("generator"))
                    torch.set_rng_state(st.pop("torch_rng"))
                except ckpt.CheckpointError:
                    raise
                except Exception as e:  # a file that verifies but cannot be read
                    problems = [f"cannot be loaded: {type(e).__name__}: {e}"]
                else:
                    for name, why in damaged:
                        console.print(
                            f"checkpoint {name} is damaged ({why}): resumed from {d.name}"
                        )
                    console.print(f"resumed from {d} (step {st['step']})", highlight=False)
                    return st
            damaged.append((d.name, "; ".join(problems)))
        raise ckpt.CheckpointError(
            f"no intact checkpoint in {self.out / 'checkpoints'}: "
            + "; ".join(f"{n}: {w}" for n, w in damaged)
            + ". Start the run again (output.overwrite=true moves this one aside)"
        )

    # ------------------------------------------------------------------ the loop
    def _make_optimizer(self) -> torch.optim.Optimizer:
        t = self.cfg.train
        params = [p for p in self.student.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the student has no trainable parameters")
        if t.optimizer == "sgd":
            return torch.optim.SGD(
                params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay
            )
        return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)

    def _fit(self, resume: bool, changes: list[tuple[str, Any, Any]]) -> Path:
        from mentor.engine.loop import _install_signal_handlers, _restore_signal_handlers
        from mentor.students import save_model

        t = self.cfg.train
        dev = self.device
        self.student.to(dev).train()
        if self.teacher is not None:
            self.teacher.to(dev).eval().requires_grad_(False)
        x = self.x.to(dev)
        total = self.total_steps()
        optimizer = self._make_optimizer()
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_lambda(t.schedule, t.warmup_steps, total)
        )
        gen = torch.Generator().manual_seed(int(t.seed))
        torch.manual_seed(int(t.seed))
        state: dict[str, Any] = {"step": 0, "log_acc": {}, "log_n": 0, "diverged_at": None}
        metrics = self.out / "metrics.jsonl"
        if resume:
            loaded = self._load_latest(optimizer, scheduler, gen)
            if loaded is None:
                console.print(f"no checkpoint in {self.out}/checkpoints: starting from step 0")
            else:
                state.update(loaded)
                for key, old, new in changes:
                    if key == "train.lr":
                        rundir.apply_lr_change(optimizer, scheduler, new)
                    console.print(f"--resume: {key} {old!r} -> {new!r}", highlight=False)
            ckpt.truncate_metrics(metrics, state["step"])
        self.diverged_at = state["diverged_at"]
        log_acc: dict[str, float] = dict(state["log_acc"])
        log_n = int(state["log_n"])
        stop_signal: list[int] = []
        old_handlers = _install_signal_handlers(stop_signal)
        bar = Progress(total, enabled=t.progress, initial=state["step"], label="distil",
                       unit="steps")  # fmt: skip
        last_ck, ck_cost, t0 = time.perf_counter(), 0.0, time.perf_counter()
        n = len(x)
        try:
            while state["step"] < total:
                idx = torch.randint(0, n, (t.batch_size,), generator=gen)
                logs = self.train_step(x[idx.to(dev)], optimizer, gen)
                scheduler.step()
                state["step"] += 1
                step = state["step"]
                loss = logs.get("loss")
                if isinstance(loss, float) and not math.isfinite(loss):
                    raise FloatingPointError(
                        f"step {step}: the {self.objective.name} loss is {loss}; training stopped "
                        f"(the last checkpoint is kept). Lower train.lr (now {t.lr:g}) or "
                        "train.grad_clip, then --resume"
                    )
                if logs.get("diverged") and self.diverged_at is None:
                    self.diverged_at = state["diverged_at"] = step
                    console.print(f"[yellow]warning: step {step}: "
                                  f"{logs.get('divergence_message', 'the fake score diverged')}[/]",
                                  highlight=False)  # fmt: skip
                for k, v in logs.items():
                    if isinstance(v, (int, float)) and not isinstance(v, bool):
                        log_acc[k] = log_acc.get(k, 0.0) + float(v)
                    elif k == "diverged" and v:
                        log_acc["diverged"] = 1.0
                log_n += 1
                bar.update(step, {k: v for k, v in logs.items() if k in ("loss", "fake_loss")})
                if step % t.log_every == 0 or step == total:
                    rec = {
                        k: (v / log_n if k != "diverged" else bool(v)) for k, v in log_acc.items()
                    }
                    rec.update(step=step, lr=scheduler.get_last_lr()[0],
                               elapsed_s=round(time.perf_counter() - t0, 3))  # fmt: skip
                    self._log({"kind": "train", **rec})
                    log_acc, log_n = {}, 0
                state["log_acc"], state["log_n"] = dict(log_acc), log_n
                due = bool(t.checkpoint_every and step % t.checkpoint_every == 0)
                if t.checkpoint_minutes is not None:
                    waited = time.perf_counter() - last_ck
                    due = due or waited >= max(60 * t.checkpoint_minutes, 20 * ck_cost)
                if (due and step < total) or stop_signal:
                    c0 = time.perf_counter()
                    self._save(state, optimizer, scheduler, gen)
                    last_ck = time.perf_counter()
                    ck_cost = last_ck - c0
                if stop_signal:
                    console.print(
                        f"signal {stop_signal[0]} received: checkpoint written at step {step}"
                    )
                    raise SystemExit(128 + stop_signal[0])
        finally:
            bar.close()
            _restore_signal_handlers(old_handlers)
        self._save(state, optimizer, scheduler, gen)
        self.student.eval()
        save_model(self.student, self.out / "student", self.builder, self.params, self.info)
        return self.out

    def _log(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(ckpt.finite(record), allow_nan=False) + "\n")


# ----------------------------------------------------------------------------- sampling


def _chunked(fn: Callable[[Tensor], Tensor], noise: Tensor, batch_size: int) -> Tensor:
    return torch.cat([fn(noise[i : i + batch_size]) for i in range(0, len(noise), batch_size)])


def consistency_eval_timesteps(objective: Any, nfe: int) -> list[int]:
    """Timesteps of ``nfe``-step consistency sampling: the trailing grid of the schedule with
    the first point at the objective's ``t_max`` (where its boundary condition holds), all
    within ``[t_min, t_max]`` and strictly descending."""
    ts = [int(t) for t in objective.schedule.timesteps(nfe).tolist()]
    ts[0] = min(ts[0], objective.t_max)
    out: list[int] = []
    for t in ts:
        t = max(min(t, objective.t_max), objective.t_min)
        if not out or t < out[-1]:
            out.append(t)
    return out


def student_sample(
    objective: Any,
    student: nn.Module,
    shape: tuple[int, ...],
    nfe: int,
    generator: torch.Generator,
    *,
    batch_size: int = 1024,
) -> Tensor:
    """``shape[0]`` samples of the student in ``nfe`` network evaluations, with the sampler
    its objective trains for.

    * consistency objectives: multistep consistency sampling (Song et al., 2023, Algorithm 1)
      at :func:`consistency_eval_timesteps`;
    * ``hyper_sd_tscd``: DDIM on ``nfe`` segment boundaries (Ren et al., 2024);
    * ``progressive``: ``nfe`` deterministic DDIM steps (Salimans & Ho, 2022);
    * ``dmd2`` / ``embedding_mmd``: the generator's own timesteps when ``nfe`` equals its
      ``num_steps``, else the trailing grid; the output is re-noised with fresh noise between
      steps (the few-step sampling of Yin et al., 2024).
    """
    from mentor.diffusion import objectives as O
    from mentor.diffusion.samplers import few_step_sample

    nfe = int(nfe)
    if nfe < 1:
        raise ValueError(f"NFE must be at least 1, got {nfe}")
    sch = objective.schedule
    dev = next(student.parameters()).device
    student.eval()
    if isinstance(objective, (O._GeneratorMixin, O.ProgressiveDistillation)):
        if isinstance(objective, O.ProgressiveDistillation):
            ts, renoise = sch.timesteps(nfe).tolist(), "ddim"
        else:
            gts = list(objective.generator_timesteps)
            ts, renoise = (gts if len(gts) == nfe else sch.timesteps(nfe).tolist()), "fresh"
        x, _ = few_step_sample(student, sch, shape, ts, generator=generator,
                               batch_size=batch_size, predicts="schedule", renoise=renoise)  # fmt: skip
        return x
    noise = torch.randn(shape, generator=generator)
    if isinstance(objective, O._ConsistencyBase):
        ts = consistency_eval_timesteps(objective, nfe)

        def fn(z: Tensor) -> Tensor:
            return objective.sample(student, z.to(dev), generator, timesteps=ts).cpu()
    elif isinstance(objective, O.TrajectorySegmentedCD):

        def fn(z: Tensor) -> Tensor:
            return objective.sample(student, z.to(dev), steps=nfe).cpu()
    else:  # an objective registered later: its own sampler (its own NFE)

        def fn(z: Tensor) -> Tensor:
            return objective.sample(student, z.to(dev), generator).cpu()

    with torch.no_grad():
        return _chunked(fn, noise, batch_size)


def student_sampler_name(objective: Any) -> str:
    from mentor.diffusion import objectives as O

    if isinstance(objective, O._ConsistencyBase):
        return "consistency (multistep)"
    if isinstance(objective, (O.ProgressiveDistillation, O.TrajectorySegmentedCD)):
        return "ddim"
    return "few-step (fresh re-noising)"


# ----------------------------------------------------------------------------- evaluation


def _seed_gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def _point_metrics(x: Tensor, ref: Tensor, means: Tensor, std: float) -> dict[str, Any]:
    from mentor.diffusion.metrics import mmd_rbf, mode_coverage

    x = torch.nan_to_num(x.float(), nan=1e6, posinf=1e6, neginf=-1e6)
    cov = mode_coverage(x, means, std, k=3.0)
    return {
        "mmd": mmd_rbf(x, ref),
        "coverage": cov.coverage,
        "modes_covered": cov.modes_covered,
        "high_quality": cov.high_quality,
    }


def _image_metrics(feat: Tensor, real: Tensor) -> dict[str, Any]:
    from mentor.diffusion.metrics import frechet_distance, precision_recall

    k = min(3, len(real) - 1, len(feat) - 1)
    pr = precision_recall(real, feat, k=k)
    return {"fd": frechet_distance(real, feat), "precision": pr.precision, "recall": pr.recall}


def evaluate(
    student: nn.Module,
    teacher: nn.Module,
    objective: Any,
    bundle: DataBundle,
    cfg: RunConfig,
    *,
    features: Callable[[Tensor], Tensor] | None = None,
    feature_info: dict[str, Any] | None = None,
    progress: bool = True,
    latency: bool = True,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The teacher at each NFE of ``eval_teacher_steps`` (and ``teacher_steps``), the student
    at each of ``student_steps``, and pure noise, on the same initial noise; returns the
    result (rows + speed-up) and a few samples per setting (for the report's plots).

    Points: MMD (:func:`~mentor.diffusion.metrics.mmd_rbf`) to ``eval_samples`` fresh draws
    from the mixture and mode coverage / high-quality share (3 std). Images (``features``
    required): classifier-feature Fréchet distance and precision/recall against the held-out
    images. ``latency``: median CPU seconds per sample of generating a batch.
    """
    from mentor.diffusion.metrics import latency_per_sample
    from mentor.diffusion.samplers import sample

    dcfg = cfg.diffusion
    if dcfg is None:
        raise ValueError(diffusion_section_missing(cfg))
    info = bundle.info
    shape1 = tuple(int(s) for s in info.input_shape or ())
    points = len(shape1) == 1
    sch = objective.schedule
    N = int(dcfg.eval_samples)
    seed = int(cfg.train.seed) + SAMPLE_SEED_OFFSET
    teacher.eval()
    student.eval()
    keep: dict[str, np.ndarray] = {}
    result: dict[str, Any] = {
        "task": "diffusion",
        "kind": "points" if points else "images",
        "objective": objective.name,
        "schedule": sch.describe(),
        "samples": N,
        "teacher_sampler": dcfg.teacher_sampler,
        "teacher_steps": dcfg.teacher_steps,
        "student_sampler": student_sampler_name(objective),
        "metric": "mmd" if points else "fd",
        "threads": torch.get_num_threads(),
    }
    if points:
        from mentor.diffusion.data import gaussian_mixture_2d

        ex = info.extra
        means = torch.tensor(ex["means"], dtype=torch.float32)
        std = float(ex["std"])
        fresh = gaussian_mixture_2d(ex["kind"], N, std, int(ex.get("mixture_seed", 0)) + 1,
                                    radius=float(ex.get("radius", 1.0)))  # fmt: skip
        ref = fresh.points
        other = gaussian_mixture_2d(ex["kind"], N, std, int(ex.get("mixture_seed", 0)) + 2,
                                    radius=float(ex.get("radius", 1.0)))  # fmt: skip

        def measure(x: Tensor) -> dict[str, Any]:
            return _point_metrics(x, ref, means, std)

        result["reference"] = (
            f"{N} fresh draws from the {ex['kind']} mixture (std {std:g}; not the training points)"
        )
        result["means"] = ex["means"]
        result["std"] = std
        floor = measure(other.points)
        n_keep = min(N, 1000)
    else:
        if features is None:
            raise ValueError("image evaluation needs a feature network (features=)")
        real_x = data_tensor(bundle.val)
        real = features(real_x)
        train_x = data_tensor(bundle.train)[:N]

        def measure(x: Tensor) -> dict[str, Any]:
            return _image_metrics(features(x.clamp(-1, 1)), real)

        result["reference"] = (
            f"the {len(real_x)} held-out images, in the penultimate features of a classifier "
            "fitted on the training images' labels"
        )
        result["feature_note"] = (
            "Inception weights are not available offline: FD is the Fréchet distance in a small "
            "classifier's features (classifier-feature FD), not FID, and precision/recall use "
            "the same features; compare runs that share the feature network only"
        )
        if feature_info:
            result["feature_net"] = feature_info
        floor = measure(train_x)
        n_keep = min(N, 64)
    result["data_floor"] = floor  # real vs real: what a perfect generator would score
    rows: list[dict[str, Any]] = []
    settings = [("teacher", n) for n in sorted({*dcfg.eval_teacher_steps, dcfg.teacher_steps})]
    settings += [("student", n) for n in sorted(set(dcfg.student_steps))]
    shape = (N, *shape1)
    n_lat = min(N, 256 if points else 64)
    bs = 1024 if points else 128

    def draw(model: str, nfe: int, n: int, gen: torch.Generator) -> Tensor:
        if model == "teacher":
            return sample(teacher, sch, (n, *shape1), nfe, method=dcfg.teacher_sampler,
                          generator=gen, batch_size=bs)  # fmt: skip
        return student_sample(objective, student, (n, *shape1), nfe, gen, batch_size=bs)

    bar = Progress(len(settings) + 1, enabled=progress, label="evaluate", unit="settings")
    try:
        for i, (model, nfe) in enumerate(settings):
            x = draw(model, nfe, N, _seed_gen(seed))
            row: dict[str, Any] = {"model": model, "nfe": nfe}
            row["sampler"] = (
                dcfg.teacher_sampler if model == "teacher" else result["student_sampler"]
            )
            row.update(measure(x))
            if latency:
                s = latency_per_sample(lambda m=model, k=nfe: draw(m, k, n_lat, _seed_gen(seed)),
                                       n_lat, repeats=3)  # fmt: skip
                row["latency_ms"] = 1000 * s
            rows.append(row)
            keep[f"{model}_nfe{nfe}"] = x[:n_keep].numpy()
            bar.update(i + 1, {})
        noise = torch.randn(shape, generator=_seed_gen(seed))
        rows.append({"model": "noise", "nfe": 0, "sampler": "-", **measure(noise)})
        keep["noise"] = noise[:n_keep].numpy()
        bar.update(len(settings) + 1, {})
    finally:
        bar.close()
    if not points:
        keep["data"] = data_tensor(bundle.val)[:n_keep].numpy()
    else:
        keep["data"] = ref[:n_keep].numpy()
    result["rows"] = rows
    if latency:
        result["speedup"] = speedup(rows, dcfg)
    return result, keep


def speedup(rows: list[dict[str, Any]], dcfg: DiffusionConfig) -> dict[str, Any]:
    """The fewest-step student against the teacher at ``teacher_steps`` (wall clock)."""
    t = next(r for r in rows if r["model"] == "teacher" and r["nfe"] == dcfg.teacher_steps)
    s = min((r for r in rows if r["model"] == "student"), key=lambda r: r["nfe"])
    return {
        "student_nfe": s["nfe"],
        "teacher_nfe": t["nfe"],
        "student_latency_ms": s["latency_ms"],
        "teacher_latency_ms": t["latency_ms"],
        "speedup": t["latency_ms"] / max(s["latency_ms"], 1e-12),
    }


def headline(result: dict[str, Any], dcfg: DiffusionConfig) -> dict[str, Any]:
    """The flat numbers of ``final_metrics.json`` / eval.json's ``models`` from a result."""
    metric_keys = ("mmd", "coverage", "high_quality") if result["kind"] == "points" else (
        "fd", "precision", "recall")  # fmt: skip
    out: dict[str, Any] = {"task": "diffusion", "objective": result["objective"],
                           "metric": result["metric"]}  # fmt: skip
    rows = result["rows"]
    t = next(r for r in rows if r["model"] == "teacher" and r["nfe"] == dcfg.teacher_steps)
    s = min((r for r in rows if r["model"] == "student"), key=lambda r: r["nfe"])
    for k in metric_keys:
        out[f"teacher_{k}"] = t[k]
        out[f"student_{k}"] = s[k]
    out["teacher_nfe"], out["student_nfe"] = t["nfe"], s["nfe"]
    for r in rows:
        if r["model"] in ("teacher", "student"):
            out[f"{r['model']}_{result['metric']}_nfe{r['nfe']}"] = r[result["metric"]]
    noise = next(r for r in rows if r["model"] == "noise")
    out[f"noise_{result['metric']}"] = noise[result["metric"]]
    if "speedup" in result:
        out["speedup"] = result["speedup"]["speedup"]
    return out


__all__ = [
    "DiffusionDistiller",
    "build_diffusion_objective",
    "check_teacher_sampler",
    "consistency_eval_timesteps",
    "evaluate",
    "fit_teacher",
    "headline",
    "make_schedule",
    "speedup",
    "student_sample",
    "torch_threads",
]
