"""Smoke test of benchmarks/teacher_hacking.py --quick (tiny random models, well under 60 s),
and of where its subsections land in docs/benchmarks.md."""

from __future__ import annotations

import json
import math

import pytest


@pytest.fixture
def bench_dirs(monkeypatch, tmp_path):
    """Results, docs and the teacher cache all under ``tmp_path``."""
    from benchmarks import _common

    monkeypatch.setenv("MENTOR_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MENTOR_BENCH_RESULTS", str(tmp_path / "results"))
    monkeypatch.setenv("MENTOR_BENCH_DOC", str(tmp_path / "benchmarks.md"))
    monkeypatch.setattr(_common, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(_common, "DOC", tmp_path / "benchmarks.md")
    return tmp_path


@pytest.mark.slow
def test_quick_run_writes_curves_memorization_json_and_docs(bench_dirs):
    from benchmarks import teacher_hacking as th

    p = th.main(["--quick", "--threads", "1"])
    q = th.QUICK
    saved = json.loads((bench_dirs / "results" / "teacher_hacking.json").read_text())
    assert saved["scale"]["quick"] is True
    for arm in ("offline", "online"):
        curve = p["arms"][arm]["curve"]
        assert [r["step"] for r in curve] == list(range(0, q.steps + 1, q.eval_every))
        for r in curve:
            for where in ("samples", "reference"):
                assert all(math.isfinite(v) and v >= 0 for v in r[where].values())
        assert set(p["arms"][arm]["verdicts"]) == {
            "samples_fwd", "samples_rev", "reference_fwd", "reference_rev",
        }  # fmt: skip
        assert len(p["arms"][arm]["losses"]) == q.steps
    mem = p["memorization"]
    assert {"ce_reference", "ce_teacher_greedy", "kd_soft", "teacher", "oracle"} <= set(mem)
    assert mem["teacher"]["train_vs_teacher_greedy"][f"exact@{max(q.mem_k)}"] == 1.0
    doc = (bench_dirs / "benchmarks.md").read_text()
    c, e = doc.index("### (c) Teacher hacking"), doc.index("### (e) Memorization")
    assert doc.index("## LLM distillation with generation") < c < e
    assert doc.count("## LLM distillation with generation") == 1

    # the teacher is built once and then loaded from the cache, keyed by its settings
    oracle, bundle = th._tiny_oracle(), th._random_prompts(q)
    ids = set(p["setup"]["train_prompt_ids"])
    _, meta = th.build_teacher(oracle, bundle, ids, q, p["setup"]["oracle"])
    assert meta["cached"] is True and not p["teacher"]["cached"]


def test_subsections_go_under_the_shared_heading_in_letter_order(bench_dirs):
    from benchmarks import _common as C

    parent = "LLM distillation with generation"
    head = f"## {parent}"
    C.update_section("first", "## Something else\n\ntext")
    # no chapter yet: (c) carries the heading, at the end; (e) follows it
    C.update_subsection("c_part", "### (c) Third\n\nccc", parent)
    C.update_subsection("e_part", "### (e) Fifth\n\neee", parent)
    doc = C.DOC.read_text()
    assert doc.count(head) == 1
    assert doc.index("## Something else") < doc.index(head) < doc.index("(c)") < doc.index("(e)")
    # another benchmark appends its own block, heading and (a) included, with update_section
    C.update_section("a_part", f"{head}\n\n### (a) First\n\naaa")
    C.update_section("later", "## Another chapter\n\nzzz")
    assert C.DOC.read_text().count(head) == 2
    C.update_subsection("c_part", "### (c) Third\n\nccc 2", parent)  # gathers the chapter
    C.update_subsection("e_part", "### (e) Fifth\n\neee 2", parent)
    C.update_subsection("b_part", "### (b) Second\n\nbbb", parent)
    C.update_subsection("d_part", "### (d) Fourth\n\nddd", parent)
    C.update_subsection("c_part", "### (c) Third\n\nccc 3", parent)  # re-run: same place
    C.update_section("a_part", f"{head}\n\n### (a) First\n\naaa 2")  # re-run in place
    doc = C.DOC.read_text()
    assert doc.count(head) == 1
    marks = ["## Something else", head, "aaa 2", "bbb", "ccc 3", "ddd", "eee 2", "## Another"]
    order = [doc.index(x) for x in marks]
    assert order == sorted(order), doc
    assert "ccc 2" not in doc and doc.count("<!-- c_part:start -->") == 1
    assert "\n\n\n" not in doc
