"""Teacher budgets and data selection (mentor.selection): selectors, the budget-counting
teacher, the engine's growing paid set, resume, and the recipe checks."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mentor.assembly import distill
from mentor.config import ConfigError, load_config
from mentor.selection import (
    SELECTORS,
    BudgetTeacher,
    Selection,
    entropy_scores,
    least_confidence_scores,
    margin_scores,
    pick,
)
from mentor.teachers.base import TeacherOutput, TeacherSource

FAST = ["teacher.fit.epochs=2", "train.progress=false", "eval.every=null", "train.log_every=5",
        "student.params.hidden=[16]", "train.schedule=constant", "train.epochs=null"]  # fmt: skip
SEL = ["selection.method=entropy", "selection.budget=300", "selection.every=1",
       "selection.params.initial=100", "selection.params.per_round=50"]  # fmt: skip


@pytest.fixture(autouse=True)
def _one(one_thread):
    pass


def _run(out, *over, resume=False):
    cfg = load_config("digits", [f"output.dir={out}", *FAST, *SEL, *over])
    return distill(cfg, resume=resume, quiet=True)


# ----------------------------------------------------------------------------- selectors


def test_selector_scores_match_their_formulas():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0], [1.0, 1.0, -5.0]])
    p = logits.softmax(-1)
    ent = -(p * p.log()).sum(-1)
    assert torch.allclose(entropy_scores(logits), ent)
    assert math.isclose(float(entropy_scores(logits)[1]), math.log(3), rel_tol=1e-6)
    top = p.sort(-1, descending=True).values
    assert torch.allclose(margin_scores(logits), -(top[:, 0] - top[:, 1]))
    assert float(margin_scores(logits)[2]) == pytest.approx(0.0, abs=1e-7)  # a tie: top margin
    assert torch.allclose(least_confidence_scores(logits), 1 - top[:, 0])
    assert set(SELECTORS.names()) >= {"random", "entropy", "margin", "least_confidence"}


def test_pick_takes_the_highest_scores_and_breaks_ties_by_position():
    assert pick(torch.tensor([0.1, 0.9, 0.5, 0.9, 0.0]), 3) == [1, 3, 2]
    assert pick(torch.zeros(4), 2) == [0, 1]


# ----------------------------------------------------------------------------- budget teacher


class _Counting(TeacherSource):
    """A fake classification teacher: class = example id mod 3; counts the ids it is asked."""

    def __init__(self):
        self.asked: list[int] = []

    def __call__(self, batch):
        ids = [int(i) for i in batch["index"]]
        self.asked += ids
        return TeacherOutput(logits=torch.nn.functional.one_hot(torch.tensor(ids) % 3, 3) * 5.0)


def _fetch(ids):
    return {"index": torch.tensor(ids)}


def test_budget_teacher_pays_once_up_to_the_budget_and_logs_every_call(tmp_path):
    inner = _Counting()
    t = BudgetTeacher(inner, budget=5)
    t.open_log(tmp_path / "labels.jsonl", resume=False)
    assert t.pay([1, 2, 3], _fetch) == 3
    assert t.pay([3, 4, 5, 6, 7], _fetch) == 2  # 3 was paid; only 2 calls left
    assert inner.asked == [1, 2, 3, 4, 5] and t.spent == 5 and t.order == [1, 2, 3, 4, 5]
    lines = [json.loads(x) for x in (tmp_path / "labels.jsonl").read_text().splitlines()]
    assert [r["index"] for r in lines] == [1, 2, 3, 4, 5]
    assert [r["label"] for r in lines] == [1, 2, 0, 1, 2]
    out = t({"index": torch.tensor([4, 1])}).logits
    assert out.argmax(-1).tolist() == [1, 1] and inner.asked == [1, 2, 3, 4, 5]
    t({"index": torch.tensor([9])})  # never paid (held-out): asked, counted apart
    assert t.eval_calls == 1 and t.spent == 5


def test_a_resumed_budget_teacher_reuses_the_labels_already_paid_for(tmp_path):
    log = tmp_path / "labels.jsonl"
    first = BudgetTeacher(_Counting(), budget=10)
    first.open_log(log, resume=False)
    first.pay([0, 1, 2, 3], _fetch)
    with open(log, "a") as f:
        f.write('{"index": 99, "lab')  # a kill in the middle of a line
    inner = _Counting()
    again = BudgetTeacher(inner, budget=10)  # the checkpoint had nothing paid yet
    again.open_log(log, resume=True)
    assert again.pay([0, 1, 2, 3, 4], _fetch) == 5
    assert inner.asked == [4]  # the four paid labels were read back, not bought again
    assert torch.equal(again.store[2], first.store[2])
    assert [json.loads(x)["index"] for x in log.read_text().splitlines()] == [0, 1, 2, 3, 4]


def test_budget_teacher_state_round_trips():
    t = BudgetTeacher(_Counting(), budget=4)
    t.pay([5, 6], _fetch)
    u = BudgetTeacher(_Counting(), budget=4)
    u.load_state_dict(t.state_dict())
    assert u.order == [5, 6] and torch.equal(u.store[6], t.store[6])


def test_selection_sizes_and_steps():
    data = [{"index": torch.tensor(i), "labels": torch.tensor(0)} for i in range(100)]
    s = Selection("entropy", 70, 2, _Counting(), data, lambda b: b, initial=30, per_round=25)
    assert [s.size(e) for e in range(6)] == [30, 30, 55, 55, 70, 70]
    assert s.steps(6, 10, 1) == 3 + 3 + 5 + 5 + 7 + 7
    assert s.steps(2.5, 10, 1) == 3 + 3 + math.ceil(0.5 * 5)


# ----------------------------------------------------------------------------- engine


def test_a_selection_run_pays_exactly_the_budget_and_trains_on_teacher_labels(tmp_path):
    res = _run(tmp_path / "r", "train.max_steps=40")
    summary = json.loads((res.run_dir / "selection.json").read_text())
    assert summary["teacher_calls"] == 300 and summary["calls_this_process"] == 300
    rounds = summary["rounds"]
    assert [r["teacher_calls"] for r in rounds] == [100, 150, 200, 250, 300]
    assert rounds[0]["by"] == "random" and {r["by"] for r in rounds[1:]} == {"entropy"}
    assert rounds[0]["val_accuracy_before"] is None
    assert all(0.0 <= r["val_accuracy_before"] <= 1.0 for r in rounds[1:])
    assert sum(sum(r["picked_per_class"].values()) for r in rounds) == 300
    labels = [
        json.loads(x) for x in (res.run_dir / "teacher_labels.jsonl").read_text().splitlines()
    ]
    assert len(labels) == 300 and len({r["index"] for r in labels}) == 300
    recs = [json.loads(x) for x in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["teacher_calls"] for r in recs if r["kind"] == "selection"] == [
        100,
        150,
        200,
        250,
        300,
    ]


def test_resume_of_a_selection_run_is_exact_and_buys_nothing_twice(tmp_path):
    ref = _run(tmp_path / "ref", "train.max_steps=30", "train.checkpoint_every=100")
    teacher = [f"teacher.path={ref.run_dir}/teacher", "teacher.fit=null"]
    full = _run(tmp_path / "full", "train.max_steps=30", *teacher)
    run = tmp_path / "cut"
    _run(run, "train.max_steps=12", "train.checkpoint_every=4", *teacher)  # 3 rounds paid
    res = _run(run, "train.max_steps=30", *teacher, resume=True)
    a = load_file(str(full.run_dir / "student" / "model.safetensors"))
    b = load_file(str(res.run_dir / "student" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    s = json.loads((res.run_dir / "selection.json").read_text())
    assert s["teacher_calls"] == 300 and s["calls_this_process"] == 300 - 200
    ra = json.loads((full.run_dir / "selection.json").read_text())["rounds"]
    assert s["rounds"] == ra  # the same rounds, each logged once


def test_selection_every_n_steps_selects_on_step_boundaries_and_resumes_exactly(tmp_path):
    steps = ["selection.every=7 steps", "train.max_steps=30"]
    ref = _run(tmp_path / "ref", *steps, "train.checkpoint_every=100")
    s = json.loads((ref.run_dir / "selection.json").read_text())
    assert (s["every"], s["every_unit"]) == (7, "steps")
    rounds = s["rounds"]
    # a round every 7 optimizer steps, whatever the epoch length (50 examples per round)
    assert [r["step"] for r in rounds] == [1, 8, 15, 22, 29]
    assert [r["teacher_calls"] for r in rounds] == [100, 150, 200, 250, 300]
    assert [r["round"] for r in rounds] == [0, 1, 2, 3, 4]
    teacher = [f"teacher.path={ref.run_dir}/teacher", "teacher.fit=null"]
    full = _run(tmp_path / "full", *steps, *teacher)
    run = tmp_path / "cut"
    _run(
        run, "selection.every=7 steps", "train.max_steps=10", "train.checkpoint_every=10", *teacher
    )  # fmt: skip  (stops mid-round 1)
    res = _run(run, *steps, *teacher, resume=True)
    a = load_file(str(full.run_dir / "student" / "model.safetensors"))
    b = load_file(str(res.run_dir / "student" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((res.run_dir / "selection.json").read_text())["rounds"] == rounds_of(full)


def test_kd3_trains_on_the_combined_prediction_and_resumes_exactly(tmp_path):
    kd3 = ["selection.method=kd3", "train.max_steps=30"]
    ref = _run(tmp_path / "ref", *kd3, "train.checkpoint_every=100")
    teacher = [f"teacher.path={ref.run_dir}/teacher", "teacher.fit=null"]
    full = _run(tmp_path / "full", *kd3, *teacher)
    cut = tmp_path / "cut"
    _run(cut, *kd3[:1], "train.max_steps=10", "train.checkpoint_every=10", *teacher)
    res = _run(cut, *kd3, *teacher, resume=True)
    a = load_file(str(full.run_dir / "student" / "model.safetensors"))
    b = load_file(str(res.run_dir / "student" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)

    class Hesitant(_Counting):  # sure of class 0 for even ids, barely prefers 0 for odd ones
        def __call__(self, batch):
            ids = torch.tensor([int(i) for i in batch["index"]])
            return TeacherOutput(logits=torch.stack([torch.where(ids % 2 == 0, 6.0, 0.3),
                                                     torch.zeros(len(ids)), torch.zeros(len(ids))], -1))  # fmt: skip

    class SureOfOne(torch.nn.Module):  # a student fairly sure of class 1 everywhere (p=0.91)
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.tensor([0.0, 3.0, 0.0]))

        def forward(self, inputs):
            return self.w.expand(len(inputs), 3)

    data = [{"index": torch.tensor(i), "labels": torch.tensor(0), "inputs": torch.zeros(2)}
            for i in range(12)]  # fmt: skip
    from torch.utils.data import default_collate

    sel = Selection("kd3", 12, 1, Hesitant(), data, default_collate, initial=12, batch_size=4)
    got = sel.dataset(0, SureOfOne(), 0)
    labels = {int(got[j]["index"]): int(got[j]["labels"]) for j in range(len(got))}
    # sure teacher: its class; hesitant teacher, sure student: the combined prediction's class
    assert labels and all(c == (0 if i % 2 == 0 else 1) for i, c in labels.items())


def rounds_of(res):
    return json.loads((res.run_dir / "selection.json").read_text())["rounds"]


@pytest.mark.parametrize(
    "over, msg",
    [
        (["selection.method=entropi"], "Did you mean 'entropy'"),
        (["selection.budget=0"], "selection.budget"),
        (["selection.params.inital=3"], "unknown key(s) ['inital']"),
        (["selection.params.per_round=0"], "selection.params.per_round=0"),
        (
            ["selection.budget=10", "selection.params.initial=10", "train.batch_size=32"],
            "first selection round (10 examples)",
        ),  # fmt: skip
        (["selection.every=3 hours"], "selection.every='3 hours'"),
        (["selection.every=0 steps"], "must be at least 1"),
        (
            ["selection.every=5 steps", "train.max_steps=null", "train.epochs=2"],
            "set train.max_steps",
        ),  # fmt: skip
    ],
)
def test_bad_selection_settings_are_named(tmp_path, over, msg):
    with pytest.raises((ConfigError, ValueError)) as e:
        _run(tmp_path / "bad", "train.max_steps=2", *over)
    assert msg in str(e.value)
    assert not (tmp_path / "bad" / "teacher_labels.jsonl").exists()


def test_a_cached_teacher_is_counted_against_the_budget_like_an_online_one(tmp_path):
    from mentor.assembly import cache_recipe
    from mentor.cache import CacheSettings

    online = _run(tmp_path / "online", "train.max_steps=20")
    teacher = [f"teacher.path={online.run_dir}/teacher", "teacher.fit=null"]
    cfg = load_config("digits", [f"output.dir={tmp_path / 'x'}", *FAST, *SEL, *teacher])
    cache_recipe(cfg, tmp_path / "cache", CacheSettings(top_k=10, dtype="fp32"),
                 splits=("train", "val"), progress=False)  # fmt: skip
    use = ["teacher.source=cache", f"teacher.cache={tmp_path / 'cache'}", *teacher]
    cached = _run(tmp_path / "cached", "train.max_steps=20", *use)
    a, b = (json.loads((r.run_dir / "selection.json").read_text()) for r in (online, cached))
    assert b["teacher_calls"] == b["calls_this_process"] == a["teacher_calls"] >= 200
    assert [r["teacher_calls"] for r in b["rounds"]] == [r["teacher_calls"] for r in a["rounds"]]

    def paid(r):
        lines = (r.run_dir / "teacher_labels.jsonl").read_text().splitlines()
        return {x["index"]: x["logprobs"] for x in map(json.loads, lines)}

    p, q = paid(online), paid(cached)
    assert len(q) == b["teacher_calls"] and p.keys() & q.keys()  # same teacher, same answers
    for i in p.keys() & q.keys():
        assert torch.allclose(torch.tensor(p[i]), torch.tensor(q[i]), atol=1e-4)


def test_dense_view_of_a_cached_top_k_signal():
    from mentor.selection import _dense
    from mentor.signals import TopK

    logits = torch.tensor([[2.0, 0.5, -1.0, 0.0]])
    full = _dense(TopK.from_logits(logits, 4), 4)
    assert torch.allclose(full, logits.log_softmax(-1), atol=1e-6)
    part = _dense(TopK.from_logits(logits, 2), 4)  # the other two share the tail equally
    lp = logits.log_softmax(-1)[0]
    tail = torch.logsumexp(lp[2:], 0) - math.log(2)
    assert torch.allclose(part[0], torch.stack([lp[0], lp[1], tail, tail]), atol=1e-6)
    assert torch.allclose(part.exp().sum(), torch.tensor(1.0), atol=1e-6)


def test_selection_refuses_lm_data(tmp_path):
    from mentor.selection import build_selection

    cfg = load_config("digits", [*SEL])
    with pytest.raises(ValueError, match="supports classification"):
        build_selection(cfg, _Counting(), [], lambda b: b, None, "causal_lm")


def test_recipe_ships_a_selection_section():
    cfg = load_config("llm-labels-classifier")
    assert cfg.selection is not None and cfg.selection.budget == 500
    assert cfg.teacher.builder == "llm_classifier" and cfg.student.builder == "tfidf_mlp"
    assert "ce" not in cfg.objective  # the pool's own labels are never trained on
    assert Path(__file__).parent.parent.joinpath("src/mentor/recipes").is_dir()


def test_eval_and_report_show_what_was_paid_for(tmp_path):
    from mentor.assembly import evaluate_run
    from mentor.report import build_report

    res = _run(tmp_path / "r", "train.max_steps=20")  # 4 rounds reached in 20 steps
    ev = evaluate_run(res.run_dir, measure=False)
    assert ev["selection"]["teacher_calls"] == 250 and len(ev["selection"]["rounds"]) >= 3
    build_report(res.run_dir)
    md = (res.run_dir / "report.md").read_text()
    assert "## Teacher budget and selection" in md and "**entropy**" in md
    assert "| 0 | 1 | random | 100 | 100 |" in md
