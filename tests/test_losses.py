"""Independent reference implementations of METHODS-losses.md, written from the formulas.

Plain float64 loops over rows / samples with elementary tensor ops; nothing from
``mentor.losses`` is used. Every reference takes the same inputs as the loss plus the
hyperparameters and returns a Python float.
"""

from __future__ import annotations

import math

import torch

D = torch.float64


def sm(x):
    x = x.to(D)
    e = torch.exp(x - x.max())
    return e / e.sum()


def lsm(x):
    x = x.to(D)
    return x - x.max() - torch.log(torch.exp(x - x.max()).sum())


def kl(p, q):
    tot = 0.0
    for pi, qi in zip(p.tolist(), q.tolist()):
        if pi > 0:
            tot += pi * (math.log(pi) - math.log(qi))
    return tot


def rows_of(x):
    return x.reshape(-1, x.shape[-1]).to(D)


def counted(lead_numel, labels, mask, need_labels=False):
    out = []
    lab = None if labels is None else labels.reshape(-1).tolist()
    msk = None if mask is None else mask.reshape(-1).tolist()
    for r in range(lead_numel):
        if msk is not None:
            ok = bool(msk[r])
        elif lab is not None:
            ok = lab[r] != -100
        else:
            ok = True
        if need_labels and lab is not None and lab[r] == -100:
            ok = False
        if ok:
            out.append(r)
    return out


def zscore(z, eps):
    z = z.to(D)
    c = z.numel()
    mean = z.sum() / c
    std = math.sqrt(float(((z - mean) ** 2).sum()) / (c - 1))
    return (z - mean) / (std + eps)


def _mean_rows(fn, s, t, labels, mask, need_labels=False):
    S, T = rows_of(s), rows_of(t)
    lab = None if labels is None else labels.reshape(-1).tolist()
    rows = counted(S.shape[0], labels, mask, need_labels)
    if not rows:
        return 0.0
    return sum(fn(S[r], T[r], None if lab is None else lab[r]) for r in rows) / len(rows)


# ------------------------------------------------------------------------------ logits


def ref_ce(s, t, labels=None, mask=None):
    return _mean_rows(lambda a, b, y: -float(lsm(a)[y]), s, t, labels, mask, True)


def _fkl_row(a, b, tau, standardize=False, eps=1e-7):
    if standardize:
        a, b = zscore(a, eps), zscore(b, eps)
    return kl(sm(b / tau), sm(a / tau))


def ref_kd(s, t, labels=None, mask=None, temperature=4.0, alpha=0.0, standardize=False,
           standardize_eps=1e-7):  # fmt: skip
    need = alpha > 0
    soft = _mean_rows(
        lambda a, b, y: _fkl_row(a, b, temperature, standardize, standardize_eps),
        s, t, labels, mask, need,
    )  # fmt: skip
    out = (1 - alpha) * temperature**2 * soft
    if alpha > 0:
        out += alpha * ref_ce(s, t, labels, mask)
    return out


def ref_forward_kl(s, t, labels=None, mask=None, temperature=1.0, standardize=False,
                   standardize_eps=1e-7):  # fmt: skip
    return _mean_rows(
        lambda a, b, y: _fkl_row(a, b, temperature, standardize, standardize_eps),
        s, t, labels, mask,
    )  # fmt: skip


def ref_reverse_kl(s, t, labels=None, mask=None, temperature=1.0):
    return _mean_rows(
        lambda a, b, y: kl(sm(a / temperature), sm(b / temperature)), s, t, labels, mask
    )


def ref_cts_kl(s, t, labels=None, mask=None, temperature=1.0):
    """CTS-KL: reverse KL of the sparse network (student) to its dense self (teacher)."""
    return _mean_rows(
        lambda a, b, y: kl(sm(a / temperature), sm(b / temperature)), s, t, labels, mask
    )


def ref_jsd(s, t, labels=None, mask=None, beta=0.5, temperature=1.0):
    def row(a, b, y):
        ps, pt = sm(a / temperature), sm(b / temperature)
        if beta == 0:
            return kl(pt, ps)
        if beta == 1:
            return kl(ps, pt)
        m = beta * pt + (1 - beta) * ps
        return beta * kl(pt, m) + (1 - beta) * kl(ps, m)

    return _mean_rows(row, s, t, labels, mask)


def ref_tvd(s, t, labels=None, mask=None, temperature=1.0):
    return _mean_rows(
        lambda a, b, y: 0.5 * float((sm(b / temperature) - sm(a / temperature)).abs().sum()),
        s, t, labels, mask,
    )  # fmt: skip


def ref_skew_kl(s, t, labels=None, mask=None, alpha=0.1, temperature=1.0):
    def row(a, b, y):
        ps, pt = sm(a / temperature), sm(b / temperature)
        return kl(pt, alpha * pt + (1 - alpha) * ps)

    return _mean_rows(row, s, t, labels, mask)


def ref_skew_reverse_kl(s, t, labels=None, mask=None, alpha=0.1, temperature=1.0):
    def row(a, b, y):
        ps, pt = sm(a / temperature), sm(b / temperature)
        return kl(ps, alpha * ps + (1 - alpha) * pt)

    return _mean_rows(row, s, t, labels, mask)


def dkd_parts(a, b, y, tau):
    """(TCKD, NCKD, p_T,y) of one row."""
    ps, pt = sm(a / tau), sm(b / tau)
    others = [c for c in range(a.numel()) if c != y]
    bs = torch.tensor([float(ps[y]), float(ps[others].sum())], dtype=D)
    bt = torch.tensor([float(pt[y]), float(pt[others].sum())], dtype=D)
    return kl(bt, bs), kl(sm(b[others] / tau), sm(a[others] / tau)), float(pt[y])


def ref_dkd(s, t, labels=None, mask=None, alpha=1.0, beta=8.0, temperature=4.0,
            standardize=False, standardize_eps=1e-7):  # fmt: skip
    def row(a, b, y):
        if standardize:
            a, b = zscore(a, standardize_eps), zscore(b, standardize_eps)
        tc, nc, _ = dkd_parts(a, b, y, temperature)
        return temperature**2 * (alpha * tc + beta * nc)

    return _mean_rows(row, s, t, labels, mask, True)


def ref_taid(s, t, labels=None, mask=None, t_interp=0.5, temperature=1.0):
    def row(a, b, y):
        pt = sm(((1 - t_interp) * a + t_interp * b) / temperature)
        return kl(pt, sm(a / temperature))

    return _mean_rows(row, s, t, labels, mask)


def entropy(p):
    return -sum(x * math.log(x) for x in p.tolist() if x > 0)


def ref_bd_kd(s, t, labels=None, mask=None, temperature=1.0, boost=2.0):
    def row(a, b, y):
        ps, pt = sm(a / temperature), sm(b / temperature)
        wf, wr = (1.0, boost) if entropy(ps) > entropy(pt) else (boost, 1.0)
        return temperature**2 * (wf * kl(pt, ps) + wr * kl(ps, pt))

    return _mean_rows(row, s, t, labels, mask)


def ref_pld(s, t, labels=None, mask=None, temperature=1.0):
    def row(a, b, y):
        others = sorted((c for c in range(a.numel()) if c != y), key=lambda c: (-float(b[c]), c))
        pi = [y] + others
        w = sm(b / temperature)
        tot = 0.0
        for k in range(len(pi)):
            tail = [float(a[j]) for j in pi[k:]]
            mx = max(tail)
            lse = mx + math.log(sum(math.exp(v - mx) for v in tail))
            tot += float(w[pi[k]]) * (lse - float(a[pi[k]]))
        return tot

    return _mean_rows(row, s, t, labels, mask, True)


def ref_logit_mse(s, t, labels=None, mask=None):
    return _mean_rows(lambda a, b, y: float(((a - b) ** 2).sum()), s, t, labels, mask)


def _sel(s, t, labels, mask):
    S, T = rows_of(s), rows_of(t)
    rows = counted(S.shape[0], labels, mask)
    return S[rows], T[rows]


def ref_sinkhorn(s, t, labels=None, mask=None, temperature=2.0, epsilon=0.1, n_iters=20,
                 reduction="batchmean"):  # fmt: skip
    S, T = _sel(s, t, labels, mask)
    n = S.shape[0]
    if n == 0:
        return 0.0
    ps = [sm(S[i] / temperature) for i in range(n)]
    pt = [sm(T[i] / temperature) for i in range(n)]
    W = [[float((ps[i] - pt[j]).abs().sum()) for j in range(n)] for i in range(n)]
    K = [[math.exp(-W[i][j] / epsilon) for j in range(n)] for i in range(n)]
    for _ in range(n_iters):
        K = [[K[i][j] / sum(K[i]) for j in range(n)] for i in range(n)]
        cols = [sum(K[i][j] for i in range(n)) for j in range(n)]
        K = [[K[i][j] / cols[j] for j in range(n)] for i in range(n)]
    tot = sum(K[i][j] * W[i][j] for i in range(n) for j in range(n))
    return tot / n if reduction == "batchmean" else tot


def _rho(a, b, eps):
    a, b = a - a.mean(), b - b.mean()
    na = max(math.sqrt(float((a * a).sum())), eps)
    nb = max(math.sqrt(float((b * b).sum())), eps)
    return float((a * b).sum()) / (na * nb)


def ref_dist(s, t, labels=None, mask=None, beta=1.0, gamma=1.0, temperature=1.0, eps=1e-8):
    S, T = _sel(s, t, labels, mask)
    n = S.shape[0]
    if n == 0:
        return 0.0
    ys = torch.stack([sm(S[i] / temperature) for i in range(n)])
    yt = torch.stack([sm(T[i] / temperature) for i in range(n)])
    inter = 1 - sum(_rho(ys[i], yt[i], eps) for i in range(n)) / n
    c = ys.shape[1]
    intra = 1 - sum(_rho(ys[:, j], yt[:, j], eps) for j in range(c)) / c
    return temperature**2 * (beta * inter + gamma * intra)


def _tgeo_init(c, hidden, seed):
    """tgeo_kd's documented fusion-net initialisation (uniform ±1/√fan_in, W1 b1 W2 b2)."""
    g = torch.Generator().manual_seed(seed)
    d = 9 * c

    def u(shape, fan):
        return ((torch.rand(shape, generator=g) * 2 - 1) / math.sqrt(fan)).to(D)

    return u((hidden, d), d), u((hidden,), d), u((1, hidden), hidden), u((1,), hidden)


def ref_tgeo_kd(s, t, labels=None, mask=None, temperature=4.0, hidden=128, meta_lr=1e-3,
                meta_weight_decay=0.0, seed=0):  # fmt: skip
    """α·τ²·KL + (1−α)·CE per counted row; α = sigmoid(MLP([S, T, T̄, G, |S−G|, |S−T|, |S−T̄|,
    (G−T̄)⊙(G−S), (G−T)⊙(G−S)])) at the seeded initial net, T̄ = the batch's class means of the
    teacher's probabilities; counted rows with label −100: α = 1."""
    S, T = rows_of(s), rows_of(t)
    c = S.shape[1]
    lab = labels.reshape(-1).tolist()
    rows = counted(S.shape[0], labels, mask)
    if not rows:
        return 0.0
    w1, b1, w2, b2 = _tgeo_init(c, hidden, seed)
    sums, counts = {}, {}
    for r in rows:
        if lab[r] != -100:
            sums[lab[r]] = sums.get(lab[r], 0) + sm(T[r])
            counts[lab[r]] = counts.get(lab[r], 0) + 1
    total = 0.0
    for r in rows:
        soft = temperature**2 * kl(sm(T[r] / temperature), sm(S[r] / temperature))
        if lab[r] == -100:
            total += soft
            continue
        ps, pt, tb = sm(S[r]), sm(T[r]), sums[lab[r]] / counts[lab[r]]
        g = torch.zeros(c, dtype=D)
        g[lab[r]] = 1
        x = torch.cat([ps, pt, tb, g, (ps - g).abs(), (ps - pt).abs(), (ps - tb).abs(),
                       (g - tb) * (g - ps), (g - pt) * (g - ps)])  # fmt: skip
        a = float(torch.sigmoid(w2 @ torch.relu(w1 @ x + b1) + b2))
        total += a * soft + (1 - a) * -float(lsm(S[r])[lab[r]])
    return total / len(rows)


# ---------------------------------------------------------------------------- features


def _lead_counted(x, mask, nd):
    lead = x.shape[:nd]
    idx = list(torch.cartesian_prod(*[torch.arange(d) for d in lead]).reshape(-1, nd).tolist())
    if mask is None:
        return [tuple(i) for i in idx]
    return [tuple(i) for i in idx if bool(mask[tuple(i)])]


def ref_hint_mse(s, t, mask=None, projector=None):
    s = s.to(D) if projector is None else projector(s.to(D))
    t = t.to(D)
    nd = 1 if mask is None else mask.dim()
    pos = _lead_counted(s, mask, nd)
    if not pos:
        return 0.0
    tot = sum(float(((s[p] - t[p]) ** 2).sum()) for p in pos)
    return tot / (len(pos) * s[pos[0]].numel())


def ref_squarehead(ss, ts, mask=None, eps=2**-7, layer_reduction="sum"):
    ss = [ss] if isinstance(ss, torch.Tensor) else ss
    ts = [ts] if isinstance(ts, torch.Tensor) else ts
    out = 0.0
    for a, b in zip(ss, ts):
        a, b = a.to(D), b.to(D)
        pos = _lead_counted(a, mask, a.dim() - 1)
        if not pos:
            continue
        cnt = len(pos) * a.shape[-1]
        num = sum(float(((a[p] - b[p]) ** 2).sum()) for p in pos) / cnt
        den = sum(float((b[p] ** 2).sum()) for p in pos) / cnt + eps
        out += num / den
    return out / len(ss) if layer_reduction == "mean" else out


def ref_cosine_embedding(s, t, mask=None, projector=None, eps=1e-8):
    s = s.to(D) if projector is None else projector(s.to(D))
    t = t.to(D)
    pos = _lead_counted(s, mask, s.dim() - 1)
    if not pos:
        return 0.0
    tot = 0.0
    for p in pos:
        a, b = s[p], t[p]
        na = max(math.sqrt(float((a * a).sum())), eps)
        nb = max(math.sqrt(float((b * b).sum())), eps)
        tot += 1 - float((a * b).sum()) / (na * nb)
    return tot / len(pos)


def ref_attention_transfer(ss, ts, mask=None, weights=None, mode="code", p=2, eps=1e-12):
    ss = [ss] if isinstance(ss, torch.Tensor) else ss
    ts = [ts] if isinstance(ts, torch.Tensor) else ts
    weights = weights or [1.0] * len(ss)
    out = 0.0
    for a, b, w in zip(ss, ts, weights):
        a, b = a.to(D), b.to(D)
        bs = [i for i in range(a.shape[0]) if mask is None or bool(mask[i])]
        if not bs:
            continue

        def amap(f):
            x = f.abs() ** p
            x = (x.mean(0) if mode == "code" else x.sum(0)).reshape(-1)
            return x / max(math.sqrt(float((x * x).sum())), eps)

        vals = []
        for i in bs:
            d = amap(a[i]) - amap(b[i])
            vals.append(
                float((d * d).mean()) if mode == "code" else math.sqrt(float((d * d).sum()))
            )
        out += w * sum(vals) / len(bs)
    return out


def _smooth_l1(x, y):
    d = abs(x - y)
    return 0.5 * d * d if d < 1 else d - 0.5


def _flat_sel(s, t, mask):
    S, T = s.to(D).reshape(s.shape[0], -1), t.to(D).reshape(t.shape[0], -1)
    if mask is not None:
        S, T = S[mask.bool()], T[mask.bool()]
    return S, T


def _dists(E, eps):
    n = E.shape[0]
    d = [[0.0] * n for _ in range(n)]
    for i in range(n):
        for j in range(n):
            if i != j:
                v = float((E[i] * E[i]).sum() + (E[j] * E[j]).sum() - 2 * (E[i] * E[j]).sum())
                d[i][j] = math.sqrt(max(v, eps))
    pos = [x for r in d for x in r if x > 0]
    mu = sum(pos) / len(pos)
    return [[x / mu for x in r] for r in d]


def ref_rkd_distance(s, t, mask=None, eps=1e-12):
    S, T = _flat_sel(s, t, mask)
    n = S.shape[0]
    if n < 2:
        return 0.0
    ds, dt = _dists(S, eps), _dists(T, eps)
    return sum(_smooth_l1(ds[i][j], dt[i][j]) for i in range(n) for j in range(n)) / n**2


def _angles(E, eps):
    n = E.shape[0]

    def u(i, j):
        v = E[j] - E[i]
        return v / max(math.sqrt(float((v * v).sum())), eps)

    return [float((u(i, j) * u(i, k)).sum()) for i in range(n) for j in range(n) for k in range(n)]


def ref_rkd_angle(s, t, mask=None, eps=1e-12):
    S, T = _flat_sel(s, t, mask)
    n = S.shape[0]
    if n < 2:
        return 0.0
    a_s, a_t = _angles(S, eps), _angles(T, eps)
    return sum(_smooth_l1(x, y) for x, y in zip(a_s, a_t)) / n**3


def ref_spkd(s, t, mask=None, eps=1e-12, row_norm_p=2):
    S, T = _flat_sel(s, t, mask)
    n = S.shape[0]
    if n == 0:
        return 0.0

    def gram(Q):
        G = Q @ Q.t()
        rows = []
        for r in G:
            nr = float((r.abs() ** row_norm_p).sum()) ** (1 / row_norm_p)
            rows.append(r / max(nr, eps))
        return torch.stack(rows)

    return float(((gram(T) - gram(S)) ** 2).sum()) / n**2


def ref_gram_kl(s, t, mask=None, temperature=3.0):
    S, T = _flat_sel(s, t, mask)
    n = S.shape[0]
    if n < 2:
        return 0.0
    tot = 0.0
    for i in range(n):
        others = [j for j in range(n) if j != i]
        gs = torch.stack([(S[i] * S[j]).sum() for j in others])
        gt = torch.stack([(T[i] * T[j]).sum() for j in others])
        tot += kl(sm(gt / temperature), sm(gs / temperature))
    return temperature**2 * tot / n


def ref_token_relation(s, t, mask=None, mode="mse", temperature=1.0, eps=1e-8):
    s, t = s.to(D), t.to(D)
    if s.dim() == 2:
        s, t = s[None], t[None]
        mask = None if mask is None else mask[None]
    B, L = s.shape[:2]

    def cnt(b, i):
        return mask is None or bool(mask[b, i])

    def cos(h, b, i, j):
        a, c = h[b, i], h[b, j]
        na = max(math.sqrt(float((a * a).sum())), eps)
        nc = max(math.sqrt(float((c * c).sum())), eps)
        return float((a * c).sum()) / (na * nc)

    if mode == "mse":
        vals = [
            (cos(s, b, i, j) - cos(t, b, i, j)) ** 2
            for b in range(B) for i in range(L) for j in range(L)
            if i != j and cnt(b, i) and cnt(b, j)
        ]  # fmt: skip
        return sum(vals) / len(vals) if vals else 0.0
    vals = []
    for b in range(B):
        for i in range(L):
            if not cnt(b, i):
                continue
            js = [j for j in range(L) if j != i and cnt(b, j)]
            if not js:
                continue
            rs = torch.tensor([cos(s, b, i, j) for j in js], dtype=D)
            rt = torch.tensor([cos(t, b, i, j) for j in js], dtype=D)
            vals.append(kl(sm(rt / temperature), sm(rs / temperature)))
    return sum(vals) / len(vals) if vals else 0.0


def ref_margin_mse(s, t, mask=None):
    s, t = s.to(D), t.to(D)
    rows = [r for r in range(s.shape[0]) if mask is None or bool(mask[r])]
    if not rows:
        return 0.0
    K = s.shape[1] - 1
    tot = 0.0
    for r in rows:
        tot += (
            sum(float(((s[r, 0] - s[r, k]) - (t[r, 0] - t[r, k])) ** 2) for k in range(1, K + 1))
            / K
        )
    return tot / len(rows)


def ref_listwise_kl(s, t, mask=None, temperature=1.0, candidate_mask=None):
    s, t = s.to(D), t.to(D)
    vals = []
    for r in range(s.shape[0]):
        if mask is not None and not bool(mask[r]):
            continue
        ks = [k for k in range(s.shape[1]) if candidate_mask is None or bool(candidate_mask[r, k])]
        if not ks:
            continue
        vals.append(kl(sm(t[r, ks] / temperature), sm(s[r, ks] / temperature)))
    return sum(vals) / len(vals) if vals else 0.0


# ====================================================================================== tests

import re  # noqa: E402

import pytest  # noqa: E402
from torch import nn  # noqa: E402

import mentor.losses as L  # noqa: E402

LOGIT_INFS_OK = {
    "kd", "forward_kl", "reverse_kl", "jsd", "tvd", "skew_kl", "skew_reverse_kl", "dkd", "taid",
    "bd_kd", "listwise_kl",
}  # fmt: skip
NOT_ZERO_AT_EQUAL = {"pld", "sinkhorn", "ce", "tgeo_kd"}
NEEDS_LABELS = {"ce", "dkd", "pld", "tgeo_kd"}


def _g(seed):
    return torch.Generator().manual_seed(seed)


def _logits_inputs(dtype, seed=0):
    g = _g(seed)
    s = torch.randn(2, 4, 7, generator=g, dtype=D) * 3
    t = torch.randn(2, 4, 7, generator=g, dtype=D) * 3
    labels = torch.randint(0, 7, (2, 4), generator=g)
    labels[0, 1] = -100
    mask = torch.tensor([[1, 1, 0, 1], [0, 1, 1, 1]], dtype=torch.bool)
    return s.to(dtype), t.to(dtype), {"labels": labels, "mask": mask}, mask


def _feat(shape_s, shape_t, mshape, dtype, seed=0):
    g = _g(seed)
    s = torch.randn(*shape_s, generator=g, dtype=D).to(dtype)
    t = torch.randn(*shape_t, generator=g, dtype=D).to(dtype)
    mask = torch.ones(mshape, dtype=torch.bool)
    mask.view(-1)[1] = False
    return s, t, {"mask": mask}, mask


def _layers_inputs(shape_s, shape_t, mshape, dtype, n=2):
    ss, ts = [], []
    for i in range(n):
        s, t, kw, m = _feat(shape_s, shape_t, mshape, dtype, seed=i)
        ss.append(s)
        ts.append(t)
    return ss, ts, kw, m


def _ranking_inputs(k, dtype):
    s, t, kw, m = _feat((5, k), (5, k), (5,), dtype)
    return s, t, kw, m


INPUTS = {
    "logits": _logits_inputs,
    "hint_mse": lambda dt: _feat((2, 4, 6), (2, 4, 6), (2, 4), dt),
    "cosine_embedding": lambda dt: _feat((2, 4, 6), (2, 4, 6), (2, 4), dt),
    "token_relation": lambda dt: _feat((2, 5, 6), (2, 5, 8), (2, 5), dt),
    "squarehead": lambda dt: _layers_inputs((2, 4, 6), (2, 4, 6), (2, 4), dt),
    "attention_transfer": lambda dt: _layers_inputs((3, 2, 4, 4), (3, 5, 4, 4), (3,), dt),
    "batch": lambda dt: _feat((6, 5), (6, 3), (6,), dt),
    "margin_mse": lambda dt: _ranking_inputs(4, dt),
    "listwise_kl": lambda dt: _ranking_inputs(6, dt),
}

CAND = torch.tensor([[1, 1, 1, 1, 0, 1]] * 4 + [[0] * 6], dtype=torch.bool)

CASES = {
    "kd": [{}, {"temperature": 2.0, "alpha": 0.3}, {"standardize": True}],
    "forward_kl": [{}, {"temperature": 2.0}, {"standardize": True, "temperature": 3.0}],
    "reverse_kl": [{}, {"temperature": 0.5}],
    "cts_kl": [{}, {"temperature": 2.0}],
    "jsd": [{}, {"beta": 0.0}, {"beta": 1.0}, {"beta": 0.3, "temperature": 2.0}],
    "tvd": [{}, {"temperature": 2.0}],
    "skew_kl": [{}, {"alpha": 0.0}, {"alpha": 0.5, "temperature": 2.0}],
    "skew_reverse_kl": [{}, {"alpha": 0.0}, {"alpha": 0.5, "temperature": 2.0}],
    "dkd": [{}, {"alpha": 0.5, "beta": 2.0, "temperature": 1.0}, {"standardize": True}],
    "taid": [{"t": 0.5}, {"t": 0.0}, {"t": 1.0, "temperature": 2.0}, {"t": 0.3}],
    "bd_kd": [{}, {"temperature": 2.0, "boost": 3.0}],
    "pld": [{}, {"temperature": 4.0}],
    "sinkhorn": [{}, {"reduction": "sum", "epsilon": 0.5, "n_iters": 5}],
    "ce": [{}],
    "logit_mse": [{}],
    "dist": [{}, {"temperature": 4.0, "beta": 2.0, "gamma": 2.0}],
    "tgeo_kd": [{}, {"temperature": 2.0, "hidden": 16, "seed": 3}],
    "hint_mse": [{}],
    "squarehead": [{}, {"layer_reduction": "mean"}],
    "cosine_embedding": [{}],
    "attention_transfer": [{}, {"mode": "paper", "weights": [1.0, 0.5]}],
    "rkd_distance": [{}],
    "rkd_angle": [{}],
    "spkd": [{}, {"row_norm_p": 1}],
    "token_relation": [{}, {"mode": "kl", "temperature": 0.5}],
    "gram_kl": [{}, {"temperature": 1.0}],
    "margin_mse": [{}],
    "listwise_kl": [{}, {"temperature": 2.0, "candidate_mask": CAND}],
}

REFS = {n: globals()[f"ref_{n}"] for n in CASES}


def _kind(name):
    inputs = L.LOSSES.get(name).inputs
    if inputs == "logits":
        return "logits"
    if inputs == "batch":
        return "batch"
    return name


def _inputs(name, dtype=torch.float64):
    return INPUTS[_kind(name)](dtype)


def _ref(name, s, t, kw, hp):
    hp = dict(hp)
    if name == "taid":
        hp["t_interp"] = hp.pop("t")
    return REFS[name](s, t, **kw, **hp)


def _call(name, s, t, kw, hp):
    if name == "taid" and "t" not in hp:
        hp = {**hp, "t": 0.5}
    return L.get_loss(name, **hp)(s, t, **kw)


# The "sequences" losses (kepo, paced, tsd_kd, mgsr_span) need whole sampled sequences, groups and
# rewards; tests/test_losses_sequence.py holds their references and the same generic checks. The
# cross-tokenizer "xtok" losses (uld, gold_hybrid) take per-side inputs: tests/test_losses_xtok.py.
ALL = [n for n in L.list_losses() if L.LOSSES.get(n).inputs not in ("sequences", "xtok")]
PARAMS = [pytest.param(n, i, id=f"{n}-{i}") for n in ALL for i in range(len(CASES.get(n, [{}])))]


def _leaves(x):
    return [x] if isinstance(x, torch.Tensor) else list(x)


def _req(x):
    for v in _leaves(x):
        v.requires_grad_(True)
    return x


def _grads(x):
    return [v.grad for v in _leaves(x)]


def test_every_registered_loss_has_a_reference_case():
    missing = [n for n in ALL if n not in CASES]
    assert not missing, f"add a reference and CASES entry for {missing}"


@pytest.mark.parametrize("name,i", PARAMS)
@pytest.mark.parametrize("with_mask", [True, False])
def test_matches_reference_float64_and_float32(name, i, with_mask):
    hp = CASES[name][i]
    s, t, kw, _ = _inputs(name)
    if not with_mask:
        kw = {k: v for k, v in kw.items() if k != "mask"}
    ref = _ref(name, s, t, kw, hp)
    got = _call(name, s, t, kw, hp)
    assert got.dim() == 0 and got.dtype == torch.float64
    assert float(got) == pytest.approx(ref, rel=1e-9, abs=1e-12)
    s32 = [v.float() for v in s] if isinstance(s, list) else s.float()
    t32 = [v.float() for v in t] if isinstance(t, list) else t.float()
    got32 = _call(name, s32, t32, kw, hp)
    assert got32.dtype == torch.float32
    ref32 = _ref(name, s32, t32, kw, hp)  # the reference on the float32-rounded inputs
    assert float(got32) == pytest.approx(ref32, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("name", ALL)
def test_non_negative_and_zero_at_equal(name):
    for i, hp in enumerate(CASES[name]):
        s, t, kw, _ = _inputs(name)
        assert float(_call(name, s, t, kw, hp)) >= -1e-12, (name, i)
        if name in NOT_ZERO_AT_EQUAL or hp.get("alpha", 0) > 0 and name == "kd":
            continue
        same = [v.clone() for v in s] if isinstance(s, list) else s.clone()
        v = float(_call(name, s, same, kw, hp))
        assert abs(v) < 1e-10, (name, i, v)


def _poison(x, m, vals=(1e3, -1e3, float("-inf"))):
    x = x.detach().clone()
    idx = (~m).nonzero().tolist()
    for j, ix in enumerate(idx):
        x[tuple(ix)] = vals[j % len(vals)]
    return x


@pytest.mark.parametrize("name", ALL)
def test_masked_positions_change_neither_value_nor_gradient(name):
    hp = CASES[name][-1]
    s, t, kw, m = _inputs(name)
    base_s = [v.clone() for v in _leaves(s)]
    clean = _call(name, _req(s), t, kw, hp)
    clean.backward()
    g_clean = _grads(s)
    ps = [_poison(v, m) for v in base_s]
    pt = [_poison(v, m) for v in _leaves(t)]
    ps_in = ps if isinstance(s, list) else ps[0]
    pt_in = pt if isinstance(t, list) else pt[0]
    dirty = _call(name, _req(ps_in), pt_in, kw, hp)
    dirty.backward()
    assert float(dirty) == pytest.approx(float(clean), rel=1e-9, abs=1e-12)
    for gc, gd in zip(g_clean, _grads(ps_in)):
        assert torch.isfinite(gd).all()
        torch.testing.assert_close(gd, gc, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_give_float32_finite_results(name, dtype):
    hp = CASES[name][0]
    s, t, kw, _ = _inputs(name, dtype)
    out = _call(name, _req(s), t, kw, hp)
    assert out.dtype == torch.float32 and torch.isfinite(out)
    out.backward()
    for g in _grads(s):
        assert g is not None and g.dtype == dtype and torch.isfinite(g.float()).all()
    up = _call(name, [v.detach().float() for v in _leaves(s)] if isinstance(s, list)
               else s.detach().float(),
               [v.float() for v in t] if isinstance(t, list) else t.float(), kw, hp)  # fmt: skip
    assert float(out) == pytest.approx(float(up), rel=1e-6, abs=1e-7)


@pytest.mark.parametrize("name", ALL)
def test_nothing_counted_gives_exact_zero_and_backward_works(name):
    hp = CASES[name][0]
    s, t, kw, m = _inputs(name)
    kw = {**kw, "mask": torch.zeros_like(m)}
    out = _call(name, _req(s), t, kw, hp)
    assert out.dim() == 0 and float(out) == 0.0
    out.backward()
    for g in _grads(s):
        assert g is None or (g == 0).all()


@pytest.mark.parametrize("name", sorted(LOGIT_INFS_OK))
def test_minus_inf_padding_classes_are_ignored(name):
    hp = [h for h in CASES[name] if not h.get("standardize") and "candidate_mask" not in h][-1]
    s, t, kw, _ = _inputs(name)
    pad = torch.full((*s.shape[:-1], 2), float("-inf"), dtype=s.dtype)
    s_pad, t_pad = torch.cat([s, pad], -1).requires_grad_(True), torch.cat([t, pad], -1)
    s = s.clone().requires_grad_(True)
    ref = _call(name, s, t, kw, hp)
    ref.backward()
    got = _call(name, s_pad, t_pad, kw, hp)
    got.backward()
    assert float(got) == pytest.approx(float(ref), rel=1e-9, abs=1e-12)
    assert torch.isfinite(s_pad.grad).all()
    torch.testing.assert_close(s_pad.grad[..., :-2], s.grad)


@pytest.mark.parametrize("name", ALL)
def test_unknown_and_invalid_hyperparameters_raise(name):
    with pytest.raises(ValueError, match="no hyperparameter 'bogus'"):
        L.get_loss(name, bogus=1)
    defaults = L.LOSSES.get(name).defaults
    for key, bad in [("temperature", -1.0), ("eps", 0.0), ("tail", "nope"), ("chunk_size", 0)]:
        if key in defaults:
            with pytest.raises(ValueError, match=key):
                L.get_loss(name, **{key: bad})


@pytest.mark.parametrize("name", ALL)
def test_docstring_one_line_and_citation(name):
    cls = L.LOSSES.get(name)
    doc = cls.__doc__ or ""
    first = doc.strip().splitlines()[0]
    assert first and len(first) <= 100
    assert re.search(r"(19|20)\d\d", doc), f"{name}: cite the paper (title, year)"
    fn = getattr(L, name)
    assert callable(fn) and fn.__doc__ == cls.fn.__doc__


@pytest.mark.parametrize("name", sorted(NEEDS_LABELS))
def test_label_losses_require_labels(name):
    s, t, _, _ = _logits_inputs(torch.float64)
    with pytest.raises(ValueError, match="needs labels"):
        L.get_loss(name)(s, t)


def test_kd_alpha_drops_ignored_labels_and_mixes_ce():
    s, t, kw, _ = _logits_inputs(torch.float64)
    got = L.kd(s, t, labels=kw["labels"], alpha=0.25, temperature=2.0)
    ce = L.ce(s, None, labels=kw["labels"])
    assert float(ce) == pytest.approx(
        torch.nn.functional.cross_entropy(s.reshape(-1, 7), kw["labels"].reshape(-1)).item()
    )
    assert float(got) == pytest.approx(ref_kd(s, t, kw["labels"], None, 2.0, 0.25))


def test_dkd_identity():
    g = _g(3)
    s, t = torch.randn(1, 9, generator=g, dtype=D) * 2, torch.randn(1, 9, generator=g, dtype=D) * 2
    y = torch.tensor([4])
    tau = 3.0
    tckd = L.dkd(s, t, labels=y, alpha=1.0, beta=0.0, temperature=tau) / tau**2
    nckd = L.dkd(s, t, labels=y, alpha=0.0, beta=1.0, temperature=tau) / tau**2
    p_ty = torch.softmax(t / tau, -1)[0, 4]
    fkl = L.forward_kl(s, t, temperature=tau)
    assert float(fkl) == pytest.approx(float(tckd + (1 - p_ty) * nckd), rel=1e-10)
    a, b, c = dkd_parts(s[0], t[0], 4, tau)
    assert float(tckd) == pytest.approx(a) and float(nckd) == pytest.approx(b)


def test_special_cases_reduce_to_kl():
    s, t, kw, _ = _logits_inputs(torch.float64)
    fkl, rkl = L.forward_kl(s, t, **kw), L.reverse_kl(s, t, **kw)
    assert float(L.jsd(s, t, beta=0.0, **kw)) == pytest.approx(float(fkl))
    assert float(L.jsd(s, t, beta=1.0, **kw)) == pytest.approx(float(rkl))
    assert float(L.skew_kl(s, t, alpha=0.0, **kw)) == pytest.approx(float(fkl))
    assert float(L.skew_reverse_kl(s, t, alpha=0.0, **kw)) == pytest.approx(float(rkl))
    assert float(L.skew_kl(s, t, alpha=1.0, **kw)) == pytest.approx(0.0, abs=1e-12)
    assert float(L.taid(s, t, t=1.0, **kw)) == pytest.approx(float(fkl))
    assert float(L.taid(s, t, t=0.0, **kw)) == pytest.approx(0.0, abs=1e-12)
    both = L.bd_kd(s, t, boost=1.0, temperature=2.0, **kw)
    f2, r2 = L.forward_kl(s, t, temperature=2.0, **kw), L.reverse_kl(s, t, temperature=2.0, **kw)
    assert float(both) == pytest.approx(4 * float(f2 + r2))
    s2, t2 = s.reshape(-1, 7), t.reshape(-1, 7)
    assert float(L.listwise_kl(s2, t2)) == pytest.approx(float(L.forward_kl(s2, t2)))
    mse = torch.nn.functional.mse_loss(s2, t2) * 7
    assert float(L.logit_mse(s2, t2)) == pytest.approx(float(mse))


def test_taid_gradient_is_cross_entropy_with_fixed_target():
    s, t, kw, _ = _logits_inputs(torch.float64)
    s.requires_grad_(True)
    L.taid(s, t, t=0.4, **kw).backward()
    g1 = s.grad.clone()
    s.grad = None
    p_t = torch.softmax(0.6 * s.detach() + 0.4 * t, -1)
    m = kw["mask"]
    ce = -(p_t * torch.log_softmax(s, -1)).sum(-1)[m].sum() / m.sum()
    ce.backward()
    torch.testing.assert_close(g1, s.grad)


def test_rkd_teacher_side_has_no_gradient():
    s, t, _, _ = _feat((6, 5), (6, 3), (6,), torch.float64)
    s.requires_grad_(True)
    t.requires_grad_(True)
    L.rkd_distance(s, t).backward()
    assert t.grad is None or (t.grad == 0).all()


def test_hint_mse_projector_matches_reference_and_trains():
    torch.manual_seed(0)
    proj = nn.Linear(6, 8).double()
    s, _, kw, _ = _feat((2, 4, 6), (2, 4, 8), (2, 4), torch.float64)
    t = torch.randn(2, 4, 8, dtype=D)
    loss = L.get_loss("hint_mse", projector=proj)
    assert list(loss.parameters()), "the projector must be a submodule"
    got = loss(s, t, **kw)
    ref = ref_hint_mse(s, t, kw["mask"], projector=lambda x: proj(x).detach())
    assert float(got) == pytest.approx(ref, rel=1e-9)
    got.backward()
    assert proj.weight.grad is not None
    un = L.hint_mse(s, t, projector=proj)
    assert float(un) == pytest.approx(float(torch.nn.functional.mse_loss(proj(s), t)))
    with pytest.raises(ValueError, match="projector"):
        L.hint_mse(s, t)


def test_sinkhorn_small_epsilon_is_finite():
    s, t, kw, _ = _logits_inputs(torch.float32)
    out = L.sinkhorn(s, t, epsilon=0.005, **kw)
    assert torch.isfinite(out)
