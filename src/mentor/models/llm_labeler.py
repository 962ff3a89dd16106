"""A causal LM as a zero-shot text classifier: the teacher of LLM-labelled data.

The model reads a prompt built from the text and scores every class's answer string after it;
the class scores are the answers' summed token log-likelihoods, normalised over the classes
(``log_softmax``), so the module is a drop-in classification teacher whose output is a
distribution over the data's classes (online, cached, KD, calibration metrics all apply).
This is the labelling step of "Prompt-Guided Knowledge Distillation" style pipelines, where a
large LM labels data for a small classifier (Cheng et al., "PGKD: Prompt-Guided Knowledge
Distillation for Text Classification with Large Language Models", 2024), and of zero-shot
classification by answer likelihood (Brown et al., "Language Models are Few-Shot Learners",
2020).

Cost: one forward pass of the prompt per text (batched, left-padded) and, when an answer is
longer than one token, one more pass over the answers' tokens from the prompt's key/value
cache — never one full pass per class.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

RATIONALE_SEP = "Answer:"  # a rationale is the text before its answer line
DEFAULT_PROMPT = (
    "Article: {text}\n\nQuestion: which topic is this article about: {classes}?\nAnswer:"
)


def fill(template: str, **values: str) -> str:
    """``template`` with each ``{key}`` replaced by ``values[key]`` (plain text replacement:
    braces of other kinds are left alone, nothing is evaluated)."""
    pattern = re.compile("|".join(re.escape("{" + k + "}") for k in values))
    return pattern.sub(lambda m: values[m.group(0)[1:-1]], template)  # one pass


def parse_label(text: str, answers: Sequence[str]) -> int | None:
    """The class whose answer string ``text`` names, or ``None``.

    An ``Answer:``/``Label:``/``Topic:`` line wins (its last occurrence); otherwise the answer
    mentioned first. Matching is case-insensitive on whole words; when two answers match at
    the same place the longer one wins.
    """
    words = [re.compile(r"\b" + re.escape(a.strip().lower()) + r"\b") for a in answers]

    def first(s: str) -> int | None:
        best: tuple[int, int, int] | None = None
        for k, w in enumerate(words):
            m = w.search(s)
            if m and (best is None or (m.start(), -len(answers[k])) < best[:2]):
                best = (m.start(), -len(answers[k]), k)
        return None if best is None else best[2]

    low = text.lower()
    tagged = re.findall(r"(?:answer|label|topic|class)\s*(?:is)?\s*[:=]?\s*(.*)", low)
    for line in reversed(tagged):
        k = first(line)
        if k is not None:
            return k
    return first(low)


class LLMClassifier(nn.Module):
    """Texts -> ``[B, C]`` class log-probabilities from a causal LM's answer likelihoods.

    ``prompt`` contains ``{text}`` (the text, cut to ``max_text_tokens`` tokens) and may contain
    ``{classes}`` (the answers joined by ", "); ``chat`` wraps it as a user turn with the
    tokenizer's chat template, followed by ``response_prefix``. Class ``k`` scores
    ``answer_prefix + answers[k]``.
    """

    kind = "llm_classifier"
    takes_texts = True

    def __init__(
        self,
        lm: nn.Module,
        tokenizer: Any,
        answers: Sequence[str],
        *,
        prompt: str = DEFAULT_PROMPT,
        chat: bool = False,
        response_prefix: str = "",
        answer_prefix: str = " ",
        max_text_tokens: int = 256,
        batch_size: int = 8,
    ) -> None:
        """Wrap ``lm`` (a Hugging Face causal LM) and its ``tokenizer``."""
        super().__init__()
        if "{text}" not in prompt:
            raise ValueError(f"teacher.params.prompt must contain {{text}}; got {prompt!r}")
        if len(answers) < 2:
            raise ValueError(f"an LLM classifier needs at least 2 classes; got {list(answers)}")
        self.lm, self.tok = lm, tokenizer
        self.answers = [str(a) for a in answers]
        self.prompt, self.chat, self.response_prefix = prompt, bool(chat), response_prefix
        self.answer_prefix = answer_prefix
        self.max_text_tokens, self.batch_size = int(max_text_tokens), int(batch_size)
        self.answer_ids = [
            tokenizer(answer_prefix + a, add_special_tokens=False)["input_ids"] for a in answers
        ]
        for a, ids in zip(self.answers, self.answer_ids):
            if not ids:
                raise ValueError(f"answer {a!r} has no tokens under the labeller's tokenizer")
        self.calls = 0  # texts scored (teacher calls)

    # ------------------------------------------------------------------ prompts
    def render(self, text: str, prompt: str | None = None) -> str:
        """The full prompt for one text (truncated to ``max_text_tokens`` tokens)."""
        ids = self.tok(text, add_special_tokens=False)["input_ids"]
        if len(ids) > self.max_text_tokens:
            text = self.tok.decode(ids[: self.max_text_tokens], skip_special_tokens=True)
        body = fill(prompt or self.prompt, text=text, classes=", ".join(self.answers))
        if self.chat:
            body = self.tok.apply_chat_template(
                [{"role": "user", "content": body}], tokenize=False, add_generation_prompt=True
            )
        return body + self.response_prefix

    def _encode(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Left-padded ids and mask (no special tokens added: chat templates carry their own)."""
        rows = [self.tok(p, add_special_tokens=not self.chat)["input_ids"] for p in prompts]
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        n = max(len(r) for r in rows)
        ids = torch.full((len(rows), n), int(pad), dtype=torch.long)
        mask = torch.zeros((len(rows), n), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, n - len(r) :] = torch.tensor(r, dtype=torch.long)
            mask[i, n - len(r) :] = 1
        return ids, mask

    # ------------------------------------------------------------------ scoring
    @torch.no_grad()
    def forward(self, texts: Sequence[str]) -> Tensor:
        """``[B, C]`` log-probabilities over the classes (``log_softmax`` of answer scores)."""
        out = [
            self._score(list(texts[i : i + self.batch_size]))
            for i in range(0, len(texts), self.batch_size)
        ]
        return torch.cat(out).log_softmax(-1) if out else torch.empty(0, len(self.answers))

    def _score(self, texts: list[str]) -> Tensor:
        dev = next(self.lm.parameters()).device
        ids, mask = self._encode([self.render(t) for t in texts])
        ids, mask = ids.to(dev), mask.to(dev)
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        from mentor.generation import _forward_names, _returned_cache

        cache_kw = _forward_names(self.lm)[0]
        out = self.lm(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
        first = out.logits[:, -1].float().log_softmax(-1)  # [B, V]
        B, C = len(texts), len(self.answers)
        scores = torch.stack([first[:, a[0]] for a in self.answer_ids], 1)  # [B, C]
        longest = max(len(a) for a in self.answer_ids)
        if longest > 1:  # the rest of each answer, from the prompt's cache: B*C rows
            m = longest - 1
            cont = torch.zeros((C, m), dtype=torch.long)
            cmask = torch.zeros((C, m), dtype=torch.long)
            for k, a in enumerate(self.answer_ids):
                cont[k, : len(a) - 1] = torch.tensor(a[:-1])
                cmask[k, : len(a) - 1] = 1
            cache = _returned_cache(out)
            cache.batch_repeat_interleave(C)
            x = cont.repeat(B, 1).to(dev)
            am = torch.cat([mask.repeat_interleave(C, 0), cmask.repeat(B, 1).to(dev)], 1)
            start = mask.sum(1).repeat_interleave(C, 0)[:, None]
            p = start + torch.arange(m, device=dev)[None]
            logp = (
                self.lm(input_ids=x, attention_mask=am, position_ids=p, **{cache_kw: cache})
                .logits.float()
                .log_softmax(-1)
            )  # [B*C, m, V]
            nxt = torch.zeros((C, m), dtype=torch.long)
            for k, a in enumerate(self.answer_ids):
                nxt[k, : len(a) - 1] = torch.tensor(a[1:])
            got = logp.gather(-1, nxt.repeat(B, 1).to(dev)[..., None])[..., 0]
            rest = (got * cmask.repeat(B, 1).to(dev)).sum(1).view(B, C)
            scores = scores + rest
        self.calls += B
        return scores

    @torch.no_grad()
    def generate(
        self,
        texts: Sequence[str],
        *,
        prompt: str | None = None,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seeds: Sequence[int] | None = None,
    ) -> list[str]:
        """The LM's completion of each text's prompt (``prompt`` overrides the template)."""
        from mentor.generation import SamplingConfig, generate

        dev = next(self.lm.parameters()).device
        ids, mask = self._encode([self.render(t, prompt) for t in texts])
        sampling = SamplingConfig(
            max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p
        ).check()
        gens = None
        if seeds is not None:
            gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
        eos = getattr(self.lm.config, "eos_token_id", None)
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        res = generate(
            self.lm, ids.to(dev), mask.to(dev), sampling, eos_token_id=eos, pad_token_id=pad,
            generator=gens,
        )  # fmt: skip
        self.calls += len(texts)
        return [
            self.tok.decode(row[m.bool()], skip_special_tokens=True)
            for row, m in zip(res.input_ids.cpu(), res.completion_mask.cpu())
        ]


def llm_classifier(
    class_names: Sequence[str],
    *,
    model: str,
    answers: Mapping[str, str] | Sequence[str] | None = None,
    **kw: Any,
) -> LLMClassifier:
    """Load the causal LM ``model`` and wrap it for the data's ``class_names``.

    ``answers`` maps a class name to the word the LM should answer (e.g. ``{tech:
    technology}``), or lists one answer per class; classes not mapped answer their own name.
    """
    from mentor.models.assets import load_tokenizer
    from mentor.models.hf import load_causal_lm

    names = list(class_names)
    if not names:
        raise ValueError("teacher.builder llm_classifier needs data with class names")
    if answers is None:
        said = names
    elif isinstance(answers, Mapping):
        unknown = sorted(set(answers) - set(names))
        if unknown:
            raise ValueError(
                f"teacher.params.answers names classes {unknown} that the data does not have "
                f"(classes: {names})"
            )
        said = [str(answers.get(n, n)) for n in names]
    else:
        said = [str(a) for a in answers]
        if len(said) != len(names):
            raise ValueError(
                f"teacher.params.answers lists {len(said)} answers for {len(names)} classes "
                f"{names}: give one per class, in that order, or a mapping"
            )
    lm = load_causal_lm(model).eval()
    return LLMClassifier(lm, load_tokenizer(model), said, **kw)
