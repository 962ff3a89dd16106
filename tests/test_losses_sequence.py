"""Objectives for distillation with generation (kepo, paced, tsd_kd, mgsr_span).

Each loss is compared with a slow reference written from the formula in docs/losses.md: plain
Python loops over sequences, positions, groups and ranks, with elementary float64 tensor ops over
the vocabulary only (nothing from ``mentor.losses``). The references return tensors, so their
autograd gradient (with the stop-gradients of the formula written out explicitly) is compared
with the loss's gradient; finite differences (``gradcheck``) check the gradients independently.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F

import mentor.losses as L
from mentor.losses import Objective
from mentor.losses._rows import run_rows
from mentor.losses.logit import ROWWISE
from mentor.losses.objective import FusedHead
from mentor.signals import HeadLogits, Sampled, TopK

# float(loss) on a value that requires grad is fine here (read-only)
pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")

D = torch.float64
SEQUENCE = ["kepo", "mgsr_span", "paced", "step_by_step", "tsd_kd"]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


# ------------------------------------------------------------------------------ references


def lsm(x):
    x = x.to(D)
    mx = x.max().detach()
    return x - mx - torch.log(torch.exp(x - mx).sum())


def kl(lp, lq):
    p = lp.exp()
    return torch.where(p > 0, p * (lp - lq), torch.zeros((), dtype=D)).sum()


def entropy(lp):
    p = lp.exp()
    return -torch.where(p > 0, p * lp, torch.zeros((), dtype=D)).sum()


def base_row(a, b, base="forward_kl", tau=1.0, mix=None):
    """One row of a base divergence between student row ``a`` and teacher row ``b``."""
    ls, lt = lsm(a / tau), lsm(b / tau)
    ps, pt = ls.exp(), lt.exp()
    if base == "forward_kl":
        return kl(lt, ls)
    if base == "reverse_kl":
        return kl(ls, lt)
    if base == "jsd":
        beta = 0.5 if mix is None else mix
        lm = torch.log(beta * pt + (1 - beta) * ps)
        return beta * kl(lt, lm) + (1 - beta) * kl(ls, lm)
    if base == "tvd":
        return 0.5 * (pt - ps).abs().sum()
    if base == "skew_kl":
        al = 0.1 if mix is None else mix
        return kl(lt, torch.log(al * pt + (1 - al) * ps))
    if base == "skew_reverse_kl":
        al = 0.1 if mix is None else mix
        return kl(ls, torch.log(al * ps + (1 - al) * pt))
    raise AssertionError(base)


def counted(labels, mask, b, i, need_labels=False):
    if mask is not None:
        ok = bool(mask[b, i])
    elif labels is not None:
        ok = int(labels[b, i]) != -100
    else:
        ok = True
    if need_labels and labels is not None and int(labels[b, i]) == -100:
        ok = False
    return ok


def positions(s, labels, mask, need_labels=False):
    return [(b, i) for b in range(s.shape[0]) for i in range(s.shape[1])
            if counted(labels, mask, b, i, need_labels)]  # fmt: skip


def ref_quality(t, labels, mask, rewards):
    if rewards is not None:
        return [float(r) for r in rewards]
    out = []
    for b in range(t.shape[0]):
        lps = [float(lsm(t[b, i])[int(labels[b, i])]) for i in range(t.shape[1])
               if counted(labels, mask, b, i, need_labels=True)]  # fmt: skip
        out.append(math.exp(sum(lps) / len(lps)) if lps else 0.0)
    return out


def ref_weighted(s, t, labels, mask, weights, base, tau, mix):
    pos = positions(s, labels, mask)
    if not pos:
        return torch.zeros((), dtype=D)
    return sum(weights[b] * base_row(s[b, i], t[b, i], base, tau, mix) for b, i in pos) / len(pos)


def ref_kepo(s, t, labels=None, mask=None, rewards=None, base="reverse_kl", temperature=1.0,
             base_mix=None, threshold=0.5, **_):  # fmt: skip
    q = ref_quality(t, labels, mask, rewards)
    gate = [1.0 if qb >= threshold else 0.0 for qb in q]
    return ref_weighted(s, t, labels, mask, gate, base, temperature, base_mix)


def ref_paced(s, t, labels=None, mask=None, groups=None, rewards=None, alpha=1.0, beta=1.0,
              base="forward_kl", temperature=1.0, base_mix=None, pass_threshold=0.5, soft_pass=False, **_):  # fmt: skip
    q = ref_quality(t, labels, mask, rewards)
    passed = q if soft_pass else [1.0 if x >= pass_threshold else 0.0 for x in q]
    nb = s.shape[0]
    gid = list(range(nb)) if groups is None else [int(g) for g in groups]
    valid = [any(counted(labels, mask, b, i) for i in range(s.shape[1])) for b in range(nb)]
    w = []
    for b in range(nb):
        members = [j for j in range(nb) if gid[j] == gid[b] and valid[j]]
        p = sum(passed[j] for j in members) / len(members) if members else 0.0
        w.append(p**alpha * (1 - p) ** beta)
    return ref_weighted(s, t, labels, mask, w, base, temperature, base_mix)


def plackett_luce_nll(scores):
    """−log P(order) under Plackett–Luce for scores listed best first."""
    tot = torch.zeros((), dtype=D)
    for k in range(len(scores)):
        rest = torch.stack(scores[k:])
        mx = rest.max().detach()
        tot = tot + (mx + torch.log(torch.exp(rest - mx).sum())) - scores[k]
    return tot


def ref_tsd_kd(s, t, labels=None, mask=None, groups=None, beta=0.9, temperature=1.0,
               entropy_quantile=0.1, prefix_mass=0.1, top_k=10, rank_weight=0.1,
               entropy_weight=1.0, candidates="tokens", **_):  # fmt: skip
    tau = temperature
    pos = positions(s, labels, mask)
    if not pos:
        return torch.zeros((), dtype=D)
    hs = {p: float(entropy(lsm(s[p].detach() / tau))) for p in pos}
    ht = {p: float(entropy(lsm(t[p] / tau))) for p in pos}
    direct = sum(
        (1 / (1 + math.exp(-(hs[p] - ht[p])))) * base_row(s[p], t[p], "jsd", tau, beta) for p in pos
    ) / len(pos)
    # entropy regulariser: tokens at or above the entropy_quantile quantile (linear interp.)
    vals = sorted(hs.values())
    x = entropy_quantile * (len(vals) - 1)
    lo = int(math.floor(x))
    hi = min(lo + 1, len(vals) - 1)
    thr = vals[lo] + (vals[hi] - vals[lo]) * (x - lo)
    sel = [p for p in pos if hs[p] >= thr]
    ent = sum(entropy(lsm(s[p] / tau)) for p in sel) / len(sel)
    if candidates == "tokens":
        chosen = []
        for b in range(s.shape[0]):
            own = [p for p in pos if p[0] == b]
            total = sum(hs[p] for p in own)
            cum = 0.0
            for p in own:
                cum += hs[p]
                if cum < prefix_mass * total:
                    chosen.append(p)
        rank = torch.zeros((), dtype=D)
        for p in chosen:
            z, zt = s[p].to(D) / tau, t[p].to(D) / tau
            k = min(top_k, z.shape[0])
            cand = sorted(range(z.shape[0]), key=lambda c: -float(z[c].detach()))[:k]
            cand = sorted(cand, key=lambda c: -float(zt[c]))  # teacher re-ranks (stable)
            rank = rank + plackett_luce_nll([z[c] for c in cand])
        rank = rank / len(chosen) if chosen else rank
    else:
        rank = torch.zeros((), dtype=D)
        if groups is not None:
            lab = positions(s, labels, mask, need_labels=True)
            score_s, score_t = {}, {}
            for b in range(s.shape[0]):
                own = [p for p in lab if p[0] == b]
                if own:
                    score_s[b] = sum(lsm(s[p])[int(labels[p])] for p in own) / len(own)
                    score_t[b] = sum(float(lsm(t[p])[int(labels[p])]) for p in own) / len(own)
            gl = [int(g) for g in groups]
            nll = []
            for g in sorted(set(gl)):
                mem = [b for b in range(s.shape[0]) if gl[b] == g and b in score_s]
                if len(mem) >= 2:
                    mem = sorted(mem, key=lambda b: -score_t[b])
                    nll.append(plackett_luce_nll([score_s[b] for b in mem]))
            if nll:
                rank = sum(nll) / len(nll)
    return direct + entropy_weight * ent + rank_weight * rank


def ref_mgsr_span(s, t, labels=None, mask=None, spans=None, temperature=1.0, span_length=4, **_):
    nb, nt = s.shape[:2]
    tot, n = torch.zeros((), dtype=D), 0
    for b in range(nb):
        k, sid = 0, []
        for i in range(nt):
            if counted(labels, mask, b, i):
                sid.append(k // span_length if spans is None else int(spans[b, i]))
                k += 1
            else:
                sid.append(None)
        for i in range(nt - 1):
            if sid[i] is None or sid[i + 1] is None or sid[i] != sid[i + 1] or sid[i] < 0:
                continue
            rs = lsm(s[b, i] / temperature).exp() * lsm(s[b, i + 1] / temperature).exp()
            rt = (lsm(t[b, i] / temperature).exp() * lsm(t[b, i + 1] / temperature).exp()).detach()
            tot = tot + ((rs - rt) ** 2).sum()
            n += 1
    return tot / n if n else tot


def ref_step_by_step(s, t, *, labels, mask=None, tasks, rationale_weight=1.0):
    """Per task: the mean of -log p(label) over its rows' counted tokens, one by one."""
    total = s.sum() * 0
    for k, w in ((0, 1.0), (1, rationale_weight)):
        terms = [
            -torch.log_softmax(s[b, i], -1)[labels[b, i]]
            for b in range(s.shape[0]) if int(tasks[b]) == k
            for i in range(s.shape[1])
            if labels[b, i] != -100 and (mask is None or bool(mask[b, i]))
        ]  # fmt: skip
        if terms:
            total = total + w * torch.stack(terms).mean()
    return total


REFS = {"kepo": ref_kepo, "paced": ref_paced, "tsd_kd": ref_tsd_kd, "mgsr_span": ref_mgsr_span,
        "step_by_step": ref_step_by_step}  # fmt: skip

# (hyperparameters, which extras to pass)
CASES = {
    "kepo": [
        ({}, ["rewards"]),
        ({"threshold": 0.2}, []),
        ({"base": "forward_kl", "temperature": 2.0}, ["rewards"]),
        ({"base": "jsd", "base_mix": 0.3, "threshold": 0.2}, []),
        ({"base": "tvd"}, ["rewards"]),
        ({"base": "skew_reverse_kl", "base_mix": 0.2, "temperature": 0.5}, ["rewards"]),
    ],
    "paced": [
        ({}, ["groups", "rewards"]),
        ({"alpha": 2.0, "beta": 0.5}, ["groups", "rewards"]),
        ({"pass_threshold": 0.2}, ["groups"]),
        ({"soft_pass": True, "base": "reverse_kl"}, ["groups"]),
        ({"base": "skew_kl", "base_mix": 0.4, "temperature": 2.0}, ["groups", "rewards"]),
        ({"alpha": 0.0, "beta": 0.0, "base": "jsd"}, ["groups", "rewards"]),
    ],
    "tsd_kd": [
        ({}, []),
        ({"prefix_mass": 0.5, "top_k": 4, "rank_weight": 0.7}, []),
        ({"temperature": 2.0, "beta": 0.3, "entropy_quantile": 0.6, "prefix_mass": 0.7}, []),
        ({"top_k": 50, "prefix_mass": 0.9, "entropy_weight": 0.0}, []),
        ({"candidates": "responses", "rank_weight": 0.5}, ["groups"]),
        ({"candidates": "responses", "rank_weight": 0.5}, []),
    ],
    "step_by_step": [
        ({}, ["tasks"]),
        ({"rationale_weight": 0.3}, ["tasks"]),
        ({"rationale_weight": 0.0}, ["tasks"]),
    ],
    "mgsr_span": [
        ({}, []),
        ({"span_length": 2, "temperature": 2.0}, []),
        ({"span_length": 100}, []),
        ({}, ["spans"]),
    ],
}
PARAMS = [pytest.param(n, i, id=f"{n}-{i}") for n in SEQUENCE for i in range(len(CASES[n]))]


def _inputs(dtype=D, seed=0):
    g = torch.Generator().manual_seed(seed)
    nb, nt, v = 6, 5, 7
    s = torch.randn(nb, nt, v, generator=g, dtype=D) * 2
    t = torch.randn(nb, nt, v, generator=g, dtype=D) * 2
    labels = torch.randint(0, v, (nb, nt), generator=g)
    labels[0, 2] = -100
    for b in (0, 2, 3):  # a teacher that likes these completions (fallback quality)
        t[b].scatter_add_(
            -1, labels[b].clamp_min(0).unsqueeze(-1), torch.full((nt, 1), 4.0, dtype=D)
        )
    mask = torch.ones(nb, nt, dtype=torch.bool)
    mask[:, 0] = False
    mask[1, 3:] = False
    mask[5] = False  # a sequence with nothing counted (padding row)
    extras = {
        "groups": torch.tensor([7, 7, 7, 3, 3, 9]),
        "rewards": torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0]),
        "spans": torch.tensor([[0, 0, 0, 1, 1]] * 3 + [[-1, 2, 2, 2, 3]] * 3),
        "tasks": torch.tensor([0, 1, 1, 0, 1, 0]),
    }
    return s.to(dtype), t.to(dtype), {"labels": labels, "mask": mask}, extras


def _kw(name, i, kw, extras):
    hp, which = CASES[name][i]
    return hp, {**kw, **{k: extras[k] for k in which}}


# ------------------------------------------------------------------------------ tests


def test_every_sequence_loss_has_a_reference_case():
    seq = [n for n in L.list_losses() if L.LOSSES.get(n).inputs == "sequences"]
    assert seq == SEQUENCE
    assert set(CASES) == set(REFS) == set(seq)


@pytest.mark.parametrize("name,i", PARAMS)
@pytest.mark.parametrize("with_mask", [True, False])
def test_matches_reference_value_and_gradient(name, i, with_mask):
    s, t, kw, extras = _inputs()
    if not with_mask:
        kw = {"labels": kw["labels"]}
    hp, kw = _kw(name, i, kw, extras)
    s1 = s.clone().requires_grad_(True)
    got = L.get_loss(name, **hp)(s1, t, **kw)
    assert got.dim() == 0 and got.dtype == D
    s2 = s.clone().requires_grad_(True)
    ref = REFS[name](s2, t, **kw, **hp)
    assert float(got.detach()) == pytest.approx(float(ref.detach()), rel=1e-9, abs=1e-12)
    got.backward()
    if ref.requires_grad:
        ref.backward()
        torch.testing.assert_close(s1.grad, s2.grad, rtol=1e-8, atol=1e-11)
    else:
        assert s1.grad is None or (s1.grad == 0).all()
    # float32 inputs: the same within float32 rounding
    got32 = L.get_loss(name, **hp)(s.float(), t.float(), **kw)
    assert got32.dtype == torch.float32
    ref32 = REFS[name](s.float(), t.float(), **kw, **hp)
    assert float(got32) == pytest.approx(float(ref32), rel=1e-5, abs=1e-6)


def test_cases_exercise_nonzero_values():
    """Guard against references that agree because every case is 0."""
    s, t, kw, extras = _inputs()
    for name in SEQUENCE:
        vals = [float(L.get_loss(name, **hp)(s, t, **_kw(name, i, kw, extras)[1]))
                for i, (hp, _) in enumerate(CASES[name])]  # fmt: skip
        assert sum(v > 1e-6 for v in vals) >= len(vals) - 1, (name, vals)


GRADCHECK = [
    ("kepo", {"threshold": 0.2}, []),
    ("kepo", {"base": "jsd", "temperature": 2.0}, ["rewards"]),
    ("paced", {"alpha": 2.0, "beta": 0.5}, ["groups", "rewards"]),
    ("paced", {"soft_pass": True, "base": "reverse_kl"}, ["groups"]),
    ("mgsr_span", {"span_length": 2}, []),
    ("mgsr_span", {}, ["spans"]),
]


@pytest.mark.parametrize("name,hp,which", GRADCHECK)
def test_gradcheck_finite_differences(name, hp, which):
    s, t, kw, extras = _inputs()
    kw = {**kw, **{k: extras[k] for k in which}}
    loss = L.get_loss(name, **hp)
    s = s.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: loss(x, t, **kw), (s,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("hp", [{"prefix_mass": 0.6, "top_k": 4}, {"candidates": "responses"},
                                {"temperature": 2.0, "entropy_quantile": 0.5}])  # fmt: skip
def test_tsd_kd_gradient_by_finite_differences_with_frozen_weights(hp):
    """σ(H_S − H_T) is a stop-gradient weight: freeze it (and the token selections, which are
    piecewise constant) at the current student and compare with finite differences."""
    s, t, kw, extras = _inputs()
    kw = {**kw, "groups": extras["groups"]}
    loss = L.get_loss("tsd_kd", **hp)
    s0 = s.clone().requires_grad_(True)
    loss(s0, t, **kw).backward()
    full = {**L.LOSSES.get("tsd_kd").defaults, **hp}
    full.pop("chunk_size")

    def frozen(x):  # the reference with σ computed from the fixed s (a constant)
        pos = positions(s, kw["labels"], kw["mask"])
        tau = full["temperature"]
        out = ref_tsd_kd(x, t, **kw, **full)
        for p in pos:  # swap σ(x) (a constant inside ref) for σ(s): add the difference
            hs_x = float(entropy(lsm(x[p].detach() / tau)))
            hs_0 = float(entropy(lsm(s[p] / tau)))
            ht = float(entropy(lsm(t[p] / tau)))
            w_x, w_0 = (1 / (1 + math.exp(-(h - ht))) for h in (hs_x, hs_0))
            out = out + (w_0 - w_x) * base_row(x[p], t[p], "jsd", tau, full["beta"]) / len(pos)
        return out

    x = s.clone()
    num = torch.zeros_like(s)
    eps = 1e-6
    for idx in range(s.numel()):
        e = torch.zeros(s.numel(), dtype=D)
        e[idx] = eps
        e = e.view_as(s)
        num.view(-1)[idx] = (frozen(x + e) - frozen(x - e)) / (2 * eps)
    torch.testing.assert_close(s0.grad, num, rtol=1e-5, atol=1e-7)


def _poison(x, m, vals=(1e3, -1e3, float("-inf"))):
    x = x.detach().clone()
    for j, ix in enumerate((~m).nonzero().tolist()):
        x[tuple(ix)] = vals[j % len(vals)]
    return x


@pytest.mark.parametrize("name,i", PARAMS)
def test_masked_positions_change_neither_value_nor_gradient(name, i):
    s, t, kw, extras = _inputs()
    hp, kw = _kw(name, i, kw, extras)
    m = kw["mask"]
    s1 = s.clone().requires_grad_(True)
    clean = L.get_loss(name, **hp)(s1, t, **kw)
    clean.backward()
    s2 = _poison(s, m).requires_grad_(True)
    dirty = L.get_loss(name, **hp)(s2, _poison(t, m), **kw)
    dirty.backward()
    assert float(dirty.detach()) == pytest.approx(float(clean.detach()), rel=1e-9, abs=1e-12)
    g1 = s1.grad if s1.grad is not None else torch.zeros_like(s)
    g2 = s2.grad if s2.grad is not None else torch.zeros_like(s)
    assert torch.isfinite(g2).all()
    torch.testing.assert_close(g2, g1, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name,i", PARAMS)
def test_nothing_counted_gives_exact_zero_and_backward_works(name, i):
    s, t, kw, extras = _inputs()
    hp, kw = _kw(name, i, kw, extras)
    kw["mask"] = torch.zeros_like(kw["mask"])
    s = s.clone().requires_grad_(True)
    out = L.get_loss(name, **hp)(s, t, **kw)
    assert out.dim() == 0 and float(out) == 0.0
    if out.requires_grad:
        out.backward()
        assert s.grad is None or (s.grad == 0).all()


@pytest.mark.parametrize("name", SEQUENCE)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_give_float32_finite_results(name, dtype):
    s, t, kw, extras = _inputs()
    hp, kw = _kw(name, 0, kw, extras)
    sh = s.to(dtype).requires_grad_(True)
    out = L.get_loss(name, **hp)(sh, t.to(dtype), **kw)
    assert out.dtype == torch.float32 and torch.isfinite(out)
    out.backward()
    assert sh.grad is not None and sh.grad.dtype == dtype and torch.isfinite(sh.grad.float()).all()
    up = L.get_loss(name, **hp)(s.to(dtype).float(), t.to(dtype).float(), **kw)
    assert float(out) == pytest.approx(float(up), rel=1e-6, abs=1e-7)


@pytest.mark.parametrize("name", SEQUENCE)
def test_hyperparameters_registry_and_docstring(name):
    cls = L.LOSSES.get(name)
    assert cls.inputs == "sequences"
    assert set(cls.extras) <= {"groups", "rewards", "spans", "tasks"}
    assert not set(cls.defaults) & {"groups", "rewards", "spans", "tasks", "labels", "mask"}
    with pytest.raises(ValueError, match="no hyperparameter 'bogus'"):
        L.get_loss(name, bogus=1)
    near = "temperature" if "temperature" in cls.defaults else next(iter(cls.defaults))
    with pytest.raises(ValueError, match=f"Did you mean '{near}'"):
        L.get_loss(name, **{near[:-1] + "x": 1.0})
    for key, bad in [("rationale_weight", -1.0), ("temperature", -1.0), ("tail", "nope"), ("chunk_size", 0),
                     ("threshold", 1.5), ("alpha", -1.0), ("beta", -1.0), ("top_k", 0),
                     ("candidates", "sequences"), ("span_length", 0), ("base", "kd"),
                     ("pass_threshold", -0.1), ("rank_weight", -1.0), ("soft_pass", 1),
                     ("entropy_quantile", 1.1)]:  # fmt: skip
        if key in cls.defaults:
            with pytest.raises(ValueError, match=key):
                L.get_loss(name, **{key: bad})
    doc = cls.__doc__ or ""
    first = doc.strip().splitlines()[0]
    assert first and len(first) <= 100
    assert re.search(r"(19|20)\d\d", doc), "cite the paper (title, year)"
    assert getattr(L, name).__doc__ == cls.fn.__doc__


def test_base_mix_and_tail_combinations_are_validated():
    with pytest.raises(ValueError, match="base_mix"):
        L.get_loss("kepo", base="reverse_kl", base_mix=0.3)
    with pytest.raises(ValueError, match="base_mix must be"):
        L.get_loss("paced", base="jsd", base_mix=1.5)
    with pytest.raises(ValueError, match="tail_bucket"):
        L.get_loss("kepo", base="reverse_kl", tail="renormalize")
    L.get_loss("paced", base="forward_kl", tail="renormalize")  # fine for forward KL


# --------------------------------------------------------------------------- kepo / paced


def test_kepo_gate_extremes_reduce_to_the_base_loss():
    s, t, kw, extras = _inputs()
    base = L.reverse_kl(s, t, **kw)
    assert float(L.kepo(s, t, **kw, threshold=0.0)) == pytest.approx(float(base), rel=1e-12)
    ones = torch.ones(6)
    assert float(L.kepo(s, t, **kw, rewards=ones)) == pytest.approx(float(base), rel=1e-12)
    assert float(L.kepo(s, t, **kw, rewards=torch.zeros(6))) == 0.0
    # gated-out sequences still count in the denominator: Σ g·ℓ / n over all counted tokens
    r = torch.tensor([1.0, 0, 0, 0, 0, 0])
    one = L.reverse_kl(s[:1], t[:1], mask=kw["mask"][:1])
    n0, n = int(kw["mask"][0].sum()), int(kw["mask"].sum())
    assert float(L.kepo(s, t, **kw, rewards=r)) == pytest.approx(float(one) * n0 / n, rel=1e-12)


def test_kepo_fallback_quality_is_teacher_geometric_mean_probability():
    s, t, kw, extras = _inputs()
    q = L.sequence.sequence_quality("kepo", t, kw["labels"], kw["mask"], None, (6, 5), s.device)
    assert q.tolist() == pytest.approx(ref_quality(t, kw["labels"], kw["mask"], None), rel=1e-12)
    assert q[5] == 0.0  # nothing counted: fails
    # equal to passing the same gate as rewards
    g = (q >= 0.3).double()
    a = L.kepo(s, t, **kw, threshold=0.3)
    assert float(a) == pytest.approx(float(L.kepo(s, t, **kw, rewards=g)), rel=1e-12)


def test_quality_with_topk_and_head_teachers():
    s, t, kw, _ = _inputs()
    lab = kw["labels"]
    dense = L.sequence.token_logprobs("x", t, lab)
    head = HeadLogits(t.clone(), torch.eye(7, dtype=D))  # hidden @ I.T = t
    torch.testing.assert_close(L.sequence.token_logprobs("x", head, lab), dense)
    full = TopK.from_logits(t, 7)
    torch.testing.assert_close(L.sequence.token_logprobs("x", full, lab), dense)
    tk = TopK.from_logits(t, 2)
    got = L.sequence.token_logprobs("x", tk, lab)
    inside = (tk.indices == lab.clamp_min(0).unsqueeze(-1)).any(-1)
    torch.testing.assert_close(got[inside], dense[inside])
    torch.testing.assert_close(got[~inside], tk.tail[~inside].to(got.dtype))
    assert (got >= dense - 1e-12).all()  # the tail is an upper bound
    # kepo / paced with a TopK teacher: base on the k+1 cells, quality from the TopK
    v = L.kepo(s, tk, **kw, threshold=0.2)
    gate = L.sequence.sequence_quality("k", tk, lab, kw["mask"], None, (6, 5), s.device) >= 0.2
    assert float(v) == pytest.approx(float(L.kepo(s, tk, **kw, rewards=gate.double())), rel=1e-12)
    with pytest.raises(ValueError, match="Sampled"):
        L.kepo(s, Sampled.from_logits(t, 8, generator=torch.Generator().manual_seed(0)), **kw)


def test_sampled_teacher_works_with_rewards_for_forward_kl():
    s, t, kw, extras = _inputs()
    smp = Sampled.from_logits(t, 16, generator=torch.Generator().manual_seed(1))
    r = extras["rewards"]
    got = L.kepo(s, smp, **kw, rewards=r, base="forward_kl")
    rw = r.double().view(-1, 1).expand(6, 5)
    want = run_rows(ROWWISE["forward_kl"][0](), s, smp, kw["labels"], kw["mask"], row_weights=rw)
    assert float(got) == pytest.approx(float(want), rel=1e-12)


def test_rewards_and_groups_are_validated():
    s, t, kw, _ = _inputs()
    with pytest.raises(ValueError, match="rewards must be a float tensor"):
        L.kepo(s, t, **kw, rewards=torch.ones(5))
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        L.kepo(s, t, **kw, rewards=torch.tensor([1.0, 2, 0, 0, 0, 0]))
    with pytest.raises(ValueError, match="finite"):
        L.paced(s, t, **kw, rewards=torch.tensor([float("nan"), 0, 0, 0, 0, 0]))
    with pytest.raises(ValueError, match="groups must be a LongTensor"):
        L.paced(s, t, **kw, groups=torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="integer ids"):
        L.paced(s, t, **kw, groups=torch.zeros(6))
    with pytest.raises(ValueError, match="pass labels= .* or rewards="):
        L.kepo(s, t, mask=kw["mask"])
    with pytest.raises(ValueError, match="whole sequences"):
        L.kepo(s[0], t[0], labels=kw["labels"][0])


def test_paced_pass_rates_and_weights():
    s, t, kw, extras = _inputs()
    g, r = extras["groups"], extras["rewards"]
    # groups 7: rows 0,1,2 (pass 1,0,1) -> p = 2/3; 3: rows 3,4 -> 1/2; 9: row 5 (no counted
    # position, excluded) -> 0
    p = L.sequence.pass_rates(r.double(), torch.tensor([2, 2, 2, 0, 0, 1]),
                              kw["mask"].any(-1))  # fmt: skip
    assert p.tolist() == pytest.approx([2 / 3] * 3 + [0.5] * 2 + [0.0])
    # alpha = beta = 0: w = 1 -> the plain base loss
    base = L.forward_kl(s, t, **kw)
    got = L.paced(s, t, **kw, groups=g, rewards=r, alpha=0.0, beta=0.0)
    assert float(got) == pytest.approx(float(base), rel=1e-12)
    # no groups: each sequence is its own prompt, binary pass -> w = 0 for alpha, beta > 0
    assert float(L.paced(s, t, **kw, rewards=r)) == 0.0
    assert float(L.paced(s, t, **kw, groups=torch.arange(6), rewards=r)) == 0.0
    # ...but a soft pass (soft_pass=True) of a size-1 group is its own reward
    soft = torch.tensor([0.5, 0.2, 0.9, 0.1, 0.0, 1.0])
    got = L.paced(s, t, **kw, rewards=soft, soft_pass=True)
    assert float(got) == pytest.approx(float(ref_paced(s, t, **kw, rewards=soft,
                                                       soft_pass=True)), rel=1e-12)  # fmt: skip
    # group ids are labels only: any integers, any order
    perm = L.paced(s, t, **kw, groups=torch.tensor([-4, -4, -4, 10**9, 10**9, 0]), rewards=r)
    assert float(perm) == pytest.approx(float(L.paced(s, t, **kw, groups=g, rewards=r)), rel=1e-12)


@pytest.mark.parametrize("name,hp,which", [
    ("kepo", {"threshold": 0.2}, []),
    ("kepo", {"base": "jsd"}, ["rewards"]),
    ("paced", {}, ["groups", "rewards"]),
    ("paced", {"base": "tvd", "soft_pass": True}, ["groups"]),
])  # fmt: skip
def test_chunked_and_fused_head_match_plain(name, hp, which):
    g = torch.Generator().manual_seed(3)
    s, t, kw, extras = _inputs()
    kw = {**kw, **{k: extras[k] for k in which}}
    hidden = torch.randn(6, 5, 4, generator=g, dtype=D, requires_grad=True)
    w = torch.randn(7, 4, generator=g, dtype=D, requires_grad=True)
    bias = torch.randn(7, generator=g, dtype=D, requires_grad=True)
    plain = L.get_loss(name, **hp)(F.linear(hidden, w, bias), t, **kw)
    grads = torch.autograd.grad(plain, [hidden, w, bias])
    chunked = L.get_loss(name, chunk_size=3, **hp)(F.linear(hidden, w, bias), t, **kw)
    assert float(chunked) == pytest.approx(float(plain), rel=1e-12)
    torch.testing.assert_close(torch.autograd.grad(chunked, [hidden, w, bias]), grads)
    fused = L.get_loss(name, **hp)(FusedHead(hidden, w, bias, chunk_size=4), t, **kw)
    assert float(fused) == pytest.approx(float(plain), rel=1e-12)
    torch.testing.assert_close(torch.autograd.grad(fused, [hidden, w, bias]), grads)
    # a fused (HeadLogits) teacher gives the same too
    th = torch.randn(6, 5, 4, generator=g, dtype=D)
    tw = torch.randn(7, 4, generator=g, dtype=D)
    dense_t = F.linear(th, tw)
    a = L.get_loss(name, **hp)(FusedHead(hidden, w, bias, 4), HeadLogits(th, tw), **kw)
    b = L.get_loss(name, **hp)(F.linear(hidden, w, bias), dense_t, **kw)
    assert float(a) == pytest.approx(float(b), rel=1e-10)


# ------------------------------------------------------------------------------- tsd_kd


def test_tsd_kd_components():
    s, t, kw, extras = _inputs()
    m = kw["mask"]
    # no entropy or ranking: the σ(H_S − H_T)-weighted JSD
    hs = torch.special.entr(F.softmax(s, -1)).sum(-1)
    ht = torch.special.entr(F.softmax(t, -1)).sum(-1)
    w = torch.sigmoid(hs - ht)
    want = run_rows(ROWWISE["jsd"][0](beta=0.9), s, t, None, m, row_weights=w)
    got = L.tsd_kd(s, t, **kw, entropy_weight=0.0, rank_weight=0.0)
    assert float(got) == pytest.approx(float(want), rel=1e-12)
    # prefix too small for any token: the ranking term is 0
    a = L.tsd_kd(s, t, **kw, prefix_mass=0.0, rank_weight=5.0)
    b = L.tsd_kd(s, t, **kw, prefix_mass=0.0, rank_weight=0.0)
    assert float(a) == float(b)
    # responses without groups (or only groups of one): ranking term 0
    c = L.tsd_kd(s, t, **kw, candidates="responses", rank_weight=5.0)
    d = L.tsd_kd(s, t, **kw, candidates="responses", rank_weight=5.0, groups=torch.arange(6))
    assert float(c) == float(d) == float(L.tsd_kd(s, t, **kw, rank_weight=0.0))
    with pytest.raises(ValueError, match="needs labels"):
        L.tsd_kd(s, t, mask=m, candidates="responses", groups=extras["groups"])


def test_tsd_kd_ranking_prefers_the_teacher_order():
    """Plackett–Luce NLL (best first): a student whose top-k already follows the teacher's order
    scores lower than one in the reverse order (the released code's prefix logcumsumexp would
    prefer the reverse)."""
    v = 6
    t = torch.arange(v, 0, -1, dtype=D).view(1, 1, v).repeat(1, 2, 1)  # teacher: 0 > 1 > ... > 5
    agree = t.clone() * 2
    reverse = torch.flip(agree, [-1])
    kw = {"mask": torch.tensor([[True, True]]), "entropy_weight": 0.0, "top_k": 4,
          "prefix_mass": 1.0}  # fmt: skip

    # the rank term alone: subtract the rank_weight=0 value
    def rank(s):
        return float(L.tsd_kd(s, t, rank_weight=1.0, **kw) - L.tsd_kd(s, t, rank_weight=0.0, **kw))

    assert rank(agree) < rank(reverse)
    assert rank(agree) < 0.5


def test_tsd_kd_refuses_sparse_teachers_and_fused_heads():
    s, t, kw, _ = _inputs()
    with pytest.raises(ValueError, match="dense teacher"):
        L.tsd_kd(s, TopK.from_logits(t, 3), **kw)
    head = FusedHead(torch.randn(6, 5, 4, dtype=D), torch.randn(7, 4, dtype=D))
    with pytest.raises(ValueError, match="train.fused_loss_chunk=null"):
        L.tsd_kd(head, t, **kw)
    with pytest.raises(ValueError, match="train.fused_loss_chunk=null"):
        L.mgsr_span(head, t, **kw)
    # a HeadLogits teacher is materialised
    a = L.tsd_kd(s, HeadLogits(t.clone(), torch.eye(7, dtype=D)), **kw)
    assert float(a) == pytest.approx(float(L.tsd_kd(s, t, **kw)), rel=1e-12)


def test_tsd_kd_chunked_matches_plain():
    s, t, kw, extras = _inputs()
    kw = {**kw, "groups": extras["groups"]}
    for hp in ({"prefix_mass": 0.6}, {"candidates": "responses"}):
        s1, s2 = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
        a = L.tsd_kd(s1, t, **kw, **hp)
        b = L.tsd_kd(s2, t, **kw, **hp, chunk_size=2)
        assert float(a) == pytest.approx(float(b), rel=1e-12)
        a.backward()
        b.backward()
        torch.testing.assert_close(s1.grad, s2.grad)


# ---------------------------------------------------------------------------- mgsr_span


def test_mgsr_span_edge_cases():
    s, t, kw, extras = _inputs()
    assert float(L.mgsr_span(s, s.clone(), **kw)) == 0.0  # same model: 0
    assert float(L.mgsr_span(s, t, **kw, span_length=1)) == 0.0  # no pair inside a span
    none = torch.full((6, 5), -1)
    assert float(L.mgsr_span(s, t, **kw, spans=none)) == 0.0
    # spans = the fallback's ids give the fallback's value
    m = kw["mask"]
    ids = torch.where(m, (torch.cumsum(m.long(), -1) - 1) // 3, -1)
    a, b = L.mgsr_span(s, t, **kw, spans=ids), L.mgsr_span(s, t, **kw, span_length=3)
    assert float(a) == pytest.approx(float(b), rel=1e-12)
    with pytest.raises(ValueError, match="spans must be integer ids"):
        L.mgsr_span(s, t, **kw, spans=torch.zeros(6, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="dense teacher"):
        L.mgsr_span(s, TopK.from_logits(t, 3), **kw)


# ---------------------------------------------------------------------------- objective


def test_objective_passes_groups_and_rewards_only_to_sequence_terms():
    s, t, kw, extras = _inputs()
    spec = {
        "kd": {"weight": 0.5, "temperature": 2.0},
        "paced": {"weight": 2.0},
        "gate": {"loss": "kepo", "threshold": 0.2},
        "tsd_kd": {"weight": 0.3, "candidates": "responses"},
        "mgsr_span": {"weight": 4.0},
    }
    obj = Objective(spec)
    assert not obj.taps  # sequence terms need no feature taps
    out = obj(s, t, **kw, **extras)
    assert float(out["kd"]) == pytest.approx(float(L.kd(s, t, **kw, temperature=2.0)))
    assert float(out["paced"]) == pytest.approx(float(L.paced(s, t, **kw, groups=extras["groups"],
                                                              rewards=extras["rewards"])))  # fmt: skip
    assert float(out["gate"]) == pytest.approx(float(L.kepo(s, t, **kw, threshold=0.2,
                                                            rewards=extras["rewards"])))  # fmt: skip
    assert float(out["tsd_kd"]) == pytest.approx(float(L.tsd_kd(s, t, **kw,
                                                                candidates="responses",
                                                                groups=extras["groups"])))  # fmt: skip
    assert float(out["mgsr_span"]) == pytest.approx(float(L.mgsr_span(s, t, **kw,
                                                                      spans=extras["spans"])))  # fmt: skip
    total = sum(obj.weights[k] * out[k] for k in spec)
    assert float(out["loss"]) == pytest.approx(float(total))
    # without the extras: the documented fallbacks (no groups -> paced 0 with binary rewards)
    plain = obj(s, t, **kw)
    assert float(plain["kd"]) == float(out["kd"])
    assert float(plain["gate"]) == pytest.approx(float(L.kepo(s, t, **kw, threshold=0.2)))
    assert float(Objective({"paced": {}})(s, t, **kw, rewards=extras["rewards"])["paced"]) == 0.0


def test_objective_fused_head_with_sequence_terms():
    g = torch.Generator().manual_seed(5)
    _, t, kw, extras = _inputs()
    hidden = torch.randn(6, 5, 4, generator=g, dtype=D, requires_grad=True)
    w = torch.randn(7, 4, generator=g, dtype=D, requires_grad=True)
    obj = Objective({"paced": {}, "kd": {"weight": 0.1}})
    fused = obj(FusedHead(hidden, w, None, 3), t, **kw, **extras)["loss"]
    plain = obj(F.linear(hidden, w), t, **kw, **extras)["loss"]
    assert float(fused) == pytest.approx(float(plain), rel=1e-12)
    gf = torch.autograd.grad(fused, [hidden, w])
    gp = torch.autograd.grad(plain, [hidden, w])
    torch.testing.assert_close(gf, gp)
    with pytest.raises(ValueError, match="fused_loss_chunk=null"):
        Objective({"tsd_kd": {}})(FusedHead(hidden, w, None, 3), t, **kw)


def test_row_weights_hook():
    s, t, kw, _ = _inputs()
    spec = ROWWISE["forward_kl"][0]()
    rw = torch.rand(6, 5, generator=torch.Generator().manual_seed(0), dtype=D)
    got = run_rows(spec, s, t, kw["labels"], kw["mask"], row_weights=rw)
    m = kw["mask"]
    per = torch.stack([base_row(s[b, i], t[b, i]) for b in range(6) for i in range(5)]).view(6, 5)
    assert float(got) == pytest.approx(float((per * rw)[m].sum() / m.sum()), rel=1e-12)
    ones = run_rows(spec, s, t, kw["labels"], kw["mask"], row_weights=torch.ones(6, 5))
    assert float(ones) == pytest.approx(float(L.forward_kl(s, t, **kw)), rel=1e-14)
    with pytest.raises(ValueError, match="row_weights have shape"):
        run_rows(spec, s, t, None, None, row_weights=torch.ones(6))
