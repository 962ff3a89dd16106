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
