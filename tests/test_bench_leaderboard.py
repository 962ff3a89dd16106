"""Smoke test of benchmarks/leaderboard.py's low-data regime (students see a share of the data)."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow


def test_leaderboard_low_data_regime_quick(bench_out, monkeypatch, tmp_path, one_thread):
    from benchmarks import leaderboard as L

    monkeypatch.setattr(L, "ROWS", list(L.ROWS))
    p = L.main(["--quick", "--regime", "low", "--fraction", "0.1", "--recipes", "vision",
                "--rows", "student (no KD)", "kd"])  # fmt: skip
    saved = json.loads((tmp_path / "leaderboard_low.json").read_text())
    res = saved["results"][0]
    assert saved["regime"] == "low" and saved["fraction"] == 0.1
    # the students saw a tenth of the training set (stratified), for the full regime's steps
    assert res["student_examples"] == round(0.1 * res["train_examples"])
    assert [r["row"] for r in res["table"]] == ["student (no KD)", "kd"]
    assert all(0 < r["acc_mean"] <= 1 for r in res["table"])
    assert res["findings"][0].startswith("KD > no KD")
    doc = (tmp_path / "benchmarks.md").read_text()
    assert "low-data regime (10% of the training set)" in doc and "students see" in doc
    assert p["results"][0]["steps"] == res["steps"]
