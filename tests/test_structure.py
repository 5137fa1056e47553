"""The shape of the code: no import cycle between strategies and training, and the README's strategy
table is the one the registry generates."""

from __future__ import annotations

import ast
from pathlib import Path

import strata
from strata import strategies

ROOT = Path(strata.__file__).parent
README = ROOT.parents[1] / "README.md"


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at any depth (lazy imports inside functions count)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


def imports_between(package: str, other: str) -> list[str]:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, package
    return [f"{f.relative_to(ROOT)} imports {m}" for f in files for m in sorted(imported_modules(f))
            if m == f"strata.{other}" or m.startswith(f"strata.{other}.")]


def test_strategies_do_not_import_train() -> None:
    assert imports_between("strategies", "train") == []


def test_train_does_not_import_strategies() -> None:
    assert imports_between("train", "strategies") == []


def test_readme_strategy_table_is_the_generated_one() -> None:
    text = README.read_text()
    table = strategies.options_table(strategies.builtin())  # a test may register its own
    assert table in text, "README's strategy table is stale: paste the output of `strata strategies --markdown`"
