"""The package's layers point one way (docs/architecture.md): every import, function-level ones
included, goes from a higher layer to the same or a lower one, and no import cycle spans two
areas of the package."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "mentor"

# most specific prefix wins; higher number = higher layer
LAYERS = {
    "mentor": 6,  # the package's public API re-exports everything
    "mentor.cli": 6,
    "mentor.demo": 6,
    "mentor.serve": 6,  # `mentor serve-teacher`: loads a teacher through the assembly
    "mentor.report": 6,
    "mentor.assembly": 5,
    "mentor.labeling": 5,  # `mentor generate --task label|rationale`: uses the assembly
    "mentor.search": 5,  # `mentor search`: candidate students scored through the assembly
    "mentor.engine": 4,
    "mentor.config": 3,  # validates names against the registries below
    "mentor.teachers": 2,
    "mentor.selection": 2,  # teacher budgets: wraps a teacher source
    "mentor.selectors": 2,
    "mentor.domain_mixing": 2,  # DDK on LM data: the selection loop's counterpart
    "mentor.pruning.cts": 2,  # Concrete Ticket Search optimises the cts_kl loss
    "mentor.cache": 2,
    "mentor.losses": 2,
    "mentor.tasks": 2,
    "mentor.eval.run_eval": 2,
    "mentor.eval": 1,
    "mentor.data": 1,
    "mentor.models": 1,
    "mentor.students": 1,
    "mentor.pruning": 1,  # masks, importance, structured pruning (builders use them)
    "mentor.diffusion": 1,  # generative students: schedules, samplers, objectives, metrics
    "mentor.signals": 1,
    "mentor.progress": 1,
    "mentor.generation": 1,
    "mentor.recipes": 0,
    "mentor.registry": 0,
    "mentor._console": 0,
    "mentor._version": 0,
    "mentor._jsonl": 0,
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in SRC.rglob("*.py")}


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    """Every mentor module ``path`` imports, anywhere in the file."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, base]) if base else ".".join(up)
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rsplit(".", 1)[0] if "." in t else ""
            if t and t != name:
                out.add(t)
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {n: _imports(p, n, set(mods)) for n, p in mods.items()}


def _layer(name: str) -> int:
    best = max((p for p in LAYERS if name == p or name.startswith(p + ".")), key=len)
    return LAYERS[best]


def test_every_module_has_a_layer():
    for name in _modules():
        assert any(name == p or name.startswith(p + ".") for p in LAYERS), name


def test_imports_never_point_up():
    bad = [
        f"{a} (layer {_layer(a)}) imports {b} (layer {_layer(b)})"
        for a, deps in _graph().items()
        for b in deps
        if _layer(b) > _layer(a)
    ]
    assert not bad, "\n".join(bad)


def _area(name: str) -> str:
    parts = name.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else name


def test_no_import_cycle_spans_two_areas():
    graph = _graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    sccs: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            sccs.append(comp)

    for v in graph:
        if v not in index:
            visit(v)
    spanning = [sorted(c) for c in sccs if len({_area(m) for m in c}) > 1]
    assert not spanning, f"import cycles across areas: {spanning}"


def test_the_checker_sees_function_level_imports(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from mentor.assembly import distill\n")
    assert _imports(f, "mentor.cache.x", {"mentor.assembly", "mentor.cache"}) == {"mentor.assembly"}
