"""Generation diagnostics of `mentor eval` on prompt data: teacher NLL and KLs on a model's own
samples (GKD-style on-policy evaluation), distinct-n, side-by-side examples, and the report."""

from __future__ import annotations

import copy
import json
import math
from html.parser import HTMLParser

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from mentor.data.sources import DataBundle, DataInfo
from mentor.eval.generation_metrics import (
    completion_logits,
    completion_token_lists,
    distinct_n,
    generation_diagnostics,
    score_samples,
    teacher_nll,
)
from mentor.eval.run_eval import evaluate_models
from mentor.generation import Generation, SamplingConfig
from mentor.report import build_report
from prompt_data import PAD, Prompts, collate


@pytest.fixture(autouse=True)
def _one(one_thread):
    yield


class Bigram(nn.Module):
    """A model whose next-token logits depend only on the current token: a [V, V] table."""

    def __init__(self, vocab: int = 7, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.table = nn.Parameter(torch.randn(vocab, vocab, generator=g), requires_grad=False)

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        return self.table[input_ids]


def _hand_generation() -> Generation:
    """Two left-padded prompts (2 and 3 tokens) with completions of 3 and 1 counted tokens."""
    ids = torch.tensor([[0, 4, 5, 1, 2, 3], [6, 2, 3, 5, 0, 0]])
    prompt = torch.tensor([[0, 1, 1], [1, 1, 1]])
    comp = torch.tensor([[1, 1, 1], [1, 0, 0]])
    zeros = torch.zeros_like(prompt)
    return Generation(ids, torch.cat([prompt, comp], 1), torch.cat([zeros, comp], 1), 3)


def _student(tiny_lm: nn.Module, seed: int = 1) -> nn.Module:
    torch.manual_seed(seed)
    return type(tiny_lm)(copy.deepcopy(tiny_lm.config)).eval()  # another random init


def _prompt_batches(n: int = 6, size: int = 3) -> list[dict]:
    data = Prompts(n)
    return [collate([data[i] for i in range(lo, min(n, lo + size))]) for lo in range(0, n, size)]


def test_teacher_nll_is_cross_entropy_over_completion_positions():
    gen, teacher = _hand_generation(), Bigram(seed=0)
    # the causal shift by hand: logits at t predict token t + 1; targets where completion_mask
    logits, targets = [], []
    for r in range(2):
        for t in range(5):
            if gen.completion_mask[r, t + 1]:
                logits.append(teacher.table[gen.input_ids[r, t]])
                targets.append(gen.input_ids[r, t + 1])
    assert len(targets) == 4  # 3 + 1 counted completion tokens; the prompt never counts
    want = F.cross_entropy(torch.stack(logits), torch.stack(targets))
    assert teacher_nll(teacher, [gen]) == pytest.approx(float(want), rel=1e-6)
    # the mean is over tokens of all batches, not a mean of batch means
    one = Generation(gen.input_ids[1:], gen.attention_mask[1:], gen.completion_mask[1:], 3)
    both = teacher_nll(teacher, [gen, one])
    want2 = F.cross_entropy(
        torch.stack([*logits, logits[-1]]), torch.stack([*targets, targets[-1]])
    )
    assert both == pytest.approx(float(want2), rel=1e-6)


def test_kl_on_samples_matches_a_direct_computation():
    gen, teacher, student = _hand_generation(), Bigram(seed=0), Bigram(seed=3)
    mask = gen.completion_mask[:, 1:].bool()
    prev = gen.input_ids[:, :-1][mask]  # the tokens whose logits predict the counted targets
    log_s = student.table[prev].log_softmax(-1)
    log_t = teacher.table[prev].log_softmax(-1)
    rkl = F.kl_div(log_t, log_s, log_target=True, reduction="batchmean")  # KL(s || t)
    fkl = F.kl_div(log_s, log_t, log_target=True, reduction="batchmean")  # KL(t || s)
    got = score_samples(teacher, [gen], student)
    assert got["kl_student_teacher_on_samples"] == pytest.approx(float(rkl), rel=1e-5)
    assert got["kl_teacher_student_on_samples"] == pytest.approx(float(fkl), rel=1e-5)
    assert got["teacher_nll"] == pytest.approx(teacher_nll(teacher, [gen]))
    same = score_samples(teacher, [gen], copy.deepcopy(teacher))
    assert same["kl_student_teacher_on_samples"] == pytest.approx(0.0, abs=1e-6)


def test_distinct_n_by_hand():
    seqs = [[1, 2, 3, 1], [1, 2], [4]]
    # unigrams 1 2 3 1 1 2 4: 4 unique of 7; bigrams (1,2) (2,3) (3,1) (1,2): 3 unique of 4
    assert distinct_n(seqs, 1) == pytest.approx(4 / 7)
    assert distinct_n(seqs, 2) == pytest.approx(3 / 4)
    assert math.isnan(distinct_n([[1]], 2))
    with pytest.raises(ValueError):
        distinct_n(seqs, 0)
    assert completion_token_lists([_hand_generation()]) == [[1, 2, 3], [5]]


def test_left_padding_does_not_change_the_scores(tiny_lm):
    """position_ids reach the model: a padded row scores as it does alone."""
    gen = _hand_generation()
    alone = Generation(gen.input_ids[:1, 1:], gen.attention_mask[:1, 1:],
                       gen.completion_mask[:1, 1:], 2)  # fmt: skip
    batched = completion_logits(tiny_lm, gen)[:3]  # row 0's three targets come first
    assert torch.allclose(batched, completion_logits(tiny_lm, alone), atol=1e-5)


def test_diagnostics_are_deterministic_and_zero_kl_for_the_teacher_itself(tiny_lm):
    student = _student(tiny_lm)
    sampling = SamplingConfig(max_new_tokens=5, temperature=1.0)
    batches = _prompt_batches()
    models = {"teacher": tiny_lm, "student": student, "copy": copy.deepcopy(tiny_lm)}
    a = generation_diagnostics(models, batches, sampling, seed=3, pad_token_id=PAD)
    b = generation_diagnostics(models, batches, sampling, seed=3, pad_token_id=PAD)
    assert a == b
    c = generation_diagnostics(models, batches, sampling, seed=4, pad_token_id=PAD)
    assert c["student"]["examples"] != a["student"]["examples"]
    s = a["student"]
    for key in ("teacher_nll", "kl_student_teacher_on_samples", "kl_teacher_student_on_samples",
                "distinct_1", "distinct_2", "mean_completion_tokens"):  # fmt: skip
        assert key in s and math.isfinite(s[key])
    assert s["kl_student_teacher_on_samples"] > 0 and s["samples"] == 6
    assert 0 < s["distinct_1"] <= 1 and 1 <= s["mean_completion_tokens"] <= 5
    # an identical model samples what the teacher samples (same seed) and has KL 0
    assert a["copy"]["kl_student_teacher_on_samples"] == pytest.approx(0.0, abs=1e-5)
    assert a["copy"]["teacher_nll"] == pytest.approx(a["teacher"]["teacher_nll"], rel=1e-5)
    ex = a["copy"]["examples"]
    assert len(ex) == 3 and all(e["completion"] == e["teacher_completion"] for e in ex)
    assert "kl_student_teacher_on_samples" not in a["teacher"] and "examples" not in a["teacher"]
    # the on-policy ordering: the teacher finds its own samples likelier than a random model's
    assert a["teacher"]["teacher_nll"] < s["teacher_nll"]


def _bundle(n_val: int = 10) -> DataBundle:
    info = DataInfo(task="causal_lm", extra={"prompts": True, "pad_token_id": PAD})
    return DataBundle(Prompts(8), Prompts(n_val, seed=1), info, collate)


def test_evaluate_models_adds_generation_blocks(tiny_lm):
    models = {"teacher": tiny_lm, "student": _student(tiny_lm)}
    greedy = SamplingConfig(max_new_tokens=4, temperature=0.0)
    ev = evaluate_models(
        models, _bundle(), measure=False, progress=False, sampling=greedy, seed=5, max_prompts=7
    )
    g = ev["models"]["student"]["generation"]
    assert g["samples"] == 7 and len(g["examples"]) == 3
    assert set(g["examples"][0]) == {"prompt", "completion", "teacher_completion"}
    assert all(tok.isdigit() for tok in g["examples"][0]["prompt"].split())  # ids as text
    assert "generation" in ev["models"]["teacher"]
    assert ev["generation"] == {"prompts": 7, "seed": 5, "max_new_tokens": 4, "temperature": 0.0,
                                "top_p": 1.0, "top_k": 0, "decoded": False}  # fmt: skip
    assert "perplexity" in ev["models"]["student"]  # the held-out metrics are still there
    json.dumps(ev)
    # not prompt data, no teacher, or max_prompts=0: no diagnostics
    plain = _bundle()
    plain.info.extra = {}
    for ms, b, k in [(models, plain, 32), ({"student": models["student"]}, _bundle(), 32),
                     (models, _bundle(), 0)]:  # fmt: skip
        out = evaluate_models(ms, b, measure=False, progress=False, max_prompts=k)
        assert "generation" not in out and all(
            "generation" not in m for m in out["models"].values()
        )


class _Text(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.text = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)

    def handle_data(self, data):
        self.text.append(data)


def test_report_renders_generation_diagnostics(tmp_path, tiny_lm):
    models = {"teacher": tiny_lm, "student": _student(tiny_lm)}
    sampling = SamplingConfig(max_new_tokens=3)
    ev = evaluate_models(models, _bundle(), measure=False, progress=False, sampling=sampling)
    tricky = "<script>alert(1)</script> a|b *bold* `code`\nline two"
    ev["models"]["student"]["generation"]["examples"][0]["completion"] = tricky
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"name": "gen", "train": {"seed": 0}}))
    (tmp_path / "eval.json").write_text(json.dumps(ev))
    html_path = build_report(tmp_path, evaluate_if_missing=False)
    md = (tmp_path / "report.md").read_text()
    assert "## Generation diagnostics" in md and "KL(model ‖ teacher)" in md
    assert "Samples: distilled student beside the teacher" in md
    row = next(line for line in md.splitlines() if "alert" in line)
    # four unescaped pipes: three cells, the sample's own "|" escaped; no raw HTML tags
    assert row.replace("\\|", "").count("|") == 4
    assert "<script>" not in md and "&lt;script&gt;" in md and "line two" in row
    page = html_path.read_text()
    assert "<script>" not in page and "&lt;script&gt;" in page
    parser = _Text()
    parser.feed(page)
    assert "script" not in parser.tags
    assert any(tricky.split("\n")[0] in t for t in parser.text)  # shown verbatim in the page
    assert "Generation diagnostics" in parser.text
