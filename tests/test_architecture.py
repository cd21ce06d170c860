"""The house of docs/architecture.md: stage modules under moegate/stages/, library modules beside them,
and the arrows only point down."""

from __future__ import annotations

import ast

from conftest import REPO

PACKAGE = REPO / "src" / "moegate"


def _imports(path) -> set[str]:
    """Every moegate module ``path`` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return {m for m in found if m == "moegate" or m.startswith("moegate.")}


def test_a_library_module_never_imports_a_stage():
    # the CLI is the one entry point above both: it dispatches each subcommand to its stage
    library = [p for p in PACKAGE.rglob("*.py") if "stages" not in p.relative_to(PACKAGE).parts
               and p.name != "cli.py"]
    assert len(library) > 10
    wrong = {str(p.relative_to(PACKAGE)): sorted(m for m in _imports(p) if m.startswith("moegate.stages"))
             for p in library}
    assert not {k: v for k, v in wrong.items() if v}, wrong


def test_every_rule_file_has_its_stage_module_and_every_stage_its_rule():
    rules = {p.stem for p in (REPO / "rules").glob("*.smk")} - {"common"}
    stages = {p.stem for p in (PACKAGE / "stages").glob("*.py")} - {"__init__"}
    stages |= {p.name for p in (PACKAGE / "stages").iterdir() if (p / "__init__.py").exists()}
    assert rules == stages
