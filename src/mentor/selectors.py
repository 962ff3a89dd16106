"""Rules from five papers that score or pick training examples for teacher-budget distillation.

Every function here only does tensor math. It imports nothing from the engine or the data
layer. Inputs are named after what they hold: ``*_logits`` are raw scores, ``*_logprobs`` are
log-probabilities, and both are ``[N, C]``, one row per example. They are computed in float32
(float64 where exponentials of ratios could overflow). When ranking ties, the earlier example
wins, as :func:`mentor.selection.pick` does. Wrong shapes or values raise a ``ValueError`` that
names the argument.

* :func:`llkd_select`: LLKD (Li et al., 2024). Of the examples the teacher labelled, keep those
  where the teacher is confident and the student is uncertain, using adaptive per-class
  thresholds. Optional state (:class:`LLKDState`) carries the moving averages from one round
  to the next.
* :func:`rad_acquire`: RAD (Baykal et al., ICLR 2023). Samples which unlabelled examples to pay
  the teacher for from the max-min (robust) distribution over the student's margin-based
  gains.
* :func:`kd3_select`: KD³ (Tang et al., ICCV 2023). Keeps an instance when the teacher and
  student predictions, averaged together, are confident.
* :func:`ddk_domain_weights`: DDK (Liu et al., NeurIPS 2024). Domain sampling proportions from
  the student/teacher perplexity ratio, with the paper's factor-smooth update.
* :func:`kd_pruned_weight` and :func:`prune_scores`: "Distilling the Knowledge in Data Pruning"
  (Ben-Baruch et al., 2024). The KD weight as a function of the kept fraction, plus the pruning
  scores that can be computed from a teacher's outputs.

Each docstring says where our version departs from the paper, and which details we could not
confirm from the paper's text.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from mentor.registry import did_you_mean

__all__ = [
    "LLKDState",
    "ddk_domain_weights",
    "kd3_combined",
    "kd3_select",
    "kd_pruned_weight",
    "llkd_select",
    "llkd_thresholds",
    "prune_scores",
    "rad_acquire",
    "rad_gains",
    "rad_probabilities",
]

_EPS = 1e-6  # slack on threshold comparisons, so float rounding never flips a tie


# ----------------------------------------------------------------------------- validation


def _matrix(x: object, name: str) -> Tensor:
    """``x`` as a float32 ``[N, C]`` tensor with C >= 1 and no NaN, else a ValueError."""
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape [N, C], got {type(x).__name__}")
    if x.dim() != 2 or x.shape[1] < 1:
        raise ValueError(f"{name} must have shape [N, C] with C >= 1, got {tuple(x.shape)}")
    if not (x.is_floating_point() or x.dtype in (torch.int32, torch.int64)):
        raise ValueError(f"{name} must hold real numbers, got dtype {x.dtype}")
    x = x.detach().float()
    if torch.isnan(x).any():
        raise ValueError(f"{name} contains NaN")
    if torch.isposinf(x).any():
        raise ValueError(f"{name} contains +inf")
    if x.shape[0] and torch.isneginf(x).all(-1).any():
        raise ValueError(f"{name} has a row that is -inf everywhere (no class has probability)")
    return x


def _pair(teacher: object, tname: str, student: object, sname: str) -> tuple[Tensor, Tensor]:
    t, s = _matrix(teacher, tname), _matrix(student, sname)
    if t.shape != s.shape:
        raise ValueError(
            f"{tname} and {sname} must have the same shape [N, C], "
            f"got {tuple(t.shape)} and {tuple(s.shape)}"
        )
    return t, s


def _entropy(logp: Tensor) -> Tensor:
    """``-sum p log p`` per row; classes with probability 0 contribute 0."""
    p = logp.exp()
    return -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(-1)


def _unit(x: float, name: str, *, low_open: bool = False, high_open: bool = False) -> float:
    """``x`` as a float in [0, 1] (ends optionally open), else a ValueError naming it."""
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        raise ValueError(f"{name} must be a finite number, got {x!r}")
    x = float(x)
    lo_ok = x > 0.0 if low_open else x >= 0.0
    hi_ok = x < 1.0 if high_open else x <= 1.0
    if not (lo_ok and hi_ok):
        lo, hi = "(" if low_open else "[", ")" if high_open else "]"
        raise ValueError(f"{name} must be in {lo}0, 1{hi}, got {x!r}")
    return x


# ----------------------------------------------------------------------------- LLKD


@dataclass
class LLKDState:
    """Moving averages that :func:`llkd_select` carries from one round to the next.

    Start with ``LLKDState()``. Each call with ``state=...`` updates it in place. All fields are
    ``None`` until the first call. ``teacher_confidence`` and ``student_uncertainty`` are the
    global moving averages of the mean teacher top probability and the mean student entropy.
    ``teacher_class`` and ``student_class`` (``[C]``) are the moving averages of the mean
    predicted probability of each class. ``rounds`` counts the updates.
    """

    teacher_confidence: float | None = None
    teacher_class: Tensor | None = None
    student_uncertainty: float | None = None
    student_class: Tensor | None = None
    rounds: int = 0

    def as_dict(self) -> dict[str, object]:
        """Plain floats and lists, e.g. to store in a checkpoint or JSON."""
        return {
            "teacher_confidence": self.teacher_confidence,
            "teacher_class": None if self.teacher_class is None else self.teacher_class.tolist(),
            "student_uncertainty": self.student_uncertainty,
            "student_class": None if self.student_class is None else self.student_class.tolist(),
            "rounds": self.rounds,
        }

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> LLKDState:
        """The state :meth:`as_dict` wrote."""

        def vec(x: object) -> Tensor | None:
            return None if x is None else torch.tensor(x, dtype=torch.float32)

        def num(x: object) -> float | None:
            return None if x is None else float(x)  # type: ignore[arg-type]

        return cls(
            teacher_confidence=num(d.get("teacher_confidence")),
            teacher_class=vec(d.get("teacher_class")),
            student_uncertainty=num(d.get("student_uncertainty")),
            student_class=vec(d.get("student_class")),
            rounds=int(d.get("rounds", 0)),  # type: ignore[arg-type]
        )


def llkd_thresholds(state: LLKDState) -> tuple[Tensor, Tensor]:
    """Per-class thresholds ``(tau_teacher [C], tau_student [C])`` of an updated state.

    ``tau(y) = (m(y) / max_c m(c)) * g``. Here ``g`` is the global moving average (teacher
    confidence, or student entropy) and ``m`` is the per-class moving average of the predicted
    probability (teacher's or student's). A class the model predicts less often gets a lower
    threshold, so more of its examples get through. This is FreeMatch's self-adaptive threshold
    (Wang et al., "FreeMatch: Self-adaptive Thresholding for Semi-supervised Learning",
    ICLR 2023), which is how we read LLKD's τ^T_t(y) and τ^S_t(y).
    """
    if state.teacher_class is None or state.student_class is None:
        raise ValueError("state has no statistics yet; call llkd_select(..., state=state) first")
    assert state.teacher_confidence is not None and state.student_uncertainty is not None
    tc, sc = state.teacher_class, state.student_class
    tau_t = tc / tc.max().clamp_min(1e-12) * state.teacher_confidence
    tau_s = sc / sc.max().clamp_min(1e-12) * state.student_uncertainty
    return tau_t, tau_s


def llkd_select(
    teacher_logprobs: Tensor,
    student_logits: Tensor,
    *,
    state: LLKDState | None = None,
    momentum: float = 0.9,
) -> Tensor:
    """LLKD: keep teacher-labelled examples that the teacher is sure of and the student is not.

    Paper: Juanhui Li, Sreyashi Nag, Hui Liu, Xianfeng Tang, Sheikh Sarwar, Limeng Cui, Hansu Gu,
    Suhang Wang, Qi He, Jiliang Tang, "Learning with Less: Knowledge Distillation from Large
    Language Models via Unlabeled Data", arXiv:2411.08028, 2024 (revised 2025).

    Rule, for each example i, with teacher pseudo-label ``y_i = argmax p_T(.|x_i)``:

    * teacher confidence ``c_i = max_y p_T(y|x_i)``, which says how reliable the label is;
    * student information need ``u_i = H(p_S(.|x_i))``, the entropy of the student's prediction;
    * keep i iff ``c_i >= tau_T(y_i)`` and ``u_i >= tau_S(y_i)`` (each within 1e-6).

    The per-class thresholds come from :func:`llkd_thresholds`. They are built from moving
    averages of this round's means. Each statistic ``x`` is updated as
    ``x <- momentum * x + (1 - momentum) * mean_over_round``. The first update, or a call
    without ``state``, takes the round's means as they are. With ``state=None`` the thresholds
    depend on this call alone. Pass an :class:`LLKDState` to carry them across rounds; it is
    updated in place, and the return value stays the mask. Returns a bool mask ``[N]``.

    Differences from the paper, and what we could not confirm. The paper defines adaptive,
    per-class thresholds τ^T_t(y) and τ^S_t(y) built from moving averages. We could not read
    its exact update equations. The FreeMatch-style form (global average scaled by the
    normalised per-class average), and using the student's class probabilities for the
    student side, are our most faithful reading. The paper updates at every training step
    (FreeMatch's momentum is 0.999 per batch). We update once per call, so our default momentum
    is 0.9. Pass 0.999 when calling per batch. The paper also weights the kept examples' loss
    (its L_w); that part is not built here.
    """
    logp_t, logits_s = _pair(teacher_logprobs, "teacher_logprobs", student_logits, "student_logits")
    m = _unit(momentum, "momentum", high_open=True)
    n, c = logp_t.shape
    if state is not None and not isinstance(state, LLKDState):
        raise ValueError(f"state must be an LLKDState or None, got {type(state).__name__}")
    if state is not None and state.teacher_class is not None and state.teacher_class.numel() != c:
        raise ValueError(
            f"state holds statistics for {state.teacher_class.numel()} classes but the inputs "
            f"have C={c}"
        )
    if n == 0:
        return torch.zeros(0, dtype=torch.bool)

    logp_t = logp_t.log_softmax(-1)
    logp_s = logits_s.log_softmax(-1)
    p_t, p_s = logp_t.exp(), logp_s.exp()
    conf, label = p_t.max(-1)  # first maximal class on ties
    unc = _entropy(logp_s)

    batch = (float(conf.mean()), p_t.mean(0), float(unc.mean()), p_s.mean(0))
    st = state if state is not None else LLKDState()
    if st.teacher_class is None:
        st.teacher_confidence, st.teacher_class = batch[0], batch[1].clone()
        st.student_uncertainty, st.student_class = batch[2], batch[3].clone()
    else:
        assert st.teacher_confidence is not None and st.student_uncertainty is not None
        assert st.student_class is not None
        st.teacher_confidence = m * st.teacher_confidence + (1 - m) * batch[0]
        st.teacher_class = m * st.teacher_class + (1 - m) * batch[1]
        st.student_uncertainty = m * st.student_uncertainty + (1 - m) * batch[2]
        st.student_class = m * st.student_class + (1 - m) * batch[3]
    st.rounds += 1

    tau_t, tau_s = llkd_thresholds(st)
    tt, ts = tau_t[label], tau_s[label]
    return (conf >= tt - _EPS * tt.abs().clamp_min(1.0)) & (
        unc >= ts - _EPS * ts.abs().clamp_min(1.0)
    )


# ----------------------------------------------------------------------------- RAD


def rad_gains(student_logits: Tensor) -> Tensor:
    """RAD's informativeness, ``g_i = 1 - (p_(1) - p_(2))``: one minus the student's top-2 margin.

    The value lies in [0, 1]. A higher value means the student is less sure, so the example is
    more informative. Needs C >= 2.
    """
    x = _matrix(student_logits, "student_logits")
    if x.shape[1] < 2:
        raise ValueError(f"student_logits needs C >= 2 classes for a margin, got C={x.shape[1]}")
    top = x.softmax(-1).topk(2, dim=-1).values
    return (1.0 - (top[:, 0] - top[:, 1])).clamp(0.0, 1.0)


def _check_k(k: object, n: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int):
        raise ValueError(f"k must be an int, got {k!r}")
    if k < 0 or k > n:
        raise ValueError(f"k must be in [0, N] = [0, {n}], got {k}")
    return k


def _rad_inclusion(g: Tensor, k: int, mistakes: float) -> Tensor:
    """Max-min inclusion probabilities (float64, sum k) for gains ``g`` against ``mistakes``.

    Solves ``max_p min_{c in [0,1]^n, sum c <= B} sum_i p_i g_i (1 - c_i)`` with
    ``0 <= p_i <= 1`` and ``sum p = k``. Sort the gains in decreasing order. The optimum sets
    the top m at ``p_i = t / g_i``, so each has expected gain t and the adversary can only remove
    B*t. Any budget left goes to the following points, greedily by gain: ``p = 1`` (gain below
    t) and one fractional point. For each m (m >= B), the best level t has a closed form, either
    where the level group's marginal value ``(m - B) / H_m`` meets the next gain, or with all
    the budget in the level group (``t = k / H_m``). Here ``H_m = sum_{i<=m} 1/g_i``. We take
    the candidate with the largest worst-case value. During development we checked this
    against a generic LP solver on random instances.
    """
    n = g.numel()
    if k == 0:
        return torch.zeros(n, dtype=torch.float64)
    if k >= n:
        return torch.ones(n, dtype=torch.float64)
    order = torch.sort(-g, stable=True).indices  # decreasing gain, earlier example first
    gs = g[order].double()
    npos = int((gs > 0).sum())
    if npos == 0 or mistakes >= npos:
        # the adversary can spoil every informative point: all strategies are worth 0
        return torch.full((n,), k / n, dtype=torch.float64)

    ms = torch.arange(1, npos + 1, dtype=torch.float64)
    harm = torch.cumsum(1.0 / gs[:npos], 0)  # H_m = sum_{i<=m} 1/g_i
    ext = torch.cat([gs, gs.new_zeros(1)])  # g_{m+1} = 0 past the end
    prefix = torch.cat([gs.new_zeros(1), torch.cumsum(gs, 0)])  # prefix[j] = sum of first j
    g_m, g_next = gs[:npos], ext[1 : npos + 1]
    # The budget's marginal value in the level group is rho = (m - B) / H_m. Points after m
    # with a larger gain are worth taking fully (p = 1).
    rho = (ms - mistakes) / harm
    above = n - torch.searchsorted(gs.flip(0).contiguous(), rho, right=True)
    full = (above - ms).clamp_min(0).clamp_max(n - ms)
    lo = g_next.clamp_min(0.0)
    hi = torch.minimum(g_m, k / harm)
    t = ((k - full) / harm).clamp(min=lo, max=hi)
    b = torch.minimum(k - t * harm, n - ms).clamp_min(0.0)  # budget for the p = 1 points
    fb = torch.floor(b)
    idx = (ms + fb).long()
    rest = prefix[idx] - prefix[ms.long()] + (b - fb) * ext[idx]
    value = (ms - mistakes) * t + rest
    value[(lo > hi + 1e-12) | (ms < mistakes)] = -math.inf
    # ... or all the budget in the level group, below the next gain (nothing else is asked)
    t_all = k / harm
    value_all = (ms - mistakes) * t_all
    value_all[(t_all > g_m + 1e-12) | (ms < mistakes)] = -math.inf
    both = torch.cat([value, value_all])
    best = int(torch.argmax(both))  # first maximum on ties: the smallest level group
    if best < npos:
        mm, tt, bb = best + 1, float(t[best]), float(b[best])
    else:
        mm, tt, bb = best - npos + 1, float(t_all[best - npos]), 0.0

    pi = torch.zeros(n, dtype=torch.float64)
    pi[:mm] = tt / gs[:mm]
    nf = int(math.floor(bb))
    pi[mm : mm + nf] = 1.0
    if mm + nf < n:
        pi[mm + nf] = bb - nf
    left = k - float(pi.sum())
    if left > 1e-12:  # more budget than is useful: spread it (it cannot lower the value)
        room = 1.0 - pi
        pi = pi + room * (left / float(room.sum()))
    out = torch.empty(n, dtype=torch.float64)
    out[order] = pi.clamp(0.0, 1.0)
    return out


def _default_mistakes(student_logits: Tensor) -> float:
    """The student's expected error count on the pool, ``sum_i (1 - max_y p_S(y|x_i))``."""
    return float((1.0 - student_logits.softmax(-1).max(-1).values).sum())


def _mistakes(mistakes: float | None, x: Tensor) -> float:
    if mistakes is None:
        return _default_mistakes(x)
    if isinstance(mistakes, bool) or not isinstance(mistakes, (int, float)):
        raise ValueError(f"mistakes must be a number >= 0 or None, got {mistakes!r}")
    if not math.isfinite(mistakes) or mistakes < 0:
        raise ValueError(f"mistakes must be a finite number >= 0, got {mistakes!r}")
    return float(mistakes)


def rad_probabilities(student_logits: Tensor, k: int, *, mistakes: float | None = None) -> Tensor:
    """RAD's inclusion probabilities ``[N]``, which sum to ``k`` and are each at most 1.

    This is the learner's max-min strategy from :func:`rad_acquire`. ``mistakes`` is the number
    of the pool's examples the teacher is assumed to mislabel. ``None`` estimates it as the
    student's expected error count, ``sum_i (1 - max_y p_S)``.
    """
    x = _matrix(student_logits, "student_logits")
    k = _check_k(k, x.shape[0])
    g = rad_gains(x)
    return _rad_inclusion(g, k, _mistakes(mistakes, x)).float()


def _systematic(pi: Tensor, k: int, generator: torch.Generator) -> list[int]:
    """Exactly ``k`` distinct positions with inclusion probabilities ``pi`` (sum k, each <= 1).

    Uses systematic sampling: one uniform draw u, and the points whose cumulative interval
    contains u, u+1, ..., u+k-1.
    """
    certain = pi >= 1.0 - 1e-9
    chosen = set(certain.nonzero().flatten().tolist())
    need = k - len(chosen)
    u = float(torch.rand((), generator=generator, dtype=torch.float64))
    if need > 0:
        cand = ((~certain) & (pi > 0)).nonzero().flatten()
        w = pi[cand]
        if cand.numel() and float(w.sum()) > 0:
            c = torch.cumsum(w * (need / float(w.sum())), 0)
            c[-1] = float(need)
            targets = u + torch.arange(need, dtype=torch.float64)
            pos = torch.searchsorted(c, targets, right=True).clamp_max(cand.numel() - 1)
            chosen.update(cand[pos].tolist())
        if len(chosen) < k:  # float round-off: top up by probability, earlier position first
            order = torch.sort(-pi, stable=True).indices.tolist()
            for i in order:
                if len(chosen) == k:
                    break
                chosen.add(i)
    return sorted(chosen)[:k]


def rad_acquire(
    student_logits: Tensor,
    k: int,
    *,
    generator: torch.Generator,
    mistakes: float | None = None,
    weighting: str = "none",
) -> tuple[list[int], Tensor]:
    """RAD: choose ``k`` unlabelled examples to query, balancing informativeness and correctness.

    Paper: Cenk Baykal, Khoa Trinh, Fotis Iliopoulos, Gaurav Menghani, Erik Vee, "Robust Active
    Distillation", ICLR 2023 (arXiv:2210.01213).

    Only the student's logits are known before paying. The gain of example i is
    ``g_i = 1 - margin_i``, one minus the gap between the student's top two probabilities
    (:func:`rad_gains`). The most informative examples are also the ones the teacher most often
    gets wrong. RAD therefore treats the choice as a zero-sum game against an adversary who
    picks which examples the teacher mislabels, at most ``B = mistakes`` of them. A mislabelled
    example is worth nothing. The learner plays the mixed strategy (inclusion probabilities
    ``p``, ``sum p = k``, ``p <= 1``) that maximises the worst-case expected gain:
    ``max_p min_{|M| <= B} sum_{i not in M} p_i g_i``. The optimum has a closed form
    (:func:`rad_probabilities`). Sort the gains in decreasing order. The top m examples get
    ``p_i = t / g_i``, so the most informative examples are deliberately sampled less; the
    adversary can then remove only B*t. The next examples, greedily by gain, get ``p_i = 1``
    while budget is left. The other examples get 0. Exactly k distinct positions are then drawn
    with those inclusion probabilities by systematic sampling, using one uniform draw from
    ``generator``.

    Returns the chosen positions (ascending) and one weight per position (float32).
    ``weighting="none"`` (default) gives ones, because the paper trains on the queried
    examples unweighted as far as we could tell. ``"inverse"`` gives the Horvitz-Thompson
    weights ``k / (N * p_i)``, which are 1 under uniform sampling.

    Differences from the paper, and what we could not confirm. We could not read the paper's
    theorem text. The adversary model above (a budget of B mislabelled examples), its exact
    solution, and the systematic sampler are our reconstruction. The paper calls its method
    parameter-free. We default B to the student's expected error count on the pool,
    ``sum_i (1 - max_y p_S)``; pass ``mistakes`` (for example
    ``N * (1 - teacher accuracy)``) to override it. If ``B`` is at least the number of examples
    with a positive gain, every strategy is worth 0, and we sample uniformly.
    """
    x = _matrix(student_logits, "student_logits")
    k = _check_k(k, x.shape[0])
    if not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if weighting not in ("none", "inverse"):
        raise ValueError(f"weighting must be 'none' or 'inverse', got {weighting!r}")
    pi = _rad_inclusion(rad_gains(x), k, _mistakes(mistakes, x))
    chosen = _systematic(pi, k, generator)
    if weighting == "none" or not chosen:
        return chosen, torch.ones(len(chosen))
    n = x.shape[0]
    w = k / (n * pi[torch.tensor(chosen, dtype=torch.long)].clamp_min(1e-12))
    return chosen, w.float()


# ----------------------------------------------------------------------------- KD^3


def kd3_combined(
    teacher_logprobs: Tensor, student_logits: Tensor, *, student_weight: float = 0.5
) -> Tensor:
    """KD³'s combined prediction ``(1 - lambda) p_T + lambda p_S``, shape ``[N, C]``.

    The pseudo-label of a kept instance is the argmax of this prediction.
    """
    logp_t, logits_s = _pair(teacher_logprobs, "teacher_logprobs", student_logits, "student_logits")
    lam = _unit(student_weight, "student_weight")
    return (1.0 - lam) * logp_t.softmax(-1) + lam * logits_s.softmax(-1)


def kd3_select(
    teacher_logprobs: Tensor,
    student_logits: Tensor,
    *,
    student_weight: float = 0.5,
    threshold: float = 0.5,
) -> Tensor:
    """KD³: keep web instances whose combined teacher+student prediction is confident.

    Paper: Jialiang Tang, Shuo Chen, Gang Niu, Masashi Sugiyama, Chen Gong, "Distribution Shift
    Matters for Knowledge Distillation with Webly Collected Images", ICCV 2023
    (arXiv:2307.11469). Only the paper's first component, teacher-student dynamic instance
    selection, is built here. Its weighted feature and classifier alignment and the
    MixDistribution contrastive block are not.

    Rule: ``q_i = (1 - lambda) p_T(.|x_i) + lambda p_S(.|x_i)`` (:func:`kd3_combined`). Keep i iff
    ``max_y q_i(y) >= threshold``. The pseudo-label is ``argmax q_i``. The selection is
    "dynamic" because it is recomputed each round with the current student, so it changes as
    the student learns the data. Defaults: ``student_weight = 0.5`` (a plain average) and
    ``threshold = 0.5``, meaning the combined prediction must put at least half its mass on one
    class. With these defaults, a sure teacher keeps an instance even while the student is still
    uniform. An instance on which the two networks confidently disagree, a sign of distribution
    shift, is dropped. Returns a bool mask ``[N]``.

    What we could not confirm. The abstract says instances are chosen "according to the
    combined predictions of teacher network and student network". We could not read the
    paper's exact combination, threshold or schedule. The convex combination, the 0.5
    defaults, and the fixed ``student_weight`` (an engine may ramp it up from 0) are our
    choices.
    """
    q = kd3_combined(teacher_logprobs, student_logits, student_weight=student_weight)
    tau = _unit(threshold, "threshold")
    if q.shape[0] == 0:
        return torch.zeros(0, dtype=torch.bool)
    return q.max(-1).values >= tau - _EPS


# ----------------------------------------------------------------------------- DDK


def _domain_vector(x: object, name: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape [D], got {type(x).__name__}")
    if x.dim() != 1 or x.numel() < 1:
        raise ValueError(f"{name} must have shape [D] with D >= 1, got {tuple(x.shape)}")
    x = x.detach().double()
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} must be finite")
    return x


def ddk_domain_weights(
    student_loss: Tensor,
    teacher_loss: Tensor,
    previous: Tensor | None,
    *,
    smoothing: float = 0.5,
) -> Tensor:
    """DDK: domain sampling proportions from the student/teacher discrepancy, smoothly updated.

    Paper: Jiaheng Liu, Chenchen Zhang, Jinyang Guo, Yuanxing Zhang, Haoran Que, Ken Deng, et
    al., "DDK: Distilling Domain Knowledge for Efficient Large Language Models", NeurIPS 2024
    (arXiv:2407.16154).

    ``student_loss`` and ``teacher_loss`` are each model's mean cross-entropy (nats per token)
    on each domain's validation set, shape ``[D]``. The perplexities are
    ``l_S = exp(student_loss)`` and ``l_T = exp(teacher_loss)``, and the discrepancy of domain i
    is ``l_S[i] / l_T[i]``.

    * ``previous=None`` gives the initial factor (paper Eq. 1):
      ``r[i] = exp(l_S[i]/l_T[i]) / sum_j exp(l_S[j]/l_T[j])``.
    * Otherwise, the factor-smooth update (paper Eq. 2) with ``alpha = smoothing``:
      ``psi[i] = previous[i] * exp(l_S[i]/l_T[i])`` and
      ``r[i] = alpha * psi[i] / sum_j psi[j] + (1 - alpha) / D``.

    ``previous`` is the factor this function returned at the last interval. The paper fixes
    ``alpha = 0.5`` and recomputes every K = 1,000 steps. The constant term keeps every domain
    at least ``(1 - alpha) / D``. Returns float32 ``[D]`` that sums to 1. It is computed in
    float64 (in the log domain) so that large ratios do not overflow.

    Difference from the paper: the recomputation interval K belongs to the caller. Otherwise
    the formulas are as written in the paper.
    """
    s = _domain_vector(student_loss, "student_loss")
    t = _domain_vector(teacher_loss, "teacher_loss")
    if s.shape != t.shape:
        raise ValueError(
            f"student_loss and teacher_loss must have the same shape [D], "
            f"got {tuple(s.shape)} and {tuple(t.shape)}"
        )
    alpha = _unit(smoothing, "smoothing")
    ratio = torch.exp(s - t)  # l_S / l_T = exp(CE_S) / exp(CE_T)
    if previous is None:
        return torch.softmax(ratio, 0).float()
    prev = _domain_vector(previous, "previous")
    if prev.shape != s.shape:
        raise ValueError(
            f"previous must have the same shape [D] as the losses, got {tuple(prev.shape)} "
            f"and {tuple(s.shape)}"
        )
    if (prev < 0).any() or abs(float(prev.sum()) - 1.0) > 1e-4:
        raise ValueError(
            "previous must be domain proportions (>= 0, summing to 1), e.g. this function's "
            f"last output; got sum {float(prev.sum()):.6g}"
        )
    if not (prev > 0).any():
        raise ValueError("previous must give some domain a positive proportion")
    psi = torch.softmax(torch.log(prev) + ratio, 0)  # psi / sum psi, in the log domain
    d = s.numel()
    return (alpha * psi + (1.0 - alpha) / d).float()


# ----------------------------------------------------------------------------- data pruning + KD


def kd_pruned_weight(
    fraction: float, *, alpha_full: float = 0.5, alpha_empty: float = 1.0
) -> float:
    """KD weight α for training on a kept ``fraction`` of the data, for ``(1-α)·CE + α·KD``.

    Paper: Emanuel Ben-Baruch, Adam Botach, Igor Kviatkovsky, Manoj Aggarwal, Gérard Medioni,
    "Distilling the Knowledge in Data Pruning", arXiv:2403.07854, 2024 (ICML 2025).

    The paper shows that the best KD weight depends on the pruning factor. When little data is
    kept, more weight on the teacher is better: the few kept labels are noisier (hard-sample
    pruning keeps mislabelled and low-quality images) and the teacher's soft labels carry more.
    When nearly all data is kept, a smaller weight is best. We implement the coupling as a
    straight line between the two ends:
    ``α(f) = alpha_empty + (alpha_full - alpha_empty) · f``. With the defaults this gives
    α = 0.5 at f = 1 and α → 1 (pure KD) as f → 0, so α(0.1) = 0.95 and α(0.5) = 0.75.
    ``fraction`` must satisfy 0 < f <= 1.

    What we could not confirm. The paper reports the best α per fraction from a grid on
    CIFAR-100, spanning roughly 0.5 to 1.0 from full data to about 10% kept. We found no
    closed-form rule in it. The linear form and its end points are our choice, matched to that
    reported trend and range.
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
        raise ValueError(f"fraction must be a number in (0, 1], got {fraction!r}")
    f = float(fraction)
    if not math.isfinite(f) or not (0.0 < f <= 1.0):
        raise ValueError(f"fraction must be in (0, 1] (the kept share of the data), got {f!r}")
    a1 = _unit(alpha_full, "alpha_full")
    a0 = _unit(alpha_empty, "alpha_empty")
    return a0 + (a1 - a0) * f


_PRUNE_BUILT = ("random", "el2n")
_PRUNE_NOT_BUILT = {
    "forgetting": "counts forgetting events over a training run (Toneva et al., 2019)",
    "grand": "needs per-example loss gradients of early-training models (Paul et al., 2021)",
    "memorization": "needs many models trained on subsets (Feldman & Zhang, 2020)",
    "dynamic_uncertainty": "needs predictions across training epochs (He et al., 2024)",
}


def prune_scores(
    teacher_logprobs: Tensor,
    labels: Tensor | None = None,
    *,
    method: str = "random",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Pruning scores ``[N]`` (float32; higher = kept first with :func:`mentor.selection.pick`).

    This pairs with :func:`kd_pruned_weight` (Ben-Baruch et al., "Distilling the Knowledge in
    Data Pruning", 2024). The paper prunes a dataset with several scoring methods and then
    trains with KD. It finds that, with KD, random pruning matches or beats the sophisticated
    methods. Only the methods computable from one teacher's outputs are built here:

    * ``"random"``: i.i.d. uniform scores from ``generator`` (required), so ``pick`` keeps a
      uniformly random subset.
    * ``"el2n"``: the error L2 norm ``||p_T(.|x_i) - onehot(y_i)||_2`` (Paul, Ganguli,
      Dziugaite, "Deep Learning on a Data Diet: Finding Important Examples Early in Training",
      NeurIPS 2021). Needs ``labels``. A higher score marks a harder example, which is kept
      first, as in the paper's hard-example pruning. Difference: EL2N averages early-training
      models over several seeds, while this uses the given teacher's outputs.

    Not built, because the given tensors are not enough: ``forgetting``, ``grand``,
    ``memorization`` and ``dynamic_uncertainty``. Each needs training dynamics, gradients, or
    retrained models, and asking for one raises a ValueError that says so.
    """
    logp = _matrix(teacher_logprobs, "teacher_logprobs")
    if method in _PRUNE_NOT_BUILT:
        raise ValueError(
            f"prune method {method!r} is not built: it {_PRUNE_NOT_BUILT[method]}, which cannot "
            f"be computed from a teacher's outputs; built methods: {', '.join(_PRUNE_BUILT)}"
        )
    if method not in _PRUNE_BUILT:
        names = [*_PRUNE_BUILT, *_PRUNE_NOT_BUILT]
        raise ValueError(
            f"unknown prune method {method!r}; built: {', '.join(_PRUNE_BUILT)}."
            + did_you_mean(str(method), names)
        )
    n, c = logp.shape
    if method == "random":
        if not isinstance(generator, torch.Generator):
            raise ValueError("method='random' needs generator=torch.Generator(...) (seeded)")
        return torch.rand(n, generator=generator)
    if labels is None:
        raise ValueError("method='el2n' needs labels (the [N] class indices)")
    if not isinstance(labels, Tensor) or labels.dim() != 1 or labels.shape[0] != n:
        shape = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
        raise ValueError(f"labels must be a tensor of shape [N] = [{n}], got {shape}")
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(f"labels must hold integer class indices, got dtype {labels.dtype}")
    lab = labels.long()
    if n and (int(lab.min()) < 0 or int(lab.max()) >= c):
        raise ValueError(f"labels must be class indices in [0, {c}), got a value out of range")
    p = logp.log_softmax(-1).exp()
    onehot = torch.nn.functional.one_hot(lab, c).float()
    return (p - onehot).norm(dim=-1)
