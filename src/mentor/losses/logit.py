"""Logit distillation losses (see docs/losses.md and the spec in METHODS-losses.md)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mentor.losses._base import register_loss
from mentor.losses._reduce import counted_mask, masked_mean, upcast


@register_loss("kd")
def kd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    labels: Tensor | None = None,
    mask: Tensor | None = None,
    temperature: float = 4.0,
    alpha: float = 0.0,
    standardize: bool = False,
    standardize_eps: float = 1e-7,
) -> Tensor:
    """Hinton KD: (1-alpha)*tau^2*KL(p_T^tau || p_S^tau) + alpha*CE (Hinton et al., 2015)."""
    s, t = upcast(student_logits), upcast(teacher_logits)
    m = counted_mask(s, labels, mask)
    log_ps = F.log_softmax(s / temperature, dim=-1)
    log_pt = F.log_softmax(t / temperature, dim=-1)
    row = (log_pt.exp() * (log_pt - log_ps)).sum(-1)
    soft = masked_mean(row, m) * temperature**2
    if alpha > 0:
        return (1 - alpha) * soft + alpha * ce(s, t, labels=labels, mask=mask)
    return soft


@register_loss("ce")
def ce(
    student_logits: Tensor,
    teacher_logits: object = None,
    *,
    labels: Tensor | None = None,
    mask: Tensor | None = None,
) -> Tensor:
    """Hard-label cross entropy on the student logits (the teacher is ignored)."""
    if labels is None:
        raise ValueError("loss 'ce' needs labels: pass labels= (class ids, -100 = ignore)")
    s = upcast(student_logits)
    m = counted_mask(s, labels, mask, need_labels=True)
    safe = labels.clamp_min(0)
    row = -torch.gather(F.log_softmax(s, dim=-1), -1, safe.unsqueeze(-1)).squeeze(-1)
    return masked_mean(row, m)
