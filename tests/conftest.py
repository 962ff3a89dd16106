"""Shared fixtures: tiny random models built in-process (tests never download)."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def one_thread():
    """Run a test on one thread: tiny models are fastest so, and do not thrash a busy machine.

    Modules use it as ``@pytest.fixture(autouse=True) def _one_thread(one_thread): ...``.
    """
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def tiny_lm() -> nn.Module:
    """A 2-layer Llama causal LM with hidden 32 and vocab 128 (random weights)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture
def tiny_bert() -> nn.Module:
    """A 2-layer BERT encoder with hidden 32 and vocab 128 (random weights)."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
    )
    return BertModel(cfg).eval()


@pytest.fixture
def tiny_classifier() -> nn.Module:
    """An MLP classifier 16 -> 32 -> 4."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))


@pytest.fixture
def tiny_cnn() -> nn.Module:
    """A one-conv CNN classifier for 1x8x8 images with 3 classes."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 3)
    )


class _Counting(nn.Module):
    """Wraps a module and counts its forward calls (e.g. how often a cache ran the teacher)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, x):
        self.calls += 1
        return self.inner(x)


@pytest.fixture
def counting():
    """The class of a module wrapper that counts forward calls: ``counting(model)``."""
    return _Counting


@pytest.fixture(scope="module")
def cache_toy():
    """Random 16-feature data with 6 classes and a random MLP teacher (cache tests)."""
    from mentor.data import build_data

    bundle = build_data("random", {"n": 240, "in_features": 16, "num_classes": 6}, 0.25, 0)
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 6)).eval()
    return bundle, teacher


@pytest.fixture
def bench_out(monkeypatch, tmp_path):
    """A benchmark's quick run writes into ``tmp_path`` (its JSON, docs page and plots) and uses
    a fresh fitted-teacher cache there, never benchmarks/results/ or docs/."""
    from benchmarks import _common as C

    monkeypatch.setenv("MENTOR_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(C, "use_quick_outputs", lambda: None)
    monkeypatch.setattr(C, "RESULTS", tmp_path)
    monkeypatch.setattr(C, "DOC", tmp_path / "benchmarks.md")
    return tmp_path
