"""Cross-tokenizer losses (uld, gold_hybrid) and their helpers, against slow loop references."""

from __future__ import annotations

import math

import pytest
import torch

import mentor.losses as L
from mentor.losses import Objective
from mentor.losses.xtok import align_spans, build_vocab_map, gold_hybrid, uld

# ----------------------------------------------------------------------------- references


def _softmax(row: list[float], tau: float) -> list[float]:
    m = max(row)
    e = [math.exp((x - m) / tau) for x in row]
    z = sum(e)
    return [v / z for v in e]


def _sorted_l1(ps: list[float], pt: list[float]) -> float:
    a, b = sorted(ps, reverse=True), sorted(pt, reverse=True)
    n = max(len(a), len(b))
    a, b = a + [0.0] * (n - len(a)), b + [0.0] * (n - len(b))
    return sum(abs(x - y) for x, y in zip(a, b))


def ref_uld(s, t, ms, mt, tau=1.0, reduction="token"):
    """Loop ULD: pair the i-th counted token of each side, truncated to the shorter."""
    total, n_all, per_seq = 0.0, 0, []
    for b in range(s.shape[0]):
        si = [i for i in range(s.shape[1]) if ms[b, i]]
        ti = [j for j in range(t.shape[1]) if mt[b, j]]
        n = min(len(si), len(ti))
        vals = [
            _sorted_l1(_softmax(s[b, i].tolist(), tau), _softmax(t[b, j].tolist(), tau))
            for i, j in zip(si[:n], ti[:n])
        ]
        total += sum(vals)
        n_all += n
        if n:
            per_seq.append(sum(vals) / n)
    if reduction == "token":
        return total / max(n_all, 1)
    return sum(per_seq) / max(len(per_seq), 1)


def ref_align(so, to, ms, mt):
    """Loop alignment: teacher position with the same start (earliest), first occurrence only."""
    b, ts = so.shape[:2]
    index = [[-1] * ts for _ in range(b)]
    exact = [[False] * ts for _ in range(b)]
    for r in range(b):
        seen = set()
        for i in range(ts):
            if not ms[r, i]:
                continue
            st = int(so[r, i, 0])
            if st in seen:
                continue
            seen.add(st)
            for j in range(to.shape[1]):
                if mt[r, j] and int(to[r, j, 0]) == st:
                    index[r][i] = j
                    exact[r][i] = int(to[r, j, 1]) == int(so[r, i, 1])
                    break
    return index, exact


def ref_gold(s, t, ys, yt, so, to, vm, ms, mt, tau=1.0, wm=1.0, wu=1.0):
    index, exact = ref_align(so, to, ms, mt)
    shared = [(tid, int(vm[tid])) for tid in range(len(vm)) if int(vm[tid]) >= 0]
    total, n = 0.0, 0
    for r in range(s.shape[0]):
        for i in range(s.shape[1]):
            j = index[r][i]
            if j < 0:
                continue
            n += 1
            if exact[r][i] and int(vm[int(yt[r, j])]) == int(ys[r, i]):
                qt = _softmax([float(t[r, j, a]) for a, _ in shared], tau)
                qs = _softmax([float(s[r, i, c]) for _, c in shared], tau)
                total += wm * sum(p * (math.log(p) - math.log(q)) for p, q in zip(qt, qs) if p > 0)
            else:
                ps, pt = _softmax(s[r, i].tolist(), tau), _softmax(t[r, j].tolist(), tau)
                total += wu * _sorted_l1(ps, pt)
    return total / max(n, 1)


# ----------------------------------------------------------------------------- fixtures


def _uld_inputs(dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(3, 6, 7, generator=g, dtype=torch.float64).to(dtype) * 2
    t = torch.randn(3, 5, 11, generator=g, dtype=torch.float64).to(dtype) * 2
    ms = torch.tensor(
        [[0, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0]], dtype=torch.bool
    )
    mt = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 0, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    return s, t, ms, mt


def _gold_inputs(seed=0):
    """Text 'the cat sat' (11 chars): a word-level teacher and a mixed student."""
    g = torch.Generator().manual_seed(seed)
    vs, vt = 9, 6
    # teacher tokens: "the" (0,3) " cat" (3,7) " sat" (7,11) "." (11,12) with ids 0..3
    to = torch.tensor([[[0, 3], [3, 7], [7, 11], [11, 12]]] * 2)
    yt = torch.tensor([[0, 1, 2, 3], [0, 1, 2, 3]])
    # student: "the" (0,3) " c" (3,5) "at" (5,7) " sat" (7,11) "." (11,12)
    so = torch.tensor([[[0, 3], [3, 5], [5, 7], [7, 11], [11, 12]]] * 2)
    ys = torch.tensor([[4, 5, 6, 7, 8], [4, 5, 6, 1, 8]])
    # shared strings: teacher 0 ("the") <-> student 4, teacher 2 (" sat") <-> student 7,
    # teacher 3 (".") <-> student 8; teacher 1 (" cat") and 4, 5 have no student token.
    vm = torch.tensor([4, -1, 7, 8, -1, -1])
    s = torch.randn(2, 5, vs, generator=g, dtype=torch.float64) * 2
    t = torch.randn(2, 4, vt, generator=g, dtype=torch.float64) * 2
    ms = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 1, 1]], dtype=torch.bool)
    mt = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]], dtype=torch.bool)
    return s, t, ys, yt, so, to, vm, ms, mt


def _gold_kw(ys, yt, so, to, vm, ms, mt):
    return dict(labels=ys, teacher_labels=yt, student_offsets=so, teacher_offsets=to,
                vocab_map=vm, mask=ms, teacher_mask=mt)  # fmt: skip


# ----------------------------------------------------------------------------- registry


def test_registered_as_xtok_with_inputs_as_extras():
    for name, fn in (("uld", uld), ("gold_hybrid", gold_hybrid)):
        cls = L.LOSSES.get(name)
        assert cls.inputs == "xtok" and cls.fn is fn and fn.module is cls
        assert not set(cls.defaults) & set(cls.extras)
        assert name in L.list_losses()
    assert L.LOSSES.get("uld").defaults == {"temperature": 1.0, "reduction": "token"}
    assert L.LOSSES.get("gold_hybrid").defaults == {
        "temperature": 1.0, "matched_weight": 1.0, "unmatched_weight": 1.0,
    }  # fmt: skip
    with pytest.raises(ValueError, match="no hyperparameter 'vocab_map'"):
        L.get_loss("gold_hybrid", vocab_map=torch.arange(3))
    with pytest.raises(ValueError, match="temperature must be"):
        L.get_loss("uld", temperature=0)
    with pytest.raises(ValueError, match="reduction must be one of"):
        L.get_loss("uld", reduction="mean")
    with pytest.raises(ValueError, match="matched_weight must be"):
        L.get_loss("gold_hybrid", matched_weight=-1)


def test_objective_combines_xtok_terms_with_ce_only():
    for name in ("uld", "gold_hybrid"):
        obj = Objective({name: {"weight": 1.0}, "ce": {"weight": 1.0}})
        assert obj.cross_tokenizer
        with pytest.raises(ValueError, match=r"objective: kd \(kd\) cannot be combined with the "
                                             rf"cross-tokenizer term\(s\) {name}"):  # fmt: skip
            Objective({name: {"weight": 1.0}, "kd": {"weight": 1.0}})
    fkl = {"fkl": {"loss": "forward_kl"}, "u": {"loss": "uld"}}
    with pytest.raises(ValueError, match=r"fkl \(forward_kl\) cannot be combined"):
        Objective(fkl)
    assert not Objective({"kd": {}, "ce": {}}).cross_tokenizer


def test_objective_passes_xtok_inputs_and_refuses_without_them():
    s, t, ys, yt, so, to, vm, ms, mt = _gold_inputs()
    kw = _gold_kw(ys, yt, so, to, vm, ms, mt)
    obj = Objective({"gold_hybrid": {"weight": 0.5, "temperature": 2.0}, "uld": {"weight": 2.0},
                     "ce": {"weight": 1.0}})  # fmt: skip
    xtok = {k: kw[k] for k in ("teacher_labels", "teacher_mask", "student_offsets",
                               "teacher_offsets", "vocab_map")}  # fmt: skip
    out = obj(s, t, labels=ys, mask=ms, xtok=xtok)
    want_g = gold_hybrid(s, t, **kw, temperature=2.0)
    want_u = uld(s, t, labels=ys, mask=ms, teacher_labels=yt, teacher_mask=mt)
    assert float(out["gold_hybrid"]) == pytest.approx(float(want_g), rel=1e-12)
    assert float(out["uld"]) == pytest.approx(float(want_u), rel=1e-12)
    want = 0.5 * want_g + 2.0 * want_u + L.ce(s, None, labels=ys, mask=ms)
    assert float(out["loss"]) == pytest.approx(float(want), rel=1e-12)
    with pytest.raises(ValueError, match=r"objective.uld: .*needs both models.*xtok_text"):
        Objective({"uld": {}})(s, t, labels=ys, mask=ms)


# ----------------------------------------------------------------------------- uld


@pytest.mark.parametrize("reduction", ["token", "sequence"])
@pytest.mark.parametrize("tau", [1.0, 2.5])
def test_uld_matches_loop_reference(reduction, tau):
    s, t, ms, mt = _uld_inputs()
    got = uld(s, t, mask=ms, teacher_mask=mt, temperature=tau, reduction=reduction)
    ref = ref_uld(s, t, ms, mt, tau, reduction)
    assert got.dtype == torch.float64 and got.dim() == 0
    assert float(got) == pytest.approx(ref, rel=1e-10, abs=1e-12)
    mod = L.get_loss("uld", temperature=tau, reduction=reduction)
    assert float(mod(s, t, mask=ms, teacher_mask=mt)) == pytest.approx(ref, rel=1e-10)
    s32, t32 = s.float(), t.float()
    got32 = uld(s32, t32, mask=ms, teacher_mask=mt, temperature=tau, reduction=reduction)
    assert got32.dtype == torch.float32
    assert float(got32) == pytest.approx(ref_uld(s32, t32, ms, mt, tau, reduction), rel=1e-5)


def test_uld_masks_from_labels_and_defaults():
    s, t, ms, mt = _uld_inputs()
    ys = torch.where(ms, 1, -100)
    yt = torch.where(mt, 2, -100)
    a = uld(s, t, labels=ys, teacher_labels=yt)
    b = uld(s, t, mask=ms, teacher_mask=mt)
    assert float(a) == float(b)
    full = torch.ones(3, 6, dtype=torch.bool), torch.ones(3, 5, dtype=torch.bool)
    assert float(uld(s, t)) == pytest.approx(ref_uld(s, t, *full), rel=1e-10)


def test_uld_zero_at_permuted_equal_distributions_and_nonnegative():
    g = torch.Generator().manual_seed(3)
    t = torch.randn(2, 4, 6, generator=g, dtype=torch.float64)
    perm = torch.randperm(6, generator=g)
    s = torch.cat([t[..., perm], torch.full((2, 4, 3), float("-inf"), dtype=torch.float64)], -1)
    assert abs(float(uld(s, t))) < 1e-12  # same sorted probabilities, extra zero-mass classes
    s2, t2, ms, mt = _uld_inputs(seed=5)
    assert float(uld(s2, t2, mask=ms, teacher_mask=mt)) > 0


def test_uld_gradients_finite_differences():
    s, t, ms, mt = _uld_inputs()
    s.requires_grad_(True)
    t.requires_grad_(True)
    torch.autograd.gradcheck(
        lambda a, b: uld(a, b, mask=ms, teacher_mask=mt, temperature=1.5), (s, t), eps=1e-6,
        atol=1e-6,
    )  # fmt: skip


def test_uld_masked_positions_change_neither_value_nor_gradient():
    s, t, ms, mt = _uld_inputs()
    s1 = s.clone().requires_grad_(True)
    v1 = uld(s1, t, mask=ms, teacher_mask=mt)
    v1.backward()
    s_bad, t_bad = s.clone(), t.clone()
    s_bad[~ms] = float("nan")
    t_bad[~mt] = float("-inf")
    s2 = s_bad.requires_grad_(True)
    v2 = uld(s2, t_bad, mask=ms, teacher_mask=mt)
    v2.backward()
    assert float(v2.detach()) == float(v1.detach())
    assert torch.equal(s2.grad, s1.grad) and torch.isfinite(s2.grad).all()
    assert (s1.grad[~ms] == 0).all()
    # positions beyond the shorter side are unpaired: no gradient
    assert (s1.grad[0, 4] == 0).all() and (s1.grad[1, 3:] == 0).all()


def test_uld_nothing_counted_is_exactly_zero_with_zero_grad():
    s, t, _, _ = _uld_inputs()
    s.requires_grad_(True)
    v = uld(s, t, mask=torch.zeros(3, 6, dtype=torch.bool))
    v.backward()
    assert float(v.detach()) == 0.0 and (s.grad == 0).all()
    assert (
        float(uld(s.detach(), t, mask=torch.zeros(3, 6, dtype=torch.bool), reduction="sequence"))
        == 0
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_uld_half_inputs_give_float32(dtype):
    s, t, ms, mt = _uld_inputs(dtype)
    out = uld(s.requires_grad_(True), t, mask=ms, teacher_mask=mt)
    out.backward()
    assert out.dtype == torch.float32 and torch.isfinite(out) and s.grad.dtype == dtype


def test_uld_bad_shapes_raise_clearly():
    s, t, ms, mt = _uld_inputs()
    with pytest.raises(ValueError, match=r"student logits must be a float tensor \[B, T, V\]"):
        uld(s[0], t)
    with pytest.raises(ValueError, match="teacher logits must be"):
        uld(s, None)
    with pytest.raises(ValueError, match="same batch size"):
        uld(s, t[:2])
    with pytest.raises(ValueError, match=r"teacher_mask has shape \(3, 6\), expected \(3, 5\)"):
        uld(s, t, teacher_mask=ms)
    with pytest.raises(ValueError, match="labels has shape"):
        uld(s, t, labels=torch.zeros(3, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="teacher_labels must hold integer token ids"):
        uld(s, t, teacher_labels=torch.zeros(3, 5))


# ----------------------------------------------------------------------------- helpers


def test_build_vocab_map_from_mappings_and_key():
    sv = {"a": 0, "b": 1, "Ġc": 2}
    tv = {"b": 0, "x": 1, "a": 2, "▁c": 3}
    assert build_vocab_map(sv, tv).tolist() == [1, -1, 0, -1]
    assert build_vocab_map(sv, tv, teacher_size=6).tolist() == [1, -1, 0, -1, -1, -1]
    norm = build_vocab_map(sv, tv, key=lambda s: s.replace("Ġ", " ").replace("▁", " "))
    assert norm.tolist() == [1, -1, 0, 2]
    amb = build_vocab_map({"A": 0, "a": 1}, {"a": 0}, key=str.lower)  # ambiguous -> unmapped
    assert amb.tolist() == [-1]
    with pytest.raises(ValueError, match="teacher_size=2 is smaller"):
        build_vocab_map(sv, tv, teacher_size=2)
    with pytest.raises(TypeError, match="get_vocab"):
        build_vocab_map(["a"], tv)


def test_align_spans_matches_loop_reference_random():
    g = torch.Generator().manual_seed(1)
    b, ts, tt = 4, 9, 7

    def spans(n):
        cuts = torch.randint(1, 4, (b, n), generator=g)
        ends = cuts.cumsum(-1)
        return torch.stack([ends - cuts, ends], -1)

    so, to = spans(ts), spans(tt)
    so[0, 3] = so[0, 2]  # a duplicated start (byte tokens of one character)
    to[1, 4] = to[1, 3]
    ms = torch.rand(b, ts, generator=g) > 0.2
    mt = torch.rand(b, tt, generator=g) > 0.2
    index, exact = align_spans(so, to, ms, mt)
    ri, re = ref_align(so, to, ms, mt)
    assert index.tolist() == ri and exact.tolist() == re
    assert (index >= 0).any() and exact.any() and ((index >= 0) & ~exact).any()


def test_align_spans_errors():
    so = torch.tensor([[[0, 2], [2, 3]]])
    with pytest.raises(ValueError, match="teacher_offsets must be"):
        align_spans(so, torch.zeros(1, 2))
    with pytest.raises(ValueError, match=r"integer tensor \[B, T, 2\]"):
        align_spans(so, torch.zeros(1, 2, 2))
    with pytest.raises(ValueError, match="need 0 <= start <= end"):
        align_spans(so, torch.tensor([[[3, 1]]]))
    with pytest.raises(ValueError, match="teacher_mask has shape"):
        align_spans(so, so, teacher_mask=torch.ones(1, 3))
    idx, ex = align_spans(so, torch.zeros(1, 0, 2, dtype=torch.long))
    assert idx.tolist() == [[-1, -1]] and not ex.any()


# ----------------------------------------------------------------------------- gold_hybrid


@pytest.mark.parametrize("hp", [{}, {"temperature": 2.0, "matched_weight": 0.3,
                                     "unmatched_weight": 1.7}])  # fmt: skip
def test_gold_hybrid_matches_loop_reference(hp):
    s, t, ys, yt, so, to, vm, ms, mt = _gold_inputs()
    kw = _gold_kw(ys, yt, so, to, vm, ms, mt)
    got = gold_hybrid(s, t, **kw, **hp)
    ref = ref_gold(s, t, ys, yt, so, to, vm, ms, mt, hp.get("temperature", 1.0),
                   hp.get("matched_weight", 1.0), hp.get("unmatched_weight", 1.0))  # fmt: skip
    assert got.dtype == torch.float64
    assert float(got) == pytest.approx(ref, rel=1e-10, abs=1e-12)
    assert float(L.get_loss("gold_hybrid", **hp)(s, t, **kw)) == pytest.approx(ref, rel=1e-10)
    # the fixture exercises both parts: matched "the"/"."/" sat" and an unmatched " c"/" cat"
    index, exact = align_spans(so, to, ms, mt)
    assert index[0].tolist() == [0, 1, -1, 2, 3] and exact[0].tolist() == [1, 0, 0, 1, 1]
    only_kl = gold_hybrid(s, t, **kw, unmatched_weight=0.0)
    only_uld = gold_hybrid(s, t, **kw, matched_weight=0.0)
    assert float(only_kl) > 0 and float(only_uld) > 0
    assert float(only_kl + only_uld) == pytest.approx(float(gold_hybrid(s, t, **kw)), rel=1e-12)


def test_gold_hybrid_gradients_finite_differences():
    s, t, ys, yt, so, to, vm, ms, mt = _gold_inputs()
    kw = _gold_kw(ys, yt, so, to, vm, ms, mt)
    s.requires_grad_(True)
    t.requires_grad_(True)
    torch.autograd.gradcheck(lambda a, b: gold_hybrid(a, b, temperature=1.3, **kw), (s, t),
                             eps=1e-6, atol=1e-6)  # fmt: skip


def test_gold_hybrid_masked_positions_change_neither_value_nor_gradient():
    s, t, ys, yt, so, to, vm, ms, mt = _gold_inputs()
    kw = _gold_kw(ys, yt, so, to, vm, ms, mt)
    s1 = s.clone().requires_grad_(True)
    v1 = gold_hybrid(s1, t, **kw)
    v1.backward()
    s_bad, t_bad, ys_bad = s.clone(), t.clone(), ys.clone()
    s_bad[~ms] = float("nan")
    t_bad[~mt] = float("-inf")
    ys_bad[~ms] = 10**6  # masked labels are never read
    s2 = s_bad.requires_grad_(True)
    v2 = gold_hybrid(s2, t_bad, **{**kw, "labels": ys_bad})
    v2.backward()
    assert float(v2.detach()) == float(v1.detach())
    assert torch.equal(s2.grad, s1.grad) and torch.isfinite(s2.grad).all()


def test_gold_hybrid_identical_tokenizers_is_forward_kl():
    g = torch.Generator().manual_seed(7)
    b, n, v = 2, 6, 10
    s = torch.randn(b, n, v, generator=g, dtype=torch.float64)
    t = torch.randn(b, n, v, generator=g, dtype=torch.float64)
    y = torch.randint(0, v, (b, n), generator=g)
    y[1, 4:] = -100
    widths = torch.randint(1, 5, (b, n), generator=g)
    ends = widths.cumsum(-1)
    off = torch.stack([ends - widths, ends], -1)
    kw = dict(labels=y, teacher_labels=y, student_offsets=off, teacher_offsets=off,
              vocab_map=torch.arange(v))  # fmt: skip
    for tau in (1.0, 3.0):
        got = gold_hybrid(s, t, temperature=tau, **kw)
        want = L.forward_kl(s, t, labels=y, temperature=tau)
        assert float(got) == pytest.approx(float(want), rel=1e-10)
    assert abs(float(gold_hybrid(s, s.clone(), **kw))) < 1e-12


def test_gold_hybrid_no_pair_is_zero_with_zero_grad():
    s, t, ys, yt, so, to, vm, ms, mt = _gold_inputs()
    kw = _gold_kw(ys, yt, so, to + 100, vm, ms, mt)
    s.requires_grad_(True)
    out = gold_hybrid(s, t, **kw)
    out.backward()
    assert float(out.detach()) == 0.0 and (s.grad == 0).all()


def test_gold_hybrid_bad_inputs_raise_clearly():
    s, t, ys, yt, so, to, vm, ms, mt = _gold_inputs()
    kw = _gold_kw(ys, yt, so, to, vm, ms, mt)
    with pytest.raises(ValueError, match="needs vocab_map"):
        gold_hybrid(s, t, **{**kw, "vocab_map": None})
    with pytest.raises(ValueError, match="needs labels, teacher_labels"):
        gold_hybrid(s, t)
    with pytest.raises(
        ValueError, match=r"vocab_map has 5 entries but the teacher logits have V = 6"
    ):
        gold_hybrid(s, t, **{**kw, "vocab_map": vm[:5]})
    with pytest.raises(ValueError, match="injective"):
        gold_hybrid(s, t, **{**kw, "vocab_map": torch.tensor([4, 4, 7, 8, -1, -1])})
    with pytest.raises(ValueError, match=r"student ids in \[0, 9\)"):
        gold_hybrid(s, t, **{**kw, "vocab_map": torch.tensor([9, -1, 7, 8, -1, -1])})
    with pytest.raises(ValueError, match="student_offsets must be an integer tensor"):
        gold_hybrid(s, t, **{**kw, "student_offsets": so[:, :4]})
    with pytest.raises(ValueError, match="teacher_labels has shape"):
        gold_hybrid(s, t, **{**kw, "teacher_labels": ys})
    with pytest.raises(ValueError, match=r"counted teacher_labels must be token ids in \[0, 6\)"):
        gold_hybrid(s, t, **{**kw, "teacher_labels": yt + 3})
    with pytest.raises(ValueError, match="student logits must be"):
        gold_hybrid(s[..., 0], t, **kw)


# ----------------------------------------------------------------------------- real tokenizers


def _tokenizers():
    tk = pytest.importorskip("tokenizers")
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    corpus = ["the cat sat on the mat", "the dog sat on the log", "a cat and a dog", "the end"]
    word = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    word.pre_tokenizer = pre_tokenizers.Whitespace()
    word.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=["[UNK]"]))
    bpe = Tokenizer(models.BPE(unk_token="[UNK]"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=22, special_tokens=["[UNK]"]))
    assert tk is not None
    return word, bpe


def test_real_tokenizers_word_teacher_bpe_student():
    teacher_tok, student_tok = _tokenizers()
    text = "the cat sat on a log and the mat"
    et, es = teacher_tok.encode(text), student_tok.encode(text)
    # a small BPE splits the rarer words: "l"+"og", "a"+"nd", "m"+"at" vs whole words
    assert len(es.ids) > len(et.ids) and "og" in es.tokens and "log" in et.tokens
    vt, vs = teacher_tok.get_vocab_size(), student_tok.get_vocab_size()
    vm = build_vocab_map(student_tok, teacher_tok)
    assert vm.shape == (vt,)
    for tok, tid in teacher_tok.get_vocab().items():
        sid = student_tok.token_to_id(tok)
        assert int(vm[tid]) == (-1 if sid is None else sid)
    # causal LM shift: position k predicts token k+1, so the labels/offsets are those of ids[1:]
    yt, ys = torch.tensor([et.ids[1:]]), torch.tensor([es.ids[1:]])
    to, so = torch.tensor([et.offsets[1:]]), torch.tensor([es.offsets[1:]])
    g = torch.Generator().manual_seed(0)
    t = torch.randn(1, yt.shape[1], vt, generator=g, dtype=torch.float64)
    s = torch.randn(1, ys.shape[1], vs, generator=g, dtype=torch.float64, requires_grad=True)
    kw = dict(labels=ys, teacher_labels=yt, student_offsets=so, teacher_offsets=to, vocab_map=vm)
    index, exact = align_spans(so, to)
    ri, re = ref_align(so, to, torch.ones_like(ys, dtype=torch.bool),
                       torch.ones_like(yt, dtype=torch.bool))  # fmt: skip
    assert index.tolist() == ri and exact.tolist() == re
    n_match = sum(
        1 for i in range(ys.shape[1])
        if exact[0, i] and int(vm[int(yt[0, int(index[0, i])])]) == int(ys[0, i])
    )  # fmt: skip
    n_pair, n_pos = int((index >= 0).sum()), ys.shape[1]
    assert 1 <= n_match < n_pair < n_pos  # matched KL pairs, ULD pairs and unpaired positions
    got = gold_hybrid(s, t, **kw)
    ones_s, ones_t = torch.ones_like(ys, dtype=torch.bool), torch.ones_like(yt, dtype=torch.bool)
    ref = ref_gold(s.detach(), t, ys, yt, so, to, vm, ones_s, ones_t)
    assert float(got.detach()) == pytest.approx(ref, rel=1e-10)
    got.backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    u = uld(s, t, labels=ys, teacher_labels=yt)
    assert float(u.detach()) == pytest.approx(ref_uld(s.detach(), t, ones_s, ones_t), rel=1e-10)
    # the same tokenizer on both sides: every pair matches and the loss is forward KL
    s2 = torch.randn(1, yt.shape[1], vt, generator=g, dtype=torch.float64)
    same = dict(labels=yt, teacher_labels=yt, student_offsets=to, teacher_offsets=to,
                vocab_map=build_vocab_map(teacher_tok, teacher_tok))  # fmt: skip
    want = L.forward_kl(s2, t, labels=yt)
    assert float(gold_hybrid(s2, t, **same)) == pytest.approx(float(want), rel=1e-10)
