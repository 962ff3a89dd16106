"""Ranking / retrieval distillation losses on candidate scores ``[B, K]``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mentor.losses import _checks as C
from mentor.losses._base import register_loss
from mentor.losses._rows import NEG_INF, kl_rows
from mentor.losses.feature import _pair, lead_mask, zero_masked


@register_loss("margin_mse", inputs="ranking")
def margin_mse(
    student_scores: Tensor, teacher_scores: Tensor, *, mask: Tensor | None = None
) -> Tensor:
    """Margin-MSE: match the positive-minus-negative score margins of student and teacher.

    Paper: Hofstätter et al., "Improving Efficient Neural Ranking Models with Cross-Architecture
    Knowledge Distillation" (2020). Scores ``[B, 1+K]`` (column 0 positive);
    ``L = mean over counted rows and k of ((s_0 − s_k) − (t_0 − t_k))²``; mask ``[B]``.
    """
    s, t = _pair(student_scores, teacher_scores)
    if s.dim() != 2 or s.shape[1] < 2 or s.shape != t.shape:
        raise ValueError(
            f"margin_mse needs student and teacher scores [B, 1+K] with K >= 1, got "
            f"{tuple(s.shape)} and {tuple(t.shape)}"
        )
    m = lead_mask(mask, s)
    s, t = zero_masked(s, m), zero_masked(t, m)
    d = (s[:, :1] - s[:, 1:]) - (t[:, :1] - t[:, 1:])
    return zero_masked(d.pow(2).mean(1), m).sum() / m.sum().clamp_min(1)


_CHK_LIST = C.checker(temperature=C.positive)


@register_loss("listwise_kl", inputs="ranking", check=_CHK_LIST)
def listwise_kl(
    student_scores: Tensor,
    teacher_scores: Tensor,
    *,
    mask: Tensor | None = None,
    temperature: float = 1.0,
    candidate_mask: Tensor | None = None,
) -> Tensor:
    """List-wise KL(softmax(t/tau) ‖ softmax(s/tau)) over each query's candidates.

    Scores ``[B, K]``; ``candidate_mask`` ``[B, K]`` (False = padding, excluded from both
    softmaxes; rows with no candidate do not count); ``mask`` ``[B]``; mean over counted rows;
    τ = 1, no τ². Identical to ``forward_kl`` on ``[B, K]`` without padding. Common in dense
    retrieval distillation (e.g. RocketQAv2, Ren et al., EMNLP 2021).
    """
    _CHK_LIST(temperature=temperature)
    s, t = _pair(student_scores, teacher_scores)
    if s.dim() != 2 or s.shape != t.shape:
        raise ValueError(
            f"listwise_kl needs scores [B, K] of equal shape, got {tuple(s.shape)}, {tuple(t.shape)}"
        )
    m = lead_mask(mask, s)
    cand = torch.ones_like(s, dtype=torch.bool) if candidate_mask is None else candidate_mask.bool()
    if cand.shape != s.shape:
        raise ValueError(
            f"candidate_mask must have shape {tuple(s.shape)}, got {tuple(cand.shape)}"
        )
    ok = m & cand.any(-1)
    zero = torch.zeros((), dtype=s.dtype, device=s.device)

    def logp(x: Tensor) -> Tensor:
        z = torch.where(cand, x / temperature, NEG_INF)
        return F.log_softmax(torch.where(ok.unsqueeze(-1), z, zero), -1)

    rows = torch.where(ok, kl_rows(logp(t), logp(s)), zero)
    return rows.sum() / ok.sum().clamp_min(1)


__all__ = ["listwise_kl", "margin_mse"]
