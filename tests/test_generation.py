"""mentor.generation: KV-cached batched sampling for on-policy (GKD) and sequence-level KD.

Every check runs a tiny random Llama built in-process (never downloaded): cached greedy
decoding against a naive re-run of the full sequence, reproducible generator-driven sampling,
top-k / top-p filtering, EOS handling, validation and the model's mode / gradients.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mentor.generation import (
    Generation,
    SamplingConfig,
    filter_logits,
    generate,
    left_pad,
    sample_next_token,
)

PAD = 0
PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12], [3], [20, 21, 22, 23]]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny models run fastest on one thread and do not thrash a shared machine."""


def _tiny_llama(attn: str = "sdpa") -> nn.Module:
    """A 2-layer Llama, vocab 64, with larger initial weights so next-token logits are peaked."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        initializer_range=0.2,
        pad_token_id=PAD,
    )
    cfg._attn_implementation = attn
    return LlamaForCausalLM(cfg).eval()


def _tiny_gpt2() -> nn.Module:
    """A 2-layer GPT-2, vocab 64: learned *absolute* positions, so a wrong ``position_ids``
    under left padding changes its outputs (Llama's rotary positions are relative and would
    hide a constant per-row offset)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=64,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=64,
        initializer_range=0.2,
        bos_token_id=1,
        eos_token_id=2,
    )
    return GPT2LMHeadModel(cfg).eval()


MODELS = {
    "llama-sdpa": lambda: _tiny_llama("sdpa"),
    "llama-eager": lambda: _tiny_llama("eager"),
    "gpt2": _tiny_gpt2,
}


@pytest.fixture
def lm() -> nn.Module:
    """The tiny Llama with the default (SDPA) attention."""
    return _tiny_llama()


def _greedy(n: int) -> SamplingConfig:
    return SamplingConfig(max_new_tokens=n, temperature=0.0)


def _naive_greedy_one(model: nn.Module, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding of one unpadded prompt, re-running the whole sequence without a cache."""
    seq = list(prompt)
    for _ in range(n):
        logits = model(input_ids=torch.tensor([seq]), use_cache=False).logits
        seq.append(int(logits[0, -1].argmax()))
    return seq[len(prompt) :]


def _naive_greedy_batch(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, n: int):
    """Greedy decoding of a left-padded batch, re-running the full padded sequence each step."""
    for _ in range(n):
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
        mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
    return ids


def _run(model, prompts=PROMPTS, cfg=None, **kw) -> Generation:
    ids, mask = left_pad(prompts, PAD)
    kw.setdefault("eos_token_id", None)
    return generate(model, ids, mask, cfg or _greedy(8), pad_token_id=PAD, **kw)


# ---------------------------------------------------------------- left_pad and the result shape


def test_left_pad_right_aligns_prompts():
    ids, mask = left_pad([[1, 2, 3], [4]], pad_token_id=9)
    assert ids.tolist() == [[1, 2, 3], [9, 9, 4]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert ids.dtype == mask.dtype == torch.long
    with pytest.raises(ValueError, match="empty"):
        left_pad([[1], []], 0)
    with pytest.raises(ValueError, match="at least one prompt"):
        left_pad([], 0)


def test_generation_layout(lm):
    ids, mask = left_pad(PROMPTS, PAD)
    out = _run(lm, cfg=_greedy(5))
    p = ids.shape[1]
    assert out.prompt_length == p
    assert out.input_ids.shape == out.attention_mask.shape == out.completion_mask.shape
    assert out.input_ids.shape == (len(PROMPTS), p + 5)
    assert torch.equal(out.input_ids[:, :p], ids)
    assert torch.equal(out.attention_mask[:, :p], mask)
    assert not out.completion_mask[:, :p].any()
    assert out.completion_mask[:, p:].all()  # no EOS: every generated token counts
    assert torch.equal(out.completion_ids, out.input_ids[:, p:])
    assert out.completion_lengths.tolist() == [5] * len(PROMPTS)


# ------------------------------------------------------------- (a) KV cache == naive recompute


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_cached_greedy_equals_naive_recompute_with_left_padding(arch):
    model = MODELS[arch]()
    n = 10
    out = _run(model, cfg=_greedy(n))
    got = out.completion_ids.tolist()
    # each prompt alone, unpadded, no cache: the reference positions and masks
    for row, prompt in zip(got, PROMPTS):
        assert row == _naive_greedy_one(model, prompt, n)
    # the padded batch re-run in full at every step gives the same tokens
    ids, mask = left_pad(PROMPTS, PAD)
    naive = _naive_greedy_batch(model, ids, mask, n)
    assert torch.equal(out.input_ids, naive)


def test_greedy_single_unpadded_prompt(lm):
    out = _run(lm, prompts=[[7, 8, 9]], cfg=_greedy(6))
    assert out.completion_ids[0].tolist() == _naive_greedy_one(lm, [7, 8, 9], 6)


# ---------------------------------------------------------------- (b) reproducible sampling


def test_same_seed_same_samples_different_seed_different(lm):
    cfg = SamplingConfig(max_new_tokens=12, temperature=1.5)
    a = _run(lm, cfg=cfg, generator=torch.Generator().manual_seed(1))
    b = _run(lm, cfg=cfg, generator=torch.Generator().manual_seed(1))
    c = _run(lm, cfg=cfg, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a.input_ids, b.input_ids)
    assert not torch.equal(a.input_ids, c.input_ids)


def test_restoring_generator_state_reproduces_samples(lm):
    cfg = SamplingConfig(max_new_tokens=10, temperature=1.0, top_k=20, top_p=0.95)
    g = torch.Generator().manual_seed(7)
    first = _run(lm, cfg=cfg, generator=g)
    state = g.get_state()  # e.g. stored in a checkpoint between two batches
    second = _run(lm, cfg=cfg, generator=g)
    g.set_state(state)
    resumed = _run(lm, cfg=cfg, generator=g)
    assert torch.equal(second.input_ids, resumed.input_ids)
    assert not torch.equal(first.input_ids, second.input_ids)


def test_sampling_draws_only_from_the_given_generator(lm):
    cfg = SamplingConfig(max_new_tokens=6, temperature=1.0)
    before = torch.get_rng_state()
    _run(lm, cfg=cfg, generator=torch.Generator().manual_seed(0))
    assert torch.equal(torch.get_rng_state(), before)


def test_sampling_follows_the_softmax():
    probs = torch.tensor([0.5, 0.3, 0.2])
    logits = probs.log().expand(40_000, 3)
    draws = sample_next_token(logits, SamplingConfig(), torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=3).float() / draws.numel()
    assert torch.allclose(freq, probs, atol=0.01)


# ---------------------------------------------------------------- (c) top-k / top-p filtering


def test_top_k_one_equals_greedy(lm):
    greedy = _run(lm, cfg=_greedy(8))
    for seed in (0, 1):
        topk1 = _run(
            lm,
            cfg=SamplingConfig(max_new_tokens=8, temperature=1.0, top_k=1),
            generator=torch.Generator().manual_seed(seed),
        )
        assert torch.equal(topk1.input_ids, greedy.input_ids)


def test_tiny_top_p_equals_greedy(lm):
    greedy = _run(lm, cfg=_greedy(8))
    nucleus = _run(
        lm,
        cfg=SamplingConfig(max_new_tokens=8, temperature=2.0, top_p=1e-6),
        generator=torch.Generator().manual_seed(3),
    )
    assert torch.equal(nucleus.input_ids, greedy.input_ids)


def test_filter_logits_keeps_the_top_k_and_the_nucleus():
    logits = torch.tensor([[0.5, 0.3, 0.2, 0.0]]).clamp_min(1e-9).log()
    kept = lambda x: torch.isfinite(x)[0].tolist()  # noqa: E731
    assert kept(filter_logits(logits, top_k=2)) == [True, True, False, False]
    assert kept(filter_logits(logits, top_p=0.45)) == [True, False, False, False]
    assert kept(filter_logits(logits, top_p=0.7)) == [True, True, False, False]
    assert kept(filter_logits(logits, top_p=0.85)) == [True, True, True, False]
    assert kept(filter_logits(logits)) == [True] * 4
    # sampling never leaves the kept set
    many = logits.expand(5000, 4)
    cfg = SamplingConfig(top_p=0.7)
    draws = sample_next_token(many, cfg, torch.Generator().manual_seed(0))
    assert set(draws.tolist()) == {0, 1}
    draws = sample_next_token(many, SamplingConfig(top_k=1), torch.Generator().manual_seed(0))
    assert set(draws.tolist()) == {0}


# ---------------------------------------------------------------- (d) stopping at EOS


def test_stop_at_eos_masks_and_pads_after_it(lm):
    n = 10
    free = _run(lm, cfg=_greedy(n))
    p = free.prompt_length
    eos = int(free.completion_ids[0, 2])  # row 0 emits it at step 2 (maybe earlier)
    out = _run(lm, cfg=_greedy(n), eos_token_id=eos)
    comp, cmask = out.completion_ids, out.completion_mask[:, p:]
    ended_early = False
    for r in range(len(PROMPTS)):
        ref = free.completion_ids[r].tolist()
        stop = ref.index(eos) + 1 if eos in ref else n  # tokens that count, EOS included
        assert comp[r, :stop].tolist() == ref[:stop]
        assert cmask[r, :stop].all() and not cmask[r, stop:].any()
        assert (comp[r, stop:] == PAD).all()
        assert torch.equal(out.attention_mask[r, p:], cmask[r])
        ended_early |= stop < comp.shape[1]
    assert 0 < int(cmask[0].sum()) <= 3 and comp[0, int(cmask[0].sum()) - 1] == eos
    assert ended_early


def test_all_finished_stops_early_and_eos_lists_work(lm):
    eos = 17
    head = nn.Linear(lm.lm_head.in_features, lm.lm_head.out_features, bias=True)
    head.weight.data.copy_(lm.lm_head.weight.data)
    head.bias.data.zero_()
    head.bias.data[eos] = 100.0  # EOS is almost certain at every step
    lm.lm_head = head
    cfg = SamplingConfig(max_new_tokens=20, temperature=1.0)
    out = _run(lm, cfg=cfg, eos_token_id=[3, eos], generator=torch.Generator().manual_seed(0))
    p = out.prompt_length
    assert out.input_ids.shape[1] == p + 1  # every sequence ended at once: no further steps
    assert (out.completion_ids[:, 0] == eos).all()
    assert out.completion_mask[:, p:].all()


def test_stop_on_eos_false_keeps_generating(lm):
    free = _run(lm, cfg=_greedy(8))
    eos = int(free.completion_ids[0, 1])
    cfg = SamplingConfig(max_new_tokens=8, temperature=0.0, stop_on_eos=False)
    out = _run(lm, cfg=cfg, eos_token_id=eos)
    assert torch.equal(out.input_ids, free.input_ids)
    assert out.completion_mask[:, out.prompt_length :].all()


# ---------------------------------------------------------------- (e) validation


@pytest.mark.parametrize(
    ("change", "name"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": -3}, "max_new_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
    ],
)
def test_bad_settings_raise_naming_the_setting(lm, change, name):
    cfg = SamplingConfig(**change)
    with pytest.raises(ValueError, match=name):
        cfg.check()
    with pytest.raises(ValueError, match=name):
        _run(lm, cfg=cfg)


def test_good_settings_pass():
    assert SamplingConfig().check() == SamplingConfig()
    SamplingConfig(max_new_tokens=1, temperature=0.0, top_p=1.0, top_k=0).check()
    SamplingConfig(temperature=0.7, top_p=0.01, top_k=5).check()


def test_right_padded_prompts_are_rejected(lm):
    ids = torch.tensor([[4, 5, 6], [7, PAD, PAD]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    with pytest.raises(ValueError, match="left-padded"):
        generate(lm, ids, mask, _greedy(2), eos_token_id=None, pad_token_id=PAD)
    with pytest.raises(ValueError, match=r"\[B, P\]"):
        generate(lm, ids[0], mask[0], _greedy(2), eos_token_id=None, pad_token_id=PAD)


# ---------------------------------------------------------------- (f) mode and gradients


def test_training_flag_restored_and_no_grad(lm):
    lm.train()
    lm.model.layers[0].eval()  # a submodule in its own mode keeps it
    out = _run(lm, cfg=SamplingConfig(max_new_tokens=4), generator=torch.Generator())
    assert lm.training and lm.lm_head.training
    assert not lm.model.layers[0].training and not lm.model.layers[0].mlp.training
    assert lm.model.layers[1].training
    assert all(p.grad is None for p in lm.parameters())
    assert not out.input_ids.requires_grad
    lm.eval()
    _run(lm, cfg=_greedy(2))
    assert not any(m.training for m in lm.modules())


def test_runs_in_eval_mode(lm):
    seen = []
    lm.train()
    handle = lm.register_forward_pre_hook(lambda m, args: seen.append(m.training))
    try:
        _run(lm, cfg=_greedy(3))
    finally:
        handle.remove()
    assert seen and not any(seen)
    assert lm.training


def test_answer_reward_is_one_when_the_decoded_completion_contains_the_answer():
    from mentor.generation import AnswerReward
    from prompt_data import word_tokenizer

    tok = word_tokenizer()
    ids = torch.tensor([[5, 6, 7, 8, 9], [5, 6, 7, 8, 9], [5, 6, 10, 11, 0]])
    comp = torch.tensor([[0, 0, 1, 1, 1], [0, 0, 1, 1, 1], [0, 0, 1, 1, 0]])
    # row 0 completes "w4 w5 w6"; row 1 the same; row 2 "w7 w8" (the pad after it is not counted)
    batch = {"input_ids": ids, "completion_mask": comp, "answer": ["w5  w6", "w2", "w8"]}
    assert AnswerReward(tok, "answer")(batch).tolist() == [1.0, 0.0, 1.0]
    batch["answer"] = ["w2 w3", None, ""]  # the prompt's tokens do not count; empty never matches
    assert AnswerReward(tok, "answer")(batch).tolist() == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="data.params.fields"):
        AnswerReward(tok, "gold")(batch)
