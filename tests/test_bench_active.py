"""Smoke test of benchmarks/active_labels.py (random vs active labelling at equal calls)."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow


def test_active_labels_benchmark_quick(monkeypatch, tmp_path, one_thread):
    """Every arm pays exactly its budget, the curve ends at it, and the section is written."""
    from benchmarks import _common as C
    from benchmarks import active_labels as A

    monkeypatch.setenv("MENTOR_BENCH_RESULTS", str(tmp_path))
    monkeypatch.setenv("MENTOR_BENCH_DOC", str(tmp_path / "benchmarks.md"))
    monkeypatch.setenv("MENTOR_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(C, "RESULTS", tmp_path)
    monkeypatch.setattr(C, "DOC", tmp_path / "benchmarks.md")
    p = A.main(["--quick", "--seeds", "1"])
    assert json.loads((tmp_path / "active_labels.json").read_text())["arms"] == p["arms"]
    assert 0.5 < p["labeller"]["val_accuracy"] <= 1.0
    for key, arm in p["arms"].items():
        assert len(arm["runs"]) == 1
        for r in arm["runs"]:
            assert r["teacher_calls"] == arm["budget"], key
            assert r["curve"][-1] == [arm["budget"], r["accuracy"]]
            assert [c for c, _ in r["curve"]] == sorted(c for c, _ in r["curve"])
    gold = p["references"]["gold_labels_no_teacher"]["accuracy"]["mean"]
    assert gold > p["arms"]["random@60"]["accuracy"]["mean"]  # all labels beat 60 teacher calls
    assert p["latency"]["speedup"] > 0
    doc = (tmp_path / "benchmarks.md").read_text()
    assert "## Teacher budgets and data selection" in doc and "| random |" in doc
