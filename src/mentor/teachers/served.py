"""``source: served``: a teacher behind an OpenAI-compatible completions endpoint.

Recipe::

    teacher:
      source: served
      url: http://127.0.0.1:8000/v1   # the API base (vLLM, `mentor serve-teacher`, llama.cpp)
      model: NAME                      # the served model's name
      top_k: 20                        # log-probs per position (the server's limit bounds it)
      timeout_s: 60                    # per request
      max_retries: 3                   # connection errors, timeouts, HTTP 429/5xx
      concurrency: 4                   # requests in flight per batch

Before the first batch one sentence of the data is sent as text (``echo: true, max_tokens: 1,
logprobs: 1``) and the echo decides how the server is read:

* **token ids** (vLLM, ``mentor serve-teacher``: the echo names tokens ``"token_id:ID"``, as
  vLLM's ``return_tokens_as_token_ids: true`` writes them): the ids must equal the data
  tokenizer's, else the server is refused (``tokenizer mismatch``). Every sequence (its
  attended token ids) is then sent as ids with ``echo: true, max_tokens: 0, logprobs: top_k``
  (``max_tokens: 1`` and the generated token dropped if the server refuses 0 with HTTP 400);
  the echoed prompt's ``top_logprobs`` become a :class:`~mentor.signals.TopK` signal ``[B, T,
  k]`` aligned like dense logits: position ``t`` holds the distribution over token ``t + 1``
  (the echo's entry ``t + 1``; entry 0, the first token, is predicted by nothing).
* **token strings** (``llama-cpp-python``'s server: tokens and top-k keys are each token
  decoded alone, ``" the"``; or the vocabulary's own strings, ``"Ġthe"``): see
  :class:`TokenStrings` and :meth:`ServedTeacher._score_text`. Each sequence is sent as its
  text, one prompt per request, with ``max_tokens: 1`` (llama.cpp reads ``max_tokens: 0`` as
  *unlimited*) and ``logprobs: top_k + margin``; the echo must reproduce the data's tokens;
  strings that several ids decode to (``""`` for control tokens and bytes of a split UTF-8
  character) are dropped and counted (``stats``), and the ``top_k`` most likely of the rest are
  kept; a string no id decodes to is an error naming it. Whether the echo's entry ``j`` is the
  distribution over token ``j`` (OpenAI) or *after* it (llama-cpp-python for models without a
  BOS token) is measured once (:meth:`ServedTeacher._probe_shift`).

The last attended position and padding predict nothing the loss reads (the causal shift drops
them); they hold a placeholder. ``tail = log(1 - sum p)`` of the kept log-probs. A server whose
echo changes the tokens it was sent (e.g. adds a BOS token) is refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import Tensor, nn

from mentor.signals import TopK
from mentor.teachers.base import SourceContext, TeacherOutput, TeacherSource, register_source

log = logging.getLogger(__name__)

TOKEN_ID_PREFIX = "token_id:"
# llama-cpp-python renders each token into a 32-byte buffer: a longer piece comes back as ""
PIECE_BUFFER_BYTES = 32


def text_margin(top_k: int) -> int:
    """Extra log-probs asked of a token-string server, to replace dropped ambiguous strings."""
    return max(4, top_k // 4)


class ServedTeacherError(ValueError):
    """A served teacher cannot be used (unreachable, HTTP error, bad response, mismatch)."""


class _HTTPError(ServedTeacherError):
    """An HTTP 4xx answer (``status``, ``body``)."""

    def __init__(self, msg: str, status: int, body: str) -> None:
        super().__init__(msg)
        self.status, self.body = status, body


# ----------------------------------------------------------------------------- token strings


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: byte -> the character byte-level BPE vocabularies use."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _decoder_types(tokenizer: Any) -> set[str]:
    """The ``type`` names of a fast tokenizer's decoder (nested ``Sequence`` included)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return set()
    try:
        spec = json.loads(backend.to_str()).get("decoder")
    except (AttributeError, ValueError):
        return set()
    out: set[str] = set()
    todo = [spec]
    while todo:
        d = todo.pop()
        if isinstance(d, dict):
            out.add(str(d.get("type")))
            todo.extend(d.get("decoders") or [])
    return out


class TokenStrings:
    """The strings a server may write for token ids, and back.

    Two forms: ``"vocab"``, the vocabulary's own strings (``convert_ids_to_tokens``: ``"Ġthe"``,
    ``"Ċ"``), one per id; and ``"text"``, each id decoded alone as llama.cpp writes it (``" the"``,
    ``"\\n"``): its bytes as UTF-8 with incomplete characters dropped, control (special) tokens as
    ``""``. In the text form several ids can share a string (for SmolLM2, 333 of 49,152 ids
    share 4 strings: ``""``, ``" "`` and two split characters); such a string is *ambiguous*.
    """

    def __init__(self, tokenizer: Any) -> None:
        vocab = {str(s): int(i) for s, i in tokenizer.get_vocab().items()}
        n = max(vocab.values()) + 1
        self.vocab = vocab
        self.token_of = [""] * n
        for s, i in vocab.items():
            self.token_of[i] = s
        added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        special = {int(i) for i, a in added.items() if getattr(a, "special", False)}
        plain = {int(i): str(a.content) for i, a in added.items() if int(i) not in special}
        types = _decoder_types(tokenizer)
        if "ByteLevel" in types:
            table = {c: b for b, c in _bytes_to_unicode().items()}

            def raw(s: str, i: int) -> bytes:
                if all(c in table for c in s):
                    return bytes(table[c] for c in s)
                return s.encode()
        elif types & {"ByteFallback", "Metaspace"}:

            def raw(s: str, i: int) -> bytes:
                m = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", s)
                return bytes([int(m.group(1), 16)]) if m else s.replace("▁", " ").encode()
        else:

            def raw(s: str, i: int) -> bytes:
                return tokenizer.decode([i]).encode()

        self.piece_bytes: list[bytes] = []
        for i, s in enumerate(self.token_of):
            if i in special:
                self.piece_bytes.append(b"")
            elif i in plain:
                self.piece_bytes.append(plain[i].encode())
            else:
                self.piece_bytes.append(raw(s, i) if s else b"")
        self.piece_of = [b.decode("utf-8", errors="ignore") for b in self.piece_bytes]
        self.by_piece: dict[str, list[int]] = {}
        for i, p in enumerate(self.piece_of):
            self.by_piece.setdefault(p, []).append(i)

    def string(self, i: int, form: str) -> str:
        """How a server writing ``form`` names id ``i``."""
        return self.token_of[i] if form == "vocab" else self.piece_of[i]

    def matches(self, i: int, s: Any, form: str) -> bool:
        """``s`` can be the server's string for id ``i`` (llama-cpp-python writes pieces longer
        than its 32-byte buffer as ``""``)."""
        if not isinstance(s, str) or not 0 <= i < len(self.token_of):
            return False
        if form == "vocab":
            return s == self.token_of[i]
        return s == self.piece_of[i] or (s == "" and len(self.piece_bytes[i]) > PIECE_BUFFER_BYTES)

    def form_of(self, ids: Sequence[int], strings: Sequence[Any]) -> str | None:
        """The form ``strings`` are written in (``"text"`` when both fit), or None (neither: the
        server's tokenizer is another one)."""
        if len(strings) != len(ids):
            return None
        for form in ("text", "vocab"):
            if all(self.matches(i, s, form) for i, s in zip(ids, strings)):
                return form
        return None

    def ids(self, s: str, form: str) -> list[int]:
        """Every id written ``s`` (none: unknown; several: ambiguous)."""
        if form == "vocab":
            i = self.vocab.get(s)
            return [] if i is None else [i]
        return self.by_piece.get(s, [])


# ----------------------------------------------------------------------------- the source


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
    """A teacher served over HTTP (``mentor serve-teacher``, vLLM, llama.cpp): top-k log-probs
    per token.

    ``stats`` counts, for a token-string server: ``positions`` scored, ``requests`` sent,
    top-k ``entries`` read and the ``ambiguous`` ones dropped (a string several ids decode to), ``retokenized``
    positions scored from text the server tokenizes differently from the data (see
    :meth:`_score_text`).
    """

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
        # how the server is read (decided by check_server): "ids" or "text" (token strings)
        self.mode = "ids"
        self.max_tokens = 0  # ids mode: 1 when the server refuses 0 (the generated token dropped)
        self.form = "text"  # token strings: "text" (" the", llama.cpp) or "vocab" ("Ġthe")
        self.shift = 0  # token strings: 1 when echo entry j is the distribution after token j
        self._strings: TokenStrings | None = None
        self._lock = threading.Lock()
        self._warned = self._warned_text = False
        self.stats = {"positions": 0, "requests": 0, "entries": 0, "ambiguous": 0, "retokenized": 0}

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

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.stats[key] += n

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
                    self._count("requests")
                    r = self._client.post(self.url + path, json=body)
            except httpx.TimeoutException:
                last = (
                    f"no answer within teacher.timeout_s={self.timeout_s:g} s from {self._where()}"
                )
                continue
            except httpx.TransportError as e:
                last = (
                    f"cannot reach {self._where()}: {type(e).__name__}: {e} (is the server — "
                    "`mentor serve-teacher`, vLLM, llama.cpp — running at that address?)"
                )
                continue
            if r.status_code == 429 or r.status_code >= 500:
                last = f"{self._where()} answered HTTP {r.status_code}: {_snippet(r.text)}"
                continue
            if r.status_code >= 400:
                raise _HTTPError(
                    f"{self._where()} answered HTTP {r.status_code} to POST {path}: "
                    f"{_snippet(r.text)}",
                    r.status_code,
                    r.text,
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
        """``choices[i].logprobs`` of every sequence (echoed; ids mode)."""
        body = {
            "model": self.model, "prompt": seqs, "max_tokens": self.max_tokens, "echo": True,
            "logprobs": self.top_k, "temperature": 0.0, "return_tokens_as_token_ids": True,
        }  # fmt: skip
        if self._compact:
            body["mentor_compact"] = True
        try:
            data = self._post("/completions", body)
        except _HTTPError as e:
            if body["max_tokens"] != 0 or e.status != 400 or "max_tokens" not in e.body:
                raise
            # e.g. vLLM versions whose sampling parameters need max_tokens >= 1: generate one
            # token and drop it from the echo
            self.max_tokens = 1
            return self._score(seqs)
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
                    "`mentor serve-teacher`, llama.cpp)"
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
        """The served model's name and tokenizer match the recipe, and how the server writes
        tokens (ids or strings) is decided (once, before scoring)."""
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
            # max_tokens 1, not 0: llama.cpp reads 0 as "no limit"; the generated token is cut
            body = {
                "model": self.model, "prompt": text, "max_tokens": 1, "echo": True,
                "logprobs": 1, "temperature": 0.0, "return_tokens_as_token_ids": True,
            }  # fmt: skip
            data = self._post("/completions", body)
            try:
                toks = data["choices"][0]["logprobs"]["tokens"]
                if not isinstance(toks, list):
                    raise TypeError
            except (KeyError, IndexError, TypeError):
                raise ServedTeacherError(
                    f"{self._where()}: the response has no log-probs (choices[0].logprobs."
                    "tokens) for an echoed text prompt"
                ) from None
            as_ids = bool(toks) and all(
                isinstance(t, int) or (isinstance(t, str) and t.startswith(TOKEN_ID_PREFIX))
                for t in toks
            )
            if as_ids:
                mine = self.tokenizer(text)["input_ids"]
                theirs = [self._token_id(t) for t in toks][: len(mine)]
                if theirs != mine:
                    raise ServedTeacherError(
                        f"tokenizer mismatch: the server at {self._where()} tokenizes {text!r} "
                        f"as {theirs[:12]} but the data's tokenizer ({self.tokenizer_name}) "
                        f"gives {mine[:12]}; serve a teacher with the data's tokenizer, or set "
                        "the data tokenizer (the student's model) to the served teacher's"
                    )
            else:
                self._check_text_server(text, toks, _prompt_tokens(data))
        self._checked = True

    def _check_text_server(self, text: str, toks: list[Any], used: int | None) -> None:
        """A server writing token strings: their form, the same tokenizer, no added BOS, and
        how its echo is aligned."""
        self.mode, self.max_tokens = "text", 1
        self._strings = strings = TokenStrings(self.tokenizer)
        mine = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        form = strings.form_of(mine, toks[: len(mine)])
        if form is None:
            want = [strings.string(i, "text") for i in mine[:12]]
            raise ServedTeacherError(
                f"tokenizer mismatch: the server at {self._where()} writes the tokens of "
                f"{text!r} as {[str(t) for t in toks[:12]]}, but the data's tokenizer "
                f"({self.tokenizer_name}) gives {want} (ids {mine[:12]}); serve a teacher with "
                "the data's tokenizer, or set the data tokenizer to the served teacher's"
            )
        self.form = form
        if used is not None and used != len(mine):
            raise ServedTeacherError(
                f"{self._where()} scored {used} tokens for a text of {len(mine)} tokens: it adds "
                "tokens the data does not have (a BOS token: llama.cpp adds one when the GGUF "
                "file's tokenizer.ggml.add_bos_token is true); serve a model that does not, or "
                "use a server that takes token ids (vLLM, `mentor serve-teacher`)"
            )
        self.shift = self._probe_shift(mine)

    # ------------------------------------------------------------------ token strings
    def _text(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(
            list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False
        )

    def _round_trips(self, ids: Sequence[int]) -> bool:
        """The text of ``ids`` tokenizes back to ``ids`` (with the data's tokenizer)."""
        text = self._text(ids)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] == list(ids)

    def _text_request(
        self, ids: Sequence[int], *, echo: bool, k: int | None = None, seed: int | None = None
    ) -> tuple[dict[str, Any], int | None]:
        """``choices[0].logprobs`` (and ``usage.prompt_tokens``) of the text of ``ids`` with one
        generated token (greedy, or sampled with ``seed``)."""
        body: dict[str, Any] = {
            "model": self.model, "prompt": self._text(ids), "max_tokens": 1, "echo": echo,
            "logprobs": k or self.top_k + text_margin(self.top_k),
            "temperature": 0.0 if seed is None else 1.0,
        }  # fmt: skip
        if seed is not None:
            body["seed"] = seed
        data = self._post("/completions", body)
        try:
            lp = data["choices"][0]["logprobs"]
            if not isinstance(lp["tokens"], list) or not isinstance(lp["top_logprobs"], list):
                raise TypeError
        except (KeyError, IndexError, TypeError):
            raise ServedTeacherError(
                f"{self._where()}: the response has no log-probs (choices[0].logprobs.tokens "
                f"and .top_logprobs): {_snippet(str(data))}"
            ) from None
        return lp, _prompt_tokens(data)

    def _check_echo(self, ids: Sequence[int], toks: list[Any], used: int | None) -> None:
        """The server's echo of the text of ``ids`` names the same tokens."""
        strings = self._strings
        assert strings is not None
        for j, i in enumerate(ids):
            s = toks[j] if j < len(toks) else None
            if not strings.matches(i, s, self.form):
                got = "nothing" if s is None else repr(s)
                raise ServedTeacherError(
                    f"{self._where()} tokenized the text of a sequence differently from the "
                    f"data: at position {j} the data has token {i} "
                    f"({strings.string(i, self.form)!r}), the echo has {got} (llama.cpp's echo "
                    "leaves out its BOS token wherever it occurs, e.g. <|im_start|> of "
                    "SmolLM2; serve through vLLM or `mentor serve-teacher` for such data)"
                )
        if used is not None and used != len(ids):
            raise ServedTeacherError(
                f"{self._where()} scored {used} tokens for a text of {len(ids)} tokens (does "
                "it add a BOS token?)"
            )

    def _probe_shift(self, ids: Sequence[int]) -> int:
        """0 when echo entry ``j`` is the distribution over token ``j`` (OpenAI, vLLM), 1 when it
        is the distribution *after* token ``j`` (llama-cpp-python for a model without BOS).

        Sends ``A = ids[:m]`` and ``B = ids[:m-1] + [z]``: with the OpenAI meaning, entry
        ``m - 1`` of both is the distribution over token ``m - 1`` given ``ids[:m-1]``, the same;
        shifted, it is the distribution after ``A`` resp. ``B``, which differ. Entry ``m - 2``
        (the same in both meanings) measures the server's numerical noise.
        """
        for m in range(min(len(ids), 8), 2, -1):
            a = list(ids[:m])
            if not self._round_trips(a):
                continue
            for z in dict.fromkeys(ids):
                b = [*a[:-1], z]
                if z == a[-1] or self._strings is None or not self._round_trips(b):
                    continue
                la, ua = self._text_request(a, echo=True, k=5)
                lb, ub = self._text_request(b, echo=True, k=5)
                self._check_echo(a, la["tokens"], ua)
                self._check_echo(b, lb["tokens"], ub)
                last = _top_diff(la["top_logprobs"], lb["top_logprobs"], m - 1)
                noise = _top_diff(la["top_logprobs"], lb["top_logprobs"], m - 2)
                return int(last > max(1e-3, 10 * noise))
        raise ServedTeacherError(
            f"{self._where()} writes token strings, and no prefix of the probe sentence let "
            "mentor tell how its echo is aligned (the data's first sequence is too short?)"
        )

    def _top_ids(self, top: Any, t: int) -> list[tuple[int, float]]:
        """The ``top_k`` most likely (id, log-prob) of a ``{string: log-prob}`` entry whose
        string names one id (position ``t``, for errors)."""
        strings, k = self._strings, self.top_k
        assert strings is not None
        if not isinstance(top, dict):
            raise ServedTeacherError(
                f"{self._where()} returned no top-k log-probs for position {t}: {top!r}"
            )
        items: list[tuple[int, float]] = []
        dropped: list[str] = []
        self._count("entries", len(top))
        for key, v in top.items():
            cands = strings.ids(str(key), self.form)
            if not cands:
                raise ServedTeacherError(
                    f"{self._where()} returned the token {key!r} (position {t}), which no "
                    f"token of the data's tokenizer ({self.tokenizer_name}) is written as: is "
                    "another tokenizer served?"
                )
            if len(cands) > 1:
                dropped.append(str(key))
                continue
            items.append((cands[0], float(v)))
        if dropped:
            self._count("ambiguous", len(dropped))
            if not self._warned:
                self._warned = True
                log.warning(
                    "%s writes top-k tokens as strings; %r (position %d) is written for %d "
                    "token ids, so mentor drops such entries (their mass joins the tail) and "
                    "keeps the top_k most likely of the rest; counted in stats['ambiguous']",
                    self._where(), dropped[0], t, len(strings.ids(dropped[0], self.form)),
                )  # fmt: skip
        items.sort(key=lambda x: -x[1])
        if len(items) < k:
            raise ServedTeacherError(
                f"{self._where()} returned {len(top)} log-probs at position {t}, of which "
                f"{len(items)} name one token id each (ambiguous strings: {dropped!r}); "
                f"teacher.top_k={k} needs {k}: lower teacher.top_k"
            )
        return items[:k]

    def _dist_after(self, ids: Sequence[int], exact: bool, t: int) -> list[tuple[int, float]]:
        """The top-k after the text of ``ids`` (``echo: false``: the generated token's entry),
        greedy, else sampled with seeds 1-3 when greedy decoding stops at once (an EOS token
        leaves no entry)."""
        for seed in (None, 1, 2, 3):
            lp, used = self._text_request(ids, echo=False, seed=seed)
            if exact and used is not None and used != len(ids):
                raise ServedTeacherError(
                    f"{self._where()} scored {used} tokens for a text of {len(ids)} tokens"
                )
            tops = lp["top_logprobs"]
            if tops and isinstance(tops[0], dict):
                return self._top_ids(tops[0], t)
        raise ServedTeacherError(
            f"{self._where()} generated no token after the text of position {t} (four tries)"
        )

    def _score_text(self, seq: list[int]) -> tuple[Tensor, Tensor, Tensor]:
        """``[n - 1, k]`` ids and log-probs and ``[n - 1]`` tails of one sequence from a server
        writing token strings.

        The text of the longest prefix ``seq[:p]`` (``p <= n - 1``: the last token predicts
        nothing the loss reads) that tokenizes back to its ids is sent with ``echo: true``; its
        echo gives positions ``1 .. p-1`` (shifted: entry ``t``) or ``0 .. p-1`` (OpenAI: entry
        ``t + 1``, the generated token's entry last). A position it does not give is asked
        alone, as the distribution after the text of ``seq[:t+1]`` (``echo: false``): position
        0 of a shifted echo (entry 0 is ``null``), and positions from ``p`` on. The text of
        such a ``seq[:t+1]`` does not tokenize back to its ids (a block cut between two
        newline tokens, which the tokenizer writes as one): the server scores its own
        tokenization of the same text there, counted in ``stats['retokenized']``.
        """
        n, k = len(seq), self.top_k
        rows: list[list[tuple[int, float]] | None] = [None] * max(n - 1, 0)
        p = n - 1
        while p > 0 and not self._round_trips(seq[:p]):
            p -= 1
        if p:
            lp, used = self._text_request(seq[:p], echo=True)
            self._check_echo(seq[:p], lp["tokens"], used)
            tops = lp["top_logprobs"]
            for t in range(p):
                e = t + 1 - self.shift
                if e < len(tops) and tops[e] is not None:
                    rows[t] = self._top_ids(tops[e], t)
        for t in range(n - 1):
            if rows[t] is None:
                exact = t + 1 <= p and self._round_trips(seq[: t + 1])
                rows[t] = self._dist_after(seq[: t + 1], exact, t)
                if not exact:
                    self._count("retokenized")
                    if not self._warned_text:
                        self._warned_text = True
                        log.warning(
                            "%s takes text prompts, and the text of a sequence up to position "
                            "%d tokenizes to other ids than the data's (e.g. two newline "
                            "tokens written as one): such positions are scored on the "
                            "server's tokenization of the same text; counted in "
                            "stats['retokenized']",
                            self._where(), t,
                        )  # fmt: skip
        self._count("positions", n - 1)
        ri = torch.tensor([[i for i, _ in r] for r in rows if r], dtype=torch.long)
        rv = torch.tensor([[v for _, v in r] for r in rows if r], dtype=torch.float64)
        ri, rv = ri.reshape(n - 1, k), rv.reshape(n - 1, k)
        tail = torch.log1p(-rv.exp().sum(-1).clamp(max=1.0))
        return ri, rv.float(), tail.float()

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
        todo = [i for i in range(b) if len(seqs[i]) > (1 if self.mode == "text" else 0)]
        size = max(1, math.ceil(len(todo) / self.concurrency))
        chunks = [todo[j : j + size] for j in range(0, len(todo), size)]
        if self.mode == "text":  # one sequence per request (llama.cpp takes one prompt)

            def run(rows: list[int]) -> list[tuple[Tensor, Tensor, Tensor]]:
                return [self._score_text(seqs[r]) for r in rows]
        else:

            def run(rows: list[int]) -> list[tuple[Tensor, Tensor, Tensor]]:
                lps_list = self._score([seqs[r] for r in rows])
                return [self._row(seqs[r], lp) for r, lp in zip(rows, lps_list)]

        for rows, outs in zip(chunks, self._pool.map(run, chunks)):
            for r, (ri, rv, rt) in zip(rows, outs):
                pos = where[r][: len(seqs[r]) - 1]  # entry j + 1 predicts token j + 1
                idx[r, pos], lps[r, pos], tail[r, pos] = ri, rv, rt
        dev = ids.device
        return TeacherOutput(logits=TopK(idx.to(dev), lps.to(dev), tail.to(dev)))

    def _row(self, seq: list[int], lp: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor]:
        """``[n - 1, k]`` ids and log-probs and ``[n - 1]`` tails of one echoed sequence (ids
        mode; entries after the ``n`` echoed prompt tokens, generated ones, are dropped)."""
        toks = lp.get("tokens")
        compact = lp.get("mentor_top")
        tops = lp.get("top_logprobs") or (compact or {}).get("ids", [])
        n, k = len(seq), self.top_k
        if (
            not isinstance(toks, list)
            or not n <= len(toks) <= n + self.max_tokens
            or not n <= len(tops) <= n + self.max_tokens
        ):
            got = len(toks) if isinstance(toks, list) else "no"
            raise ServedTeacherError(
                f"{self._where()} echoed {got} tokens for a prompt of {n} token ids with "
                f"max_tokens={self.max_tokens} (does it honour echo, or add tokens such as BOS?)"
            )
        echoed = [self._token_id(x) for x in toks[:n]]
        if echoed != seq:
            j = next(j for j, (a, c) in enumerate(zip(echoed, seq)) if a != c)
            raise ServedTeacherError(
                f"{self._where()} changed the token ids it was sent (position {j}: sent "
                f"{seq[j]}, echoed {echoed[j]}): it does not score token-id prompts as given"
            )
        if isinstance(compact, dict):  # `mentor serve-teacher`: [n, k] arrays, row 0 unused
            try:
                ci = torch.tensor(compact["ids"], dtype=torch.long)[1:n]
                cv = torch.tensor(compact["logprobs"], dtype=torch.float64)[1:n]
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


def _prompt_tokens(data: Any) -> int | None:
    """``usage.prompt_tokens`` of a response, when it has one."""
    usage = data.get("usage") if isinstance(data, dict) else None
    n = usage.get("prompt_tokens") if isinstance(usage, dict) else None
    return n if isinstance(n, int) and not isinstance(n, bool) else None


def _top_diff(a: list[Any], b: list[Any], e: int) -> float:
    """Largest difference of the log-probs two echoes give one string at entry ``e`` (``inf``
    when they share none, 0 when an entry is missing)."""
    ta = a[e] if 0 <= e < len(a) else None
    tb = b[e] if 0 <= e < len(b) else None
    if not isinstance(ta, dict) or not isinstance(tb, dict):
        return 0.0
    common = set(ta) & set(tb)
    if not common:
        return math.inf
    return max(abs(float(ta[s]) - float(tb[s])) for s in common)


__all__ = ["ServedOptions", "ServedTeacher", "ServedTeacherError", "TokenStrings"]
