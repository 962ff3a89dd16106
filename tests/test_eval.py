"""Evaluation metrics against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from mentor.eval import metrics as M


def _logits_from_probs(p):
    return torch.log(torch.tensor(p, dtype=torch.float32))


def test_ece_constructed_case():
    # confidences 0.9 (right), 0.9 (wrong), 0.62 (right), 0.62 (right)
    logits = _logits_from_probs([[0.9, 0.1], [0.9, 0.1], [0.38, 0.62], [0.62, 0.38]])
    labels = torch.tensor([0, 1, 1, 0])
    rel = M.reliability(logits, labels, n_bins=15)
    # bins (9/15, 10/15] and (13/15, 14/15]: |0.5 - 0.9| * 2/4 + |1.0 - 0.62| * 2/4
    assert rel["ece"] == pytest.approx(0.39, abs=1e-6)
    used = [c for c in rel["curve"] if c["count"]]
    assert [c["bin"] for c in used] == [9, 13]
    assert used[1]["accuracy"] == pytest.approx(0.5)
    assert sum(c["count"] for c in rel["curve"]) == 4


def test_ece_is_zero_for_a_calibrated_case():
    # 10 rows at confidence 0.7, 7 of them right
    logits = _logits_from_probs([[0.7, 0.3]] * 10)
    labels = torch.tensor([0] * 7 + [1] * 3)
    assert M.reliability(logits, labels)["ece"] == pytest.approx(0.0, abs=1e-6)


def test_agreement_accuracy_and_f1():
    s = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    t = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 5.0], [0.0, 1.0, 0.0]])
    y = torch.tensor([0, 1, 2, -100])
    assert M.agreement(s, t) == pytest.approx(0.5)
    assert M.accuracy(s, y) == pytest.approx(1.0)  # the -100 row is ignored
    # preds 0,2,2,1 vs labels 0,1,2,1: class0 F1=1, class1 P=1 R=.5 F1=2/3, class2 P=.5 R=1 F1=2/3
    assert M.macro_f1(t, torch.tensor([0, 1, 2, 1]), 3) == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)


def test_topk_overlap():
    s = torch.tensor([[5.0, 4.0, 3.0, 0.0, 0.0]])
    t = torch.tensor([[5.0, 0.0, 0.0, 4.0, 3.0]])
    # teacher top-3 {0,3,4}, student top-3 {0,1,2}: one shared
    assert M.topk_overlap(s, t, k=3) == pytest.approx(1 / 3)
    assert M.topk_overlap(t, t, k=3) == pytest.approx(1.0)
    assert M.topk_overlap(s, t, k=10) == pytest.approx(1.0)  # k capped at the class count


def test_perplexity_of_known_distribution():
    v = 10
    logits = torch.zeros(4, 6, v)  # uniform: perplexity = V
    labels = torch.randint(0, v, (4, 6))
    assert M.perplexity(logits, labels) == pytest.approx(v, rel=1e-5)
    # a model that puts probability 1/2 on every true token has perplexity 2
    z = torch.full((3, v), -1e9)
    y = torch.tensor([1, 2, 3])
    z[range(3), y] = 0.0
    z[range(3), (y + 1) % v] = 0.0
    assert M.perplexity(z, y) == pytest.approx(2.0, rel=1e-5)


def test_mean_kl_and_confusion():
    t = _logits_from_probs([[0.5, 0.5]])
    s = _logits_from_probs([[0.25, 0.75]])
    ref = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert M.mean_kl(t, s) == pytest.approx(ref, rel=1e-5)
    assert M.mean_kl(t, t) == pytest.approx(0.0, abs=1e-7)
    logits = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    assert M.confusion(logits, torch.tensor([0, 1, 1]), 2) == [[1, 0], [1, 1]]
