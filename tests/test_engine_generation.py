"""Distillation with generation in the engine: on-policy, mixed (GKD's λ), seq-KD; the loss
counts completion tokens only; exact resume (the samples are seeded by step)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import Dataset

from mentor.engine import Distiller
from mentor.generation import left_pad
from mentor.tasks import get_task
from mentor.teachers import OnlineTeacher

PAD = 0


class Prompts(Dataset):
    """Prompts of 2-5 tokens with a 3-token reference completion (the layout of data 'prompts')."""

    def __init__(self, n: int = 24, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.items = []
        for i in range(n):
            p = torch.randint(3, 120, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g)
            c = torch.randint(3, 120, (3,), generator=g)
            self.items.append({"index": i, "prompt": p.tolist(), "completion": c.tolist()})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def collate(items: list[dict]) -> dict:
    ids, mask = left_pad([it["prompt"] for it in items], PAD)
    comp = torch.tensor([it["completion"] for it in items])
    full = torch.cat([ids, comp], 1)
    ones = torch.ones_like(comp)
    return {
        "index": torch.tensor([it["index"] for it in items]),
        "prompt_ids": ids,
        "prompt_mask": mask,
        "input_ids": full,
        "attention_mask": torch.cat([mask, ones], 1),
        "completion_mask": torch.cat([torch.zeros_like(mask), ones], 1),
    }


def _distiller(tmp_path, tiny_lm, mode, *, steps=6, lam=0.5, callbacks=(), **train):
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
