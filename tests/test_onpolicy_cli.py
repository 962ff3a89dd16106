"""On-policy distillation through the CLI: SIGTERM mid-run then ``--resume`` reproduces the
uninterrupted run's weights exactly, and ``accelerate launch`` with 2 processes (gloo, CPU)
computes the same losses as one process with the same global batch (every sample is seeded by
its example id, not by the process it lands on). Tiny models built in-process only."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file

from prompt_data import save_tiny_llama, write_word_prompts


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("onpolicy")
    model = save_tiny_llama(root / "teacher")
    data = write_word_prompts(root / "prompts.jsonl", n=20)
    return root, model, data


def _recipe(root, model, data, name, **generation):
    spec = {
        "name": name,
        "teacher": {"builder": "hf_causal_lm", "params": {"model": str(model)}},
        "student": {"builder": "layer_drop", "params": {"layers": [0]}},
        "data": {"source": "prompts", "params": {"path": str(data)}, "val_fraction": 0.2},
        "generation": {
            "mode": "on_policy",
            "max_new_tokens": 6,
            "temperature": 1.0,
            **generation,
        },  # fmt: skip
        "objective": {"jsd": {"loss": "jsd", "beta": 0.5}},
        "train": {
            "batch_size": 4,
            "lr": 1e-2,
            "log_every": 1,
            "progress": False,
            "checkpoint_minutes": None,
            "epochs": None,
        },  # fmt: skip
        "eval": {"batch_size": 8, "every": None},
        "output": {"dir": str(root / "runs" / name)},
    }
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _cli(recipe, *over):
    return [sys.executable, "-m", "mentor.cli", "distill", str(recipe), *over]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "MENTOR_DEBUG": ""}


def _losses(run):
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if r["kind"] == "train"}


def _steps_logged(run):
    f = run / "metrics.jsonl"
    return len(f.read_text().splitlines()) if f.exists() else 0


@pytest.mark.slow
def test_sigterm_mid_run_then_resume_is_identical_on_policy(setup):
    root, model, data = setup
    recipe = _recipe(root, model, data, "term", samples_per_prompt=2)
    steps = ["train.max_steps=120", "train.checkpoint_every=1000"]
    ref = subprocess.run(_cli(recipe, *steps, f"output.dir={root}/ref"), env=_env(),
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert ref.returncode == 0, ref.stderr[-2000:]

    run = root / "cut"
    p = subprocess.Popen(_cli(recipe, *steps, f"output.dir={run}"), env=_env(),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    deadline = time.time() + 300
    while _steps_logged(run) < 15 and p.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert p.poll() is None, "the run ended before it could be interrupted: raise max_steps"
    p.send_signal(signal.SIGTERM)
    err, _ = p.communicate(timeout=120)
    assert p.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "checkpoint written at step" in err
    cut_at = max(_losses(run))
    assert 15 <= cut_at < 120  # stopped mid-run, with only the signal's checkpoint to resume from
    assert not (run / "student" / "model.safetensors").exists()

    res = subprocess.run([*_cli(recipe, *steps, f"output.dir={run}"), "--resume"], env=_env(),
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    a = load_file(str(root / "ref" / "student" / "model.safetensors"))
    b = load_file(str(run / "student" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert _losses(run) == _losses(root / "ref")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["on_policy", "mixed"])
def test_two_processes_match_one_process_on_policy(setup, mode):
    """2 processes x batch 2 == 1 process x batch 4: same samples, same losses, same weights."""
    accel = shutil.which("accelerate", path=os.path.dirname(sys.executable))
    if accel is None:
        pytest.skip("accelerate launcher not found next to the interpreter")
    root, model, data = setup
    recipe = _recipe(root, model, data, f"ddp-{mode}", samples_per_prompt=2)
    common = ["train.max_steps=6", "generation.lambda=0.5"]
    one = subprocess.run(
        _cli(recipe, *common, "train.batch_size=4", f"output.dir={root}/{mode}-one"),
        env=_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert one.returncode == 0, one.stderr[-2000:]
    cmd = [
        accel, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        "-m", "mentor.cli", "distill", str(recipe), *common, "train.batch_size=2",
        f"output.dir={root}/{mode}-two",
    ]  # fmt: skip
    env = {**_env(), "MASTER_PORT": "29523" if mode == "mixed" else "29521"}
    two = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = _losses(root / f"{mode}-one"), _losses(root / f"{mode}-two")
    assert list(a) == list(b) == list(range(1, 7))
    assert list(b.values()) == pytest.approx(list(a.values()), rel=1e-4)
    wa = load_file(str(root / f"{mode}-one" / "student" / "model.safetensors"))
    wb = load_file(str(root / f"{mode}-two" / "student" / "model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-3, atol=1e-4)  # Adam: tiny grads
