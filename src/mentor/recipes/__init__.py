"""Shipped recipes: YAML files in this package, registered by name."""

from __future__ import annotations

from pathlib import Path

import yaml

from mentor.registry import Registry, RegistryError

RECIPES: Registry[Path] = Registry("recipe")
_HERE = Path(__file__).parent

for _p in sorted(_HERE.glob("*.yaml")):
    _first = (yaml.safe_load(_p.read_text()) or {}).get("description", "")
    RECIPES.register(_p.stem, _p, description=str(_first).strip().splitlines()[0] if _first else "")


def resolve_recipe(name_or_path: str) -> Path:
    """Path of a shipped recipe by name, or of a YAML file given by path."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        return p
    try:
        return RECIPES.get(name_or_path)
    except RegistryError as e:
        raise ValueError(f"{e}. Or pass the path of a YAML recipe file.") from None


def list_recipes() -> list[tuple[str, str]]:
    """(name, description) of every shipped recipe."""
    return [(n, RECIPES.describe(n)) for n in RECIPES.names()]


# A few steps on a few short examples: `mentor demo --smoke` and the test suite run every
# shipped recipe this way (the recipe's own settings are the real runs).
SMOKE = ["train.max_steps=4", "eval.every=2", "train.log_every=2"]
SMOKE_DATA = {
    "text-classifier": ["data.params.limit=40", "data.params.max_length=32",
                        "train.batch_size=8", "teacher.fit.epochs=2"],
    "embedding-tfidf": ["data.params.limit=48", "data.params.max_length=32",
                        "train.batch_size=16"],
    "causal-lm": ["data.params.max_blocks=12", "data.params.block_size=16",
                  "train.batch_size=2", "student.params.layers=[0,29]"],
    "causal-lm-pruned": ["data.params.max_blocks=12", "data.params.block_size=16",
                         "train.batch_size=2", "data.val_fraction=0.2",
                         "student.params.calibration_batches=1", "student.params.layers=2"],
    "causal-lm-xtok": ["data.params.max_chunks=20", "data.params.chunk_chars=96",
                       "train.batch_size=4", "student.params.hidden_size=64",
                       "student.params.num_layers=1"],
    "causal-lm-onpolicy": ["data.params.limit=12", "data.params.prompt_tokens=8",
                           "data.params.completion_tokens=6", "generation.max_new_tokens=4",
                           "train.batch_size=2", "student.params.layers=[0,29]"],
    "llm-labels-classifier": ["data.params.limit=40", "teacher.params.max_text_tokens=24",
                              "train.batch_size=4", "selection.budget=16",
                              "selection.params.initial=8", "selection.params.per_round=4",
                              "student.params.min_df=1"],
    "vision": ["data.params.limit=256", "data.params.val_limit=128", "teacher.fit.epochs=1"],
    "digits": ["teacher.fit.epochs=2"],
    "tiny-lm": ["teacher.fit.epochs=1", "data.params.n=96"],
    "tiny-classifier": ["teacher.fit.epochs=2"],
    "diffusion-2d": ["data.params.n=1000", "data.params.std=0.1", "teacher.params.hidden=128",
                     "student.params.hidden=128", "teacher.fit.epochs=150", "teacher.fit.lr=3e-3",
                     "train.batch_size=128", "diffusion.eval_samples=300"],
    "diffusion-digits": ["data.params.limit=200", "teacher.params.block_out_channels=[8,16]",
                         "student.params.block_out_channels=[8,16]", "teacher.fit.epochs=2",
                         "train.batch_size=16", "diffusion.eval_samples=32",
                         "diffusion.eval_teacher_steps=[1,4]", "diffusion.teacher_steps=4",
                         "diffusion.student_steps=[1]"],
}  # fmt: skip


def smoke_overrides(name: str) -> list[str]:
    """Overrides that shrink the shipped recipe ``name`` to a few seconds (tests, --smoke)."""
    return [*SMOKE, *SMOKE_DATA.get(name, [])]
