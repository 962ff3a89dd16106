"""Distillation with generation in the engine: on-policy, mixed (GKD's λ), seq-KD, replay
(DistiLLM's replay buffer); the loss counts completion tokens only; exact resume (the samples
are seeded by step, the replay buffer is checkpointed)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from mentor.engine import Distiller
from mentor.tasks import get_task
from mentor.teachers import OnlineTeacher
from prompt_data import PAD, Prompts, collate


def _distiller(tmp_path, tiny_lm, mode, *, steps=6, lam=0.5, callbacks=(), gen=None, **train):
    import copy

    torch.manual_seed(1)
    student = type(tiny_lm)(copy.deepcopy(tiny_lm.config))  # another random init
    student.config.eos_token_id = 1
    d = Distiller(
        student, OnlineTeacher(copy.deepcopy(tiny_lm)), {"fkl": {"loss": "forward_kl"}},
        Prompts(), collate_fn=collate, task="causal_lm", max_steps=steps, batch_size=4,
        lr=1e-2, output_dir=tmp_path, progress=False, log_every=1, callbacks=callbacks, **train,
    )  # fmt: skip
    d.cfg.generation.mode = mode
    d.cfg.generation.lambda_ = lam
    d.cfg.generation.max_new_tokens = 4
    for k, v in (gen or {}).items():
        setattr(d.cfg.generation, k, v)
    return d


def test_completion_mask_decides_which_positions_count():
    b = collate([Prompts()[0], Prompts()[1]])
    assert get_task("causal_lm").count_positions(b) == 6  # 3 completion tokens each
    _, _, _, mask = get_task("causal_lm").loss_view(b["input_ids"].float()[..., None],
                                                     None, b)  # fmt: skip
    assert mask.sum() == 6 and not mask[:, : b["prompt_ids"].shape[1] - 1].any()


def test_on_policy_trains_on_student_samples(tmp_path, tiny_lm):
    seen = []
    d = _distiller(tmp_path, tiny_lm, "on_policy")
    real = d._teacher_output

    def spy(batch):
        seen.append(batch)
        return real(batch)

    d._teacher_output = spy
    d.fit()
    assert seen and all(b["input_ids"].shape[1] <= b["prompt_ids"].shape[1] + 4 for b in seen)
    for b in seen:  # only generated tokens count, never the prompt
        p = b["prompt_ids"].shape[1]
        assert not b["completion_mask"][:, :p].any() and b["completion_mask"].any()
    assert all(r["fkl"] >= 0 for r in d.history)


def test_mixed_lambda_zero_is_off_policy_and_one_is_on_policy(tmp_path, tiny_lm):
    runs = {}
    for name, mode, lam in [("off", "off", 0.5), ("mix0", "mixed", 0.0),
                            ("on", "on_policy", 0.5), ("mix1", "mixed", 1.0)]:  # fmt: skip
        d = _distiller(tmp_path / name, tiny_lm, mode, lam=lam)
        d.fit()
        runs[name] = [r["loss"] for r in d.history]
    assert runs["off"] == runs["mix0"]
    assert runs["on"] == runs["mix1"]
    assert runs["on"] != runs["off"]


def test_seq_kd_samples_from_the_teacher(tmp_path, tiny_lm):
    d = _distiller(tmp_path, tiny_lm, "seq_kd", steps=2)
    assert d._generator_model() is d.teacher.module
    d.fit()
    assert len(d.history) == 2


def test_on_policy_resume_is_exact(tmp_path, tiny_lm):
    full = _distiller(tmp_path / "full", tiny_lm, "mixed", checkpoint_every=3).fit()

    class Crash:
        def on_step_end(self, _d, step, _v):
            if step == 4:
                raise RuntimeError("simulated kill")

    with pytest.raises(RuntimeError):
        _distiller(tmp_path / "cut", tiny_lm, "mixed", checkpoint_every=3,
                   callbacks=[Crash()]).fit()  # fmt: skip
    resumed = _distiller(tmp_path / "cut", tiny_lm, "mixed", checkpoint_every=3).fit(resume=True)
    a = load_file(str(full / "student" / "model.safetensors"))
    b = load_file(str(resumed / "student" / "model.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_generation_needs_prompt_data(tmp_path, tiny_lm):
    from mentor.data import build_data

    data = build_data("synthetic_lm", {"vocab_size": 128, "n": 32, "block_size": 8}, 0.2, 0)
    with pytest.raises(ValueError, match="data.source=prompts"):
        d = Distiller(tiny_lm, OnlineTeacher(tiny_lm), "forward_kl", data.train,
                      max_steps=1, output_dir=tmp_path, progress=False)  # fmt: skip
        d.cfg.generation.mode = "on_policy"
        from mentor.engine.loop import _check_generation

        _check_generation(d.cfg, d.task, data.train)


def test_fused_head_gives_the_same_on_policy_losses(tmp_path, tiny_lm):
    plain = _distiller(tmp_path / "plain", tiny_lm, "on_policy", steps=3)
    plain.fit()
    fused = _distiller(tmp_path / "fused", tiny_lm, "on_policy", steps=3, fused_loss_chunk=8)
    fused.fit()
    a, b = [r["loss"] for r in plain.history], [r["loss"] for r in fused.history]
    assert a == pytest.approx(b, rel=1e-4)


def test_left_padded_positions_match_unpadded_rows():
    """Prompt batches pass position_ids: a padded row scores like the same row alone (GPT-2's
    absolute positions would shift without them)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from mentor.models import model_outputs

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=128, n_positions=32, n_embd=32, n_layer=2, n_head=4)
    tiny_lm = GPT2LMHeadModel(cfg).eval()

    items = [Prompts()[0], Prompts()[3]]
    both = collate(items)
    alone = collate([items[0]])
    width = alone["input_ids"].shape[1]
    z_both = model_outputs(tiny_lm, both)[0, -width:]
    z_alone = model_outputs(tiny_lm, alone)[0]
    torch.testing.assert_close(z_both, z_alone, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- replay (DistiLLM)


def _rows(batch):
    """(index, prompt tokens, completion tokens) of each row of a prompt batch."""
    p = batch["prompt_ids"].shape[1]
    out = []
    for r in range(batch["input_ids"].shape[0]):
        ids = batch["input_ids"][r]
        prompt = ids[:p][batch["attention_mask"][r, :p].bool()].tolist()
        comp = ids[p:][batch["completion_mask"][r, p:].bool()].tolist()
        out.append((int(batch["index"][r]), tuple(prompt), tuple(comp)))
    return out


def _spy_generate(monkeypatch):
    """Record every batch mentor.engine.loop.generate returns (as rows)."""
    import mentor.engine.loop as loop

    calls = []
    real = loop.generate

    def spy(model, prompt_ids, prompt_mask, *a, **k):
        gen = real(model, prompt_ids, prompt_mask, *a, **k)
        calls.append({"prompt_ids": prompt_ids, "input_ids": gen.input_ids,
                      "attention_mask": gen.attention_mask,
                      "completion_mask": gen.completion_mask})  # fmt: skip
        return gen

    monkeypatch.setattr(loop, "generate", spy)
    return calls


def _spy_batches(d):
    seen = []
    real = d._teacher_output

    def spy(batch):
        seen.append(batch)
        return real(batch)

    d._teacher_output = spy
    return seen


def test_replay_with_reuse_zero_is_on_policy(tmp_path, tiny_lm):
    on = _distiller(tmp_path / "on", tiny_lm, "on_policy")
    a = on.fit()
    rep = _distiller(tmp_path / "rep", tiny_lm, "replay", gen={"reuse": 0.0})
    b = rep.fit()
    assert [r["loss"] for r in on.history] == [r["loss"] for r in rep.history]
    wa = load_file(str(a / "student" / "model.safetensors"))
    wb = load_file(str(b / "student" / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_replay_with_reuse_one_generates_once_then_reuses(tmp_path, tiny_lm, monkeypatch):
    from mentor.models import position_ids

    calls = _spy_generate(monkeypatch)
    d = _distiller(tmp_path, tiny_lm, "replay", steps=4, gen={"reuse": 1.0})
    seen = _spy_batches(d)
    d.fit()
    assert len(calls) == 1 and len(seen) == 4  # the first step fills the buffer (4 sequences)
    first = set(_rows({**calls[0], "index": seen[0]["index"]}))
    assert set(_rows(seen[0])) == first
    for b in seen[1:]:  # later batches: earlier samples, laid out as a prompt batch
        assert set(_rows(b)) == first  # 4 distinct of the 4 kept
        p = b["prompt_ids"].shape[1]
        assert torch.equal(b["prompt_ids"], b["input_ids"][:, :p])
        assert bool((b["prompt_mask"][:, -1] == 1).all())  # prompts left-padded
        assert torch.equal(b["prompt_mask"], b["attention_mask"][:, :p])
        assert not b["completion_mask"][:, :p].any()
        assert torch.equal(b["completion_mask"][:, p:], b["attention_mask"][:, p:])
        comp = b["completion_mask"][:, p:]
        assert bool((comp[:, :-1] >= comp[:, 1:]).all())  # completions right-padded
        assert position_ids(b) is not None
    assert len(d.replay) == 4


def test_replay_buffer_is_fifo_and_bounded(tmp_path, tiny_lm, monkeypatch):
    calls = _spy_generate(monkeypatch)
    sizes = []

    class Watch:
        def on_step_end(self, dist, _step, _v):
            sizes.append(len(dist.replay))

    d = _distiller(tmp_path, tiny_lm, "replay", steps=4, callbacks=[Watch()],
                   gen={"reuse": 0.0, "buffer_size": 6})  # fmt: skip
    seen = _spy_batches(d)
    d.fit()
    assert sizes == [4, 6, 6, 6]
    generated = [r for c, b in zip(calls, seen) for r in _rows({**c, "index": b["index"]})]
    kept = [(i, tuple(p.tolist()), tuple(c.tolist())) for p, c, i in d.replay.items]
    assert kept == generated[-6:]  # the newest 6, oldest first


def test_replay_resume_is_exact(tmp_path, tiny_lm, monkeypatch):
    import shutil

    from mentor.engine.loop import Distiller

    calls = _spy_generate(monkeypatch)
    kw = {"checkpoint_every": 3, "seed": 5, "gen": {"reuse": 0.5, "buffer_size": 6}}
    # with seed 5 the steps are fresh, fresh, replay | replay, fresh, fresh: the step-3
    # checkpoint holds 6 of the 8 sequences sampled so far, and step 4 draws from them
    full = _distiller(tmp_path / "full", tiny_lm, "replay", **kw).fit()
    assert len(calls) == 4

    class Crash:
        def on_step_end(self, _d, step, _v):
            if step == 4:
                raise RuntimeError("simulated kill")

    with pytest.raises(RuntimeError):
        _distiller(tmp_path / "cut", tiny_lm, "replay", callbacks=[Crash()], **kw).fit()
    shutil.copytree(tmp_path / "cut", tmp_path / "lost")
    out = _distiller(tmp_path / "cut", tiny_lm, "replay", **kw).fit(resume=True)
    a = load_file(str(full / "student" / "model.safetensors"))
    b = load_file(str(out / "student" / "model.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the buffer is what makes it exact: resumed with an empty buffer, the run differs
    monkeypatch.setattr(Distiller, "_restore_replay", lambda *_a: None)
    lost = _distiller(tmp_path / "lost", tiny_lm, "replay", **kw).fit(resume=True)
    c = load_file(str(lost / "student" / "model.safetensors"))
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_replay_buffer_is_in_every_checkpoint(tmp_path, tiny_lm):
    import json

    from mentor.engine import checkpoint as ckpt
    from mentor.engine.loop import ReplayBuffer

    d = _distiller(tmp_path, tiny_lm, "replay", steps=4, checkpoint_every=1,
                   gen={"reuse": 0.0, "buffer_size": 6})  # fmt: skip
    d.fit()
    found = ckpt.list_checkpoints(tmp_path)
    assert found
    for folder in found:
        sums = json.loads((folder / "checksums.json").read_text())
        assert "replay_rank0.safetensors" in sums and not ckpt.verify(folder)
    last = ReplayBuffer(6)
    last.load_state_tensors(ckpt.load_rank_tensors(found[-1], "replay", 0))
    assert [(p.tolist(), c.tolist(), i) for p, c, i in last.items] == [
        (p.tolist(), c.tolist(), i) for p, c, i in d.replay.items
    ]
    (found[-1] / "replay_rank0.safetensors").write_bytes(b"damaged")
    assert any("replay_rank0.safetensors" in p for p in ckpt.verify(found[-1]))


def test_replay_buffer_round_trip_and_empty():
    from mentor.engine.loop import ReplayBuffer

    buf = ReplayBuffer(3)
    buf.load_state_tensors(buf.state_tensors())  # an empty buffer saves and loads
    assert len(buf) == 0
    b = collate([Prompts()[i] for i in range(4)])
    buf.add(b)
    assert len(buf) == 3 and [i for _, _, i in buf.items] == [1, 2, 3]
    again = ReplayBuffer(3)
    again.load_state_tensors(buf.state_tensors())
    assert [(p.tolist(), c.tolist(), i) for p, c, i in again.items] == [
        (p.tolist(), c.tolist(), i) for p, c, i in buf.items
    ]
    batch = again.sample(3, torch.Generator().manual_seed(0), PAD, prompt_length=True)
    assert sorted(_rows(batch)) == sorted(_rows(collate([Prompts()[i] for i in (1, 2, 3)])))
    assert batch["prompt_length"] == batch["prompt_ids"].shape[1]


def test_replay_keys_are_validated_and_reuse_ramps():
    from mentor.config import ConfigError, GenerationConfig, validate

    for key, bad in [("buffer_size", 0), ("reuse", 1.5), ("reuse", -0.1),
                     ("reuse_warmup_steps", -1)]:  # fmt: skip
        with pytest.raises(ConfigError, match=f"generation.{key}"):
            validate({"generation": {"mode": "replay", key: bad}})
    with pytest.raises(ConfigError, match="Did you mean 'reuse'"):
        validate({"generation": {"mode": "replay", "reuses": 0.5}})
    g = validate({"generation": {"mode": "replay"}}).generation
    assert (g.buffer_size, g.reuse, g.reuse_warmup_steps) == (1000, 0.5, 0)
    assert g.reuse_at(0) == 0.5
    g = GenerationConfig(mode="replay", reuse=0.8, reuse_warmup_steps=4)
    assert [g.reuse_at(s) for s in (0, 2, 4, 10)] == [0.0, 0.4, 0.8, 0.8]


# ----------------------------------------------------------------------------- per-example seeds


def test_samples_per_prompt_repeats_rows_and_groups_them(tmp_path, tiny_lm):
    d = _distiller(tmp_path, tiny_lm, "on_policy", steps=2, gen={"samples_per_prompt": 3})
    seen = _spy_batches(d)
    d.fit()
    b = seen[0]
    assert b["input_ids"].shape[0] == 12  # 4 prompts x 3 samples
    idx, groups = b["index"], b["groups"]
    assert torch.equal(groups, idx) and torch.equal(idx[::3].repeat_interleave(3), idx)
    comps = [r[2] for r in _rows(b)]
    assert len({comps[0], comps[1], comps[2]}) > 1  # the samples of one prompt differ
    assert all(len(c) >= 1 for c in comps)


def test_a_rows_samples_do_not_depend_on_its_batch(tmp_path, tiny_lm):
    """Seeded per (step, example): a prompt samples the same completion in any batch layout."""
    d = _distiller(tmp_path, tiny_lm, "on_policy", steps=1)
    items = [Prompts()[i] for i in range(4)]
    whole = d._generate([collate(items)], 0, 0, torch.device("cpu"))[0]
    parts = [d._generate([collate(items[a:b])], 0, r, torch.device("cpu"))[0]
             for r, (a, b) in enumerate([(0, 1), (1, 4)])]  # fmt: skip
    assert _rows(whole) == _rows(parts[0]) + _rows(parts[1])
    other = d._generate([collate(items)], 1, 0, torch.device("cpu"))[0]
    assert _rows(other) != _rows(whole)  # the next step samples anew


def test_per_row_generators_match_one_generator_per_single_row(tiny_lm):
    from mentor.generation import SamplingConfig, generate

    batch = collate([Prompts()[i] for i in range(3)])
    ids, mask = batch["prompt_ids"], batch["prompt_mask"]
    cfg = SamplingConfig(max_new_tokens=5, temperature=1.0, stop_on_eos=False)
    gens = [torch.Generator().manual_seed(s) for s in (5, 6, 7)]
    batched = generate(tiny_lm, ids, mask, cfg, generator=gens, eos_token_id=None, pad_token_id=PAD)
    for r, s in enumerate((5, 6, 7)):
        one = generate(tiny_lm, ids[r : r + 1], mask[r : r + 1], cfg,
                       generator=torch.Generator().manual_seed(s), eos_token_id=None,
                       pad_token_id=PAD)  # fmt: skip
        assert one.completion_ids[0].tolist() == batched.completion_ids[r].tolist(), r
    with pytest.raises(ValueError, match="one per row"):
        generate(tiny_lm, ids, mask, cfg, generator=gens[:2], eos_token_id=None, pad_token_id=PAD)


def test_prompt_plus_new_tokens_longer_than_the_context_is_refused(tmp_path, tiny_lm):
    limit = tiny_lm.config.max_position_embeddings
    with pytest.raises(ValueError, match="context window") as e:
        _distiller(tmp_path / "run", tiny_lm, "on_policy", gen={"max_new_tokens": limit}).fit()
    assert not (tmp_path / "run").exists()  # refused before anything was written
    assert "generation.max_new_tokens" in str(e.value)
    assert "data.params.max_prompt_tokens" in str(e.value)


# ----------------------------------------------------------------------------- rewards, groups


def test_group_aware_objectives_get_groups_and_rewards_from_the_engine(tmp_path, tiny_lm):
    """samples_per_prompt=2 + a reward function: paced's w(p) sees each prompt's pass rate."""
    from mentor.losses import get_loss

    seen = []

    def reward(batch):  # the first sample of each prompt passes, the second fails: p = 1/2
        r = (torch.arange(batch["input_ids"].shape[0]) % 2 == 0).float()
        seen.append((batch["groups"].clone(), r))
        return r

    d = _distiller(tmp_path / "half", tiny_lm, "on_policy", steps=2,
                   gen={"samples_per_prompt": 2})  # fmt: skip
    d.reward_fn = reward
    calls = []
    real = d.model.objective.forward

    def spy(*a, **k):
        calls.append({x: k.get(x) for x in ("groups", "rewards")})
        return real(*a, **k)

    d.model.objective.forward = spy
    d.model.objective.terms["fkl"] = get_loss("paced")
    d.fit()
    groups, rewards = calls[0]["groups"], calls[0]["rewards"]
    assert torch.equal(groups, seen[0][0]) and torch.equal(rewards, seen[0][1])
    assert torch.equal(groups[::2], groups[1::2])  # two samples per prompt, side by side
    assert all(r["loss"] > 0 for r in d.history)  # w(1/2) = 1/4 > 0

    d2 = _distiller(tmp_path / "all", tiny_lm, "on_policy", steps=2,
                    gen={"samples_per_prompt": 2})  # fmt: skip
    d2.reward_fn = lambda b: torch.ones(b["input_ids"].shape[0])  # p = 1: mastered, w = 0
    d2.model.objective.terms["fkl"] = get_loss("paced")
    d2.fit()
    assert all(r["loss"] == 0 for r in d2.history)


# ----------------------------------------------------------------------------- every objective


def _objective_for(signal):
    from mentor.losses import LOSSES
    from mentor.losses.logit import ROWWISE

    kind = {"dense": "dense", "topk": "topk", "fused": "dense"}[signal]
    names = [n for n in ROWWISE if n != "taid" and kind in ROWWISE[n][0]().teachers]
    names += ["taid"]
    if signal == "dense":
        names += [  # tgeo_kd learns its fusion on held-out labelled examples: classification
            n for n in LOSSES.names()
            if LOSSES.get(n).inputs == "logits" and n not in ROWWISE and n != "tgeo_kd"
        ]  # fmt: skip
        names += ["tsd_kd", "mgsr_span"]
    names += ["kepo", "paced"]
    return {n: {"weight": 1.0} for n in names}


@pytest.mark.parametrize("signal", ["dense", "topk", "fused"])
@pytest.mark.parametrize("mode", ["off", "on_policy", "mixed", "seq_kd", "replay"])
def test_every_logit_objective_trains_in_every_mode_with_every_signal(tmp_path, tiny_lm, mode,
                                                                      signal):  # fmt: skip
    """All logit objectives at once, 2 steps: every term finite, the student's weights move."""
    import copy

    torch.manual_seed(1)
    student = type(tiny_lm)(copy.deepcopy(tiny_lm.config))
    student.config.eos_token_id = 1
    before = {k: v.clone() for k, v in student.state_dict().items()}
    objective = _objective_for(signal)
    teacher = OnlineTeacher(copy.deepcopy(tiny_lm), top_k=8 if signal == "topk" else None)
    d = Distiller(
        student, teacher, objective, Prompts(), collate_fn=collate, task="causal_lm",
        max_steps=2, batch_size=4, lr=1e-2, output_dir=tmp_path, progress=False, log_every=1,
        fused_loss_chunk=16 if signal == "fused" else None,
    )  # fmt: skip
    d.cfg.generation.mode, d.cfg.generation.max_new_tokens = mode, 3
    d.cfg.generation.samples_per_prompt = 2 if mode == "on_policy" else 1
    d.fit()
    assert len(d.history) == 2
    for rec in d.history:
        for term in objective:
            assert term in rec and rec[term] == rec[term] and abs(rec[term]) < 1e6, (term, rec)
    moved = [k for k, v in student.state_dict().items() if not torch.equal(v, before[k])]
    assert moved


@pytest.mark.parametrize("mode", ["off", "on_policy"])
@pytest.mark.parametrize("fused", [False, True])
def test_logits_from_the_prompt_end_give_the_same_losses(tmp_path, tiny_lm, mode, fused):
    """Only completion positions count, so computing logits from the last prompt token on
    (HF ``logits_to_keep``) changes nothing but the cost."""
    import functools

    kept = []
    runs = []
    for cut in (True, False):
        d = _distiller(tmp_path / f"{cut}", tiny_lm, mode, steps=3,
                       fused_loss_chunk=8 if fused else None)  # fmt: skip
        d._cut_logits = cut
        real = d.model.student.forward

        @functools.wraps(real)
        def spy(*a, _real=real, **k):
            kept.append(k.get("logits_to_keep"))
            return _real(*a, **k)

        d.model.student.forward = spy
        d.fit()
        runs.append([r["loss"] for r in d.history])
    assert runs[0] == pytest.approx(runs[1], rel=1e-5)
    if not fused:  # (a fused head runs the student's body, not its forward)
        assert any(isinstance(k, int) and k > 0 for k in kept)  # the cut was asked for
        assert None in kept  # and not asked for without it
