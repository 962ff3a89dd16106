"""Distilling Step-by-Step: the multi-task loss (reference values), the rationale data
expansion, and a label-only training run on teacher-written rationales."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from mentor.config import load_config
from mentor.losses import get_loss
from mentor.losses.sequence import step_by_step
from prompt_data import save_tiny_llama


@pytest.fixture(autouse=True)
def _one(one_thread):
    pass


def _ref(logits, labels, tasks, w):
    """Per-task token-mean CE, written out with F.cross_entropy."""
    out = 0.0
    for k, wk in ((0, 1.0), (1, w)):
        rows = tasks == k
        if rows.any():
            out += wk * F.cross_entropy(
                logits[rows].reshape(-1, logits.shape[-1]), labels[rows].reshape(-1),
                ignore_index=-100,
            )  # fmt: skip
    return out


def test_step_by_step_matches_per_task_cross_entropy():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 5, 11, generator=g)
    labels = torch.randint(0, 11, (4, 5), generator=g)
    labels[0, :2] = -100
    labels[3, 4] = -100
    tasks = torch.tensor([0, 1, 1, 0])
    for w in (0.0, 0.5, 1.0, 3.0):
        got = step_by_step(logits, None, labels=labels, tasks=tasks, rationale_weight=w)
        assert torch.allclose(got, torch.as_tensor(_ref(logits, labels, tasks, w)), atol=1e-6)
    only_label = step_by_step(logits, None, labels=labels, tasks=torch.zeros(4, dtype=torch.long))
    assert torch.allclose(only_label, F.cross_entropy(logits.reshape(-1, 11), labels.reshape(-1),
                                                      ignore_index=-100), atol=1e-6)  # fmt: skip
    assert get_loss("step_by_step").extras == ("tasks",)


def test_step_by_step_bad_input():
    x, y = torch.randn(2, 3, 4), torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="step_by_step=true"):
        step_by_step(x, None, labels=y)
    with pytest.raises(ValueError, match="0 \\(label\\) or 1"):
        step_by_step(x, None, labels=y, tasks=torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="rationale_weight"):
        step_by_step(x, None, labels=y, tasks=torch.tensor([0, 1]), rationale_weight=-1.0)


def _rationales(path, n=12):
    rows = [{"index": i, "text": f"w{3 + i % 9} w{5 + i % 4}", "label": f"w{1 + i % 2}",
             "rationale": f"w{20 + i % 3} w{22} Answer: w{1 + i % 2}"} for i in range(n)]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_rationale_lines_become_two_tasks(tmp_path):
    from mentor.data.prompts import _step_by_step_pairs

    p = _rationales(tmp_path / "r.jsonl", n=3)
    prompts, comps, locs, extra = _step_by_step_pairs(p)
    assert prompts[:2] == ["[label] w3 w5\n", "[rationale] w3 w5\n"]
    assert comps[:2] == [" w1", " w20 w22 Answer: w1"]
    assert extra == {"task": [0, 1, 0, 1, 0, 1]} and locs[0] == locs[1]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "w1", "label": "w2"}\n')
    with pytest.raises(ValueError, match='bad.jsonl:1: no "rationale" text'):
        _step_by_step_pairs(bad)


def test_both_tasks_of_a_text_land_in_the_same_split(tmp_path):
    from mentor.data.prompts import prompts

    lm = save_tiny_llama(tmp_path / "lm", seed=1)
    p = _rationales(tmp_path / "r.jsonl", n=20)
    b = prompts(path=str(p), tokenizer=str(lm), step_by_step=True, val_fraction=0.25, seed=3)

    def lines(d):
        return [int(i) // 2 for i in d.ids]

    tr, va = lines(b.train), lines(b.val)
    assert not set(tr) & set(va) and len(tr) + len(va) == 40
    assert all(tr.count(k) == 2 for k in tr) and all(va.count(k) == 2 for k in va)
    assert len(set(va)) == 5


def test_training_on_rationales_lowers_both_task_losses(tmp_path):
    from mentor.assembly import distill

    lm = save_tiny_llama(tmp_path / "lm", seed=1)
    data = _rationales(tmp_path / "r.jsonl", n=24)
    over = [
        "teacher.builder=null", "teacher.params={}", "student.builder=hf",
        f"student.params={{model: {lm}}}", "data.source=prompts",
        f"data.params={{path: {data}, tokenizer: {lm}, step_by_step: true}}",
        "objective={sbs: {loss: step_by_step, rationale_weight: 1.0}}", "generation.mode=off",
        "train.max_steps=40", "train.batch_size=8", "train.lr=1e-2", "train.progress=false",
        "train.log_every=5", "eval.every=null", f"output.dir={tmp_path / 'run'}",
    ]  # fmt: skip
    cfg = load_config("causal-lm-onpolicy", over)
    res = distill(cfg, quiet=True, final=False)
    recs = [json.loads(x) for x in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["sbs"] for r in recs if r["kind"] == "train"]
    assert losses[-1] < 0.5 * losses[0]
