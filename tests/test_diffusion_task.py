"""The diffusion task end to end: data sources, denoiser builders, config, the trainer (exact
resume after SIGTERM), evaluation, the CLI and the report, and errors that name the setting."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch

from mentor.assembly import distill
from mentor.cli import main
from mentor.config import ConfigError, load_config
from mentor.engine import diffusion as ED
from mentor.recipes import smoke_overrides


@pytest.fixture(autouse=True)
def _one_thread(one_thread, monkeypatch):
    monkeypatch.delenv("MENTOR_DEBUG", raising=False)


def _cfg(name: str, out: Path, *extra: str):
    return load_config(
        name, [*smoke_overrides(name), "train.progress=false", f"output.dir={out}", *extra]
    )


# ----------------------------------------------------------------------------- parts


def test_sources_and_builders():
    from mentor.data import build_data
    from mentor.students import build_model
    from mentor.students.denoiser_builders import build_denoiser

    b = build_data("gmm2d", {"kind": "ring8", "n": 100, "std": 0.05}, 0.2, 0)
    item = b.train[0]
    assert set(item) == {"x", "index"} and item["x"].shape == (2,)
    assert len(b.train) == 80 and len(b.val) == 20 and b.info.task == "diffusion"
    assert len(b.info.extra["means"]) == 8 and b.info.extra["std"] == 0.05
    d = build_data("digits_images", {"limit": 50}, 0.2, 0)
    assert d.info.input_shape == (1, 8, 8) and d.info.num_classes == 10
    assert set(d.train[0]) == {"x", "index", "labels"} and float(d.train.x.min()) >= -1

    teacher = build_model("mlp_denoiser", {"hidden": 16, "depth": 2}, b.info)
    student = build_denoiser("student", "mlp_denoiser", {"hidden": 16, "depth": 2,
                                                         "init": "teacher"}, b.info, teacher)  # fmt: skip
    for a, c in zip(teacher.parameters(), student.parameters()):
        assert torch.equal(a, c)
    assert student.role == "student" and student.data_shape == (2,)
    with pytest.raises(ValueError, match=r"student\.params\.init=teacher .* architecture"):
        build_denoiser("student", "mlp_denoiser", {"hidden": 8, "init": "teacher"}, b.info, teacher)
    with pytest.raises(ValueError, match=r"student\.params\.dim=3 but the data are 2-D"):
        build_denoiser("student", "mlp_denoiser", {"dim": 3}, b.info)
    with pytest.raises(ValueError, match=r"1x8x8 but teacher\.params\.sample_size=16"):
        build_denoiser("teacher", "unet_denoiser", {"sample_size": 16}, d.info)
    with pytest.raises(ValueError, match=r"student\.builder 'unet_denoiser'.*mlp_denoiser"):
        build_denoiser("student", "unet_denoiser", {}, b.info)
    u = build_denoiser("teacher", "unet_denoiser", {"block_out_channels": [8, 16]}, d.info)
    assert u.data_shape == (1, 8, 8)
    with pytest.raises(ValueError, match=r"images are 1x4x4 .*teacher\.params\.sample_size"):
        u(torch.zeros(2, 1, 4, 4), torch.zeros(2, dtype=torch.long))


# ----------------------------------------------------------------------------- end to end


def test_2d_recipe_distill_eval_report(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = [*smoke_overrides("diffusion-2d"), "train.progress=false", "output.dir=run",
            "train.max_steps=300", "train.lr=3e-4", "train.log_every=50"]  # fmt: skip
    assert main(["distill", "diffusion-2d", *args]) == 0
    out = capsys.readouterr().out
    assert "student MMD at 1 NFE" in out and "speed-up of the 1-step student" in out
    m = json.loads(Path("run/final_metrics.json").read_text())
    noise = m["noise_mmd"]
    assert 0.1 < noise < 0.4  # unit-scale ring vs N(0, I)
    assert m["teacher_nfe"] == 50 and m["student_nfe"] == 1
    assert m["teacher_mmd"] < 0.6 * noise  # the 50-step teacher samples the mixture
    assert m["teacher_mmd_nfe1"] > 5 * noise  # one DDIM step collapses onto the mean
    assert m["student_mmd"] < 0.8 * noise  # the distilled 1-step student does not
    assert m["student_mmd"] < m["teacher_mmd_nfe1"] / 10
    assert m["student_coverage"] >= 0.75 and m["teacher_coverage"] == 1.0
    assert m["speedup"] > 5  # 50 network evaluations against 1
    rec = [json.loads(x) for x in Path("run/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rec] == list(range(50, 301, 50))
    assert all(r["kind"] == "train" and r["loss"] >= 0 and "grad_norm" in r for r in rec)
    assert (tmp_path / "run/student/mentor_model.json").exists()
    assert (tmp_path / "run/teacher/fit_key.txt").exists()

    assert main(["eval", "run"]) == 0
    ev = json.loads(Path("run/eval.json").read_text())
    d = ev["diffusion"]
    assert ev["task"] == "diffusion" and d["kind"] == "points" and d["samples"] == 300
    got = {(r["model"], r["nfe"]) for r in d["rows"]}
    assert got == {("teacher", n) for n in (1, 2, 4, 8, 50)} | {
        ("student", n) for n in (1, 2, 4)} | {("noise", 0)}  # fmt: skip
    row = next(r for r in d["rows"] if r["model"] == "student" and r["nfe"] == 1)
    assert row["mmd"] == pytest.approx(m["student_mmd"])  # same noise, same numbers
    assert row["latency_ms"] > 0 and d["speedup"]["speedup"] > 5
    assert d["data_floor"]["mmd"] < 0.02  # two draws of the mixture
    assert main(["report", "run"]) == 0
    html = Path("run/report.html").read_text()
    assert "Speed-up" in html and "samples by NFE" in html and "data:image/png" in html
    assert (tmp_path / "run/plots/samples.png").exists()
    assert main(["cache", "diffusion-2d", "--out", "c", *args]) == 2
    assert "cannot be cached" in capsys.readouterr().err


# ----------------------------------------------------------------------------- resume


TINY = ["data.params.n=400", "teacher.params.hidden=32", "student.params.hidden=32",
        "teacher.fit.epochs=5", "train.max_steps=10", "train.batch_size=32",
        "train.checkpoint_every=3", "train.log_every=2"]  # fmt: skip
OBJECTIVES = {
    "dmd2": ["diffusion.objective=dmd2", "diffusion.params.dmd2.fake_lr=1e-3", "train.lr=1e-3"],
    "consistency_distillation": [],  # the recipe's CD with an EMA target (target_ema 0.95)
}


def _killed_at(monkeypatch, step: int) -> None:
    """Send SIGTERM to this process from inside training step ``step``."""
    orig = ED.DiffusionDistiller.train_step
    calls = {"n": 0}

    def train_step(self, x0, optimizer, generator):
        logs = orig(self, x0, optimizer, generator)
        calls["n"] += 1
        if calls["n"] == step:
            os.kill(os.getpid(), signal.SIGTERM)
        return logs

    monkeypatch.setattr(ED.DiffusionDistiller, "train_step", train_step)


def _final_state(run: Path) -> dict:
    last = sorted((run / "checkpoints").glob("step_*"))[-1]
    return torch.load(last / ED.STATE_FILE, weights_only=True)


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
def test_sigterm_then_resume_equals_the_uninterrupted_run(objective, tmp_path, monkeypatch):
    over = [*TINY, *OBJECTIVES[objective]]
    whole = distill(_cfg("diffusion-2d", tmp_path / "whole", *over), quiet=True, final=False)

    _killed_at(monkeypatch, 5)
    cfg = _cfg("diffusion-2d", tmp_path / "cut", *over)
    with pytest.raises(SystemExit) as e:
        distill(cfg, quiet=True, final=False)
    assert e.value.code == 128 + signal.SIGTERM
    monkeypatch.undo()
    assert (tmp_path / "cut/checkpoints/step_00000005").exists()
    assert not (tmp_path / "cut/student").exists()
    resumed = distill(cfg, resume=True, quiet=True, final=False)

    for (k, a), (k2, b) in zip(whole.student.state_dict().items(),
                               resumed.student.state_dict().items()):  # fmt: skip
        assert k == k2 and torch.equal(a, b), k
    sa, sb = _final_state(tmp_path / "whole"), _final_state(tmp_path / "cut")
    assert sa["step"] == sb["step"] == 10
    assert _same(sa["objective"], sb["objective"])  # fake score + its optimizer / EMA target
    assert _same(sa["optimizer"], sb["optimizer"]) and torch.equal(sa["generator"], sb["generator"])
    if objective == "dmd2":
        assert sa["objective"]["fake_score"] and sa["objective"]["optimizer"] is not None
        assert len(sa["objective"]["history"]) == 2 * 10  # two fake-score updates per step
    else:
        assert sa["objective"]["target"] is not None

    def records(run):
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k != "elapsed_s"} for r in rows]

    assert records(tmp_path / "whole") == records(tmp_path / "cut")
    if objective == "dmd2":
        assert {"fake_loss", "fake_grad_norm", "grad_norm", "loss_dm"} <= set(
            records(tmp_path / "whole")[0])  # fmt: skip


@pytest.mark.parametrize("objective", ["progressive", "consistency_training", "embedding_mmd",
                                       "hyper_sd_tscd", "dmd2"])  # fmt: skip
def test_every_objective_is_one_override_away(objective, tmp_path):
    """``diffusion.objective=NAME`` alone: the recipe's per-objective params pick the block."""
    over = [
        *TINY,
        "train.max_steps=4",
        "diffusion.eval_samples=40",
        f"diffusion.objective={objective}",
    ]
    cfg = _cfg("diffusion-2d", tmp_path / "run", *over)
    assert cfg.diffusion.objective_kwargs() == (
        {"fake_updates": 2, "fake_lr": 1e-3} if objective == "dmd2" else {})  # fmt: skip
    m = distill(cfg, quiet=True).metrics
    assert m["objective"] == objective
    assert {f"student_mmd_nfe{n}" for n in (1, 2, 4)} <= set(m) and m["speedup"] > 1
    assert _final_state(tmp_path / "run")["objective"]["objective"] == objective


def test_fake_score_divergence_is_warned_once(tmp_path, capsys):
    over = [*TINY, *OBJECTIVES["dmd2"], "diffusion.params.dmd2.divergence_window=1",
            "diffusion.params.dmd2.divergence_factor=1.0001", "train.max_steps=12"]  # fmt: skip
    res = distill(_cfg("diffusion-2d", tmp_path / "run", *over), quiet=True, final=False)
    err = capsys.readouterr().err
    assert err.count("fake-score loss") == 1 and "warning: step" in err
    rec = [json.loads(x) for x in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("diverged") for r in rec)


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "override, where",
    [
        ("diffusion.student_steps=[1,0]", "diffusion.student_steps: NFE 0"),
        ("diffusion.teacher_steps=0", "diffusion.teacher_steps: NFE 0"),
        ("diffusion.teacher_sampler=heun", "diffusion.teacher_sampler: unknown sampler 'heun'"),
        ("diffusion.objective=dmd", "diffusion.objective: unknown diffusion objective 'dmd'"),
        ("diffusion.params.dmd2.fake_lrr=1", "dmd2.fake_lrr: objective dmd2 has no parameter"),
        ("diffusion.params.fake_lr=1", "diffusion.params.consistency_distillation.fake_lr"),
        ("diffusion.params={fake_lr: 1}", "fake_lr: objective consistency_distillation has no"),
    ],
)
def test_config_errors_name_the_key(override, where):
    with pytest.raises(ConfigError) as e:
        load_config("diffusion-2d", [override])
    assert where in str(e.value)
    cfg = load_config("diffusion-2d", ["diffusion.params.dmd2.fake_lr=1e-4"])
    assert cfg.diffusion.params["dmd2"]["fake_lr"] == 1e-4  # YAML 1.1 text read as a number


def test_bad_input_is_refused_naming_the_setting(tmp_path):
    sched = tmp_path / "scheduler_config.json"
    sched.write_text(json.dumps({"num_train_timesteps": 1000, "prediction_type": "v_prediction",
                                 "beta_schedule": "squaredcos_cap_v2", "thresholding": True}))  # fmt: skip
    cases = [
        # a sampler the teacher's schedule cannot run (refused before anything is written)
        ("diffusion-2d", [f"diffusion.scheduler_config={sched}", "diffusion.teacher_sampler=euler"],
         r"diffusion\.teacher_sampler=euler cannot run .*thresholding"),
        # images of the wrong size for the UNet
        ("diffusion-digits", ["teacher.params.sample_size=16"],
         r"1x8x8 but teacher\.params\.sample_size=16"),
        # a student of another data shape than the teacher / the data
        ("diffusion-2d", ["student.params.dim=3"], r"student\.params\.dim=3 but the data are 2-D"),
        ("diffusion-2d", ["student.builder=unet_denoiser", "student.params={}"],
         r"student\.builder 'unet_denoiser' takes square images"),
        ("diffusion-2d", ["diffusion.objective=dmd2", "diffusion.params=null",
                          "diffusion.params.fake_lr=-1"], r"diffusion\.params: dmd2\.fake_lr"),
        ("diffusion-2d", ["selection.method=random"], r"selection: not used by the diffusion"),
    ]  # fmt: skip
    for i, (recipe, over, pattern) in enumerate(cases):
        out = tmp_path / f"r{i}"
        with pytest.raises(ValueError, match=pattern):
            distill(_cfg(recipe, out, *over), quiet=True)
        assert not out.exists()
    cfg = load_config({"data": {"source": "gmm2d", "params": {"n": 50}},
                       "output": {"dir": str(tmp_path / "x")}})  # fmt: skip
    with pytest.raises(ValueError, match="needs a diffusion: section"):
        distill(cfg, quiet=True)


def test_teacher_of_another_size_is_refused(tmp_path):
    from mentor.data.sources import DataInfo
    from mentor.students import build_model, save_model

    info = DataInfo(task="diffusion", input_shape=(1, 16, 16), in_features=256)
    params = {"block_out_channels": [8, 16]}
    save_model(build_model("unet_denoiser", params, info), tmp_path / "t16", "unet_denoiser",
               params, info)  # fmt: skip
    cfg = _cfg("diffusion-digits", tmp_path / "run", f"teacher.path={tmp_path / 't16'}",
               "teacher.builder=null", "teacher.fit=null")  # fmt: skip
    with pytest.raises(ValueError, match=r"teacher \(teacher\.path=.*\) generates 1x16x16 data "
                                         r"but the data are 1x8x8"):  # fmt: skip
        distill(cfg, quiet=True)


def test_resume_may_change_what_is_evaluated_but_not_what_is_trained(tmp_path):
    from mentor.config import dump_config
    from mentor.engine.rundir import check_output, write_marker

    run = tmp_path / "run"
    cfg = _cfg("diffusion-2d", run, *TINY)
    run.mkdir()
    write_marker(run)
    (run / "config.yaml").write_text(dump_config(cfg))
    evals = ["diffusion.student_steps=[1, 8]", "diffusion.eval_samples=64",
             "diffusion.eval_teacher_steps=[1, 50]", "diffusion.threads=1"]  # fmt: skip
    changed = {k for k, _, _ in check_output(_cfg("diffusion-2d", run, *TINY, *evals), True)}
    assert changed == {"diffusion.student_steps", "diffusion.eval_samples",
                       "diffusion.eval_teacher_steps", "diffusion.threads"}  # fmt: skip
    with pytest.raises(
        ValueError, match=r"diffusion.objective: 'consistency_distillation' -> 'dmd2'"
    ):
        check_output(_cfg("diffusion-2d", run, *TINY, "diffusion.objective=dmd2"), True)


def test_progressive_halves_in_equal_rounds_by_default(tmp_path):
    """``diffusion.objective=progressive`` alone: 8 -> 4 -> 2 -> 1 student steps over the run
    (the class's own default, 256 steps and no rounds, would never reach a 1-step student)."""
    cfg = _cfg("diffusion-2d", tmp_path / "run", *TINY, "diffusion.objective=progressive")
    kw = ED.objective_kwargs(cfg.diffusion, 100)
    assert kw == {"student_steps": 8, "final_student_steps": 1, "iters_per_round": 25}
    obj = ED.build_diffusion_objective(cfg.diffusion, ED.make_schedule(cfg.diffusion), 100)
    assert [obj.rounds.student_steps(i) for i in (0, 24, 25, 50, 75, 99)] == [8, 8, 4, 2, 1, 1]
    mine = ED.objective_kwargs(
        _cfg("diffusion-2d", tmp_path / "r2", *TINY, "diffusion.objective=progressive",
             "diffusion.params.progressive.iters_per_round=7").diffusion, 100)  # fmt: skip
    assert mine == {"iters_per_round": 7}  # a recipe's own rounds are left alone


def test_the_feature_classifier_is_the_same_for_every_seed(tmp_path, monkeypatch):
    """FDs of runs with different train.seed are in the same features (one classifier)."""
    from mentor.assembly import Assembly, diffusion_feature_net

    monkeypatch.setenv("MENTOR_CACHE", str(tmp_path / "cache"))
    nets = []
    for seed in (0, 1):
        cfg = _cfg("diffusion-digits", tmp_path / f"r{seed}", f"train.seed={seed}")
        nets.append(diffusion_feature_net(Assembly(cfg))[0].state_dict())
    assert len(list((tmp_path / "cache" / "teachers").iterdir())) == 1  # fitted once
    assert all(torch.equal(nets[0][k], nets[1][k]) for k in nets[0])
