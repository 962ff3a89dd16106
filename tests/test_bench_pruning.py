"""Smoke test of benchmarks/pruning.py (one-shot pruned students, CPU cost)."""

from __future__ import annotations

import json
import math

import pytest

pytestmark = pytest.mark.slow


def test_pruning_benchmark_quick(bench_out, monkeypatch, tmp_path, one_thread):
    from benchmarks import pruning as P

    P.main(["--quick"])
    p = json.loads((tmp_path / "pruning.json").read_text())
    rows = {r["arm"]: r for r in p["rows"]}
    assert rows["wanda 50%"]["zero_fraction"] > 0.3  # the prunable weights are half zeros
    assert rows["1 of 2 layers, importance"]["param_share"] < 1.0
    for r in p["rows"]:
        assert r["ratio_to_teacher"] == pytest.approx(r["perplexity"] / p["teacher"]["perplexity"])
    c = p["cost"]
    assert c["teacher"]["latency_speedup"] == 1.0
    assert c["wanda 50%"]["compressed_bytes"] < c["teacher"]["compressed_bytes"]
    assert "## Pruned and sparse students" in (tmp_path / "benchmarks.md").read_text()


def test_pruning_recovery_benchmark_quick(bench_out, monkeypatch, tmp_path, one_thread):
    from benchmarks import pruning_recovery as R

    p = R.main(["--quick", "--steps", "3"])
    rows = {r["arm"]: r for r in p["rows"]}
    assert list(rows) == [a[0] for a in R.ARMS]
    for r in rows.values():
        assert math.isfinite(r["perplexity"]) and r["perplexity"] > 1
    # the masks held through training: 70% one-shot and staged end equally sparse, 50% less so
    z = {k: r["zero_fraction"] for k, r in rows.items()}
    assert z["wanda 70% one-shot + KD"] == pytest.approx(z["wanda 30→50→70% staged + KD"], abs=1e-3)
    assert z["wanda 50% + KD"] < z["wanda 70% one-shot + KD"]
    md = R.markdown(p)
    assert "### (b) Recovery after pruning" in md and "KD < CE at 50%" in md
