"""`student.builder: prune`: sparse students whose pruned weights stay exactly zero through
training and resume, staged sparsity, N:M, structured (smaller dense) students, save/load."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from mentor.assembly import distill
from mentor.config import load_config
from mentor.engine import Distiller
from mentor.pruning.masks import MaskSet, prunable
from mentor.students import load_model
from mentor.students.builders import count_parameters

FAST = ["train.progress=false", "eval.every=null", "teacher.fit.epochs=3", "train.epochs=null",
        "train.schedule=constant", "eval.label_only=false"]  # fmt: skip
PRUNE = ["student.builder=prune", "student.params={method: wanda, sparsity: 0.8}"]


@pytest.fixture(autouse=True)
def _one(one_thread):
    pass


def _run(recipe, out, *over, resume=False):
    cfg = load_config(recipe, [f"output.dir={out}", *FAST, *over])
    return distill(cfg, resume=resume, quiet=True)


def _zeros(state, names):
    return {n: float((state[f"{n}.weight"] == 0).float().mean()) for n in names}


def test_a_wanda_student_keeps_its_sparsity_through_training_and_reloads(tmp_path):
    res = _run("digits", tmp_path / "r", *PRUNE, "train.max_steps=30")
    folder = res.run_dir / "student"
    meta = json.loads((folder / "mentor_model.json").read_text())
    assert meta["rebuild"]["builder"] == "mlp" and meta["sparsity"]["pattern"] == "unstructured"
    state = load_file(str(folder / "model.safetensors"))
    names = [n for n in prunable(res.student)]
    assert len(names) == 3  # every Linear of the MLP (a plain Sequential has no head names)
    for n, z in _zeros(state, names).items():  # exactly 80% of each layer's weights are 0
        assert z == pytest.approx(0.8, abs=1 / state[f"{n}.weight"].shape[1]), n
    assert meta["sparsity"]["sparsity"] == pytest.approx(0.8, abs=0.01)
    back, _ = load_model(folder)
    assert count_parameters(back) == count_parameters(res.student)
    assert all(torch.equal(back.state_dict()[k], v) for k, v in state.items())
    assert res.metrics["student_accuracy"] > 0.5  # a usable 80%-sparse student
    from mentor.cli import main

    assert main(["eval", str(res.run_dir)]) == 0 and main(["report", str(res.run_dir)]) == 0
    ev = json.loads((res.run_dir / "eval.json").read_text())
    cost = ev["models"]["student"]["cost"]
    assert cost["zero_fraction"] == pytest.approx(meta["sparsity"]["sparsity"], abs=1e-6)
    assert cost["compressed_bytes"] < 0.6 * cost["size_bytes"]  # the zeros compress away
    assert ev["models"]["teacher"]["cost"]["zero_fraction"] < 0.01
    assert "no CPU speed-up" in (res.run_dir / "report.md").read_text()


def test_staged_sparsity_grows_and_resume_is_exact_with_masks_zero(tmp_path, monkeypatch):
    staged = ["student.builder=prune",
              "student.params={method: magnitude, stages: [0.5, 0.7, 0.9]}"]  # fmt: skip
    ref = _run("digits", tmp_path / "ref", *staged, "train.max_steps=30")
    teacher = [f"teacher.path={ref.run_dir}/teacher", "teacher.fit=null"]
    full = _run("digits", tmp_path / "full", *staged, *teacher, "train.max_steps=30")
    cut = tmp_path / "cut"
    real = Distiller._sparse_step

    def killed_at_15(self, step, total):  # SIGTERM mid-run: a checkpoint at step 15, exit 143
        out = real(self, step, total)
        if step == 15:
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    with monkeypatch.context() as m:
        m.setattr(Distiller, "_sparse_step", killed_at_15)
        with pytest.raises(SystemExit) as e:
            _run("digits", cut, *staged, *teacher, "train.max_steps=30")
    assert e.value.code == 128 + signal.SIGTERM
    res = _run("digits", cut, *staged, *teacher, "train.max_steps=30", resume=True)
    a = load_file(str(full.run_dir / "student" / "model.safetensors"))
    b = load_file(str(res.run_dir / "student" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    names = list(prunable(full.student))
    for n, z in _zeros(a, names).items():  # the last stage's sparsity at the end
        assert z == pytest.approx(0.9, abs=0.01), n
    # the checkpoint of the killed run holds the masks of stage 2 (0.7), matching its zeros
    ck = sorted((cut / "checkpoints").glob("step_*"))[0]
    masks = load_file(str(ck / "masks_rank0.safetensors"))
    w = load_file(str(ck / "trainable.safetensors"))
    for n in names:
        m = masks[f"mask.{n}"]
        key = next(k for k in w if k.endswith(f"{n}.weight"))
        assert bool((w[key][~m] == 0).all())  # pruned weights exactly zero in the checkpoint
        assert float((~m).float().mean()) == pytest.approx(0.7, abs=0.01)


def test_two_four_sparsity_on_a_causal_lm_holds_after_training(tmp_path):
    over = ["student.builder=prune", "student.params={method: wanda, pattern: '2:4'}",
            "train.max_steps=6", "teacher.fit.epochs=1", "data.params.n=96"]  # fmt: skip
    res = _run("tiny-lm", tmp_path / "r", *over)
    mods = prunable(res.student)
    assert MaskSet.from_zeros(res.student, mods).check_nm(res.student, 2, 4)
    meta = json.loads((res.run_dir / "student" / "mentor_model.json").read_text())
    assert meta["sparsity"]["pattern"] == "2:4" and meta["sparsity"]["sparsity"] >= 0.5


def test_structured_pruning_gives_a_smaller_dense_lm_that_reloads(tmp_path):
    over = ["student.builder=prune",
            "student.params={method: structured, heads: 0.5, intermediate: 0.5, layers: 1}",
            "train.max_steps=4", "teacher.fit.epochs=1", "data.params.n=96"]  # fmt: skip
    res = _run("tiny-lm", tmp_path / "r", *over)
    cfg = res.student.config
    assert (cfg.num_attention_heads, cfg.intermediate_size, cfg.num_hidden_layers) == (2, 64, 1)
    assert count_parameters(res.student) < 0.7 * count_parameters(res.teacher)
    back, _ = load_model(res.run_dir / "student")
    assert back.config.intermediate_size == 64
    x = torch.randint(0, 128, (2, 8))
    torch.testing.assert_close(back(x).logits, res.student.eval()(x).logits)


def test_structured_cnn_student_rebuilds_with_the_cnn_builder(tmp_path):
    over = ["student.builder=prune", "student.params={method: structured, channels: 0.5}",
            "train.max_steps=4", "data.params.limit=256", "data.params.val_limit=128",
            "teacher.fit.epochs=1"]  # fmt: skip
    res = _run("vision", tmp_path / "r", *over)
    meta = json.loads((res.run_dir / "student" / "mentor_model.json").read_text())
    assert meta["rebuild"] == {"builder": "cnn", "params": {"channels": [16, 32], "hidden": 128}}
    back, _ = load_model(res.run_dir / "student")
    assert count_parameters(back) == count_parameters(res.student)


@pytest.mark.parametrize(
    "params, msg",
    [
        ("{method: wanda, sparsity: 1.0}", "student.params.sparsity=1.0"),
        ("{method: magnitude, sparsity: -0.1}", "student.params.sparsity=-0.1"),
        ("{method: wandaa}", "student.params.method='wandaa'"),
        ("{method: wanda, heads: 2}", "student.params.heads is a structured-pruning setting"),
        ("{method: magnitude, stages: [0.5, 0.3]}", "sparsities must increase"),
        ("{method: structured}", "needs at least one of heads"),
        ("{method: structured, heads: 9}", "heads"),
        ("{method: structured, layers: [0, 5]}", "layer"),
        ("{method: wanda, pattern: '2:3'}", "2:3"),
    ],
)
def test_bad_prune_settings_are_named(tmp_path, params, msg):
    over = ["student.builder=prune", f"student.params={params}", "train.max_steps=2",
            "teacher.fit.epochs=1", "data.params.n=96"]  # fmt: skip
    with pytest.raises(ValueError) as e:
        _run("tiny-lm", tmp_path / "bad", *over)
    assert msg in str(e.value)
    assert not (tmp_path / "bad" / "student").exists()


def test_squarehead_on_a_causal_lm_uses_the_unshifted_attention_mask(tmp_path):
    """Hidden states are [B, T, D] while a causal LM's logits mask is shifted to T-1: a feature
    term gets the attention mask (padding excluded), and SquareHead recovery trains."""
    from mentor.losses.feature import squarehead
    from mentor.losses.objective import Objective
    from mentor.tasks import TASKS

    task = TASKS.get("causal_lm")()
    ids = torch.randint(0, 10, (2, 5))
    am = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    batch = {"input_ids": ids, "attention_mask": am}
    logits, t_logits = torch.randn(2, 5, 10), torch.randn(2, 5, 10)
    s, t = torch.randn(2, 5, 4), torch.randn(2, 5, 4)
    obj = Objective({"fkl": {"loss": "forward_kl"},
                     "sq": {"loss": "squarehead", "student": "h", "teacher": "h"}})  # fmt: skip
    lv, tv, labels, mask = task.loss_view(logits, t_logits, batch)
    out = obj(lv, tv, labels=labels, mask=mask, feature_mask=task.feature_mask(batch, mask),
              student_features={"h": s}, teacher_features={"h": t})  # fmt: skip
    torch.testing.assert_close(out["sq"], squarehead(s, t, mask=am.bool()))
    assert not torch.allclose(out["sq"], squarehead(s, t))  # the padded tokens are left out
    sq = "{fkl: {loss: forward_kl}, sq: {loss: squarehead, student: model.layers.0, teacher: model.layers.0}}"
    over = ["student.builder=prune", "student.params={method: wanda, sparsity: 0.5}",
            f"objective={sq}", "train.max_steps=3", "teacher.fit.epochs=1", "data.params.n=96",
            "train.log_every=1"]  # fmt: skip
    res = _run("tiny-lm", tmp_path / "r", *over)
    recs = [json.loads(x) for x in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    sq_logged = [r["sq"] for r in recs if r["kind"] == "train"]
    assert len(sq_logged) == 3 and all(0 < v < 10 for v in sq_logged)
