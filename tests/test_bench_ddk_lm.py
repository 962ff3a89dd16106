"""Smoke test of benchmarks/ddk_lm.py (DDK vs plain sampling on LM data with domains)."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow


def test_ddk_lm_benchmark_quick(bench_out, monkeypatch, tmp_path, one_thread):
    from benchmarks import ddk_lm as D

    p = D.main(["--quick", "--steps", "10"])
    saved = json.loads((tmp_path / "ddk_lm.json").read_text())
    assert set(saved["arms"]) == {"uniform", "ddk"}
    u, d = ({r["arm"]: r for r in saved["runs"]}[a] for a in ("uniform", "ddk"))
    assert u["domains"] == ["chain0", "chain1", "chain2"]
    assert u["teacher_ppl"] == d["teacher_ppl"]  # one teacher, scored once
    assert d["worst_ppl"] == max(d["student_ppl"].values()) and len(d["rounds"]) == 2
    diff = p["ddk_minus_uniform"]["worst_ppl"]["mean"]
    assert diff == pytest.approx(d["worst_ppl"] - u["worst_ppl"])
    assert "## DDK on the causal-LM pair" in (tmp_path / "benchmarks.md").read_text()
