"""Logit distillation losses (formulas: /work/shared/METHODS-losses.md, docs/losses.md).

Every row-wise loss is declared once, as a :class:`~mentor.losses._rows.RowSpec` builder whose
keyword-only parameters are its hyperparameters (with their defaults) and whose docstring cites
the paper. :func:`logit_loss` registers the builder and generates from it the pure functional
form ``fn(student_logits, teacher, *, labels=None, mask=None, **hp, chunk_size=None)``, which can
also be evaluated chunk by chunk (``chunk_size=``) or fused with the output head
(:func:`mentor.losses.fused_linear_loss`). ``teacher`` is dense logits, a
:class:`~mentor.signals.TopK` or a :class:`~mentor.signals.Sampled` where the loss supports it
(see each docstring). ``sinkhorn`` and ``dist`` couple the rows of a batch and are plain
functions.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from mentor.losses import _checks as C
from mentor.losses._base import register_loss
from mentor.losses._reduce import counted_mask, upcast
from mentor.losses._rows import (
    NEG_INF,
    TAILS,
    RowSpec,
    entropy_rows,
    kl_rows,
    log_mix,
    pair_logprobs,
    run_rows,
    safe_logsumexp,
    standardize_rows,
)
from mentor.signals import Sampled

Builder = Callable[..., RowSpec]
Check = Callable[..., None]

# name -> (builder(**hp) -> RowSpec, check(**hp)); used by the functional forms and the fused path.
ROWWISE: dict[str, tuple[Builder, Check]] = {}

ALL_TEACHERS = frozenset({"dense", "topk", "sampled"})
DENSE = frozenset({"dense"})
DENSE_TOPK = frozenset({"dense", "topk"})

_common = {"temperature": C.positive, "tail": C.choice(*TAILS), "chunk_size": C.chunk}
_std = {"standardize": C.boolean, "standardize_eps": C.positive}

_KW = inspect.Parameter.KEYWORD_ONLY
_NO_TEACHER: Any = object()  # teacher_logits not passed (allowed for teacher_optional losses)


def _functional_signature(hp: list[inspect.Parameter], teacher_optional: bool) -> inspect.Signature:
    """``(student_logits, teacher_logits, *, labels=None, mask=None, **hp, chunk_size=None)``."""
    pos = inspect.Parameter.POSITIONAL_OR_KEYWORD
    teacher_default = None if teacher_optional else inspect.Parameter.empty
    return inspect.Signature(
        [
            inspect.Parameter("student_logits", pos, annotation="Tensor"),
            inspect.Parameter("teacher_logits", pos, annotation="Any", default=teacher_default),
            inspect.Parameter("labels", _KW, annotation="Tensor | None", default=None),
            inspect.Parameter("mask", _KW, annotation="Tensor | None", default=None),
            *hp,
            inspect.Parameter("chunk_size", _KW, annotation="int | None", default=None),
        ],
        return_annotation="Tensor",
    )


def logit_loss(
    name: str, *, check: Check, teacher_optional: bool = False
) -> Callable[[Builder], Callable[..., Tensor]]:
    """Register the row-wise logit loss ``name`` declared by a RowSpec builder.

    The builder is the loss's only declaration: its keyword-only parameters are the
    hyperparameters with their defaults, its docstring the loss's documentation (first line =
    registry description, then formula, defaults, paper title and year). The decorator stores
    ``(builder, check)`` in :data:`ROWWISE` (for the fused path) and returns the functional form
    ``name(student_logits, teacher_logits, *, labels=None, mask=None, **hp, chunk_size=None)``,
    registered with :func:`~mentor.losses.register_loss`. Its ``inspect.signature`` is the
    builder's hyperparameters inside that frame, so the registry derives the same defaults.
    ``check(**hp)`` validates hyperparameter values (``chunk_size`` included);
    ``teacher_optional`` lets callers omit the teacher (for losses that ignore it).
    """

    def deco(builder: Builder) -> Callable[..., Tensor]:
        hp_params = list(inspect.signature(builder).parameters.values())
        bad = [p.name for p in hp_params if p.kind is not _KW or p.default is p.empty]
        if bad:
            raise TypeError(
                f"builder of loss {name!r}: hyperparameters {bad} must be keyword-only with a "
                f"default"
            )
        defaults = {p.name: p.default for p in hp_params}

        def loss_fn(
            student_logits: Tensor,
            teacher_logits: Any = _NO_TEACHER,
            *,
            labels: Tensor | None = None,
            mask: Tensor | None = None,
            chunk_size: int | None = None,
            **hp: Any,
        ) -> Tensor:
            if teacher_logits is _NO_TEACHER:
                if not teacher_optional:
                    raise TypeError(
                        f"{name}() missing 1 required positional argument: 'teacher_logits'"
                    )
                teacher_logits = None
            unknown = sorted(hp.keys() - defaults.keys())
            if unknown:
                raise TypeError(f"{name}() got an unexpected keyword argument {unknown[0]!r}")
            hp = {**defaults, **hp}
            check(chunk_size=chunk_size, **hp)
            return run_rows(
                builder(**hp),
                student_logits,
                teacher_logits,
                labels,
                mask,
                chunk_size=chunk_size,
                temperature=hp.get("temperature", 1.0),
            )

        loss_fn.__name__ = loss_fn.__qualname__ = name
        loss_fn.__module__ = builder.__module__
        loss_fn.__doc__ = builder.__doc__
        sig = _functional_signature(hp_params, teacher_optional)
        loss_fn.__signature__ = sig  # type: ignore[attr-defined]
        ROWWISE[name] = (builder, check)
        return register_loss(name, check=check)(loss_fn)

    return deco


def _sampled_fkl_rows(s: Tensor, t: Sampled, temperature: float) -> Tensor:
    """Σ_i (c_i/n)(log q_i − log p_S,i) over the sampled ids (see docs: unbiased estimator)."""
    if abs(t.temperature - temperature) > 1e-12:
        raise ValueError(
            f"the Sampled teacher was drawn at temperature {t.temperature} but the loss uses "
            f"temperature {temperature}; draw with Sampled.from_logits(..., temperature="
            f"{temperature})"
        )
    lps = F.log_softmax(s / temperature, dim=-1)
    lps_i = lps.gather(-1, t.indices.clamp(0, s.shape[-1] - 1))
    c = t.counts.to(s.dtype)
    q = c / c.sum(-1, keepdim=True).clamp_min(1)
    drawn = c > 0
    zero = torch.zeros((), dtype=s.dtype, device=s.device)
    if t.logprobs is not None:
        ref = t.logprobs.to(s.dtype)
    else:
        ref = torch.log(torch.where(drawn, q, torch.ones_like(q)))
    return (q * torch.where(drawn, ref - lps_i, zero)).sum(-1)


class _DenseForwardKL(torch.autograd.Function):
    """Per-row KL(p_T^τ ‖ p_S^τ) for dense logits with a closed-form backward.

    The generic autograd graph keeps several ``[N, V]`` intermediates and spends extra passes on
    the temperature division and -inf masking; here the forward keeps two ``[N, V]`` tensors
    (log p_S, p_T) and the backward is ``(p_S − p_T)/τ`` for the student and
    ``p_T·(log p_T − log p_S − ℓ)/τ`` for a teacher that requires grad. Classes that are -inf
    in both rows contribute 0 (0·log 0 = 0).
    """

    @staticmethod
    def forward(ctx, s: Tensor, t: Tensor, temperature: float) -> Tensor:  # noqa: D102
        lps = F.log_softmax(s if temperature == 1 else s / temperature, dim=-1)
        lpt = F.log_softmax(t if temperature == 1 else t / temperature, dim=-1)
        prod = lpt - lps
        pt = lpt.exp_()  # lpt is not needed again on the student path
        prod.mul_(pt).nan_to_num_(nan=0.0)  # 0·(−inf) and 0·nan -> 0
        rows = prod.sum(-1)
        ctx.save_for_backward(lps, pt, rows)
        ctx.temperature = temperature
        return rows

    @staticmethod
    def backward(ctx, grad_rows: Tensor):  # noqa: D102
        lps, pt, rows = ctx.saved_tensors
        tau = ctx.temperature
        g = grad_rows.unsqueeze(-1) / tau
        grad_s = grad_t = None
        if ctx.needs_input_grad[0]:
            grad_s = lps.exp().sub_(pt).mul_(g)
        if ctx.needs_input_grad[1]:
            diff = (torch.log(pt) - lps - rows.unsqueeze(-1)).mul_(pt).nan_to_num_(nan=0.0)
            grad_t = diff.mul_(g)
        return grad_s, grad_t, None


# ---------------------------------------------------------------- closed-form dense rows
# Each part returns per-row values [R] and their gradient d rows_r / d s_r [R, V] for a dense
# teacher (no teacher gradient); _closed() weights and sums them (RowSpec.closed_form). Classes
# with zero probability contribute 0 (0·log 0 = 0), as in the autograd definitions.


def _lp(x: Tensor, temperature: float) -> Tensor:
    return F.log_softmax(x if temperature == 1 else x / temperature, dim=-1)


def _plogratio(p: Tensor, la: Tensor, lb: Tensor) -> Tensor:
    """``p·(la − lb)`` elementwise with 0 where ``p == 0``."""
    return torch.where(p > 0, (la - lb).mul_(p), 0.0)


def _fkl_part(temperature: float) -> Callable[..., tuple[Tensor, Tensor]]:
    def part(s: Tensor, t: Tensor, labels: Tensor | None) -> tuple[Tensor, Tensor]:
        lps, lpt = _lp(s, temperature), _lp(t, temperature)
        pt = lpt.exp()
        rows = _plogratio(pt, lpt, lps).sum(-1)
        return rows, lps.exp_().sub_(pt).div_(temperature)

    return part


def _rkl_part(temperature: float) -> Callable[..., tuple[Tensor, Tensor]]:
    def part(s: Tensor, t: Tensor, labels: Tensor | None) -> tuple[Tensor, Tensor]:
        lps, lpt = _lp(s, temperature), _lp(t, temperature)
        ps = lps.exp()
        d = _plogratio(ps, lps, lpt)
        rows = d.sum(-1)
        return rows, d.sub_(ps.mul_(rows.unsqueeze(-1))).div_(temperature)

    return part


def _jsd_part(beta: float, temperature: float) -> Callable[..., tuple[Tensor, Tensor]]:
    def part(s: Tensor, t: Tensor, labels: Tensor | None) -> tuple[Tensor, Tensor]:
        lps, lpt = _lp(s, temperature), _lp(t, temperature)
        lm = torch.logaddexp(lpt + math.log(beta), lps + math.log1p(-beta))
        ps, pt = lps.exp(), lpt.exp()
        kt = _plogratio(pt, lpt, lm).sum(-1)
        ds = _plogratio(ps, lps, lm)
        ks = ds.sum(-1)
        grad = ds.sub_(ps.mul_(ks.unsqueeze(-1))).mul_((1 - beta) / temperature)
        return beta * kt + (1 - beta) * ks, grad

    return part


def _ce_part(s: Tensor, t: Tensor, labels: Tensor | None) -> tuple[Tensor, Tensor]:
    assert labels is not None
    y = labels.clamp_min(0).unsqueeze(-1)
    lps = F.log_softmax(s, dim=-1)
    rows = -lps.gather(-1, y).squeeze(-1)
    grad = lps.exp_().scatter_add_(-1, y, torch.full_like(y, -1, dtype=lps.dtype))
    return rows, grad


def _closed(*parts: tuple[Callable[..., tuple[Tensor, Tensor]], float, int]) -> Callable:
    """``RowSpec.closed_form`` from (part, coefficient, weight column) triples."""

    def fn(s: Tensor, t: Tensor, labels: Tensor | None, w: Tensor) -> tuple[Tensor, Tensor]:
        total, grad = torch.zeros((), dtype=w.dtype, device=w.device), None
        for part, coef, col in parts:
            rows, g = part(s, t, labels)
            wj = w[:, col] * coef
            total = total + (rows * wj).sum()
            g = g.mul_(wj.unsqueeze(-1))
            grad = g if grad is None else grad.add_(g)
        return total, grad

    return fn


def _fkl_rows(
    s: Tensor, t: Any, temperature: float, standardize: bool, eps: float, tail: str, name: str
) -> Tensor:
    if isinstance(t, Sampled):
        return _sampled_fkl_rows(s, t, temperature)
    if isinstance(t, Tensor) and not standardize:
        return _DenseForwardKL.apply(s, t, temperature)
    if standardize:
        s, t = standardize_rows(s, eps), standardize_rows(t, eps)
    lp_s, lp_t = pair_logprobs(s, t, temperature, tail, name=name)
    return kl_rows(lp_t, lp_s)


def _ce_rows(s: Tensor, labels: Tensor) -> Tensor:
    y = labels.clamp_min(0).unsqueeze(-1)
    return -F.log_softmax(s, dim=-1).gather(-1, y).squeeze(-1)


def _no_renorm(name: str, tail: str, why: str = "an infinite reverse KL") -> None:
    if tail == "renormalize":
        raise ValueError(
            f"loss {name!r} with tail='renormalize' gives {why} (the teacher has no mass outside "
            f"its top-k); use tail='tail_bucket'"
        )


# ----------------------------------------------------------------------------------- kd


@logit_loss("kd", check=C.checker(alpha=C.unit, **_common, **_std))
def kd(
    *,
    temperature: float = 4.0,
    alpha: float = 0.0,
    standardize: bool = False,
    standardize_eps: float = 1e-7,
    tail: str = "tail_bucket",
) -> RowSpec:
    """Hinton KD: (1-alpha)·tau²·KL(p_T^tau ‖ p_S^tau) + alpha·CE, mean over counted positions.

    Paper: Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network" (2015).
    ``L = (1−α)·τ²·(1/n) Σ_r KL(p_T^τ‖p_S^τ) + α·CE(z_S, y)`` (CE at τ = 1, never
    standardized). Defaults τ = 4, α = 0 (pure soft term, no labels). With α > 0 rows whose
    label is −100 are dropped from both terms. ``standardize=True``: logit standardization
    (Sun et al., CVPR 2024) before ÷τ. Teacher: dense, TopK (``tail``) or Sampled (unbiased
    soft-term estimator; drawn at the same temperature).
    """
    tau2 = temperature**2

    def rows(s: Tensor, t: Any, labels: Tensor | None) -> Tensor:
        soft = tau2 * _fkl_rows(s, t, temperature, standardize, standardize_eps, tail, "kd")
        if alpha > 0:
            return torch.stack([(1 - alpha) * soft, alpha * _ce_rows(s, labels)], -1)
        return soft

    closed = None
    if not standardize:
        soft = (_fkl_part(temperature), (1 - alpha) * tau2, 0)
        closed = _closed(soft, (_ce_part, alpha, 1)) if alpha > 0 else _closed(soft)
    return RowSpec(
        "kd",
        rows,
        label_flags=(True, True) if alpha > 0 else (False,),
        teachers=DENSE if standardize else ALL_TEACHERS,
        needs_labels=alpha > 0,
        closed_form=closed,
        topk_cells=not standardize and alpha == 0,
    )


# --------------------------------------------------------------------- forward / reverse KL


@logit_loss("forward_kl", check=C.checker(**_common, **_std))
def forward_kl(
    *,
    temperature: float = 1.0,
    standardize: bool = False,
    standardize_eps: float = 1e-7,
    tail: str = "tail_bucket",
) -> RowSpec:
    """Forward KL(p_T^tau ‖ p_S^tau) (mean-seeking), mean over counted positions; no tau².

    ``L = (1/n) Σ_r Σ_c p_T^τ (log p_T^τ − log p_S^τ)``; default τ = 1. As GKD/TRL's
    ``generalized_jsd_loss`` with beta = 0 (Agarwal et al., "On-Policy Distillation of Language
    Models", ICLR 2024). Teacher: dense, TopK (``tail``) or Sampled (unbiased estimator).
    ``standardize`` as in Sun et al., "Logit Standardization in Knowledge Distillation" (2024).
    """

    def rows(s: Tensor, t: Any, labels: Tensor | None) -> Tensor:
        return _fkl_rows(s, t, temperature, standardize, standardize_eps, tail, "forward_kl")

    return RowSpec(
        "forward_kl",
        rows,
        teachers=DENSE if standardize else ALL_TEACHERS,
        closed_form=None if standardize else _closed((_fkl_part(temperature), 1.0, 0)),
        topk_cells=not standardize,
    )


@logit_loss("reverse_kl", check=C.checker(**_common))
def reverse_kl(*, temperature: float = 1.0, tail: str = "tail_bucket") -> RowSpec:
    """Reverse KL(p_S^tau ‖ p_T^tau) (mode-seeking), mean over counted positions; no tau².

    ``L = (1/n) Σ_r Σ_c p_S^τ (log p_S^τ − log p_T^τ)``; default τ = 1. As in MiniLLM (Gu et
    al., "MiniLLM: Knowledge Distillation of Large Language Models", ICLR 2024) and GKD beta = 1.
    Teacher: dense or TopK (``tail="tail_bucket"`` only).
    """
    _no_renorm("reverse_kl", tail)

    def rows(s: Tensor, t: Any, labels: Tensor | None) -> Tensor:
        lp_s, lp_t = pair_logprobs(s, t, temperature, tail, name="reverse_kl")
        return kl_rows(lp_s, lp_t)

    return RowSpec(
        "reverse_kl",
        rows,
        teachers=DENSE_TOPK,
        closed_form=_closed((_rkl_part(temperature), 1.0, 0)),
        topk_cells=True,
    )


# ------------------------------------------------------------------------------------ jsd


@logit_loss("jsd", check=C.checker(beta=C.unit, **_common))
def jsd(*, beta: float = 0.5, temperature: float = 1.0, tail: str = "tail_bucket") -> RowSpec:
    """Generalized Jensen–Shannon divergence of GKD (beta=0 forward KL, beta=1 reverse KL).

    Paper: Agarwal et al., "On-Policy Distillation of Language Models: Learning from
    Self-Generated Mistakes" (GKD), ICLR 2024. ``M = β p_T^τ + (1−β) p_S^τ``,
    ``ℓ_r = β KL(p_T^τ‖M) + (1−β) KL(p_S^τ‖M)``, mean over counted positions; no τ².
    Defaults β = 0.5, τ = 1. Teacher: dense or TopK.
    """
    if beta == 1:
        _no_renorm("jsd", tail, "an infinite KL at beta=1")

    def rows(s: Tensor, t: Any, labels: Tensor | None) -> Tensor:
        lp_s, lp_t = pair_logprobs(s, t, temperature, tail, name="jsd")
        if beta == 0:
            return kl_rows(lp_t, lp_s)
        if beta == 1:
            return kl_rows(lp_s, lp_t)
        lm = log_mix(lp_t, lp_s, beta, 1 - beta)
        return beta * kl_rows(lp_t, lm) + (1 - beta) * kl_rows(lp_s, lm)

    if beta == 0:
        part = _fkl_part(temperature)
    elif beta == 1:
        part = _rkl_part(temperature)
    else:
        part = _jsd_part(beta, temperature)
    return RowSpec(
        "jsd", rows, teachers=DENSE_TOPK, closed_form=_closed((part, 1.0, 0)), topk_cells=True
    )


# ------------------------------------------------------------------------------------ tvd


@logit_loss("tvd", check=C.checker(**_common))
def tvd(*, temperature: float = 1.0, tail: str = "tail_bucket") -> RowSpec:
    """Total variation distance ½ Σ_c |p_T^tau − p_S^tau| (in [0, 1]), mean over counted rows.

    As in DistiLLM's ``tv_distance`` (Ko et al., "DistiLLM: Towards Streamlined Distillation for
    Large Language Models", ICML 2024) and TAID's ``tvd``. Default τ = 1; no τ². Teacher: dense
    or TopK.
    """

    def rows(s: Tensor, t: Any, labels: Tensor | None) -> Tensor:
        lp_s, lp_t = pair_logprobs(s, t, temperature, tail, name="tvd")
        return 0.5 * (lp_t.exp() - lp_s.exp()).abs().sum(-1)

    return RowSpec("tvd", rows, teachers=DENSE_TOPK, topk_cells=True)


# ------------------------------------------------------------------------------- skew KL


@logit_loss("skew_kl", check=C.checker(alpha=C.unit, **_common))
def skew_kl(*, alpha: float = 0.1, temperature: float = 1.0, tail: str = "tail_bucket") -> RowSpec:
    """Skew forward KL(p_T ‖ alpha·p_T + (1−alpha)·p_S) of DistiLLM, mean over counted rows.

    Paper: Ko et al., "DistiLLM: Towards Streamlined Distillation for Large Language Models",
    ICML 2024. All distributions at τ; α = 0.1, τ = 1; no τ². α = 0 gives forward KL, α = 1
    gives 0. True KL (DistiLLM's code returns the cross-entropy form). Teacher: dense or TopK.
    """

    def rows(s: Tensor, t: Any, labels: Tensor | None) -> Tensor:
        lp_s, lp_t = pair_logprobs(s, t, temperature, tail, name="skew_kl")
        return kl_rows(lp_t, log_mix(lp_t, lp_s, alpha, 1 - alpha))

    return RowSpec("skew_kl", rows, teachers=DENSE_TOPK, topk_cells=True)


@logit_loss("skew_reverse_kl", check=C.checker(alpha=C.unit, **_common))
def skew_reverse_kl(
    *, alpha: float = 0.1, temperature: float = 1.0, tail: str = "tail_bucket"
) -> RowSpec:
    """Skew reverse KL(p_S ‖ alpha·p_S + (1−alpha)·p_T) of DistiLLM, mean over counted rows.

    Paper: Ko et al., "DistiLLM: Towards Streamlined Distillation for Large Language Models",
    ICML 2024. All distributions at τ; α = 0.1, τ = 1; no τ². α = 0 gives reverse KL, α = 1
    gives 0. Teacher: dense or TopK.
    """

    def rows(s: Tensor, t: Any, labels: Tensor | None) -> Tensor:
        lp_s, lp_t = pair_logprobs(s, t, temperature, tail, name="skew_reverse_kl")
        return kl_rows(lp_s, log_mix(lp_s, lp_t, alpha, 1 - alpha))

    return RowSpec("skew_reverse_kl", rows, teachers=DENSE_TOPK, topk_cells=True)


# ------------------------------------------------------------------------------------ dkd


@logit_loss(
    "dkd",
    check=C.checker(
        alpha=C.non_negative,
        beta=C.non_negative,
        temperature=C.positive,
        chunk_size=C.chunk,
        **_std,
    ),
)
def dkd(
    *,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: float = 4.0,
    standardize: bool = False,
    standardize_eps: float = 1e-7,
) -> RowSpec:
    """Decoupled KD: tau²·(alpha·TCKD + beta·NCKD), target/non-target split (labels required).

    Paper: Zhao et al., "Decoupled Knowledge Distillation", CVPR 2022. ``b^τ = (p_y, 1 − p_y)``,
    ``p̂^τ = softmax_{c≠y}(z_c/τ)``; ``TCKD = KL(b_T‖b_S)``, ``NCKD = KL(p̂_T‖p̂_S)``;
    ``L = τ² (1/n) Σ_r (α TCKD + β NCKD)``. Defaults α = 1, β = 8, τ = 4. Identity:
    ``KL(p_T‖p_S) = TCKD + (1 − p_T,y) NCKD``. Dense teacher only (needs the target's and every
    non-target class's teacher probability).
    """
    tau2 = temperature**2

    def rows(s: Tensor, t: Tensor, labels: Tensor | None) -> Tensor:
        if s.shape[-1] < 2:
            raise ValueError("loss 'dkd' needs at least 2 classes")
        if standardize:
            s, t = standardize_rows(s, standardize_eps), standardize_rows(t, standardize_eps)
        zs, zt = s / temperature, t / temperature
        y = labels.clamp_min(0).unsqueeze(-1)
        onehot = torch.zeros_like(zs, dtype=torch.bool).scatter_(-1, y, True)
        lps, lpt = F.log_softmax(zs, -1), F.log_softmax(zt, -1)

        def binary(lp: Tensor) -> Tensor:
            rest = safe_logsumexp(lp.masked_fill(onehot, NEG_INF), -1)
            return torch.stack([lp.gather(-1, y).squeeze(-1), rest], -1)

        tckd = kl_rows(binary(lpt), binary(lps))
        nckd = kl_rows(
            F.log_softmax(zt.masked_fill(onehot, NEG_INF), -1),
            F.log_softmax(zs.masked_fill(onehot, NEG_INF), -1),
        )
        return tau2 * (alpha * tckd + beta * nckd)

    return RowSpec("dkd", rows, label_flags=(True,), teachers=DENSE, needs_labels=True)


# ----------------------------------------------------------------------------------- taid


@logit_loss("taid", check=C.checker(t=C.optional_unit, **_common))
def taid(*, t: float | None = None, temperature: float = 1.0, tail: str = "tail_bucket") -> RowSpec:
    """TAID: KL(p_t ‖ p_S) toward an interpolated, detached target p_t (t required in [0,1]).

    Paper: Shing et al., "TAID: Temporally Adaptive Interpolated Distillation for Efficient
    Knowledge Transfer in Language Models", ICLR 2025.
    ``p_t = softmax(((1−t)·sg(z_S) + t·z_T)/τ)``, ``L(t) = (1/n) Σ_r KL(p_t‖p_S^τ)``; the whole
    target p_t is detached, so the gradient is that of −Σ p_t log p_S^τ. τ = 1; no τ². t = 1 →
    forward_kl, t = 0 → 0. Schedule t with :class:`mentor.losses.TAIDScheduler` (an Objective
    does this itself). Teacher: dense or TopK (interpolation on the k+1-bucket log-probs).
    """
    if t is None:
        raise ValueError(
            "loss 'taid' needs the interpolation parameter t in [0, 1] (pass t=...; inside an "
            "Objective a TAIDScheduler supplies it)"
        )
    t = float(t)

    def rows(s: Tensor, tt: Any, labels: Tensor | None) -> Tensor:
        lp_s, lp_t = pair_logprobs(s, tt, temperature, tail, name="taid")
        ls = lp_s.detach()
        mix = ls if t == 0 else lp_t if t == 1 else (1 - t) * ls + t * lp_t
        target = F.log_softmax(mix, -1).detach()
        return kl_rows(target, lp_s)

    return RowSpec("taid", rows, teachers=DENSE_TOPK, topk_cells=True)


# ---------------------------------------------------------------------------------- bd_kd


@logit_loss("bd_kd", check=C.checker(boost=C.positive, **_common))
def bd_kd(*, temperature: float = 1.0, boost: float = 2.0, tail: str = "tail_bucket") -> RowSpec:
    """BD-KD: entropy-gated weighting of forward and reverse KL, ×tau² (reconstruction).

    Paper: Amara et al., "BD-KD: Balancing the Divergences for Online Knowledge Distillation"
    (arXiv 2212.12965, 2022). ``ℓ_r = τ²(w_f KL(p_T‖p_S) + w_r KL(p_S‖p_T))`` at τ; with detached
    entropies, ``H(p_S) > H(p_T)`` → ``(w_f, w_r) = (1, boost)`` else ``(boost, 1)``. Defaults
    τ = 1, boost = 2. ⚠ Reconstructed from the abstract (no official code). Teacher: dense or
    TopK (``tail_bucket``).
    """
    _no_renorm("bd_kd", tail)
    tau2 = temperature**2

    def rows(s: Tensor, t: Any, labels: Tensor | None) -> Tensor:
        lp_s, lp_t = pair_logprobs(s, t, temperature, tail, name="bd_kd")
        fkl, rkl = kl_rows(lp_t, lp_s), kl_rows(lp_s, lp_t)
        less_confident = entropy_rows(lp_s.detach()) > entropy_rows(lp_t.detach())
        one = torch.ones_like(fkl)
        w_f = torch.where(less_confident, one, boost * one)
        w_r = torch.where(less_confident, boost * one, one)
        return tau2 * (w_f * fkl + w_r * rkl)

    return RowSpec("bd_kd", rows, teachers=DENSE_TOPK, topk_cells=True)


# ------------------------------------------------------------------------------------ pld


@logit_loss("pld", check=C.checker(temperature=C.positive, chunk_size=C.chunk))
def pld(*, temperature: float = 1.0) -> RowSpec:
    """Plackett–Luce distillation: teacher-weighted list-wise ranking loss (labels required).

    Paper: Bassam, Zhu, Bian, "PLD: A Choice-Theoretic List-Wise Knowledge Distillation" (2025,
    arXiv 2506.12542). ``π = [y] + others by descending z_T``; ``α_k = softmax(z_T/τ)[π_k]``;
    ``ℓ_r = Σ_k α_k (logsumexp_{j≥k} z_S[π_j] − z_S[π_k])``, mean over counted rows. Student not
    tempered; τ = 1 only softens the teacher weights. Not 0 at S = T. Dense teacher only.
    """

    def rows(s: Tensor, t: Tensor, labels: Tensor | None) -> Tensor:
        y = labels.clamp_min(0).unsqueeze(-1)
        key = (-t).scatter(-1, y, NEG_INF)  # target first, then descending teacher logit
        order = torch.sort(key, dim=-1, stable=True).indices
        w = F.softmax(t / temperature, -1).gather(-1, order)
        zs = s.gather(-1, order)
        suffix = torch.logcumsumexp(zs.flip(-1), -1).flip(-1)
        return (w * (suffix - zs)).sum(-1)

    return RowSpec("pld", rows, label_flags=(True,), teachers=DENSE, needs_labels=True)


# ------------------------------------------------------------------------------------- ce


@logit_loss("ce", check=C.checker(chunk_size=C.chunk), teacher_optional=True)
def ce() -> RowSpec:
    """Hard-label cross entropy on the student logits (the teacher is ignored).

    ``L = −(1/n) Σ_r log softmax(z_S)_y`` over counted rows with y ≠ −100; no temperature.
    Equals ``F.cross_entropy(..., ignore_index=-100)``. Any teacher kind (or None) is accepted.
    The hard-label term of Hinton et al., "Distilling the Knowledge in a Neural Network" (2015).
    """

    def rows(s: Tensor, t: Any, labels: Tensor | None) -> Tensor:
        return _ce_rows(s, labels)

    return RowSpec(
        "ce", rows, label_flags=(True,), teachers=ALL_TEACHERS, needs_labels=True,
        uses_teacher=False, closed_form=_closed((_ce_part, 1.0, 0)),
    )  # fmt: skip


# ------------------------------------------------------------------------------ logit_mse


@logit_loss("logit_mse", check=C.checker(chunk_size=C.chunk))
def logit_mse() -> RowSpec:
    """Squared error between raw logits, Σ_c (z_S − z_T)², mean over counted rows.

    Paper: Kim et al., "Comparing Kullback-Leibler Divergence and Mean Squared Error Loss in
    Knowledge Distillation", IJCAI 2021. No temperature (``F.mse_loss`` = this / C). Dense
    teacher only (needs raw teacher logits).
    """

    def rows(s: Tensor, t: Tensor, labels: Tensor | None) -> Tensor:
        return (s - t).pow(2).sum(-1)

    return RowSpec("logit_mse", rows, teachers=DENSE)


# ---------------------------------------------------------------------- batch-coupled ones


def _dense_rows(name: str, student: Tensor, teacher: Any, labels, mask) -> tuple[Tensor, Tensor]:
    """Counted rows ``[n, C]`` of student and teacher (upcast) for losses coupling rows."""
    if not isinstance(teacher, Tensor):
        raise ValueError(
            f"loss {name!r} needs dense teacher logits (it compares whole distributions across "
            f"rows); a {type(teacher).__name__} teacher is not supported"
        )
    if teacher.shape != student.shape:
        raise ValueError(
            f"loss {name!r}: teacher {tuple(teacher.shape)} and student {tuple(student.shape)} "
            f"logits must have the same shape"
        )
    m = counted_mask(student, labels, mask).reshape(-1)
    c = student.shape[-1]
    s, t = upcast(student).reshape(-1, c), upcast(teacher).reshape(-1, c)
    dt = torch.promote_types(s.dtype, t.dtype)
    return s[m].to(dt), t[m].to(dt)


_CHK_SINK = C.checker(
    temperature=C.positive,
    epsilon=C.positive,
    n_iters=C.positive_int,
    reduction=C.choice("batchmean", "sum"),
)


@register_loss("sinkhorn", check=_CHK_SINK)
def sinkhorn(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    labels: Tensor | None = None,
    mask: Tensor | None = None,
    temperature: float = 2.0,
    epsilon: float = 0.1,
    n_iters: int = 20,
    reduction: str = "batchmean",
) -> Tensor:
    """SinKD: entropic Sinkhorn distance between the batch's student and teacher distributions.

    Paper: Cui et al., "SinKD: Sinkhorn Distance Minimization for Knowledge Distillation"
    (COLING 2024). Over the n counted rows: ``W_ij = ‖P_S,i − P_T,j‖₁`` with ``P = softmax(z/τ)``;
    ``K = exp(−W/ε)`` normalised ``n_iters`` times by rows then columns (log domain);
    ``L = Σ_ij K_ij W_ij / n`` (``reduction="sum"`` omits /n). Defaults τ = 2, ε = 0.1,
    20 iterations; nothing detached; not 0 at S = T. Dense teacher only; no chunking.
    """
    _CHK_SINK(temperature=temperature, epsilon=epsilon, n_iters=n_iters, reduction=reduction)
    s, t = _dense_rows("sinkhorn", student_logits, teacher_logits, labels, mask)
    n = s.shape[0]
    if n == 0:
        return s.sum()
    ps, pt = F.softmax(s / temperature, -1), F.softmax(t / temperature, -1)
    w = (
        (ps.unsqueeze(1) - pt.unsqueeze(0)).abs().sum(-1)
        if n * n * s.shape[1] <= 2**24
        else (torch.cdist(ps, pt, p=1))
    )
    logk = -w / epsilon
    for _ in range(n_iters):
        logk = logk - torch.logsumexp(logk, dim=1, keepdim=True)
        logk = logk - torch.logsumexp(logk, dim=0, keepdim=True)
    total = (logk.exp() * w).sum()
    return total / n if reduction == "batchmean" else total


_CHK_DIST = C.checker(
    beta=C.non_negative, gamma=C.non_negative, temperature=C.positive, eps=C.positive
)


def _pearson(a: Tensor, b: Tensor, dim: int, eps: float) -> Tensor:
    a = a - a.mean(dim, keepdim=True)
    b = b - b.mean(dim, keepdim=True)
    na = torch.linalg.vector_norm(a, dim=dim).clamp_min(eps)
    nb = torch.linalg.vector_norm(b, dim=dim).clamp_min(eps)
    return (a * b).sum(dim) / (na * nb)


@register_loss("dist", check=_CHK_DIST)
def dist(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    labels: Tensor | None = None,
    mask: Tensor | None = None,
    beta: float = 1.0,
    gamma: float = 1.0,
    temperature: float = 1.0,
    eps: float = 1e-8,
) -> Tensor:
    """DIST: inter-class (per row) and intra-class (per column) Pearson relation losses, ×tau².

    Paper: Huang et al., "Knowledge Distillation from A Stronger Teacher", NeurIPS 2022.
    ``Y = softmax(z/τ)`` over the n counted rows; ``inter = 1 − mean_r ρ(Y_S[r], Y_T[r])``,
    ``intra = 1 − mean_c ρ(Y_S[:, c], Y_T[:, c])`` (norms clamped at eps);
    ``L = τ²(β inter + γ intra)``. Defaults β = γ = 1, τ = 1, eps = 1e-8. Needs ≥ 2 counted rows.
    Dense teacher only; no chunking.
    """
    _CHK_DIST(beta=beta, gamma=gamma, temperature=temperature, eps=eps)
    s, t = _dense_rows("dist", student_logits, teacher_logits, labels, mask)
    if s.shape[0] == 0:
        return s.sum()
    ys, yt = F.softmax(s / temperature, -1), F.softmax(t / temperature, -1)
    inter = 1 - _pearson(ys, yt, 1, eps).mean()
    intra = 1 - _pearson(ys, yt, 0, eps).mean()
    return temperature**2 * (beta * inter + gamma * intra)


__all__ = [
    "bd_kd",
    "ce",
    "dist",
    "dkd",
    "forward_kl",
    "jsd",
    "kd",
    "logit_mse",
    "pld",
    "reverse_kl",
    "sinkhorn",
    "skew_kl",
    "skew_reverse_kl",
    "taid",
    "tvd",
]
