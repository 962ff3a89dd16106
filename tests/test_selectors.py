"""Reference tests for the paper-based data-selection rules (mentor.selectors).

The expected values are computed by hand, or with an independent formula in the test, on small
tensors."""

from __future__ import annotations

import math

import pytest
import torch

from mentor.selectors import (
    LLKDState,
    ddk_domain_weights,
    kd3_combined,
    kd3_select,
    kd_pruned_weight,
    llkd_select,
    llkd_thresholds,
    prune_scores,
    rad_acquire,
    rad_gains,
    rad_probabilities,
)


def _log(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64).log().float()


def _h(p: list[float]) -> float:
    return -sum(x * math.log(x) for x in p if x > 0)


# ----------------------------------------------------------------------------- LLKD

T4 = [[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.2, 0.8]]  # teacher: labels 0, 0, 1, 1
S4 = [[0.5, 0.5], [0.8, 0.2], [0.5, 0.5], [0.8, 0.2]]  # student


def test_llkd_hand_computed_thresholds_and_mask():
    state = LLKDState()
    mask = llkd_select(_log(T4), _log(S4), state=state)
    # teacher: global mean confidence (.9+.6+.8+.8)/4 = .775; class means .475/.525
    tau_t = [0.475 / 0.525 * 0.775, 0.775]
    # student: mean entropy of two H(.5,.5) and two H(.8,.2); class means .65/.35
    h_mean = (2 * _h([0.5, 0.5]) + 2 * _h([0.8, 0.2])) / 4
    tau_s = [h_mean, 0.35 / 0.65 * h_mean]
    got_t, got_s = llkd_thresholds(state)
    assert got_t.tolist() == pytest.approx(tau_t, rel=1e-5)
    assert got_s.tolist() == pytest.approx(tau_s, rel=1e-5)
    # row 0: .9 >= .7012 and H=.693 >= .597 -> keep
    # row 1: teacher .6 < .7012 -> drop
    # row 2: .8 >= .775 and .693 >= .321 -> keep
    # row 3: .8 >= .775 and H(.8,.2)=.500 >= .321 (only because of class 1's lower threshold)
    assert mask.tolist() == [True, False, True, True]
    assert mask.dtype == torch.bool and state.rounds == 1
    # without a state the thresholds depend on this call alone: same mask
    assert llkd_select(_log(T4), _log(S4)).tolist() == [True, False, True, True]


def test_llkd_state_is_a_moving_average_across_rounds():
    state = LLKDState()
    llkd_select(_log(T4), _log(S4), state=state, momentum=0.5)
    teacher2 = _log([[0.5, 0.5]] * 4)  # confidence .5, class means .5/.5
    student2 = _log([[0.5, 0.5]] * 4)  # entropy ln 2
    mask = llkd_select(teacher2, student2, state=state, momentum=0.5)
    assert state.rounds == 2
    assert state.teacher_confidence == pytest.approx(0.5 * 0.775 + 0.5 * 0.5, rel=1e-6)
    assert state.teacher_class.tolist() == pytest.approx([0.4875, 0.5125], rel=1e-5)
    h_mean = (2 * _h([0.5, 0.5]) + 2 * _h([0.8, 0.2])) / 4
    assert state.student_uncertainty == pytest.approx(0.5 * h_mean + 0.5 * math.log(2), rel=1e-5)
    # teacher confidence .5 is below the carried-over thresholds (>= .6), so nothing is kept
    assert mask.tolist() == [False] * 4
    back = LLKDState.from_dict(state.as_dict())
    assert back.rounds == 2 and back.teacher_confidence == state.teacher_confidence
    assert torch.allclose(back.student_class, state.student_class)


def test_llkd_all_confident_teacher_and_uncertain_student_keeps_all():
    teacher = _log([[0.99, 0.01], [0.01, 0.99], [0.99, 0.01]])
    student = torch.zeros(3, 2)  # uniform: maximal need everywhere
    assert llkd_select(teacher, student).tolist() == [True, True, True]


def test_llkd_drops_what_the_student_already_knows():
    teacher = _log([[0.95, 0.05]] * 4)
    student = torch.tensor([[8.0, -8.0], [0.0, 0.0], [8.0, -8.0], [0.1, 0.0]])
    assert llkd_select(teacher, student).tolist() == [False, True, False, True]


def test_llkd_validates():
    t = _log(T4)
    with pytest.raises(ValueError, match="same shape"):
        llkd_select(t, torch.zeros(4, 3))
    with pytest.raises(ValueError, match="student_logits"):
        llkd_select(t, torch.full((4, 2), float("nan")))
    with pytest.raises(ValueError, match="teacher_logprobs"):
        llkd_select(torch.zeros(4), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="momentum"):
        llkd_select(t, t, momentum=1.0)
    state = LLKDState()
    llkd_select(t, t, state=state)
    with pytest.raises(ValueError, match="classes"):
        llkd_select(torch.zeros(2, 3), torch.zeros(2, 3), state=state)
    assert llkd_select(torch.zeros(0, 2), torch.zeros(0, 2)).shape == (0,)


# ----------------------------------------------------------------------------- RAD

# two classes: p_top = 1 - g/2 gives a student gain (1 - margin) of exactly g
GAINS = [0.2, 0.8, 0.1, 0.4]
LOGITS = _log([[1 - g / 2, g / 2] for g in GAINS])


def _worst(pi: list[float], g: list[float], b: float) -> float:
    """Worst-case expected gain when an adversary spoils the b best expected gains."""
    v = sorted((p * x for p, x in zip(pi, g)), reverse=True)
    whole = int(b)
    spoiled = sum(v[:whole]) + (b - whole) * (v[whole] if whole < len(v) else 0.0)
    return sum(v) - spoiled


def test_rad_gains_are_one_minus_margin():
    assert rad_gains(LOGITS).tolist() == pytest.approx(GAINS, abs=1e-6)
    with pytest.raises(ValueError, match="C >= 2"):
        rad_gains(torch.zeros(3, 1))


def test_rad_probabilities_hand_computed():
    # sorted gains .8, .4, .2, .1; k=1, one mistake. Level group {.8, .4}:
    # t = k / (1/.8 + 1/.4) = 4/15, p = t/g = (1/3, 2/3); worst case (2-1)*t = 4/15
    pi = rad_probabilities(LOGITS, 1, mistakes=1.0)
    assert pi.tolist() == pytest.approx([0.0, 1 / 3, 0.0, 2 / 3], abs=1e-6)
    assert _worst(pi.tolist(), GAINS, 1.0) == pytest.approx(4 / 15, abs=1e-6)
    # it beats the obvious alternatives against the same adversary
    assert _worst([0, 1, 0, 0], GAINS, 1.0) == 0.0  # top-1 by gain: spoiled
    assert _worst([0, 0.5, 0, 0.5], GAINS, 1.0) == pytest.approx(0.2)
    assert _worst([0.25] * 4, GAINS, 1.0) < 4 / 15
    # the default mistake count is the student's expected error: .1+.4+.05+.2 = .75 -> same
    assert rad_probabilities(LOGITS, 1).tolist() == pytest.approx(pi.tolist(), abs=1e-6)


def test_rad_without_mistakes_is_top_k_and_with_too_many_is_uniform():
    assert rad_probabilities(LOGITS, 2, mistakes=0.0).tolist() == pytest.approx([0, 1, 0, 1])
    assert rad_probabilities(LOGITS, 2, mistakes=4.0).tolist() == pytest.approx([0.5] * 4)
    confident = torch.tensor([[9.0, -9.0, -9.0]] * 3)  # zero gain everywhere: uniform
    assert rad_probabilities(confident, 1).tolist() == pytest.approx([1 / 3] * 3, abs=1e-6)


def test_rad_probabilities_sum_to_k_and_stay_in_unit_interval():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(40, 5, generator=g) * 2
    for k in (0, 1, 7, 20, 39, 40):
        for b in (None, 0.0, 2.5, 10.0):
            pi = rad_probabilities(logits, k, mistakes=b)
            assert float(pi.sum()) == pytest.approx(k, abs=1e-4)
            assert float(pi.min()) >= 0.0 and float(pi.max()) <= 1.0 + 1e-6


def test_rad_acquire_samples_with_the_inclusion_probabilities():
    pi = [0.0, 1 / 3, 0.0, 2 / 3]
    counts = [0] * 4
    draws = 3000
    for seed in range(draws):
        pos, w = rad_acquire(LOGITS, 1, generator=torch.Generator().manual_seed(seed), mistakes=1.0)
        assert len(pos) == 1 and w.tolist() == [1.0]
        counts[pos[0]] += 1
    assert [c / draws for c in counts] == pytest.approx(pi, abs=0.03)


def test_rad_acquire_is_deterministic_distinct_and_weighted():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 4, generator=g)
    a = rad_acquire(logits, 12, generator=torch.Generator().manual_seed(7))
    b = rad_acquire(logits, 12, generator=torch.Generator().manual_seed(7))
    assert a[0] == b[0] and torch.equal(a[1], b[1])
    assert len(set(a[0])) == 12 and a[0] == sorted(a[0])
    pos, w = rad_acquire(
        LOGITS, 1, generator=torch.Generator().manual_seed(1), mistakes=1.0, weighting="inverse"
    )
    expected = {1: 1 / (4 * (1 / 3)), 3: 1 / (4 * (2 / 3))}  # k / (N * p_i)
    assert w.tolist() == pytest.approx([expected[pos[0]]])
    assert rad_acquire(LOGITS, 4, generator=torch.Generator())[0] == [0, 1, 2, 3]
    assert rad_acquire(LOGITS, 0, generator=torch.Generator())[0] == []


def test_rad_acquire_validates():
    gen = torch.Generator()
    with pytest.raises(ValueError, match="k must be in"):
        rad_acquire(LOGITS, 5, generator=gen)
    with pytest.raises(ValueError, match="k must be in"):
        rad_acquire(LOGITS, -1, generator=gen)
    with pytest.raises(ValueError, match="generator"):
        rad_acquire(LOGITS, 1, generator=0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="mistakes"):
        rad_acquire(LOGITS, 1, generator=gen, mistakes=-1.0)
    with pytest.raises(ValueError, match="weighting"):
        rad_acquire(LOGITS, 1, generator=gen, weighting="ht")


# ----------------------------------------------------------------------------- KD^3


def test_kd3_hand_computed():
    teacher = _log([[0.9, 0.05, 0.05], [0.9, 0.05, 0.05], [0.99, 0.005, 0.005], [1 / 3] * 3])
    student = _log([[0.2, 0.7, 0.1], [0.05, 0.9, 0.05], [1 / 3] * 3, [1 / 3] * 3])
    q = kd3_combined(teacher, student)
    assert q[0].tolist() == pytest.approx([0.55, 0.375, 0.075], abs=1e-6)
    assert q[1].tolist() == pytest.approx([0.475, 0.475, 0.05], abs=1e-6)
    assert float(q[2, 0]) == pytest.approx((0.99 + 1 / 3) / 2, abs=1e-6)
    # .55 kept; confident disagreement (.475) dropped; sure teacher + unsure student kept;
    # nobody sure (1/3) dropped
    assert kd3_select(teacher, student).tolist() == [True, False, True, False]
    assert q.sum(-1).tolist() == pytest.approx([1.0] * 4, abs=1e-6)


def test_kd3_weights_and_threshold():
    teacher = _log([[0.96, 0.04], [0.9, 0.1]])
    student = _log([[0.1, 0.9], [0.1, 0.9]])
    assert kd3_select(teacher, student, student_weight=0.0, threshold=0.95).tolist() == [
        True,
        False,
    ]
    assert kd3_select(teacher, student, student_weight=1.0, threshold=0.9).tolist() == [
        True,
        True,
    ]
    with pytest.raises(ValueError, match="student_weight"):
        kd3_select(teacher, student, student_weight=1.5)
    with pytest.raises(ValueError, match="threshold"):
        kd3_select(teacher, student, threshold=-0.1)
    with pytest.raises(ValueError, match="same shape"):
        kd3_select(teacher, torch.zeros(3, 2))


# ----------------------------------------------------------------------------- DDK


def _softmax(xs: list[float]) -> list[float]:
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    return [x / sum(e) for x in e]


def test_ddk_initial_factor_is_softmax_of_perplexity_ratio():
    s, t = [2.0, 3.0, 1.5], [1.0, 1.0, 1.5]
    ratio = [math.exp(a) / math.exp(b) for a, b in zip(s, t)]  # l_S / l_T
    got = ddk_domain_weights(torch.tensor(s), torch.tensor(t), None)
    assert got.tolist() == pytest.approx(_softmax(ratio), rel=1e-5)
    assert got.dtype == torch.float32 and float(got.sum()) == pytest.approx(1.0, abs=1e-6)


def test_ddk_factor_smooth_update_hand_computed():
    s, t = [2.0, 1.0], [1.0, 1.0]  # ratios e and 1
    prev = [0.2, 0.8]
    psi = [prev[0] * math.exp(math.e), prev[1] * math.exp(1.0)]
    want = [0.5 * x / sum(psi) + 0.5 / 2 for x in psi]
    got = ddk_domain_weights(torch.tensor(s), torch.tensor(t), torch.tensor(prev))
    assert got.tolist() == pytest.approx(want, rel=1e-5)
    # smoothing=1: no constant term; smoothing=0: uniform
    full = ddk_domain_weights(torch.tensor(s), torch.tensor(t), torch.tensor(prev), smoothing=1.0)
    assert full.tolist() == pytest.approx([x / sum(psi) for x in psi], rel=1e-5)
    flat = ddk_domain_weights(torch.tensor(s), torch.tensor(t), torch.tensor(prev), smoothing=0.0)
    assert flat.tolist() == pytest.approx([0.5, 0.5])


def test_ddk_equal_gaps_shrink_previous_toward_uniform_and_floor_holds():
    prev = torch.tensor([0.7, 0.2, 0.1])
    got = ddk_domain_weights(torch.ones(3), torch.zeros(3), prev)
    assert got.tolist() == pytest.approx((0.5 * prev + 0.5 / 3).tolist(), rel=1e-6)
    huge = ddk_domain_weights(torch.tensor([50.0, 1.0, 1.0]), torch.ones(3), prev)
    assert torch.isfinite(huge).all() and float(huge.min()) >= 0.5 / 3 - 1e-6
    assert float(huge[0]) == pytest.approx(0.5 + 0.5 / 3, abs=1e-6)


def test_ddk_validates():
    with pytest.raises(ValueError, match="same shape"):
        ddk_domain_weights(torch.ones(2), torch.ones(3), None)
    with pytest.raises(ValueError, match="student_loss"):
        ddk_domain_weights(torch.tensor([float("nan"), 1.0]), torch.ones(2), None)
    with pytest.raises(ValueError, match="previous"):
        ddk_domain_weights(torch.ones(2), torch.ones(2), torch.tensor([0.5, 0.6]))
    with pytest.raises(ValueError, match="previous"):
        ddk_domain_weights(torch.ones(2), torch.ones(2), torch.ones(3) / 3)
    with pytest.raises(ValueError, match="smoothing"):
        ddk_domain_weights(torch.ones(2), torch.ones(2), None, smoothing=1.5)
    with pytest.raises(ValueError, match="teacher_loss"):
        ddk_domain_weights(torch.ones(2), torch.ones(2, 1), None)


# ----------------------------------------------------------------------------- data pruning


def test_kd_pruned_weight_couples_alpha_to_fraction():
    assert kd_pruned_weight(1.0) == pytest.approx(0.5)
    assert kd_pruned_weight(0.5) == pytest.approx(0.75)
    assert kd_pruned_weight(0.1) == pytest.approx(0.95)
    fs = [0.05, 0.1, 0.3, 0.7, 1.0]
    alphas = [kd_pruned_weight(f) for f in fs]
    assert alphas == sorted(alphas, reverse=True)  # less data -> more weight on the teacher
    assert kd_pruned_weight(0.5, alpha_full=0.2, alpha_empty=0.8) == pytest.approx(0.5)
    for bad in (0, 0.0, -0.1, 1.5, float("nan"), True, "0.5"):
        with pytest.raises(ValueError, match="fraction"):
            kd_pruned_weight(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="alpha_full"):
        kd_pruned_weight(0.5, alpha_full=2.0)


def test_prune_scores_el2n_hand_computed():
    teacher = _log([[0.7, 0.2, 0.1], [0.7, 0.2, 0.1]])
    got = prune_scores(teacher, torch.tensor([0, 2]), method="el2n")
    assert got.tolist() == pytest.approx([math.sqrt(0.14), math.sqrt(1.34)], rel=1e-5)


def test_prune_scores_random_is_seeded():
    teacher = torch.zeros(6, 3)
    a = prune_scores(teacher, method="random", generator=torch.Generator().manual_seed(5))
    b = prune_scores(teacher, method="random", generator=torch.Generator().manual_seed(5))
    c = prune_scores(teacher, method="random", generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert float(a.min()) >= 0.0 and float(a.max()) < 1.0


def test_prune_scores_validates_and_names_unbuilt_methods():
    teacher = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="generator"):
        prune_scores(teacher, method="random")
    with pytest.raises(ValueError, match="labels"):
        prune_scores(teacher, method="el2n")
    with pytest.raises(ValueError, match="labels"):
        prune_scores(teacher, torch.tensor([0, 3]), method="el2n")
    with pytest.raises(ValueError, match="labels"):
        prune_scores(teacher, torch.tensor([0.0, 1.0]), method="el2n")
    with pytest.raises(ValueError, match="not built"):
        prune_scores(teacher, torch.tensor([0, 1]), method="forgetting")
    with pytest.raises(ValueError, match="el2n"):
        prune_scores(teacher, method="el2m")
