"""Objectives for distillation with generation: sequence-level gates, weights, selection, ranking.

These losses see whole sampled sequences: student logits ``[B, T, V]`` (shifted, as the engine
passes them for causal LMs), the teacher's signal, ``labels`` ``[B, T]`` = the sampled next
tokens and ``mask`` ``[B, T]`` = the completion positions that count. Besides ``labels`` and
``mask`` they may take (``extras``, passed by :class:`~mentor.losses.Objective` only to the terms
that list them):

* ``groups`` — LongTensor ``[B]``; equal values = samples of the same prompt (the engine repeats
  each prompt ``generation.samples_per_prompt`` times within one micro-batch);
* ``rewards`` — float ``[B]`` in [0, 1], a per-sequence verifier score (None without a verifier);
* ``spans`` — LongTensor ``[B, T]`` of span ids (< 0 = in no span), for ``mgsr_span``.

Registered with ``inputs="sequences"``. ``kepo`` and ``paced`` are per-sequence weights on a
row-wise base divergence (``base``: forward_kl, reverse_kl, jsd, tvd, skew_kl, skew_reverse_kl)
evaluated by :func:`~mentor.losses._rows.run_rows` with ``row_weights`` — so every base works
with dense, TopK (and, for forward_kl, Sampled) teachers, chunked, closed-form, and fused with the
output head (a :class:`~mentor.losses.objective.FusedHead` student). Formulas, defaults, papers
and the reading chosen where a paper is ambiguous: each docstring and ``docs/losses.md``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from mentor.losses import _checks as C
from mentor.losses._base import register_loss
from mentor.losses._reduce import counted_mask, upcast
from mentor.losses._rows import (
    CLOSED_FORM_ELEMS,
    TAILS,
    RowSpec,
    entropy_rows,
    half_to_float_dtype,
    run_fused,
    run_rows,
)
from mentor.losses.logit import ALL_TEACHERS, ROWWISE, _closed
from mentor.losses.objective import FusedHead
from mentor.signals import HeadLogits, Sampled, TopK

EXTRAS = ("groups", "rewards", "spans", "tasks")

# Row-wise divergences a sequence weight can multiply, and the name of each one's mixing
# coefficient (given as ``base_mix``).
BASES = ("forward_kl", "reverse_kl", "jsd", "tvd", "skew_kl", "skew_reverse_kl")
_MIX = {"jsd": "beta", "skew_kl": "alpha", "skew_reverse_kl": "alpha"}

FUSED_FIX = "set train.fused_loss_chunk=null (this loss needs the student's logits)"


def sequence_loss(
    name: str, *, check: Callable[..., None], extras: tuple[str, ...]
) -> Callable[[Callable[..., Tensor]], Callable[..., Tensor]]:
    """Register a sequence loss: ``inputs="sequences"``, ``extras`` are not hyperparameters."""
    bad = set(extras) - set(EXTRAS)
    if bad:
        raise TypeError(f"unknown extras {sorted(bad)}; valid: {EXTRAS}")
    return register_loss(name, inputs="sequences", check=check, extras=extras)


# ----------------------------------------------------------------------------- validation


def _lead(name: str, student: Any) -> tuple[int, int]:
    """``(B, T)`` of a ``[B, T, V]`` student (logits or a FusedHead)."""
    x = student.hidden if isinstance(student, FusedHead) else student
    if not isinstance(x, Tensor) or x.dim() != 3:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(
            f"loss {name!r} needs whole sequences: student logits [B, T, V] (or a FusedHead with "
            f"hidden [B, T, H]), got {shape}"
        )
    return x.shape[0], x.shape[1]


def _check_groups(name: str, groups: Tensor | None, b: int, device: torch.device) -> Tensor:
    """Group index ``[B]`` in ``0..G-1`` (None: every sequence is its own group)."""
    if groups is None:
        return torch.arange(b, device=device)
    if not isinstance(groups, Tensor) or groups.shape != (b,):
        shape = tuple(groups.shape) if isinstance(groups, Tensor) else type(groups).__name__
        raise ValueError(f"loss {name!r}: groups must be a LongTensor [{b}] (one id per sequence), "
                         f"got {shape}")  # fmt: skip
    if groups.is_floating_point() or groups.is_complex() or groups.dtype == torch.bool:
        raise ValueError(f"loss {name!r}: groups must hold integer ids, got dtype {groups.dtype}")
    return torch.unique(groups.to(device), return_inverse=True)[1]


def _check_rewards(name: str, rewards: Tensor | None, b: int, device: torch.device):
    """Rewards ``[B]`` as float64 on ``device`` (validated: finite, in [0, 1]), or None."""
    if rewards is None:
        return None
    if not isinstance(rewards, Tensor) or rewards.shape != (b,):
        shape = tuple(rewards.shape) if isinstance(rewards, Tensor) else type(rewards).__name__
        raise ValueError(f"loss {name!r}: rewards must be a float tensor [{b}], got {shape}")
    r = rewards.detach().to(device=device, dtype=torch.float64)
    if not bool(torch.isfinite(r).all()) or bool((r < 0).any()) or bool((r > 1).any()):
        raise ValueError(f"loss {name!r}: rewards must be finite and in [0, 1], got {r.tolist()}")
    return r


def _dense_teacher(name: str, teacher: Any, shape: torch.Size) -> Tensor:
    """The teacher as dense logits of ``shape`` (a HeadLogits is materialised)."""
    if isinstance(teacher, HeadLogits):
        teacher = teacher.logits()
    if not isinstance(teacher, Tensor):
        what = "None" if teacher is None else type(teacher).__name__
        raise ValueError(
            f"loss {name!r} needs dense teacher logits [B, T, V] (it reads the teacher's whole "
            f"distribution); a {what} teacher is not supported"
        )
    if teacher.shape != shape:
        raise ValueError(
            f"loss {name!r}: teacher logits {tuple(teacher.shape)} and student logits "
            f"{tuple(shape)} must have the same shape"
        )
    return teacher


def _no_fused(name: str, student: Any) -> None:
    if isinstance(student, FusedHead):
        raise ValueError(f"loss {name!r} cannot run on a fused output head; {FUSED_FIX}")


# ----------------------------------------------------------------------------- token scores


def _row_chunk(v: int) -> int:
    return max(1, CLOSED_FORM_ELEMS // max(1, v))


@torch.no_grad()
def token_logprobs(name: str, model: Any, labels: Tensor) -> Tensor:
    """``log softmax(z)[y]`` ``[B, T]`` (temperature 1, float32+, no gradient) of each label.

    ``model``: dense logits ``[B, T, V]`` (read a block of rows at a time, no full float copy), a
    :class:`~mentor.signals.HeadLogits` (logits computed per block) or a
    :class:`~mentor.signals.TopK` — a label outside the kept classes gets the teacher's ``tail``
    (the log of the whole mass outside them: an upper bound on its log-probability). Labels
    ``-100`` give arbitrary values (callers mask them).
    """
    y = labels.clamp_min(0)
    if isinstance(model, TopK):
        hit = model.indices == y.unsqueeze(-1)
        lp = model.logprobs.float() if model.logprobs.dtype != torch.float64 else model.logprobs
        got = torch.where(hit, lp, torch.full_like(lp, float("-inf"))).amax(-1)
        return torch.where(hit.any(-1), got, model.tail.to(got.dtype))
    if isinstance(model, Sampled):
        raise ValueError(
            f"loss {name!r} cannot score a completion under a Sampled teacher (its log-probability "
            f"of an undrawn token is unknown); pass rewards= or use a dense or TopK teacher"
        )
    if isinstance(model, HeadLogits):
        dt = half_to_float_dtype(model.dtype)
        b, t = model.hidden.shape[:2]
        out = torch.empty(b, t, dtype=dt, device=model.hidden.device)
        c = _row_chunk(model.weight.shape[0])
        for i in range(b):
            for a in range(0, t, c):
                z = F.linear(model.hidden[i, a : a + c], model.weight, model.bias).to(dt)
                lp = z.gather(-1, y[i, a : a + c, None]).squeeze(-1) - torch.logsumexp(z, -1)
                out[i, a : a + c] = lp
        return out
    if not isinstance(model, Tensor):
        raise ValueError(f"loss {name!r} needs teacher logits, TopK or rewards=, got None")
    dt = half_to_float_dtype(model.dtype)
    b, t, v = model.shape
    out = torch.empty(b, t, dtype=dt, device=model.device)
    c = _row_chunk(v)
    for i in range(b):
        for a in range(0, t, c):
            z = model[i, a : a + c].detach().to(dt)
            lp = z.gather(-1, y[i, a : a + c, None]).squeeze(-1) - torch.logsumexp(z, -1)
            out[i, a : a + c] = lp
    return out


def _token_mask(lead: tuple[int, int], labels: Tensor | None, mask: Tensor | None, device):
    dummy = torch.empty(*lead, 1, device=device)
    return counted_mask(dummy, labels, mask)


def sequence_quality(
    name: str,
    teacher: Any,
    labels: Tensor | None,
    mask: Tensor | None,
    rewards: Tensor | None,
    lead: tuple[int, int],
    device: torch.device,
) -> Tensor:
    """Per-sequence quality ``q [B]`` (float64, constant): ``rewards`` when given, else
    ``exp(mean_t log p_T(y_t))`` over the counted positions with a label (0 if there is none)."""
    r = _check_rewards(name, rewards, lead[0], device)
    if r is not None:
        return r
    if labels is None:
        raise ValueError(
            f"loss {name!r} scores each completion by the teacher's mean log-probability of its "
            f"tokens when no rewards are given: pass labels= (the sampled next tokens) or rewards="
        )
    if labels.shape != lead:
        raise ValueError(f"labels have shape {tuple(labels.shape)}, expected {lead}")
    m = counted_mask(torch.empty(*lead, 1, device=device), labels, mask, need_labels=True)
    lp = token_logprobs(name, teacher, labels.to(device)).to(torch.float64)
    lp = torch.where(m, lp, torch.zeros((), dtype=lp.dtype, device=lp.device))
    n = m.sum(-1)
    mean = lp.sum(-1) / n.clamp_min(1)
    return torch.where(n > 0, mean.exp(), torch.zeros_like(mean))


# ----------------------------------------------------------------------------- base divergences


def _base_spec(base: str, temperature: float, base_mix: float | None, tail: str) -> RowSpec:
    """The RowSpec of the base divergence (its own checks raise for invalid combinations)."""
    builder, check = ROWWISE[base]
    hp: dict[str, Any] = {"temperature": temperature, "tail": tail}
    if base_mix is not None:
        if base not in _MIX:
            raise ValueError(
                f"base_mix is the mixing coefficient of base jsd (its beta) or skew_kl / "
                f"skew_reverse_kl (their alpha); base={base!r} has none (leave base_mix null)"
            )
        hp[_MIX[base]] = base_mix
    check(**hp)
    return builder(**hp)


_BASE_RULES = {
    "base": C.choice(*BASES),
    "temperature": C.positive,
    "base_mix": C.optional_unit,
    "tail": C.choice(*TAILS),
    "chunk_size": C.chunk,
}


def _with_base(rules: C.Rule | Callable[..., None]) -> Callable[..., None]:
    """A ``check(**hp)`` applying ``rules`` and then building the base divergence."""

    def check(**hp: Any) -> None:
        rules(**hp)
        if "base" in hp:
            _base_spec(hp["base"], hp.get("temperature", 1.0), hp.get("base_mix"),
                       hp.get("tail", "tail_bucket"))  # fmt: skip

    return check


def _weighted_base(
    spec: RowSpec,
    student: Any,
    teacher: Any,
    labels: Tensor | None,
    mask: Tensor | None,
    seq_weights: Tensor,
    lead: tuple[int, int],
    temperature: float,
    chunk_size: int | None,
) -> Tensor:
    """``Σ_{b,t} w_b·mask_bt·ℓ_bt / Σ mask`` of the base divergence ``ℓ`` (w constant)."""
    rw = seq_weights.detach().reshape(-1, 1).expand(*lead)
    if isinstance(student, FusedHead):
        return run_fused(
            spec, student.hidden, student.weight, student.bias, teacher, labels, mask,
            chunk_size=student.chunk_size, temperature=temperature, row_weights=rw,
        )  # fmt: skip
    return run_rows(
        spec, student, teacher, labels, mask,
        chunk_size=chunk_size, temperature=temperature, row_weights=rw,
    )  # fmt: skip


def _device(student: Any) -> torch.device:
    return (student.hidden if isinstance(student, FusedHead) else student).device


# ------------------------------------------------------------------------------------ kepo

_CHK_KEPO = _with_base(C.checker(threshold=C.unit, **_BASE_RULES))


@sequence_loss("kepo", check=_CHK_KEPO, extras=("rewards",))
def kepo(
    student_logits: Any,
    teacher_logits: Any,
    *,
    labels: Tensor | None = None,
    mask: Tensor | None = None,
    rewards: Tensor | None = None,
    base: str = "reverse_kl",
    temperature: float = 1.0,
    base_mix: float | None = None,
    tail: str = "tail_bucket",
    threshold: float = 0.5,
    chunk_size: int | None = None,
) -> Tensor:
    """KEPO quality-gated on-policy distillation: the base divergence on passing sequences only.

    Paper: Yang et al., "KEPO: Knowledge-Enhanced Preference Optimization for Reinforcement
    Learning with Reasoning" (arXiv 2602.00400, 2026) — its quality-gated distillation term
    (the RL / hint-guided exploration parts are out of scope).
    ``g_b = 1[q_b ≥ threshold]``, ``L = Σ_{b,t} g_b·m_bt·ℓ_bt / Σ_{b,t} m_bt`` with ``ℓ`` the
    ``base`` divergence (default ``reverse_kl``, the on-policy-distillation choice) at
    ``temperature``; ``base_mix`` = jsd's β or skew's α. Quality ``q_b`` = ``rewards[b]`` (a
    verifier score in [0, 1]) when the data provides it, else ``exp(mean_t log p_T(y_t))`` — the
    teacher's geometric-mean probability of the completion's tokens (a TopK teacher scores a
    token outside its top-k by ``tail``, an upper bound). Defaults: reverse_kl, τ = 1,
    threshold = 0.5 (with 0/1 rewards: reward-positive trajectories). Reading: the gate is a
    hard indicator and gated-out tokens still count in the denominator (the indicator sits
    inside the expectation over all sampled trajectories). Teachers: as the base allows.
    """
    _CHK_KEPO(base=base, temperature=temperature, base_mix=base_mix, tail=tail,
              threshold=threshold, chunk_size=chunk_size)  # fmt: skip
    lead = _lead("kepo", student_logits)
    dev = _device(student_logits)
    q = sequence_quality("kepo", teacher_logits, labels, mask, rewards, lead, dev)
    gate = (q >= threshold).to(torch.float64)
    spec = _base_spec(base, temperature, base_mix, tail)
    return _weighted_base(spec, student_logits, teacher_logits, labels, mask, gate, lead,
                          temperature, chunk_size)  # fmt: skip


# ----------------------------------------------------------------------------------- paced

_CHK_PACED = _with_base(
    C.checker(
        alpha=C.non_negative,
        beta=C.non_negative,
        pass_threshold=C.unit,
        soft_pass=C.boolean,
        **_BASE_RULES,
    )
)


def pass_rates(passed: Tensor, groups: Tensor, valid: Tensor) -> Tensor:
    """Per-sequence pass rate of its group: mean of ``passed`` over the group's ``valid`` rows."""
    g = int(groups.max()) + 1 if groups.numel() else 0
    pv = torch.where(valid, passed, torch.zeros_like(passed))
    s = torch.zeros(g, dtype=passed.dtype, device=passed.device).index_add_(0, groups, pv)
    n = torch.zeros(g, dtype=passed.dtype, device=passed.device).index_add_(
        0, groups, valid.to(passed.dtype)
    )
    return (s / n.clamp_min(1))[groups]


@sequence_loss("paced", check=_CHK_PACED, extras=("groups", "rewards"))
def paced(
    student_logits: Any,
    teacher_logits: Any,
    *,
    labels: Tensor | None = None,
    mask: Tensor | None = None,
    groups: Tensor | None = None,
    rewards: Tensor | None = None,
    alpha: float = 1.0,
    beta: float = 1.0,
    base: str = "forward_kl",
    temperature: float = 1.0,
    base_mix: float | None = None,
    tail: str = "tail_bucket",
    pass_threshold: float = 0.5,
    soft_pass: bool = False,
    chunk_size: int | None = None,
) -> Tensor:
    """PACED: the base divergence weighted per prompt by w(p) = p^alpha·(1−p)^beta (pass rate p).

    Paper: Xu, Sang, Zhou, He, Wang, "PACED: Distillation at the Frontier of Student Competence"
    (arXiv 2603.11178, 2026). ``pass_b = 1[q_b ≥ pass_threshold]`` (``q`` as in ``kepo``:
    ``rewards`` when given, else the teacher's geometric-mean token probability; with
    ``soft_pass=True`` ``pass_b = q_b``, a soft pass); ``p_g`` = mean of ``pass`` over the
    sequences of prompt group ``g`` (``groups``) that have a counted position;
    ``L = Σ_{b,t} w(p_g(b))·m_bt·ℓ_bt / Σ m`` with ``ℓ`` the ``base`` divergence (default
    forward_kl, the paper's teacher→student setting; reverse_kl for self-distillation; any KL
    direction). Defaults α = β = 1 (``w = p(1−p)``, the paper's hyperparameter-free choice),
    τ = 1, pass_threshold = 0.5. Reading: raw w (no renormalisation; max 0.25 at α = β = 1),
    mean over all counted tokens; the pass rate is estimated from the rollouts in the batch. No
    ``groups`` (or a group of one): p is that sequence's own pass, so w = 0 for α, β > 0.
    """
    _CHK_PACED(alpha=alpha, beta=beta, base=base, temperature=temperature, base_mix=base_mix,
               tail=tail, pass_threshold=pass_threshold, soft_pass=soft_pass,
               chunk_size=chunk_size)  # fmt: skip
    lead = _lead("paced", student_logits)
    dev = _device(student_logits)
    g = _check_groups("paced", groups, lead[0], dev)
    q = sequence_quality("paced", teacher_logits, labels, mask, rewards, lead, dev)
    passed = q if soft_pass else (q >= pass_threshold).to(torch.float64)
    valid = _token_mask(lead, labels, mask, dev).any(-1)
    p = pass_rates(passed, g, valid)
    w = p.pow(alpha) * (1 - p).pow(beta)
    spec = _base_spec(base, temperature, base_mix, tail)
    return _weighted_base(spec, student_logits, teacher_logits, labels, mask, w, lead,
                          temperature, chunk_size)  # fmt: skip


# ----------------------------------------------------------------------------------- tsd_kd


def _entropy_part(temperature: float) -> Callable[..., tuple[Tensor, Tensor]]:
    """Rows ``H(softmax(s/τ))`` and their gradient ``−p·(log p + H)/τ`` (0·log 0 = 0)."""

    def part(s: Tensor, t: Tensor, labels: Tensor | None) -> tuple[Tensor, Tensor]:
        lp = F.log_softmax(s if temperature == 1 else s / temperature, dim=-1)
        p = lp.exp()
        plogp = torch.where(p > 0, p * lp, 0.0)
        h = -plogp.sum(-1)
        return h, plogp.add_(p * h.unsqueeze(-1)).div_(-temperature)

    return part


def _entropy_spec(temperature: float) -> RowSpec:
    def rows(s: Tensor, t: Any, labels: Tensor | None) -> Tensor:
        return entropy_rows(F.log_softmax(s / temperature, dim=-1))

    return RowSpec(
        "tsd_kd", rows, teachers=ALL_TEACHERS, uses_teacher=False,
        closed_form=_closed((_entropy_part(temperature), 1.0, 0)),
    )  # fmt: skip


@torch.no_grad()
def _entropies(x: Tensor, temperature: float, dt: torch.dtype) -> Tensor:
    """``H(softmax(x/τ))`` ``[B, T]`` without gradient, a block of rows at a time."""
    b, t, v = x.shape
    out = torch.empty(b, t, dtype=dt, device=x.device)
    c = _row_chunk(v)
    for i in range(b):
        for a in range(0, t, c):
            out[i, a : a + c] = entropy_rows(
                F.log_softmax(x[i, a : a + c].to(dt) / temperature, -1)
            )
    return out


def linear_quantile(x: Tensor, q: float) -> Tensor:
    """``torch.quantile(x, q)`` (linear interpolation) of a 1-D tensor, without its size limit."""
    v = torch.sort(x).values
    pos = q * (v.numel() - 1)
    lo = int(pos // 1)
    hi = min(lo + 1, v.numel() - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def listmle(scores: Tensor, valid: Tensor | None = None) -> Tensor:
    """Plackett–Luce NLL of the order given (row-wise): ``Σ_k (logsumexp_{j≥k} s_j − s_k)``.

    ``scores [R, K]`` are already in the target order (best first); ``valid`` (optional, same
    shape) drops candidates from every suffix and every term.
    """
    if valid is not None:
        scores = torch.where(valid, scores, float("-inf"))
    suffix = torch.logcumsumexp(scores.flip(-1), -1).flip(-1)
    terms = suffix - scores
    if valid is not None:
        terms = torch.where(valid, terms, torch.zeros((), dtype=terms.dtype, device=terms.device))
    return terms.sum(-1)


_CHK_TSD = C.checker(
    beta=C.unit,
    temperature=C.positive,
    entropy_quantile=C.unit,
    prefix_mass=C.unit,
    top_k=C.positive_int,
    rank_weight=C.non_negative,
    entropy_weight=C.non_negative,
    candidates=C.choice("tokens", "responses"),
    chunk_size=C.chunk,
)


@sequence_loss("tsd_kd", check=_CHK_TSD, extras=("groups",))
def tsd_kd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    labels: Tensor | None = None,
    mask: Tensor | None = None,
    groups: Tensor | None = None,
    beta: float = 0.9,
    temperature: float = 1.0,
    entropy_quantile: float = 0.1,
    prefix_mass: float = 0.1,
    top_k: int = 10,
    rank_weight: float = 0.1,
    entropy_weight: float = 1.0,
    candidates: str = "tokens",
    chunk_size: int | None = None,
) -> Tensor:
    """TSD-KD: confidence-weighted JSD + teacher re-ranking of the student's candidates + entropy.

    Paper: Kim & Baek, "Explain in Your Own Words: Improving Reasoning via Token-Selective Dual
    Knowledge Distillation", ICLR 2026 (code: github.com/kmswin1/TSD-KD). Over counted tokens,
    with ``H_S, H_T`` the entropies of ``softmax(z/τ)``:
    direct ``= Σ_t σ(H_S−H_T)·JSD_β(t) / n`` (σ detached; GKD's JSD);
    entropy ``= mean of H_S`` over tokens with ``H_S ≥`` the ``entropy_quantile`` quantile of
    the batch's counted ``H_S``; indirect (``candidates="tokens"``) ``=`` mean over each
    sequence's prefix (counted tokens whose cumulative share of the sequence's ``H_S`` is
    ``< prefix_mass``) of the Plackett–Luce NLL of the student's top-``top_k`` logits (÷τ) in the
    teacher's order; ``L = direct + entropy_weight·entropy + rank_weight·indirect``.
    ``candidates="responses"``: the teacher ranks a prompt's sampled responses (``groups``) by
    mean log-prob and the Plackett–Luce NLL scores the student's mean log-probs (0 without
    groups). Defaults from the official code: β = 0.9, τ = 1, quantile = prefix = 0.1, k = 10,
    rank_weight = 0.1, entropy_weight = 1. Dense teacher only.
    """
    _CHK_TSD(beta=beta, temperature=temperature, entropy_quantile=entropy_quantile,
             prefix_mass=prefix_mass, top_k=top_k, rank_weight=rank_weight,
             entropy_weight=entropy_weight, candidates=candidates, chunk_size=chunk_size)  # fmt: skip
    _no_fused("tsd_kd", student_logits)
    lead = _lead("tsd_kd", student_logits)
    s = student_logits
    t = _dense_teacher("tsd_kd", teacher_logits, s.shape)
    dev = s.device
    dt = torch.promote_types(half_to_float_dtype(s.dtype), half_to_float_dtype(t.dtype))
    m = _token_mask(lead, labels, mask, dev)
    zero = torch.zeros((), dtype=dt, device=dev)
    h_s = torch.where(m, _entropies(s, temperature, dt), zero)
    h_t = torch.where(m, _entropies(t, temperature, dt), zero)

    builder, _ = ROWWISE["jsd"]
    direct = run_rows(
        builder(beta=beta, temperature=temperature), s, t, None, m, chunk_size=chunk_size,
        temperature=temperature, row_weights=torch.sigmoid(h_s - h_t),
    )  # fmt: skip
    total = direct
    if not bool(m.any()):
        return total

    if entropy_weight > 0:
        sel = m & (h_s >= linear_quantile(h_s[m], entropy_quantile))
        ent = run_rows(_entropy_spec(temperature), s, None, None, sel, chunk_size=chunk_size,
                       temperature=temperature)  # fmt: skip
        total = total + entropy_weight * ent

    if rank_weight > 0:
        if candidates == "tokens":
            rank = _token_ranking(s, t, m, h_s, temperature, prefix_mass, top_k, dt)
        else:
            rank = _response_ranking(s, t, labels, mask, groups, lead, dt)
        total = total + rank_weight * rank
    return total


def _token_ranking(
    s: Tensor, t: Tensor, m: Tensor, h_s: Tensor, tau: float, prefix: float, k: int, dt
) -> Tensor:
    """Mean PL NLL of the student's top-k over the low-cumulative-entropy prefix of each row."""
    share = torch.cumsum(h_s, -1)
    sel = m & (share < prefix * h_s.sum(-1, keepdim=True))
    n = int(sel.sum())
    if n == 0:
        return torch.zeros((), dtype=dt, device=s.device)
    zs = upcast(s[sel]).to(dt) / tau
    zt = t[sel].to(dt) / tau
    k = min(k, zs.shape[-1])
    top, idx = torch.topk(zs, k, dim=-1)
    order = torch.sort(zt.gather(-1, idx), dim=-1, descending=True, stable=True).indices
    ranked = top.gather(-1, order)
    return listmle(ranked, torch.isfinite(ranked.detach())).sum() / n


def _response_ranking(
    s: Tensor, t: Tensor, labels: Tensor | None, mask: Tensor | None, groups: Tensor | None,
    lead: tuple[int, int], dt,
) -> Tensor:  # fmt: skip
    """PL NLL of the student's mean log-probs in the teacher's order, mean over groups of ≥ 2.

    The gradient flows through a closed-form cross-entropy pass weighted by ``∂L/∂S_b / n_b``
    (value: the ranking loss itself), so no ``[N, V]`` graph is kept.
    """
    zero = torch.zeros((), dtype=dt, device=s.device)
    if groups is None or labels is None:
        if labels is None:
            raise ValueError("loss 'tsd_kd' with candidates='responses' needs labels=")
        return zero
    g = _check_groups("tsd_kd", groups, lead[0], s.device)
    m = counted_mask(torch.empty(*lead, 1, device=s.device), labels, mask, need_labels=True)
    cnt = m.sum(-1)
    ok = cnt > 0

    def mean_lp(x: Any) -> Tensor:
        lp = token_logprobs("tsd_kd", x, labels).to(dt)
        return torch.where(m, lp, zero).sum(-1) / cnt.clamp_min(1)

    sc_s, sc_t = mean_lp(s.detach()), mean_lp(t)
    members = [torch.nonzero((g == i) & ok).squeeze(-1) for i in range(int(g.max()) + 1)]
    members = [ix for ix in members if ix.numel() >= 2]
    if not members:
        return zero
    sv = sc_s.clone().requires_grad_(True)
    with torch.enable_grad():
        nll = torch.stack(
            [
                listmle(
                    sv[ix[torch.sort(sc_t[ix], descending=True, stable=True).indices]].unsqueeze(0)
                )[0]
                for ix in members
            ]  # fmt: skip
        ).mean()
    if not (torch.is_grad_enabled() and s.requires_grad):
        return nll.detach()
    (gs,) = torch.autograd.grad(nll, [sv])
    n_all = m.sum().to(dt)
    row_w = (-gs / cnt.clamp_min(1) * n_all).reshape(-1, 1).expand(*lead)
    builder, _ = ROWWISE["ce"]
    surrogate = run_rows(builder(), s, None, labels, m, row_weights=row_w)
    return nll.detach() + (surrogate - surrogate.detach())


# ------------------------------------------------------------------------------- mgsr_span

_CHK_MGSR = C.checker(temperature=C.positive, span_length=C.positive_int)


@sequence_loss("mgsr_span", check=_CHK_MGSR, extras=("spans",))
def mgsr_span(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    labels: Tensor | None = None,
    mask: Tensor | None = None,
    spans: Tensor | None = None,
    temperature: float = 1.0,
    span_length: int = 4,
) -> Tensor:
    """MGSR span-level correlation consistency: match p_t ⊙ p_t+1 within spans (squared L2).

    Paper: Liu et al., "Multi-Granularity Semantic Revision for Large Language Model
    Distillation" (arXiv 2407.10068, 2024; ACL 2026) — its span-level objective (SCRG is a
    generation strategy; DAC-KL is not implemented, see docs). For adjacent counted positions
    ``t, t+1`` in the same span, ``r_t = p_t ⊙ p_t+1`` with ``p = softmax(z/τ)`` (the paper's
    Hadamard-product "correlation"); ``ℓ = ‖r_t^S − r_t^T‖₂²`` (sum over the vocabulary), mean
    over all such pairs (0 if none). Spans: ``spans`` ``[B, T]`` ids when the data provides
    chunker spans (equal consecutive ids = one span, < 0 = none); else every ``span_length``
    consecutive counted tokens of a sequence form a span. Defaults τ = 1, span_length = 4.
    Dense teacher only; not 0 only where the student differs.
    """
    _CHK_MGSR(temperature=temperature, span_length=span_length)
    _no_fused("mgsr_span", student_logits)
    lead = _lead("mgsr_span", student_logits)
    s = student_logits
    t = _dense_teacher("mgsr_span", teacher_logits, s.shape)
    dev = s.device
    dt = torch.promote_types(half_to_float_dtype(s.dtype), half_to_float_dtype(t.dtype))
    m = _token_mask(lead, labels, mask, dev)
    if spans is None:
        k = torch.cumsum(m.to(torch.long), -1) - 1
        sid = torch.where(m, torch.div(k, span_length, rounding_mode="floor"), -1)
    else:
        if not isinstance(spans, Tensor) or spans.shape != lead or spans.is_floating_point():
            shape = tuple(spans.shape) if isinstance(spans, Tensor) else type(spans).__name__
            raise ValueError(f"loss 'mgsr_span': spans must be integer ids [B, T] = {lead}, "
                             f"got {shape}")  # fmt: skip
        sid = spans.to(dev).long()
    pair = m[:, :-1] & m[:, 1:] & (sid[:, :-1] == sid[:, 1:]) & (sid[:, :-1] >= 0)
    n = int(pair.sum())
    if n == 0:
        return torch.zeros((), dtype=dt, device=dev)
    bi, ti = pair.nonzero(as_tuple=True)

    def corr(x: Tensor) -> Tensor:
        a = F.softmax(x[bi, ti].to(dt) / temperature, -1)
        b = F.softmax(x[bi, ti + 1].to(dt) / temperature, -1)
        return a * b

    with torch.no_grad():
        r_t = corr(t.detach())
    r_s = corr(s)
    return (r_s - r_t).pow(2).sum() / n


__all__ = ["BASES", "kepo", "mgsr_span", "paced", "sequence_quality", "token_logprobs", "tsd_kd"]


# ----------------------------------------------------------------------------- step_by_step

_CHK_SBS = C.checker(rationale_weight=C.non_negative)


@sequence_loss("step_by_step", check=_CHK_SBS, extras=("tasks",))
def step_by_step(
    student_logits: Any,
    teacher_logits: Any,
    *,
    labels: Tensor | None = None,
    mask: Tensor | None = None,
    tasks: Tensor | None = None,
    rationale_weight: float = 1.0,
) -> Tensor:
    """Distilling Step-by-Step's multi-task loss: label prediction + rationale generation.

    Paper: Hsieh et al., "Distilling Step-by-Step! Outperforming Larger Language Models with
    Less Training Data and Smaller Model Sizes" (Findings of ACL 2023). Each training text
    appears twice, once as a ``[label]`` task (target: the teacher's label) and once as a
    ``[rationale]`` task (target: the teacher's explanation); ``tasks[b]`` is 0 or 1.
    ``L = CE_label + λ·CE_rationale``, each the token-mean cross entropy over the counted
    completion tokens of its task's rows (a task without rows in the batch contributes 0);
    ``λ`` = ``rationale_weight`` (paper default 1). The teacher's logits are not used (its
    labels and rationales are the data: ``mentor generate --task rationale``).
    """
    _CHK_SBS(rationale_weight=rationale_weight)
    _no_fused("step_by_step", student_logits)
    lead = _lead("step_by_step", student_logits)
    dev = student_logits.device
    if labels is None:
        raise ValueError("loss 'step_by_step' needs labels (the completion tokens)")
    if tasks is None:
        raise ValueError(
            "loss 'step_by_step' needs each row's task (0 = label, 1 = rationale): train on "
            "data.source=prompts with data.params.step_by_step=true"
        )
    tasks = torch.as_tensor(tasks, device=dev).long().reshape(-1)
    if tasks.numel() != lead[0] or bool(((tasks != 0) & (tasks != 1)).any()):
        raise ValueError(
            f"loss 'step_by_step': tasks must be {lead[0]} values of 0 (label) or 1 "
            f"(rationale); got {tasks.tolist()}"
        )
    m = _token_mask(lead, labels, mask, dev) & (labels != -100)
    x = student_logits.to(torch.promote_types(student_logits.dtype, torch.float32))
    x = torch.where(m[..., None], x, 0.0)  # uncounted positions: no value, no gradient
    logp = F.log_softmax(x, dim=-1)
    tok = -logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    out = logp.new_zeros(())
    for k, w in ((0, 1.0), (1, float(rationale_weight))):
        mk = m & (tasks == k)[:, None]
        if bool(mk.any()):
            out = out + w * torch.where(mk, tok, 0.0).sum() / mk.sum()
    return out
