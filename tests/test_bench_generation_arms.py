"""benchmarks/generation_arms.py: the verdict on GKD's direction and the generated section, from
synthetic results (the real run trains SmolLM2 pairs; see docs/benchmarks.md)."""

from __future__ import annotations

from benchmarks import generation_arms as G


def _row(arm, nll, kl, seed=0):
    return {"arm": arm, "seed": seed, "train_s": 1.0, "teacher_nll": nll,
            "kl_student_teacher": kl, "kl_teacher_student": 1.0, "distinct_2": 0.5,
            "perplexity": 10.0}  # fmt: skip


def test_verdict_says_whether_on_policy_beats_off_policy():
    rows = [_row("kd_off", 3.0, 2.0), _row("on_policy", 2.0, 1.0), _row("mixed", 2.5, 1.5)]
    v = G._verdict(rows)
    assert v.count("holds") == 2 and "does not hold" not in v
    rows = [_row("kd_off", 3.0, 2.0), _row("on_policy", 4.0, 1.0), _row("mixed", 2.5, 1.5)]
    v = G._verdict(rows)
    assert (
        "teacher_nll: on-policy 4.000, mixed 2.500 vs off-policy 3.000 — GKD's direction does not hold"
        in v
    )
    assert (
        "kl_student_teacher: on-policy 1.000, mixed 1.500 vs off-policy 2.000 — GKD's direction holds"
        in v
    )
    assert G._verdict([_row("kd_off", 1, 1)]).startswith("No verdict")


def test_markdown_averages_seeds_and_reports_bf16():
    rows = [_row("kd_off", 3.0, 2.0, 0), _row("kd_off", 5.0, 4.0, 1), _row("on_policy", 2.0, 1.0)]
    speed = {"median": 0.5, "min": 0.4, "max": 0.6, "n": 2}
    p = {
        "machine": {"cpu": "cpu", "cores": 2, "torch_threads": 2, "python": "3", "torch": "2",
                    "mentor": "0", "date": "2026-11-27"},
        "load": "", "steps": 30, "limit": 400, "seeds": [0, 1], "arms": rows,
        "verdict": "V.", "bf16_steps": 8, "bf16_rounds": 2, "cpu_bf16": "avx512_bf16",
        "bf16": {"speed": {"off": {"fp32": speed, "bf16": speed, "speedup": 1.0}},
                 "fidelity": {"top1_agreement": 0.99, "kl_fp32_bf16": 1e-3, "tokens": 100}},
        "bf16_verdict": "W.",
    }  # fmt: skip
    md = G._markdown(p)
    assert md.startswith("### (b)")
    assert "| kd_off | 4.000 | 3.000 |" in md  # the mean over the two seeds
    assert "| on_policy | 2.000 | 1.000 |" in md
    md = G._markdown_bf16(p)
    assert md.startswith("### (d)")
    assert "| off | 0.500 (0.400–0.600) | 0.500 (0.400–0.600) | 1.00× |" in md
    assert "agreement of the bf16 teacher with the fp32 teacher 0.9900" in md
