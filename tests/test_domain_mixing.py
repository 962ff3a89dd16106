"""DDK's domain re-weighting on language-model data (mentor.domain_mixing): domain fields of
the LM sources, the per-round proportions, exact resume, the report, and the errors."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from mentor.assembly import distill
from mentor.config import load_config
from mentor.data.sources import build_data
from mentor.domain_mixing import token_loss
from mentor.selectors import ddk_domain_weights

FAST = ["train.progress=false", "eval.every=null", "teacher.fit.epochs=2",
        "data.params.domains=3", "data.params.n=240", "train.log_every=5",
        "train.schedule=constant"]  # fmt: skip
DDK = ["selection.method=ddk", "selection.every=5 steps", "selection.params.domain=domain",
       "selection.params.eval_blocks=8"]  # fmt: skip


@pytest.fixture(autouse=True)
def _one(one_thread):
    pass


def _run(out, *over, resume=False):
    cfg = load_config("tiny-lm", [f"output.dir={out}", *FAST, *over])
    return distill(cfg, resume=resume, quiet=True)


def test_synthetic_lm_domains_are_separate_chains_with_a_field():
    one = build_data("synthetic_lm", {"n": 40}, 0.2, 0)
    assert "domain" not in one.train[0] and "domains" not in one.info.extra
    b = build_data("synthetic_lm", {"n": 60, "domains": 3}, 0.2, 0)
    doms = [int(b.train[i]["domain"]) for i in range(len(b.train))]
    assert set(doms) == {0, 1, 2} and b.info.extra["domains"] == ["chain0", "chain1", "chain2"]
    assert int(b.train[0]["index"]) % 3 == doms[0]  # sequence i is drawn from chain i % 3


def test_lm_text_domains_pack_blocks_within_a_folder(tmp_path):
    from tests.test_data import _WordTok

    for d, w in (("a", "x"), ("b", "y")):
        (tmp_path / d).mkdir()
        for i in range(5):
            (tmp_path / d / f"{i}.txt").write_text(" ".join(f"{w}{k}" for k in range(40)))
    p = {"files": str(tmp_path / "*" / "*.txt"), "tokenizer": _WordTok(), "block_size": 8,
         "domains": True}  # fmt: skip
    b = build_data("lm_text", p, 0.2, 0)
    assert b.info.extra["domains"] == ["a", "b"]
    tok = _WordTok()
    for split in (b.train, b.val):
        for i in range(len(split)):
            it = split[i]
            words = {tok_id for tok_id in it["input_ids"].tolist()}
            assert len(words) > 1 and "domain" in it
    # a block never mixes the two folders' words (x* vs y* tokens are disjoint id ranges)
    firsts = {int(b.train[i]["domain"]): set() for i in range(len(b.train))}
    for i in range(len(b.train)):
        firsts[int(b.train[i]["domain"])] |= set(b.train[i]["input_ids"].tolist())
    assert not (firsts[0] - {1}) & (firsts[1] - {1})
    del tok
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "one.txt").write_text("a b c")
    with pytest.raises(ValueError, match="folder of its own"):
        build_data("lm_text", {**p, "files": str(flat / "*.txt")}, 0.2, 0)


def test_token_loss_is_the_mean_next_token_cross_entropy():
    logits = torch.randn(2, 5, 7)
    ids = torch.randint(0, 7, (2, 5))
    s, n = token_loss(logits, ids)
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 7), ids[:, 1:].reshape(-1))
    assert torch.allclose(s.sum() / n.sum(), ref, atol=1e-6) and n.tolist() == [4.0, 4.0]


def test_ddk_on_lm_data_reweights_domains_every_n_steps_and_resumes_exactly(tmp_path):
    ref = _run(tmp_path / "ref", *DDK, "train.max_steps=20")
    s = json.loads((ref.run_dir / "selection.json").read_text())
    assert s["kind"] == "domains" and s["domains"] == ["chain0", "chain1", "chain2"]
    rounds = s["rounds"]
    assert [r["step"] for r in rounds] == [1, 6, 11, 16]
    # round 0: the paper's Eq. 1 from the logged perplexities; later: the smoothed update
    ls = torch.tensor([math.log(rounds[0]["student_ppl"][d]) for d in s["domains"]])
    lt = torch.tensor([math.log(rounds[0]["teacher_ppl"][d]) for d in s["domains"]])
    assert torch.allclose(torch.tensor(rounds[0]["domain_weights"]),
                          ddk_domain_weights(ls, lt, None), atol=1e-3)  # fmt: skip
    assert all(min(r["domain_weights"]) >= 0.5 / 3 - 1e-6 for r in rounds[1:])
    assert all(sum(r["blocks_per_domain"].values()) == 5 * 16 for r in rounds)
    assert s["teacher_calls"] == 20 * 16 and s["worst_ppl"] == max(s["final_student_ppl"].values())
    # resume mid-round gives the same student as the uninterrupted run
    teacher = [f"teacher.path={ref.run_dir}/teacher", "teacher.fit=null"]
    full = _run(tmp_path / "full", *DDK, *teacher, "train.max_steps=20")
    cut = tmp_path / "cut"
    _run(cut, *DDK, *teacher, "train.max_steps=8", "train.checkpoint_every=8")
    res = _run(cut, *DDK, *teacher, "train.max_steps=20", resume=True)
    a = load_file(str(full.run_dir / "student" / "model.safetensors"))
    b = load_file(str(res.run_dir / "student" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    from mentor.cli import main

    assert main(["eval", str(ref.run_dir)]) == 0
    assert main(["report", str(ref.run_dir)]) == 0
    html = next(ref.run_dir.glob("report*.md"), None) or next(ref.run_dir.glob("*.html"))
    assert "Proportions per round" in html.read_text()


@pytest.mark.parametrize(
    "over, msg",
    [
        (["selection.every=2"], 'give selection.every as "N steps"'),
        (["selection.params.domain=topic"], "'topic' is not a field of the training blocks"),
        (["selection.params.eval_blocks=0"], "eval_blocks=0"),
        (["selection.params.initial=3"], "unknown key(s) ['initial']"),
        (["selection.budget=10"], "selection.budget=10 teacher calls is less than"),
        (["selection.method=entropy"], "method ddk on language-model data"),
    ],
)
def test_bad_ddk_lm_settings_are_named(tmp_path, over, msg):
    with pytest.raises(ValueError) as e:
        _run(tmp_path / "bad", *DDK, "train.max_steps=4", *over)
    assert msg in str(e.value)
