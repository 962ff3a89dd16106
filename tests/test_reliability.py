"""Nothing lost, nothing silently wrong: run directories, resume checks, verified checkpoints,
the non-finite guard, torn metrics, kill -9 (docs/reliability.md lists the guarantees)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mentor.assembly import distill
from mentor.cli import main
from mentor.config import load_config
from mentor.engine import checkpoint as ckpt
from mentor.engine.loop import NonFiniteError
from mentor.engine.rundir import MARKER

FAST = ["train.max_steps=12", "teacher.fit.epochs=2", "train.progress=false", "eval.every=null",
        "train.log_every=2", "student.params.hidden=[16]"]  # fmt: skip


@pytest.fixture(autouse=True)
def _one(one_thread, monkeypatch):
    monkeypatch.delenv("MENTOR_DEBUG", raising=False)


def _run(out, *over, resume=False):
    return distill(load_config("digits", [f"output.dir={out}", *FAST, *over]), resume=resume,
                   quiet=True)  # fmt: skip


def _records(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _weights(run: Path) -> dict:
    return load_file(str(run / "student" / "model.safetensors"))


# ----------------------------------------------------------------------------- run directories


def test_overwrite_moves_the_old_run_aside_and_leaves_nothing_stale(tmp_path):
    run = tmp_path / "run"
    _run(run, "train.max_steps=6")
    (run / "eval.json").write_text("{}")  # an artifact of the old run
    _run(run, "output.overwrite=true")
    old = list(tmp_path.glob("run.old-*"))
    assert len(old) == 1 and (old[0] / "student").exists() and (old[0] / "eval.json").exists()
    assert not (run / "eval.json").exists() and (run / MARKER).exists()
    assert max(r["step"] for r in _records(run)) == 12


def test_a_directory_mentor_did_not_write_is_never_touched(tmp_path, capsys):
    proj = tmp_path / "project"
    (proj / "checkpoints").mkdir(parents=True)
    (proj / "checkpoints" / "mine.pt").write_text("precious")
    args = ["distill", "digits", f"output.dir={proj}", "output.overwrite=true", *FAST]
    assert main(args) == 2
    assert "mentor did not write" in capsys.readouterr().err
    assert (proj / "checkpoints" / "mine.pt").read_text() == "precious"
    assert sorted(p.name for p in proj.iterdir()) == ["checkpoints"]


def test_a_refused_run_writes_nothing(tmp_path, capsys):
    run = tmp_path / "run"
    _run(run, "train.max_steps=4")
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    assert main(["distill", "digits", f"output.dir={run}", *FAST, "teacher.fit.epochs=3"]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before


def test_a_new_run_that_fails_early_leaves_the_old_run_in_place(tmp_path):
    run = tmp_path / "run"
    _run(run, "train.max_steps=4")
    with pytest.raises(NonFiniteError):  # fails at step 1, before any checkpoint
        _run(run, "output.overwrite=true", "train.lr=1e30", "train.grad_clip=null")
    assert not list(tmp_path.glob("run.old-*"))
    assert (run / "student").exists() and max(r["step"] for r in _records(run)) == 4


# ----------------------------------------------------------------------------- resume


def test_resume_refuses_a_changed_recipe_before_writing(tmp_path, capsys):
    run = tmp_path / "run"
    _run(run, "train.max_steps=4")
    saved = (run / "config.yaml").read_text()
    args = ["distill", "digits", f"output.dir={run}", *FAST, "--resume"]
    assert main([*args, "student.params.hidden=[32]", "train.batch_size=16"]) == 2
    err = capsys.readouterr().err
    assert "student.params" in err and "train.batch_size" in err
    assert (run / "config.yaml").read_text() == saved


def test_resume_extends_training_and_applies_a_new_lr(tmp_path, capsys):
    run = tmp_path / "run"
    _run(run, "train.max_steps=6", "train.checkpoint_every=3")
    res = _run(run, "train.max_steps=10", "train.lr=1e-4", resume=True)
    out = capsys.readouterr().out
    assert "train.lr 0.003 -> 0.0001" in out and "train.max_steps 6 -> 10" in out
    recs = [r for r in _records(res.run_dir) if r["kind"] == "train"]
    assert [r["step"] for r in recs] == [2, 4, 6, 8, 10]  # nothing duplicated
    assert recs[-1]["lr"] <= 1e-4


def test_resume_without_a_checkpoint_clears_the_partial_metrics(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / MARKER).write_text("{}")
    (run / "config.yaml").write_text(load_config("digits", [f"output.dir={run}", *FAST])
                                     .model_dump_json())  # fmt: skip
    (run / "metrics.jsonl").write_text('{"kind": "train", "step": 2, "loss": 1}\n{"kind": "tr')
    res = _run(run, resume=True)
    steps = [r["step"] for r in _records(res.run_dir) if r["kind"] == "train"]
    assert steps == sorted(set(steps)) and steps[-1] == 12  # no duplicates, torn line gone


# ----------------------------------------------------------------------------- checkpoints


def _flip(path: Path, offset: int = -100) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("fault", ["flip_weights", "flip_optimizer", "truncate", "missing"])
def test_damaged_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys, fault):
    ref = _run(tmp_path / "ref", "train.checkpoint_every=4")
    run = tmp_path / "run"
    _run(run, "train.checkpoint_every=4")  # checkpoints at 4, 8 and the final 12 (2 kept)
    (run / "student").rename(tmp_path / "unfinished")  # as if killed after step 12's checkpoint
    newest = ckpt.list_checkpoints(run)[-1]
    assert newest.name == "step_00000012" and not ckpt.verify(newest)
    f = newest / ("optimizer.pt" if fault == "flip_optimizer" else "trainable.safetensors")
    if fault == "truncate":
        f.write_bytes(f.read_bytes()[:100])
    elif fault == "missing":
        f.unlink()
    else:
        _flip(f)
    assert ckpt.verify(newest)
    res = _run(run, "train.checkpoint_every=4", resume=True)
    out = capsys.readouterr().out
    assert "step_00000012 is damaged" in out and "step_00000008" in out
    for k, v in _weights(ref.run_dir).items():
        assert torch.equal(v, _weights(res.run_dir)[k]), k  # exact from step 4


def test_no_intact_checkpoint_is_an_error_not_a_restart(tmp_path, capsys):
    run = tmp_path / "run"
    _run(run, "train.checkpoint_every=4", "train.max_steps=8")
    for d in ckpt.list_checkpoints(run):
        _flip(d / "trainable.safetensors")
    (run / "student").rename(tmp_path / "gone")
    assert main(["distill", "digits", f"output.dir={run}", *FAST, "--resume"]) == 2
    assert "no intact checkpoint" in capsys.readouterr().err


# ----------------------------------------------------------------------------- non-finite


def test_nan_loss_stops_the_run_with_a_clear_error(tmp_path, capsys):
    """A teacher signal that turns NaN at step 7: stop there, exit 2, keep step 6's checkpoint."""
    from mentor.teachers import OnlineTeacher

    run = tmp_path / "run"
    cfg = load_config("digits", [f"output.dir={run}", *FAST, "train.checkpoint_every=3"])
    asm = __import__("mentor.assembly", fromlist=["Assembly"]).Assembly(cfg)
    calls = []

    class NaNAt(OnlineTeacher):
        def __call__(self, batch):
            calls.append(1)
            out = super().__call__(batch)
            if len(calls) == 7:
                out.logits = out.logits * float("nan")
            return out

    from mentor.engine import Distiller

    d = Distiller(asm.student, NaNAt(asm.module()), asm.objective, asm.data.train, cfg)
    with pytest.raises(NonFiniteError, match=r"step 7: .*not finite.*step_00000006.*train.lr"):
        d.fit()
    assert not (run / "student").exists()
    assert [c.name for c in ckpt.list_checkpoints(run)] == ["step_00000003", "step_00000006"]
    for line in (run / "metrics.jsonl").read_text().splitlines():
        assert json.loads(line)["step"] <= 6  # valid JSON, nothing from the bad step
    for d_ in ckpt.list_checkpoints(run):  # every kept checkpoint holds finite weights
        w = load_file(str(d_ / "trainable.safetensors"))
        assert all(torch.isfinite(v).all() for v in w.values())


def test_a_diverging_run_exits_non_zero_from_the_cli(tmp_path, capsys):
    run = tmp_path / "run"
    args = ["distill", "digits", f"output.dir={run}", *FAST, "train.lr=1e30",
            "train.grad_clip=null"]  # fmt: skip
    assert main(args) == 2
    assert "not finite" in capsys.readouterr().err
    assert not run.exists()  # failed before its first checkpoint: nothing left behind


def test_early_stopping_metric_is_checked_before_training(tmp_path):
    with pytest.raises(ValueError, match="not computed"):
        _run(tmp_path / "r", "eval.every=2", "eval.early_stopping={metric: acc}")
    assert not (tmp_path / "r").exists()


# ----------------------------------------------------------------------------- kill -9


def _cli(run, *over):
    return [sys.executable, "-m", "mentor.cli", "distill", "digits", f"output.dir={run}",
            *FAST, *over]  # fmt: skip


@pytest.mark.slow
def test_kill_9_at_random_points_then_resume_is_identical(tmp_path):
    """SIGKILL (no chance to checkpoint) at random times; --resume gives the same weights."""
    over = ["train.max_steps=300", "train.checkpoint_every=20", "train.log_every=10",
            "train.epochs=null"]  # fmt: skip
    ref = _run(tmp_path / "ref", *over)
    teacher = f"teacher.path={ref.run_dir}/teacher"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    rng = random.Random(0)
    run = tmp_path / "killed"
    kills = 0
    for _ in range(3):
        args = _cli(run, *over, teacher, "teacher.fit=null")
        if run.exists():
            args.append("--resume")
        p = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(rng.uniform(2.0, 4.0))
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            kills += 1
        p.communicate(timeout=120)
    final = subprocess.run([*_cli(run, *over, teacher, "teacher.fit=null"), "--resume"],
                           env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert final.returncode == 0, final.stderr[-2000:]
    assert kills >= 1
    a, b = _weights(ref.run_dir), _weights(run)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    steps = [r["step"] for r in _records(run) if r["kind"] == "train"]
    assert steps == sorted(set(steps)) and steps[-1] == 300


@pytest.mark.slow
def test_fault_injection_suite_at_smoke_size(monkeypatch, tmp_path):
    """benchmarks/fault_injection.py --quick: every injected fault detected and recovered."""
    from benchmarks import _common
    from benchmarks import fault_injection as fi

    monkeypatch.setattr(_common, "RESULTS", tmp_path)
    monkeypatch.setenv("MENTOR_CACHE", str(tmp_path / "cache"))
    res = fi.run(kills=1, steps=300, trials=1, quick=True)
    k, n, rows = res["kill9"], res["nan_io"], res["artifacts"]
    assert k["resumed_ok"] == k["identical"] == k["metrics_clean"] == k["runs"] == 1
    assert n["nan_caught_at_step"] == n["nan_injected"] == 1
    assert n["io_clean_errors"] == n["io_nothing_lost"] == n["io_faults"] == 2
    assert all(r["detected"] and r["named"] and r["recovered"] for r in rows), rows


def test_resume_accepts_a_config_saved_before_new_keys_existed(tmp_path):
    """A key mentor added later (here: the whole generation section) takes its default."""
    import yaml

    run = tmp_path / "run"
    _run(run, "train.max_steps=4", "train.checkpoint_every=2")
    saved = yaml.safe_load((run / "config.yaml").read_text())
    saved.pop("generation")
    saved["train"].pop("checkpoint_minutes")
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    res = _run(run, "train.max_steps=6", resume=True)
    assert max(r["step"] for r in _records(res.run_dir)) == 6
