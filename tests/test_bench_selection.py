"""Smoke test of benchmarks/selection_budget.py (every selection method vs random; few labels)."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow


def test_selection_budget_benchmark_quick(monkeypatch, tmp_path, one_thread):
    """Every method pays exactly its budget; the few-label arms train; the section is written."""
    from benchmarks import _common as C
    from benchmarks import selection_budget as B

    monkeypatch.setenv("MENTOR_BENCH_RESULTS", str(tmp_path))
    monkeypatch.setenv("MENTOR_BENCH_DOC", str(tmp_path / "benchmarks.md"))
    monkeypatch.setenv("MENTOR_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(C, "RESULTS", tmp_path)
    monkeypatch.setattr(C, "DOC", tmp_path / "benchmarks.md")
    p = B.main(["--quick", "--seeds", "1", "--methods", "random,llkd,kd_pruned,label_free"])
    saved = json.loads((tmp_path / "selection_budget_quick.json").read_text())
    assert saved["budget"]["arms"].keys() == p["budget"]["arms"].keys()
    assert "partial" not in saved
    for key, arm in p["budget"]["arms"].items():
        for r in arm["runs"]:
            assert r["teacher_calls"] == arm["budget"], key
            assert 0.0 <= r["accuracy"] <= 1.0
    for f, row in p["few_labels"].items():
        assert row["labelled"] == round(float(f) * p["budget"]["pool"])
        assert {"teacher", "ce_labelled_only", "kd", "label_free_kd"} <= set(row)
        steps = {row[a]["runs"][0]["steps"] for a in ("ce_labelled_only", "kd", "label_free_kd")}
        assert len(steps) == 1  # equal steps for every arm of a fraction
    doc = (tmp_path / "benchmarks.md").read_text()
    assert "## Teacher budgets and data selection" in doc and "| llkd |" in doc
    assert "KD − CE" in doc
