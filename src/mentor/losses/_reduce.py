"""Masking, reduction and precision rules shared by every loss."""

from __future__ import annotations

import torch
from torch import Tensor


def upcast(x: Tensor) -> Tensor:
    """Half-precision inputs are computed in float32; float32/float64 are kept."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def counted_mask(
    logits: Tensor, labels: Tensor | None, mask: Tensor | None, *, need_labels: bool = False
) -> Tensor:
    """Boolean mask of counted positions (leading shape of ``logits``)."""
    lead = logits.shape[:-1]
    if mask is not None:
        m = mask.to(torch.bool)
        if m.shape != lead:
            raise ValueError(f"mask has shape {tuple(m.shape)}, expected {tuple(lead)}")
    elif labels is not None:
        m = labels != -100
    else:
        m = torch.ones(lead, dtype=torch.bool, device=logits.device)
    if need_labels and labels is not None:
        m = m & (labels != -100)
    return m
