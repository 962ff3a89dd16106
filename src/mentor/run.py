"""Build a run from a typed config (data, teacher, student, objective) and train it."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate.utils import set_seed
from rich.console import Console
from torch import nn
from torch.utils.data import Dataset, default_collate

from mentor.config import FitConfig, RunConfig, TeacherConfig
from mentor.data import DataBundle, DataInfo, build_data
from mentor.engine import Distiller
from mentor.engine.progress import Progress
from mentor.eval.metrics import evaluate_classifier
from mentor.losses import Objective
from mentor.models import model_outputs
from mentor.students import build_model, load_model, save_model
from mentor.students.builders import count_parameters
from mentor.teachers import CachedTeacher, EMATeacher, EnsembleTeacher, OnlineTeacher, TeacherSource

console = Console(stderr=True)


@dataclass
class RunResult:
    """What ``distill`` produced: the run directory and held-out metrics."""

    run_dir: Path
    metrics: dict[str, Any]
    student: nn.Module
    teacher: nn.Module | None


def fit_supervised(
    model: nn.Module, data: Dataset, fit: FitConfig, seed: int, label: str = "teacher"
) -> nn.Module:
    """Train ``model`` on labels with cross-entropy (used for toy teachers)."""
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=fit.lr, weight_decay=fit.weight_decay)
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
            batch = default_collate(
                [data[int(i)] for i in perm[k * fit.batch_size : (k + 1) * fit.batch_size]]
            )
            loss = F.cross_entropy(model_outputs(model, batch), batch["labels"], ignore_index=-100)
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


def build_teacher_module(tc: TeacherConfig, cfg: RunConfig, bundle: DataBundle) -> nn.Module:
    """The teacher network: a saved model folder (``path``) or a builder, trained if ``fit``."""
    if tc.path:
        model, _ = load_model(tc.path)
        return model
    if not tc.builder:
        raise ValueError("teacher needs teacher.builder (with teacher.params) or teacher.path")
    model = build_model(tc.builder, tc.params, bundle.info)
    if tc.fit is None:
        return model
    # A trained toy teacher is cached in the run directory, keyed by what determines it.
    key = _hash([tc.builder, tc.params, tc.fit.model_dump(), cfg.data.model_dump(), cfg.train.seed])
    folder = Path(cfg.output.dir) / "teacher"
    meta = folder / "fit_key.txt"
    if meta.exists() and meta.read_text() == key:
        model, _ = load_model(folder)
        return model
    set_seed(cfg.train.seed)
    model = build_model(tc.builder, tc.params, bundle.info)
    fit_supervised(model, bundle.train, tc.fit, cfg.train.seed)
    save_model(model, folder, tc.builder, tc.params, bundle.info)
    meta.write_text(key)
    return model


def build_teacher(
    cfg: RunConfig, bundle: DataBundle, student: nn.Module | None, taps: list[str]
) -> tuple[TeacherSource | None, nn.Module | None]:
    """The teacher source for the config (and the underlying module when there is one)."""
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
        return CachedTeacher(store), None
    if tc.source == "ensemble":
        members = [
            OnlineTeacher(build_teacher_module(m, cfg, bundle), precision=m.precision)
            for m in tc.members
        ]
        return EnsembleTeacher(members, aggregate=tc.aggregate, weights=tc.weights), None
    if not tc.builder and not tc.path:
        return None, None
    module = build_teacher_module(tc, cfg, bundle)
    return OnlineTeacher(module, precision=tc.precision, taps=taps), module


def distill(cfg: RunConfig, *, resume: bool = False, quiet: bool = False) -> RunResult:
    """Run the whole recipe: data, teacher, student, training, held-out evaluation."""
    set_seed(cfg.train.seed)
    bundle = build_data(
        cfg.data.source, cfg.data.params, cfg.data.val_fraction, cfg.data.split_seed
    )
    Path(cfg.output.dir).mkdir(parents=True, exist_ok=True)
    objective = Objective(cfg.objective)
    teacher_taps = [t for _, t in objective.taps.values()]
    uses_teacher = any(t.name != "ce" for t in objective.terms.values())
    teacher_module: nn.Module | None = None
    teacher: TeacherSource | None = None
    if uses_teacher and cfg.teacher.source != "ema":
        teacher, teacher_module = build_teacher(cfg, bundle, None, teacher_taps)
    set_seed(cfg.train.seed)
    student = build_model(cfg.student.builder, cfg.student.params, bundle.info, teacher_module)
    if uses_teacher and cfg.teacher.source == "ema":
        teacher, teacher_module = build_teacher(cfg, bundle, student, teacher_taps)
    if not quiet:
        t_params = f"{count_parameters(teacher_module):,}" if teacher_module is not None else "-"
        console.print(
            f"[bold]{cfg.name}[/]: teacher params {t_params}, student params "
            f"{count_parameters(student):,} ({cfg.student.builder}); objective "
            + " + ".join(f"{w:g}*{n}" for n, w in objective.weights.items())
        )

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
    )
    run_dir = distiller.fit(resume=resume)
    metrics = _final_metrics(student, teacher_module, bundle.val, bundle.info)
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
    bundle = build_data(
        cfg.data.source, cfg.data.params, cfg.data.val_fraction, cfg.data.split_seed
    )
    student, _ = load_model(run_dir / "student")
    teacher = None
    tc = cfg.teacher
    if tc.source == "run" and tc.run:
        teacher, _ = load_model(Path(tc.run) / "student")
    elif tc.source == "online" and (tc.builder or tc.path):
        teacher = build_teacher_module(tc, cfg, bundle)
    return LoadedRun(cfg, bundle, teacher.eval() if teacher is not None else None, student.eval())


def _final_metrics(
    student: nn.Module, teacher: nn.Module | None, val: Dataset, info: DataInfo
) -> dict[str, Any]:
    if info.task != "classification":
        return {}
    m = evaluate_classifier(student, val, teacher)
    out = {"student_accuracy": m["accuracy"], "student_ce": m["ce"]}
    if teacher is not None:
        out.update(teacher_accuracy=m["teacher_accuracy"], agreement=m["agreement"])
    return out
