"""``student.builder: prune`` — the student is a pruned copy of the teacher (see docs/pruning.md).

Methods: ``magnitude`` and ``wanda`` (unstructured, or N:M with ``pattern: "2:4"``; the masks
are kept through training by :class:`mentor.pruning.sparse_training.SparseTraining`) and
``structured`` (Minitron width/depth pruning of Hugging Face LMs and encoders, channel pruning
of CNNs: a genuinely smaller dense model). Calibration batches come from the recipe's
training data.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from torch.utils.data import default_collate

from mentor.data.sources import DataInfo
from mentor.students.builders import BUILDERS

METHODS = ("magnitude", "wanda", "structured")


def calibration_set(data: Any, n_batches: int, batch_size: int = 4) -> list[dict[str, Any]]:
    """Up to ``n_batches`` batches of ``batch_size`` examples spread evenly over ``data``."""
    try:
        n = len(data)
    except TypeError:
        raise ValueError(
            "student.builder=prune needs the training set as calibration data"
        ) from None
    if n == 0:
        raise ValueError("student.builder=prune: the training set is empty (no calibration data)")
    take = min(n, int(n_batches) * int(batch_size))
    idx = sorted({round(i * (n - 1) / max(1, take - 1)) for i in range(take)})
    items = [data[i] for i in idx]
    out = []
    for lo in range(0, len(items), batch_size):
        chunk = [
            {k: v for k, v in it.items() if isinstance(v, torch.Tensor)}
            for it in items[lo : lo + batch_size]
        ]
        out.append(default_collate(chunk))
    return out


def _forward(model: nn.Module, batch: dict[str, Any]) -> Any:
    from mentor.models import model_outputs

    return model_outputs(model, batch)


def _check_fraction(key: str, v: Any, closed_zero: bool = True) -> None:
    if v is None:
        return
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0 <= v < 1):
        raise ValueError(f"student.params.{key}={v!r}: a sparsity in [0, 1)")


def _cnn_rebuild(seq: nn.Sequential, channels: list[int]) -> tuple[str, dict[str, Any]]:
    linears = [m for m in seq if isinstance(m, nn.Linear)]
    drop = [m for m in seq if isinstance(m, nn.Dropout)]
    params: dict[str, Any] = {"channels": channels, "hidden": linears[0].out_features}
    if drop:
        params["dropout"] = drop[0].p
    return "cnn", params


@BUILDERS.register("prune")
def prune(
    info: DataInfo,
    teacher: nn.Module | None = None,
    data: Any = None,
    *,
    method: str = "wanda",
    sparsity: float | None = 0.5,
    pattern: str = "unstructured",
    stages: list[float] | None = None,
    mask_updates: str = "fixed",
    update_every: int = 10,
    dsnot: bool = False,
    heads: int | float | None = None,
    intermediate: int | float | None = None,
    hidden: int | float | None = None,
    layers: int | list[int] | None = None,
    channels: float | list[int] | None = None,
    gqa: str = "queries",
    calibration_batches: int = 8,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
) -> nn.Module:
    """A pruned copy of the teacher.

    Unstructured / N:M (``method: magnitude | wanda``, ``sparsity``, ``pattern``): Wanda (Sun et
    al., "A Simple and Effective Pruning Approach for Large Language Models", 2023) scores
    |W|·‖X‖ from calibration batches; ``dsnot: true`` then runs DSnoT's training-free
    prune-and-grow (Zhang et al., 2023); ``stages: [0.3, 0.5, 0.7]`` prunes gradually while
    distilling; ``mask_updates: ast`` uses AST's adaptive masks (Huang et al., 2024).
    Structured (``method: structured``): Minitron (Muralidharan et al., "Compact Language Models
    via Pruning and Knowledge Distillation", 2024) keeps the most important ``heads``,
    ``intermediate`` MLP channels, ``hidden`` channels (counts, or fractions kept) and
    ``layers`` of a Hugging Face model; for a CNN, ``channels`` (a fraction of each
    convolution's channels kept, or a count per convolution).
    """
    if teacher is None:
        raise ValueError(
            "student.builder=prune prunes a copy of the teacher: the recipe needs a teacher "
            "(teacher.builder or teacher.path)"
        )
    if method not in METHODS:
        from mentor.registry import did_you_mean

        raise ValueError(
            f"student.params.method={method!r}: choose one of {', '.join(METHODS)}"
            + did_you_mean(method, list(METHODS))
        )
    student = copy.deepcopy(teacher).train()
    for p in student.parameters():
        p.requires_grad_(True)
    rebuild = getattr(teacher, "mentor_rebuild", None)
    batches = calibration_set(data, calibration_batches) if data is not None else None
    if method == "structured":
        return _structured(student, batches, heads, intermediate, hidden, layers, channels, gqa)
    given = [k for k, v in (("heads", heads), ("intermediate", intermediate), ("hidden", hidden),
                            ("layers", layers), ("channels", channels)) if v is not None]  # fmt: skip
    if given:
        raise ValueError(
            f"student.params.{given[0]} is a structured-pruning setting: use method=structured, "
            f"or drop it for method={method}"
        )
    from mentor.pruning.masks import MaskSet, calibration_norms, parse_pattern, prunable
    from mentor.pruning.sparse_training import SparseTraining

    nm = parse_pattern(pattern) if pattern != "unstructured" else None
    if stages is not None:
        if nm is not None:
            raise ValueError("student.params.stages: staged sparsity needs pattern=unstructured")
        if not isinstance(stages, (list, tuple)) or not stages:
            raise ValueError(
                f"student.params.stages={stages!r}: a list of sparsities, e.g. [0.3, 0.5, 0.7]"
            )
        for s in stages:
            _check_fraction("stages", s)
        if list(stages) != sorted(stages):
            raise ValueError(f"student.params.stages={stages!r}: sparsities must increase")
        sparsity = float(stages[0])
    elif nm is not None:
        sparsity = None  # N:M fixes it
    else:
        _check_fraction("sparsity", sparsity)
        if sparsity is None:
            raise ValueError("student.params.sparsity is required for pattern=unstructured")
    kw: dict[str, Any] = {}
    if include is not None:
        kw["include"] = include
    if exclude is not None:
        kw["exclude"] = exclude
    mods = prunable(student, **kw)
    if not mods:
        raise ValueError("student.builder=prune: the teacher has no Linear/Conv2d weights to prune "
                         "(check student.params.include / exclude)")  # fmt: skip
    norms = None
    if method == "wanda" or dsnot:
        if batches is None:
            raise ValueError(f"student.params.method={method} needs calibration data")
        norms = calibration_norms(student, batches, _forward, mods)
    masks = MaskSet.compute(mods, method, sparsity, pattern, norms)
    if dsnot:
        from mentor.pruning.dsnot import calibration_stats
        from mentor.pruning.dsnot import dsnot as run_dsnot

        stats = calibration_stats(student, batches, _forward, mods)
        run_dsnot(mods, masks.masks, stats, pattern=pattern)
    masks.apply(student)
    student.mentor_sparse = SparseTraining(  # type: ignore[assignment]
        masks, method=method, pattern=pattern, sparsity=sparsity, stages=stages,
        mask_updates=mask_updates, update_every=update_every, norms=norms,
    )  # fmt: skip
    if rebuild is not None:
        student.mentor_rebuild = rebuild  # type: ignore[assignment]
    return student


def _structured(
    student: nn.Module,
    batches: list[dict[str, Any]] | None,
    heads: Any,
    intermediate: Any,
    hidden: Any,
    layers: Any,
    channels: Any,
    gqa: str,
) -> nn.Module:
    from mentor.models.hf import hf_core

    if hf_core(student) is not None:
        if channels is not None:
            raise ValueError("student.params.channels prunes CNN channels; for a Hugging Face "
                             "model use heads / intermediate / hidden / layers")  # fmt: skip
        if all(v is None for v in (heads, intermediate, hidden, layers)):
            raise ValueError("student.params: method=structured needs at least one of heads, "
                             "intermediate, hidden, layers")  # fmt: skip
        from mentor.pruning.importance import transformer_importance
        from mentor.pruning.structured import prune_structured

        imp = transformer_importance(student, batches) if batches else None
        out = prune_structured(student, imp, heads=heads, intermediate=intermediate,
                               hidden=hidden, layers=layers, gqa=gqa)  # fmt: skip
        return out.train()
    if isinstance(student, nn.Sequential) and any(isinstance(m, nn.Conv2d) for m in student):
        if channels is None:
            raise ValueError("student.params.channels is required to prune a CNN's channels "
                             "(a fraction of each convolution's channels kept, e.g. 0.5)")  # fmt: skip
        from mentor.pruning.importance import conv_channel_importance
        from mentor.pruning.structured import prune_channels

        imp = conv_channel_importance(student, batches, forward=_forward) if batches else None
        out, kept = prune_channels(student, channels, imp)
        out.mentor_rebuild = _cnn_rebuild(out, kept)  # type: ignore[assignment]
        return out.train()
    raise ValueError(
        f"student.params.method=structured supports Hugging Face causal LMs and encoders and "
        f"CNNs built by the cnn builder; the teacher is a {type(student).__name__}"
    )
