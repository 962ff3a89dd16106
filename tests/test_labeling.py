"""`mentor generate --task label|rationale`: teacher-labelled data with filters, a budget,
durable resumable lines and provenance (mentor.labeling), on a tiny in-process LM labeller."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mentor.assembly import Assembly
from mentor.cli import main
from mentor.config import load_config
from mentor.labeling import label_recipe, rejected_path
from mentor.models.llm_labeler import parse_label
from prompt_data import save_tiny_llama


@pytest.fixture(autouse=True)
def _one(one_thread):
    pass


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("labels")
    lm = save_tiny_llama(d / "lm", seed=4)  # a seed whose labeller uses two classes
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(40):
        words = torch.randint(3, 30, (int(torch.randint(2, 7, (1,), generator=g)),), generator=g)
        rows.append({"text": " ".join(f"w{k}" for k in words.tolist()), "label": "abc"[i % 3]})
    for k in (7, 9, 13, 17):
        rows[k]["text"] = rows[3]["text"]  # duplicates (some land in the training split)
    rows[11]["text"] = "w1"  # a short one
    (d / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "r.yaml").write_text(
        f"""name: tiny-labels
teacher:
  builder: llm_classifier
  params: {{model: {lm}, prompt: "{{text}} w1", answers: {{a: w5, b: w6 w7, c: w8}}}}
student:
  builder: tfidf_mlp
  params: {{hidden: [8], min_df: 1}}
data:
  source: text_table
  params: {{path: {d / "data.jsonl"}, max_length: 16}}
  val_fraction: 0.25
objective: {{kd: {{weight: 1.0}}}}
train: {{progress: false}}
"""
    )
    return d / "r.yaml"


def _lines(p: Path) -> list[dict]:
    return [json.loads(x) for x in p.read_text().splitlines()] if p.exists() else []


def test_label_writes_the_teachers_distribution_within_the_budget(recipe, tmp_path):
    cfg = load_config(str(recipe))
    out = tmp_path / "l.jsonl"
    s = label_recipe(cfg, out, budget=10, progress=False)
    assert s["calls"] == 10 and s["teacher_calls"] == 10 and s["budget_left"] == 0
    asm = Assembly(cfg)
    data, names = asm.data.train, asm.data.info.class_names
    assert s["skipped"].get("duplicate", 0) == len(data.texts) - len(set(data.texts))
    rows = _lines(out)
    assert len(rows) == 10 and not _lines(rejected_path(out))
    pos = {int(data[i]["index"]): i for i in range(len(data))}
    want = asm.module()([data.texts[pos[r["index"]]] for r in rows])
    for r, lp in zip(rows, want):
        assert r["text"] == data.texts[pos[r["index"]]]
        assert r["label"] == names[int(lp.argmax())] and r["label_id"] == int(lp.argmax())
        assert torch.allclose(torch.tensor(r["logprobs"]), lp, atol=1e-5)
        assert r["confidence"] == pytest.approx(float(lp.max().exp()), abs=1e-5)
    meta = json.loads((tmp_path / "l.jsonl.meta.json").read_text())
    assert meta["kind"] == "mentor-label" and meta["classes"] == names
    assert len(meta["model"]["weights_sha256"]) == 64


def test_label_resumes_after_a_kill_and_a_larger_budget(recipe, tmp_path):
    cfg = load_config(str(recipe))
    ref = tmp_path / "ref.jsonl"
    label_recipe(cfg, ref, progress=False)
    out = tmp_path / "l.jsonl"
    label_recipe(cfg, out, budget=12, batch_size=4, progress=False)
    with open(out, "a") as f:
        f.write('{"index": 3, "te')  # killed mid-line
    s = label_recipe(cfg, out, batch_size=4, progress=False)
    assert s["calls"] == s["teacher_calls"] - 12  # nothing paid twice
    assert out.read_bytes() == ref.read_bytes()  # as if never interrupted


def test_filters_skip_before_paying_and_keep_rejected_labels(recipe, tmp_path):
    cfg = load_config(str(recipe))
    out = tmp_path / "l.jsonl"
    s = label_recipe(cfg, out, min_confidence=0.999, min_chars=3, max_chars=14, progress=False)
    asm = Assembly(cfg)
    texts = asm.data.train.texts
    free = sum(1 for t in texts if len(t) < 3 or len(t) > 14)
    assert s["skipped"].get("too_short", 0) + s["skipped"].get("too_long", 0) == free
    assert s["calls"] == len(texts) - free - s["skipped"].get("duplicate", 0)
    rej = _lines(rejected_path(out))
    assert s["kept"] == 0 and len(rej) == s["calls"]  # paid for, filtered, not lost
    assert {r["reason"] for r in rej} == {"low_confidence"} and all("logprobs" in r for r in rej)


def test_rationale_votes_over_samples(recipe, tmp_path):
    cfg = load_config(str(recipe))
    out = tmp_path / "r.jsonl"
    s = label_recipe(cfg, out, task="rationale", samples=3, budget=9 * 3, max_new_tokens=6,
                     prompt="{text} w2", progress=False)  # fmt: skip
    assert s["calls"] == 27 and s["kept"] + s["rejected"] == 9
    answers = ["w5", "w6 w7", "w8"]
    for r in _lines(out):
        votes = [parse_label(g, answers) for g in r["generations"]]
        assert votes.count(r["label_id"]) / 3 == pytest.approx(r["agreement"], abs=1e-6)
        assert max(votes.count(k) for k in range(3)) == votes.count(r["label_id"])
    for r in _lines(rejected_path(out)):
        assert r["reason"] == "no_class_in_answer"
        assert all(parse_label(g, answers) is None for g in r["generations"])


def test_a_changed_setting_is_refused_and_foreign_files_are_untouched(recipe, tmp_path):
    cfg = load_config(str(recipe))
    out = tmp_path / "l.jsonl"
    label_recipe(cfg, out, budget=3, progress=False)
    with pytest.raises(ValueError, match="filters.min_confidence"):
        label_recipe(cfg, out, min_confidence=0.5, progress=False)
    foreign = tmp_path / "mine.jsonl"
    foreign.write_text("keep me\n")
    with pytest.raises(FileExistsError, match="not written by mentor generate"):
        label_recipe(cfg, foreign, progress=False)
    assert foreign.read_text() == "keep me\n"


@pytest.mark.parametrize(
    "kw, msg",
    [
        ({"budget": 0}, "--budget 0"),
        ({"task": "labels"}, "--task 'labels'"),
        ({"samples": 2}, "--samples applies to --task rationale"),
        ({"min_confidence": 2.0}, "--min-confidence 2.0"),
        ({"task": "rationale", "prompt": "no text"}, "--prompt must contain {text}"),
    ],
)
def test_bad_options_are_named(recipe, tmp_path, kw, msg):
    with pytest.raises(ValueError) as e:
        label_recipe(load_config(str(recipe)), tmp_path / "x.jsonl", progress=False, **kw)
    assert msg in str(e.value)
    assert not (tmp_path / "x.jsonl").exists()


def test_rationale_needs_a_teacher_that_writes(tmp_path):
    cfg = load_config("tiny-classifier", ["teacher.fit.epochs=1", "train.progress=false"])
    with pytest.raises(ValueError, match="needs a teacher that writes text"):
        label_recipe(cfg, tmp_path / "x.jsonl", task="rationale", progress=False)


def test_cli_label_then_train_on_the_labels(recipe, tmp_path, capsys):
    out = tmp_path / "l.jsonl"
    assert main(["generate", str(recipe), "--task", "label", "--out", str(out),
                 "--budget", "20"]) == 0  # fmt: skip
    said = capsys.readouterr().out
    assert "20 teacher calls this run" in said
    assert main(["distill", "text-classifier", "student.builder=tfidf_mlp",
                 "student.params={hidden: [8], min_df: 1}", "teacher.builder=null",
                 "teacher.params={}", "teacher.fit=null", "objective={ce: {weight: 1.0}}",
                 "data.source=text_table", f"data.params={{path: {out}}}", "train.epochs=1",
                 "train.batch_size=4", "train.progress=false", f"output.dir={tmp_path / 'run'}",
                 ]) == 0  # fmt: skip
    assert (tmp_path / "run" / "student").is_dir()
