"""Typed run configuration: recipes (YAML) + dotted command-line overrides -> ``RunConfig``.

Every key is validated when the config is loaded. Unknown keys fail with a did-you-mean hint,
bad values name the field, the value and what is allowed.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

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


COMMON_TEACHER_KEYS = ("source", "builder", "params", "path", "fit", "precision")


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
    precision: Literal["fp32", "bf16"] = "fp32"
    _options: Any = PrivateAttr(default=None)

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


class StudentConfig(_Strict):
    """How the student is built (a registered builder name and its parameters)."""

    builder: str = "mlp"
    params: dict[str, Any] = Field(default_factory=dict)


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


class OutputConfig(_Strict):
    """Where the run directory goes and which trackers receive metrics."""

    dir: str = "runs/default"
    trackers: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(default_factory=list)
    overwrite: bool = False


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
        from mentor.losses import Objective
        from mentor.losses.schedules import check_schedules

        try:
            check_schedules(self.train.schedules, Objective(self.objective))
        except ValueError as e:
            raise ValueError(str(e)) from None
        return self


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
    return list(getattr(model, "model_fields", {}))


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


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b.c=value`` into a key path and a YAML-parsed value (never evaluated as code)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value (e.g. train.lr=3e-4)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key part")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with each dotted ``key=value`` override applied."""
    out = copy.deepcopy(data)
    for text in overrides:
        path, value = parse_override(text)
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
    return out


def validate(data: dict[str, Any]) -> RunConfig:
    """Validate a raw mapping into a ``RunConfig`` (errors are ``ConfigError``)."""
    if not isinstance(data, dict):
        raise ConfigError(f"a recipe must be a YAML mapping, got {type(data).__name__}")
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_explain(e)) from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping with safe_load, with file-named errors."""
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"recipe file {str(p)!r} does not exist") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"recipe file {str(p)!r} is not valid YAML: {e}") from None
    if data is None:
        data = {}
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
