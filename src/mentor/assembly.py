"""Assembly: turn a recipe (``RunConfig``) into parts, one way for every command.

``distill``, ``cache``, ``plan``, ``eval``, ``generate`` and ``demo`` all start here:

* **data**: built once, tokenised with the teacher's tokenizer whenever the source is text;
* **teacher module**: loaded (``teacher.path``) or built, and fitted on labels when the recipe
  says ``fit:`` — through the :class:`~mentor.engine.Distiller` with a ``ce``-only objective —
  once per run; fitted teachers are kept in ``$MENTOR_CACHE/teachers/<key>``;
* **teacher source**: the registered class named by ``teacher.source`` builds itself from an
  :class:`Assembly` (the :class:`~mentor.teachers.SourceContext` it is handed);
* **student**: built by name (from the teacher module for ``layer_drop``/``shrink``);
* **objective** and **task**.

Layers point one way: entry (cli, demo) → assembly → engine → teacher sources / cache store /
objective → losses, data, models.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed
from torch import Tensor, nn
from torch.utils.data import default_collate

from mentor._console import err as console
from mentor._version import __version__
from mentor.config import FitConfig, RunConfig, TeacherConfig, load_config
from mentor.data import DataBundle, TensorDataset, build_data
from mentor.data.sources import labeled_mask
from mentor.engine import Distiller
from mentor.engine.checkpoint import verify as verify_folder
from mentor.engine.checkpoint import write_checksums
from mentor.engine.loop import OUTPUT_TAP
from mentor.losses import Objective
from mentor.models.assets import cache_root
from mentor.models.hf import hf_core
from mentor.progress import Progress
from mentor.students import build_model, load_model, save_model
from mentor.students.builders import count_parameters
from mentor.students.vocab import (
    VocabCheck,
    VocabMismatchError,
    check_vocab,
    output_size,
    reconcile,
)
from mentor.tasks import Task, get_task, heldout
from mentor.teachers import SOURCES, TeacherSource

# Student builders that copy or reshape the teacher, so need it even without teacher terms.
FROM_TEACHER = ("layer_drop", "shrink", "prune")


# ----------------------------------------------------------------------------- recipe facts


def model_spec(params: dict[str, Any]) -> str | None:
    """The ``model`` entry of builder params (asset name, folder or Hub id), if any."""
    m = params.get("model")
    return str(m) if m else None


def data_tokenizer(cfg: RunConfig) -> str | None:
    """The model spec whose tokenizer text data uses: the teacher's, else the student's."""
    tc = cfg.teacher
    members = getattr(tc.options, "members", None) or []
    for params in (tc.params, *(m.params for m in members), cfg.student.params):
        spec = model_spec(params)
        if spec:
            return spec
    if cfg.student.builder.startswith("hf:"):
        return cfg.student.builder[3:]
    return None


def student_tokenizer(cfg: RunConfig) -> str | None:
    """The student's own tokenizer when it brings one (``hf:<path>``, ``hf_*`` builders)."""
    b, p = cfg.student.builder, cfg.student.params
    if b.startswith("hf:"):
        return b[3:]
    if b in ("hf", "hf_causal_lm", "hf_classifier", "hf_embedder"):
        return model_spec(p)
    return None


def student_needs_teacher(cfg: RunConfig) -> bool:
    """True when the student builder derives the student from the teacher module."""
    b = cfg.student.builder
    if b in FROM_TEACHER:
        return True
    return b == "tfidf_mlp" and "out_dim" not in cfg.student.params


def build_run_data(cfg: RunConfig) -> DataBundle:
    """The recipe's data, tokenised with the teacher's tokenizer when the source is text."""
    return build_data(
        cfg.data.source,
        cfg.data.params,
        cfg.data.val_fraction,
        cfg.data.split_seed,
        tokenizer=data_tokenizer(cfg),
    )


def check_student_vocab(
    cfg: RunConfig, bundle: DataBundle, teacher: nn.Module | None, student: nn.Module
) -> VocabCheck | None:
    """Tokenizer/vocabulary check before LM or encoder distillation (see students/vocab.py).

    The data was tokenised with the teacher's tokenizer; a student bringing its own must share
    the token -> id map. Causal LMs with padded output sizes get their logits trimmed.
    """
    if hf_core(student) is None:
        return None
    s_spec, d_spec = student_tokenizer(cfg), bundle.info.tokenizer
    if s_spec and d_spec and s_spec != d_spec:
        from mentor.models.assets import load_tokenizer

        try:
            check_vocab(load_tokenizer(d_spec), load_tokenizer(s_spec), None, None)
        except VocabMismatchError as e:
            if cfg.generation.mode == "off":
                raise
            raise VocabMismatchError(
                f"generation.mode={cfg.generation.mode}: {e} The teacher scores the student's "
                "samples token by token, so both must share a tokenizer; cross-tokenizer "
                "distillation (data.source=xtok_text with uld/gold_hybrid terms, see "
                "docs/losses.md) trains on the data's own text. Set generation.mode=off, or use "
                "a student built from the teacher."
            ) from None
    n_ids = bundle.info.vocab_size
    rows = hf_core(student).get_input_embeddings().weight.shape[0]
    if n_ids and rows < n_ids:
        raise ValueError(
            f"the student embeds {rows:,} token ids but the data's tokenizer has {n_ids:,}: "
            "use a student built from the teacher (layer_drop, shrink) or with its tokenizer"
        )
    if teacher is not None and hf_core(teacher) is not None and bundle.info.task == "causal_lm":
        return reconcile(teacher, student)
    if bundle.info.task == "causal_lm":
        return VocabCheck(output_size(student))
    return None


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def teacher_fit_key(tc: TeacherConfig, cfg: RunConfig, bundle: DataBundle) -> str:
    """Key of a fitted teacher: builder, params, fit, data config, seed and the data as resolved.

    The resolved description (shapes, classes, sizes) matters because one data config can give
    different data, e.g. ``fashion_mnist`` falling back to digits when its files are missing.
    """
    resolved = [dataclasses.asdict(bundle.info), len(bundle.train), len(bundle.val)]
    parts = [tc.builder, tc.params, tc.fit.model_dump() if tc.fit else None, cfg.data.model_dump(),
             cfg.train.seed, resolved]  # fmt: skip
    if bundle.info.task == "diffusion" and cfg.diffusion is not None:  # diffusion task:
        d = cfg.diffusion  # the denoiser is fitted on this schedule (and weight EMA)
        sched = d.scheduler_config and Path(d.scheduler_config).expanduser()
        sched = sched.read_text() if sched and sched.is_file() else None
        parts.append([d.prediction_type, d.beta_schedule, d.num_train_timesteps, d.teacher_ema,
                      sched])  # fmt: skip
    return _hash(parts)


# ----------------------------------------------------------------------------- fitting on labels


def fit_on_labels(
    model: nn.Module,
    bundle: DataBundle,
    fit: FitConfig | dict[str, Any] | None = None,
    seed: int = 0,
    *,
    label: str = "teacher",
    progress: bool = True,
    known: dict[int, Tensor] | None = None,
) -> nn.Module:
    """Train ``model`` on the labels of ``bundle.train`` with the Distiller and a ``ce`` term.

    Causal LMs learn next-token prediction. An encoder classifier whose encoder is frozen
    trains only its head, on pooled features computed once (the encoder pass is the cost);
    then, when ``known`` is given, it receives the fitted model's output for every training
    example id (what an online teacher would compute again during distillation).
    ``fit``: a :class:`FitConfig` or its keys (``epochs``, ``lr``, ``batch_size``,
    ``weight_decay``); returns ``model`` in eval mode.
    """
    fit = fit if isinstance(fit, FitConfig) else FitConfig(**(fit or {}))
    if fit.encoder != "as_built":
        if not hasattr(model, "encoder_frozen"):
            raise ValueError(
                f"teacher.fit.encoder={fit.encoder} applies to encoder classifiers "
                f"(hf_classifier); this {label} is a {type(model).__name__}"
            )
        return _fit_encoder(model, bundle, fit, seed, label=label, progress=progress)
    data, task = bundle.train, bundle.info.task
    has = labeled_mask(data) if task == "classification" else None
    if has is not None and not bool(has.all()):  # data.params.labeled: the labelled part only
        if not bool(has.any()):
            raise ValueError(
                f"the recipe fits its {label} on labels (teacher.fit) but data.params.labeled=0 "
                "leaves none: give some labels, or a teacher that needs no fitting "
                "(teacher.path, or drop teacher.fit)"
            )
        data = torch.utils.data.Subset(data, torch.nonzero(has).flatten().tolist())
    # a labelled part gets the optimizer steps the whole training set would have had (more
    # epochs over fewer examples), so a teacher fitted on few labels is not left underfitted
    n_steps_data = len(bundle.train)
    collate = bundle.collate or default_collate
    trainee: nn.Module = model
    if hasattr(model, "fit_head") and getattr(model, "encoder_frozen", lambda: False)():
        data = _pooled_features(model, data, collate, label, progress)
        trainee, collate = nn.Sequential(model.dropout, model.head), default_collate
    per_epoch = max(1, n_steps_data // fit.batch_size)
    steps = max(1, math.ceil(fit.epochs * per_epoch))
    torch.manual_seed(seed)
    Distiller(
        trainee,
        None,
        "ce",
        data,
        task=task,
        collate_fn=collate,
        write_run=False,
        max_steps=steps,
        batch_size=min(fit.batch_size, len(data)),
        lr=fit.lr,
        weight_decay=fit.weight_decay,
        schedule="constant",
        grad_clip=None,
        seed=seed,
        log_every=max(steps, 1),
        progress=progress,
    ).fit()
    if known is not None and isinstance(data, TensorDataset) and trainee is not model:
        with torch.no_grad():
            trainee.eval()
            out = torch.cat([trainee(data.inputs[i : i + 1024]) for i in range(0, len(data), 1024)])
        known.update({int(i): z for i, z in zip(data.ids, out.float())})
    return model.eval()


def _finetune(
    model: nn.Module, bundle: DataBundle, fit: FitConfig, seed: int, progress: bool
) -> None:
    """Train the whole encoder classifier (encoder and head) on the labelled examples."""
    has = labeled_mask(bundle.train)
    data = bundle.train
    if has is not None and not bool(has.all()):
        data = torch.utils.data.Subset(data, torch.nonzero(has).flatten().tolist())
    for prm in model.parameters():
        prm.requires_grad_(True)
    bs = min(fit.batch_size, len(data))
    steps = max(1, math.ceil(fit.finetune_epochs * max(1, len(data) // bs)))
    torch.manual_seed(seed)
    Distiller(
        model, None, "ce", data, task="classification", collate_fn=bundle.collate or default_collate,
        write_run=False, max_steps=steps, batch_size=bs, lr=fit.finetune_lr, schedule="linear",
        warmup_steps=max(1, steps // 10), grad_clip=1.0, seed=seed, log_every=steps,
        progress=progress,
    ).fit()  # fmt: skip
    for prm in model.parameters():  # a fitted teacher is frozen again
        prm.requires_grad_(False)
    model.eval()


def _fit_encoder(
    model: nn.Module, bundle: DataBundle, fit: FitConfig, seed: int, *, label: str, progress: bool
) -> nn.Module:
    """``teacher.fit.encoder``: fine-tune the encoder, or choose frozen vs fine-tuned on a
    held-out part of the labelled examples (``auto``)."""
    head_only = fit.model_copy(update={"encoder": "as_built"})
    for prm in model.encoder.parameters():  # the head is fitted on frozen features first
        prm.requires_grad_(False)
    if fit.encoder == "finetune":
        fit_on_labels(model, bundle, head_only, seed, label=label, progress=progress)
        _finetune(model, bundle, fit, seed, progress)
        return model
    has = labeled_mask(bundle.train)
    pos = torch.arange(len(bundle.train)) if has is None else torch.nonzero(has).flatten()
    if len(pos) < 4:
        raise ValueError(
            f"teacher.fit.encoder=auto holds out part of the labelled examples to choose; "
            f"there are only {len(pos)}"
        )
    g = torch.Generator().manual_seed(seed + 31)
    perm = pos[torch.randperm(len(pos), generator=g)]
    n_dev = max(1, int(round(fit.dev_fraction * len(pos))))
    dev = sorted(perm[:n_dev].tolist())
    labels = bundle.train.labels.clone()  # the dev part's labels are hidden from fitting
    labels[torch.as_tensor(dev)] = -100
    part = copy.copy(bundle.train)
    part.labels = labels
    sub = dataclasses.replace(bundle, train=part)
    dev_data = torch.utils.data.Subset(bundle.train, dev)
    collate = bundle.collate or default_collate
    from mentor.selection import heldout_accuracy

    fit_on_labels(model, sub, head_only, seed, label=label, progress=progress)
    frozen_acc = heldout_accuracy(model, dev_data, collate)
    tuned = copy.deepcopy(model)
    _finetune(tuned, sub, fit, seed, progress)
    tuned_acc = heldout_accuracy(tuned, dev_data, collate)
    keep = "fine-tuned" if tuned_acc > frozen_acc else "frozen"
    console.print(
        f"{label}: frozen encoder {100 * frozen_acc:.1f}% vs fine-tuned {100 * tuned_acc:.1f}% "
        f"on {n_dev} held-out labelled examples: keeping the {keep} encoder"
    )
    if keep == "fine-tuned":
        model.load_state_dict(tuned.state_dict())
    model.fit_choice = {"encoder": keep, "frozen_dev_accuracy": frozen_acc,
                        "finetuned_dev_accuracy": tuned_acc, "dev_examples": n_dev}  # fmt: skip
    return model.eval()


@torch.no_grad()
def _pooled_features(
    model: nn.Module, data: Any, collate: Any, label: str, progress: bool
) -> TensorDataset:
    model.eval()
    feats, labels, ids = [], [], []
    n_batches = math.ceil(len(data) / 64)
    bar = Progress(n_batches, enabled=progress, label=f"{label}: encode", unit="batches")
    for k, lo in enumerate(range(0, len(data), 64)):
        b = collate([data[i] for i in range(lo, min(len(data), lo + 64))])
        feats.append(model.pooled(b["input_ids"], b.get("attention_mask")))
        labels.append(b["labels"])
        ids.append(b["index"])
        bar.update(k + 1, {})
    bar.close()
    return TensorDataset(torch.cat(feats), torch.cat(labels), torch.cat(ids))


# ----------------------------------------------------------------------------- the assembly


class Assembly:
    """The parts of one recipe, each built at most once (a :class:`SourceContext`)."""

    def __init__(self, cfg: RunConfig, *, run_dir: str | Path | None = None) -> None:
        """``run_dir``: where a fitted teacher copy may already be (``RUN/teacher``)."""
        self.cfg = cfg
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.taps: list[str] = []
        self._data: DataBundle | None = None
        self._objective: Objective | None = None
        self._student: nn.Module | None = None
        self._modules: dict[str, nn.Module] = {}
        self._fitted: dict[str, tuple[nn.Module, TeacherConfig, str]] = {}
        self._known: dict[int, dict[int, Tensor]] = {}  # id(module) -> outputs per example id
        self._source: TeacherSource | None = None

    # ------------------------------------------------------------------ data, task, objective
    @property
    def data(self) -> DataBundle:
        """The recipe's data (built on first use)."""
        if self._data is None:
            self._data = build_run_data(self.cfg)
        return self._data

    @property
    def task(self) -> Task:
        """The task the data declares."""
        return get_task(self.data.info.task)

    @property
    def collate(self) -> Any:
        """How the data's items become a batch."""
        return self.data.collate or default_collate

    @property
    def objective(self) -> Objective:
        """The objective (learned projectors initialised from the run's seed)."""
        if self._objective is None:
            torch.manual_seed(self.cfg.train.seed)
            self._objective = Objective(self.cfg.objective)
            self.taps = [t for _, t in self._objective.taps.values() if t != OUTPUT_TAP]
        return self._objective

    @property
    def uses_teacher(self) -> bool:
        """Whether the objective has terms besides ``ce``."""
        from mentor.losses.objective import LABEL_ONLY

        return any(t.name not in LABEL_ONLY for t in self.objective.terms.values())

    @property
    def source_class(self) -> type[TeacherSource]:
        """The registered class of ``teacher.source``."""
        return SOURCES.get(self.cfg.teacher.source)

    # ------------------------------------------------------------------ teacher module
    def has_module(self, tc: TeacherConfig | None = None) -> bool:
        """Whether ``tc`` (default: the recipe's teacher) names a module to build or load."""
        tc = tc or self.cfg.teacher
        return bool(tc.builder or tc.path)

    def module(
        self, tc: TeacherConfig | None = None, *, architecture_only: bool = False
    ) -> nn.Module:
        """The teacher module of ``tc``: loaded, built or fitted — once per assembly."""
        tc = tc or self.cfg.teacher
        key = tc.model_dump_json(include={"builder", "params", "path", "fit"})
        if key in self._modules:
            return self._modules[key]
        if tc.path:
            model = load_model(tc.path)[0]
        elif not tc.builder:
            raise ValueError(
                "the teacher needs teacher.builder (with teacher.params) or teacher.path"
            )
        elif tc.fit is None:
            torch.manual_seed(self.cfg.train.seed)  # an unfitted teacher depends on the seed
            model = build_model(tc.builder, tc.params, self.data.info, data=self.data.train)
        else:
            model = self._fitted_module(tc, architecture_only)
            if architecture_only and key not in self._modules:
                return model
        self._modules[key] = model
        return model

    def _fitted_module(self, tc: TeacherConfig, architecture_only: bool) -> nn.Module:
        key = teacher_fit_key(tc, self.cfg, self.data)
        places = [p for p in (self.run_dir, Path(self.cfg.output.dir)) if p is not None]
        places = [p / "teacher" for p in places] + [shared_teachers() / key]
        for folder in places:
            meta = folder / "fit_key.txt"
            if meta.exists() and meta.read_text() == key:
                legacy = not (folder / "checksums.json").exists()  # saved before checksums
                problems = [] if legacy else verify_folder(folder)
                if problems:
                    console.print(
                        f"fitted teacher in {folder} is damaged ({'; '.join(problems)}): "
                        "not used", highlight=False,
                    )  # fmt: skip
                    continue
                model = load_model(folder)[0]
                self._fitted[key] = (model, tc, key)
                known = _read_known(folder)
                if known:
                    self._known[id(model)] = known
                return model
        set_seed(self.cfg.train.seed)
        model = build_model(tc.builder, tc.params, self.data.info, data=self.data.train)
        if architecture_only:
            return model
        rank = int(os.environ.get("RANK", "0"))
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and rank != 0:
            return self._wait_for_fit(places[-1], key)  # only rank 0 fits and writes
        known: dict[int, Tensor] = {}
        if self.data.info.task == "diffusion":  # diffusion task: the denoising objective
            from mentor.engine.diffusion import fit_teacher

            fit_teacher(model, self.data, tc.fit, self.cfg)
        else:
            fit_on_labels(
                model, self.data, tc.fit, self.cfg.train.seed,
                progress=self.cfg.train.progress, known=known,
            )  # fmt: skip
        if known:
            self._known[id(model)] = known
        _save_fitted(model, shared_teachers() / key, tc, self.data, key, known)
        self._fitted[key] = (model, tc, key)
        return model

    def _wait_for_fit(self, folder: Path, key: str, timeout_s: float = 6 * 3600) -> nn.Module:
        """Other processes of a multi-process run load the teacher rank 0 fitted."""
        t0 = time.monotonic()
        meta = folder / "fit_key.txt"
        while not (meta.exists() and meta.read_text() == key):
            if time.monotonic() - t0 > timeout_s:
                raise TimeoutError(f"waited {timeout_s:.0f} s for rank 0 to fit the teacher")
            time.sleep(1.0)
        model = load_model(folder)[0]
        self._fitted[key] = (model, self.cfg.teacher, key)
        return model

    def save_fitted_teachers(self, run_dir: Path) -> None:
        """Copy the fitted teacher into ``RUN/teacher`` (so the run evaluates without a refit)."""
        for model, tc, key in self._fitted.values():
            folder = run_dir / "teacher"
            if (folder / "fit_key.txt").exists() and (folder / "fit_key.txt").read_text() == key:
                continue
            _save_fitted(model, folder, tc, self.data, key, self._known.get(id(model)))
            break  # one teacher per run directory (ensemble members stay in the shared cache)

    # ------------------------------------------------------------------ student and source
    def build_student(self, teacher: nn.Module | None = None, *, dual: bool = True) -> nn.Module:
        """A fresh student (seeded by ``train.seed``); with ``student.dual_head`` (and ``dual``)
        wrapped with its second, distillation head."""
        set_seed(self.cfg.train.seed)
        s = self.cfg.student
        model = build_model(s.builder, s.params, self.data.info, teacher, data=self.data.train)
        if s.dual_head is not None and dual:
            from mentor.students.dual_head import wrap_dual_head

            if self.data.info.task != "classification":
                raise ValueError(
                    "student.dual_head (DHO) applies to classification students; this recipe's "
                    f"data is {self.data.info.task}"
                )
            try:
                model = wrap_dual_head(
                    model, alpha=s.dual_head.alpha, temperature=s.dual_head.temperature,
                    num_classes=self.data.info.num_classes, init=s.dual_head.init,
                )  # fmt: skip
            except ValueError as e:
                raise ValueError(f"student.dual_head: {e}") from None
            self.objective.check_dual_head()
        return model

    @property
    def student(self) -> nn.Module | None:
        """The run's student (built on first use; from the teacher module when derived)."""
        if self._student is None:
            self.objective  # noqa: B018  (projectors are initialised before the student)
            t = None
            if self.has_module() and (
                (self.source_class.uses_module and self.uses_teacher)
                or student_needs_teacher(self.cfg)
            ):
                t = self.module()
            self._student = self.build_student(t)
            check_student_vocab(self.cfg, self.data, t, self._student)
        return self._student

    def teacher_source(self) -> TeacherSource | None:
        """The teacher source (None when the objective needs no teacher)."""
        if self._source is None and self.uses_teacher:
            self.objective  # noqa: B018  (sets the teacher taps)
            self._source = self.source_class.from_config(self)
        return self._source

    def teacher_for_metrics(self) -> nn.Module | None:
        """The teacher module held-out metrics compare with (None for cache-only teachers)."""
        src = self._source
        if src is not None and isinstance(getattr(src, "module", None), nn.Module):
            return src.module
        if self._modules:
            return next(iter(self._modules.values()))
        return None

    def known_outputs(self, tc: TeacherConfig | None = None) -> dict[int, Tensor] | None:
        """The fitted teacher's outputs on the training set, when fitting computed them."""
        if not self.has_module(tc):
            return None
        return self._known.get(id(self.module(tc)))

    def expected_provenance(self) -> dict[str, Any]:
        """What a teacher cache must match to train this recipe: teacher, tokenizer, data."""
        module = self.module() if self.has_module() else None
        splits = {"train": self.data.train}
        if self.cfg.eval.every:
            splits["val"] = self.data.val
        return recipe_provenance(self.cfg, self.data, module, splits)

    # ------------------------------------------------------------------ held-out metrics
    def final_metrics(self, student: nn.Module, teacher: nn.Module | None) -> dict[str, Any]:
        """Headline held-out metrics (``final_metrics.json``), through :func:`heldout`."""
        b = self.data
        models = {"student": student, **({"teacher": teacher} if teacher is not None else {})}
        res = heldout(
            self.task,
            models,
            b.val,
            collate=self.collate,
            batch_size=self.cfg.eval.batch_size,
            num_classes=b.info.num_classes,
            train=b.train if b.info.task == "embedding" else None,
            label="held-out metrics",
            progress=self.cfg.train.progress,
        )
        out = self.task.summary(res)
        if b.info.task == "embedding":
            from mentor.eval.cost import items_per_second
            from mentor.eval.metrics import linear_probe

            if hasattr(student, "tfidf") and "student_probe_accuracy" in out:
                texts = [list(getattr(d, "texts", [])) for d in (b.train, b.val)]
                y = [torch.as_tensor(getattr(d, "labels", [])) for d in (b.train, b.val)]
                out["tfidf_probe_accuracy"] = linear_probe(
                    student.tfidf(texts[0]), y[0], student.tfidf(texts[1]), y[1]
                )
            for name, m in models.items():
                out[f"{name}_items_per_s"] = items_per_second(m, b.val, self.collate)
        return out


def shared_teachers() -> Path:
    """Where fitted teachers are kept across runs: ``$MENTOR_CACHE/teachers``."""
    return cache_root().parent / "teachers"


KNOWN_FILE = "train_outputs.safetensors"


def _save_fitted(
    model: nn.Module,
    folder: Path,
    tc: TeacherConfig,
    bundle: DataBundle,
    key: str,
    known: dict[int, Tensor] | None = None,
) -> None:
    """Write a fitted teacher (and its known training-set outputs) to ``folder`` atomically."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(model, tmp, tc.builder or "", tc.params, bundle.info)
    if known:
        from safetensors.torch import save_file

        ids = sorted(known)
        tensors = {"ids": torch.tensor(ids), "outputs": torch.stack([known[i] for i in ids])}
        save_file(tensors, str(tmp / KNOWN_FILE))
    (tmp / "fit_key.txt").write_text(key)
    write_checksums(tmp)
    if folder.exists():
        if not (folder / "fit_key.txt").exists():
            raise FileExistsError(
                f"{folder} exists and was not written by mentor (no fit_key.txt): move it away"
            )
        shutil.rmtree(folder)
    tmp.replace(folder)


def _read_known(folder: Path) -> dict[int, Tensor] | None:
    f = folder / KNOWN_FILE
    if not f.exists():
        return None
    from safetensors.torch import load_file

    t = load_file(str(f))
    return {int(i): z for i, z in zip(t["ids"].tolist(), t["outputs"])}


def recipe_provenance(
    cfg: RunConfig, bundle: DataBundle, teacher: nn.Module | None, splits: dict[str, Any]
) -> dict[str, Any]:
    """Provenance of a recipe's teacher (``teacher.builder``/``path``), tokenizer and data."""
    from mentor.cache import describe

    tc = cfg.teacher
    info = bundle.info
    return describe(
        teacher,
        splits,
        tc.precision,
        name=tc.path or tc.builder,
        tokenizer=info.tokenizer or info.extra.get("tokenizer") or info.extra.get("tokenizer_path"),
        teacher_spec={"builder": tc.builder, "params": tc.params, "path": tc.path},
        data_spec=cfg.data.model_dump(mode="json"),
    )


# ----------------------------------------------------------------------------- commands


@dataclass
class RunResult:
    """What ``distill`` produced: the run directory and held-out metrics."""

    run_dir: Path
    metrics: dict[str, Any]
    student: nn.Module
    teacher: nn.Module | None


def distill(
    cfg: RunConfig, *, resume: bool = False, quiet: bool = False, final: bool = True
) -> RunResult:
    """Run the whole recipe: data, teacher, student, training, held-out evaluation.

    ``final=False`` skips ``final_metrics.json`` (``mentor demo`` evaluates every model
    together afterwards and writes it from that evaluation).
    """
    Distiller.check_output(cfg, resume)  # before anything is built or written
    if cfg.diffusion is not None:  # the generative task (docs/diffusion.md)
        return distill_diffusion(cfg, resume=resume, quiet=quiet, final=final)
    set_seed(cfg.train.seed)
    asm = Assembly(cfg)
    if asm.data.info.task == "diffusion":
        from mentor.engine.diffusion import diffusion_section_missing

        raise ValueError(diffusion_section_missing(cfg))
    bundle, objective = asm.data, asm.objective
    student = asm.student
    teacher = asm.teacher_source()
    t_module = asm.teacher_for_metrics()
    if not quiet:
        t_params = f"{count_parameters(t_module):,}" if t_module is not None else "-"
        console.print(
            f"[bold]{cfg.name}[/]: teacher params {t_params}, student params "
            f"{count_parameters(student):,} ({cfg.student.builder}); objective "
            + " + ".join(f"{w:g}*{n}" for n, w in objective.weights.items())
        )
    before: dict[str, Any] = {}
    if bundle.info.task == "causal_lm" and not resume:
        res = heldout(asm.task, {"student": student}, bundle.val, collate=asm.collate,
                      batch_size=cfg.eval.batch_size, progress=cfg.train.progress,
                      label="initial perplexity")  # fmt: skip
        before = {"student_init_perplexity": res["student"]["perplexity"]}

    def save_student(model: nn.Module, folder: Path) -> None:
        dh = cfg.student.dual_head
        if dh is not None and dh.tune and len(bundle.val):
            from mentor.students.dual_head import DualHead

            if isinstance(model, DualHead):
                dev = next(model.parameters()).device
                batches = (
                    {k: v.to(dev) if isinstance(v, Tensor) else v for k, v in asm.collate(
                        [bundle.val[i] for i in range(lo, min(len(bundle.val), lo + 256))]).items()}
                    for lo in range(0, len(bundle.val), 256)
                )  # fmt: skip
                a, b, acc = model.tune_combination(batches)
                if not quiet:
                    console.print(f"dual head: alpha {a:g}, temperature {b:g} (held-out {acc:.4f})")
        save_model(model, folder, cfg.student.builder, cfg.student.params, bundle.info)

    from mentor.selection import build_selection

    if (
        cfg.selection is not None
        and cfg.selection.method == "ddk"
        and teacher is not None
        and (bundle.info.task == "causal_lm")
    ):  # DDK on LM data: the domains of the training blocks re-weighted by the perplexity gap
        from mentor.domain_mixing import build_domain_mixture

        selection: Any = build_domain_mixture(
            cfg, teacher, bundle.train, asm.collate, bundle.val, bundle.info
        )
    else:  # teacher budget: only the selected examples are paid for
        selection = build_selection(
            cfg, teacher, bundle.train, asm.collate, bundle.val, bundle.info.task, bundle.info
        )
    distiller = Distiller(
        student,
        teacher,
        objective,
        bundle.train,
        cfg,
        val_data=bundle.val,
        task=asm.task,
        save_student=save_student,
        collate_fn=asm.collate,
        reward_fn=_reward_fn(cfg, bundle),
        selection=selection,
    )
    base = None
    label_only = cfg.eval.label_only and asm.uses_teacher
    if label_only and selection is not None and "labeled" not in bundle.info.extra:
        label_only = False  # the pool counts as unlabelled: there are no labels to train on
        if not quiet:
            console.print("eval.label_only skipped: with a selection section and no "
                          "data.params.labeled the training pool counts as unlabelled")  # fmt: skip
    if label_only:  # is distilling worth it? the same student on labels alone first
        base = label_only_student(asm, distiller.total_steps(), resume=resume, quiet=quiet)
        check = worth_distilling(asm, t_module, base.model, quiet=quiet)
        base.metrics.update(check)
    run_dir = distiller.fit(resume=resume)
    if int(os.environ.get("RANK", "0")) != 0:  # shared artifacts are written by rank 0
        return RunResult(run_dir, dict(before), student, t_module)
    asm.save_fitted_teachers(run_dir)
    metrics = dict(before)
    if base is not None:
        save_model(base.model, run_dir / LABEL_ONLY_DIR, cfg.student.builder, cfg.student.params,
                   bundle.info)  # fmt: skip
        metrics.update(base.metrics)
        metrics["distillation_gain"] = distillation_gain(asm, student, base.model)
    if final:
        metrics.update(asm.final_metrics(student, asm.teacher_for_metrics()))
        write_final_metrics(run_dir, metrics)
    if base is not None and not quiet:
        g = metrics["distillation_gain"]
        console.print(
            f"distillation gain over the label-only student: {100 * g['gain']:+.2f} points "
            f"(95% interval {100 * g['ci95'][0]:+.2f} to {100 * g['ci95'][1]:+.2f}, "
            f"{g['n']:,} held-out examples)"
        )
    return RunResult(run_dir, metrics, student, t_module)


LABEL_ONLY_DIR = "label_only"


@dataclasses.dataclass
class LabelOnly:
    """The label-only student of ``eval.label_only`` and what was measured about it."""

    model: nn.Module
    metrics: dict[str, Any]


def label_only_student(asm: Assembly, steps: int, *, resume: bool, quiet: bool) -> LabelOnly:
    """The same student trained on the labelled training examples alone (``ce``, no teacher).

    Same architecture, initial weights (seed), optimizer settings and number of steps as the
    distilled student. On resume the copy saved in ``RUN/label_only`` is reused.
    """
    cfg, bundle = asm.cfg, asm.data
    if bundle.info.task != "classification":
        raise ValueError(
            f"eval.label_only compares with a student trained on labels alone; it supports "
            f"classification data, and this recipe's data is {bundle.info.task}"
        )
    saved = Path(cfg.output.dir) / LABEL_ONLY_DIR
    if resume and (saved / "mentor_model.json").exists():
        model, _ = load_model(saved)
        return LabelOnly(model, {"label_only_steps": steps})
    has = labeled_mask(bundle.train)
    if has is not None and not bool(has.any()):
        raise ValueError(
            "eval.label_only trains a student on the labels, but data.params.labeled=0 keeps "
            "none: set eval.label_only=false"
        )
    set_seed(cfg.train.seed)
    t = asm.module() if student_needs_teacher(cfg) else None
    model = asm.build_student(t, dual=False)  # one head: it only ever sees labels
    if not quiet:
        console.print(f"label-only student: {steps} steps on the labels alone (no teacher)")
    keys = ("lr", "weight_decay", "schedule", "warmup_steps", "grad_clip", "seed", "batch_size",
            "optimizer", "momentum", "grad_accum")  # fmt: skip
    train = {k: v for k, v in cfg.train.model_dump().items() if k in keys}
    n_lab = int(has.sum()) if has is not None else len(bundle.train)
    train["batch_size"] = min(train["batch_size"], n_lab)
    Distiller(
        model, None, "ce", bundle.train, task=asm.task, collate_fn=asm.collate, write_run=False,
        max_steps=steps, log_every=max(steps, 1), progress=cfg.train.progress and not quiet,
        **train,
    ).fit()  # fmt: skip
    return LabelOnly(model.eval(), {"label_only_steps": steps})


def _correct(model: nn.Module, asm: Assembly) -> Tensor:
    from mentor.eval.metrics import predict

    out, y = predict(model, asm.data.val, asm.cfg.eval.batch_size, asm.collate)
    return out.argmax(-1) == y


def worth_distilling(
    asm: Assembly, teacher: nn.Module | None, base: nn.Module, *, quiet: bool = False
) -> dict[str, Any]:
    """Compare the teacher with the label-only student on held-out data; warn when it is not
    better (then distilling it is unlikely to help)."""
    from mentor.eval.metrics import paired_gain

    b = _correct(base, asm)
    out: dict[str, Any] = {"label_only_accuracy": float(b.float().mean())}
    if teacher is None:
        return out
    t = _correct(teacher, asm)
    gap = paired_gain(t, b, seed=asm.cfg.train.seed)
    out["teacher_vs_label_only"] = gap
    if gap["gain"] > 0 and gap["ci95"][0] <= 0 and not quiet:
        console.print(
            f"note: the teacher is {100 * gap['gain']:+.1f} points above the label-only student, "
            f"but the 95% interval ({100 * gap['ci95'][0]:+.1f} to {100 * gap['ci95'][1]:+.1f}) "
            "includes 0: distilling may not pay off here"
        )
    if gap["gain"] <= 0:
        worse = "worse than" if gap["gain"] < 0 else "no better than"
        msg = (
            f"warning: the teacher ({100 * float(t.float().mean()):.1f}% held-out accuracy) is "
            f"{worse} the same student trained on labels alone "
            f"({100 * out['label_only_accuracy']:.1f}%; difference {100 * gap['gain']:+.1f} "
            f"points, 95% interval {100 * gap['ci95'][0]:+.1f} to {100 * gap['ci95'][1]:+.1f}): "
            "distilling this teacher is unlikely to help. Fit the teacher better (teacher.fit: "
            "more epochs, or fine-tune its encoder) or use a stronger teacher."
        )
        out["label_only_warning"] = msg
        console.print(f"[yellow]{msg}[/]")
    return out


def distillation_gain(asm: Assembly, student: nn.Module, base: nn.Module) -> dict[str, Any]:
    """Held-out accuracy of the distilled student minus the label-only one, with a 95% interval."""
    from mentor.eval.metrics import paired_gain

    return paired_gain(_correct(student, asm), _correct(base, asm), seed=asm.cfg.train.seed)


def write_final_metrics(run_dir: Path, metrics: dict[str, Any]) -> None:
    """``RUN/final_metrics.json``, written atomically."""
    tmp = run_dir / "final_metrics.json.tmp"
    tmp.write_text(json.dumps(metrics, indent=2))
    tmp.replace(run_dir / "final_metrics.json")


def final_metrics_from_eval(ev: dict[str, Any], student: str = "student") -> dict[str, Any]:
    """The ``final_metrics.json`` headline of one student from a ``mentor eval`` result."""
    res = {"student": ev["models"][student]}
    if "teacher" in ev["models"]:
        res["teacher"] = ev["models"]["teacher"]
    return get_task(ev["task"]).summary(res)


@dataclass
class LoadedRun:
    """A finished run rebuilt from its directory: config, data, teacher and student."""

    cfg: RunConfig
    bundle: DataBundle
    teacher: nn.Module | None
    student: nn.Module
    assembly: Assembly | None = None


def _reward_fn(cfg: RunConfig, bundle: DataBundle) -> Any:
    """The verifier of ``generation.reward_field`` (None when it is not set)."""
    field = cfg.generation.reward_field
    if field is None or cfg.generation.mode == "off":
        return None
    from mentor.generation import AnswerReward
    from mentor.models.assets import load_tokenizer

    if not bundle.info.tokenizer:
        raise ValueError(
            f"generation.reward_field={field!r} decodes samples, but the data has no tokenizer"
        )
    return AnswerReward(load_tokenizer(bundle.info.tokenizer), field)


def load_run(run_dir: str | Path, data_overrides: list[str] | None = None) -> LoadedRun:
    """Rebuild the data, the teacher module and the trained student of a run directory.

    ``data_overrides`` (``data.*`` keys) evaluate on other data, tokenised as in training.
    """
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").exists():
        raise FileNotFoundError(f"{run_dir} has no config.yaml: not a mentor run directory")
    if not (run_dir / "student").exists():
        raise FileNotFoundError(
            f"{run_dir}/student is missing: the run did not finish (continue it with --resume)"
        )
    bad = [o for o in data_overrides or [] if not o.startswith("data.")]
    if bad:
        raise ValueError(f"--data overrides must start with 'data.', got {bad[0]!r}")
    cfg = load_config(run_dir / "config.yaml", data_overrides)
    asm = Assembly(cfg, run_dir=run_dir)
    student, _ = load_model(run_dir / "student")
    teacher = None
    src = asm.source_class
    if src.name == "run":
        teacher = src.load(cfg.teacher)  # type: ignore[attr-defined]
    elif src.uses_module and asm.has_module():
        teacher = asm.module()
    if teacher is not None and asm.data.info.task == "causal_lm":
        check_student_vocab(cfg, asm.data, teacher, student)
    return LoadedRun(
        cfg, asm.data, teacher.eval() if teacher is not None else None, student.eval(), asm
    )


def evaluate_run(
    run_dir: str | Path,
    *,
    baseline: str | Path | None = None,
    data_overrides: list[str] | None = None,
    measure: bool = True,
) -> dict[str, Any]:
    """Evaluate a finished run (and optionally a label-only baseline run); write eval.json."""
    from mentor.eval.run_eval import evaluate_models

    run_dir = Path(run_dir)
    loaded = load_run(run_dir, data_overrides)
    if loaded.cfg.diffusion is not None:  # the generative task: samples, not predictions
        if baseline is not None:
            raise ValueError("--baseline compares classifiers; a diffusion run has no baseline")
        return evaluate_diffusion_run(loaded, run_dir, latency=measure)
    models: dict[str, nn.Module] = {}
    if loaded.teacher is not None:
        models["teacher"] = loaded.teacher
    own_base = run_dir / LABEL_ONLY_DIR  # eval.label_only: the run's own label-only student
    if baseline is not None:
        models["student_no_kd"] = load_run(baseline).student
    elif (own_base / "mentor_model.json").exists():
        models["student_no_kd"] = load_model(own_base)[0].eval()
    models["student"] = loaded.student
    from mentor.generation import SamplingConfig

    g = loaded.cfg.generation
    sampling = SamplingConfig(
        max_new_tokens=g.max_new_tokens, temperature=g.temperature, top_p=g.top_p, top_k=g.top_k
    )
    result = evaluate_models(
        models, loaded.bundle, measure=measure, sampling=sampling, seed=loaded.cfg.train.seed
    )
    result["run"] = str(run_dir)
    result["name"] = loaded.cfg.name
    result["seed"] = loaded.cfg.train.seed
    if baseline is not None:
        result["baseline_run"] = str(baseline)
    elif "student_no_kd" in models:
        result["baseline_run"] = str(own_base)
    if "student_no_kd" in models and loaded.bundle.info.task == "classification":
        result["distillation_gain"] = distillation_gain(
            loaded.assembly, loaded.student, models["student_no_kd"]
        )  # held-out accuracy of the distilled student minus the label-only one, 95% interval
    sel = run_dir / "selection.json"
    if sel.exists():  # a teacher-budget run: what was paid for, and the accuracy curve
        result["selection"] = json.loads(sel.read_text())
    tmp = run_dir / "eval.json.tmp"
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(run_dir / "eval.json")
    return result


# ----------------------------------------------------------------------------- diffusion task
# The generative task (docs/diffusion.md): mentor.engine.diffusion trains and evaluates; this
# block builds its parts from a recipe and fits / caches the image metrics' feature classifier.

# The classifier whose penultimate features the image metrics compare (Inception weights are
# not available offline): fitted on the training images' labels, cached like fitted teachers.
FEATURE_NET = {"builder": "cnn", "params": {"channels": [16, 32], "hidden": 64},
               "fit": {"epochs": 20, "lr": 1e-3, "batch_size": 64}}  # fmt: skip
FEATURE_NET_DIR = "feature_net"
EVAL_SAMPLES_FILE = "eval_samples.npz"


def _renamed(e: ValueError, role: str) -> ValueError:
    msg = str(e).replace("model.params", f"{role}.params")
    return ValueError(msg.replace("builder '", f"{role}.builder '", 1))


def diffusion_parts(asm: Assembly) -> tuple[nn.Module, Any]:
    """The teacher denoiser (loaded, or built and fitted through the shared teacher cache) and
    the noise schedule, after checking the recipe fits the diffusion task."""
    from mentor.engine.diffusion import check_teacher_sampler, make_schedule
    from mentor.students.denoiser_builders import set_role

    cfg = asm.cfg
    unused = [k for k, on in (("selection", cfg.selection is not None),
                              ("eval.label_only", cfg.eval.label_only),
                              ("student.dual_head", cfg.student.dual_head is not None),
                              ("generation.mode", cfg.generation.mode != "off")) if on]  # fmt: skip
    if unused:
        raise ValueError(
            f"{', '.join(unused)}: not used by the diffusion task (classifiers and language "
            "models only); remove it from the recipe"
        )
    if asm.data.info.task != "diffusion":
        raise ValueError(
            f"the recipe has a diffusion: section but data.source={cfg.data.source} gives "
            f"{asm.data.info.task} data; use gmm2d, digits_images or fashion_images"
        )
    if cfg.teacher.source != "online":
        raise ValueError(
            f"teacher.source={cfg.teacher.source}: the diffusion task runs its teacher online "
            "(the student queries it at its own noisy samples, which cannot be cached); use "
            "teacher.builder with teacher.fit, or teacher.path"
        )
    if not asm.has_module():
        raise ValueError("the diffusion task needs a teacher denoiser: teacher.builder "
                         "(mlp_denoiser, unet_denoiser) with teacher.fit, or teacher.path")  # fmt: skip
    schedule = make_schedule(cfg.diffusion)
    check_teacher_sampler(schedule, cfg.diffusion)
    try:
        teacher = asm.module()
    except ValueError as e:
        raise _renamed(e, "teacher") from None
    from mentor.diffusion.denoisers import data_shape

    shape, want = data_shape(teacher), tuple(asm.data.info.input_shape or ())
    if shape is not None and shape != want:
        where = f"teacher.path={cfg.teacher.path}" if cfg.teacher.path else "teacher.params"
        raise ValueError(
            f"the teacher ({where}) generates {'x'.join(map(str, shape))} data but the data "
            f"are {'x'.join(map(str, want))}: use a teacher built for this data"
        )
    if cfg.teacher.fit is None and not cfg.teacher.path:
        console.print("[yellow]warning: teacher.fit is not set: the teacher is an untrained "
                      "denoiser[/]")  # fmt: skip
    return set_role(teacher.eval().requires_grad_(False), "teacher"), schedule


def distill_diffusion(
    cfg: RunConfig, *, resume: bool = False, quiet: bool = False, final: bool = True
) -> RunResult:
    """``mentor distill`` for a recipe with a ``diffusion:`` section: fit (or load) the teacher
    denoiser, build the student and the objective, train, evaluate (``final_metrics.json``)."""
    from mentor.diffusion.denoisers import check_compatible
    from mentor.engine.diffusion import (
        DiffusionDistiller,
        build_diffusion_objective,
        headline,
        total_steps,
    )
    from mentor.students.denoiser_builders import build_denoiser

    set_seed(cfg.train.seed)
    asm = Assembly(cfg)
    bundle = asm.data
    teacher, schedule = diffusion_parts(asm)
    set_seed(cfg.train.seed)
    s = cfg.student
    student = build_denoiser("student", s.builder, s.params, bundle.info, teacher)
    check_compatible(teacher, student)
    steps = total_steps(cfg, len(bundle.train))
    objective = build_diffusion_objective(cfg.diffusion, schedule, steps)
    if not quiet:
        console.print(
            f"[bold]{cfg.name}[/]: teacher params {count_parameters(teacher):,}, student params "
            f"{count_parameters(student):,} ({s.builder}); diffusion objective "
            f"{cfg.diffusion.objective}, {steps} steps"
        )
    distiller = DiffusionDistiller(student, teacher, objective, bundle.train, cfg,
                                   info=bundle.info)  # fmt: skip
    run_dir = distiller.fit(resume=resume)
    asm.save_fitted_teachers(run_dir)
    metrics: dict[str, Any] = {}
    if final:
        ev = _diffusion_eval(asm, run_dir, student, teacher, objective, progress=not quiet)
        metrics = headline(ev, cfg.diffusion)
        if distiller.diverged_at is not None:
            metrics["fake_score_diverged_at_step"] = distiller.diverged_at
        write_final_metrics(run_dir, metrics)
    return RunResult(run_dir, metrics, student, teacher)


FEATURE_NET_SEED = 0  # the image metrics' classifier is fitted with this seed for every run


def diffusion_feature_net(asm: Assembly, run_dir: Path | None = None) -> tuple[nn.Module, dict]:
    """The image metrics' feature classifier (:data:`FEATURE_NET`), fitted once on the
    training images' labels and kept like a fitted teacher (``$MENTOR_CACHE/teachers/<key>``,
    copied to ``RUN/feature_net``); returns it and a description (held-out accuracy)."""
    from mentor.data.generative import data_tensor
    from mentor.data.sources import DataInfo

    b, cfg = asm.data, asm.cfg
    tr, va = b.train, b.val
    cls = DataBundle(
        TensorDataset(data_tensor(tr), torch.as_tensor(tr.labels), torch.as_tensor(tr.ids)),
        TensorDataset(data_tensor(va), torch.as_tensor(va.labels), torch.as_tensor(va.ids)),
        DataInfo(task="classification", in_features=b.info.in_features,
                 input_shape=b.info.input_shape, num_classes=b.info.num_classes,
                 class_names=list(b.info.class_names)),
    )  # fmt: skip
    tc = TeacherConfig(**FEATURE_NET)
    # one classifier whatever the run's train.seed: FDs of runs with other seeds share features
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"seed": FEATURE_NET_SEED})})
    key = teacher_fit_key(tc, cfg, cls)
    places = ([run_dir / FEATURE_NET_DIR] if run_dir is not None else []) + [
        shared_teachers() / key
    ]
    model = None
    for folder in places:
        meta = folder / "fit_key.txt"
        if meta.exists() and meta.read_text() == key and not verify_folder(folder):
            model = load_model(folder)[0]
            break
    if model is None:
        set_seed(cfg.train.seed)
        model = build_model(tc.builder, tc.params, cls.info)
        fit_on_labels(model, cls, tc.fit, cfg.train.seed, label="feature classifier",
                      progress=cfg.train.progress)  # fmt: skip
        _save_fitted(model, shared_teachers() / key, tc, cls, key)
    if run_dir is not None and not (run_dir / FEATURE_NET_DIR / "fit_key.txt").exists():
        _save_fitted(model, run_dir / FEATURE_NET_DIR, tc, cls, key)
    model.eval()
    with torch.no_grad():
        acc = float((model(cls.val.inputs).argmax(-1) == cls.val.labels).float().mean())
    desc = {"builder": tc.builder, "params": tc.params, "fit": FEATURE_NET["fit"],
            "features": "penultimate layer", "held_out_accuracy": acc}  # fmt: skip
    return model, desc


def _diffusion_eval(
    asm: Assembly, run_dir: Path, student: nn.Module, teacher: nn.Module, objective: Any,
    *, progress: bool = True, latency: bool = True,
) -> dict[str, Any]:  # fmt: skip
    """Evaluate a diffusion run's teacher and student; the samples go to eval_samples.npz."""
    import numpy as np

    from mentor.engine.diffusion import evaluate, torch_threads

    cfg, bundle = asm.cfg, asm.data
    features, info = None, None
    if len(bundle.info.input_shape or ()) > 1:
        net, info = diffusion_feature_net(asm, run_dir)
        body = nn.Sequential(*list(net)[:-1]).eval()

        def features(x: Tensor) -> Tensor:
            with torch.no_grad():
                return torch.cat([body(x[i : i + 512]) for i in range(0, len(x), 512)])

    dev = next(teacher.parameters()).device
    student.to(dev)
    with torch_threads(cfg.diffusion, bundle.info):
        ev, samples = evaluate(student, teacher, objective, bundle, cfg, features=features,
                               feature_info=info, progress=progress and cfg.train.progress,
                               latency=latency)  # fmt: skip
    tmp = run_dir / (EVAL_SAMPLES_FILE + ".tmp.npz")
    np.savez_compressed(tmp, **samples)
    tmp.replace(run_dir / EVAL_SAMPLES_FILE)
    return ev


def evaluate_diffusion_run(
    loaded: LoadedRun, run_dir: Path, *, latency: bool = True
) -> dict[str, Any]:
    """``mentor eval`` of a diffusion run: eval.json with the NFE table and the speed-up."""
    from mentor.engine.diffusion import (
        build_diffusion_objective,
        headline,
        make_schedule,
        total_steps,
    )
    from mentor.eval.cost import machine
    from mentor.students.denoiser_builders import set_role

    cfg, asm = loaded.cfg, loaded.assembly
    assert asm is not None and loaded.teacher is not None
    schedule = make_schedule(cfg.diffusion)
    objective = build_diffusion_objective(
        cfg.diffusion, schedule, total_steps(cfg, len(loaded.bundle.train))
    )
    teacher = set_role(loaded.teacher, "teacher")
    student = set_role(loaded.student, "student")
    ev = _diffusion_eval(asm, run_dir, student, teacher, objective, latency=latency)
    result = {
        "task": "diffusion",
        "name": cfg.name,
        "run": str(run_dir),
        "seed": cfg.train.seed,
        "examples": ev["samples"],
        "machine": {**machine(), "torch_threads": ev["threads"]},
        "diffusion": ev,
        "headline": headline(ev, cfg.diffusion),
        "models": {
            m: {k: v for k, v in _best_row(ev, m, cfg.diffusion).items() if k != "model"}
            for m in ("teacher", "student")
        },
    }
    tmp = run_dir / "eval.json.tmp"
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(run_dir / "eval.json")
    return result


def _best_row(ev: dict[str, Any], model: str, dcfg: Any) -> dict[str, Any]:
    rows = [r for r in ev["rows"] if r["model"] == model]
    if model == "teacher":
        return next(r for r in rows if r["nfe"] == dcfg.teacher_steps)
    return min(rows, key=lambda r: r["nfe"])


def cache_recipe(
    cfg: RunConfig,
    out: str | Path,
    settings: Any = None,
    *,
    splits: tuple[str, ...] = ("train",),
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Run a recipe's teacher once over its data (built as ``distill`` builds it) and cache it."""
    from mentor.cache import CacheSettings, write_cache
    from mentor.cache.writer import OUTPUT, module_teacher

    bad = [s for s in splits if s not in ("train", "val")]
    if bad or not splits:
        raise ValueError(f"--splits {','.join(splits)}: choose from train, val")
    if cfg.diffusion is not None:
        raise ValueError(
            "a diffusion recipe's teacher cannot be cached: the student queries it at its own "
            "noisy samples during training (run mentor distill; see docs/diffusion.md)"
        )
    asm = Assembly(cfg)
    src = asm.source_class
    built: Any = None  # a source that runs several modules itself (source: routed)
    if hasattr(src, "cache_function"):
        built = src.from_config(asm)
        teacher = built.provenance_module()
    elif src.cacheable and not src.uses_module:  # e.g. a previous run's student
        teacher = src.from_config(asm).module  # type: ignore[attr-defined]
    elif (src.cacheable or src.name == "cache") and asm.has_module():
        teacher = asm.module()  # a recipe already reading a cache re-creates it from its module
    else:
        raise ValueError(
            f"mentor cache runs the recipe's own teacher (teacher.builder or teacher.path, or "
            f"a previous run with teacher.source=run); teacher.source={cfg.teacher.source!r} "
            f"with builder={cfg.teacher.builder!r}, path={cfg.teacher.path!r} has none to run"
        )
    bundle = asm.data
    data = {s: bundle.train if s == "train" else bundle.val for s in splits}
    prov = recipe_provenance(cfg, bundle, teacher, data)
    if built is not None:
        prov["teacher"]["spec"].update(built.provenance_spec())
    settings = settings or CacheSettings()
    if bundle.info.task == "embedding" and OUTPUT not in settings.features:
        settings.top_k, settings.samples = 0, 0
        settings.features = [*settings.features, OUTPUT]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    features = list(settings.check().features)
    if built is not None and hasattr(built, "check_cache_settings"):
        built.check_cache_settings(settings)  # e.g. a served teacher: at most its top-k
    if built is not None:
        fn = built.cache_function(features, device)
    else:
        fn = module_teacher(teacher.to(device), features, cfg.teacher.precision)
    return write_cache(
        fn,
        data,
        out,
        settings,
        provenance=prov,
        task=bundle.info.task,
        device=device,
        collate=asm.collate,
        progress=progress,
        overwrite=overwrite,
    )


def plan_recipe(
    cfg: RunConfig, *, top_k: int = 32, samples: int = 0, dtype: str = "fp16"
) -> dict[str, Any]:
    """``mentor plan``: parameters, FLOPs, cache size and logit memory (nothing is trained)."""
    from mentor.cache.plan import estimate
    from mentor.models import model_outputs

    if cfg.diffusion is not None:
        raise ValueError(
            "mentor plan estimates logit caches and per-token FLOPs; a diffusion recipe has no "
            "logits to cache (its cost is the NFE table of mentor eval; see docs/diffusion.md)"
        )
    asm = Assembly(cfg)
    bundle = asm.data
    needs = asm.has_module() and student_needs_teacher(cfg)
    t_mod = asm.module(architecture_only=True) if needs else None
    student = asm.build_student(t_mod)
    asm._student = student
    n_t = asm.source_class.plan_parameters(asm)
    ex = bundle.train[0]
    per_token = asm.task.per_token
    t_len = int(ex["input_ids"].shape[-1]) if per_token else 1
    with torch.no_grad():
        v = int(model_outputs(student.eval(), asm.collate([ex])).shape[-1])
    chunks = [int(s["chunk_size"]) for s in cfg.objective.values() if s.get("chunk_size")]
    return estimate(
        recipe=cfg.name,
        teacher_parameters=n_t,
        student_parameters=count_parameters(student),
        positions_per_example=t_len,
        train_examples=len(bundle.train),
        classes=v,
        batch_size=cfg.train.batch_size,
        chunk_size=min(chunks) if chunks else None,
        top_k=top_k,
        samples=samples,
        dtype=dtype,
    )


# ----------------------------------------------------------------------------- mentor generate

GENERATE_KIND = "mentor generate"
GENERATE_FORMAT = 1
META_SUFFIX = ".meta.json"
# meta keys that describe the file but do not change what is generated (never compared)
_INFORMATIONAL = ("kind", "recipe", "run", "model.name", "mentor_version", "created", "device")


def generation_seed(seed: int, index: int, sample: int) -> int:
    """Seed of the generator drawing sample ``sample`` of example ``index`` (``mentor generate``).

    The first 63 bits of sha256("mentor-generate/<seed>/<index>/<sample>"): one independent
    stream per (run seed, stable example id, sample number), without the collisions of a
    linear mix.
    """
    digest = hashlib.sha256(f"mentor-generate/{seed}/{index}/{sample}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & ((1 << 63) - 1)


def generate_meta_path(out: str | Path) -> Path:
    """The provenance sidecar of a generated file: ``FILE.jsonl.meta.json``."""
    out = Path(out)
    return out.with_name(out.name + META_SUFFIX)


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def generate_meta_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The keys (dotted) whose values differ between two generation metas, with both values.

    Informational keys (recipe name, run folder, model name, mentor version, creation time,
    device) are not compared: they do not change what is generated.
    """
    a, b = _flat(old), _flat(json.loads(json.dumps(new, default=str)))
    skip = lambda k: any(k == s or k.startswith(s + ".") for s in _INFORMATIONAL)  # noqa: E731
    return [
        f"{k} (file: {json.dumps(a.get(k))}, now: {json.dumps(b.get(k))})"
        for k in sorted(set(a) | set(b))
        if not skip(k) and a.get(k) != b.get(k)
    ]


def _read_generated(out: Path) -> tuple[list[dict[str, Any]], int]:
    """The complete lines of a generated file and how many bytes a torn last line had.

    The torn tail (no final newline: the process was killed mid-write) is cut off the file.
    A complete line that is not a JSON object with integer ``index`` and ``sample`` is refused.
    """
    from mentor._jsonl import complete_lines

    lines, torn = complete_lines(out)
    rows = []
    for n, line in enumerate(lines, 1):
        try:
            r = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{out}:{n}: not valid JSON ({e}); the file is damaged") from None
        ok = isinstance(r, dict) and all(
            isinstance(r.get(k), int) and not isinstance(r.get(k), bool)
            for k in ("index", "sample")
        )
        if not ok:
            raise ValueError(f'{out}:{n}: not a generated line (needs integer "index", "sample")')
        rows.append(r)
    return rows, torn


def _write_json_atomic(path: Path, obj: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    tmp.replace(path)


def generate_recipe(
    cfg: RunConfig,
    out: str | Path,
    *,
    source: str = "teacher",
    run_dir: str | Path | None = None,
    split: str = "train",
    samples_per_prompt: int = 1,
    batch_size: int = 8,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """``mentor generate``: completions of a recipe's prompts, for sequence-level KD.

    Sequence-level knowledge distillation (Kim & Rush, "Sequence-Level Knowledge
    Distillation", EMNLP 2016) trains the student on the teacher's own output sequences. This
    samples them once, with the recipe's ``generation`` settings (``max_new_tokens``,
    ``temperature`` — 0 is greedy —, ``top_p``, ``top_k``), for every prompt of the recipe's
    ``prompts`` data (``split``: train or val), and writes ``out`` (a ``.jsonl`` file), one line
    per kept (example, sample)::

        {"index": id, "sample": k, "prompt": text, "completion": text,
         "prompt_ids": [...], "completion_ids": [...]}

    which ``data.source=prompts data.params.path=out`` reads back (``prompt``/``completion``;
    other fields are ignored). ``completion_ids`` are exactly the generated tokens that count,
    EOS included; ``completion`` is their text with special tokens skipped, so reading the file
    back gives those ids less any special token (EOS, padding) — add a terminator to the text
    yourself if the student should learn to stop.
    ``prompt`` is the prompt's text with special tokens skipped — except for
    ``chat_template`` data, whose prompt is the rendered template (read it back with
    ``chat_template: false``).

    ``source``: ``teacher`` (the recipe's teacher module, :meth:`Assembly.module`) or
    ``student`` (the trained student of the finished run ``run_dir``, :func:`load_run`). With
    ``teacher``, ``run_dir`` is only where a fitted teacher's copy may be (``RUN/teacher``).

    **Seeding.** Every sample is generated alone (a batch of one, no padding) from a CPU
    :class:`torch.Generator` seeded by :func:`generation_seed` of (``train.seed``, the example's
    stable id, the sample number). A line therefore depends on the model, the prompt and those
    three numbers only — not on ``batch_size``, on which other examples are generated, or on
    resuming. ``batch_size`` is how many prompts are collated, written and flushed together.
    Greedy decoding (``temperature: 0``) generates sample 0 only; its other samples are the same
    sequence and count as duplicates.

    **Provenance.** ``out.meta.json`` is written before any line: recipe, source, model
    (``weights_sha256``), tokenizer (name, sha256), sampling settings, seed, split,
    samples_per_prompt, data spec and fingerprint, mentor version, creation time.

    **Resume and dedupe.** Lines are written in data order and flushed per batch. Running the
    same command again drops a torn last line (a kill mid-write) and appends only what is
    missing: the examples without lines, and the samples after the last one written of the
    last example in the file — so a resumed file is byte-identical to an uninterrupted one. A
    completion whose text equals an earlier one of the same example is not written (counted in
    ``duplicates``). A meta that differs in anything but its informational keys is refused,
    naming the keys, unless ``overwrite``; a file without our meta sidecar is never touched.

    Returns a summary: ``file``, ``meta``, ``examples``, ``samples_per_prompt``, ``written``
    (lines this call), ``duplicates`` (skipped this call), ``generated`` (sequences sampled this
    call), ``existing`` (lines kept from before), ``lines`` (in the file now), ``torn_bytes``.
    """
    from mentor.cache.format import data_fingerprint, tokenizer_hash, weights_hash
    from mentor.generation import SamplingConfig, generate
    from mentor.models.assets import load_tokenizer

    out = Path(out)
    meta_path = generate_meta_path(out)
    if out.suffix.lower() != ".jsonl":
        raise ValueError(
            f"--out {out}: use a .jsonl file (data.source=prompts reads .jsonl prompt files)"
        )
    if source not in ("teacher", "student"):
        raise ValueError(f"--source {source!r}: choose teacher or student")
    if source == "student" and run_dir is None:
        raise ValueError("--source student samples a finished run's student: give --run RUN_DIR")
    if split not in ("train", "val"):
        raise ValueError(f"--split {split!r}: choose train or val")
    for key, v in (("--samples-per-prompt", samples_per_prompt), ("--batch-size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{key} {v!r}: use a positive integer")
    if out.exists() and not meta_path.exists():
        raise FileExistsError(
            f"{out} exists and was not written by mentor generate (no {meta_path.name}): "
            "move it away or choose another --out"
        )

    asm = Assembly(cfg, run_dir=run_dir if source == "teacher" else None)
    bundle = asm.data
    if not bundle.info.extra.get("prompts"):
        raise ValueError(
            f"mentor generate needs prompt data (data.source=prompts); this recipe's "
            f"data.source={cfg.data.source!r} has no prompts to complete"
        )
    data = bundle.train if split == "train" else bundle.val
    if source == "teacher":
        model = asm.module()
        spec = [cfg.teacher.builder, model_spec(cfg.teacher.params)]
        model_name = cfg.teacher.path or " ".join(str(x) for x in spec if x)
    else:
        model = load_run(run_dir).student  # type: ignore[arg-type]
        model_name = str(Path(run_dir) / "student")  # type: ignore[arg-type]
    if hf_core(model) is None:
        raise ValueError(
            f"the {source} ({type(model).__name__}) is not a Hugging Face causal LM, which "
            "mentor generate samples from"
        )
    tok_spec = bundle.info.tokenizer or data_tokenizer(cfg)
    tok = load_tokenizer(tok_spec)
    g = cfg.generation
    sampling = SamplingConfig(
        max_new_tokens=g.max_new_tokens, temperature=g.temperature, top_p=g.top_p, top_k=g.top_k
    ).check()
    mcfg = getattr(model, "config", None)
    eos = getattr(mcfg, "eos_token_id", None)
    if eos is None:
        eos = getattr(tok, "eos_token_id", None)
    pad = int(bundle.info.extra.get("pad_token_id", eos if isinstance(eos, int) else 0))
    chat = bool(bundle.info.extra.get("chat_template"))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    meta = {
        "kind": GENERATE_KIND,
        "format": GENERATE_FORMAT,
        "recipe": cfg.name,
        "source": source,
        "run": str(run_dir) if run_dir is not None else None,
        "model": {"name": model_name, "weights_sha256": weights_hash(model)},
        "tokenizer": {"name": str(tok_spec), "sha256": tokenizer_hash(tok)},
        "sampling": {**dataclasses.asdict(sampling), "eos_token_id": eos},
        "seed": cfg.train.seed,
        "seeding": "one sequence per generator, seeded by sha256(seed, example id, sample)",
        "split": split,
        "samples_per_prompt": samples_per_prompt,
        "dedupe": "identical completion text of one example written once",
        "data": {
            "spec": cfg.data.model_dump(mode="json"),
            "fingerprint": data_fingerprint(data),
            "examples": len(data),
        },
        "mentor_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "device": device,
    }

    write_meta = True
    if meta_path.exists():
        try:
            old = json.loads(meta_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            old = None
        if not isinstance(old, dict) or old.get("kind") != GENERATE_KIND:
            diff = [f"{meta_path.name} is not a mentor generate record"]
        else:
            diff = generate_meta_diff(old, meta)
        has_lines = out.exists() and out.stat().st_size > 0
        if diff and has_lines and not overwrite:
            raise ValueError(
                f"{out} was generated otherwise: {'; '.join(diff)}. Use another --out, or "
                "--overwrite to replace it"
            )
        if diff and out.exists():
            out.unlink()  # ours (it has our sidecar), and --overwrite (or empty)
        write_meta = bool(diff)
    if write_meta:
        out.parent.mkdir(parents=True, exist_ok=True)
        _write_json_atomic(meta_path, meta)

    rows, torn = _read_generated(out)
    if torn:
        console.print(f"{out}: dropped a torn last line ({torn} bytes)", highlight=False)
    ids = [int(data[i]["index"]) for i in range(len(data))]
    known = set(ids)
    done: dict[int, set[int]] = {}
    seen: dict[int, set[str]] = {}
    for n, r in enumerate(rows, 1):
        if r["index"] not in known or not 0 <= r["sample"] < samples_per_prompt:
            raise ValueError(
                f"{out}:{n}: (index {r['index']}, sample {r['sample']}) is not one of this "
                f"recipe's {split} examples x {samples_per_prompt} samples; the file is damaged "
                "(use --overwrite to start again)"
            )
        done.setdefault(r["index"], set()).add(r["sample"])
        seen.setdefault(r["index"], set()).add(str(r.get("completion", "")))
    last = rows[-1]["index"] if rows else None
    todo: list[tuple[int, list[int]]] = []  # (position in data, samples still to draw)
    for pos, idx in enumerate(ids):
        if idx not in done:
            todo.append((pos, list(range(samples_per_prompt))))
        elif idx == last:  # possibly cut short: the samples after the last one written
            rest = list(range(max(done[idx]) + 1, samples_per_prompt))
            if rest:
                todo.append((pos, rest))

    model = model.to(device)
    collate = asm.collate
    written = duplicates = generated = 0
    complete = len(ids) - len(todo)
    bar = Progress(len(ids), enabled=progress, initial=complete, label="generate", unit="prompts")
    try:
        with open(out, "ab") as f:
            for lo in range(0, len(todo), batch_size):
                chunk = todo[lo : lo + batch_size]
                batch = collate([data[pos] for pos, _ in chunk])
                lines = []
                for r, (pos, samples) in enumerate(chunk):
                    idx = ids[pos]
                    prompt = batch["prompt_ids"][r][batch["prompt_mask"][r].bool()]
                    p_list = prompt.tolist()
                    p_text = tok.decode(p_list, skip_special_tokens=not chat)
                    texts = seen.setdefault(idx, set())
                    for k in samples:
                        if sampling.greedy and k > 0:
                            duplicates += 1  # greedy decoding gives sample 0 again
                            continue
                        rng = torch.Generator().manual_seed(generation_seed(cfg.train.seed, idx, k))
                        gen = generate(
                            model, prompt[None], torch.ones_like(prompt)[None], sampling,
                            generator=rng, eos_token_id=eos, pad_token_id=pad,
                        )  # fmt: skip
                        generated += 1
                        keep = gen.completion_mask[0, gen.prompt_length :].bool().cpu()
                        c_list = gen.completion_ids[0].cpu()[keep].tolist()
                        c_text = tok.decode(c_list, skip_special_tokens=True)
                        if c_text in texts:
                            duplicates += 1
                            continue
                        texts.add(c_text)
                        line = {"index": idx, "sample": k, "prompt": p_text,
                                "completion": c_text, "prompt_ids": p_list,
                                "completion_ids": c_list}  # fmt: skip
                        lines.append(json.dumps(line, ensure_ascii=False) + "\n")
                f.write("".join(lines).encode())
                f.flush()
                written += len(lines)
                complete += len(chunk)
                bar.update(complete, {})
    finally:
        bar.close()
    return {
        "file": str(out),
        "meta": str(meta_path),
        "examples": len(ids),
        "split": split,
        "samples_per_prompt": samples_per_prompt,
        "written": written,
        "duplicates": duplicates,
        "generated": generated,
        "existing": len(rows),
        "lines": len(rows) + written,
        "torn_bytes": torn,
    }


__all__ = [
    "FROM_TEACHER",
    "Assembly",
    "LoadedRun",
    "RunResult",
    "build_run_data",
    "cache_recipe",
    "check_student_vocab",
    "data_tokenizer",
    "distill",
    "distill_diffusion",
    "evaluate_diffusion_run",
    "evaluate_run",
    "fit_on_labels",
    "generate_meta_diff",
    "generate_meta_path",
    "generate_recipe",
    "generation_seed",
    "load_run",
    "plan_recipe",
    "student_needs_teacher",
    "teacher_fit_key",
]
