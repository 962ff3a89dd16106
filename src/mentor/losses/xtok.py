"""Cross-tokenizer distillation: teacher and student with different tokenizers (``inputs="xtok"``).

Their logits have different vocabularies (``[B, Ts, Vs]`` vs ``[B, Tt, Vt]``) and usually
different lengths, so no row-wise divergence applies. Two losses:

* :func:`uld` — Universal Logit Distillation (Boizard et al., 2024): the L1 distance between the
  two probability vectors sorted in decreasing order (the shorter zero-padded), pairing the i-th
  counted token of each side;
* :func:`gold_hybrid` — in the spirit of TRL's GOLD hybrid loss: positions paired by character
  spans of the shared text; an exact KL over the shared vocabulary where both sides predict the
  same token over the same span, ULD for the other pairs.

Helpers: :func:`build_vocab_map` (teacher id -> student id from two vocabularies; it lives with
the data, :mod:`mentor.data.xtok`, which builds the map once per run) and :func:`align_spans`
(pairs positions from per-token character offsets). Per-side inputs that are not
hyperparameters (``teacher_mask``, ``teacher_labels``, ``student_offsets``, ``teacher_offsets``,
``vocab_map``) are listed in each loss class's ``extras``. In a run, ``data.source: xtok_text``
tokenises the text per side and the engine passes these inputs to the objective's ``xtok``
terms (task ``causal_lm_xtok``, see :class:`mentor.tasks.CrossTokenizerLM`); from Python, call
the functions (or ``get_loss("uld")(...)``) directly. See ``docs/losses.md``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from mentor.data.xtok import build_vocab_map
from mentor.losses import _checks as C
from mentor.losses._base import register_loss
from mentor.losses._rows import half_to_float_dtype

# Per-batch inputs of the xtok losses (besides labels/mask): never hyperparameters.
XTOK_INPUTS = ("teacher_mask", "teacher_labels", "student_offsets", "teacher_offsets", "vocab_map")

REDUCTIONS = ("token", "sequence")


def xtok_loss(
    name: str, *, check: Callable[..., None], extras: tuple[str, ...]
) -> Callable[[Callable[..., Tensor]], Callable[..., Tensor]]:
    """Register a cross-tokenizer loss: ``inputs="xtok"``; ``extras`` are not hyperparameters."""
    bad = set(extras) - set(XTOK_INPUTS)
    if bad:
        raise TypeError(f"unknown extras {sorted(bad)}; valid: {XTOK_INPUTS}")
    return register_loss(name, inputs="xtok", check=check, extras=extras)


# ----------------------------------------------------------------------------- validation


def _shape(x: Any) -> Any:
    return tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__


def _logits(name: str, side: str, x: Any) -> Tensor:
    if not isinstance(x, Tensor) or x.dim() != 3 or not x.is_floating_point():
        raise ValueError(
            f"loss {name!r}: {side} logits must be a float tensor [B, T, V] (cross-tokenizer "
            f"losses compare whole sequences; each side has its own T and V), got {_shape(x)}"
        )
    return x


def _side_mask(
    name: str, side: str, x: Tensor, labels: Tensor | None, mask: Tensor | None, lnames: str
) -> Tensor:
    """Counted positions of one side: ``mask`` if given, else ``labels != -100``, else all."""
    lead = tuple(x.shape[:2])
    if mask is not None:
        if not isinstance(mask, Tensor) or tuple(mask.shape) != lead:
            raise ValueError(f"loss {name!r}: {lnames[0]} has shape {_shape(mask)}, expected "
                             f"{lead} (the {side} logits' [B, T])")  # fmt: skip
        return mask.to(device=x.device, dtype=torch.bool)
    if labels is not None:
        _check_labels(name, lnames[1], labels, lead)
        return labels.to(x.device) != -100
    return torch.ones(lead, dtype=torch.bool, device=x.device)


def _check_labels(name: str, what: str, labels: Any, lead: tuple[int, ...]) -> None:
    if not isinstance(labels, Tensor) or tuple(labels.shape) != lead:
        raise ValueError(f"loss {name!r}: {what} has shape {_shape(labels)}, expected {lead}")
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(f"loss {name!r}: {what} must hold integer token ids, got {labels.dtype}")


def _pair(name: str, s: Any, t: Any) -> tuple[Tensor, Tensor, torch.dtype]:
    s, t = _logits(name, "student", s), _logits(name, "teacher", t)
    if s.shape[0] != t.shape[0]:
        raise ValueError(f"loss {name!r}: student logits {_shape(s)} and teacher logits "
                         f"{_shape(t)} must have the same batch size")  # fmt: skip
    if s.device != t.device:
        raise ValueError(f"loss {name!r}: student ({s.device}) and teacher ({t.device}) logits "
                         f"must be on the same device")  # fmt: skip
    dt = torch.promote_types(half_to_float_dtype(s.dtype), half_to_float_dtype(t.dtype))
    return s, t, dt


# ----------------------------------------------------------------------------- shared pieces


def sorted_l1_rows(p_s: Tensor, p_t: Tensor) -> Tensor:
    """Per row ``Σ_k |sort↓(p_s)_k − sort↓(p_t)_k|``, the shorter vocabulary zero-padded.

    ``p_s`` ``[N, Vs]`` and ``p_t`` ``[N, Vt]`` are probability rows (Vs ≠ Vt allowed). This is
    ULD's closed form of the Wasserstein-1 distance between the two sorted distributions.
    Computed without sorting the longer rows in full: with ``m = min(Vs, Vt)``, the longer side
    keeps its ``m`` largest entries (``topk``, several times faster than a sort at a 49k
    vocabulary) and its other entries, compared with zero padding, add their total mass
    ``Σ p − Σ top-m`` (the same value and gradient).
    """
    m = min(p_s.shape[-1], p_t.shape[-1])

    def top(p: Tensor) -> tuple[Tensor, Tensor | None]:
        if p.shape[-1] == m:
            return p.sort(dim=-1, descending=True).values, None
        head = p.topk(m, dim=-1, sorted=True).values
        return head, p.sum(-1) - head.sum(-1)

    (a, tail_a), (b, tail_b) = top(p_s), top(p_t)
    rows = (a - b).abs().sum(-1)
    for tail in (tail_a, tail_b):
        if tail is not None:
            rows = rows + tail
    return rows


def _kl_rows(zs: Tensor, zt: Tensor) -> Tensor:
    """``KL(softmax(zt) ‖ softmax(zs))`` per row; classes with p_T = 0 contribute 0 (finite grad)."""
    lps, lpt = F.log_softmax(zs, -1), F.log_softmax(zt, -1)
    pt = lpt.exp()
    on = pt > 0
    zero = torch.zeros((), dtype=zs.dtype, device=zs.device)
    return (pt * (torch.where(on, lpt, zero) - torch.where(on, lps, zero))).sum(-1)


# ------------------------------------------------------------------------------------- uld

_CHK_ULD = C.checker(temperature=C.positive, reduction=C.choice(*REDUCTIONS))


@xtok_loss("uld", check=_CHK_ULD, extras=("teacher_mask", "teacher_labels"))
def uld(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    labels: Tensor | None = None,
    mask: Tensor | None = None,
    teacher_labels: Tensor | None = None,
    teacher_mask: Tensor | None = None,
    temperature: float = 1.0,
    reduction: str = "token",
) -> Tensor:
    """ULD — Universal Logit Distillation across tokenizers: L1 of the sorted probability vectors.

    Paper: Boizard et al., "Towards Cross-Tokenizer Distillation: the Universal Logit
    Distillation Loss for LLMs" (2024). Student logits ``[B, Ts, Vs]``, teacher logits
    ``[B, Tt, Vt]`` (Ts ≠ Tt, Vs ≠ Vt allowed). Counted positions per side: ``mask`` /
    ``teacher_mask`` ``[B, T]``, else ``labels`` / ``teacher_labels`` ≠ −100, else all.
    **Pairing** (the paper's): in each sequence the i-th counted student position is paired with
    the i-th counted teacher position, ``i < n_b = min(#counted_S, #counted_T)`` (the longer
    side's extra tokens are dropped). Per pair ``ℓ = Σ_k |sort↓(p_S)_k − sort↓(p_T)_k|`` with
    ``p = softmax(z/τ)`` and the shorter vocabulary zero-padded (the closed-form Wasserstein-1
    distance of the paper). ``reduction="token"`` (default, mentor's convention): mean over all
    pairs of the batch; ``"sequence"``: mean per sequence, then over sequences with a pair (the
    reference code's averaging). No pair → exactly 0. Defaults τ = 1 (the paper's), "token".
    The paper's loss adds the student's cross-entropy: in mentor that is a separate ``ce`` term
    of the objective (``uld`` is the distillation part only). To skip EOS tokens (the reference
    code's ``skip_*_eos``), leave them out of the masks. Gradients reach both sides.
    """
    _CHK_ULD(temperature=temperature, reduction=reduction)
    s, t, dt = _pair("uld", student_logits, teacher_logits)
    ms = _side_mask("uld", "student", s, labels, mask, ("mask", "labels"))
    mt = _side_mask("uld", "teacher", t, teacher_labels, teacher_mask,
                    ("teacher_mask", "teacher_labels"))  # fmt: skip
    n = torch.minimum(ms.sum(-1), mt.sum(-1))  # [B] pairs per sequence
    keep_s = ms & (torch.cumsum(ms.long(), -1) <= n[:, None])
    keep_t = mt & (torch.cumsum(mt.long(), -1) <= n[:, None])
    # Row-major boolean indexing: the k-th kept row of each side belongs to the same pair.
    p_s = F.softmax(s[keep_s].to(dt) / temperature, -1)
    p_t = F.softmax(t[keep_t].to(dt) / temperature, -1)
    rows = sorted_l1_rows(p_s, p_t)
    if reduction == "token":
        return rows.sum() / n.sum().clamp_min(1).to(dt)
    b = keep_s.nonzero(as_tuple=True)[0]
    per_seq = torch.zeros(s.shape[0], dtype=dt, device=s.device).index_add(0, b, rows)
    has = n > 0
    per_seq = per_seq / n.clamp_min(1).to(dt)
    return per_seq[has].sum() / has.sum().clamp_min(1).to(dt)


# ----------------------------------------------------------------------------- helpers


def _offsets(name: str, what: str, x: Any, lead: tuple[int, int], device) -> Tensor:
    if (
        not isinstance(x, Tensor)
        or tuple(x.shape) != (*lead, 2)
        or x.is_floating_point()
        or x.dtype == torch.bool
    ):
        raise ValueError(
            f"{name}: {what} must be an integer tensor [B, T, 2] = {(*lead, 2)} of (start, end) "
            f"character offsets (offset_mapping of a fast tokenizer), got "
            f"{_shape(x) if not isinstance(x, Tensor) else (tuple(x.shape), x.dtype)}"
        )
    return x.to(device=device, dtype=torch.long)


def _first_starts(starts: Tensor, m: Tensor, big: int) -> tuple[Tensor, Tensor, Tensor]:
    """Sorted counted starts per row (uncounted = ``big``), the sort order, first-occurrence flags.

    ``first[b, i]`` is False for a counted position whose start an earlier counted position of
    the same row already has (e.g. the 2nd byte token of one character).
    """
    key = torch.where(m, starts, torch.full_like(starts, big))
    sk, order = torch.sort(key, dim=-1, stable=True)
    dup_sorted = torch.zeros_like(m)
    dup_sorted[:, 1:] = sk[:, 1:] == sk[:, :-1]
    first = torch.ones_like(m).scatter(-1, order, ~dup_sorted) & m
    return sk, order, first


def align_spans(
    student_offsets: Tensor,
    teacher_offsets: Tensor,
    student_mask: Tensor | None = None,
    teacher_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Pair student and teacher positions that start at the same character of the shared text.

    ``*_offsets`` ``[B, T, 2]``: (start, end) character offsets, in one shared text per sequence,
    of the token each position **predicts** (for shifted causal-LM logits: the labels' offsets,
    ``offset_mapping[:, 1:]``); both sides must use the same convention (e.g. a leading space
    belongs to the token). Masks ``[B, T]`` (default: all counted). Returns
    ``(index, exact)``: ``index`` LongTensor ``[B, Ts]`` = the teacher position paired with each
    student position (−1 = none) and ``exact`` bool ``[B, Ts]`` = the two spans are identical
    (same start and end, hence the same string). Two tokens starting at the same character
    condition on the same text prefix, so their next-token distributions are comparable. Among
    counted positions of one side sharing a start (a character split into several byte tokens),
    only the earliest is paired. Vectorised (a sort and a search per row); no gradient.
    """
    if not isinstance(student_offsets, Tensor) or student_offsets.dim() != 3:
        raise ValueError(f"align_spans: student_offsets must be [B, Ts, 2], got "
                         f"{_shape(student_offsets)}")  # fmt: skip
    if not isinstance(teacher_offsets, Tensor) or teacher_offsets.dim() != 3:
        raise ValueError(f"align_spans: teacher_offsets must be [B, Tt, 2], got "
                         f"{_shape(teacher_offsets)}")  # fmt: skip
    dev = student_offsets.device
    b, ts = student_offsets.shape[:2]
    tt = teacher_offsets.shape[1]
    so = _offsets("align_spans", "student_offsets", student_offsets, (b, ts), dev)
    to = _offsets("align_spans", "teacher_offsets", teacher_offsets, (b, tt), dev)
    ms = _mask_or_all("student_mask", student_mask, (b, ts), dev)
    mt = _mask_or_all("teacher_mask", teacher_mask, (b, tt), dev)
    for what, o, m in (("student", so, ms), ("teacher", to, mt)):
        bad = m & ((o[..., 0] < 0) | (o[..., 1] < o[..., 0]))
        if bool(bad.any()):
            i = bad.nonzero()[0].tolist()
            raise ValueError(f"align_spans: {what} offsets at {tuple(i)} are "
                             f"{o[i[0], i[1]].tolist()}; need 0 <= start <= end")  # fmt: skip
    index = torch.full((b, ts), -1, dtype=torch.long, device=dev)
    if tt == 0 or ts == 0:
        return index, torch.zeros((b, ts), dtype=torch.bool, device=dev)
    big = int(max(int(so.max()), int(to.max()))) + 1
    sk_t, order_t, _ = _first_starts(to[..., 0], mt, big)
    _, _, first_s = _first_starts(so[..., 0], ms, big)
    pos = torch.searchsorted(sk_t, so[..., 0].contiguous())  # leftmost = earliest teacher pos
    posc = pos.clamp_max(tt - 1)
    hit = first_s & (pos < tt) & (sk_t.gather(-1, posc) == so[..., 0])
    j = order_t.gather(-1, posc)
    index = torch.where(hit, j, index)
    exact = hit & (to[..., 1].gather(-1, j) == so[..., 1])
    return index, exact


def _mask_or_all(what: str, m: Any, lead: tuple[int, int], device) -> Tensor:
    if m is None:
        return torch.ones(lead, dtype=torch.bool, device=device)
    if not isinstance(m, Tensor) or tuple(m.shape) != lead:
        raise ValueError(f"align_spans: {what} has shape {_shape(m)}, expected {lead}")
    return m.to(device=device, dtype=torch.bool)


# ----------------------------------------------------------------------------- gold_hybrid

_CHK_GOLD = C.checker(
    temperature=C.positive, matched_weight=C.non_negative, unmatched_weight=C.non_negative
)


def _check_vocab_map(vm: Any, vt: int, vs: int, device) -> Tensor:
    if not isinstance(vm, Tensor) or vm.dim() != 1 or vm.is_floating_point():
        raise ValueError(f"loss 'gold_hybrid': vocab_map must be a LongTensor [Vt] (teacher id -> "
                         f"student id, -1 = absent; see build_vocab_map), got {_shape(vm)}")  # fmt: skip
    if vm.shape[0] != vt:
        raise ValueError(f"loss 'gold_hybrid': vocab_map has {vm.shape[0]} entries but the teacher "
                         f"logits have V = {vt} (build_vocab_map(..., teacher_size={vt}))")  # fmt: skip
    vm = vm.to(device=device, dtype=torch.long)
    shared = vm[vm >= 0]
    if bool((shared >= vs).any()) or bool((vm < -1).any()):
        raise ValueError(f"loss 'gold_hybrid': vocab_map values must be -1 or student ids in "
                         f"[0, {vs})")  # fmt: skip
    if shared.unique().numel() != shared.numel():
        raise ValueError("loss 'gold_hybrid': vocab_map maps two teacher ids to one student id; "
                         "it must be injective")  # fmt: skip
    return vm


@xtok_loss("gold_hybrid", check=_CHK_GOLD, extras=XTOK_INPUTS)
def gold_hybrid(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    labels: Tensor | None = None,
    mask: Tensor | None = None,
    teacher_labels: Tensor | None = None,
    teacher_mask: Tensor | None = None,
    student_offsets: Tensor | None = None,
    teacher_offsets: Tensor | None = None,
    vocab_map: Tensor | None = None,
    temperature: float = 1.0,
    matched_weight: float = 1.0,
    unmatched_weight: float = 1.0,
) -> Tensor:
    """Span-aligned cross-tokenizer KD: exact KL on matching tokens, ULD on the other pairs.

    In the spirit of the hybrid loss of TRL's GOLD trainer ("General Online Logit Distillation",
    Hugging Face TRL, 2025), which builds on ULD (Boizard et al., "Towards Cross-Tokenizer
    Distillation: the Universal Logit Distillation Loss for LLMs", 2024). Inputs: student logits
    ``[B, Ts, Vs]``, teacher logits ``[B, Tt, Vt]``; ``labels`` ``[B, Ts]`` / ``teacher_labels``
    ``[B, Tt]`` = the token each position predicts; ``student_offsets`` / ``teacher_offsets``
    ``[B, T, 2]`` = their character spans in the shared text; ``vocab_map`` ``[Vt]`` teacher id ->
    student id or −1 (:func:`build_vocab_map`); counted positions ``mask`` / ``teacher_mask``
    (default: label ≠ −100). **Pairs** (:func:`align_spans`): a student and a teacher position
    whose tokens start at the same character (same text prefix). A pair is **matched** when the
    spans are identical and ``vocab_map[y_T] == y_S`` (same string, in both vocabularies):
    ``ℓ = KL(q_T ‖ q_S)`` with ``q = softmax(z[shared]/τ)`` over the shared vocabulary (the
    teacher ids with ``vocab_map ≥ 0`` and their student ids, renormalised on that set). Other
    pairs: ``ℓ`` = ULD's sorted L1 of the full ``softmax(z/τ)`` rows (see :func:`uld`).
    ``L = (w_m Σ_matched ℓ + w_u Σ_other ℓ) / #pairs``; positions without a partner are not
    counted; no pair → exactly 0. Defaults τ = 1, w_m = w_u = 1. With identical tokenizers every
    pair is matched and the loss is ``forward_kl``. Not implemented from GOLD: merging the
    probabilities of multi-token groups (such positions are dropped or go to ULD), JSD/β for the
    matched part (forward KL here), adaptive weights from the vocabulary overlap, the per-class
    (rather than per-position) matched/unmatched split; the CE term is a separate ``ce`` term.
    """
    _CHK_GOLD(temperature=temperature, matched_weight=matched_weight,
              unmatched_weight=unmatched_weight)  # fmt: skip
    name = "gold_hybrid"
    s, t, dt = _pair(name, student_logits, teacher_logits)
    (b, ts, vs), (_, tt, vt) = s.shape, t.shape
    missing = [k for k, v in (("labels", labels), ("teacher_labels", teacher_labels),
                              ("student_offsets", student_offsets),
                              ("teacher_offsets", teacher_offsets),
                              ("vocab_map", vocab_map)) if v is None]  # fmt: skip
    if missing:
        raise ValueError(
            f"loss {name!r} needs {', '.join(missing)}: the tokens each side predicts, their "
            f"character offsets in the shared text and the teacher->student vocab map"
        )
    _check_labels(name, "labels", labels, (b, ts))
    _check_labels(name, "teacher_labels", teacher_labels, (b, tt))
    so = _offsets(f"loss {name!r}", "student_offsets", student_offsets, (b, ts), s.device)
    to = _offsets(f"loss {name!r}", "teacher_offsets", teacher_offsets, (b, tt), s.device)
    vm = _check_vocab_map(vocab_map, vt, vs, s.device)
    ys, yt = labels.to(s.device).long(), teacher_labels.to(s.device).long()
    ms = _side_mask(name, "student", s, labels, mask, ("mask", "labels")) & (ys != -100)
    mt = _side_mask(name, "teacher", t, teacher_labels, teacher_mask,
                    ("teacher_mask", "teacher_labels")) & (yt != -100)  # fmt: skip
    for what, y, m, v in (("labels", ys, ms, vs), ("teacher_labels", yt, mt, vt)):
        if bool((m & ((y < 0) | (y >= v))).any()):
            raise ValueError(f"loss {name!r}: counted {what} must be token ids in [0, {v})")
    index, exact = align_spans(so, to, ms, mt)
    bi, si = (index >= 0).nonzero(as_tuple=True)
    ti = index[bi, si]
    n = bi.numel()
    y_t = yt[bi, ti]
    matched = exact[bi, si] & (vm[y_t] == ys[bi, si])
    zs = s[bi, si].to(dt) / temperature
    zt = t[bi, ti].to(dt) / temperature
    tid = (vm >= 0).nonzero().squeeze(-1)
    kl = _kl_rows(zs[matched][:, vm[tid]], zt[matched][:, tid])
    other = ~matched
    l1 = sorted_l1_rows(F.softmax(zs[other], -1), F.softmax(zt[other], -1))
    total = matched_weight * kl.sum() + unmatched_weight * l1.sum()
    return total / max(n, 1)


__all__ = [
    "REDUCTIONS",
    "XTOK_INPUTS",
    "align_spans",
    "build_vocab_map",
    "gold_hybrid",
    "sorted_l1_rows",
    "uld",
]
