"""eval.json, report.md/report.html and compare from a tiny run."""

from __future__ import annotations

import json
from html.parser import HTMLParser

import matplotlib.image as mpimg
import pytest

from mentor.assembly import distill, evaluate_run
from mentor.config import load_config
from mentor.report import build_report, compare_runs

TINY = ["train.max_steps=30", "teacher.fit.epochs=3", "eval.every=10", "train.progress=false"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    kd = distill(load_config("digits", [f"output.dir={root}/kd", *TINY]), quiet=True)
    base = distill(
        load_config("digits", [f"output.dir={root}/ce", "objective={ce: {weight: 1}}", *TINY]),
        quiet=True,
    )
    return kd.run_dir, base.run_dir


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.refs, self.h2 = [], [], []
        self._in_h2 = False

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self._in_h2 = tag == "h2"
        for k, v in attrs:
            if k in ("src", "href"):
                self.refs.append(v)

    def handle_data(self, data):
        if self._in_h2:
            self.h2.append(data)
            self._in_h2 = False


def test_eval_json_has_every_model_and_metric(runs):
    kd, base = runs
    ev = evaluate_run(kd, baseline=base)
    assert set(ev["models"]) == {"teacher", "student_no_kd", "student"}
    s = ev["models"]["student"]
    for key in ("accuracy", "macro_f1", "ece", "agreement", "kl_teacher_student", "top5_overlap"):
        assert key in s and s[key] == s[key]  # present and not NaN
    assert ev["models"]["teacher"]["agreement"] == pytest.approx(1.0)
    assert s["cost"]["params"] < ev["models"]["teacher"]["cost"]["params"]
    assert s["cost"]["latency_ms"] > 0 and s["cost"]["throughput_per_s"] > 0
    assert ev["speedup"]["student"]["size"] > 10
    assert (
        json.loads((kd / "eval.json").read_text())["models"]["student"]["accuracy"] == s["accuracy"]
    )
    assert ev["machine"]["cpu"] and ev["seed"] == 0


def test_report_contains_every_section_and_valid_plots(runs):
    kd, base = runs
    evaluate_run(kd, baseline=base)
    html_path = build_report(kd)
    md = (kd / "report.md").read_text()
    sections = ["Results", "Training loss terms", "Held-out metrics during training",
                "Calibration", "Quality vs size and latency", "Confusion matrix", "Setup"]  # fmt: skip
    for sec in sections:
        assert f"## {sec}" in md
    for name in ("loss_terms", "eval_metrics", "reliability", "quality_vs_cost", "confusion"):
        img = mpimg.imread(kd / "plots" / f"{name}.png")
        assert img.shape[0] > 100 and img.shape[1] > 100
        assert img[..., :3].std() > 0.02, f"{name}.png looks blank"
    parser = _Collect()
    parser.feed(html_path.read_text())
    assert parser.tags.count("img") == 5 and "table" in parser.tags
    assert all(r.startswith("data:image/png;base64,") for r in parser.refs), parser.refs
    assert set(sections) <= set(parser.h2)
    assert "student without KD" in md and "distilled student" in md


def test_compare_runs_table_and_plot(runs, tmp_path):
    kd, base = runs
    for d in runs:
        evaluate_run(d, measure=False)
    rows, plot = compare_runs([kd, base], tmp_path / "cmp.png")
    assert [r["run"] for r in rows] == [kd.name, base.name]
    assert all(0 <= r["accuracy"] <= 1 for r in rows)
    assert mpimg.imread(plot)[..., :3].std() > 0.02


def test_report_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a mentor run directory"):
        build_report(tmp_path)
    with pytest.raises(FileNotFoundError, match="mentor eval"):
        compare_runs([tmp_path])
