"""``mentor generate``: teacher (or student) completions of a recipe's prompts for sequence-level
KD (Kim & Rush, "Sequence-Level Knowledge Distillation", 2016) — the JSONL + meta layout, exact
resume after a torn write, refusal of a file generated otherwise, dedupe, the student of a
finished run, and distillation on the generated file. Tiny models built in-process only."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from mentor.assembly import (
    distill,
    generate_meta_path,
    generate_recipe,
    generation_seed,
    load_run,
)
from mentor.cache.format import data_fingerprint, weights_hash
from mentor.cli import main
from mentor.config import load_config
from mentor.data import build_data
from mentor.generation import SamplingConfig, generate
from mentor.models.hf import load_causal_lm
from prompt_data import W_EOS, W_PAD, save_tiny_llama, word_tokenizer, write_word_prompts

PAD, EOS = W_PAD, W_EOS
_tok = word_tokenizer


@pytest.fixture(autouse=True)
def _one_thread(one_thread, monkeypatch):
    monkeypatch.delenv("MENTOR_DEBUG", raising=False)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A saved folder with a random 2-layer Llama and its word-level tokenizer (the teacher)."""
    return save_tiny_llama(tmp_path_factory.mktemp("teacher"))


@pytest.fixture
def prompts_file(tmp_path):
    return write_word_prompts(tmp_path / "prompts.jsonl")


def _spec(model_dir, data_path, tmp_path):
    return {
        "name": "gen-test",
        "teacher": {"builder": "hf_causal_lm", "params": {"model": str(model_dir)}},
        "student": {"builder": "layer_drop", "params": {"layers": [0]}},
        "data": {"source": "prompts", "params": {"path": str(data_path)}, "val_fraction": 0.2},
        "generation": {"max_new_tokens": 5, "temperature": 1.0},
        "objective": {"fkl": {"loss": "forward_kl"}},
        "train": {"max_steps": 2, "batch_size": 2, "progress": False, "log_every": 1},
        "eval": {"batch_size": 4},
        "output": {"dir": str(tmp_path / "runs" / "gen")},
    }


def _recipe(model_dir, data_path, tmp_path, *overrides):
    return load_config(_spec(model_dir, data_path, tmp_path), list(overrides))


def _lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_round_trip_lines_meta_and_decode(model_dir, prompts_file, tmp_path):
    cfg = _recipe(model_dir, prompts_file, tmp_path)
    out = tmp_path / "gen.jsonl"
    s = generate_recipe(cfg, out, samples_per_prompt=2, batch_size=3, progress=False)
    data = build_data("prompts", {"path": str(prompts_file)}, 0.2, 0, tokenizer=str(model_dir))
    ids = [int(data.train[i]["index"]) for i in range(len(data.train))]
    assert s["examples"] == len(ids) == 8 and s["existing"] == 0 and s["torn_bytes"] == 0
    assert s["written"] + s["duplicates"] == 2 * len(ids) == s["generated"]
    assert s["lines"] == s["written"]
    lines = _lines(out)
    assert len(lines) == s["written"]
    assert [(x["index"], x["sample"]) for x in lines][:2] == [(ids[0], 0), (ids[0], 1)]
    assert sorted({x["index"] for x in lines}) == sorted(ids)  # sample 0 is always kept
    tok = _tok()
    by_id = {int(data.train[i]["index"]): data.train[i] for i in range(len(data.train))}
    for x in lines:
        assert list(x) == ["index", "sample", "prompt", "completion", "prompt_ids",
                           "completion_ids"]  # fmt: skip
        assert x["prompt_ids"] == by_id[x["index"]]["prompt_ids"].tolist()
        assert x["prompt"] == tok.decode(x["prompt_ids"])
        assert 1 <= len(x["completion_ids"]) <= 5
        assert EOS not in x["completion_ids"][:-1]  # generation stops at EOS
        assert x["completion"] == tok.decode(x["completion_ids"], skip_special_tokens=True)
    # each line is reproducible alone from its seed (independent of batches and other lines)
    teacher = load_causal_lm(str(model_dir))  # on the device generate_recipe used
    teacher.to("cuda" if torch.cuda.is_available() else "cpu")
    x = lines[-1]
    p = torch.tensor([x["prompt_ids"]])
    rng = torch.Generator().manual_seed(generation_seed(0, x["index"], x["sample"]))
    gen = generate(teacher, p, torch.ones_like(p), SamplingConfig(max_new_tokens=5),
                   generator=rng, eos_token_id=EOS, pad_token_id=PAD)  # fmt: skip
    keep = gen.completion_mask[0, p.shape[1] :].bool()
    assert gen.completion_ids[0][keep].tolist() == x["completion_ids"]

    meta = json.loads(generate_meta_path(out).read_text())
    assert generate_meta_path(out).name == "gen.jsonl.meta.json"
    assert meta["kind"] == "mentor generate" and meta["recipe"] == "gen-test"
    assert meta["source"] == "teacher" and meta["split"] == "train"
    assert meta["model"] == {"name": f"hf_causal_lm {model_dir}",
                             "weights_sha256": weights_hash(teacher)}  # fmt: skip
    assert meta["tokenizer"]["name"] == str(model_dir) and len(meta["tokenizer"]["sha256"]) == 64
    assert meta["sampling"] == {"max_new_tokens": 5, "temperature": 1.0, "top_p": 1.0,
                                "top_k": 0, "stop_on_eos": True, "eos_token_id": EOS}  # fmt: skip
    assert meta["seed"] == 0 and meta["samples_per_prompt"] == 2
    assert meta["data"]["spec"] == cfg.data.model_dump(mode="json")
    assert meta["data"]["fingerprint"] == data_fingerprint(data.train)
    assert meta["mentor_version"] and meta["created"]

    # the same command again appends nothing; the file and its meta stay as they are
    before, meta_before = out.read_bytes(), generate_meta_path(out).read_bytes()
    again = generate_recipe(cfg, out, samples_per_prompt=2, batch_size=5, progress=False)
    assert again["written"] == again["generated"] == 0 and again["existing"] == s["written"]
    assert out.read_bytes() == before and generate_meta_path(out).read_bytes() == meta_before


@pytest.mark.parametrize("cut", ["mid_line", "mid_example"])
def test_resume_after_a_torn_write_is_byte_identical(model_dir, prompts_file, tmp_path, cut):
    cfg = _recipe(model_dir, prompts_file, tmp_path)
    full, part = tmp_path / "full.jsonl", tmp_path / "part.jsonl"
    generate_recipe(cfg, full, samples_per_prompt=2, batch_size=4, progress=False)
    expected = full.read_bytes()
    generate_recipe(cfg, part, samples_per_prompt=2, batch_size=3, progress=False)
    assert part.read_bytes() == expected  # the batch size does not change what is drawn
    lines = expected.split(b"\n")
    # keep the first line of an example that has two (a cut inside its samples)
    k = next(i for i in range(1, len(lines)) if lines[i].find(b'"sample": 1') > 0) - 1
    head = b"".join(x + b"\n" for x in lines[: k + 1])
    if cut == "mid_line":
        head += lines[k + 1][: len(lines[k + 1]) // 2]  # killed while writing the next line
    part.write_bytes(head)
    s = generate_recipe(cfg, part, samples_per_prompt=2, batch_size=3, progress=False)
    assert part.read_bytes() == expected
    assert s["torn_bytes"] == (len(lines[k + 1]) // 2 if cut == "mid_line" else 0)
    assert s["existing"] == k + 1 and s["lines"] == expected.count(b"\n")


def test_a_file_generated_otherwise_is_refused_unless_overwrite(
    model_dir, prompts_file, tmp_path, capsys
):
    cfg = _recipe(model_dir, prompts_file, tmp_path)
    out = tmp_path / "gen.jsonl"
    generate_recipe(cfg, out, progress=False)
    before = out.read_bytes()
    hot = _recipe(model_dir, prompts_file, tmp_path, "generation.temperature=0.7")
    with pytest.raises(
        ValueError, match=r"generated otherwise: .*sampling.temperature \(file: 1.0, now: 0.7\)"
    ) as e:
        generate_recipe(hot, out, samples_per_prompt=3, progress=False)
    assert "samples_per_prompt (file: 1, now: 3)" in str(e.value) and "--overwrite" in str(e.value)
    assert out.read_bytes() == before
    # a renamed recipe generates the same lines: not a difference
    renamed = _recipe(model_dir, prompts_file, tmp_path, "name=other")
    assert generate_recipe(renamed, out, progress=False)["written"] == 0
    s = generate_recipe(hot, out, samples_per_prompt=3, overwrite=True, progress=False)
    assert s["existing"] == 0 and s["lines"] == len(_lines(out))
    meta = json.loads(generate_meta_path(out).read_text())
    assert meta["sampling"]["temperature"] == 0.7 and meta["samples_per_prompt"] == 3
    # via the CLI: the error names the key, exit code 2
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(_spec(model_dir, prompts_file, tmp_path)))
    assert main(["generate", str(recipe), "--out", str(out), "train.progress=false"]) == 2
    err = capsys.readouterr().err.replace("\n", "")
    assert "sampling.temperature (file: 0.7, now: 1.0)" in err and "--overwrite" in err

    # never touch a file mentor generate did not write (no sidecar), even with --overwrite
    foreign = tmp_path / "mine.jsonl"
    foreign.write_text('{"prompt": "w1", "completion": "w2"}\n')
    with pytest.raises(FileExistsError, match="not written by mentor generate"):
        generate_recipe(cfg, foreign, overwrite=True, progress=False)
    assert foreign.read_text() == '{"prompt": "w1", "completion": "w2"}\n'
    with pytest.raises(ValueError, match=r"use a \.jsonl file"):
        generate_recipe(cfg, tmp_path / "gen.json", progress=False)


def test_identical_completions_of_a_prompt_are_written_once(model_dir, prompts_file, tmp_path):
    # top_k=1 samples (through the sampling path) the argmax every time: all samples equal
    cfg = _recipe(model_dir, prompts_file, tmp_path, "generation.top_k=1")
    out = tmp_path / "one.jsonl"
    s = generate_recipe(cfg, out, samples_per_prompt=3, progress=False)
    assert s["generated"] == 24 and s["written"] == 8 and s["duplicates"] == 16
    assert {x["sample"] for x in _lines(out)} == {0}
    # greedy decoding: sample 0 only is generated, the rest are the same sequence
    greedy = _recipe(model_dir, prompts_file, tmp_path, "generation.temperature=0")
    g = generate_recipe(greedy, tmp_path / "greedy.jsonl", samples_per_prompt=3, progress=False)
    assert g["generated"] == 8 and g["written"] == 8 and g["duplicates"] == 16
    assert [x["completion_ids"] for x in _lines(tmp_path / "greedy.jsonl")] == [
        x["completion_ids"] for x in _lines(out)
    ]


def test_student_of_a_finished_run(model_dir, prompts_file, tmp_path, capsys):
    cfg = _recipe(model_dir, prompts_file, tmp_path)
    run = distill(cfg, quiet=True).run_dir
    out = tmp_path / "student.jsonl"
    with pytest.raises(ValueError, match="--run RUN_DIR"):
        generate_recipe(cfg, out, source="student", progress=False)
    s = generate_recipe(cfg, out, source="student", run_dir=run, split="val", progress=False)
    assert s["examples"] == 2 and s["written"] == 2
    meta = json.loads(generate_meta_path(out).read_text())
    student = load_run(run).student
    assert meta["source"] == "student" and meta["run"] == str(run) and meta["split"] == "val"
    assert meta["model"]["weights_sha256"] == weights_hash(student)
    assert meta["model"]["weights_sha256"] != weights_hash(load_causal_lm(str(model_dir)))
    # the CLI, options and overrides intermixed
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(_spec(model_dir, prompts_file, tmp_path)))
    cli = tmp_path / "cli.jsonl"
    args = ["generate", str(recipe), "generation.max_new_tokens=3", "--out", str(cli),
            "--source", "student", "train.progress=false", "--run", str(run),
            "--samples-per-prompt", "2"]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "8 train prompts x 2" in printed and "duplicates skipped" in printed
    assert f"generate {cli}: " in printed
    assert all(len(x["completion_ids"]) <= 3 for x in _lines(cli))


def test_non_prompt_data_is_refused(tmp_path):
    cfg = load_config("tiny-lm")
    with pytest.raises(ValueError, match=r"data.source='synthetic_lm'"):
        generate_recipe(cfg, tmp_path / "x.jsonl", progress=False)
    assert not (tmp_path / "x.jsonl").exists()
    assert not generate_meta_path(tmp_path / "x.jsonl").exists()


def test_distill_on_the_generated_file(model_dir, prompts_file, tmp_path):
    """Sequence-level KD: the generated file is the student's training data (generation off)."""
    cfg = _recipe(model_dir, prompts_file, tmp_path)
    out = tmp_path / "seqkd.jsonl"
    generate_recipe(cfg, out, samples_per_prompt=2, progress=False)
    lines = _lines(out)
    b = build_data("prompts", {"path": str(out)}, 0.2, 0, tokenizer=str(model_dir))
    items = sorted([b.train[i] for i in range(len(b.train))] + [b.val[i] for i in range(len(b.val))],
                   key=lambda x: int(x["index"]))  # fmt: skip
    assert len(items) == len(lines)
    special = set(_tok().all_special_ids)
    for it, x in zip(items, lines):  # reads back as written, less special tokens (EOS, PAD...)
        assert it["prompt_ids"].tolist() == x["prompt_ids"]
        ids = [t for t in x["completion_ids"] if t not in special]
        assert it["input_ids"][it["prompt_length"] :].tolist() == ids
    seq = _recipe(model_dir, out, tmp_path, f"output.dir={tmp_path / 'runs' / 'seqkd'}",
                  "generation.mode=off")  # fmt: skip
    result = distill(seq, quiet=True)
    assert (result.run_dir / "student").is_dir()
    assert "student_perplexity" in result.metrics
