"""Smoke test of benchmarks/search_proxy.py (mentor search's proxies vs distilled accuracy)."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow


def test_search_proxy_benchmark_quick(monkeypatch, tmp_path, one_thread):
    from benchmarks import _common as C
    from benchmarks import search_proxy as S

    from mentor.search import spearman

    monkeypatch.setenv("MENTOR_BENCH_RESULTS", str(tmp_path))
    monkeypatch.setenv("MENTOR_BENCH_DOC", str(tmp_path / "benchmarks.md"))
    monkeypatch.setenv("MENTOR_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(C, "RESULTS", tmp_path)
    monkeypatch.setattr(C, "DOC", tmp_path / "benchmarks.md")
    p = S.main(["--quick"])
    saved = json.loads((tmp_path / "search_proxy.json").read_text())
    assert saved["recipes"].keys() == p["recipes"].keys() == {"digits"}
    r = p["recipes"]["digits"]
    assert len(r["candidates"]) == 4
    final = [c["final"]["score"] for c in r["candidates"]]
    assert r["best_final"] == max(final) and all(0 < f <= 1 for f in final)
    for proxy in ("diswot", "short_kd"):
        xs = [c[proxy]["score"] for c in r["candidates"]]
        assert r["spearman"][proxy] == spearman(xs, final)
        assert r["cost"][proxy]["search"] > 0
        assert r["picks"][proxy]["regret"] >= 0
    md = (tmp_path / "benchmarks.md").read_text()
    assert "## Pruned and sparse students" in md
    assert "### (d) Which student: `mentor search`'s proxies vs distilled accuracy" in md
    assert (tmp_path / "img" / "search_proxy.png").exists()
