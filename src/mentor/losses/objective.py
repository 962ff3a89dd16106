"""Weighted sums of named loss terms, as written in a recipe's ``objective`` section."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from mentor.losses._base import LOSSES, get_loss
from mentor.losses.taid_schedule import TAIDScheduler
from mentor.students.dual_head import DualLogits

# Keys of a ``taid`` term that configure its TAIDScheduler.
# losses that read labels only: an objective of these needs no teacher
LABEL_ONLY = ("ce", "step_by_step")
TAID_KEYS = ("t_start", "t_end", "alpha", "beta", "disable_adaptive")


def build_projector(spec: Any) -> nn.Module:
    """A learned projector from a spec: an ``nn.Module`` as is, or a dict for ``nn.Linear``.

    Dict keys: ``in_features``, ``out_features``, optional ``bias`` (default True) and
    ``kind`` (``"linear"`` default, or ``"conv1x1"`` for ``[B, C, H, W]`` maps).
    """
    if isinstance(spec, nn.Module):
        return spec
    if not isinstance(spec, Mapping):
        raise ValueError(
            f"projector must be a module or a mapping like {{in_features: 128, out_features: 256}}, "
            f"got {spec!r}"
        )
    spec = dict(spec)
    kind = spec.pop("kind", "linear")
    try:
        i, o = int(spec.pop("in_features")), int(spec.pop("out_features"))
    except KeyError as e:
        raise ValueError(f"projector needs {e.args[0]!r}") from None
    bias = bool(spec.pop("bias", True))
    if spec:
        raise ValueError(
            f"projector has unknown keys {sorted(spec)}; valid: in_features, "
            f"out_features, bias, kind"
        )
    if kind == "linear":
        return nn.Linear(i, o, bias=bias)
    if kind == "conv1x1":
        return nn.Conv2d(i, o, kernel_size=1, bias=bias)
    raise ValueError(f"projector kind must be 'linear' or 'conv1x1', got {kind!r}")


def _project(proj: nn.Module, x: Any) -> Any:
    if isinstance(x, Tensor):
        return proj(x)
    if isinstance(x, Sequence):
        return [proj(v) for v in x]
    raise TypeError(f"cannot apply a projector to {type(x)!r}")


@dataclass
class FusedHead:
    """Student final hidden states and output head, standing in for student logits.

    Passed to :class:`Objective` instead of logits, every logit term is computed with
    :func:`~mentor.losses.fused.fused_linear_loss` ``chunk_size`` rows at a time, so the full
    ``[N, V]`` student logits never exist (the engine's ``train.fused_loss_chunk``).
    """

    hidden: Tensor
    weight: Tensor
    bias: Tensor | None = None
    chunk_size: int = 1024

    def __getitem__(self, idx: Any) -> FusedHead:
        """Slice the positions (e.g. ``[:, :-1]`` for the causal shift); the head is shared."""
        return FusedHead(self.hidden[idx], self.weight, self.bias, self.chunk_size)

    def loss(self, loss: nn.Module, teacher: Any, **kwargs: Any) -> Tensor:
        """The value of one logit loss module on this head, computed fused."""
        from mentor.losses.fused import fused_linear_loss

        hp = {k: v for k, v in {**loss.hp, **kwargs}.items() if k != "chunk_size"}
        labels, mask = hp.pop("labels", None), hp.pop("mask", None)
        return fused_linear_loss(
            self.hidden,
            self.weight,
            teacher,
            loss=loss.name,
            bias=self.bias,
            chunk_size=self.chunk_size,
            labels=labels,
            mask=mask,
            **hp,
        )


def _weight(term: str, value: Any) -> float:
    """A term's weight: a finite number >= 0 (0 switches the term off, e.g. until a schedule
    ramps it up)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"objective.{term}.weight: {value!r} is not a number")
    try:
        w = float(value)
    except ValueError:
        raise ValueError(f"objective.{term}.weight: {value!r} is not a number") from None
    if not math.isfinite(w):
        raise ValueError(f"objective.{term}.weight: {value!r} is not a finite number")
    if w < 0:
        raise ValueError(
            f"objective.{term}.weight: {w:g} is negative; loss weights must be >= 0 (a negative "
            "weight would maximise that loss). Use 0 to switch the term off"
        )
    return w


class Objective(nn.Module):
    """Named loss terms with explicit weights.

    ``Objective({"kd": {"weight": 0.9, "temperature": 4}, "ce": {"weight": 0.1}})`` returns,
    when called, ``{"kd": ..., "ce": ..., "loss": 0.9*kd + 0.1*ce}``. A term's loss is the
    term name unless ``loss:`` names another (so one loss can appear twice). Feature terms
    name the taps they compare with ``student:`` and ``teacher:`` and may add a learned
    ``projector:`` (``{in_features: 128, out_features: 256}``) applied to the student features;
    it is a parameter of the Objective, so optimise ``objective.parameters()`` with the student.
    A ``taid`` term gets a :class:`TAIDScheduler` (keys ``t_start``, ``t_end``, ``alpha``,
    ``beta``, ``disable_adaptive``) unless it fixes ``t:``; :meth:`after_step` advances it.
    Weights must be finite and >= 0; a weight of 0 switches a term off (schedules may ramp it
    up from 0). A recipe whose weights are all 0 is refused when the config is loaded.
    Sequence terms (``inputs="sequences"``: kepo, paced, tsd_kd, mgsr_span) also receive the
    ``groups`` / ``rewards`` / ``spans`` given to :meth:`forward` that their loss lists in
    ``extras``. Cross-tokenizer terms (``inputs="xtok"``: uld, gold_hybrid) receive the
    per-side inputs of ``xtok``; they combine with ``ce`` only (any other teacher term needs
    one shared vocabulary), which is refused here.
    A dual-head student (:class:`~mentor.students.dual_head.DualHead`, Kang et al., "Simple
    Semi-supervised Knowledge Distillation from Vision-Language Models via Dual-Head
    Optimization", 2025) gives :class:`~mentor.students.dual_head.DualLogits`: the label-only
    terms (``ce``, ``step_by_step``) receive its ``label`` logits, every teacher term its
    ``distill`` logits (:meth:`check_dual_head` lists what cannot be combined with it).
    Terms with a learned fusion net (``tgeo_kd``) are listed by :meth:`meta_terms`; their
    tensors are checkpointed with :meth:`tensor_state` / :meth:`load_tensor_state`.
    """

    def __init__(self, spec: Mapping[str, Mapping[str, Any]]) -> None:
        """Build each term's loss module; unknown losses or hyperparameters raise."""
        super().__init__()
        if not spec:
            raise ValueError(
                "objective is empty: give at least one term, e.g. {'kd': {'weight': 1}}"
            )
        self.terms = nn.ModuleDict()
        self.projectors = nn.ModuleDict()
        self.weights: dict[str, float] = {}
        self.taps: dict[str, tuple[str, str]] = {}
        self.schedulers: dict[str, TAIDScheduler] = {}
        self.last_values: dict[str, Tensor] = {}
        for term, raw in spec.items():
            if not isinstance(term, str) or not term or "." in term or hasattr(nn.ModuleDict, term):
                raise ValueError(
                    f"objective term name {term!r} is not allowed (empty, contains '.', or a "
                    f"reserved attribute name); pick another and name the loss with loss:, e.g. "
                    f"fkl: {{loss: forward_kl}}"
                )
            raw = dict(raw or {})
            loss_name = raw.pop("loss", term)
            self.weights[term] = _weight(term, raw.pop("weight", 1.0))
            s_tap, t_tap = raw.pop("student", None), raw.pop("teacher", None)
            proj = raw.pop("projector", None)
            try:
                if loss_name == "taid" and raw.get("t") is None:
                    raw.pop("t", None)
                    sched = {k: raw.pop(k) for k in TAID_KEYS if k in raw}
                    self.schedulers[term] = TAIDScheduler(**sched)
                self.terms[term] = get_loss(loss_name, **raw)
                if proj is not None:
                    self.projectors[term] = build_projector(proj)
            except ValueError as e:
                raise ValueError(f"objective.{term}: {e}") from None
            if self.terms[term].inputs not in ("logits", "sequences", "xtok"):
                if not (s_tap and t_tap):
                    raise ValueError(
                        f"objective.{term}: loss {loss_name!r} compares features; name the taps "
                        f"with student: <module path> and teacher: <module path>"
                    )
                self.taps[term] = (s_tap, t_tap)
            elif proj is not None:
                raise ValueError(f"objective.{term}: a projector applies to feature terms only")
        self._check_cross_tokenizer()

    def check_dual_head(self) -> None:
        """Refuse terms that cannot train a dual-head student (Dual-Head Optimization).

        Kang et al., "Simple Semi-supervised Knowledge Distillation from Vision-Language Models
        via Dual-Head Optimization" (2025): label terms train the label head, teacher terms the
        distillation head. Feature terms (taps, the ``output`` pseudo tap) and losses that mix a
        label loss and a teacher loss on one head with learned weights (``tgeo_kd``) have no
        head to go to; raises ``ValueError`` naming them.
        """
        bad = [f"{n} (compares features)" for n in self.taps]
        bad += [
            f"{n} ({t.name}: mixes the label and teacher losses on one head)"
            for n, t in self.terms.items()
            if getattr(t, "fuses_label_and_teacher", False)
        ]
        if bad:
            raise ValueError(
                f"objective: {', '.join(bad)} cannot train a dual-head student, whose label "
                "terms (ce, step_by_step) train one head and teacher logit terms (kd, ...) the "
                "other; use logit terms only, e.g. {ce: {weight: 0.5}, kd: {weight: 0.5, "
                "temperature: 2}}"
            )

    def meta_terms(self) -> dict[str, nn.Module]:
        """Terms whose loss has a learned fusion net updated by ``meta_step`` (``tgeo_kd``:
        Hu et al., "Less or More From Teacher: Exploiting Trilateral Geometry For Knowledge
        Distillation", ICLR 2024); their nets are not parameters of the Objective."""
        return {n: t for n, t in self.terms.items() if hasattr(t, "meta_step")}

    def tensor_state(self) -> dict[str, Tensor]:
        """Tensors of the :meth:`meta_terms` (fusion nets, their optimizer, statistics) as one
        flat ``{"<term>.<key>": tensor}`` dict for a checkpoint (TGeo-KD, Hu et al. 2024)."""
        return {
            f"{n}.{k}": v for n, t in self.meta_terms().items() for k, v in t.fusion_state().items()
        }

    def load_tensor_state(self, state: Mapping[str, Tensor]) -> None:
        """Restore what :meth:`tensor_state` returned (TGeo-KD, Hu et al. 2024); keys of terms
        this objective lacks raise ``ValueError``."""
        meta = self.meta_terms()
        parts: dict[str, dict[str, Tensor]] = {}
        for key, v in state.items():
            term, _, rest = key.partition(".")
            if term not in meta:
                raise ValueError(
                    f"objective state has tensors of term {term!r}, which has no fusion net "
                    f"here (terms with one: {', '.join(meta) or 'none'})"
                )
            parts.setdefault(term, {})[rest] = v
        for term, st in parts.items():
            meta[term].load_fusion_state(st)

    @property
    def cross_tokenizer(self) -> bool:
        """Whether the objective has cross-tokenizer terms (``uld``, ``gold_hybrid``)."""
        return any(t.inputs == "xtok" for t in self.terms.values())

    def _check_cross_tokenizer(self) -> None:
        """Cross-tokenizer terms combine with ``ce`` only: any other teacher term compares the
        two models position by position over one vocabulary, which they do not share."""
        xtok = [n for n, t in self.terms.items() if t.inputs == "xtok"]
        other = [n for n, t in self.terms.items() if t.inputs != "xtok" and t.name != "ce"]
        if xtok and other:
            names = ", ".join(f"{n} ({self.terms[n].name})" for n in other)
            raise ValueError(
                f"objective: {names} cannot be combined with the cross-tokenizer term(s) "
                f"{', '.join(xtok)}: with two tokenizers the teacher's and the student's logits "
                "have different lengths and vocabularies, so only cross-tokenizer losses (uld, "
                "gold_hybrid) and the student's own ce apply"
            )

    def forward(
        self,
        student_logits: Tensor | None = None,
        teacher: Any = None,
        *,
        labels: Tensor | None = None,
        mask: Tensor | None = None,
        feature_mask: Any = "same",
        student_features: Mapping[str, Any] | None = None,
        teacher_features: Mapping[str, Any] | None = None,
        groups: Tensor | None = None,
        rewards: Tensor | None = None,
        spans: Tensor | None = None,
        tasks: Tensor | None = None,
        xtok: Mapping[str, Any] | None = None,
    ) -> dict[str, Tensor]:
        """Compute every term and their weighted sum under ``"loss"``.

        ``groups`` (LongTensor ``[B]``: equal values = samples of the same prompt), ``rewards``
        (float ``[B]`` in [0, 1], a per-sequence verifier score) and ``spans`` (LongTensor
        ``[B, T]`` span ids, < 0 = no span) are optional; they reach only the terms whose loss
        lists them in its ``extras`` (the ``inputs="sequences"`` losses of
        :mod:`mentor.losses.sequence`), so every other loss is unaffected. ``xtok`` holds the
        per-side inputs of cross-tokenizer terms (``teacher_labels``, ``teacher_mask``,
        ``student_offsets``, ``teacher_offsets``, ``vocab_map``; the task
        ``causal_lm_xtok`` builds them); each such term gets the ones its loss lists.
        ``feature_mask``: the mask of feature terms whose taps are module outputs (default: the
        same as ``mask``); a causal LM's logits mask is shifted by one token, its hidden states
        are not, so its task passes the attention mask here.
        ``student_logits`` may be :class:`~mentor.students.dual_head.DualLogits` (a dual-head
        student in training mode): label-only terms then get ``.label``, teacher terms
        ``.distill`` (Kang et al., "Simple Semi-supervised Knowledge Distillation from
        Vision-Language Models via Dual-Head Optimization", 2025).
        """
        seq_extra = {"groups": groups, "rewards": rewards, "spans": spans, "tasks": tasks}
        out: dict[str, Tensor] = {}
        total: Tensor | None = None
        dual = student_logits if isinstance(student_logits, DualLogits) else None
        if dual is not None:
            self.check_dual_head()
        for term, loss in self.terms.items():
            if dual is not None:  # DHO: label terms -> label head, teacher terms -> distill head
                student_logits = dual.label if loss.name in LABEL_ONLY else dual.distill
            if term in self.taps:
                s_tap, t_tap = self.taps[term]
                if student_features is None or teacher_features is None:
                    raise ValueError(f"objective.{term}: student/teacher features were not given")
                s_feat = student_features[s_tap]
                if term in self.projectors:
                    s_feat = _project(self.projectors[term], s_feat)
                fmask = mask if isinstance(feature_mask, str) or s_tap == "output" else feature_mask
                value = loss(s_feat, teacher_features[t_tap], mask=fmask)
            else:
                extra = {"t": self.schedulers[term].t} if term in self.schedulers else {}
                if loss.inputs == "sequences":  # handles (or refuses) a FusedHead itself
                    extra = {k: seq_extra[k] for k in getattr(loss, "extras", ())}
                    value = loss(student_logits, teacher, labels=labels, mask=mask, **extra)
                elif loss.inputs == "xtok":
                    if xtok is None or isinstance(student_logits, FusedHead):
                        raise ValueError(
                            f"objective.{term}: the cross-tokenizer loss {loss.name!r} needs "
                            "both models' logits and per-side inputs (teacher labels/mask, "
                            "character offsets, vocab map): train on data.source=xtok_text "
                            "(task causal_lm_xtok), without train.fused_loss_chunk"
                        )
                    extra = {k: xtok.get(k) for k in getattr(loss, "extras", ())}
                    value = loss(student_logits, teacher, labels=labels, mask=mask, **extra)
                elif isinstance(student_logits, FusedHead):
                    value = student_logits.loss(loss, teacher, labels=labels, mask=mask, **extra)
                else:  # with cross-tokenizer inputs only ce is here, and it reads no teacher
                    t = None if xtok is not None or self.cross_tokenizer else teacher
                    value = loss(student_logits, t, labels=labels, mask=mask, **extra)
            out[term] = value
            if term in self.schedulers:
                self.last_values[term] = value.detach()
            w = self.weights[term]
            total = w * value if total is None else total + w * value
        assert total is not None
        out["loss"] = total
        return out

    def after_step(self, step: int, total_steps: int, values: Mapping[str, float]) -> None:
        """Hook called after each optimizer step (advances TAID schedules).

        ``step`` is the 0-based index of the optimizer step just taken (the number of steps
        completed before it), ``total_steps`` the planned total and ``values`` the detached term
        values of that step (a term missing from ``values`` uses the last value computed).
        """
        for term, sched in self.schedulers.items():
            v = values[term] if term in values else self.last_values.get(term)
            if v is not None:
                sched.update(float(v), step, total_steps)

    def extra_state(self) -> dict[str, Any]:
        """Non-tensor state to checkpoint (TAID schedulers), JSON-serialisable."""
        return {"taid": {k: s.state_dict() for k, s in self.schedulers.items()}}

    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`extra_state` returned (exact resume of TAID's t)."""
        for k, st in state.get("taid", {}).items():
            if k in self.schedulers:
                self.schedulers[k].load_state_dict(st)

    def taid_t(self) -> dict[str, float]:
        """Current TAID interpolation parameter of each scheduled term."""
        return {k: s.t for k, s in self.schedulers.items()}


def describe_losses() -> list[tuple[str, str]]:
    """(name, one-line description) for every registered loss."""
    return [(n, LOSSES.describe(n)) for n in LOSSES.names()]


__all__ = ["FusedHead", "Objective", "build_projector", "describe_losses"]
