"""Smoke test of benchmarks/diffusion.py (few-step diffusion students vs NFE, speed-up)."""

from __future__ import annotations

import json
import math

import pytest

pytestmark = pytest.mark.slow


def test_diffusion_benchmark_quick(bench_out, monkeypatch, tmp_path, one_thread):
    from benchmarks import diffusion as D

    D.main(["--quick"])
    p = json.loads((tmp_path / "diffusion.json").read_text())
    assert p["seeds"] == [0] and p["workers"] == 1
    for rk, metric in (("2d", "mmd"), ("digits", "fd")):
        s = p["recipes"][rk]
        assert not s["errors"], s["errors"]
        t = s["teacher"]
        assert set(t) == {"1", "2", "4", "8", "50"}
        assert t["50"][metric]["mean"] < t["1"][metric]["mean"]  # more steps, better samples
        assert set(s["arms"]) == set(D.ARMS[rk])  # every objective of the table ran
        for label, a in s["arms"].items():
            assert not a["errors"], (label, a["errors"])
            assert set(a["nfe"]) == {"1", "2", "4"}
            assert a["teacher_rows_match"], label  # same teacher, same noise: same 1-NFE row
            for v in a["nfe"].values():
                assert math.isfinite(v[metric]["mean"]) and v[metric]["mean"] > 0
            assert a["train_s"]["mean"] > 0
        one = {label: a["nfe"]["1"][metric]["mean"] for label, a in s["arms"].items()}
        d = s["directions"]
        assert d["d2"]["diff"]["mean"] == pytest.approx(
            one["dmd2"] - one["consistency_distillation"]
        )
        dist = [v for label, v in one.items() if s["arms"][label]["objective"] in D.DISTILLING]
        assert d["d3"]["range"] == [min(dist), max(dist)]
        assert d["d3"]["holds"] == (one["consistency_training"] <= max(dist))
        sp = s["timing"]["speedup"]
        assert set(sp) == set(D.ARMS[rk])
        assert all(v["median"] > 3 for v in sp.values())  # 1 NFE vs 50 NFE, same network
    s = p["recipes"]["2d"]
    assert s["noise"]["mmd"]["mean"] > s["teacher"]["50"]["mmd"]["mean"]
    assert s["teacher"]["50"]["modes_covered"]["mean"] == 8
    fd = p["recipes"]["digits"]
    assert 0 < fd["feature_net"]["held_out_accuracy"] <= 1
    md = (tmp_path / "benchmarks.md").read_text()
    assert "## Few-step diffusion students" in md and "not FID" in md
    assert "### Paper directions" in md and (tmp_path / "img" / "diffusion.png").exists()
