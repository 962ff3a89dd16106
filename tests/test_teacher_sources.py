"""Teacher sources by registry: did-you-mean on the name, per-source keys, one-file extension."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pydantic import BaseModel, ConfigDict

from mentor.assembly import Assembly, distill
from mentor.config import ConfigError, load_config
from mentor.teachers import SOURCES, TeacherOutput, TeacherSource, register_source

DOCS = Path(__file__).resolve().parents[1] / "docs" / "config.md"
TINY = ["train.max_steps=3", "teacher.fit.epochs=1", "train.progress=false", "eval.every=null"]


def test_every_source_is_documented_and_declares_itself():
    text = DOCS.read_text()
    assert set(SOURCES.names()) >= {"online", "cache", "ensemble", "ema", "run"}
    for name in SOURCES.names():
        cls = SOURCES.get(name)
        assert f"| `{name}`" in text, f"teacher source {name!r} is missing from docs/config.md"
        assert cls.name == name and issubclass(cls.Options, BaseModel)
        assert isinstance(cls.cacheable, bool) and isinstance(cls.uses_module, bool)


def test_unknown_source_and_misplaced_keys_are_named():
    with pytest.raises(ConfigError, match="Did you mean 'ensemble'"):
        load_config("digits", ["teacher.source=ensembel"])
    with pytest.raises(ConfigError, match=r"teacher.cache_check.*belongs to source: cache"):
        load_config("digits", ["teacher.cache_check=warn"])
    with pytest.raises(ConfigError, match="Did you mean 'ema_decay'"):
        load_config("digits", ["teacher.source=ema", "teacher.ema_decy=0.9"])
    cfg = load_config("digits", ["teacher.source=ema", "teacher.ema_decay=0.9"])
    assert cfg.teacher.options.ema_decay == 0.9
    assert "ema_decay: 0.9" in __import__("mentor.config").config.dump_config(cfg)


class _Scaled(BaseModel):
    model_config = ConfigDict(extra="forbid")
    scale: float = 1.0


def test_a_new_source_is_one_class(tmp_path):
    """A source defined in one place (here: this test) works from a recipe end to end."""

    @register_source("scaled_test")
    class ScaledTeacher(TeacherSource):
        """The recipe's teacher module with its logits multiplied by ``scale``."""

        Options = _Scaled
        uses_module = True

        def __init__(self, module, scale):
            self.module, self.scale, self.taps = module.eval(), scale, []

        @classmethod
        def from_config(cls, ctx):
            return cls(ctx.module(), ctx.cfg.teacher.options.scale)

        @torch.no_grad()
        def __call__(self, batch):
            return TeacherOutput(logits=self.module(batch["inputs"]) * self.scale)

    try:
        over = [f"output.dir={tmp_path}", "teacher.source=scaled_test", "teacher.scale=2", *TINY]
        cfg = load_config("digits", over)
        src = Assembly(cfg).teacher_source()
        assert isinstance(src, ScaledTeacher) and src.scale == 2.0
        assert Assembly(cfg).source_class.plan_parameters(Assembly(cfg)) > 0
        res = distill(cfg, quiet=True)
        assert (res.run_dir / "student").exists()
    finally:
        SOURCES._items.pop("scaled_test", None)


def test_online_top_k_sends_a_sparse_signal(tmp_path):
    """teacher.top_k=K: the loss gets the online teacher's top-K log-probs and tail mass."""
    from mentor.signals import TopK
    from mentor.teachers import OnlineTeacher

    with pytest.raises(ConfigError, match="top_k"):
        load_config("digits", ["teacher.top_k=0"])
    cfg = load_config("digits", [f"output.dir={tmp_path}/run", "teacher.top_k=3", *TINY])
    teacher = Assembly(cfg).teacher_source()
    assert isinstance(teacher, OnlineTeacher) and teacher.top_k == 3
    x = torch.randn(5, 64)
    out = teacher({"inputs": x}).logits
    assert isinstance(out, TopK) and out.indices.shape == (5, 3)
    dense = teacher.module(x).log_softmax(-1)
    vals, idx = dense.topk(3, -1)
    torch.testing.assert_close(out.logprobs, vals)
    assert torch.equal(out.indices, idx)
    rest = torch.log1p(-vals.exp().sum(-1))
    torch.testing.assert_close(out.tail, rest, rtol=1e-4, atol=1e-5)
    res = distill(cfg, quiet=True)  # kd trains on the top-3 signal
    assert (res.run_dir / "student").exists()
