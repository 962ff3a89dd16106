"""``mentor serve-teacher``: a teacher behind the OpenAI-compatible completions API subset.

The subset vLLM and llama.cpp expose and ``teacher.source: served`` reads:

* ``GET /v1/models``: ``{"object": "list", "data": [{"id": NAME, "object": "model",
  "owned_by": "mentor", "max_model_len": N, "vocab_size": V}]}``;
* ``POST /v1/completions`` with ``model``, ``prompt`` (a string, a list of token ids, or a list
  of either), ``max_tokens`` (0 with ``echo``: score the prompt only), ``echo``,
  ``logprobs: K`` (top-K per position), ``temperature``, ``seed`` and vLLM's
  ``return_tokens_as_token_ids``. Each ``choices[i].logprobs`` has ``tokens``,
  ``token_logprobs``, ``top_logprobs`` (a list of ``{token: logprob}``, ``None`` for the first
  echoed token, which nothing predicts) and ``text_offset``. With
  ``return_tokens_as_token_ids: true`` every token (in ``tokens`` and as ``top_logprobs``
  keys) is written ``"token_id:ID"``, as vLLM writes it, so clients need not share detokenised
  strings (several ids can decode to one string); else tokens are the tokenizer's strings.

Concurrent requests are scored together: a worker thread takes every queued sequence (up to
``max_batch`` of them, waiting ``batch_wait_ms`` for more) into one padded forward pass.
Models load with ``trust_remote_code`` off; the server listens on loopback unless ``--host``
says otherwise.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

TOKEN_ID_PREFIX = "token_id:"  # vLLM's return_tokens_as_token_ids representation


@dataclass
class LoadedTeacher:
    """A causal LM, its tokenizer and the name it is served under."""

    model: nn.Module
    tokenizer: Any
    name: str


def load_teacher(
    spec: str, overrides: list[str] | None = None, name: str | None = None
) -> LoadedTeacher:
    """A recipe's teacher (``Assembly(cfg).module()``, a shipped name or a YAML file) or a
    causal LM (folder, asset name, ``.gguf`` file) with its tokenizer."""
    from mentor.models.assets import load_tokenizer
    from mentor.recipes import RECIPES

    if spec in RECIPES.names() or spec.endswith((".yaml", ".yml")):
        from mentor.assembly import Assembly, data_tokenizer
        from mentor.config import load_config

        cfg = load_config(spec, overrides or [])
        asm = Assembly(cfg)
        if not asm.source_class.uses_module or not asm.has_module():
            raise ValueError(
                f"mentor serve-teacher {spec}: the recipe's teacher (source: "
                f"{cfg.teacher.source}) has no module to serve (teacher.builder or teacher.path)"
            )
        tok = data_tokenizer(cfg)
        if tok is None:
            raise ValueError(f"mentor serve-teacher {spec}: the recipe's data has no tokenizer")
        return LoadedTeacher(asm.module().eval(), load_tokenizer(tok), name or cfg.name)
    if overrides:
        raise ValueError("key=value overrides apply to a recipe, not to a model folder")
    from mentor.models.hf import load_causal_lm

    model = load_causal_lm(spec)
    return LoadedTeacher(model.eval(), load_tokenizer(spec), name or Path(spec).name or spec)


# ----------------------------------------------------------------------------- batching


class Scorer:
    """Micro-batches sequences of token ids into padded forward passes on one thread."""

    def __init__(
        self, model: nn.Module, *, max_batch: int = 32, batch_wait_ms: float = 5.0
    ) -> None:
        self.model = model.eval()
        self.device = next(model.parameters(), torch.empty(0)).device
        self.max_batch = max_batch
        self.wait = batch_wait_ms / 1000
        self.batches = 0  # forward passes run (for tests and logs)
        self._q: queue.Queue[tuple[list[int], int, Future] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="mentor-scorer", daemon=True)
        self._thread.start()

    def submit(self, ids: list[int], k: int) -> Future:
        """Future of ``(logprobs [n] of each token given the previous ones, top-k ids [n, k],
        top-k logprobs [n, k])``; row ``t`` is the distribution over token ``t`` (row 0 unused)."""
        fut: Future = Future()
        self._q.put((ids, k, fut))
        return fut

    def close(self) -> None:
        self._q.put(None)

    def _loop(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            items = [item]
            deadline = time.monotonic() + self.wait
            while len(items) < self.max_batch:
                try:
                    nxt = self._q.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if nxt is None:
                    self._q.put(None)
                    break
                items.append(nxt)
            try:
                results = self._score([ids for ids, _, _ in items], [k for _, k, _ in items])
            except Exception as e:  # noqa: BLE001 - handed to every waiting request
                for _, _, fut in items:
                    fut.set_exception(e)
                continue
            for (_, _, fut), res in zip(items, results):
                fut.set_result(res)

    @torch.no_grad()
    def _score(self, seqs: list[list[int]], ks: list[int]) -> list[tuple[Any, Any, Any]]:
        self.batches += 1
        n = max(len(s) for s in seqs)
        ids = torch.zeros(len(seqs), n, dtype=torch.long)
        mask = torch.zeros(len(seqs), n, dtype=torch.long)
        for i, s in enumerate(seqs):  # right padding: default positions are right
            ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
            mask[i, : len(s)] = 1
        out = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device))
        logits = out.logits if hasattr(out, "logits") else out[0]
        lp = F.log_softmax(logits.float(), -1).cpu()
        kmax = min(max(ks), lp.shape[-1])
        vals, idx = lp.topk(kmax, -1)
        res = []
        for i, s in enumerate(seqs):
            m, k = len(s), min(ks[i], kmax)
            # distribution over token t is the model's output at t - 1
            tok = torch.full((m,), float("nan"))
            if m > 1:
                tok[1:] = lp[i, : m - 1].gather(-1, ids[i, 1:m, None]).squeeze(-1)
            top_i = torch.zeros(m, k, dtype=torch.long)
            top_v = torch.zeros(m, k)
            top_i[1:], top_v[1:] = idx[i, : m - 1, :k], vals[i, : m - 1, :k]
            res.append((tok, top_i, top_v, lp[i, m - 1]))
        return res


# ----------------------------------------------------------------------------- the app


class CompletionRequest(BaseModel):
    """The body of ``POST /v1/completions`` (other OpenAI/vLLM fields are ignored)."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    prompt: str | list[int] | list[str | list[int]]
    max_tokens: int = Field(16, ge=0)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0)
    temperature: float = Field(1.0, ge=0)
    seed: int | None = None
    return_tokens_as_token_ids: bool = False
    # mentor's own clients: top-k as two arrays (logprobs.mentor_top) instead of one dict per
    # position; far less to build, send and parse (advertised by /v1/models)
    mentor_compact: bool = False


def create_app(
    teacher: LoadedTeacher,
    *,
    max_batch: int = 32,
    batch_wait_ms: float = 5.0,
    max_logprobs: int = 20,
) -> Any:
    """The FastAPI app serving ``teacher`` (``app.state.scorer``: its micro-batcher)."""
    import asyncio
    from contextlib import asynccontextmanager

    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    tok = teacher.tokenizer
    scorer = Scorer(teacher.model, max_batch=max_batch, batch_wait_ms=batch_wait_ms)
    vocab = _vocab_size(teacher.model, tok)
    max_len = int(getattr(getattr(teacher.model, "config", None), "max_position_embeddings", 0))

    @asynccontextmanager
    async def lifespan(_app: Any) -> Any:
        yield
        scorer.close()

    app = FastAPI(title=f"mentor serve-teacher: {teacher.name}", lifespan=lifespan)
    app.state.scorer = scorer

    def error(status: int, msg: str, kind: str = "invalid_request_error") -> JSONResponse:
        return JSONResponse({"error": {"message": msg, "type": kind, "code": status}}, status)

    def name_of(i: int, as_ids: bool) -> str:
        return f"{TOKEN_ID_PREFIX}{i}" if as_ids else tok.convert_ids_to_tokens(int(i))

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        card = {"id": teacher.name, "object": "model", "owned_by": "mentor"}
        card.update({"max_model_len": max_len or None, "vocab_size": vocab})
        card["mentor_compact"] = True
        return {"object": "list", "data": [card]}

    async def generate(ids: list[int], req: CompletionRequest) -> list[int]:
        def run() -> list[int]:
            g = torch.Generator().manual_seed(req.seed if req.seed is not None else 0)
            out = list(ids)
            for _ in range(req.max_tokens):
                _, _, _, last = scorer.submit(out, 1).result()
                if req.temperature == 0:
                    nxt = int(last.argmax())
                else:
                    probs = (last / req.temperature).softmax(-1)
                    nxt = int(torch.multinomial(probs, 1, generator=g))
                out.append(nxt)
                if nxt == tok.eos_token_id:
                    break
            return out[len(ids) :]

        return await asyncio.get_running_loop().run_in_executor(None, run)

    @app.post("/v1/completions", response_model=None)
    async def completions(req: CompletionRequest) -> Any:
        if req.model not in (None, teacher.name):
            return error(404, f"The model `{req.model}` does not exist (serving {teacher.name!r})")
        k = req.logprobs
        if k is not None and k > max_logprobs:
            return error(400, f"logprobs={k} is above this server's limit of {max_logprobs}")
        prompts: list[Any]
        p = req.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            prompts = [p]
        else:
            prompts = list(p)
        seqs = []
        for x in prompts:
            ids = tok(x)["input_ids"] if isinstance(x, str) else [int(i) for i in x]
            if not ids:
                return error(400, "a prompt is empty")
            bad = [i for i in ids if not 0 <= i < vocab]
            if bad:
                return error(400, f"token id {bad[0]} is out of range (vocabulary size {vocab})")
            seqs.append(ids)
        choices, n_new = [], 0
        news = [await generate(ids, req) if req.max_tokens else [] for ids in seqs]
        fulls = [ids + new for ids, new in zip(seqs, news)]
        # every prompt of the request is submitted before any is awaited: one forward pass
        futs = [scorer.submit(f, max(k, 1)) if k is not None else None for f in fulls]
        for ci, (ids, new, full, fut) in enumerate(zip(seqs, news, fulls, futs)):
            n_new += len(new)
            first = 0 if req.echo else len(ids)
            text = tok.decode(full[first:])
            lp = None
            if fut is not None and req.mentor_compact:
                tl, ti, tv, _ = await asyncio.wrap_future(fut)
                lp = {
                    "tokens": [name_of(i, True) for i in full[first:]],
                    "mentor_top": {
                        "ids": ti[first:, :k].tolist(),
                        "logprobs": tv[first:, :k].tolist(),
                    },
                }
            elif fut is not None:
                tl, ti, tv, _ = await asyncio.wrap_future(fut)
                lp = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
                off = 0
                pieces = tok.batch_decode(
                    [[i] for i in full[first:]]
                )  # one call, not one per token
                for t, piece in zip(range(first, len(full)), pieces):
                    lp["tokens"].append(name_of(full[t], req.return_tokens_as_token_ids))
                    lp["text_offset"].append(off)
                    off += len(piece)
                    if t == 0:
                        lp["token_logprobs"].append(None)
                        lp["top_logprobs"].append(None)
                        continue
                    lp["token_logprobs"].append(float(tl[t]))
                    top = {
                        name_of(int(i), req.return_tokens_as_token_ids): float(v)
                        for i, v in zip(ti[t, :k].tolist(), tv[t, :k].tolist())
                    }
                    lp["top_logprobs"].append(top)
            finish = "length" if len(new) == req.max_tokens else "stop"
            choices.append({"index": ci, "text": text, "logprobs": lp, "finish_reason": finish})
        n_prompt = sum(len(s) for s in seqs)
        return {
            "id": f"cmpl-{time.time_ns():x}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": teacher.name,
            "choices": choices,
            "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_new,
                      "total_tokens": n_prompt + n_new},
        }  # fmt: skip

    return app


def _vocab_size(model: nn.Module, tok: Any) -> int:
    head = getattr(model, "get_output_embeddings", lambda: None)()
    if isinstance(head, nn.Linear):
        return int(head.out_features)
    n = getattr(getattr(model, "config", None), "vocab_size", None)
    return int(n) if n else len(tok)


def serve(
    teacher: LoadedTeacher,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_batch: int = 32,
    batch_wait_ms: float = 5.0,
    max_logprobs: int = 20,
) -> None:
    """Serve ``teacher`` until interrupted."""
    import uvicorn

    app = create_app(
        teacher, max_batch=max_batch, batch_wait_ms=batch_wait_ms, max_logprobs=max_logprobs
    )
    uvicorn.run(app, host=host, port=port, log_level="warning")


__all__ = ["TOKEN_ID_PREFIX", "LoadedTeacher", "Scorer", "create_app", "load_teacher", "serve"]
