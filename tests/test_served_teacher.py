"""``mentor serve-teacher`` and ``teacher.source: served``: a teacher over the completions API."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
import yaml

from mentor.config import ConfigError, load_config
from mentor.signals import TopK
from mentor.teachers.served import ServedTeacher, ServedTeacherError
from prompt_data import N_WORDS, W_EOS, W_PAD, save_tiny_llama, write_word_prompts

K = 5
ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(url: str, proc: subprocess.Popen | None = None, timeout: float = 90) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(f"{url}/models", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} did not come up")


class _Thread:
    """An ASGI app served by uvicorn in a thread."""

    def __init__(self, app) -> None:
        import uvicorn

        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        cfg = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="error")
        self.server = uvicorn.Server(cfg)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        _wait_ready(self.url, timeout=20)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    teacher, data = (
        save_tiny_llama(root / "teacher"),
        write_word_prompts(root / "prompts.jsonl", n=12),
    )
    return teacher, data, save_tiny_llama(root / "student", seed=1)


@pytest.fixture(scope="module")
def served(lm):
    """`mentor serve-teacher FOLDER` in a subprocess (the real command)."""
    port = _free_port()
    cmd = [sys.executable, "-m", "mentor.cli", "serve-teacher", str(lm[0]), "--port", str(port),
           "--model-name", "tiny"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MENTOR_DEBUG": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        _wait_ready(url, proc)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def _model(folder):
    from mentor.models.hf import load_causal_lm

    return load_causal_lm(str(folder))


def _tok():
    from prompt_data import word_tokenizer

    return word_tokenizer()


def test_models_and_completions_api(served):
    models = httpx.get(f"{served}/models").json()
    assert models["data"][0]["id"] == "tiny" and models["data"][0]["vocab_size"] == N_WORDS + 3
    body = {"model": "tiny", "prompt": [[5, 6, 7], "w1 w2"], "max_tokens": 0, "echo": True,
            "logprobs": 3, "return_tokens_as_token_ids": True}  # fmt: skip
    r = httpx.post(f"{served}/completions", json=body).json()
    a, b = (c["logprobs"] for c in r["choices"])
    assert a["tokens"] == ["token_id:5", "token_id:6", "token_id:7"]
    assert a["top_logprobs"][0] is None and a["token_logprobs"][0] is None
    assert len(a["top_logprobs"][1]) == 3 and all(
        k.startswith("token_id:") for k in a["top_logprobs"][1]
    )
    assert b["tokens"] == ["token_id:4", "token_id:5"]  # w1 w2 with the word tokenizer
    assert r["choices"][1]["text"] == "w1 w2"
    plain = httpx.post(f"{served}/completions", json={**body, "prompt": "w1 w2",
                       "return_tokens_as_token_ids": False}).json()  # fmt: skip
    assert plain["choices"][0]["logprobs"]["tokens"] == ["w1", "w2"]
    gen = httpx.post(f"{served}/completions", json={"model": "tiny", "prompt": [5, 6],
                     "max_tokens": 2, "temperature": 0}).json()  # fmt: skip
    assert gen["usage"]["completion_tokens"] >= 1
    bad = httpx.post(f"{served}/completions", json={**body, "model": "other"})
    assert bad.status_code == 404 and "does not exist" in bad.json()["error"]["message"]


@pytest.mark.parametrize("compact", [True, False])
def test_served_top_k_equals_in_process_top_k(served, lm, compact):
    """The served signal at position t is TopK.from_logits of the model's logits at t — from
    mentor's compact arrays and from the OpenAI/vLLM dict per position alike."""
    model = _model(lm[0])
    teacher = ServedTeacher(served, "tiny", top_k=K, tokenizer=_tok(), concurrency=2)
    teacher.check_server([5, 9, 12])
    assert teacher._compact  # `mentor serve-teacher` advertises the compact arrays
    teacher._compact = compact
    rows = [[5, 9, 12, 3, 30], [7, 8], [20, 21, 22, 23, 24, 25, 26]]
    t = max(map(len, rows))
    ids = torch.full((len(rows), t), W_PAD)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):  # row 0 left-padded, the others right-padded
        sl = slice(t - len(r), t) if i == 0 else slice(0, len(r))
        ids[i, sl], mask[i, sl] = torch.tensor(r), 1
    sig = teacher({"input_ids": ids, "attention_mask": mask}).logits
    assert isinstance(sig, TopK) and sig.indices.shape == (3, t, K) and sig.tail.shape == (3, t)
    for i, r in enumerate(rows):
        with torch.no_grad():
            ref = TopK.from_logits(model(torch.tensor([r])).logits[0], K)
        pos = mask[i].nonzero().squeeze(1)[:-1]  # the last token predicts nothing sent back
        assert torch.equal(sig.indices[i, pos], ref.indices[:-1])
        torch.testing.assert_close(sig.logprobs[i, pos], ref.logprobs[:-1], atol=1e-5, rtol=0)
        torch.testing.assert_close(sig.tail[i, pos], ref.tail[:-1], atol=1e-5, rtol=0)
    assert torch.isfinite(sig.logprobs).all() and torch.isfinite(sig.tail).all()
    teacher.close()


def _recipe(tmp_path, lm, teacher, name):
    spec = {
        "name": name,
        "teacher": teacher,
        "student": {"builder": "hf_causal_lm", "params": {"model": str(lm[2])}},  # not the teacher
        "data": {"source": "prompts", "params": {"path": str(lm[1])}, "val_fraction": 0.25},
        "objective": {"fkl": {"loss": "forward_kl"}},
        "train": {
            "max_steps": 3,
            "batch_size": 4,
            "progress": False,
            "log_every": 1,
            "lr": 1e-2,
            "seed": 0,
        },  # fmt: skip
        "eval": {"batch_size": 4, "every": None},
        "output": {"dir": str(tmp_path / "runs" / name)},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _losses(run_dir):
    recs = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in recs if r["kind"] == "train"]


def test_distill_and_cache_with_a_served_teacher(served, lm, tmp_path):
    """Same losses as the in-process teacher with teacher.top_k; `mentor cache` stores it."""
    from mentor.assembly import distill
    from mentor.cli import main

    online = {"builder": "hf_causal_lm", "params": {"model": str(lm[0])}, "top_k": K}
    remote = {"source": "served", "url": served, "model": "tiny", "top_k": K}
    a = distill(load_config(_recipe(tmp_path, lm, online, "online")), quiet=True)
    recipe = _recipe(tmp_path, lm, remote, "served")
    b = distill(load_config(recipe), quiet=True)
    la, lb = _losses(a.run_dir), _losses(b.run_dir)
    assert len(la) == 3 and la == pytest.approx(lb, abs=1e-4)

    cache = tmp_path / "cache"
    assert (
        main(["cache", str(recipe), "--out", str(cache), "--top-k", str(K), "--dtype", "fp32"]) == 0
    )
    assert main(["cache", "verify", str(cache)]) == 0
    manifest = json.loads(next(cache.rglob("manifest.json")).read_text())
    assert '"source": "served"' in json.dumps(manifest) and served in json.dumps(manifest)
    from_cache = {"source": "cache", "cache": str(cache)}
    c = distill(load_config(_recipe(tmp_path, lm, from_cache, "cached")), quiet=True)
    assert _losses(c.run_dir) == pytest.approx(lb, abs=1e-4)  # the cache holds the served top-k
    assert main(["cache", str(recipe), "--out", str(tmp_path / "c2"), "--top-k", "8"]) == 2
    assert main(["cache", str(recipe), "--out", str(tmp_path / "c3"), "--samples", "4"]) == 2


def test_recipe_keys_are_checked():
    with pytest.raises(ConfigError, match="must start with http"):
        load_config(
            "digits", ["teacher.source=served", "teacher.url=localhost:1", "teacher.model=m"]
        )
    with pytest.raises(ConfigError, match="url"):
        load_config("digits", ["teacher.source=served", "teacher.model=m"])


def test_unreachable_endpoint_is_named():
    url = f"http://127.0.0.1:{_free_port()}/v1"
    t = ServedTeacher(url, "m", top_k=K, max_retries=1, backoff_s=0.01)
    with pytest.raises(ServedTeacherError, match=r"cannot reach teacher.url=.*after 2 attempts"):
        t({"input_ids": torch.tensor([[5, 6, 7]])})


def _fake(mode: str):
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, PlainTextResponse

    app = FastAPI()
    app.state.calls = 0

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": "m", "object": "model"}]}

    @app.post("/v1/completions", response_model=None)
    def completions(body: dict):
        app.state.calls += 1
        if mode == "garbage":
            return PlainTextResponse("<html>not json</html>")
        if mode == "500":
            return JSONResponse({"error": "boom"}, 500)
        if mode == "400":
            return JSONResponse({"error": {"message": "logprobs too large"}}, 400)
        n = len(body["prompt"])
        return {"choices": [{"index": i, "text": "", "logprobs": None} for i in range(n)]}

    return app


@pytest.mark.parametrize(
    "mode, match",
    [
        ("garbage", "malformed JSON"),
        ("nologprobs", "has no log-probs"),
        ("500", r"HTTP 500.*after 2 attempts"),
        ("400", "HTTP 400.*logprobs too large"),
    ],
)
def test_bad_servers_give_clear_errors(mode, match):
    srv = _Thread(_fake(mode))
    try:
        t = ServedTeacher(srv.url, "m", top_k=K, max_retries=1, backoff_s=0.01)
        with pytest.raises(ServedTeacherError, match=match):
            t({"input_ids": torch.tensor([[5, 6, 7], [8, 9, 10]])})
        with pytest.raises(ServedTeacherError, match="not served"):
            ServedTeacher(srv.url, "other", top_k=K)({"input_ids": torch.tensor([[5, 6]])})
    finally:
        srv.stop()


def test_a_server_with_another_tokenizer_is_refused(lm):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from mentor.serve import LoadedTeacher, create_app

    vocab = {"[PAD]": W_PAD, "[UNK]": 1, "</s>": W_EOS}
    vocab.update({f"w{i}": N_WORDS + 2 - i for i in range(N_WORDS)})  # the ids reversed
    t = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    other = PreTrainedTokenizerFast(tokenizer_object=t, unk_token="[UNK]", pad_token="[PAD]")
    srv = _Thread(create_app(LoadedTeacher(_model(lm[0]), other, "tiny")))
    try:
        teacher = ServedTeacher(srv.url, "tiny", top_k=K, tokenizer=_tok(), tokenizer_name="words")
        with pytest.raises(ServedTeacherError, match=r"tokenizer mismatch.*teacher.url=.*words"):
            teacher({"input_ids": torch.tensor([[5, 6, 7]])})
    finally:
        srv.stop()


def test_concurrent_requests_are_batched(lm):
    from mentor.serve import LoadedTeacher, create_app

    app = create_app(LoadedTeacher(_model(lm[0]), _tok(), "tiny"), batch_wait_ms=50)
    srv = _Thread(app)
    try:
        teacher = ServedTeacher(srv.url, "tiny", top_k=K, tokenizer=_tok(), concurrency=4)
        teacher.check_server([5, 6])
        before = app.state.scorer.batches
        teacher({"input_ids": torch.randint(3, N_WORDS, (8, 6))})
        assert app.state.scorer.batches - before < 4  # 4 requests, fewer forward passes
    finally:
        srv.stop()
