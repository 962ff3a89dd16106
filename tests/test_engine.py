"""Engine tests on tiny in-process models: learning, resume, accumulation, teacher modes."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import Dataset

from mentor.assembly import fit_on_labels
from mentor.config import load_config
from mentor.data import build_data
from mentor.engine import Distiller
from mentor.eval.metrics import evaluate_classifier
from mentor.losses import Objective
from mentor.teachers import CachedTeacher, EMATeacher, EnsembleTeacher, OnlineTeacher


def _cfg(tmp_path, *overrides):
    base = {
        "name": "t",
        "objective": {"kd": {"weight": 1.0, "temperature": 2.0}},
        "train": {"max_steps": 30, "batch_size": 16, "lr": 1e-2, "progress": False},
        "output": {"dir": str(tmp_path / "run")},
    }
    return load_config(base, list(overrides))


@pytest.fixture(scope="module")
def toy():
    """Gaussian clusters, a trained MLP teacher, and an untrained student factory."""
    bundle = build_data("random", {"n": 400, "in_features": 16, "num_classes": 4}, 0.25, 0)
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4))
    cfg = load_config({"teacher": {"fit": {"epochs": 5}}}).teacher.fit
    fit_on_labels(teacher, bundle, cfg, seed=0, progress=False)

    def student(seed=1, dropout=0.0):
        torch.manual_seed(seed)
        layers = [nn.Linear(16, 8), nn.ReLU()]
        if dropout:
            layers.append(nn.Dropout(dropout))
        return nn.Sequential(*layers, nn.Linear(8, 4))

    return bundle, teacher, student


def test_kd_loss_falls_and_student_agrees_more_than_label_only(tmp_path, toy):
    bundle, teacher, make_student = toy
    s_kd = make_student()
    cfg = _cfg(tmp_path, "train.max_steps=40", "train.log_every=5")
    d = Distiller(s_kd, OnlineTeacher(teacher), Objective(cfg.objective), bundle.train, cfg)
    run = d.fit()
    losses = [r["loss"] for r in d.history if r["kind"] == "train"]
    assert losses[-1] < 0.5 * losses[0]
    # same student, same steps, trained on labels only
    s_ce = make_student()
    cfg2 = _cfg(tmp_path / "b", "train.max_steps=2", "objective={ce: {weight: 1}}")
    Distiller(s_ce, None, Objective(cfg2.objective), bundle.train, cfg2).fit()
    kd_m = evaluate_classifier(s_kd, bundle.val, teacher)
    ce_m = evaluate_classifier(s_ce, bundle.val, teacher)
    assert kd_m["agreement"] > ce_m["agreement"]
    assert kd_m["agreement"] >= 0.9
    # the run directory holds what other tools rely on
    assert (run / "config.yaml").exists() and (run / "student" / "model.safetensors").exists()
    first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert {"step", "loss", "kd"} <= set(first)


def test_resume_after_interruption_is_bit_identical(tmp_path, toy):
    bundle, teacher, make_student = toy
    overrides = ["train.max_steps=24", "train.checkpoint_every=8", "train.log_every=4"]

    def make(dirname):
        cfg = _cfg(tmp_path / dirname, *overrides)
        s = make_student(dropout=0.2)  # dropout exercises RNG restoration
        return Distiller(s, OnlineTeacher(teacher), Objective(cfg.objective), bundle.train, cfg)

    full = make("full").fit()

    class Crash:
        def on_step_end(self, _d, step, _v):
            if step == 13:
                raise RuntimeError("simulated kill")

    d = make("resumed")
    d.callbacks.append(Crash())
    with pytest.raises(RuntimeError, match="simulated kill"):
        d.fit()
    steps = sorted(p.name for p in (tmp_path / "resumed" / "run" / "checkpoints").glob("step_*"))
    assert steps == ["step_00000008"]
    resumed = make("resumed").fit(resume=True)
    a = load_file(str(full / "student" / "model.safetensors"))
    b = load_file(str(resumed / "student" / "model.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # metrics after the resume point are not duplicated
    recs = [json.loads(x) for x in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [4, 8, 12, 16, 20, 24]


def test_existing_run_dir_is_not_overwritten_silently(tmp_path, toy):
    bundle, teacher, make_student = toy
    cfg = _cfg(tmp_path, "train.max_steps=2")
    Distiller(
        make_student(), OnlineTeacher(teacher), Objective(cfg.objective), bundle.train, cfg
    ).fit()
    with pytest.raises(FileExistsError, match="--resume"):
        Distiller(
            make_student(), OnlineTeacher(teacher), Objective(cfg.objective), bundle.train, cfg
        ).fit()


class _LMData(Dataset):
    """Token sequences of uneven length (right padded) for accumulation tests."""

    def __init__(self, n=8, t=12, vocab=128):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, vocab, (n, t), generator=g)
        lengths = [12, 3, 7, 12, 5, 9, 2, 11][:n]
        self.mask = torch.zeros(n, t, dtype=torch.long)
        for i, ln in enumerate(lengths):
            self.mask[i, :ln] = 1

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "index": torch.tensor(i)}


def test_grad_accumulation_with_uneven_masks_equals_big_batch(tmp_path, tiny_lm):
    teacher = copy.deepcopy(tiny_lm)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    data = _LMData()
    results = []
    for bs, accum in [(8, 1), (2, 4)]:
        cfg = _cfg(
            tmp_path / f"{bs}",
            "objective={fkl: {loss: kd, temperature: 1.0}}",
            "train.max_steps=1",
            f"train.batch_size={bs}",
            f"train.grad_accum={accum}",
            "train.optimizer=sgd",
            "train.momentum=0",
            "train.grad_clip=null",
            "train.log_every=1",
        )
        student = copy.deepcopy(tiny_lm).train()
        d = Distiller(
            student, OnlineTeacher(teacher), Objective(cfg.objective), data, cfg, task="causal_lm"
        )
        d.fit()
        results.append(
            (d.history[0]["loss"], {k: v.clone() for k, v in student.state_dict().items()})
        )
    (l1, w1), (l2, w2) = results
    assert l1 == pytest.approx(l2, rel=1e-5)
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=1e-5, atol=1e-7)


def test_ensemble_cached_and_ema_teachers(tmp_path, toy):
    bundle, teacher, make_student = toy
    t2 = copy.deepcopy(teacher)
    with torch.no_grad():
        t2[2].bias.add_(1.0)
    x = torch.randn(5, 16)
    for agg in ("mean_probs", "mean_logits", "normalized_scores"):
        ens = EnsembleTeacher(
            [OnlineTeacher(teacher), OnlineTeacher(t2)], aggregate=agg, weights=[3, 1]
        )
        out = ens({"inputs": x}).logits
        z1, z2 = teacher(x), t2(x)
        if agg == "mean_probs":
            ref = torch.log(0.75 * z1.softmax(-1) + 0.25 * z2.softmax(-1))
        elif agg == "mean_logits":
            ref = 0.75 * z1 + 0.25 * z2
        else:
            zs = [
                (z - z.mean(-1, keepdim=True)) / (z.std(-1, keepdim=True) + 1e-6) for z in (z1, z2)
            ]
            ref = 0.75 * zs[0] + 0.25 * zs[1]
        torch.testing.assert_close(out, ref.detach(), rtol=1e-5, atol=1e-6)

    # a cached (in-memory) teacher gives the same training as the online one
    store = {
        int(bundle.train[i]["index"]): teacher(bundle.train[i]["inputs"]).detach()
        for i in range(len(bundle.train))
    }
    finals = []
    for name, src in [("online", OnlineTeacher(teacher)), ("cached", CachedTeacher(store))]:
        cfg = _cfg(tmp_path / name, "train.max_steps=5")
        s = make_student()
        Distiller(s, src, Objective(cfg.objective), bundle.train, cfg).fit()
        finals.append(s.state_dict())
    for k in finals[0]:
        torch.testing.assert_close(finals[0][k], finals[1][k])

    # EMA of the student: teacher moves towards the student each step
    s = make_student()
    ema = EMATeacher(s, decay=0.5)
    before = copy.deepcopy(ema.module.state_dict())
    cfg = _cfg(
        tmp_path / "ema", "train.max_steps=3", "objective={kd: {weight: 1}, ce: {weight: 1}}"
    )
    Distiller(s, ema, Objective(cfg.objective), bundle.train, cfg).fit()
    w = "2.weight"
    assert not torch.equal(before[w], ema.module.state_dict()[w])
    assert all(not p.requires_grad for p in ema.module.parameters())


def test_bad_tap_path_fails_at_setup_listing_valid_paths(tmp_path, toy):
    bundle, teacher, make_student = toy
    cfg = _cfg(tmp_path)
    obj = Objective({"kd": {"weight": 1.0}})
    obj.taps["fake"] = ("1x", "0")  # a feature term pointing at a missing module
    with pytest.raises(ValueError, match="student has no module '1x'.*valid paths: 1"):
        Distiller(make_student(), OnlineTeacher(teacher), obj, bundle.train, cfg)
    with pytest.raises(ValueError, match="teacher has no module 'layers.9'"):
        OnlineTeacher(teacher, taps=["layers.9"])


def test_missing_teacher_and_oversized_batch_give_clear_errors(tmp_path, toy):
    bundle, _, make_student = toy
    cfg = _cfg(tmp_path, "train.batch_size=100000")
    with pytest.raises(ValueError, match="no teacher was given"):
        Distiller(make_student(), None, Objective(cfg.objective), bundle.train, cfg)
    cfg = _cfg(tmp_path, "train.batch_size=100000", "objective={ce: {weight: 1}}")
    d = Distiller(make_student(), None, Objective(cfg.objective), bundle.train, cfg)
    with pytest.raises(ValueError, match="lower train.batch_size"):
        d.fit()


def test_missing_tracker_package_is_a_clear_error(monkeypatch):
    import importlib.util

    from mentor.engine.loop import _check_trackers

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "wandb" else real(n, *a)
    )
    with pytest.raises(ValueError, match="pip install wandb"):
        _check_trackers(["wandb"])
    _check_trackers([])


def test_taid_state_survives_resume(tmp_path, toy):
    bundle, teacher, make_student = toy
    overrides = ["train.max_steps=16", "train.checkpoint_every=8", "objective={taid: {weight: 1}}"]

    def make(dirname):
        cfg = _cfg(tmp_path / dirname, *overrides)
        return Distiller(
            make_student(), OnlineTeacher(teacher), Objective(cfg.objective), bundle.train, cfg
        )

    full = make("full")
    full.fit()

    class Crash:
        def on_step_end(self, _d, step, _v):
            if step == 11:
                raise RuntimeError("kill")

    d = make("res")
    d.callbacks.append(Crash())
    with pytest.raises(RuntimeError):
        d.fit()
    resumed = make("res")
    resumed.fit(resume=True)
    t_full = full.model.objective.taid_t()["taid"]
    assert t_full > 0.4  # the schedule moved
    assert resumed.model.objective.taid_t()["taid"] == t_full
    for k, v in full.model.student.state_dict().items():
        assert torch.equal(v, resumed.model.student.state_dict()[k])


def test_reserved_term_names_are_refused():
    with pytest.raises(ValueError, match="term name 'forward' is not allowed"):
        Objective({"forward": {"loss": "forward_kl"}})


def test_default_student_export_handles_tied_weights(tmp_path):
    from safetensors.torch import load_model

    from mentor.engine.loop import _save_state_dict

    m = nn.Sequential(nn.Embedding(5, 4), nn.Linear(4, 5, bias=False))
    m[1].weight = m[0].weight  # tied, as in many LMs
    _save_state_dict(m, tmp_path)
    fresh = nn.Sequential(nn.Embedding(5, 4), nn.Linear(4, 5, bias=False))
    fresh[1].weight = fresh[0].weight
    load_model(fresh, str(tmp_path / "model.safetensors"))
    assert torch.equal(fresh[0].weight, m[0].weight)


def test_fused_head_training_equals_plain(tmp_path, tiny_lm):
    teacher = copy.deepcopy(tiny_lm)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    data = _LMData()
    results = []
    for fused in ("null", "5"):
        cfg = _cfg(
            tmp_path / fused,
            "objective={fkl: {loss: forward_kl}, j: {loss: jsd, weight: 0.5}, ce: {weight: 0.1}}",
            "train.max_steps=2",
            "train.batch_size=4",
            "train.log_every=1",
            f"train.fused_loss_chunk={fused}",
        )
        student = copy.deepcopy(tiny_lm).train()
        d = Distiller(
            student, OnlineTeacher(teacher), Objective(cfg.objective), data, cfg, task="causal_lm"
        )
        # fused: the online teacher's logits are fused too (hidden states + head)
        assert d._teacher_head == (fused != "null")
        d.fit()
        results.append(([r["loss"] for r in d.history], student.state_dict()))
    (l1, w1), (l2, w2) = results
    assert l1 == pytest.approx(l2, rel=1e-5)
    for k in w1:
        # AdamW normalises tiny gradients, so float noise can move a weight by ~1e-5 (lr 1e-2)
        torch.testing.assert_close(w1[k], w2[k], rtol=1e-4, atol=5e-5)


def test_fused_head_needs_a_causal_lm(tmp_path, toy):
    bundle, teacher, make_student = toy
    cfg = _cfg(tmp_path, "train.fused_loss_chunk=8")
    with pytest.raises(ValueError, match="fused_loss_chunk needs a causal LM"):
        Distiller(
            make_student(), OnlineTeacher(teacher), Objective(cfg.objective), bundle.train, cfg
        )


def test_teacher_head_only_for_plain_linear_heads(tiny_lm):
    from mentor.teachers.sources import linear_head

    model = copy.deepcopy(tiny_lm)
    assert linear_head(model) is model.get_output_embeddings()
    model.config.final_logit_softcapping = 30.0  # Gemma-2 style: logits are not lm_head(h)
    assert linear_head(model) is None
    assert linear_head(nn.Linear(3, 3)) is None
    batch = {"input_ids": torch.randint(0, 10, (2, 5))}
    with pytest.raises(ValueError, match="no plain linear output head"):
        OnlineTeacher(model).head_output(batch)
    out = OnlineTeacher(tiny_lm).head_output(batch)
    with torch.no_grad():
        ref = tiny_lm(input_ids=batch["input_ids"]).logits
    torch.testing.assert_close(out.logits.logits(), ref)
