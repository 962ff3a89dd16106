"""``mentor search``: which student to distil? Score candidate students cheaply, then confirm.

A search expands a grid of student settings (dotted config keys, YAML lists) into candidates,
scores every candidate with one or two proxies of its distilled quality, measures its cost
(parameters, CPU latency and throughput) and reports the Pareto front of quality vs cost:

* **DisWOT** (training-free; Dong et al., "DisWOT: Student Architecture Search for
  Distillation WithOut Training", CVPR 2023): how similar the *untrained* candidate is to the
  teacher on a calibration batch of the recipe's training data. The paper scores a candidate
  by two distances between Gram matrices of teacher and student, each row-normalised as in
  similarity-preserving KD (Tung & Mori, "Similarity-Preserving Knowledge Distillation", ICCV
  2019): a *semantic* one between the inter-class correlations of Grad-CAM class activation
  maps (Selvaraju et al., "Grad-CAM", ICCV 2017), and a *sample-relation* one between the
  ``B x B`` correlations of a batch's features. Implemented here (:func:`diswot_score`):

  - relation: ``G = rownorm(F Fᵀ)`` of the penultimate features ``F`` (the input of the output
    layer; for causal LMs up to 256 attended token positions of the batch play the samples);
    ``relation = −‖G_T − G_S‖_F``; the same on the output logits is reported as
    ``relation_logits`` (not in the score);
  - semantic: the class-activation analogue for models without spatial maps: with ``Z`` the
    ``B x C`` logits, class ``c``'s "activation map" is its column over the batch samples, and
    ``semantic = −‖rownorm(Z_Tᵀ Z_T) − rownorm(Z_Sᵀ Z_S)‖_F`` (``C x C``; skipped above 1,024
    classes). The paper's maps are Grad-CAM maps over the spatial positions of the last
    convolutional features, which an MLP or a language model does not have;
  - ``score = semantic + relation`` (0 is the maximum: a student identical to the teacher),
    averaged over ``calibration_batches`` batches and ``seeds`` random initialisations of the
    candidate (students copied from the teacher — ``prune``, ``layer_drop`` — are
    deterministic and scored once). Not implemented: the paper's evolutionary search and its
    second stage (DisWOT†, distilling with the searched metrics as losses); the semantic term
    uses logits over samples instead of Grad-CAM maps over pixels.

* **Short KD**: the candidate distilled for ``proxy_steps`` optimizer steps with the recipe's
  objective, data order and seed, then scored on the held-out split (accuracy for classifiers,
  −perplexity for causal LMs, cosine to the teacher for embeddings).

``confirm=K`` trains the top-K candidates with the recipe's own length and reports their final
held-out quality, the Spearman rank correlation of each proxy with it, and what the proxies
cost as a fraction of training. ``teachers`` checks the capacity gap (Zhang et al., "Towards
the Law of Capacity Gap in Distilling Language Models", 2023): the best candidate distilled
(short-KD budget) from each teacher variant — which teacher gives the best student?

Nothing is written outside ``out`` except mentor's shared cache of fitted teachers
(``$MENTOR_CACHE/teachers``), which ``mentor distill`` uses too: candidates train without a
run directory (:class:`~mentor.engine.Distiller` with ``write_run=False``).
"""

from __future__ import annotations

import inspect
import itertools
import json
import math
import shlex
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate.utils import set_seed
from torch import Tensor, nn

from mentor._console import err as console
from mentor.assembly import (
    FROM_TEACHER,
    Assembly,
    _reward_fn,
    check_student_vocab,
    student_needs_teacher,
)
from mentor.config import ConfigError, RunConfig, load_config
from mentor.engine import Distiller
from mentor.models import model_outputs
from mentor.progress import Progress
from mentor.registry import did_you_mean
from mentor.students import build_model
from mentor.students.builders import BUILDERS, count_parameters
from mentor.tasks import Task, heldout

PROXIES = ("diswot", "short_kd")
DISWOT_TASKS = ("classification", "causal_lm")  # tasks whose outputs are class / token logits
MAX_SEMANTIC_CLASSES = 1024
MAX_POSITIONS = 256  # token positions per calibration batch of a causal LM
SEARCH_KIND = "mentor search"

# ----------------------------------------------------------------------------- the grid


def parse_grid(specs: Sequence[str]) -> list[tuple[str, list[Any]]]:
    """``["student.params.hidden=[[8],[16]]", ...]`` -> ``[("student.params.hidden", [[8],
    [16]]), ...]``: each value list parsed as YAML; a value that is not a YAML list is read as
    comma-separated values (``sparsity=0.3,0.5`` is ``[0.3, 0.5]``; ``hidden=32`` is one
    value). Empty lists, repeated keys and keys outside the student/objective/train settings
    are refused."""
    out: list[tuple[str, list[Any]]] = []
    for spec in specs:
        if "=" not in spec:
            raise ValueError(f"--grid {spec!r}: use KEY=[v1, v2, ...] (e.g. "
                             "'student.params.hidden=[[16],[32]]')")  # fmt: skip
        key, raw = spec.split("=", 1)
        key = key.strip()
        if not key or any(not p for p in key.split(".")):
            raise ValueError(f"--grid {spec!r}: the key has an empty part")
        try:
            values = yaml.safe_load(raw) if raw.strip() else []
            if not isinstance(values, list):  # v1,v2,... (no brackets) is [v1,v2,...]
                values = yaml.safe_load(f"[{raw}]")
        except yaml.YAMLError as e:
            raise ValueError(f"--grid {key}: {raw!r} is not a YAML list ({e})") from None
        if not values:
            raise ValueError(f"--grid {key}: the list of values is empty; give at least one")
        if any(k == key for k, _ in out):
            raise ValueError(f"--grid {key} is given twice: put all its values in one list")
        for bad in ("data.", "teacher.", "output.", "name"):
            if key == bad.rstrip(".") or key.startswith(bad):
                why = {"data.": "every candidate is scored on the recipe's data",
                       "teacher.": "teacher variants go to --teachers (the capacity-gap check)",
                       "output.": "candidates write no run directory", "name": "it names the "
                       "search"}[bad]  # fmt: skip
                raise ValueError(f"--grid {key}: {bad}{'*' if bad.endswith('.') else ''} cannot be searched "
                                 f"({why})")  # fmt: skip
        out.append((key, values))
    return out


def expand_grid(grid: Sequence[tuple[str, list[Any]]]) -> list[dict[str, Any]]:
    """The Cartesian product of the grid, first key slowest: ``[{key: value, ...}, ...]``."""
    if not grid:
        return [{}]
    keys = [k for k, _ in grid]
    return [dict(zip(keys, combo)) for combo in itertools.product(*(v for _, v in grid))]


def as_overrides(values: dict[str, Any]) -> list[str]:
    """Dotted overrides ``key=<JSON>`` (JSON is YAML flow: lists, numbers, quoted text)."""
    return [f"{k}={json.dumps(v)}" for k, v in values.items()]


DEFAULT_GRIDS = {
    "mlp": "student.params.hidden: widths 8, 16, 32, 64 x depths 1, 2 (8 candidates)",
    "cnn": "student.params.channels: [4,8], [8,16], [16,32], [32,64]",
    "tfidf_mlp": "student.params.hidden: [128], [256], [512], [1024]",
    "layer_drop": "student.params.num_layers: 1 .. teacher depth - 1 (at most 8, evenly spaced)",
    "shrink": "student.params.num_layers: 1 and half the teacher's depth x "
    "student.params.hidden_size: 1/4, 1/2 and all of the teacher's width",
    "prune": "student.params.sparsity: 0.3, 0.5, 0.7, 0.9 (magnitude, wanda); method: "
    "structured: student.params.channels (CNN teacher) or student.params.intermediate "
    "0.25, 0.5, 0.75",
}


def default_grid(cfg: RunConfig, teacher: nn.Module | None = None) -> list[tuple[str, list[Any]]]:
    """The grid used without ``--grid``, per student builder (see :data:`DEFAULT_GRIDS`).

    ``teacher``: the teacher's architecture (``layer_drop``/``shrink`` read its depth and width).
    """
    b, p = cfg.student.builder, cfg.student.params
    if b == "mlp":
        return [("student.params.hidden", [[w] * d for d in (1, 2) for w in (8, 16, 32, 64)])]
    if b == "cnn":
        return [("student.params.channels", [[4, 8], [8, 16], [16, 32], [32, 64]])]
    if b == "tfidf_mlp":
        return [("student.params.hidden", [[128], [256], [512], [1024]])]
    if b == "prune":
        method = p.get("method", "wanda")
        if method != "structured":
            return [("student.params.sparsity", [0.3, 0.5, 0.7, 0.9])]
        key = "channels" if cfg.teacher.builder == "cnn" else "intermediate"
        return [(f"student.params.{key}", [0.25, 0.5, 0.75])]
    if b in ("layer_drop", "shrink") and teacher is not None:
        from mentor.models.hf import hf_core
        from mentor.students.hf_builders import find_layers

        n = len(find_layers(teacher)[1])
        if b == "layer_drop":
            ks = sorted({round(1 + i * (n - 2) / 7) for i in range(8)}) if n > 2 else [1]
            return [("student.params.num_layers", ks)]
        core = hf_core(teacher)
        h = int(core.config.hidden_size)
        heads = int(getattr(core.config, "num_attention_heads", 1) or 1)
        widths = sorted({w for w in (h // 4, h // 2, h) if w >= heads and w % heads == 0})
        return [("student.params.num_layers", sorted({1, max(1, n // 2)})),
                ("student.params.hidden_size", widths)]  # fmt: skip
    raise ValueError(
        f"mentor search has no default grid for student.builder={b!r}: give one or more "
        "--grid KEY=[v1, v2, ...] (e.g. --grid 'student.params.hidden=[[16],[32]]')"
    )


@dataclass
class Candidate:
    """One student setting of the grid: its overrides and resolved config."""

    index: int
    values: dict[str, Any]
    cfg: RunConfig
    implied: list[str] = field(default_factory=list)  # overrides added to keep it valid

    @property
    def overrides(self) -> list[str]:
        """The grid overrides that make this candidate (as typed on a command line)."""
        return as_overrides(self.values) + self.implied

    @property
    def label(self) -> str:
        """A short name: the grid values."""
        return " ".join(f"{k.removeprefix('student.params.')}={json.dumps(v)}"
                        for k, v in self.values.items()) or "(recipe)"  # fmt: skip


_LAYER_CHOICE = ("layers", "every", "num_layers")


def _implied(base: RunConfig, values: dict[str, Any]) -> list[str]:
    """``layer_drop`` takes one of layers / every / num_layers: a grid over one of them clears
    the recipe's other (``layers: auto`` with ``num_layers`` is kept: that is one choice)."""
    if base.student.builder != "layer_drop":
        return []
    p = base.student.params
    varied = {k.removeprefix("student.params.") for k in values} & set(_LAYER_CHOICE)
    out = []
    for k in _LAYER_CHOICE:
        if not varied or k in varied or p.get(k) is None:
            continue
        if k == "layers" and p[k] == "auto" and "num_layers" in varied:
            continue
        out.append(f"student.params.{k}=null")
    return out


def check_student_params(cfg: RunConfig, where: str = "") -> None:
    """Refuse ``student.params`` keys the builder does not take (before anything is built)."""
    b = cfg.student.builder
    name = "hf" if b.startswith("hf:") else b
    fn = BUILDERS.get(name)
    sig = inspect.signature(fn)
    valid = [p for p, v in sig.parameters.items() if v.kind is inspect.Parameter.KEYWORD_ONLY]
    for k in cfg.student.params:
        if k not in valid:
            raise ConfigError(
                f"{where}student.params.{k}: builder {b!r} has no parameter {k!r}."
                f"{did_you_mean(k, valid)} Valid parameters: {', '.join(valid)}"
            )


def make_candidates(
    recipe: str | Path | dict[str, Any],
    overrides: Sequence[str],
    grid: Sequence[tuple[str, list[Any]]],
) -> list[Candidate]:
    """Every candidate's config, validated (an unknown key is the config's own error)."""
    base = load_config(recipe, list(overrides))
    out = []
    for i, values in enumerate(expand_grid(grid)):
        implied = _implied(base, values)
        where = f"candidate {i} ({' '.join(as_overrides(values))}): " if values else ""
        try:
            cfg = load_config(recipe, [*overrides, *as_overrides(values), *implied])
            check_student_params(cfg)
        except ConfigError as e:
            raise ConfigError(f"{where}{e}") from None
        out.append(Candidate(i, values, cfg, implied))
    return out


# ----------------------------------------------------------------------------- DisWOT


def gram(x: Tensor) -> Tensor:
    """``rownorm(x xᵀ)``: the ``N x N`` correlations of the rows of ``x`` (flattened to 2-D),
    each row of the Gram matrix L2-normalised (similarity-preserving KD's ``G``)."""
    x = x.reshape(x.shape[0], -1).double()
    g = x @ x.T
    return torch.nn.functional.normalize(g, p=2, dim=1)


def gram_distance(a: Tensor, b: Tensor) -> float:
    """``‖gram(a) − gram(b)‖_F`` (the rows of ``a`` and ``b`` are the same samples)."""
    return float(torch.linalg.matrix_norm(gram(a) - gram(b)))


def _head(model: nn.Module) -> nn.Module | None:
    """The output layer whose input is the penultimate feature."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if isinstance(head, nn.Linear):
        return head
    linear = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linear[-1] if linear else None


@torch.no_grad()
def _outputs(model: nn.Module, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
    """(logits, penultimate features) of ``model`` on ``batch``, on the CPU, eval mode."""
    was = model.training
    model.eval()
    dev = next(model.parameters(), torch.empty(0)).device
    batch = {k: v.to(dev) if isinstance(v, Tensor) else v for k, v in batch.items()}
    seen: list[Tensor] = []
    head = _head(model)
    hook = head.register_forward_pre_hook(lambda _m, a: seen.append(a[0])) if head else None
    try:
        logits = model_outputs(model, batch)
    finally:
        if hook is not None:
            hook.remove()
        model.train(was)
    feats = seen[-1] if seen else logits
    return logits.float().cpu(), feats.float().cpu()


def _rows(x: Tensor, positions: Tensor | None) -> Tensor:
    """Samples as rows: ``[B, ...]`` as is; token positions ``[B, T, D]`` picked (flat index)."""
    if positions is None:
        return x.reshape(x.shape[0], -1)
    return x.reshape(-1, x.shape[-1])[positions]


@dataclass
class _Reference:
    """The teacher's side of DisWOT on the calibration batches (computed once)."""

    batches: list[dict[str, Any]]
    positions: list[Tensor | None]
    semantic: list[Tensor | None]
    relation: list[Tensor]
    relation_logits: list[Tensor]
    seconds: float


def calibration_batches(
    data: Any, collate: Callable[[list[Any]], Any], n: int, batch_size: int, seed: int
) -> list[dict[str, Any]]:
    """``n`` disjoint batches of the training data (a seeded random choice)."""
    g = torch.Generator().manual_seed(seed * 7_919 + 17)
    perm = torch.randperm(len(data), generator=g).tolist()
    b = min(batch_size, len(data))
    out = []
    for k in range(n):
        idx = perm[k * b : (k + 1) * b]
        if len(idx) < 2:
            break
        out.append(collate([data[i] for i in idx]))
    if not out:
        raise ValueError("DisWOT needs at least 2 training examples for a calibration batch")
    return out


def diswot_reference(
    teacher: nn.Module, batches: list[dict[str, Any]], task: str, seed: int = 0
) -> _Reference:
    """The teacher's Gram matrices on the calibration batches."""
    t0 = time.perf_counter()
    ref = _Reference(batches, [], [], [], [], 0.0)
    for k, batch in enumerate(batches):
        logits, feats = _outputs(teacher, batch)
        pos = None
        if task == "causal_lm":
            mask = batch.get("attention_mask")
            flat = (
                torch.ones(logits.shape[:2], dtype=torch.bool) if mask is None else mask.bool()
            ).reshape(-1)
            where = torch.nonzero(flat.cpu()).flatten()
            g = torch.Generator().manual_seed(seed * 1_009 + k)
            pos = where[torch.randperm(len(where), generator=g)[:MAX_POSITIONS]].sort().values
        z, f = _rows(logits, pos), _rows(feats, pos)
        ref.positions.append(pos)
        ref.semantic.append(gram(z.T) if z.shape[1] <= MAX_SEMANTIC_CLASSES else None)
        ref.relation.append(gram(f))
        ref.relation_logits.append(gram(z))
    ref.seconds = time.perf_counter() - t0
    return ref


def diswot_against(ref: _Reference, students: Sequence[nn.Module]) -> dict[str, float | None]:
    """DisWOT of one candidate (``students``: its random initialisations) against ``ref``."""
    sem: list[float] = []
    rel: list[float] = []
    rel_z: list[float] = []
    for student in students:
        for k, batch in enumerate(ref.batches):
            logits, feats = _outputs(student, batch)
            z, f = _rows(logits, ref.positions[k]), _rows(feats, ref.positions[k])
            if ref.semantic[k] is not None:
                if z.shape[1] != ref.semantic[k].shape[0]:
                    raise ValueError(
                        f"DisWOT: the student has {z.shape[1]} outputs and the teacher "
                        f"{ref.semantic[k].shape[0]}: they must predict the same classes"
                    )
                sem.append(float(torch.linalg.matrix_norm(gram(z.T) - ref.semantic[k])))
            rel.append(float(torch.linalg.matrix_norm(gram(f) - ref.relation[k])))
            rel_z.append(float(torch.linalg.matrix_norm(gram(z) - ref.relation_logits[k])))
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    semantic = -mean(sem) if sem else None
    relation = -mean(rel)
    return {
        "score": relation + (semantic or 0.0),
        "semantic": semantic,
        "relation": relation,
        "relation_logits": -mean(rel_z),
    }


def diswot_score(
    teacher: nn.Module,
    student: nn.Module,
    batches: list[dict[str, Any]],
    task: str = "classification",
) -> dict[str, float | None]:
    """DisWOT of one student against a teacher on ``batches`` (see the module docstring):
    ``score`` (semantic + relation, 0 at most), ``semantic``, ``relation``,
    ``relation_logits``."""
    return diswot_against(diswot_reference(teacher, batches, task), [student])


# ----------------------------------------------------------------------------- rank statistics


def pareto_front(score: Sequence[float], cost: Sequence[float]) -> list[int]:
    """Indices of the points no other point dominates (score at least as high and cost at most
    as high, one of them strictly), in order of cost. Points with a missing value are left out."""
    pts = [
        (i, s, c) for i, (s, c) in enumerate(zip(score, cost)) if s is not None and c is not None
    ]
    front = []
    for i, s, c in pts:
        if not any((s2 >= s and c2 <= c) and (s2 > s or c2 < c) for _, s2, c2 in pts):
            front.append(i)
    return sorted(front, key=lambda i: (cost[i], -score[i]))


def ranks(xs: Sequence[float]) -> list[float]:
    """Ranks from 1 (smallest), ties given their average rank."""
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    out = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Spearman's rank correlation (Spearman, "The Proof and Measurement of Association between
    Two Things", 1904): Pearson's correlation of the ranks, ties averaged. None with fewer than
    3 pairs or a constant side."""
    pairs = [(x, y) for x, y in zip(a, b) if x is not None and y is not None]
    if len(pairs) < 3:
        return None
    ra, rb = ranks([p[0] for p in pairs]), ranks([p[1] for p in pairs])
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va = sum((x - ma) ** 2 for x in ra)
    vb = sum((y - mb) ** 2 for y in rb)
    if va == 0 or vb == 0:
        return None
    return cov / math.sqrt(va * vb)


# ----------------------------------------------------------------------------- training proxies


def _child(base: Assembly, cfg: RunConfig) -> Assembly:
    """An assembly of ``cfg`` sharing ``base``'s data and teacher modules (built once)."""
    asm = Assembly(cfg)
    asm._data = base.data
    asm._modules = base._modules
    asm._fitted = base._fitted
    asm._known = base._known
    return asm


def quality(task: Task, model: nn.Module, asm: Assembly, teacher: nn.Module | None = None
            ) -> tuple[float, str]:  # fmt: skip
    """Held-out quality of ``model``: (score, what it is); higher is better."""
    b = asm.data
    models = {"student": model}
    if task.name == "embedding" and teacher is not None:
        models["teacher"] = teacher
    res = heldout(task, models, b.val, collate=asm.collate, batch_size=asm.cfg.eval.batch_size,
                  num_classes=b.info.num_classes, progress=False)  # fmt: skip
    s = res["student"]
    if "accuracy" in s and task.name == "classification":
        return float(s["accuracy"]), "accuracy"
    if "perplexity" in s:
        return -float(s["perplexity"]), "-perplexity"
    if "cosine_to_teacher" in s:
        return float(s["cosine_to_teacher"]), "cosine to teacher"
    raise ValueError(f"mentor search cannot score a student on {task.name} data")


def distil_candidate(asm: Assembly, steps: int | None, *, progress: bool = False
                     ) -> dict[str, Any]:  # fmt: skip
    """Distil ``asm``'s student (fresh, seeded) with its recipe's objective, data order and seed
    for ``steps`` optimizer steps (None: the recipe's own length), without a run directory;
    return its held-out quality and the wall time."""
    t0 = time.perf_counter()
    cfg = asm.cfg
    student = asm.student
    teacher = asm.teacher_source()
    extra: dict[str, Any] = {"progress": progress}
    if steps is not None:
        extra["max_steps"] = steps
    try:
        d = Distiller(
            student, teacher, asm.objective, asm.data.train, cfg, task=asm.task,
            collate_fn=asm.collate, write_run=False, reward_fn=_reward_fn(cfg, asm.data),
            **extra,
        )  # fmt: skip
        d.fit()
    finally:  # the teacher module is shared by every candidate: its feature taps go
        hooks = getattr(teacher, "_hooks", None)
        if hooks is not None:
            hooks.remove()
    score, metric = quality(asm.task, student, asm, _teacher_for(asm))
    return {"score": score, "metric": metric, "steps": d.total_steps(),
            "seconds": time.perf_counter() - t0}  # fmt: skip


def _teacher_for(asm: Assembly) -> nn.Module | None:
    return asm.module() if asm.has_module() else None


def _deterministic(cfg: RunConfig) -> bool:
    """Students copied from the teacher (``prune``, ``layer_drop``) do not depend on the seed."""
    return cfg.student.builder in FROM_TEACHER and cfg.student.builder != "shrink"


def _build(asm: Assembly, teacher: nn.Module | None, seed: int) -> nn.Module:
    """The candidate's student as ``build_student`` makes it, initialised from ``seed``."""
    set_seed(seed)
    s = asm.cfg.student
    t = teacher if student_needs_teacher(asm.cfg) else None
    return build_model(s.builder, s.params, asm.data.info, t, data=asm.data.train).eval()


# ----------------------------------------------------------------------------- the search


def _check_proxies(proxy: str, task: str) -> tuple[str, ...]:
    if proxy not in ("diswot", "short_kd", "both"):
        raise ValueError(f"--proxy {proxy!r}: choose diswot, short_kd or both")
    chosen = PROXIES if proxy == "both" else (proxy,)
    if "diswot" in chosen and task not in DISWOT_TASKS:
        raise ValueError(
            f"--proxy {proxy}: DisWOT compares class or next-token logits and their features "
            f"(classification and causal_lm data); this recipe's data is {task}. The proxy "
            "that works here is short_kd (--proxy short_kd)"
        )
    return chosen


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file: choose a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(
            f"--out {out} exists and is not empty: choose another --out, or --overwrite to "
            "replace its search.json, search.md and search.png"
        )


def _teacher_variants(
    recipe: Any, overrides: Sequence[str], teachers: Sequence[str]
) -> list[list[str]]:
    out = []
    for t in teachers:
        parts = shlex.split(t)
        if not parts:
            raise ValueError("--teachers: an empty teacher variant; give overrides such as "
                             "'teacher.fit.epochs=5'")  # fmt: skip
        bad = [p for p in parts if not p.startswith("teacher.")]
        if bad:
            raise ValueError(f"--teachers {t!r}: {bad[0]!r} is not a teacher.* override (each "
                             "variant changes the teacher only)")  # fmt: skip
        try:
            load_config(recipe, [*overrides, *parts])
        except ConfigError as e:
            raise ConfigError(f"--teachers {t!r}: {e}") from None
        out.append(parts)
    return out


def search(
    recipe: str | Path | dict[str, Any],
    overrides: Sequence[str] = (),
    *,
    grid: Sequence[str] | None = None,
    proxy: str = "both",
    proxy_steps: int = 20,
    confirm: int = 0,
    teachers: Sequence[str] = (),
    out: str | Path | None = None,
    overwrite: bool = False,
    rank_by: str | None = None,
    seeds: int = 3,
    n_batches: int = 4,
    batch_size: int | None = None,
    measure: bool = True,
    write: bool = True,
) -> dict[str, Any]:
    """``mentor search``: score every candidate of ``grid`` (see the module docstring).

    ``grid``: ``KEY=YAML_LIST`` strings (None or empty: :func:`default_grid`); ``proxy``:
    ``diswot``, ``short_kd`` or ``both``; ``rank_by``: the proxy that ranks candidates (default
    short_kd when it runs, else diswot); ``confirm``: how many top candidates to train with the
    recipe's length; ``teachers``: teacher variants, each a space-separated set of ``teacher.*``
    overrides; ``seeds``/``n_batches``/``batch_size``: DisWOT's random initialisations and
    calibration batches (default batch size 64, 16 for causal LMs); ``measure``: latency and
    throughput (parameters are always counted). Writes ``search.json``, ``search.md`` and
    ``search.png`` in ``out`` (default ``runs/search-<recipe name>``) and returns the JSON.
    """
    base_cfg = load_config(recipe, list(overrides))
    if base_cfg.selection is not None:
        raise ValueError("mentor search distils candidates with the plain objective; this "
                         "recipe has a selection section (teacher budget): set selection=null")  # fmt: skip
    out = Path(out) if out is not None else Path("runs") / f"search-{base_cfg.name}"
    if write:
        _check_out(out, overwrite)
    if proxy_steps < 1:
        raise ValueError(f"--proxy-steps {proxy_steps}: use a positive number of steps")
    if confirm < 0 or seeds < 1 or n_batches < 1:
        raise ValueError("--confirm must be >= 0; seeds and calibration batches >= 1")
    user_grid = parse_grid(grid or [])
    variants = _teacher_variants(recipe, overrides, teachers)
    cands = make_candidates(recipe, overrides, user_grid) if user_grid else None
    base = Assembly(base_cfg)
    task = base.task
    chosen = _check_proxies(proxy, task.name)
    rank_by = rank_by or ("short_kd" if "short_kd" in chosen else "diswot")
    if rank_by not in chosen:
        raise ValueError(f"--rank-by {rank_by}: that proxy is not run (--proxy {proxy})")
    if cands is None:
        arch = None
        if base.cfg.student.builder in ("layer_drop", "shrink") and base.has_module():
            arch = base.module(architecture_only=True)
        user_grid = default_grid(base_cfg, arch)
        cands = make_candidates(recipe, overrides, user_grid)
    if confirm > len(cands):
        raise ValueError(f"--confirm {confirm} is more than the {len(cands)} candidates of the "
                         "grid: confirm at most that many")  # fmt: skip
    progress = base_cfg.train.progress
    t_start = time.perf_counter()
    console.print(f"search {base_cfg.name}: {len(cands)} candidates, proxies "
                  f"{' + '.join(chosen)}, ranked by {rank_by}", highlight=False)  # fmt: skip

    t0 = time.perf_counter()
    teacher = _teacher_for(base)  # fitted (or loaded from the cache) once
    teacher_s = time.perf_counter() - t0
    t_quality = quality(task, teacher, base, teacher) if teacher is not None else (None, None)
    rows: list[dict[str, Any]] = [
        {"index": c.index, "label": c.label, "values": c.values, "overrides": c.overrides}
        for c in cands
    ]
    children = [_child(base, c.cfg) for c in cands]

    # building every candidate first: a builder's error comes before any proxy runs
    bar = Progress(len(cands), enabled=progress, label="search: build", unit="candidates")
    for k, (c, asm, row) in enumerate(zip(cands, children, rows)):
        model = _build(asm, teacher, c.cfg.train.seed)
        check_student_vocab(c.cfg, base.data, teacher, model)  # LM students: same vocabulary
        row["params"] = count_parameters(model)
        if measure:
            from mentor.eval.cost import measure_cost

            cost = measure_cost(model, base.data.val, collate=base.collate)
            row.update({k2: cost[k2] for k2 in ("size_bytes", "latency_ms", "throughput_per_s")})
        bar.update(k + 1, {})
    bar.close()

    ref_s = 0.0
    if "diswot" in chosen:
        if teacher is None:
            raise ValueError("--proxy diswot compares the candidates with the teacher module; "
                             "this recipe's teacher has none (teacher.builder or teacher.path)")  # fmt: skip
        bs = batch_size or (16 if task.name == "causal_lm" else 64)
        seed = base_cfg.train.seed
        batches = calibration_batches(base.data.train, base.collate, n_batches, bs, seed)
        ref = diswot_reference(teacher, batches, task.name, seed)
        ref_s = ref.seconds
        bar = Progress(len(cands), enabled=progress, label="search: diswot", unit="candidates")
        for k, (c, asm, row) in enumerate(zip(cands, children, rows)):
            t0 = time.perf_counter()
            n = 1 if _deterministic(c.cfg) else seeds
            models = [_build(asm, teacher, c.cfg.train.seed + s) for s in range(n)]
            row["diswot"] = {**diswot_against(ref, models), "seeds": n,
                             "seconds": time.perf_counter() - t0}  # fmt: skip
            bar.update(k + 1, {"score": row["diswot"]["score"]})
        bar.close()
    if "short_kd" in chosen:
        bar = Progress(len(cands), enabled=progress, label="search: short KD", unit="candidates")
        for k, (c, row) in enumerate(zip(cands, rows)):
            row["short_kd"] = distil_candidate(_child(base, c.cfg), proxy_steps)
            bar.update(k + 1, {"score": row["short_kd"]["score"]})
        bar.close()

    def key(r: dict[str, Any]) -> float:
        return r[rank_by]["score"]

    order = sorted(range(len(rows)), key=lambda i: -key(rows[i]))
    for rank, i in enumerate(order, 1):
        rows[i]["rank"] = rank
    scores = [key(r) for r in rows]
    front_params = pareto_front(scores, [r["params"] for r in rows])
    front_latency = pareto_front(scores, [r.get("latency_ms") for r in rows]) if measure else []
    for i, r in enumerate(rows):
        r["pareto_params"] = i in front_params
        r["pareto_latency"] = i in front_latency

    result: dict[str, Any] = {
        "kind": SEARCH_KIND,
        "recipe": base_cfg.name,
        "overrides": list(overrides),
        "task": task.name,
        "grid": [[k, v] for k, v in user_grid],
        "proxies": list(chosen),
        "rank_by": rank_by,
        "settings": {
            "proxy_steps": proxy_steps,
            "seeds": seeds,
            "calibration_batches": n_batches,
            "calibration_batch_size": batch_size or (16 if task.name == "causal_lm" else 64),
        },
        "teacher": {
            "params": count_parameters(teacher) if teacher is not None else None,
            "quality": t_quality[0],
            "metric": t_quality[1],
            "fit_or_load_s": teacher_s,
        },
        "diswot_reference_s": ref_s,
        "candidates": rows,
        "pareto_params": front_params,
        "pareto_latency": front_latency,
    }

    if confirm:
        top = order[:confirm]
        for n_done, i in enumerate(top, 1):
            console.print(f"confirm {n_done}/{confirm}: {rows[i]['label']} (the recipe's length)",
                          highlight=False)  # fmt: skip
            rows[i]["confirmed"] = distil_candidate(_child(base, cands[i].cfg), None,
                                                    progress=progress)  # fmt: skip
        result["confirm"] = confirm_summary(rows, top, chosen, ref_s)
    if variants:
        best = order[0]
        result["teachers"] = capacity_gap(base, recipe, overrides, cands[best], variants,
                                          rows[best], chosen, proxy_steps, progress, n_batches,
                                          result["settings"]["calibration_batch_size"],
                                          seeds)  # fmt: skip
    result["seconds"] = time.perf_counter() - t_start
    if write:
        write_outputs(result, out)
        result["out"] = str(out)
    return result


def confirm_summary(rows: list[dict[str, Any]], top: list[int], chosen: Sequence[str],
                    ref_s: float = 0.0) -> dict[str, Any]:  # fmt: skip
    """Spearman of each proxy (and DisWOT's parts) with the confirmed final quality, and the
    proxies' cost as a fraction of training."""
    final = [rows[i]["confirmed"]["score"] for i in top]
    corr: dict[str, float | None] = {}
    for p in chosen:
        corr[p] = spearman([rows[i][p]["score"] for i in top], final)
    if "diswot" in chosen:
        for part in ("semantic", "relation", "relation_logits"):
            corr[f"diswot.{part}"] = spearman([rows[i]["diswot"][part] for i in top], final)
    full = [rows[i]["confirmed"]["seconds"] for i in top]
    mean_full = sum(full) / len(full)
    cost: dict[str, Any] = {}
    for p in chosen:
        per = [rows[i][p]["seconds"] / rows[i]["confirmed"]["seconds"] for i in top]
        total = sum(r[p]["seconds"] for r in rows) + (ref_s if p == "diswot" else 0.0)
        cost[p] = {
            "per_candidate": sum(per) / len(per),  # proxy time / that candidate's training
            # all candidates' proxy time / training all of them (mean confirmed time each)
            "search": total / (mean_full * len(rows)),
            "seconds": total,
        }
    return {"candidates": top, "final": final, "spearman": corr, "cost_ratio": cost,
            "full_seconds": sum(full), "metric": rows[top[0]]["confirmed"]["metric"]}  # fmt: skip


def capacity_gap(
    base: Assembly,
    recipe: Any,
    overrides: Sequence[str],
    cand: Candidate,
    variants: list[list[str]],
    row: dict[str, Any],
    chosen: Sequence[str],
    steps: int,
    progress: bool,
    n_batches: int = 4,
    bs: int = 64,
    seeds: int = 3,
) -> dict[str, Any]:
    """The candidate distilled (``steps`` steps) from the recipe's teacher and each variant:
    teacher parameters and held-out quality, the student's short-KD quality and its DisWOT
    score against that teacher."""
    task = base.task
    out = []
    arms: list[list[str]] = [[], *variants]
    bar = Progress(len(arms), enabled=progress, label="search: teachers", unit="teachers")
    for k, parts in enumerate(arms):
        cfg = load_config(recipe, [*overrides, *cand.overrides, *parts])
        asm = _child(base, cfg)
        t0 = time.perf_counter()
        teacher = _teacher_for(asm)
        fit_s = time.perf_counter() - t0
        rec: dict[str, Any] = {"teacher": " ".join(parts) or "(recipe)", "overrides": parts,
                               "fit_or_load_s": fit_s}  # fmt: skip
        if teacher is not None:
            rec["teacher_params"] = count_parameters(teacher)
            rec["teacher_quality"] = quality(task, teacher, asm, teacher)[0]
        if not parts and "short_kd" in row:
            rec["student"] = row["short_kd"]
        else:
            rec["student"] = distil_candidate(asm, steps)
        if "diswot" in chosen and teacher is not None:
            sd = cfg.train.seed
            batches = calibration_batches(asm.data.train, asm.collate, n_batches, bs, sd)
            ref = diswot_reference(teacher, batches, task.name, sd)
            n = 1 if _deterministic(cfg) else seeds
            models = [_build(asm, teacher, sd + k) for k in range(n)]
            rec["diswot"] = diswot_against(ref, models)["score"]
        out.append(rec)
        bar.update(k + 1, {})
    bar.close()
    best = max(range(len(out)), key=lambda i: out[i]["student"]["score"])
    return {"student": cand.label, "student_overrides": cand.overrides, "steps": steps,
            "variants": out, "best": best, "best_teacher": out[best]["teacher"]}  # fmt: skip


# ----------------------------------------------------------------------------- outputs


def _fmt(x: Any, digits: int = 4) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}g}"
    if isinstance(x, int):
        return f"{x:,}"
    return str(x)


def markdown(res: dict[str, Any]) -> str:
    """``search.md``: candidates sorted by the ranking proxy, the Pareto fronts, confirmation
    and the capacity-gap check."""
    rows = sorted(res["candidates"], key=lambda r: r["rank"])
    rb = res["rank_by"]
    t = res["teacher"]
    lines = [
        f"# mentor search: {res['recipe']}",
        "",
        f"{len(rows)} candidates ({res['task']}), proxies: {', '.join(res['proxies'])}; sorted "
        f"by **{rb}**. Teacher: {_fmt(t['params'])} parameters, held-out {t['metric']} "
        f"{_fmt(t['quality'])}. Short KD: {res['settings']['proxy_steps']} steps; DisWOT: "
        f"{res['settings']['calibration_batches']} calibration batches of "
        f"{res['settings']['calibration_batch_size']}, {res['settings']['seeds']} "
        "initialisations. P: on the Pareto front vs parameters; L: vs latency.",
        "",
    ]
    head = ["rank", "candidate"]
    if "diswot" in res["proxies"]:
        head += ["DisWOT", "semantic", "relation"]
    if "short_kd" in res["proxies"]:
        head += ["short KD"]
    head += ["params", "latency ms", "items/s", "proxy s", "front"]
    if "confirm" in res:
        head += ["final"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [str(r["rank"]), f"`{r['label']}`"]
        if "diswot" in res["proxies"]:
            d = r["diswot"]
            cells += [_fmt(d["score"]), _fmt(d["semantic"]), _fmt(d["relation"])]
        if "short_kd" in res["proxies"]:
            cells += [_fmt(r["short_kd"]["score"])]
        secs = sum(r[p]["seconds"] for p in res["proxies"])
        front = ("P" if r["pareto_params"] else "") + ("L" if r["pareto_latency"] else "")
        cells += [f"{r['params']:,}", _fmt(r.get("latency_ms"), 3),
                  _fmt(r.get("throughput_per_s"), 3), f"{secs:.2f}", front or ""]  # fmt: skip
        if "confirm" in res:
            cells += [_fmt(r.get("confirmed", {}).get("score"))]
        lines.append("| " + " | ".join(cells) + " |")
    by_idx = {r["index"]: r for r in rows}
    for name, key in (("parameters", "pareto_params"), ("latency", "pareto_latency")):
        if res[key]:
            pts = ", ".join(f"`{by_idx[i]['label']}`" for i in res[key])
            lines += ["", f"**Pareto front ({rb} vs {name}), cheapest first:** {pts}"]
    if "confirm" in res:
        c = res["confirm"]
        corr = ", ".join(f"{k} {_fmt(v, 3)}" for k, v in c["spearman"].items())
        cost = ", ".join(
            f"{k} {100 * v['per_candidate']:.2f}% of a candidate's training "
            f"({100 * v['search']:.2f}% of training all {len(rows)})"
            for k, v in c["cost_ratio"].items()
        )
        lines += ["", f"## Confirmed: top {len(c['candidates'])} by {rb}, trained with the "
                  f"recipe's length", "",
                  f"Final held-out {c['metric']} above (column *final*). Spearman rank "
                  f"correlation with it over the confirmed candidates: {corr}.",
                  "", f"Proxy cost: {cost}; training the confirmed candidates took "
                  f"{c['full_seconds']:.1f} s."]  # fmt: skip
    if "teachers" in res:
        tv = res["teachers"]
        lines += ["", f"## Capacity gap: `{tv['student']}` distilled {tv['steps']} steps from "
                  "each teacher", "", "| teacher | teacher params | teacher quality | student "
                  "quality | DisWOT |", "|---|---|---|---|---|"]  # fmt: skip
        for i, v in enumerate(tv["variants"]):
            mark = " **best**" if i == tv["best"] else ""
            lines.append(f"| `{v['teacher']}`{mark} | {_fmt(v.get('teacher_params'))} | "
                         f"{_fmt(v.get('teacher_quality'))} | {_fmt(v['student']['score'])} | "
                         f"{_fmt(v.get('diswot'))} |")  # fmt: skip
        lines += ["", f"The best student comes from `{tv['best_teacher']}`."]
    lines += ["", f"Took {res['seconds']:.1f} s. DisWOT as implemented: docs/search.md."]
    return "\n".join(lines) + "\n"


def plot(res: dict[str, Any], path: Path) -> Path:
    """``search.png``: each proxy's score vs parameters; marker size and colour by latency,
    the Pareto front (vs parameters) circled and joined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = res["candidates"]
    proxies = res["proxies"]
    fig, axes = plt.subplots(1, len(proxies), figsize=(5.5 * len(proxies), 4.2), squeeze=False)
    lat = [r.get("latency_ms") or 0.0 for r in rows]
    lo, hi = min(lat), max(lat)
    for ax, p in zip(axes[0], proxies):
        x = [r["params"] for r in rows]
        y = [r[p]["score"] for r in rows]
        sizes = [40 + 260 * (v - lo) / ((hi - lo) or 1.0) for v in lat]
        sc = ax.scatter(x, y, s=sizes, c=lat, cmap="viridis", alpha=0.85, zorder=2)
        front = pareto_front(y, x)
        ax.plot([x[i] for i in front], [y[i] for i in front], "-", color="crimson", lw=1,
                zorder=1)  # fmt: skip
        ax.scatter([x[i] for i in front], [y[i] for i in front], s=[sizes[i] + 60 for i in front],
                   facecolors="none", edgecolors="crimson", lw=1.5, zorder=3,
                   label="Pareto front")  # fmt: skip
        ax.set_xscale("log")
        ax.set_xlabel("parameters")
        if p == "diswot":
            ax.set_ylabel("DisWOT score (0 = like the teacher)")
        else:
            ax.set_ylabel(f"short-KD held-out {rows[0]['short_kd']['metric']}")
        ax.set_title(f"{res['recipe']}: {p}")
        ax.legend(loc="lower right", fontsize=8, markerscale=0.6)
        if any(lat):
            fig.colorbar(sc, ax=ax, label="latency (ms, batch 1)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_outputs(res: dict[str, Any], out: Path) -> None:
    """``search.json``, ``search.md`` and ``search.png`` in ``out`` (written atomically)."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "search.json.tmp"
    tmp.write_text(json.dumps(res, indent=2, default=str) + "\n")
    tmp.replace(out / "search.json")
    tmp = out / "search.md.tmp"
    tmp.write_text(markdown(res))
    tmp.replace(out / "search.md")
    plot(res, out / "search.png")


__all__ = [
    "DEFAULT_GRIDS",
    "Candidate",
    "as_overrides",
    "calibration_batches",
    "capacity_gap",
    "check_student_params",
    "confirm_summary",
    "default_grid",
    "diswot_against",
    "diswot_reference",
    "diswot_score",
    "distil_candidate",
    "expand_grid",
    "gram",
    "gram_distance",
    "make_candidates",
    "markdown",
    "pareto_front",
    "parse_grid",
    "quality",
    "ranks",
    "search",
    "spearman",
    "write_outputs",
]
