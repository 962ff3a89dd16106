"""Row-wise evaluation of logit losses: plain, chunked and fused with the output head.

A row-wise logit loss is described by a :class:`RowSpec`: a function mapping one chunk of
student logit rows ``[R, V]`` (already upcast, masked rows replaced by zeros), the matching
teacher rows (dense ``[R, V]``, :class:`~mentor.signals.TopK` or :class:`~mentor.signals.Sampled`)
and labels ``[R]`` to per-row values ``[R, J]`` (``J`` components, e.g. kd's soft and hard
terms). Each component is averaged over its own counted rows ("batchmean over counted
positions"). Three evaluators share the spec:

* plain — the whole ``[N, V]`` at once through ordinary autograd;
* chunked — :class:`_ChunkedRows`, a custom autograd function that evaluates ``chunk_size`` rows
  at a time and computes their gradient immediately (only one chunk's intermediates are alive);
* fused — :class:`_FusedLinearRows`, which also computes the logits of each chunk from hidden
  states and the output-head weight, so the full ``[N, V]`` student logits never exist.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from mentor.losses._reduce import counted_mask
from mentor.signals import HeadLogits, Sampled, TopK

NEG_INF = float("-inf")
TAILS = ("tail_bucket", "renormalize")

RowsFn = Callable[[Tensor, Any, "Tensor | None"], Tensor]
# (student rows [R, V], dense teacher rows [R, V], labels [R] | None, weights [R, J]) ->
# (Σ_r Σ_j w[r, j]·rows[r, j], its gradient with respect to the student rows [R, V]).
ClosedFormFn = Callable[[Tensor, Tensor, "Tensor | None", Tensor], "tuple[Tensor, Tensor]"]

# Rows per chunk of the closed-form path: about this many elements of [R, V] at a time.
CLOSED_FORM_ELEMS = 1 << 20


@dataclass
class RowSpec:
    """How to compute one row-wise logit loss (see module docstring)."""

    name: str
    rows: RowsFn
    label_flags: tuple[bool, ...] = (False,)  # per component: also drop rows with label -100
    teachers: frozenset[str] = field(default_factory=lambda: frozenset({"dense"}))
    needs_labels: bool = False
    uses_teacher: bool = True
    # Optional closed-form value + student gradient for a dense teacher that needs no gradient:
    # used by every evaluator instead of autograd (fewer passes over [R, V], nothing saved).
    closed_form: ClosedFormFn | None = None
    # True when ``rows`` sees the student only through ``pair_logprobs`` (its k+1 cell
    # log-probs under a TopK teacher): the gradient over V then follows from the cells' one.
    topk_cells: bool = False


# ----------------------------------------------------------------------------- numerics


def half_to_float_dtype(dt: torch.dtype) -> torch.dtype:
    """float16/bfloat16 -> float32; other dtypes unchanged."""
    return torch.float32 if dt in (torch.float16, torch.bfloat16) else dt


def safe_logsumexp(x: Tensor, dim: int = -1) -> Tensor:
    """logsumexp that returns -inf for all -inf slices with finite (zero) gradients."""
    mx = x.detach().amax(dim=dim, keepdim=True)
    mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
    s = torch.exp(x - mx).sum(dim=dim, keepdim=True)
    pos = s > 0
    out = torch.where(pos, torch.log(torch.where(pos, s, torch.ones_like(s))) + mx, NEG_INF)
    return out.squeeze(dim)


def log_mix(la: Tensor, lb: Tensor, wa: float, wb: float) -> Tensor:
    """log(wa·e^la + wb·e^lb) elementwise, -inf safe (both -inf -> -inf, finite gradients)."""
    mx = torch.maximum(la, lb).detach()
    mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
    s = wa * torch.exp(la - mx) + wb * torch.exp(lb - mx)
    pos = s > 0
    return torch.where(pos, torch.log(torch.where(pos, s, torch.ones_like(s))) + mx, NEG_INF)


def kl_rows(lp: Tensor, lq: Tensor) -> Tensor:
    """Σ_c p (log p − log q) over the last dim from log-probs, with 0·log 0 = 0 (-inf safe)."""
    p = lp.exp()
    diff = torch.where(p > 0, lp - lq, torch.zeros((), dtype=lp.dtype, device=lp.device))
    return (p * diff).sum(-1)


def entropy_rows(lp: Tensor) -> Tensor:
    """H(p) = −Σ p log p over the last dim from log-probs (-inf safe)."""
    p = lp.exp()
    return -(p * torch.where(p > 0, lp, torch.zeros((), dtype=lp.dtype, device=lp.device))).sum(-1)


def standardize_rows(z: Tensor, eps: float) -> Tensor:
    """(z − mean_c z) / (std_c z + eps), unbiased std; constant rows map to 0 (finite grads)."""
    mean = z.mean(-1, keepdim=True)
    var = z.var(-1, keepdim=True, correction=1)
    pos = var > 0
    std = torch.where(pos, torch.sqrt(torch.where(pos, var, torch.ones_like(var))), 0.0)
    return (z - mean) / (std + eps)


def teacher_kind(teacher: Any) -> str:
    """'dense', 'topk', 'sampled' or 'head' (raises for anything else)."""
    if isinstance(teacher, HeadLogits):
        return "head"
    if isinstance(teacher, TopK):
        return "topk"
    if isinstance(teacher, Sampled):
        return "sampled"
    if isinstance(teacher, Tensor):
        return "dense"
    raise TypeError(
        f"teacher must be a logits tensor, mentor.signals.TopK or Sampled, got {type(teacher)!r}"
    )


def pair_logprobs(
    s: Tensor, t: Any, temperature: float, tail: str, *, name: str
) -> tuple[Tensor, Tensor]:
    """Student and teacher log-probs at ``temperature`` on a common support.

    Dense teacher: ``log_softmax(z/τ)`` over the ``V`` classes. :class:`TopK` teacher: the
    support is the ``k`` kept classes plus one *rest* bucket. The student's bucket holds its
    exact remaining mass at τ; the teacher's kept log-probs are divided by τ and renormalised
    with the bucket ``tail/τ`` (``tail="tail_bucket"``, the tail treated as one pseudo-class,
    exact at τ = 1) or without it (``tail="renormalize"``: teacher mass 0 in the bucket).
    """
    lps = F.log_softmax(s / temperature, dim=-1)
    if isinstance(t, Tensor):
        return lps, F.log_softmax(t / temperature, dim=-1)
    if isinstance(t, Sampled):
        raise ValueError(
            f"loss {name!r} does not support a Sampled teacher (only kd and forward_kl have an "
            f"unbiased sampled estimator); pass dense logits or a TopK teacher"
        )
    idx = t.indices.clamp(0, s.shape[-1] - 1)
    lps_k = lps.gather(-1, idx)
    rest = safe_logsumexp(lps.scatter(-1, idx, NEG_INF), dim=-1)
    lp_s = torch.cat([lps_k, rest.unsqueeze(-1)], dim=-1)
    lpk = t.logprobs.to(s.dtype)
    if tail == "tail_bucket":
        lp_t = F.log_softmax(
            torch.cat([lpk, t.tail.to(s.dtype).unsqueeze(-1)], -1) / temperature, -1
        )
    elif tail == "renormalize":
        bucket = torch.full_like(lpk[..., :1], NEG_INF)
        lp_t = F.log_softmax(torch.cat([lpk / temperature, bucket], -1), -1)
    else:
        raise ValueError(f"tail must be one of {TAILS}, got {tail!r}")
    return lp_s, lp_t


# ----------------------------------------------------------------------------- plumbing


def _flat_teacher(teacher: Any, n: int, v: int) -> tuple[str, list[Tensor | None]]:
    kind = teacher_kind(teacher)
    if kind == "dense":
        return kind, [teacher.reshape(n, v)]
    t = teacher.reshape(n)
    if kind == "topk":
        return kind, [t.indices, t.logprobs, t.tail]
    return kind, [t.indices, t.counts, t.logprobs]


def _rebuild(kind: str, xs: Sequence[Tensor | None], temperature: float) -> Any:
    if kind == "dense":
        return xs[0]
    if kind == "topk":
        return TopK(xs[0], xs[1], xs[2])  # type: ignore[arg-type]
    return Sampled(xs[0], xs[1], xs[2], temperature)  # type: ignore[arg-type]


def _sanitize_teacher(kind: str, xs: Sequence[Tensor | None], m: Tensor, dt: torch.dtype) -> list:
    """Upcast floating teacher tensors and zero masked rows (so they stay finite)."""
    out: list[Tensor | None] = []
    for x in xs:
        if x is None or not x.is_floating_point():
            out.append(x)
            continue
        mm = m.view(-1, *([1] * (x.dim() - 1)))
        out.append(torch.where(mm, x.to(dt), torch.zeros((), dtype=dt, device=x.device)))
    return out


def rows_sum(
    spec: RowSpec,
    s: Tensor,
    kind: str,
    txs: Sequence[Tensor | None],
    labels: Tensor | None,
    w: Tensor,
    temperature: float,
) -> Tensor:
    """Σ_r Σ_j w[r, j]·rows[r, j] for one block of rows (masked rows zeroed first)."""
    m = (w != 0).any(-1)
    dt = w.dtype
    if bool(m.all()):  # nothing to hide: skip the masking copies
        s = s.to(dt)
        t = _rebuild(kind, [x if x is None or not x.is_floating_point() else x.to(dt) for x in txs],
                     temperature)  # fmt: skip
    else:
        s = torch.where(m.unsqueeze(-1), s.to(dt), torch.zeros((), dtype=dt, device=s.device))
        t = _rebuild(kind, _sanitize_teacher(kind, txs, m, dt), temperature)
    rows = spec.rows(s, t, labels)
    if rows.dim() == 1:
        rows = rows.unsqueeze(-1)
    rows = torch.where(w != 0, rows, torch.zeros((), dtype=rows.dtype, device=rows.device))
    return (rows * w).sum()


def closed_rows_sum(
    fn: ClosedFormFn, s: Tensor, t: Tensor, labels: Tensor | None, w: Tensor
) -> tuple[Tensor, Tensor]:
    """Closed-form ``(Σ w·rows, ∂/∂s)`` for one block of rows (masked rows zeroed first)."""
    dt = w.dtype
    m = (w != 0).any(-1)
    s, t = s.to(dt), t.to(dt)
    if not bool(m.all()):
        zero = torch.zeros((), dtype=dt, device=s.device)
        s = torch.where(m.unsqueeze(-1), s, zero)
        t = torch.where(m.unsqueeze(-1), t, zero)
    total, grad = fn(s, t, labels, w)
    if not bool(m.all()):
        grad = grad.masked_fill_(~m.unsqueeze(-1), 0.0)
    return total, grad


def topk_cells_rows_sum(
    spec: RowSpec,
    s: Tensor,
    txs: Sequence[Tensor | None],
    w: Tensor,
    temperature: float,
) -> tuple[Tensor, Tensor]:
    """``(Σ w·rows, ∂/∂s)`` under a TopK teacher with autograd only over the k+1 cells.

    The loss depends on the student only through its cell log-probs ``c`` (the k kept classes and
    the rest bucket). With ``G = ∂L/∂c`` projected so that ``Σ G = 0`` (what autograd returns for
    normalised log-probs), ``∂L/∂z_j = G_j/τ`` for a kept class and ``p_j·G_rest/(p_rest·τ)``
    for a class in the bucket, so the ``[R, V]`` work is one softmax, a scatter and a product.
    """
    dt = w.dtype
    m = (w != 0).any(-1)
    s = s.to(dt)
    if not bool(m.all()):
        s = torch.where(m.unsqueeze(-1), s, torch.zeros((), dtype=dt, device=s.device))
    idx = txs[0].clamp(0, s.shape[-1] - 1)
    ps = F.log_softmax(s if temperature == 1 else s / temperature, dim=-1)
    lps_k = ps.gather(-1, idx)
    ps = ps.exp_().scatter_(-1, idx, 0.0)  # student probabilities outside the kept classes
    rest = ps.sum(-1)
    cells = torch.cat([lps_k, torch.log(rest).unsqueeze(-1)], -1).requires_grad_(True)
    k = idx.shape[-1]
    small = torch.arange(k, device=idx.device).expand_as(idx)
    with torch.enable_grad():
        val = rows_sum(spec, cells * temperature, "topk", [small, *txs[1:]], None, w, temperature)
    (gc,) = torch.autograd.grad(val, [cells])
    gc = gc / temperature
    pos = rest > 0
    per_rest = torch.where(pos, gc[:, k] / torch.where(pos, rest, torch.ones_like(rest)), 0.0)
    grad = ps.mul_(per_rest.unsqueeze(-1)).scatter_(-1, idx, gc[:, :k])
    return val.detach(), grad


def closed_chunk(
    spec: RowSpec,
    kind: str,
    s: Tensor,
    txs: Sequence[Tensor | None],
    labels: Tensor | None,
    w: Tensor,
    temperature: float,
) -> tuple[Tensor, Tensor]:
    """Closed-form value and student gradient of one block of rows (see :func:`has_closed_form`)."""
    if kind == "dense":
        return closed_rows_sum(spec.closed_form, s, txs[0], labels, w)  # type: ignore[arg-type]
    dt = w.dtype
    m = (w != 0).any(-1)
    return topk_cells_rows_sum(spec, s, _sanitize_teacher(kind, txs, m, dt), w, temperature)


def has_closed_form(spec: RowSpec, kind: str) -> bool:
    """Whether ``spec`` has a closed-form student gradient for this teacher kind."""
    return (kind == "dense" and spec.closed_form is not None) or (
        kind == "topk" and spec.topk_cells
    )


def _row_blocks(x: Tensor) -> Tensor:
    """``x [..., R, V]`` as ``[B, R, V]`` without copying a slice along ``R`` (e.g. ``[:, :-1]``)."""
    return x.reshape(1, *x.shape) if x.dim() == 2 else x.reshape(-1, *x.shape[-2:])


class _ClosedFormRows(torch.autograd.Function):
    """Row loss with a closed-form student gradient, evaluated ``chunk`` rows at a time.

    Works on the student (and a dense teacher) as given: a shifted ``logits[:, :-1]`` view is
    read block by block, never copied. Keeps only the ``[..., V]`` gradient buffer and one
    chunk's intermediates; the gradient is computed during the forward pass.
    """

    @staticmethod
    def forward(ctx, spec, kind, temperature, chunk, w, lab, s, *txs):  # noqa: D102
        s3 = _row_blocks(s)
        nb, r, _ = s3.shape
        t3 = _row_blocks(txs[0]) if kind == "dense" else None  # sparse teachers come flat [N, k]
        buf = torch.empty(s3.shape, dtype=s.dtype, device=s.device)
        total = torch.zeros((), dtype=w.dtype, device=s.device)
        for b in range(nb):
            for a in range(0, r, chunk):
                e = min(a + chunk, r)
                lo, hi = b * r + a, b * r + e
                wc = w[lo:hi]
                if not bool((wc != 0).any()):
                    buf[b, a:e] = 0
                    continue
                if t3 is not None:
                    tc = [t3[b, a:e]]
                else:
                    tc = [None if x is None else x[lo:hi] for x in txs]
                lc = None if lab is None else lab[lo:hi]
                val, g = closed_chunk(spec, kind, s3[b, a:e], tc, lc, wc, temperature)
                buf[b, a:e] = g
                total += val
        ctx.buf, ctx.shape, ctx.scale, ctx.n_t = buf, s.shape, None, len(txs)
        return total

    @staticmethod
    def backward(ctx, g):  # noqa: D102
        # First call: scale the buffer in place (no extra [N, V]); any later call on a retained
        # graph returns a new tensor, so a gradient handed out earlier is never changed.
        buf, scale = ctx.buf, ctx.scale
        if scale is None and float(g) == 0.0:
            grad = torch.zeros_like(buf)
        elif scale is None:
            grad = buf.mul_(g.to(buf.dtype))
            ctx.scale = g.detach().clone()
        else:
            grad = buf * (g / scale).to(buf.dtype)
        return (None,) * 6 + (grad.reshape(ctx.shape),) + (None,) * ctx.n_t


def _weights(
    spec: RowSpec, lead_shape: torch.Size, labels: Tensor | None, mask: Tensor | None, dt, device
) -> Tensor:
    dummy = torch.empty(*lead_shape, 1, device=device)
    cols = []
    for need in spec.label_flags:
        m = counted_mask(dummy, labels, mask, need_labels=need).reshape(-1)
        cols.append(m.to(dt) / m.sum().clamp_min(1).to(dt))
    return torch.stack(cols, -1)


def _apply_row_weights(w: Tensor, row_weights: Tensor | None, lead: torch.Size) -> Tensor:
    """``w [N, J]`` times constant per-row weights of leading shape ``lead`` (None: unchanged)."""
    if row_weights is None:
        return w
    if row_weights.shape != lead:
        raise ValueError(
            f"row_weights have shape {tuple(row_weights.shape)}, expected {tuple(lead)}"
        )
    rw = row_weights.detach().reshape(-1, 1).to(device=w.device, dtype=w.dtype)
    return w * rw


def _no_teacher(spec: RowSpec) -> None:
    if spec.uses_teacher:
        raise ValueError(f"loss {spec.name!r} needs a teacher (logits, TopK or Sampled), got None")


def _prepare(spec: RowSpec, student: Tensor, teacher: Any, labels, mask):
    if spec.needs_labels and labels is None:
        raise ValueError(
            f"loss {spec.name!r} needs labels: pass labels= (class ids, -100 = ignore)"
        )
    kind = teacher_kind(teacher) if teacher is not None else "dense"
    kind = "dense" if kind == "head" else kind  # dense logits, computed chunk by chunk
    if teacher is not None and kind not in spec.teachers:
        what = {"topk": "a TopK", "sampled": "a Sampled", "dense": "a dense"}[kind]
        ok = ", ".join(sorted(spec.teachers))
        raise ValueError(
            f"loss {spec.name!r} does not support {what} teacher (supported: {ok}); it needs "
            f"{'the full teacher logits' if 'dense' in spec.teachers else 'another teacher kind'}"
        )
    lead, v = student.shape[:-1], student.shape[-1]
    if kind == "dense" and teacher is not None and teacher.shape != student.shape:
        raise ValueError(
            f"loss {spec.name!r}: teacher logits {tuple(teacher.shape)} and student logits "
            f"{tuple(student.shape)} must have the same shape"
        )
    if kind != "dense" and teacher.shape != lead:
        raise ValueError(
            f"loss {spec.name!r}: teacher leading shape {tuple(teacher.shape)} != student "
            f"leading shape {tuple(lead)}"
        )
    if labels is not None and labels.shape != lead:
        raise ValueError(f"labels have shape {tuple(labels.shape)}, expected {tuple(lead)}")
    return kind, lead, v


def _compute_dtype(student: Tensor, kind: str, teacher: Any) -> torch.dtype:
    dt = half_to_float_dtype(student.dtype)
    if kind == "dense" and teacher is not None:
        dt = torch.promote_types(dt, half_to_float_dtype(teacher.dtype))
    return dt


def run_rows(
    spec: RowSpec,
    student: Tensor,
    teacher: Any,
    labels: Tensor | None,
    mask: Tensor | None,
    *,
    chunk_size: int | None = None,
    temperature: float = 1.0,
    row_weights: Tensor | None = None,
) -> Tensor:
    """Evaluate a row-wise logit loss over all rows, plainly or chunk by chunk.

    ``row_weights`` (optional, leading shape of ``student``, constants: no gradient) multiply each
    row's weight ``mask / count``: ``Σ_r row_weights[r]·mask[r]·ℓ_r / count`` (sequence-level
    weights such as KEPO's quality gate or PACED's pass-rate weight).
    """
    if teacher is None:
        _no_teacher(spec)
        teacher = student.detach()  # placeholder for losses that ignore the teacher (ce)
    if isinstance(teacher, HeadLogits):  # only the fused path computes it chunk by chunk
        teacher = teacher.logits()
    kind, lead, v = _prepare(spec, student, teacher, labels, mask)
    temperature = teacher.temperature if isinstance(teacher, Sampled) else temperature
    n = lead.numel()
    dt = _compute_dtype(student, kind, teacher)
    w = _weights(spec, lead, labels, mask, dt, student.device)
    w = _apply_row_weights(w, row_weights, lead)
    if has_closed_form(spec, kind) and torch.is_grad_enabled() and student.requires_grad:
        txs = [teacher] if kind == "dense" else _flat_teacher(teacher, n, v)[1]
        if not any(x is not None and x.requires_grad for x in txs):
            chunk = chunk_size or max(1, CLOSED_FORM_ELEMS // max(1, v))
            lab = None if labels is None else labels.reshape(n)
            return _ClosedFormRows.apply(spec, kind, temperature, chunk, w, lab, student, *txs)
    s = student.reshape(n, v)
    kind, txs = _flat_teacher(teacher, n, v)
    lab = None if labels is None else labels.reshape(n)
    if chunk_size is None or chunk_size >= n:
        return rows_sum(spec, s, kind, txs, lab, w, temperature)
    grad_on = torch.is_grad_enabled() and (
        s.requires_grad or any(x is not None and x.requires_grad for x in txs)
    )
    if not grad_on:
        total = torch.zeros((), dtype=dt, device=s.device)
        for a in range(0, n, chunk_size):
            sl = slice(a, a + chunk_size)
            total = total + rows_sum(
                spec,
                s[sl],
                kind,
                [None if x is None else x[sl] for x in txs],
                None if lab is None else lab[sl],
                w[sl],
                temperature,
            )
        return total
    return _ChunkedRows.apply(spec, kind, temperature, chunk_size, w, lab, s, *txs)


class _ChunkedRows(torch.autograd.Function):
    """Chunked row loss whose gradient is computed chunk by chunk during the forward pass.

    Only the gradient buffers (same size as the inputs) and one chunk's intermediates are kept,
    instead of all ``[N, V]`` intermediates of the plain graph. The gradient can be used once.
    """

    @staticmethod
    def forward(ctx, spec, kind, temperature, chunk, w, lab, s, *txs):  # noqa: D102
        inputs = (s, *txs)
        need = [
            x is not None and x.is_floating_point() and ctx.needs_input_grad[6 + i]
            for i, x in enumerate(inputs)
        ]
        bufs = [torch.zeros_like(x) if nd else None for x, nd in zip(inputs, need)]
        total = torch.zeros((), dtype=w.dtype, device=s.device)
        n = s.shape[0]
        for a in range(0, n, chunk):
            sl = slice(a, a + chunk)
            wc = w[sl]
            if not bool((wc != 0).any()):
                continue
            xs = [
                None if x is None else x[sl].detach().requires_grad_(nd)
                for x, nd in zip(inputs, need)
            ]
            with torch.enable_grad():
                val = rows_sum(
                    spec, xs[0], kind, xs[1:], None if lab is None else lab[sl], wc, temperature
                )
            wrt = [x for x, nd in zip(xs, need) if nd]
            if wrt:
                grads = iter(torch.autograd.grad(val, wrt, allow_unused=True))
                for buf, nd in zip(bufs, need):
                    if nd:
                        g = next(grads)
                        if g is not None:
                            buf[sl] = g
            total += val.detach()
        ctx.bufs = bufs
        return total

    @staticmethod
    def backward(ctx, g):  # noqa: D102
        bufs = ctx.bufs
        if bufs is None:
            raise RuntimeError(
                "chunked loss: backward already ran (its gradient is computed in forward and can "
                "be used once); use chunk_size=None to backpropagate twice"
            )
        ctx.bufs = None
        grads = [None if b is None else b.mul_(g.to(b.dtype)) for b in bufs]
        return (None, None, None, None, None, None, *grads)


class _FusedLinearRows(torch.autograd.Function):
    """Row loss on ``hidden @ weight.T + bias`` computed chunk by chunk (gradients in forward).

    ``rows`` is the number of positions per leading block (``T`` for ``[B, T, H]``): chunks never
    cross a block, so a dense teacher that is a shifted view (``logits[:, :-1]``) is read without
    a copy. A ``head`` teacher (:class:`~mentor.signals.HeadLogits`) has its logits computed per
    chunk too, so neither model's ``[N, V]`` logits exist.
    """

    @staticmethod
    def forward(ctx, spec, kind, temperature, chunk, w, lab, rows, hidden, weight, bias, *txs):  # noqa: D102
        need_h, need_w, need_b = ctx.needs_input_grad[7:10]
        acc = torch.promote_types(half_to_float_dtype(weight.dtype), torch.float32)
        gh = torch.zeros_like(hidden) if need_h else None
        gw = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        gb = (
            torch.zeros(bias.shape, dtype=acc, device=bias.device)
            if (need_b and bias is not None)
            else None
        )
        total = torch.zeros((), dtype=w.dtype, device=hidden.device)
        n = hidden.shape[0]
        txs = [None if x is None else x.detach() for x in txs]
        t3 = _row_blocks(txs[0]) if kind == "dense" else None
        row_kind = "dense" if kind == "head" else kind
        for lo0 in range(0, n, rows):
            for a in range(lo0, lo0 + rows, chunk):
                sl = slice(a, min(a + chunk, lo0 + rows))
                wc = w[sl]
                if not bool((wc != 0).any()):
                    continue
                hc = hidden[sl]
                logits = F.linear(hc, weight, bias)
                if kind == "head":
                    tc = [F.linear(txs[0][sl], txs[1], txs[2])]
                elif t3 is not None:
                    tc = [t3[lo0 // rows, sl.start - lo0 : sl.stop - lo0]]
                else:
                    tc = [None if x is None else x[sl] for x in txs]
                lc = None if lab is None else lab[sl]
                if not (need_h or need_w or gb is not None):
                    total += rows_sum(spec, logits, row_kind, tc, lc, wc, temperature)
                    continue
                if has_closed_form(spec, row_kind):
                    val, gl = closed_chunk(spec, row_kind, logits, tc, lc, wc, temperature)
                    gl = gl.to(logits.dtype)
                else:
                    logits.requires_grad_(True)
                    with torch.enable_grad():
                        val = rows_sum(spec, logits, row_kind, tc, lc, wc, temperature)
                    (gl,) = torch.autograd.grad(val, [logits])
                del logits
                if gh is not None:
                    gh[sl] = (gl @ weight).to(gh.dtype)
                if gw is not None:
                    gw.addmm_(gl.t().to(acc), hc.to(acc))
                if gb is not None:
                    gb += gl.sum(0).to(acc)
                total += val.detach()
        ctx.grads = (gh, gw, gb)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, g):  # noqa: D102
        if ctx.grads is None:
            raise RuntimeError("fused loss: backward already ran (gradients are usable once)")
        gh, gw, gb = ctx.grads
        ctx.grads = None
        wdt, bdt = ctx.dtypes
        if gh is not None:
            gh = gh.mul_(g.to(gh.dtype))
        if gw is not None:
            gw = gw.mul_(g.to(gw.dtype)).to(wdt)
        if gb is not None:
            gb = gb.mul_(g.to(gb.dtype)).to(bdt)
        n_t = len(ctx.needs_input_grad) - 10
        return (None, None, None, None, None, None, None, gh, gw, gb, *([None] * n_t))


def run_fused(
    spec: RowSpec,
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    teacher: Any,
    labels: Tensor | None,
    mask: Tensor | None,
    *,
    chunk_size: int,
    temperature: float = 1.0,
    row_weights: Tensor | None = None,
) -> Tensor:
    """Evaluate a row-wise logit loss on ``hidden @ weight.T (+ bias)`` without full logits.

    ``row_weights`` as in :func:`run_rows`.
    """
    if hidden.shape[-1] != weight.shape[-1]:
        raise ValueError(
            f"hidden size {hidden.shape[-1]} != lm_head weight in_features {weight.shape[-1]}"
        )
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"bias must have shape [{weight.shape[0]}], got {tuple(bias.shape)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size}")
    lead, v = hidden.shape[:-1], weight.shape[0]
    if teacher is None:
        _no_teacher(spec)
        teacher = torch.zeros(*lead, v, dtype=hidden.dtype, device=hidden.device)
    meta = torch.empty(*lead, v, device="meta", dtype=hidden.dtype)  # for shape checks only
    kind, _, _ = _prepare(spec, meta, teacher, labels, mask)
    temperature = teacher.temperature if isinstance(teacher, Sampled) else temperature
    n = lead.numel()
    dt = _compute_dtype(
        torch.empty(0, dtype=torch.promote_types(hidden.dtype, weight.dtype)), kind, teacher
    )
    w = _weights(spec, lead, labels, mask, dt, hidden.device)
    w = _apply_row_weights(w, row_weights, lead)
    if isinstance(teacher, HeadLogits):
        kind, txs = "head", [teacher.hidden.reshape(n, -1), teacher.weight, teacher.bias]
    elif teacher_kind(teacher) == "dense":
        kind, txs = "dense", [teacher]  # read block by block (no copy of a shifted view)
    else:
        kind, txs = _flat_teacher(teacher, n, v)
    lab = None if labels is None else labels.reshape(n)
    rows = lead[-1] if len(lead) else 1
    return _FusedLinearRows.apply(
        spec, kind, temperature, chunk_size, w, lab, rows, hidden.reshape(n, -1), weight, bias,
        *txs,
    )  # fmt: skip
