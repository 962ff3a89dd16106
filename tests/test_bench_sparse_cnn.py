"""Smoke test of benchmarks/sparse_cnn.py (very sparse CNN/MLP students, recovery arms)."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow


def test_sparse_cnn_benchmark_quick(bench_out, monkeypatch, tmp_path, one_thread):
    from benchmarks import sparse_cnn as S

    S.main(["--quick"])
    p = json.loads((tmp_path / "sparse_cnn.json").read_text())
    assert {r["arm"] for r in p["runs"]} == set(S.ARMS)
    for r in p["runs"]:  # every arm ends at the requested sparsity (masks kept in training)
        assert r["zeros"] == pytest.approx(0.9, abs=0.01), r["arm"]
    acc = {r["arm"]: r["accuracy"] for r in p["runs"]}
    assert acc["magnitude + KD"] > acc["magnitude, no training"]  # recovery helps at 90%
    assert "### (c) Very sparse CNN students" in (tmp_path / "benchmarks.md").read_text()
