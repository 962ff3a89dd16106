"""Feature distillation losses: hidden states, embeddings and attention maps."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from mentor.losses import _checks as C
from mentor.losses._base import register_loss
from mentor.losses._reduce import upcast
from mentor.losses._rows import NEG_INF, kl_rows


def _pair(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    a, b = upcast(a), upcast(b)
    dt = torch.promote_types(a.dtype, b.dtype)
    return a.to(dt), b.to(dt)


def lead_mask(mask: Tensor | None, x: Tensor, *, ndim: int | None = None) -> Tensor:
    """Bool mask over the leading dims of ``x`` (all True if ``mask`` is None)."""
    if mask is None:
        return torch.ones(
            x.shape[: ndim if ndim is not None else 1], dtype=torch.bool, device=x.device
        )
    m = mask.to(torch.bool)
    if tuple(m.shape) != tuple(x.shape[: m.dim()]):
        raise ValueError(
            f"mask has shape {tuple(m.shape)}, expected the leading shape of {tuple(x.shape)}"
        )
    return m


def zero_masked(x: Tensor, m: Tensor) -> Tensor:
    """Replace positions not counted by ``m`` (leading dims of ``x``) with 0."""
    mm = m.view(*m.shape, *([1] * (x.dim() - m.dim())))
    return torch.where(mm, x, torch.zeros((), dtype=x.dtype, device=x.device))


def _layers(x: Tensor | Sequence[Tensor], what: str) -> list[Tensor]:
    if isinstance(x, Tensor):
        return [x]
    layers = list(x)
    if not layers:
        raise ValueError(f"{what}: got an empty list of layers")
    return layers


_CHK_HINT = C.checker()


@register_loss("hint_mse", inputs="features", check=_CHK_HINT)
def hint_mse(
    student_feat: Tensor,
    teacher_feat: Tensor,
    *,
    mask: Tensor | None = None,
    projector: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """FitNets hint: mean squared error between (projected) student and teacher features.

    Paper: Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015.
    ``L = mean over counted elements of (r(f_S) − f_T)²`` with ``r`` the optional ``projector``
    (e.g. ``nn.Linear(D_S, D_T)``, a 1×1 conv for maps; default None = identity). ``mask`` has
    the leading shape. Unmasked it equals ``F.mse_loss(r(f_S), f_T)``.
    """
    m = None if mask is None else lead_mask(mask, student_feat)
    if m is not None:
        student_feat = zero_masked(student_feat, m)
    r = projector(student_feat) if projector is not None else student_feat
    if r.shape != teacher_feat.shape:
        raise ValueError(
            f"hint_mse: student features {tuple(r.shape)} (after the projector) and teacher "
            f"features {tuple(teacher_feat.shape)} differ; add a projector"
        )
    s, t = _pair(r, teacher_feat)
    if m is None:
        return (s - t).pow(2).mean()
    d = zero_masked(s - zero_masked(t, m), m)
    per = math.prod(s.shape[m.dim() :])
    return d.pow(2).sum() / (m.sum() * per).clamp_min(1)


_CHK_SQH = C.checker(eps=C.positive, layer_reduction=C.choice("sum", "mean"))


@register_loss("squarehead", inputs="features", check=_CHK_SQH)
def squarehead(
    student_layers: Tensor | Sequence[Tensor],
    teacher_layers: Tensor | Sequence[Tensor],
    *,
    mask: Tensor | None = None,
    eps: float = 2**-7,
    layer_reduction: str = "sum",
) -> Tensor:
    """SquareHead: per-layer MSE normalized by the teacher's mean square, summed over layers.

    Paper: Kurtic et al., "Sparse Fine-tuning for Inference Acceleration of Large Language
    Models" (2023). Per layer over counted tokens ``ℓ_l = mean((f_S − f_T)²) /
    (mean(f_T²) + eps)``, eps = 2⁻⁷; ``L = Σ_l ℓ_l`` (``layer_reduction="sum"``, official) or
    the mean over layers. Inputs: lists of ``[B, T, D]`` block outputs; ``mask`` ``[B, T]``.
    """
    _CHK_SQH(eps=eps, layer_reduction=layer_reduction)
    ss, ts = _layers(student_layers, "squarehead"), _layers(teacher_layers, "squarehead")
    if len(ss) != len(ts):
        raise ValueError(f"squarehead: {len(ss)} student layers but {len(ts)} teacher layers")
    total: Tensor | None = None
    for fs, ft in zip(ss, ts):
        if fs.shape != ft.shape:
            raise ValueError(
                f"squarehead: layer shapes differ {tuple(fs.shape)} vs {tuple(ft.shape)}"
            )
        s, t = _pair(fs, ft)
        m = lead_mask(mask, s, ndim=s.dim() - 1)
        s, t = zero_masked(s, m), zero_masked(t, m)
        cnt = (m.sum() * s.shape[-1]).clamp_min(1)
        num = (s - t).pow(2).sum() / cnt
        den = t.pow(2).sum() / cnt + eps
        term = num / den
        total = term if total is None else total + term
    assert total is not None
    return total / len(ss) if layer_reduction == "mean" else total


_CHK_COS = C.checker(eps=C.positive)


def _norm(x: Tensor, dim: int = -1) -> Tensor:
    """Euclidean norm with a zero (not NaN) gradient at the zero vector."""
    sq = x.pow(2).sum(dim)
    pos = sq > 0
    return torch.where(pos, torch.sqrt(torch.where(pos, sq, torch.ones_like(sq))), 0.0)


@register_loss("cosine_embedding", inputs="features", check=_CHK_COS)
def cosine_embedding(
    student_emb: Tensor,
    teacher_emb: Tensor,
    *,
    mask: Tensor | None = None,
    projector: Callable[[Tensor], Tensor] | None = None,
    eps: float = 1e-8,
) -> Tensor:
    """Cosine embedding loss 1 − cos(e_S, e_T) over the last dim, mean over counted rows.

    ``ℓ_r = 1 − ⟨e_S, e_T⟩ / (max(‖e_S‖, eps)·max(‖e_T‖, eps))`` (= ``1 − F.cosine_similarity``),
    eps = 1e-8, optional student ``projector``; ``mask`` has the leading shape. Used e.g. by
    DistilBERT (Sanh et al., "DistilBERT, a distilled version of BERT", 2019).
    """
    _CHK_COS(eps=eps)
    m = lead_mask(mask, student_emb, ndim=student_emb.dim() - 1)
    student_emb = zero_masked(student_emb, m)
    r = projector(student_emb) if projector is not None else student_emb
    if r.shape != teacher_emb.shape:
        raise ValueError(
            f"cosine_embedding: student {tuple(r.shape)} and teacher {tuple(teacher_emb.shape)} "
            f"embeddings differ; add a projector"
        )
    s, t = _pair(r, teacher_emb)
    s, t = zero_masked(s, m), zero_masked(t, m)
    cos = (s * t).sum(-1) / (_norm(s).clamp_min(eps) * _norm(t).clamp_min(eps))
    rows = zero_masked(1 - cos, m)
    return rows.sum() / m.sum().clamp_min(1)


_CHK_AT = C.checker(mode=C.choice("code", "paper"), p=C.positive, eps=C.positive)


@register_loss("attention_transfer", inputs="features", check=_CHK_AT)
def attention_transfer(
    student_maps: Tensor | Sequence[Tensor],
    teacher_maps: Tensor | Sequence[Tensor],
    *,
    mask: Tensor | None = None,
    weights: Sequence[float] | None = None,
    mode: str = "code",
    p: float = 2,
    eps: float = 1e-12,
) -> Tensor:
    """Attention transfer: distance between l2-normalized spatial attention maps, per layer pair.

    Paper: Zagoruyko & Komodakis, "Paying More Attention to Attention: Improving the Performance
    of Convolutional Neural Networks via Attention Transfer", ICLR 2017. ``mode="code"``:
    ``a = normalize(mean_c |f|^p)``, ``L = Σ_j w_j mean_{b,hw}(a_S − a_T)²``; ``mode="paper"``:
    ``a = normalize(sum_c |f|^p)``, ``L = Σ_j w_j Σ_b ‖a_S,b − a_T,b‖₂ / B``. p = 2,
    eps = 1e-12, weights all 1. Maps ``[B, C, H, W]`` (C may differ); ``mask`` ``[B]``.
    """
    _CHK_AT(mode=mode, p=p, eps=eps)
    ss, ts = (
        _layers(student_maps, "attention_transfer"),
        _layers(teacher_maps, "attention_transfer"),
    )
    if len(ss) != len(ts):
        raise ValueError(f"attention_transfer: {len(ss)} student maps but {len(ts)} teacher maps")
    ws = [1.0] * len(ss) if weights is None else [float(w) for w in weights]
    if len(ws) != len(ss):
        raise ValueError(f"attention_transfer: {len(ws)} weights for {len(ss)} map pairs")
    total: Tensor | None = None
    for fs, ft, w in zip(ss, ts, ws):
        s, t = _pair(fs, ft)
        m = lead_mask(mask, s)
        s, t = zero_masked(s, m), zero_masked(t, m)

        def amap(f: Tensor) -> Tensor:
            a = f.abs().pow(p)
            a = (a.mean(1) if mode == "code" else a.sum(1)).flatten(1)
            return a / _norm(a).clamp_min(eps).unsqueeze(-1)

        a_s, a_t = amap(s), amap(t)
        if a_s.shape != a_t.shape:
            raise ValueError(
                f"attention_transfer: attention maps {tuple(a_s.shape)} and {tuple(a_t.shape)} "
                f"differ (batch and spatial sizes must match)"
            )
        d = a_s - a_t
        per = d.pow(2).mean(-1) if mode == "code" else _norm(d)
        term = w * zero_masked(per, m).sum() / m.sum().clamp_min(1)
        total = term if total is None else total + term
    assert total is not None
    return total


_CHK_TR = C.checker(mode=C.choice("mse", "kl"), temperature=C.positive, eps=C.positive)


@register_loss("token_relation", inputs="features", check=_CHK_TR)
def token_relation(
    student_hidden: Tensor,
    teacher_hidden: Tensor,
    *,
    mask: Tensor | None = None,
    mode: str = "mse",
    temperature: float = 1.0,
    eps: float = 1e-8,
) -> Tensor:
    """Token-level relation loss: match token-to-token cosine-similarity graphs (mentor-defined).

    Inspired by Zhang et al., "Knowledge Distillation via Token-level Relationship Graph"
    (2023). ``R = n̂ n̂ᵀ`` per sequence, ``n̂ = h / max(‖h‖, eps)``; valid pairs i ≠ j, both
    counted. ``mode="mse"``: mean over valid pairs of ``(R_S − R_T)²``; ``mode="kl"``: mean over
    tokens with a valid partner of ``KL(softmax_j(R_T[i]/τ) ‖ softmax_j(R_S[i]/τ))`` (no τ²).
    Defaults mode "mse", τ = 1, eps = 1e-8. Hidden ``[B, T, D_S]`` / ``[B, T, D_T]``; mask ``[B, T]``.
    """
    _CHK_TR(mode=mode, temperature=temperature, eps=eps)
    s, t = _pair(student_hidden, teacher_hidden)
    if s.dim() == 2:
        s, t = s.unsqueeze(0), t.unsqueeze(0)
        mask = None if mask is None else mask.unsqueeze(0)
    if s.shape[:2] != t.shape[:2]:
        raise ValueError(
            f"token_relation: student {tuple(s.shape)} and teacher {tuple(t.shape)} need the same "
            f"[B, T]"
        )
    m = lead_mask(mask, s, ndim=2)
    s, t = zero_masked(s, m), zero_masked(t, m)
    ns = s / _norm(s).clamp_min(eps).unsqueeze(-1)
    nt = t / _norm(t).clamp_min(eps).unsqueeze(-1)
    rs, rt = ns @ ns.transpose(1, 2), nt @ nt.transpose(1, 2)
    eye = torch.eye(s.shape[1], dtype=torch.bool, device=s.device)
    valid = m.unsqueeze(2) & m.unsqueeze(1) & ~eye
    zero = torch.zeros((), dtype=rs.dtype, device=rs.device)
    if mode == "mse":
        d = torch.where(valid, rs - rt, zero)
        return d.pow(2).sum() / valid.sum().clamp_min(1)
    ok = valid.any(-1)

    def logp(r: Tensor) -> Tensor:
        z = torch.where(valid, r / temperature, NEG_INF)
        return F.log_softmax(torch.where(ok.unsqueeze(-1), z, zero), -1)

    rows = torch.where(ok, kl_rows(logp(rt), logp(rs)), zero)
    return rows.sum() / ok.sum().clamp_min(1)


__all__ = [
    "attention_transfer",
    "cosine_embedding",
    "hint_mse",
    "lead_mask",
    "squarehead",
    "token_relation",
    "zero_masked",
]
