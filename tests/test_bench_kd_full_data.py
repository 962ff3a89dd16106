"""Smoke test of benchmarks/kd_full_data.py (KD vs no KD with every label, one change at a time)."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow


def test_kd_full_data_benchmark_quick(monkeypatch, tmp_path, one_thread):
    from benchmarks import _common as C
    from benchmarks import kd_full_data as K

    monkeypatch.setenv("MENTOR_BENCH_RESULTS", str(tmp_path))
    monkeypatch.setenv("MENTOR_BENCH_DOC", str(tmp_path / "benchmarks.md"))
    monkeypatch.setenv("MENTOR_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(C, "RESULTS", tmp_path)
    monkeypatch.setattr(C, "DOC", tmp_path / "benchmarks.md")
    p = K.main(["--quick", "--seeds", "1"])
    assert (
        json.loads((tmp_path / "kd_full_data.json").read_text())["arms"].keys() == p["arms"].keys()
    )
    a = p["arms"]
    assert a["no_kd"]["minus_no_kd"]["mean"] == 0.0
    d = a["recipe"]["runs"][0]["accuracy"] - a["no_kd"]["runs"][0]["accuracy"]
    assert a["recipe"]["minus_no_kd"]["mean"] == pytest.approx(d)
    assert all(0 < r["teacher_accuracy"] <= 1 for r in a["recipe"]["runs"])
    assert "## Why KD < no KD with every label" in (tmp_path / "benchmarks.md").read_text()
