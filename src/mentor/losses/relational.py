"""Batch-relational losses: compare how samples relate to each other within a batch."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mentor.losses import _checks as C
from mentor.losses._base import register_loss
from mentor.losses._reduce import upcast
from mentor.losses._rows import NEG_INF, kl_rows


def _flat_pair(name: str, student: Tensor, teacher: Tensor, mask: Tensor | None):
    """Flatten samples to ``[N, D]`` (upcast) and keep the counted ones."""
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(
            f"{name}: student and teacher batches differ ({student.shape[0]} vs {teacher.shape[0]})"
        )
    s, t = upcast(student).flatten(1), upcast(teacher).flatten(1)
    dt = torch.promote_types(s.dtype, t.dtype)
    s, t = s.to(dt), t.to(dt)
    if mask is not None:
        m = mask.to(torch.bool)
        if m.shape != (s.shape[0],):
            raise ValueError(f"{name}: mask must have shape [{s.shape[0]}], got {tuple(m.shape)}")
        s, t = s[m], t[m]
    return s, t


def _pdist(e: Tensor, eps: float) -> Tensor:
    sq = e.pow(2).sum(1)
    d = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2 * e @ e.t()).clamp_min(eps).sqrt()
    return d * (1 - torch.eye(e.shape[0], dtype=e.dtype, device=e.device))


def _mean_normalized(d: Tensor) -> Tensor:
    pos = d > 0
    return d / (d * pos).sum().div(pos.sum().clamp_min(1)).clamp_min(torch.finfo(d.dtype).tiny)


_CHK_EPS = C.checker(eps=C.positive)


@register_loss("rkd_distance", inputs="batch", check=_CHK_EPS)
def rkd_distance(
    student: Tensor, teacher: Tensor, *, mask: Tensor | None = None, eps: float = 1e-12
) -> Tensor:
    """RKD distance: smooth-L1 between mean-normalized pairwise distance matrices.

    Paper: Park et al., "Relational Knowledge Distillation", CVPR 2019.
    ``d_ij = sqrt(max(‖e_i‖² + ‖e_j‖² − 2 e_i·e_j, eps))`` (diagonal 0) divided by the mean of
    its positive entries; teacher side without gradient; ``L = smoothL1_{β=1}(d_S, d_T)``
    averaged over all N² entries. eps = 1e-12; N < 2 → 0. Inputs ``[N, ...]``, mask ``[N]``.
    """
    _CHK_EPS(eps=eps)
    s, t = _flat_pair("rkd_distance", student, teacher, mask)
    if s.shape[0] < 2:
        return s.sum() * 0
    with torch.no_grad():
        dt = _mean_normalized(_pdist(t, eps))
    ds = _mean_normalized(_pdist(s, eps))
    return F.smooth_l1_loss(ds, dt, beta=1.0)


def _angles(e: Tensor, eps: float) -> Tensor:
    u = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), p=2, dim=2, eps=eps)  # u[i, j] ∝ e_j − e_i
    return torch.bmm(u, u.transpose(1, 2)).reshape(-1)


@register_loss("rkd_angle", inputs="batch", check=_CHK_EPS)
def rkd_angle(
    student: Tensor, teacher: Tensor, *, mask: Tensor | None = None, eps: float = 1e-12
) -> Tensor:
    """RKD angle: smooth-L1 between triplet angle cosines ⟨u_ij, u_ik⟩ of the batch.

    Paper: Park et al., "Relational Knowledge Distillation", CVPR 2019.
    ``u_ij = normalize(e_j − e_i)`` (eps 1e-12), ``A_ijk = ⟨u_ij, u_ik⟩``; teacher without
    gradient; ``L = smoothL1(A_S, A_T)`` averaged over all N³ entries (degenerate ones
    included). N < 2 → 0. Memory is O(N²·D + N³).
    """
    _CHK_EPS(eps=eps)
    s, t = _flat_pair("rkd_angle", student, teacher, mask)
    if s.shape[0] < 2:
        return s.sum() * 0
    with torch.no_grad():
        at = _angles(t, eps)
    return F.smooth_l1_loss(_angles(s, eps), at, beta=1.0)


_CHK_SP = C.checker(eps=C.positive, row_norm_p=C.positive)


@register_loss("spkd", inputs="batch", check=_CHK_SP)
def spkd(
    student: Tensor,
    teacher: Tensor,
    *,
    mask: Tensor | None = None,
    eps: float = 1e-12,
    row_norm_p: float = 2,
) -> Tensor:
    """Similarity-preserving KD: squared Frobenius distance of row-normalized batch Gram matrices.

    Paper: Tung & Mori, "Similarity-Preserving Knowledge Distillation", ICCV 2019.
    ``G = Q Qᵀ`` (Q = samples flattened to ``[N, D]``), rows divided by ``max(‖row‖_p, eps)``
    (p = 2, paper Eq. 2); ``L = ‖G_T − G_S‖_F² / N²``. Defaults eps = 1e-12, row_norm_p = 2
    (torchdistill uses p = 1).
    """
    _CHK_SP(eps=eps, row_norm_p=row_norm_p)
    s, t = _flat_pair("spkd", student, teacher, mask)
    n = s.shape[0]
    if n == 0:
        return s.sum()
    gs = F.normalize(s @ s.t(), p=row_norm_p, dim=1, eps=eps)
    gt = F.normalize(t @ t.t(), p=row_norm_p, dim=1, eps=eps)
    return (gt - gs).pow(2).sum() / (n * n)


_CHK_GRAM = C.checker(temperature=C.positive)


@register_loss("gram_kl", inputs="batch", check=_CHK_GRAM)
def gram_kl(
    student: Tensor, teacher: Tensor, *, mask: Tensor | None = None, temperature: float = 3.0
) -> Tensor:
    """Gram-matrix KL (Luxical): KL between teacher and student in-batch similarity rows, ×tau².

    Paper: DatologyAI, "Luxical: High-Speed Lexical-Dense Text Embeddings" (2025).
    ``G = E Eᵀ`` (raw dot products), diagonal removed;
    ``L = τ² (1/N) Σ_i KL(softmax(G_T[i]/τ) ‖ softmax(G_S[i]/τ))``, τ = 3. N < 2 → 0.
    Student and teacher dims may differ.
    """
    _CHK_GRAM(temperature=temperature)
    s, t = _flat_pair("gram_kl", student, teacher, mask)
    n = s.shape[0]
    if n < 2:
        return s.sum() * 0
    eye = torch.eye(n, dtype=torch.bool, device=s.device)
    ls = F.log_softmax((s @ s.t() / temperature).masked_fill(eye, NEG_INF), -1)
    lt = F.log_softmax((t @ t.t() / temperature).masked_fill(eye, NEG_INF), -1)
    return temperature**2 * kl_rows(lt, ls).mean()


__all__ = ["gram_kl", "rkd_angle", "rkd_distance", "spkd"]
