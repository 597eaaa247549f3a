"""One import direction between the cluster's two packages: `raymoe.actors` (Ray actor shells and
what starts them) imports `raymoe.cluster` (placement, dispatch, transport, the controller core,
the request front); `raymoe.cluster` never imports `raymoe.actors`, not even inside a function."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "raymoe"


def imported_modules(path: Path) -> set[str]:
    """Every module an `import` or `from ... import` in the file names (at any depth)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_cluster_never_imports_actors():
    offenders = {
        str(path.relative_to(PACKAGE.parent)): sorted(m for m in imported_modules(path) if m.startswith("raymoe.actors"))
        for path in sorted((PACKAGE / "cluster").rglob("*.py"))
    }
    assert {f: m for f, m in offenders.items() if m} == {}


def test_the_check_sees_imports_inside_functions(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("def f():\n    from raymoe.actors.expert_shard import ExpertShard\n")
    assert "raymoe.actors.expert_shard" in imported_modules(sample)


def test_actors_do_import_cluster():
    """The direction is actors -> cluster (the shells use placement, dispatch, transport)."""
    used = set().union(*(imported_modules(p) for p in (PACKAGE / "actors").rglob("*.py")))
    assert any(m.startswith("raymoe.cluster.") for m in used)
