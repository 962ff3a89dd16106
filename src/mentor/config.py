"""Typed run configuration: recipes (YAML) + dotted command-line overrides -> ``RunConfig``.

Every key is validated when the config is loaded. Unknown keys fail with a did-you-mean hint,
bad values name the field, the value and what is allowed.

Values are read as YAML, except that a field whose type is text (``str`` or a ``Literal`` of
strings, e.g. ``name``, ``output.dir``, ``teacher.cache``, ``teacher.cache_check``) keeps the
text as written: YAML 1.1 would otherwise turn ``off``/``no``/``yes`` into booleans and
``2024`` into a number. Numeric, boolean, list and mapping fields (and the free-form
``params`` and ``objective`` sections) still get YAML values.
"""

from __future__ import annotations

import copy
import re
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from mentor.registry import did_you_mean


class ConfigError(ValueError):
    """A recipe or override is invalid; the message names the field and what to do."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class FitConfig(_Strict):
    """Train a model on labels before distillation (toy recipes train their own teacher)."""

    epochs: float = Field(20, gt=0)
    lr: float = Field(1e-3, gt=0)
    batch_size: int = Field(64, ge=1)
    weight_decay: float = Field(0.0, ge=0)
    # encoder classifiers (hf_classifier): "as_built" trains what the builder left trainable
    # (a frozen encoder: the head only); "finetune" fits the head, then the whole model for
    # finetune_epochs at finetune_lr; "auto" holds out dev_fraction of the labelled examples,
    # fits both ways on the rest and keeps the one more accurate on the held-out part
    encoder: Literal["as_built", "finetune", "auto"] = "as_built"
    finetune_epochs: float = Field(2.0, gt=0)
    finetune_lr: float = Field(3e-5, gt=0)
    dev_fraction: float = Field(0.15, gt=0, lt=1)


COMMON_TEACHER_KEYS = ("source", "builder", "params", "path", "fit", "precision")


def native_bf16() -> bool:
    """True on a CUDA GPU with bf16, or a CPU with avx512_bf16 / amx_bf16 instructions."""
    import torch

    if torch.cuda.is_available():
        return bool(torch.cuda.is_bf16_supported())
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


class TeacherConfig(_Strict):
    """Where the teacher signal comes from.

    ``source`` names a registered teacher source (``mentor.teachers.SOURCES``). The keys
    ``builder``/``params``/``path``/``fit``/``precision`` describe the teacher module; every
    other key belongs to the chosen source (e.g. ``cache`` and ``cache_check`` for
    ``source: cache``), is validated by it and read as ``teacher.options.<key>``.
    """

    model_config = ConfigDict(extra="allow", validate_assignment=True)

    source: str = "online"
    builder: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    path: str | None = None
    fit: FitConfig | None = None
    precision: Literal["fp32", "bf16", "auto"] = "fp32"
    _options: Any = PrivateAttr(default=None)

    @field_validator("precision", mode="after")
    @classmethod
    def _resolve_precision(cls, v: str) -> str:
        """``auto``: bf16 where the hardware computes it natively, else fp32 (resolved now, so
        ``config.yaml`` and cache provenance record what ran)."""
        return ("bf16" if native_bf16() else "fp32") if v == "auto" else v

    @model_validator(mode="after")
    def _source_options(self) -> TeacherConfig:
        import mentor.teachers  # noqa: F401  (registers every teacher source)
        from mentor.teachers.base import SOURCES

        if self.source not in SOURCES:
            raise ValueError(
                f"source: unknown teacher source {self.source!r}."
                f"{did_you_mean(self.source, SOURCES.names())} Valid: {', '.join(SOURCES.names())}"
            )
        cls = SOURCES.get(self.source)
        extra = dict(self.__pydantic_extra__ or {})
        own = list(cls.Options.model_fields)
        for key in extra:
            if key in own:
                continue
            elsewhere = [n for n in SOURCES.names() if key in SOURCES.get(n).Options.model_fields]
            where = f" (it belongs to source: {' or '.join(elsewhere)})" if elsewhere else ""
            raise ValueError(
                f"unknown key 'teacher.{key}' for source: {self.source}{where}."
                f"{did_you_mean(key, [*COMMON_TEACHER_KEYS, *own])} Valid keys: "
                f"{', '.join([*COMMON_TEACHER_KEYS, *own])}"
            )
        try:
            opts = cls.validate_options(extra, TeacherConfig)
        except ValidationError as e:
            raise ValueError(_explain_options(e, self.source)) from None
        self._options = opts
        dumped = opts.model_dump(mode="json")
        self.__pydantic_extra__ = {k: dumped[k] for k in own}
        return self

    @property
    def options(self) -> Any:
        """The validated keys of the chosen source (e.g. ``options.cache``)."""
        return self._options


def _explain_options(err: ValidationError, source: str) -> str:
    parts = []
    for e in err.errors():
        where = "teacher." + ".".join(str(p) for p in e["loc"])
        if e["type"] == "missing":
            parts.append(f"teacher.source={source} needs {where}")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            parts.append(f"{where}: invalid value {e.get('input')!r}: {msg}")
    return "; ".join(parts)


class DualHeadConfig(_Strict):
    """Dual-head distillation (DHO; Kang et al., "Simple Semi-supervised Knowledge Distillation
    from Vision-Language Models via Dual-Head Optimization", 2025): the student's classifier
    head learns from the labels, a second head from the teacher, and inference combines them
    as ``log(alpha·softmax(h_label) + (1-alpha)·softmax(h_distill / temperature))``. ``tune``
    picks (alpha, temperature) on the held-out split after training (optimistic: the same split
    then measures the student)."""

    alpha: float = Field(0.5, ge=0, le=1)
    temperature: float = Field(1.0, gt=0)
    init: Literal["fresh", "copy"] = "fresh"
    tune: bool = False


class StudentConfig(_Strict):
    """How the student is built (a registered builder name and its parameters); ``dual_head``
    adds DHO's second (distillation) head to a classification student."""

    builder: str = "mlp"
    params: dict[str, Any] = Field(default_factory=dict)
    dual_head: DualHeadConfig | None = None


class DataConfig(_Strict):
    """The dataset (a registered source name and its parameters) and its held-out split."""

    source: str = "sklearn"
    params: dict[str, Any] = Field(default_factory=dict)
    val_fraction: float = Field(0.2, gt=0, lt=1)
    split_seed: int = 0


class ScheduleConfig(_Strict):
    """Linear ramp of a loss weight or hyperparameter from ``start`` to ``end``."""

    start: float
    end: float
    steps: int = Field(..., ge=1)


class TrainConfig(_Strict):
    """Optimisation settings."""

    max_steps: int | None = Field(None, ge=1)
    epochs: float | None = Field(None, gt=0)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-3, gt=0)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    weight_decay: float = Field(0.0, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    schedule: Literal["constant", "linear", "cosine"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    grad_accum: int = Field(1, ge=1)
    grad_clip: float | None = Field(1.0, gt=0)
    precision: Literal["fp32", "bf16"] = "fp32"
    fused_loss_chunk: int | None = Field(None, ge=1)
    seed: int = 0
    checkpoint_every: int | None = Field(None, ge=1)
    checkpoint_minutes: float | None = Field(1.0, gt=0)
    log_every: int = Field(10, ge=1)
    schedules: dict[str, dict[str, ScheduleConfig]] = Field(default_factory=dict)
    progress: bool = True

    @model_validator(mode="after")
    def _steps_or_epochs(self) -> TrainConfig:
        if self.max_steps is None and self.epochs is None:
            self.epochs = 1.0
        return self


class EarlyStopConfig(_Strict):
    """Stop when the monitored eval metric has not improved for ``patience`` evaluations."""

    metric: str = "accuracy"
    mode: Literal["max", "min"] = "max"
    patience: int = Field(3, ge=1)


class EvalConfig(_Strict):
    """Held-out evaluation during training."""

    every: int | None = Field(None, ge=1)
    batch_size: int = Field(256, ge=1)
    early_stopping: EarlyStopConfig | None = None
    # train the same student on the labels alone (no teacher, same steps) before distilling:
    # warns when the teacher is not better than it, and final_metrics / eval.json / the report
    # state the gain of distillation over it with a 95% bootstrap interval
    label_only: bool = False


class OutputConfig(_Strict):
    """Where the run directory goes and which trackers receive metrics."""

    dir: str = "runs/default"
    trackers: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(default_factory=list)
    overwrite: bool = False


class GenerationConfig(_Strict):
    """Distillation with generation (causal LMs on prompt data, ``data.source: prompts``).

    ``mode``: ``off`` (the data's own completions), ``on_policy`` (the student samples the
    completions with its current weights every step; Agarwal et al., "On-Policy Distillation
    of Language Models: Learning from Self-Generated Mistakes", 2024), ``mixed`` (a fraction
    ``lambda`` of the batches on-policy, the rest from the data — GKD's λ), ``seq_kd`` (the
    teacher samples the completions; Kim & Rush, "Sequence-Level Knowledge Distillation",
    2016), ``replay`` (the student samples, and its samples are kept in a replay buffer and
    reused — the off-policy part of DistiLLM's adaptive off-policy approach, Ko et al.,
    "DistiLLM: Towards Streamlined Distillation for Large Language Models", ICML 2024). The loss
    counts only completion positions.

    ``replay`` keys: ``buffer_size`` (most sequences kept, oldest dropped first), ``reuse`` (the
    probability that a micro-batch is drawn from the buffer instead of freshly sampled, once the
    buffer holds at least one micro-batch of sequences) and ``reuse_warmup_steps`` (``reuse``
    ramps linearly from 0 at step 0 to its value at this step; 0 = constant from the start).
    DistiLLM's own off-policy schedule, fresh samples with probability ``1 - t/T``, is
    ``reuse: 1`` with ``reuse_warmup_steps`` = the run's total steps; its other, adaptive part
    (student samples vs. the data's, switched by the validation loss) is not built: ``replay``
    always trains on student samples. See ``docs/config.md``.

    ``samples_per_prompt`` (sampling modes): each prompt is sampled that many times per step
    (the micro-batch grows by that factor); the samples of one prompt share a ``groups`` id,
    which group-aware objectives (e.g. TSD-KD's re-ranking, PACED's pass rate) use.

    ``reward_field``: a data field (passed through with ``data.params.fields``) holding each
    prompt's reference answer; a sample's reward is 1 when its decoded completion contains that
    answer (whitespace-normalised), else 0. Objectives that gate or weight by quality (``kepo``,
    ``paced``, ``tsd_kd``) use it; without it they use their teacher-likelihood fallback.

    Every draw is seeded by (``train.seed``, step, example id, sample number), and the
    mixed/replay coins by (``train.seed``, step, micro-batch), so the samples do not depend on
    which process an example lands on: a multi-process run samples what one process samples
    (``replay`` keeps one buffer per process, so it is the exception).
    """

    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, populate_by_name=True, serialize_by_alias=True
    )

    mode: Literal["off", "on_policy", "mixed", "seq_kd", "replay"] = "off"
    lambda_: float = Field(0.5, ge=0, le=1, alias="lambda")
    max_new_tokens: int = Field(32, ge=1)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    buffer_size: int = Field(1000, ge=1)
    reuse: float = Field(0.5, ge=0, le=1)
    reuse_warmup_steps: int = Field(0, ge=0)
    samples_per_prompt: int = Field(1, ge=1)
    reward_field: str | None = None

    def reuse_at(self, step: int) -> float:
        """The probability of a replayed micro-batch at optimizer step ``step`` (0-based)."""
        if self.reuse_warmup_steps == 0:
            return self.reuse
        return self.reuse * min(1.0, step / self.reuse_warmup_steps)


class SelectionConfig(_Strict):
    """Teacher budgets and data selection (:mod:`mentor.selection`).

    The training set becomes a pool: the teacher is paid for ``params.initial`` examples (the
    labelled part of ``data.params.labeled`` first, then random ones), then every ``every``
    epochs (``every: 2``) or optimizer steps (``every: "200 steps"``) for ``params.per_round`` more chosen by ``method`` from the current student, until
    ``budget`` teacher calls are spent. The student trains on the paid examples: their own
    label where ``data.params.labeled`` kept one, else the teacher's (``params.pseudo_labels``).
    Methods: random, entropy, margin, least_confidence, rad, llkd, kd3, ddk, kd_pruned,
    label_free (see docs/selection.md). On language-model data ``ddk`` re-weights the domains
    of the training blocks instead (:mod:`mentor.domain_mixing`; ``budget`` optional).
    """

    method: str = "random"
    budget: int | None = Field(None, ge=1)
    every: int | str = 1
    params: dict[str, Any] = Field(default_factory=dict)

    @field_validator("every")
    @classmethod
    def _every(cls, v: int | str) -> int | str:
        from mentor.selection import parse_every

        parse_every(v)
        return v

    @field_validator("method")
    @classmethod
    def _known_method(cls, v: str) -> str:
        from mentor.selection import method_names

        if v not in method_names():
            raise ValueError(
                f"unknown selection method {v!r}; registered: {', '.join(method_names())}"
                + did_you_mean(v, method_names())
            )
        return v


# ----------------------------------------------------------------------------- diffusion
# (the generative task: docs/diffusion.md; trained by mentor.engine.diffusion)

DIFFUSION_SAMPLERS = ("ddim", "euler", "dpm_multistep")
BETA_SCHEDULES = ("squaredcos_cap_v2", "linear", "scaled_linear")


class DiffusionConfig(_Strict):
    """Few-step distillation of a diffusion teacher (data of task ``diffusion``).

    ``objective`` names a :data:`mentor.diffusion.objectives.DIFFUSION_OBJECTIVES` entry and
    ``params`` its keyword parameters (validated by ``build_objective``), or one block of
    parameters per objective name (the chosen objective's block is used). The noise schedule
    (``prediction_type``, ``beta_schedule``, ``num_train_timesteps``) is shared by teacher,
    student and objective; the cosine schedule needs ``v_prediction`` (or ``sample``) — with
    ``epsilon`` its last timestep (alpha ~ 5e-5) makes the x0 estimate explode.
    ``teacher_steps``/``teacher_sampler``: the reference teacher sampler (the speed-up is the
    1-step student against it); ``student_steps`` / ``eval_teacher_steps``: the NFEs evaluated;
    ``eval_samples``: samples drawn per setting; ``teacher_ema``: EMA decay of the teacher fit
    (``teacher.fit``); ``threads``: torch threads while training and evaluating (None: 1 for
    2-D points, where thread start-up costs more than the tiny matrix products, else torch's);
    ``scheduler_config``: a diffusers ``scheduler_config.json`` to take the schedule from
    (then ``prediction_type``/``beta_schedule``/``num_train_timesteps`` are read from it).
    """

    objective: str = "consistency_distillation"
    params: dict[str, Any] = Field(default_factory=dict)
    prediction_type: Literal["epsilon", "v_prediction", "sample"] = "v_prediction"
    beta_schedule: str = "squaredcos_cap_v2"
    num_train_timesteps: int = Field(1000, ge=2)
    teacher_steps: int = 50
    teacher_sampler: str = "ddim"
    student_steps: list[int] = Field(default_factory=lambda: [1, 2, 4])
    eval_samples: int = Field(2000, ge=8)
    eval_teacher_steps: list[int] = Field(default_factory=lambda: [1, 2, 4, 8, 50])
    teacher_ema: float | None = Field(None, gt=0, lt=1)
    threads: int | None = Field(None, ge=1)
    # a diffusers scheduler_config.json (a pretrained pipeline's) instead of the three keys above
    scheduler_config: str | None = None

    @field_validator("objective")
    @classmethod
    def _known_objective(cls, v: str) -> str:
        from mentor.diffusion.objectives import DIFFUSION_OBJECTIVES

        names = sorted(DIFFUSION_OBJECTIVES)
        if v not in names:
            raise ValueError(
                f"unknown diffusion objective {v!r}.{did_you_mean(v, names)} Valid: "
                f"{', '.join(names)}"
            )
        return v

    @field_validator("teacher_sampler")
    @classmethod
    def _known_sampler(cls, v: str) -> str:
        if v not in DIFFUSION_SAMPLERS:
            raise ValueError(
                f"unknown sampler {v!r}.{did_you_mean(v, DIFFUSION_SAMPLERS)} Valid: "
                f"{', '.join(DIFFUSION_SAMPLERS)}"
            )
        return v

    @field_validator("beta_schedule")
    @classmethod
    def _known_betas(cls, v: str) -> str:
        if v not in BETA_SCHEDULES:
            raise ValueError(
                f"unknown beta schedule {v!r}.{did_you_mean(v, BETA_SCHEDULES)} Valid: "
                f"{', '.join(BETA_SCHEDULES)}"
            )
        return v

    @field_validator("teacher_steps", "student_steps", "eval_teacher_steps", mode="before")
    @classmethod
    def _nfe(cls, v: Any, info: Any) -> Any:
        values = v if isinstance(v, list) else [v]
        if isinstance(v, list) and not v:
            raise ValueError("empty: list at least one NFE (e.g. [1])")
        T = info.data.get("num_train_timesteps", 1000)
        for n in values:
            if isinstance(n, bool) or not isinstance(n, int):
                raise ValueError(f"NFE {n!r} must be a whole number of sampling steps")
            if n < 1:
                raise ValueError(
                    f"NFE {n}: a number of sampling steps (network evaluations) must be at least 1"
                )
            if n > T:
                raise ValueError(f"NFE {n} exceeds diffusion.num_train_timesteps={T}")
        return v

    @field_validator("params")
    @classmethod
    def _objective_params(cls, v: dict[str, Any], info: Any) -> dict[str, Any]:
        """Flat keyword parameters of ``objective``, or one block per objective name (the
        chosen objective's block is used, so ``diffusion.objective=dmd2`` picks DMD2's)."""
        name = info.data.get("objective")
        if name is None:  # the objective itself was refused
            return v
        from mentor.diffusion.objectives import DIFFUSION_OBJECTIVES, objective_params

        per_objective = bool(v) and all(k in DIFFUSION_OBJECTIVES for k in v)
        named = [k for k in v if k in DIFFUSION_OBJECTIVES]
        if named and not per_objective:
            flat = [k for k in v if k not in DIFFUSION_OBJECTIVES]
            raise ValueError(
                f"blocks per objective ({', '.join(named)}) mixed with flat parameters "
                f"({', '.join(flat)}): put each parameter in its objective's block, e.g. "
                f"diffusion.params.{name}.{flat[0]}"
            )
        blocks = v if per_objective else {name: v}
        out: dict[str, Any] = {}
        for obj, block in blocks.items():
            where = f"{obj}." if per_objective else ""
            if block is None:
                block = {}
            if not isinstance(block, dict):
                raise ValueError(f"{where.rstrip('.')}: a mapping of {obj}'s parameters expected")
            if "schedule" in block:
                raise ValueError(
                    f"{where}schedule: the schedule is built from diffusion.prediction_type, "
                    "diffusion.beta_schedule and diffusion.num_train_timesteps"
                )
            valid = [p for p in objective_params(obj) if p != "schedule"]
            unknown = [k for k in block if k not in valid]
            if unknown:
                raise ValueError(
                    f"{where}{unknown[0]}: objective {obj} has no parameter {unknown[0]!r}."
                    f"{did_you_mean(unknown[0], valid)} Valid: {', '.join(valid)}"
                )
            # YAML 1.1 reads 1e-3 (no dot) as text: numbers in exponent form become floats
            sci = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")
            out[obj] = {k: float(x) if isinstance(x, str) and sci.fullmatch(x) else x
                        for k, x in block.items()}  # fmt: skip
        return out if per_objective else out[name]

    def objective_kwargs(self) -> dict[str, Any]:
        """The chosen objective's parameters (its block when ``params`` is per objective)."""
        from mentor.diffusion.objectives import DIFFUSION_OBJECTIVES

        p = self.params
        if p and all(k in DIFFUSION_OBJECTIVES for k in p):
            return dict(p.get(self.objective) or {})
        return dict(p)


class RunConfig(_Strict):
    """A complete distillation run."""

    name: str = "run"
    description: str = ""
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    student: StudentConfig = Field(default_factory=StudentConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    objective: dict[str, dict[str, Any]] = Field(
        default_factory=lambda: {"kd": {"weight": 1.0}},
    )
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    selection: SelectionConfig | None = None
    # the generative task (docs/diffusion.md); its recipes do not use `objective`
    diffusion: DiffusionConfig | None = None

    @field_validator("objective", mode="before")
    @classmethod
    def _objective_terms(cls, v: Any) -> Any:
        if not isinstance(v, dict):
            return v
        v = {k: ({} if t is None else t) for k, t in v.items() if t is not False}
        for term, spec in v.items():
            if not isinstance(spec, dict):
                raise ValueError(
                    f"term {term!r} must be a mapping such as {{weight: 1.0}}, got {spec!r}"
                )
        return v

    @model_validator(mode="after")
    def _objective_losses(self) -> RunConfig:
        if self.diffusion is not None:  # the logit objective is not used by the diffusion task
            return self
        from mentor.losses import Objective
        from mentor.losses.schedules import check_schedules

        try:
            objective = Objective(self.objective)
            check_schedules(self.train.schedules, objective)
        except ValueError as e:
            raise ValueError(str(e)) from None
        _check_weights(objective.weights, self.train.schedules)
        return self


def _check_weights(weights: dict[str, float], schedules: dict[str, dict[str, Any]]) -> None:
    """Refuse negative scheduled weights and an objective whose weights are all zero.

    A term counts as active when its weight is positive, or when a schedule ramps its weight
    from or to a positive value (a weight may start at 0 and be ramped up).
    """
    active = []
    for term, w in weights.items():
        ramp = schedules.get(term, {}).get("weight")
        if ramp is not None:
            for end in ("start", "end"):
                v = getattr(ramp, end)
                if not v >= 0:  # negative or NaN
                    raise ValueError(
                        f"train.schedules.{term}.weight.{end}: weight {v} of term {term!r} is "
                        "negative or not a number; loss weights must be >= 0"
                    )
            if max(ramp.start, ramp.end) > 0:
                active.append(term)
        elif w > 0:
            active.append(term)
    if not active:
        terms = ", ".join(f"objective.{t}.weight={weights[t]:g}" for t in weights)
        raise ValueError(
            f"objective: every term has weight 0 ({terms}), so the loss is always 0 and the "
            "student would not learn; give at least one term a positive weight (or ramp it up "
            "with train.schedules.<term>.weight)"
        )


# ----------------------------------------------------------------------------- loading


def _format_loc(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc if not str(p).startswith("function-"))


def _fields_at(loc: tuple[Any, ...]) -> list[str]:
    """Valid keys of the config section at ``loc`` (for did-you-mean on unknown keys)."""
    model: Any = RunConfig
    for part in loc:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        ann = field.annotation
        model = next(
            (
                a
                for a in getattr(ann, "__args__", (ann,))
                if isinstance(a, type) and issubclass(a, BaseModel)
            ),
            None,
        )
        if model is None:
            return []
    return [f.alias or n for n, f in getattr(model, "model_fields", {}).items()]


def _explain(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        where = _format_loc(loc) or "config"
        if e["type"] == "extra_forbidden":
            parent, key = loc[:-1], str(loc[-1])
            valid = _fields_at(parent)
            hint = did_you_mean(key, valid)
            section = _format_loc(parent) or "top level"
            lines.append(f"unknown key {where!r} ({section}).{hint} Valid keys: {', '.join(valid)}")
            continue
        msg = e["msg"].removeprefix("Value error, ")
        if not loc:
            lines.append(msg)
        elif "input" in e and e["type"] not in ("value_error", "assertion_error"):
            lines.append(f"{where}: invalid value {e['input']!r}: {msg}")
        else:
            lines.append(f"{where}: {msg}")
    return "invalid config:\n  " + "\n  ".join(lines)


_NONE = type(None)
_YAML_FALSE = ("false", "no", "n", "off")
_YAML_TRUE = ("true", "yes", "y", "on")


def _union_args(ann: Any) -> tuple[Any, ...]:
    if get_origin(ann) in (Union, types.UnionType):
        return get_args(ann)
    return (ann,)


def _literal_values(ann: Any) -> list[Any]:
    return [v for a in _union_args(ann) if get_origin(a) is Literal for v in get_args(a)]


def _is_text(ann: Any) -> bool:
    """Whether a field holds text: ``str``, a ``Literal`` of strings, optionally ``| None``."""
    args = [a for a in _union_args(ann) if a is not _NONE]
    return bool(args) and all(
        a is str or (get_origin(a) is Literal and all(isinstance(v, str) for v in get_args(a)))
        for a in args
    )


def _child(node: Any, part: Any) -> Any:
    if isinstance(node, dict):
        return node.get(part)
    if isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
        return node[part]
    return None


def _teacher_option(key: str, section: Any) -> Any:
    """Type of an extra ``teacher.<key>``: declared by the chosen source's ``Options`` model
    (by every source declaring ``key`` when the source is not known yet)."""
    import mentor.teachers  # noqa: F401  (registers every teacher source)
    from mentor.teachers.base import SOURCES

    source = section.get("source") if isinstance(section, dict) else None
    names = [source] if isinstance(source, str) and source in SOURCES else SOURCES.names()
    anns = []
    for name in names:
        field = SOURCES.get(name).Options.model_fields.get(key)
        if field is not None:
            anns.append(field.annotation)
    if not anns:
        return Any
    if key == "members":  # an ensemble's members are teacher sections (see validate_options)
        return list[TeacherConfig]
    if all(_is_text(a) for a in anns) or len({repr(a) for a in anns}) == 1:
        return anns[0]
    return Any  # sources disagree on the type: leave the value to YAML


def _annotation_at(path: Sequence[Any], data: Any) -> Any:
    """The declared type of the config value at ``path`` (``Any`` where it is free-form).

    ``data`` is the (raw) config mapping the path points into; it tells which teacher source
    declares the extra ``teacher.*`` keys.
    """
    ann: Any = RunConfig
    node = data
    for part in path:
        nxt: Any = Any
        for a in _union_args(ann):
            if isinstance(a, type) and issubclass(a, BaseModel):
                field = a.model_fields.get(str(part))
                if field is not None:
                    nxt = field.annotation
                elif issubclass(a, TeacherConfig):
                    nxt = _teacher_option(str(part), node)
                break
            if get_origin(a) is dict and len(get_args(a)) == 2:
                nxt = get_args(a)[1]
                break
            if get_origin(a) is list and get_args(a) and isinstance(part, int):
                nxt = get_args(a)[0]
                break
        if nxt is Any:
            return Any
        ann, node = nxt, _child(node, part)
    return ann


def _keep_text(node: yaml.Node, value: Any, path: list[Any], context: Any) -> Any:
    """``value`` (constructed from ``node``) with every plain scalar that YAML turned into a
    bool, number or date given back as the text written, where the field at its path is text."""
    if len(path) > 64:  # a recursive alias
        return value
    if isinstance(node, yaml.MappingNode) and isinstance(value, dict):
        out = dict(value)
        for knode, vnode in node.value:  # merge keys are already flattened, last one wins
            key = knode.value if isinstance(knode, yaml.ScalarNode) else None
            if key in value:
                out[key] = _keep_text(vnode, value[key], [*path, key], context)
        return out
    if (
        isinstance(node, yaml.SequenceNode)
        and isinstance(value, list)
        and len(node.value) == len(value)
    ):
        return [
            _keep_text(n, v, [*path, i], context) for i, (n, v) in enumerate(zip(node.value, value))
        ]
    if (
        isinstance(node, yaml.ScalarNode)
        and node.style is None
        and value is not None
        and not isinstance(value, str)
        and _is_text(_annotation_at(path, context))
    ):
        return node.value
    return value


def _load_yaml(text: str, base: Sequence[Any] = (), context: Any = None) -> Any:
    """``yaml.safe_load(text)``, keeping text fields as written (see the module docstring).

    ``base`` is where the document goes in the config and ``context`` the config it goes
    into (default: the document itself).
    """
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        value = loader.construct_document(node)
    finally:
        loader.dispose()
    return _keep_text(node, value, list(base), value if context is None else context)


def _split_override(text: str) -> tuple[list[str], str]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value (e.g. train.lr=3e-4)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key part")
    return key.split("."), raw


def _text_value(raw: str) -> Any:
    """An override of a text field: the text as typed. A quoted YAML scalar (``'off'``) is
    unquoted; ``null``/``~`` is None (clears an optional field, refused for the others)."""
    text = raw.strip()
    if not text:
        return ""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return text
    if isinstance(node, yaml.ScalarNode):
        if node.style in ("'", '"'):
            return yaml.safe_load(text)
        if node.tag == "tag:yaml.org,2002:null":
            return None
    return text


def _override_value(path: list[str], raw: str, context: Any) -> Any:
    ann = _annotation_at(path, context)
    if _is_text(ann):
        return _text_value(raw)
    if not raw.strip():
        return ""
    try:
        value = _load_yaml(raw, path, context)
    except yaml.YAMLError:
        return raw
    if isinstance(value, bool) and _is_number(ann):  # `train.seed=no` is not 0
        raise ConfigError(
            f"override {'.'.join(path)}={raw}: a number is expected, and YAML reads {raw!r} as "
            f"{str(value).lower()}"
        )
    return value


def _is_number(ann: Any) -> bool:
    """Whether a field annotation admits numbers but not booleans (``int``, ``float | None``)."""
    args = getattr(ann, "__args__", None) or (ann,)
    kinds = [a for a in args if a is not type(None)]
    return bool(kinds) and all(a in (int, float) for a in kinds)


def parse_override(text: str, data: dict[str, Any] | None = None) -> tuple[list[str], Any]:
    """Split ``a.b.c=value`` into a key path and its value (never evaluated as code).

    Text fields (``name``, ``output.dir``, ``teacher.cache_check``, ...) keep the text as typed
    (``teacher.cache_check=off`` is ``"off"``, ``output.dir=2024`` is ``"2024"``); other values
    are parsed as YAML (``train.lr=3e-4``, ``train.progress=false``, ``x.params.layers=[0,5]``).
    ``data``: the config the override applies to (it tells which teacher source declares an
    extra ``teacher.*`` key).
    """
    path, raw = _split_override(text)
    return path, _override_value(path, raw, data if data is not None else {})


def _set(out: dict[str, Any], text: str, path: list[str], value: Any) -> None:
    node = out
    for i, part in enumerate(path[:-1]):
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        elif not isinstance(nxt, dict):
            where = ".".join(path[: i + 1])
            raise ConfigError(f"override {text!r}: {where} is a value, not a section")
        node = nxt
    if path[0] == "objective" and len(path) == 2 and value is None:
        node.pop(path[-1], None)  # objective.kd=null removes the term
    else:
        node[path[-1]] = value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with each dotted ``key=value`` override applied.

    Values are typed by the field they set (see :func:`parse_override`); the config with every
    override applied as YAML tells which teacher source the extra ``teacher.*`` keys belong to.
    """
    split = [(text, *_split_override(text)) for text in overrides]
    if not split:
        return copy.deepcopy(data)
    draft = copy.deepcopy(data)
    for text, path, raw in split:
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        _set(draft, text, path, value)
    out = copy.deepcopy(data)
    for text, path, raw in split:
        _set(out, text, path, _override_value(path, raw, draft))
    return out


def _switch_word(ann: Any, value: bool) -> str | None:
    """The one allowed ``Literal`` word YAML 1.1 reads as ``value`` (``off`` for False)."""
    spellings = _YAML_TRUE if value else _YAML_FALSE
    words = [v for v in _literal_values(ann) if isinstance(v, str) and v.lower() in spellings]
    return words[0] if len(words) == 1 else None


def _bools_to_words(value: Any, path: list[Any], context: Any) -> Any:
    """Booleans given to ``Literal`` fields that allow exactly one YAML 1.1 spelling of them
    (``teacher.cache_check: False`` -> ``off``), for mappings that did not come from text."""
    if isinstance(value, dict):
        return {k: _bools_to_words(v, [*path, k], context) for k, v in value.items()}
    if isinstance(value, list):
        return [_bools_to_words(v, [*path, i], context) for i, v in enumerate(value)]
    if isinstance(value, bool) and len(path) < 64:
        word = _switch_word(_annotation_at(path, context), value)
        if word is not None:
            return word
    return value


def validate(data: dict[str, Any]) -> RunConfig:
    """Validate a raw mapping into a ``RunConfig`` (errors are ``ConfigError``)."""
    if not isinstance(data, dict):
        raise ConfigError(f"a recipe must be a YAML mapping, got {type(data).__name__}")
    data = _bools_to_words(data, [], data)
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_explain(e)) from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a recipe's YAML mapping (safe loader, text fields kept as written), with
    file-named errors; an empty file is refused (it is not "all defaults")."""
    p = Path(path)
    try:
        data = _load_yaml(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"recipe file {str(p)!r} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"recipe file {str(p)!r} is a directory, not a YAML file") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"recipe file {str(p)!r} is not valid YAML: {e}") from None
    if data is None:
        raise ConfigError(
            f"recipe file {str(p)!r} is empty (no keys, only blank lines or comments); write "
            "the recipe's settings, or start from a shipped recipe (`mentor recipes` lists "
            "them). For all defaults, write `{}`"
        )
    if not isinstance(data, dict):
        raise ConfigError(f"recipe file {str(p)!r} must hold a mapping at the top level")
    return data


def load_config(
    recipe: str | Path | dict[str, Any], overrides: list[str] | None = None
) -> RunConfig:
    """Load a recipe (shipped name, YAML path or mapping), apply overrides, validate."""
    if isinstance(recipe, dict):
        data = recipe
    else:
        from mentor.recipes import resolve_recipe

        try:
            path = resolve_recipe(str(recipe))
        except ValueError as e:
            raise ConfigError(str(e)) from None
        data = read_yaml(path)
    return validate(apply_overrides(data, list(overrides or [])))


def dump_config(cfg: RunConfig) -> str:
    """The resolved config as YAML (what a run directory's ``config.yaml`` holds)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
