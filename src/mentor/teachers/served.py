"""``source: served``: a teacher behind an OpenAI-compatible completions endpoint.

Recipe::

    teacher:
      source: served
      url: http://127.0.0.1:8000/v1   # the API base (vLLM, `mentor serve-teacher`)
      model: NAME                      # the served model's name
      top_k: 20                        # log-probs per position (the server's limit bounds it)
      timeout_s: 60                    # per request
      max_retries: 3                   # connection errors, timeouts, HTTP 429/5xx
      concurrency: 4                   # requests in flight per batch

For each batch every sequence (its attended token ids) is sent with ``echo: true,
max_tokens: 0, logprobs: top_k, return_tokens_as_token_ids: true``; the echoed prompt's
``top_logprobs`` become a :class:`~mentor.signals.TopK` signal ``[B, T, k]`` aligned like dense
logits: position ``t`` holds the distribution over token ``t + 1`` (the echo's entry ``t + 1``;
entry 0, the first token, is predicted by nothing). The last attended position and padding
predict nothing the loss reads (the causal shift drops them); they hold a placeholder.
``tail = log(1 - sum p)`` of the kept log-probs.

Before the first batch, one sentence of the data is sent as text and the server's token ids
are compared with the data tokenizer's: a server with another tokenizer is refused, as is one
whose echo changes the token ids it was sent (e.g. adds a BOS token).
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import Tensor, nn

from mentor.signals import TopK
from mentor.teachers.base import SourceContext, TeacherOutput, TeacherSource, register_source

TOKEN_ID_PREFIX = "token_id:"


class ServedTeacherError(ValueError):
    """A served teacher cannot be used (unreachable, HTTP error, bad response, mismatch)."""


class ServedOptions(BaseModel):
    """Keys of ``source: served``."""

    model_config = ConfigDict(extra="forbid")

    url: str
    model: str
    top_k: int = Field(20, ge=1)
    timeout_s: float = Field(60.0, gt=0)
    max_retries: int = Field(3, ge=0)
    concurrency: int = Field(4, ge=1)
    backoff_s: float = Field(0.5, ge=0)  # first retry delay; doubled on each retry

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError(f"url {v!r} must start with http:// or https://")
        return v.rstrip("/")


class ServedEndpoint(nn.Module):
    """Stands for the served teacher in a cache's provenance (a hash of its URL and model)."""

    def __init__(self, url: str, model: str) -> None:
        super().__init__()
        digest = hashlib.sha256(f"{url}|{model}".encode()).digest()
        self.register_buffer("endpoint", torch.tensor(list(digest), dtype=torch.uint8))


@register_source("served")
class ServedTeacher(TeacherSource):
    """A teacher served over HTTP (``mentor serve-teacher``, vLLM): top-k log-probs per token."""

    Options = ServedOptions
    uses_module = False
    cacheable = True

    def __init__(
        self,
        url: str,
        model: str,
        *,
        top_k: int = 20,
        timeout_s: float = 60.0,
        max_retries: int = 3,
        concurrency: int = 4,
        backoff_s: float = 0.5,
        tokenizer: Any = None,
        tokenizer_name: str | None = None,
    ) -> None:
        import httpx

        self.url, self.model, self.top_k = url.rstrip("/"), model, top_k
        self.timeout_s, self.max_retries, self.backoff_s = timeout_s, max_retries, backoff_s
        self.concurrency = concurrency
        self.tokenizer, self.tokenizer_name = tokenizer, tokenizer_name
        self.taps: list[str] = []
        self._client = httpx.Client(
            timeout=timeout_s,
            limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
        )
        self._pool = ThreadPoolExecutor(concurrency, thread_name_prefix="mentor-served")
        self._checked = False
        self._compact = False  # the server sends top-k as arrays (mentor serve-teacher)
        self.vocab_size: int | None = None

    @classmethod
    def from_config(cls, ctx: SourceContext) -> ServedTeacher:
        """The endpoint of ``teacher.url``/``teacher.model``; the data's tokenizer checks it."""
        o = ctx.cfg.teacher.options
        if ctx.taps:
            raise ValueError(
                "teacher.source=served gives token log-probs only, but the objective taps "
                f"teacher features ({', '.join(ctx.taps)}): use logit terms"
            )
        info = ctx.data.info
        if info.task != "causal_lm":
            raise ValueError(
                f"teacher.source=served scores token sequences (causal LM data); the data's "
                f"task is {info.task!r}"
            )
        tok = None
        if info.tokenizer:
            from mentor.models.assets import load_tokenizer

            tok = load_tokenizer(info.tokenizer)
        return cls(
            o.url, o.model, top_k=o.top_k, timeout_s=o.timeout_s, max_retries=o.max_retries,
            concurrency=o.concurrency, backoff_s=o.backoff_s, tokenizer=tok,
            tokenizer_name=str(info.tokenizer) if info.tokenizer else None,
        )  # fmt: skip

    # ------------------------------------------------------------------ HTTP
    def _where(self) -> str:
        return f"teacher.url={self.url} (teacher.model={self.model})"

    def _post(self, path: str, body: dict[str, Any] | None) -> Any:
        """POST (or GET when ``body`` is None) with retries; the decoded JSON."""
        import httpx

        last = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                if body is None:
                    r = self._client.get(self.url + path)
                else:
                    r = self._client.post(self.url + path, json=body)
            except httpx.TimeoutException:
                last = (
                    f"no answer within teacher.timeout_s={self.timeout_s:g} s from {self._where()}"
                )
                continue
            except httpx.TransportError as e:
                last = (
                    f"cannot reach {self._where()}: {type(e).__name__}: {e} (is the server — "
                    "`mentor serve-teacher`, vLLM — running at that address?)"
                )
                continue
            if r.status_code == 429 or r.status_code >= 500:
                last = f"{self._where()} answered HTTP {r.status_code}: {_snippet(r.text)}"
                continue
            if r.status_code >= 400:
                raise ServedTeacherError(
                    f"{self._where()} answered HTTP {r.status_code} to POST {path}: "
                    f"{_snippet(r.text)}"
                )
            try:
                return r.json()
            except ValueError:
                raise ServedTeacherError(
                    f"{self._where()} answered with malformed JSON to {path}: {_snippet(r.text)}"
                ) from None
        tries = self.max_retries + 1
        raise ServedTeacherError(f"{last} (after {tries} attempt{'s' * (tries > 1)})")

    def _score(self, seqs: list[list[int]]) -> list[dict[str, Any]]:
        """``choices[i].logprobs`` of every sequence (echoed, no new tokens)."""
        body = {
            "model": self.model, "prompt": seqs, "max_tokens": 0, "echo": True,
            "logprobs": self.top_k, "temperature": 0.0, "return_tokens_as_token_ids": True,
        }  # fmt: skip
        if self._compact:
            body["mentor_compact"] = True
        data = self._post("/completions", body)
        choices = data.get("choices") if isinstance(data, dict) else None
        if not isinstance(choices, list) or len(choices) != len(seqs):
            raise ServedTeacherError(
                f"{self._where()}: the response has no list of {len(seqs)} choices: "
                f"{_snippet(str(data))}"
            )
        choices = sorted(choices, key=lambda c: c.get("index", 0) if isinstance(c, dict) else 0)
        out = []
        for c in choices:
            lp = c.get("logprobs") if isinstance(c, dict) else None
            if isinstance(lp, dict) and isinstance(lp.get("mentor_top"), dict):
                out.append(lp)
                continue
            if not isinstance(lp, dict) or not isinstance(lp.get("top_logprobs"), list):
                raise ServedTeacherError(
                    f"{self._where()}: the response has no log-probs (choices[].logprobs."
                    "top_logprobs); the server must support echo with logprobs (vLLM, "
                    "`mentor serve-teacher`)"
                )
            out.append(lp)
        return out

    # ------------------------------------------------------------------ checks
    def _token_id(self, token: Any) -> int:
        if isinstance(token, str) and token.startswith(TOKEN_ID_PREFIX):
            return int(token[len(TOKEN_ID_PREFIX) :])
        if isinstance(token, int):
            return token
        if self.tokenizer is not None:  # a server writing token strings
            i = self.tokenizer.convert_tokens_to_ids(token)
            if isinstance(i, int) and i != self.tokenizer.unk_token_id:
                return i
        raise ServedTeacherError(
            f"{self._where()}: cannot map the returned token {token!r} to a token id (the "
            "server should honour return_tokens_as_token_ids, as vLLM does)"
        )

    def check_server(self, sample: Sequence[int]) -> None:
        """The served model's name and tokenizer match the recipe (once, before scoring)."""
        if self._checked:
            return
        data = self._post("/models", None)
        cards = data.get("data") if isinstance(data, dict) else None
        if isinstance(cards, list):
            names = [c.get("id") for c in cards if isinstance(c, dict)]
            if names and self.model not in names:
                raise ServedTeacherError(
                    f"teacher.model={self.model!r} is not served at teacher.url={self.url} "
                    f"(it serves {', '.join(map(str, names))})"
                )
            for c in cards:
                if isinstance(c, dict) and c.get("id") == self.model and c.get("vocab_size"):
                    self.vocab_size = int(c["vocab_size"])
                if isinstance(c, dict) and c.get("id") == self.model:
                    self._compact = c.get("mentor_compact") is True  # `mentor serve-teacher`
        if self.tokenizer is not None and sample:
            text = self.tokenizer.decode(list(sample), skip_special_tokens=True)
            mine = self.tokenizer(text)["input_ids"]
            body = {
                "model": self.model, "prompt": text, "max_tokens": 0, "echo": True,
                "logprobs": 1, "return_tokens_as_token_ids": True,
            }  # fmt: skip
            data = self._post("/completions", body)
            try:
                toks = data["choices"][0]["logprobs"]["tokens"]
            except (KeyError, IndexError, TypeError):
                raise ServedTeacherError(
                    f"{self._where()}: the response has no log-probs (choices[0].logprobs."
                    "tokens) for an echoed text prompt"
                ) from None
            theirs = [self._token_id(t) for t in toks]
            if theirs != mine:
                raise ServedTeacherError(
                    f"tokenizer mismatch: the server at {self._where()} tokenizes {text!r} as "
                    f"{theirs[:12]} but the data's tokenizer ({self.tokenizer_name}) gives "
                    f"{mine[:12]}; serve a teacher with the data's tokenizer, or set the data "
                    "tokenizer (the student's model) to the served teacher's"
                )
        self._checked = True

    # ------------------------------------------------------------------ the signal
    @torch.no_grad()
    def __call__(self, batch: dict[str, Any]) -> TeacherOutput:
        """Top-k log-probs of every position of ``batch['input_ids']`` (attended tokens)."""
        ids: Tensor = batch["input_ids"]
        mask = batch.get("attention_mask")
        mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
        b, t = ids.shape
        seqs, where = [], []
        for i in range(b):
            pos = mask[i].nonzero().squeeze(1).cpu()
            seqs.append(ids[i].cpu()[pos].tolist())
            where.append(pos)
        self.check_server(next((s for s in seqs if s), []))
        k = self.top_k
        filler = -math.log(k + 1)  # a finite placeholder where nothing is predicted
        idx = torch.arange(k).expand(b, t, k).clone()
        lps = torch.full((b, t, k), filler, dtype=torch.float32)
        tail = torch.full((b, t), filler, dtype=torch.float32)
        todo = [i for i in range(b) if seqs[i]]
        size = max(1, math.ceil(len(todo) / self.concurrency))
        chunks = [todo[j : j + size] for j in range(0, len(todo), size)]
        results = list(self._pool.map(lambda rows: self._score([seqs[r] for r in rows]), chunks))
        for rows, lps_list in zip(chunks, results):
            for r, lp in zip(rows, lps_list):
                ri, rv, rt = self._row(seqs[r], lp)
                pos = where[r][: len(seqs[r]) - 1]  # entry j + 1 predicts token j + 1
                idx[r, pos], lps[r, pos], tail[r, pos] = ri, rv, rt
        dev = ids.device
        return TeacherOutput(logits=TopK(idx.to(dev), lps.to(dev), tail.to(dev)))

    def _row(self, seq: list[int], lp: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor]:
        """``[n - 1, k]`` ids and log-probs and ``[n - 1]`` tails of one echoed sequence."""
        toks = lp.get("tokens")
        tops = lp.get("top_logprobs") or lp.get("mentor_top", {}).get("ids", [])
        n, k = len(seq), self.top_k
        if not isinstance(toks, list) or len(toks) != n or len(tops) != n:
            got = len(toks) if isinstance(toks, list) else "no"
            raise ServedTeacherError(
                f"{self._where()} echoed {got} tokens for a prompt of {n} token ids (does it "
                "honour echo with max_tokens=0, or add tokens such as BOS?)"
            )
        echoed = [self._token_id(x) for x in toks]
        if echoed != seq:
            j = next(j for j, (a, c) in enumerate(zip(echoed, seq)) if a != c)
            raise ServedTeacherError(
                f"{self._where()} changed the token ids it was sent (position {j}: sent "
                f"{seq[j]}, echoed {echoed[j]}): it does not score token-id prompts as given"
            )
        compact = lp.get("mentor_top")
        if isinstance(compact, dict):  # `mentor serve-teacher`: [n, k] arrays, row 0 unused
            try:
                ci = torch.tensor(compact["ids"], dtype=torch.long)[1:]
                cv = torch.tensor(compact["logprobs"], dtype=torch.float64)[1:]
            except (KeyError, TypeError, ValueError):
                raise ServedTeacherError(f"{self._where()}: malformed mentor_top arrays") from None
            if ci.shape != (n - 1, k) or cv.shape != (n - 1, k):
                raise ServedTeacherError(
                    f"{self._where()} returned top-k arrays of shape {tuple(ci.shape)}, "
                    f"expected {(n - 1, k)} (teacher.top_k={k})"
                )
            rv, order = cv.sort(dim=-1, descending=True, stable=True)
            tail = torch.log1p(-rv.exp().sum(-1).clamp(max=1.0))
            return ci.gather(-1, order), rv.float(), tail.float()
        tid, cut = self._token_id, len(TOKEN_ID_PREFIX)
        ids_rows: list[list[int]] = []
        val_rows: list[list[float]] = []
        for j in range(1, n):
            top = tops[j]
            if not isinstance(top, dict) or len(top) < k:
                have = len(top) if isinstance(top, dict) else 0
                raise ServedTeacherError(
                    f"{self._where()} returned {have} log-probs at position {j}, fewer than "
                    f"teacher.top_k={k} (lower teacher.top_k, or raise the server's limit, "
                    "e.g. vLLM --max-logprobs)"
                )
            items = list(top.items())
            if len(items) > k:  # e.g. vLLM adds the echoed token: keep the k most likely
                items = sorted(items, key=lambda x: -float(x[1]))[:k]
            ids_rows.append(
                [
                    int(key[cut:])
                    if isinstance(key, str) and key.startswith(TOKEN_ID_PREFIX)
                    else tid(key)
                    for key, _ in items
                ]
            )
            val_rows.append([float(v) for _, v in items])
        # most likely first (a stable sort keeps the server's order of ties)
        rv, order = (
            torch.tensor(val_rows, dtype=torch.float64)
            .reshape(n - 1, k)
            .sort(dim=-1, descending=True, stable=True)
        )
        ri = torch.tensor(ids_rows, dtype=torch.long).reshape(n - 1, k).gather(-1, order)
        tail = torch.log1p(-rv.exp().sum(-1).clamp(max=1.0))
        return ri, rv.float(), tail.float()

    # ------------------------------------------------------------------ caching
    def provenance_module(self) -> nn.Module:
        """A parameter-free stand-in whose hash names the endpoint URL and model."""
        return ServedEndpoint(self.url, self.model)

    def provenance_spec(self) -> dict[str, Any]:
        """Recorded under ``teacher.spec`` of a cache's provenance."""
        return {"source": "served", "url": self.url, "model": self.model, "top_k": self.top_k}

    def check_cache_settings(self, settings: Any) -> None:
        """``mentor cache`` stores at most the served top-k, and no samples or features."""
        if settings.samples:
            raise ValueError(
                "mentor cache of a served teacher stores its top-k only: drop --samples "
                "(the endpoint returns top-k log-probs, not the full distribution)"
            )
        if settings.top_k > self.top_k:
            raise ValueError(
                f"mentor cache --top-k {settings.top_k} is above teacher.top_k={self.top_k} "
                f"(what the served teacher returns): pass --top-k {self.top_k} or less, or "
                "raise teacher.top_k"
            )

    def cache_function(self, features: Sequence[str], device: torch.device | str) -> Any:
        """``batch -> (TopK, {})`` for ``mentor cache``: the served top-k signal itself, which
        the cache writer stores as its top-k record (``--top-k`` at most ``teacher.top_k``)."""
        if features:
            raise ValueError(
                f"mentor cache of a served teacher stores its top-k only; drop --features "
                f"{' '.join(features)}"
            )

        def run(batch: dict[str, Any]) -> tuple[Any, dict[str, Tensor]]:
            return self(batch).logits, {}

        run.close = lambda: None  # type: ignore[attr-defined]
        return run

    def close(self) -> None:
        """Close the HTTP client and the request threads."""
        self._client.close()
        self._pool.shutdown(wait=False)


def _snippet(text: str, n: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[:n] + "..."


__all__ = ["ServedOptions", "ServedTeacher", "ServedTeacherError"]
