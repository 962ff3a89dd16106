"""Smoke test of benchmarks/served_teacher.py (in-process vs served vs cached teacher)."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow


def test_served_teacher_benchmark_quick(monkeypatch, tmp_path):
    """The quick run trains all three arms, their loss curves agree, and it writes its JSON
    and its docs section."""
    from benchmarks import _common as C
    from benchmarks import served_teacher as S

    monkeypatch.setenv("MENTOR_BENCH_RESULTS", str(tmp_path))
    monkeypatch.setenv("MENTOR_BENCH_DOC", str(tmp_path / "benchmarks.md"))
    monkeypatch.setattr(C, "RESULTS", tmp_path)
    monkeypatch.setattr(C, "DOC", tmp_path / "benchmarks.md")
    p = S.main(["--quick"])
    assert json.loads((tmp_path / "served_teacher.json").read_text())["parity"] == p["parity"]
    assert p["parity"]["agrees"] and p["parity"]["steps"] == 6
    assert p["parity"]["served_vs_in_process"] <= 1e-4
    assert p["parity"]["cached_vs_served"] <= 1e-4
    for arm in S.ARMS:
        assert p["steps_per_s"][arm]["median"] > 0 and p["steps_per_s"][arm]["n"] == 1
    assert p["served_overhead"] > -1
    doc = (tmp_path / "benchmarks.md").read_text()
    assert "<!-- served_teacher:start -->" in doc and "## Served teacher" in doc
    assert "Loss curves agree" in doc and "Measured on" in doc
