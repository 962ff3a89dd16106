"""Teacher modes through recipes, early stopping, SIGTERM checkpointing, TAID in the loop."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from mentor.assembly import distill
from mentor.config import load_config

FAST = ["train.max_steps=20", "teacher.fit.epochs=3", "train.progress=false"]


def test_born_again_ensemble_and_ema_recipes_run(tmp_path):
    first = distill(load_config("digits", [f"output.dir={tmp_path}/first", *FAST]), quiet=True)
    # born-again: the previous student is the teacher
    ba = distill(
        load_config(
            "digits",
            [
                f"output.dir={tmp_path}/ba",
                "teacher.source=run",
                f"teacher.run={first.run_dir}",
                *FAST,
            ],
        ),
        quiet=True,
    )
    assert ba.metrics["teacher_accuracy"] == pytest.approx(first.metrics["student_accuracy"])
    # ensemble of a trained MLP and the previous student, mean of probabilities
    members = (
        "[{builder: mlp, params: {hidden: [64]}, fit: {epochs: 3}}, "
        f"{{path: {first.run_dir}/student}}]"
    )
    ens = distill(
        load_config(
            "digits",
            [
                f"output.dir={tmp_path}/ens",
                "teacher.source=ensemble",
                f"teacher.members={members}",
                "teacher.weights=[0.7, 0.3]",
                *FAST,
            ],  # fmt: skip
        ),
        quiet=True,
    )
    assert ens.metrics["student_accuracy"] > 0.3
    # EMA self-distillation with labels
    ema = distill(
        load_config(
            "digits",
            [f"output.dir={tmp_path}/ema", "teacher.source=ema", "teacher.ema_decay=0.9", *FAST],
        ),
        quiet=True,
    )
    recs = [json.loads(x) for x in (ema.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(r["loss"] == r["loss"] for r in recs)  # finite, not NaN


def test_early_stopping_stops_and_checkpoints(tmp_path):
    cfg = load_config(
        "digits",
        [
            f"output.dir={tmp_path}",
            "train.max_steps=400",
            "teacher.fit.epochs=3",
            "train.progress=false",
            "eval.every=5",
            "train.lr=1e-9",
            "train.schedule=constant",
            "eval.early_stopping={metric: accuracy, mode: max, patience: 2}",
        ],  # fmt: skip
    )
    res = distill(cfg, quiet=True)
    evals = [json.loads(x) for x in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in evals if r["kind"] == "eval"]
    # with a learning rate of 1e-9 nothing improves after the first evaluation
    assert [r["step"] for r in evals] == [5, 10, 15]
    assert (res.run_dir / "student" / "model.safetensors").exists()


def test_early_stopping_unknown_metric_is_named(tmp_path):
    cfg = load_config(
        "digits",
        [
            f"output.dir={tmp_path}",
            *FAST,
            "eval.every=5",
            "eval.early_stopping={metric: acuracy}",
        ],  # fmt: skip
    )
    with pytest.raises(ValueError, match="'acuracy' is not computed; available: .*accuracy"):
        distill(cfg, quiet=True)


def test_taid_schedule_advances_in_the_loop(tmp_path):
    cfg = load_config(
        "digits",
        [f"output.dir={tmp_path}", *FAST, "objective={taid: {weight: 1.0}, ce: {weight: 0.1}}"],
    )
    res = distill(cfg, quiet=True)
    recs = [json.loads(x) for x in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r["kind"] == "train"]
    assert all("taid" in r for r in train)
    ts = [r["taid.t"] for r in train]
    assert 0.4 < ts[0] and ts == sorted(ts) and ts[-1] > ts[0]  # t moves from t_start up


@pytest.mark.slow
def test_sigterm_writes_checkpoint_and_resume_matches(tmp_path):
    common = ["train.max_steps=800", "teacher.fit.epochs=2", "train.progress=false",
              "train.log_every=50", "student.params.hidden=[16]"]  # fmt: skip
    ref = distill(load_config("digits", [f"output.dir={tmp_path}/ref", *common]), quiet=True)
    run = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "mentor.cli", "distill", "digits", f"output.dir={run}",
           f"teacher.path={ref.run_dir}/teacher", "teacher.fit=null", *common]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and not (run / "metrics.jsonl").exists():
        time.sleep(0.1)
    time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err.decode()[-1000:]
    ckpts = list((run / "checkpoints").glob("step_*"))
    assert len(ckpts) == 1 and not list((run / "checkpoints").glob(".tmp*"))
    assert not (run / "student").exists()
    cfg = load_config(
        "digits",
        [f"output.dir={run}", f"teacher.path={ref.run_dir}/teacher", "teacher.fit=null", *common],
    )
    res = distill(cfg, resume=True, quiet=True)
    a = load_file(str(ref.run_dir / "student" / "model.safetensors"))
    b = load_file(str(res.run_dir / "student" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
