"""Sparse teacher signals: TopK and Sampled."""

from __future__ import annotations

import pytest
import torch

from mentor.signals import Sampled, TopK


def test_topk_from_logits_values_and_tail():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 3, 10, generator=g, dtype=torch.float64)
    sig = TopK.from_logits(z, 4)
    assert sig.indices.shape == (2, 3, 4) and sig.tail.shape == (2, 3) and sig.k == 4
    lp = torch.log_softmax(z, -1)
    torch.testing.assert_close(sig.logprobs, lp.gather(-1, sig.indices))
    assert (sig.logprobs[..., :-1] >= sig.logprobs[..., 1:]).all()
    torch.testing.assert_close(sig.tail.exp(), 1 - sig.logprobs.exp().sum(-1))
    full = TopK.from_logits(z, 10)
    assert torch.isinf(full.tail).all() and (full.tail < 0).all()
    with pytest.raises(ValueError, match="k must be"):
        TopK.from_logits(z, 11)


def test_topk_half_precision_is_upcast():
    z = torch.randn(4, 16).to(torch.bfloat16)
    sig = TopK.from_logits(z, 3)
    assert sig.logprobs.dtype == torch.float32


def test_topk_indexing_reshape_to():
    z = torch.randn(2, 5, 8)
    sig = TopK.from_logits(z, 3)
    part = sig[:, 1:3]
    assert part.shape == (2, 2) and part.indices.shape == (2, 2, 3)
    torch.testing.assert_close(part.logprobs, sig.logprobs[:, 1:3])
    flat = sig.reshape(-1)
    assert flat.shape == (10,) and len(flat) == 10
    m = torch.zeros(2, 5, dtype=torch.bool)
    m[1, 2] = True
    assert sig[m].shape == (1,)
    assert sig.to("cpu").device.type == "cpu"
    assert sig.detach().logprobs.requires_grad is False
    with pytest.raises(ValueError, match="same shape"):
        TopK(sig.indices[..., :2], sig.logprobs, sig.tail)
    with pytest.raises(ValueError, match="leading shape"):
        TopK(sig.indices, sig.logprobs, sig.tail[:, :2])


def test_sampled_from_logits_counts_and_logprobs():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 4, 12, generator=g)
    sig = Sampled.from_logits(z, 16, generator=g, temperature=2.0)
    assert sig.indices.shape == (3, 4, 16) and sig.shape == (3, 4)
    assert (sig.counts.sum(-1) == 16).all()
    for ids, cnt in zip(sig.indices.reshape(-1, 16), sig.counts.reshape(-1, 16)):
        used = ids[cnt > 0].tolist()
        assert len(used) == len(set(used))  # distinct ids per row
    lp = torch.log_softmax(z / 2.0, -1)
    torch.testing.assert_close(sig.logprobs, lp.gather(-1, sig.indices))
    assert sig.temperature == 2.0


def test_sampled_reproducible_and_empirical_frequencies():
    z = torch.tensor([[2.0, 0.0, -1.0, 1.0]])
    a = Sampled.from_logits(z, 8, torch.Generator().manual_seed(3))
    b = Sampled.from_logits(z, 8, torch.Generator().manual_seed(3))
    assert torch.equal(a.indices, b.indices) and torch.equal(a.counts, b.counts)
    big = Sampled.from_logits(z, 200_000, torch.Generator().manual_seed(0))
    freq = torch.zeros(4).index_add_(0, big.indices[0], big.counts[0].float()) / 200_000
    torch.testing.assert_close(freq, torch.softmax(z[0], -1), atol=5e-3, rtol=0)


def test_sampled_slicing_and_validation():
    sig = Sampled.from_logits(torch.randn(2, 6, 5), 4)
    part = sig[:, :3]
    assert part.shape == (2, 3) and part.logprobs.shape == (2, 3, 4)
    assert sig.reshape(-1).shape == (12,) and len(sig) == 2
    assert sig.to("cpu").temperature == sig.temperature
    with pytest.raises(ValueError, match="same shape"):
        Sampled(sig.indices, sig.counts[..., :2])
    with pytest.raises(ValueError, match="n must be"):
        Sampled.from_logits(torch.randn(2, 5), 0)
