"""LLM-scale paths of the logit losses: chunking, the fused output head, sparse teachers."""

from __future__ import annotations

import inspect
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import mentor.losses as L
from mentor.losses.logit import ROWWISE
from mentor.signals import Sampled, TopK

D = torch.float64
ROW_LOSSES = sorted(ROWWISE)
warnings.filterwarnings("ignore", message="Converting a tensor with requires_grad")
HP = {
    "taid": {"t": 0.4},
    "kd": {"temperature": 2.0, "alpha": 0.3},
    "dkd": {"temperature": 2.0},
    "jsd": {"beta": 0.3, "temperature": 2.0},
    "skew_kl": {"temperature": 2.0},
    "bd_kd": {"temperature": 2.0},
}
TOPK_LOSSES = sorted(
    n for n, (b, _) in ROWWISE.items() if "topk" in b(**HP.get(n, {})).teachers and n != "ce"
)


def _inputs(dtype=D, shape=(3, 5, 11), seed=0):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(*shape, generator=g, dtype=D) * 2).to(dtype)
    t = (torch.randn(*shape, generator=g, dtype=D) * 2).to(dtype)
    labels = torch.randint(0, shape[-1], shape[:-1], generator=g)
    labels[0, 0] = -100
    mask = torch.ones(shape[:-1], dtype=torch.bool)
    mask[1, :] = False  # a fully masked stretch (whole chunks are skipped)
    mask[2, 3] = False
    return s, t, labels, mask


def _fn(name):
    return getattr(L, name)


def test_rowwise_covers_every_chunkable_logit_loss():
    logit = {n for n in L.list_losses() if L.LOSSES.get(n).inputs == "logits"}
    assert logit - set(ROWWISE) == {"sinkhorn", "dist", "tgeo_kd"}  # batch-coupled / learned


@pytest.mark.parametrize("name", ROW_LOSSES)
def test_rowwise_hyperparameters_are_declared_once(name):
    """The builder's keyword-only defaults are the functional form's and the registry's."""
    builder, check = ROWWISE[name]
    fn, cls = _fn(name), L.LOSSES.get(name)
    declared = {p.name: p.default for p in inspect.signature(builder).parameters.values()}
    params = inspect.signature(fn).parameters
    assert list(params)[:2] == ["student_logits", "teacher_logits"]
    public = {k: p.default for k, p in params.items() if p.kind is p.KEYWORD_ONLY}
    assert list(public) == ["labels", "mask", *declared, "chunk_size"]
    assert public == {"labels": None, "mask": None, **declared, "chunk_size": None}
    assert cls.defaults == {**declared, "chunk_size": None}
    assert cls.fn is fn and cls.check is check and fn.__doc__ == builder.__doc__


def test_rowwise_functional_form_enforces_its_signature():
    s, t, labels, _ = _inputs()
    with pytest.raises(TypeError, match="unexpected keyword argument 'temprature'"):
        L.kd(s, t, temprature=2.0)
    with pytest.raises(TypeError, match="missing 1 required positional argument"):
        L.kd(s)
    with pytest.raises(TypeError):
        L.kd(s, t, labels)  # hyperparameters and labels are keyword-only
    assert torch.equal(L.ce(s, labels=labels), L.ce(s, None, labels=labels))
    # omitted hyperparameters take the builder's defaults (kd: temperature 4)
    assert torch.equal(L.kd(s, t), L.kd(s, t, temperature=4.0, alpha=0.0))
    assert not torch.equal(L.kd(s, t), L.kd(s, t, temperature=1.0))


@pytest.mark.parametrize("name", ROW_LOSSES)
def test_chunked_equals_plain_value_and_gradients(name):
    s, t, labels, mask = _inputs()
    hp = HP.get(name, {})
    s1, t1 = s.clone().requires_grad_(True), t.clone().requires_grad_(True)
    plain = _fn(name)(s1, t1, labels=labels, mask=mask, **hp)
    plain.backward()
    s2, t2 = s.clone().requires_grad_(True), t.clone().requires_grad_(True)
    chunked = _fn(name)(s2, t2, labels=labels, mask=mask, chunk_size=2, **hp)
    (3.0 * chunked).backward()  # a non-unit upstream gradient
    assert float(chunked) == pytest.approx(float(plain), rel=1e-12, abs=1e-14)
    torch.testing.assert_close(s2.grad, 3.0 * s1.grad)
    if t1.grad is not None:
        torch.testing.assert_close(t2.grad, 3.0 * t1.grad)
    with torch.no_grad():
        nog = _fn(name)(s, t, labels=labels, mask=mask, chunk_size=4, **hp)
    assert float(nog) == pytest.approx(float(plain), rel=1e-12)


def test_chunked_bf16_and_single_backward():
    s, t, labels, mask = _inputs(torch.bfloat16)
    s1 = s.clone().requires_grad_(True)
    plain = L.forward_kl(s1, t, mask=mask)
    plain.backward()
    s2 = s.clone().requires_grad_(True)
    chunked = L.forward_kl(s2, t, mask=mask, chunk_size=4)
    assert chunked.dtype == torch.float32
    assert float(chunked) == pytest.approx(float(plain), rel=1e-6)
    chunked.backward(retain_graph=True)
    assert s2.grad.dtype == torch.bfloat16
    torch.testing.assert_close(s2.grad.float(), s1.grad.float(), rtol=1e-2, atol=1e-3)
    first = s2.grad.clone()
    chunked.backward()  # closed-form gradient: a retained graph can be backpropagated again
    torch.testing.assert_close(s2.grad, 2 * first)
    s3 = s.clone().requires_grad_(True)
    generic = L.logit_mse(s3, t, mask=mask, chunk_size=4)  # generic chunked path: usable once
    generic.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward already ran"):
        generic.backward()


def _fused_case(name, dtype, bias=True, topk=None):
    g = torch.Generator().manual_seed(1)
    b_, t_, h_, v_ = 2, 5, 6, 13
    hidden = (torch.randn(b_, t_, h_, generator=g, dtype=D)).to(dtype)
    weight = (torch.randn(v_, h_, generator=g, dtype=D) * 0.7).to(dtype)
    bvec = (torch.randn(v_, generator=g, dtype=D) * 0.1).to(dtype) if bias else None
    teacher = (torch.randn(b_, t_, v_, generator=g, dtype=D) * 2).to(dtype)
    if topk is not None:
        teacher = TopK.from_logits(teacher, topk)
    labels = torch.randint(0, v_, (b_, t_), generator=g)
    labels[1, 2] = -100
    mask = torch.ones(b_, t_, dtype=torch.bool)
    mask[0, 4] = False
    hp = HP.get(name, {})
    leaves = [x.requires_grad_(True) for x in (hidden, weight, bvec) if x is not None]
    plain = _fn(name)(F.linear(hidden, weight, bvec), teacher, labels=labels, mask=mask, **hp)
    g_plain = torch.autograd.grad(plain, leaves)
    fused = L.fused_linear_loss(
        hidden, weight, teacher, loss=name, bias=bvec, chunk_size=3, labels=labels, mask=mask,
        **hp,
    )  # fmt: skip
    g_fused = torch.autograd.grad(fused, leaves)
    return plain, fused, g_plain, g_fused


@pytest.mark.parametrize("name", ROW_LOSSES)
@pytest.mark.parametrize("dtype", [D, torch.float32])
def test_fused_equals_plain_value_and_gradients(name, dtype):
    plain, fused, g_plain, g_fused = _fused_case(name, dtype)
    tol = 1e-12 if dtype == D else 1e-5
    assert float(fused) == pytest.approx(float(plain), rel=tol, abs=tol)
    for a, b in zip(g_fused, g_plain):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_fused_with_topk_teacher_and_no_bias():
    plain, fused, g_plain, g_fused = _fused_case("forward_kl", D, bias=False, topk=4)
    assert float(fused) == pytest.approx(float(plain), rel=1e-12)
    for a, b in zip(g_fused, g_plain):
        torch.testing.assert_close(a, b)


def test_fused_errors():
    h, w, t = torch.randn(2, 4), torch.randn(5, 4), torch.randn(2, 5)
    with pytest.raises(ValueError, match="no fused form"):
        L.fused_linear_loss(h, w, t, loss="sinkhorn")
    with pytest.raises(ValueError, match="unknown loss"):
        L.fused_linear_loss(h, w, t, loss="fkl")
    with pytest.raises(ValueError, match="no hyperparameter 'temp'"):
        L.fused_linear_loss(h, w, t, temp=2.0)
    with pytest.raises(ValueError, match="hidden size"):
        L.fused_linear_loss(torch.randn(2, 3), w, t)
    mod = L.FusedLinearLoss("jsd", chunk_size=1, beta=0.2)
    assert float(mod(h, w, t)) == pytest.approx(float(L.jsd(h @ w.T, t, beta=0.2)), rel=1e-6)


def test_fused_large_vocab_fits():
    v = 151_936
    g = torch.Generator().manual_seed(0)
    h = torch.randn(1, 6, 8, generator=g, requires_grad=True)
    w = (torch.randn(v, 8, generator=g) * 0.1).requires_grad_(True)
    t = torch.randn(1, 6, v, generator=g)
    fused = L.fused_linear_loss(h, w, t, loss="forward_kl", chunk_size=4)
    gh, gw = torch.autograd.grad(fused, [h, w])
    plain = L.forward_kl(h @ w.T, t)
    ph, pw = torch.autograd.grad(plain, [h, w])
    assert float(fused) == pytest.approx(float(plain), rel=1e-5)
    torch.testing.assert_close(gh, ph, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw, pw, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------- sparse teachers


@pytest.mark.parametrize("name", TOPK_LOSSES)
@pytest.mark.parametrize("tail", ["tail_bucket", "renormalize"])
def test_topk_with_k_equal_v_reproduces_dense(name, tail):
    hp = {**HP.get(name, {}), "tail": tail}
    if tail == "renormalize" and name in ("reverse_kl", "bd_kd"):
        with pytest.raises(ValueError, match="tail='tail_bucket'"):
            _fn(name)(*_inputs()[:2], **hp)
        return
    s, t, labels, mask = _inputs()
    pad = torch.full((*s.shape[:-1], 2), float("-inf"), dtype=D)  # vocabulary padding too
    s, t = torch.cat([s, pad], -1), torch.cat([t, pad], -1)
    s1 = s.clone().requires_grad_(True)
    dense = _fn(name)(s1, t, labels=labels, mask=mask, **hp)
    dense.backward()
    s2 = s.clone().requires_grad_(True)
    sparse = _fn(name)(s2, TopK.from_logits(t, t.shape[-1]), labels=labels, mask=mask, **hp)
    sparse.backward()
    assert float(sparse) == pytest.approx(float(dense), rel=1e-10, abs=1e-12)
    assert torch.isfinite(s2.grad).all()
    torch.testing.assert_close(s2.grad, s1.grad)


def _ref_topk_fkl(s, t, k, tau, tail):
    """Forward KL against a top-k teacher, from the documented definition (one loop per row)."""
    S, T = s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1])
    vals = []
    for a, b in zip(S, T):
        lp_t = torch.log_softmax(b, -1)
        keep = torch.argsort(-lp_t)[:k].tolist()
        rest = [c for c in range(len(a)) if c not in keep]
        p_s = torch.softmax(a / tau, -1)
        ps = [float(p_s[c]) for c in keep] + [float(p_s[rest].sum())]
        lk = [float(lp_t[c]) / tau for c in keep]
        tl = math.log(float(torch.exp(lp_t[rest]).sum())) / tau
        if tail == "tail_bucket":
            z = sum(math.exp(x) for x in lk) + math.exp(tl)
            q = [math.exp(x) / z for x in lk] + [math.exp(tl) / z]
        else:
            z = sum(math.exp(x) for x in lk)
            q = [math.exp(x) / z for x in lk] + [0.0]
        vals.append(sum(qi * (math.log(qi) - math.log(pi)) for qi, pi in zip(q, ps) if qi > 0))
    return sum(vals) / len(vals)


@pytest.mark.parametrize("tail", ["tail_bucket", "renormalize"])
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_topk_partial_matches_documented_definition(tail, tau):
    s, t, _, _ = _inputs()
    got = L.forward_kl(s, TopK.from_logits(t, 4), temperature=tau, tail=tail)
    assert float(got) == pytest.approx(_ref_topk_fkl(s, t, 4, tau, tail), rel=1e-10)
    assert float(got) >= 0
    # chunked sparse == plain sparse
    ch = L.forward_kl(s, TopK.from_logits(t, 4), temperature=tau, tail=tail, chunk_size=4)
    assert float(ch) == pytest.approx(float(got), rel=1e-12)


def test_topk_zero_at_equal_for_tail_bucket_at_tau_1():
    s, _, _, _ = _inputs()
    for name in ("forward_kl", "reverse_kl", "jsd", "tvd", "skew_kl", "skew_reverse_kl"):
        v = _fn(name)(s, TopK.from_logits(s, 3))
        assert abs(float(v)) < 1e-12, name


@pytest.mark.parametrize(
    "name,teacher,match",
    [
        ("dkd", "topk", "does not support a TopK teacher"),
        ("pld", "topk", "does not support a TopK teacher"),
        ("logit_mse", "sampled", "does not support a Sampled teacher"),
        ("reverse_kl", "sampled", "does not support a Sampled teacher"),
        ("jsd", "sampled", "does not support a Sampled teacher"),
        ("sinkhorn", "topk", "needs dense teacher logits"),
        ("dist", "sampled", "needs dense teacher logits"),
    ],
)
def test_unsupported_sparse_teacher_raises_clearly(name, teacher, match):
    s, t, labels, _ = _inputs()
    sig = TopK.from_logits(t, 3) if teacher == "topk" else Sampled.from_logits(t, 4)
    with pytest.raises(ValueError, match=match):
        _fn(name)(s, sig, labels=labels)


def test_standardize_needs_dense_teacher():
    s, t, _, _ = _inputs()
    with pytest.raises(ValueError, match="does not support a TopK"):
        L.forward_kl(s, TopK.from_logits(t, 3), standardize=True)


def _replicate(s, t, m):
    return s.unsqueeze(0).expand(m, *s.shape), t.unsqueeze(0).expand(m, *t.shape)


@pytest.mark.parametrize("with_logprobs", [True, False])
def test_sampled_forward_kl_is_unbiased(with_logprobs):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(4, 10, generator=g, dtype=D).requires_grad_(True)
    t = torch.randn(4, 10, generator=g, dtype=D) * 1.5
    dense = L.forward_kl(s, t)
    (g_dense,) = torch.autograd.grad(dense, s)
    m = 20_000
    s_rep, t_rep = _replicate(s, t, m)
    sig = Sampled.from_logits(t_rep, 4, generator=g)
    if not with_logprobs:
        sig = Sampled(sig.indices, sig.counts)
    est = L.forward_kl(s_rep, sig)
    (g_est,) = torch.autograd.grad(est, s)
    torch.testing.assert_close(g_est, g_dense, rtol=0, atol=0.01)  # gradient: always unbiased
    if with_logprobs:
        assert float(est) == pytest.approx(float(dense), abs=0.02)  # value: unbiased
    else:
        assert float(est) > float(dense) + 0.05  # plug-in entropy: biased upward


def test_sampled_kd_at_temperature_and_temperature_mismatch():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(3, 8, generator=g, dtype=D)
    t = torch.randn(3, 8, generator=g, dtype=D) * 2
    s_rep, t_rep = _replicate(s, t, 20_000)
    sig = Sampled.from_logits(t_rep, 8, generator=g, temperature=2.0)
    est = L.kd(s_rep, sig, temperature=2.0)
    assert float(est) == pytest.approx(float(L.kd(s, t, temperature=2.0)), abs=0.05)
    with pytest.raises(ValueError, match="drawn at temperature 2.0"):
        L.kd(s_rep, sig, temperature=4.0)


def test_missing_teacher_raises_except_for_ce():
    s, _, labels, _ = _inputs()
    with pytest.raises(ValueError, match="needs a teacher"):
        L.forward_kl(s, None)
    assert torch.isfinite(L.ce(s, None, labels=labels))
    h, w = torch.randn(2, 4), torch.randn(5, 4)
    with pytest.raises(ValueError, match="needs a teacher"):
        L.fused_linear_loss(h, w, None, loss="kd")
    lab = torch.tensor([1, 2])
    fused = L.fused_linear_loss(h, w, None, loss="ce", labels=lab, chunk_size=1)
    assert float(fused) == pytest.approx(float(L.ce(h @ w.T, None, labels=lab)), rel=1e-6)


@pytest.mark.parametrize("name", ["forward_kl", "jsd", "tvd", "kd"])
@pytest.mark.parametrize("shifted", [False, True])
def test_fused_with_teacher_head_and_shifted_views_equals_plain(name, shifted):
    """HeadLogits teachers (logits computed per chunk) and shifted dense views, vs plain."""
    from mentor.signals import HeadLogits

    g = torch.Generator().manual_seed(3)
    b_, t_, h_, ht, v_ = 2, 7, 6, 5, 13
    hidden = torch.randn(b_, t_, h_, generator=g, dtype=D).requires_grad_(True)
    weight = (torch.randn(v_, h_, generator=g, dtype=D) * 0.7).requires_grad_(True)
    t_hidden = torch.randn(b_, t_, ht, generator=g, dtype=D)
    t_weight, t_bias = torch.randn(v_, ht, generator=g, dtype=D), torch.randn(v_, dtype=D)
    head = HeadLogits(t_hidden, t_weight, t_bias)
    mask = torch.ones(b_, t_, dtype=torch.bool)
    mask[1, 3] = False
    labels = torch.randint(0, v_, (b_, t_), generator=g)
    hs, dense = hidden, head.logits()
    if shifted:
        hs, head, dense = hidden[:, :-1], head[:, :-1], dense[:, :-1]
        mask, labels = mask[:, 1:], labels[:, 1:]
    assert head.shape == dense.shape
    hp = HP.get(name, {})
    kw = {"mask": mask, "labels": labels}
    plain = _fn(name)(F.linear(hs, weight), dense, **kw, **hp)
    g_plain = torch.autograd.grad(plain, [hidden, weight])
    for teacher in (head, dense):
        fused = L.fused_linear_loss(
            hs, weight, teacher, loss=name, chunk_size=4, **kw, **hp
        )  # fmt: skip
        g_fused = torch.autograd.grad(fused, [hidden, weight])
        assert float(fused) == pytest.approx(float(plain), rel=1e-12)
        for a, b in zip(g_fused, g_plain):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # a non-fused loss materialises the head's logits
    assert float(_fn(name)(F.linear(hs, weight), head, **kw, **hp)) == pytest.approx(
        float(plain), rel=1e-12
    )
