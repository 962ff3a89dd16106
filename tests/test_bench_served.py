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


def _llamacpp_payload() -> dict:
    from benchmarks import _common as C

    curves = {"in_process": [6.7, 6.1, 5.6], "llamacpp": [6.6, 6.0, 5.4]}
    return {
        "config": {"texts": 20, "block": 64, "top_k": 20, "steps": 3, "warmup": 1,
                   "batch_size": 4, "student_layers": [0, 29]},
        "machine": C.machine_info(),
        "llama_cpp_python": "0.3.36",
        "server_command": ["python", "-m", "llama_cpp.server", "--model", "x.gguf"],
        "response_format": {"tokens": ["The", " BBC"], "top_logprobs": [None, {" said": -1.0}]},
        "client_reads_it_as": {"mode": "text", "form": "text", "shift": 1, "max_tokens": 1},
        "agreement": {"positions": 1260, "top1_agreement": 0.9, "topk_overlap": 0.95,
                      "abs_dlogprob_mean": 0.1, "abs_dlogprob_p99": 0.5, "abs_dlogprob_max": 1.3,
                      "top1_abs_dlogprob_mean": 0.06, "top1_abs_dlogprob_max": 0.4,
                      "abs_dtail_mean": 0.05},
        "served_vs_llamacpp_direct": {"top1_agreement": 0.96, "topk_overlap": 0.98,
                                      "abs_dlogprob_mean": 1e-7, "abs_dlogprob_max": 5e-7,
                                      "top1_shared_string": 0.036,
                                      "top1_shared_string_tokens": {"Ġ": 45}},
        "client_stats": {"positions": 1260, "requests": 40, "entries": 32000, "ambiguous": 400,
                         "retokenized": 0},
        "seconds": {"in_process_forward": 3.0, "served": 200.0, "probe": 10.0},
        "training": {"loss_curves": curves, "max_abs_loss_diff": 0.2, "mean_abs_loss_diff": 0.13,
                     "steps_per_s": {"in_process": 0.3, "llamacpp": 0.03}},
        "max_tokens_0": {"answered": False, "waited_s": 15.0},
        "wall_s": 600.0,
    }  # fmt: skip


def test_llamacpp_section_renders_into_the_served_teacher_chapter(monkeypatch, tmp_path):
    """(d) without llama.cpp: its markdown, placed after the chapter's own section; and the
    flag it needs."""
    from benchmarks import _common as C
    from benchmarks import served_teacher as S

    doc = tmp_path / "benchmarks.md"
    doc.write_text(
        "# Benchmarks\n\n<!-- served_teacher:start -->\n## Served teacher\n\ntext\n"
        "<!-- served_teacher:end -->\n\n<!-- other:start -->\n## Other\n<!-- other:end -->\n"
    )
    monkeypatch.setattr(C, "DOC", doc)
    md = S.llamacpp_markdown(_llamacpp_payload(), "")
    assert md.startswith("### (d) llama.cpp's server as the teacher")
    assert "| same top-1 token | 90.0% |" in md and "no answer within 15 s" in md
    assert "400 of 32000 read" in md and "entry j is the distribution *after* token j" in md
    assert "at 3.6% of positions llama.cpp's own top-1 token" in md and "`Ġ` (a bare" in md
    C.update_subsection(S.LLAMA_NAME, md, S.PARENT)
    text = doc.read_text()
    assert text.index("## Served teacher") < text.index("### (d)") < text.index("## Other")
    assert text.count("## Served teacher") == 1
    with pytest.raises(SystemExit):
        S.main(["--llamacpp-only"])  # needs --llamacpp-python
