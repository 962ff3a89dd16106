"""Build a run from a typed config (data, teacher, student, objective) and train it."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate.utils import set_seed
from torch import nn
from torch.utils.data import Dataset, default_collate

from mentor._console import err as console
from mentor.build import OUTPUT_TAP, build_run_data, check_student_vocab, student_needs_teacher
from mentor.config import FitConfig, RunConfig, TeacherConfig
from mentor.data import DataBundle
from mentor.engine import Distiller
from mentor.engine.progress import Progress
from mentor.losses import Objective
from mentor.models import model_outputs
from mentor.models.assets import cache_root
from mentor.run_metrics import final_metrics, lm_perplexity
from mentor.students import build_model, load_model, save_model
from mentor.students.builders import count_parameters
from mentor.teachers import CachedTeacher, EMATeacher, EnsembleTeacher, OnlineTeacher, TeacherSource


@dataclass
class RunResult:
    """What ``distill`` produced: the run directory and held-out metrics."""

    run_dir: Path
    metrics: dict[str, Any]
    student: nn.Module
    teacher: nn.Module | None


def fit_supervised(
    model: nn.Module,
    data: Dataset,
    fit: FitConfig,
    seed: int,
    label: str = "teacher",
    *,
    task: str = "classification",
    collate: Callable[[list[Any]], dict[str, Any]] | None = None,
) -> nn.Module:
    """Train ``model`` on labels with cross-entropy (teachers a recipe trains itself).

    Causal LMs learn next-token prediction; an encoder classifier with a frozen encoder trains
    only its head, on pooled features computed once.
    """
    collate = collate or default_collate
    torch.manual_seed(seed)
    if hasattr(model, "fit_head") and getattr(model, "encoder_frozen", lambda: False)():
        model.fit_head(data, fit, seed, collate)
        return model.eval()
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=fit.lr, weight_decay=fit.weight_decay
    )
    n = len(data)
    per_epoch = max(1, n // fit.batch_size)
    total = max(1, math.ceil(fit.epochs * per_epoch))
    g = torch.Generator().manual_seed(seed)
    bar = Progress(total, label=f"fit {label}")
    model.train()
    step = 0
    while step < total:
        perm = torch.randperm(n, generator=g)
        for k in range(per_epoch):
            if step >= total:
                break
            batch = collate(
                [data[int(i)] for i in perm[k * fit.batch_size : (k + 1) * fit.batch_size]]
            )
            out = model_outputs(model, batch)
            if task == "causal_lm":
                labels = batch["input_ids"][:, 1:].masked_fill(
                    batch["attention_mask"][:, 1:] == 0, -100
                )
                out, target = out[:, :-1].reshape(-1, out.shape[-1]), labels.reshape(-1)
            else:
                target = batch["labels"]
            loss = F.cross_entropy(out, target, ignore_index=-100)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            bar.update(step, {"ce": loss.item()})
    bar.close()
    model.eval()
    return model


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def teacher_fit_key(tc: TeacherConfig, cfg: RunConfig, bundle: DataBundle) -> str:
    """Key of a fitted teacher: builder, params, fit, data config, seed and the data as resolved.

    The resolved description (shapes, classes, sizes) matters because one data config can give
    different data, e.g. ``fashion_mnist`` falling back to digits when its files are missing.
    """
    resolved = [dataclasses.asdict(bundle.info), len(bundle.train), len(bundle.val)]
    return _hash(
        [tc.builder, tc.params, tc.fit.model_dump() if tc.fit else None, cfg.data.model_dump(),
         cfg.train.seed, resolved]
    )  # fmt: skip


def build_teacher_module(tc: TeacherConfig, cfg: RunConfig, bundle: DataBundle) -> nn.Module:
    """The teacher network: a saved model folder (``path``) or a builder, trained if ``fit``.

    A fitted teacher is saved in ``RUN/teacher`` and in ``$MENTOR_CACHE/teachers/<key>``
    (keyed by builder, params, fit, data and seed), so other runs of the recipe reuse it.
    """
    if tc.path:
        model, _ = load_model(tc.path)
        return model
    if not tc.builder:
        raise ValueError("teacher needs teacher.builder (with teacher.params) or teacher.path")
    if tc.fit is None:
        return build_model(tc.builder, tc.params, bundle.info, data=bundle.train)
    key = teacher_fit_key(tc, cfg, bundle)
    folder = Path(cfg.output.dir) / "teacher"
    shared = cache_root().parent / "teachers" / key
    for f in (folder, shared):
        meta = f / "fit_key.txt"
        if meta.exists() and meta.read_text() == key:
            model, _ = load_model(f)
            if f is shared:
                _save_fitted(model, folder, tc, bundle, key)
            return model
    set_seed(cfg.train.seed)
    model = build_model(tc.builder, tc.params, bundle.info, data=bundle.train)
    fit_supervised(
        model,
        bundle.train,
        tc.fit,
        cfg.train.seed,
        task=bundle.info.task,
        collate=bundle.collate,
    )
    for f in (folder, shared):
        _save_fitted(model, f, tc, bundle, key)
    return model


def _save_fitted(
    model: nn.Module, folder: Path, tc: TeacherConfig, bundle: DataBundle, key: str
) -> None:
    save_model(model, folder, tc.builder or "", tc.params, bundle.info)
    (folder / "fit_key.txt").write_text(key)


def build_teacher(
    cfg: RunConfig,
    bundle: DataBundle,
    student: nn.Module | None,
    taps: list[str],
    module: nn.Module | None = None,
) -> tuple[TeacherSource | None, nn.Module | None]:
    """The teacher source for the config (and the underlying module when there is one).

    ``module``: an online teacher already built (e.g. to derive the student from it).
    """
    tc = cfg.teacher
    if tc.source == "ema":
        if student is None:
            raise ValueError("teacher.source=ema needs the student")
        src = EMATeacher(student, decay=tc.ema_decay, taps=taps)
        return src, src.module
    if tc.source == "run":
        module, _ = load_model(Path(tc.run) / "student")
        return OnlineTeacher(module, precision=tc.precision, taps=taps), module
    if tc.source == "cache":
        from mentor.teachers.store import open_store

        store = open_store(tc.cache, check=tc.cache_check, cfg=cfg, bundle=bundle)
        return CachedTeacher(store, features=taps), module
    if tc.source == "ensemble":
        members = [
            OnlineTeacher(build_teacher_module(m, cfg, bundle), precision=m.precision)
            for m in tc.members
        ]
        return EnsembleTeacher(members, aggregate=tc.aggregate, weights=tc.weights), None
    if module is None:
        if not tc.builder and not tc.path:
            return None, None
        module = build_teacher_module(tc, cfg, bundle)
    return OnlineTeacher(module, precision=tc.precision, taps=taps), module


def distill(cfg: RunConfig, *, resume: bool = False, quiet: bool = False) -> RunResult:
    """Run the whole recipe: data, teacher, student, training, held-out evaluation."""
    set_seed(cfg.train.seed)
    bundle = build_run_data(cfg)
    Path(cfg.output.dir).mkdir(parents=True, exist_ok=True)
    objective = Objective(cfg.objective)
    teacher_taps = [t for _, t in objective.taps.values() if t != OUTPUT_TAP]
    uses_teacher = any(t.name != "ce" for t in objective.terms.values())
    tc = cfg.teacher
    teacher_module: nn.Module | None = None
    teacher: TeacherSource | None = None
    has_module = bool(tc.builder or tc.path) and tc.source in ("online", "cache")
    # a cached teacher is still built when the student is made from it (layer_drop, shrink)
    if has_module and ((tc.source == "online" and uses_teacher) or student_needs_teacher(cfg)):
        teacher_module = build_teacher_module(tc, cfg, bundle)
    set_seed(cfg.train.seed)
    student = build_model(
        cfg.student.builder, cfg.student.params, bundle.info, teacher_module, data=bundle.train
    )
    check_student_vocab(cfg, bundle, teacher_module, student)
    if uses_teacher:
        teacher, teacher_module = build_teacher(cfg, bundle, student, teacher_taps, teacher_module)
    if not quiet:
        t_params = f"{count_parameters(teacher_module):,}" if teacher_module is not None else "-"
        console.print(
            f"[bold]{cfg.name}[/]: teacher params {t_params}, student params "
            f"{count_parameters(student):,} ({cfg.student.builder}); objective "
            + " + ".join(f"{w:g}*{n}" for n, w in objective.weights.items())
        )
    collate = bundle.collate or default_collate
    before: dict[str, Any] = {}
    if bundle.info.task == "causal_lm" and not resume:
        before = {"student_init_perplexity": lm_perplexity(student, bundle.val, collate)}

    def save_student(model: nn.Module, folder: Path) -> None:
        save_model(model, folder, cfg.student.builder, cfg.student.params, bundle.info)

    distiller = Distiller(
        student,
        teacher,
        objective,
        bundle.train,
        cfg,
        val_data=bundle.val,
        task=bundle.info.task,
        save_student=save_student,
        collate_fn=collate,
    )
    run_dir = distiller.fit(resume=resume)
    metrics = {**before, **final_metrics(student, teacher_module, bundle)}
    (run_dir / "final_metrics.json").write_text(json.dumps(metrics, indent=2))
    return RunResult(run_dir, metrics, student, teacher_module)


@dataclass
class LoadedRun:
    """A finished run rebuilt from its directory: config, data, teacher and student."""

    cfg: RunConfig
    bundle: DataBundle
    teacher: nn.Module | None
    student: nn.Module


def load_run(run_dir: str | Path) -> LoadedRun:
    """Rebuild the data, the teacher module and the trained student of a run directory."""
    from mentor.config import load_config

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").exists():
        raise FileNotFoundError(f"{run_dir} has no config.yaml: not a mentor run directory")
    if not (run_dir / "student").exists():
        raise FileNotFoundError(
            f"{run_dir}/student is missing: the run did not finish (continue it with --resume)"
        )
    cfg = load_config(run_dir / "config.yaml")
    bundle = build_run_data(cfg)
    student, _ = load_model(run_dir / "student")
    teacher = None
    tc = cfg.teacher
    if tc.source == "run" and tc.run:
        teacher, _ = load_model(Path(tc.run) / "student")
    elif tc.source == "online" and (tc.builder or tc.path):
        teacher = build_teacher_module(tc, cfg, bundle)
    if teacher is not None and bundle.info.task == "causal_lm":
        check_student_vocab(cfg, bundle, teacher, student)
    return LoadedRun(cfg, bundle, teacher.eval() if teacher is not None else None, student.eval())
